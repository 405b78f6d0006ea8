"""The live-migration demo: a Python machine with example devices migrates to a second process.

The source machine has ``pc.ram`` (1 GiB by default: 2 MiB chunks of random
bytes alternating with zero chunks) and a small ``vga.vram``, plus the
bundled example devices ``serial`` and ``i8254``.  A workload thread keeps
dirtying pages of a hot region and changing device registers while the
machine runs.  The destination is another process
(``python -m vmsd.tools.livedemo dest``) with the same machine, zeroed; it loads the
migration and reports SHA-256 digests of its RAM blocks and the saved bytes of
its devices, which must equal the source's once the source has paused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from vmsd.generated.examples.i8254 import I8254, PitChannel
from vmsd.generated.examples.serial import Serial
from vmsd.migration.incoming import Incoming
from vmsd.migration.machine import Machine
from vmsd.migration.precopy import Migration
from vmsd.migration.ram.blocks import PAGE_SIZE
from vmsd.runtime.outfile import write_file
from vmsd.tools.progress import Progress, summary

MACHINE = "vmsd-demo"
VRAM = 16 << 20
_CHUNK = 2 << 20


def build_machine(ram_size: int) -> Machine:
    m = Machine(MACHINE)
    m.add_ram("pc.ram", ram_size)
    m.add_ram("vga.vram", VRAM)
    m.add_device("serial", Serial(divider=12, lcr=0x03, poll_msl=3))
    m.add_device("i8254", I8254(channels=[PitChannel(mode=3, gate=1) for _ in range(3)]))
    return m


def fill(m: Machine, seed: int = 1) -> None:
    """Alternate 2 MiB chunks of random bytes and zeros across ``pc.ram``; a test pattern in VRAM."""
    rng = np.random.default_rng(seed)
    chunks = m.ram["pc.ram"].bytes_.reshape(-1, _CHUNK)
    for i in range(0, chunks.shape[0], 2):
        chunks[i] = np.frombuffer(rng.bytes(_CHUNK), dtype=np.uint8)
    vram = m.ram["vga.vram"].bytes_
    vram[:] = np.arange(vram.size, dtype=np.uint64).astype(np.uint8)


class Workload:
    """Guest work: each step rewrites pages of a 64 MiB hot region and bumps device registers."""

    def __init__(self, m: Machine, pages_per_step: int = 32, pause_s: float = 0.002, seed: int = 2) -> None:
        self.m = m
        self.pages_per_step = pages_per_step
        self.pause_s = pause_s
        self.rng = np.random.default_rng(seed)
        self.steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="guest workload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        ram = self.m.ram["pc.ram"]
        hot = min(ram.npages, (64 << 20) // PAGE_SIZE)
        while not self._stop.is_set():
            pages = self.rng.integers(0, hot, self.pages_per_step)
            data = self.rng.bytes(PAGE_SIZE)
            with self.m.vcpu():
                for p in pages.tolist():
                    ram.write(p * PAGE_SIZE, data)
                serial = self.m.device("serial")
                serial.scr = (serial.scr + 1) & 0xFF
                pit = self.m.device("i8254")
                pit.channels[0].count = (pit.channels[0].count + 1) & 0x7FFFFFFF
                self.steps += 1
            time.sleep(self.pause_s)


def digest(m: Machine) -> dict[str, Any]:
    """SHA-256 of each RAM block and the saved bytes of each device."""
    return {
        "ram": {b.name: hashlib.sha256(b.view).hexdigest() for b in m.ram},
        "devices": {f"{d.idstr}/{d.instance_id}": d.state.save(version_id=d.version_id).hex() for d in m.devices.values()},
    }


# -- destination process ------------------------------------------------------------------------------------------
def dest_main(uri: str, ram_size: int, report: Path) -> int:
    with build_machine(ram_size) as m:
        m.pause()  # an incoming machine waits for the stream, as QEMU with -incoming
        print("ready", flush=True)
        incoming = Incoming(m)
        try:
            result = incoming.run(uri, timeout=60)
        except Exception as e:  # reported to the source through the report and the return path
            write_file(report, json.dumps({"status": "failed", "error": str(e)}))
            return 1
        m.resume()
        out = {"status": "completed", "seconds": result.seconds, "ram-counters": result.counters, **digest(m)}
        write_file(report, json.dumps(out))
    return 0


# -- source side: the demo ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(ram_size: int = 1 << 30, json_lines: bool = False, parameters: dict[str, int] | None = None,
        capabilities: dict[str, bool] | None = None, warmup: float = 1.0) -> int:
    out = sys.stdout
    print(f"\n== live migration: a {ram_size >> 20} MiB Python machine with devices 'serial' and 'i8254' "
          f"moves to another process over loopback TCP", file=out)
    uri = f"tcp:127.0.0.1:{_free_port()}"
    # A private folder of a random name: nobody can plant the report, or a link where it goes.
    with tempfile.TemporaryDirectory(prefix="vmsd-demo-") as folder:
        return _run(uri, ram_size, json_lines, parameters, capabilities, warmup, Path(folder) / "report.json")


def _run(uri: str, ram_size: int, json_lines: bool, parameters: dict[str, int] | None,
         capabilities: dict[str, bool] | None, warmup: float, report: Path) -> int:
    out = sys.stdout
    dest = subprocess.Popen([sys.executable, "-m", "vmsd.tools.livedemo", "dest", uri, "--ram", str(ram_size),
                             "--report", str(report)], stdout=subprocess.PIPE, text=True)
    try:
        assert dest.stdout is not None
        if dest.stdout.readline().strip() != "ready":
            print("   the destination process did not start", file=out)
            return 1
        with build_machine(ram_size) as m:
            t = time.perf_counter()
            fill(m)
            print(f"   source RAM filled in {time.perf_counter() - t:.2f}s (half random, half zero); "
                  f"destination listening on {uri}", file=out)
            work = Workload(m)
            work.start()
            time.sleep(warmup)
            print(f"   workload running: {work.steps} steps so far, each dirtying "
                  f"{work.pages_per_step} pages of a 64 MiB hot region", file=out)
            caps = {"auto-converge": True, "return-path": True, **(capabilities or {})}
            params = {"max-bandwidth": 0, "downtime-limit": 300, **(parameters or {})}
            print(f"   capabilities {caps}\n   parameters {params}", file=out)
            mig = Migration(m, uri, capabilities=caps, parameters=params, on_progress=Progress(json_lines=json_lines))
            info = mig.run()
            work.stop()
            print("\n== final statistics (query-migrate)", file=out)
            print(summary(info), file=out)
            if info["status"] != "completed":
                return 1
            source = digest(m)  # the source stays paused after a completed migration: its state is final
        dest.wait(timeout=120)
        got = json.loads(report.read_text())
        print("\n== verification at the destination", file=out)
        if got.get("status") != "completed":
            print(f"   destination failed: {got.get('error')}", file=out)
            return 1
        ok = True
        for name, h in source["ram"].items():
            same = got["ram"].get(name) == h
            ok &= same
            print(f"   RAM block {name:<9} sha256 {h[:16]}…  {'identical' if same else 'DIFFERENT'}", file=out)
        for name, b in source["devices"].items():
            same = got["devices"].get(name) == b
            ok &= same
            print(f"   device {name:<12} {len(b) // 2} bytes of state  {'identical' if same else 'DIFFERENT'}",
                  file=out)
        print(f"   destination loaded in {got['seconds']:.2f}s: {got['ram-counters']['normal']} normal, "
              f"{got['ram-counters']['duplicate']} zero pages", file=out)
        print(f"   {'OK' if ok else 'MISMATCH'}: the destination holds the source's final RAM and device state",
              file=out)
        return 0 if ok else 1
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmsd.tools.livedemo")
    sub = p.add_subparsers(dest="role", required=True)
    d = sub.add_parser("dest", help="the destination process")
    d.add_argument("uri")
    d.add_argument("--ram", type=int, required=True)
    d.add_argument("--report", type=Path, required=True)
    args = p.parse_args(argv)
    return dest_main(args.uri, args.ram, args.report)


if __name__ == "__main__":
    sys.exit(main())
