"""RAM section records (QEMU's ``ram`` iterative section, version 4).

Every record starts with a be64 word: page offset | flags.  The parser keeps
each record's bytes (page payloads as slices of the input) so a stream can be
written back byte for byte, and summarizes pages per RAM block.
"""

from __future__ import annotations

import attrs

from vmsd.runtime.errors import MalformedStream
from vmsd.runtime.io import Reader, Writer

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


@attrs.define
class RamBlock:
    name: str
    used_length: int
    page_size: int | None = None  # sent only with postcopy when it differs from the host page size
    addr: int | None = None  # sent only with x-ignore-shared


@attrs.define
class RamRecord:
    """One record; ``block`` is None when CONTINUE reuses the previous block."""

    flags: int
    offset: int
    block: str | None = None
    data: bytes = b""  # page bytes, fill byte, XBZRLE or zlib payload
    blocks: list[RamBlock] = attrs.Factory(list)  # MEM_SIZE only


@attrs.define
class RamPayload:
    """The RAM records of one START/PART/END section, up to and including EOS."""

    records: list[RamRecord]

    def pages_by_block(self) -> dict[str, dict[str, int]]:
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


def _page_kind(flags: int) -> str:
    for flag, name in (
        (RAM_SAVE_FLAG_ZERO, "zero"),
        (RAM_SAVE_FLAG_PAGE, "normal"),
        (RAM_SAVE_FLAG_XBZRLE, "xbzrle"),
        (RAM_SAVE_FLAG_COMPRESS_PAGE, "compressed"),
    ):
        if flags & flag:
            return name
    return ""


def read_ram(r: Reader, ignore_shared: bool = False, postcopy: bool = False, block_named: bool = False) -> RamPayload:
    """Read records until EOS.  ``ignore_shared``/``postcopy`` follow the stream's capabilities;
    ``block_named``: an earlier section already named a block, so CONTINUE may come first
    (QEMU keeps its last block across the sections of one migration)."""
    records: list[RamRecord] = []
    have_block = block_named
    while True:
        at = r.tell()
        word = r.u64()
        flags = word & (TARGET_PAGE_SIZE - 1)
        offset = word & ~(TARGET_PAGE_SIZE - 1)
        if flags & ~_KNOWN:
            raise MalformedStream(f"unknown RAM record flags {flags:#x}", offset=at)
        rec = RamRecord(flags, offset)
        if flags & RAM_SAVE_FLAG_MEM_SIZE:
            rec.blocks = _read_block_list(r, offset, ignore_shared, postcopy)
        elif flags & (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_XBZRLE | RAM_SAVE_FLAG_COMPRESS_PAGE):
            if not flags & RAM_SAVE_FLAG_CONTINUE:
                rec.block = r.counted_string().decode(errors="replace")
                have_block = True
            elif not have_block:
                raise MalformedStream("RAM page continues a block that was never named", offset=at)
            if flags & RAM_SAVE_FLAG_ZERO:
                rec.data = r.read(1)
            elif flags & RAM_SAVE_FLAG_PAGE:
                rec.data = r.read(TARGET_PAGE_SIZE)
            elif flags & RAM_SAVE_FLAG_XBZRLE:
                head = r.read(3)
                if head[0] != 1:
                    raise MalformedStream(f"unknown XBZRLE encoding {head[0]}", offset=at)
                length = int.from_bytes(head[1:3], "big")
                if length > TARGET_PAGE_SIZE:
                    raise MalformedStream(f"XBZRLE length {length} exceeds a page", offset=at)
                rec.data = head + r.read(length)
            else:
                length = r.u32()
                if length > 2 * TARGET_PAGE_SIZE:
                    raise MalformedStream(f"compressed page of {length} bytes", offset=at)
                rec.data = length.to_bytes(4, "big") + r.read(length)
        records.append(rec)
        if flags & RAM_SAVE_FLAG_EOS:
            return RamPayload(records)


def _read_block_list(r: Reader, total: int, ignore_shared: bool, postcopy: bool) -> list[RamBlock]:
    blocks: list[RamBlock] = []
    remaining = total
    while remaining > 0:
        at = r.tell()
        name = r.counted_string().decode(errors="replace")
        used = r.u64()
        if used > remaining:
            raise MalformedStream(f"RAM block '{name}' of {used:#x} bytes exceeds the announced total", offset=at)
        block = RamBlock(name, used)
        if postcopy:
            block.page_size = r.u64()
        if ignore_shared:
            block.addr = r.u64()
        blocks.append(block)
        remaining -= used
    return blocks


def write_ram(w: Writer, payload: RamPayload) -> None:
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
            continue
        if rec.block is not None:
            w.counted_string(rec.block.encode())
        w.write(rec.data)
