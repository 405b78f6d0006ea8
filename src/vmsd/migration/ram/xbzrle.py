"""XBZRLE page delta codec and sender page cache, byte-exact with QEMU 7.2.

Wire format of one encoded page (QEMU ``migration/xbzrle.c``)::

    page  = zrun nzrun | zrun nzrun page
    zrun  = length                      # bytes unchanged since the cached copy
    nzrun = length byte...              # length >= 1 changed bytes, verbatim
    length = ULEB128, at most two bytes (0 .. 0x3fff)

Only the first zero run may have length 0; a trailing zero run is never
written.  On the RAM stream an XBZRLE record carries ``u8 0x01`` (encoding),
``be16 len`` (<= target page size) and then these bytes; the framing lives in
:mod:`vmsd.migration.ram.records`, this module only does the page bytes.

Encoder facts (7.2 has only the generic, word-at-a-time encoder; the AVX512
variant arrived in 8.1):

* Runs are exact.  The word loops are only a speed-up: the zero-run scan ends
  at the first differing byte (the unaligned head and the "go over the rest"
  tail are byte loops) and the nonzero-run scan uses the exact
  "word has a zero byte" test, then walks bytes inside that word to the first
  equal byte.  So the runs are the maximal runs of ``old[i] == new[i]`` /
  ``old[i] != new[i]``; this is checked against the compiled C in the tests.
* What is *not* naive is the overflow rule (``dlen`` is our ``limit``, QEMU
  passes the target page size).  QEMU gives up (returns -1, we return
  ``None``) when

  - at the top of each loop iteration (i.e. whenever unscanned input remains,
    even if it is only the trailing zero run that would never be written)
    ``d + 2 > limit``; this also makes identical pages give ``None`` when
    ``limit < 2``;
  - after writing a zero-run length, ``d + 2 > limit``;
  - after writing a nonzero-run length, ``d + nzrun_len > limit``.

* Identical pages give 0 in QEMU (we return ``b""``): the page is skipped.
* QEMU asserts (aborts) when the page size is not a multiple of ``sizeof(long)``
  or a run length exceeds 0x3fff (only possible for pages > 16 KiB); we raise
  ``ValueError`` there.

Decoder facts (``xbzrle_decode_buffer``) reproduced exactly; every case where
QEMU returns -1 raises :class:`~vmsd.runtime.errors.MalformedStream` whose
``offset`` is the byte offset inside the delta where the bad item starts:

* fewer than 2 bytes left where a zero-run length or a nonzero-run length
  starts (so a lone trailing length byte is an error, even a valid one);
* a two-byte ULEB128 whose second byte has bit 7 set (more than 14 bits);
* a zero-run of length 0 anywhere but at offset 0;
* a nonzero run of length 0;
* the page position running past the page end, or run data past the end of
  the delta.

Non-canonical two-byte lengths (``0x85 0x00`` = 5) are accepted, as by QEMU.

Receiver semantics: QEMU's receiver has **no** page cache.  It decodes the
delta in place onto its current copy of the guest page (``load_xbzrle`` →
``xbzrle_decode_buffer(..., host, TARGET_PAGE_SIZE)``); bytes not covered by
a nonzero run keep their current value.  This is correct because the sender's
cache always holds exactly what was last sent for that page (or the zero page
after a ZERO record).  :func:`decode_into` is that operation; like QEMU it may
have modified the page before it detects an error.  :func:`decode` works on a
copy and never returns partial results.

Speed: pages of 256+ bytes are encoded with numpy when it is installed (it is
not a dependency); otherwise a regex over the XOR finds the changed runs.
Pages larger than ``MAX_RUN`` use a literal transcription of the C loop so
that QEMU's assertion order is kept.  All paths are tested for equality.

:class:`XbzrleCache` mirrors ``migration/page_cache.c`` (direct-mapped, keyed
by ``ram_addr_t`` = block offset in the RAM address space + offset in block,
capacity a power-of-two number of pages, "age" = ``dirty_sync_count``) and
:meth:`XbzrleCache.save_page` mirrors ``save_xbzrle_page`` in ``ram.c``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, NoReturn

from vmsd.runtime.errors import MalformedStream

try:  # numpy is optional: it only speeds up encoding of larger pages
    import numpy as _np

    _HAVE_NUMPY = True
except ImportError:  # pragma: no cover - exercised only without numpy
    _HAVE_NUMPY = False

__all__ = [
    "CACHED_PAGE_LIFETIME",
    "ENCODING_FLAG_XBZRLE",
    "MAX_RUN",
    "WORD_SIZE",
    "XbzrleCache",
    "XbzrleSave",
    "decode",
    "decode_into",
    "encode",
]

#: The byte after an XBZRLE record header on the stream.
ENCODING_FLAG_XBZRLE = 0x01
#: ``uleb128_encode_small`` asserts ``n <= 0x3fff``.
MAX_RUN = 0x3FFF
#: ``sizeof(long)`` on the 64-bit hosts QEMU runs on; pages must be a multiple.
WORD_SIZE = 8
#: ``page_cache.c``: a cached page is not replaced within two sync cycles.
CACHED_PAGE_LIFETIME = 2

_NONZERO_RUN = re.compile(rb"[^\x00]+")

Buffer = bytes | bytearray | memoryview


def _xor(old: Buffer, new: Buffer) -> bytes:
    n = len(old)
    x = int.from_bytes(old, "little") ^ int.from_bytes(new, "little")
    return x.to_bytes(n, "little")


def encode(old: Buffer, new: Buffer, limit: int) -> bytes | None:
    """Encode ``new`` against ``old`` exactly as ``xbzrle_encode_buffer``.

    ``limit`` is QEMU's ``dlen`` (the output buffer size; QEMU uses the target
    page size).  Returns ``None`` where QEMU returns -1 (the delta would not
    fit), ``b""`` where it returns 0 (pages identical), else the delta bytes.
    """
    n = len(old)
    if len(new) != n:
        raise ValueError(f"xbzrle: old page has {n} bytes but new page has {len(new)}")
    if n % WORD_SIZE:
        raise ValueError(f"xbzrle: page size {n} is not a multiple of {WORD_SIZE} (QEMU asserts)")
    if n == 0:
        return b""
    # Top of the first loop iteration: d == 0.
    if limit < 2:
        return None
    if old == new:
        return b""
    if n > MAX_RUN:
        return _encode_exact(old, new, limit)
    if _HAVE_NUMPY and n >= _NUMPY_MIN_PAGE:
        return _encode_numpy(old, new, limit)
    return _encode_python(_xor(old, new), new, limit)


# Why the fast paths may decide overflow from the last run alone: with
# D_k = output length after run k, QEMU fails at run k iff
#   D_{k-1} + 2 > limit  or  D_{k-1} + hz_k + 2 > limit  or  D_k > limit
# (hz_k = bytes of the zero-run length), plus, if a trailing zero run remains,
# D_last + 2 > limit.  All of these only grow with k (D_{k-1} + hz_k <= D_k),
# so some run fails iff the last one does.  No run can exceed MAX_RUN when
# the page itself is at most MAX_RUN bytes, so no assertion can intervene.


def _encode_python(xor: bytes, new: Buffer, limit: int) -> bytes | None:
    src = new if isinstance(new, bytes) else bytes(new)
    out = bytearray()
    prev = 0
    z = 0
    before = 0
    for m in _NONZERO_RUN.finditer(xor):
        start, end = m.span()
        z = start - prev
        before = len(out)
        if z < 0x80:
            out.append(z)
        else:
            out += bytes(((z & 0x7F) | 0x80, z >> 7))
        nz = end - start
        if nz < 0x80:
            out.append(nz)
        else:
            out += bytes(((nz & 0x7F) | 0x80, nz >> 7))
        out += src[start:end]
        prev = end
    total = len(out)
    hz = 1 if z < 0x80 else 2
    if total > limit or before + hz + 2 > limit or (prev < len(xor) and total + 2 > limit):
        return None
    return bytes(out)


_NUMPY_MIN_PAGE = 256


def _encode_numpy(old: Buffer, new: Buffer, limit: int) -> bytes | None:
    """Vectorised encoder for ``old != new``, ``limit >= 2``, ``len <= MAX_RUN``."""
    n = len(old)
    a = _np.frombuffer(old, dtype=_np.uint8)
    b = _np.frombuffer(new, dtype=_np.uint8)
    changed = a != b
    flips = _np.flatnonzero(changed[1:] != changed[:-1]) + 1
    head = [0, 0] if changed[0] else [0]
    bounds = _np.concatenate((head, flips, [n]))
    lens = bounds[1:] - bounds[:-1]  # alternating zero / nonzero run lengths
    runs = len(lens) // 2
    trailing = len(lens) % 2 == 1
    z = lens[0 : 2 * runs : 2]
    nz = lens[1 : 2 * runs : 2]
    zbig = z >= 0x80
    nzbig = nz >= 0x80
    hz = 1 + zbig
    piece = hz + (1 + nzbig) + nz
    dend = _np.cumsum(piece)
    total = int(dend[-1])
    before = total - int(piece[-1])
    if total > limit or before + int(hz[-1]) + 2 > limit or (trailing and total + 2 > limit):
        return None
    dstart = dend - piece
    npos = dstart + hz
    zhi = dstart[zbig] + 1
    nhi = npos[nzbig] + 1
    out = _np.empty(total, dtype=_np.uint8)
    header = _np.zeros(total, dtype=_np.bool_)
    header[dstart] = True
    header[npos] = True
    header[zhi] = True
    header[nhi] = True
    out[dstart] = (z & 0x7F) | (zbig << 7)
    out[npos] = (nz & 0x7F) | (nzbig << 7)
    out[zhi] = z[zbig] >> 7
    out[nhi] = nz[nzbig] >> 7
    out[~header] = b[changed]
    return out.tobytes()


def _encode_exact(old: Buffer, new: Buffer, limit: int) -> bytes | None:
    """Literal run-by-run transcription of the C loop, any page size.

    ``old != new`` and ``limit >= 2`` are already checked.  Used for pages
    larger than ``MAX_RUN`` where QEMU's assertion order matters.
    """
    n = len(old)
    xor = _xor(old, new)
    src = new if isinstance(new, bytes) else bytes(new)
    out = bytearray()
    append = out.append
    prev_end = 0
    for m in _NONZERO_RUN.finditer(xor):
        start, end = m.span()
        z = start - prev_end
        if z > MAX_RUN:
            raise ValueError(f"xbzrle: zero run of {z} bytes at {prev_end} exceeds {MAX_RUN} (QEMU asserts)")
        if z < 0x80:
            append(z)
        else:
            append((z & 0x7F) | 0x80)
            append(z >> 7)
        if len(out) + 2 > limit:
            return None
        nz = end - start
        if nz > MAX_RUN:
            raise ValueError(f"xbzrle: changed run of {nz} bytes at {start} exceeds {MAX_RUN} (QEMU asserts)")
        if nz < 0x80:
            append(nz)
        else:
            append((nz & 0x7F) | 0x80)
            append(nz >> 7)
        if len(out) + nz > limit:
            return None
        out += src[start:end]
        prev_end = end
        # Top of the next loop iteration, reached whenever input remains --
        # even if only an (unwritten) trailing zero run is left.
        if end < n and len(out) + 2 > limit:
            return None
    return bytes(out)


def _uleb(delta: Buffer, i: int, what: str) -> tuple[int, int]:
    """``uleb128_decode_small`` at ``i``; the caller guarantees 2 bytes exist."""
    b = delta[i]
    if not b & 0x80:
        return b, 1
    b2 = delta[i + 1]
    if b2 & 0x80:
        raise MalformedStream(f"xbzrle: {what} length is a ULEB128 longer than two bytes", offset=i)
    return (b & 0x7F) | (b2 << 7), 2


def decode_into(delta: Buffer, page: bytearray | memoryview) -> int:
    """Apply ``delta`` in place onto ``page`` like ``xbzrle_decode_buffer``.

    Returns QEMU's result: the page position after the last changed run.
    Raises :class:`MalformedStream` where QEMU returns -1; ``page`` may
    already be partly modified then (as in QEMU).
    """
    slen = len(delta)
    dlen = len(page)
    i = 0
    d = 0
    # Fast loop: every check of the C is here, but all failures are handed to
    # _decode_error, which re-parses the failing item and explains it.
    while i < slen:
        if slen - i < 2:
            _decode_error(delta, i, d, dlen)
        z = delta[i]
        j = i + 1
        if z & 0x80:
            z2 = delta[j]
            if z2 & 0x80:
                _decode_error(delta, i, d, dlen)
            z = (z & 0x7F) | (z2 << 7)
            j += 1
        if (i and not z) or d + z > dlen or slen - j < 2:
            _decode_error(delta, i, d, dlen)
        d += z
        nz = delta[j]
        k = j + 1
        if nz & 0x80:
            nz2 = delta[k]
            if nz2 & 0x80:
                _decode_error(delta, i, d - z, dlen)
            nz = (nz & 0x7F) | (nz2 << 7)
            k += 1
        end = k + nz
        if not nz or d + nz > dlen or end > slen:
            _decode_error(delta, i, d - z, dlen)
        page[d : d + nz] = delta[k:end]
        d += nz
        i = end
    return d


def _decode_error(delta: Buffer, i: int, d: int, dlen: int) -> NoReturn:
    """Re-parse the zero run / nonzero run pair at ``i`` (page position ``d``)
    and raise the error QEMU's decoder hits there."""
    slen = len(delta)
    if slen - i < 2:
        raise MalformedStream(
            f"xbzrle: delta truncated: zero-run length at end of {slen}-byte delta needs 2 bytes", offset=i
        )
    count, ret = _uleb(delta, i, "zero-run")
    if i and not count:
        raise MalformedStream("xbzrle: zero-length zero run after the start of the delta", offset=i)
    d += count
    if d > dlen:
        raise MalformedStream(
            f"xbzrle: zero run of {count} bytes reaches page position {d}, past the {dlen}-byte page",
            offset=i,
        )
    i += ret
    if slen - i < 2:
        raise MalformedStream(
            f"xbzrle: delta truncated: nonzero run at end of {slen}-byte delta needs at least 2 bytes",
            offset=i,
        )
    count, ret = _uleb(delta, i, "nonzero-run")
    if not count:
        raise MalformedStream("xbzrle: nonzero run of length 0", offset=i)
    if d + count > dlen:
        raise MalformedStream(
            f"xbzrle: nonzero run of {count} bytes at page position {d} runs past the {dlen}-byte page",
            offset=i,
        )
    if i + ret + count > slen:
        raise MalformedStream(
            f"xbzrle: delta truncated: nonzero run of {count} bytes but only {slen - i - ret} left",
            offset=i,
        )
    raise AssertionError(f"xbzrle: decoder fast path and error path disagree at offset {i}")  # pragma: no cover


