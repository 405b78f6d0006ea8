"""`vmsd compat SOURCE DEST`: can a QEMU described by DEST load what SOURCE saves?

:mod:`.sources` turns each input (a shipped spec set, a folder of specs, a ``-dump-vmstate`` file, a
stream) into wire layouts (:mod:`.model`), :mod:`.rules` compares them as QEMU's loader would, and
:mod:`.report` prints the findings.  docs/compat.md describes the checks for users.
"""

from __future__ import annotations

from vmsd.tools.compat.model import Finding
from vmsd.tools.compat.rules import check
from vmsd.tools.compat.sources import load_side, with_source_dump


def compat(source: str, dest: str, machine: str | None = None, source_dump: str | None = None) -> list[Finding]:
    """The findings for SOURCE ``source`` and DEST ``dest`` as named on the command line; ``source_dump``
    is the -dump-vmstate file of the QEMU that saved a stream SOURCE (``--source-dump``)."""
    src = load_side(source, "SOURCE")
    if source_dump is not None:
        src = with_source_dump(src, load_side(source_dump, "--source-dump"))
    return check(src, load_side(dest, "DEST"), machine)
