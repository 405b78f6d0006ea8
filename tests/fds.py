"""Which descriptors this process has open, for tests that check nothing leaks."""

from __future__ import annotations

import fcntl
import os


def is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def open_fds() -> set[int]:
    """Open descriptors (not the one listdir held while reading the directory)."""
    return {fd for fd in (int(name) for name in os.listdir("/proc/self/fd")) if is_open(fd)}
