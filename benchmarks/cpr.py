"""Downtime of CPR against copying RAM, vmsd <-> vmsd and QEMU 11.1 <-> QEMU 11.1, in one run.

Downtime is from the source stopping to the destination holding the whole
machine: for vmsd, from ``Migration.run`` (CPR stops the machine first) to
``Incoming.run`` returning, and for precopy QEMU's definition (the paused
final stage, ``downtime`` of query-migrate); for QEMU, the ``downtime`` its
source reports (it stops when the main channel connects, after the CPR
state).  cpr-exec is timed from the old program's start of the migration to
the new program holding the machine (its start-up included: a new Python and
vmsd's imports, or a new QEMU seen over QMP).  Beside them, copying the same RAM: stop-and-copy (cpr-reboot over a
socket, the whole RAM moved while stopped) and the downtime of normal
precopy of an idle machine (only its final stage is paused).  RAM is a
populated memfd of each size.  Prints median, min and max of several runs,
and the ratio of CPR to stop-and-copy.

    .venv/bin/python benchmarks/cpr.py [--sizes 1,4,8] [--runs 3] [--precopy-max 4] [--no-qemu]
"""

from __future__ import annotations

import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from vmsd.generated.examples.serial import Serial  # noqa: E402
from vmsd.migration.incoming import Incoming, IncomingResult  # noqa: E402
from vmsd.migration.machine import Machine  # noqa: E402
from vmsd.migration.precopy import Migration  # noqa: E402
from vmsd.migration.profile import peer_profile  # noqa: E402

GIB = 1 << 30
PEER = peer_profile("11.1")


def _source(size: int) -> Machine:
    m = Machine("bench")
    block = m.add_ram("pc.ram", size, prealloc=True)
    block.bytes_[:: 1 << 16] = 0x5A  # every 16th page not zero
    m.add_device("serial", Serial(divider=12))
    return m


def _incoming(dst: Machine, uri: str, mode: str, cpr: str | None) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    inc = Incoming(dst, mode=mode, cpr_channel=cpr)
    ready = threading.Event()

    def run() -> None:
        ready.set()
        try:
            out.append(inc.run(uri, timeout=60))
        except BaseException as e:
            out.append(e)
        out.append(time.perf_counter())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ready.wait()
    return t, out


def _wait_unix(path: str) -> None:
    while True:
        with open("/proc/net/unix") as f:
            if any(line.split()[-1] == path and int(line.split()[3], 16) & 0x10000 for line in list(f)[1:]):
                return
        time.sleep(0.001)


def vmsd_cpr_transfer(size: int, d: Path) -> float:
    main, cpr = f"unix:{d}/main.sock", f"unix:{d}/cpr.sock"
    with _source(size) as src, Machine("bench") as dst:
        dst.add_device("serial", Serial())
        t, out = _incoming(dst, main, "cpr-transfer", cpr)
        _wait_unix(f"{d}/cpr.sock")
        start = time.perf_counter()
        info = Migration(src, main, mode="cpr-transfer", cpr_channel=cpr, peer=PEER).run()
        t.join()
        assert info["status"] == "completed" and isinstance(out[0], IncomingResult), (info, out)
        end = out[1]
        assert isinstance(end, float)
        return end - start


def _copying(size: int, d: Path, mode: str) -> tuple[float, dict[str, object]]:
    uri = f"unix:{d}/main.sock"
    with _source(size) as src, Machine("bench") as dst:
        dst.add_ram("pc.ram", size)
        dst.add_device("serial", Serial())
        t, out = _incoming(dst, uri, "normal", None)
        _wait_unix(f"{d}/main.sock")
        start = time.perf_counter()
        info = Migration(src, uri, parameters={"max-bandwidth": 0}, peer=PEER, mode=mode).run()
        t.join()
        assert info["status"] == "completed" and isinstance(out[0], IncomingResult), (info, out)
        end = out[1]
        assert isinstance(end, float)
        return end - start, info


def vmsd_stop_and_copy(size: int, d: Path) -> float:
    """cpr-reboot over a socket: the machine stops, then all of its RAM is copied."""
    return _copying(size, d, "cpr-reboot")[0]


def vmsd_precopy(size: int, d: Path) -> float:
    """Normal precopy of an idle machine: QEMU's downtime (the paused final stage) only."""
    return float(_copying(size, d, "normal")[1]["downtime"]) / 1000  # type: ignore[arg-type]


_EXEC_CHILD = r"""
import os, sys, time
from vmsd.generated.examples.serial import Serial
from vmsd.migration.incoming import Incoming
from vmsd.migration.machine import Machine
from vmsd.migration.precopy import Migration
from vmsd.migration.profile import peer_profile

if sys.argv[1] == "old":
    m = Machine("bench")
    block = m.add_ram("pc.ram", int(sys.argv[3]), prealloc=True)
    block.bytes_[:: 1 << 16] = 0x5A
    m.add_device("serial", Serial(divider=12))
    os.environ["VMSD_BENCH_T0"] = repr(time.monotonic())  # CLOCK_MONOTONIC: one clock across the exec
    info = Migration(m, "file:" + sys.argv[2], mode="cpr-exec", peer=peer_profile("11.1"),
                     cpr_exec_command=[sys.executable, __file__, "new", sys.argv[2]]).run()
    raise SystemExit(f"exec failed: {info}")
m = Machine("bench")
m.add_device("serial", Serial())
Incoming(m, mode="cpr-exec").run("file:" + sys.argv[2])
print(time.monotonic() - float(os.environ["VMSD_BENCH_T0"]))
"""


