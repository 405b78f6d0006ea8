"""Zero-page detection speed on a memfd RAM block, beside numpy memcpy of the same buffer.

Three contents: all zero, all random, first half random / second half zero.
Prints GB/s median, min and max over several runs, and zero-detection
speed as a ratio of the copy speed (bytes copied per second).

    .venv/bin/python benchmarks/zero_pages.py [--runs N] [--size-mib N]
"""

from __future__ import annotations

import os
import sys

# benchmarks/inspect.py would shadow the standard library's ``inspect``.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

from vmsd.migration.ram.blocks import PAGE_SIZE, RamBlock, zero_pages  # noqa: E402


def rates(fn: Callable[[], object], nbytes: int, runs: int) -> list[float]:
    fn()  # warm up (faults the pages in)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return out


def fmt(r: list[float]) -> str:
    return f"{statistics.median(r):7.2f} {min(r):7.2f} {max(r):7.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--size-mib", type=int, default=1024)
    args = ap.parse_args()
    size = args.size_mib << 20
    rng = np.random.default_rng(0)
    print(f"block {size >> 20} MiB ({size // PAGE_SIZE} pages), {args.runs} runs, GB/s = 1e9 bytes/s")
    print(f"{'content':<10} {'zero-detect med/min/max':>25} {'memcpy med/min/max':>25} {'ratio':>6}  zero pages")
    with RamBlock.memfd("bench", size) as block:
        dst = np.empty(size, dtype=np.uint8)
        for content in ("zero", "random", "half"):
            block.bytes_[:] = 0
            if content == "random":
                block.bytes_[:] = rng.integers(0, 256, size, dtype=np.uint8)
            elif content == "half":
                block.bytes_[: size // 2] = rng.integers(0, 256, size // 2, dtype=np.uint8)
            zero = rates(lambda: zero_pages(block), size, args.runs)
            copy = rates(lambda: np.copyto(dst, block.bytes_), size, args.runs)
            ratio = statistics.median(zero) / statistics.median(copy)
            nzero = int(np.count_nonzero(zero_pages(block)))
            print(f"{content:<10} {fmt(zero):>25} {fmt(copy):>25} {ratio:6.2f}  {nzero}")


if __name__ == "__main__":
    main()
