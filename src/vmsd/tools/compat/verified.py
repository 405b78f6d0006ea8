"""What `vmsd compat` says about each real migration of :mod:`vmsd.testing.compat_matrix`.

For every case (source version S, destination version D, a configuration) three checks run:

- ``stream_vs_spec_set``: the stream QEMU S saved against ``qemu:D``;
- ``stream_vs_dump``: the same stream against D's ``-dump-vmstate`` for the machine type, with S's own
  dump as ``--source-dump`` (so devices without a shipped spec, the SCSI adapter, are judged too);
- ``spec_sets``: ``qemu:S`` against ``qemu:D --machine M``, no stream at all.

Each keeps its verdict and its "fail" and "changed" findings (the "info" ones are left out: they list
what was not checked and harmless renames, and would drown the table).  tests/data/compat_findings.json
holds them, docs/compat-verified.md shows them with :func:`table`, and tests/test_compat_reality.py
checks both against what `vmsd compat` reports now.  Record again with::

    python -m vmsd.tools.compat.verified > tests/data/compat_findings.json

(vmsd.testing may not import the tools, so this lives here and not in compat_matrix.)
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from vmsd.testing.compat_matrix import CONFIGURATIONS, VERSIONS, Case, cases, qemu_command, save_source_stream
from vmsd.tools.compat import compat
from vmsd.tools.compat.model import INFO
from vmsd.tools.compat.report import ordered, verdict

CHECKS = ("stream_vs_spec_set", "stream_vs_dump", "spec_sets")
DUMP_TIMEOUT = 60.0


def dump_vmstate(version: str, machine: str, out: Path) -> Path:
    """QEMU ``version``'s ``-dump-vmstate`` for ``machine`` written to ``out``."""
    cmd, env = qemu_command(version)
    subprocess.run([*cmd, "-M", machine, "-dump-vmstate", str(out)], env={**os.environ, **env}, check=True,
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=DUMP_TIMEOUT)
    return out


class Dumps:
    """Each version's dump for each machine type, made once, in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.made: dict[tuple[str, str], Path] = {}

    def get(self, version: str, machine: str) -> Path:
        if (version, machine) not in self.made:
            self.made[(version, machine)] = dump_vmstate(version, machine, self.folder / f"{version}-{machine}.json")
        return self.made[(version, machine)]


def _judged(source: str, dest: str, machine: str | None = None, source_dump: str | None = None) -> dict[str, Any]:
    findings = compat(source, dest, machine, source_dump)
    return {"verdict": verdict(findings),
            "findings": [{"category": f.category, "section": f.section, "field": f.field, "message": f.message}
                         for f in ordered(findings) if f.category != INFO]}


def judge(case: Case, stream: Path, dumps: Dumps) -> dict[str, Any]:
    """The data file's object for ``case``, whose source saved ``stream``."""
    machine = case.configuration.machine
    return {
        "source": case.source, "dest": case.dest, "configuration": case.configuration.name,
        "stream_vs_spec_set": _judged(str(stream), f"qemu:{case.dest}"),
        "stream_vs_dump": _judged(str(stream), str(dumps.get(case.dest, machine)),
                                  source_dump=str(dumps.get(case.source, machine))),
        "spec_sets": _judged(f"qemu:{case.source}", f"qemu:{case.dest}", machine),
    }


def _brief(check: dict[str, Any]) -> str:
    """A verdict and its findings as ``section field`` names, each once, for a table cell."""
    names: list[str] = []
    for f in check["findings"]:
        section = (f["section"] or "").rsplit("/", 1)[-1]  # the vmsd name of an idstr
        name = f"{f['category']} `{' '.join(p for p in (section, f['field']) if p)}`"
        if name not in names:
            names.append(name)
    head = "compatible" if check["verdict"] == "compatible" else "**incompatible**"
    return head + (": " + ", ".join(names) if names else "")


def table(records: list[dict[str, Any]], reality: list[dict[str, Any]]) -> str:
    """The Markdown table of docs/compat-verified.md: per case the real outcome and the three checks."""
    real = {(r["source"], r["dest"], r["configuration"]): r for r in reality}
    cells = {(r["source"], r["dest"], r["configuration"]): r for r in records}
    lines = ["| configuration | source → destination | real migration | stream vs `qemu:D` | "
             "stream vs D's dump | `qemu:S` vs `qemu:D` |", "|---|---|---|---|---|---|"]
    for configuration in CONFIGURATIONS:
        for source in VERSIONS:
            for dest in VERSIONS:
                key = (source, dest, configuration.name)
                outcome = "loads" if real[key]["loads"] else "**fails**"
                row = [f"`{configuration.name}`", f"{source} → {dest}", outcome,
                       *(_brief(cells[key][check]) for check in CHECKS)]
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Save each source's stream once per configuration, judge every case, print the data file."""
    with tempfile.TemporaryDirectory(prefix="vmsd-compat-") as d:
        folder = Path(d)
        dumps = Dumps(folder)
        streams: dict[tuple[str, str], Path] = {}
        records = []
        for case in cases():
            key = (case.source, case.configuration.name)
            if key not in streams:
                streams[key] = folder / f"{len(streams)}.stream"
                save_source_stream(case.source, case.configuration.machine, streams[key], case.configuration.args)
            records.append(judge(case, streams[key], dumps))
    print(json.dumps({"findings": records}, indent=1))


if __name__ == "__main__":
    main()
