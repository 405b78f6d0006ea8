"""Buffered readers and writers of QEMU's big-endian primitives.

A :class:`Reader` serves bytes from memory or from any object with
``readinto`` (files, pipes, ``socket.makefile`` or the ``SocketSource`` here).
Generated code asks for a run of bytes with :meth:`Reader.take`, which returns
the buffer and the offset of the run so that one precompiled ``struct.Struct``
unpacks it in place.  Reads from a stream grow the buffer in bounded chunks,
so a length field in hostile input never allocates more than the input holds.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from typing import Protocol

from vmsd.runtime.errors import MalformedStream, TruncatedStream

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_S8 = struct.Struct(">b")
_S16 = struct.Struct(">h")
_S32 = struct.Struct(">i")
_S64 = struct.Struct(">q")

# Largest single read from a stream source; longer runs are read in pieces so
# memory grows only as fast as real input arrives.
_CHUNK = 1 << 20


class ByteSource(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


class ByteSink(Protocol):
    def write(self, data: bytes | bytearray, /) -> object: ...


class FdSource(Protocol):
    """Where a :class:`Reader` takes the descriptors that came with its bytes (SCM_RIGHTS)."""

    def take_fd(self) -> int | None:
        """The next descriptor received with bytes already read (the caller owns it), or None if none came."""


class FdSink(Protocol):
    """Where a :class:`Writer` sends a descriptor: one byte with the descriptor attached."""

    def send_fd(self, data: bytes, fd: int) -> None: ...


# The byte that carries a passed descriptor (QEMU writes a space).
FD_CARRIER = b" "


class SocketSource:
    """Adapts a socket to :class:`ByteSource`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def readinto(self, buffer: memoryview, /) -> int:
        return self._sock.recv_into(buffer)


_NO_SCRATCH = bytearray()


class Reader:
    """Reads QEMU primitives from memory or from a :class:`ByteSource`."""

    __slots__ = ("_base", "_scratch", "_source", "buf", "eof", "fds", "pos")

    def __init__(
        self, data: bytes | bytearray | memoryview = b"", source: ByteSource | None = None, fds: FdSource | None = None
    ) -> None:
        self.buf: bytes = data if type(data) is bytes else bytes(data)
        self.pos = 0
        self._base = 0
        self._source = source
        # True once nothing lies beyond ``buf``: memory input, or a source that ended.
        self.eof = source is None
        self._scratch = _NO_SCRATCH  # reused receive buffer, grown on the first read from the source
        # Descriptors (VMSTATE_FD) come from here with a carrier byte each; without
        # it they are numbers (be32), as in QEMU's cpr-exec state.
        self.fds = fds

    @classmethod
    def from_file(cls, f: ByteSource) -> Reader:
        return cls(source=f)

    def tell(self) -> int:
        """Absolute offset of the next byte."""
        return self._base + self.pos

    def remaining(self) -> int | None:
        """Bytes left, when known (memory input); ``None`` for open streams."""
        return len(self.buf) - self.pos if self.eof else None

    def _more(self, want: int, cap: int = _CHUNK) -> bool:
        """Append up to ``want`` bytes (at least 64 KiB, at most ``cap``) from the source; False at end of input."""
        if self.eof or self._source is None:
            return False
        size = min(max(want, 65536), cap)
        if len(self._scratch) < size:
            self._scratch = bytearray(size)
        got = self._source.readinto(memoryview(self._scratch)[:size]) or 0
        if got <= 0:
            self.eof = True
            return False
        # Drop what was consumed so the buffer never holds more than one
        # outstanding request plus one chunk.
        self._base += self.pos
        self.buf = self.buf[self.pos :] + memoryview(self._scratch)[:got]
        self.pos = 0
        return True

    @property
    def source(self) -> ByteSource | None:
        """The stream being read (None for memory input or once it ended)."""
        return None if self.eof else self._source

    def rebuffer(self, data: bytes, offset: int) -> None:
        """Make ``data``, which starts at absolute ``offset``, the unread buffer.

        For a caller that read ahead from :attr:`source` itself and hands
        back what it did not consume.
        """
        self.buf = data
        self.pos = 0
        self._base = offset

    def take_buffered(self) -> bytes:
        """Consume and return every byte buffered, reading once from the source first when none is (which
        blocks until some input arrives); empty at end of input.  For a caller that scans ahead for a
        pattern and hands back the rest with :meth:`rebuffer`."""
        if self.pos >= len(self.buf) and not self._more(65536):
            return b""
        data = self.buf[self.pos :]
        self.pos = len(self.buf)
        return data

    def prefetch(self, n: int) -> None:
        """With fewer than ``n`` bytes buffered, read once from the source (up to ``n`` bytes).

        Blocks until some input arrives, so call it only when the next record
        needs more than is buffered.  At end of input it does nothing.
        """
        if len(self.buf) - self.pos < n:
            self._more(n, cap=n)

    def _fill(self, n: int) -> None:
        while len(self.buf) - self.pos < n:
            if not self._more(n - (len(self.buf) - self.pos)):
                have = len(self.buf) - self.pos
                raise TruncatedStream(
                    f"expected {n} bytes, stream ended after {have}", offset=self.tell()
                )

    def take(self, n: int) -> tuple[bytes, int]:
        """Consume ``n`` bytes; return the buffer holding them and their start."""
        p = self.pos
        if p + n > len(self.buf):
            self._fill(n)
            p = self.pos
        self.pos = p + n
        return self.buf, p

    def read(self, n: int) -> bytes:
        if n < 0:
            raise MalformedStream(f"negative length {n}", offset=self.tell())
        buf, p = self.take(n)
        return buf[p : p + n]

    def readinto(self, view: memoryview) -> None:
        """Fill ``view`` exactly (used for page payloads)."""
        n = len(view)
        done = 0
        avail = len(self.buf) - self.pos
        if avail:
            k = min(avail, n)
            view[:k] = self.buf[self.pos : self.pos + k]
            self.pos += k
            done = k
        while done < n:
            if self._source is None or self.eof:
                raise TruncatedStream(f"expected {n} bytes, stream ended after {done}", offset=self.tell())
            got = self._source.readinto(view[done:]) or 0
            if got <= 0:
                self.eof = True
                continue
            done += got
            self._base += got

    def skip(self, n: int) -> None:
        """Consume ``n`` bytes without keeping them.

        Past the buffer, a source that is a regular file is sought over them (the holes of a sparse file
        are never read); another source is read and dropped a bounded chunk at a time.  Skipping past the
        end of a file is noticed by the next read, which then finds nothing.
        """
        if n < 0:
            raise MalformedStream(f"negative length {n}", offset=self.tell())
        avail = len(self.buf) - self.pos
        if n <= avail:
            self.pos += n
            return
        self._base += len(self.buf)
        self.buf = b""
        self.pos = 0
        n -= avail
        source = self._source
        if self.eof or source is None:
            raise TruncatedStream(f"expected {n} more bytes to skip, stream ended", offset=self.tell())
        fileno = getattr(source, "fileno", None)
        if fileno is not None:
            try:
                fd = int(fileno())
                if fd >= 0 and stat.S_ISREG(os.fstat(fd).st_mode):
                    os.lseek(fd, n, os.SEEK_CUR)
                    self._base += n
                    return
            except (OSError, OverflowError):
                pass  # not seekable after all, or past what a file can hold: read over it (until it ends)
        while n:
            if not self._more(n):
                raise TruncatedStream(f"expected {n} more bytes to skip, stream ended", offset=self.tell())
            k = min(n, len(self.buf))
            self.pos = k
            n -= k

    def peek(self, n: int) -> bytes:
        """Up to ``n`` bytes ahead without consuming (shorter at end of input)."""
        while len(self.buf) - self.pos < n and self._more(n):
            pass
        return self.buf[self.pos : self.pos + n]

    def at_end(self) -> bool:
        return not self.peek(1)

    def u8(self) -> int:
        buf, p = self.take(1)
        return buf[p]

    def u16(self) -> int:
        buf, p = self.take(2)
        return int(_U16.unpack_from(buf, p)[0])

    def u32(self) -> int:
        buf, p = self.take(4)
        return int(_U32.unpack_from(buf, p)[0])

    def u64(self) -> int:
        buf, p = self.take(8)
        return int(_U64.unpack_from(buf, p)[0])

    def s32(self) -> int:
        buf, p = self.take(4)
        return int(_S32.unpack_from(buf, p)[0])

    def s64(self) -> int:
        buf, p = self.take(8)
        return int(_S64.unpack_from(buf, p)[0])

    def counted_string(self) -> bytes:
        """``u8 n`` then ``n`` bytes (idstrs, subsection and block names)."""
        return self.read(self.u8())

    def get_fd(self) -> int:
        """A descriptor field: the next passed descriptor (its carrier byte consumed), or a be32 number."""
        if self.fds is None:
            return self.s32()
        at = self.tell()
        if self.read(1) != FD_CARRIER:
            raise MalformedStream(f"expected the byte {FD_CARRIER!r} carrying a descriptor", offset=at)
        fd = self.fds.take_fd()
        if fd is None:
            raise MalformedStream("no descriptor came with the byte meant to carry one", offset=at)
        return fd


