"""vmsd -> vmsd live migration: the precopy engine, its destination, and faults on the way."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from listening import free_port
from vmsd.generated.examples.i8254 import I8254, PitChannel
from vmsd.generated.examples.serial import Serial
from vmsd.migration.incoming import Incoming, IncomingResult
from vmsd.migration.machine import Machine
from vmsd.migration.precopy import Migration, parse_settings
from vmsd.migration.ram.blocks import PAGE_SIZE, RamBlock, RamBlocks
from vmsd.migration.ram.records import RamContext, read_ram
from vmsd.migration.ram.wire import RamEncoder, RamLoader, apply_ram
from vmsd.migration.status import IllegalTransition
from vmsd.migration.transport import listen, register_fd
from vmsd.runtime.errors import MalformedStream, VMSDError
from vmsd.runtime.io import Reader
from vmsd.tools.progress import Progress, summary

MIB = 1 << 20


def make_machine(ram: int = 16 * MIB, name: str = "test-board") -> Machine:
    m = Machine(name)
    m.add_ram("pc.ram", ram)
    m.add_ram("vga.vram", 2 * MIB)
    m.add_device("serial", Serial(divider=12, lcr=3, poll_msl=3))
    m.add_device("i8254", I8254(channels=[PitChannel(mode=3, gate=1) for _ in range(3)]))
    return m


def fill(m: Machine, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    ram = m.ram["pc.ram"].bytes_.reshape(-1, 256 * 1024)
    for i in range(0, ram.shape[0], 2):  # random and zero chunks
        ram[i] = np.frombuffer(rng.bytes(ram.shape[1]), dtype=np.uint8)
    m.ram["vga.vram"].bytes_[::4096] = 7
    m.device("serial").scr = 0x5A
    m.device("i8254").channels[1].count = 12345


def ram_of(m: Machine) -> dict[str, bytes]:
    return {b.name: bytes(b.view) for b in m.ram}


def devices_of(m: Machine) -> dict[str, bytes]:
    return {d.idstr: d.state.save(version_id=d.version_id) for d in m.devices.values()}


class Receiver:
    """An Incoming in a thread, listening before the constructor returns (a source may connect at once)."""

    def __init__(self, machine: Machine, uri: str) -> None:
        self.machine = machine
        self.incoming = Incoming(machine)
        self.result: IncomingResult | None = None
        self.error: BaseException | None = None
        self.listener = listen(uri)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.listener as lst, lst.accept(20) as ch:
                self.result = self.incoming.load(ch)
        except BaseException as e:  # the test inspects it
            self.error = e

    def join(self) -> None:
        self.thread.join(30)
        assert not self.thread.is_alive()


class Dirtier:
    """Guest work through the Machine API: rewrites pages and bumps a device register."""

    def __init__(self, m: Machine, small_changes: bool = False, pages: int = 16, pause: float = 0.001) -> None:
        self.m, self.small, self.pages, self.pause = m, small_changes, pages, pause
        self.stop = threading.Event()
        self.steps = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def finish(self) -> None:
        """Stop and join (a completed migration left the machine paused: resume it so the thread sees the stop)."""
        self.stop.set()
        self.m.resume()
        self.thread.join(5)
        assert not self.thread.is_alive()

    def _run(self) -> None:
        rng = np.random.default_rng(5)
        ram = self.m.ram["pc.ram"]
        hot = min(ram.npages, 1024)
        while not self.stop.is_set():
            with self.m.vcpu():
                for p in rng.integers(0, hot, self.pages).tolist():
                    if self.small:  # a few bytes per page: XBZRLE material
                        ram.write(p * PAGE_SIZE + int(rng.integers(0, PAGE_SIZE - 8)), rng.bytes(8))
                    else:
                        ram.write(p * PAGE_SIZE, rng.bytes(PAGE_SIZE))
                s = self.m.device("serial")
                s.scr = (s.scr + 1) & 0xFF
                self.steps += 1
            time.sleep(self.pause)


def migrate(src: Machine, dst: Machine, uri: str, **kw: Any) -> tuple[dict[str, Any], Receiver]:
    rx = Receiver(dst, uri)
    time.sleep(0.1)
    params = {"max-bandwidth": 0, **kw.pop("parameters", {})}
    info = Migration(src, uri, parameters=params, **kw).run()
    rx.join()
    return info, rx


# -- the RAM record codec -------------------------------------------------------------------------------------------
def _encode_all(blocks: RamBlocks, enc: RamEncoder, pages: dict[str, np.ndarray]) -> bytes:
    out = bytearray(enc.block_list(blocks) + enc.eos())
    for b in blocks:
        for buf in enc.encode(b, pages[b.name]):
            out += buf
    out += enc.eos()
    return bytes(out)


@settings(max_examples=40, deadline=None)
@given(kinds=st.lists(st.sampled_from("zrn"), min_size=1, max_size=40), data=st.data())
def test_encoder_and_loader_agree_with_the_record_parser(kinds: list[str], data: st.DataObject) -> None:
    with RamBlocks() as src, RamBlocks() as fast, RamBlocks() as slow:
        a = src.create("a", len(kinds) * PAGE_SIZE)
        src.create("b", 4 * PAGE_SIZE).bytes_[5] = 1
        rng = np.random.default_rng(len(kinds))
        for i, k in enumerate(kinds):
            if k == "r":
                a.page(i)[:] = rng.bytes(PAGE_SIZE)
            elif k == "n":
                a.page(i)[100] = 1  # a nonzero byte late in the first word's page
        chosen = sorted(set(data.draw(st.lists(st.integers(0, len(kinds) - 1), min_size=1))))
        wire = _encode_all(src, RamEncoder(), {"a": np.array(chosen, dtype=np.int64), "b": np.arange(4)})
        loader = RamLoader(fast)
        r = Reader(wire)
        loader.load_section(r)  # block list + EOS
        loader.load_section(r)
        assert r.at_end()
        r2 = Reader(wire)
        apply_ram(slow, read_ram(r2))
        apply_ram(slow, read_ram(r2))
        for name in ("a", "b"):
            assert bytes(fast[name].view) == bytes(slow[name].view)
        for p in chosen:
            assert bytes(fast["a"].page(p)) == bytes(a.page(p))
        assert bytes(fast["b"].view) == bytes(src["b"].view)
        zeros = sum(1 for p in chosen if kinds[p] == "z")
        assert loader.counters.duplicate == zeros + 3
        assert loader.counters.normal == len(chosen) - zeros + 1


@settings(max_examples=200, deadline=None)
@given(junk=st.binary(max_size=300))
def test_loader_on_random_bytes_raises_only_our_errors(junk: bytes) -> None:
    with RamBlocks() as blocks:
        blocks.create("pc.ram", 8 * PAGE_SIZE)
        blocks.last_block = blocks["pc.ram"]
        try:
            RamLoader(blocks, create_missing=False).load_section(Reader(junk))
        except VMSDError:
            pass


def test_loader_rejects_a_page_outside_its_block() -> None:
    with RamBlocks() as src, RamBlocks() as dst:
        src.create("pc.ram", 8 * PAGE_SIZE).bytes_[:] = 1
        dst.create("pc.ram", 8 * PAGE_SIZE)
        enc = RamEncoder()
        wire = bytearray(_encode_all(src, enc, {"pc.ram": np.arange(8)}))
        # the third page record's header: make its offset point past the block
        at = wire.index(b"pc.ram", wire.index(b"pc.ram") + 1) + 6 + 4096 + 4104
        wire[at:at + 8] = (64 * PAGE_SIZE | 0x28).to_bytes(8, "big")
        r = Reader(bytes(wire))
        loader = RamLoader(dst, create_missing=False)
        loader.load_section(r)
        with pytest.raises(VMSDError, match=r"illegal RAM offset 0x40000 in block .pc\.ram.") as e:
            loader.load_section(r)
        assert e.value.offset == at
        assert dst.failed is not None


# -- vmsd -> vmsd -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["tcp", "unix"])
def test_migration_moves_ram_and_devices_while_the_machine_runs(scheme: str, tmp_path: Path) -> None:
    uri = f"tcp:127.0.0.1:{free_port()}" if scheme == "tcp" else f"unix:{tmp_path}/mig.sock"
    with make_machine() as src, make_machine() as dst:
        fill(src)
        work = Dirtier(src)
        time.sleep(0.1)
        progress: list[dict[str, Any]] = []
        info, rx = migrate(src, dst, uri, capabilities={"return-path": True}, on_progress=progress.append)
        assert rx.error is None, rx.error
        assert info["status"] == "completed", info
        assert not src.running  # the source stays paused after completing, as QEMU's
        assert ram_of(src) == ram_of(dst)
        assert devices_of(src) == devices_of(dst)
        assert dst.device("serial").scr == src.device("serial").scr
        assert work.steps > 0
        ram = info["ram"]
        assert ram["total"] == 18 * MIB
        assert ram["normal"] + ram["duplicate"] >= ram["total"] // PAGE_SIZE
        assert ram["dirty-sync-count"] >= 2
        assert info["downtime"] <= info["total-time"]
        assert progress and progress[-1]["status"] == "completed"
        work.finish()


@pytest.mark.parametrize("how", ["file", "exec", "fd"])
def test_migration_to_a_file_command_or_descriptor_loads_back(how: str, tmp_path: Path) -> None:
    path = tmp_path / "snap.mig"
    with make_machine() as src, make_machine() as dst:
        fill(src)
        if how == "fd":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            register_fd("snap", fd)
            uri = "fd:snap"
        else:
            uri = f"file:{path}" if how == "file" else f"exec:cat > {path}"
        info = Migration(src, uri, parameters={"max-bandwidth": 0}).run()
        assert info["status"] == "completed", info
        Incoming(dst).run(f"file:{path}")
        assert ram_of(src) == ram_of(dst)
        assert devices_of(src) == devices_of(dst)


def test_xbzrle_sends_deltas_of_rewritten_pages() -> None:
    uri = f"tcp:127.0.0.1:{free_port()}"
    with make_machine(ram=8 * MIB) as src, make_machine(ram=8 * MIB) as dst:
        fill(src)
        work = Dirtier(src, small_changes=True, pages=64)
        rx = Receiver(dst, uri)
        time.sleep(0.1)
        # A 1 ms downtime limit cannot be met while the guest dirties pages: passes repeat until it stops.
        mig = Migration(src, uri, capabilities={"xbzrle": True},
                        parameters={"max-bandwidth": 16 * MIB, "downtime-limit": 1})
        mig.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            q = mig.query()
            if q.get("ram", {}).get("dirty-sync-count", 0) >= 5 or q["status"] not in ("none", "setup", "active"):
                break
            time.sleep(0.05)
        work.stop.set()
        info = mig.wait(20)
        rx.join()
        assert rx.error is None and info["status"] == "completed", (info, rx.error)
        assert info["ram"]["dirty-sync-count"] >= 4  # XBZRLE starts with the second pass, hits with the third
        cache = info["xbzrle-cache"]
        assert cache["pages"] > 0 and cache["cache-miss"] > 0, info
        assert cache["bytes"] < cache["pages"] * PAGE_SIZE / 10  # 8-byte changes encode small
        assert rx.result is not None and rx.result.counters["xbzrle_pages"] == cache["pages"]
        assert ram_of(src) == ram_of(dst)
        work.finish()


def test_last_pass_takes_unsent_pages_and_pages_dirtied_since() -> None:
    """The final dirty sync merges what the pass had not sent with what the guest dirtied meanwhile: sorted,
    each page once, whichever side is empty."""
    from vmsd.migration.precopy import _Pass

    with make_machine(ram=1 * MIB) as m:
        mig = Migration(m, "file:/dev/null")
        ram = m.ram["pc.ram"]
        for b in m.ram:
            b.take_dirty()
        todo = _Pass([(ram, np.arange(0, 100, dtype=np.int64))])
        todo.take(40)  # pages 0-39 sent
        ram.mark_dirty(10 * PAGE_SIZE, PAGE_SIZE)  # sent, then dirtied again
        ram.mark_dirty(70 * PAGE_SIZE, PAGE_SIZE)  # not sent yet, and dirtied
        ram.mark_dirty(200 * PAGE_SIZE, 2 * PAGE_SIZE)
        merged = dict((b.name, pages.tolist()) for b, pages in mig._sync(todo).pages)
        assert merged == {"pc.ram": [10, *range(40, 100), 200, 201]}
        # Nothing dirtied since: the unsent pages as they were; nothing unsent: the dirty pages.
        assert [p.tolist() for _, p in mig._sync(_Pass([(ram, np.arange(5, 9, dtype=np.int64))])).pages] == [
            [5, 6, 7, 8]]
        ram.mark_dirty(3 * PAGE_SIZE, PAGE_SIZE)
        assert [p.tolist() for _, p in mig._sync(_Pass([])).pages] == [[3]]


def test_max_bandwidth_limits_the_rate() -> None:
    uri = f"tcp:127.0.0.1:{free_port()}"
    with make_machine(ram=8 * MIB) as src, make_machine(ram=8 * MIB) as dst:
        src.ram["pc.ram"].bytes_[:] = 1  # no zero pages: every byte counts
        # a small downtime limit keeps QEMU's unlimited final stage short
        info, _ = migrate(src, dst, uri, parameters={"max-bandwidth": 20 * MIB, "downtime-limit": 10})
        assert info["status"] == "completed"
        # 10 MiB at 20 MiB/s: at least ~0.4 s (the last window may run over)
        assert info["total-time"] >= 350
        assert ram_of(src) == ram_of(dst)


def test_auto_converge_throttles_a_machine_that_dirties_faster_than_the_link() -> None:
    uri = f"tcp:127.0.0.1:{free_port()}"
    with make_machine(ram=8 * MIB) as src, make_machine(ram=8 * MIB) as dst:
        work = Dirtier(src, pages=64, pause=0.0005)
        time.sleep(0.05)
        info, _ = migrate(src, dst, uri, capabilities={"auto-converge": True},
                           parameters={"max-bandwidth": 8 * MIB, "downtime-limit": 20,
                                       "cpu-throttle-initial": 30})
        assert info["status"] == "completed", info
        assert src.throttle >= 30
        assert ram_of(src) == ram_of(dst)
        work.finish()


def test_cancel_leaves_the_source_running() -> None:
    uri = f"tcp:127.0.0.1:{free_port()}"
    with make_machine() as src, make_machine() as dst:
        fill(src)
        before = ram_of(src)
        rx = Receiver(dst, uri)
        time.sleep(0.1)
        mig = Migration(src, uri, parameters={"max-bandwidth": 4 * MIB, "downtime-limit": 10})
        mig.start()
        time.sleep(0.3)
        mig.cancel()
        info = mig.wait(10)
        rx.join()
        assert info["status"] == "cancelled"
        assert src.running
        assert ram_of(src) == before
        assert rx.error is not None and rx.incoming.status == "failed"


def test_cancel_while_the_writer_is_blocked_on_a_peer_that_reads_nothing() -> None:
    """The main channel is written from a thread: with the socket full and the peer silent, cancel still
    ends the migration at once, the source running with its RAM, and the writer thread gone."""
    # More RAM than the socket buffers and the writer's queue hold: the migration is still in its RAM phase.
    with socket.create_server(("127.0.0.1", 0)) as server, make_machine(ram=128 * MIB) as src:
        fill(src)
        before = ram_of(src)
        mig = Migration(src, f"tcp:127.0.0.1:{server.getsockname()[1]}")
        mig.start()
        peer, _ = server.accept()
        with peer:
            deadline = time.monotonic() + 10
            while mig.query().get("ram", {}).get("transferred", 0) < 4 * MIB and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # the socket buffers are full by now: the writer waits in the kernel
            assert mig.query()["status"] == "active"
            t0 = time.monotonic()
            mig.cancel()
            info = mig.wait(10)
        assert info["status"] == "cancelled" and time.monotonic() - t0 < 5
        assert src.running
        assert ram_of(src) == before


def test_write_behind_keeps_order_and_writes_small_batches_itself() -> None:
    """Large batches go to the writer thread; a small one is written by the caller only when nothing is in
    flight, so the channel sees every batch in the order given."""
    from vmsd.migration.precopy import _HAND_OVER_BYTES, _WriteBehind

    seen: list[bytes] = []
    gate = threading.Event()

    class Channel:
        def writev(self, buffers: list[bytes]) -> int:
            if len(buffers[0]) >= _HAND_OVER_BYTES:
                gate.wait(5)
            seen.append(b"".join(buffers)[:1])
            return sum(len(b) for b in buffers)

    writer = _WriteBehind(Channel())  # type: ignore[arg-type]
    try:
        writer.write([b"a"], 1)
        assert seen == [b"a"]  # nothing in flight: written before write() returned
        writer.write([b"b" * _HAND_OVER_BYTES], _HAND_OVER_BYTES)
        writer.write([b"c"], 1)  # the large batch is still being written: this one queues behind it
        time.sleep(0.1)
        assert seen == [b"a"]
        gate.set()
        writer.flush()
        assert seen == [b"a", b"b", b"c"]
        writer.write([b"d"], 1)
        assert seen[-1] == b"d"
    finally:
        gate.set()
        writer.stop()


def test_a_finished_migration_refuses_to_run_again() -> None:
    """completed -> setup is not in the status table: a second run() is refused before it changes anything."""
    with make_machine(ram=1 * MIB) as m:
        mig = Migration(m, "file:/dev/null", parameters={"max-bandwidth": 0})
        first = mig.run()
        assert first["status"] == "completed"
        with pytest.raises(IllegalTransition, match="completed -> setup"):
            mig.run()
        assert mig.query() == first  # the timings of the migration that ran are untouched


def test_settings_use_qemu_names_and_checks() -> None:
    caps, params = parse_settings({"xbzrle": True}, {"downtime-limit": 100})
    assert caps["xbzrle"] and params["downtime-limit"] == 100 and params["max-bandwidth"] == 128 * MIB
    with pytest.raises(ValueError, match="capability 'postcopy-ram' is not supported"):
        parse_settings({"postcopy-ram": True}, None)
    with pytest.raises(ValueError, match="parameter 'max-bandwith' is not supported"):
        parse_settings(None, {"max-bandwith": 1})
    with pytest.raises(ValueError, match="power of two"):
        parse_settings({"xbzrle": True}, {"xbzrle-cache-size": 3 * PAGE_SIZE})


def test_progress_as_json_lines_and_as_a_bar() -> None:
    out = io.StringIO()
    p = Progress(out, json_lines=True)
    with make_machine(ram=4 * MIB) as src:
        info = Migration(src, "file:/dev/null", parameters={"max-bandwidth": 0}, on_progress=p).run()
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert lines[-1]["status"] == "completed" and "time" in lines[-1]
    assert lines[-1]["ram"]["total"] == 6 * MIB
    bar = Progress.line(info)
    assert bar.startswith("[" + "#" * 30 + "] 100.0%  completed")
    assert "ram.dirty-sync-count" in summary(info)


# -- faults -------------------------------------------------------------------------------------------------------
def _assert_failed_intact(info: dict[str, Any], src: Machine, ram: dict[str, bytes], devs: dict[str, bytes],
                          reason: str) -> None:
    assert info["status"] == "failed", info
    assert reason in info["error-desc"], info["error-desc"]
    assert src.running
    assert ram_of(src) == ram
    assert devices_of(src) == devs


_DEST = """
import sys, time
sys.path.insert(0, {tests!r})
from test_migration import make_machine
from vmsd.migration.incoming import Incoming
from vmsd.migration.transport import listen
m = make_machine()
with listen({uri!r}) as lst:
    print("ready", flush=True)
    ch = lst.accept(20)
    ch.read_exact(1 << 20)  # take some of the stream, then hang until killed
    print("reading", flush=True)
    time.sleep(60)
