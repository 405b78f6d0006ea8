"""The transport's two exceptions and the rule that turns ``OSError`` into :class:`TransportError`."""

from __future__ import annotations

import errno
import socket

ACCEPTED = "file:PATH[,offset=N], tcp:HOST:PORT, unix:PATH, fd:N|NAME, exec:COMMAND"


class TransportError(OSError):
    """A transport failed: connect/accept timeout, I/O error, failing command.

    ``str()`` is ``"<uri>: <what happened>"``; ``errno`` is the underlying
    error number when there is one.
    """

    def __init__(self, uri: str, message: str, err: int | None = None) -> None:
        super().__init__(f"{uri}: {message}")
        self.uri = uri
        self.message = message
        self.errno = err


class InvalidURI(ValueError):
    """A migration URI that is not one of :data:`ACCEPTED`."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"invalid migration URI {uri!r}: {reason} (accepted: {ACCEPTED})")
        self.uri = uri
        self.reason = reason


def wrap(uri: str, what: str, exc: BaseException) -> TransportError:
    """``exc`` as a :class:`TransportError` of ``uri`` saying ``what`` failed (one already is passes as it is)."""
    if isinstance(exc, TransportError):
        return exc
    if isinstance(exc, TimeoutError | socket.timeout):
        return TransportError(uri, f"{what}: timed out", errno.ETIMEDOUT)
    if isinstance(exc, OSError):
        return TransportError(uri, f"{what}: {exc.strerror or exc}", exc.errno)
    return TransportError(uri, f"{what}: {exc}")
