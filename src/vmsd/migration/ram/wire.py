"""RAM records at memory speed: dirty pages encoded and received in vectorized runs.

:mod:`vmsd.migration.ram.records` keeps one object per record so tools can show and
rewrite a stream byte for byte; a live migration moves hundreds of thousands
of pages per second and cannot afford that.  Here a run of pages of one kind
becomes one numpy array of records (``be64 offset|flags`` + payload, stride
4104 for normal pages, 9 for zero pages), and a receiver applies every
complete record already buffered in one strided copy into the RAM mapping.
Anything unusual (a record naming its block, XBZRLE, compressed pages, the
block list, EOS) goes through a per-record path with QEMU's checks.
"""

from __future__ import annotations

import math
import os
import queue
import select
import struct
import threading
import traceback
import zlib
from collections.abc import Callable, Iterator

import attrs
import numpy as np
import numpy.typing as npt

from vmsd.migration.iovec import Scattered
from vmsd.migration.ram import mapped, xbzrle
from vmsd.migration.ram.blocks import PAGE_SIZE, Pages, RamBlock, RamBlocks, zero_pages
from vmsd.migration.ram.mapped import MappedRamHeader
from vmsd.migration.ram.records import (
    PLAIN,
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    RamBlockInfo,
    RamContext,
    RamPayload,
    RamRecord,
    check_flags,
    read_block_list,
    read_page_payload,
    read_ram,
    write_ram,
)
from vmsd.migration.transport.idle import receive_timeout, stalled
from vmsd.runtime.errors import MalformedStream, VMSDError
from vmsd.runtime.io import ByteSource, Reader, Writer

_U64 = struct.Struct(">Q")
_BE64 = np.dtype(">u8")
_NORMAL = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
_ZERO = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE
_NORMAL_STRIDE = 8 + PAGE_SIZE
_ZERO_STRIDE = 8 + 1
_FLAG_MASK = PAGE_SIZE - 1
# zlib's compressBound(TARGET_PAGE_SIZE), QEMU's limit for COMPRESS_PAGE records.
_COMPRESS_BOUND = PAGE_SIZE + (PAGE_SIZE >> 12) + (PAGE_SIZE >> 14) + (PAGE_SIZE >> 25) + 13
_PAGE_KINDS = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_XBZRLE | RAM_SAVE_FLAG_COMPRESS_PAGE
# Receive buffers: room for a partial record in front, then one socket read.
_RESERVE = 8192
_READ = 1 << 20
_BUFFERS = 4

Buffers = list[bytes | memoryview | Scattered]


@attrs.define
class RamCounters:
    """Page and byte counts under QEMU's ``query-migrate`` names."""

    duplicate: int = 0  # zero pages
    normal: int = 0  # full pages
    transferred: int = 0  # bytes of RAM records
    xbzrle_pages: int = 0
    xbzrle_bytes: int = 0
    xbzrle_cache_miss: int = 0
    xbzrle_overflow: int = 0
    skipped: int = 0  # XBZRLE pages unchanged since their cached copy

    @property
    def normal_bytes(self) -> int:
        return self.normal * PAGE_SIZE


def zero_mask(block: RamBlock, pages: Pages) -> npt.NDArray[np.bool_]:
    """True for each listed page that is all zero (see :func:`zero_pages`).

    Pages the file does not hold (holes, see :meth:`RamBlock.holds`) are
    zero without being read: reading one through the mapping would allocate
    it, and a sparse guest's source would fill up with zero pages.
    """
    n = int(pages.size)
    if n == 0:
        return np.zeros(0, dtype=np.bool_)
    first, last = int(pages[0]), int(pages[-1])
    if last - first < 64 * n:  # one mincore call over the span, not one per page
        held = block.holds(first, last - first + 1)
        if last - first + 1 != n:
            held = held[pages - first]
        if not held.all():
            partial: npt.NDArray[np.bool_] = ~held
            inside = np.flatnonzero(held)
            partial[inside] = zero_pages(block, pages[inside])
            return partial
    return zero_pages(block, pages)


