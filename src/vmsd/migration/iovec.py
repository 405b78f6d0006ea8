"""Writing scattered memory with one system call per IOV_MAX pieces, the pieces listed by numpy.

A page record stream interleaves 8-byte headers with 4 KiB pages.  Python's
``sendmsg``/``os.writev`` take one buffer object per piece: two objects per
page, or a staging copy of every page to make the records contiguous.  Here
the (address, length) pairs of ``struct iovec`` are computed as a numpy array
and handed to writev(2) through ctypes, which releases the GIL for the call,
so the kernel copies the pages straight from the RAM mapping, as QEMU's
sender does.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
from typing import Any

import numpy as np
import numpy.typing as npt

IOV_MAX = 1024  # Linux's UIO_MAXIOV
_IOVEC = 16  # sizeof(struct iovec) on 64-bit Linux


def _libc_fns() -> tuple[Any, Any]:
    libc = ctypes.CDLL(None, use_errno=True)
    writev, pwritev = libc.writev, libc.pwritev
    writev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    pwritev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_long]
    writev.restype = pwritev.restype = ctypes.c_ssize_t
    return writev, pwritev


_WRITEV, _PWRITEV = _libc_fns()


class Scattered:
    """Pieces of memory to be written in order, without copying them together.

    ``iov`` holds one (address, length) row per piece; ``keep`` holds the
    objects that own that memory, alive for as long as this object is.
    """

    __slots__ = ("iov", "keep", "nbytes")

    def __init__(self, iov: npt.NDArray[np.uint64], keep: tuple[Any, ...]) -> None:
        self.iov = np.ascontiguousarray(iov, dtype=np.uint64)
        self.keep = keep
        self.nbytes = int(self.iov[:, 1].sum())

    def __len__(self) -> int:
        return self.nbytes

    def tobytes(self) -> bytes:
        """The pieces copied together (for writers that take no descriptor)."""
        return b"".join(ctypes.string_at(int(addr), int(n)) for addr, n in self.iov)


def buffer_address(buf: Any) -> int:
    """Where the memory of a buffer object starts (valid while ``buf`` lives and is not resized)."""
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def write_scattered(fd: int, data: Scattered, at: int | None = None) -> None:
    """Write all of ``data`` to ``fd`` (at file offset ``at``: pwritev); raises OSError as os.writev would.

    Short writes (a signal, a file that filled up) resume where they stopped;
    a descriptor in non-blocking mode is waited on until it takes more (a
    blocking one that returns ``EAGAIN`` ran into its ``SO_SNDTIMEO``: raised).
    """
    iov = data.iov
    ends: npt.NDArray[np.uint64] | None = None  # where each piece ends, worked out on the first short write
    i, done = 0, 0  # next piece, bytes of the stream written so far
    while i < len(iov):
        count = min(IOV_MAX, len(iov) - i)
        p = iov.ctypes.data + _IOVEC * i
        got = _WRITEV(fd, p, count) if at is None else _PWRITEV(fd, p, count, at + done)
        if got < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            # EAGAIN from a blocking socket is its send timeout (an idle limit): the caller's failure.
            if err in (errno.EAGAIN, errno.EWOULDBLOCK) and not os.get_blocking(fd):
                poller = select.poll()  # not select(): descriptors past FD_SETSIZE
                poller.register(fd, select.POLLOUT)
                poller.poll()
                continue
            raise OSError(err, os.strerror(err))
        done += got
        if done == data.nbytes:
            return  # the usual case: one call took it all
        if ends is None:
            ends = np.cumsum(iov[:, 1])
        k = int(np.searchsorted(ends, done, side="right"))  # pieces now written whole
        if k < len(iov) and (ends[k] - iov[k, 1]) < done:
            # A piece written in part: go on from the rest of it, on a copy (the caller's rows stay as they are).
            iov = iov[k:].copy()
            ends = ends[k:]
            cut = done - (int(ends[0]) - int(iov[0, 1]))
            iov[0, 0] += np.uint64(cut)
            iov[0, 1] -= np.uint64(cut)
            i = 0
            continue
        i = k
