"""The sending side: channel threads that take page batches from one queue and write them as packets.

Pages go from the RAM mapping to the socket without copies (``sendmsg``
with memoryviews of page runs, or the compressor's pieces straight from
RAM); socket I/O, zlib and zstd release the GIL, so the channel threads run
in parallel with the migration thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from vmsd.migration.multifd.config import ChannelStats, MultifdConfig
from vmsd.migration.multifd.packet import (
    FLAG_SYNC,
    PAGES_PER_PACKET,
    MultifdError,
    encode_header,
    initial_packet,
    page_flags,
    runs,
)
from vmsd.migration.ram.blocks import PAGE_SIZE, Pages, RamBlock
from vmsd.migration.transport import Channel, TransportError

_STOP = object()


class _SyncPoint:
    """One SYNC packet per channel: queued once per channel, each thread takes one and waits for the rest."""

    def __init__(self, channels: int) -> None:
        self.left = channels
        self.cond = threading.Condition()

    def arrive(self) -> None:
        with self.cond:
            self.left -= 1
            self.cond.notify_all()

    def wait(self, give_up: Callable[[], bool]) -> bool:
        """Until every channel has sent its SYNC; False if ``give_up`` says so first."""
        with self.cond:
            while self.left:
                if give_up():
                    return False
                self.cond.wait(0.1)
        return True


class MultifdSender:
    """Channel threads that send page batches; :meth:`sync` is QEMU's ``multifd_send_sync_main``.

    Packets wait in one queue that every channel's thread takes from, as
    QEMU hands a batch to whichever channel is idle: a thread that is
    descheduled or slowed by its peer holds up no other channel.  At most
    two packets per channel with pages to send may wait; packets of zero
    pages only (newest layout) cost the channel almost nothing, so they do
    not count: counted, they would leave the channels idle while the
    migration thread scans the next chunk of a half-zero guest.
    """

    def __init__(self, config: MultifdConfig, channels: list[Channel], introduced: bool = False) -> None:
        """``introduced``: each channel's initial packet went out already (as the channel opened)."""
        self.config = config
        self.channels = channels
        self.stats = [ChannelStats(i) for i in range(len(channels))]
        self._packet_num = 0
        self._num_lock = threading.Lock()
        self._error: MultifdError | None = None
        self._stopping = False
        self._work: queue.Queue[Any] = queue.Queue()
        self._credits = threading.Semaphore(2 * len(channels))  # for packets with pages to send
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"multifd send {i}", daemon=True)
                         for i in range(len(channels))]
        if not introduced:
            for i, ch in enumerate(channels):
                ch.write(initial_packet(config.uuid, i))
        for t in self._threads:
            t.start()

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.stats)

    def send(self, block: RamBlock, normal: Pages, zero: Pages) -> None:
        """Queue pages of one block in packets of at most 128 pages."""
        step = PAGES_PER_PACKET
        n_norm, n_zero = int(normal.size), int(zero.size)
        i = j = 0
        while i < n_norm or j < n_zero:
            take_n = min(step, n_norm - i)
            take_z = min(step - take_n, n_zero - j)
            self._put((block, normal[i:i + take_n], zero[j:j + take_z]), take_n > 0)
            i += take_n
            j += take_z

    def sync(self) -> None:
        """One SYNC packet on every channel, after all queued pages; returns once all are written.

        A thread that took the sync point sends its SYNC and takes no more
        work until every channel has, so each channel gets exactly one, and
        after every batch queued before it.
        """
        point = _SyncPoint(len(self.channels))
        for _ in self.channels:
            self._put(point, False)
        point.wait(lambda: self._error is not None)
        self._check()

    def close(self) -> None:
        """Stop the threads (queued work is dropped on error); the caller closes the channels."""
        if self._error is not None:
            self._drain()
        for _ in self.channels:
            self._work.put(_STOP)
        for t in self._threads:
            t.join(10)

    def abort(self) -> None:
        """Wake blocked threads by shutting the sockets down, then stop them."""
        self._stopping = True
        for ch in self.channels:
            ch.shutdown()
        self._drain()
        self.close()

    def _drain(self) -> None:
        while True:
            try:
                self._work.get_nowait()
            except queue.Empty:
                return

    def _put(self, job: Any, counted: bool) -> None:
        while counted and not self._credits.acquire(timeout=0.1):
            self._check()
        self._check()
        self._work.put(job)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _number(self) -> int:
        with self._num_lock:
            n = self._packet_num
            self._packet_num += 1
            return n

    def _run(self, i: int) -> None:
        ch = self.channels[i]
        stats = self.stats[i]
        peer = self.config.peer
        codec = self.config.codec
        comp = codec.compressor(self.config.level)
        try:
            while True:
                job = self._work.get()
                if job is _STOP:
                    return
                if isinstance(job, _SyncPoint):
                    # A bare SYNC (newest layout) takes no packet number.
                    num = 0 if peer.multifd_bare_sync else self._number()
                    head = encode_header(peer, FLAG_SYNC, "", [], [], 0, num)
                    ch.write(head)
                    stats.bytes += len(head)
                    stats.packets += 1
                    job.arrive()
                    if not job.wait(lambda: self._error is not None or self._stopping):
                        return
                    continue
                block, normal, zero = job
                if normal.size:
                    self._credits.release()
                normal_l, zero_l = normal.tolist(), zero.tolist()
                views = [block.view[p * PAGE_SIZE:(p + n) * PAGE_SIZE] for p, n in runs(normal_l)]
                payload = comp.send_prepare(views) if views else views
                size = sum(len(part) for part in payload)
                flags = page_flags(peer, codec.flag, len(normal_l))
                head = encode_header(peer, flags, block.name, normal_l, zero_l, size, self._number())
                ch.writev([head, *payload])
                stats.bytes += len(head) + size
                stats.packets += 1
                stats.pages += len(normal_l)
                stats.zero_pages += len(zero_l)
        except BaseException as e:  # reported by the migration thread at its next send or sync
            reason = e.message if isinstance(e, TransportError) else str(e)
            if self._error is None:  # the first failure is the cause; the others follow from it
                self._error = MultifdError(f"multifd channel {i}: {reason}")