def _runs(mask: npt.NDArray[np.bool_]) -> Iterator[tuple[int, int, bool]]:
    """(start, stop, value) for each run of equal values."""
    edges = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    start = 0
    for stop in [*edges.tolist(), int(mask.size)]:
        yield start, stop, bool(mask[start])
        start = stop


class RamEncoder:
    """Turns dirty pages into QEMU 7.2 RAM records, as ``ram_save_target_page`` does.

    A block is named on its first record after another block's pages (QEMU's
    ``last_sent_block``); later records carry CONTINUE.  With an XBZRLE cache
    and ``xbzrle_enabled`` (QEMU enables it after the first complete pass),
    non-zero pages go through the cache one by one.
    """

    def __init__(self, cache: xbzrle.XbzrleCache | None = None, zero_copy: bool = False) -> None:
        self.cache = cache
        # Normal pages as Scattered records (headers here, pages left in the mapping) for a writer
        # that takes them (Channel.writev), instead of copied with their headers into one buffer.
        self.zero_copy = zero_copy
        self.xbzrle_enabled = False
        self.last_block: RamBlock | None = None
        self.counters = RamCounters()
        self._bases: dict[str, int] = {}

    def block_list(self, blocks: RamBlocks, context: RamContext = PLAIN) -> bytes:
        """The MEM_SIZE record of the setup section (without its EOS), laid out as ``context`` says."""
        out = bytearray(_U64.pack(blocks.total() | RAM_SAVE_FLAG_MEM_SIZE))
        base = 0
        for b in blocks:
            name = b.name.encode()
            out += bytes([len(name)]) + name + _U64.pack(b.used_length)
            if context.ignore_shared:
                out += _U64.pack(b.addr)
            self._bases[b.name] = base  # the page cache keys pages by a global RAM address
            base += b.used_length
        self.counters.transferred += len(out)
        return bytes(out)

    def mapped_block_list(self, blocks: RamBlocks, context: RamContext, out: mapped.MappedRamFile) -> None:
        """The MEM_SIZE record of a mapped-ram stream, written into ``out`` at its position (each entry is
        followed by its header and the block's place in the file, so it cannot be one buffer)."""
        entries = []
        for b in blocks:
            name = b.name.encode()
            entry = bytes([len(name)]) + name + _U64.pack(b.used_length)
            if context.ignore_shared:
                entry += _U64.pack(b.addr)
            entries.append((b.name, b.used_length, entry))
        self.counters.transferred += out.write_block_list(_U64.pack(blocks.total() | RAM_SAVE_FLAG_MEM_SIZE),
                                                          entries)

    def eos(self) -> bytes:
        self.counters.transferred += 8
        return _U64.pack(RAM_SAVE_FLAG_EOS)

    def encode(self, block: RamBlock, pages: Pages, age: int = 0, last_stage: bool = False,
               zero: npt.NDArray[np.bool_] | None = None) -> Buffers:
        """Records for ``pages`` (ascending indices) of ``block``, as buffers to write in order.

        ``zero``: which pages are all zero, when the caller has scanned them already.
        """
        if pages.size == 0:
            return []
        out: Buffers = []
        zero = zero_mask(block, pages) if zero is None else zero
        if self.cache is not None and self.xbzrle_enabled:
            self._encode_xbzrle(out, block, pages, zero, age, last_stage)
            return out
        if self.last_block is not block:
            self._named(out, block, int(pages[0]), bool(zero[0]))
            pages, zero = pages[1:], zero[1:]
        if pages.size:
            for start, stop, is_zero in _runs(zero):
                out.append(self._run(block, pages[start:stop], is_zero))
        return out

    def _named(self, out: Buffers, block: RamBlock, page: int, is_zero: bool) -> None:
        """The record that switches to ``block``: header, block name, payload."""
        name = block.name.encode()
        flags = RAM_SAVE_FLAG_ZERO if is_zero else RAM_SAVE_FLAG_PAGE
        payload: bytes | memoryview = b"\x00" if is_zero else block.page(page)
        head = _U64.pack(page * PAGE_SIZE | flags) + bytes([len(name)]) + name
        out.append(head + bytes(payload))
        self._count(is_zero, 1, len(head) + len(payload))
        self.last_block = block

    def _run(self, block: RamBlock, pages: Pages, is_zero: bool) -> memoryview | Scattered:
        n = int(pages.size)
        if self.zero_copy and not is_zero:
            wire = ((pages << 12) | _NORMAL).astype(_BE64)
            iov = np.empty((2 * n, 2), dtype=np.uint64)
            iov[0::2, 0] = wire.ctypes.data + 8 * np.arange(n, dtype=np.uint64)
            iov[0::2, 1] = 8
            iov[1::2, 0] = block.bytes_.ctypes.data + pages.astype(np.uint64) * PAGE_SIZE
            iov[1::2, 1] = PAGE_SIZE
            self._count(False, n, n * _NORMAL_STRIDE)
            return Scattered(iov, (wire, block))
        stride = _ZERO_STRIDE if is_zero else _NORMAL_STRIDE
        rec = np.empty((n, stride), dtype=np.uint8)
        heads = (pages << 12) | (_ZERO if is_zero else _NORMAL)
        rec[:, :8] = heads.astype(_BE64).view(np.uint8).reshape(n, 8)
        if is_zero:
            rec[:, 8] = 0
        else:
            first, last = int(pages[0]), int(pages[-1])
            rows = block.bytes_.reshape(-1, PAGE_SIZE)
            rec[:, 8:] = rows[first:last + 1] if last - first + 1 == n else rows[pages]
        self._count(is_zero, n, rec.size)
        return rec.reshape(-1).data

    def _count(self, is_zero: bool, pages: int, nbytes: int) -> None:
        c = self.counters
        if is_zero:
            c.duplicate += pages
        else:
            c.normal += pages
        c.transferred += nbytes

    def _encode_xbzrle(self, out: Buffers, block: RamBlock, pages: Pages, zero: npt.NDArray[np.bool_],
                       age: int, last_stage: bool) -> None:
        cache = self.cache
        assert cache is not None
        base = self._bases.get(block.name, 0)
        c = self.counters
        for page, is_zero in zip(pages.tolist(), zero.tolist(), strict=True):
            offset = page * PAGE_SIZE
            flags = RAM_SAVE_FLAG_CONTINUE if self.last_block is block else 0
            name = b""
            if not flags:
                raw = block.name.encode()
                name = bytes([len(raw)]) + raw
            if is_zero:
                cache.cache_zero_page(base + offset, age)
                rec = _U64.pack(offset | flags | RAM_SAVE_FLAG_ZERO) + name + b"\x00"
                c.duplicate += 1
            else:
                misses, overflows = cache.cache_miss, cache.overflow
                decision = cache.save_page(base + offset, block.page(page), age, last_stage=last_stage)
                c.xbzrle_cache_miss += cache.cache_miss - misses
                c.xbzrle_overflow += cache.overflow - overflows
                if decision.kind == "unchanged":
                    c.skipped += 1
                    continue
                if decision.kind == "delta":
                    delta = decision.delta
                    rec = (_U64.pack(offset | flags | RAM_SAVE_FLAG_XBZRLE) + name
                           + bytes([xbzrle.ENCODING_FLAG_XBZRLE]) + len(delta).to_bytes(2, "big") + delta)
                    c.xbzrle_pages += 1
                    c.xbzrle_bytes += len(rec)
                else:
                    rec = _U64.pack(offset | flags | RAM_SAVE_FLAG_PAGE) + name + decision.page
                    c.normal += 1
            self.last_block = block
            c.transferred += len(rec)
            out.append(rec)


