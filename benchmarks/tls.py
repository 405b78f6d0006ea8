"""TLS against plain TCP: vmsd -> vmsd live migration on loopback, the main channel and multifd.

The source is this process (a :class:`Machine` whose RAM is a file under
``/dev/shm`` filled with random bytes, so nothing compresses or is skipped as
zero), the destination another process (its RAM another such file); both
run the engine as ``vmsd outgoing``/``incoming`` would.  TLS uses a CA,
server and client certificates made for the run with ``openssl``
(:mod:`vmsd.testing.tls_certs`), the same layout QEMU's ``tls-creds-x509``
reads.  Each run's destination RAM is compared with the source's; a run that
moved wrong bytes is counted as failed.

Printed per row: wall seconds from the start of the migration until the
source saw it complete (return path: the destination loaded everything),
median (min-max) of ``--runs``, the rate, and the ratio plain / TLS (above 1:
TLS is slower by that factor).  ``--qemu`` adds the same rows for QEMU 7.2 -> QEMU 7.2 (the system's QEMU,
paused guests, the same certificates), for scale: what TLS costs QEMU itself on this machine.

    .venv/bin/python benchmarks/tls.py [--size 1G] [--runs 3] [--multifd 2,4] [--qemu]
"""

from __future__ import annotations

import os
import sys

# benchmarks/inspect.py would shadow the standard library's ``inspect``.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from vmsd.migration.incoming import Incoming  # noqa: E402
from vmsd.migration.machine import Machine  # noqa: E402
from vmsd.migration.multifd import MultifdConfig  # noqa: E402
from vmsd.migration.precopy import Migration  # noqa: E402
from vmsd.migration.ram.blocks import RamBlock  # noqa: E402
from vmsd.migration.transport import TlsConfig  # noqa: E402
from vmsd.testing.qmp import Qemu  # noqa: E402
from vmsd.testing.tls_certs import creds_dir, make_pki  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
MACHINE = "bench-tls"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _machine(path: Path, size: int) -> Machine:
    m = Machine(MACHINE)
    m.ram.add(RamBlock.from_file("pc.ram", path, size))
    return m


def _shm(tag: str, size: int) -> Path:
    path = Path("/dev/shm") / f"vmsd-bench-tls-{uuid.uuid4().hex[:8]}-{tag}"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def peer_main(uri: str, ram: Path, size: int, channels: int, creds: str) -> int:
    """The destination: a paused machine of the same shape, receiving one migration on ``uri``."""
    with _machine(ram, size) as m:
        m.pause()
        tls = TlsConfig(Path(creds)) if creds != "-" else None
        incoming = Incoming(m, multifd=MultifdConfig(channels=channels) if channels else None, tls=tls)
        print("ready", flush=True)
        incoming.run(uri, timeout=120)
    print("done", flush=True)
    return 0


