"""RAM section records (QEMU's ``ram`` iterative section, version 4).

Every record starts with a be64 word: page offset | flags.  A section read
from memory is checked by a scanner that builds no per-record objects: it
keeps the section's bytes (written back as they are) and its summary (block
list, pages per block); the records are parsed when asked for.  Tools that
only summarize a 16 GiB guest's stream never build a million page objects.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable

import attrs

from vmsd.migration.ram.mapped import MappedRam, MappedRamHeader, read_header
from vmsd.runtime.errors import MalformedStream
from vmsd.runtime.io import Reader, Writer

RAM_SECTION_VERSION = 4  # the only version of the "ram" section QEMU loads
RAM_SAVE_FLAG_FULL = 0x01
RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200

TARGET_PAGE_SIZE = 4096
_KNOWN = (
    RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_MEM_SIZE | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_EOS | RAM_SAVE_FLAG_CONTINUE
    | RAM_SAVE_FLAG_XBZRLE | RAM_SAVE_FLAG_COMPRESS_PAGE | RAM_SAVE_FLAG_MULTIFD_FLUSH
)

# QEMU's loader dispatches on the flags without CONTINUE: they must be exactly one of these kinds.
_KINDS = frozenset({
    RAM_SAVE_FLAG_MEM_SIZE, RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_COMPRESS_PAGE, RAM_SAVE_FLAG_MULTIFD_FLUSH,
})


def valid_flags(flags: int) -> bool:
    """Whether a record's flags name one kind QEMU's ``ram_load_precopy`` knows (CONTINUE aside).

    Every reader of RAM records asks this first, so none of them can take a combination (PAGE|MEM_SIZE,
    say) for something the others refuse."""
    return flags & ~RAM_SAVE_FLAG_CONTINUE in _KINDS


# What QEMU's loader refuses in a mapped-ram stream: pages live in the file, never in records.
_NOT_MAPPED = RAM_SAVE_FLAG_HOOK | RAM_SAVE_FLAG_MULTIFD_FLUSH | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_XBZRLE \
    | RAM_SAVE_FLAG_ZERO


def check_flags(flags: int, at: int, context: RamContext | None = None) -> None:
    """Refuse a record QEMU's loader refuses (see :func:`valid_flags`; in a mapped-ram stream, any page
    record), naming its offset ``at``."""
    if context is not None and context.mapped_ram and flags & _NOT_MAPPED:
        raise MalformedStream(f"RAM record with flags {flags:#x} in a mapped-ram stream (its pages are in the "
                              f"file, not in records)", offset=at)
    if flags & ~_KNOWN:
        raise MalformedStream(f"unknown RAM record flags {flags:#x}", offset=at)
    if not valid_flags(flags):
        raise MalformedStream(f"unknown combination of migration flags {flags:#x}", offset=at)


@attrs.frozen
class RamContext:
    """What a RAM section's bytes mean depends on the stream's settings; every reader of RAM records is
    handed this (by the stream decoder, which learns them from the configuration record), so no parser
    can be left with its own idea of them."""

    ignore_shared: bool = False  # x-ignore-shared: the block list carries each block's guest address
    postcopy: bool = False  # postcopy-ram: the block list carries page sizes that differ from the host's
    # cpr-transfer and cpr-exec: every block stays where it is (the new side maps the old side's memory),
    # so no page record may come.  The stream does not say so; the destination knows its mode.
    in_place: bool = False
    # mapped-ram: each block-list entry carries a header placing the block's pages in the file, and no
    # page record may come (see vmsd.migration.ram.mapped).
    mapped_ram: bool = False
    # Where the stream's first byte is in its file (``file:PATH,offset=N``): mapped-ram headers hold file
    # offsets, readers count from the stream's start.
    file_offset: int = 0


# A stream with neither capability on.
PLAIN = RamContext()


@attrs.define
class RamBlockInfo:
    """One entry of the MEM_SIZE block list."""

    name: str
    used_length: int
    page_size: int | None = None  # sent only with postcopy when it differs from the host page size
    addr: int | None = None  # sent only with x-ignore-shared
    mapped: MappedRam | None = None  # mapped-ram: the block's header and its part of the file


@attrs.define
class RamRecord:
    """One record; ``block`` is None when CONTINUE reuses the previous block."""

    flags: int
    offset: int
    block: str | None = None
    data: bytes = b""  # page bytes, fill byte, XBZRLE or zlib payload
    blocks: list[RamBlockInfo] = attrs.Factory(list)  # MEM_SIZE only


class RamPayload:
    """The RAM records of one START/PART/END section, up to and including EOS.

    Built from records, or by :func:`read_ram` from the section's bytes and
    their summary; ``records`` are then parsed on first use.  Once they have
    been asked for, they (possibly edited) are what gets written.
    """

    __slots__ = ("_raw", "_records", "_summary")

    def __init__(self, records: list[RamRecord] | None = None, *, raw: bytes | None = None, summary: _Summary | None = None) -> None:
        if records is None and (raw is None or summary is None):
            raise ValueError("a RamPayload needs records, or raw bytes with their summary")
        self._records = records
        self._raw = raw
        self._summary = summary

    @property
    def records(self) -> list[RamRecord]:
        if self._records is None:
            assert self._raw is not None and self._summary is not None
            self._records = _read_records(Reader(self._raw), self._summary.context, True)
        return self._records

    def _unparsed(self) -> _Summary | None:
        """The scanner's summary while the records have not been parsed (then they are the truth)."""
        return self._summary if self._records is None else None

    @property
    def record_count(self) -> int:
        summary = self._unparsed()
        return summary.count if summary is not None else len(self.records)

    def block_list(self) -> list[RamBlockInfo]:
        """The blocks announced by MEM_SIZE records (QEMU sends them in the first section)."""
        summary = self._unparsed()
        if summary is not None:
            return list(summary.blocks)
        return [b for rec in self.records for b in rec.blocks]

    def names_block(self) -> bool:
        """Whether a page record here names its block (later sections may then CONTINUE)."""
        summary = self._unparsed()
        if summary is not None:
            return bool(summary.pages)
        return any(rec.block for rec in self.records)

    def pages_by_block(self) -> dict[str, dict[str, int]]:
        summary = self._unparsed()
        if summary is not None:
            return {name: dict(kinds) for name, kinds in summary.pages.items()}
        out: dict[str, dict[str, int]] = {}
        current = ""
        for rec in self.records:
            if rec.block is not None:
                current = rec.block
            kind = _page_kind(rec.flags)
            if kind:
                stats = out.setdefault(current, {})
                stats[kind] = stats.get(kind, 0) + 1
        return out


    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RamPayload):
            return NotImplemented
        return self.records == other.records

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RamPayload({self.record_count} records)"


