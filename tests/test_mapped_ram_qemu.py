"""mapped-ram with QEMU 10.0 and 11.1, both ways: QEMU saves (``migrate file:`` with capability mapped-ram,
with or without multifd) and vmsd reads, rewrites, compares and loads the file; ``vmsd outgoing SNAPSHOT
file:OUT --capability mapped-ram=on`` writes one that QEMU restores with the same RAM.  Guest RAM is a
memory-backend-file under /dev/shm, so RAM is compared byte for byte."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from private_peers import Peer
from test_private_qemu import TIMEOUT, _ram_args, _wait_status
from vmsd.cli import main
from vmsd.migration.incoming import Incoming
from vmsd.migration.ram.mapped import FILE_OFFSET_ALIGNMENT, HEADER_SIZE, PAGE_SIZE
from vmsd.migration.ram.records import RamPayload
from vmsd.migration.stream import read_stream, write_stream
from vmsd.qemu.v7_2 import spec_set
from vmsd.testing.qmp import Qemu

CHANNELS = 2


@pytest.fixture
def shm() -> Iterator[Path]:
    d = Path("/dev/shm") / f"vmsd-mapped-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    try:
        yield d
    finally:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


def _capabilities(q: Qemu, multifd: bool) -> None:
    caps = [{"capability": "mapped-ram", "state": True}]
    if multifd:
        caps.append({"capability": "multifd", "state": True})
        q.qmp.cmd("migrate-set-parameters", **{"multifd-channels": CHANNELS})
    q.qmp.cmd("migrate-set-capabilities", capabilities=caps)


def _save_mapped(peer: Peer, ram: Path, out: Path, multifd: bool) -> bytes:
    """QEMU saves its guest, which runs while the migration goes on (pages are written more than once, some
    become zero after they were written), to ``out`` with mapped-ram; returns the guest RAM it ended with."""
    with peer.start(_ram_args(ram)) as q:
        _capabilities(q, multifd)
        q.qmp.cmd("cont")
        time.sleep(0.3)
        q.qmp.cmd("migrate", uri=f"file:{out}")
        _wait_status(q, "completed", time.monotonic() + TIMEOUT)
        return ram.read_bytes()


def _restore(peer: Peer, ram: Path, path: Path, multifd: bool) -> bytes:
    """QEMU restores ``path`` (-incoming defer, the capabilities, migrate-incoming); its guest RAM."""
    with peer.start(_ram_args(ram), incoming="defer") as q:
        _capabilities(q, multifd)
        q.qmp.cmd("migrate-incoming", uri=f"file:{path}")
        _wait_status(q, "completed", time.monotonic() + TIMEOUT)
        return ram.read_bytes()


def _nonzero_pages(ram: bytes) -> int:
    return int(np.frombuffer(ram, dtype=np.uint64).reshape(-1, PAGE_SIZE // 8).any(axis=1).sum())


@pytest.mark.parametrize("multifd", [False, True], ids=["main", "multifd"])
def test_qemu_saves_vmsd_reads(private_peer: Peer, shm: Path, tmp_path: Path, multifd: bool,
                               capsys: pytest.CaptureFixture[str]) -> None:
    saved = tmp_path / "saved.mig"
    ram = _save_mapped(private_peer, shm / "ram", saved, multifd)
    data = saved.read_bytes()

    # inspect: every block with its header, and for the guest RAM exactly its non-zero pages in the file.
    capsys.readouterr()
    assert main(["inspect", "--json", str(saved)]) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    mapped = next(r["ram"]["mapped_ram"] for r in records if "mapped_ram" in r.get("ram", {}))
    assert set(mapped) >= {"m", "pc.bios", "pc.rom"}
    for entry in mapped.values():
        assert entry["version"] == 1 and entry["page_size"] == PAGE_SIZE
        assert entry["pages_offset"] % FILE_OFFSET_ALIGNMENT == 0
        assert entry["pages_offset"] >= entry["bitmap_offset"] + entry["pages"] // 8
    assert mapped["m"]["pages"] == len(ram) // PAGE_SIZE
    assert mapped["m"]["in_file"] == _nonzero_pages(ram)
    # Only EOS after the block list: the pages are in the file, not in records.
    ram_records = [r["ram"]["records"] for r in records if r.get("idstr") == "ram"]
    assert ram_records[0] == 2 and all(n == 1 for n in ram_records[1:])

    # rewrite: the file comes back byte for byte.  (The trailer vmsd regenerates from the 7.2 specs differs
    # from 10.0's and 11.1's, as for their streams without mapped-ram, issue 18: everything before it is
    # identical, and with the stream's own trailer so is the whole file.)
    stream = read_stream(data, spec_set())
    assert write_stream(stream, trailer=stream.trailer) == data
    out = tmp_path / "rewritten.mig"
    assert main(["rewrite", str(saved), "-o", str(out)]) == 0
    assert stream.eof_offset is not None
    assert out.read_bytes()[:stream.eof_offset + 1] == data[:stream.eof_offset + 1]

    # load: the pages go where the headers say; the guest RAM is QEMU's.
    result = Incoming(specs=spec_set()).run(f"file:{saved}")
    try:
        assert bytes(result.blocks["m"].view) == ram
    finally:
        result.blocks.close()

    # diff: a changed page of the guest RAM is seen.
    block = next(b.mapped for s in stream.sections() if isinstance(s.payload, RamPayload)
                 for b in s.payload.block_list() if b.name == "m")
    assert block is not None and block.region_at == block.header.bitmap_offset
    page = int(np.flatnonzero(block.present())[-1])
    changed = bytearray(data)
    changed[block.header.pages_offset + page * PAGE_SIZE] ^= 0x5A
    (tmp_path / "changed.mig").write_bytes(changed)
    capsys.readouterr()
    assert main(["diff", str(saved), str(tmp_path / "changed.mig")]) == 1
    assert f"m@{page * PAGE_SIZE:#x}" in capsys.readouterr().out


@pytest.mark.parametrize("multifd", [False, True], ids=["main", "multifd"])
def test_vmsd_outgoing_mapped_ram_restores_in_qemu(private_peer: Peer, shm: Path, tmp_path: Path,
                                                   multifd: bool) -> None:
    """QEMU's mapped-ram file as the snapshot, ``vmsd outgoing`` to a new mapped-ram file, QEMU restores it:
    the RAM QEMU saved, byte for byte; zero pages are holes in vmsd's file."""
    saved, out = tmp_path / "saved.mig", tmp_path / "out.mig"
    ram = _save_mapped(private_peer, shm / "source", saved, multifd=False)
    options = ["--capability", "multifd=on", "--parameter", f"multifd-channels={CHANNELS}"] if multifd else []
    assert main(["outgoing", str(saved), f"file:{out}", "--capability", "mapped-ram=on",
                 "--peer-version", private_peer.version, "--json", *options]) == 0
    stream = read_stream(out.read_bytes(), spec_set())
    assert stream.configuration is not None
    blocks = {b.name: b.mapped for s in stream.sections() if isinstance(s.payload, RamPayload)
              for b in s.payload.block_list()}
    m = blocks["m"]
    assert m is not None and m.memory() == ram
    assert m.region_at == m.header.bitmap_offset == _entry_end(out.read_bytes(), stream.sections()[0].offset, "m")
    assert int(m.present().sum()) == _nonzero_pages(ram)
    assert out.stat().st_blocks * 512 < out.stat().st_size  # zero pages were never written
    assert _restore(private_peer, shm / "dest", out, multifd) == ram


def _entry_end(data: bytes, start: int, name: str) -> int:
    """Where the header of block ``name`` ends: after its list entry (u8 length, name, be64 size), which
    follows the RAM section at ``start``, and 28 bytes."""
    entry = bytes([len(name)]) + name.encode()
    return data.index(entry, start) + len(entry) + 8 + HEADER_SIZE
