"""Generated codec vs the interpretive decoder, on the same bytes, in one run.

The interpretive path walks QEMU's JSON description of the state field by
field (as analyze-migration.py does); the generated path is the compiled
load/save.  Prints median, min and max of several runs and the ratios.

    .venv/bin/python benchmarks/codec.py [--runs N] [--entries N]
"""

from __future__ import annotations

import os
import sys

# benchmarks/inspect.py would shadow the standard library's ``inspect`` for
# everything imported below when this folder is first on sys.path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from vmsd.generated.bench.heavy import Heavy, HeavyEntry  # noqa: E402
from vmsd.generated.examples.serial import Serial  # noqa: E402
from vmsd.runtime.generic import decode_body, encode_body  # noqa: E402
from vmsd.runtime.io import Reader, Writer  # noqa: E402
from vmsd.runtime.vmdesc import describe, dumps, loads  # noqa: E402


def heavy_state(n: int) -> Heavy:
    rnd = random.Random(7)
    entries = [
        HeavyEntry(
            addr=rnd.getrandbits(64), len=rnd.getrandbits(32), flags=rnd.getrandbits(16), kind=rnd.getrandbits(8),
            prio=rnd.getrandbits(8), deadline=rnd.getrandbits(63), credit=rnd.getrandbits(31), seq=rnd.getrandbits(32),
            vector=rnd.getrandbits(16), qid=rnd.getrandbits(16), valid=rnd.random() < 0.5, dirty=rnd.random() < 0.5,
            state=rnd.getrandbits(8), owner=rnd.getrandbits(8), delta=rnd.getrandbits(15), crc=rnd.getrandbits(32),
            cookie=rnd.getrandbits(64), refs=rnd.getrandbits(31), gen=rnd.getrandbits(16), expiry=rnd.getrandbits(63),
        )
        for _ in range(n)
    ]
    return Heavy(count=n, entries=entries, regs=[rnd.getrandbits(8) for _ in range(64)])


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def row(label: str, gen: list[float], interp: list[float]) -> str:
    g, i = statistics.median(gen), statistics.median(interp)
    return (
        f"{label:<34} {g * 1e3:9.2f} ({min(gen) * 1e3:7.2f}-{max(gen) * 1e3:7.2f})"
        f" {i * 1e3:10.2f} ({min(interp) * 1e3:7.2f}-{max(interp) * 1e3:7.2f}) {i / g:8.1f}x"
    )


# Real QEMU 7.2 devices, by vmsd name, in their default state (the cpu with
# some registers set): small devices measure fixed per-object costs, the cpu
# and e1000 the bulk paths.
DEVICES = ["mc146818rtc", "serial", "i8254", "apic", "ioapic", "vga", "e1000", "cpu"]


def qemu_device(name: str) -> object:
    from vmsd.qemu.v7_2 import spec_set
    from vmsd.runtime.vmstate import impl

    cls = spec_set().get(name)
    assert cls is not None, name
    obj = impl(cls)()
    if name == "cpu":
        obj.regs = list(range(16))  # type: ignore[attr-defined]
    # Canonical form: a device's hooks may change state on save (QEMU's serial
    # pre_save), so the benchmarked object is the one a load produces.
    return cls.load(obj.save())  # type: ignore[attr-defined, no-any-return]


def bench(label: str, obj: object, runs: int, repeat: int) -> list[str]:
    data = obj.save()  # type: ignore[attr-defined]
    body = loads(dumps(describe(obj)[0]))
    cls: Any = type(obj)
    values = decode_body(Reader(data), body)

    def gen_load() -> None:
        for _ in range(repeat):
            cls.load(data)

    def interp_load() -> None:
        for _ in range(repeat):
            decode_body(Reader(data), body)

    def gen_save() -> None:
        for _ in range(repeat):
            obj.save()  # type: ignore[attr-defined]

    def interp_save() -> None:
        for _ in range(repeat):
            encode_body(Writer(), body, values)

    assert cls.load(data) == obj
    w = Writer()
    encode_body(w, body, values)
    assert w.getvalue() == data
    return [
        row(f"{label} load", timed(gen_load, runs), timed(interp_load, runs)),
        row(f"{label} save", timed(gen_save, runs), timed(interp_save, runs)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--entries", type=int, default=10_000)
    args = ap.parse_args()
    heavy = heavy_state(args.entries)
    serial = Serial(divider=12, ier=0x0F, lcr=0x03, scr=0x5A, poll_msl=3, modem_status_poll=123456789)
    print(f"{'case':<34} {'generated ms (min-max)':>29} {'interpretive ms (min-max)':>30} {'ratio':>8}")
    lines = bench(f"heavy {args.entries} x 20 fields", heavy, args.runs, 1)
    lines += bench("example serial x1000", serial, args.runs, 1000)
    for name in DEVICES:
        obj = qemu_device(name)
        repeat = max(10, 200_000 // (len(obj.save()) + 100))  # type: ignore[attr-defined]
        lines += bench(f"QEMU 7.2 {name} x{repeat}", obj, args.runs, repeat)
    print("\n".join(lines))
    print(f"(median of {args.runs} runs; ratio = interpretive / generated; {len(heavy.save())} bytes of heavy state)")


if __name__ == "__main__":
    main()
