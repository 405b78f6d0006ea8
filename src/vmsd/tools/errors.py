"""The one error the tools raise for a problem the user can fix (a bad argument, an unreadable file).

The CLI prints its message and exits 1 without a traceback; stream and spec problems keep their own
types (:class:`~vmsd.runtime.errors.VMSDError`, the grammar's ``SpecError``), which carry offsets and
locations.
"""

from __future__ import annotations


class ToolError(Exception):
    """A usage problem (bad --set path, unreadable file) reported without a traceback."""
