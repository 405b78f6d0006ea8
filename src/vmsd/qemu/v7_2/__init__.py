"""The QEMU 7.2 spec set: generated classes plus what their specs leave to Python.

Custom predicates (``custom(name)`` in specs/qemu/7.2) depend on device
configuration that the stream does not carry; the implementations here
decide them from the migrated state the way QEMU 7.2's defaults do.
Extent functions for device-specific encodings live in ``extents`` beside it.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from vmsd.migration.profile import PROFILES
from vmsd.migration.stream import SpecSet
from vmsd.runtime.errors import MalformedStream, TruncatedStream
from vmsd.runtime.io import Reader
from vmsd.runtime.vmstate import configured, current_reader, loading, register, register_extent


def _capabilities_extent(r: Reader, obj: Any) -> int:
    """``caps_count`` times a u8 length and a capability name (at most 256 bytes each)."""
    ahead = r.peek(min(obj.caps_count, 1 << 16) * 256)
    n = 0
    for i in range(obj.caps_count):
        if n >= len(ahead):
            raise TruncatedStream(f"{obj.caps_count} capabilities announced, the input ends after {i}", offset=r.tell() + len(ahead))
        if not ahead[n]:
            # QEMU looks each name up and refuses one it does not know; no capability is called "".
            raise MalformedStream(f"capability {i} of {obj.caps_count} has an empty name", offset=r.tell() + n)
        n += 1 + ahead[n]
    return n


register_extent("capability", _capabilities_extent)


@functools.cache
def spec_set() -> SpecSet:
    """The shipped QEMU 7.2 specs; modules load when a stream names their vmsds."""
    try:
        importlib.import_module("vmsd.qemu.v7_2.extents")
    except ModuleNotFoundError:
        pass
    return SpecSet.from_package("vmsd.generated.qemu.v7_2", on_import=implement, profile=PROFILES["7.2"])


def all_modules() -> list[Any]:
    """Every generated QEMU 7.2 module (for tests and tools that need them all)."""
    import vmsd.generated.qemu.v7_2 as pkg

    return [importlib.import_module(m.name) for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]


# Modules whose implementations are registered: each once, whichever spec set loads it first.
_IMPLEMENTED: set[str] = set()


def implement(module: Any) -> None:
    """Register this file's implementations for the classes ``module`` declares.

    Also run by newer spec sets for the 7.2 modules they reuse (their imports).
    """
    # Once per module: another spec set reusing it may have come first, and registering again would undo
    # what was registered on top since (a SpecSet's as-loaded predicates).
    if module.__name__ in _IMPLEMENTED:
        return
    _IMPLEMENTED.add(module.__name__)
    registrar = REGISTRARS.get(module.__name__.rsplit(".", 1)[-1])
    if registrar is not None:
        registrar(module)


def _express_capability_ahead() -> bool:
    """Whether the PCI config space about to be read has a PCI Express capability.

    QEMU saves 4096 config bytes for express functions and 256 otherwise;
    which one follows is device configuration, but an express function's
    first 256 bytes always carry the capability (ID 0x10) in their list.
    """
    return _has_express_capability(current_reader().peek(256))


def _has_express_capability(cfg: bytes) -> bool:
    if len(cfg) < 256 or not cfg[6] & 0x10:  # status: capability list present
        return False
    ptr, hops = cfg[0x34] & 0xFC, 0
    while ptr and hops < 48:
        if cfg[ptr] == 0x10:
            return True
        ptr, hops = cfg[ptr + 1] & 0xFC, hops + 1
    return False


def _register_pci(module: Any) -> None:
    @register
    class PCIFunction(module.PCIDevice):  # type: ignore[misc]
        def post_load(self, version_id: int) -> None:
            # The answer below holds for one load; not a pre_load hook, so that
            # load() may start from a bare instance (see vmstate.fresh).
            self.__dict__.pop("express", None)

        def migrate_is_pcie(self, version_id: int) -> bool:
            if loading():
                # Decided once, at the first config field: after it the bytes ahead are other fields.
                if self.__dict__.get("express") is None:
                    self.__dict__["express"] = _express_capability_ahead()
                return bool(self.__dict__["express"])
            # Saving: the same rule the loader applies, so what we write reads back.
            if self.config_pcie is None or self.config is None:
                return self.config_pcie is not None
            return _has_express_capability(self.config_pcie[:256])

        def migrate_is_not_pcie(self, version_id: int) -> bool:
            return not self.migrate_is_pcie(version_id)


def _reconstructed_fdc_phase(msr: int) -> int:
    """hw/block/fdc.c reconstruct_phase(): EXECUTION, RESULT or COMMAND from the MSR."""
    if msr & 0x20 or not msr & 0x80:
        return 2
    return 3 if msr & 0x40 else 1


def _register_hpet(module: Any) -> None:
    @register
    class HpetState(module.Hpet):  # type: ignore[misc]
        def offset_needed(self, version_id: int) -> bool:
            # config & HPET_CFG_ENABLE; hpet-offset-saved is on for every 7.2 machine type.
            return bool(self.config & 1)


def _register_ide(module: Any) -> None:
    @register
    class IDEDrive(module.IDEState):  # type: ignore[misc]
        def pio_state_needed(self, version_id: int) -> bool:
            # C: (status & DRQ_STAT) || (bus->error_status & BM_STATUS_PIO_RETRY); the
            # bus is not reachable from here, so a loaded drive keeps what it had.
            loaded = loaded_subsections(self)
            if loaded is not None:
                return "ide_drive/pio_state" in loaded
            return bool(self.status & 0x08)


def _register_pckbd(module: Any) -> None:
    @register
    class I8042(module.KBDState):  # type: ignore[misc]
        def extended_state_needed(self, version_id: int) -> bool:
            return True  # the i8042 "extended-state" property: off only for machines <= 6.0

        # QEMU's pre_load marks outport (0x100, out of uint8 range) and
        # post_load recomputes it when the subsection did not overwrite the
        # mark.  The same decision from the subsections seen keeps pre_load
        # free, so that load() may start from a bare instance.
        def post_load(self, version_id: int) -> None:
            if "pckbd_outport" not in _loaded(self):
                self.outport = 0xCF | ((self.status & 0x01) << 4) | (self.status & 0x20)


def _register_fdc(module: Any) -> None:
    @register
    class FloppyController(module.FDCtrl):  # type: ignore[misc]
        phase: int
        msr: int

        # QEMU: pre_load sets phase = FD_PHASE_RECONSTRUCT (0), post_load
        # rebuilds it when still 0 (subsection absent, or present with 0).
        def post_load(self, version_id: int) -> None:
            if "fdc/phase" not in _loaded(self) or self.phase == 0:
                self.phase = _reconstructed_fdc_phase(self.msr)


def _register_serial(module: Any) -> None:
    @register
    class UART16550(module.SerialState):  # type: ignore[misc]
        thr_ipending: int
        iir: int

        # QEMU: pre_load sets thr_ipending and poll_msl to -1; post_load
        # recomputes thr_ipending when still -1.  Decided from the
        # subsections seen instead (see I8042).
        def post_load(self, version_id: int) -> None:
            seen = _loaded(self)
            if "serial/poll" not in seen:
                self.poll_msl = -1
            if "serial/thr_ipending" not in seen or self.thr_ipending == -1:
                self.thr_ipending = int((self.iir & 0x06) == 0x02)


def _register_configuration(module: Any) -> None:
    @register
    class ConfigurationState(module.Configuration):  # type: ignore[misc]
        def target_page_bits_needed(self, version_id: int) -> bool:
            # x86 never sends it: its page bits equal the minimum.
            return bool(self.target_page_bits != 0)

        def uuid_needed(self, version_id: int) -> bool:
            return bool(self.uuid != bytes(16))


def _loaded(obj: Any) -> set[str]:
    """The subsections the load in progress has read (for post_load hooks)."""
    return loaded_subsections(obj) or set()


def loaded_subsections(obj: Any) -> set[str] | None:
    """Names of the subsections ``obj`` was loaded with; None if it was not loaded."""
    seen: set[str] | None = getattr(obj, "__dict__", {}).get("_vmsd_loaded_subsections")
    return seen


def _register_piix4_pm(module: Any) -> None:
    # Machine properties of pc-i440fx-7.2 (older machine types differ; their
    # streams then fall back to the trailer, whose sizes expose the mismatch).
    @register
    class PIIX4PMState(module.PIIX4PM):  # type: ignore[misc]
        def need_smbus(self, version_id: int) -> bool:
            return True  # smbus state migrates except on pc-i440fx-3.1 and older

        def acpi_hotplug_bridge(self, version_id: int) -> bool:
            return True  # acpi-pci-hotplug-with-bridge-support defaults to on

        def no_acpi_hotplug_bridge(self, version_id: int) -> bool:
            return not self.acpi_hotplug_bridge(version_id)

        def migrate_acpi_index(self, version_id: int) -> bool:
            return self.acpi_hotplug_bridge(version_id)  # x-not-migrate-acpi-index is off on 7.2


# The hot-plug arrays whose length is device configuration (possible CPUs, memory slots) have
# 10-byte elements that begin with two bools (CPU: is_inserting, is_removing; memory slot:
# is_enabled, is_inserting), so an array ends where two bytes cannot begin an element: a section
# footer (0x7E) or the next subsection (0x05) of piix4_pm and ich9_pm.  The exception is ich9_pm
# with none of its later subsections (pc-q35-6.0 and older, or TCO off, for the memory slots):
# chip_config then follows, whose bytes can look like elements; such a stream fails and falls
# back to its trailer, unless the count is given (vmsd.runtime.vmstate.device_configuration).
_HOTPLUG_ELEMENT = 10
_HOTPLUG_MAX = 1 << 16  # above any machine's possible CPUs (x86: 4096) or memory slots (256)
_HOTPLUG_STEP = 16  # elements peeked at a time: a live stream must not be asked for bytes far past the array


def _hotplug_count(r: Reader, what: str) -> int:
    """How many hot-plug status elements (see above) lie ahead of ``r``."""
    n = 0
    while n < _HOTPLUG_MAX:
        ahead = r.peek(_HOTPLUG_ELEMENT * (n + _HOTPLUG_STEP) + 2)
        while n < _HOTPLUG_MAX:
            pair = ahead[_HOTPLUG_ELEMENT * n : _HOTPLUG_ELEMENT * n + 2]
            if len(pair) < 2:
                break
            if pair[0] > 1 or pair[1] > 1:
                return n
            n += 1
        if len(ahead) < _HOTPLUG_ELEMENT * n + 2:  # the input ends: what is left is no whole element
            return n
    raise MalformedStream(f"{what} hot-plug state with more than {_HOTPLUG_MAX} elements", offset=r.tell())


def _configured_count(obj: Any, what: str) -> int:
    if not loading():
        return len(obj.devs)
    n = configured(obj, "dev_count")
    return n if n is not None else _hotplug_count(current_reader(), what)


def _register_acpi(module: Any) -> None:
    @register
    class CPUHotplug(module.CPUHotplugState):  # type: ignore[misc]
        @property
        def dev_count(self) -> int:
            # The destination's possible CPUs: configured, else measured while loading, else the array's length.
            return _configured_count(self, "CPU")

    @register
    class MemoryHotplug(module.MemHotplugState):  # type: ignore[misc]
        @property
        def dev_count(self) -> int:
            # The destination's memory slots: configured, else measured while loading, else the array's length.
            return _configured_count(self, "memory")



def _register_ich9_smb(module: Any) -> None:
    @register
    class ICH9SMBState(module.ICH9SMB):  # type: ignore[misc]
        def need_smbus(self, version_id: int) -> bool:
            return True  # false only for pc-q35-3.1 and older


# By generated module name; newer spec sets reuse some for their own versions of these modules.
REGISTRARS: dict[str, Callable[[Any], None]] = {
    "piix4_pm": _register_piix4_pm,
    "acpi": _register_acpi,
    "ich9_smb": _register_ich9_smb,
    "configuration": _register_configuration,
    "pci": _register_pci,
    "hpet": _register_hpet,
    "ide": _register_ide,
    "pckbd": _register_pckbd,
    "fdc": _register_fdc,
    "serial": _register_serial,
}