"""


def test_destination_killed_mid_migration() -> None:
    uri = f"tcp:127.0.0.1:{free_port()}"
    code = _DEST.format(tests=str(Path(__file__).parent), uri=uri)
    dest = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert dest.stdout is not None and dest.stdout.readline().strip() == "ready"
        with make_machine() as src:
            fill(src)
            ram, devs = ram_of(src), devices_of(src)
            mig = Migration(src, uri, parameters={"max-bandwidth": 8 * MIB})
            mig.start()
            assert dest.stdout.readline().strip() == "reading"
            dest.send_signal(signal.SIGKILL)
            info = mig.wait(20)
            _assert_failed_intact(info, src, ram, devs, "the destination closed the connection")
    finally:
        dest.kill()
        dest.wait()


def test_connection_dropped_by_a_proxy() -> None:
    """A middlebox forwards the first MiB, then resets both sides."""
    port = free_port()
    proxy = socket.create_server(("127.0.0.1", 0))
    proxy_port = proxy.getsockname()[1]

    def relay() -> None:
        conn, _ = proxy.accept()
        got = 0
        while got < MIB:
            chunk = conn.recv(65536)
            if not chunk:
                break
            got += len(chunk)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # RST

    t = threading.Thread(target=relay, daemon=True)
    t.start()
    with make_machine() as src:
        fill(src)
        ram, devs = ram_of(src), devices_of(src)
        info = Migration(src, f"tcp:127.0.0.1:{proxy_port}", parameters={"max-bandwidth": 0}).run()
        _assert_failed_intact(info, src, ram, devs, "the destination closed the connection")
    t.join(5)
    proxy.close()
    del port


def test_disk_full_on_file_leaves_no_file(tmp_path: Path) -> None:
    with make_machine() as src:
        fill(src)
        ram, devs = ram_of(src), devices_of(src)
        info = Migration(src, "file:/dev/full", parameters={"max-bandwidth": 0}).run()
        _assert_failed_intact(info, src, ram, devs, "No space left on device")


_FSIZE = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
from test_migration import make_machine, fill
from vmsd.migration.precopy import Migration
m = make_machine()
fill(m)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))  # the "disk" fills after 4 MiB
info = Migration(m, "file:{path}", parameters={{"max-bandwidth": 0}}).run()
print(info["status"], m.running, info.get("error-desc"))
"""