@attrs.frozen
class _Summary:
    """What the scanner learned about a section without building records (never changed: empty ones are
    shared; readers copy ``blocks`` and ``pages``)."""

    count: int
    blocks: list[RamBlockInfo]
    pages: dict[str, dict[str, int]]  # block name -> {"zero"/"normal"/...: pages}
    context: RamContext


def read_ram(r: Reader, context: RamContext = PLAIN, block_named: bool = False) -> RamPayload:
    """Read records until EOS, as the stream's ``context`` says they are laid out.
    ``block_named``: an earlier section already named a block, so CONTINUE may come first
    (QEMU keeps its last block across the sections of one migration)."""
    if r.remaining() is not None and not context.mapped_ram:  # the whole input is in memory: scan it in place
        start = r.pos
        scanned = _scan(r.buf, start, context, block_named)
        if scanned is not None:
            end, summary = scanned
            r.take(end - start)
            raw = r.buf[start:end]
            # Iterations with nothing dirty send a section holding only EOS: such sections share one bytes object.
            return RamPayload(raw=_EOS_ONLY if raw == _EOS_ONLY else raw, summary=summary)
    # Streaming input, or something the scanner does not accept: the exact
    # parser says what is wrong, and where.
    return RamPayload(_read_records(r, context, block_named))


_U64 = struct.Struct(">Q")
_EOS_ONLY = struct.pack(">Q", RAM_SAVE_FLAG_EOS)
_U32 = struct.Struct(">I")
_PAGE_KINDS = (
    (RAM_SAVE_FLAG_ZERO, "zero"),
    (RAM_SAVE_FLAG_PAGE, "normal"),
    (RAM_SAVE_FLAG_XBZRLE, "xbzrle"),
    (RAM_SAVE_FLAG_COMPRESS_PAGE, "compressed"),
)


def _page_kind(flags: int) -> str:
    for flag, name in _PAGE_KINDS:
        if flags & flag:
            return name
    return ""


_ANY_PAGE = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_XBZRLE | RAM_SAVE_FLAG_COMPRESS_PAGE


