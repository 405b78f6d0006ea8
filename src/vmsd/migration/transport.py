"""Migration transports named by QEMU's URI syntax, for both directions.

Accepted URIs (as in QEMU's ``migrate`` / ``migrate-incoming``):

``file:PATH[,offset=N]``
    Outgoing writes ``PATH.partial`` next to ``PATH`` and renames it on a
    successful :meth:`Channel.close`, so a half-written file never looks
    complete.  ``offset`` (newer QEMU; suffixes K/M/G/T allowed) starts the
    stream at byte N: outgoing keeps the first N bytes of an existing
    ``PATH`` (zero-filled otherwise), incoming seeks there.  An existing
    ``PATH`` that is not a regular file (``/dev/null``, a FIFO) is written
    in place.
``tcp:HOST:PORT``
    ``HOST`` may be a name, an IPv4 address or ``[IPv6]``.  Outgoing
    connects; incoming listens (an empty host means all addresses), accepts
    one connection and closes the listener.  :func:`listen` keeps the
    listener for further connections (multifd); port 0 picks a free port.
``unix:PATH``
    Like ``tcp:`` over a UNIX socket; a stale socket file is replaced.
``fd:N`` or ``fd:NAME``
    An inherited descriptor, or one registered with :func:`register_fd`
    (QMP ``getfd``).  The channel takes ownership and closes it.
``exec:COMMAND``
    ``sh -c COMMAND``: outgoing writes to its stdin, incoming reads its
    stdout.  A failing command raises :class:`TransportError` with the tail
    of its stderr; the child is always reaped.

Every I/O failure raises :class:`TransportError` (an ``OSError`` naming the
URI); a malformed URI raises :class:`InvalidURI` (a ``ValueError``).
A :class:`Channel` is a ``readinto`` source for :class:`vmsd.runtime.io.Reader`
and a ``write`` sink for :class:`vmsd.runtime.io.Writer`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import IO

from vmsd.migration.iovec import Scattered, write_scattered

__all__ = [
    "URI",
    "Channel",
    "ExecURI",
    "FdURI",
    "FileURI",
    "InvalidURI",
    "Listener",
    "TcpURI",
    "TransportError",
    "UnixURI",
    "listen",
    "open_incoming",
    "open_outgoing",
    "parse_uri",
    "register_fd",
    "unregister_fd",
]

ACCEPTED = "file:PATH[,offset=N], tcp:HOST:PORT, unix:PATH, fd:N|NAME, exec:COMMAND"

_Buffer = bytes | bytearray | memoryview

try:
    _IOV_MAX = max(16, min(os.sysconf("SC_IOV_MAX"), 1024))
except (ValueError, OSError):  # pragma: no cover - every POSIX system has it
    _IOV_MAX = 16

_STDERR_TAIL = 2000


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


def _take_fd(uri: str, target: FdURI) -> int:
    if target.fd is not None:
        return target.fd
    assert target.name is not None
    with _named_lock:
        fd = _named_fds.pop(target.name, None)
    if fd is None:
        raise TransportError(uri, f"no descriptor registered as {target.name!r}", errno.EBADF)
    return fd


# -------------------------------------------------------------------- channels


def _wrap(uri: str, what: str, exc: BaseException) -> TransportError:
    if isinstance(exc, TransportError):
        return exc
    if isinstance(exc, TimeoutError | socket.timeout):
        return TransportError(uri, f"{what}: timed out", errno.ETIMEDOUT)
    if isinstance(exc, OSError):
        return TransportError(uri, f"{what}: {exc.strerror or exc}", exc.errno)
    return TransportError(uri, f"{what}: {exc}")


class Channel:
    """One byte stream over a socket or a file descriptor.

    Closing is idempotent.  Used as a context manager, leaving with an
    exception calls :meth:`abort` instead of :meth:`close`.
    """

    def __init__(self, name: str, *, fd: int | None = None, sock: socket.socket | None = None) -> None:
        assert (fd is None) != (sock is None)
        self.name = name
        self._fd = fd if fd is not None else -1
        self._sock = sock
        self.closed = False

    # ---- reading
    def readinto(self, buffer: memoryview | bytearray, /) -> int:
        """Read up to ``len(buffer)`` bytes; 0 at end of stream."""
        self._check_open()
        try:
            n = self._sock.recv_into(buffer) if self._sock is not None else os.readv(self._fd, [buffer])
        except OSError as exc:
            raise self._failure("read failed", exc) from exc
        if n == 0 and len(buffer):
            self._at_eof()
        return n

    def read_full(self, buffer: memoryview, /) -> int:
        """Fill ``buffer``; fewer bytes only at end of stream.

        A blocking socket waits in the kernel for all of it (``MSG_WAITALL``):
        one wake-up per buffer instead of one per arriving segment, which is
        what a multifd channel reading a packet's pages into RAM wants.
        """
        self._check_open()
        got, n = 0, len(buffer)
        while got < n:
            try:
                k = (self._sock.recv_into(buffer[got:], 0, socket.MSG_WAITALL) if self._sock is not None
                     else os.readv(self._fd, [buffer[got:]]))
            except OSError as exc:
                raise self._failure("read failed", exc) from exc
            if k == 0:
                self._at_eof()
                break
            got += k
        return got

    def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes; :class:`TransportError` if the stream ends first."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.readinto(view[got:])
            if k == 0:
                raise TransportError(self.name, f"stream ended after {got} of {n} bytes", errno.EPIPE)
            got += k
        return bytes(buf)

    def peek(self, n: int, timeout: float) -> bytes:
        """The next ``n`` bytes without consuming them (fewer at end of stream); sockets only."""
        self._check_open()
        if self._sock is None:
            raise TransportError(self.name, "only a socket can be peeked", errno.EINVAL)
        self._sock.settimeout(timeout)
        try:
            return self._sock.recv(n, socket.MSG_PEEK | socket.MSG_WAITALL)
        except TimeoutError as exc:
            raise TransportError(self.name, f"nothing received within {timeout:g}s", errno.ETIMEDOUT) from exc
        except OSError as exc:
            raise self._failure("read failed", exc) from exc
        finally:
            self._sock.settimeout(None)

    # ---- writing
    def write(self, data: _Buffer, /) -> int:
        """Write all of ``data``; returns its length."""
        self._check_open()
        view = memoryview(data).cast("B")
        total = len(view)
        try:
            while view:
                n = self._sock.send(view) if self._sock is not None else os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            raise self._failure("write failed", exc) from exc
        return total

    def writev(self, buffers: Iterable[_Buffer | Scattered], /) -> int:
        """Write all buffers in order with scatter/gather I/O; returns the total.

        :class:`Scattered` items (pages written straight from RAM) go to the
        descriptor as their own iovec arrays, between the plain buffers around them.
        """
        self._check_open()
        total = 0
        plain: list[_Buffer] = []
        for b in buffers:
            if not isinstance(b, Scattered):
                plain.append(b)
                continue
            if plain:
                total += self._writev(plain)
                plain = []
            try:
                write_scattered(self.fileno(), b)
            except OSError as exc:
                raise self._failure("write failed", exc) from exc
            total += b.nbytes
        return total + (self._writev(plain) if plain else 0)

    def _writev(self, buffers: list[_Buffer]) -> int:
        views = [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]
        total = sum(len(v) for v in views)
        i = 0
        try:
            while i < len(views):
                batch = views[i:i + _IOV_MAX]
                n = self._sock.sendmsg(batch) if self._sock is not None else os.writev(self._fd, batch)
                while n > 0:
                    size = len(views[i])
                    if n >= size:
                        n -= size
                        i += 1
                    else:
                        views[i] = views[i][n:]
                        n = 0
        except OSError as exc:
            raise self._failure("write failed", exc) from exc
        return total

    def flush(self) -> None:
        """Nothing is buffered here; present for file-like callers."""

    # ---- lifetime
    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else self._fd

    def shutdown(self) -> None:
        """Stop both directions of a socket, waking a thread blocked on it; no-op otherwise."""
        if self._sock is not None and not self.closed:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def shutdown_read(self) -> None:
        """Stop reading from a socket: a thread blocked reading it sees the end of the stream; writing still works
        (a return-path answer can go out).  No-op for other descriptors."""
        if self._sock is not None and not self.closed:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RD)

    def close(self) -> None:
        """Close; raises :class:`TransportError` if completing the transfer failed."""
        if self.closed:
            return
        self.closed = True
        try:
            self._release()
        except OSError as exc:
            raise _wrap(self.name, "close failed", exc) from exc

    def abort(self) -> None:
        """Close without completing: discard partial output, kill a command.  Never raises."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self._release()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}{' closed' if self.closed else ''}>"

    # ---- hooks
    def _check_open(self) -> None:
        if self.closed:
            raise TransportError(self.name, "channel is closed", errno.EBADF)

    def _at_eof(self) -> None:
        pass

    def _failure(self, what: str, exc: OSError) -> TransportError:
        return _wrap(self.name, what, exc)

    def _release(self) -> None:
        if self._sock is not None:
            self._sock.close()
        elif self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class _FileSink(Channel):
    """``file:`` outgoing: write ``PATH.partial``, rename on close, remove on failure."""

    def __init__(self, name: str, path: str, offset: int) -> None:
        target = os.path.realpath(path) if os.path.islink(path) else path
        try:
            st: os.stat_result | None = os.stat(target)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise _wrap(name, "cannot open", exc) from exc
        self._partial: str | None = None
        self._target = target
        if st is not None and not stat.S_ISREG(st.st_mode):
            # A device or FIFO: write in place, nothing to rename.
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise _wrap(name, "cannot open", exc) from exc
            super().__init__(name, fd=fd)
            if offset:
                try:
                    os.lseek(fd, offset, os.SEEK_SET)
                except OSError as exc:
                    self.abort()
                    raise _wrap(name, f"cannot seek to offset {offset}", exc) from exc
            return
        partial = target + ".partial"
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _wrap(name, f"cannot create {partial}", exc) from exc
        self._partial = partial
        super().__init__(name, fd=fd)
        if offset:
            try:
                if st is not None:
                    with open(target, "rb") as old:
                        self.write(old.read(offset))
                os.ftruncate(fd, offset)
                os.lseek(fd, offset, os.SEEK_SET)
            except OSError as exc:
                self.abort()
                raise _wrap(name, f"cannot prepare offset {offset}", exc) from exc

    def _failure(self, what: str, exc: OSError) -> TransportError:
        self.abort()  # never leave a partial file behind
        return super()._failure(what, exc)

    _aborting = False

    def abort(self) -> None:
        self._aborting = True
        super().abort()

    def _release(self) -> None:
        partial, self._partial = self._partial, None
        if partial is None:
            super()._release()
            return
        try:
            if self._aborting:
                with contextlib.suppress(OSError):
                    super()._release()
                os.unlink(partial)
                return
            os.fsync(self._fd)
            super()._release()
            os.replace(partial, self._target)
        except OSError:
            with contextlib.suppress(OSError):
                super()._release()
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise
        with contextlib.suppress(OSError):  # make the rename durable
            dfd = os.open(os.path.dirname(os.path.abspath(self._target)), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


class _CommandChannel(Channel):
    """``exec:``: a ``sh -c`` child whose stdin (outgoing) or stdout (incoming) is the channel."""

    def __init__(self, name: str, command: str, outgoing: bool, timeout: float) -> None:
        self._timeout = timeout
        self._outgoing = outgoing
        self._eof = False
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        rfd, wfd = os.pipe()
        ours, theirs = (wfd, rfd) if outgoing else (rfd, wfd)
        try:
            self._proc = subprocess.Popen(
                ["/bin/sh", "-c", command],
                stdin=theirs if outgoing else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if outgoing else theirs,
                stderr=self._stderr,
            )
        except OSError as exc:
            os.close(ours)
            self._stderr.close()
            raise _wrap(name, "cannot start command", exc) from exc
        finally:
            os.close(theirs)
        super().__init__(name, fd=ours)

    def _stderr_tail(self) -> str:
        try:
            size = self._stderr.seek(0, os.SEEK_END)
            self._stderr.seek(max(0, size - _STDERR_TAIL))
            text = self._stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        return text

    def _describe(self, rc: int | None) -> str:
        if rc is None:
            status = "command did not exit"
        elif rc < 0:
            try:
                status = f"command killed by {signal.Signals(-rc).name}"
            except ValueError:
                status = f"command killed by signal {-rc}"
        else:
            status = f"command exited with status {rc}"
        tail = self._stderr_tail()
        return f"{status}: {tail}" if tail else status

    def _wait(self, timeout: float) -> int | None:
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _kill(self) -> int:
        with contextlib.suppress(OSError):
            self._proc.kill()
        return self._proc.wait()

    def _at_eof(self) -> None:
        if self._outgoing or self._eof:
            return
        self._eof = True
        rc = self._wait(self._timeout)
        if rc != 0:
            if rc is None:
                self._kill()
            raise TransportError(self.name, self._describe(rc))

    def _failure(self, what: str, exc: OSError) -> TransportError:
        if exc.errno == errno.EPIPE:
            rc = self._wait(min(self._timeout, 5.0))
            if rc is None:
                return TransportError(self.name, "command stopped reading its input: " + self._describe(rc), exc.errno)
            return TransportError(self.name, f"{what}: " + self._describe(rc), exc.errno)
        return super()._failure(what, exc)

    def _release(self) -> None:
        try:
            super()._release()
        finally:
            try:
                if self._outgoing:
                    rc = self._wait(self._timeout)
                    if rc is None:
                        self._kill()
                    if rc != 0:
                        raise TransportError(self.name, self._describe(rc))
                elif not self._eof:
                    # Reader gave up early: the command's remaining output is not wanted.
                    if self._wait(1.0) is None:
                        self._kill()
            finally:
                self._stderr.close()

    def abort(self) -> None:
        if not self.closed and self._proc.poll() is None:
            self._kill()
        super().abort()


# ------------------------------------------------------------------ listeners


class Listener:
    """A listening ``tcp:``/``unix:`` socket; :meth:`accept` yields channels.

    ``uri`` is the bound address (the real port when 0 was asked for).
    """

    def __init__(self, sock: socket.socket, uri: str, unlink: str | None = None) -> None:
        self._sock = sock
        self.uri = uri
        self._unlink = unlink
        self.closed = False

    def accept(self, timeout: float | None = 30.0) -> Channel:
        """Wait for one connection; :class:`TransportError` after ``timeout`` seconds."""
        if self.closed:
            raise TransportError(self.uri, "listener is closed", errno.EBADF)
        try:
            self._sock.settimeout(timeout)
            conn, _ = self._sock.accept()
        except OSError as exc:
            if isinstance(exc, TimeoutError | socket.timeout):
                raise TransportError(self.uri, f"no connection within {timeout:g}s", errno.ETIMEDOUT) from exc
            raise _wrap(self.uri, "accept failed", exc) from exc
        conn.settimeout(None)
        return Channel(self.uri, sock=_roomy(conn))

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._sock.close()
        if self._unlink is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unlink)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A unix stream socket queues only net.core.wmem_default (~208 KiB) in flight, so
