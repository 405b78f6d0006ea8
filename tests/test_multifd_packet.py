"""The multifd wire format on its own: packet headers and initial packets, encoded and decoded without
threads, sockets or RAM blocks, for every peer profile."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsd.migration.multifd.codecs import CODECS
from vmsd.migration.multifd.packet import (
    FLAG_SYNC,
    HEADER_SIZE,
    INITIAL_SIZE,
    MULTIFD_MAGIC,
    MULTIFD_VERSION,
    NAME_MAX,
    PAGES_PER_PACKET,
    MultifdError,
    PacketHeader,
    decode_header,
    encode_header,
    initial_packet,
    page_flags,
    parse_initial,
)
from vmsd.migration.profile import PROFILES, PeerProfile
from vmsd.migration.ram.blocks import PAGE_SIZE
from vmsd.runtime.errors import MalformedStream, VMSDError

PEERS = list(PROFILES.values())
V72, V10 = PROFILES["7.2"], PROFILES["10.0"]
MIB = 1 << 20

names = st.text(st.characters(blacklist_characters="\0", blacklist_categories=["Cs"]), min_size=1,
                max_size=NAME_MAX).filter(lambda s: 1 <= len(s.encode()) <= NAME_MAX)
page_numbers = st.integers(0, (1 << 40) - 1)  # blocks of up to 4 PiB


def _raw(magic: int = MULTIFD_MAGIC, version: int = MULTIFD_VERSION, flags: int = 0, alloc: int = PAGES_PER_PACKET,
         normal: int = 0, size: int = 0, num: int = 0, zero: int = 0, name: bytes = b"pc.ram",
         offsets: tuple[int, ...] = ()) -> bytes:
    """A header with any field values, valid or not."""
    head = bytearray(HEADER_SIZE)
    struct.pack_into(">IIIIIIQI", head, 0, magic, version, flags, alloc, normal, size, num, zero)
    head[64:64 + len(name)] = name
    for i, off in enumerate(offsets):
        struct.pack_into(">Q", head, 320 + 8 * i, off)
    return bytes(head)


# -- round trips --------------------------------------------------------------------------------------------------
@st.composite
def packets(draw: st.DrawFn, peer: PeerProfile) -> tuple[str, list[int], list[int], int, int, int]:
    """(name, normal pages, zero pages, payload size, packet number, method flag) that ``peer`` can carry."""
    normal = draw(st.lists(page_numbers, max_size=PAGES_PER_PACKET))
    room = PAGES_PER_PACKET - len(normal) if peer.multifd_zero_pages else 0
    zero = draw(st.lists(page_numbers, max_size=room))
    method = draw(st.sampled_from(sorted(c.flag for c in CODECS.values())))
    return (draw(names), normal, zero, draw(st.integers(0, (1 << 32) - 1)), draw(st.integers(0, (1 << 64) - 1)),
            method)


@pytest.mark.parametrize("peer", PEERS, ids=str)
@settings(max_examples=150)
@given(data=st.data())
def test_a_header_decodes_to_what_was_encoded(peer: PeerProfile, data: st.DataObject) -> None:
    name, normal, zero, size, number, method = data.draw(packets(peer))
    flags = page_flags(peer, method, len(normal))
    raw = encode_header(peer, flags, name, normal, zero, size, number)
    assert len(raw) == HEADER_SIZE
    head = decode_header(raw, peer)
    assert (head.flags, head.allocated, head.normal, head.zero, head.size, head.number, head.block) == \
        (flags, PAGES_PER_PACKET, len(normal), len(zero), size, number, name)
    assert head.compression == flags and not head.sync
    head.check_compression(method, "any")
    assert head.offsets.tolist() == [p * PAGE_SIZE for p in [*normal, *zero]]
    length = (max([*normal, *zero], default=0) + 1) * PAGE_SIZE
    assert head.pages(length).tolist() == [*normal, *zero]
    assert raw[320 + 8 * (len(normal) + len(zero)):] == bytes(HEADER_SIZE - 320 - 8 * (len(normal) + len(zero)))


@pytest.mark.parametrize("peer", PEERS, ids=str)
def test_sync_packets_as_each_peer_lays_them_out(peer: PeerProfile) -> None:
    """9.0+: a bare header (nothing allocated, packet number 0); 7.2: filled as any packet."""
    raw = encode_header(peer, FLAG_SYNC, "", [], [], 0, 41)
    if peer.multifd_bare_sync:
        assert raw == struct.pack(">IIIIIIQI", MULTIFD_MAGIC, 1, FLAG_SYNC, 0, 0, 0, 0, 0).ljust(HEADER_SIZE, b"\0")
    else:
        assert raw == _raw(flags=FLAG_SYNC, num=41, name=b"")
    head = decode_header(raw, peer)
    assert head.sync and head.normal == head.zero == 0 and head.block == ""
    assert (head.allocated, head.number) == ((0, 0) if peer.multifd_bare_sync else (PAGES_PER_PACKET, 41))


@pytest.mark.parametrize("peer", PEERS, ids=str)
def test_packets_name_their_compression_as_each_peer_does(peer: PeerProfile) -> None:
    """7.2 flags the method only on packets with normal pages; 9.0+ on packets of zero pages only too."""
    zstd = CODECS["zstd"].flag
    assert page_flags(peer, zstd, 3) == zstd
    assert page_flags(peer, zstd, 0) == (zstd if peer.multifd_bare_sync else 0)
    assert page_flags(peer, CODECS["none"].flag, 0) == 0


# -- whatever comes in --------------------------------------------------------------------------------------------
@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """Anything, of any length; or a header whose magic and version are right and whose counts look sane,
    the rest random, so that the checks past the first ones are reached too."""
    if draw(st.booleans()):
        return draw(st.one_of(st.binary(max_size=2 * HEADER_SIZE), st.binary(min_size=HEADER_SIZE,
                                                                             max_size=HEADER_SIZE)))
    rest = bytearray(draw(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE)))
    struct.pack_into(">II", rest, 0, MULTIFD_MAGIC, MULTIFD_VERSION)
    if draw(st.booleans()):
        alloc = draw(st.integers(0, PAGES_PER_PACKET))
        normal = draw(st.integers(0, alloc))
        zero = draw(st.sampled_from([0, draw(st.integers(0, alloc - normal))]))
        struct.pack_into(">II", rest, 12, alloc, normal)
        struct.pack_into(">I", rest, 32, zero)
    if draw(st.booleans()):  # offsets in a small block, most of them pages
        for i in range(PAGES_PER_PACKET):
            struct.pack_into(">Q", rest, 320 + 8 * i, draw(st.sampled_from([0, 1, 4096, 8191, 1 << 16, 1 << 63])))
    return bytes(rest)


@pytest.mark.parametrize("peer", PEERS, ids=str)
@settings(max_examples=300)
@given(data=headers(), length=st.integers(0, 1 << 20), method=st.sampled_from([0, 2, 4]))
def test_any_bytes_decode_or_raise_a_stream_error(peer: PeerProfile, data: bytes, length: int, method: int) -> None:
    try:
        head = decode_header(data, peer)
        pages = head.pages(length)
        head.check_compression(method, "any")
    except VMSDError as e:
        assert isinstance(e, MalformedStream), e
        return
    assert len(data) == HEADER_SIZE
    assert head.normal + head.zero <= head.allocated <= PAGES_PER_PACKET
    assert all(0 <= p < length // PAGE_SIZE for p in pages.tolist())


@settings(max_examples=200)
@given(data=st.one_of(st.binary(max_size=2 * INITIAL_SIZE),
                      st.builds(lambda u, c: initial_packet(u, c), st.binary(min_size=16, max_size=16),
                                st.integers(0, 255))),
       uuid=st.sampled_from([bytes(16), b"\x01" * 16]), channels=st.integers(1, 255))
def test_any_initial_packet_parses_or_raises_a_multifd_error(data: bytes, uuid: bytes, channels: int) -> None:
    try:
        cid = parse_initial(data, uuid, channels, "c")
    except MultifdError as e:
        assert e.message.startswith("c: ")
        return
    assert 0 <= cid < channels and data[8:24] == uuid


# -- each check, with its message ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("peer", "data", "message"), [
    (V10, _raw()[:100], "packet header of 100 bytes, expected 1344"),
    (V10, _raw() + b"\0", "packet header of 1345 bytes, expected 1344"),
    (V10, _raw(magic=0x11223345), "received packet magic 0x11223345 and expected magic 0x11223344"),
    (V72, _raw(version=2), "received packet version 2 and expected version 1"),
    (V72, _raw(zero=3), "packet with 3 zero pages: the source uses a newer multifd layout than QEMU 7.2's "
                        "(--peer-version)"),
    (V10, _raw(alloc=129), "packet with 129 allocated, 0 normal and 0 zero pages (at most 128)"),
    (V10, _raw(alloc=4, normal=5), "packet with 4 allocated, 5 normal and 0 zero pages (at most 128)"),
    (V10, _raw(alloc=4, normal=3, zero=2), "packet with 4 allocated, 3 normal and 2 zero pages (at most 128)"),
    (V10, _raw(alloc=0xFFFFFFFF, normal=0xFFFFFFFF), "packet with 4294967295 allocated, 4294967295 normal"),
], ids=["short", "long", "magic", "version", "zero pages for 7.2", "allocated", "normal", "zero", "huge"])
def test_header_checks(peer: PeerProfile, data: bytes, message: str) -> None:
    with pytest.raises(MalformedStream) as e:
        decode_header(data, peer)
    assert message in e.value.message


@pytest.mark.parametrize(("offset", "length"), [
    (16 * PAGE_SIZE, 16 * PAGE_SIZE),  # one past the end
    (PAGE_SIZE + 8, 16 * PAGE_SIZE),  # not a page
    ((1 << 64) - PAGE_SIZE, 16 * PAGE_SIZE),  # negative if taken as signed: must not pass for page -1
    (1 << 63, 16 * PAGE_SIZE),
    (0, PAGE_SIZE - 1),  # a block shorter than a page holds none
])
def test_offsets_must_be_pages_of_the_block(offset: int, length: int) -> None:
    head = decode_header(_raw(normal=1, zero=1, offsets=(0, offset)), V10)
    with pytest.raises(MalformedStream) as e:
        head.pages(length)
    assert e.value.message == f"packet offset {offset:#x} is outside RAM block 'pc.ram' of {length:#x} bytes"


def test_offsets_up_to_the_last_page_pass() -> None:
    head = decode_header(_raw(normal=2, offsets=(15 * PAGE_SIZE, 0)), V10)
    assert head.pages(16 * PAGE_SIZE).tolist() == [15, 0]
    assert head.pages(16 * PAGE_SIZE).dtype == np.int64


@pytest.mark.parametrize("peer", PEERS, ids=str)
def test_compression_bits_are_those_of_the_peer(peer: PeerProfile) -> None:
    """The receiver looks only at the bits the peer's methods use: 0x10 (qpl) is not one in 7.2."""
    head = decode_header(_raw(flags=0x10 | FLAG_SYNC, normal=1, offsets=(0,)), peer)
    assert head.compression == (0x10 if peer.multifd_compression_mask & 0x10 else 0) and head.sync
    if peer.multifd_compression_mask & 0x10:
        with pytest.raises(MalformedStream, match=r"packet compression flag 0x10, expected 0x0 \(none\)"):
            head.check_compression(0, "none")
    else:
        head.check_compression(0, "none")
    head = decode_header(_raw(flags=0x02, normal=1, offsets=(0,)), peer)
    with pytest.raises(MalformedStream, match=r"^packet compression flag 0x2, expected 0x4 \(zstd\)$"):
        head.check_compression(0x04, "zstd")


