"""The in-place RAM section scanner agrees with the record parser.

``read_ram`` on in-memory input scans a section without building records;
its summary (record count, block list, pages per block) and the bytes it
writes back must be what parsing every record gives, for any section, and
anything the scanner does not accept must end in the parser's exact error.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsd.migration.ram.blocks import RamBlocks
from vmsd.migration.ram.records import (
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    RamContext,
    RamPayload,
    read_ram,
    write_ram,
)
from vmsd.migration.ram.wire import RamLoader
from vmsd.runtime.errors import MalformedStream, VMSDError
from vmsd.runtime.io import Reader, Writer

PAGE = 4096
NAMES = [b"pc.ram", b"vga.vram", b"/rom@etc/acpi/tables"]


@st.composite
def sections(draw: st.DrawFn, ignore_shared: bool = False) -> bytes:
    """A RAM section as QEMU writes it: optional block list (with block
    addresses under x-ignore-shared), runs of zero / normal / XBZRLE pages
    naming their block or continuing it, EOS."""
    out = bytearray()
    if draw(st.booleans()):
        sizes = [draw(st.integers(1, 64)) * PAGE for _ in NAMES]
        out += struct.pack(">Q", sum(sizes) | RAM_SAVE_FLAG_MEM_SIZE)
        for name, size in zip(NAMES, sizes, strict=True):
            out += bytes([len(name)]) + name + struct.pack(">Q", size)
            if ignore_shared:
                out += struct.pack(">Q", draw(st.integers(0, 1 << 40)))
    named = False
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["zero", "page", "xbzrle"]))
        rename = not named or draw(st.booleans())
        name = draw(st.sampled_from(NAMES))
        for i in range(draw(st.integers(1, 40) if kind == "zero" else st.integers(1, 3))):
            flags = {"zero": RAM_SAVE_FLAG_ZERO, "page": RAM_SAVE_FLAG_PAGE, "xbzrle": RAM_SAVE_FLAG_XBZRLE}[kind]
            if i or not rename:
                flags |= RAM_SAVE_FLAG_CONTINUE
            out += struct.pack(">Q", draw(st.integers(0, 1 << 20)) * PAGE | flags)
            if not flags & RAM_SAVE_FLAG_CONTINUE:
                out += bytes([len(name)]) + name
                named = True
            if kind == "zero":
                out += bytes([draw(st.integers(0, 255))])
            elif kind == "page":
                out += bytes([i & 0xFF]) * PAGE
            else:
                body = draw(st.binary(max_size=64))
                out += b"\x01" + struct.pack(">H", len(body)) + body
    out += struct.pack(">Q", RAM_SAVE_FLAG_EOS)
    return bytes(out)


def _parsed(data: bytes, ignore_shared: bool = False) -> RamPayload:
    """The same section through the record parser (a streaming reader never scans)."""

    class Source:
        def __init__(self, b: bytes) -> None:
            self.b, self.at = b, 0

        def readinto(self, view: memoryview) -> int:
            n = min(len(view), len(self.b) - self.at, 7)  # short reads on purpose
            view[:n] = self.b[self.at : self.at + n]
            self.at += n
            return n

    return read_ram(Reader.from_file(Source(data)), RamContext(ignore_shared=ignore_shared))


@settings(max_examples=150, deadline=None)
@given(st.booleans().flatmap(lambda shared: st.tuples(st.just(shared), sections(shared))), st.binary(max_size=16))
def test_scan_summary_equals_parsed_records(case: tuple[bool, bytes], tail: bytes) -> None:
    shared, data = case
    r = Reader(data + tail)
    scanned = read_ram(r, RamContext(ignore_shared=shared))
    assert r.tell() == len(data)
    parsed = _parsed(data, shared)
    assert scanned.record_count == len(parsed.records)
    assert scanned.block_list() == parsed.block_list()
    assert scanned.pages_by_block() == parsed.pages_by_block()
    assert scanned.names_block() == parsed.names_block()
    w = Writer()
    write_ram(w, scanned)
    assert w.getvalue() == data
    assert scanned.records == parsed.records  # parsed on demand, equal record by record


@settings(max_examples=200, deadline=None)
@given(sections(), st.data())
def test_damaged_sections_fail_as_the_parser_does(data: bytes, draw: st.DataObject) -> None:
    at = draw.draw(st.integers(0, len(data) - 1))
    damaged = data[:at] + bytes([draw.draw(st.integers(0, 255))]) + data[at + 1 :]
    cut = damaged[: draw.draw(st.integers(0, len(damaged)))]
    for blob in (damaged, cut):
        try:
            expected: object = _parsed(blob).records
        except VMSDError as e:
            expected = (type(e), e.message, e.offset)
        try:
            got: object = read_ram(Reader(blob)).records
        except VMSDError as e:
            got = (type(e), e.message, e.offset)
        assert got == expected


@pytest.mark.parametrize("flags", [
    RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_MEM_SIZE | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_EOS,  # found by hypothesis
    RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_XBZRLE | RAM_SAVE_FLAG_PAGE,
    0,
])
def test_every_reader_refuses_a_combination_qemu_refuses(flags: int) -> None:
    """QEMU dispatches on the flags without CONTINUE, which must name one kind; the scanner, the record
    parser and the loader all refuse the rest the same way (they used to disagree on which bit won)."""
    data = struct.pack(">Q", flags) + b"\x06pc.ram" + bytes(PAGE + 16)
    errors = []
    for read in (lambda: read_ram(Reader(data)), lambda: _parsed(data),
                 lambda: RamLoader(RamBlocks()).load_section(Reader(data))):
        with pytest.raises(MalformedStream) as info:
            read()
        errors.append((info.value.message, info.value.offset))
    assert errors == [(f"unknown combination of migration flags {flags:#x}", 0)] * 3
