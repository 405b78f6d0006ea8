"""Loopback TCP ports for tests: a free one, and waiting until one listens without connecting to it (a one-shot
listener accepts only one peer)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's state column


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def is_listening(port: int) -> bool:
    """Whether some socket of this host listens on 127.0.0.1 or any IPv4 address at ``port``."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            local, state = line.split()[1], line.split()[3]
            if state == _LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_listening(port: int, timeout: float = 30.0, alive: Callable[[], bool] = lambda: True) -> None:
    """Return once ``port`` listens; fail after ``timeout`` s, or as soon as ``alive()`` says the server died."""
    deadline = time.monotonic() + timeout
    while not is_listening(port):
        if not alive():
            raise AssertionError(f"the server meant to listen on port {port} is gone")
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing listens on port {port} after {timeout}s")
        time.sleep(0.02)


_SO_ACCEPTCON = 0x10000  # /proc/net/unix's Flags of a listening socket


def unix_listening(path: str) -> bool:
    """Whether a unix socket bound to ``path`` listens (bind creates the file before listen)."""
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & _SO_ACCEPTCON:
                return True
    return False


def wait_unix_listening(path: str, timeout: float = 30.0, alive: Callable[[], bool] = lambda: True) -> None:
    """As :func:`wait_listening`, for a unix socket at ``path``."""
    deadline = time.monotonic() + timeout
    while not unix_listening(path):
        if not alive():
            raise AssertionError(f"the server meant to listen on {path} is gone")
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing listens on {path} after {timeout}s")
        time.sleep(0.01)