def test_packets_of_zero_pages_name_no_method_that_matters() -> None:
    head = decode_header(_raw(flags=0x02, zero=2, offsets=(0, PAGE_SIZE)), V10)
    head.check_compression(0x04, "zstd")  # no normal pages: nothing to decompress


@pytest.mark.parametrize(("field", "name"), [
    (b"pc.ram\0garbage", "pc.ram"),  # up to the first NUL
    (b"x" * 256, "x" * 255),  # QEMU terminates the name at its 256th byte
    (b"ram\xff", "ram\ufffd"),  # not UTF-8: replaced, so it matches no block
    (b"", ""),
])
def test_block_names_end_at_the_first_nul(field: bytes, name: str) -> None:
    assert decode_header(_raw(name=field), V10).block == name


def test_what_no_peer_could_read_is_not_encoded() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        encode_header(V10, 0, "x" * 256, [0], [], PAGE_SIZE, 0)
    with pytest.raises(ValueError, match="does not fit"):
        encode_header(V10, 0, "pc\0ram", [0], [], PAGE_SIZE, 0)
    with pytest.raises(ValueError, match="at most 128"):
        encode_header(V10, 0, "pc.ram", list(range(100)), list(range(29)), 0, 0)
    with pytest.raises(ValueError, match=r"QEMU 7\.2 takes no zero pages"):
        encode_header(V72, 0, "pc.ram", [], [1], 0, 0)
    assert encode_header(V10, 0, "é" * 127, [0], [], PAGE_SIZE, 0)[64:64 + 255] == ("é" * 127).encode() + b"\0"


