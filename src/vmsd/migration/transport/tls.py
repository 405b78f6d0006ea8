"""TLS on a migration channel, as QEMU's ``tls-creds`` / ``tls-hostname`` set it up.

QEMU's ``tls-creds-x509`` object names a folder of PEM files; a migration
with ``tls-creds`` wraps its main channel and every multifd channel, each
connection its own TLS session over its own socket.  :class:`TlsConfig` is
that folder and the name checked against the destination's certificate:

``ca-cert.pem``
    the CA that signed the peer's certificate (both ends verify the other);
``server-cert.pem``, ``server-key.pem``
    what the destination presents;
``client-cert.pem``, ``client-key.pem``
    what the source presents (a destination with ``verify-peer`` asks for it).

The hostname checked is ``tls-hostname`` when given, else the host of a
``tcp:`` URI (a name or an address, matched against the certificate's
subject alternative names); a ``unix:`` or ``fd:`` channel needs
``tls-hostname``, as in QEMU.

A :class:`TlsChannel` encrypts in user space, so it has no descriptor whose
bytes are the stream: ``fileno()`` is -1 and the engine's descriptor paths
(splice, the RAM receiver's poll, writev of pages in place) take their
fallbacks, as :mod:`vmsd.migration.transport.channel` describes.
"""

from __future__ import annotations

import contextlib
import errno
import re
import select
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vmsd.migration.iovec import Scattered
from vmsd.migration.transport.channel import BaseChannel, Buffer
from vmsd.migration.transport.errors import TransportError, wrap
from vmsd.migration.transport.idle import is_stall, limit_idle, stalled

CA_CERT = "ca-cert.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
# QEMU reads a revocation list from the folder too; silently ignoring one would accept revoked peers.
_CRL = "ca-crl.pem"

# Buffers smaller than this are gathered with their neighbours into one TLS write: each write ends its last
# record, and a record per multifd packet header or page would cost a system call and 22 bytes each.
_GATHER = 64 << 10
# How long closing waits for the socket to take the close_notify alert.
_CLOSE_NOTIFY_WAIT = 5.0
# The most one TLS write is handed: with an idle limit, a write must make progress within it, and a write of
# megabytes over a slow link would not end in time although bytes move all along.
_WRITE_PIECE = 256 << 10


class TlsCredsError(ValueError):
    """A credentials folder that cannot serve: a file missing or unreadable, a key that does not fit."""


