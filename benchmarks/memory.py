"""Peak memory of every tool on adversarial but valid inputs, as a multiple of the input's size.

Each tool runs in a fresh process on an input of N and of 4N bytes (the makers
of tests/hostile_inputs.py); the table gives the peak resident set of the
larger run and the slope between the two, (peak(4N) - peak(N)) / 3N: the
bytes of memory each further byte of input costs, the interpreter and the
imports left out.

    .venv/bin/python benchmarks/memory.py [--size 1M] [--only NAME]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import hostile_inputs  # noqa: E402

# Runs the CLI with standard output thrown away, then prints its exit status and peak RSS in bytes.
CHILD = """
import os, sys
from vmsd.cli import main
sys.stdout = open(os.devnull, "w")
rc = main(sys.argv[1:])
# VmHWM, not ru_maxrss: the latter starts from the forking parent's size.
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(rc, int(hwm.split()[1]) * 1024, file=sys.stderr)
"""


def peak(argv: list[str]) -> tuple[int, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    try:
        rc, rss = (int(x) for x in last.split())
    except ValueError:
        raise SystemExit(f"vmsd {' '.join(argv)} failed: {done.stderr[-2000:]}") from None
    return rc, rss


STREAM_TOOLS = {
    "inspect": lambda s, o: ["inspect", s],
    "inspect --json": lambda s, o: ["inspect", "--json", s],
    "rewrite": lambda s, o: ["rewrite", s, "-o", o, "--force"],
    "diff": lambda s, o: ["diff", s, s],
    "incoming file:": lambda s, o: ["incoming", f"file:{s}", "-o", o, "--force"],
}
SPEC_TOOLS = {
    "check": lambda s, o: ["check", s],
    "compile": lambda s, o: ["compile", "-o", o, s],
    "fmt --check": lambda s, o: ["fmt", "--check", s],
}


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1M", help="N: the smaller input (default 1M; specs are N/4 and N)")
    ap.add_argument("--only", help="only the inputs whose name contains this")
    args = ap.parse_args()
    n = _size(args.size)
    print("| input | tool | N bytes | peak RSS at 4N (MiB) | slope (bytes per input byte) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        # Inputs are made when measured: held here, they would not count, but they would slow the machine.
        cases: list[tuple[str, dict[str, Any], Callable[[int, bool], bytes]]] = []
        for name, make in hostile_inputs.STREAMS.items():
            cases.append((name, STREAM_TOOLS, make))
        for name, make_spec in hostile_inputs.SPECS.items():
            cases.append((name, SPEC_TOOLS, lambda size, _, m=make_spec: m(size // 4).encode()))
        for name, tools, make_input in cases:
            if args.only and args.only not in name:
                continue
            for tool, argv in tools.items():
                ram = tool.startswith("incoming")
                small, large = make_input(n, ram), make_input(4 * n, ram)
                peaks = []
                for data in (small, large):
                    path = Path(tmp) / ("in.vmsd" if tools is SPEC_TOOLS else "in.mig")
                    path.write_bytes(data)
                    rc, rss = peak(argv(str(path), str(Path(tmp) / "out")))
                    peaks.append((rc, rss))
                slope = (peaks[1][1] - peaks[0][1]) / (len(large) - len(small))
                rcs = "" if peaks[1][0] == 0 else f" (exit {peaks[1][0]})"
                print(f"| {name} | {tool}{rcs} | {len(small)} | {peaks[1][1] / (1 << 20):.0f} | {slope:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
