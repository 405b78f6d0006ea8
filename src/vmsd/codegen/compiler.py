"""Compile specs into Python modules: load, check, build the model, render."""

from __future__ import annotations

import functools
from pathlib import Path, PurePosixPath

import jinja2

import vmsd
from vmsd.codegen.literals import comment_text, docstring_body
from vmsd.codegen.model import ModuleBuilder, module_name
from vmsd.grammar.ast import Pos
from vmsd.grammar.diagnostics import Diagnostic, SpecError
from vmsd.grammar.loader import Program, display_path, load
from vmsd.grammar.semantic import check
from vmsd.runtime.vmstate import API_VERSION


@functools.cache
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("vmsd.codegen", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["pyrepr"] = repr
    env.filters["docstring"] = docstring_body
    env.filters["comment"] = comment_text
    return env


def _common_root(paths: list[str]) -> str:
    parents = [PurePosixPath(p).parent.parts for p in paths]
    common: list[str] = []
    for parts in zip(*parents, strict=False):
        if all(p == parts[0] for p in parts):
            common.append(parts[0])
        else:
            break
    return str(PurePosixPath(*common)) if common else ""


def _module_parts(path: str, root: str) -> tuple[str, ...]:
    rel = PurePosixPath(path).relative_to(root) if root else PurePosixPath(path)
    return tuple(module_name(p) for p in rel.with_suffix("").parts)


def _check_module_paths(program: Program, module_of: dict[str, tuple[str, ...]]) -> None:
    """Two spec files must not become one module (``a-b.vmsd`` and ``a_b.vmsd``), nor a module the
    package of others (``a.vmsd`` beside a folder ``a``): one would overwrite or hide the other."""
    diags: list[Diagnostic] = []
    first: dict[tuple[str, ...], str] = {}
    packages = {parts[:i] for parts in module_of.values() for i in range(1, len(parts))}
    for path, parts in module_of.items():
        dotted = ".".join(parts)
        if parts in first:
            diags.append(Diagnostic(Pos(path, 1, 1), f"this file would be module '{dotted}', as {first[parts]} is; rename one of them"))
        elif parts in packages:
            diags.append(Diagnostic(Pos(path, 1, 1), f"this file would be module '{dotted}', which is also the package of other specs' modules; rename the file or the folder"))
        first.setdefault(parts, path)
    if diags:
        raise SpecError(diags, program.sources)


def render(program: Program, root: str | None = None) -> dict[tuple[str, ...], tuple[str, list[str]]]:
    """Source text and vmsd names of every module the program generates, by module path."""
    resolved = check(program)
    files = sorted(program.files)
    base = _common_root(files) if root is None else display_path(Path(root))
    module_of = {p: _module_parts(p, base) for p in files}
    _check_module_paths(program, module_of)
    out: dict[tuple[str, ...], tuple[str, list[str]]] = {}
    template = _env().get_template("module.py.j2")
    for path in files:
        model = ModuleBuilder(resolved, path, module_of, vmsd.__version__).build()
        out[module_of[path]] = (template.render(m=model, api_version=API_VERSION), [c.vmsd_name for c in model.classes])
    return out


def compile_specs(specs: list[Path], root: str | None = None, outside_imports: bool = False) -> dict[Path, str]:
    """Relative output paths (``pkg/mod.py``, ``pkg/__init__.py``) and their text.

    Each package's ``__init__`` indexes the vmsds of its modules, so that tools
    import only the modules a stream needs.  ``outside_imports`` lets specs
    import files outside their own folders.
    """
    modules = render(load(specs, outside_imports), root)
    files: dict[Path, str] = {}
    packages: dict[tuple[str, ...], dict[str, list[str]]] = {}
    for parts, (text, names) in modules.items():
        files[Path(*parts).with_suffix(".py")] = text
        for i in range(1, len(parts)):
            packages.setdefault(parts[:i], {})
        index = packages.setdefault(parts[:-1], {})
        for name in names:
            index.setdefault(name, []).append(parts[-1])
    template = _env().get_template("package_init.py.j2")
    for package, index in packages.items():
        if package:
            items = sorted((name, sorted(mods)) for name, mods in index.items())
            files[Path(*package) / "__init__.py"] = template.render(tool_version=vmsd.__version__, index=items)
    return files