class Writer:
    """Accumulates QEMU primitives; optionally drains to a binary sink."""

    __slots__ = ("_flushed", "_sink", "buf", "fds")

    def __init__(self, sink: ByteSink | None = None, fds: FdSink | None = None) -> None:
        self.buf = bytearray()
        self._sink = sink
        self._flushed = 0
        # Descriptor fields go out through this (after what is buffered); without it as be32 numbers.
        self.fds = fds

    def tell(self) -> int:
        return self._flushed + len(self.buf)

    def getvalue(self) -> bytes:
        return bytes(self.buf)

    def flush(self) -> None:
        if self._sink is not None and self.buf:
            self._sink.write(self.buf)
            self._flushed += len(self.buf)
            self.buf = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.buf += data

    def u8(self, v: int) -> None:
        self.buf.append(v)

    def u16(self, v: int) -> None:
        self.buf += _U16.pack(v)

    def u32(self, v: int) -> None:
        self.buf += _U32.pack(v)

    def u64(self, v: int) -> None:
        self.buf += _U64.pack(v)

    def s32(self, v: int) -> None:
        self.buf += _S32.pack(v)

    def s64(self, v: int) -> None:
        self.buf += _S64.pack(v)

    def put_fd(self, fd: int) -> None:
        """A descriptor field: sent with a carrier byte through :attr:`fds`, or written as a be32 number."""
        if self.fds is None:
            self.buf += _S32.pack(fd)
            return
        if self.buf:
            # Everything before the descriptor goes first.  The buffer is emptied in
            # place: generated savers hold it under another name.
            data = bytes(self.buf)
            self.buf.clear()
            if self._sink is None:
                raise ValueError("a writer passing descriptors needs a sink for the bytes around them")
            self._sink.write(data)
            self._flushed += len(data)
        self.fds.send_fd(FD_CARRIER, fd)
        self._flushed += len(FD_CARRIER)

    def counted_string(self, s: bytes) -> None:
        if len(s) > 255:
            raise ValueError(f"counted string of {len(s)} bytes exceeds 255")
        self.buf.append(len(s))
        self.buf += s


