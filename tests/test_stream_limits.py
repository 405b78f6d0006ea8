"""Streams meet vmsd.migration.limits: nesting, announced sizes and record counts stay bounded.

Memory is asserted with tracemalloc against the input's size, work never by time.
"""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hostile_inputs
from vmsd.cli import EXIT_FINDINGS, main
from vmsd.migration.limits import MAX_PACKAGE_DEPTH
from vmsd.migration.ram.blocks import RamBlocks
from vmsd.migration.ram.records import PLAIN, RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_MEM_SIZE
from vmsd.migration.ram.wire import RamLoader
from vmsd.migration.stream import Command, SpecSet, read_stream, write_stream
from vmsd.runtime.errors import MalformedStream, VMSDError
from vmsd.runtime.io import Reader
from vmsd.tools import streams

HEADER = b"QEVM\x00\x00\x00\x03"
EOF = b"\x00"
NO_SPECS = SpecSet()


def command(cmd: int, data: bytes) -> bytes:
    return b"\x08" + struct.pack(">HH", cmd, len(data)) + data


def packaged(inner: bytes) -> bytes:
    return command(7, struct.pack(">I", len(inner))) + inner


def nested(depth: int) -> bytes:
    inner = EOF
    for _ in range(depth):
        inner = packaged(inner)
    return HEADER + inner + EOF


PING = 3  # any fixed-length command with data serves (QEMU's POSTCOPY_ADVISE layout is free)


# ---- PACKAGED nesting ------------------------------------------------------------------------


def test_packages_nest_up_to_the_limit_and_rewrite_byte_for_byte() -> None:
    data = nested(MAX_PACKAGE_DEPTH)
    stream = read_stream(data, NO_SPECS)
    depth, rec = 0, stream.records[0]
    while isinstance(rec, Command) and rec.packaged is not None:
        depth, rec = depth + 1, (rec.packaged or [None])[0]
    assert depth == MAX_PACKAGE_DEPTH
    assert write_stream(stream) == data


@pytest.mark.parametrize("depth", [MAX_PACKAGE_DEPTH + 1, 2000, 20000])
def test_deeper_packages_are_one_located_error(depth: int) -> None:
    data = nested(depth)
    with pytest.raises(MalformedStream) as info:
        read_stream(data, NO_SPECS)
    assert f"PACKAGED commands nest more than {MAX_PACKAGE_DEPTH} deep" in info.value.message
    # The offending command is the (limit+1)-th header from the start: 9 bytes each.
    assert info.value.offset == len(HEADER) + 9 * MAX_PACKAGE_DEPTH


def test_every_stream_tool_reports_deep_packages_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "deep.mig"
    path.write_bytes(nested(2000))
    for argv in (["inspect", str(path)], ["inspect", "--json", str(path)], ["diff", str(path), str(path)],
                 ["rewrite", str(path), "-o", str(path) + ".out"]):
        assert main(argv) == EXIT_FINDINGS, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1 and "nest more than" in err, err


# ---- trailer-described trees -----------------------------------------------------------------


def _tree_stream(nnodes: int, bodies: int) -> bytes:
    payload = struct.pack(">I", nnodes) + b"".join(b"\x01" + struct.pack(">Q", i) + b"\x07" for i in range(nnodes)) + b"\x00"
    section = b"\x04" + struct.pack(">I", 0) + b"\x03dev" + struct.pack(">II", 0, 1) + payload + b"\x7e" + struct.pack(">I", 0)
    body = {"vmsd_name": "x", "version": 1, "fields": [{"name": "b", "type": "uint8", "size": 1}]}
    # Repeated bodies follow each other as repeated keys (duplicate keys, as QEMU writes them).
    text = json.dumps({"name": "t", "type": "gtree", "size": len(payload)})[:-1]
    text += "".join(", " + json.dumps(body)[1:-1] for _ in range(bodies)) + "}"
    trailer = ('{"page_size": 4096, "devices": [{"name": "dev", "instance_id": 0, "vmsd_name": "dev", '
               '"version": 1, "fields": [' + text + "]}]}").encode()
    return HEADER + section + EOF + b"\x06" + struct.pack(">I", len(trailer)) + trailer


