"""Where the specs bundled with vmsd (QEMU 7.2, examples, bench) are."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def specs_dir() -> Path:
    """The bundled specs: ``vmsd/_specs`` in an installed wheel, else ``specs/`` of the source checkout.

    The wheel maps the checkout's ``specs/`` to ``vmsd/_specs`` (pyproject.toml);
    an editable install or ``PYTHONPATH=src`` runs the package from ``src/vmsd``,
    two levels below ``specs/``.  Paths, not importlib.resources: the compiler
    reads the files by name and pip always installs a wheel into a folder.
    """
    for d in (_PACKAGE / "_specs", _PACKAGE.parents[1] / "specs"):
        if (d / "examples").is_dir():
            return d
    raise FileNotFoundError(f"the bundled specs are missing: neither {_PACKAGE / '_specs'} nor "
                            f"{_PACKAGE.parents[1] / 'specs'} exists")
