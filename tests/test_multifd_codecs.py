"""Multifd compression methods on their own: each codec's send side and receive side, packet after packet
through one stream, without threads or sockets; and zstd frames read without inflating them, against
frames the zstandard library makes."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsd.migration.multifd.codecs import CODECS, Codec, _ZstdFeed
from vmsd.migration.multifd.packet import runs
from vmsd.migration.multifd.pageio import PageReader
from vmsd.migration.multifd.zstd_frames import (
    BLOCK_MAX,
    EMPTY_BLOCK,
    EMPTY_FRAME,
    MAGIC,
    ZstdBound,
    frame_content,
    frame_header_size,
)
from vmsd.migration.ram.blocks import PAGE_SIZE, RamBlock, RamBlocks
from vmsd.migration.transport import MemoryChannel, memory_pair
from vmsd.runtime.errors import MalformedStream

PAGES = 64
_RND = np.random.default_rng(3).integers(0, 256, PAGES * PAGE_SIZE, dtype=np.uint8).tobytes()
_BIG = np.random.default_rng(4).integers(0, 256, 9 * (128 << 10) + 3000, dtype=np.uint8).tobytes()
_KINDS = {"random": lambda p: _RND[p * PAGE_SIZE:(p + 1) * PAGE_SIZE], "zero": lambda p: bytes(PAGE_SIZE),
          "text": lambda p: ((b"vmsd page %d " % p) * PAGE_SIZE)[:PAGE_SIZE]}


def _channel(data: bytes) -> MemoryChannel:
    """A channel without a descriptor (so nothing is spliced) that holds ``data``, then ends."""
    a, b = memory_pair(capacity=len(data) + 1)
    a.write(data)
    a.close()
    return b


@contextlib.contextmanager
def _block(in_place: bool) -> Iterator[RamBlock]:
    with RamBlocks() as blocks:
        block = blocks.create("pc.ram", PAGES * PAGE_SIZE)
        if in_place:
            block.prealloc()  # written through its mapping, not its file
        block.bytes_[:] = 0x5A
        yield block


def _send(codec: Codec, level: int, packets: list[tuple[list[int], bytes]]) -> list[tuple[bytes, int]]:
    """Each packet's payload and size, as one channel's compressor makes them, in turn."""
    comp = codec.compressor(level)
    out = []
    for pages, content in packets:
        at = 0
        views = []
        for _, n in runs(pages):
            views.append(memoryview(content)[at:at + n * PAGE_SIZE])
            at += n * PAGE_SIZE
        payload = b"".join(comp.send_prepare(views))
        out.append((payload, len(payload)))
    return out


def _receive(codec: Codec, block: RamBlock, packets: list[tuple[list[int], bytes]],
             payloads: list[tuple[bytes, int]]) -> None:
    """Through one channel's decompressor, packet after packet; each lands in its pages, and only there."""
    channel = _channel(b"".join(p for p, _ in payloads))
    reader = PageReader(channel, splice=codec.splices)
    assert not reader.splices
    decomp = codec.decompressor(reader)
    want = bytearray(block.view)
    for (pages, content), (_, size) in zip(packets, payloads, strict=True):
        took = decomp.recv(block, runs(pages), len(pages), size)
        assert took == (len(pages) * PAGE_SIZE if codec.name == "none" else size)
        for i, p in enumerate(pages):
            want[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = content[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        assert bytes(block.view) == bytes(want)
    assert channel.read_full(memoryview(bytearray(1))) == 0  # every byte taken, no more


# Packets as (pages, kind of each of the block's pages), one after another on a channel.
packet_lists = st.lists(
    st.tuples(st.lists(st.integers(0, PAGES - 1), min_size=1, max_size=PAGES, unique=True).map(sorted),
              st.lists(st.sampled_from(sorted(_KINDS)), min_size=PAGES, max_size=PAGES)),
    min_size=1, max_size=3,
)


def _contents(drawn: list[tuple[list[int], list[str]]]) -> list[tuple[list[int], bytes]]:
    """Each packet's pages and their contents, back to back (each page ends in its number)."""
    return [(pages, b"".join(_KINDS[kinds[p]](p)[:-1] + bytes([p]) for p in pages)) for pages, kinds in drawn]


@pytest.mark.parametrize("in_place", [False, True], ids=["via fd", "in place"])
@pytest.mark.parametrize(("name", "levels"), [("none", [0]), ("zlib", [0, 1, 9]), ("zstd", [1, 3])])
@settings(max_examples=20, deadline=None)
@given(drawn=packet_lists, pick=st.integers(0, 2))
def test_pages_through_a_codec_land_in_their_runs(name: str, levels: list[int], in_place: bool,
                                                  drawn: list[tuple[list[int], list[str]]], pick: int) -> None:
    codec = CODECS[name]
    packets = _contents(drawn)
    payloads = _send(codec, levels[pick % len(levels)], packets)
    with _block(in_place) as block:
        _receive(codec, block, packets, payloads)


@settings(max_examples=20, deadline=None)
@given(drawn=packet_lists)
def test_qemus_zstd_stream_lands_in_its_pages(drawn: list[tuple[list[int], list[str]]]) -> None:
    """QEMU keeps one zstd frame per channel, flushed on a block boundary at the end of each packet."""
    packets = _contents(drawn)
    z = zstandard.ZstdCompressor().compressobj()
    payloads = []
    for _, content in packets:
        payload = z.compress(content) + z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        payloads.append((payload, len(payload)))
    with _block(False) as block:
        _receive(CODECS["zstd"], block, packets, payloads)


def test_stored_zstd_frames_skip_the_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our frames of incompressible pages are stored blocks: written from the payload as they are."""
    def refuse(self: _ZstdFeed, size: int) -> bytes:
        raise AssertionError("the decoder was asked for input")

    monkeypatch.setattr(_ZstdFeed, "read", refuse)
    packets = [([0, 1, 2, 7, 40], _RND[:5 * PAGE_SIZE]), (list(range(8, 48)), _RND[:40 * PAGE_SIZE])]
    with _block(False) as block:
        _receive(CODECS["zstd"], block, packets, _send(CODECS["zstd"], 1, packets))


def test_codecs_name_their_packet_flags() -> None:
    assert {n: (c.name, c.flag, c.splices) for n, c in CODECS.items()} == {
        "none": ("none", 0x00, True), "zlib": ("zlib", 0x02, False), "zstd": ("zstd", 0x04, True)}


def test_a_compressed_payload_too_large_for_its_pages() -> None:
    with _block(False) as block:
        decomp = CODECS["zlib"].decompressor(PageReader(_channel(b""), splice=False))
        with pytest.raises(MalformedStream, match="compressed payload of 12289 bytes for 1 pages"):
            decomp.recv(block, [(0, 1)], 1, 2 * PAGE_SIZE + 4097)


# -- zstd frames --------------------------------------------------------------------------------------------------
contents = st.lists(st.tuples(st.sampled_from(["random", "zero", "text"]), st.integers(1, 3 * BLOCK_MAX + 999)),
                    min_size=1, max_size=3)


def _content(kind: str, n: int, k: int = 0) -> bytes:
    """``n`` bytes of a kind; random ones differ for each ``k`` (< 3), so a stream finds no repeat."""
    if kind == "random":
        return _BIG[k * (len(_BIG) // 3):][:n]
    return bytes(n) if kind == "zero" else (b"vmsd frames " * (n // 12 + 1))[:n]


@settings(max_examples=60, deadline=None)
@given(parts=contents, checksum=st.booleans(), content_size=st.booleans())
def test_bound_of_whole_frames(parts: list[tuple[str, int]], checksum: bool, content_size: bool) -> None:
    """Whole frames as the library makes them: what they can inflate to, exact where no block is compressed;
    stored blocks found exactly where every block is stored and no checksum follows."""
    z = zstandard.ZstdCompressor(write_checksum=checksum, write_content_size=content_size)
    data = [_content(kind, n) for kind, n in parts]
    frames = [z.compress(d) for d in data]
    for f, d in zip(frames, data, strict=True):
        assert frame_header_size(f[4]) == zstandard.frame_header_size(f)
        stated = zstandard.get_frame_parameters(f).content_size
        assert frame_content(memoryview(f)[:frame_header_size(f[4])]) == (len(d) if content_size else None)
        assert stated == (len(d) if content_size else zstandard.CONTENTSIZE_UNKNOWN)
    bound = ZstdBound()
    payload = memoryview(b"".join(frames))
    most, exact = bound.bound(payload)
    total = sum(len(d) for d in data)
    assert not bound.in_frame and most >= total
    if exact:  # raw and RLE blocks only
        assert most == total
    if {kind for kind, _ in parts} == {"random"}:  # incompressible: stored blocks only
        assert exact
        assert (bound.stored is None) == checksum
    if bound.stored is not None:
        assert b"".join(bytes(payload[at:at + n]) for at, n in bound.stored) == b"".join(data)


@settings(max_examples=30, deadline=None)
@given(parts=contents)
def test_bound_across_packets_of_one_frame(parts: list[tuple[str, int]]) -> None:
    """QEMU's stream: one frame left open, each packet whole blocks; each packet bounded on its own."""
    z = zstandard.ZstdCompressor().compressobj()
    bound = ZstdBound()
    for k, (kind, n) in enumerate(parts):
        packet = z.compress(_content(kind, n, k)) + z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        most, exact = bound.bound(memoryview(packet))
        assert bound.in_frame and bound.stored is None and most >= n
        if exact:
            assert most == n
        if kind == "random":  # stored blocks
            assert exact and most == n


def test_empty_block_and_frame_inflate_to_nothing() -> None:
    d = zstandard.ZstdDecompressor()
    assert d.decompress(EMPTY_FRAME) == b""
    assert frame_header_size(EMPTY_FRAME[4]) == zstandard.frame_header_size(EMPTY_FRAME)
    frame = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    opened = frame.compress(b"x" * 100) + frame.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    ended = frame.flush()
    assert zstandard.ZstdDecompressor().decompressobj().decompress(opened + EMPTY_BLOCK + ended) == b"x" * 100


_HEADER = MAGIC + b"\xe0" + (100).to_bytes(8, "little")  # single segment, 8-byte content size


@pytest.mark.parametrize(("data", "message"), [
    (b"\x28\xb5\x2f\xfe\x00", "zstd payload does not start a frame or a block"),
    (MAGIC, "zstd payload does not start a frame or a block"),
    (_HEADER[:9], "zstd frame header cut short"),
    (_HEADER + b"\x01\x00", "zstd block header cut short"),
    (_HEADER + (3 << 1 | 1).to_bytes(3, "little"), "zstd block of the reserved type"),
    (_HEADER + (100 << 3 | 1).to_bytes(3, "little") + bytes(10), "zstd block runs past the payload"),
])
def test_bound_refuses_what_is_not_whole_frames_and_blocks(data: bytes, message: str) -> None:
    with pytest.raises(MalformedStream, match=message):
        ZstdBound().bound(memoryview(data))


@settings(max_examples=300)
@given(data=st.one_of(st.binary(max_size=64), st.binary(max_size=64).map(lambda b: MAGIC + b),
                      st.binary(max_size=64).map(lambda b: _HEADER + b)), open_frame=st.booleans())
def test_bound_of_any_bytes_is_a_number_or_a_stream_error(data: bytes, open_frame: bool) -> None:
    bound = ZstdBound()
    bound.in_frame = open_frame
    try:
        most, _ = bound.bound(memoryview(data))
    except MalformedStream:
        return
    assert most >= 0 and (bound.stored is None or all(at + n <= len(data) for at, n in bound.stored))


def test_stored_pieces_come_in_order() -> None:
    """A frame of three stored blocks: three pieces, each after the previous one and its next header."""
    frame = zstandard.ZstdCompressor().compress(_BIG[:3 * BLOCK_MAX])
    bound = ZstdBound()
    bound.bound(memoryview(frame))
    assert bound.stored is not None and len(bound.stored) == 3
    assert all(a + n + 3 == b for (a, n), (b, _) in itertools.pairwise(bound.stored))
    assert [n for _, n in bound.stored] == [BLOCK_MAX] * 3
