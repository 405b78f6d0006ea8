"""The multifd wire format: the initial packet and the RAM packet header, as QEMU lays them out.

Pure: bytes in, bytes or records out; no threads, sockets or RAM blocks.
Where QEMU versions differ (they do not negotiate), the peer's
:class:`~vmsd.migration.profile.PeerProfile` says which layout to use.

Every connection starts with a 64-byte initial packet (magic, version, the
sender's UUID, channel id).  Each RAM packet then starts with a fixed header
of 1344 bytes, always sent in full::

    0    magic, version, flags, pages allocated, normal pages,
         payload size (u32 each), packet number (u64), zero pages (u32)
    36   unused, zeros
    64   RAM block name, NUL-terminated (at most 255 bytes)
    320  128 page offsets (u64), normal pages first, then zero pages

all big-endian, followed by the payload: the normal pages, raw or through the
channel's compressor.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import attrs
import numpy as np
import numpy.typing as npt

from vmsd.migration.profile import PeerProfile
from vmsd.migration.ram.blocks import PAGE_SIZE, Pages
from vmsd.runtime.errors import MalformedStream, VMSDError

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
PAGES_PER_PACKET = (512 << 10) // PAGE_SIZE  # 128
HEADER_SIZE = 320 + 8 * PAGES_PER_PACKET  # 1344, always sent in full
INITIAL_SIZE = 64
FLAG_SYNC = 0x01
NAME_MAX = 255  # QEMU terminates the 256-byte name field itself: its last byte is never read

_HEAD = struct.Struct(">IIIIIIQI")  # magic .. zero_pages (36 bytes)
_NAME_AT = 64
_OFFSETS_AT = 320
_INITIAL = struct.Struct(">II16sB")


class MultifdError(VMSDError):
    """A multifd channel failed; the message names the channel."""


# -- initial packet -----------------------------------------------------------------------------------------------
def initial_packet(uuid: bytes, channel_id: int) -> bytes:
    return _INITIAL.pack(MULTIFD_MAGIC, MULTIFD_VERSION, uuid, channel_id).ljust(INITIAL_SIZE, b"\0")


def parse_initial(data: bytes, uuid: bytes, channels: int, name: str) -> int:
    """The channel id of an initial packet, checked as QEMU checks it against our ``uuid`` and ``channels``;
    ``name`` (the connection's) starts every error message."""
    if len(data) < _INITIAL.size:
        raise MultifdError(f"{name}: initial packet of {len(data)} bytes, expected {INITIAL_SIZE}")
    magic, version, got, cid = _INITIAL.unpack_from(data)
    if magic != MULTIFD_MAGIC:
        raise MultifdError(f"{name}: received packet magic {magic:#x} and expected magic {MULTIFD_MAGIC:#x}")
    if version != MULTIFD_VERSION:
        raise MultifdError(f"{name}: received packet version {version} and expected version {MULTIFD_VERSION}")
    if got != uuid:
        raise MultifdError(f"{name}: received uuid '{_uuid_text(got)}' and expected uuid "
                           f"'{_uuid_text(uuid)}' for channel {cid}")
    if cid >= channels:
        raise MultifdError(f"{name}: received channel id {cid} is greater than number of channels {channels}")
    return int(cid)


def _uuid_text(u: bytes) -> str:
    h = u.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# -- packet header: encoding --------------------------------------------------------------------------------------
def page_flags(peer: PeerProfile, method_flag: int, normal: int) -> int:
    """The flags of a packet of pages: the compression method's flag, which 7.2 sets only on packets
    that carry normal pages and 9.0+ on every packet (:attr:`PeerProfile.multifd_bare_sync`)."""
    return method_flag if (normal or peer.multifd_bare_sync) else 0


def encode_header(peer: PeerProfile, flags: int, block: str, normal: Sequence[int], zero: Sequence[int],
                  size: int, number: int) -> bytes:
    """A packet header: ``normal`` and ``zero`` are page numbers in ``block``, ``size`` the payload's bytes.

    A SYNC packet alone (``flags == FLAG_SYNC``) is a bare header for a peer
    that expects one (no pages allocated, packet number 0, so ``number`` is
    not used: the caller takes none for it); for others it is filled as any
    packet.  ValueError for what no peer could read (a name QEMU cuts short,
    more than 128 pages, zero pages where the peer has none).
    """
    raw = block.encode()
    if len(raw) > NAME_MAX or b"\0" in raw:
        raise ValueError(f"RAM block name '{block}' does not fit a multifd packet")
    if len(normal) + len(zero) > PAGES_PER_PACKET:
        raise ValueError(f"{len(normal)} normal and {len(zero)} zero pages in one packet (at most {PAGES_PER_PACKET})")
    if zero and not peer.multifd_zero_pages:
        raise ValueError(f"{peer} takes no zero pages in multifd packets")
    bare = flags == FLAG_SYNC and peer.multifd_bare_sync
    alloc = 0 if bare else PAGES_PER_PACKET
    num = 0 if bare else number
    head = bytearray(HEADER_SIZE)
    _HEAD.pack_into(head, 0, MULTIFD_MAGIC, MULTIFD_VERSION, flags, alloc, len(normal), size, num, len(zero))
    head[_NAME_AT:_NAME_AT + len(raw)] = raw
    offsets = np.array([*normal, *zero], dtype=np.int64) * PAGE_SIZE
    head[_OFFSETS_AT:_OFFSETS_AT + 8 * offsets.size] = offsets.astype(">u8").tobytes()
    return bytes(head)


# -- packet header: decoding --------------------------------------------------------------------------------------
@attrs.frozen(eq=False)  # an array field: compare fields, not headers
class PacketHeader:
    """A decoded header whose counts are checked; its offsets are checked by :meth:`pages`, against the
    block the caller found by :attr:`block`."""

    flags: int
    compression: int  # the flags' bits that name a compression method (the profile's mask)
    allocated: int
    normal: int
    zero: int
    size: int  # payload bytes
    number: int
    block: str
    offsets: npt.NDArray[np.uint64]  # normal, then zero pages; not checked yet

    @property
    def sync(self) -> bool:
        return bool(self.flags & FLAG_SYNC)

    def pages(self, block_length: int) -> Pages:
        """The page numbers of the offsets (normal, then zero), each checked to be a page of a block of
        ``block_length`` bytes."""
        offsets = self.offsets  # unsigned, as sent: a huge offset must not pass for a negative one
        if block_length >= PAGE_SIZE:
            outside = offsets > np.uint64(block_length - PAGE_SIZE)
        else:
            outside = np.ones(offsets.size, dtype=np.bool_)
        bad = np.flatnonzero(outside | (offsets % PAGE_SIZE != 0))
        if bad.size:
            raise MalformedStream(f"packet offset {int(offsets[bad[0]]):#x} is outside RAM block '{self.block}' "
                                  f"of {block_length:#x} bytes")
        return (offsets // PAGE_SIZE).view(np.int64)  # all below 2**52 now

    def check_compression(self, method_flag: int, method: str) -> None:
        """A packet with normal pages must name the channel's compression method."""
        if self.normal and self.compression != method_flag:
            raise MalformedStream(f"packet compression flag {self.compression:#x}, expected {method_flag:#x} "
                                  f"({method})")


def decode_header(data: bytes | bytearray | memoryview, peer: PeerProfile) -> PacketHeader:
    """A header as ``peer`` lays it out, with QEMU's checks (and one for zero pages from a newer source)."""
    if len(data) != HEADER_SIZE:
        raise MalformedStream(f"packet header of {len(data)} bytes, expected {HEADER_SIZE}")
    magic, version, flags, alloc, normal, size, num, zero = _HEAD.unpack_from(data)
    if magic != MULTIFD_MAGIC:
        raise MalformedStream(f"received packet magic {magic:#x} and expected magic {MULTIFD_MAGIC:#x}")
    if version != MULTIFD_VERSION:
        raise MalformedStream(f"received packet version {version} and expected version {MULTIFD_VERSION}")
    if zero and not peer.multifd_zero_pages:
        # Such a peer leaves this field zero; newer sources count the packet's zero pages there.
        raise MalformedStream(f"packet with {zero} zero pages: the source uses a newer multifd "
                              f"layout than {peer}'s (--peer-version)")
    if alloc > PAGES_PER_PACKET or normal > alloc or zero > alloc - normal:
        raise MalformedStream(f"packet with {alloc} allocated, {normal} normal and {zero} zero pages "
                              f"(at most {PAGES_PER_PACKET})")
    name = bytes(data[_NAME_AT:_NAME_AT + NAME_MAX]).split(b"\0", 1)[0].decode(errors="replace")
    offsets = np.frombuffer(data, dtype=">u8", count=normal + zero, offset=_OFFSETS_AT).astype(np.uint64)
    return PacketHeader(flags, flags & peer.multifd_compression_mask, alloc, normal, zero, size, num, name, offsets)


def runs(pages: list[int]) -> list[tuple[int, int]]:
    """(first page, count) for each run of consecutive pages."""
    n = len(pages)
    if n and pages[-1] - pages[0] == n - 1 and pages == list(range(pages[0], pages[0] + n)):
        return [(pages[0], n)]  # the usual packet, one run: a fifth of the loop's time
    out: list[tuple[int, int]] = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out
