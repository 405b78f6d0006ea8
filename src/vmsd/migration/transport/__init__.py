"""Migration transports named by QEMU's URI syntax, for both directions.

Accepted URIs (as in QEMU's ``migrate`` / ``migrate-incoming``):

``file:PATH[,offset=N]``
    Outgoing writes a temporary file with a random name next to ``PATH``
    (0600, see :mod:`vmsd.runtime.outfile`) and renames it over ``PATH`` on
    a successful :meth:`Channel.close`, so a half-written file never looks
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
    Like ``tcp:`` over a UNIX socket; a stale socket file is replaced.  Its
    channels also pass descriptors (:meth:`Channel.send_fds`).
``fd:N`` or ``fd:NAME``
    An inherited descriptor, or one registered with :func:`register_fd`
    (QMP ``getfd``).  The channel takes ownership and closes it.  A unix
    socket passes descriptors as ``unix:`` does.
``exec:COMMAND``
    ``sh -c COMMAND``: outgoing writes to its stdin, incoming reads its
    stdout.  A failing command raises :class:`TransportError` with the tail
    of its stderr; the child is always reaped.

Over a socket (``tcp:``, ``unix:``, ``fd:`` naming one) a channel may
carry TLS, as QEMU's ``tls-creds`` sets up: :class:`TlsConfig` names the
credentials folder, the openers and :func:`listen` take its contexts, and
the channel is a :class:`TlsChannel` (see :mod:`vmsd.migration.transport.tls`).

Every I/O failure raises :class:`TransportError` (an ``OSError`` naming the
URI); a malformed URI raises :class:`InvalidURI` (a ``ValueError``).
A :class:`Channel` is a ``readinto`` source for :class:`vmsd.runtime.io.Reader`
and a ``write`` sink for :class:`vmsd.runtime.io.Writer`.

:class:`Channel` is a protocol: what the engine calls, documented with the
rules for ``fileno()`` and for passing descriptors in
:mod:`vmsd.migration.transport.channel`.  Here it is implemented by
:class:`DescriptorChannel` (pipes, files; ``file:`` and ``exec:`` build on
it), :class:`SocketChannel` (``tcp:``), :class:`UnixChannel` (``unix:``,
passes descriptors), :class:`TlsChannel` (TLS over a socket, no descriptor
carrying its bytes) and :class:`MemoryChannel` (:func:`memory_pair`, no
descriptor at all either, for tests).
"""

from vmsd.migration.transport.channel import BaseChannel, Buffer, Channel
from vmsd.migration.transport.descriptor import DescriptorChannel, SocketChannel, UnixChannel, socket_channel
from vmsd.migration.transport.endpoints import Listener, listen, open_incoming, open_outgoing
from vmsd.migration.transport.errors import ACCEPTED, InvalidURI, TransportError
from vmsd.migration.transport.memory import MemoryChannel, memory_pair
from vmsd.migration.transport.tls import TlsChannel, TlsConfig, TlsCredsError
from vmsd.migration.transport.uri import (
    URI,
    ExecURI,
    FdURI,
    FileURI,
    TcpURI,
    UnixURI,
    parse_uri,
    register_fd,
    unregister_fd,
)

__all__ = [
    "ACCEPTED",
    "URI",
    "BaseChannel",
    "Buffer",
    "Channel",
    "DescriptorChannel",
    "ExecURI",
    "FdURI",
    "FileURI",
    "InvalidURI",
    "Listener",
    "MemoryChannel",
    "SocketChannel",
    "TcpURI",
    "TlsChannel",
    "TlsConfig",
    "TlsCredsError",
    "TransportError",
    "UnixChannel",
    "UnixURI",
    "listen",
    "memory_pair",
    "open_incoming",
    "open_outgoing",
    "parse_uri",
    "register_fd",
    "socket_channel",
    "unregister_fd",
]
