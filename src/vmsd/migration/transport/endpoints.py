"""Opening channels by URI: :func:`open_outgoing`, :func:`open_incoming`, and :func:`listen` for several."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import stat

from vmsd.migration.transport.channel import Channel
from vmsd.migration.transport.command import CommandChannel
from vmsd.migration.transport.descriptor import DescriptorChannel, socket_channel
from vmsd.migration.transport.errors import InvalidURI, TransportError, wrap
from vmsd.migration.transport.filesink import FileSink
from vmsd.migration.transport.tls import client_channel, server_channel
from vmsd.migration.transport.uri import FdURI, FileURI, TcpURI, UnixURI, parse_uri, take_fd


class Listener:
    """A listening ``tcp:``/``unix:`` socket; :meth:`accept` yields channels.

    ``uri`` is the bound address (the real port when 0 was asked for).  With
    ``tls`` (a server context, :meth:`TlsConfig.server_context`) every
    connection is a :class:`~vmsd.migration.transport.tls.TlsChannel`.
    """

    def __init__(self, sock: socket.socket, uri: str, unlink: str | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self._sock = sock
        self.uri = uri
        self._unlink = unlink
        self._tls = tls
        self.closed = False

    def accept(self, timeout: float | None = 30.0, idle_timeout: float | None = None) -> Channel:
        """Wait for one connection (and its TLS handshake, also bounded by ``timeout``); :class:`TransportError`
        after ``timeout`` seconds, or when the handshake fails.

        ``idle_timeout``: the channel's idle limit (see :class:`SocketChannel`), none by default."""
        if self.closed:
            raise TransportError(self.uri, "listener is closed", errno.EBADF)
        try:
            self._sock.settimeout(timeout)
            conn, _ = self._sock.accept()
        except OSError as exc:
            if isinstance(exc, TimeoutError | socket.timeout):
                raise TransportError(self.uri, f"no connection within {timeout:g}s", errno.ETIMEDOUT) from exc
            raise wrap(self.uri, "accept failed", exc) from exc
        conn.settimeout(None)
        if self._tls is not None:
            return server_channel(self.uri, _roomy(conn), self._tls, 30.0 if timeout is None else timeout,
                                  idle_timeout)
        return socket_channel(self.uri, _roomy(conn), idle_timeout)

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


def listen(uri: str, backlog: int = 16, tls: ssl.SSLContext | None = None) -> Listener:
    """Listen on a ``tcp:`` or ``unix:`` URI (connections with TLS when given a server context)."""
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
            raise wrap(uri, "cannot listen", exc) from exc
        port = sock.getsockname()[1]
        return Listener(sock, str(TcpURI(target.host, port)), tls=tls)
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
            raise wrap(uri, "cannot listen", exc) from exc
        return Listener(sock, uri, unlink=path, tls=tls)
    raise InvalidURI(uri, "only tcp: and unix: can listen")


# ------------------------------------------------------------------ openers


def _fd_socket(uri: str, target: FdURI) -> socket.socket | Channel:
    """The socket an ``fd:`` URI names, or the channel of a descriptor that is not one."""
    fd = take_fd(uri, target)
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise wrap(uri, "bad descriptor", exc) from exc
    if stat.S_ISSOCK(mode):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise wrap(uri, "bad socket", exc) from exc
        sock.settimeout(None)
        return _roomy(sock)
    return DescriptorChannel(uri, fd=fd)


def _fd_channel(uri: str, target: FdURI, idle_timeout: float | None) -> Channel:
    got = _fd_socket(uri, target)
    return socket_channel(uri, got, idle_timeout) if isinstance(got, socket.socket) else got


