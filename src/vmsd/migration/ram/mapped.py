"""mapped-ram (QEMU 9.0+): guest RAM at fixed offsets of a ``file:`` stream.

With the capability ``mapped-ram`` (listed in the configuration record) no
page record is ever sent.  Each entry of the MEM_SIZE block list is followed
by a 28-byte header (be32 version, be64 page size, be64 bitmap offset, be64
pages offset; offsets are positions in the file), and the stream then goes on
at ``pages_offset + used_length``: page *i* of the block lives at
``pages_offset + i * 4096``.  Between the header and the pages lies the
block's bitmap of pages present in the file (written last, once every page
is), padded to a 1 MiB boundary.  A page whose bit is clear is zero, whatever
the file holds there: QEMU writes no zero page (a hole, if it was never
written) and clears the bit of a page that became zero after it was written,
leaving its old bytes behind.  Later RAM sections hold only EOS.

The bitmap is an array of the source host's ``unsigned long``; every host
QEMU migrates on today (x86-64, arm64) writes little-endian 64-bit words,
i.e. bit *i* of byte *i / 8* is page *i*.  That is what is read and written
here.

Readers here follow the file forward only: the bitmap must start at or after
the header's end, and the pages after the bitmap, as QEMU lays them out, so
a stream is read in one pass from a pipe as well as from a file (where the
gaps are sought over).  Anything else is refused with the header's offset.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import attrs
import numpy as np
import numpy.typing as npt

from vmsd.migration.iovec import Scattered, write_scattered
from vmsd.runtime.errors import MalformedStream, VersionMismatch, VMSDError
from vmsd.runtime.io import Reader, Writer

CAP_MAPPED_RAM = b"mapped-ram"
HEADER_VERSION = 1  # QEMU's MAPPED_RAM_HDR_VERSION: a loader takes any version up to it
FILE_OFFSET_ALIGNMENT = 0x100000  # where QEMU starts each block's pages (a loader only needs page alignment)
PAGE_SIZE = 4096  # x86's target page: the only one vmsd migrates
_HEADER = struct.Struct(">IQQQ")
HEADER_SIZE = _HEADER.size  # 28: QEMU's MappedRamHeader is packed
_LOAD_CHUNK = 1 << 20  # pages are read into RAM at most this much at a time (QEMU's MAPPED_RAM_LOAD_BUF_SIZE)

BoolArray = npt.NDArray[np.bool_]


def bitmap_size(npages: int) -> int:
    """Bytes of a block's bitmap: whole 64-bit words (QEMU's ``BITS_TO_LONGS(n) * sizeof(long)``)."""
    return (npages + 63) // 64 * 8


def decode_bitmap(data: bytes | memoryview, npages: int) -> BoolArray:
    """Which of ``npages`` pages the file holds (bits past ``npages`` in the last word are ignored)."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=npages, bitorder="little")
    return bits.astype(np.bool_)


def encode_bitmap(present: BoolArray) -> bytes:
    """The bitmap of ``present`` pages, padded with clear bits to whole 64-bit words."""
    packed = np.packbits(present.astype(np.uint8), bitorder="little").tobytes()
    return packed + bytes(bitmap_size(int(present.size)) - len(packed))


