"""Bounds on what a migration stream may make the tools hold or create.

A stream is untrusted input: what it announces (nesting, sizes) is checked
against these before anything is built from it (docs/limits.md).
"""

from __future__ import annotations

import os

# PACKAGED commands inside PACKAGED commands.  QEMU's sources write one level
# (postcopy's device state); each level is decoded recursively.
MAX_PACKAGE_DEPTH = 8

# A device section of a live stream that no spec describes is held until the
# trailer arrives (vmsd.migration.undescribed); QEMU's x86 device sections are
# kilobytes (guest memory, VGA's included, travels as RAM).
MAX_UNDESCRIBED_SECTION = 64 << 20

# The JSON trailer of a live stream, read whole when a section waits for it;
# QEMU's for a machine with hundreds of devices is well under a megabyte.
MAX_LIVE_TRAILER = 64 << 20


# RAM blocks a peer may announce to a receiver that creates them (a memfd, a mapping and their bookkeeping
# each, about 2 KiB of memory besides the RAM): QEMU sets no count, but a PC machine has a dozen or two
# (RAM, firmware, option ROMs, video memory, ACPI tables) and a large one a few dozen.
MAX_RAM_BLOCKS = 4096


def default_max_ram() -> int:
    """RAM a receiver without a machine creates for a peer, unless told otherwise: this host's memory.

    The blocks are memfds a snapshot then walks page by page; a stream of a few
    hundred bytes could otherwise announce a TiB.
    """
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
