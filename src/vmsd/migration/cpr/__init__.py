"""CPR (checkpoint and restart): QEMU's cpr-reboot, cpr-transfer and cpr-exec migration modes.

``state`` is the CPR state codec, ``transfer`` the ``cpr`` channel of
cpr-transfer, ``exec`` the memfd and environment of cpr-exec, ``ram`` turns
received descriptors into RAM blocks.  :class:`~vmsd.migration.precopy.Migration`
and :class:`~vmsd.migration.incoming.Incoming` drive them (``mode=``).
"""

from __future__ import annotations

MODES = ("normal", "cpr-reboot", "cpr-transfer", "cpr-exec")
# Modes in which guest RAM stays where it is: the new side maps the old side's memory.
KEEPS_RAM = frozenset({"cpr-transfer", "cpr-exec"})