def runs(present: BoolArray) -> list[tuple[int, int]]:
    """(first, stop) of every run of present pages, in order."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], present, [False])).astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2], strict=True)]


@attrs.frozen
class MappedRamHeader:
    """The header after a block's entry in the MEM_SIZE list (QEMU's ``MappedRamHeader``)."""

    version: int
    page_size: int
    bitmap_offset: int  # file offset of the bitmap
    pages_offset: int  # file offset of page 0

    def encode(self) -> bytes:
        return _HEADER.pack(self.version, self.page_size, self.bitmap_offset, self.pages_offset)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> MappedRamHeader:
        return cls(*_HEADER.unpack(data))

    @classmethod
    def layout(cls, at: int, used_length: int) -> MappedRamHeader:
        """Where QEMU puts a block whose header starts at file offset ``at``: the bitmap right after the
        header, the pages at the next 1 MiB boundary after the bitmap."""
        bitmap = at + HEADER_SIZE
        end = bitmap + bitmap_size(used_length // PAGE_SIZE)
        pages = -(-end // FILE_OFFSET_ALIGNMENT) * FILE_OFFSET_ALIGNMENT
        return cls(HEADER_VERSION, PAGE_SIZE, bitmap, pages)

    def end(self, used_length: int) -> int:
        """The file offset where the stream goes on after this block."""
        return self.pages_offset + used_length

    def check(self, name: str, used_length: int, at: int, file_size: int | None) -> None:
        """Refuse a header QEMU would refuse, or one that points back into what was read, makes the bitmap
        and pages overlap, or reaches past the end of a file of ``file_size`` bytes (when known).
        ``at``: the file offset of the header."""
        where = f"mapped-ram header of RAM block '{name}'"
        if self.version > HEADER_VERSION:
            raise VersionMismatch(f"{where}: version {self.version}, only up to {HEADER_VERSION} is known",
                                  offset=at)
        if self.page_size != PAGE_SIZE:
            raise MalformedStream(f"{where}: page size {self.page_size:#x}, expected {PAGE_SIZE:#x}", offset=at)
        if used_length % PAGE_SIZE:
            raise MalformedStream(f"{where}: block of {used_length:#x} bytes is not whole pages", offset=at)
        if self.bitmap_offset < at + HEADER_SIZE:
            raise MalformedStream(f"{where}: bitmap at {self.bitmap_offset:#x} overlaps the block list "
                                  f"(the header ends at {at + HEADER_SIZE:#x})", offset=at)
        bitmap_end = self.bitmap_offset + bitmap_size(used_length // PAGE_SIZE)
        if self.pages_offset < bitmap_end:
            raise MalformedStream(f"{where}: pages at {self.pages_offset:#x} overlap the bitmap "
                                  f"({self.bitmap_offset:#x}..{bitmap_end:#x})", offset=at)
        if self.pages_offset % PAGE_SIZE:
            raise MalformedStream(f"{where}: pages at {self.pages_offset:#x} are not page aligned", offset=at)
        if file_size is not None and self.end(used_length) > file_size:
            raise MalformedStream(f"{where}: pages {self.pages_offset:#x}..{self.end(used_length):#x} reach past "
                                  f"the end of the file ({file_size:#x} bytes)", offset=at)


def read_header(r: Reader, name: str, used_length: int, file_offset: int = 0) -> MappedRamHeader:
    """The header at the reader's position, checked (:meth:`MappedRamHeader.check`).  ``file_offset``: where
    the reader's byte 0 is in the file (``file:PATH,offset=N``), since the header's offsets are the file's."""
    at = r.tell() + file_offset
    header = MappedRamHeader.decode(r.read(HEADER_SIZE))
    header.check(name, used_length, at, _file_size(r, file_offset))
    return header


def _file_size(r: Reader, file_offset: int) -> int | None:
    """How long the file behind ``r`` is, in file offsets: known for memory input and for a regular file."""
    remaining = r.remaining()
    if remaining is not None:
        return r.tell() + file_offset + remaining
    fileno = getattr(r.source, "fileno", None)
    if fileno is None:
        return None
    try:
        fd = int(fileno())
        st = os.fstat(fd) if fd >= 0 else None
    except OSError:
        return None
    return st.st_size if st is not None and stat.S_ISREG(st.st_mode) else None


