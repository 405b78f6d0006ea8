"""Nothing lost: a QEMU 7.2 source with return-path hears success only once `vmsd incoming`'s snapshot is in place.

A snapshot that cannot be written (its folder gone, the disk full, vmsd interrupted while writing) fails
the migration on the source too: QEMU reports ``failed`` and the VM runs on, instead of a ``completed``
migration whose state went nowhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli_process import HELD, one_line_error, vmsd
from listening import free_port, wait_listening
from vmsd.testing.qmp import QEMU_BINARY, Qemu

pytestmark = pytest.mark.skipif(shutil.which(QEMU_BINARY) is None, reason=f"{QEMU_BINARY} not installed")


@pytest.fixture
def source() -> Iterator[Qemu]:
    """A running QEMU 7.2 (32 MiB, the BIOS at work) with the return path on."""
    with Qemu([]) as q:
        q.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
        q.qmp.cmd("cont")
        yield q


def _receiver(port: int, output: Path, hold_commit: bool = False) -> subprocess.Popen[str]:
    proc = vmsd("incoming", f"tcp:127.0.0.1:{port}", "-o", str(output), "--timeout", "60", hold_commit=hold_commit)
    wait_listening(port, alive=lambda: proc.poll() is None)
    return proc


def _finished(src: Qemu, timeout: float = 90) -> dict[str, Any]:
    """query-migrate once the migration has ended, whichever way."""
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = src.qmp.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.02)


def _end(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def _still_runs(src: Qemu) -> None:
    """The source kept the VM: running, and `cont` is accepted."""
    assert src.qmp.cmd("query-status")["status"] == "running"
    src.qmp.cmd("cont")
    assert src.qmp.cmd("query-status")["status"] == "running"


def test_success_is_confirmed_with_the_snapshot_in_place(source: Qemu, tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "snap.mig"
    proc = _receiver(port, out)
    source.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert _finished(source)["status"] == "completed"
    rc, err = _end(proc)
    assert rc == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # guest RAM
    assert os.listdir(tmp_path) == ["snap.mig"]


def test_output_folder_removed_fails_the_source_which_runs_on(source: Qemu, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    port = free_port()
    proc = _receiver(port, folder / "snap.mig")
    shutil.rmtree(folder)  # after vmsd checked it, before the state arrives
    source.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert _finished(source)["status"] == "failed"
    rc, err = _end(proc)
    assert rc == 1 and one_line_error(err, "incoming"), err
    assert "No such file or directory" in err
    _still_runs(source)


def test_full_disk_fails_the_source_which_runs_on(source: Qemu, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    # A 64 KiB filesystem: the snapshot of a booting 32 MiB guest does not fit.
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(small)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        port = free_port()
        proc = _receiver(port, small / "snap.mig")
        source.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        assert _finished(source)["status"] == "failed"
        rc, err = _end(proc)
        assert rc == 1 and one_line_error(err, "incoming"), err
        assert "No space left on device" in err
        assert os.listdir(small) == []
        _still_runs(source)
    finally:
        subprocess.run(["umount", str(small)], check=True)


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_the_snapshot_write(source: Qemu, tmp_path: Path, sig: signal.Signals, status: int) -> None:
    port = free_port()
    proc = _receiver(port, tmp_path / "snap.mig", hold_commit=True)
    source.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert proc.stderr is not None
    line = proc.stderr.readline()  # the snapshot's bytes are written; its commit waits for our signal
    assert line.strip() == HELD, line
    [temp] = tmp_path.iterdir()
    assert temp.stat().st_size > 0 and temp.name != "snap.mig"
    assert source.qmp.cmd("query-migrate")["status"] != "completed"  # not confirmed yet
    proc.send_signal(sig)
    rc, err = _end(proc)
    assert rc == status, err
    assert one_line_error(err, "incoming"), err
    assert os.listdir(tmp_path) == []
    assert _finished(source)["status"] == "failed"
    _still_runs(source)


def test_sigterm_mid_transfer(source: Qemu, tmp_path: Path) -> None:
    source.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 100_000})  # about 100 KB/s: it stays mid-way
    port = free_port()
    proc = _receiver(port, tmp_path / "snap.mig")
    source.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    deadline = time.monotonic() + 60
    while not (info := source.qmp.cmd("query-migrate")).get("ram", {}).get("transferred"):
        assert info.get("status") in ("setup", "active") and time.monotonic() < deadline, info
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    rc, err = _end(proc)
    assert rc == 143 and one_line_error(err, "incoming"), err
    assert os.listdir(tmp_path) == []
    assert _finished(source)["status"] == "failed"
    _still_runs(source)
