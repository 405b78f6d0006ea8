"""Every class generated from the shipped specs, with test implementations of custom predicates."""

from __future__ import annotations

import importlib
import pkgutil

import vmsd.generated
from vmsd.generated.examples.hpet import Hpet
from vmsd.generated.examples.kinds import Kinds
from vmsd.runtime import VMStateObject, register


@register
class HpetForTests(Hpet):
    """The spec's custom(offset_needed): send the offset when it is set."""

    def offset_needed(self, version_id: int) -> bool:
        return self.hpet_offset != 0


@register
class KindsForTests(Kinds):
    def hook_present(self, version_id: int) -> bool:
        return version_id >= 2


def all_classes() -> list[type[VMStateObject]]:
    out = []
    for mod in pkgutil.walk_packages(vmsd.generated.__path__, "vmsd.generated."):
        module = importlib.import_module(mod.name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, VMStateObject) and value.__module__ == module.__name__:
                out.append(value)
    return sorted(out, key=lambda c: f"{c.__module__}.{c.__name__}")
