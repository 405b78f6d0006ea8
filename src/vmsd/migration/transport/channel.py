"""What the migration engine needs of a channel (:class:`Channel`), and what implementations share (:class:`BaseChannel`).

A channel is one byte stream, both directions where the transport has two
(the return path goes back on the main channel).  The engine only ever calls
the methods of :class:`Channel`; anything that has them can carry a migration:
a socket, a pipe, a file, a command, a pair of in-memory buffers, or a channel
whose bytes are encrypted in user space (TLS), which has no descriptor
carrying its bytes.

Descriptors (:meth:`Channel.fileno`)
    Some hot paths work on the descriptor instead of calling the channel:

    * the multifd receiver splices pages socket -> pipe -> RAM file
      (``os.splice(ch.fileno(), ...)``), skipping a copy through user space;
    * the RAM loader's receiver thread (``ram.wire._Receiver``) polls
      :meth:`Channel.input_fd` (the same descriptor, where there is one), so
      that stopping the thread does not wait for the peer's next bytes;
    * the channel's own :meth:`Channel.writev` hands :class:`Scattered` pages
      to writev(2) (:func:`~vmsd.migration.iovec.write_scattered`).

    So ``fileno()`` is the descriptor whose bytes are exactly the channel's,
    or -1 where there is none (memory, TLS: what the kernel sees is not what
    the engine reads).  It never raises; after :meth:`Channel.close` it is -1.
    A caller that gets -1 must use the channel's methods instead: read with
    ``readinto``/``read_full`` rather than splice.  Only
    :meth:`Channel.shutdown_read` (or :meth:`Channel.shutdown`) wakes a
    thread blocked in ``readinto``, and it ends the stream; a reader thread
    that must stop while keeping the stream (the RAM receiver) waits for
    input by polling :meth:`Channel.input_fd` instead, after taking what
    :meth:`Channel.buffered` says the channel holds already: a TLS channel's
    input descriptor is its socket, readable when encrypted bytes arrive.
    Reading the descriptor directly also bypasses descriptor passing
    (below): the kernel closes descriptors that arrive with bytes read that
    way.

Passing descriptors (:meth:`Channel.send_fds`, :meth:`Channel.recv_fds`, :meth:`Channel.take_fds`)
    Only a channel over a unix socket carries them (SCM_RIGHTS); every other
    channel raises :class:`TransportError` (``EOPNOTSUPP``), and says so in
    :attr:`Channel.passes_fds`.  QEMU's CPR sends each descriptor with one
    byte, 0x20 (``qemu_file_put_fd``): ``ch.send_fds(b" ", [fd])``.

    Descriptors travel with bytes, in order: whichever read consumes the first
    byte of the message that carried them receives them, and the kernel never
    lets one read run past such a message, so descriptors arrive in the order
    of their bytes.  There are two ways to take them, depending on who reads
    the bytes:

    * unbuffered: :meth:`Channel.recv_fds` reads the bytes itself and returns
      the descriptors that came with them;
    * buffered: a reader that reads ahead (:class:`vmsd.runtime.io.Reader`,
      the RAM receiver thread) may consume a descriptor's byte before its
      consumer asks for it.  The channel keeps descriptors that plain reads
      received, in order, and the consumer takes them with
      :meth:`Channel.take_fds` once it has read their bytes from its buffer
      (as QEMU's ``qemu_file_get_fd`` takes them from the ``QEMUFile``).

    :meth:`Channel.peek` never receives descriptors.  Closing the channel
    closes those nobody took.  Received descriptors are close-on-exec: a
    process that hands them on across exec (cpr-exec, where only their
    numbers travel in the stream) clears that itself (``os.set_inheritable``).
"""

from __future__ import annotations

import abc
import contextlib
import errno
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Protocol, Self

from vmsd.migration.iovec import Scattered
from vmsd.migration.transport.errors import TransportError, wrap

Buffer = bytes | bytearray | memoryview