@attrs.define(eq=False)
class MappedRam:
    """A block's header and the file bytes it governs, as a stream tool keeps them: ``region`` runs from
    the header's end (file offset ``region_at``) to the end of the block's pages, so that writing it back
    reproduces the file, stale bytes of pages whose bit is clear included."""

    header: MappedRamHeader
    used_length: int
    region_at: int
    region: bytes | memoryview

    @classmethod
    def take(cls, r: Reader, header: MappedRamHeader, used_length: int, file_offset: int = 0) -> MappedRam:
        """Consume the region after ``header`` from ``r`` (a view when the input is in memory)."""
        at = r.tell() + file_offset
        n = header.end(used_length) - at
        buf, p = r.take(n)
        return cls(header, used_length, at, memoryview(buf)[p:p + n])

    @classmethod
    def build(cls, at: int, used_length: int, pages: bytes | memoryview, present: BoolArray | None = None) -> MappedRam:
        """A block laid out as QEMU would with its header at file offset ``at``: ``pages`` is the block's
        memory; ``present`` the pages to mark as in the file (default: those that are not zero)."""
        words = np.frombuffer(pages, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
        if present is None:
            present = np.asarray(words.any(axis=1), dtype=np.bool_)
        header = MappedRamHeader.layout(at, used_length)
        region = bytearray(header.end(used_length) - header.bitmap_offset)
        bitmap = encode_bitmap(present)
        region[:len(bitmap)] = bitmap
        base = header.pages_offset - header.bitmap_offset
        view = np.frombuffer(region, dtype=np.uint8, offset=base).reshape(-1, PAGE_SIZE)
        view[present] = np.frombuffer(pages, dtype=np.uint8).reshape(-1, PAGE_SIZE)[present]
        return cls(header, used_length, header.bitmap_offset, bytes(region))

    @property
    def npages(self) -> int:
        return self.used_length // PAGE_SIZE

    def bitmap(self) -> memoryview:
        start = self.header.bitmap_offset - self.region_at
        return memoryview(self.region)[start:start + bitmap_size(self.npages)]

    def present(self) -> BoolArray:
        """Which pages the file holds; the others are zero."""
        return decode_bitmap(self.bitmap(), self.npages)

    def page(self, index: int) -> bytes:
        """Page ``index`` as the loader sees it (zero when its bit is clear)."""
        if not 0 <= index < self.npages:
            raise IndexError(f"page {index} of a block of {self.npages} pages")
        if not self.present()[index]:
            return bytes(PAGE_SIZE)
        start = self.header.pages_offset - self.region_at + index * PAGE_SIZE
        return bytes(memoryview(self.region)[start:start + PAGE_SIZE])

    def memory(self) -> bytes:
        """The whole block as the loader fills it."""
        base = self.header.pages_offset - self.region_at
        out = np.zeros((self.npages, PAGE_SIZE), dtype=np.uint8)
        present = self.present()
        out[present] = np.frombuffer(self.region, dtype=np.uint8, offset=base,
                                     count=self.used_length).reshape(-1, PAGE_SIZE)[present]
        return out.tobytes()

    def write(self, w: Writer, file_offset: int = 0) -> None:
        """Header and region at the writer's position; laid out anew when that is not where they were read
        (something before them changed length), since the header's offsets are positions in the file."""
        at = w.tell() + file_offset
        if at + HEADER_SIZE == self.region_at:
            w.write(self.header.encode())
            w.write(self.region)
            return
        moved = MappedRam.build(at, self.used_length, self.memory(), self.present())
        w.write(moved.header.encode())
        w.write(moved.region)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MappedRam):
            return NotImplemented
        return (self.header, self.used_length, self.region_at) == (other.header, other.used_length, other.region_at) \
            and bytes(self.region) == bytes(other.region)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"MappedRam({self.header}, {int(self.present().sum())} of {self.npages} pages)"


# -- a destination: pages from the file into RAM ------------------------------------------------------------------------
def skip_to(r: Reader, target: int, what: str) -> None:
    """Move ``r`` forward to stream offset ``target`` (a file is sought, a pipe read and dropped)."""
    n = target - r.tell()
    if n < 0:
        raise MalformedStream(f"{what} at {target:#x} lies behind the read position {r.tell():#x}", offset=r.tell())
    r.skip(n)


def load_block(r: Reader, header: MappedRamHeader, used_length: int, fill: Callable[[Reader, int, int], None],
               file_offset: int = 0) -> BoolArray:
    """Read a block's bitmap from ``r``, then its present pages, each run in pieces of at most 1 MiB handed
    to ``fill(r, offset in the block, length)`` to read into RAM (forward only), and leave ``r`` where the
    stream goes on.  Absent pages are not touched (QEMU's destination leaves them as they are: zero in
    fresh RAM).  Returns which pages were read."""
    npages = used_length // PAGE_SIZE
    skip_to(r, header.bitmap_offset - file_offset, "the bitmap")
    present = decode_bitmap(r.read(bitmap_size(npages)), npages)
    base = header.pages_offset - file_offset
    for first, stop in runs(present):
        skip_to(r, base + first * PAGE_SIZE, "a page")
        at = first * PAGE_SIZE
        end = stop * PAGE_SIZE
        while at < end:
            n = min(end - at, _LOAD_CHUNK)
            fill(r, at, n)
            at += n
    skip_to(r, header.end(used_length) - file_offset, "the next block")
    return present


