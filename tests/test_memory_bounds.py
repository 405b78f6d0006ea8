"""Every tool's memory is a bounded multiple of its input, on inputs made of as many tiny records as fit.

Each tool runs in-process (``vmsd.cli.main``, standard output counted and dropped) on an input of N
and of 4N bytes from tests/hostile_inputs.py; tracemalloc's peak of the two gives the slope
(peak(4N) - peak(N)) / 3N, the bytes of memory a further byte of input costs, which must stay within
the multiple docs/limits.md states for that kind of input.  Imports and caches are left out by a first
run that is not measured.  No timing.
"""

from __future__ import annotations

import gc
import io
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

import hostile_inputs
from vmsd.cli import main
from vmsd.migration.limits import MAX_RAM_BLOCKS

N = 32 << 10

# Bytes of memory per byte of input (docs/limits.md), by input: the worst measured slope and a quarter more,
# of the tools that read one stream (inspect, rewrite, incoming), then of diff, which decodes both of its
# streams before it walks them.  Commands are kept as their bytes; sections and RAM sections are still an
# object each (with a shared idstr and, for RAM sections of no page, a shared summary).
STREAM_BOUNDS = {
    "distinct PINGs": (6, 6),
    "alternating empty commands": (6, 6),
    "distinct ADVISEs": (6, 6),
    "distinct RAM_DISCARDs": (6, 6),
    "distinct RECV_BITMAPs": (6, 6),
    "empty PACKAGEDs": (6, 6),
    "packages 8 deep": (13, 16),  # each level of package is decoded from its own copy of its bytes
    "typed 1-byte sections": (17, 38),
    "trailer-described sections": (18, 30),
    "one section, many fields": (29, 31),
    "one section, many subsections": (30, 38),
    "empty RAM sections": (20, 34),
    "many RAM blocks": (23, 37),  # incoming: see COUNTED_BLOCKS
    "zero pages of many blocks": (35, 51),
}
# A live destination has no trailer: sections only it describes are refused, as QEMU refuses them.
TRAILER_ONLY = {"trailer-described sections", "one section, many fields", "one section, many subsections"}
# incoming creates a memfd and its mapping per announced block (about 2 KiB of memory each): a count limit
# bounds them instead (test_incoming_memory_for_blocks_is_bounded_by_their_limit).
COUNTED_BLOCKS = {"many RAM blocks", "zero pages of many blocks"}
# incoming's memory for the most RAM blocks it takes (MAX_RAM_BLOCKS one-page blocks), in bytes per block.
BLOCK_BOUND = 2600
# Bytes of memory per byte of spec (docs/limits.md), by input and tool: the measured slope and a quarter more.
# check holds the spec's declarations and their resolved names; compile adds one class's fixed parts (its
# code is made again each time it is written), fmt the text of its output lines and the comments.
SPEC_BOUNDS = {
    "many vmsds": {"check": 48, "compile": 51, "fmt --check": 38},
    "many fields": {"check": 51, "compile": 57, "fmt --check": 45},
    "long docs": {"check": 12, "compile": 14, "fmt --check": 16},
    "many comments": {"check": 40, "compile": 49, "fmt --check": 38},
}

STREAM_TOOLS: dict[str, Callable[[str, str], list[str]]] = {
    "inspect": lambda s, o: ["inspect", s],
    "inspect --json": lambda s, o: ["inspect", "--json", s],
    "rewrite": lambda s, o: ["rewrite", s, "-o", o, "--force"],
    "diff": lambda s, o: ["diff", s, s],
    "incoming": lambda s, o: ["incoming", f"file:{s}", "-o", o, "--force"],
}
SPEC_TOOLS: dict[str, Callable[[str, str], list[str]]] = {
    "check": lambda s, o: ["check", s],
    "compile": lambda s, o: ["compile", "-o", o, s],
    "fmt --check": lambda s, o: ["fmt", "--check", s],
}


class _Sink(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


# The cyclic garbage collector's thresholds in a fresh process.  mypy's API (which other tests call in this
# process) raises them for good, and garbage left for the collector then counts in the peak.
GC_THRESHOLDS = (700, 10, 10)


def _peak(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "stdout", _Sink())
    thresholds = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    tracemalloc.start()
    try:
        # fmt --check says 1 when the spec is not laid out canonically (these are not): still its whole work.
        assert main(argv) in ((0, 1) if argv[0] == "fmt" else (0,)), argv
        return int(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
        gc.set_threshold(*thresholds)
        monkeypatch.undo()


def _slope(make: Callable[[int], bytes], argv: Callable[[str, str], list[str]], name: str, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> tuple[float, int]:
    path, out = tmp_path / name, str(tmp_path / "out")
    small, large = make(N), make(4 * N)
    path.write_bytes(small)
    _peak(argv(str(path), out), monkeypatch)  # imports, spec sets and caches: not the input's cost
    peaks = []
    for data in (small, large):
        path.write_bytes(data)
        peaks.append(_peak(argv(str(path), out), monkeypatch))
    return (peaks[1] - peaks[0]) / (len(large) - len(small)), len(large)


@pytest.mark.parametrize("tool", STREAM_TOOLS)
@pytest.mark.parametrize("kind", STREAM_BOUNDS)
def test_stream_tools_memory_follows_the_input(kind: str, tool: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    if tool == "incoming" and kind in TRAILER_ONLY:
        pytest.skip("a live destination has no trailer to decode these sections by")
    if tool == "incoming" and kind in COUNTED_BLOCKS:
        pytest.skip("bounded by the count of blocks, not by the input's size")
    maker = hostile_inputs.STREAMS[kind]
    ram = tool == "incoming"  # a destination needs a RAM section first

    def make(size: int) -> bytes:
        return maker(size, ram)

    slope, _ = _slope(make, STREAM_TOOLS[tool], "in.mig", tmp_path, monkeypatch)
    assert slope <= STREAM_BOUNDS[kind][1 if tool == "diff" else 0], (kind, tool, slope)


@pytest.mark.parametrize("kind", sorted(COUNTED_BLOCKS))
def test_incoming_memory_for_blocks_is_bounded_by_their_limit(kind: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """At the limit of blocks, incoming's memory is a bound per block; one block more is refused."""
    path, out = tmp_path / "in.mig", str(tmp_path / "out")
    per_block = {"many RAM blocks": 14, "zero pages of many blocks": 29}[kind]
    argv = ["incoming", f"file:{path}", "-o", out, "--force"]
    path.write_bytes(hostile_inputs.STREAMS[kind](per_block))
    _peak(argv, monkeypatch)  # imports and caches: not the blocks' cost
    path.write_bytes(hostile_inputs.STREAMS[kind](per_block * MAX_RAM_BLOCKS))
    peak = _peak(argv, monkeypatch)
    assert peak <= BLOCK_BOUND * MAX_RAM_BLOCKS, (kind, peak / MAX_RAM_BLOCKS)
    path.write_bytes(hostile_inputs.STREAMS[kind](per_block * (MAX_RAM_BLOCKS + 1)))
    assert main(argv) == 1


@pytest.mark.parametrize("tool", SPEC_TOOLS)
@pytest.mark.parametrize("kind", SPEC_BOUNDS)
def test_spec_tools_memory_follows_the_spec(kind: str, tool: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    maker = hostile_inputs.SPECS[kind]
    slope, _ = _slope(lambda size: maker(size).encode(), SPEC_TOOLS[tool], "in.vmsd", tmp_path, monkeypatch)
    assert slope <= SPEC_BOUNDS[kind][tool], (kind, tool, slope)
