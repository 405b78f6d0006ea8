"""Guest RAM blocks in shared memory: dirty tracking and zero-page detection.

A :class:`RamBlock` is one of QEMU's RAM blocks (``pc.ram``, ``pc.bios``, a
``memory-backend-*`` id, ...) backed by a memfd or by a shared file such as one
under ``/dev/shm``, mapped ``MAP_SHARED``.  Its ``fd`` stays open for the
block's lifetime so a later CPR exec can hand it to a new process.

:class:`RamBlocks` keeps blocks by name in QEMU's RAM-list order (largest
first; a new block goes before the first strictly smaller one, as
``qemu_ram_block_add`` does).  Loading and saving RAM records is
:mod:`vmsd.migration.ram.wire`'s.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterator

import numpy as np
import numpy.typing as npt

from vmsd.migration.iovec import Scattered, buffer_address, write_scattered
from vmsd.runtime.errors import VMSDError

PAGE_SIZE = 4096
_WORDS_PER_PAGE = PAGE_SIZE // 8
_ZERO_CHUNK_PAGES = 256  # 1 MiB: the second look at a mixed chunk is served from cache
_MADV_POPULATE_WRITE = 23  # <linux/mman.h>; Python's mmap module only names it from 3.13 on


def _libc() -> ctypes.CDLL | None:
    """The C library, for ``mincore`` (which Python's mmap does not offer)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()

Pages = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


class RamBlock:
    """One RAM block mapped ``MAP_SHARED``; owns ``fd`` and the mapping until :meth:`close`."""

    page_size = PAGE_SIZE

    def __init__(self, name: str, used_length: int, fd: int, path: str | None = None, shared: bool = False) -> None:
        """Map ``used_length`` bytes of ``fd`` (taking ownership of ``fd``).

        ``shared``: the memory outlives this process where another one can map it (QEMU's ``share=on``):
        with x-ignore-shared a migration leaves such a block where it is and sends none of its pages.
        """
        if used_length <= 0 or used_length % PAGE_SIZE:
            os.close(fd)
            raise ValueError(f"RAM block '{name}': length {used_length:#x} is not a positive multiple of {PAGE_SIZE}")
        if len(name.encode()) > 255:
            os.close(fd)
            raise ValueError(f"RAM block name '{name}' is longer than 255 bytes")
        self.name = name
        self.used_length = used_length
        self.path = path
        self.shared = shared
        self.addr = 0  # guest physical address of the block's region (sent with x-ignore-shared)
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
        # Incoming pages go in through the descriptor while the mapping is not populated (see store_pages).
        self._store_via_fd = True
        self._populated = False  # every page mapped (prealloc): nothing for populate() to do
        self._can_populate = True  # MADV_POPULATE_WRITE works here (Linux 5.14 on)

    # -- construction -------------------------------------------------------------------------------------------------
    @classmethod
    def memfd(cls, name: str, used_length: int, allow_sealing: bool = False, prealloc: bool = False,
              shared: bool = False) -> RamBlock:
        flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if allow_sealing else 0)
        fd = os.memfd_create(f"vmsd:{name}", flags)
        block = cls(name, used_length, fd, shared=shared)
        if prealloc:
            block.prealloc()
        return block

    @classmethod
    def from_file(cls, name: str, path: str | os.PathLike[str], used_length: int | None = None,
                  prealloc: bool = False) -> RamBlock:
        """Share the file at ``path`` (created or extended to ``used_length``; default: its size).

        The block is ``shared``: another process (a QEMU with ``share=on``) may map the same file."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if used_length is None:
            used_length = os.fstat(fd).st_size
        block = cls(name, used_length, fd, path=os.fspath(path), shared=True)
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
        self._store_via_fd = False  # every page is mapped now: a plain copy is the cheapest write
        self._populated = True
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

    @property
    def stores_via_fd(self) -> bool:
        """Whether incoming pages are best written through :attr:`fd` (see :meth:`store_pages`)."""
        return self._store_via_fd

    def refuses_fd_writes(self) -> None:
        """The file took no write through its descriptor: store through the mapping from now on."""
        self._store_via_fd = False

    def store_pages(self, first: int, src: memoryview, offset: int, stride: int, n: int) -> None:
        """Write ``n`` pages at page ``first`` from ``src``: page i is ``src[offset + i*stride:][:PAGE_SIZE]``.

        A loader's hot path.  Through the descriptor (``pwritev``) a page not
        yet in the file is written without being zero-filled first and
        without a page fault, which a copy through the mapping takes per
        page: a fresh destination fills ~1.4x faster (0.35 vs 0.50 s/GiB
        here).  Once the mapping is populated (``prealloc``) a copy is
        cheaper and used instead, as it is where the file refuses writes
        (hugetlbfs).  A full filesystem is an error, not the mapping's SIGBUS.
        """
        if self._store_via_fd:
            # The pages' addresses as one iovec array (see vmsd.migration.iovec): no Python object per page.
            base = buffer_address(src) + offset
            if stride == PAGE_SIZE:
                iov = np.array([[base, n * PAGE_SIZE]], dtype=np.uint64)
            else:
                iov = np.empty((n, 2), dtype=np.uint64)
                iov[:, 0] = base + stride * np.arange(n, dtype=np.uint64)
                iov[:, 1] = PAGE_SIZE
            if self._write_iov(first * PAGE_SIZE, Scattered(iov, (src,))):
                return
        rows = self.bytes_.reshape(-1, PAGE_SIZE)
        rows[first:first + n] = np.ndarray((n, PAGE_SIZE), dtype=np.uint8, buffer=src, offset=offset,
                                           strides=(stride, 1))

    def store_views(self, first: int, views: list[memoryview]) -> None:
        """Write ``views`` back to back from page ``first``, whole pages in all (see :meth:`store_pages`)."""
        at = first * PAGE_SIZE
        if self._store_via_fd:
            iov = np.array([(buffer_address(v), len(v)) for v in views], dtype=np.uint64).reshape(-1, 2)
            if self._write_iov(at, Scattered(iov, tuple(views))):
                return
        for v in views:
            self.view[at:at + len(v)] = v
            at += len(v)

    def _write_iov(self, at: int, data: Scattered) -> bool:
        """``pwritev`` of ``data`` at ``at``; False (and writes through the mapping from now on) if the file refuses."""
        try:
            write_scattered(self.fd, data, at)
            return True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise VMSDError(f"RAM block '{self.name}': cannot store pages: {e.strerror}") from None
            self._store_via_fd = False
            return False

    def populate(self, first: int, n: int) -> None:
        """Map pages ``first`` to ``first + n`` for writing, before a copy through the mapping fills them.

        One ``MADV_POPULATE_WRITE`` call maps a whole run instead of taking a
        page fault per page during the copy (0.41 vs 0.55 s/GiB into a fresh
        file here), and a file that cannot grow (a full tmpfs) is reported
        here as an error rather than by the copy's SIGBUS.
        """
        if self._populated or not self._can_populate or n <= 0:
            return
        assert self._mm is not None
        try:
            self._mm.madvise(_MADV_POPULATE_WRITE, first * PAGE_SIZE, n * PAGE_SIZE)
        except OSError as e:
            if e.errno == errno.EINVAL:  # a kernel before 5.14: the copy's own page faults do the work
                self._can_populate = False
                return
            raise VMSDError(f"RAM block '{self.name}': cannot store pages: {e.strerror}") from None

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.used_length:
            raise ValueError(f"range {offset:#x}+{length:#x} is outside RAM block '{self.name}' "
                             f"of {self.used_length:#x} bytes")

    def holds(self, first: int, n: int) -> BoolArray:
        """For pages ``first .. first+n-1``: whether the file holds a page there (False: a hole, known zero).

        Asks ``mincore``, which neither reads nor allocates: touching a hole
        of a tmpfs file through the mapping, even to read it, allocates a
        zeroed page.  ``mincore`` also says no for a page swapped out, so
        each gap it reports is checked with ``SEEK_DATA``, for which a
        swapped page is data.  Where ``mincore`` is not available every page
        counts as held.
        """
        vec = np.ones(n, dtype=np.uint8)
        if _LIBC is None or n == 0:
            return vec.astype(np.bool_)
        addr = self.bytes_.ctypes.data + first * PAGE_SIZE
        if _LIBC.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(n * PAGE_SIZE), ctypes.c_void_p(vec.ctypes.data)):
            return np.ones(n, dtype=np.bool_)
        held: BoolArray = (vec & 1).astype(np.bool_)
        gaps = np.flatnonzero(~held)
        i = 0
        while i < gaps.size:
            try:
                data = os.lseek(self.fd, (first + int(gaps[i])) * PAGE_SIZE, os.SEEK_DATA) // PAGE_SIZE - first
            except OSError as e:
                if e.errno == errno.ENXIO:  # holes up to the end of the file
                    break
                return np.ones(n, dtype=np.bool_)
            if data >= n:
                break
            held[data] = True  # data: in memory already, or swapped out
            i = int(np.searchsorted(gaps, data + 1))
        return held

    def clear(self, pages: Pages) -> None:
        """Make ``pages`` zero, as a destination does with the zero pages it receives.

        Only pages the file holds (:meth:`holds`) are looked at, and only
        those not zero already are written: fresh memory stays unallocated.
        """
        if pages.size == 0:
            return
        for run in np.split(pages, np.flatnonzero(np.diff(pages) != 1) + 1):
            first, n = int(run[0]), int(run.size)
            held = self.holds(first, n)
            if held.all():  # a view of the rows: nothing copied
                rows = self.words[first:first + n]
                rows[np.flatnonzero(rows.any(axis=1))] = 0
                continue
            inside = np.flatnonzero(held) + first
            hot = inside[self.words[inside].any(axis=1)]
            if hot.size:
                self.words[hot] = 0

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

    def __init__(self, factory: Callable[[str, int], RamBlock] = RamBlock.memfd, limit: int | None = None,
                 max_blocks: int | None = None) -> None:
        self._blocks: list[RamBlock] = []
        # Bytes the blocks a peer announces may reach together (None: no bound, the caller's RAM).
        self.limit = limit
        # How many blocks there may be once a peer's are created (None: no bound).
        self.max_blocks = max_blocks
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
    Listed pages are scanned in place run by run (consecutive ascending
    pages); where runs are short, the pages whose first word is zero are
    gathered and tested instead.
    """
    words = block.words
    if pages is None:
        return _zero_run(words)
    idx = np.asarray(pages, dtype=np.int64)
    if idx.size == 0:
        return np.zeros(0, dtype=np.bool_)
    if idx.min() < 0 or idx.max() >= block.npages:
        raise IndexError(f"page index outside RAM block '{block.name}' of {block.npages} pages")
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    if cuts.size * 16 <= idx.size:
        # Gathering rows with fancy indexing would copy every page before looking at it.
        runs = np.split(idx, cuts) if cuts.size else [idx]
        return np.concatenate([_zero_run(words[int(r[0]):int(r[-1]) + 1]) for r in runs])
    zero: BoolArray = words[idx, 0] == 0
    cand = np.flatnonzero(zero)
    if cand.size:
        zero[cand] = words[idx[cand]].max(axis=1) == 0
    return zero


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
