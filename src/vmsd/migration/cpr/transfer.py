"""cpr-transfer's ``cpr`` channel: the CPR state with its descriptors over a unix socket, then a hang-up.

The old side connects, writes the state (each descriptor as one carrier byte
with SCM_RIGHTS data), ends its direction and waits; the new side reads the
state, starts listening on the main channel and then closes the ``cpr``
channel.  That hang-up is the only "ready" signal the protocol has: the old
side connects the main channel when it sees it.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from typing import Any

from vmsd.migration.cpr.state import CprEntry, CprError, CprState, read_state, write_state
from vmsd.migration.profile import PeerProfile
from vmsd.migration.transport import Channel, TransportError
from vmsd.runtime.io import Reader, Writer


class _Received:
    """The descriptors that came with the bytes read from a channel, one per carrier byte."""

    def __init__(self, ch: Channel) -> None:
        self.ch = ch

    def take_fd(self) -> int | None:
        try:
            return self.ch.take_fds(1)[0]
        except TransportError:
            return None


class _Sent:
    """Sends each descriptor with its carrier byte."""

    def __init__(self, ch: Channel) -> None:
        self.ch = ch

    def send_fd(self, data: bytes, fd: int) -> None:
        self.ch.send_fds(data, [fd])


def send_state(ch: Channel, entries: Iterable[CprEntry], peer: PeerProfile, vfio_devices: Sequence[Any] = ()) -> None:
    """Write the CPR state with its descriptors and end this direction (the descriptors stay open here)."""
    if not ch.passes_fds:
        raise CprError(f"{ch.name}: the cpr channel must be a unix socket (it passes descriptors)")
    w = Writer(ch, fds=_Sent(ch))
    write_state(w, entries, peer, vfio_devices)
    w.flush()
    ch.shutdown_write()


def await_hangup(ch: Channel, timeout: float) -> None:
    """Wait until the new side closes the cpr channel (it then listens on the main channel)."""
    try:
        extra = ch.peek(1, timeout)
    except TransportError as e:
        if e.errno == errno.ETIMEDOUT:
            raise CprError(f"{ch.name}: the new side did not close the cpr channel within {timeout:g}s") from None
        if e.errno in (errno.ECONNRESET, errno.EPIPE):
            return  # gone is as good as closed; connecting the main channel tells whether it listens
        raise
    if extra:
        raise CprError(f"{ch.name}: the new side sent data on the cpr channel instead of closing it")


def receive_state(ch: Channel) -> CprState:
    """Read a whole CPR state and the descriptors passed with it; the caller closes ``ch`` when ready."""
    if not ch.passes_fds:
        raise CprError(f"{ch.name}: the cpr channel must be a unix socket (it passes descriptors)")
    return read_state(Reader(source=ch, fds=_Received(ch)))
