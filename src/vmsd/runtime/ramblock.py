"""Guest RAM blocks in shared memory: dirty tracking, zero-page detection, RAM load and save.

A :class:`RamBlock` is one of QEMU's RAM blocks (``pc.ram``, ``pc.bios``, a
``memory-backend-*`` id, ...) backed by a memfd or by a shared file such as one
under ``/dev/shm``, mapped ``MAP_SHARED``.  Its ``fd`` stays open for the
block's lifetime so a later CPR exec can hand it to a new process.

:class:`RamBlocks` keeps blocks by name in QEMU's RAM-list order (largest
first; a new block goes before the first strictly smaller one, as
``qemu_ram_block_add`` does).

:func:`apply_ram` is the loader (QEMU's ``ram_load_precopy``) and
:func:`ram_records` the one-pass writer of a paused VM's RAM (``ram_save_setup``
+ one ``ram_save_iterate`` pass + ``ram_save_complete``).

Failure semantics of :func:`apply_ram`: the blocks *are* the destination's
memory, so pages applied before a bad record stay written -- partial writes
are inherent, exactly as in QEMU, whose destination is discarded when a load
fails.  A failed apply marks the container ``failed`` (the error is kept);
``complete`` is only true after a successful apply that ended with EOS, and a
failed container refuses further applies.  The caller discards it.
"""

from __future__ import annotations

import errno
import importlib
import mmap
import os
import threading
import traceback
import zlib
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from vmsd.runtime.errors import MalformedStream, VMSDError
from vmsd.runtime.ram import (
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    RamPayload,
    RamRecord,
)
from vmsd.runtime.ram import RamBlock as RamBlockInfo

PAGE_SIZE = 4096
_WORDS_PER_PAGE = PAGE_SIZE // 8
_ZERO_CHUNK_PAGES = 256  # 1 MiB: the second look at a mixed chunk is served from cache
_ZERO_PAGE = bytes(PAGE_SIZE)
_MADV_POPULATE_WRITE = 23  # <linux/mman.h>; Python's mmap module only names it from 3.13 on
# zlib's compressBound(TARGET_PAGE_SIZE), QEMU's limit for COMPRESS_PAGE records.
_COMPRESS_BOUND = PAGE_SIZE + (PAGE_SIZE >> 12) + (PAGE_SIZE >> 14) + (PAGE_SIZE >> 25) + 13

try:
    _xbzrle: ModuleType | None = importlib.import_module("vmsd.runtime.xbzrle")
except ImportError:
    _xbzrle = None

Pages = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


