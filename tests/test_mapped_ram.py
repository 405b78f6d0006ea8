"""mapped-ram streams without QEMU: the header and bitmap codec, vmsd's writer and readers agreeing with each
other and with QEMU's layout rules, and hostile files (QEMU 10.0 and 11.1 in test_mapped_ram_qemu.py)."""

from __future__ import annotations

import os
import struct
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_migration import devices_of, fill, make_machine, ram_of
from vmsd.cli import main
from vmsd.generated.examples.i8254 import I8254
from vmsd.generated.examples.serial import Serial
from vmsd.migration.incoming import Incoming
from vmsd.migration.machine import Machine
from vmsd.migration.precopy import Migration
from vmsd.migration.ram import mapped
from vmsd.migration.ram.mapped import (
    HEADER_SIZE,
    PAGE_SIZE,
    MappedRam,
    MappedRamFile,
    MappedRamHeader,
    bitmap_size,
    decode_bitmap,
    encode_bitmap,
    runs,
)
from vmsd.migration.ram.records import RamPayload
from vmsd.migration.stream import SpecSet, Stream, read_stream, write_stream
from vmsd.runtime.errors import MalformedStream, TruncatedStream, VersionMismatch, VMSDError
from vmsd.runtime.io import Reader

SPECS = SpecSet({"serial": Serial, "i8254": I8254})
MIB = 1 << 20


# -- the codec ----------------------------------------------------------------------------------------------------------
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_header_round_trips_in_28_big_endian_bytes(version: int, page_size: int, bitmap: int, pages: int) -> None:
    header = MappedRamHeader(version, page_size, bitmap, pages)
    raw = header.encode()
    assert len(raw) == HEADER_SIZE == 28
    assert raw == struct.pack(">IQQQ", version, page_size, bitmap, pages)
    assert MappedRamHeader.decode(raw) == header


def test_layout_is_qemus() -> None:
    """QEMU 10.0 saving a 32 MiB guest put the first header at 0x6d: bitmap right after it, pages at 1 MiB."""
    h = MappedRamHeader.layout(0x6D, 32 * MIB)
    assert h == MappedRamHeader(1, 4096, 0x89, 0x100000)


@given(st.integers(0, 1 << 40), st.integers(1, 1 << 22))
def test_layout_rules(at: int, pages: int) -> None:
    h = MappedRamHeader.layout(at, pages * PAGE_SIZE)
    assert h.bitmap_offset == at + HEADER_SIZE
    assert h.pages_offset % mapped.FILE_OFFSET_ALIGNMENT == 0
    assert 0 <= h.pages_offset - (h.bitmap_offset + bitmap_size(pages)) < mapped.FILE_OFFSET_ALIGNMENT
    h.check("b", pages * PAGE_SIZE, at, None)  # what we lay out, we accept


