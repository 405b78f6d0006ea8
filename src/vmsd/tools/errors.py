"""The errors the tools raise for a problem the user can fix (a bad argument, an unreadable file).

The CLI prints the message without a traceback: exit 2 for a :class:`UsageError` (the command line
itself is wrong), 1 for any other :class:`ToolError`.  Stream and spec problems keep their own types
(:class:`~vmsd.runtime.errors.VMSDError`, the grammar's ``SpecError``), which carry offsets and
locations.
"""

from __future__ import annotations


class ToolError(Exception):
    """A problem the user can fix (bad --set path, an output that exists), reported without a traceback."""


class UsageError(ToolError):
    """The command line is wrong: an input it names cannot be read, an option's value is malformed."""
