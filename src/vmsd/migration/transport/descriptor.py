"""Channels over a kernel descriptor: a pipe or file, a socket, a unix socket that also passes descriptors."""

from __future__ import annotations

import array
import collections
import contextlib
import errno
import os
import socket
import threading
from collections.abc import Iterable, Sequence

from vmsd.migration.iovec import Scattered, write_scattered
from vmsd.migration.transport.channel import BaseChannel, Buffer, Channel
from vmsd.migration.transport.errors import TransportError, wrap
from vmsd.migration.transport.idle import is_stall, limit_idle, stalled

try:
    _IOV_MAX = max(16, min(os.sysconf("SC_IOV_MAX"), 1024))
except (ValueError, OSError):  # pragma: no cover - every POSIX system has it
    _IOV_MAX = 16

# Linux's limit on descriptors in one message (SCM_MAX_FD, include/net/scm.h): room for the most one
# read can receive, so only a full descriptor table (or a security module) truncates what arrives.
_SCM_MAX_FD = 253
_FD_ITEM = array.array("i").itemsize
_ANCILLARY = socket.CMSG_SPACE(_SCM_MAX_FD * _FD_ITEM)


class DescriptorChannel(BaseChannel):
    """A byte stream over a descriptor that is not a socket: a pipe, a file, a character device.

    Takes ownership of ``fd``.  Reads and writes go straight to the kernel;
    :class:`Scattered` pages are written from where they are by writev(2).
    """

    def __init__(self, name: str, *, fd: int) -> None:
        super().__init__(name)
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    # ---- reading
    def readinto(self, buffer: memoryview | bytearray, /) -> int:
        self._check_open()
        try:
            n = self._recv(memoryview(buffer), whole=False)
        except OSError as exc:
            raise self._failure("read failed", exc) from exc
        if n == 0 and len(buffer):
            self._at_eof()
        return n

    def read_full(self, buffer: memoryview, /) -> int:
        self._check_open()
        got, n = 0, len(buffer)
        while got < n:
            try:
                k = self._recv(buffer[got:], whole=True)
            except OSError as exc:
                raise self._failure("read failed", exc) from exc
            if k == 0:
                self._at_eof()
                break
            got += k
        return got

    def peek(self, n: int, timeout: float) -> bytes:
        raise TransportError(self.name, "only a socket can be peeked", errno.EINVAL)

    # ---- writing
    def write(self, data: Buffer, /) -> int:
        self._check_open()
        view = memoryview(data).cast("B")
        total = len(view)
        try:
            while view:
                view = view[self._send(view):]
        except OSError as exc:
            raise self._failure("write failed", exc) from exc
        return total

    def writev(self, buffers: Iterable[Buffer | Scattered], /) -> int:
        """Scatter/gather I/O: plain buffers in batches of IOV_MAX, each :class:`Scattered` as its own iovec array."""
        self._check_open()
        total = 0
        plain: list[Buffer] = []
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

    def _writev(self, buffers: list[Buffer]) -> int:
        views = [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]
        total = sum(len(v) for v in views)
        i = 0
        try:
            while i < len(views):
                n = self._sendv(views[i:i + _IOV_MAX])
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

    # ---- the system calls, and hooks for subclasses
    def _recv(self, view: memoryview, whole: bool) -> int:
        """One read into ``view``; ``whole``: the caller wants all of it (a socket may then wait for it)."""
        return os.readv(self._fd, [view])

    def _send(self, view: memoryview) -> int:
        return os.write(self._fd, view)

    def _sendv(self, views: list[memoryview]) -> int:
        return os.writev(self._fd, views)

    def _at_eof(self) -> None:
        """The stream ended (a command channel then checks how its command exited)."""

    def _failure(self, what: str, exc: OSError) -> TransportError:
        return wrap(self.name, what, exc)

    def _release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class SocketChannel(DescriptorChannel):
    """A byte stream over a connected stream socket (``tcp:``, or ``fd:`` naming a socket).

    Takes ownership of ``sock``, which must be in blocking mode.  With
    ``idle_timeout`` (seconds), a read or write that moves nothing for that
    long fails with ``ETIMEDOUT``, and so does a TCP connection whose peer
    stops acknowledging (:mod:`vmsd.migration.transport.idle`).
    """

    def __init__(self, name: str, *, sock: socket.socket, idle_timeout: float | None = None) -> None:
        super().__init__(name, fd=sock.fileno())
        self._sock = sock
        self.idle_timeout = idle_timeout
        if idle_timeout is not None:
            try:
                limit_idle(sock, idle_timeout)
            except BaseException as exc:
                sock.close()  # ours already
                if isinstance(exc, OSError):
                    raise wrap(name, "cannot set the idle limit", exc) from exc
                raise

    def peek(self, n: int, timeout: float) -> bytes:
        self._check_open()
        self._sock.settimeout(timeout)
        try:
            # The timeout makes the socket non-blocking: once the first byte is there, what has arrived
            # by then comes back (MSG_WAITALL would not wait either).
            return self._sock.recv(n, socket.MSG_PEEK)
        except TimeoutError as exc:
            raise TransportError(self.name, f"nothing received within {timeout:g}s", errno.ETIMEDOUT) from exc
        except OSError as exc:
            raise self._failure("read failed", exc) from exc
        finally:
            self._sock.settimeout(None)

    def shutdown(self) -> None:
        if not self.closed:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def shutdown_read(self) -> None:
        if not self.closed:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RD)

    def shutdown_write(self) -> None:
        self._check_open()
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise self._failure("ending the stream failed", exc) from exc

    def _recv(self, view: memoryview, whole: bool) -> int:
        # MSG_WAITALL: the kernel wakes us once per buffer instead of once per arriving segment,
        # which is what a multifd channel reading a packet's pages into RAM wants.
        return self._sock.recv_into(view, 0, socket.MSG_WAITALL if whole else 0)

    def _send(self, view: memoryview) -> int:
        return self._sock.send(view)

    def _sendv(self, views: list[memoryview]) -> int:
        return self._sock.sendmsg(views)

    def _failure(self, what: str, exc: OSError) -> TransportError:
        if self.idle_timeout is not None and is_stall(exc):
            return stalled(self.name, what, self.idle_timeout, exc)
        return super()._failure(what, exc)

    def _release(self) -> None:
        self._fd = -1
        self._sock.close()


