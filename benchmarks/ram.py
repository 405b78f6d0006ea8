"""RAM live-migration throughput: QEMU 7.2 -> QEMU 7.2 beside the machine's ceilings.

Ceilings first (loopback TCP between two processes, numpy memcpy, vmsd
zero-page detection), then one table per guest RAM content mix:

* ``random``: every page random bytes;
* ``zero``:   every page zero;
* ``half``:   alternating 2 MiB chunks, random, zero, random, zero, ...

Guest RAM is a ``memory-backend-file`` under ``/dev/shm`` filled before QEMU
starts, so the destination's RAM file can be compared byte for byte with the
source's after each run (a run that moved wrong bytes counts as failed).
There is no guest OS: the source stays paused (``-S``) by default, since
migration works from a paused VM and the source RAM then stays fixed across
runs; ``--running`` resumes it first (TCG runs the BIOS, which finds nothing
to boot and idles; it migrates just as well, within this box's run-to-run noise).
The destination is started paused too and stays so after loading.

Cases
-----
A case migrates a guest whose RAM is the file ``src_ram_path`` and reports
a :class:`Result`::

    @register("vmsd→vmsd")
    def vmsd_to_vmsd(size: int, mix: str, src_ram_path: Path) -> Result:
        ...
        return Result(wall=seconds, ok=verify_same(src_ram_path, dst_path))

``wall`` is seconds from the start of the transfer until the destination
holds all of RAM (process start-up excluded); ``ok`` says the destination's
RAM was checked equal to the source's.  The case must leave
``src_ram_path`` as it found it (other than what a running guest writes).
Helpers for cases: :func:`shm_file`, :func:`start_qemu`,
:func:`wait_completed`, :func:`verify_same`.  The first registered case
(QEMU→QEMU) is the baseline of the ratio column.

    .venv/bin/python benchmarks/ram.py [--size 2G] [--runs 3] [--mixes random,zero,half] [--quick] [--running]
"""

from __future__ import annotations

import os
import sys

# benchmarks/inspect.py would shadow the standard library's ``inspect``.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import math  # noqa: E402
import mmap  # noqa: E402
import multiprocessing  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from types import FrameType  # noqa: E402

import numpy as np  # noqa: E402

from vmsd.migration.incoming import Incoming  # noqa: E402
from vmsd.migration.machine import Machine  # noqa: E402
from vmsd.migration.multifd import MultifdConfig, accept_all  # noqa: E402
from vmsd.migration.precopy import Migration  # noqa: E402
from vmsd.migration.profile import peer_profile  # noqa: E402
from vmsd.migration.ram.blocks import RamBlock, RamBlocks, zero_pages  # noqa: E402
from vmsd.migration.transport import listen  # noqa: E402
from vmsd.testing.qmp import Qemu, QMPError  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
CHUNK = 2 * MIB  # the unit of the ``half`` mix
MIXES = ("random", "zero", "half")
# QEMU caps migration at 128 MiB/s (max-bandwidth) unless told otherwise; the cap would be all we measured.
MAX_BANDWIDTH = 100_000_000_000
RUNNING = False  # resume the source before migrating (set by --running)
# (channels, compression) of the current table, or None for the main channel only (set per table by main()).
MULTIFD: tuple[int, str] | None = None


def _qemu_multifd(*qemus: Qemu) -> None:
    """Turn multifd on in QEMUs as the current table says (both ends, before migrate/migrate-incoming)."""
    if MULTIFD is None:
        return
    channels, compression = MULTIFD
    for q in qemus:
        q.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
        q.qmp.cmd("migrate-set-parameters", **{"multifd-channels": channels, "multifd-compression": compression})


def _vmsd_multifd(layout: str) -> MultifdConfig | None:
    if MULTIFD is None:
        return None
    channels, compression = MULTIFD
    return MultifdConfig(channels=channels, compression=compression, peer=peer_profile(layout))


# -- cases ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    wall: float  # seconds, transfer start -> destination holds all of RAM
    ok: bool  # destination RAM verified equal to the source's
    qemu_ms: float | None = None  # QEMU's own total-time, when the source is a QEMU
    note: str = ""


Case = Callable[[int, str, Path], Result]
CASES: list[tuple[str, Case]] = []