class RamLoader:
    """Applies RAM records from a :class:`Reader` straight into :class:`RamBlocks` (``ram_load_precopy``).

    ``create_missing``: blocks the peer announces and we lack are created (a
    snapshot receiver); otherwise they are a wrong block list.  Errors name
    the byte offset and block; the pages already applied stay written (see
    :mod:`vmsd.migration.ram.blocks` on why a failed destination is discarded).
    """

    def __init__(self, blocks: RamBlocks, create_missing: bool = True, mark_dirty: bool = False) -> None:
        self.blocks = blocks
        self.create_missing = create_missing
        self.mark_dirty = mark_dirty
        self.counters = RamCounters()
        self.sections = 0
        self.context = PLAIN  # the stream's, given with each section
        # Blocks some page record named.  With x-ignore-shared a source sends no page of its shared blocks,
        # so after a complete precopy the others are exactly the blocks that stayed where they were.
        self.named: set[str] = set()
        # Multifd: called at each sync point -- every EOS with 7.2's layout, every MULTIFD_FLUSH with the newest.
        self.sync_hook: Callable[[], None] | None = None
        self.legacy_sync = False
        # Receive buffers outlive each run of pages: a sender's sections end every 50 ms or so, and
        # fresh megabytes per section would be zero-filled and page-faulted all over again.
        self._buffers: list[bytearray] = []

    def load_section(self, r: Reader, context: RamContext = PLAIN) -> None:
        """Read and apply records up to and including EOS, laid out as the stream's ``context`` says."""
        self.context = context
        try:
            self._load(r)
        except VMSDError as e:
            self.blocks.failed = e
            _drop_page_views(e)
            raise
        except ValueError as e:  # a malformed XBZRLE delta
            err = MalformedStream(str(e), offset=r.tell())
            self.blocks.failed = err
            _drop_page_views(e)
            raise err from None
        self.sections += 1

    def _load(self, r: Reader) -> None:
        blocks = self.blocks
        c = self.counters
        start = r.tell()
        # Whether a receiver thread may read ahead (asked once: it does not change within a section).
        threaded = r.source is not None and _pollable(r.source)
        while True:
            block = blocks.last_block
            if block is not None and len(r.buf) - r.pos >= 8:
                flags = _U64.unpack_from(r.buf, r.pos)[0] & _FLAG_MASK
                if flags == _NORMAL or flags == _ZERO:
                    stride = _NORMAL_STRIDE if flags == _NORMAL else _ZERO_STRIDE
                    n = self._apply(block, r.buf, r.pos, len(r.buf), flags, stride, r.tell())
                    r.pos += n * stride
                    received = threaded and self._needs_input(r.buf, r.pos, len(r.buf)) and self._stream(r, block)
                    if n or received:
                        continue
            if self._record(r):
                c.transferred += r.tell() - start
                return

    def _stream(self, r: Reader, block: RamBlock) -> bool:
        """Apply runs of CONTINUE pages while a thread receives the next buffers.

        The thread reads from the reader's source into spare buffers (the
        socket read releases the GIL, and so does numpy's copy into RAM), so
        receiving and applying overlap.  Each buffer keeps room in front for
        the partial record the previous one ended with.  When the runs end
        (a record of another kind, or end of input) the thread stops and
        everything it read goes back to the reader, in order.  False if no
        input came (end of stream).
        """
        source = r.source
        assert source is not None
        pipe = _Receiver(source, self._buffers)
        tail = r.buf[r.pos:]
        at = r.tell()
        received = False
        try:
            while self._needs_input(tail, 0, len(tail)):
                got = pipe.next()
                if got is None:
                    break
                buf, end = got
                received = True
                pos = _RESERVE - len(tail)
                buf[pos:_RESERVE] = tail
                while end - pos >= 8:
                    flags = _U64.unpack_from(buf, pos)[0] & _FLAG_MASK
                    if flags != _NORMAL and flags != _ZERO:
                        break
                    stride = _NORMAL_STRIDE if flags == _NORMAL else _ZERO_STRIDE
                    n = self._apply(block, buf, pos, end, flags, stride, at)
                    if n == 0:
                        break
                    pos += n * stride
                    at += n * stride
                tail = bytes(buf[pos:end])
                pipe.recycle(buf)
        finally:
            rest = pipe.stop()
            r.rebuffer(b"".join([tail, *rest]), at)
        return received or bool(rest)

    @staticmethod
    def _needs_input(buf: bytes | bytearray, pos: int, end: int) -> bool:
        """Whether the runs need more input: the next record is a page run's and incomplete (or unknown yet).

        A complete record of another kind -- EOS, say, after which the peer
        may wait for us -- must never make the receiver wait for more bytes.
        """
        if end - pos < 8:
            return True
        flags = _U64.unpack_from(buf, pos)[0] & _FLAG_MASK
        if flags == _NORMAL:
            return end - pos < _NORMAL_STRIDE
        return flags == _ZERO and end - pos < _ZERO_STRIDE

    def _apply(self, block: RamBlock, buf: bytes | bytearray, pos: int, end: int, flags: int, stride: int,
               at: int) -> int:
        """Apply the complete records of kind ``flags`` in ``buf[pos:end]`` (at stream offset ``at``); how many."""
        k = (end - pos) // stride
        if k == 0:
            return 0
        heads = np.ndarray((k,), dtype=_BE64, buffer=buf, offset=pos, strides=(stride,))
        bad = np.flatnonzero((heads & np.uint64(_FLAG_MASK)) != flags)
        n = int(bad[0]) if bad.size else k
        if n == 0:
            return 0
        pages = (heads[:n] >> np.uint64(12)).astype(np.int64)
        outside = np.flatnonzero(pages >= block.npages)
        if outside.size:
            i = int(outside[0])
            raise MalformedStream(f"illegal RAM offset {int(pages[i]) * PAGE_SIZE:#x} in block '{block.name}' "
                                  f"of {block.used_length:#x} bytes", offset=at + i * stride)
        first, last = int(pages[0]), int(pages[-1])
        contiguous = last - first + 1 == n and (n == 1 or bool((np.diff(pages) == 1).all()))
        if flags == _NORMAL:
            if contiguous:
                block.store_pages(first, memoryview(buf), pos + 8, stride, n)
            else:
                src = np.ndarray((n, PAGE_SIZE), dtype=np.uint8, buffer=buf, offset=pos + 8, strides=(stride, 1))
                block.bytes_.reshape(-1, PAGE_SIZE)[pages] = src
            self.counters.normal += n
        else:
            fills = np.ndarray((n,), dtype=np.uint8, buffer=buf, offset=pos + 8, strides=(stride,))
            if fills.any():
                return 0  # a non-zero fill byte is legal but odd: the per-record path takes it
            block.clear(pages)  # as QEMU, only memory that is not zero already is written
            self.counters.duplicate += n
        if self.mark_dirty:
            block.mark_pages(pages)
        return n

    def _record(self, r: Reader) -> bool:
        """One record the slow way; True at EOS."""
        at = r.tell()
        word = r.u64()
        flags = word & _FLAG_MASK
        offset = word & ~_FLAG_MASK
        blocks = self.blocks
        c = self.counters
        if flags & RAM_SAVE_FLAG_HOOK:
            raise MalformedStream("RDMA hook records are not supported", offset=at)
        check_flags(flags, at, self.context)
        if flags & RAM_SAVE_FLAG_MEM_SIZE:
            try:
                if self.context.mapped_ram:  # each entry is followed by its pages' place in the file
                    read_block_list(r, offset, self.context, on_mapped=self._load_mapped)
                else:
                    _apply_block_list(blocks, read_block_list(r, offset, self.context), self.create_missing,
                                      self.context)
            except VMSDError as e:
                if e.offset is None:
                    e.offset = at
                raise
            return False
        if flags & _PAGE_KINDS:
            if flags & RAM_SAVE_FLAG_CONTINUE:
                block = blocks.last_block
                if block is None:
                    raise MalformedStream("RAM page continues a block that was never named", offset=at)
            else:
                name = r.counted_string().decode(errors="replace")
                found = blocks.get(name)
                if found is None:
                    raise MalformedStream(f"can't find RAM block '{name}'", offset=at)
                if self.context.in_place:
                    raise MalformedStream(f"a page of RAM block '{name}' although its memory was handed over "
                                          f"(CPR): no page may come", offset=at)
                if found.shared and self.context.ignore_shared:
                    raise MalformedStream(f"RAM block '{name}' is shared here and x-ignore-shared is on: "
                                          f"it should not be migrated", offset=at)
                block = blocks.last_block = found
                self.named.add(name)
            if offset + PAGE_SIZE > block.used_length:
                raise MalformedStream(f"illegal RAM offset {offset:#x} in block '{block.name}' "
                                      f"of {block.used_length:#x} bytes", offset=at)
            kind = flags & ~RAM_SAVE_FLAG_CONTINUE
            page = block.view[offset:offset + PAGE_SIZE]
            if kind == RAM_SAVE_FLAG_ZERO:
                fill = r.u8()
                if fill or block.words[offset // PAGE_SIZE].any():
                    block.bytes_[offset:offset + PAGE_SIZE] = fill
                c.duplicate += 1
            elif kind == RAM_SAVE_FLAG_PAGE:
                r.readinto(page)
                c.normal += 1
            elif kind == RAM_SAVE_FLAG_XBZRLE:
                delta = read_page_payload(r, kind, at)
                try:
                    xbzrle.decode_into(memoryview(delta)[3:], page)
                except ValueError as e:
                    raise MalformedStream(f"XBZRLE page at {offset:#x} in '{block.name}': {e}", offset=at) from None
                c.xbzrle_pages += 1
            else:  # COMPRESS_PAGE, the one page kind left (check_flags)
                _decompress_page(read_page_payload(r, kind, at), page,
                                 f"compressed page at {offset:#x} in '{block.name}'")
            del page
            if self.mark_dirty:
                block.mark_dirty(offset, PAGE_SIZE)
            return False
        if flags & RAM_SAVE_FLAG_EOS:
            if self.sync_hook is not None and self.legacy_sync:
                self.sync_hook()
            blocks.complete = True
            return True
        # What check_flags leaves: MULTIFD_FLUSH, a multifd sync point.
        if self.sync_hook is not None:
            if self.legacy_sync:  # a peer without such records syncs at every EOS
                raise MalformedStream("a MULTIFD_FLUSH record: the source uses a newer multifd layout than "
                                      "7.2's (--peer-version)", offset=at)
            self.sync_hook()
        return False


    def _load_mapped(self, r: Reader, info: RamBlockInfo, header: MappedRamHeader) -> None:
        """One mapped-ram block: checked and created as its entry says (entries and pages alternate in the
        file, so a later bad entry is found only after this block loaded), then its present pages read from
        the file into it (QEMU's ``parse_ramblock_mapped_ram``)."""
        at = r.tell()
        _apply_block_list(self.blocks, [info], self.create_missing, self.context)
        block = self.blocks[info.name]
        if self.context.in_place:
            raise MalformedStream(f"mapped-ram pages for RAM block '{info.name}' although its memory was handed "
                                  f"over (CPR): no page may come", offset=at)

        def fill(src: Reader, offset: int, n: int) -> None:
            src.readinto(block.view[offset:offset + n])

        try:
            present = mapped.load_block(r, header, info.used_length, fill, self.context.file_offset)
        except VMSDError as e:
            e.message = f"mapped-ram RAM block '{info.name}': {e.message}"
            raise
        n = int(present.sum())
        self.counters.normal += n
        self.counters.duplicate += block.npages - n
        self.named.add(info.name)
        if self.mark_dirty:
            block.mark_pages(np.flatnonzero(present))


class _Receiver:
    """A thread reading a byte source into a few reused buffers, ahead of the thread applying them."""

    def __init__(self, source: ByteSource, buffers: list[bytearray]) -> None:
        self.source = source
        self.free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self.full: queue.SimpleQueue[tuple[bytearray, int] | BaseException | None] = queue.SimpleQueue()
        if not buffers:
            buffers += [bytearray(_RESERVE + _READ) for _ in range(_BUFFERS)]
        for buf in buffers:
            self.free.put(buf)
        self.fd = _input_fd(source)  # only started on a _pollable source
        # What the source holds already shows on no descriptor (a TLS channel's decrypted bytes).
        self._buffered: Callable[[], int] = getattr(source, "buffered", lambda: 0)
        # A read of the source fails once nothing arrives for its idle limit; waiting in poll must not outlast it.
        self.idle = receive_timeout(self.fd)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # stop() ends a wait for input at once
        self._thread = threading.Thread(target=self._run, name="vmsd RAM receiver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLPRI)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    buf = self.free.get(timeout=0.01)
                except queue.Empty:
                    continue
                # Wait for input without blocking for good: stop() must be able to end the thread
                # while the peer is silent (e.g. waiting for a return-path answer).
                held = self._buffered()
                wait = 0 if held else None if self.idle is None else math.ceil(self.idle * 1000)
                ready = {fd for fd, _ in poller.poll(wait)}
                if self._wake_r in ready or self._stop.is_set():
                    self.free.put(buf)
                    return
                if not ready and not held:
                    assert self.idle is not None
                    raise stalled(getattr(self.source, "name", f"descriptor {self.fd}"), "read failed", self.idle)
                got = self.source.readinto(memoryview(buf)[_RESERVE:]) or 0
                if got <= 0:
                    self.free.put(buf)
                    self.full.put(None)
                    return
                self.full.put((buf, _RESERVE + got))
        except BaseException as e:  # handed to the applying thread
            self.full.put(e)

    def next(self) -> tuple[bytearray, int] | None:
        item = self.full.get()
        if isinstance(item, BaseException):
            self.full.put(item)
            raise item
        if item is None:
            self.full.put(None)  # stays at end of input
        return item

    def recycle(self, buf: bytearray) -> None:
        self.free.put(buf)

    def stop(self) -> list[memoryview]:
        """End the thread; the bytes it read that were not taken, in order (views of the loader's buffers,
        valid until the next receiver reuses them)."""
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)
        rest: list[memoryview] = []
        while True:
            try:
                item = self.full.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple):
                buf, end = item
                rest.append(memoryview(buf)[_RESERVE:end])
            elif isinstance(item, BaseException):
                raise item
        return rest

