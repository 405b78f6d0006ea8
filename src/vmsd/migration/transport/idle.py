"""The idle limit of a socket channel: how long the peer or the network may move no byte before the channel fails.

A migration must not hang forever on a peer that vanished (host down, link
cut) or that stopped reading or sending (a stuck process, a stalled relay).
TCP alone does not bound either: a receiver waits for bytes without end, and
a sender whose data is never acknowledged retries for about 15 minutes
(``net.ipv4.tcp_retries2``).  :func:`limit_idle` sets, on a socket:

``SO_RCVTIMEO`` / ``SO_SNDTIMEO``
    A blocking read, write, ``splice`` or ``writev`` that moves no byte for
    ``seconds`` returns ``EAGAIN`` (one that moved some returns the count);
    the channel turns that into :func:`stalled`.  This is what catches a
    peer whose kernel is alive but whose program (or relay) stalled.
``TCP_USER_TIMEOUT`` (TCP only)
    Data left unacknowledged for ``seconds`` -- a cut link, a dead host, a
    zero window the peer never reopens -- aborts the connection with
    ``ETIMEDOUT``.  It also bounds how long a closed socket's unsent data
    keeps retrying in the kernel after a failed migration.
``SO_KEEPALIVE`` with ``TCP_KEEPIDLE``/``TCP_KEEPINTVL`` (TCP only)
    Probes while no data flows, so that a dead peer is noticed by the kernel
    (again within ``TCP_USER_TIMEOUT``) even when nothing is being sent.

A link that comes back within the limit loses nothing: TCP retransmits, and
the transfer goes on.  Anything that polls the descriptor itself (the RAM
receiver) bounds its wait with :func:`receive_timeout`.
"""

from __future__ import annotations

import errno
import math
import socket
import struct

from vmsd.migration.transport.errors import TransportError

_TIMEVAL = struct.Struct("@ll")  # struct timeval on Linux: time_t and suseconds_t, both long


def limit_idle(sock: socket.socket, seconds: float) -> None:
    """Make ``sock`` fail once nothing moves for ``seconds`` (> 0), as the module says."""
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"an idle limit is a positive number of seconds, not {seconds!r}")
    tv = _TIMEVAL.pack(*divmod(max(1, round(seconds * 1e6)), 10**6))  # never 0: a zero timeval means no limit
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, round(seconds * 1000)))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # Probes start after a third of the limit, so that several go out before TCP_USER_TIMEOUT ends it.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(seconds / 3)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(seconds / 6)))


def receive_timeout(fd: int) -> float | None:
    """The idle limit a read on ``fd`` has (``SO_RCVTIMEO``), or None: no limit, or not a socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        sec, usec = _TIMEVAL.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.size))
    except OSError:
        return None
    finally:
        sock.detach()  # the descriptor stays its owner's
    return sec + usec / 1e6 or None


def stalled(name: str, what: str, seconds: float, exc: OSError | None = None) -> TransportError:
    """The error of a channel on which nothing moved for ``seconds``; ``exc``, the kernel's error, may say why."""
    why = "the peer or the network stalled"
    if exc is not None and exc.errno in _UNREACHABLE:
        why = exc.strerror or why
    return TransportError(name, f"{what}: nothing moved for {seconds:g}s, the idle limit ({why})", errno.ETIMEDOUT)


# TCP_USER_TIMEOUT ends a connection with the last soft error its retransmissions met, when there was one:
# a cut link (no route) gives these instead of ETIMEDOUT.  An established connection gets them from nothing else.
_UNREACHABLE = (errno.ENETUNREACH, errno.EHOSTUNREACH)


def is_stall(exc: OSError) -> bool:
    """Whether ``exc``, from a socket with an idle limit, means the limit ran out: ``EAGAIN`` from a blocking
    call (``SO_RCVTIMEO``/``SO_SNDTIMEO``), or ``ETIMEDOUT`` or an unreachable network (``TCP_USER_TIMEOUT``,
    whichever comes first)."""
    return exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ETIMEDOUT, *_UNREACHABLE)
