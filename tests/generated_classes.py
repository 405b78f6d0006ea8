"""Every class generated from the shipped specs, with test implementations of custom predicates."""

from __future__ import annotations

import importlib
import pkgutil

import vmsd.generated
from vmsd import qemu72
from vmsd.generated.examples.hpet import Hpet
from vmsd.generated.examples.kinds import Kinds
from vmsd.qemu72 import spec_set
from vmsd.runtime import VMStateObject, register
from vmsd.runtime.vmstate import impl


@register
class HpetForTests(Hpet):
    """The spec's custom(offset_needed): send the offset when it is set."""

    def offset_needed(self, version_id: int) -> bool:
        return self.hpet_offset != 0


@register
class KindsForTests(Kinds):
    def hook_present(self, version_id: int) -> bool:
        return version_id >= 2


def _always(self: object, version_id: int) -> bool:
    return True


def all_classes() -> list[type[VMStateObject]]:
    """Every generated class; custom predicates without an implementation answer True."""
    spec_set().load_all()  # registers the QEMU 7.2 implementations
    out = []
    for mod in pkgutil.walk_packages(vmsd.generated.__path__, "vmsd.generated."):
        module = importlib.import_module(mod.name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, VMStateObject) and value.__module__ == module.__name__:
                missing = getattr(impl(value), "__abstractmethods__", ())
                if missing:
                    register(type(f"{value.__name__}ForTests", (value,), {m: _always for m in missing}))
                out.append(value)
    # Real implementations win over the test stand-ins whatever the import order was.
    for module in qemu72.all_modules():
        qemu72._implement(module)
    return sorted(out, key=lambda c: f"{c.__module__}.{c.__name__}")
