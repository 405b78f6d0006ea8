"""CPR between Python machines: the CPR state codec, cpr-transfer, cpr-exec and cpr-reboot, and their faults."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from listening import wait_unix_listening
from test_migration import devices_of, fill, make_machine, ram_of
from vmsd.migration.cpr import exec as cpr_exec
from vmsd.migration.cpr.state import CprEntry, CprError, read_state, write_state
from vmsd.migration.cpr.transfer import receive_state, send_state
from vmsd.migration.incoming import Incoming, IncomingResult
from vmsd.migration.machine import Machine
from vmsd.migration.precopy import Migration
from vmsd.migration.profile import PROFILES
from vmsd.migration.transport import listen, open_outgoing
from vmsd.runtime.errors import VMSDError
from vmsd.runtime.io import Reader, Writer

pytestmark = pytest.mark.usefixtures("no_leaked_fds")

PEER = PROFILES["11.1"]

# The CPR state QEMU 11.1.3 sent on a cpr-transfer channel (-M pc -nodefaults, a 64 MiB
# memory-backend-memfd "ram0", aux-ram-share=on): each 0x20 byte carried one descriptor.
QEMU_11_1_STATE = bytes.fromhex(
    "51435052000000010100000013" + b"/rom@etc/acpi/rsdp\0".hex() + "000000002001000000152f726f6d406574632f61"
    "6370692f7461626c6573000000000020010000000870632e62696f7300000000002001000000162f726f6d406574632f74"
    "61626c652d6c6f61646572000000000020010000000770632e726f6d000000000020010000000572616d3000000000002000"
    "051543707253746174652f7666696f20646576696365730000000100")


class _Numbered:
    """Stands in for received descriptors: 100, 101, ..."""

    def __init__(self) -> None:
        self.next = 100

    def take_fd(self) -> int | None:
        self.next += 1
        return self.next - 1


class _Capture:
    def __init__(self) -> None:
        self.data = bytearray()
        self.fds: list[int] = []

    def write(self, b: bytes | bytearray) -> int:
        self.data += b
        return len(b)

    def send_fd(self, data: bytes, fd: int) -> None:
        self.data += data
        self.fds.append(fd)


def test_qemu_11_1_state_decodes_and_reencodes_byte_for_byte() -> None:
    state = read_state(Reader(QEMU_11_1_STATE, fds=_Numbered()))
    assert [(e.name, e.id) for e in state.entries] == [
        ("/rom@etc/acpi/rsdp", 0), ("/rom@etc/acpi/tables", 0), ("pc.bios", 0), ("/rom@etc/table-loader", 0),
        ("pc.rom", 0), ("ram0", 0)]
    assert [e.fd for e in state.entries] == list(range(100, 106))
    out = _Capture()
    w = Writer(out, fds=out)
    write_state(w, state.entries, PEER)
    w.flush()
    assert bytes(out.data) == QEMU_11_1_STATE
    assert out.fds == list(range(100, 106))


def test_qemu_10_0_layout_has_no_vfio_subsection() -> None:
    w = Writer()
    write_state(w, [CprEntry("pc.ram", 0, 7)], PROFILES["10.0"])  # no fd side channel: numbers (cpr-exec's)
    assert w.getvalue() == bytes.fromhex("51435052 00000001 01 00000007") + b"pc.ram\0" + bytes.fromhex(
        "00000000 00000007 00")
    assert read_state(Reader(w.getvalue())).entries == [CprEntry("pc.ram", 0, 7)]


names = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), max_size=40)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(names, st.integers(-(1 << 31), (1 << 31) - 1), st.integers(0, (1 << 31) - 1)),
                max_size=8, unique_by=lambda t: (t[0], t[1])), st.sampled_from(["10.0", "11.1"]))
def test_state_round_trips(entries: list[tuple[str, int, int]], version: str) -> None:
    want = [CprEntry(*e) for e in entries]
    w = Writer()
    write_state(w, want, PROFILES[version])
    assert read_state(Reader(w.getvalue())).entries == want


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_hostile_state_raises_only_our_errors(data: bytes) -> None:
    """Random bytes after the header: a state (an empty list is one) or one of our errors, nothing else."""
    try:
        state = read_state(Reader(b"QCPR\0\0\0\x01" + data if data[:1] != b"Q" else data))
    except VMSDError:
        return
    assert all(e.fd >= 0 for e in state.entries)  # numbers of descriptors to adopt, never negative


@pytest.mark.parametrize("cut", [0, 3, 8, 12, 30, 60, len(QEMU_11_1_STATE) - 1])
def test_truncated_state_closes_what_it_received(cut: int) -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        from vmsd.migration.transport import socket_channel
        tx, rx = socket_channel("tx", a.dup()), socket_channel("rx", b.dup())
        with tx, rx:
            r = Reader(QEMU_11_1_STATE, fds=_Numbered())
            entries = read_state(r).entries
            memfds = [os.memfd_create("t", os.MFD_CLOEXEC) for _ in entries]
            try:
                w = Writer(_Capture())
                out = _Capture()
                w = Writer(out, fds=out)
                write_state(w, [CprEntry(e.name, e.id, fd) for e, fd in zip(entries, memfds, strict=True)], PEER)
                w.flush()
                # replay the captured bytes up to the cut, each carrier byte with its descriptor
                carriers = [i for i, byte in enumerate(out.data) if byte == 0x20][: len(memfds)]
                pos = 0
                for at, fd in zip(carriers, memfds, strict=True):
                    if at >= cut:
                        break
                    if at > pos:
                        tx.write(bytes(out.data[pos:at]))
                    tx.send_fds(b" ", [fd])
                    pos = at + 1
                if cut > pos:
                    tx.write(bytes(out.data[pos:cut]))
                tx.shutdown_write()
                with pytest.raises(VMSDError):
                    receive_state(rx)
            finally:
                for fd in memfds:
                    os.close(fd)


def test_a_channel_that_cannot_pass_descriptors_is_refused(tmp_path: Path) -> None:
    with open_outgoing(f"file:{tmp_path / 'x'}") as ch, pytest.raises(CprError, match="unix socket"):
        send_state(ch, [], PEER)


# -- cpr-transfer between Python machines ------------------------------------------------------------------------------
def _receiver(uri: str, cpr: str, machine: Machine | None = None) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    inc = Incoming(machine, mode="cpr-transfer", cpr_channel=cpr)

    def run() -> None:
        try:
            out.append(inc.run(uri, timeout=20))
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@pytest.fixture
def sockets(tmp_path: Path) -> Iterator[tuple[str, str]]:
    yield f"unix:{tmp_path / 'main.sock'}", f"unix:{tmp_path / 'cpr.sock'}"


def _wait_listening(uri: str) -> None:
    wait_unix_listening(uri[len("unix:"):])


def test_cpr_transfer_hands_memory_over_without_copying(sockets: tuple[str, str]) -> None:
    main, cpr = sockets
    src = make_machine()
    fill(src)
    want_ram, want_dev = ram_of(src), devices_of(src)
    dst = Machine("test-board")
    from vmsd.generated.examples.i8254 import I8254
    from vmsd.generated.examples.serial import Serial
    dst.add_device("serial", Serial())
    dst.add_device("i8254", I8254())
    t, out = _receiver(main, cpr, dst)
    _wait_listening(cpr)
    with src, dst:
        info = Migration(src, main, mode="cpr-transfer", cpr_channel=cpr, peer=PEER).run()
        t.join(30)
        assert info["status"] == "completed", info
        result = out[0]
        assert isinstance(result, IncomingResult), result
        assert result.counters["normal"] == 0 and result.counters["duplicate"] == 0  # no page travelled
        assert ram_of(dst) == want_ram and devices_of(dst) == want_dev
        # One memory, two mappings: what the old side writes now, the new side sees.
        src.ram["pc.ram"].bytes_[12345] ^= 0xFF
        assert dst.ram["pc.ram"].bytes_[12345] == src.ram["pc.ram"].bytes_[12345]
        assert not src.running  # the old side ends stopped, as QEMU's in postmigrate


def test_cpr_transfer_new_side_dies_before_the_hang_up(sockets: tuple[str, str]) -> None:
    main, cpr = sockets
    src = make_machine()
    fill(src)
    want_ram, want_dev = ram_of(src), devices_of(src)
    with src, listen(cpr) as lst:
        def die() -> None:
            ch = lst.accept(20)
            ch.abort()  # takes nothing, answers nothing, and nobody listens on the main channel

        t = threading.Thread(target=die, daemon=True)
        t.start()
        info = Migration(src, main, mode="cpr-transfer", cpr_channel=cpr, peer=PEER, timeout=5).run()
        t.join(10)
        assert info["status"] == "failed"
        assert src.running and ram_of(src) == want_ram and devices_of(src) == want_dev


def test_cpr_transfer_new_side_that_never_hangs_up_times_out(sockets: tuple[str, str]) -> None:
    main, cpr = sockets
    src = make_machine()
    with src, listen(cpr) as lst:
        held: list[object] = []
        t = threading.Thread(target=lambda: held.append(lst.accept(20)), daemon=True)
        t.start()
        info = Migration(src, main, mode="cpr-transfer", cpr_channel=cpr, peer=PEER, timeout=1).run()
        t.join(10)
        assert info["status"] == "failed" and "did not close the cpr channel" in info["error-desc"]
        assert src.running
        for ch in held:
            ch.close()  # type: ignore[attr-defined]


def test_destination_with_ram_of_its_own_is_refused(sockets: tuple[str, str]) -> None:
    main, cpr = sockets
    src = make_machine()
    dst = make_machine()
    t, out = _receiver(main, cpr, dst)
    _wait_listening(cpr)
    with src, dst:
        info = Migration(src, main, mode="cpr-transfer", cpr_channel=cpr, peer=PEER, timeout=5).run()
        t.join(30)
        assert isinstance(out[0], CprError) and "already has RAM blocks" in str(out[0])
        assert info["status"] == "failed" and src.running


def test_mode_rules_are_checked_up_front(tmp_path: Path) -> None:
    with make_machine() as m:
        with pytest.raises(ValueError, match="unix"):
            Migration(m, "unix:/x", mode="cpr-transfer", cpr_channel="tcp:127.0.0.1:1", peer=PEER)
        with pytest.raises(ValueError, match="not to a file"):
            Migration(m, f"file:{tmp_path}/x", mode="cpr-transfer", cpr_channel="unix:/y", peer=PEER)
        with pytest.raises(ValueError, match="cpr-exec-command"):
            Migration(m, f"file:{tmp_path}/x", mode="cpr-exec", peer=PEER)
        with pytest.raises(ValueError, match="does not know"):
            Migration(m, f"file:{tmp_path}/x", mode="cpr-exec", cpr_exec_command=["true"], peer=PROFILES["10.0"])
        with pytest.raises(ValueError, match="not one of"):
            Migration(m, f"file:{tmp_path}/x", mode="cpr-sideways", peer=PEER)


# -- cpr-reboot ------------------------------------------------------------------------------------------------------------
def test_cpr_reboot_saves_a_stopped_machine_to_a_file(tmp_path: Path) -> None:
    src = make_machine()
    fill(src)
    want_ram, want_dev = ram_of(src), devices_of(src)
    path = tmp_path / "vm.state"
    with src:
        info = Migration(src, f"file:{path}", mode="cpr-reboot", peer=PEER).run()
        assert info["status"] == "completed" and not src.running
    dst = Machine("test-board")
    from vmsd.generated.examples.i8254 import I8254
    from vmsd.generated.examples.serial import Serial
    with dst:
        dst.add_ram("pc.ram", 16 << 20)
        dst.add_ram("vga.vram", 2 << 20)
        dst.add_device("serial", Serial())
        dst.add_device("i8254", I8254())
        Incoming(dst).run(f"file:{path}")
        assert ram_of(dst) == want_ram and devices_of(dst) == want_dev


# -- cpr-exec ----------------------------------------------------------------------------------------------------------------
_EXEC_CHILD = r'''
import hashlib, json, os, sys
sys.path[:0] = {path!r}
from test_migration import make_machine, fill, ram_of, devices_of
from vmsd.migration.machine import Machine
from vmsd.migration.precopy import Migration
from vmsd.migration.incoming import Incoming
from vmsd.migration.profile import PROFILES
from vmsd.generated.examples.i8254 import I8254
from vmsd.generated.examples.serial import Serial

def digest(m):
    return hashlib.sha256(json.dumps([[k, v.hex()] for k, v in sorted(ram_of(m).items())]
                                     + [[k, v.hex()] for k, v in sorted(devices_of(m).items())]).encode()).hexdigest()

if sys.argv[1] == "old":
    m = make_machine()
    fill(m)
    print(json.dumps({{"pid": os.getpid(), "digest": digest(m)}}), flush=True)
    info = Migration(m, "file:" + sys.argv[2], mode="cpr-exec", peer=PROFILES["11.1"],
                     cpr_exec_command=sys.argv[3:] or [sys.executable, __file__, "new", sys.argv[2]]).run()
    # only when the exec failed
    print(json.dumps({{"pid": os.getpid(), "status": info["status"], "error": info.get("error-desc"),
                      "running": m.running, "digest": digest(m), "env": os.environ.get("QEMU_CPR_EXEC_STATE"),
                      "fds": sorted(os.listdir("/proc/self/fd"))}}), flush=True)
else:
    m = Machine("test-board")
    m.add_device("serial", Serial())
    m.add_device("i8254", I8254())
    r = Incoming(m, mode="cpr-exec").run("file:" + sys.argv[2])
    print(json.dumps({{"pid": os.getpid(), "digest": digest(m), "normal": r.counters["normal"],
                      "env": os.environ.get("QEMU_CPR_EXEC_STATE")}}), flush=True)
'''


def _run_exec_child(tmp_path: Path, *command: str) -> list[dict[str, object]]:
    import json
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "child.py"
    script.write_text(_EXEC_CHILD.format(path=[str(root / "src"), str(root / "tests")]))
    proc = subprocess.run([sys.executable, str(script), "old", str(tmp_path / "main.mig"), *command],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_cpr_exec_same_process_finds_ram_and_devices(tmp_path: Path) -> None:
    old, new = _run_exec_child(tmp_path)
    assert new["pid"] == old["pid"]  # the same process, a new program
    assert new["digest"] == old["digest"]
    assert new["normal"] == 0  # no page was copied: the memfds survived the exec
    assert new["env"] is None  # the new program unsets the variable


def test_cpr_exec_that_fails_leaves_the_old_program_running(tmp_path: Path) -> None:
    old, after = _run_exec_child(tmp_path, str(tmp_path / "no-such-program"))
    assert after["pid"] == old["pid"] and after["status"] == "failed"
    assert "execvp" in str(after["error"]) and after["running"] is True
    assert after["digest"] == old["digest"]
    assert after["env"] is None  # the persisted state was dropped


def test_find_state_refuses_a_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpr_exec.ENV, "not-a-number")
    with pytest.raises(CprError, match="does not name"):
        cpr_exec.find_state()
    assert cpr_exec.ENV not in os.environ
    fd = os.memfd_create("x", os.MFD_CLOEXEC)
    os.write(fd, b"QCPR\0\0\0\x01\x01\0\0\0\x03ab\0\0\0\0\0\0\0\x03\xe7\x00")  # names descriptor 999
    monkeypatch.setenv(cpr_exec.ENV, str(fd))
    with pytest.raises(CprError, match="not open"):
        cpr_exec.find_state()
    with pytest.raises(OSError):
        os.fstat(fd)  # the state's memfd is closed either way


def test_cpr_transfer_new_side_dies_after_the_hang_up(sockets: tuple[str, str]) -> None:
    """The new side took the descriptors, hung up, then died on the main channel: the old side fails and runs on."""
    main, cpr = sockets
    src = make_machine()
    fill(src)
    want_ram, want_dev = ram_of(src), devices_of(src)
    with src, listen(cpr) as clst:
        def new_side() -> None:
            with clst.accept(20) as cch:
                state = receive_state(cch)
                mlst = listen(main)
            state.close()
            with mlst, mlst.accept(20) as mch:
                mch.read_exact(4)  # the stream starts ...
                mch.abort()  # ... and the new side is gone

        t = threading.Thread(target=new_side, daemon=True)
        t.start()
        info = Migration(src, main, mode="cpr-transfer", cpr_channel=cpr, peer=PEER, timeout=5,
                         capabilities={"return-path": True}).run()
        t.join(10)
        assert info["status"] == "failed"
        assert src.running and ram_of(src) == want_ram and devices_of(src) == want_dev


def test_adopted_ram_refuses_a_missing_or_wrong_descriptor() -> None:
    from vmsd.migration.cpr.ram import AdoptedRam
    from vmsd.migration.cpr.state import CprState

    r, w = os.pipe()
    small = os.memfd_create("small", os.MFD_CLOEXEC)
    os.ftruncate(small, 4096)
    state = CprState([CprEntry("pipe", 0, r), CprEntry("small", 0, small)])
    adopt = AdoptedRam(state)
    with pytest.raises(CprError, match="not a memory file"):
        adopt("pipe", 4096)
    with pytest.raises(CprError, match="holds 0x1000 bytes"):
        adopt("small", 8192)
    with pytest.raises(CprError, match="handed over no memory"):
        adopt("pc.ram", 4096)
    assert state.entries == []  # both were taken, and closed when refused
    os.close(w)


def test_cpr_exec_wrap_starts_qemu_unchanged_whatever_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrapper may report and edit, but it never keeps QEMU from starting with what the old QEMU left."""
    import io

    from vmsd.qemu.v7_2 import spec_set
    from vmsd.tools.cpr import cpr_exec_wrap

    stream = tmp_path / "main.mig"
    stream.write_bytes(b"QEVM\0\0\0\x03garbage")
    argv = ["qemu-system-x86_64", "-incoming", f"file:{stream}"]
    calls: list[tuple[str, list[str]]] = []
    fd = os.memfd_create("state", os.MFD_CLOEXEC)
    try:
        w = Writer()
        write_state(w, [CprEntry("pc.ram", 0, 77)], PEER)
        os.write(fd, w.getvalue())
        for env, sets in ((None, []), ("x", []), (str(fd), ["rtc.nope=1"]), (str(fd), [])):
            if env is None:
                monkeypatch.delenv(cpr_exec.ENV, raising=False)
            else:
                monkeypatch.setenv(cpr_exec.ENV, env)
            err = io.StringIO()
            cpr_exec_wrap(argv, spec_set(), sets, err, execvp=lambda f, a: calls.append((f, a)))
            assert calls[-1] == (argv[0], argv)
            assert "starting QEMU" in err.getvalue() and "Traceback" not in err.getvalue()
        assert "pc.ram (fd 77)" in err.getvalue()  # the state was reported before the stream failed
        assert stream.read_bytes() == b"QEVM\0\0\0\x03garbage"  # and nothing was written
        assert os.environ[cpr_exec.ENV] == str(fd)  # left for QEMU
        assert os.pread(fd, 4, 0) == b"QCPR"
    finally:
        os.close(fd)
