"""Bounds on what a migration stream may make the tools hold or create.

A stream is untrusted input: what it announces (nesting, sizes) is checked
against these before anything is built from it (docs/limits.md).
"""

from __future__ import annotations

import os

# PACKAGED commands inside PACKAGED commands.  QEMU's sources write one level
# (postcopy's device state); each level is decoded recursively.
MAX_PACKAGE_DEPTH = 8


def default_max_ram() -> int:
    """RAM a receiver without a machine creates for a peer, unless told otherwise: this host's memory.

    The blocks are memfds a snapshot then walks page by page; a stream of a few
    hundred bytes could otherwise announce a TiB.
    """
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
