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


def _compiled_module(path: str, installed: dict[Path, str]) -> tuple[str, ...] | None:
    """The module of an already compiled spec file: under a folder of ``installed``, the package plus its
    path there (``specs/qemu/7.2/pci.vmsd`` -> ``vmsd.generated.qemu.v7_2.pci``)."""
    resolved = Path(path).resolve()
    for folder, package in installed.items():
        if resolved.is_relative_to(folder.resolve()):
            return (*package.split("."), *_module_parts(str(resolved), str(folder.resolve())))
    return None


def render(
    program: Program, root: str | None = None, installed: dict[Path, str] | None = None
) -> dict[tuple[str, ...], tuple[str, list[str]]]:
    """Source text and vmsd names of every module the program generates, by module path.

    ``installed``: spec folders already compiled into a Python package (the bundled specs into
    ``vmsd.generated``); files there that are imported (not asked for) come from that package, not
    generated again."""
    resolved = check(program)
    compiled = {
        p: m for p in program.files
        if p not in program.roots and (m := _compiled_module(p, installed or {})) is not None
    }
    files = sorted(p for p in program.files if p not in compiled)
    base = _common_root(files) if root is None else display_path(Path(root))
    generated = {p: _module_parts(p, base) for p in files}
    _check_module_paths(program, generated)
    module_of = {**generated, **compiled}
    out: dict[tuple[str, ...], tuple[str, list[str]]] = {}
    template = _env().get_template("module.py.j2")
    for path in files:
        model = ModuleBuilder(resolved, path, module_of, vmsd.__version__, frozenset(compiled.values())).build()
        out[module_of[path]] = (template.render(m=model, api_version=API_VERSION), [c.vmsd_name for c in model.classes])
    return out


def compile_specs(
    specs: list[Path], root: str | None = None, installed: dict[Path, str] | None = None, outside_imports: bool = False
) -> dict[Path, str]:
    """Relative output paths (``pkg/mod.py``, ``pkg/__init__.py``) and their text.

    Each package's ``__init__`` indexes the vmsds of its modules, so that tools
    import only the modules a stream needs.  Imported files under a folder of
    ``installed`` are not compiled (see :func:`render`); specs may import them
    as well as files in their own folders.  ``outside_imports`` lets specs
    import any file.
    """
    modules = render(load(specs, outside_imports, also=list(installed or {})), root, installed)
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