def _scan(buf: bytes, pos: int, context: RamContext, block_named: bool) -> tuple[int, _Summary] | None:
    """Walk one section's records in ``buf``: (end, summary), or None on
    anything unusual (the caller then re-reads with the exact parser)."""
    end = len(buf)
    unpack_u64 = _U64.unpack_from
    count = 0
    blocks: list[RamBlockInfo] = []
    pages: dict[bytes, list[int]] = {}  # per block: zero, normal, xbzrle, compressed
    current: list[int] | None = None
    if block_named:
        current = pages[b""] = [0, 0, 0, 0]  # pages that CONTINUE a block named in an earlier section
    while pos + 8 <= end:
        flags = unpack_u64(buf, pos)[0] & (TARGET_PAGE_SIZE - 1)
        pos += 8
        count += 1
        if flags & ~RAM_SAVE_FLAG_CONTINUE not in _KINDS:  # valid_flags, inline: this loop is the tools' hot path
            return None
        if flags & _ANY_PAGE:
            if not flags & RAM_SAVE_FLAG_CONTINUE:
                if pos >= end:
                    return None
                n = buf[pos]
                name = buf[pos + 1 : pos + 1 + n]
                pos += 1 + n
                current = pages.get(name)
                if current is None:
                    current = pages[name] = [0, 0, 0, 0]
            elif current is None:
                return None
            if flags & RAM_SAVE_FLAG_ZERO:
                pos += 1
                current[0] += 1
                if flags == _ZERO_CONTINUE:
                    run = _zero_run(buf, pos, end)
                    pos += 9 * run
                    current[0] += run
                    count += run
            elif flags & RAM_SAVE_FLAG_PAGE:
                pos += TARGET_PAGE_SIZE
                current[1] += 1
            elif flags & RAM_SAVE_FLAG_XBZRLE:
                if pos + 3 > end or buf[pos] != 1:
                    return None
                length = (buf[pos + 1] << 8) | buf[pos + 2]
                if length > TARGET_PAGE_SIZE:
                    return None
                pos += 3 + length
                current[2] += 1
            else:
                if pos + 4 > end:
                    return None
                length = _U32.unpack_from(buf, pos)[0]
                if length > 2 * TARGET_PAGE_SIZE:
                    return None
                pos += 4 + length
                current[3] += 1
            if pos > end:
                return None
        elif flags & RAM_SAVE_FLAG_MEM_SIZE:
            r = Reader(buf[pos - 8 :])
            try:
                r.u64()
                blocks += read_block_list(r, unpack_u64(buf, pos - 8)[0] & ~(TARGET_PAGE_SIZE - 1), context)
            except MalformedStream:
                return None
            pos += r.tell() - 8
        if flags & RAM_SAVE_FLAG_EOS:
            summary = {
                name.decode(errors="replace"): {kind: n for (_, kind), n in zip(_PAGE_KINDS, counts, strict=True) if n}
                for name, counts in pages.items()
                if any(counts)
            }
            if not blocks and not summary:
                # Sections of no block and no page (EOS, flushes) share a summary: a stream of them costs
                # a few objects per section, not a list and a dict each.
                return pos, _empty_summary(count, context)
            return pos, _Summary(count, blocks, summary, context)
    return None


@functools.lru_cache(maxsize=64)
def _empty_summary(count: int, context: RamContext) -> _Summary:
    return _Summary(count, [], {}, context)


_ZERO_CONTINUE = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE
_LOW_NIBBLE = bytes(b & 0x0F for b in range(256))