class Channel(Protocol):
    """One byte stream of a migration: what the engine calls (see the module for ``fileno`` and descriptors).

    Closing is idempotent.  Used as a context manager, leaving with an
    exception calls :meth:`abort` instead of :meth:`close`.  ``repr()`` names
    the URI.

    Build one with :func:`~vmsd.migration.transport.socket_channel`,
    :class:`~vmsd.migration.transport.DescriptorChannel`, the URI openers or
    :func:`~vmsd.migration.transport.memory_pair`.
    """

    @property
    def name(self) -> str:
        """The URI, or what stands for it: every :class:`TransportError` of the channel starts with it."""

    @property
    def passes_fds(self) -> bool:
        """Whether :meth:`send_fds` and :meth:`recv_fds` work (a unix socket)."""

    # ---- reading
    def readinto(self, buffer: memoryview | bytearray, /) -> int:
        """Read up to ``len(buffer)`` bytes, at least one unless the stream ended (then 0)."""

    def read_full(self, buffer: memoryview, /) -> int:
        """Fill ``buffer``; fewer bytes only at end of stream."""

    def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes; :class:`TransportError` (``EPIPE``) if the stream ends first."""

    def peek(self, n: int, timeout: float) -> bytes:
        """Up to ``n`` next bytes without consuming them, waiting at most ``timeout`` seconds for the first.

        Fewer than ``n`` when the stream ended or the rest has not arrived
        yet; :class:`TransportError` (``ETIMEDOUT``) when nothing came, and
        (``EINVAL``) from a channel that cannot look ahead (a pipe, a file).
        """

    # ---- writing
    def write(self, data: Buffer, /) -> int:
        """Write all of ``data``; returns its length."""

    def writev(self, buffers: Iterable[Buffer | Scattered], /) -> int:
        """Write all buffers in order; returns the total.

        A channel with a descriptor writes :class:`Scattered` pages straight
        from RAM (writev(2)); one without copies them together (``tobytes``).
        """

    def flush(self) -> None:
        """Push out what the channel itself holds back (the channels here hold back nothing)."""

    # ---- descriptors
    def fileno(self) -> int:
        """The descriptor carrying exactly this channel's bytes, or -1 (see the module)."""

    def input_fd(self) -> int:
        """A descriptor poll(2) finds readable when :meth:`readinto` would not wait for the peer (input that
        :meth:`buffered` counts aside), or -1 (memory): :meth:`fileno`, or a TLS channel's socket."""

    def buffered(self) -> int:
        """How many bytes the channel holds for :meth:`readinto` already (decrypted, peeked), which
        :meth:`input_fd` does not show."""

    def send_fds(self, data: Buffer, fds: Sequence[int]) -> None:
        """Write ``data`` (at least one byte) with ``fds`` attached to its first byte.

        Everything written before is ahead of it: a caller that buffers its
        writes flushes them first.  The descriptors stay open here (the peer
        gets its own).
        """

    def recv_fds(self, nbytes: int, maxfds: int) -> tuple[bytes, list[int]]:
        """Read exactly ``nbytes`` and the descriptors that came with them, at most ``maxfds``.

        More descriptors than that, or ancillary data the kernel truncated
        (``MSG_CTRUNC``), close every one that arrived and raise
        :class:`TransportError`.  Refuses while earlier reads left descriptors
        for :meth:`take_fds`: they belong to bytes already read.
        """

    def take_fds(self, count: int) -> list[int]:
        """The next ``count`` descriptors that came with bytes already read; the caller owns them.

        :class:`TransportError` (taking none) when fewer arrived.
        """

    # ---- ending
    def shutdown(self) -> None:
        """Stop both directions, waking a thread blocked on the channel; no-op where none can block."""

    def shutdown_read(self) -> None:
        """Stop reading: a thread blocked reading sees the end of the stream; writing still works."""

    def shutdown_write(self) -> None:
        """End the stream for the peer (it reads end of stream) while still reading what it sends."""

    def close(self) -> None:
        """Close; raises :class:`TransportError` if completing the transfer failed."""

    def abort(self) -> None:
        """Close without completing: discard partial output, kill a command.  Never raises."""

    def __enter__(self) -> Self: ...

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None: ...


class BaseChannel(abc.ABC):
    """What the channels here share: lifetime, context manager, ``read_exact``, refusing descriptors.

    Subclasses provide ``readinto``, ``peek``, ``write``, ``writev`` and
    ``_release`` (give up the resources; :meth:`close` and :meth:`abort` call
    it once).
    """

    passes_fds = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    # ---- reading
    @abc.abstractmethod
    def readinto(self, buffer: memoryview | bytearray, /) -> int: ...

    def read_full(self, buffer: memoryview, /) -> int:
        got, n = 0, len(buffer)
        while got < n:
            k = self.readinto(buffer[got:])
            if k == 0:
                break
            got += k
        return got

    def read_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        got = self.read_full(memoryview(buf))
        if got < n:
            raise TransportError(self.name, f"stream ended after {got} of {n} bytes", errno.EPIPE)
        return bytes(buf)

    @abc.abstractmethod
    def peek(self, n: int, timeout: float) -> bytes: ...

    # ---- writing
    @abc.abstractmethod
    def write(self, data: Buffer, /) -> int: ...

    @abc.abstractmethod
    def writev(self, buffers: Iterable[Buffer | Scattered], /) -> int: ...

    def flush(self) -> None:  # noqa: B027 - every channel here writes through
        """Nothing to flush: writes are on their way when they return."""

    # ---- descriptors
    def fileno(self) -> int:
        return -1

    def input_fd(self) -> int:
        return self.fileno()

    def buffered(self) -> int:
        return 0

    def send_fds(self, data: Buffer, fds: Sequence[int]) -> None:
        raise self._no_fds()

    def recv_fds(self, nbytes: int, maxfds: int) -> tuple[bytes, list[int]]:
        raise self._no_fds()

    def take_fds(self, count: int) -> list[int]:
        raise self._no_fds()

    def _no_fds(self) -> TransportError:
        return TransportError(self.name, "cannot pass file descriptors: only a unix socket can "
                                         "(unix:, or fd: naming one)", errno.EOPNOTSUPP)

    # ---- ending
    def shutdown(self) -> None:  # noqa: B027 - a channel overrides it where a thread can be blocked on it
        """Nothing to wake: a pipe or file reader waits for its writer, not for us."""

    def shutdown_read(self) -> None:  # noqa: B027 - as shutdown
        """Nothing to wake (see :meth:`shutdown`)."""

    def shutdown_write(self) -> None:
        """Only a socket can end one direction; a pipe or file ends with :meth:`close`."""
        raise TransportError(self.name, "cannot end one direction: only a socket can", errno.EOPNOTSUPP)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._release()
        except TransportError:
            raise
        except OSError as exc:
            raise wrap(self.name, "close failed", exc) from exc

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self._release()

    @abc.abstractmethod
    def _release(self) -> None: ...

    def _check_open(self) -> None:
        if self.closed:
            raise TransportError(self.name, "channel is closed", errno.EBADF)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if et is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}{' closed' if self.closed else ''}>"