class RamBlock:
    """One RAM block mapped ``MAP_SHARED``; owns ``fd`` and the mapping until :meth:`close`."""

    page_size = PAGE_SIZE

    def __init__(self, name: str, used_length: int, fd: int, path: str | None = None) -> None:
        """Map ``used_length`` bytes of ``fd`` (taking ownership of ``fd``)."""
        if used_length <= 0 or used_length % PAGE_SIZE:
            os.close(fd)
            raise ValueError(f"RAM block '{name}': length {used_length:#x} is not a positive multiple of {PAGE_SIZE}")
        if len(name.encode()) > 255:
            os.close(fd)
            raise ValueError(f"RAM block name '{name}' is longer than 255 bytes")
        self.name = name
        self.used_length = used_length
        self.path = path
        self.fd = fd
        try:
            if os.fstat(fd).st_size < used_length:
                os.ftruncate(fd, used_length)
            self._mm: mmap.mmap | None = mmap.mmap(fd, used_length, mmap.MAP_SHARED,
                                                   mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self.view: memoryview = memoryview(self._mm)
        self.bytes_: npt.NDArray[np.uint8] = np.frombuffer(self._mm, dtype=np.uint8)
        self.words: npt.NDArray[np.uint64] = np.frombuffer(self._mm, dtype=np.uint64).reshape(-1, _WORDS_PER_PAGE)
        self._lock = threading.Lock()
        self._dirty = self._new_bitmap()

    # -- construction -------------------------------------------------------------------------------------------------
    @classmethod
    def memfd(cls, name: str, used_length: int, allow_sealing: bool = False, prealloc: bool = False) -> RamBlock:
        flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if allow_sealing else 0)
        fd = os.memfd_create(f"vmsd:{name}", flags)
        block = cls(name, used_length, fd)
        if prealloc:
            block.prealloc()
        return block

    @classmethod
    def from_file(cls, name: str, path: str | os.PathLike[str], used_length: int | None = None,
                  prealloc: bool = False) -> RamBlock:
        """Share the file at ``path`` (created or extended to ``used_length``; default: its size)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if used_length is None:
            used_length = os.fstat(fd).st_size
        block = cls(name, used_length, fd, path=os.fspath(path))
        if prealloc:
            block.prealloc()
        return block

    def prealloc(self) -> None:
        """Allocate and map every page now (QEMU's ``prealloc=on``), keeping the contents.

        A destination that preallocates pays for page faults before the
        migration instead of during it.  Uses ``MADV_POPULATE_WRITE`` (Linux
        5.14); older kernels get the pages touched one by one.
        """
        assert self._mm is not None
        try:
            self._mm.madvise(_MADV_POPULATE_WRITE)
        except OSError:
            for off in range(0, self.used_length, PAGE_SIZE):  # a read-modify-write keeps the contents
                self.bytes_[off] = self.bytes_[off]

    # -- plain access -------------------------------------------------------------------------------------------------
    @property
    def npages(self) -> int:
        return self.used_length // PAGE_SIZE

    @property
    def closed(self) -> bool:
        return self._mm is None

    def page(self, index: int) -> memoryview:
        return self.view[index * PAGE_SIZE:(index + 1) * PAGE_SIZE]

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        return bytes(self.view[offset:offset + length])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into the block at ``offset`` and mark the touched pages dirty."""
        length = len(data)
        self._check_range(offset, length)
        self.view[offset:offset + length] = data
        self.mark_dirty(offset, length)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.used_length:
            raise ValueError(f"range {offset:#x}+{length:#x} is outside RAM block '{self.name}' "
                             f"of {self.used_length:#x} bytes")

    def allocated(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        """Page ranges ``[a, b)`` within ``[start, stop)`` that may hold data: the rest are holes, known zero.

        Asks the file (``SEEK_DATA``/``SEEK_HOLE``, which memfd and tmpfs
        answer) so that checking fresh memory for zeros neither reads nor
        allocates it.  Without that support the whole range is reported.
        """
        pos, end = start * PAGE_SIZE, stop * PAGE_SIZE
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole up to the end of the file
                    return
                yield pos // PAGE_SIZE, stop
                return
            if data >= end:
                return
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
            yield data // PAGE_SIZE, (hole + PAGE_SIZE - 1) // PAGE_SIZE
            pos = hole

    # -- dirty tracking -----------------------------------------------------------------------------------------------
    def _new_bitmap(self) -> npt.NDArray[np.uint64]:
        return np.zeros((self.npages + 63) // 64, dtype=np.uint64)

    def mark_dirty(self, offset: int, length: int) -> None:
        """Mark every page overlapping ``[offset, offset + length)`` dirty."""
        if length <= 0:
            return
        self._check_range(offset, length)
        first = offset // PAGE_SIZE
        stop = (offset + length + PAGE_SIZE - 1) // PAGE_SIZE
        with self._lock:
            _set_bits(self._dirty, first, stop)

    def mark_pages(self, pages: npt.ArrayLike) -> None:
        """Mark the pages with these indices dirty."""
        idx = np.asarray(pages, dtype=np.int64)
        if idx.size == 0:
            return
        if idx.min() < 0 or idx.max() >= self.npages:
            raise IndexError(f"page index outside RAM block '{self.name}' of {self.npages} pages")
        bits = np.left_shift(np.uint64(1), (idx & 63).astype(np.uint64))
        with self._lock:
            np.bitwise_or.at(self._dirty, idx >> 6, bits)

    def mark_all_dirty(self) -> None:
        self.mark_dirty(0, self.used_length)

    def take_dirty(self) -> Pages:
        """The dirty page indices (ascending); the bitmap is swapped for a clean one atomically."""
        fresh = self._new_bitmap()
        with self._lock:
            bitmap, self._dirty = self._dirty, fresh
        bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")
        return np.flatnonzero(bits).astype(np.int64)

    def dirty_count(self) -> int:
        with self._lock:
            return int(np.bitwise_count(self._dirty).sum())

    # -- lifetime -----------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap and close ``fd``.  A mapping still exported elsewhere is unmapped when that export goes."""
        mm, self._mm = self._mm, None
        if mm is None:
            return
        del self.words, self.bytes_
        try:
            self.view.release()
        except BufferError:
            pass
        try:
            mm.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes with it
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RamBlock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RamBlock({self.name!r}, {self.used_length:#x}, fd={self.fd})"


def _set_bits(bitmap: npt.NDArray[np.uint64], start: int, stop: int) -> None:
    """Set bits ``start..stop-1`` of a little-endian uint64 bitmap."""
    w0, b0 = divmod(start, 64)
    w1, b1 = divmod(stop, 64)
    ones = (1 << 64) - 1
    if w0 == w1:
        bitmap[w0] |= np.uint64((ones << b0) & ((1 << b1) - 1))
        return
    bitmap[w0] |= np.uint64((ones << b0) & ones)
    bitmap[w0 + 1:w1] = np.uint64(ones)
    if b1:
        bitmap[w1] |= np.uint64((1 << b1) - 1)


class RamBlocks:
    """RAM blocks by name, iterated in QEMU's RAM-list order."""

    def __init__(self, factory: Callable[[str, int], RamBlock] = RamBlock.memfd) -> None:
        self._blocks: list[RamBlock] = []
        self._max: list[int] = []
        self._by_name: dict[str, RamBlock] = {}
        self.factory = factory  # makes the blocks a MEM_SIZE record announces
        self.last_block: RamBlock | None = None  # QEMU's last_recv_block: CONTINUE carries across sections
        self.complete = False
        self.failed: VMSDError | None = None

    def add(self, block: RamBlock, max_length: int | None = None, append: bool = False) -> RamBlock:
        """Insert as ``qemu_ram_block_add`` does: before the first block of smaller maximum length.

        ``max_length`` (default: ``used_length``) is QEMU's maximum size of a
        resizable block; ``append`` keeps an order given by a peer's block list.
        """
        if block.name in self._by_name:
            raise ValueError(f"duplicate RAM block '{block.name}'")
        size = block.used_length if max_length is None else max_length
        at = len(self._blocks)
        if not append:
            at = next((i for i, m in enumerate(self._max) if m < size), at)
        self._blocks.insert(at, block)
        self._max.insert(at, size)
        self._by_name[block.name] = block
        return block

    def create(self, name: str, used_length: int, max_length: int | None = None, append: bool = False) -> RamBlock:
        if name in self._by_name:
            raise ValueError(f"duplicate RAM block '{name}'")
        block = self.factory(name, used_length)
        try:
            return self.add(block, max_length, append)
        except BaseException:
            block.close()
            raise

    def __getitem__(self, name: str) -> RamBlock:
        return self._by_name[name]

    def get(self, name: str) -> RamBlock | None:
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[RamBlock]:
        return iter(list(self._blocks))

    def __len__(self) -> int:
        return len(self._blocks)

    def names(self) -> list[str]:
        return [b.name for b in self._blocks]

    def total(self) -> int:
        return sum(b.used_length for b in self._blocks)

    def close(self) -> None:
        for b in self._blocks:
            b.close()
        self._blocks.clear()
        self._max.clear()
        self._by_name.clear()
        self.last_block = None

    def __enter__(self) -> RamBlocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- zero pages -------------------------------------------------------------------------------------------------------
def zero_pages(block: RamBlock, pages: npt.ArrayLike | None = None) -> BoolArray:
    """True for each page (all pages, or the given page indices) whose 4096 bytes are all zero.

    Works on 64-bit words in 1 MiB chunks: a page whose first word is set is
    non-zero without reading the rest; a chunk whose first words are all zero
    is tested as a whole first and page by page (from cache) only if needed.
    """
    words = block.words
    if pages is not None:
        idx = np.asarray(pages, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= block.npages):
            raise IndexError(f"page index outside RAM block '{block.name}' of {block.npages} pages")
        if idx.size == 0:
            return np.zeros(0, dtype=np.bool_)
        # Contiguous ascending runs are scanned in place; anything else page by page.
        if idx.size > 1 and bool(np.all(np.diff(idx) == 1)):
            return _zero_run(words[int(idx[0]):int(idx[-1]) + 1])
        out = np.empty(idx.size, dtype=np.bool_)
        for i, p in enumerate(idx.tolist()):
            row = words[p]
            out[i] = not (row[0] or row.any())
        return out
    return _zero_run(words)


def _zero_run(words: npt.NDArray[np.uint64]) -> BoolArray:
    n = words.shape[0]
    nonzero = words[:, 0] != 0  # one strided pass: settles most non-zero pages
    for start in range(0, n, _ZERO_CHUNK_PAGES):
        first = nonzero[start:start + _ZERO_CHUNK_PAGES]
        pending = ~first
        count = int(np.count_nonzero(pending))
        if count == 0:
            continue
        chunk = words[start:start + _ZERO_CHUNK_PAGES]
        if count == len(first):
            if not chunk.max():
                continue
            first[:] = chunk.max(axis=1) != 0
        elif count * 8 <= len(first):
            rows = np.flatnonzero(pending)
            first[rows] = chunk[rows].max(axis=1) != 0
        else:
            first |= chunk.max(axis=1) != 0
    zero: BoolArray = ~nonzero
    return zero


# -- loading ----------------------------------------------------------------------------------------------------------
def _xbzrle_decode(delta: bytes, old: bytes) -> bytes:
    if _xbzrle is None:
        raise MalformedStream("XBZRLE pages need vmsd.runtime.xbzrle")
    out: Any = _xbzrle.decode(delta, old)
    return bytes(out)


def apply_ram(blocks: RamBlocks, payload: RamPayload, create_missing: bool = True, mark_dirty: bool = False) -> None:
    """Apply one section's RAM records into ``blocks`` as QEMU's ``ram_load_precopy`` does.

    MEM_SIZE creates announced blocks that are missing (``create_missing``) and
    requires the others to have the announced size.  Errors are
    :class:`MalformedStream` naming the block and offset; on error the pages
    applied so far stay written, ``blocks.failed`` is set and the container
    must be discarded (see the module docstring).
    """
    if blocks.failed is not None:
        raise MalformedStream(f"RAM blocks are unusable after an earlier failed load: {blocks.failed.message}")
    blocks.complete = False
    try:
        _apply(blocks, payload, create_missing, mark_dirty)
    except VMSDError as e:
        blocks.failed = e
        _drop_page_views(e)
        raise
    except (ValueError, zlib.error) as e:  # e.g. a misbehaving XBZRLE decoder
        err = MalformedStream(str(e))
        blocks.failed = err
        _drop_page_views(e)
        raise err from e


def _drop_page_views(e: BaseException) -> None:
    """Clear the failed frames' locals: a page view kept alive by the traceback would pin the mapping (and the
    descriptor mmap duplicates) after the caller closes the blocks."""
    if e.__traceback__ is not None and e.__traceback__.tb_next is not None:
        traceback.clear_frames(e.__traceback__.tb_next)


def _apply(blocks: RamBlocks, payload: RamPayload, create_missing: bool, mark_dirty: bool) -> None:
    for i, rec in enumerate(payload.records):
        flags = rec.flags
        where = f"RAM record {i}"
        if flags & RAM_SAVE_FLAG_MEM_SIZE:
            _apply_block_list(blocks, rec.blocks, create_missing)
            continue
        if flags & (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_XBZRLE | RAM_SAVE_FLAG_COMPRESS_PAGE):
            if flags & RAM_SAVE_FLAG_CONTINUE:
                block = blocks.last_block
                if block is None:
                    raise MalformedStream(f"{where}: page continues a RAM block that was never named")
            else:
                if rec.block is None:
                    raise MalformedStream(f"{where}: page without a RAM block name")
                found = blocks.get(rec.block)
                if found is None:
                    raise MalformedStream(f"{where}: can't find RAM block '{rec.block}'")
                block = blocks.last_block = found
            offset = rec.offset
            if offset + PAGE_SIZE > block.used_length:
                raise MalformedStream(f"{where}: illegal RAM offset {offset:#x} in block '{block.name}' "
                                      f"of {block.used_length:#x} bytes")
            kind = flags & ~RAM_SAVE_FLAG_CONTINUE
            page = block.view[offset:offset + PAGE_SIZE]
            if kind == RAM_SAVE_FLAG_ZERO:
                fill = rec.data[0] if rec.data else 0
                if fill or block.words[offset // PAGE_SIZE].any():
                    block.bytes_[offset:offset + PAGE_SIZE] = fill
            elif kind == RAM_SAVE_FLAG_PAGE:
                if len(rec.data) != PAGE_SIZE:
                    raise MalformedStream(f"{where}: page of {len(rec.data)} bytes at {offset:#x} in '{block.name}'")
                page[:] = rec.data
            elif kind == RAM_SAVE_FLAG_XBZRLE:
                new = _xbzrle_decode(bytes(rec.data[3:]), bytes(page))
                if len(new) != PAGE_SIZE:
                    raise MalformedStream(f"{where}: XBZRLE page at {offset:#x} in '{block.name}' decoded "
                                          f"to {len(new)} bytes")
                page[:] = new
            elif kind == RAM_SAVE_FLAG_COMPRESS_PAGE:
                _decompress_page(rec.data, page, f"{where}: compressed page at {offset:#x} in '{block.name}'")
            else:
                raise MalformedStream(f"{where}: unknown combination of migration flags {flags:#x}")
            if mark_dirty:
                block.mark_dirty(offset, PAGE_SIZE)
            continue
        if flags & RAM_SAVE_FLAG_EOS:
            blocks.complete = True
            return
        if flags == RAM_SAVE_FLAG_MULTIFD_FLUSH:
            continue
        if flags & RAM_SAVE_FLAG_HOOK:
            raise MalformedStream(f"{where}: RDMA hook records are not supported")
        raise MalformedStream(f"{where}: unknown combination of migration flags {flags:#x}")
    raise MalformedStream("RAM payload ends without EOS")


def _apply_block_list(blocks: RamBlocks, announced: list[RamBlockInfo], create_missing: bool) -> None:
    # Check everything first so a bad list creates nothing.
    for info in announced:
        have = blocks.get(info.name)
        if have is not None and have.used_length != info.used_length:
            raise MalformedStream(f"wrong block list from the peer: RAM block '{info.name}' is "
                                  f"{info.used_length:#x} bytes in the stream, {have.used_length:#x} here")
        if have is None and not create_missing:
            raise MalformedStream(f"wrong block list from the peer: unknown RAM block '{info.name}'")
        if have is None and (info.used_length <= 0 or info.used_length % PAGE_SIZE):
            raise MalformedStream(f"wrong block list from the peer: RAM block '{info.name}' "
                                  f"of {info.used_length:#x} bytes")
    for info in announced:  # new blocks keep the peer's order (QEMU's list is ordered by maximum length)
        if info.name not in blocks:
            blocks.create(info.name, info.used_length, append=True)


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


# -- saving -----------------------------------------------------------------------------------------------------------
def ram_records(blocks: RamBlocks) -> Iterator[RamRecord]:
    """The records QEMU 7.2 writes for a paused VM, in one pass.

    ``MEM_SIZE`` + ``EOS`` (the START section), every page of every block as
    ZERO (fill 0) or PAGE, block name on a block's first page and CONTINUE on
    the rest, + ``EOS`` (the PART section), then ``EOS`` (the END section).
    Split with :func:`ram_section_payloads`.
    """
    infos = [RamBlockInfo(b.name, b.used_length) for b in blocks]
    yield RamRecord(RAM_SAVE_FLAG_MEM_SIZE, sum(i.used_length for i in infos), blocks=infos)
    yield RamRecord(RAM_SAVE_FLAG_EOS, 0)
    for block in blocks:
        zero = zero_pages(block)
        for p in range(block.npages):
            flags = RAM_SAVE_FLAG_ZERO if zero[p] else RAM_SAVE_FLAG_PAGE
            name: str | None = block.name
            if p:
                flags |= RAM_SAVE_FLAG_CONTINUE
                name = None
            data = b"\x00" if zero[p] else bytes(block.page(p))
            yield RamRecord(flags, p * PAGE_SIZE, block=name, data=data)
    yield RamRecord(RAM_SAVE_FLAG_EOS, 0)
    yield RamRecord(RAM_SAVE_FLAG_EOS, 0)


def ram_section_payloads(blocks: RamBlocks, pages_per_part: int | None = None) -> list[RamPayload]:
    """START, PART..., END payloads for a stream; PARTs hold at most ``pages_per_part`` pages.

    QEMU splits pages among PART sections by time and bandwidth, so any split
    loads the same memory.  QEMU may start a PART with CONTINUE; these payloads
    name the block on each PART's first page instead, which QEMU loads the same
    and which keeps every payload readable on its own by :func:`read_ram`.
    """
    out: list[RamPayload] = []
    records = list(ram_records(blocks))
    start_end = (records[:2], records[-1:])
    body = records[2:-2]
    out.append(RamPayload(start_end[0]))
    step = pages_per_part or max(len(body), 1)
    for i in range(0, max(len(body), 1), step):
        current = body[i:i + step]
        if current and current[0].block is None:
            head = current[0]
            current[0] = RamRecord(head.flags & ~RAM_SAVE_FLAG_CONTINUE, head.offset, block=_block_at(body, i),
                                   data=head.data)
        out.append(RamPayload([*current, RamRecord(RAM_SAVE_FLAG_EOS, 0)]))
    out.append(RamPayload(start_end[1]))
    return out


def _block_at(body: list[RamRecord], index: int) -> str | None:
    for rec in reversed(body[:index + 1]):
        if rec.block is not None:
            return rec.block
    return None