def _zero_run(buf: bytes, pos: int, end: int) -> int:
    """How many 9-byte "zero page, same block" records start at ``pos``.

    Most of an idle guest's stream is such runs; strided slices check their
    flag bits in C (low byte 0x22, bits 8-11 clear) instead of per record.
    """
    total = 0
    probe = 64  # grows while the run lasts: a lone zero page costs a 64-record look, not a 64 Ki one
    while True:
        n = min((end - pos) // 9, probe)
        if n < 8:
            return total
        low = buf[pos + 7 : pos + 9 * n : 9]
        k = n - len(low.lstrip(b"\x22"))
        high = buf[pos + 6 : pos + 9 * k : 9].translate(_LOW_NIBBLE)
        k = len(high) - len(high.lstrip(b"\x00"))
        total += k
        pos += 9 * k
        if k < n:
            return total
        probe = min(probe * 8, 1 << 16)


def _read_records(r: Reader, context: RamContext, block_named: bool) -> list[RamRecord]:
    records: list[RamRecord] = []
    have_block = block_named
    while True:
        at = r.tell()
        word = r.u64()
        flags = word & (TARGET_PAGE_SIZE - 1)
        offset = word & ~(TARGET_PAGE_SIZE - 1)
        check_flags(flags, at, context)
        rec = RamRecord(flags, offset)
        if flags & RAM_SAVE_FLAG_MEM_SIZE:
            rec.blocks = read_block_list(r, offset, context)
        elif flags & (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_XBZRLE | RAM_SAVE_FLAG_COMPRESS_PAGE):
            if not flags & RAM_SAVE_FLAG_CONTINUE:
                rec.block = r.counted_string().decode(errors="replace")
                have_block = True
            elif not have_block:
                raise MalformedStream("RAM page continues a block that was never named", offset=at)
            rec.data = read_page_payload(r, flags, at)
        records.append(rec)
        if flags & RAM_SAVE_FLAG_EOS:
            return records


def read_page_payload(r: Reader, flags: int, at: int) -> bytes:
    """A page record's payload, after its header word and block name, checked as QEMU's loader checks it:
    the fill byte (ZERO), the page (PAGE), encoding + be16 length + delta (XBZRLE), be32 length + zlib
    stream (COMPRESS_PAGE).  ``at``: the record's offset, for errors."""
    if flags & RAM_SAVE_FLAG_ZERO:
        return r.read(1)
    if flags & RAM_SAVE_FLAG_PAGE:
        return r.read(TARGET_PAGE_SIZE)
    if flags & RAM_SAVE_FLAG_XBZRLE:
        head = r.read(3)
        if head[0] != 1:  # ENCODING_FLAG_XBZRLE, the only encoding there is
            raise MalformedStream(f"unknown XBZRLE encoding {head[0]}", offset=at)
        length = int.from_bytes(head[1:3], "big")
        if length > TARGET_PAGE_SIZE:
            raise MalformedStream(f"XBZRLE length {length} exceeds a page", offset=at)
        return head + r.read(length)
    length = r.u32()
    if length > 2 * TARGET_PAGE_SIZE:
        raise MalformedStream(f"compressed page of {length} bytes", offset=at)
    return length.to_bytes(4, "big") + r.read(length)


MappedHandler = Callable[[Reader, RamBlockInfo, MappedRamHeader], None]


def read_block_list(r: Reader, total: int, context: RamContext,
                    on_mapped: MappedHandler | None = None) -> list[RamBlockInfo]:
    """The MEM_SIZE record's block list (after its header word, whose offset bits are ``total``).

    With mapped-ram each entry's header is checked and ``on_mapped(r, entry, header)`` must consume the
    block's part of the file, up to where the next entry starts; by default it is kept as the entry's
    :class:`MappedRam` (a view of the input, when that is in memory).
    """
    blocks: list[RamBlockInfo] = []
    remaining = total
    while remaining > 0:
        at = r.tell()
        name = r.counted_string().decode(errors="replace")
        used = r.u64()
        if used > remaining:
            raise MalformedStream(f"RAM block '{name}' of {used:#x} bytes exceeds the announced total", offset=at)
        block = RamBlockInfo(name, used)
        if context.postcopy:
            block.page_size = r.u64()
        if context.ignore_shared:
            block.addr = r.u64()
        if context.mapped_ram:
            header = read_header(r, name, used, context.file_offset)
            if on_mapped is None:
                block.mapped = MappedRam.take(r, header, used, context.file_offset)
            else:
                on_mapped(r, block, header)
        blocks.append(block)
        remaining -= used
    return blocks


def write_ram(w: Writer, payload: RamPayload) -> None:
    if payload._records is None and payload._raw is not None:
        w.write(payload._raw)  # as read, never parsed into records
        return
    for rec in payload.records:
        w.u64(rec.offset | rec.flags)
        if rec.flags & RAM_SAVE_FLAG_MEM_SIZE:
            for b in rec.blocks:
                w.counted_string(b.name.encode())
                w.u64(b.used_length)
                if b.page_size is not None:
                    w.u64(b.page_size)
                if b.addr is not None:
                    w.u64(b.addr)
                if b.mapped is not None:
                    b.mapped.write(w)
            continue
        if rec.block is not None:
            w.counted_string(rec.block.encode())
        w.write(rec.data)