# -- a source: pages from RAM into the file -------------------------------------------------------------------------------
class MappedRamFile:
    """The pages of a mapped-ram stream being written: every block's place in the file, the pages written so
    far, and the bitmaps written at the end (QEMU's ``file_bmap``).

    ``fd`` is the file (a regular file: pages go where they belong with ``pwritev``).  With ``workers`` > 1
    (QEMU's multifd channels) runs of pages are written by that many threads; :meth:`drain` waits for them,
    and must come between two writes of the same page (a pass ends) and before :meth:`finish`.  A page
    written earlier that is zero now has its bit cleared and its old bytes left in the file, as QEMU does.
    """

    def __init__(self, fd: int, name: str = "file", workers: int = 1) -> None:
        try:
            mode = os.fstat(fd).st_mode
        except OSError as e:
            raise VMSDError(f"{name}: {e.strerror}") from None
        if not stat.S_ISREG(mode):
            raise VMSDError(f"{name}: mapped-ram writes pages at fixed offsets, which needs a regular file")
        self.fd = fd
        self.name = name
        self.headers: dict[str, MappedRamHeader] = {}
        self._present: dict[str, BoolArray] = {}
        self._lock = threading.Lock()
        self._workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="mapped-ram") if workers > 1 else None
        self._pending: list[Future[None]] = []

    def write_block_list(self, head: bytes, entries: list[tuple[str, int, bytes]]) -> int:
        """At the file's position: ``head`` (the MEM_SIZE word), then for each block (name, used length,
        its entry in the list) the entry and its header, and a jump past the block's place in the file, as
        QEMU's ``ram_save_setup`` writes them.  Returns the bytes written."""
        try:
            pos = os.lseek(self.fd, 0, os.SEEK_CUR)
            out = bytearray(head)
            total = 0
            for name, used_length, entry in entries:
                out += entry
                header = MappedRamHeader.layout(pos + len(out), used_length)
                self.headers[name] = header
                self._present[name] = np.zeros(used_length // PAGE_SIZE, dtype=np.bool_)
                out += header.encode()
                view = memoryview(out)
                while view:
                    view = view[os.write(self.fd, view):]
                total += len(out)
                pos = os.lseek(self.fd, header.end(used_length), os.SEEK_SET)
                out = bytearray()
        except OSError as e:
            raise VMSDError(f"{self.name}: cannot write the RAM block list: {e.strerror}") from None
        return total

    def submit(self, name: str, address: int, pages: npt.NDArray[np.int64], zero: BoolArray, keep: object) -> None:
        """Write the non-zero ``pages`` of block ``name`` (ascending) from memory at ``address`` (the block's
        mapping, kept alive by ``keep``) to their places; mark the zero ones absent."""
        if self._pool is None:
            self._write(name, address, pages, zero, keep)
            return
        self._pending.append(self._pool.submit(self._write, name, address, pages, zero, keep))
        while len(self._pending) > 2 * self._workers:  # at most two batches per thread wait
            self._pending.pop(0).result()

    def drain(self) -> None:
        """Wait until every submitted page is written; raise the first failure."""
        pending, self._pending = self._pending, []
        error: BaseException | None = None
        for f in pending:
            try:
                f.result()
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error

    def _write(self, name: str, address: int, pages: npt.NDArray[np.int64], zero: BoolArray, keep: object) -> None:
        header = self.headers[name]
        normal = pages[~zero]
        if normal.size:
            breaks = np.flatnonzero(np.diff(normal) != 1) + 1
            starts = np.concatenate(([0], breaks)).tolist()
            stops = np.concatenate((breaks, [normal.size])).tolist()
            for a, b in zip(starts, stops, strict=True):
                first, n = int(normal[a]), int(b - a)
                iov = np.array([[address + first * PAGE_SIZE, n * PAGE_SIZE]], dtype=np.uint64)
                try:
                    write_scattered(self.fd, Scattered(iov, (keep,)), header.pages_offset + first * PAGE_SIZE)
                except OSError as e:
                    what = "the file system is full" if e.errno == errno.ENOSPC else e.strerror
                    raise VMSDError(f"{self.name}: cannot write pages of RAM block '{name}': {what}") from None
        with self._lock:
            present = self._present[name]
            present[normal] = True
            present[pages[zero]] = False

    def finish(self) -> int:
        """Wait for the pages, then write every block's bitmap at its place; returns the bitmaps' bytes."""
        self.drain()
        total = 0
        for name, header in self.headers.items():
            data = encode_bitmap(self._present[name])
            try:
                done = 0
                while done < len(data):
                    done += os.pwrite(self.fd, data[done:], header.bitmap_offset + done)
            except OSError as e:
                raise VMSDError(f"{self.name}: cannot write the bitmap of RAM block '{name}': {e.strerror}") \
                    from None
            total += len(data)
        return total

    def close(self) -> None:
        """Stop the writer threads (after the writes under way)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
