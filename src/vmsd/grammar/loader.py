"""Load a spec file and everything it imports, detecting cycles."""

from __future__ import annotations

from pathlib import Path

import attrs

from vmsd.grammar import ast
from vmsd.grammar.diagnostics import Diagnostic, SpecError
from vmsd.grammar.parser import parse


@attrs.frozen
class Program:
    """Parsed files keyed by resolved path; ``roots`` are the files asked for."""

    files: dict[str, ast.SpecFile]
    roots: tuple[str, ...]
    # resolved path of each import, by (importing file, import text)
    import_targets: dict[tuple[str, str], str]

    @property
    def sources(self) -> dict[str, str]:
        return {p: f.source for p, f in self.files.items()}


def display_path(path: Path) -> str:
    """Stable name of a spec file: relative to the current directory when inside it."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(Path.cwd()))
    except ValueError:
        return str(resolved)


def load(paths: list[Path]) -> Program:
    files: dict[str, ast.SpecFile] = {}
    targets: dict[tuple[str, str], str] = {}
    sources: dict[str, str] = {}
    diags: list[Diagnostic] = []
    roots: list[str] = []

    def visit(path: Path, stack: list[str], via: ast.Import | None) -> str:
        key = display_path(path)
        if key in stack:
            cycle = " -> ".join([*stack[stack.index(key):], key])
            assert via is not None
            diags.append(Diagnostic(via.pos, f"import cycle: {cycle}"))
            return key
        if key in files:
            return key
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            if via is None:
                raise SpecError([Diagnostic(ast.Pos(key, 1, 1), f"cannot read spec: {exc}")], {}) from None
            diags.append(Diagnostic(via.pos, f"cannot import '{via.path}': {exc.__class__.__name__}"))
            return key
        sources[key] = source
        try:
            spec = parse(source, key)
        except SpecError as exc:
            diags.extend(exc.diagnostics)
            return key
        files[key] = spec
        for imp in spec.imports:
            target = path.parent / imp.path
            targets[(key, imp.path)] = visit(target, [*stack, key], imp)
        return key

    for p in paths:
        roots.append(visit(p, [], None))
    if diags:
        raise SpecError(diags, sources)
    return Program(files, tuple(roots), targets)


def load_text(source: str, path: str = "<string>") -> Program:
    """A single file with no imports (tests, tools)."""
    spec = parse(source, path)
    if spec.imports:
        raise SpecError([Diagnostic(spec.imports[0].pos, "imports need a file on disk")], {path: source})
    return Program({path: spec}, (path,), {})
