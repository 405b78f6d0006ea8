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
        # Lines as the parser counts them (splitlines would also split at form feeds and the like).
        lines = source.split("\n")
        if not 1 <= self.pos.line <= len(lines):
            return head
        text = lines[self.pos.line - 1].rstrip("\r").expandtabs(1)
        caret = " " * len(_shown(text[: self.pos.col - 1])) + "^"
        return f"{head}\n    {_shown(text)}\n    {caret}"


def _shown(text: str) -> str:
    """Source text for a terminal: control characters (a NUL, an escape sequence) as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class SpecError(Exception):
    """One or more diagnostics that stop compilation."""

    def __init__(self, diagnostics: list[Diagnostic], sources: dict[str, str]) -> None:
        self.diagnostics = diagnostics
        self.sources = sources
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(d.render(self.sources.get(d.pos.path)) for d in self.diagnostics)