# a sender of RAM blocks every 200 KiB and both ends wake each other thousands of
# times per GiB; TCP autotunes up to tcp_wmem's 4 MiB.  Give unix sockets that room
# (the kernel caps it at wmem_max/rmem_max): 1 GiB of pages, 0.6 -> 1.0 GB/s.
_UNIX_BUFFER = 4 << 20


def _roomy(sock: socket.socket) -> socket.socket:
    """``sock``, with TCP-sized buffers if it is a unix stream socket."""
    if sock.family == socket.AF_UNIX:
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, _UNIX_BUFFER)
    return sock


def listen(uri: str, backlog: int = 16) -> Listener:
    """Listen on a ``tcp:`` or ``unix:`` URI."""
    target = parse_uri(uri)
    if isinstance(target, TcpURI):
        try:
            if not target.host:
                if socket.has_dualstack_ipv6():
                    sock = socket.create_server(("::", target.port), family=socket.AF_INET6, backlog=backlog,
                                                dualstack_ipv6=True)
                else:
                    sock = socket.create_server(("", target.port), backlog=backlog)
            else:
                family, _, _, _, addr = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
                sock = socket.create_server(addr[:2], family=family, backlog=backlog)
        except OSError as exc:
            raise _wrap(uri, "cannot listen", exc) from exc
        port = sock.getsockname()[1]
        return Listener(sock, str(TcpURI(target.host, port)))
    if isinstance(target, UnixURI):
        path = target.path
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise _wrap(uri, "cannot listen", exc) from exc
        return Listener(sock, uri, unlink=path)
    raise InvalidURI(uri, "only tcp: and unix: can listen")


