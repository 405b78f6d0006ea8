"""One exception hierarchy for everything that reads or writes migration data.

Each error carries where it happened: the byte offset in the input, the
section idstr and the field path (``cpu/xmm_regs[3]``).  Errors that mean
"the input ended" are also ``EOFError`` and value problems are also
``ValueError``, so callers that only know the builtins still catch them.
"""

from __future__ import annotations

from typing import Any


class VMSDError(Exception):
    """Base of all vmsd runtime errors."""

    def __init__(
        self,
        message: str,
        *,
        offset: int | None = None,
        section: str | None = None,
        path: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.section = section
        self.path = path
        # Set by the interpretive decoder (vmsd.runtime.generic): what it had read of the value it was
        # decoding when this error stopped it, for a tool to show a damaged section up to the error.
        self.partial: Any = None

    def within(self, name: str) -> VMSDError:
        """Prefix the field path with an enclosing field or vmsd name."""
        if not name:
            return self
        self.path = f"{name}.{self.path}" if self.path and not self.path.startswith("[") else name + self.path
        return self

    def in_section(self, section: str) -> VMSDError:
        if self.section is None:
            self.section = section
        return self

    def __str__(self) -> str:
        where = []
        if self.section:
            where.append(f"section '{_printable(self.section)}'")
        if self.path:
            where.append(_printable(self.path))
        head = ": ".join(where)
        message = _printable(self.message)
        text = f"{head}: {message}" if head else message
        if self.offset is not None:
            text += f" (at offset {self.offset:#x})"
        return text


def _printable(text: str) -> str:
    """Names come from untrusted input: escape what would break a one-line message."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class TruncatedStream(VMSDError, EOFError):
    """The input ended inside a record."""


class MalformedStream(VMSDError, ValueError):
    """The bytes are present but do not form a valid record."""


class CheckFailed(VMSDError, ValueError):
    """An ``equal``/``le`` check or a ``validate`` predicate rejected a value."""


class VersionMismatch(VMSDError, ValueError):
    """An incoming version is newer than ours or older than our minimum."""


class SaveError(VMSDError, ValueError):
    """An object cannot be encoded (missing value, wrong length, out of range)."""


class RegistryError(VMSDError, LookupError):
    """No class or spec is known for a vmsd name or section."""