def vmsd_cpr_exec(size: int, d: Path) -> float:
    """One process: the old program stops its machine and execs the new one, which adopts RAM and devices.
    Includes starting Python and importing vmsd in the new program."""
    import subprocess

    script = d / "child.py"
    script.write_text(_EXEC_CHILD)
    out = subprocess.run([sys.executable, str(script), "old", str(d / "main.mig"), str(size)],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return float(out.strip().splitlines()[-1])


def qemu_cpr_exec(size: int, d: Path) -> float:
    """From `migrate` to the exec'd QEMU 11.1 reporting the incoming migration completed (QEMU's start-up
    included), seen from outside over QMP."""
    import subprocess

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from private_peers import Peer
    from vmsd.testing.qmp import QMP

    wrapper = Peer.fetched("11.1").cmd[0]
    mem = f"{size >> 20}M"
    qmp_path, state = d / "qmp.sock", d / "vm.state"
    args = ["-M", "pc,acpi=off,memory-backend=ram0,aux-ram-share=on", "-m", mem, "-nodefaults", "-display", "none",
            "-object", f"memory-backend-memfd,id=ram0,size={mem},share=on,prealloc=on",
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    proc = subprocess.Popen([wrapper, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        qmp = QMP(str(qmp_path), timeout=120)
        qmp.cmd("migrate-set-parameters", **{"mode": "cpr-exec",
                                             "cpr-exec-command": [wrapper, *args, "-incoming", f"file:{state}"]})
        qmp_path.unlink()
        start = time.perf_counter()
        qmp.cmd("migrate", uri=f"file:{state}")
        qmp.close()
        while not qmp_path.exists():  # the new QEMU listens there once it runs
            time.sleep(0.0005)
        qmp = QMP(str(qmp_path), timeout=60)
        while qmp.cmd("query-migrate").get("status") != "completed":
            time.sleep(0.0005)
        elapsed = time.perf_counter() - start
        qmp.cmd("quit")
        qmp.close()
        proc.wait(30)
        return elapsed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def qemu_cpr_transfer(size: int, d: Path) -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from private_peers import Peer  # the tests' launcher of the private QEMU 11.1

    peer = Peer.fetched("11.1")
    mem = f"{size >> 20}M"
    ram = ["-object", f"memory-backend-memfd,id=ram0,size={mem},share=on,prealloc=on",
           "-machine", "memory-backend=ram0,aux-ram-share=on"]
    main, cpr = f"{d}/main.sock", f"{d}/cpr.sock"
    channel = json.dumps({"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": cpr}})
    with peer.start(ram, memory=mem, machine="pc") as src:
        started: list[object] = []
        t = threading.Thread(target=lambda: started.append(
            peer.start([*ram, "-incoming", channel], memory=mem, machine="pc", incoming=f"unix:{main}")), daemon=True)
        t.start()
        _wait_unix(cpr)
        src.qmp.cmd("migrate-set-parameters", mode="cpr-transfer")
        src.qmp.cmd("migrate", channels=[
            {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": main}},
            {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": cpr}}])
        info = src.wait_migration(120)
        t.join(120)
        for q in started:
            q.stop()  # type: ignore[attr-defined]
        return float(info["downtime"]) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,8", help="GiB of guest RAM, comma-separated (default 1,4,8)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--precopy-max", type=int, default=4, help="largest size precopy is run at (it needs twice the RAM)")
    ap.add_argument("--no-qemu", action="store_true", help="leave out QEMU 11.1 <-> QEMU 11.1")
    args = ap.parse_args()
    cases = [("vmsd stop-and-copy", vmsd_stop_and_copy), ("vmsd cpr-transfer", vmsd_cpr_transfer),
             ("vmsd cpr-exec", vmsd_cpr_exec), ("vmsd precopy (idle)", vmsd_precopy)]
    if not args.no_qemu:
        cases += [("QEMU 11.1 cpr-transfer", qemu_cpr_transfer), ("QEMU 11.1 cpr-exec", qemu_cpr_exec)]
    print(f"{'case':<24} {'GiB':>4} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'vs copying':>11}")
    for gib in (int(s) for s in args.sizes.split(",")):
        medians: dict[str, float] = {}
        for name, fn in cases:
            if name in ("vmsd stop-and-copy", "vmsd precopy (idle)") and gib > args.precopy_max:
                continue
            times = []
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory(prefix="vmsd-bench-cpr-") as d:
                    times.append(fn(gib * GIB, Path(d)))
            med = statistics.median(times)
            medians[name] = med
            base = medians.get("vmsd stop-and-copy")
            ratio = f"{med / base:.4f}x" if base and "cpr" in name else ""
            print(f"{name:<24} {gib:>4} {med * 1e3:>10.1f} {min(times) * 1e3:>8.1f} {max(times) * 1e3:>8.1f} "
                  f"{ratio:>11}", flush=True)


if __name__ == "__main__":
    main()
