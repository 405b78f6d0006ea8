"""Multifd: RAM pages over extra connections beside the main stream, as QEMU sends them.

Every multifd connection starts with a 64-byte initial packet (magic, version,
the sender's UUID, channel id); then come RAM packets: a fixed 1344-byte
header (flags, page counts, payload size, a packet number shared by all
channels, the RAM block name, 128 page offsets) followed by the pages, raw or
through the channel's persistent zlib/zstd stream.

Two layouts, chosen by the peer's profile because QEMU does not negotiate
them (:attr:`MultifdConfig.peer`, see :mod:`vmsd.migration.profile`):

* ``"7.2"``: zero pages travel on the main channel as ZERO records; every
  RAM section's EOS is a sync point, preceded by one SYNC packet per channel.
* ``"10.0"`` and ``"11.1"`` (newest; the same layout): zero pages are listed in the packets (after the normal
  offsets, no payload); SYNC packets only at setup, at the end of each pass
  and at the end, each matched by a MULTIFD_FLUSH record on the main channel.

The sync protocol is the only ordering between channels: pages a channel
sent before its k-th SYNC are in RAM before the receiver passes the main
channel's k-th sync point, and no page is sent twice between two sync points.

Pages go from the RAM mapping to the socket without copies (``sendmsg`` with
memoryviews of page runs) and come back into their place in RAM without
passing through user space where the kernel allows (``splice`` from the
socket into the RAM file: uncompressed pages, and zstd's stored blocks), else
straight into the mapping (``recv_into`` on its slices); socket I/O, zlib and
zstd release the GIL, so the channel threads run in parallel with the
migration thread.

The modules, data flowing down the list:

* :mod:`.packet`: the wire format (initial packet, packet header), pure;
* :mod:`.zstd_frames`: zstd frames read without inflating them, pure;
* :mod:`.pageio`: a channel's bytes into RAM (reads, splices, runs of pages);
* :mod:`.codecs`: none, zlib and zstd behind one protocol, by name;
* :mod:`.config`: :class:`MultifdConfig` and the per-channel counts;
* :mod:`.send`, :mod:`.recv`: the channel threads of each side;
* :mod:`.channels`: accepting the main and multifd connections in any order.
"""

from vmsd.migration.multifd.channels import accept_all, classify
from vmsd.migration.multifd.codecs import CODECS, Codec
from vmsd.migration.multifd.config import ChannelStats, MultifdConfig, config_from
from vmsd.migration.multifd.packet import (
    FLAG_SYNC,
    HEADER_SIZE,
    INITIAL_SIZE,
    MULTIFD_MAGIC,
    MULTIFD_VERSION,
    PAGES_PER_PACKET,
    MultifdError,
    initial_packet,
    parse_initial,
)
from vmsd.migration.multifd.recv import MultifdReceiver
from vmsd.migration.multifd.send import MultifdSender

__all__ = [
    "CODECS",
    "FLAG_SYNC",
    "HEADER_SIZE",
    "INITIAL_SIZE",
    "MULTIFD_MAGIC",
    "MULTIFD_VERSION",
    "PAGES_PER_PACKET",
    "ChannelStats",
    "Codec",
    "MultifdConfig",
    "MultifdError",
    "MultifdReceiver",
    "MultifdSender",
    "accept_all",
    "classify",
    "config_from",
    "initial_packet",
    "parse_initial",
]
