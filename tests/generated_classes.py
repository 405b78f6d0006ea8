"""Every class generated from the shipped specs, with test implementations of custom predicates."""

from __future__ import annotations

import importlib
import pkgutil

import vmsd.generated
from vmsd.generated.examples.hpet import Hpet
from vmsd.generated.examples.kinds import Kinds
from vmsd.qemu import v7_2 as qemu72
from vmsd.qemu import v10_0 as qemu100
from vmsd.qemu.v7_2 import spec_set
from vmsd.runtime import VMStateObject, register
from vmsd.runtime.vmstate import as_loaded_subclass, impl


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
    """Every generated class; custom predicates without an implementation answer True.

    Order matters: the QEMU 7.2 and 10.0 implementations first, then "as loaded" answers
    for the ``needed`` predicates they leave open, then test stand-ins for the rest.
    """
    spec_set().load_all()
    for module in qemu72.all_modules():
        qemu72.implement(module)
    qemu100.spec_set().load_all()
    for module in qemu100.all_modules():
        qemu100.implement(module)
    out = []
    for mod in pkgutil.walk_packages(vmsd.generated.__path__, "vmsd.generated."):
        module = importlib.import_module(mod.name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, VMStateObject) and value.__module__ == module.__name__:
                if getattr(impl(value), "__abstractmethods__", ()):
                    auto = as_loaded_subclass(value)
                    if auto is not None:
                        register(auto)
                missing = getattr(impl(value), "__abstractmethods__", ())
                if missing:
                    register(type(f"{value.__name__}ForTests", (impl(value),), {m: _always for m in missing}))
                out.append(value)
    return sorted(out, key=lambda c: f"{c.__module__}.{c.__name__}")
