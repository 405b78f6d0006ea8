"""The QEMU 7.2 spec set: generated classes plus what their specs leave to Python.

Custom predicates (``custom(name)`` in specs/qemu/7.2) depend on device
configuration that the stream does not carry; the implementations here
decide them from the migrated state the way QEMU 7.2's defaults do.
Extent functions for device-specific encodings live in ``qemu_extents``.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from vmsd.runtime.io import Reader
from vmsd.runtime.stream import SpecSet
from vmsd.runtime.vmstate import current_reader, loading, register, register_extent


def _capabilities_extent(r: Reader, obj: Any) -> int:
    """``caps_count`` times a u8 length and a capability name."""
    n = 0
    for _ in range(obj.caps_count):
        head = r.peek(n + 1)
        if len(head) < n + 1:
            break
        n += 1 + head[n]
    return n


register_extent("capability", _capabilities_extent)


@functools.cache
def spec_set() -> SpecSet:
    import vmsd.generated.qemu.v7_2 as pkg

    modules = [importlib.import_module(m.name) for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    _register_implementations()
    return SpecSet.from_modules(modules)


def _express_capability_ahead() -> bool:
    """Whether the PCI config space about to be read has a PCI Express capability.

    QEMU saves 4096 config bytes for express functions and 256 otherwise;
    which one follows is device configuration, but an express function's
    first 256 bytes always carry the capability (ID 0x10) in their list.
    """
    cfg = current_reader().peek(256)
    if len(cfg) < 256 or not cfg[6] & 0x10:  # status: capability list present
        return False
    ptr, hops = cfg[0x34] & 0xFC, 0
    while ptr and hops < 48:
        if cfg[ptr] == 0x10:
            return True
        ptr, hops = cfg[ptr + 1] & 0xFC, hops + 1
    return False


def _register_pci() -> None:
    from vmsd.generated.qemu.v7_2.pci import PCIDevice

    @register
    class PCIFunction(PCIDevice):
        def migrate_is_pcie(self, version_id: int) -> bool:
            if loading():
                return _express_capability_ahead()
            return self.config_pcie is not None

        def migrate_is_not_pcie(self, version_id: int) -> bool:
            return not self.migrate_is_pcie(version_id)


def _register_implementations() -> None:
    from vmsd.generated.qemu.v7_2.configuration import Configuration

    @register
    class ConfigurationState(Configuration):
        def target_page_bits_needed(self, version_id: int) -> bool:
            # x86 never sends it: its page bits equal the minimum.
            return self.target_page_bits != 0

        def uuid_needed(self, version_id: int) -> bool:
            return self.uuid != bytes(16)

    _register_pci()
    try:
        importlib.import_module("vmsd.qemu_extents")
    except ModuleNotFoundError:
        pass