def register(name: str) -> Callable[[Case], Case]:
    """Add a case to the tables (in registration order; the first is the baseline)."""

    def add(fn: Case) -> Case:
        if any(n == name for n, _ in CASES):
            raise ValueError(f"case {name!r} registered twice")
        CASES.append((name, fn))
        return fn

    return add


# -- /dev/shm files and QEMU ------------------------------------------------------------------------------------------
_SHM: set[Path] = set()  # every file created, so main() can remove leftovers after an error or Ctrl-C
_RUN_ID = uuid.uuid4().hex[:8]


def shm_file(tag: str, size: int) -> Path:
    """A new zero-filled ``size``-byte file under /dev/shm, removed by :func:`remove_shm` or at exit."""
    path = Path("/dev/shm") / f"vmsd-bench-{_RUN_ID}-{tag}"
    _SHM.add(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path


def remove_shm(path: Path) -> None:
    path.unlink(missing_ok=True)
    _SHM.discard(path)


def fill(path: Path, mix: str, seed: int = 0) -> None:
    """Write the ``mix`` content into the (zero-filled) file ``path``.

    Zero chunks are written too, not left as holes: a QEMU source reads all
    of RAM through its mapping, which fills a tmpfs file's holes with pages
    that stay.  Holes would make whichever case ran before the first QEMU
    source cheaper than the same case after it (a vmsd source skips holes
    without touching them: 1.0 s vs 1.4 s for half-zero, 2 channels).
    """
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}")
    rng = np.random.default_rng(seed)
    size = path.stat().st_size
    zeros = bytes(CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for i, off in enumerate(range(0, size, CHUNK)):
            n = min(CHUNK, size - off)
            data = rng.bytes(n) if mix == "random" or (mix == "half" and i % 2 == 0) else zeros[:n]
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)


def start_qemu(ram_path: Path, size: int, incoming: str | None = None, prealloc: bool = False) -> Qemu:
    """A paused pc machine whose RAM is the shared file ``ram_path`` (7.2: ``-m`` must equal the backend size)."""
    args = [
        "-object", f"memory-backend-file,id=m,size={size},mem-path={ram_path},share=on"
        + (",prealloc=on" if prealloc else ""),
        "-machine", "memory-backend=m",
    ]
    return Qemu(args, machine="pc", memory=f"{size // MIB}M", incoming=incoming)


def wait_completed(q: Qemu, timeout: float) -> None:
    """Block until ``q`` reports its migration ``completed``; :class:`QMPError` on failure, exit or timeout.

    Needs the ``events`` migration capability set on ``q`` beforehand.
    Waits on QEMU's MIGRATION events instead of polling ``query-migrate``:
    on two cores a poller takes CPU time from the transfer it is timing.
    A watchdog kills QEMU at the timeout, which ends the blocking read.
    """
    watchdog = threading.Timer(timeout, q.proc.kill)
    watchdog.start()
    q.qmp.sock.settimeout(None)  # a timed-out socket file cannot be read again; the watchdog bounds the wait
    try:
        while True:
            msg = q.qmp.events.pop(0) if q.qmp.events else q.qmp._read()  # events seen during earlier commands first
            if msg.get("event") != "MIGRATION":
                continue
            status = msg["data"]["status"]
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QMPError(f"migration {status}: {q.output()}")
    except QMPError:
        if not watchdog.is_alive():
            raise QMPError(f"migration did not finish in {timeout:g} s") from None
        raise
    finally:
        watchdog.cancel()
        q.qmp.sock.settimeout(30)


def verify_same(a: Path, b: Path, chunk: int = 64 * MIB) -> bool:
    """True if the two files hold the same bytes (read in chunks: guests may be larger than free memory)."""
    size = a.stat().st_size
    if b.stat().st_size != size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for _ in range(0, size, chunk):
            if not np.array_equal(np.fromfile(fa, np.uint8, chunk), np.fromfile(fb, np.uint8, chunk)):
                return False
    return True


@register("QEMU→QEMU")
def qemu_to_qemu(size: int, mix: str, src_ram_path: Path) -> Result:
    return _qemu_to_qemu(size, src_ram_path, prealloc=False)


