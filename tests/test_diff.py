"""``vmsd diff`` on real QEMU 7.2 streams: what it names, how it shows values, and that it hides nothing.

The stream comes from QEMU (pc machine with an e1000 and a std VGA, so two ROM blocks both have a page
at 0x1000); each case edits it in one place, through the decoded objects or by flipping one byte.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmsd.cli import main
from vmsd.migration.profile import PROFILES
from vmsd.migration.ram.records import RAM_SAVE_FLAG_PAGE, RamPayload
from vmsd.migration.stream import Section, Stream, idstr_bytes, read_stream, write_stream
from vmsd.qemu.v7_2 import spec_set
from vmsd.runtime.errors import VMSDError
from vmsd.runtime.generic import decode_body
from vmsd.runtime.io import Reader
from vmsd.runtime.vmdesc import describe
from vmsd.testing.qmp import save_stream
from vmsd.tools.streamdiff import diff_streams

E1000_ROM = "0000:00:03.0/e1000.rom"
IDE = "0000:00:01.1/ide"
VGA_ROM = "0000:00:02.0/vga.rom"


@dataclass
class Real:
    data: bytes
    path: Path

    def stream(self) -> Stream:
        """A fresh decoded copy, to edit."""
        return read_stream(self.data, spec_set())

    def full(self, stream: Stream, idstr: str) -> Section:
        return next(s for s in stream.full_sections() if s.idstr == idstr)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Real:
    path = tmp_path_factory.mktemp("streams") / "pc.mig"
    save_stream(path, machine="pc", args=["-netdev", "user,id=n0", "-device", "e1000,netdev=n0", "-vga", "std"])
    return Real(path.read_bytes(), path)


def run_diff(a: Path, b: Path, capsys: pytest.CaptureFixture[str], *options: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main(["diff", str(a), str(b), *options])
    out, err = capsys.readouterr()
    assert err == ""
    return rc, out.splitlines()


def edited(real: Real, tmp_path: Path, edit: Callable[[Stream], Any]) -> Path:
    stream = real.stream()
    edit(stream)
    path = tmp_path / "b.mig"
    path.write_bytes(write_stream(stream))
    return path


def ram_pages(stream: Stream) -> dict[tuple[str, int], Any]:
    """Every page record by (block, offset), following CONTINUE records to their block."""
    pages = {}
    block = ""
    for sec in stream.sections():
        if isinstance(sec.payload, RamPayload):
            for rec in sec.payload.records:
                block = rec.block or block
                if rec.flags & RAM_SAVE_FLAG_PAGE:
                    pages[(block, rec.offset)] = rec
    return pages


def test_the_same_stream_has_no_differences(real: Real, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_diff(real.path, real.path, capsys) == (0, [])


def test_pages_of_two_blocks_at_the_same_offset_are_told_apart(
    real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's case: e1000's ROM page 0x1000 changes, vga.rom's page 0x1000 does not."""
    pages = ram_pages(real.stream())
    assert (VGA_ROM, 0x1000) in pages, "the case needs both ROMs to have a page at 0x1000"
    old = pages[(E1000_ROM, 0x1000)].data[0x1A3]

    def flip(stream: Stream) -> None:
        rec = ram_pages(stream)[(E1000_ROM, 0x1000)]
        rec.data = rec.data[:0x1A3] + bytes([old ^ 0x40]) + rec.data[0x1A4:]

    b = edited(real, tmp_path, flip)
    changed = [i for i, (x, y) in enumerate(zip(real.data, b.read_bytes(), strict=True)) if x != y]
    assert len(changed) == 1  # one byte of the file, as cmp sees it
    rc, lines = run_diff(real.path, b, capsys)
    assert rc == 1
    assert lines == [
        f"ram {E1000_ROM} page 0x1000: byte 0x1a3 (block offset 0x11a3): {old:#04x} -> {old ^ 0x40:#04x} "
        f"(1 of 4096 bytes differ; from 0x19b: {_window(pages[(E1000_ROM, 0x1000)].data, 0x19B, 0x1A3, old)} -> "
        f"{_window(pages[(E1000_ROM, 0x1000)].data, 0x19B, 0x1A3, old ^ 0x40)})"
    ]
    assert "hash" not in lines[0]


def _window(data: bytes, start: int, at: int, value: int) -> str:
    return f"{data[start:at].hex()}[{value:02x}]{data[at + 1 : at + 9].hex()}"


