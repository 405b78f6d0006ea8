"""`vmsd inspect --json` vs QEMU's scripts/analyze-migration.py on the same streams.

analyze-migration.py is taken at run time from Debian's qemu source package
(``apt-get source --download-only qemu``, cached under ~/.cache/vmsd-bench);
it is never committed.  Streams come from the installed QEMU 7.2, and one
from QEMU 11.1 (unpacked under ~/.cache/vmsd by the test peers' fetch script
when missing).

    .venv/bin/python benchmarks/inspect.py [--runs N]
"""

from __future__ import annotations

import os
import sys

# This file's name would shadow the standard library's ``inspect`` module for
# everything imported after it when run as a script: drop its folder first.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from vmsd.migration.stream import (  # noqa: E402
    MIG_CMD_PACKAGED,
    QEMU_VM_SECTION_FULL,
    Command,
    Section,
    read_stream,
    write_stream,
)
from vmsd.qemu.versions import choose, spec_set  # noqa: E402
from vmsd.testing.qemu11 import QEMU11  # noqa: E402
from vmsd.testing.qmp import Qemu, save_stream  # noqa: E402

CACHE = Path.home() / ".cache" / "vmsd-bench"
VMSD = [sys.executable, "-m", "vmsd"]
RICH = [
    "-netdev", "user,id=n0", "-device", "e1000,netdev=n0", "-netdev", "user,id=n1", "-device", "virtio-net-pci,netdev=n1",
    "-device", "isa-serial", "-device", "pvpanic", "-device", "qemu-xhci", "-device", "usb-tablet",
    "-device", "usb-ehci", "-device", "ich9-ahci", "-vga", "std",
]


def analyze_migration() -> Path:
    script = CACHE / "analyze-migration.py"
    if script.exists():
        return script
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "source", "--download-only", "-qq", "qemu"], cwd=CACHE, check=True)
    orig = next(CACHE.glob("qemu_*.orig.tar.*"))
    with tarfile.open(orig) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("scripts/analyze-migration.py"))
        data = tar.extractfile(member)
        assert data is not None
        script.write_bytes(data.read())
    return script


def timed(cmd: list[str], runs: int) -> tuple[list[float], int]:
    times, rc = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        times.append(time.perf_counter() - t0)
    return times, rc


def fmt(ts: list[float]) -> str:
    return f"{statistics.median(ts) * 1e3:8.1f} ({min(ts) * 1e3:6.1f}-{max(ts) * 1e3:6.1f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    am = analyze_migration()
    # Byte-compile vmsd as installing a wheel does (this environment may set
    # PYTHONDONTWRITEBYTECODE, which would make every run recompile ~60 modules).
    import compileall

    import vmsd

    compileall.compile_dir(Path(vmsd.__file__).parent, quiet=2)
    work = Path(tempfile.mkdtemp(prefix="vmsd-bench-"))
    disk = work / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    rich = [*RICH, "-drive", f"if=none,id=d0,file={disk},format=raw", "-device", "virtio-blk-pci,drive=d0"]
    streams = {
        "pc rich (BIOS ran 1 s)": (work / "rich.mig", dict(args=rich, run_seconds=1.0)),
        "q35 rich (BIOS ran 1 s)": (work / "q35.mig", dict(args=rich, machine="q35", run_seconds=1.0)),
        "pc rich, 2 GiB guest": (work / "rich2g.mig", dict(args=[*rich, "-m", "2G"], run_seconds=1.0)),
        "pc rich, 8 GiB guest": (work / "rich8g.mig", dict(args=[*rich, "-m", "8G"], run_seconds=1.0)),
        "q35 rich, QEMU 11.1": (work / "q35-11.mig", dict(args=rich, machine="q35", run_seconds=1.0,
                                                          command=QEMU11.command(QEMU11.ensure()))),
    }
    for path, kw in streams.values():
        save_stream(path, **kw)  # type: ignore[arg-type]
    print(f"{'stream':<26} {'size':>9} {'vmsd inspect --json ms':>26} {'analyze-migration.py ms':>26} {'ratio':>7}")
    for label, (path, _) in streams.items():
        ours, rc1 = timed([*VMSD, "inspect", "--json", str(path)], args.runs)
        theirs, rc2 = timed([sys.executable, str(am), "-f", str(path)], args.runs)
        assert rc1 == 0, rc1
        # Debian's analyze-migration.py is the distribution's QEMU's: a newer QEMU's stream may defeat it.
        if rc2 == 0:
            ratio = f"{statistics.median(theirs) / statistics.median(ours):6.1f}x"
        else:
            ratio = "      -"
        theirs_cell = fmt(theirs) if rc2 == 0 else "fails"
        print(f"{label:<26} {path.stat().st_size:>9} {fmt(ours):>26} {theirs_cell:>26} {ratio}")
        data = path.read_bytes()
        specs = spec_set(choose(data).version)
        t0 = time.perf_counter()
        for _ in range(args.runs):
            read_stream(data, specs)
        print(f"{'  (in-process decode only)':<36} {(time.perf_counter() - t0) / args.runs * 1e3:8.1f} ms")
    print(f"(median of {args.runs} runs, min-max in parentheses; both as fresh processes, wall time)")

    print("\nstreams analyze-migration.py cannot read:")
    cases = {
        "no trailer (suppress-vmdesc)": dict(machine="pc,suppress-vmdesc=on"),
        "x-ignore-shared capability": dict(caps={"x-ignore-shared": True}),
        "commands (a PACKAGED one, QEMU loads it)": dict(packaged=True),
    }
    for label, kw in cases.items():
        path = work / f"{abs(hash(label))}.mig"
        caps = kw.pop("caps", None)
        if kw.pop("packaged", False):
            plain = work / "plain.mig"
            save_stream(plain)
            stream = read_stream(plain.read_bytes(), spec_set("7.2"))
            full = [r for r in stream.records if isinstance(r, Section) and r.kind == QEMU_VM_SECTION_FULL]
            rest = [r for r in stream.records if r not in full]
            stream.records = [*rest, Command(MIG_CMD_PACKAGED, 0, b"", packaged=full, package_eof=True)]
            path.write_bytes(write_stream(stream))
        elif caps:
            mem = ["-object", f"memory-backend-file,id=m,size=32M,mem-path={work}/ram,share=on", "-machine", "memory-backend=m"]
            with Qemu(mem) as q:
                q.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": v} for c, v in caps.items()])
                q.migrate_to_file(path)
        else:
            save_stream(path, **kw)  # type: ignore[arg-type]
        ours = subprocess.run([*VMSD, "inspect", "--json", str(path)], capture_output=True, text=True)
        theirs = subprocess.run([sys.executable, str(am), "-f", str(path)], capture_output=True, text=True)
        mark = lambda p: "ok" if p.returncode == 0 else "FAILS: " + (p.stderr.strip().splitlines() or ["?"])[-1][:70]  # noqa: E731
        print(f"  {label:<30} vmsd: {mark(ours):<40} analyze-migration.py: {mark(theirs)}")


if __name__ == "__main__":
    main()
