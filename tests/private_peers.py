"""The QEMU peers unpacked into private folders (10.0, 11.1), as the tests start them."""

from __future__ import annotations

import attrs

from vmsd.testing.private_qemu import PrivateQemu
from vmsd.testing.qemu10 import QEMU10
from vmsd.testing.qemu11 import QEMU11
from vmsd.testing.qmp import Qemu

PRIVATE_QEMUS: dict[str, PrivateQemu] = {q.version: q for q in (QEMU10, QEMU11)}
# The machine whose every device section vmsd's spec set of that version decodes, so that vmsd can receive
# it live and send it back (with ACPI: 11.1's always-sent CPU hot-plug state has its spec).
SPEC_COVERED_MACHINE = {"10.0": "pc", "11.1": "pc"}


@attrs.frozen
class Peer:
    version: str  # also the name of its vmsd.migration.profile entry
    cmd: list[str]
    env: dict[str, str]
    machine: str  # the default of start(): see SPEC_COVERED_MACHINE

    @classmethod
    def fetched(cls, version: str) -> Peer:
        """The peer of ``version``, fetched first when it is missing (a failed fetch fails the test)."""
        private = PRIVATE_QEMUS[version]
        cmd, env = private.command(private.ensure())
        return cls(version, cmd, env, SPEC_COVERED_MACHINE[version])

    def start(self, args: list[str], incoming: str | None = None, memory: str = "32M",
              machine: str | None = None, nodefaults: bool = True) -> Qemu:
        """This QEMU, paused (``-S``), with QMP and ``args`` (and ``-nodefaults`` unless told otherwise)."""
        return Qemu(args, machine=machine or self.machine, memory=memory, incoming=incoming, binary=self.cmd[0],
                    extra_args=self.cmd[1:], env=self.env, nodefaults=nodefaults)