@dataclass(frozen=True)
class TlsConfig:
    """QEMU's ``tls-creds`` (an x509 folder, see the module) and ``tls-hostname``.

    ``verify_peer`` is the ``verify-peer`` property of QEMU's credentials
    (default on): the source checks the destination's certificate and name,
    the destination asks for the source's certificate and checks it.
    """

    creds: Path
    hostname: str | None = None
    verify_peer: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "creds", Path(self.creds))  # a str names the folder as well

    def client_context(self) -> ssl.SSLContext:
        """The source's context: its certificate when the folder has one, the CA to check the destination with."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.verify_peer:
            self._load_ca(ctx)
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if (self.creds / CLIENT_CERT).exists() or (self.creds / CLIENT_KEY).exists():
            self._load_pair(ctx, CLIENT_CERT, CLIENT_KEY)
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """The destination's context: its certificate, and the CA that must have signed the source's."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._load_pair(ctx, SERVER_CERT, SERVER_KEY)
        if self.verify_peer:
            self._load_ca(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        # No TLS 1.3 session tickets: a source never reads its multifd channels, and bytes left unread there
        # would turn its close into a reset.
        ctx.num_tickets = 0
        return ctx

    def _load_ca(self, ctx: ssl.SSLContext) -> None:
        if not self.creds.is_dir():
            raise TlsCredsError(f"TLS credentials {self.creds}: not a folder")
        if (self.creds / _CRL).exists():
            raise TlsCredsError(f"TLS credentials {self.creds}: {_CRL} is not supported (revocation lists are not "
                                "checked; remove it only if nothing it revokes can connect)")
        try:
            ctx.load_verify_locations(cafile=str(self.creds / CA_CERT))
        except (OSError, ssl.SSLError) as exc:
            raise TlsCredsError(f"TLS credentials {self.creds}: cannot load {CA_CERT}: {_why(exc)}") from None

    def _load_pair(self, ctx: ssl.SSLContext, cert: str, key: str) -> None:
        if not self.creds.is_dir():
            raise TlsCredsError(f"TLS credentials {self.creds}: not a folder")
        try:
            ctx.load_cert_chain(str(self.creds / cert), str(self.creds / key))
        except (OSError, ssl.SSLError) as exc:
            raise TlsCredsError(f"TLS credentials {self.creds}: cannot load {cert} with {key}: {_why(exc)}") from None


def client_channel(name: str, sock: socket.socket, context: ssl.SSLContext, hostname: str | None,
                   timeout: float, idle_timeout: float | None = None) -> TlsChannel:
    """The connecting end of ``sock`` after a TLS handshake that checked the peer against ``hostname``.

    ``timeout`` bounds the handshake; ``idle_timeout`` is the channel's idle limit, as a
    :class:`~vmsd.migration.transport.SocketChannel`'s."""
    if hostname is None and context.check_hostname:
        sock.close()
        raise TransportError(name, "TLS needs a hostname to check the destination's certificate against: "
                                   "give tls-hostname", errno.EINVAL)
    _limit(name, sock, idle_timeout)
    tls = context.wrap_socket(sock, server_hostname=hostname, do_handshake_on_connect=False)
    return _handshake(name, tls, timeout, idle_timeout)


def server_channel(name: str, sock: socket.socket, context: ssl.SSLContext, timeout: float,
                   idle_timeout: float | None = None) -> TlsChannel:
    """The accepting end of ``sock`` after a TLS handshake (that checked the peer's certificate if asked)."""
    _limit(name, sock, idle_timeout)
    tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    return _handshake(name, tls, timeout, idle_timeout)


def _limit(name: str, sock: socket.socket, idle_timeout: float | None) -> None:
    """The socket's side of the idle limit: TCP gives up on a dead peer (:func:`limit_idle`); reads and writes
    are bounded by the TLS socket's timeout (OpenSSL would retry a read that the socket's own timeout ends)."""
    if idle_timeout is None:
        return
    try:
        limit_idle(sock, idle_timeout)
    except BaseException as exc:
        sock.close()
        if isinstance(exc, OSError):
            raise wrap(name, "cannot set the idle limit", exc) from exc
        raise


def _handshake(name: str, tls: ssl.SSLSocket, timeout: float, idle_timeout: float | None) -> TlsChannel:
    try:
        tls.settimeout(timeout)
        tls.do_handshake()
        tls.settimeout(idle_timeout)
    except BaseException as exc:
        tls.close()
        if isinstance(exc, TimeoutError | socket.timeout):
            raise TransportError(name, f"no TLS handshake within {timeout:g}s", errno.ETIMEDOUT) from None
        if isinstance(exc, OSError):
            raise TransportError(name, f"TLS handshake failed: {_why(exc)}", errno.EPROTO) from None
        raise
    return TlsChannel(name, tls, idle_timeout)


class TlsChannel(BaseChannel):
    """A byte stream encrypted by TLS over a connected socket (see the module); takes ownership of ``sock``.

    No descriptor carries its bytes (:meth:`fileno` is -1).  :meth:`peek`
    keeps what it decrypted for the next read.  :meth:`close` ends the
    session with TLS's close_notify, which newer QEMU destinations expect on
    every multifd channel; :meth:`abort` only drops the connection.  With
    ``idle_timeout``, a read or write that moves nothing for that long fails
    with ``ETIMEDOUT``, as on a :class:`~vmsd.migration.transport.SocketChannel`
    (``sock``'s timeout is that limit).
    """

    def __init__(self, name: str, sock: ssl.SSLSocket, idle_timeout: float | None = None) -> None:
        super().__init__(name)
        self._sock = sock
        self.idle_timeout = idle_timeout
        self._ahead = bytearray()  # decrypted by peek(), not read yet
        self._heard = False  # whether the peer sent a byte yet
        self._stopped = False  # whether we shut the socket down (then an end of stream is ours)
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)

    @property
    def version(self) -> str | None:
        """The TLS version in use (``TLSv1.3``)."""
        return self._sock.version()

    # ---- reading
    def readinto(self, buffer: memoryview | bytearray, /) -> int:
        self._check_open()
        view = memoryview(buffer).cast("B")
        if self._ahead:
            n = min(len(view), len(self._ahead))
            view[:n] = self._ahead[:n]
            del self._ahead[:n]
            return n
        if not view:
            return 0
        try:
            n = self._sock.recv_into(view)
        except OSError as exc:
            raise self._failure("read failed", exc) from None
        self._heard = self._heard or self._silent_end(n)
        # One TLS record is at most 16 KiB: take the records that have arrived too, so that a reader asking for
        # a megabyte is not handed it in 64 pieces (each one a call, and a reader that buffers them copies).
        while 0 < n < len(view) and (self._sock.pending() or self._readable()):
            try:
                k = self._sock.recv_into(view[n:])
            except OSError:
                break  # the next read meets it again
            if not k:
                break
            n += k
        return n

    def input_fd(self) -> int:
        return -1 if self.closed else self._sock.fileno()

    def buffered(self) -> int:
        return 0 if self.closed else len(self._ahead) + self._sock.pending()

    def _readable(self) -> bool:
        """Whether bytes wait on the socket (a record that arrived whole, or the first of it: its sender sends it
        at once)."""
        return bool(self._poll.poll(0))

    def peek(self, n: int, timeout: float) -> bytes:
        self._check_open()
        if not self._ahead and n:
            self._sock.settimeout(timeout)
            try:
                got = self._sock.recv(n)
            except TimeoutError:
                raise TransportError(self.name, f"nothing received within {timeout:g}s", errno.ETIMEDOUT) from None
            except OSError as exc:
                raise self._failure("read failed", exc) from None
            finally:
                self._sock.settimeout(self.idle_timeout)
            self._heard = self._heard or self._silent_end(len(got))
            self._ahead += got
            # What is decrypted already comes along, as a socket's peek returns what has arrived.
            while got and len(self._ahead) < n and self._sock.pending():
                got = self._sock.recv(min(n - len(self._ahead), self._sock.pending()))
                self._ahead += got
        return bytes(self._ahead[:n])

    def _silent_end(self, n: int) -> bool:
        """Whether bytes came (``n``); the end of the session before the first byte is an error.

        A peer that checks our certificate or name only once its handshake is done (QEMU does) hangs up
        right after it when they do not suit it; a migration channel always carries something.
        """
        if n == 0 and not self._stopped:
            raise TransportError(self.name, "the peer ended the TLS session before sending anything (did it refuse "
                                            "our certificate, or the name it checked?)", errno.ECONNABORTED)
        return True

    # ---- writing
    def write(self, data: Buffer, /) -> int:
        self._check_open()
        view = memoryview(data).cast("B")
        try:
            for at in range(0, len(view), _WRITE_PIECE):
                self._sock.sendall(view[at:at + _WRITE_PIECE])
        except OSError as exc:
            raise self._failure("write failed", exc) from None
        return len(view)

    def writev(self, buffers: Iterable[Buffer | Scattered], /) -> int:
        """Small buffers gathered into one write, large ones written as they are (every byte is encrypted into
        a new buffer anyway: pages cannot go from RAM to the socket untouched)."""
        total = 0
        small: list[Buffer] = []
        size = 0
        for b in buffers:
            piece: Buffer = b.tobytes() if isinstance(b, Scattered) else b
            n = memoryview(piece).nbytes
            if n >= _GATHER:
                if small:
                    total += self.write(b"".join(small))
                    small, size = [], 0
                total += self.write(piece)
                continue
            small.append(piece)
            size += n
            if size >= _GATHER:
                total += self.write(b"".join(small))
                small, size = [], 0
        if small:
            total += self.write(b"".join(small))
        return total

    # ---- ending
    def shutdown(self) -> None:
        self._shutdown_socket(socket.SHUT_RDWR)

    def shutdown_read(self) -> None:
        self._shutdown_socket(socket.SHUT_RD)

    def shutdown_write(self) -> None:
        raise TransportError(self.name, "cannot end one direction of a TLS session", errno.EOPNOTSUPP)

    def _shutdown_socket(self, how: int) -> None:
        # On the socket under TLS, not SSLSocket.shutdown: that drops the TLS state a thread blocked in a read or
        # write is still using, and only the socket's end wakes that thread.
        if not self.closed:
            self._stopped = True
            with contextlib.suppress(OSError):
                socket.socket.shutdown(self._sock, how)

    def close(self) -> None:
        if not self.closed:
            self._close_notify()
        super().close()

    def _close_notify(self) -> None:
        """Send TLS's close_notify, so that the peer can tell the end of the stream from a cut connection.

        Bounded: the peer's own close_notify is not waited for, and the alert is given up on when the socket
        does not take it within a few seconds.  What the peer sent and nobody read is consumed first: a socket
        closed with unread bytes resets the connection, and the peer might lose the end of the stream.
        """
        sock = self._sock
        deadline = time.monotonic() + _CLOSE_NOTIFY_WAIT
        with contextlib.suppress(OSError, ValueError):
            sock.setblocking(False)
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
                while sock.recv(1 << 16):
                    pass
            while True:
                try:
                    sock.unwrap()
                    return
                except ssl.SSLWantReadError:
                    return  # our alert is out; the peer's answer is not needed
                except ssl.SSLWantWriteError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    select.select([], [sock], [], left)

    def _failure(self, what: str, exc: OSError) -> TransportError:
        if self.idle_timeout is not None and (isinstance(exc, TimeoutError) or is_stall(exc)):
            return stalled(self.name, what, self.idle_timeout, exc)
        if isinstance(exc, ssl.SSLError):
            return TransportError(self.name, f"{what}: {_why(exc)}", errno.EPROTO)
        return wrap(self.name, what, exc)

    def _release(self) -> None:
        self._sock.close()


def _why(exc: BaseException) -> str:
    """What a TLS failure means, without OpenSSL's source locations."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the peer's certificate is refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionResetError | BrokenPipeError):
        return "the peer closed the connection (did it refuse our certificate, or the name we checked?)"
    if isinstance(exc, ssl.SSLError):
        text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
        text = re.sub(r"^\[[^\]]*\]\s*", "", re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text))
        if "alert" in text:
            return f"the peer refused the session ({text})"
        return text
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)
