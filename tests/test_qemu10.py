"""QEMU 10.0 (Debian bookworm-backports, unpacked privately by vmsd/testing/fetch-qemu10.sh) as a peer.

The fixture downloads QEMU 10.0 when it is missing (package registry only) and
fails loudly when that does not work: these tests are never skipped.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmsd.migration.precopy import parse_settings
from vmsd.migration.profile import peer_profile
from vmsd.testing.qemu10 import ensure_qemu10, qemu10_command
from vmsd.testing.qmp import Qemu, QMPError

MEM = "32M"
MEM_BYTES = 32 << 20
TIMEOUT = 15.0

Peer = tuple[list[str], dict[str, str]]


@pytest.fixture(scope="module")
def qemu10() -> Iterator[Peer]:
    yield qemu10_command(ensure_qemu10())


@pytest.fixture
def shm() -> Iterator[Path]:
    d = Path("/dev/shm") / f"vmsd-q10-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    try:
        yield d
    finally:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


def _start(peer: Peer, args: list[str], incoming: str | None = None) -> Qemu:
    cmd, env = peer
    return Qemu(args, machine="pc", memory=MEM, incoming=incoming, binary=cmd[0], extra_args=cmd[1:], env=env)


def _ram_args(path: Path) -> list[str]:
    return ["-object", f"memory-backend-file,id=m,size={MEM},mem-path={path},share=on", "-machine", "memory-backend=m"]


def _wait_status(q: Qemu, want: str, deadline: float) -> dict[str, Any]:
    while True:
        if q.proc.poll() is not None:
            raise QMPError(f"QEMU exited with status {q.proc.returncode}: {q.output()}")
        info: dict[str, Any] = q.qmp.cmd("query-migrate")
        status = info.get("status")
        if status == want:
            return info
        if status in ("failed", "cancelled"):
            raise QMPError(f"migration {status}: {info.get('error-desc', '')} {q.output()}")
        if time.monotonic() > deadline:
            raise QMPError(f"no {want!r} migration status in time (last: {info}) {q.output()}")
        time.sleep(0.02)


def test_version(qemu10: Peer) -> None:
    with _start(qemu10, []) as q:
        version = q.qmp.cmd("query-version")["qemu"]
        assert (version["major"], version["minor"]) == (10, 0)
        machines = {m["name"] for m in q.qmp.cmd("query-machines")}
        assert {"pc-i440fx-10.0", "pc-i440fx-7.2"} <= machines
        assert q.qmp.cmd("query-status")["status"] == "prelaunch"
        # The 10.0 profile's defaults are what this QEMU reports.
        defaults = parse_settings(None, None, peer_profile("10.0"))[1]
        assert q.qmp.cmd("query-migrate-parameters")["max-bandwidth"] == defaults["max-bandwidth"]


@pytest.mark.parametrize("multifd", [False, True], ids=["precopy", "multifd"])
def test_live_migration_10_to_10(qemu10: Peer, shm: Path, multifd: bool) -> None:
    deadline = time.monotonic() + TIMEOUT
    src_ram, dst_ram = shm / "source", shm / "dest"
    pattern = os.urandom(MEM_BYTES)
    src_ram.write_bytes(pattern)  # memory-backend-file maps the existing file: the guest RAM starts random
    caps = [{"capability": "multifd", "state": True}] if multifd else []
    with _start(qemu10, _ram_args(src_ram)) as src, _start(qemu10, _ram_args(dst_ram), incoming="defer") as dst:
        if multifd:
            dst.qmp.cmd("migrate-set-capabilities", capabilities=caps)
            dst.qmp.cmd("migrate-set-parameters", **{"multifd-channels": 2})
        dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        listening = dst.qmp.cmd("query-migrate")["socket-address"]
        port = int(next(a["port"] for a in listening if a.get("type") == "inet"))

        if multifd:
            src.qmp.cmd("migrate-set-capabilities", capabilities=caps)
        src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 30, **({"multifd-channels": 2} if multifd else {})})
        params = src.qmp.cmd("query-migrate-parameters")
        assert params["max-bandwidth"] == 4 << 30
        src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")

        info = _wait_status(src, "completed", deadline)
        _wait_status(dst, "completed", deadline)
        assert info["ram"]["total"] >= MEM_BYTES
        if multifd:
            assert dst.qmp.cmd("query-migrate-parameters")["multifd-channels"] == 2
            assert info["ram"]["multifd-bytes"] >= MEM_BYTES // 2  # the pages went over the multifd channels
        else:
            assert info["ram"].get("multifd-bytes", 0) == 0
        # Neither side runs now (-S; the destination does not autostart): the RAM files are stable.
        assert src.qmp.cmd("query-status")["running"] is False
        assert dst.qmp.cmd("query-status")["running"] is False
        source = src_ram.read_bytes()
        dest = dst_ram.read_bytes()
    assert len(dest) == MEM_BYTES
    assert dest == source
    # Nothing ran in the guest: the high half of RAM is still the random pattern, so it really was copied.
    half = MEM_BYTES // 2
    assert source[half:] == pattern[half:]
