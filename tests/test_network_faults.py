"""Live migration between two "hosts" (network namespaces joined by a veth pair) through real network faults.

A token bucket (tc tbf) slows the link so that each migration takes a few
seconds; in the middle of it the link is cut (``ip link set down``) for less
or more than the peers' idle limit, or a userspace relay in between stalls or
resets.  Short faults are survived (TCP retransmits, the relay resumes); long
ones fail both ends within the limit, the source running on with its RAM and
devices intact, one line of error from the vmsd tools, nothing left behind.
QEMU 7.2 takes either end.  Root only (namespaces): CI runs as root.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli_process import SRC
from netns import Link, link, needs_root
from relay import Relay
from test_migration import _assert_failed_intact, devices_of, fill, make_machine, ram_of
from vmsd.migration.incoming import Incoming
from vmsd.migration.machine import Machine
from vmsd.migration.precopy import Migration
from vmsd.testing.qmp import QEMU_BINARY, Qemu, load_stream

pytestmark = [needs_root, pytest.mark.usefixtures("no_leaked_fds")]

MIB = 1 << 20
RATE = "40mbit"  # 5 MB/s: the 16 MiB of random pages of make_machine(32 MiB) take about 3.5 s
PORT = 4444  # each test has namespaces of its own: any port is free
MID_STREAM = 2 * MIB  # a fault starts once this much went over the link
SHORT, LONG_LIMIT = 10.0, 3.0  # the idle limit of tests that survive a fault, and of those that must fail
STALLED = "nothing moved for 3s, the idle limit ("  # then why: a stall, or the kernel's unreachable network


@pytest.fixture
def net() -> Iterator[Link]:
    with link() as lk:
        lk.rate_limit(0, RATE)
        yield lk


def _until(what: str, cond: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {seconds}s"
        time.sleep(0.02)


def _listens(port: int) -> bool:
    """Whether a socket of this thread's network namespace listens on ``port`` (IPv4)."""
    with open("/proc/thread-self/net/tcp") as f:
        return any(line.split()[3] == "0A" and int(line.split()[1].rsplit(":", 1)[1], 16) == port
                   for line in list(f)[1:])


def _wait_listening(net: Link, side: int, port: int, alive: Callable[[], bool]) -> None:
    _until(f"a listener on port {port}", lambda: not alive() or net.call_in(side, lambda: _listens(port)))
    assert alive(), "the destination ended before listening"


def _mid_stream(net: Link) -> None:
    _until("the migration under way", lambda: net.shaped_bytes(0) >= MID_STREAM)


# -- vmsd on both sides ---------------------------------------------------------------------------------------------
class Destination:
    """``Incoming(machine).run`` on side 1, in a thread started there."""

    def __init__(self, net: Link, machine: Machine, uri: str, timeout: float) -> None:
        self.incoming = Incoming(machine)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(uri, timeout), name="test destination")
        net.call_in(1, self._thread.start)
        _wait_listening(net, 1, int(uri.rsplit(":", 1)[1]), self._thread.is_alive)

    def _run(self, uri: str, timeout: float) -> None:
        try:
            self.incoming.run(uri, timeout)
        except BaseException as e:  # the test looks at it
            self.error = e

    def join(self) -> None:
        self._thread.join(40)
        assert not self._thread.is_alive()


def _migrate(net: Link, uri: str, limit: float, fault: Callable[[], None]) -> tuple[dict[str, Any], Destination, Machine, Machine]:
    """A vmsd machine on side 0 migrates to one on side 1 (through ``uri``), with ``fault`` done mid-stream.
    Both ends have ``limit`` as their idle limit; the caller owns the machines."""
    src, dst = make_machine(32 * MIB), make_machine(32 * MIB)
    fill(src)
    dest = Destination(net, dst, uri, limit)
    mig = Migration(src, uri, capabilities={"return-path": True}, parameters={"max-bandwidth": 0}, timeout=limit)
    net.call_in(0, mig.start)
    fault()
    info = mig.wait(40)
    dest.join()
    return info, dest, src, dst


@pytest.fixture
def machines() -> Iterator[list[Machine]]:
    """Machines a test made, closed afterwards."""
    made: list[Machine] = []
    yield made
    for m in made:
        m.close()


def _cut(net: Link, seconds: float | None, done: Callable[[], bool] = lambda: False) -> None:
    """Mid-stream, cut side 0's end of the link for ``seconds`` (None: until ``done()``), then restore it."""
    _mid_stream(net)
    net.set_link(0, up=False)
    try:
        if seconds is not None:
            time.sleep(seconds)
        else:
            _until("both ends giving up", done, 30)
    finally:
        net.set_link(0, up=True)