def _input_fd(source: ByteSource) -> int:
    """The descriptor to poll for ``source``'s input: a channel's ``input_fd()``, a file's ``fileno()``, or -1."""
    fd = getattr(source, "input_fd", None) or getattr(source, "fileno", None)
    return -1 if fd is None else int(fd())


def _pollable(source: ByteSource) -> bool:
    """Whether ``source`` has a descriptor to poll.  The receiver thread must be able to stop while the peer
    is silent (it may be waiting for our return-path answer); a channel without one (in memory) is read by
    the applying thread alone, record by record."""
    return _input_fd(source) >= 0


def _drop_page_views(e: BaseException) -> None:
    """Clear the failed frames' locals: a page view kept alive by the traceback would pin the mapping (and the
    descriptor mmap duplicates) after the caller closes the blocks."""
    seen: BaseException | None = e
    while seen is not None:  # the chained errors (a codec's ValueError) hold the same frames
        if seen.__traceback__ is not None and seen.__traceback__.tb_next is not None:
            traceback.clear_frames(seen.__traceback__.tb_next)
        seen = seen.__cause__ or seen.__context__


def _apply_block_list(blocks: RamBlocks, announced: list[RamBlockInfo], create_missing: bool,
                      context: RamContext) -> None:
    # Check everything first so a bad list creates nothing.
    for info in announced:
        have = blocks.get(info.name)
        if have is not None and have.used_length != info.used_length:
            raise MalformedStream(f"wrong block list from the peer: RAM block '{info.name}' is "
                                  f"{info.used_length:#x} bytes in the stream, {have.used_length:#x} here")
        if have is not None and context.ignore_shared and have.shared and info.addr != have.addr:
            # The block stays where it is only if both sides map it at the same guest address.
            raise MalformedStream(f"Mismatched GPAs for block '{info.name}': {info.addr or 0:#x} in the stream, "
                                  f"{have.addr:#x} here")
        if have is None and not create_missing:
            raise MalformedStream(f"wrong block list from the peer: unknown RAM block '{info.name}'")
        if have is None and (info.used_length <= 0 or info.used_length % PAGE_SIZE):
            raise MalformedStream(f"wrong block list from the peer: RAM block '{info.name}' "
                                  f"of {info.used_length:#x} bytes")
    if blocks.limit is not None:
        total = blocks.total() + sum(info.used_length for info in announced if info.name not in blocks)
        if total > blocks.limit:
            raise MalformedStream(f"the peer announces {total:#x} bytes of RAM, above the limit of "
                                  f"{blocks.limit:#x} (max-ram)")
    if blocks.max_blocks is not None:
        count = len(blocks) + len({info.name for info in announced if info.name not in blocks})
        if count > blocks.max_blocks:
            raise MalformedStream(f"the peer announces {count} RAM blocks, above the limit of {blocks.max_blocks} "
                                  "(max-ram-blocks)")
    for info in announced:  # new blocks keep the peer's order (QEMU's list is ordered by maximum length)
        if info.name not in blocks:
            blocks.create(info.name, info.used_length, append=True).addr = info.addr or 0