def test_a_tree_with_more_nodes_than_described_bodies_is_malformed() -> None:
    assert len(read_stream(_tree_stream(2, 2), NO_SPECS).sections()) == 1
    with pytest.raises(MalformedStream) as info:
        read_stream(_tree_stream(3, 1), NO_SPECS)
    assert "tree announces 3 nodes, its description has 1" in info.value.message
    assert info.value.section == "dev"


# ---- memory follows the input --------------------------------------------------------------


def _peak(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        fn()
        return int(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()


class _Sink(io.TextIOBase):
    """Standard output as the tools see it: text goes by and is not kept."""

    def __init__(self) -> None:
        self.chars = 0

    def write(self, text: str) -> int:
        self.chars += len(text)
        return len(text)


def _inspect_all(data: bytes) -> int:
    """What inspect (tree and --json) and rewrite do with a stream."""
    stream = read_stream(data, NO_SPECS)
    sink = _Sink()
    streams.write_json(stream, sink)
    for line in streams.tree_lines(stream):
        sink.write(line)
    assert write_stream(stream) == data
    return sink.chars


def test_a_run_of_identical_commands_is_one_record() -> None:
    n = 1 << 17
    data = HEADER + command(PING, b"\x00\x00\x00\x01") * n + EOF
    stream = read_stream(data, NO_SPECS)
    assert len(stream.records) == 1 and isinstance(stream.records[0], Command) and stream.records[0].count == n
    assert write_stream(stream) == data
    assert "(repeated 131072 times)" in streams.stream_tree(stream)
    assert streams.stream_json(stream)["records"][0]["count"] == n
    # The text and JSON outputs, the rewrite and the decode together stay near the input's size.
    assert _peak(lambda: _inspect_all(data)) < 4 * len(data) + (256 << 10)


def test_streamed_json_is_the_same_document() -> None:
    data = HEADER + command(PING, b"\x00\x00\x00\x01") * 3 + command(PING, b"\x00\x00\x00\x02") + packaged(
        command(PING, b"\x00\x00\x00\x05") * 2 + EOF) + EOF
    stream = read_stream(data, NO_SPECS)
    sink = io.StringIO()
    streams.write_json(stream, sink)
    assert sink.getvalue() == json.dumps(streams.stream_json(stream), separators=(",", ":"))


def test_distinct_small_commands_cost_a_bounded_multiple_of_their_bytes() -> None:
    """No run to fold: each command is an object, its data shared with equal ones."""
    n = 1 << 15
    data = HEADER + b"".join(command(PING, struct.pack(">I", i & 1)) for i in range(n)) + EOF
    chars: list[int] = []
    peak = _peak(lambda: chars.append(_inspect_all(data)))
    assert chars[0] > 10 * len(data)  # the outputs are far larger than the input, yet not held
    assert peak < 20 * len(data), (peak, len(data))  # ~136 bytes per 9-byte command


# ---- announced RAM ---------------------------------------------------------------------------


def _mem_size(blocks: list[tuple[bytes, int]]) -> bytes:
    total = sum(length for _, length in blocks)
    out = struct.pack(">Q", total | RAM_SAVE_FLAG_MEM_SIZE)
    for name, length in blocks:
        out += bytes([len(name)]) + name + struct.pack(">Q", length)
    return out + struct.pack(">Q", RAM_SAVE_FLAG_EOS)


def test_announced_ram_above_the_limit_is_refused_before_any_block_exists() -> None:
    blocks = RamBlocks(limit=64 << 20)
    loader = RamLoader(blocks, create_missing=True)
    with pytest.raises(MalformedStream) as info:
        loader.load_section(Reader(_mem_size([(b"pc.ram", 1 << 40)])), PLAIN)
    assert "announces 0x10000000000 bytes of RAM, above the limit of 0x4000000 (max-ram)" in info.value.message
    assert len(blocks) == 0
    # Several blocks count together.
    with pytest.raises(MalformedStream):
        loader.load_section(Reader(_mem_size([(b"a", 48 << 20), (b"b", 32 << 20)])), PLAIN)
    assert len(blocks) == 0
    loader.load_section(Reader(_mem_size([(b"pc.ram", 32 << 20), (b"vga.vram", 16 << 20)])), PLAIN)
    try:
        assert blocks.names() == ["pc.ram", "vga.vram"] and blocks.total() == 48 << 20
    finally:
        blocks.close()


def test_ram_blocks_above_their_limit_are_refused_before_any_block_exists() -> None:
    blocks = RamBlocks(limit=64 << 20, max_blocks=2)
    loader = RamLoader(blocks, create_missing=True)
    with pytest.raises(MalformedStream) as info:
        loader.load_section(Reader(_mem_size([(b"a", 4096), (b"b", 4096), (b"c", 4096)])), PLAIN)
    assert "announces 3 RAM blocks, above the limit of 2 (max-ram-blocks)" in info.value.message
    assert len(blocks) == 0
    loader.load_section(Reader(_mem_size([(b"a", 4096), (b"b", 4096)])), PLAIN)
    try:
        assert blocks.names() == ["a", "b"]
        # The blocks it has count: a later list naming them again adds none, a new one is one too many.
        loader.load_section(Reader(_mem_size([(b"a", 4096), (b"b", 4096)])), PLAIN)
        with pytest.raises(MalformedStream):
            loader.load_section(Reader(_mem_size([(b"c", 4096)])), PLAIN)
        assert blocks.names() == ["a", "b"]
    finally:
        blocks.close()


def test_incoming_refuses_more_ram_blocks_than_max_ram_blocks(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    path, out = tmp_path / "in.mig", tmp_path / "out.mig"
    path.write_bytes(hostile_inputs.many_ram_blocks(14 * 20))  # 20 one-page blocks
    argv = ["incoming", f"file:{path}", "-o", str(out), "--max-ram-blocks"]
    assert main([*argv, "19"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "announces 20 RAM blocks, above the limit of 19 (max-ram-blocks)" in err[0], err
    assert not out.exists()
    assert main([*argv, "20"]) == 0 and out.exists()
    assert main(["incoming", f"file:{path}", "-o", str(out), "--force", "--max-ram-blocks", "0"]) == 2


def test_incoming_takes_max_ram_with_suffixes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["incoming", "unix:/nonexistent/x.sock", "-o", "/nonexistent/x.mig", "--max-ram", "12X"]) != 0
    assert "--max-ram: expected a number with an optional K/M/G/T suffix" in capsys.readouterr().err


# ---- fuzz ------------------------------------------------------------------------------------

_piece = st.one_of(
    st.builds(lambda v, n: command(PING, struct.pack(">I", v)) * n, st.integers(0, 2), st.integers(1, 50)),
    st.just(command(4, b"")),
    st.just("open"),
    st.just("close"),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_piece, max_size=40))
def test_random_command_runs_and_packages_round_trip_or_fail_cleanly(pieces: list[object]) -> None:
    """Runs, packages (balanced or not, nested past the limit or not): decode or one VMSDError;
    what decodes rewrites byte for byte."""
    stack: list[bytes] = [b""]
    for p in pieces:
        if p == "open":
            stack.append(b"")
        elif p == "close" and len(stack) > 1:
            inner = stack.pop() + EOF
            stack[-1] += packaged(inner)
        elif isinstance(p, bytes):
            stack[-1] += p
    while len(stack) > 1:
        inner = stack.pop() + EOF
        stack[-1] += packaged(inner)
    data = HEADER + stack[0] + EOF
    try:
        stream = read_stream(data, NO_SPECS)
    except VMSDError as e:
        assert "nest more than" in e.message
        return
    assert write_stream(stream) == data
    assert sum(1 for r in stream.records if isinstance(r, Command)) <= data.count(b"\x08")