@given(st.lists(st.booleans(), max_size=300))
def test_bitmap_is_little_endian_64_bit_words(bits: list[bool]) -> None:
    present = np.array(bits, dtype=np.bool_)
    raw = encode_bitmap(present)
    assert len(raw) == bitmap_size(len(bits)) == -(-len(bits) // 64) * 8
    words = struct.unpack(f"<{len(raw) // 8}Q", raw)
    assert [bool(words[i // 64] >> (i % 64) & 1) for i in range(len(bits))] == bits
    assert all(w >> (len(bits) - 64 * i) == 0 for i, w in enumerate(words) if len(bits) - 64 * i < 64)
    assert decode_bitmap(raw, len(bits)).tolist() == bits


@given(st.lists(st.booleans(), max_size=200))
def test_runs_are_the_set_stretches(bits: list[bool]) -> None:
    expected: list[tuple[int, int]] = []
    for i, b in enumerate(bits):
        if b and (i == 0 or not bits[i - 1]):
            expected.append((i, i))
        if b:
            expected[-1] = (expected[-1][0], i + 1)
    assert runs(np.array(bits, dtype=np.bool_)) == expected


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_built_block_loads_back(data: st.DataObject) -> None:
    npages = data.draw(st.integers(1, 40))
    kinds = data.draw(st.lists(st.sampled_from(["zero", "data"]), min_size=npages, max_size=npages))
    memory = b"".join(bytes(PAGE_SIZE) if k == "zero" else os.urandom(PAGE_SIZE) for k in kinds)
    at = data.draw(st.integers(0, 3 * MIB))
    block = MappedRam.build(at, len(memory), memory)
    assert block.header == MappedRamHeader.layout(at, len(memory))
    assert block.present().tolist() == [k == "data" for k in kinds]
    assert block.memory() == memory
    assert all(block.page(i) == memory[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(npages))


def test_reader_skip_over_memory_file_and_pipe(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    r = Reader(data)
    r.skip(1000)
    assert r.tell() == 1000 and r.u8() == 1000 % 256
    with pytest.raises(TruncatedStream):
        Reader(data).skip(len(data) + 1)
    path = tmp_path / "f"
    path.write_bytes(data)
    with open(path, "rb", buffering=0) as f:
        r = Reader(source=f)
        r.u32()
        r.skip(700_000)
        assert f.tell() == 700_004  # sought, not read
        assert r.tell() == 700_004 and r.u8() == 700_004 % 256
    rfd, wfd = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(wfd, data), os.close(wfd)))
    writer.start()
    with open(rfd, "rb", buffering=0) as f:
        r = Reader(source=f)
        r.skip(900_000)
        assert r.tell() == 900_000 and r.u8() == 900_000 % 256
        with pytest.raises(TruncatedStream):
            r.skip(len(data))
    writer.join()


# -- vmsd's writer, vmsd's readers ------------------------------------------------------------------------------------
def save_mapped(m: Machine, path: Path, channels: int = 0, offset: int = 0) -> dict[str, object]:
    caps = {"mapped-ram": True, "multifd": bool(channels)}
    from vmsd.migration.multifd import MultifdConfig

    uri = f"file:{path}" + (f",offset={offset}" if offset else "")
    info = Migration(m, uri, caps, {"max-bandwidth": 0},
                     multifd=MultifdConfig(channels=channels) if channels else None).run()
    assert info["status"] == "completed", info
    return info


@pytest.fixture
def machine() -> Machine:
    m = make_machine(8 * MIB)
    fill(m)
    yield m
    m.close()


def test_vmsd_writes_qemus_layout_and_reads_it_back(machine: Machine, tmp_path: Path) -> None:
    out = tmp_path / "m.mig"
    info = save_mapped(machine, out)
    data = out.read_bytes()
    stream = read_stream(data, SPECS)
    assert stream.configuration is not None
    assert stream.configuration.state.capabilities == (b"mapped-ram",)
    blocks = [b for s in stream.sections() if isinstance(s.payload, RamPayload) for b in s.payload.block_list()]
    assert [b.name for b in blocks] == ["pc.ram", "vga.vram"]
    ram = ram_of(machine)
    for b in blocks:
        assert b.mapped is not None
        assert b.mapped.header.bitmap_offset == b.mapped.region_at  # right after the header
        assert b.mapped.header.pages_offset % mapped.FILE_OFFSET_ALIGNMENT == 0
        words = np.frombuffer(ram[b.name], dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
        assert b.mapped.present().tolist() == words.any(axis=1).tolist()  # zero pages are left out
        assert b.mapped.memory() == ram[b.name]
    # Later RAM sections are EOS alone.
    assert all(len(s.payload.records) == 1 for s in stream.sections()[1:] if isinstance(s.payload, RamPayload))
    assert info["ram"]["normal"] == sum(int(b.mapped.present().sum()) for b in blocks if b.mapped)
    # Zero pages are holes: the file takes less room than its size.
    assert out.stat().st_blocks * 512 < out.stat().st_size - 4 * MIB
    assert write_stream(stream) == data


@pytest.mark.parametrize("channels", [0, 3], ids=["main", "multifd-3"])
def test_incoming_loads_a_mapped_file_into_a_machine(machine: Machine, tmp_path: Path, channels: int) -> None:
    out = tmp_path / "m.mig"
    save_mapped(machine, out, channels)
    with make_machine(8 * MIB) as dst:
        result = Incoming(dst).run(f"file:{out}")
        assert ram_of(dst) == ram_of(machine)
        assert devices_of(dst) == devices_of(machine)
        present = sum(int(np.frombuffer(v, dtype=np.uint64).reshape(-1, 512).any(axis=1).sum())
                      for v in ram_of(machine).values())
        assert result.counters["normal"] == present


def test_multifd_destination_reads_a_file_only_when_mapped(machine: Machine, tmp_path: Path) -> None:
    """QEMU opens a file: with multifd only for mapped-ram; so does Incoming (it reads the pages itself)."""
    from vmsd.migration.multifd import MultifdConfig

    out, plain = tmp_path / "m.mig", tmp_path / "plain.mig"
    save_mapped(machine, out)
    assert Migration(machine, f"file:{plain}", parameters={"max-bandwidth": 0}).run()["status"] == "completed"
    with make_machine(8 * MIB) as dst:
        Incoming(dst, multifd=MultifdConfig()).run(f"file:{out}")
        assert ram_of(dst) == ram_of(machine)
    with make_machine(8 * MIB) as dst, pytest.raises(MalformedStream, match="needs a mapped-ram stream"):
        Incoming(dst, multifd=MultifdConfig()).run(f"file:{plain}")


def test_multifd_threads_write_the_same_file(machine: Machine, tmp_path: Path) -> None:
    save_mapped(machine, tmp_path / "one.mig")
    save_mapped(machine, tmp_path / "four.mig", channels=4)
    assert (tmp_path / "one.mig").read_bytes() == (tmp_path / "four.mig").read_bytes()


def test_offset_in_the_file(machine: Machine, tmp_path: Path) -> None:
    """file:PATH,offset=N: the headers hold file offsets, the stream starts N bytes in."""
    out = tmp_path / "m.mig"
    out.write_bytes(b"\xaa" * 5000)
    save_mapped(machine, out, offset=5000)
    assert out.read_bytes()[:5000] == b"\xaa" * 5000
    with make_machine(8 * MIB) as dst:
        Incoming(dst).run(f"file:{out},offset=5000")
        assert ram_of(dst) == ram_of(machine)


def test_loads_from_a_pipe(machine: Machine, tmp_path: Path) -> None:
    """The readers go forward only: a mapped-ram stream loads from a pipe (gaps read and dropped)."""
    out = tmp_path / "m.mig"
    save_mapped(machine, out)
    with make_machine(8 * MIB) as dst:
        Incoming(dst).run(f"exec:cat {out}")
        assert ram_of(dst) == ram_of(machine)


def test_page_that_became_zero_keeps_its_bytes_and_loses_its_bit(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with open(path, "wb+") as f:
        out = MappedRamFile(f.fileno(), "f", workers=2)
        try:
            out.write_block_list(b"", [("b", 4 * PAGE_SIZE, b"")])
            mem = np.frombuffer(os.urandom(4 * PAGE_SIZE), dtype=np.uint8).copy()
            pages = np.arange(4, dtype=np.int64)
            out.submit("b", mem.ctypes.data, pages, np.zeros(4, dtype=np.bool_), mem)
            out.drain()  # a pass ends
            out.submit("b", mem.ctypes.data, pages[1:2], np.ones(1, dtype=np.bool_), mem)
            assert out.finish() == 8
        finally:
            out.close()
    data = path.read_bytes()
    h = out.headers["b"]
    assert decode_bitmap(data[h.bitmap_offset:h.bitmap_offset + 8], 4).tolist() == [True, False, True, True]
    assert data[h.pages_offset:h.pages_offset + 4 * PAGE_SIZE] == mem.tobytes()  # page 1's old bytes stay


def test_rewrite_relays_out_blocks_that_moved(machine: Machine, tmp_path: Path) -> None:
    """The headers hold file offsets: when bytes before the RAM change length (the machine type here), the
    blocks are laid out anew, and the result loads the same RAM."""
    out = tmp_path / "m.mig"
    save_mapped(machine, out)
    stream = read_stream(out.read_bytes(), SPECS)
    assert stream.configuration is not None
    stream.configuration.state.name = b"test-board-renamed"
    edited = write_stream(stream)
    again = read_stream(edited, SPECS)
    blocks = [b for s in again.sections() if isinstance(s.payload, RamPayload) for b in s.payload.block_list()]
    assert {b.name: b.mapped.memory() for b in blocks if b.mapped} == ram_of(machine)


def test_incoming_snapshot_of_a_mapped_file_is_mapped(machine: Machine, tmp_path: Path) -> None:
    """`vmsd incoming file:MAPPED -o SNAP` keeps the configuration, so the snapshot is mapped-ram too."""
    out, snap = tmp_path / "m.mig", tmp_path / "snap.mig"
    save_mapped(machine, out)
    assert main(["incoming", f"file:{out}", "-o", str(snap), "--specs", str(_example_specs())]) == 0
    stream = read_stream(snap.read_bytes(), SPECS)
    blocks = [b for s in stream.sections() if isinstance(s.payload, RamPayload) for b in s.payload.block_list()]
    assert {b.name: b.mapped.memory() for b in blocks if b.mapped} == ram_of(machine)


def _example_specs() -> Path:
    return Path(__file__).resolve().parent.parent / "specs" / "examples"


def test_inspect_shows_headers_and_pages(machine: Machine, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import json

    out = tmp_path / "m.mig"
    save_mapped(machine, out)
    capsys.readouterr()
    assert main(["inspect", "--json", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    summary = next(r["ram"]["mapped_ram"] for r in doc["records"] if "mapped_ram" in r.get("ram", {}))
    stream = read_stream(out.read_bytes(), SPECS)
    blocks = {b.name: b.mapped for s in stream.sections() if isinstance(s.payload, RamPayload)
              for b in s.payload.block_list()}
    for name, m in blocks.items():
        assert m is not None
        assert summary[name] == {"version": 1, "page_size": PAGE_SIZE, "bitmap_offset": m.header.bitmap_offset,
                                 "pages_offset": m.header.pages_offset, "pages": m.npages,
                                 "in_file": int(m.present().sum())}


def test_diff_sees_loaded_pages_only(machine: Machine, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.mig"
    save_mapped(machine, out)
    data = out.read_bytes()
    stream = read_stream(data, SPECS)
    ram = next(b.mapped for b in stream.sections()[0].payload.block_list() if b.name == "pc.ram")
    assert ram is not None
    present = ram.present()
    used, unused = int(np.flatnonzero(present)[0]), int(np.flatnonzero(~present)[0])
    changed = bytearray(data)
    changed[ram.header.pages_offset + used * PAGE_SIZE + 10] ^= 0xFF
    stale = bytearray(data)
    stale[ram.header.pages_offset + unused * PAGE_SIZE + 10] ^= 0xFF  # a page the loader never reads
    (tmp_path / "changed.mig").write_bytes(changed)
    (tmp_path / "stale.mig").write_bytes(stale)
    capsys.readouterr()
    assert main(["diff", str(out), str(tmp_path / "changed.mig")]) == 1
    assert f"pc.ram@{used * PAGE_SIZE:#x}" in capsys.readouterr().out
    assert main(["diff", str(out), str(tmp_path / "stale.mig")]) == 0


def test_outgoing_mapped_ram_needs_a_file_and_no_xbzrle(machine: Machine) -> None:
    with pytest.raises(ValueError, match="file:"):
        Migration(machine, "tcp:127.0.0.1:1", {"mapped-ram": True})
    with pytest.raises(ValueError, match="xbzrle"):
        Migration(machine, "file:/dev/null", {"mapped-ram": True, "xbzrle": True})
    info = Migration(machine, "file:/dev/null", {"mapped-ram": True}).run()
    assert info["status"] == "failed" and "regular file" in info["error-desc"]
    assert machine.running  # the failed migration left it running


# -- hostile files ---------------------------------------------------------------------------------------------------------
def _header_at(stream: Stream, name: str) -> tuple[int, MappedRamHeader]:
    for s in stream.sections():
        if isinstance(s.payload, RamPayload):
            for b in s.payload.block_list():
                if b.name == name and b.mapped is not None:
                    return b.mapped.region_at - HEADER_SIZE, b.mapped.header
    raise AssertionError(name)


def _patched(data: bytes, at: int, header: MappedRamHeader) -> bytes:
    return data[:at] + header.encode() + data[at + HEADER_SIZE:]


@pytest.fixture
def saved(tmp_path: Path) -> tuple[bytes, int, MappedRamHeader]:
    with make_machine(8 * MIB) as m:
        fill(m)
        save_mapped(m, tmp_path / "m.mig")
    data = (tmp_path / "m.mig").read_bytes()
    at, header = _header_at(read_stream(data, SPECS), "vga.vram")
    return data, at, header


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"version": 2}, VersionMismatch, "version 2"),
    ({"page_size": 8192}, MalformedStream, "page size"),
    ({"bitmap_offset": "at"}, MalformedStream, "overlaps the block list"),
    ({"pages_offset": "bitmap"}, MalformedStream, "overlap the bitmap"),
    ({"pages_offset": "misaligned"}, MalformedStream, "not page aligned"),
    ({"pages_offset": "beyond"}, MalformedStream, "past the end of the file"),
    ({"pages_offset": 2**64 - 4096}, MalformedStream, "past the end of the file"),
])
def test_bad_headers_are_one_clear_error(saved: tuple[bytes, int, MappedRamHeader], tmp_path: Path,
                                         change: dict[str, object], error: type[VMSDError], message: str) -> None:
    data, at, header = saved
    values = {"at": at, "bitmap": header.bitmap_offset + 8, "misaligned": header.pages_offset + 1,
              "beyond": -(-len(data) // PAGE_SIZE) * PAGE_SIZE + mapped.FILE_OFFSET_ALIGNMENT}
    fields = {k: values.get(v, v) if isinstance(v, str) else v for k, v in change.items()}
    bad = _patched(data, at, MappedRamHeader(**{**vars_of(header), **fields}))
    with pytest.raises(error, match=message) as exc:
        read_stream(bad, SPECS)
    assert exc.value.offset == at
    path = tmp_path / "bad.mig"
    path.write_bytes(bad)
    with make_machine(8 * MIB) as dst, pytest.raises(VMSDError, match=message):
        Incoming(dst).run(f"file:{path}")


def vars_of(h: MappedRamHeader) -> dict[str, int]:
    return {"version": h.version, "page_size": h.page_size, "bitmap_offset": h.bitmap_offset,
            "pages_offset": h.pages_offset}


def test_huge_block_allocates_nothing(tmp_path: Path) -> None:
    """A block list entry of 1 TiB: refused by its header (the pages would end far past the file), with no
    memory taken for a bitmap or pages, by the tools and by a destination without a limit of its own."""
    head = b"QEVM\x00\x00\x00\x03\x07" + struct.pack(">I", 4) + b"test" + b"\x05\x1aconfiguration/capabilities" \
        + struct.pack(">II", 1, 1) + b"\x0amapped-ram"
    start = b"\x01" + struct.pack(">I", 1) + b"\x03ram" + struct.pack(">II", 0, 4)
    size = 1 << 40
    entry = struct.pack(">Q", size | 4) + b"\x01b" + struct.pack(">Q", size)
    at = len(head + start + entry)
    header = MappedRamHeader.layout(at, size)
    data = head + start + entry + header.encode() + bytes(64)
    tracemalloc.start()
    try:
        with pytest.raises(MalformedStream, match="past the end of the file"):
            read_stream(data, SPECS)
        path = tmp_path / "huge.mig"
        path.write_bytes(data)
        with pytest.raises(VMSDError):
            Incoming(specs=SPECS, max_ram=1 << 30).run(f"file:{path}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MIB


def test_page_record_in_a_mapped_stream_is_refused(saved: tuple[bytes, int, MappedRamHeader]) -> None:
    data = saved[0]
    stream = read_stream(data, SPECS)
    part = stream.sections()[1]
    assert part.idstr == "ram" and part.kind == 2
    at = part.offset + 5  # the PART's EOS
    assert data[at:at + 8] == struct.pack(">Q", 0x10)
    bad = data[:at] + struct.pack(">Q", 0x2) + b"\x06pc.ram\x00" + data[at:]
    with pytest.raises(MalformedStream, match="mapped-ram") as exc:
        read_stream(bad, SPECS)
    assert exc.value.offset == at


def test_truncated_file_is_one_error(saved: tuple[bytes, int, MappedRamHeader], tmp_path: Path) -> None:
    data, at, header = saved
    for cut in (at + 10, header.bitmap_offset + 3, header.pages_offset + 100):
        with pytest.raises(VMSDError):
            read_stream(data[:cut], SPECS)
        path = tmp_path / "cut.mig"
        path.write_bytes(data[:cut])
        with make_machine(8 * MIB) as dst, pytest.raises(VMSDError):
            Incoming(dst).run(f"file:{path}")
