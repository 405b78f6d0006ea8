"""What differs on the wire between the QEMU versions vmsd talks to, one frozen record per version.

QEMU does not negotiate these: a destination expects exactly what a source
of its own version (or of the machine type's compat settings) sends, so the
user names the peer (``--peer-version``) and every choice below follows from
that name.  Code elsewhere asks the profile (``peer.multifd_flush_records``)
and never compares version strings; a new QEMU version is one more entry in
:data:`PROFILES`.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class PeerProfile:
    """The wire choices of one QEMU version (facts checked against that version's source and streams)."""

    version: str
    # Multifd sync points are MULTIFD_FLUSH records on the main channel, once per pass (8.1+); before,
    # every RAM section's EOS was one, preceded by a SYNC packet on each channel.
    multifd_flush_records: bool
    # Zero pages are listed in multifd packets (9.0+, zero-page-detection=multifd); before, they went
    # as ZERO records on the main channel.
    multifd_zero_pages: bool
    # The destination tells channels apart by peeking at their first bytes (8.1+), so a source may
    # connect its multifd channels first; before, the first connection accepted was the main channel.
    multifd_classifies_channels: bool
    # Bits of the packet flags that name a compression method (the receiver refuses any other bit
    # set there): zlib and zstd in 7.2; qpl, uadk and qatzip added later.
    multifd_compression_mask: int
    # A SYNC packet is a bare header (no pages allocated, packet number 0), and a packet without
    # normal pages still names its compression method (9.0+); 7.2 fills a SYNC packet's fields as for
    # any packet and sets the compression flag only on packets that carry pages.
    multifd_bare_sync: bool
    # The JSON trailer describes arrays as runs (10.0+): "index" only while more than one element is
    # left, null slots of pointer arrays as "nullptr" entries; before, every element had its index
    # (vmsd.runtime.vmdesc explains both).
    vmdesc_array_runs: bool
    # query-migrate-parameters' max-bandwidth when nobody set it (MAX_THROTTLE, 128 MiB/s).
    max_bandwidth: int = 128 << 20
    # The migration modes (QEMU's MigMode) besides "normal": cpr-reboot came in 8.2, cpr-transfer in
    # 10.0, cpr-exec in 10.2.
    cpr_modes: frozenset[str] = frozenset()
    # The CPR state ends with the "CprState/vfio devices" subsection, always sent (10.1+); 10.0 refuses it.
    cpr_vfio_devices: bool = False
    # The JSON trailer gives an element of an array described element by element its "index" (7.2, 10.0);
    # 11.1 gives none, only compressed runs their "array_len".
    vmdesc_element_index: bool = True

    def __str__(self) -> str:
        return f"QEMU {self.version}"


PROFILES: dict[str, PeerProfile] = {
    "7.2": PeerProfile("7.2", multifd_flush_records=False, multifd_zero_pages=False,
                       multifd_classifies_channels=False, multifd_compression_mask=0x0E, multifd_bare_sync=False,
                       vmdesc_array_runs=False),
    "10.0": PeerProfile("10.0", multifd_flush_records=True, multifd_zero_pages=True,
                        multifd_classifies_channels=True, multifd_compression_mask=0x3E, multifd_bare_sync=True,
                        vmdesc_array_runs=True, cpr_modes=frozenset({"cpr-reboot", "cpr-transfer"})),
    # On the wire as 10.0 (checked against 11.1.3: precopy and multifd both ways, none/zlib/zstd, the same
    # defaults). What 11.1 dropped vmsd never sends: command 8 (ENABLE_COLO, refused as deprecated since
    # 10.2) and the zero-blocks capability. Its CPR state ends with the VFIO subsection (checked against
    # the bytes 11.1.3 sends). Its trailer describes arrays in 10.0's runs, without any element's index
    # (checked against the trailers of 11.1.3's pc and q35 streams).
    "11.1": PeerProfile("11.1", multifd_flush_records=True, multifd_zero_pages=True,
                        multifd_classifies_channels=True, multifd_compression_mask=0x3E, multifd_bare_sync=True,
                        vmdesc_array_runs=True, vmdesc_element_index=False,
                        cpr_modes=frozenset({"cpr-reboot", "cpr-transfer", "cpr-exec"}), cpr_vfio_devices=True),
}
NEWEST = PROFILES["11.1"]


def peer_profile(version: str) -> PeerProfile:
    """The profile named ``version`` ("7.2", "10.0", ...); ValueError naming the known ones otherwise."""
    try:
        return PROFILES[version]
    except KeyError:
        raise ValueError(f"peer version '{version}' is not one of {', '.join(PROFILES)}") from None
