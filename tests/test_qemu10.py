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

from vmsd.cli import main
from vmsd.migration.precopy import parse_settings
from vmsd.migration.profile import peer_profile
from vmsd.migration.stream import read_stream, write_stream
from vmsd.qemu.versions import choose, spec_set
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


# ---- streams saved by QEMU 10.0: its spec set decodes and rewrites them ----------------------------

# The unpacked QEMU 10.0 probes audio backends when the machine has its default devices (the PC
# speaker's) and would load the system QEMU's modules, which it refuses: no audio backend at all.
DEFAULTS_ARGS = ["-audio", "none"]

STREAM_CONFIGS: dict[str, tuple[str, bool]] = {  # name: (machine, default devices)
    "pc": ("pc", False),
    "q35": ("q35", False),
    "pc-defaults": ("pc", True),
    "q35-defaults": ("q35", True),
}


def _save10(peer: Peer, path: Path, machine: str, defaults: bool) -> None:
    cmd, env = peer
    args = DEFAULTS_ARGS if defaults else []
    with Qemu(args, machine=machine, memory=MEM, binary=cmd[0], extra_args=cmd[1:], env=env, defaults=defaults) as q:
        q.migrate_to_file(path, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def streams10(qemu10: Peer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("streams10")
    out = {}
    for name, (machine, defaults) in STREAM_CONFIGS.items():
        out[name] = d / f"{name}.mig"
        _save10(qemu10, out[name], machine, defaults)
    return out


@pytest.mark.parametrize("name", list(STREAM_CONFIGS))
def test_qemu10_stream_decodes_by_spec_and_rewrites_byte_exact(streams10: dict[str, Path], name: str,
                                                                 tmp_path: Path) -> None:
    data = streams10[name].read_bytes()
    chosen = choose(data)
    assert chosen.version == "10.0", chosen
    stream = read_stream(data, spec_set("10.0"))
    full = stream.full_sections()
    by_spec = [s for s in full if s.generic_body is None]
    assert len(by_spec) == len(full), [s.idstr for s in full if s.generic_body is not None]
    idstrs = {s.idstr.rsplit("/", 1)[-1] for s in full}
    assert {"globalstate", "hpet", "cpu", "i8259"} <= idstrs
    if STREAM_CONFIGS[name][1]:  # the default devices are there, and decoded by spec too
        assert {"parallel_isa", "vga", "fdc" if name.startswith("pc") else "e1000e"} <= idstrs
    # What the 7.2 specs would have got wrong is regenerated by 10.0's: the trailer is QEMU's.
    assert write_stream(stream) == data
    out = tmp_path / "out.mig"
    assert main(["rewrite", str(streams10[name]), "-o", str(out)]) == 0
    assert out.read_bytes() == data


def test_qemu10_only_field_edit_loads_in_qemu10(qemu10: Peer, streams10: dict[str, Path], tmp_path: Path) -> None:
    cmd, env = qemu10
    src = streams10["pc"]
    assert _globalstate(src.read_bytes()).vm_was_suspended == 0
    edited = tmp_path / "edited.mig"
    assert main(["rewrite", str(src), "-o", str(edited), "--set", "globalstate.vm_was_suspended=1"]) == 0
    # Only that byte changed; 7.2's spec set has no such field.
    old, new = src.read_bytes(), edited.read_bytes()
    assert len(old) == len(new) and sum(a != b for a, b in zip(old, new, strict=True)) == 1
    assert main(["rewrite", str(src), "-o", str(tmp_path / "x.mig"), "--qemu", "7.2",
                 "--set", "globalstate.vm_was_suspended=1"]) == 1
    back = tmp_path / "back.mig"
    with Qemu([], machine="pc", memory=MEM, incoming="defer", binary=cmd[0], extra_args=cmd[1:], env=env) as q:
        q.qmp.cmd("migrate-incoming", uri=f"exec:cat {edited}")
        _wait_status(q, "completed", time.monotonic() + TIMEOUT)
        # QEMU restored the flag (post_load: vm_set_suspended) and saves it again.
        q.migrate_to_file(back, timeout=TIMEOUT)
    assert _globalstate(back.read_bytes()).vm_was_suspended == 1


def _globalstate(data: bytes) -> Any:
    stream = read_stream(data, spec_set("10.0"))
    return next(s.payload for s in stream.full_sections() if s.idstr == "globalstate")
