"""QEMU 10.0 (Debian bookworm-backports) and 11.1 (Debian sid) as peers of each other and of vmsd.

They live in private folders (vmsd.testing.qemu10, vmsd.testing.qemu11); the
``private_peer`` fixture fetches one when it is missing (package registry
only) and fails loudly when that does not work: these tests are never skipped.
Guest RAM is a memory-backend-file under /dev/shm, so both sides' RAM can be
compared byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from listening import wait_listening
from private_peers import PRIVATE_QEMUS, Peer
from test_migration import free_port
from vmsd.cli import main
from vmsd.migration.precopy import parse_settings
from vmsd.migration.profile import peer_profile
from vmsd.migration.ram.records import RamPayload
from vmsd.migration.stream import read_stream
from vmsd.qemu.v7_2 import spec_set
from vmsd.testing.qmp import QMP, Qemu, QMPError

MEM = "32M"
MEM_BYTES = 32 << 20
PAGE = 4096
TIMEOUT = 15.0


@pytest.fixture
def shm() -> Iterator[Path]:
    d = Path("/dev/shm") / f"vmsd-peer-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    try:
        yield d
    finally:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


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


def _run_bios(q: Qemu) -> None:
    """Let SeaBIOS run briefly, so that RAM and devices hold state of a guest that ran, then pause again."""
    q.qmp.cmd("cont")
    time.sleep(0.3)
    q.qmp.cmd("stop")


def _save(peer: Peer, ram: Path, out: Path, machine: str | None = None) -> bytes:
    """``out``: the stream ``peer`` saves with ``migrate file:`` after running the BIOS; returns its RAM."""
    with peer.start(_ram_args(ram), machine=machine) as q:
        _run_bios(q)
        q.qmp.cmd("migrate", uri=f"file:{out}")
        _wait_status(q, "completed", time.monotonic() + TIMEOUT)
        return ram.read_bytes()


@contextlib.contextmanager
def _vmsd_incoming(peer: Peer, snapshot: Path, *options: str) -> Iterator[str]:
    """`vmsd incoming` writing ``snapshot``, in a thread for the block; yields the URI it listens on and
    asserts afterwards that it succeeded."""
    port = free_port()
    result: list[int] = []
    receiver = threading.Thread(target=lambda: result.append(main(
        ["incoming", f"tcp:127.0.0.1:{port}", "-o", str(snapshot), "--timeout", "30",
         "--peer-version", peer.version, *options])))
    receiver.start()
    try:
        wait_listening(port, TIMEOUT, alive=receiver.is_alive)
        yield f"tcp:127.0.0.1:{port}"
    finally:
        receiver.join(60)
    assert result == [0]


def _migrate_running(src: Qemu, uri: str) -> None:
    """Let the guest run (SeaBIOS dirties pages while the migration iterates) and migrate it to ``uri``;
    the source is paused once it completed."""
    src.qmp.cmd("cont")
    time.sleep(0.3)
    src.qmp.cmd("migrate", uri=uri)
    _wait_status(src, "completed", time.monotonic() + TIMEOUT)


def test_version(private_peer: Peer) -> None:
    with private_peer.start([]) as q:
        version = q.qmp.cmd("query-version")["qemu"]
        assert f"{version['major']}.{version['minor']}" == private_peer.version
        machines = {m["name"] for m in q.qmp.cmd("query-machines")}
        assert {f"pc-i440fx-{private_peer.version}", "pc-i440fx-7.2"} <= machines
        assert q.qmp.cmd("query-status")["status"] == "prelaunch"
        # The profile's defaults are what this QEMU reports.
        defaults = parse_settings(None, None, peer_profile(private_peer.version))[1]
        assert q.qmp.cmd("query-migrate-parameters")["max-bandwidth"] == defaults["max-bandwidth"]


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_runs_apart_from_the_system_qemu(private_peer: Peer, machine: str) -> None:
    """With its default devices (audio and display modules are looked for then) the QEMU uses no module of
    the system's QEMU 7.2, which would abort it; 11.1 maps no shared object from outside its folder at all."""
    private = PRIVATE_QEMUS[private_peer.version]
    folder = private.present()
    assert folder is not None
    with private_peer.start([], machine=machine, nodefaults=False) as q:
        assert q.qmp.cmd("query-status")["status"] == "prelaunch"
        classes = {d["class_info"]["class"] for d in q.qmp.cmd("query-pci")[0]["devices"]}
        assert {0x0200, 0x0300} <= classes  # the default NIC and VGA are there
        maps = Path(f"/proc/{q.proc.pid}/maps").read_text().splitlines()
    objects = {Path(line.split(maxsplit=5)[5]) for line in maps if ".so" in line.split("/")[-1]}
    assert objects
    assert not [o for o in objects if o.parent == Path("/usr/lib/x86_64-linux-gnu/qemu")]
    if private_peer.version == "11.1":
        assert all(o.is_relative_to(folder) for o in objects), objects


