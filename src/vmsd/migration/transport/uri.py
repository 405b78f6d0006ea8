"""Migration URIs as QEMU spells them, and descriptors registered by name for ``fd:NAME``."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
from dataclasses import dataclass

from vmsd.migration.transport.errors import InvalidURI, TransportError

# --------------------------------------------------------------------------- URIs


@dataclass(frozen=True)
class FileURI:
    path: str
    offset: int = 0

    def __str__(self) -> str:
        return f"file:{self.path}" + (f",offset={self.offset}" if self.offset else "")


@dataclass(frozen=True)
class TcpURI:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class UnixURI:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class FdURI:
    fd: int | None
    name: str | None = None

    def __str__(self) -> str:
        return f"fd:{self.fd if self.name is None else self.name}"


@dataclass(frozen=True)
class ExecURI:
    command: str

    def __str__(self) -> str:
        return f"exec:{self.command}"


URI = FileURI | TcpURI | UnixURI | FdURI | ExecURI

_SIZE = re.compile(r"(0x[0-9a-f]+|[0-9]+)\s*([kmgt]?)b?", re.IGNORECASE)
_SUFFIX = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


def parse_uri(uri: str) -> URI:
    """Parse a QEMU migration URI; raises :class:`InvalidURI`."""
    scheme, sep, rest = uri.partition(":")
    if not sep:
        raise InvalidURI(uri, "no scheme")
    if scheme == "file":
        path, offset = rest, 0
        cut = rest.rfind(",offset=")
        if cut >= 0:
            path, text = rest[:cut], rest[cut + len(",offset="):]
            m = _SIZE.fullmatch(text.strip())
            if m is None:
                raise InvalidURI(uri, f"bad offset {text!r}")
            offset = int(m.group(1), 0) << _SUFFIX[m.group(2).lower()]
        if not path:
            raise InvalidURI(uri, "empty path")
        return FileURI(path, offset)
    if scheme == "tcp":
        if rest.startswith("["):
            close = rest.find("]")
            if close < 0 or rest[close + 1:close + 2] != ":":
                raise InvalidURI(uri, "expected tcp:[IPV6]:PORT")
            host, port_text = rest[1:close], rest[close + 2:]
        else:
            host, colon, port_text = rest.rpartition(":")
            if not colon:
                raise InvalidURI(uri, "expected tcp:HOST:PORT")
            if ":" in host:
                raise InvalidURI(uri, "an IPv6 address needs brackets: tcp:[ADDR]:PORT")
        if not port_text.isdigit() or int(port_text) > 65535:
            raise InvalidURI(uri, f"bad port {port_text!r}")
        return TcpURI(host, int(port_text))
    if scheme == "unix":
        if not rest:
            raise InvalidURI(uri, "empty path")
        return UnixURI(rest)
    if scheme == "fd":
        if not rest:
            raise InvalidURI(uri, "empty descriptor")
        if rest.isdigit():
            return FdURI(int(rest))
        if rest[0].isdigit():
            raise InvalidURI(uri, "a descriptor name must not start with a digit")
        return FdURI(None, rest)
    if scheme == "exec":
        if not rest.strip():
            raise InvalidURI(uri, "empty command")
        return ExecURI(rest)
    raise InvalidURI(uri, f"unknown scheme {scheme!r}")


# ------------------------------------------------------------------ named fds

_named_fds: dict[str, int] = {}
_named_lock = threading.Lock()


def register_fd(name: str, fd: int) -> None:
    """Register ``fd`` under ``name`` for ``fd:NAME`` (like QMP ``getfd``).

    Ownership passes to the registry: the fd is closed when replaced, when
    unregistered, or by the channel that opens it (opening consumes the name).
    """
    if not name or name[0].isdigit():
        raise ValueError(f"descriptor name {name!r} must be non-empty and not start with a digit")
    with _named_lock:
        old = _named_fds.pop(name, None)
        _named_fds[name] = fd
    if old is not None and old != fd:
        with contextlib.suppress(OSError):
            os.close(old)


def unregister_fd(name: str) -> None:
    """Forget and close a registered descriptor (like QMP ``closefd``)."""
    with _named_lock:
        fd = _named_fds.pop(name, None)
    if fd is None:
        raise KeyError(f"no descriptor registered as {name!r}")
    with contextlib.suppress(OSError):
        os.close(fd)


def take_fd(uri: str, target: FdURI) -> int:
    """The descriptor ``target`` names; a registered name is consumed."""
    if target.fd is not None:
        return target.fd
    assert target.name is not None
    with _named_lock:
        fd = _named_fds.pop(target.name, None)
    if fd is None:
        raise TransportError(uri, f"no descriptor registered as {target.name!r}", errno.EBADF)
    return fd
