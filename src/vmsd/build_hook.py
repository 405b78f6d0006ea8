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
module.  Keep checked-in output honest in CI with
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
        from vmsd.codegen.compiler import compile_specs

        root = Path(self.root)
        spec_dir = root / str(self.config.get("specs", "specs"))
        output = root / str(self.config.get("output", "generated"))
        specs = sorted(spec_dir.rglob("*.vmsd"))
        if not specs:
            raise ValueError(f"vmsd build hook: no .vmsd files under {spec_dir}")
        files = compile_specs(specs, str(spec_dir.relative_to(root)) if spec_dir.is_relative_to(root) else None)
        for rel, text in files.items():
            target = output / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists() or target.read_text(encoding="utf-8") != text:
                target.write_text(text, encoding="utf-8")
        init = output / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated vmsd modules."""\n', encoding="utf-8")


@hookimpl
def hatch_register_build_hook() -> type[BuildHookInterface]:  # type: ignore[type-arg]
    return VmsdBuildHook
