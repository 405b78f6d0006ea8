"""`vmsd compat`'s output: text lines, or one JSON object."""

from __future__ import annotations

import json
from typing import Any

from vmsd.tools.compat.model import CHANGED, FAIL, INFO, Finding

_ORDER = {FAIL: 0, CHANGED: 1, INFO: 2}


def verdict(findings: list[Finding]) -> str:
    return "incompatible" if any(f.category == FAIL for f in findings) else "compatible"


def ordered(findings: list[Finding]) -> list[Finding]:
    """Failures first, then changes, then information; each group in the order found (stream order)."""
    return sorted(findings, key=lambda f: _ORDER[f.category])


def as_json(source: str, dest: str, findings: list[Finding]) -> dict[str, Any]:
    return {
        "source": source,
        "dest": dest,
        "verdict": verdict(findings),
        "findings": [{"category": f.category, "section": f.section, "field": f.field, "message": f.message}
                     for f in ordered(findings)],
    }


def json_text(source: str, dest: str, findings: list[Finding]) -> str:
    return json.dumps(as_json(source, dest, findings), indent=1)


def text_lines(source: str, dest: str, findings: list[Finding]) -> list[str]:
    counts = {c: sum(1 for f in findings if f.category == c) for c in (FAIL, CHANGED, INFO)}
    lines = [f"{source} -> {dest}: {verdict(findings)} "
             f"({counts[FAIL]} fail, {counts[CHANGED]} changed, {counts[INFO]} info)"]
    for f in ordered(findings):
        where = f.section or ""
        if f.field:
            where = f"{where} {f.field}" if where else f.field
        lines.append(f"{f.category:<8} {where + ': ' if where else ''}{f.message}")
    return lines
