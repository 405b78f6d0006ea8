"""Spec text placed inside generated source, escaped so that it stays text.

Doc comments, names and paths come from the spec author (or from whoever wrote the spec a tool was
pointed at).  Pasted raw into a docstring, a doc holding three double quotes would end the string and
whatever followed would run when the module is imported; a backslash sequence such as \\N or a
trailing quote would not compile; a NUL or a newline in a path would break the header comment.  These
functions escape exactly what would change the meaning and leave everything else as the author wrote
it, so ordinary docs come out unchanged.
"""

from __future__ import annotations

import re

_LOOSE_QUOTE = re.compile(r'"(?=")|(?<=")"|"\Z')


def _escape_unprintable(text: str, keep: str) -> str:
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii") for c in text)


def docstring_body(text: str) -> str:
    """``text`` as the inside of a ``\"\"\"...\"\"\"`` docstring that reads back as ``text``."""
    # A quote next to another or at the very end could join others into three: those are escaped, so no
    # unescaped quote touches another (a doc's "quoted words" come out as written).
    out = _LOOSE_QUOTE.sub(r'\\"', text.replace("\\", "\\\\"))
    return _escape_unprintable(out, "\n\t")


def comment_text(text: str) -> str:
    """``text`` on one comment line: newlines and other control characters as escapes."""
    return _escape_unprintable(text, "")
