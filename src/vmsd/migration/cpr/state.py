"""QEMU's CPR state: the descriptors an old QEMU hands to its successor, as plain codec functions.

The state is ``be32 "QCPR"``, ``be32 1`` and the vmsd ``CprState`` (a shipped
spec per QEMU version, ``specs/qemu/*/cpr.vmsd``): a QLIST of (name, id,
descriptor) entries and, from 10.1 on, an always-sent subsection of VFIO
devices.  How a descriptor travels is the reader's and writer's business
(:mod:`vmsd.runtime.io`): cpr-transfer passes it with SCM_RIGHTS, cpr-exec
writes its number.  Nothing here does I/O of its own.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import attrs

from vmsd.generated.qemu.v10_0.cpr import CprState as CprState10
from vmsd.generated.qemu.v10_0.cpr_fd import CprFd
from vmsd.generated.qemu.v11_1.cpr import CprState as CprState11
from vmsd.migration.profile import PeerProfile
from vmsd.runtime.errors import VMSDError
from vmsd.runtime.io import FdSource, Reader, Writer

MAGIC = 0x51435052  # "QCPR", QEMU_CPR_FILE_MAGIC
VERSION = 1  # QEMU_CPR_FILE_VERSION
_HEAD = struct.Struct(">II")

# The most entries a state may hold: QEMU registers one per RAM block, vhost, tap or VFIO descriptor,
# a few dozen in practice.  Hostile input cannot make more than this many descriptors be kept.
MAX_ENTRIES = 4096


class CprError(VMSDError):
    """A CPR state that cannot be used (malformed, or missing what the new side needs)."""


@attrs.frozen
class CprEntry:
    """One preserved descriptor: QEMU looks it up by ``(name, id)``."""

    name: str
    id: int
    fd: int


@attrs.define
class CprState:
    """A decoded CPR state; owns the descriptors of :attr:`entries` until :meth:`close` or :meth:`take`."""

    entries: list[CprEntry]
    vfio_devices: list[Any] = attrs.Factory(list)  # kept as decoded, passed on unchanged

    def find(self, name: str, id_: int = 0) -> CprEntry | None:
        return next((e for e in self.entries if e.name == name and e.id == id_), None)

    def take(self, name: str, id_: int = 0) -> int | None:
        """The descriptor for ``(name, id)``, now owned by the caller (None if the state has none)."""
        entry = self.find(name, id_)
        if entry is None:
            return None
        self.entries.remove(entry)
        return entry.fd

    def close(self) -> None:
        """Close every descriptor nobody took."""
        entries, self.entries = self.entries, []
        close_all(e.fd for e in entries)


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def write_state(w: Writer, entries: Iterable[CprEntry], peer: PeerProfile, vfio_devices: Sequence[Any] = ()) -> None:
    """Magic, version and the state in ``peer``'s layout; descriptors go out through ``w.fds`` or as numbers.

    QEMU lists the most recently registered descriptor first; the order carries no meaning.  ``vfio_devices``
    (as :func:`read_state` decoded them) pass on unchanged to a peer whose layout has them.
    """
    w.buf += _HEAD.pack(MAGIC, VERSION)
    fds = [CprFd(namelen=len(e.name.encode()) + 1, name=e.name.encode() + b"\0", id=e.id, fd=e.fd) for e in entries]
    if peer.cpr_vfio_devices:
        CprState11(fds=fds, vfio_devices=list(vfio_devices)).save(w)
    elif vfio_devices:
        raise CprError(f"{peer} has no place for the {len(vfio_devices)} VFIO device(s) of this CPR state")
    else:
        CprState10(fds=fds).save(w)


class _Counting:
    """Remembers every descriptor a load took, so that a failed load closes them all."""

    def __init__(self, inner: FdSource) -> None:
        self.inner = inner
        self.taken: list[int] = []

    def take_fd(self) -> int | None:
        if len(self.taken) >= MAX_ENTRIES:
            return None
        fd = self.inner.take_fd()
        if fd is not None:
            self.taken.append(fd)
        return fd


@contextlib.contextmanager
def _owning(r: Reader) -> Iterator[_Counting | None]:
    counting = _Counting(r.fds) if r.fds is not None else None
    saved = r.fds
    r.fds = counting
    try:
        yield counting
    except BaseException:
        if counting is not None:
            close_all(counting.taken)
        raise
    finally:
        r.fds = saved


def read_state(r: Reader) -> CprState:
    """Decode a whole CPR state (the input must end with it), as QEMU 10.0 or 11.1 writes it.

    With ``r.fds`` set, descriptors are those passed with the stream and the
    result owns them (a failure closes every one taken); without, they are the
    numbers of descriptors this process inherited (cpr-exec).
    """
    at = r.tell()
    with _owning(r) as counting:
        magic, version = _HEAD.unpack(r.read(_HEAD.size))
        if magic != MAGIC:
            raise CprError(f"not a CPR state (bad magic {magic:#x}, expected {MAGIC:#x} 'QCPR')", offset=at)
        if version != VERSION:
            raise CprError(f"unsupported CPR state version {version}", offset=at + 4)
        state = CprState11.load(r)
        if not r.at_end():
            raise CprError("bytes follow the CPR state", offset=r.tell())
        entries: list[CprEntry] = []
        seen: set[tuple[str, int]] = set()
        for i, fd in enumerate(state.fds):
            where = f"CprState.fds[{i}]"
            if fd.namelen != len(fd.name) or not fd.name.endswith(b"\0") or b"\0" in fd.name[:-1]:
                raise CprError(f"{where}: the name is not one NUL-terminated string of namelen bytes")
            name = fd.name[:-1].decode(errors="replace")
            if (name, fd.id) in seen:
                raise CprError(f"{where}: descriptor '{name}' id {fd.id} is listed twice")
            seen.add((name, fd.id))
            if counting is None and fd.fd < 0:
                raise CprError(f"{where}: descriptor '{name}' id {fd.id} has the number {fd.fd}")
            entries.append(CprEntry(name, fd.id, fd.fd))
        if len(entries) > MAX_ENTRIES:
            raise CprError(f"the CPR state lists {len(entries)} descriptors, more than {MAX_ENTRIES}")
    return CprState(entries, list(state.vfio_devices))