# ------------------------------------------------------------------ openers


def _fd_channel(uri: str, target: FdURI) -> Channel:
    fd = _take_fd(uri, target)
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise _wrap(uri, "bad descriptor", exc) from exc
    if stat.S_ISSOCK(mode):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise _wrap(uri, "bad socket", exc) from exc
        sock.settimeout(None)
        return Channel(uri, sock=_roomy(sock))
    return Channel(uri, fd=fd)


def open_outgoing(uri: str, timeout: float = 30.0) -> Channel:
    """Open the sending end named by ``uri``; ``timeout`` bounds connecting."""
    target = parse_uri(uri)
    if isinstance(target, FileURI):
        return _FileSink(uri, target.path, target.offset)
    if isinstance(target, TcpURI):
        try:
            sock = socket.create_connection((target.host or "localhost", target.port), timeout=timeout)
        except OSError as exc:
            if isinstance(exc, TimeoutError | socket.timeout):
                raise TransportError(uri, f"no connection within {timeout:g}s", errno.ETIMEDOUT) from exc
            raise _wrap(uri, "cannot connect", exc) from exc
        sock.settimeout(None)
        return Channel(uri, sock=sock)
    if isinstance(target, UnixURI):
        sock = _roomy(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        try:
            sock.settimeout(timeout)
            sock.connect(target.path)
        except OSError as exc:
            sock.close()
            if isinstance(exc, TimeoutError | socket.timeout):
                raise TransportError(uri, f"no connection within {timeout:g}s", errno.ETIMEDOUT) from exc
            raise _wrap(uri, "cannot connect", exc) from exc
        sock.settimeout(None)
        return Channel(uri, sock=sock)
    if isinstance(target, FdURI):
        return _fd_channel(uri, target)
    return _CommandChannel(uri, target.command, outgoing=True, timeout=timeout)


def open_incoming(uri: str, timeout: float = 30.0) -> Channel:
    """Open the receiving end named by ``uri``; ``timeout`` bounds waiting for the peer."""
    target = parse_uri(uri)
    if isinstance(target, TcpURI | UnixURI):
        with listen(uri, backlog=1) as listener:
            return listener.accept(timeout)
    if isinstance(target, FileURI):
        try:
            fd = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _wrap(uri, "cannot open", exc) from exc
        channel = Channel(uri, fd=fd)
        if target.offset:
            try:
                os.lseek(fd, target.offset, os.SEEK_SET)
            except OSError as exc:
                channel.abort()
                raise _wrap(uri, f"cannot seek to offset {target.offset}", exc) from exc
        return channel
    if isinstance(target, FdURI):
        return _fd_channel(uri, target)
    return _CommandChannel(uri, target.command, outgoing=False, timeout=timeout)