def decode(delta: Buffer, old: Buffer) -> bytes:
    """Return ``old`` with ``delta`` applied (the receiver's new page contents)."""
    page = bytearray(old)
    decode_into(delta, page)
    return bytes(page)


@dataclass(frozen=True)
class XbzrleSave:
    """What ``save_xbzrle_page`` decided for one dirty page.

    ``kind``:

    * ``"delta"`` -- send an XBZRLE record with ``delta`` (QEMU returns 1);
    * ``"unchanged"`` -- send nothing for this page (QEMU returns 0);
    * ``"page"`` -- send a normal PAGE record with ``page`` (QEMU returns -1:
      cache miss, or the delta would not fit in one page).
    """

    kind: Literal["delta", "unchanged", "page"]
    delta: bytes = b""
    page: bytes = b""
    cache_hit: bool = False
    overflow: bool = False


class XbzrleCache:
    """QEMU's XBZRLE sender page cache (``migration/page_cache.c``).

    Direct-mapped: ``addr`` (a ``ram_addr_t``, i.e. RAM-block offset in the
    global RAM address space plus the page offset) lives in slot
    ``(addr // page_size) & (capacity - 1)``.  ``age`` is the bitmap sync
    generation (``ram_counters.dirty_sync_count``).  A slot holding a different
    page is only replaced once that page is ``CACHED_PAGE_LIFETIME`` (2)
    generations old; a hit (``is_cached``) refreshes the age.

    The cache size must be at least one page and a power-of-two number of
    pages (QEMU 7.2 rejects other sizes with the same messages).
    """

    def __init__(self, cache_size: int, page_size: int = 4096) -> None:
        if page_size <= 0:
            raise ValueError(f"page size must be positive, got {page_size}")
        if cache_size < page_size:
            raise ValueError("Parameter 'cache size' expects is smaller than one target page size")
        pages = cache_size // page_size
        if pages & (pages - 1):
            raise ValueError("Parameter 'cache size' expects is not a power of two number of pages")
        self.page_size = page_size
        self.capacity = pages
        self.num_items = 0
        self._addr: list[int | None] = [None] * pages
        self._age: list[int] = [0] * pages
        self._data: list[bytearray | None] = [None] * pages
        # xbzrle_counters that save_page maintains
        self.pages = 0
        self.cache_miss = 0
        self.overflow = 0

    def slot(self, addr: int) -> int:
        """``cache_get_cache_pos``."""
        return (addr // self.page_size) & (self.capacity - 1)

    def is_cached(self, addr: int, current_age: int) -> bool:
        """``cache_is_cached``: a hit also refreshes the entry's age."""
        pos = self.slot(addr)
        if self._addr[pos] == addr:
            self._age[pos] = current_age
            return True
        return False

    def get_cached_data(self, addr: int) -> bytearray | None:
        """``get_cached_data``: the slot's data, *whatever page it holds*."""
        return self._data[self.slot(addr)]

    def lookup(self, addr: int) -> bytes | None:
        """The cached copy of ``addr`` if that page is cached (no age update)."""
        pos = self.slot(addr)
        data = self._data[pos]
        if self._addr[pos] != addr or data is None:
            return None
        return bytes(data)

    def insert(self, addr: int, data: Buffer, current_age: int) -> bool:
        """``cache_insert``; returns ``False`` where QEMU returns -1."""
        if len(data) != self.page_size:
            raise ValueError(f"cache insert of {len(data)} bytes into a {self.page_size}-byte page cache")
        pos = self.slot(addr)
        slot_data = self._data[pos]
        if slot_data is not None and self._addr[pos] != addr and self._age[pos] + CACHED_PAGE_LIFETIME > current_age:
            return False
        if slot_data is None:
            self._data[pos] = bytearray(data)
            self.num_items += 1
        else:
            slot_data[:] = data
        self._age[pos] = current_age
        self._addr[pos] = addr
        return True

    def cache_zero_page(self, addr: int, current_age: int) -> None:
        """``xbzrle_cache_zero_page``: the page went out as a ZERO record."""
        self.insert(addr, bytes(self.page_size), current_age)

    def save_page(self, addr: int, data: Buffer, current_age: int, *, last_stage: bool = False) -> XbzrleSave:
        """``save_xbzrle_page``: decide how to send dirty page ``addr``.

        ``current_age`` is ``dirty_sync_count``; ``last_stage`` is true while
        completing (VM stopped), when QEMU stops updating the cache.  QEMU
        only calls this once XBZRLE is enabled (after the first full pass)
        and not in postcopy.
        """
        page = bytes(data)
        if len(page) != self.page_size:
            raise ValueError(f"page of {len(page)} bytes, cache pages are {self.page_size}")
        if not self.is_cached(addr, current_age):
            self.cache_miss += 1
            if not last_stage:
                self.insert(addr, page, current_age)
            return XbzrleSave("page", page=page)
        self.pages += 1
        prev = self._data[self.slot(addr)]
        assert prev is not None  # a hit implies the slot holds data
        delta = encode(prev, page, self.page_size)
        if not last_stage and delta != b"":
            prev[:] = page
        if delta == b"":
            return XbzrleSave("unchanged", cache_hit=True)
        if delta is None:
            self.overflow += 1
            return XbzrleSave("page", page=page, cache_hit=True, overflow=True)
        return XbzrleSave("delta", delta=delta, cache_hit=True)
