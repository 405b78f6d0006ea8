"""The receiving side: a thread per channel reads packets and applies their pages into RAM blocks.

Each thread checks a packet's header (:func:`decode_header`), finds its
block, checks its offsets, and hands the payload to its channel's
decompressor, which splices, reads or inflates the pages into place
(:mod:`vmsd.migration.multifd.codecs`); zero pages are cleared.  At a SYNC
packet the thread waits until the main channel reaches the matching sync
point (:meth:`MultifdReceiver.sync`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from vmsd.migration.multifd.codecs import Decompressor
from vmsd.migration.multifd.config import ChannelStats, MultifdConfig
from vmsd.migration.multifd.packet import HEADER_SIZE, MultifdError, PacketHeader, decode_header, runs
from vmsd.migration.multifd.pageio import PageReader
from vmsd.migration.profile import PROFILES
from vmsd.migration.ram.blocks import RamBlocks
from vmsd.migration.transport import Channel, TransportError
from vmsd.runtime.errors import MalformedStream, VMSDError


class MultifdReceiver:
    """Channel threads applying packets into ``blocks``; :meth:`sync` is the main channel's sync point."""

    def __init__(self, config: MultifdConfig, channels: list[Channel], blocks: RamBlocks,
                 on_failure: Callable[[], None] | None = None) -> None:
        self.config = config
        self.channels = channels  # indexed by channel id
        self.blocks = blocks
        # Called once, from the failing channel's thread, when a channel fails for real (not an orderly
        # close): the main-channel loader may be blocked on a source that waits for this channel.
        self._on_failure = on_failure
        self.stats = [ChannelStats(i) for i in range(len(channels))]
        self.named: set[str] = set()  # blocks some packet named (as RamLoader.named)
        self._synced = [threading.Semaphore(0) for _ in channels]
        self._release = [threading.Semaphore(0) for _ in channels]
        self._at_sync = [False for _ in channels]  # waiting for the main channel to reach a sync point
        self._error: MultifdError | None = None
        self._error_weak = False  # the error so far is only a channel closed between packets
        self._lock = threading.Lock()
        self._stopping = False
        # Per channel: its reads, and a pipe for splicing pages from the socket into the RAM file where its
        # compression method can (uncompressed pages, stored zstd blocks).
        self._readers = [PageReader(ch, splice=config.codec.splices) for ch in channels]
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"multifd recv {i}", daemon=True)
                         for i in range(len(channels))]
        for t in self._threads:
            t.start()

    def sync(self) -> None:
        """Wait until every channel consumed one SYNC packet, then let them all go on."""
        for i, sem in enumerate(self._synced):
            while not sem.acquire(timeout=0.1):
                if self._error is not None:
                    raise self._error
                if not self._threads[i].is_alive():
                    raise MultifdError(f"multifd channel {i}: closed before its SYNC packet")
        for sem in self._release:
            sem.release()

    def failure(self, wait: float) -> MultifdError | None:
        """The first channel's error, after giving the threads ``wait`` seconds to notice theirs.

        When the main channel breaks because a multifd channel died, the
        channel's error is the one worth reporting.
        """
        deadline = time.monotonic() + wait
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return self._error

    def close(self) -> None:
        self._stopping = True
        for ch in self.channels:
            ch.shutdown()
        for sem in self._release:
            sem.release()
        for t in self._threads:
            t.join(10)
        for reader in self._readers:
            reader.close()
        for ch in self.channels:
            ch.abort()

    def _run(self, i: int) -> None:
        reader = self._readers[i]
        cfg = self.config
        stats = self.stats[i]
        name = f"multifd channel {i}"
        decomp = cfg.codec.decompressor(reader)
        head = bytearray(HEADER_SIZE)
        hv = memoryview(head)
        try:
            while True:
                try:
                    whole = reader.read_into(hv, may_end=True)
                except TransportError:
                    if self._stopping:
                        return
                    raise
                if not whole:
                    if not self._stopping:
                        # Closed between packets: the peer gave up, most likely because
                        # another channel failed first; that one's error is the cause.
                        self._note(f"{name}: closed by the peer between packets", weak=True)
                    return
                packet = decode_header(head, cfg.peer)
                stats.packets += 1
                stats.bytes += HEADER_SIZE
                if packet.normal or packet.zero:
                    self._pages(packet, decomp, stats)
                if packet.sync:
                    self._at_sync[i] = True
                    self._synced[i].release()
                    if not self._wait_release(i):
                        return
                    self._at_sync[i] = False
        except BaseException as e:
            if self._stopping:
                return
            reason = e.message if isinstance(e, VMSDError | TransportError) else f"{type(e).__name__}: {e}"
            self._note(f"{name}: {reason}", weak=False)

    def _pages(self, packet: PacketHeader, decomp: Decompressor, stats: ChannelStats) -> None:
        block = self.blocks.get(packet.block)
        if block is None:
            raise MalformedStream(f"unknown ramblock '{packet.block}'")
        self.named.add(packet.block)
        pages = packet.pages(block.used_length)
        codec = self.config.codec
        packet.check_compression(codec.flag, codec.name)
        normal = packet.normal
        if normal:
            stats.bytes += decomp.recv(block, runs(pages[:normal].tolist()), normal, packet.size)
        block.clear(pages[normal:])
        stats.pages += normal
        stats.zero_pages += packet.zero

    def _wait_release(self, i: int) -> bool:
        """Wait at a sync point until the main channel reaches it; False to stop the thread."""
        waited = 0.0
        while not self._release[i].acquire(timeout=0.5):
            if self._stopping or self._error is not None:
                return False
            waited += 0.5
            if waited >= self.config.sync_stall and all(self._at_sync):
                peer = self.config.peer
                others = [v for v, p in PROFILES.items() if p.multifd_flush_records != peer.multifd_flush_records]
                self._note(f"multifd: every channel has waited {waited:g} s at a sync point the main channel "
                           f"does not reach; is the source's multifd layout that of QEMU {' or '.join(others)} "
                           f"rather than {peer}'s (--peer-version)?", weak=False)
                return False
        return not self._stopping

    def _note(self, message: str, weak: bool) -> None:
        """Keep the first failure as the cause; an orderly close only until a real error shows up.

        The first real failure shuts every channel down, as QEMU's
        ``multifd_recv_terminate_threads`` does: a source blocked writing to
        the failed channel learns of it instead of waiting for good.
        """
        with self._lock:
            first = self._error is None or self._error_weak
            if self._error is None or (self._error_weak and not weak):
                self._error = MultifdError(message)
                self._error_weak = weak
        if first and not weak:
            for ch in self.channels:
                ch.shutdown()
            if self._on_failure is not None:
                self._on_failure()