def test_a_rate_limited_link_carries_the_whole_machine(net: Link, machines: list[Machine]) -> None:
    info, dest, src, dst = _migrate(net, f"tcp:{Link.ADDRESSES[1]}:{PORT}", SHORT, lambda: None)
    machines += [src, dst]
    assert info["status"] == "completed", info
    assert dest.error is None and dest.incoming.status == "completed"
    assert ram_of(dst) == ram_of(src) and devices_of(dst) == devices_of(src)
    assert net.shaped_bytes(0) >= 16 * MIB  # the random pages all went through the token bucket


def test_a_cut_shorter_than_the_limit_is_survived(net: Link, machines: list[Machine]) -> None:
    info, dest, src, dst = _migrate(net, f"tcp:{Link.ADDRESSES[1]}:{PORT}", SHORT, lambda: _cut(net, 1.5))
    machines += [src, dst]
    assert info["status"] == "completed", info
    assert dest.error is None
    assert ram_of(dst) == ram_of(src) and devices_of(dst) == devices_of(src)


def test_a_cut_longer_than_the_limit_fails_both_ends_and_the_source_runs_on(net: Link,
                                                                              machines: list[Machine]) -> None:
    src, dst = make_machine(32 * MIB), make_machine(32 * MIB)
    machines += [src, dst]
    fill(src)
    ram, devs, dst_devs = ram_of(src), devices_of(src), devices_of(dst)
    dest = Destination(net, dst, f"tcp:{Link.ADDRESSES[1]}:{PORT}", LONG_LIMIT)
    mig = Migration(src, f"tcp:{Link.ADDRESSES[1]}:{PORT}", capabilities={"return-path": True},
                    parameters={"max-bandwidth": 0}, timeout=LONG_LIMIT)
    net.call_in(0, mig.start)
    _cut(net, None, lambda: mig.status.value in ("failed", "completed") and dest.incoming.status == "failed")
    info = mig.wait(10)
    dest.join()
    _assert_failed_intact(info, src, ram, devs, STALLED)
    assert dest.incoming.status == "failed" and STALLED in str(dest.error)
    assert devices_of(dst) == dst_devs  # a failed load leaves the destination's devices as they were


# -- a relay in between ---------------------------------------------------------------------------------------------
def _through_relay(net: Link, limit: float, act: Callable[[Relay], None],
                   machines: list[Machine]) -> tuple[dict[str, Any], Destination, Machine, Machine, dict[str, bytes],
                                                     dict[str, bytes]]:
    """Migrate from side 0 to a destination on side 1's loopback through a relay on side 1; ``act`` runs
    once the relay has forwarded :data:`MID_STREAM` bytes.  Returns the source's RAM and devices from before."""
    src, dst = make_machine(32 * MIB), make_machine(32 * MIB)
    machines += [src, dst]
    fill(src)
    ram, devs = ram_of(src), devices_of(src)
    dest = Destination(net, dst, f"tcp:127.0.0.1:{PORT}", limit)
    relay = net.call_in(1, lambda: Relay((Link.ADDRESSES[1], PORT + 1), ("127.0.0.1", PORT)))
    try:
        mig = Migration(src, relay.uri, capabilities={"return-path": True}, parameters={"max-bandwidth": 0},
                        timeout=limit)
        net.call_in(0, mig.start)
        _until("the relay mid-stream", lambda: relay.from_source >= MID_STREAM)
        act(relay)
        info = mig.wait(40)
        dest.join()
    finally:
        relay.close()
    return info, dest, src, dst, ram, devs


def test_a_relay_that_stalls_briefly_delays_nothing_else(net: Link, machines: list[Machine]) -> None:
    def stall(relay: Relay) -> None:
        relay.stall()
        assert relay.wait_stalled(10)
        time.sleep(1.5)
        relay.resume()

    info, dest, src, dst, _, _ = _through_relay(net, SHORT, stall, machines)
    assert info["status"] == "completed", info
    assert dest.error is None
    assert ram_of(dst) == ram_of(src) and devices_of(dst) == devices_of(src)


def test_a_relay_that_stalls_for_good_fails_both_ends(net: Link, machines: list[Machine]) -> None:
    info, dest, src, _, ram, devs = _through_relay(net, LONG_LIMIT, lambda relay: relay.stall(), machines)
    _assert_failed_intact(info, src, ram, devs, STALLED)
    assert dest.incoming.status == "failed" and STALLED in str(dest.error)


def test_a_relay_that_resets_fails_both_ends_at_once(net: Link, machines: list[Machine]) -> None:
    info, dest, src, _, ram, devs = _through_relay(net, SHORT, lambda relay: relay.reset(), machines)
    _assert_failed_intact(info, src, ram, devs, "the destination closed the connection")
    assert dest.incoming.status == "failed" and "Connection reset by peer" in str(dest.error)


