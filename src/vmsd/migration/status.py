"""The outgoing migration's status and the one table of the changes it may make.

The names are QEMU's ``MigrationStatus`` (what ``query-migrate`` answers).  Only the ones this
precopy engine passes through exist here: QEMU's postcopy-*, colo, pre-switchover and wait-unplug
belong to features the engine does not have, and ``cancelling`` is QEMU's state for a cancel the
migration thread has not acted on yet -- here only the migration thread changes the status, and a
cancel is an event it acts on at its next check (``setup``/``active``/``device -> cancelled``), so
there is no in-between state to report.

::

    none -> setup -> active -> device -> completed
              |        |         |
              +--------+---------+-----> failed | cancelled

``completed``, ``failed`` and ``cancelled`` are final: another migration is another
:class:`~vmsd.migration.precopy.Migration`.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class MigrationStatus(StrEnum):
    NONE = "none"  # created, not started
    SETUP = "setup"  # connecting, sending the header and the block list
    ACTIVE = "active"  # iterating over dirty RAM while the machine runs
    DEVICE = "device"  # the machine is paused: the last RAM pages and the devices go out (the downtime)
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


_S = MigrationStatus
_ENDS = frozenset({_S.FAILED, _S.CANCELLED})  # the source keeps running, as it was

TRANSITIONS: Mapping[MigrationStatus, frozenset[MigrationStatus]] = {
    _S.NONE: frozenset({_S.SETUP}),
    _S.SETUP: frozenset({_S.ACTIVE}) | _ENDS,
    _S.ACTIVE: frozenset({_S.DEVICE}) | _ENDS,
    _S.DEVICE: frozenset({_S.COMPLETED}) | _ENDS,
    # cpr-exec: the stream is complete before the exec, and a failed exec makes it a failure (as in QEMU).
    _S.COMPLETED: frozenset({_S.FAILED}),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
}


class IllegalTransition(AssertionError):
    """A status change the table does not allow: a bug in the engine, not a failed migration."""


def check_transition(old: MigrationStatus, new: MigrationStatus) -> None:
    """Raise :class:`IllegalTransition` unless ``old -> new`` is in :data:`TRANSITIONS`."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"migration status {old} -> {new} is not a legal transition")