def test_registers_in_hex_under_inspects_names_in_natural_order(
    real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    regs = real.full(real.stream(), "cpu").payload.regs

    def edit(stream: Stream) -> None:
        cpu = real.full(stream, "cpu").payload
        cpu.regs[10] = 0x1234_5678_9ABC
        cpu.regs[2] = regs[2] + 0x100

    rc, lines = run_diff(real.path, edited(real, tmp_path, edit), capsys)
    assert rc == 1
    assert lines == [
        f"cpu env.regs[2]: {_hex(regs[2])} -> {_hex(regs[2] + 0x100)}",
        f"cpu env.regs[10]: {_hex(regs[10])} -> 0x123456789abc ({0x123456789ABC})",
    ]
    capsys.readouterr()
    assert main(["inspect", str(real.path)]) == 0
    assert " env.regs (uint64, 128 bytes)" in capsys.readouterr().out  # the name inspect shows


def _hex(v: int) -> str:
    return str(v) if v < 10 else f"{v:#x} ({v})"


def test_a_buffer_is_shown_around_its_first_difference(
    real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """e1000's 64 KiB tx.data, changed at 0x4000 and 0x4001: both sides of the window differ."""

    def edit(stream: Stream) -> None:
        e1000 = real.full(stream, "0000:00:03.0/e1000").payload
        data = bytearray(e1000.tx_data)
        data[0x4000] ^= 0xA5
        data[0x4001] ^= 0x5A
        e1000.tx_data = bytes(data)

    tx = real.full(real.stream(), "0000:00:03.0/e1000").payload.tx_data
    rc, lines = run_diff(real.path, edited(real, tmp_path, edit), capsys)
    assert rc == 1
    [line] = lines
    head = f"0000:00:03.0/e1000 tx.data: byte 0x4000: {tx[0x4000]:#04x} -> {tx[0x4000] ^ 0xA5:#04x} "
    assert line.startswith(head + "(2 of 65536 bytes differ; from 0x3ff8: ")
    windows = re.findall(r"[0-9a-f]*\[[0-9a-f]{2}\][0-9a-f]*", line)
    assert len(windows) == 2 and windows[0] != windows[1]
    assert windows[1] == f"{tx[0x3FF8:0x4000].hex()}[{tx[0x4000] ^ 0xA5:02x}]{tx[0x4001] ^ 0x5A:02x}{tx[0x4002:0x4009].hex()}"


def test_a_subsection_sent_by_one_stream_only_is_a_layout_difference(
    real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """cpu/poll_control_msr is sent while the MSR differs from 1; at 1 it is left out."""
    assert real.full(real.stream(), "cpu").payload.poll_control_msr != 1

    def edit(stream: Stream) -> None:
        real.full(stream, "cpu").payload.poll_control_msr = 1

    rc, lines = run_diff(real.path, edited(real, tmp_path, edit), capsys)
    assert rc == 1
    assert "cpu cpu/poll_control_msr: subsection only in A (layouts differ)" in lines
    # The rewritten trailer describes the new layout too, and says where its description parts.
    assert any(line.startswith("trailer cpu: layouts differ, description.subsections") for line in lines), lines


def test_a_section_version_difference_is_a_layout_difference(
    real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def edit(stream: Stream) -> None:
        real.full(stream, "globalstate").version_id = 0

    rc, lines = run_diff(real.path, edited(real, tmp_path, edit), capsys)
    assert rc == 1
    assert "globalstate: layouts differ, section version 1 -> 0" in lines


@pytest.mark.parametrize("rule", ["10.0", "11.1"])
def test_array_elements_keep_their_names_in_every_trailer_rule(real: Real, rule: str) -> None:
    """QEMU 10.0's trailer leaves the index off an array's last element, 11.1's off every element: a section
    decoded from such a description compares element by element as the typed one does, and a changed
    element is named by its index."""
    profile = PROFILES[rule]
    for change in (False, True):
        data = real.data
        if change:
            edit = real.stream()
            real.full(edit, IDE).payload.bmdma[1].addr ^= 0x1000
            data = write_stream(edit)
        a, b = real.stream(), read_stream(data, spec_set())
        typed_lines = diff_streams(real.data, a, data, b)
        sec = real.full(b, IDE)
        body, _ = describe(sec.payload, sec.version_id, profile.vmdesc_array_runs, profile.vmdesc_element_index)
        indexes = [e.get("index") for e in body.get("fields") if e.get("name") == "bmdma"]
        assert indexes == ([0, None] if rule == "10.0" else [None, None])
        sec.payload = decode_body(Reader(sec.payload.save(version_id=sec.version_id)), body)
        sec.generic_body = body
        assert diff_streams(real.data, a, data, b) == typed_lines
        if change:
            assert len(typed_lines) == 1 and typed_lines[0].startswith(f"{IDE} bmdma[1].addr: ")
        else:
            assert typed_lines == []


def test_bytes_no_decoded_value_shows_are_reported_by_their_field(
    real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The timer's 8 unused bytes: QEMU skips them, the typed object has no value for them."""
    timer = real.full(real.stream(), "timer")
    at = timer.offset + 1 + 4 + 1 + len(idstr_bytes("timer")) + 8 + 8 + 3  # header, cpu_ticks_offset
    data = bytearray(real.data)
    data[at] ^= 0x11
    b = tmp_path / "b.mig"
    b.write_bytes(data)
    rc, lines = run_diff(real.path, b, capsys)
    assert rc == 1
    assert lines == [
        f"stream in section timer field unused: byte {at:#x}: {real.data[at]:#04x} -> {real.data[at] ^ 0x11:#04x}, "
        "bytes that decode to the same values"
    ]


def test_configuration_name_difference(real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The machine type's last character changes (pc-i440fx-7.2 -> ...-7.3).

    A 7.3 machine type would have B decoded with the 10.0 specs (no older QEMU knows it): --qemu keeps
    both streams on one spec set, so the name is the only difference."""
    conf = real.stream().configuration
    assert conf is not None
    name = bytes(conf.state.name)
    last = len(name) - 1

    def edit(stream: Stream) -> None:
        assert stream.configuration is not None
        stream.configuration.state.name = name[:-1] + bytes([name[-1] + 1])

    rc, lines = run_diff(real.path, edited(real, tmp_path, edit), capsys, "--qemu", "7.2")
    assert rc == 1
    assert lines == [
        f"configuration name: byte {last:#x}: {name[-1]:#04x} -> {name[-1] + 1:#04x} (1 of {len(name)} bytes differ; "
        f"from {last - 8:#x}: {name[last - 8 : last].hex()}[{name[-1]:02x}] -> {name[last - 8 : last].hex()}[{name[-1] + 1:02x}])"
    ]


# ---- every single-byte change is reported --------------------------------------------------------


def _regions(stream: Stream, size: int) -> list[tuple[int, int]]:
    """Byte ranges of the stream's parts: header, configuration, each top-level record, EOF, trailer.

    Sampling a part first, then a byte in it, reaches the small parts (section headers, footers,
    the trailer) as often as the RAM pages that make up most of the bytes."""
    starts = [0]
    if stream.configuration is not None:
        starts.append(stream.configuration.offset)
    starts += [rec.offset for rec in stream.records]
    assert stream.eof_offset is not None
    starts.append(stream.eof_offset)
    if stream.trailer_offset is not None:
        starts.append(stream.trailer_offset)
    # A device section's header apart from its body: flips there change names, ids and versions.
    for sec in stream.full_sections():
        starts.append(sec.offset + 1 + 4 + 1 + len(idstr_bytes(sec.idstr)) + 8)
    starts = sorted(set(starts))
    return list(zip(starts, [*starts[1:], size], strict=True))


@pytest.fixture(scope="module")
def decoded(real: Real) -> tuple[Stream, list[tuple[int, int]]]:
    stream = real.stream()
    return stream, _regions(stream, len(real.data))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_single_byte_flip_is_reported(
    real: Real, decoded: tuple[Stream, list[tuple[int, int]]], data: st.DataObject
) -> None:
    """A flipped byte either makes the stream undecodable (one VMSDError) or shows in diff's output."""
    stream, regions = decoded
    start, end = data.draw(st.sampled_from(regions), label="region")
    at = data.draw(st.integers(start, end - 1), label="offset")
    mask = data.draw(st.integers(1, 255), label="xor")
    flipped = bytearray(real.data)
    flipped[at] ^= mask
    try:
        other = read_stream(bytes(flipped), spec_set())
    except VMSDError:
        return
    lines = diff_streams(real.data, stream, bytes(flipped), other)
    assert lines, f"byte {at:#x} ^ {mask:#x} changed nothing diff reports"