def one_run(src: Path, size: int, channels: int, creds: dict[str, Path] | None) -> float | None:
    """Seconds for one migration, or None when it failed or moved wrong bytes."""
    dst = _shm("dst", size)
    port = _free_port()
    uri = f"tcp:127.0.0.1:{port}"
    peer = subprocess.Popen([sys.executable, __file__, "--peer", uri, str(dst), str(size), str(channels),
                             str(creds["server"]) if creds else "-"], stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout is not None
        if peer.stdout.readline().strip() != "ready":
            return None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # listening: a probing connection would be taken for the source's
            with open("/proc/net/tcp") as f:
                if any(line.split()[3] == "0A" and int(line.split()[1].rsplit(":", 1)[1], 16) == port
                       for line in list(f)[1:]):
                    break
            time.sleep(0.01)
        with _machine(src, size) as m:
            t0 = time.perf_counter()
            info = Migration(m, uri, capabilities={"return-path": True}, parameters={"max-bandwidth": 0},
                             multifd=MultifdConfig(channels=channels) if channels else None,
                             tls=TlsConfig(creds["client"]) if creds else None).run()
            wall = time.perf_counter() - t0
        peer.wait(60)
        if info["status"] != "completed" or peer.returncode != 0:
            print(f"  failed: {info.get('error-desc', peer.returncode)}", file=sys.stderr)
            return None
        same = src.read_bytes() == dst.read_bytes()
        return wall if same else None
    finally:
        peer.kill()
        peer.wait()
        dst.unlink()


def qemu_run(src: Path, size: int, channels: int, creds: dict[str, Path] | None) -> float | None:
    """QEMU 7.2 -> QEMU 7.2, both paused: seconds from ``migrate`` until both report completed."""
    dst = _shm("dst", size)

    def start(ram: Path, role: str, incoming: str | None) -> Qemu:
        args = ["-object", f"memory-backend-file,id=m,size={size},mem-path={ram},share=on",
                "-machine", "memory-backend=m"]
        if creds:
            args += ["-object", f"tls-creds-x509,id=tls0,dir={creds[role]},endpoint={role},verify-peer=on"]
        return Qemu(args, memory=f"{size // MIB}M", incoming=incoming)

    try:
        with start(dst, "server", "defer") as d, start(src, "client", None) as s:
            for q in (d, s):
                if channels:
                    q.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
                    q.qmp.cmd("migrate-set-parameters", **{"multifd-channels": channels})
                if creds:
                    q.qmp.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
            s.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 10**12})
            d.qmp.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
            port = d.qmp.cmd("query-migrate")["socket-address"][0]["port"]
            t0 = time.perf_counter()
            s.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            for q in (s, d):
                while (status := q.qmp.cmd("query-migrate").get("status")) not in ("completed", "failed"):
                    time.sleep(0.02)
                if status != "completed":
                    return None
            wall = time.perf_counter() - t0
        return wall if src.read_bytes() == dst.read_bytes() else None
    finally:
        dst.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="guest RAM, M or G suffix (default 1G)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--multifd", default="2", help="multifd channel counts to try besides the main channel, e.g. 2,4")
    ap.add_argument("--qemu", action="store_true", help="also QEMU 7.2 -> QEMU 7.2, plain and TLS")
    ap.add_argument("--peer", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        uri, ram, size, channels, creds = args.peer
        return peer_main(uri, Path(ram), int(size), int(channels), creds)
    size = int(float(args.size[:-1]) * (GIB if args.size[-1].upper() == "G" else MIB))
    layouts = [0, *(int(c) for c in args.multifd.split(",") if c)]
    print(f"loopback, {size / MIB:g} MiB of random pages, {args.runs} runs, vmsd with {ssl.OPENSSL_VERSION}")
    print(f"{'source -> destination':<22} {'plain s med (min-max)':>24} {'GB/s':>6} {'TLS s med (min-max)':>24} {'GB/s':>6} "
          f"{'TLS/plain':>9}")
    with tempfile.TemporaryDirectory(prefix="vmsd-bench-tls-") as tmp:
        pki = make_pki(Path(tmp) / "pki")
        creds = {"server": creds_dir(Path(tmp) / "server", pki.ca_cert, server=pki.server),
                 "client": creds_dir(Path(tmp) / "client", pki.ca_cert, client=pki.client)}
        src = _shm("src", size)
        try:
            src.write_bytes(np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes())
            all_ok = True
            rows = [("vmsd", c) for c in layouts] + ([("QEMU 7.2", c) for c in layouts] if args.qemu else [])
            for who, channels in rows:
                walls: dict[bool, list[float]] = {False: [], True: []}
                run = one_run if who == "vmsd" else qemu_run
                for _ in range(args.runs):
                    for tls in (False, True):  # interleaved: drifts of this VM hit both alike
                        wall = run(src, size, channels, creds if tls else None)
                        all_ok &= wall is not None
                        if wall is not None:
                            walls[tls].append(wall)
                name = f"{who}, " + ("main channel" if not channels else f"multifd {channels} ch")
                cells = []
                for tls in (False, True):
                    w = walls[tls]
                    cells.append(f"{statistics.median(w):9.3f} ({min(w):5.3f}-{max(w):5.3f}) {size / statistics.median(w) / 1e9:6.2f}"
                                 if w else f"{'-':>24} {'-':>6}")
                ratio = statistics.median(walls[True]) / statistics.median(walls[False]) \
                    if walls[True] and walls[False] else float("nan")
                print(f"{name:<22} {cells[0]} {cells[1]} {ratio:8.2f}x", flush=True)
        finally:
            src.unlink()
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