def test_file_target_that_fills_up_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "out.mig"
    code = _FSIZE.format(tests=str(Path(__file__).parent), path=path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("failed True"), out.stdout
    assert "File too large" in out.stdout
    assert list(tmp_path.iterdir()) == []  # neither out.mig nor out.mig.partial


def test_wrong_block_list_fails_both_sides_cleanly() -> None:
    uri = f"tcp:127.0.0.1:{free_port()}"
    with make_machine() as src, make_machine(ram=8 * MIB) as dst:
        fill(src)
        ram, devs = ram_of(src), devices_of(src)
        dst_devs = devices_of(dst)
        info, rx = migrate(src, dst, uri, capabilities={"return-path": True})
        assert rx.error is not None and "wrong block list from the peer: RAM block 'pc.ram'" in str(rx.error)
        assert rx.incoming.status == "failed"
        assert devices_of(dst) == dst_devs  # device state is only replaced after a complete load
        _assert_failed_intact(info, src, ram, devs, "")


def test_machine_type_mismatch_is_refused() -> None:
    uri = f"tcp:127.0.0.1:{free_port()}"
    with make_machine() as src, make_machine(name="other-board") as dst:
        info, rx = migrate(src, dst, uri, capabilities={"return-path": True})
        assert "Machine type received is 'test-board' and local is 'other-board'" in str(rx.error)
        assert info["status"] == "failed" and src.running


def test_destination_refuses_garbage() -> None:
    with make_machine() as dst:
        r, w = socket.socketpair()
        w.sendall(b"\x51\x45\x56\x4d\x00\x00\x00\x03" + os.urandom(64))
        w.close()
        from vmsd.migration.transport import socket_channel

        with pytest.raises(VMSDError):
            Incoming(dst).load(socket_channel("socketpair", r))


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("migration")]
        if not extra:
            return
        time.sleep(0.05)
    raise AssertionError(f"migration threads left running: {extra}")


