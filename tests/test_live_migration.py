"""QEMU 7.2 migrates live into `vmsd incoming`; the snapshot loads into another QEMU with identical RAM.

Guest RAM lives in memory-backend-file objects under /dev/shm so both sides'
RAM can be compared byte for byte.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmsd.cli import main
from vmsd.testing.qmp import Qemu, load_stream

MEM = "32M"


@pytest.fixture
def shm() -> Iterator[Path]:
    d = Path("/dev/shm") / f"vmsd-test-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def _ram_args(path: Path) -> list[str]:
    return ["-object", f"memory-backend-file,id=m,size={MEM},mem-path={path},share=on", "-machine", "memory-backend=m"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("xbzrle", [False, True], ids=["plain", "xbzrle"])
def test_qemu_to_vmsd_incoming_to_qemu(shm: Path, tmp_path: Path, xbzrle: bool) -> None:
    snapshot = tmp_path / "snap.mig"
    port = _free_port()
    result: list[int] = []
    receiver = threading.Thread(
        target=lambda: result.append(main(["incoming", f"tcp:127.0.0.1:{port}", "-o", str(snapshot), "--timeout", "30"]))
    )
    receiver.start()
    source_ram = shm / "source"
    with Qemu(_ram_args(source_ram)) as src:
        if xbzrle:
            src.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "xbzrle", "state": True}])
        src.qmp.cmd("cont")  # the BIOS runs and dirties pages while the migration iterates
        time.sleep(0.3)
        deadline = time.monotonic() + 10
        while True:
            try:
                src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        src.wait_migration(60)
        receiver.join(60)
        assert result == [0]
        source_bytes = source_ram.read_bytes()  # the source is paused after completion: stable
    dest_ram = shm / "dest"
    dest = load_stream(snapshot, args=_ram_args(dest_ram))
    try:
        assert dest_ram.read_bytes() == source_bytes
    finally:
        dest.stop()


def test_vmsd_outgoing_to_qemu(shm: Path, tmp_path: Path) -> None:
    saved = tmp_path / "saved.mig"
    source_ram = shm / "source"
    with Qemu(_ram_args(source_ram)) as src:
        src.qmp.cmd("cont")
        time.sleep(0.3)
        src.qmp.cmd("stop")
        src.migrate_to_file(saved)
        source_bytes = source_ram.read_bytes()
    dest_ram = shm / "dest"
    port = _free_port()
    with Qemu(_ram_args(dest_ram), incoming="defer") as dest:
        dest.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        assert main(["outgoing", str(saved), f"tcp:127.0.0.1:{port}"]) == 0
        deadline = time.monotonic() + 30
        while dest.qmp.cmd("query-migrate").get("status") != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert dest_ram.read_bytes() == source_bytes


def test_incoming_peer_that_never_connects_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "snap.mig"
    assert main(["incoming", f"tcp:127.0.0.1:{_free_port()}", "-o", str(out), "--timeout", "0.5"]) == 1
    assert "vmsd incoming: error:" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())