def _qemu_to_qemu(size: int, src_ram_path: Path, prealloc: bool) -> Result:
    dst_path = shm_file("dst", size)
    try:
        with start_qemu(dst_path, size, incoming="defer", prealloc=prealloc) as dst, \
                start_qemu(src_ram_path, size) as src:
            for q in (dst, src):  # MIGRATION events, which wait_completed blocks on
                q.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
            _qemu_multifd(dst, src)
            # Port 0 + socket-address: the kernel picks the port, no race with other listeners.
            dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
            port = dst.qmp.cmd("query-migrate")["socket-address"][0]["port"]
            src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
            if RUNNING:
                src.qmp.cmd("cont")
            timeout = 60 + size / (50 * MIB)
            t0 = time.perf_counter()
            src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            wait_completed(src, timeout)
            wait_completed(dst, timeout)  # the source is done sending before the destination is done loading
            wall = time.perf_counter() - t0
            info = src.qmp.cmd("query-migrate")
        # Both QEMUs are gone: the files are stable.
        return Result(wall, verify_same(src_ram_path, dst_path), qemu_ms=float(info.get("total-time", math.nan)))
    finally:
        remove_shm(dst_path)


# -- vmsd cases -------------------------------------------------------------------------------------------------------
# The vmsd source runs in this process; vmsd destinations run in a peer process
# (``ram.py --peer ...``) so that source and destination do not share a GIL,
# as two QEMUs do not.  A vmsd machine looks like QEMU's: machine type
# pc-i440fx-7.2, one RAM block "m" (QEMU names a memory backend's block by its id).
MACHINE = "pc-i440fx-7.2"


def _vmsd_source(src_ram_path: Path, size: int) -> Machine:
    m = Machine(MACHINE)
    m.ram.add(RamBlock.from_file("m", src_ram_path, size))
    return m