@pytest.mark.parametrize("multifd", [False, True], ids=["precopy", "multifd"])
def test_live_migration_between_two_of_them(private_peer: Peer, shm: Path, multifd: bool) -> None:
    deadline = time.monotonic() + TIMEOUT
    src_ram, dst_ram = shm / "source", shm / "dest"
    pattern = os.urandom(MEM_BYTES)
    src_ram.write_bytes(pattern)  # memory-backend-file maps the existing file: the guest RAM starts random
    caps = [{"capability": "multifd", "state": True}] if multifd else []
    with private_peer.start(_ram_args(src_ram)) as src, \
            private_peer.start(_ram_args(dst_ram), incoming="defer") as dst:
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


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_vmsd_inspects_a_saved_stream(private_peer: Peer, shm: Path, tmp_path: Path, machine: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Every section of the stream is decoded, by a spec or (a layout the 7.2 specs do not match) by the trailer."""
    saved = tmp_path / "saved.mig"
    _save(private_peer, shm / "ram", saved, machine)
    capsys.readouterr()
    assert main(["inspect", "--json", str(saved)]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    stream = json.loads(out)
    raw = saved.read_bytes()
    at = stream["trailer"]["offset"] + 5  # the VMDESCRIPTION command byte and the be32 size come first
    trailer = json.loads(raw[at:at + stream["trailer"]["size"]])
    # --json gives the machine name as text.
    assert stream["configuration"]["name"] == f"pc-{'i440fx' if machine == 'pc' else 'q35'}-{private_peer.version}"
    devices = [r for r in stream["records"] if r["type"] == "FULL"]
    described = {(d["name"], d["instance_id"]) for d in trailer["devices"]}
    assert {(r["idstr"], r["instance_id"]) for r in devices} == described
    assert all(r["decoded_by"] in ("spec", "trailer") for r in devices)
    # Every page of every RAM block is in the stream once (the guest was paused), as a zero or a normal page.
    ram = [r["ram"] for r in stream["records"] if r.get("idstr") == "ram"]
    blocks = next(r["blocks"] for r in ram if "blocks" in r)
    assert blocks["m"] == MEM_BYTES
    pages = [n for r in ram for per_block in r.get("pages", {}).values() for n in per_block.values()]
    assert sum(pages) == sum(blocks.values()) // PAGE


@pytest.mark.parametrize("return_path", [False, True], ids=["plain", "return-path"])
def test_live_migration_to_vmsd_incoming_and_back(private_peer: Peer, shm: Path, tmp_path: Path,
                                                  return_path: bool) -> None:
    """QEMU (its guest running) -> ``vmsd incoming`` -> snapshot -> the same QEMU version loads it: same RAM."""
    _to_vmsd_and_back(private_peer, private_peer.machine, shm, tmp_path, return_path)


def test_qemu11_q35_to_vmsd_incoming(shm: Path, tmp_path: Path) -> None:
    """q35 with ACPI: ich9_pm's CPU hot-plug state (always sent by 11.1) is sized while it arrives."""
    _to_vmsd_and_back(Peer.fetched("11.1"), "q35", shm, tmp_path)


def _to_vmsd_and_back(peer: Peer, machine: str, shm: Path, tmp_path: Path, return_path: bool = False) -> None:
    snapshot = tmp_path / "snap.mig"
    with _vmsd_incoming(peer, snapshot, *(["--capability", "return-path=on"] if return_path else [])) as uri, \
            peer.start(_ram_args(shm / "source"), machine=machine) as src:
        if return_path:
            src.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
        _migrate_running(src, uri)
        source = (shm / "source").read_bytes()
    with peer.start(_ram_args(shm / "dest"), incoming="defer", machine=machine) as dst:
        dst.qmp.cmd("migrate-incoming", uri=f"file:{snapshot}")
        _wait_status(dst, "completed", time.monotonic() + TIMEOUT)
        assert (shm / "dest").read_bytes() == source


@pytest.mark.parametrize("return_path", [False, True], ids=["plain", "return-path"])
def test_vmsd_outgoing_to_it(private_peer: Peer, shm: Path, tmp_path: Path, return_path: bool) -> None:
    """A stream the QEMU saved goes live from ``vmsd outgoing`` into the same QEMU version: same RAM."""
    saved = tmp_path / "saved.mig"
    source = _save(private_peer, shm / "source", saved)
    port = free_port()
    with private_peer.start(_ram_args(shm / "dest"), incoming="defer") as dst:
        caps: list[str] = []
        if return_path:
            dst.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
            caps = ["--capability", "return-path=on"]
        dst.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        assert main(["outgoing", str(saved), f"tcp:127.0.0.1:{port}", "--peer-version", private_peer.version,
                     *caps]) == 0
        _wait_status(dst, "completed", time.monotonic() + TIMEOUT)
        assert (shm / "dest").read_bytes() == source


@pytest.mark.parametrize(("source", "destination", "machine"), [
    ("10.0", "11.1", "pc-i440fx-10.0"),  # an upgrade: 10.0 sends no CPU hot-plug state, 11.1 needs none
    ("11.1", "10.0", "pc-i440fx-10.0,acpi=off"),  # back: without ACPI (see SPEC_COVERED_MACHINE)
])
def test_vmsd_outgoing_across_versions(shm: Path, tmp_path: Path, source: str, destination: str,
                                       machine: str) -> None:
    """A stream one version saved for the machine type both know goes from ``vmsd outgoing`` into the other
    version (re-encoded from vmsd's typed sections): same RAM."""
    saved = tmp_path / "saved.mig"
    ram = _save(Peer.fetched(source), shm / "source", saved, machine)
    target = Peer.fetched(destination)
    port = free_port()
    with target.start(_ram_args(shm / "dest"), incoming="defer", machine=machine) as dst:
        dst.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        assert main(["outgoing", str(saved), f"tcp:127.0.0.1:{port}", "--peer-version", destination]) == 0
        _wait_status(dst, "completed", time.monotonic() + TIMEOUT)
        assert (shm / "dest").read_bytes() == ram


def test_ignore_shared_through_vmsd_incoming(private_peer: Peer, shm: Path, tmp_path: Path) -> None:
    """x-ignore-shared: the QEMU leaves its shared RAM file in place; `vmsd incoming`'s snapshot says
    x-ignore-shared and carries no page of that block, and the same QEMU version on the same file loads it
    without writing over it, and runs."""
    snapshot = tmp_path / "snap.mig"
    ram = shm / "ram"
    ignore_shared = [{"capability": "x-ignore-shared", "state": True}]
    with _vmsd_incoming(private_peer, snapshot) as uri, private_peer.start(_ram_args(ram)) as src:
        src.qmp.cmd("migrate-set-capabilities", capabilities=ignore_shared)
        _migrate_running(src, uri)
        source = ram.read_bytes()

    stream = read_stream(snapshot.read_bytes(), spec_set())
    assert stream.configuration is not None
    assert b"x-ignore-shared" in stream.configuration.state.capabilities
    payloads = [s.payload for s in stream.sections() if isinstance(s.payload, RamPayload)]
    blocks = {b.name for p in payloads for b in p.block_list()}
    paged = {name for p in payloads for name in p.pages_by_block()}
    assert "m" in blocks and "m" not in paged
    assert paged  # the ROMs are not shared: they are in the snapshot

    with private_peer.start(_ram_args(ram), incoming="defer") as dst:
        dst.qmp.cmd("migrate-set-capabilities", capabilities=ignore_shared)
        dst.qmp.cmd("migrate-incoming", uri=f"file:{snapshot}")
        _wait_status(dst, "completed", time.monotonic() + TIMEOUT)
        assert ram.read_bytes() == source
        dst.qmp.cmd("cont")
        assert dst.qmp.cmd("query-status")["status"] == "running"


def test_qemu11_wrapper_serves_as_cpr_exec_command(tmp_path: Path) -> None:
    """The 11.1 wrapper is exec-safe: named as QEMU's cpr-exec-command, it replaces the running QEMU in the same
    process, which finds the CPR state (a descriptor named in the environment) and resumes the guest."""
    wrapper = Peer.fetched("11.1").cmd[0]
    qmp_path, state = tmp_path / "qmp.sock", tmp_path / "vm.state"
    args = ["-M", "pc,acpi=off,memory-backend=ram", "-m", MEM, "-nodefaults", "-display", "none", "-serial", "none",
            "-object", f"memory-backend-memfd,id=ram,size={MEM},share=on",
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    marker = f"VMSD_TEST_MARK={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    with open(tmp_path / "qemu.log", "wb") as log:
        proc = subprocess.Popen([wrapper, *args], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env)
    try:
        qmp = QMP(str(qmp_path), timeout=TIMEOUT)
        assert qmp.cmd("query-status")["running"] is True
        qmp.cmd("migrate-set-parameters", **{"mode": "cpr-exec",
                                             "cpr-exec-command": [wrapper, *args, "-incoming", f"file:{state}"]})
        qmp_path.unlink()  # the new QEMU listens there again
        qmp.cmd("migrate", uri=f"file:{state}")
        qmp.close()
        deadline = time.monotonic() + TIMEOUT
        while not qmp_path.exists():
            assert proc.poll() is None, (tmp_path / "qemu.log").read_text()
            assert time.monotonic() < deadline, "the new QEMU never listened"
            time.sleep(0.05)
        qmp = QMP(str(qmp_path), timeout=TIMEOUT)
        while (status := qmp.cmd("query-migrate").get("status")) not in ("completed", "failed"):
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert status == "completed", (tmp_path / "qemu.log").read_text()
        assert qmp.cmd("query-status")["running"] is True
        # The same process is QEMU (run by its folder's loader: the wrapper exec'd and did not fork), now
        # with the exec'd command line and the environment it was started with.
        loader = Path(wrapper).parent.parent / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
        assert Path(os.readlink(f"/proc/{proc.pid}/exe")) == loader.resolve()
        assert b"-incoming" in Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert marker.encode() in Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        qmp.cmd("quit")
        qmp.close()
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
