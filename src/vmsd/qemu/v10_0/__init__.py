"""The QEMU 10.0 spec set: generated classes plus what their specs leave to Python.

specs/qemu/10.0 holds the vmsds that changed since 7.2 and imports the 7.2
specs of the others, so this set is the 10.0 modules plus the reused 7.2
ones.  A reused 7.2 module keeps the implementations ``vmsd.qemu.v7_2``
registers for it (and the 7.2 extent functions its opaque fields need);
the 10.0 modules get the ones below, the same rules where the C code did
not change.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from vmsd.migration.profile import PROFILES
from vmsd.migration.stream import SpecSet
from vmsd.qemu import v7_2
from vmsd.runtime.vmstate import register

PACKAGE = "vmsd.generated.qemu.v10_0"
_REUSED = "vmsd.generated.qemu.v7_2."


@functools.cache
def spec_set() -> SpecSet:
    """The shipped QEMU 10.0 specs; modules load when a stream names their vmsds."""
    try:
        importlib.import_module("vmsd.qemu.v7_2.extents")  # the reused virtio, slirp and xHCI specs need them
    except ModuleNotFoundError:
        pass
    return SpecSet.from_package(PACKAGE, on_import=implement, profile=PROFILES["10.0"])


def all_modules() -> list[Any]:
    """Every generated QEMU 10.0 module (not the reused 7.2 ones), for tests and tools that need them all."""
    pkg = importlib.import_module(PACKAGE)
    return [importlib.import_module(m.name) for m in pkgutil.walk_packages(pkg.__path__, PACKAGE + ".")]


# Modules whose implementations are registered: each once, whichever spec set loads it first.
_IMPLEMENTED: set[str] = set()


def implement(module: Any) -> None:
    """Register the implementations for the classes ``module`` declares (a 10.0 or a reused 7.2 module)."""
    # Once per module: another spec set reusing it may have come first, and registering again would undo
    # what was registered on top since (a SpecSet's as-loaded predicates).
    if module.__name__ in _IMPLEMENTED:
        return
    _IMPLEMENTED.add(module.__name__)
    if module.__name__.startswith(_REUSED):
        v7_2.implement(module)
        return
    registrar = _REGISTRARS.get(module.__name__.rsplit(".", 1)[-1])
    if registrar is not None:
        registrar(module)


def _register_e1000e(module: Any) -> None:
    @register
    class E1000E(module.E1000EState):  # type: ignore[misc]
        def migrate_timadj(self, version_id: int) -> bool:
            # The "migrate-timadj" property: on for every machine type after 7.2.  A stream of an
            # older machine type lacks the field; its trailer's byte count then shows the mismatch
            # and the section is decoded from the trailer.
            return True


_REGISTRARS: dict[str, Callable[[Any], None]] = {
    # hpet_offset_needed is the same in 10.0.
    "hpet": v7_2.REGISTRARS["hpet"],
    "e1000e": _register_e1000e,
}