def _socket_reader(data: bytes, close: bool) -> tuple[Reader, socket.socket]:
    a, b = socket.socketpair()

    def send() -> None:  # more than a socket buffer holds: the reader drains it meanwhile
        a.sendall(data)
        if close:
            a.close()

    threading.Thread(target=send, daemon=True).start()
    from vmsd.migration.transport import socket_channel

    return Reader(source=socket_channel("socketpair", b)), a


def _run_with_deadline(fn: Any, seconds: float = 10) -> BaseException | None:
    box: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            box.append(None)
        except BaseException as e:  # handed to the test
            box.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the loader waited for input it did not need"
    return box[0]


@pytest.mark.parametrize("pages", [1, 3, 40, 600])
def test_loader_does_not_wait_for_bytes_after_eos(pages: int) -> None:
    """The peer sends a section and then waits (for a return-path answer): the section must load."""
    with RamBlocks() as src, RamBlocks() as dst:
        b = src.create("pc.ram", 1024 * PAGE_SIZE)
        b.bytes_[: pages * PAGE_SIZE // 2] = 3  # normal pages, then zero pages
        wire = _encode_all(src, RamEncoder(), {"pc.ram": np.arange(pages)}) + b"\x7e\0\0\0\1"
        r, peer = _socket_reader(wire, close=False)
        loader = RamLoader(dst)
        err = _run_with_deadline(lambda: (loader.load_section(r), loader.load_section(r)))
        assert err is None
        assert bytes(dst["pc.ram"].view) == bytes(b.view)
        assert r.read(5) == b"\x7e\0\0\0\1"
        peer.close()


def test_loader_takes_odd_zero_fills_and_truncation_in_a_stream() -> None:
    with RamBlocks() as src, RamBlocks() as dst:
        src.create("pc.ram", 64 * PAGE_SIZE)
        wire = bytearray(_encode_all(src, RamEncoder(), {"pc.ram": np.arange(64)}))
        first = wire.index(b"pc.ram", wire.index(b"pc.ram") + 1) + 6
        for i in range(63):  # every CONTINUE zero record fills with 0x11 (legal, if odd)
            wire[first + 1 + 9 * i + 8] = 0x11
        r, _ = _socket_reader(bytes(wire), close=True)
        loader = RamLoader(dst)
        assert _run_with_deadline(lambda: (loader.load_section(r), loader.load_section(r))) is None
        assert dst["pc.ram"].bytes_[PAGE_SIZE:].min() == 0x11
        r2, _ = _socket_reader(bytes(wire[: len(wire) - 20]), close=True)
        with RamBlocks() as dst2:
            loader2 = RamLoader(dst2)
            err = _run_with_deadline(lambda: (loader2.load_section(r2), loader2.load_section(r2)))
            assert isinstance(err, VMSDError)


def _shared_machine(path: Path, name: str = "test-board") -> Machine:
    """pc.ram in a shared file (as QEMU's memory-backend-file,share=on), vga.vram private."""
    m = Machine(name)
    m.ram.add(RamBlock.from_file("pc.ram", path, 8 * MIB))
    m.add_ram("vga.vram", 2 * MIB)
    m.add_device("serial", Serial(divider=12, lcr=3, poll_msl=3))
    m.add_device("i8254", I8254(channels=[PitChannel(mode=3, gate=1) for _ in range(3)]))
    return m


def test_ignore_shared_leaves_shared_blocks_where_they_are(tmp_path: Path) -> None:
    """x-ignore-shared: the shared block's pages never go on the wire (both sides map the same file), the
    private block and the devices do; the configuration record and block list say so as QEMU's do."""
    shared = tmp_path / "pc.ram"
    uri = f"tcp:127.0.0.1:{free_port()}"
    with _shared_machine(shared) as src, _shared_machine(shared) as dst:
        fill(src)
        dst.device("serial").scr = 0
        rx = Receiver(dst, uri)
        info = Migration(src, uri, capabilities={"x-ignore-shared": True}, parameters={"max-bandwidth": 0}).run()
        rx.join()
        assert info["status"] == "completed", info
        assert rx.error is None and rx.result is not None
        assert ram_of(dst) == ram_of(src) and devices_of(dst) == devices_of(src)
        vram_pages = 2 * MIB // PAGE_SIZE
        # Only vga.vram's pages moved (once each: nothing dirtied them), none of pc.ram's.
        assert info["ram"]["normal"] + info["ram"]["duplicate"] == vram_pages
        assert rx.result.counters["normal"] + rx.result.counters["duplicate"] == vram_pages
        assert rx.result.named_blocks == {"vga.vram"}
        conf = rx.result.configuration
        assert conf is not None and conf.state.capabilities == (b"x-ignore-shared",)


def test_ignore_shared_stream_checks_guest_addresses_and_refuses_pages_of_shared_blocks(tmp_path: Path) -> None:
    """A destination that shares a block refuses a block list whose address differs and pages of it."""
    shared = tmp_path / "pc.ram"
    ctx = RamContext(ignore_shared=True)
    with _shared_machine(shared) as src, _shared_machine(shared) as dst:
        enc = RamEncoder()
        head = enc.block_list(src.ram, ctx) + enc.eos()
        RamLoader(dst.ram, create_missing=False).load_section(Reader(head), ctx)
        dst.ram["pc.ram"].addr = 0x100000
        with pytest.raises(MalformedStream, match=r"Mismatched GPAs for block 'pc\.ram'"):
            RamLoader(dst.ram, create_missing=False).load_section(Reader(head), ctx)
        dst.ram["pc.ram"].addr = 0
        pages = b"".join(bytes(b) for b in enc.encode(src.ram["pc.ram"], np.arange(2, dtype=np.int64)))
        with pytest.raises(MalformedStream, match=r"'pc\.ram' is shared here and x-ignore-shared is on"):
            RamLoader(dst.ram, create_missing=False).load_section(Reader(pages + enc.eos()), ctx)