class UnixChannel(SocketChannel):
    """A unix stream socket: a :class:`SocketChannel` that also passes descriptors (SCM_RIGHTS).

    Every read asks for ancillary data, so descriptors that arrive with the
    bytes of a plain read are kept for :meth:`take_fds` instead of being
    closed by the kernel (see :mod:`vmsd.migration.transport.channel` for the
    rule).  Reads from several threads at once are not supported, as on any
    channel; :meth:`take_fds` may be called from another thread than the one
    reading.
    """

    passes_fds = True

    def __init__(self, name: str, *, sock: socket.socket, idle_timeout: float | None = None) -> None:
        super().__init__(name, sock=sock, idle_timeout=idle_timeout)
        self._fds: collections.deque[int] = collections.deque()  # received by reads, not taken yet
        self._fds_lock = threading.Lock()

    def send_fds(self, data: Buffer, fds: Sequence[int]) -> None:
        self._check_open()
        view = memoryview(data).cast("B")
        if not view:
            raise ValueError("descriptors travel with at least one byte")
        if not 0 < len(fds) <= _SCM_MAX_FD:
            raise ValueError(f"1 to {_SCM_MAX_FD} descriptors go in one message, not {len(fds)}")
        try:
            # The kernel attaches the descriptors to the first bytes it takes; the rest of the data may follow
            # in more writes like any other bytes.
            view = view[socket.send_fds(self._sock, [view], list(fds)):]
            while view:
                view = view[self._send(view):]
        except OSError as exc:
            raise self._failure("sending descriptors failed", exc) from exc

    def recv_fds(self, nbytes: int, maxfds: int) -> tuple[bytes, list[int]]:
        self._check_open()
        if nbytes < 1:
            raise ValueError("descriptors travel with at least one byte")
        with self._fds_lock:
            waiting = len(self._fds)
        if waiting:
            raise TransportError(self.name, f"{waiting} descriptor(s) came with bytes read earlier and were not "
                                            "taken: a reader read ahead, take them with take_fds()", errno.EPROTO)
        data = self.read_exact(nbytes)
        with self._fds_lock:
            fds = list(self._fds)
            self._fds.clear()
        if len(fds) > maxfds:
            _close_all(fds)
            raise TransportError(self.name, f"{len(fds)} descriptors came with {nbytes} bytes, at most {maxfds} "
                                            "expected (closed them)", errno.EPROTO)
        return data, fds

    def take_fds(self, count: int) -> list[int]:
        self._check_open()
        with self._fds_lock:
            if len(self._fds) < count:
                raise TransportError(self.name, f"{count} descriptor(s) wanted, {len(self._fds)} received with the "
                                                "bytes read so far", errno.EPROTO)
            return [self._fds.popleft() for _ in range(count)]

    def _recv(self, view: memoryview, whole: bool) -> int:
        flags = socket.MSG_CMSG_CLOEXEC | (socket.MSG_WAITALL if whole else 0)
        n, ancillary, msg_flags, _ = self._sock.recvmsg_into([view], _ANCILLARY, flags)
        fds = _fds_in(ancillary)
        if msg_flags & socket.MSG_CTRUNC:
            _close_all(fds)
            raise TransportError(self.name, f"descriptors were lost on the way in (ancillary data truncated: is the "
                                            f"descriptor table full?); closed the {len(fds)} that arrived")
        if fds:
            with self._fds_lock:
                self._fds.extend(fds)
        return n

    def _release(self) -> None:
        with self._fds_lock:
            fds = list(self._fds)
            self._fds.clear()
        _close_all(fds)  # nobody took them (QEMU's qemu_fclose closes them too)
        super()._release()


def _fds_in(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in SCM_RIGHTS messages (whole ones: a truncated message may end in part of one)."""
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % _FD_ITEM])
    return list(fds)


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def socket_channel(name: str, sock: socket.socket, idle_timeout: float | None = None) -> Channel:
    """The channel for a connected stream socket: a :class:`UnixChannel` for a unix socket (it passes
    descriptors), a :class:`SocketChannel` otherwise.  ``sock.family`` is what the kernel says
    (SO_DOMAIN) also for a socket made from an inherited descriptor.  ``idle_timeout``: as
    :class:`SocketChannel`'s."""
    if sock.family == socket.AF_UNIX:
        return UnixChannel(name, sock=sock, idle_timeout=idle_timeout)
    return SocketChannel(name, sock=sock, idle_timeout=idle_timeout)
