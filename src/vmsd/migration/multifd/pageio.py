"""Getting a packet's bytes from a channel into their place in RAM, with as few copies as the kernel allows.

Pages come back into their place in RAM without passing through user space
where the kernel allows (``splice`` from the socket through a pipe into the
RAM file), else straight into the mapping (``recv_into`` on its slices), or,
from a buffer, with one ``pwritev`` per run (:meth:`RamBlock.store_views`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os

from vmsd.migration.multifd.packet import PAGES_PER_PACKET
from vmsd.migration.ram.blocks import PAGE_SIZE, RamBlock
from vmsd.migration.transport import Channel, TransportError
from vmsd.migration.transport.idle import is_stall, receive_timeout, stalled
from vmsd.runtime.errors import VMSDError


def _pipe() -> tuple[int, int] | None:
    """A pipe that holds a whole packet's pages where the system allows it; None where splicing is not available."""
    if not hasattr(os, "splice"):
        return None
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size the default 64 KiB stays
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PAGES_PER_PACKET * PAGE_SIZE)
    return r, w


class PageReader:
    """One receiving channel: reads its bytes into buffers, or splices them into RAM files through its pipe."""

    def __init__(self, ch: Channel, splice: bool) -> None:
        self.ch = ch
        # A channel without a descriptor (memory, TLS: fileno() is -1) is read through its methods only.
        self._pipe = _pipe() if splice and ch.fileno() >= 0 else None

    @property
    def splices(self) -> bool:
        """Whether :meth:`splice` may still move bytes (False once a descriptor refused, or after close)."""
        return self._pipe is not None

    def read_into(self, view: memoryview, may_end: bool = False) -> bool:
        """Fill ``view``; False when ``may_end`` and the stream ended before its first byte."""
        ch = self.ch
        got = ch.read_full(view)
        if got == len(view):
            return True
        if may_end and got == 0:
            return False
        raise TransportError(ch.name, f"stream ended after {got} of {len(view)} bytes")

    def splice(self, block: RamBlock, at: int, want: int) -> bool:
        """Move ``want`` bytes from the channel into the RAM file at offset ``at`` without a copy into user space.

        The kernel moves the socket's buffers into a pipe and copies them
        into the file's page cache: no user-space copy, and, as with
        :meth:`RamBlock.store_pages`, fresh pages are neither zero-filled nor
        faulted in first.  False (nothing consumed) where the descriptors do
        not splice; the caller then reads the bytes another way.
        """
        pipe = self._pipe
        if pipe is None:
            return False
        ch = self.ch
        r, w = pipe
        done = 0
        while done < want:
            try:
                k = os.splice(ch.fileno(), w, want - done, flags=os.SPLICE_F_MOVE)
            except OSError as e:
                if e.errno == errno.EINVAL and done == 0:
                    self.close()
                    return False
                idle = receive_timeout(ch.fileno()) if is_stall(e) else None
                if idle is not None:  # the socket's SO_RCVTIMEO ran out
                    raise stalled(ch.name, "read failed", idle, e) from None
                raise TransportError(ch.name, f"read failed: {e.strerror}", e.errno) from None
            if k == 0:
                raise TransportError(ch.name, f"stream ended after {done} of {want} bytes")
            out = 0
            while out < k:
                try:
                    out += os.splice(r, block.fd, k - out, offset_dst=at + done + out, flags=os.SPLICE_F_MOVE)
                except OSError as e:
                    if e.errno == errno.EINVAL:  # a file that takes no writes (hugetlbfs): drain, copy, and stop
                        rest = os.read(r, k - out)
                        block.view[at + done + out:at + done + out + len(rest)] = rest
                        out += len(rest)
                        block.refuses_fd_writes()
                        continue
                    raise VMSDError(f"RAM block '{block.name}': cannot store pages: {e.strerror}") from None
            done += k
        return True

    def close(self) -> None:
        """Close the pipe; the channel is the caller's."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            os.close(pipe[0])
            os.close(pipe[1])


def store_runs(block: RamBlock, data: memoryview, runs: list[tuple[int, int]],
               pieces: list[tuple[int, int]] | None = None) -> None:
    """Write one packet's pages into their runs of ``block``: back to back in ``data``, or in ``pieces``
    of it ((offset, size), in order, not necessarily whole pages), one write per run."""
    at = [(0, len(data))] if pieces is None else pieces
    k, off, left = 0, at[0][0], at[0][1]
    for p, n in runs:
        views = []
        need = n * PAGE_SIZE
        while need:
            while not left:
                k += 1
                off, left = at[k]
            take = min(need, left)
            views.append(data[off:off + take])
            off, left, need = off + take, left - take, need - take
        if not block.stores_via_fd:
            block.populate(p, n)
        block.store_views(p, views)