def _decompress_page(data: bytes, page: memoryview, where: str) -> None:
    """QEMU's qemu_uncompress_data: one complete zlib stream that inflates to at most a page."""
    length = int.from_bytes(data[:4], "big")
    if length > _COMPRESS_BOUND:
        raise MalformedStream(f"{where}: invalid compressed data length {length}")
    d = zlib.decompressobj()
    try:
        out = d.decompress(data[4:4 + length], PAGE_SIZE)
    except zlib.error as e:
        raise MalformedStream(f"{where}: decompress data failed ({e})") from None
    if not d.eof:
        raise MalformedStream(f"{where}: decompress data failed (no end of stream within a page)")
    page[:len(out)] = out


# -- the same, record objects in and out (stream tools) ---------------------------------------------------------------
def apply_ram(blocks: RamBlocks, payload: RamPayload, create_missing: bool = True, mark_dirty: bool = False) -> None:
    """Apply one parsed section's records (:func:`vmsd.migration.ram.records.read_ram`) as a :class:`RamLoader` would.

    The blocks *are* the destination's memory, so pages applied before a bad
    record stay written -- as in QEMU, whose destination is discarded when a
    load fails; ``blocks.failed`` is set and further applies are refused.
    """
    if blocks.failed is not None:
        raise MalformedStream(f"RAM blocks are unusable after an earlier failed load: {blocks.failed.message}")
    if not payload.records or not payload.records[-1].flags & RAM_SAVE_FLAG_EOS:
        raise MalformedStream("RAM payload ends without EOS")
    w = Writer()
    write_ram(w, payload)
    blocks.complete = False
    RamLoader(blocks, create_missing=create_missing, mark_dirty=mark_dirty).load_section(Reader(w.getvalue()))


