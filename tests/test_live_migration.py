"""QEMU 7.2 migrates live into `vmsd incoming`; the snapshot loads into another QEMU with identical RAM.

Guest RAM lives in memory-backend-file objects under /dev/shm so both sides'
RAM can be compared byte for byte.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from listening import free_port, wait_listening
from vmsd.cli import main
from vmsd.migration.ram.records import RamPayload
from vmsd.migration.stream import read_stream
from vmsd.qemu.v7_2 import spec_set
from vmsd.testing.qmp import Qemu, load_stream

MEM = "32M"


def ram_args(path: Path) -> list[str]:
    return ["-object", f"memory-backend-file,id=m,size={MEM},mem-path={path},share=on", "-machine", "memory-backend=m"]


def vmsd_incoming(port: int, snapshot: Path, *extra: str) -> tuple[threading.Thread, list[int]]:
    """`vmsd incoming` (with ``extra`` options) on ``port`` writing ``snapshot``, in a thread; its exit status
    lands in the list."""
    result: list[int] = []
    receiver = threading.Thread(target=lambda: result.append(
        main(["incoming", f"tcp:127.0.0.1:{port}", "-o", str(snapshot), "--timeout", "30", *extra])))
    receiver.start()
    return receiver, result


@pytest.mark.parametrize("xbzrle", [False, True], ids=["plain", "xbzrle"])
def test_qemu_to_vmsd_incoming_to_qemu(shm: Path, tmp_path: Path, xbzrle: bool) -> None:
    snapshot = tmp_path / "snap.mig"
    port = free_port()
    receiver, result = vmsd_incoming(port, snapshot)
    source_ram = shm / "source"
    with Qemu(ram_args(source_ram)) as src:
        if xbzrle:
            src.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "xbzrle", "state": True}])
        src.qmp.cmd("cont")  # the BIOS runs and dirties pages while the migration iterates
        time.sleep(0.3)
        wait_listening(port, alive=receiver.is_alive)
        src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        src.wait_migration(60)
        receiver.join(60)
        assert result == [0]
        source_bytes = source_ram.read_bytes()  # the source is paused after completion: stable
    dest_ram = shm / "dest"
    dest = load_stream(snapshot, args=ram_args(dest_ram))
    try:
        assert dest_ram.read_bytes() == source_bytes
    finally:
        dest.stop()


def test_vmsd_outgoing_to_qemu(shm: Path, tmp_path: Path) -> None:
    saved = tmp_path / "saved.mig"
    source_ram = shm / "source"
    with Qemu(ram_args(source_ram)) as src:
        src.qmp.cmd("cont")
        time.sleep(0.3)
        src.qmp.cmd("stop")
        src.migrate_to_file(saved)
        source_bytes = source_ram.read_bytes()
    dest_ram = shm / "dest"
    port = free_port()
    with Qemu(ram_args(dest_ram), incoming="defer") as dest:
        dest.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        assert main(["outgoing", str(saved), f"tcp:127.0.0.1:{port}"]) == 0
        deadline = time.monotonic() + 30
        while dest.qmp.cmd("query-migrate").get("status") != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert dest_ram.read_bytes() == source_bytes


def test_incoming_peer_that_never_connects_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "snap.mig"
    assert main(["incoming", f"tcp:127.0.0.1:{free_port()}", "-o", str(out), "--timeout", "0.5"]) == 1
    assert "vmsd incoming: error:" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_qemu_ignore_shared_throughvmsd_incoming(shm: Path, tmp_path: Path) -> None:
    """x-ignore-shared end to end: QEMU 7.2 leaves its shared RAM file in place and sends the rest; the
    snapshot `vmsd incoming` writes carries no page of the shared block, says x-ignore-shared in its
    configuration and block list, and a QEMU 7.2 destination on the same file loads it and runs."""
    snapshot = tmp_path / "snap.mig"
    port = free_port()
    receiver, result = vmsd_incoming(port, snapshot)
    ram = shm / "ram"
    ignore_shared = [{"capability": "x-ignore-shared", "state": True}]
    with Qemu(ram_args(ram)) as src:
        src.qmp.cmd("migrate-set-capabilities", capabilities=ignore_shared)
        src.qmp.cmd("cont")
        time.sleep(0.3)
        src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        src.wait_migration(60)
        receiver.join(60)
        assert result == [0]
        source_bytes = ram.read_bytes()

    stream = read_stream(snapshot.read_bytes(), spec_set())
    assert stream.configuration is not None
    assert b"x-ignore-shared" in stream.configuration.state.capabilities
    payloads = [s.payload for s in stream.sections() if isinstance(s.payload, RamPayload)]
    blocks = {b.name: b for p in payloads for b in p.block_list()}
    assert all(b.addr is not None for b in blocks.values())
    paged: set[str] = set()
    for p in payloads:
        paged |= set(p.pages_by_block())
    shared = {name for name, b in blocks.items() if b.used_length == 32 << 20}  # the memory backend
    assert len(shared) == 1 and not shared & paged, (shared, paged)
    assert paged == set(blocks) - shared  # every other block (ROMs, vram, ...) is in the snapshot

    dest = load_stream(snapshot, args=ram_args(ram), capabilities={"x-ignore-shared": True})
    try:
        assert ram.read_bytes() == source_bytes  # the load wrote nothing over the shared RAM
        dest.qmp.cmd("cont")
        assert dest.qmp.cmd("query-status")["status"] == "running"
    finally:
        dest.stop()
