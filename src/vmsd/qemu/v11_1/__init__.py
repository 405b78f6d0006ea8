"""The QEMU 11.1 spec set: generated classes plus what their specs leave to Python.

specs/qemu/11.1 holds the vmsds that changed since 10.0 (and the CPR state)
and imports the 10.0 and 7.2 specs of the others, so this set is the 11.1
modules plus the reused ones.  A reused module keeps the implementations of
the set it comes from; the 11.1 modules get the ones below, the same rules
where the C code did not change.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from vmsd.migration.profile import PROFILES
from vmsd.migration.stream import SpecSet
from vmsd.qemu import v7_2, v10_0

PACKAGE = "vmsd.generated.qemu.v11_1"
_REUSED_10_0 = "vmsd.generated.qemu.v10_0."


@functools.cache
def spec_set() -> SpecSet:
    """The shipped QEMU 11.1 specs; modules load when a stream names their vmsds."""
    try:
        importlib.import_module("vmsd.qemu.v7_2.extents")  # the reused virtio, slirp and xHCI specs need them
    except ModuleNotFoundError:
        pass
    return SpecSet.from_package(PACKAGE, on_import=implement, profile=PROFILES["11.1"])


def all_modules() -> list[Any]:
    """Every generated QEMU 11.1 module (not the reused ones), for tests and tools that need them all."""
    pkg = importlib.import_module(PACKAGE)
    return [importlib.import_module(m.name) for m in pkgutil.walk_packages(pkg.__path__, PACKAGE + ".")]


# Modules whose implementations are registered: each once, whichever spec set loads it first.
_IMPLEMENTED: set[str] = set()


def implement(module: Any) -> None:
    """Register the implementations for the classes ``module`` declares (an 11.1, 10.0 or 7.2 module)."""
    # Once per module: another spec set reusing it may have come first, and registering again would undo
    # what was registered on top since (a SpecSet's as-loaded predicates).
    if module.__name__ in _IMPLEMENTED:
        return
    _IMPLEMENTED.add(module.__name__)
    if not module.__name__.startswith(PACKAGE + "."):
        # A reused module: 10.0's own implementations, which hand 7.2 modules to 7.2's.
        if module.__name__.startswith(_REUSED_10_0):
            v10_0.implement(module)
        else:
            v7_2.implement(module)
        return
    registrar = _REGISTRARS.get(module.__name__.rsplit(".", 1)[-1])
    if registrar is not None:
        registrar(module)


_REGISTRARS: dict[str, Callable[[Any], None]] = {
    # hpet_offset_needed and the PCI hot-plug properties of piix4_pm are as in 7.2.
    "hpet": v7_2.REGISTRARS["hpet"],
    "piix4_pm": v7_2.REGISTRARS["piix4_pm"],
}