def test_headers_fit_their_fixed_size() -> None:
    raw = encode_header(V10, 4, "n" * NAME_MAX, list(range(64)), list(range(64, 128)), 1, (1 << 64) - 1)
    head = decode_header(raw, V10)
    assert len(raw) == HEADER_SIZE and head.block == "n" * NAME_MAX and head.number == (1 << 64) - 1
    assert isinstance(head, PacketHeader) and head.pages(128 * PAGE_SIZE).tolist() == list(range(128))


# -- initial packet -----------------------------------------------------------------------------------------------
@given(uuid=st.binary(min_size=16, max_size=16), cid=st.integers(0, 254), more=st.integers(1, 255))
def test_initial_packet_round_trip(uuid: bytes, cid: int, more: int) -> None:
    raw = initial_packet(uuid, cid)
    assert len(raw) == INITIAL_SIZE and raw[25:] == bytes(INITIAL_SIZE - 25)
    assert parse_initial(raw, uuid, min(255, cid + more), "c") == cid


U = bytes(range(16))


@pytest.mark.parametrize(("data", "channels", "message"), [
    (initial_packet(U, 0)[:20], 2, "c: initial packet of 20 bytes, expected 64"),
    (struct.pack(">I", 0x11223345) + initial_packet(U, 0)[4:], 2,
     "c: received packet magic 0x11223345 and expected magic 0x11223344"),
    (initial_packet(U, 0)[:4] + struct.pack(">I", 2) + initial_packet(U, 0)[8:], 2,
     "c: received packet version 2 and expected version 1"),
    (initial_packet(bytes(16), 1), 2, "c: received uuid '00000000-0000-0000-0000-000000000000' and expected uuid "
                                      "'00010203-0405-0607-0809-0a0b0c0d0e0f' for channel 1"),
    (initial_packet(U, 2), 2, "c: received channel id 2 is greater than number of channels 2"),
], ids=["short", "magic", "version", "uuid", "channel id"])
def test_initial_packet_checks(data: bytes, channels: int, message: str) -> None:
    with pytest.raises(MultifdError) as e:
        parse_initial(data, U, channels, "c")
    assert e.value.message == message