# -- QEMU 7.2 on one side, a vmsd tool on the other -----------------------------------------------------------------
@pytest.fixture
def guest_ram() -> Iterator[Path]:
    """A 32 MiB RAM file of random bytes for QEMU (memory-backend-file): pages that really travel."""
    d = Path("/dev/shm") / f"vmsd-netfaults-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    ram = d / "ram"
    ram.write_bytes(os.urandom(32 * MIB))
    yield ram
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def _qemu(net: Link | None, side: int, ram: Path, incoming: str | None = None) -> Qemu:
    args = ["-object", f"memory-backend-file,id=m,size=32M,mem-path={ram},share=on", "-machine", "memory-backend=m"]
    if net is None:
        return Qemu(args, memory="32M", incoming=incoming)
    return Qemu(args, memory="32M", incoming=incoming, binary="ip",
                extra_args=["netns", "exec", net.ns[side], QEMU_BINARY])


def _vmsd(net: Link, side: int, *args: str) -> Any:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("VMSD_TRACEBACK", None)
    return net.popen(side, [sys.executable, "-m", "vmsd", *args], env=env)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.replace("\r", "\n").splitlines() if "error" in line]


@pytest.mark.parametrize("cut", [1.5, None], ids=["short-cut", "long-cut"])
def test_qemu_source_to_vmsd_incoming_across_a_cut(net: Link, guest_ram: Path, tmp_path: Path,
                                                   cut: float | None) -> None:
    """A short cut: the snapshot is complete (another QEMU loads it with the source's RAM).  A long one: `vmsd
    incoming` gives up after its --timeout with one line and no file; once the link is back, QEMU's next
    retransmission meets a closed port and QEMU fails the migration, and runs on when told to."""
    out = tmp_path / "out" / "snap.mig"
    out.parent.mkdir()
    limit = SHORT if cut else LONG_LIMIT
    with _qemu(net, 0, guest_ram) as src:
        rx = _vmsd(net, 1, "incoming", f"tcp:{Link.ADDRESSES[1]}:{PORT}", "-o", str(out), "--timeout", f"{limit:g}")
        _wait_listening(net, 1, PORT, lambda: rx.poll() is None)
        src.qmp.cmd("migrate", uri=f"tcp:{Link.ADDRESSES[1]}:{PORT}")
        _cut(net, cut, lambda: rx.poll() is not None)
        _, err = rx.communicate(timeout=40)
        if cut:
            assert rx.returncode == 0, err
            src.wait_migration(30)
            dest = load_stream(out, args=["-object", f"memory-backend-file,id=m,size=32M,mem-path={guest_ram}.dst,"
                                                     "share=on", "-machine", "memory-backend=m"])
            try:
                assert Path(f"{guest_ram}.dst").read_bytes() == guest_ram.read_bytes()
            finally:
                dest.stop()
            return
        assert rx.returncode == 1
        lines = _error_lines(err)
        assert len(lines) == 1 and lines[0].startswith(
            f"vmsd incoming: error: tcp:{Link.ADDRESSES[1]}:{PORT}: read failed: {STALLED}"), err
        assert list(out.parent.iterdir()) == []
        _until("QEMU failing the migration", lambda: src.qmp.cmd("query-migrate")["status"] == "failed", 40)
        src.qmp.cmd("cont")
        assert src.qmp.cmd("query-status")["status"] == "running"


def test_vmsd_outgoing_to_qemu_across_a_long_cut(net: Link, guest_ram: Path, tmp_path: Path) -> None:
    """`vmsd outgoing` gives up after its --timeout with one line; the snapshot it sends is untouched and
    nothing else is left in its folder."""
    snapshot = tmp_path / "saved.mig"
    with _qemu(None, 0, guest_ram) as q:
        q.migrate_to_file(snapshot)
    digest = hashlib.sha256(snapshot.read_bytes()).digest()
    with _qemu(net, 1, Path(f"{guest_ram}.dst"), incoming=f"tcp:{Link.ADDRESSES[1]}:{PORT}") as dest:
        _wait_listening(net, 1, PORT, lambda: dest.proc.poll() is None)
        tx = _vmsd(net, 0, "outgoing", str(snapshot), f"tcp:{Link.ADDRESSES[1]}:{PORT}",
                   "--timeout", f"{LONG_LIMIT:g}")
        _cut(net, None, lambda: tx.poll() is not None)
        _, err = tx.communicate(timeout=40)
    assert tx.returncode == 1, err
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("vmsd outgoing: error: migration failed: ") and STALLED in lines[0]
    assert hashlib.sha256(snapshot.read_bytes()).digest() == digest
    assert list(tmp_path.iterdir()) == [snapshot]
