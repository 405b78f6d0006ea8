"""cpr-transfer with QEMU 11.1 (Debian sid, vmsd.testing.qemu11) on either side of vmsd.

Guest RAM is a memory-backend-memfd (cpr-transfer hands memfds over) with
``aux-ram-share=on`` so that ROMs and firmware are memfds too; a test reads a
QEMU's RAM through ``/proc/PID/fd``.  QEMU 11.1 runs without ACPI here: its
piix4_pm sends a CPU hotplug subsection that vmsd's specs (7.2's) lack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from listening import wait_unix_listening
from private_peers import Peer
from vmsd.migration.incoming import Incoming
from vmsd.migration.transport import open_incoming
from vmsd.qemu.v7_2 import spec_set
from vmsd.testing.qmp import Qemu, QMPError

MEM = 64 << 20
TIMEOUT = 30.0
CLI = [sys.executable, "-m", "vmsd"]


def _ram_args(backend: str = "memory-backend-memfd") -> list[str]:
    return ["-object", f"{backend},id=ram0,size={MEM},share=on", "-machine", "memory-backend=ram0,aux-ram-share=on"]


def _memfd_contents(pid: int, marker: str = "memfd:memory-backend-memfd") -> bytes:
    """The guest RAM of QEMU ``pid``: its memory-backend-memfd, read through /proc."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if marker in target:
            with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
                return f.read(MEM)
    raise AssertionError(f"QEMU {pid} has no descriptor of {marker}")


def _wait(q: Qemu, want: str) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        info: dict[str, Any] = q.qmp.cmd("query-migrate")
        if info.get("status") == want:
            return info
        if info.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
            raise QMPError(f"migration: {info} {q.output()}")
        time.sleep(0.02)


def _wait_path(path: Path, proc: subprocess.Popen[str] | None = None) -> None:
    wait_unix_listening(str(path), TIMEOUT, alive=lambda: proc is None or proc.poll() is None)


def _snapshot_ram(snapshot: Path) -> dict[str, bytes]:
    with open_incoming(f"file:{snapshot}") as ch:
        result = Incoming(specs=spec_set()).load(ch)
    try:
        return {b.name: bytes(b.view) for b in result.blocks}
    finally:
        result.blocks.close()


@pytest.fixture(scope="module")
def qemu11() -> Peer:
    return Peer.fetched("11.1")


@pytest.fixture(scope="module", params=["10.0", "11.1"])
def cpr_peer(request: pytest.FixtureRequest) -> Peer:
    """A QEMU with cpr-transfer: 10.0 writes the CPR state without the VFIO subsection, 11.1 with it."""
    return Peer.fetched(request.param)


