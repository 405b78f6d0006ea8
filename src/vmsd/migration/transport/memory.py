"""A channel pair over memory: what a socketpair gives, with no descriptor (as a TLS channel has none)."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterable

from vmsd.migration.iovec import Scattered
from vmsd.migration.transport.channel import BaseChannel, Buffer
from vmsd.migration.transport.errors import TransportError


class _Direction:
    """The bytes one end wrote and the other has not read yet, at most ``capacity`` of them.

    A writer blocks while it is full, as on a socket whose peer reads slowly.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data = bytearray()  # deleting from the front is cheap: CPython moves the start
        self.cond = threading.Condition()
        self.writing = True  # False: the writer is done, the reader gets the rest, then the end of the stream
        self.reading = True  # False: the reader is gone, writes fail and reads see the end of the stream

    def put(self, name: str, view: memoryview) -> None:
        with self.cond:
            while view:
                while self.reading and self.writing and len(self.data) >= self.capacity:
                    self.cond.wait()
                if not self.writing:
                    raise TransportError(name, "write failed: channel is shut down", errno.EPIPE)
                if not self.reading:
                    raise TransportError(name, "write failed: the peer stopped reading", errno.EPIPE)
                take = min(len(view), self.capacity - len(self.data))
                self.data += view[:take]
                view = view[take:]
                self.cond.notify_all()

    def get(self, view: memoryview) -> int:
        with self.cond:
            while self.reading and self.writing and not self.data:
                self.cond.wait()
            if not self.reading:
                return 0
            n = min(len(view), len(self.data))
            view[:n] = self.data[:n]
            del self.data[:n]
            self.cond.notify_all()
            return n

    def peek(self, name: str, n: int, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.reading and self.writing and not self.data:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportError(name, f"nothing received within {timeout:g}s", errno.ETIMEDOUT)
                self.cond.wait(left)
            return bytes(self.data[:n]) if self.reading else b""

    def end(self, writing: bool) -> None:
        """The writer (``writing``) or the reader is done; wakes whoever waits."""
        with self.cond:
            if writing:
                self.writing = False
            else:
                self.reading = False
            self.cond.notify_all()


class MemoryChannel(BaseChannel):
    """One end of a :func:`memory_pair`: what it writes, the other end reads, and back.

    No descriptor (:meth:`fileno` is -1), so it stands in for channels that
    have none (:class:`~vmsd.migration.transport.tls.TlsChannel`) wherever the engine takes a channel.  Blocking calls wake
    on :meth:`shutdown`/:meth:`shutdown_read`, as on a socket.
    """

    def __init__(self, name: str, incoming: _Direction, outgoing: _Direction) -> None:
        super().__init__(name)
        self._in = incoming
        self._out = outgoing

    def readinto(self, buffer: memoryview | bytearray, /) -> int:
        self._check_open()
        return self._in.get(memoryview(buffer).cast("B")) if len(buffer) else 0

    def peek(self, n: int, timeout: float) -> bytes:
        self._check_open()
        return self._in.peek(self.name, n, timeout)

    def write(self, data: Buffer, /) -> int:
        self._check_open()
        view = memoryview(data).cast("B")
        self._out.put(self.name, view)
        return len(view)

    def writev(self, buffers: Iterable[Buffer | Scattered], /) -> int:
        # No descriptor to hand pages to writev(2): they are copied together.
        return sum(self.write(b.tobytes() if isinstance(b, Scattered) else b) for b in buffers)

    def shutdown(self) -> None:
        self._out.end(writing=True)
        self._in.end(writing=False)

    def shutdown_read(self) -> None:
        self._in.end(writing=False)

    def shutdown_write(self) -> None:
        self._out.end(writing=True)

    def _release(self) -> None:
        self.shutdown()


def memory_pair(name: str = "memory", capacity: int = 1 << 20) -> tuple[MemoryChannel, MemoryChannel]:
    """Two connected :class:`MemoryChannel` ends, ``name[0]`` and ``name[1]``; up to ``capacity`` bytes
    wait in each direction before a writer blocks."""
    there, back = _Direction(capacity), _Direction(capacity)
    return MemoryChannel(f"{name}[0]", back, there), MemoryChannel(f"{name}[1]", there, back)
