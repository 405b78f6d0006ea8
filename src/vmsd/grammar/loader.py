"""Load a spec file and everything it imports, detecting cycles, within the limits of limits.py."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import attrs

from vmsd.grammar import ast
from vmsd.grammar.diagnostics import Diagnostic, SpecError
from vmsd.grammar.limits import MAX_IMPORT_DEPTH, MAX_PROGRAM_BYTES, MAX_SPEC_BYTES, MAX_SPEC_FILES
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


# Bytes read at a time past the size a spec's file states.
_CHUNK = 64 << 10


def _read_spec(path: Path) -> str:
    """The text of a regular file of at most MAX_SPEC_BYTES; OSError or ValueError saying why not.

    Opened without blocking (a FIFO would wait for a writer) and checked
    before reading: a device such as /dev/zero never ends.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        # read(n) sets aside n bytes first: asking for the limit would cost 4 MiB for every spec.  The
        # size stated is only a hint (procfs files say 0, a file may grow), so reading goes on in
        # chunks until the end or one byte past the limit.
        data = bytearray()
        want = min(info.st_size, MAX_SPEC_BYTES) + 1
        while len(data) <= MAX_SPEC_BYTES:
            chunk = fh.read(want)
            if not chunk:
                break
            data += chunk
            want = min(_CHUNK, MAX_SPEC_BYTES + 1 - len(data))
    if len(data) > MAX_SPEC_BYTES:
        raise ValueError(f"larger than the limit of {MAX_SPEC_BYTES >> 20} MiB")
    return data.decode("utf-8")


def read_spec(path: Path, key: str) -> str:
    """The text of a spec asked for by name (``key`` in messages); :class:`SpecError` saying why it cannot be read."""
    try:
        return _read_spec(path)
    except (OSError, ValueError) as exc:
        raise SpecError([Diagnostic(ast.Pos(key, 1, 1), f"cannot read spec: {_problem(exc, False)}")], {}) from None


def _problem(exc: Exception, short: bool) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    if isinstance(exc, OSError) and short:
        return exc.__class__.__name__
    return str(exc)


def load(paths: list[Path], outside_imports: bool = False, also: Sequence[Path] = ()) -> Program:
    """Parse ``paths`` and their imports.

    Imports must stay inside the folders of ``paths`` or of ``also`` (the
    specs vmsd ships, which user specs import) after resolving symbolic links,
    unless ``outside_imports``; limits.py bounds the chain length and the
    number of files.
    """
    files: dict[str, ast.SpecFile] = {}
    targets: dict[tuple[str, str], str] = {}
    sources: dict[str, str] = {}
    diags: list[Diagnostic] = []
    roots: list[str] = []
    folders = [*(p.resolve().parent for p in paths), *(f.resolve() for f in also)]
    seen: set[str] = set()
    total = [0]  # characters read so far

    def refused(target: Path, via: ast.Import, stack: list[str]) -> str | None:
        if len(stack) > MAX_IMPORT_DEPTH:
            return f"imports nest more than {MAX_IMPORT_DEPTH} files deep"
        if len(seen) >= MAX_SPEC_FILES:
            return f"more than {MAX_SPEC_FILES} spec files"
        real = target.resolve()
        if not outside_imports and not any(real.is_relative_to(f) for f in folders):
            return (f"cannot import '{via.path}': outside the folders of the specs given "
                    "(--allow-outside-imports allows it)")
        return None

    def visit(path: Path, stack: list[str], via: ast.Import | None) -> str:
        key = display_path(path)
        if key in stack:
            cycle = " -> ".join([*stack[stack.index(key):], key])
            assert via is not None
            diags.append(Diagnostic(via.pos, f"import cycle: {cycle}"))
            return key
        if key in seen:
            return key
        if via is not None:
            why = refused(path, via, stack)
            if why is not None:
                diags.append(Diagnostic(via.pos, why))
                return key
        seen.add(key)
        if via is None:
            source = read_spec(path, key)
        else:
            try:
                source = _read_spec(path)
            except (OSError, ValueError) as exc:
                diags.append(Diagnostic(via.pos, f"cannot import '{via.path}': {_problem(exc, True)}"))
                return key
        sources[key] = source
        total[0] += len(source)
        if total[0] > MAX_PROGRAM_BYTES:
            raise SpecError([Diagnostic(via.pos if via else ast.Pos(key, 1, 1),
                                        f"the specs are larger than the limit of {MAX_PROGRAM_BYTES >> 20} MiB together")], sources)
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
