"""Compile specs into Python modules: load, check, build the model, render."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

import attrs
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


def _module_map(
    program: Program, root: str | None, installed: dict[Path, str] | None
) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """The module path of each spec file of ``program``: of those to compile, and of those imported from
    a folder of ``installed`` (already compiled there)."""
    compiled = {
        p: m for p in program.files
        if p not in program.roots and (m := _compiled_module(p, installed or {})) is not None
    }
    files = sorted(p for p in program.files if p not in compiled)
    base = _common_root(files) if root is None else display_path(Path(root))
    return {p: _module_parts(p, base) for p in files}, compiled


def _generates(program: Program, path: str) -> bool:
    """Whether the file declares anything: one that only imports (a spec set naming the files it reuses)
    generates no module."""
    spec = program.files[path]
    return bool(spec.vmsds or spec.enums)


@attrs.frozen
class Generated:
    """One file ``vmsd compile`` makes: where it goes, relative to the output folder, and its text."""

    path: Path
    # The text in pieces, rendered again at each call: a module's text is tens of times its spec, so a
    # caller writes or compares it as it comes instead of holding it.
    pieces: Callable[[], Iterator[str]]

    def text(self) -> str:
        return "".join(self.pieces())


def _modules(
    program: Program, root: str | None, installed: dict[Path, str] | None
) -> Iterator[tuple[tuple[str, ...], list[str], Callable[[], Iterator[str]]]]:
    """Module path, vmsd names and text of every module the program generates, one module at a time:
    each module's model lives only until the next is asked for.  Everything that can find fault with the
    specs runs before the first module is yielded.

    ``installed``: spec folders already compiled into a Python package (the bundled specs into
    ``vmsd.generated``); files there that are imported (not asked for) come from that package, not
    generated again."""
    resolved = check(program)
    to_compile, compiled = _module_map(program, root, installed)
    generated = {p: m for p, m in to_compile.items() if _generates(program, p)}
    _check_module_paths(program, generated)
    module_of = {**to_compile, **compiled}
    template = _env().get_template("module.py.j2")
    absolute = frozenset(compiled.values())

    def modules() -> Iterator[tuple[tuple[str, ...], list[str], Callable[[], Iterator[str]]]]:
        for path in sorted(generated):
            model = ModuleBuilder(resolved, path, module_of, vmsd.__version__, absolute).build()
            names = [v.name for v in program.files[path].vmsds]
            yield module_of[path], names, functools.partial(template.generate, m=model, api_version=API_VERSION)

    return modules()


def _relative_module(package: tuple[str, ...], module: tuple[str, ...]) -> str:
    """``module`` as a name relative to ``package`` without its first dot: ``mod``, ``.sibling.mod``."""
    common = 0
    while common < min(len(package), len(module) - 1) and package[common] == module[common]:
        common += 1
    return "." * (len(package) - common) + ".".join(module[common:])


def compile_specs(
    specs: list[Path], root: str | None = None, installed: dict[Path, str] | None = None, outside_imports: bool = False
) -> dict[Path, str]:
    """Relative output paths (``pkg/mod.py``, ``pkg/__init__.py``) and their text (see :func:`generate`)."""
    return {g.path: g.text() for g in generate(specs, root, installed, outside_imports)}


def generate(
    specs: list[Path], root: str | None = None, installed: dict[Path, str] | None = None, outside_imports: bool = False
) -> Iterator[Generated]:
    """The files compiling ``specs`` makes, one at a time; a spec error is raised here, before any.

    Each package's ``__init__`` indexes the vmsds of its modules, so that tools
    import only the modules a stream needs.  A spec that imports a file of
    another package takes that file's vmsds into its own package's index
    (named relative to it, ``.v7_2.i8254``) unless the package declares the
    same names itself: a spec set for one QEMU version reuses the unchanged
    specs of another by importing them.  Imported files under a folder of
    ``installed`` are not compiled (see :func:`_modules`); specs may import them
    as well as files in their own folders.  ``outside_imports`` lets specs
    import any file.
    """
    program = load(specs, outside_imports, also=list(installed or {}))
    modules = _modules(program, root, installed)
    to_compile, compiled = _module_map(program, root, installed)
    module_of = {**to_compile, **compiled}
    import_targets = sorted(program.import_targets.items())

    def files() -> Iterator[Generated]:
        names_of: dict[tuple[str, ...], list[str]] = {}
        packages: dict[tuple[str, ...], dict[str, list[str]]] = {}
        for parts, names, pieces in modules:
            names_of[parts] = names
            yield Generated(Path(*parts).with_suffix(".py"), pieces)
            for i in range(1, len(parts)):
                packages.setdefault(parts[:i], {})
            index = packages.setdefault(parts[:-1], {})
            for name in names:
                index.setdefault(name, []).append(parts[-1])
        reused: dict[tuple[str, ...], dict[str, set[str]]] = {}
        for (importer, _), target in import_targets:
            package, other = module_of[importer][:-1], module_of[target]
            if other[:-1] != package and other in names_of:
                for name in names_of[other]:
                    reused.setdefault(package, {}).setdefault(name, set()).add(_relative_module(package, other))
        for package, refs_by_name in reused.items():
            for i in range(1, len(package)):
                packages.setdefault(package[:i], {})
            own = packages.setdefault(package, {})
            for name, refs in refs_by_name.items():
                own.setdefault(name, sorted(refs))
        template = _env().get_template("package_init.py.j2")
        for package, index in packages.items():
            if package:
                items = sorted((name, sorted(mods)) for name, mods in index.items())
                text = template.render(tool_version=vmsd.__version__, index=items)
                yield Generated(Path(*package) / "__init__.py", functools.partial(iter, (text,)))

    return files()