def _peer(*args: str) -> subprocess.Popen[str]:
    channels, compression = MULTIFD or (0, "none")
    layout = "10.0" if args[0] == "machine" else "7.2"  # vmsd talks the newest layout to itself, 7.2's to QEMU 7.2
    proc = subprocess.Popen([sys.executable, __file__, "--peer", *args, str(channels), compression, layout],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError("the vmsd peer did not start")
    return proc


def _peer_done(proc: subprocess.Popen[str], timeout: float) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    proc.wait(timeout)
    if not line.startswith("done"):
        raise RuntimeError(f"the vmsd peer failed: {line}")


def peer_main(mode: str, uri: str, ram_path: Path, size: int, prealloc: bool,
              multifd: MultifdConfig | None) -> int:
    """A vmsd destination: ``machine`` (vmsd -> vmsd) or ``snapshot`` (QEMU -> vmsd, blocks as announced)."""
    from vmsd.qemu.v7_2 import spec_set

    if mode == "machine":
        m = Machine(MACHINE)
        m.ram.add(RamBlock.from_file("m", ram_path, size, prealloc=prealloc))
        m.pause()
        incoming = Incoming(m, multifd=multifd)
    else:
        def block(name: str, length: int) -> RamBlock:
            if name == "m":
                return RamBlock.from_file(name, ram_path, length, prealloc=prealloc)
            return RamBlock.memfd(name, length)

        incoming = Incoming(specs=spec_set(), blocks=RamBlocks(block), multifd=multifd)
    with listen(uri) as lst:
        print("ready", flush=True)
        if multifd is None:
            ch, channels = lst.accept(120), []
        else:
            ch, channels = accept_all(lambda: lst.accept(120), multifd, 120)
    with ch:
        result = incoming.load(ch, channels)
    print(f"done {result.seconds:.3f}", flush=True)
    return 0


def _vmsd_to_vmsd(size: int, src_ram_path: Path, prealloc: bool) -> Result:
    dst_path = shm_file("dst", size)
    uri = f"tcp:127.0.0.1:{_free_port()}"  # loopback TCP, as QEMU->QEMU
    try:
        peer = _peer("machine", uri, str(dst_path), str(size), str(int(prealloc)))
        try:
            with _vmsd_source(src_ram_path, size) as m:
                t0 = time.perf_counter()
                info = Migration(m, uri, capabilities={"return-path": True},
                                 parameters={"max-bandwidth": 0}, multifd=_vmsd_multifd("10.0")).run()
                wall = time.perf_counter() - t0
            if info["status"] != "completed":
                raise RuntimeError(info.get("error-desc"))
            _peer_done(peer, 60)
        finally:
            peer.kill()
            peer.wait()
        return Result(wall, verify_same(src_ram_path, dst_path), qemu_ms=None)
    finally:
        remove_shm(dst_path)


@register("vmsd→vmsd")
def vmsd_to_vmsd(size: int, mix: str, src_ram_path: Path) -> Result:
    return _vmsd_to_vmsd(size, src_ram_path, prealloc=False)


@register("QEMU→vmsd")
def qemu_to_vmsd(size: int, mix: str, src_ram_path: Path) -> Result:
    dst_path = shm_file("dst", size)
    port = _free_port()
    try:
        peer = _peer("snapshot", f"tcp:127.0.0.1:{port}", str(dst_path), str(size), "0")
        try:
            with start_qemu(src_ram_path, size) as src:
                _qemu_multifd(src)
                src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
                if RUNNING:
                    src.qmp.cmd("cont")
                t0 = time.perf_counter()
                src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
                _peer_done(peer, 60 + size / (50 * MIB))
                wall = time.perf_counter() - t0
                info = src.qmp.cmd("query-migrate")
        finally:
            peer.kill()
            peer.wait()
        return Result(wall, verify_same(src_ram_path, dst_path), qemu_ms=float(info.get("total-time", math.nan)))
    finally:
        remove_shm(dst_path)


@register("vmsd→QEMU")
def vmsd_to_qemu(size: int, mix: str, src_ram_path: Path) -> Result:
    dst_path = shm_file("dst", size)
    try:
        with start_qemu(dst_path, size, incoming="defer") as dst:
            dst.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
            _qemu_multifd(dst)
            dst.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
            port = dst.qmp.cmd("query-migrate")["socket-address"][0]["port"]
            with _vmsd_source(src_ram_path, size) as m:
                t0 = time.perf_counter()
                info = Migration(m, f"tcp:127.0.0.1:{port}", parameters={"max-bandwidth": 0},
                                 multifd=_vmsd_multifd("7.2")).run()
                if info["status"] != "completed":
                    raise RuntimeError(info.get("error-desc"))
                wait_completed(dst, 60 + size / (50 * MIB))
                wall = time.perf_counter() - t0
        return Result(wall, verify_same(src_ram_path, dst_path))
    finally:
        remove_shm(dst_path)


@register("QEMU→QEMU pre")
def qemu_to_qemu_prealloc(size: int, mix: str, src_ram_path: Path) -> Result:
    return _qemu_to_qemu(size, src_ram_path, prealloc=True)


@register("vmsd→vmsd pre")
def vmsd_to_vmsd_prealloc(size: int, mix: str, src_ram_path: Path) -> Result:
    return _vmsd_to_vmsd(size, src_ram_path, prealloc=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- ceilings ---------------------------------------------------------------------------------------------------------
def _receive(listener: socket.socket, nbytes: int, bufsize: int) -> None:
    conn, _ = listener.accept()
    with conn:
        buf = memoryview(bytearray(bufsize))
        got = 0
        while got < nbytes:
            n = conn.recv_into(buf[: min(bufsize, nbytes - got)])
            if n == 0:
                raise ConnectionError("sender closed early")
            got += n
        conn.sendall(b"k")  # the sender stops its clock on this: all bytes are in the receiver's buffer


def tcp_loopback(nbytes: int, runs: int, bufsize: int = 64 * MIB) -> list[float]:
    """GB/s of ``sendall`` -> ``recv_into`` over 127.0.0.1, receiver in a child process (no shared GIL)."""
    data = memoryview(bytearray(b"\x5a" * bufsize))
    ctx = multiprocessing.get_context("fork")
    out = []
    for _ in range(runs):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            child = ctx.Process(target=_receive, args=(listener, nbytes, bufsize))
            child.start()
            try:
                with socket.create_connection(listener.getsockname()) as s:
                    t0 = time.perf_counter()
                    for off in range(0, nbytes, bufsize):
                        s.sendall(data[: min(bufsize, nbytes - off)])
                    if s.recv(1) != b"k":
                        raise ConnectionError("receiver did not acknowledge")
                    out.append(nbytes / (time.perf_counter() - t0) / 1e9)
            finally:
                child.join(10)
                if child.is_alive():
                    child.kill()
                    child.join()
    return out


def rates(fn: Callable[[], object], nbytes: int, runs: int) -> list[float]:
    fn()  # warm up: faults the pages in
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return out


def memcpy(nbytes: int, runs: int) -> list[float]:
    src = np.full(nbytes, 0x5A, dtype=np.uint8)
    dst = np.empty_like(src)
    return rates(lambda: np.copyto(dst, src), nbytes, runs)


def zero_detect(nbytes: int, runs: int) -> list[float]:
    """vmsd's zero_pages on a block laid out like the ``half`` mix."""
    with RamBlock.memfd("bench", nbytes) as block:
        rng = np.random.default_rng(0)
        for i, off in enumerate(range(0, nbytes, CHUNK)):
            if i % 2 == 0:
                n = min(CHUNK, nbytes - off)
                block.bytes_[off : off + n] = np.frombuffer(rng.bytes(n), np.uint8)
        return rates(lambda: zero_pages(block), nbytes, runs)


# -- tables -----------------------------------------------------------------------------------------------------------
def fmt_rates(r: list[float]) -> str:
    return f"{statistics.median(r):7.2f} {min(r):7.2f} {max(r):7.2f}"


def print_ceilings(nbytes: int, runs: int) -> None:
    print(f"ceilings: {nbytes / GIB:g} GiB, {runs} runs, GB/s = 1e9 bytes/s")
    print(f"{'':<40} {'med':>7} {'min':>7} {'max':>7}")
    print(f"{'loopback TCP sendall->recv_into, 2 procs':<40} {fmt_rates(tcp_loopback(nbytes, runs))}")
    print(f"{'numpy memcpy (np.copyto)':<40} {fmt_rates(memcpy(nbytes, runs))}")
    print(f"{'vmsd zero_pages, half zero (2 MiB runs)':<40} {fmt_rates(zero_detect(nbytes, runs))}")


def back_memory(nbytes: int) -> None:
    """Touch and free ``nbytes`` of anonymous memory, so that the next case's first touches are cheap.

    On a VM whose host backs guest memory lazily (and takes back what the
    guest frees, via free page reporting), the first touch of a guest page
    can cost a host page fault: the 2 GiB a case writes on its destination
    took anywhere from 1.5 to 7.7 s for the same vmsd run, and QEMU's from 1.6
    to 8.1 s, depending on what the previous case had freed.  Touching the
    memory just before each case gives every case the same start: the guest
    reuses these just-freed, host-backed pages.
    """
    with mmap.mmap(-1, nbytes) as mm:
        pages = np.frombuffer(mm, dtype=np.uint8)
        pages[::4096] = 1
        del pages


def run_case(name: str, case: Case, size: int, mix: str, src: Path) -> Result:
    back_memory(size + 512 * MIB)  # the destination's RAM, and room for what both processes allocate
    try:
        return case(size, mix, src)
    except Exception as e:  # one broken case or run should not hide the others' numbers
        traceback.print_exc()
        return Result(math.nan, False, note=f"{type(e).__name__}: {e}"[:60])


def print_table(mix: str, size: int, runs: int, results: dict[str, list[Result]]) -> None:
    how = "main channel only" if MULTIFD is None else f"multifd {MULTIFD[0]} channel(s), {MULTIFD[1]}"
    print(f"\nmix {mix}, {how}: {size / MIB:g} MiB guest, {runs} runs, {'running' if RUNNING else 'paused'} source")
    print(f"{'case':<14} {'wall s med (min-max)':>24} {'GB/s':>7} {'QEMU ms':>8} {'vs QEMU':>8}")
    base = [r.wall for r in results[CASES[0][0]] if r.ok]
    base_med = statistics.median(base) if base else math.nan
    for name, rs in results.items():
        good = [r.wall for r in rs if r.ok]
        failed = len(rs) - len(good)
        tail = f"  FAILED {failed}/{len(rs)} {rs[-1].note if not rs[-1].ok else ''}" if failed else ""
        if not good:
            print(f"{name:<14} {'-':>24} {'-':>7} {'-':>8} {'-':>8}{tail}")
            continue
        med = statistics.median(good)
        qms = [r.qemu_ms for r in rs if r.ok and r.qemu_ms is not None]
        qemu = f"{statistics.median(qms):8.0f}" if qms else f"{'-':>8}"
        print(
            f"{name:<14} {med:10.3f} ({min(good):5.3f}-{max(good):5.3f}) {size / med / 1e9:7.2f} {qemu}"
            f" {base_med / med:7.2f}x{tail}"
        )


# -- main -------------------------------------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": MIB, "G": GIB}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        size = int(float(num) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 512M, 2G)") from None
    if size <= 0 or size % CHUNK:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 2 MiB")
    return size


def parse_multifd(text: str) -> list[tuple[int, str]]:
    if text == "off":
        return []
    out: list[tuple[int, str]] = []
    for item in text.split(","):
        channels, _, compression = item.partition(":")
        if not channels.isdigit() or compression not in ("none", "zlib", "zstd"):
            raise argparse.ArgumentTypeError(f"expected CHANNELS:none|zlib|zstd, got {item!r}")
        out.append((int(channels), compression))
    return out


def parse_mixes(text: str) -> list[str]:
    mixes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in mixes if m not in MIXES]
    if bad or not mixes:
        raise argparse.ArgumentTypeError(f"mixes must be from {','.join(MIXES)}")
    return mixes


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop QEMU and remove files


def main() -> int:
    global RUNNING
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=2 * GIB, help="guest RAM (K/M/G suffix; default 2G)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mixes", type=parse_mixes, default=list(MIXES))
    ap.add_argument("--quick", action="store_true", help="256M guest, 1 run: a smoke test")
    ap.add_argument("--running", action="store_true", help="resume the source VM before migrating")
    ap.add_argument("--multifd", type=parse_multifd, default=None,
                    help="multifd tables: CHANNELS:COMPRESSION,... (default 1,2,4 x none,zlib,zstd; 'off' for none)")
    ap.add_argument("--peer", nargs=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        mode, uri, ram, size, pre, channels, compression, layout = args.peer
        cfg = MultifdConfig(channels=int(channels), compression=compression, peer=peer_profile(layout)) if int(channels) else None
        return peer_main(mode, uri, Path(ram), int(size), pre == "1", cfg)
    if args.quick:
        args.size, args.runs = 256 * MIB, 1
    RUNNING = args.running
    signal.signal(signal.SIGTERM, _terminate)
    ceiling_bytes = 256 * MIB if args.quick else GIB
    ceiling_runs = args.runs if args.quick else max(3, args.runs)
    try:
        print_ceilings(ceiling_bytes, ceiling_runs)
        all_ok = True
        global MULTIFD
        multifd = args.multifd if args.multifd is not None else [(c, m) for c in (1, 2, 4)
                                                                 for m in ("none", "zlib", "zstd")]
        for mix in args.mixes:
            src = shm_file("src", args.size)
            try:
                fill(src, mix)
                # The main-channel table has every case; multifd tables leave out the preallocated
                # destinations, and the all-zero mix (multifd moves no zero page bytes).
                tables: list[tuple[int, str] | None] = [None, *(multifd if mix != "zero" else [])]
                for table in tables:
                    MULTIFD = table
                    cases = [(n, c) for n, c in CASES if table is None or not n.endswith(" pre")]
                    results: dict[str, list[Result]] = {name: [] for name, _ in cases}
                    for _ in range(args.runs):
                        for name, case in cases:
                            results[name].append(run_case(name, case, args.size, mix, src))
                    print_table(mix, args.size, args.runs, results)
                    all_ok &= all(r.ok for rs in results.values() for r in rs)
            finally:
                MULTIFD = None
                remove_shm(src)
        print("\n(wall = migrate command -> destination completed; GB/s = guest bytes / wall / 1e9;"
              " vs QEMU = QEMU→QEMU wall / case wall, >1 is faster; 'pre' = destination RAM preallocated,"
              " prealloc=on for QEMU: compare the two 'pre' rows with each other)")
        return 0 if all_ok else 1
    finally:
        for path in list(_SHM):
            remove_shm(path)


if __name__ == "__main__":
    sys.exit(main())