def test_qemu_cpr_transfer_into_vmsd_incoming(cpr_peer: Peer, tmp_path: Path) -> None:
    """QEMU hands its memfds to `vmsd incoming`, which writes a snapshot from them; the same QEMU loads it."""
    qemu11 = cpr_peer
    main, cpr, snap = tmp_path / "main.sock", tmp_path / "cpr.sock", tmp_path / "vm.mig"
    with qemu11.start(_ram_args(), memory="64M") as src:
        src.qmp.cmd("cont")
        time.sleep(0.3)  # SeaBIOS runs and leaves its mark in RAM and devices
        vmsd = subprocess.Popen([*CLI, "incoming", f"unix:{main}", "-o", str(snap), "--mode", "cpr-transfer",
                                 "--cpr-channel", f"unix:{cpr}", "--timeout", str(TIMEOUT)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_path(cpr, vmsd)
            src.qmp.cmd("migrate-set-parameters", mode="cpr-transfer")
            src.qmp.cmd("migrate", channels=[
                {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": str(main)}},
                {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": str(cpr)}}])
            _wait(src, "completed")
            out, err = vmsd.communicate(timeout=TIMEOUT)
        finally:
            if vmsd.poll() is None:
                vmsd.kill()
                vmsd.wait()
        assert vmsd.returncode == 0, err
        assert "received 0 normal and 0 zero pages" in out  # the RAM came as memfds, not as pages
        ram = _memfd_contents(src.proc.pid)
        assert src.qmp.cmd("query-status")["status"] == "postmigrate"
    blocks = _snapshot_ram(snap)
    assert blocks["ram0"] == ram
    assert any(blocks["ram0"][:0xA0000])  # the guest ran: low RAM is not all zero
    # A new QEMU 11.1 (memory in a file under /dev/shm this time) loads the snapshot and runs on.
    shm = Path("/dev/shm") / f"vmsd-cpr-{os.getpid()}"
    try:
        args = ["-object", f"memory-backend-file,id=ram0,size={MEM},mem-path={shm},share=on",
                "-machine", "memory-backend=ram0"]
        with qemu11.start(args, memory="64M", incoming=f"file:{snap}") as dst:
            deadline = time.monotonic() + TIMEOUT
            while dst.qmp.cmd("query-migrate").get("status") != "completed":
                assert time.monotonic() < deadline, dst.output()
                time.sleep(0.02)
            assert shm.read_bytes() == ram
            dst.qmp.cmd("cont")
            assert dst.qmp.cmd("query-status")["status"] == "running"
    finally:
        shm.unlink(missing_ok=True)


def test_vmsd_outgoing_cpr_transfer_to_qemu(cpr_peer: Peer, tmp_path: Path) -> None:
    """`vmsd outgoing --mode cpr-transfer` hands a snapshot's RAM to a new QEMU as memfds (in its version's
    layout of the CPR state)."""
    qemu11 = cpr_peer
    snap, main, cpr = tmp_path / "vm.mig", tmp_path / "main.sock", tmp_path / "cpr.sock"
    with qemu11.start(_ram_args(), memory="64M") as src:
        src.qmp.cmd("cont")
        time.sleep(0.3)
        src.qmp.cmd("stop")
        src.qmp.cmd("migrate", uri=f"file:{snap}")
        _wait(src, "completed")
    want = _snapshot_ram(snap)
    # The new QEMU listens on its cpr channel before it even starts its monitor: start it in a thread.
    started: list[Qemu | BaseException] = []
    cpr_channel = json.dumps({"channel-type": "cpr",
                              "addr": {"transport": "socket", "type": "unix", "path": str(cpr)}})

    def start() -> None:
        try:
            started.append(qemu11.start([*_ram_args(), "-incoming", cpr_channel], memory="64M",
                                        incoming=f"unix:{main}"))
        except BaseException as e:
            started.append(e)

    t = threading.Thread(target=start, daemon=True)
    t.start()
    _wait_path(cpr)
    proc = subprocess.run([*CLI, "outgoing", str(snap), f"unix:{main}", "--mode", "cpr-transfer",
                           "--cpr-channel", f"unix:{cpr}", "--peer-version", qemu11.version,
                           "--timeout", str(TIMEOUT)],
                          capture_output=True, text=True, timeout=120, check=False)
    t.join(TIMEOUT)
    dst = started[0]
    assert isinstance(dst, Qemu), dst
    with dst:
        assert proc.returncode == 0, proc.stderr
        deadline = time.monotonic() + TIMEOUT
        while dst.qmp.cmd("query-migrate").get("status") != "completed":
            assert time.monotonic() < deadline, dst.output()
            time.sleep(0.02)
        assert _memfd_contents(dst.proc.pid, "memfd:vmsd:ram0") == want["ram0"]  # the memfd vmsd made
        dst.qmp.cmd("cont")
        assert dst.qmp.cmd("query-status")["status"] == "running"


def _memfd_inode(pid: int, marker: str = "memfd:memory-backend-memfd") -> int:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if marker in os.readlink(f"/proc/{pid}/fd/{fd}"):
                return os.stat(f"/proc/{pid}/fd/{fd}").st_ino
        except OSError:
            continue
    raise AssertionError(f"QEMU {pid} has no descriptor of {marker}")


def _field(q: Qemu, tmp_path: Path, section: str, field: str) -> object:
    """A field of ``section`` in the state ``q`` saves now (read back with vmsd)."""
    from vmsd.migration.stream import read_stream

    out = tmp_path / f"check-{q.proc.pid}.mig"
    q.qmp.cmd("migrate", uri=f"file:{out}")
    _wait(q, "completed")
    stream = read_stream(out.read_bytes(), spec_set())
    sec = next(s for s in stream.sections() if s.idstr == section)
    return getattr(sec.payload, field)


@pytest.mark.parametrize(("old_version", "edit"), [("11.1", False), ("11.1", True), ("10.0", True)],
                         ids=["11.1-as-is", "11.1-with-set", "upgrade-10.0-to-11.1-with-set"])
def test_relay_between_two_qemus(qemu11: Peer, tmp_path: Path, old_version: str, edit: bool) -> None:
    """old QEMU -> vmsd relay -> new QEMU 11.1: the memfds pass through unread (one memory, never copied), the
    device state is decoded and, with --set, edited on the way; the new QEMU runs the guest.  From 10.0 this is
    an upgrade: the relay rewrites the CPR state in 11.1's layout, the new QEMU runs 10.0's machine type."""
    old_peer = qemu11 if old_version == "11.1" else Peer.fetched(old_version)
    new_machine = None if old_version == "11.1" else f"pc-i440fx-{old_version}"
    a, main_a, b, main_b = (tmp_path / n for n in ("a.sock", "main-a.sock", "b.sock", "main-b.sock"))
    channel_b = json.dumps({"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": str(b)}})
    started: list[Qemu | BaseException] = []

    def start_new() -> None:
        try:
            started.append(qemu11.start([*_ram_args(), "-incoming", channel_b], memory="64M",
                                        incoming=f"unix:{main_b}", machine=new_machine))
        except BaseException as e:
            started.append(e)

    with old_peer.start(_ram_args(), memory="64M") as old:
        old.qmp.cmd("cont")
        time.sleep(0.3)
        t = threading.Thread(target=start_new, daemon=True)
        t.start()
        _wait_path(b)
        sets = ["--set", "mc146818rtc.cmos_data[14]=0x55"] if edit else []
        relay = subprocess.Popen([*CLI, "relay", "--mode", "cpr-transfer", "--from-cpr", f"unix:{a}",
                                  "--from", f"unix:{main_a}", "--to-cpr", f"unix:{b}", "--to", f"unix:{main_b}",
                                  "--peer-version", "11.1", "--timeout", str(TIMEOUT), *sets],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_path(a, relay)
            old.qmp.cmd("migrate-set-parameters", mode="cpr-transfer")
            old.qmp.cmd("migrate", channels=[
                {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": str(main_a)}},
                {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": str(a)}}])
            _wait(old, "completed")
            out, err = relay.communicate(timeout=TIMEOUT)
        finally:
            if relay.poll() is None:
                relay.kill()
                relay.wait()
        assert relay.returncode == 0, err
        assert "passed" in out and ("edited" in out) == edit
        t.join(TIMEOUT)
        new = started[0]
        assert isinstance(new, Qemu), new
        with new:
            deadline = time.monotonic() + TIMEOUT
            while new.qmp.cmd("query-migrate").get("status") != "completed":
                assert time.monotonic() < deadline, new.output()
                time.sleep(0.02)
            # The very same memory object in both processes: nothing was copied.
            assert _memfd_inode(new.proc.pid) == _memfd_inode(old.proc.pid)
            new.qmp.cmd("cont")
            assert new.qmp.cmd("query-status")["status"] == "running"
            cmos = _field(new, tmp_path, "mc146818rtc", "cmos_data")
            assert isinstance(cmos, bytes) and (cmos[14] == 0x55) == edit


def test_relay_when_the_new_qemu_is_missing_leaves_the_old_one_running(qemu11: Peer, tmp_path: Path) -> None:
    a, main_a, b, main_b = (tmp_path / n for n in ("a.sock", "main-a.sock", "b.sock", "main-b.sock"))
    with qemu11.start(_ram_args(), memory="64M") as old:
        old.qmp.cmd("cont")
        relay = subprocess.Popen([*CLI, "relay", "--mode", "cpr-transfer", "--from-cpr", f"unix:{a}",
                                  "--from", f"unix:{main_a}", "--to-cpr", f"unix:{b}", "--to", f"unix:{main_b}",
                                  "--timeout", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_path(a, relay)
        old.qmp.cmd("migrate-set-parameters", mode="cpr-transfer")
        old.qmp.cmd("migrate", channels=[
            {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": str(main_a)}},
            {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": str(a)}}])
        _, err = relay.communicate(timeout=TIMEOUT)
        # Progress lines, then one error line naming the new side's socket; no traceback.
        last = err.strip().splitlines()[-1]
        assert relay.returncode == 1 and "Traceback" not in err, err
        assert last.startswith("vmsd relay: error:") and str(b) in last, err
        deadline = time.monotonic() + TIMEOUT
        while old.qmp.cmd("query-migrate").get("status") not in ("failed", "cancelled"):
            assert time.monotonic() < deadline, old.qmp.cmd("query-migrate")
            time.sleep(0.02)
        assert old.qmp.cmd("query-status")["status"] == "running"


def test_qemu_11_1_cpr_exec_through_vmsd_cpr_exec_wrap(qemu11: Peer, tmp_path: Path) -> None:
    """QEMU's cpr-exec-command is `vmsd cpr-exec-wrap --set ... -- QEMU ...`: same PID, the edit lands in the
    state the new QEMU loads, RAM stays in its memfd, the guest runs on."""
    from vmsd.testing.qmp import QMP

    wrapper = qemu11.cmd[0]
    qmp_path, state = tmp_path / "qmp.sock", tmp_path / "vm.state"
    args = ["-M", "pc,acpi=off,memory-backend=ram0,aux-ram-share=on", "-m", "64M", "-nodefaults",
            "-display", "none", "-serial", "none",
            "-object", f"memory-backend-memfd,id=ram0,size={MEM},share=on",
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    log_path = tmp_path / "qemu.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([wrapper, *args], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        qmp = QMP(str(qmp_path), timeout=TIMEOUT)
        inode = _memfd_inode(proc.pid)
        qmp.cmd("migrate-set-parameters", **{"mode": "cpr-exec", "cpr-exec-command": [
            *CLI, "cpr-exec-wrap", "--set", "mc146818rtc.cmos_data[14]=0x55", "--",
            wrapper, *args, "-incoming", f"file:{state}"]})
        qmp_path.unlink()  # the new QEMU listens there again
        qmp.cmd("migrate", uri=f"file:{state}")
        qmp.close()
        deadline = time.monotonic() + TIMEOUT
        while not qmp_path.exists():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the new QEMU never listened: " + log_path.read_text()
            time.sleep(0.05)
        qmp = QMP(str(qmp_path), timeout=TIMEOUT)
        while (status := qmp.cmd("query-migrate").get("status")) not in ("completed", "failed"):
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        text = log_path.read_text(errors="replace")
        assert status == "completed", text
        assert "vmsd cpr-exec-wrap: CPR state holds" in text and "edited mc146818rtc.cmos_data[14]=0x55" in text
        assert _memfd_inode(proc.pid) == inode  # the same process and the same guest memory
        from vmsd.migration.stream import read_stream
        sec = next(s for s in read_stream(state.read_bytes(), spec_set()).sections() if s.idstr == "mc146818rtc")
        assert sec.payload.cmos_data[14] == 0x55
        qmp.cmd("cont")
        assert qmp.cmd("query-status")["status"] == "running"
        qmp.cmd("quit")
        qmp.close()
        proc.wait(TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_qemu_cpr_transfer_into_a_vmsd_that_fails_keeps_the_old_qemu_running(qemu11: Peer, tmp_path: Path) -> None:
    """A new side that fails after the old QEMU stopped (here: more RAM announced than --max-ram) answers
    the return path with failure: the old QEMU fails its migration and runs on, its RAM untouched."""
    main, cpr, snap = tmp_path / "main.sock", tmp_path / "cpr.sock", tmp_path / "vm.mig"
    with qemu11.start(_ram_args(), memory="64M") as src:
        src.qmp.cmd("cont")
        time.sleep(0.3)
        src.qmp.cmd("stop")  # the guest must not change RAM between the two reads
        before = _memfd_contents(src.proc.pid)
        vmsd = subprocess.Popen([*CLI, "incoming", f"unix:{main}", "-o", str(snap), "--mode", "cpr-transfer",
                                 "--cpr-channel", f"unix:{cpr}", "--max-ram", "1M", "--timeout", str(TIMEOUT)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_path(cpr, vmsd)
            src.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
            src.qmp.cmd("migrate-set-parameters", mode="cpr-transfer")
            src.qmp.cmd("migrate", channels=[
                {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": str(main)}},
                {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": str(cpr)}}])
            _, err = vmsd.communicate(timeout=TIMEOUT)
        finally:
            if vmsd.poll() is None:
                vmsd.kill()
                vmsd.wait()
        assert vmsd.returncode == 1 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("vmsd incoming: error:") and "RAM" in err, err
        deadline = time.monotonic() + TIMEOUT
        while (status := src.qmp.cmd("query-migrate").get("status")) != "failed":
            assert status != "completed" and time.monotonic() < deadline, status
            time.sleep(0.02)
        assert not snap.exists()
        assert _memfd_contents(src.proc.pid) == before
        src.qmp.cmd("cont")
        assert src.qmp.cmd("query-status")["status"] == "running"


def test_qemu_11_1_cpr_exec_into_vmsd_incoming(qemu11: Peer, tmp_path: Path) -> None:
    """QEMU execs `vmsd incoming --mode cpr-exec` in its place: vmsd finds the guest RAM in the inherited memfds
    (no page in the stream) and writes a snapshot; a new QEMU 11.1 loads it with identical RAM and runs."""
    from vmsd.testing.qmp import QMP

    wrapper = qemu11.cmd[0]
    qmp_path, state, snap = tmp_path / "qmp.sock", tmp_path / "vm.state", tmp_path / "vm.mig"
    args = ["-M", "pc,acpi=off,memory-backend=ram0,aux-ram-share=on", "-m", "64M", "-nodefaults",
            "-display", "none", "-serial", "none",
            "-object", f"memory-backend-memfd,id=ram0,size={MEM},share=on",
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    log_path = tmp_path / "qemu.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([wrapper, *args], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        qmp = QMP(str(qmp_path), timeout=TIMEOUT)
        qmp.cmd("cont")
        time.sleep(0.3)
        qmp.cmd("stop")
        ram = _memfd_contents(proc.pid)
        qmp.cmd("migrate-set-parameters", **{"mode": "cpr-exec", "cpr-exec-command": [
            *CLI, "incoming", f"file:{state}", "-o", str(snap), "--mode", "cpr-exec"]})
        qmp.cmd("migrate", uri=f"file:{state}")
        qmp.close()
        assert proc.wait(TIMEOUT) == 0, log_path.read_text()  # the same process, now vmsd, finished
        assert "received 0 normal and 0 zero pages" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _snapshot_ram(snap)["ram0"] == ram
    shm = Path("/dev/shm") / f"vmsd-cpr-exec-{os.getpid()}"
    try:
        dst_args = ["-object", f"memory-backend-file,id=ram0,size={MEM},mem-path={shm},share=on",
                    "-machine", "memory-backend=ram0"]
        with qemu11.start(dst_args, memory="64M", incoming=f"file:{snap}") as dst:
            deadline = time.monotonic() + TIMEOUT
            while dst.qmp.cmd("query-migrate").get("status") != "completed":
                assert time.monotonic() < deadline, dst.output()
                time.sleep(0.02)
            assert shm.read_bytes() == ram
            dst.qmp.cmd("cont")
            assert dst.qmp.cmd("query-status")["status"] == "running"
    finally:
        shm.unlink(missing_ok=True)


def test_qemu_cpr_reboot_with_ram_left_in_place_edited_by_vmsd(qemu11: Peer, tmp_path: Path) -> None:
    """cpr-reboot with x-ignore-shared: QEMU 11.1 saves device state only (RAM stays in its shared file), quits;
    `vmsd rewrite --set` edits the saved state; a new QEMU 11.1 on the same file restores it and runs."""
    from vmsd.migration.stream import read_stream

    shm = Path("/dev/shm") / f"vmsd-cpr-reboot-{os.getpid()}"
    state, edited = tmp_path / "vm.state", tmp_path / "edited.state"
    args = ["-object", f"memory-backend-file,id=ram0,size={MEM},mem-path={shm},share=on",
            "-machine", "memory-backend=ram0"]
    cap = [{"capability": "x-ignore-shared", "state": True}]
    try:
        with qemu11.start(args, memory="64M") as old:
            old.qmp.cmd("cont")
            time.sleep(0.3)
            old.qmp.cmd("migrate-set-capabilities", capabilities=cap)
            old.qmp.cmd("migrate-set-parameters", mode="cpr-reboot")
            old.qmp.cmd("migrate", uri=f"file:{state}")
            _wait(old, "completed")
            assert old.qmp.cmd("query-status")["status"] == "postmigrate"
        ram = shm.read_bytes()
        assert state.stat().st_size < 1 << 20  # device state only: RAM stayed in the file
        proc = subprocess.run([*CLI, "rewrite", str(state), "-o", str(edited), "--set",
                               "mc146818rtc.cmos_data[14]=0x55"], capture_output=True, text=True, timeout=60,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        with qemu11.start(args, memory="64M", incoming="defer") as new:
            new.qmp.cmd("migrate-set-capabilities", capabilities=cap)
            new.qmp.cmd("migrate-set-parameters", mode="cpr-reboot")
            new.qmp.cmd("migrate-incoming", uri=f"file:{edited}")
            deadline = time.monotonic() + TIMEOUT
            while new.qmp.cmd("query-migrate").get("status") != "completed":
                assert time.monotonic() < deadline, new.output()
                time.sleep(0.02)
            assert shm.read_bytes() == ram
            new.qmp.cmd("cont")
            assert new.qmp.cmd("query-status")["status"] == "running"
            new.qmp.cmd("stop")
            new.qmp.cmd("migrate-set-parameters", mode="normal")
            assert _field(new, tmp_path, "mc146818rtc", "cmos_data")[14] == 0x55  # type: ignore[index]
        assert read_stream(edited.read_bytes(), spec_set()).configuration is not None
    finally:
        shm.unlink(missing_ok=True)
