"""Generated modules as part of a device author's package: the files the build hook and ``vmsd new`` write.

A package's consumers only get its types if the distribution says it has
them: PEP 561's ``py.typed`` marker, without which mypy skips the installed
package (``[import-untyped]``).  The marker belongs in the top-level package,
and covers every subpackage below it, so it goes to the outermost regular
package (one with ``__init__.py``) that contains the output folder, and only
there; a file the author already has is left as it is (it may say
``partial``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from vmsd.codegen.compiler import Generated, generate
from vmsd.runtime.outfile import write_file

MARKER = "py.typed"
_INIT = '"""Generated vmsd modules."""\n'


def marker_path(output: Path, root: Path | None = None) -> Path | None:
    """Where the ``py.typed`` marker of the package holding ``output`` goes, or None outside any package.

    ``output`` counts when it has an ``__init__.py``; from there the search
    climbs while the parent folder is a regular package, and never reaches
    ``root`` (a project folder is not a package, even with a stray
    ``__init__.py``).  A namespace package cannot carry a marker of its own
    (PEP 561), so output whose parent is one gets it in the output folder.
    """
    folder = output.resolve()
    stop = root.resolve() if root is not None else None
    top = folder if (folder / "__init__.py").is_file() else None
    parent = folder.parent
    while parent != stop and parent != parent.parent and (parent / "__init__.py").is_file():
        top = parent
        parent = parent.parent
    return None if top is None else top / MARKER


def ensure_marker(output: Path, root: Path | None = None) -> Path | None:
    """Write the marker for ``output``'s package unless it is there; the path written, else None."""
    marker = marker_path(output, root)
    if marker is None or marker.exists():
        return None
    write_file(marker, "")
    return marker


def write_package(root: Path, specs: str, output: str) -> list[Path]:
    """Compile every ``*.vmsd`` under ``root/specs`` into the package folder ``root/output``.

    Compiles with ``root`` as the current directory: generated files name
    their spec relative to it, so the text is what ``vmsd compile`` gives in
    CI from the project folder, wherever the caller runs.  Files whose text
    is unchanged are not touched.  Returns the files written.
    """
    root = root.resolve()
    spec_dir = root / specs
    found = sorted(spec_dir.rglob("*.vmsd"))
    if not found:
        raise ValueError(f"no .vmsd files under {spec_dir}")
    out_dir = root / output
    with contextlib.chdir(root):
        spec_root = str(spec_dir.relative_to(root)) if spec_dir.is_relative_to(root) else None
        _, written = update(out_dir, generate(found, spec_root), write=True)
    init = out_dir / "__init__.py"
    if not init.exists():
        write_file(init, _INIT)
        written.append(init)
    marker = ensure_marker(out_dir, root)
    if marker is not None:
        written.append(marker)
    return written


def update(out_dir: Path, files: Iterable[Generated], write: bool) -> tuple[list[Path], list[Path]]:
    """Compare each generated file with what ``out_dir`` holds, writing those that differ when ``write``.

    Returns the relative paths generated and the targets that differed (sorted).  A file's text is
    compared and written as it is rendered, never held whole.
    """
    made: list[Path] = []
    stale: list[Path] = []
    for g in files:
        made.append(g.path)
        target = out_dir / g.path
        if _holds(target, g.pieces()):
            continue
        stale.append(target)
        if write:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_file(target, g.pieces(), force=True)  # generated, never edited: regenerating replaces it
    return made, sorted(stale)


def _holds(target: Path, pieces: Iterator[str]) -> bool:
    """Whether ``target`` exists and its text (read as ``Path.read_text`` does) is the pieces'."""
    if not target.exists():
        return False
    with open(target, encoding="utf-8") as f:
        for piece in pieces:
            if f.read(len(piece)) != piece:
                return False
        return f.read(1) == ""
