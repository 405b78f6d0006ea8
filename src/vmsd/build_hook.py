"""Hatchling build hook: compile a project's .vmsd specs when its wheel is built.

In the device author's ``pyproject.toml``::

    [build-system]
    requires = ["hatchling", "vmsd[compiler]"]
    build-backend = "hatchling.build"

    [tool.hatch.build.hooks.vmsd]
    specs = "specs"                 # folder searched for *.vmsd
    output = "src/mydevice/state"   # package folder the modules go to

The hook writes the generated modules into ``output`` before hatchling
collects the files, so the wheel ships them and mypy sees them like any other
module.  It also writes a ``py.typed`` marker into the top-level package that
holds ``output`` (``src/mydevice/py.typed`` here) unless one is there: without
it mypy skips the installed package and its consumers lose the types
(see :mod:`vmsd.codegen.package`).  Keep checked-in output honest in CI with
``vmsd compile -o src/mydevice/state specs/*.vmsd --check``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface
from hatchling.plugin import hookimpl


class VmsdBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "vmsd"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        from vmsd.codegen.package import write_package

        try:
            write_package(Path(self.root), str(self.config.get("specs", "specs")),
                          str(self.config.get("output", "generated")))
        except ValueError as exc:
            raise ValueError(f"vmsd build hook: {exc}") from None


@hookimpl
def hatch_register_build_hook() -> type[BuildHookInterface]:  # type: ignore[type-arg]
    return VmsdBuildHook
