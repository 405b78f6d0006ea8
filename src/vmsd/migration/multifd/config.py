"""The multifd settings both sides must agree on, and what each channel counts."""

from __future__ import annotations

from typing import Any

import attrs

from vmsd.migration.multifd.codecs import CODECS, Codec
from vmsd.migration.profile import NEWEST, PeerProfile, peer_profile


@attrs.define
class MultifdConfig:
    """The multifd settings both sides must agree on (QEMU's names in :func:`config_from`)."""

    channels: int = 2
    compression: str = "none"
    zlib_level: int = 1
    zstd_level: int = 1
    peer: PeerProfile = NEWEST
    zero_page_detection: str = "multifd"  # none | legacy | multifd (peers that list zero pages in packets)
    uuid: bytes = bytes(16)
    # Receiver: how long every channel may wait at a sync point the main channel does not reach.  A source
    # writes the main channel's sync record right after its channels' SYNC packets, so a long wait means
    # the two sides disagree on the layout (QEMU does not negotiate it) and would otherwise wait for good.
    sync_stall: float = 20.0

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.channels <= 255:
            raise ValueError("parameter 'multifd-channels' expects a value between 1 and 255")
        if self.compression not in CODECS:
            raise ValueError(f"parameter 'multifd-compression': '{self.compression}' is not one of "
                             f"{', '.join(CODECS)}")
        if self.zero_page_detection not in ("none", "legacy", "multifd"):
            raise ValueError("parameter 'zero-page-detection' expects none, legacy or multifd")
        if not self.peer.multifd_zero_pages and self.zero_page_detection == "multifd":
            self.zero_page_detection = "legacy"  # the peer has no zero pages in packets
        if not 0 <= self.zlib_level <= 9:
            raise ValueError("parameter 'multifd-zlib-level' expects a value between 0 and 9")
        if not 0 <= self.zstd_level <= 20:
            raise ValueError("parameter 'multifd-zstd-level' expects a value between 0 and 20")
        if len(self.uuid) != 16:
            raise ValueError("a UUID is 16 bytes")

    @property
    def codec(self) -> Codec:
        return CODECS[self.compression]

    @property
    def level(self) -> int:
        """The compression level of the chosen method (none has none)."""
        return {"zlib": self.zlib_level, "zstd": self.zstd_level}.get(self.compression, 0)

    @property
    def legacy_sync(self) -> bool:
        """Every section's EOS is a sync point (7.2), not MULTIFD_FLUSH records."""
        return not self.peer.multifd_flush_records

    @property
    def zero_pages_in_packets(self) -> bool:
        return self.peer.multifd_zero_pages and self.zero_page_detection == "multifd"


def config_from(parameters: dict[str, str], peer_version: str = NEWEST.version, uuid: bytes = bytes(16)) -> MultifdConfig:
    """A config from QEMU-named parameters (``multifd-channels``, ``multifd-compression``, ...)."""
    names = {"multifd-channels": "channels", "multifd-compression": "compression",
             "multifd-zlib-level": "zlib_level", "multifd-zstd-level": "zstd_level",
             "zero-page-detection": "zero_page_detection"}
    peer = peer_profile(peer_version)
    kw: dict[str, Any] = {"peer": peer, "uuid": uuid}
    if not peer.multifd_zero_pages:
        kw["zero_page_detection"] = "legacy"
    for name, value in parameters.items():
        field = names.get(name)
        if field is None:
            raise ValueError(f"parameter '{name}' is not a multifd parameter")
        kw[field] = value if field in ("compression", "zero_page_detection") else int(value)
    return MultifdConfig(**kw)


@attrs.define
class ChannelStats:
    channel: int
    bytes: int = 0
    packets: int = 0
    pages: int = 0  # normal pages
    zero_pages: int = 0
