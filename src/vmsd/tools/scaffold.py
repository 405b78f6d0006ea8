"""``vmsd new``: start a device package that ships its typed state classes.

The layout lives in ``templates/device_package`` (package data, so an
installed wheel can do it): every file there is written with ``.tmpl``
dropped, a ``__name__`` path segment replaced by the package name, and
``${name}``/``${vmsd_version}`` substituted (:class:`string.Template`, so
the braces of TOML tables and Python dicts need no escaping).  The ``.tmpl`` suffix keeps mypy,
ruff and pytest from taking the templates for vmsd's own modules.  The
generated package is then compiled exactly as the build hook compiles it.
"""

from __future__ import annotations

import keyword
import string
import sys
from pathlib import Path

import vmsd
from vmsd.codegen.package import write_package
from vmsd.runtime.outfile import write_file
from vmsd.tools.errors import ToolError

TEMPLATES = Path(__file__).resolve().parent / "templates" / "device_package"
SUFFIX = ".tmpl"
NAME_SEGMENT = "__name__"


def package_name(folder: Path, name: str | None) -> str:
    """The package name: ``name``, else the folder's name with ``-`` as ``_``; refused unless importable."""
    chosen = name if name is not None else folder.resolve().name.replace("-", "_")
    hint = "" if name is not None else f" (from the folder name {folder.resolve().name!r}; pass --name)"
    if not (chosen.isascii() and chosen.isidentifier()) or keyword.iskeyword(chosen):
        raise ToolError(f"{chosen!r} is not a valid Python package name{hint}: use letters, digits and "
                        "underscores, not starting with a digit")
    # Installed beside these, the package would hide them from every program in the environment.
    if chosen == "vmsd" or chosen in sys.stdlib_module_names:
        raise ToolError(f"{chosen!r} would shadow the module of that name{hint}")
    return chosen


def render(name: str) -> dict[Path, str]:
    """The project's files (relative paths) and their text, generated package aside."""
    values = {"name": name, "vmsd_version": vmsd.__version__}
    files: dict[Path, str] = {}
    for template in sorted(TEMPLATES.rglob("*" + SUFFIX)):
        rel = template.relative_to(TEMPLATES)
        parts = [name if part == NAME_SEGMENT else part for part in rel.parts]
        parts[-1] = parts[-1].removesuffix(SUFFIX)
        files[Path(*parts)] = string.Template(template.read_text(encoding="utf-8")).substitute(values)
    return files


def new_package(folder: Path, name: str | None = None) -> list[Path]:
    """Write a new device package into ``folder`` (absent or empty); the files written, relative to it.

    Everything that can refuse (the name, a non-empty folder, a template) is
    settled before the first file is written.
    """
    if folder.exists() and not folder.is_dir():
        raise ToolError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise ToolError(f"{folder} is not empty: give a new or empty folder")
    chosen = package_name(folder, name)
    files = render(chosen)
    root = folder.resolve()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_file(root / rel, text)
    generated = write_package(root, "specs", f"src/{chosen}/state")
    return sorted([*files, *(p.relative_to(root) for p in generated)])