def _connect(uri: str, target: TcpURI | UnixURI, timeout: float) -> socket.socket:
    if isinstance(target, TcpURI):
        try:
            sock = socket.create_connection((target.host or "localhost", target.port), timeout=timeout)
        except OSError as exc:
            if isinstance(exc, TimeoutError | socket.timeout):
                raise TransportError(uri, f"no connection within {timeout:g}s", errno.ETIMEDOUT) from exc
            raise wrap(uri, "cannot connect", exc) from exc
        sock.settimeout(None)
        return sock
    sock = _roomy(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    try:
        sock.settimeout(timeout)
        sock.connect(target.path)
    except OSError as exc:
        sock.close()
        if isinstance(exc, TimeoutError | socket.timeout):
            raise TransportError(uri, f"no connection within {timeout:g}s", errno.ETIMEDOUT) from exc
        raise wrap(uri, "cannot connect", exc) from exc
    sock.settimeout(None)
    return sock


def _tls_refused(uri: str) -> InvalidURI:
    return InvalidURI(uri, "TLS runs over a socket only (tcp:, unix:, or fd: naming a socket)")


def open_outgoing(uri: str, timeout: float = 30.0, idle_timeout: float | None = None,
                  tls: ssl.SSLContext | None = None, tls_hostname: str | None = None) -> Channel:
    """Open the sending end named by ``uri``; ``timeout`` bounds connecting (and the TLS handshake).

    ``idle_timeout`` (seconds) is the idle limit of a socket's channel (``tcp:``, ``unix:``, ``fd:``
    naming a socket): see :class:`SocketChannel`.  Files and commands have none.

    With ``tls`` (a client context, :meth:`TlsConfig.client_context`) the
    channel is a :class:`~vmsd.migration.transport.tls.TlsChannel` whose peer
    was checked against ``tls_hostname``, or else the host of a ``tcp:`` URI.
    """
    target = parse_uri(uri)
    if isinstance(target, FileURI):
        if tls is not None:
            raise _tls_refused(uri)
        return FileSink(uri, target.path, target.offset)
    if isinstance(target, TcpURI | UnixURI):
        sock = _connect(uri, target, timeout)
    elif isinstance(target, FdURI):
        got = _fd_socket(uri, target)
        if not isinstance(got, socket.socket):
            if tls is not None:
                got.abort()
                raise _tls_refused(uri)
            return got
        sock = got
    else:
        if tls is not None:
            raise _tls_refused(uri)
        return CommandChannel(uri, target.command, outgoing=True, timeout=timeout)
    if tls is None:
        return socket_channel(uri, sock, idle_timeout)
    host = tls_hostname if tls_hostname is not None else target.host if isinstance(target, TcpURI) else None
    return client_channel(uri, sock, tls, host or None, timeout, idle_timeout)


def open_incoming(uri: str, timeout: float = 30.0, idle_timeout: float | None = None,
                  tls: ssl.SSLContext | None = None) -> Channel:
    """Open the receiving end named by ``uri``; ``timeout`` bounds waiting for the peer (and the TLS handshake
    when given a server context), ``idle_timeout`` is as :func:`open_outgoing`'s."""
    target = parse_uri(uri)
    if isinstance(target, TcpURI | UnixURI):
        with listen(uri, backlog=1, tls=tls) as listener:
            return listener.accept(timeout, idle_timeout)
    if tls is not None:
        if isinstance(target, FdURI):
            got = _fd_socket(uri, target)
            if isinstance(got, socket.socket):
                return server_channel(uri, got, tls, timeout, idle_timeout)
            got.abort()
        raise _tls_refused(uri)
    if isinstance(target, FileURI):
        try:
            fd = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise wrap(uri, "cannot open", exc) from exc
        channel = DescriptorChannel(uri, fd=fd)
        if target.offset:
            try:
                os.lseek(fd, target.offset, os.SEEK_SET)
            except OSError as exc:
                channel.abort()
                raise wrap(uri, f"cannot seek to offset {target.offset}", exc) from exc
        return channel
    if isinstance(target, FdURI):
        return _fd_channel(uri, target, idle_timeout)
    return CommandChannel(uri, target.command, outgoing=False, timeout=timeout)