def ram_records(blocks: RamBlocks) -> list[RamRecord]:
    """The records QEMU 7.2 writes for a paused VM in one pass, as objects.

    ``MEM_SIZE`` + ``EOS`` (the START section), every page of every block as
    ZERO or PAGE (a block named on its first page, CONTINUE after), ``EOS``
    (the PART section), then ``EOS`` (the END section).
    """
    enc = RamEncoder()
    out = bytearray(enc.block_list(blocks) + enc.eos())
    for block in blocks:
        for buf in enc.encode(block, np.arange(block.npages, dtype=np.int64)):
            assert not isinstance(buf, Scattered)  # zero_copy is off
            out += buf
    out += enc.eos() + enc.eos()
    r = Reader(bytes(out))
    records: list[RamRecord] = []
    for _ in range(3):
        records += read_ram(r, block_named=bool(records)).records
    return records


def ram_section_payloads(blocks: RamBlocks, pages_per_part: int | None = None) -> list[RamPayload]:
    """START, PART..., END payloads for a stream; PARTs hold at most ``pages_per_part`` pages.

    QEMU splits pages among PART sections by time and bandwidth, so any split
    loads the same memory.  Each PART names the block on its first page
    (QEMU may start one with CONTINUE), which keeps every payload readable on
    its own by :func:`~vmsd.migration.ram.records.read_ram`.
    """
    records = ram_records(blocks)
    body = records[2:-2]
    step = pages_per_part or max(len(body), 1)
    parts: list[RamPayload] = []
    current_block: str | None = None
    for i in range(0, max(len(body), 1), step):
        chunk = body[i:i + step]
        for j, rec in enumerate(chunk):
            if rec.block is not None:
                current_block = rec.block
            elif j == 0:
                chunk[0] = RamRecord(rec.flags & ~RAM_SAVE_FLAG_CONTINUE, rec.offset, block=current_block,
                                     data=rec.data)
        parts.append(RamPayload([*chunk, RamRecord(RAM_SAVE_FLAG_EOS, 0)]))
    return [RamPayload(records[:2]), *parts, RamPayload(records[-1:])]
