"""Spec diagnostics: ``file:line:col: error: message``, the source line and a caret."""

from __future__ import annotations

import attrs

from vmsd.grammar.ast import Pos


@attrs.frozen
class Diagnostic:
    pos: Pos
    message: str
    severity: str = "error"

    def render(self, source: str | None) -> str:
        head = f"{self.pos.path}:{self.pos.line}:{self.pos.col}: {self.severity}: {self.message}"
        if source is None:
            return head
        lines = source.splitlines()
        if not 1 <= self.pos.line <= len(lines):
            return head
        text = lines[self.pos.line - 1].expandtabs(1)
        caret = " " * (self.pos.col - 1) + "^"
        return f"{head}\n    {text}\n    {caret}"


class SpecError(Exception):
    """One or more diagnostics that stop compilation."""

    def __init__(self, diagnostics: list[Diagnostic], sources: dict[str, str]) -> None:
        self.diagnostics = diagnostics
        self.sources = sources
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(d.render(self.sources.get(d.pos.path)) for d in self.diagnostics)
