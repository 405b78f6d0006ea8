"""cpr-exec: the CPR state in a memfd that survives ``execvp``, named by an environment variable.

The old program writes the state (descriptors as their numbers) into a memfd,
keeps an inheritable duplicate and names it in ``QEMU_CPR_EXEC_STATE``; after
the main stream is complete it clears close-on-exec on every preserved
descriptor and execs the new program in the same process.  If ``execvp``
fails, everything is put back and the old program goes on.  The new program
finds the state through the variable, unsets it, and marks the descriptors
close-on-exec again so that its own children do not inherit them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from vmsd.migration.cpr.state import CprEntry, CprError, CprState, read_state, write_state
from vmsd.migration.profile import PeerProfile
from vmsd.runtime.errors import VMSDError
from vmsd.runtime.io import Reader, Writer

ENV = "QEMU_CPR_EXEC_STATE"  # QEMU's name, for the variable and for the memfd
# A state of MAX_ENTRIES entries with long names stays far below this.
_MAX_STATE = 16 << 20


class _MemfdSink:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, data: bytes | bytearray, /) -> int:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        return len(data)


def persist_state(entries: Sequence[CprEntry], peer: PeerProfile) -> int:
    """Write the state into a memfd and name an inheritable duplicate in the environment; returns that duplicate."""
    mfd = os.memfd_create(ENV, os.MFD_CLOEXEC)
    try:
        w = Writer(_MemfdSink(mfd))
        write_state(w, entries, peer)
        w.flush()
        keep = os.dup(mfd)
    finally:
        os.close(mfd)
    os.set_inheritable(keep, True)
    os.environ[ENV] = str(keep)
    return keep


def unpersist_state(keep: int) -> None:
    """Undo :func:`persist_state` (the migration failed or was cancelled before the exec)."""
    if os.environ.get(ENV) == str(keep):
        del os.environ[ENV]
    with contextlib.suppress(OSError):
        os.close(keep)


def exec_program(argv: Sequence[str], preserve: Sequence[int]) -> None:
    """Exec ``argv`` (``argv[0]`` searched in PATH) with ``preserve`` inherited; returns only by raising.

    On failure the descriptors are close-on-exec again and :class:`CprError` says why; the caller
    still owns them and the state.
    """
    if not argv:
        raise CprError("cpr-exec-command is empty")
    for fd in preserve:
        os.set_inheritable(fd, True)
    try:
        os.execvp(argv[0], list(argv))
    except OSError as e:
        for fd in preserve:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        raise CprError(f"execvp {argv[0]} failed: {e.strerror or e}") from None


def has_state() -> bool:
    return ENV in os.environ


def find_state() -> CprState:
    """The state a cpr-exec predecessor left (the variable is unset, its memfd closed).

    Every descriptor it names must be open here (inherited); they become close-on-exec again.
    """
    value = os.environ.pop(ENV, None)
    if value is None:
        raise CprError(f"no CPR state: {ENV} is not set (this process was not started by cpr-exec)")
    if not value.isdigit() or len(value) > 9:
        raise CprError(f"{ENV}={value!r} does not name a descriptor")
    mfd = int(value)
    try:
        try:
            size = os.fstat(mfd).st_size
            if size > _MAX_STATE:
                raise CprError(f"the CPR state in descriptor {mfd} is {size} bytes, more than {_MAX_STATE}")
            data = os.pread(mfd, size, 0)
        except OSError as e:
            raise CprError(f"{ENV}={value}: cannot read the CPR state ({e.strerror})") from None
        try:
            state = read_state(Reader(data))
        except CprError:
            raise
        except VMSDError as e:
            raise CprError(f"the CPR state in {ENV} is malformed: {e}", offset=e.offset) from None
    finally:
        with contextlib.suppress(OSError):
            os.close(mfd)
    for entry in state.entries:
        try:
            os.set_inheritable(entry.fd, False)
        except OSError:
            state.close()
            raise CprError(f"descriptor {entry.fd} ('{entry.name}' id {entry.id}) of the CPR state is not open "
                           f"in this process") from None
    return state
