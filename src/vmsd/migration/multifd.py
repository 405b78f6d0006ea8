"""Multifd: RAM pages over extra connections beside the main stream, as QEMU sends them.

Every multifd connection starts with a 64-byte initial packet (magic, version,
the sender's UUID, channel id); then come RAM packets: a fixed 1344-byte
header (flags, page counts, payload size, a packet number shared by all
channels, the RAM block name, 128 page offsets) followed by the pages, raw or
through the channel's persistent zlib/zstd stream.

Two layouts, chosen by the peer's profile because QEMU does not negotiate
them (:attr:`MultifdConfig.peer`, see :mod:`vmsd.migration.profile`):

* ``"7.2"``: zero pages travel on the main channel as ZERO records; every
  RAM section's EOS is a sync point, preceded by one SYNC packet per channel.
* ``"10.0"`` (newest): zero pages are listed in the packets (after the normal
  offsets, no payload); SYNC packets only at setup, at the end of each pass
  and at the end, each matched by a MULTIFD_FLUSH record on the main channel.

The sync protocol is the only ordering between channels: pages a channel
sent before its k-th SYNC are in RAM before the receiver passes the main
channel's k-th sync point, and no page is sent twice between two sync points.

Pages go from the RAM mapping to the socket without copies (``sendmsg`` with
memoryviews of page runs) and come back into their place in RAM without
passing through user space where the kernel allows (``splice`` from the
socket into the RAM file: uncompressed pages, and zstd's stored blocks), else
straight into the mapping (``recv_into`` on its slices); socket I/O, zlib and
zstd release the GIL, so the channel threads run in parallel with the
migration thread.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import itertools
import os
import queue
import struct
import threading
import time
import zlib
from collections.abc import Callable
from typing import IO, Any, cast

import attrs
import numpy as np
import zstandard

from vmsd.migration.profile import NEWEST, PROFILES, PeerProfile, peer_profile
from vmsd.migration.ram.blocks import PAGE_SIZE, Pages, RamBlock, RamBlocks
from vmsd.migration.transport import Channel, TransportError
from vmsd.runtime.errors import MalformedStream, VMSDError

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
PAGES_PER_PACKET = (512 << 10) // PAGE_SIZE  # 128
HEADER_SIZE = 320 + 8 * PAGES_PER_PACKET  # 1344, always sent in full
INITIAL_SIZE = 64
FLAG_SYNC = 0x01
COMPRESSION_FLAGS = {"none": 0x00, "zlib": 0x02, "zstd": 0x04}
_HEAD = struct.Struct(">IIIIIIQI")  # magic .. zero_pages (36 bytes)
_INITIAL = struct.Struct(">II16sB")


class MultifdError(VMSDError):
    """A multifd channel failed; the message names the channel."""


@attrs.define
class MultifdConfig:
    """The multifd settings both sides must agree on (QEMU's names in :func:`config_from`)."""

    channels: int = 2
    compression: str = "none"
    zlib_level: int = 1
    zstd_level: int = 1
    peer: PeerProfile = NEWEST
    zero_page_detection: str = "multifd"  # none | legacy | multifd (peers that list zero pages in packets)
    uuid: bytes = bytes(16)
    # Receiver: how long every channel may wait at a sync point the main channel does not reach.  A source
    # writes the main channel's sync record right after its channels' SYNC packets, so a long wait means
    # the two sides disagree on the layout (QEMU does not negotiate it) and would otherwise wait for good.
    sync_stall: float = 20.0

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.channels <= 255:
            raise ValueError("parameter 'multifd-channels' expects a value between 1 and 255")
        if self.compression not in COMPRESSION_FLAGS:
            raise ValueError(f"parameter 'multifd-compression': '{self.compression}' is not one of "
                             f"{', '.join(COMPRESSION_FLAGS)}")
        if self.zero_page_detection not in ("none", "legacy", "multifd"):
            raise ValueError("parameter 'zero-page-detection' expects none, legacy or multifd")
        if not self.peer.multifd_zero_pages and self.zero_page_detection == "multifd":
            self.zero_page_detection = "legacy"  # the peer has no zero pages in packets
        if not 0 <= self.zlib_level <= 9:
            raise ValueError("parameter 'multifd-zlib-level' expects a value between 0 and 9")
        if not 0 <= self.zstd_level <= 20:
            raise ValueError("parameter 'multifd-zstd-level' expects a value between 0 and 20")
        if len(self.uuid) != 16:
            raise ValueError("a UUID is 16 bytes")

    @property
    def legacy_sync(self) -> bool:
        """Every section's EOS is a sync point (7.2), not MULTIFD_FLUSH records."""
        return not self.peer.multifd_flush_records

    @property
    def zero_pages_in_packets(self) -> bool:
        return self.peer.multifd_zero_pages and self.zero_page_detection == "multifd"


def config_from(parameters: dict[str, str], peer_version: str = "10.0", uuid: bytes = bytes(16)) -> MultifdConfig:
    """A config from QEMU-named parameters (``multifd-channels``, ``multifd-compression``, ...)."""
    names = {"multifd-channels": "channels", "multifd-compression": "compression",
             "multifd-zlib-level": "zlib_level", "multifd-zstd-level": "zstd_level",
             "zero-page-detection": "zero_page_detection"}
    peer = peer_profile(peer_version)
    kw: dict[str, Any] = {"peer": peer, "uuid": uuid}
    if not peer.multifd_zero_pages:
        kw["zero_page_detection"] = "legacy"
    for name, value in parameters.items():
        field = names.get(name)
        if field is None:
            raise ValueError(f"parameter '{name}' is not a multifd parameter")
        kw[field] = value if field in ("compression", "zero_page_detection") else int(value)
    return MultifdConfig(**kw)


# -- initial packet -----------------------------------------------------------------------------------------------
def initial_packet(uuid: bytes, channel_id: int) -> bytes:
    return _INITIAL.pack(MULTIFD_MAGIC, MULTIFD_VERSION, uuid, channel_id).ljust(INITIAL_SIZE, b"\0")


def parse_initial(data: bytes, config: MultifdConfig, name: str) -> int:
    """The channel id of an initial packet, checked as QEMU checks it."""
    magic, version, uuid, cid = _INITIAL.unpack_from(data)
    if magic != MULTIFD_MAGIC:
        raise MultifdError(f"{name}: received packet magic {magic:#x} and expected magic {MULTIFD_MAGIC:#x}")
    if version != MULTIFD_VERSION:
        raise MultifdError(f"{name}: received packet version {version} and expected version {MULTIFD_VERSION}")
    if uuid != config.uuid:
        raise MultifdError(f"{name}: received uuid '{_uuid_text(uuid)}' and expected uuid "
                           f"'{_uuid_text(config.uuid)}' for channel {cid}")
    if cid >= config.channels:
        raise MultifdError(f"{name}: received channel id {cid} is greater than number of channels "
                           f"{config.channels}")
    return int(cid)


def _uuid_text(u: bytes) -> str:
    h = u.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@attrs.define
class ChannelStats:
    channel: int
    bytes: int = 0
    packets: int = 0
    pages: int = 0  # normal pages
    zero_pages: int = 0


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """(first page, count) for each run of consecutive pages."""
    n = len(pages)
    if n and pages[-1] - pages[0] == n - 1 and pages == list(range(pages[0], pages[0] + n)):
        return [(pages[0], n)]  # the usual packet, one run: a fifth of the loop's time
    out: list[tuple[int, int]] = []
    for p in pages:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


# -- sender -------------------------------------------------------------------------------------------------------
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

    def __init__(self, config: MultifdConfig, channels: list[Channel]) -> None:
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
        cfg = self.config
        comp: Any = None
        if cfg.compression == "zlib":
            comp = zlib.compressobj(cfg.zlib_level)
        elif cfg.compression == "zstd":
            comp = zstandard.ZstdCompressor(level=cfg.zstd_level)
        try:
            while True:
                job = self._work.get()
                if job is _STOP:
                    return
                if isinstance(job, _SyncPoint):
                    head = self._header(FLAG_SYNC, "", [], [], 0)
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
                views = [block.view[p * PAGE_SIZE:(p + n) * PAGE_SIZE] for p, n in _runs(normal_l)]
                payload: list[Any] = views
                size = len(normal_l) * PAGE_SIZE
                if comp is not None and normal_l:
                    # The compressor's pieces go out as they are (one iovec each): joining them would copy
                    # every compressed byte once more.  zstd compresses each run as a frame of its own, in
                    # one call straight from RAM into its output: a streaming compressor would copy the
                    # pages into its window and its output once more, which on incompressible pages costs
                    # as much as compressing.  QEMU's receivers decode frame after frame (tested).
                    payload = [comp.compress(v) for v in views]
                    if cfg.compression == "zlib":
                        payload.append(comp.flush(zlib.Z_SYNC_FLUSH))
                    size = sum(len(part) for part in payload)
                flags = COMPRESSION_FLAGS[cfg.compression] if (normal_l or cfg.peer.multifd_bare_sync) else 0
                head = self._header(flags, block.name, normal_l, zero_l, size)
                ch.writev([head, *payload])
                stats.bytes += len(head) + size
                stats.packets += 1
                stats.pages += len(normal_l)
                stats.zero_pages += len(zero_l)
        except BaseException as e:  # reported by the migration thread at its next send or sync
            reason = e.message if isinstance(e, TransportError) else str(e)
            if self._error is None:  # the first failure is the cause; the others follow from it
                self._error = MultifdError(f"multifd channel {i}: {reason}")

    def _header(self, flags: int, name: str, normal: list[int], zero: list[int], size: int) -> bytes:
        cfg = self.config
        sync_only = flags == FLAG_SYNC
        bare = sync_only and cfg.peer.multifd_bare_sync
        alloc = 0 if bare else PAGES_PER_PACKET
        num = 0 if bare else self._number()
        head = bytearray(HEADER_SIZE)
        _HEAD.pack_into(head, 0, MULTIFD_MAGIC, MULTIFD_VERSION, flags, alloc, len(normal), size, num, len(zero))
        raw = name.encode()
        head[64:64 + len(raw)] = raw
        offsets = np.array([*normal, *zero], dtype=np.int64) * PAGE_SIZE
        head[320:320 + 8 * offsets.size] = offsets.astype(">u8").tobytes()
        return bytes(head)


# -- receiver -----------------------------------------------------------------------------------------------------
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
        # Per-channel receive buffers for compressed payloads (at most two packets of pages, checked before use).
        self._payload = [bytearray(2 * PAGES_PER_PACKET * PAGE_SIZE + 4096) for _ in channels]
        # Per-channel pipes for splicing pages from the socket into the RAM file: uncompressed (see _splice)
        # or in stored zstd blocks (see _splice_stored).
        self._pipes: list[tuple[int, int] | None] = [_pipe() if config.compression != "zlib" else None
                                                     for _ in channels]
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
        for pipe in self._pipes:
            if pipe is not None:
                os.close(pipe[0])
                os.close(pipe[1])
        self._pipes = []
        for ch in self.channels:
            ch.abort()

    def _run(self, i: int) -> None:
        ch = self.channels[i]
        cfg = self.config
        stats = self.stats[i]
        name = f"multifd channel {i}"
        decomp: _ZlibPages | _ZstdPages | None = None
        if cfg.compression == "zlib":
            decomp = _ZlibPages()
        elif cfg.compression == "zstd":
            decomp = _ZstdPages()
        head = bytearray(HEADER_SIZE)
        hv = memoryview(head)
        mask = cfg.peer.multifd_compression_mask
        try:
            while True:
                try:
                    whole = _read_into(ch, hv, may_end=True)
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
                magic, version, flags, alloc, normal, size, _num, zero = _HEAD.unpack_from(head)
                if magic != MULTIFD_MAGIC:
                    raise MalformedStream(f"received packet magic {magic:#x} and expected magic {MULTIFD_MAGIC:#x}")
                if version != MULTIFD_VERSION:
                    raise MalformedStream(f"received packet version {version} and expected version 1")
                if zero and not cfg.peer.multifd_zero_pages:
                    # Such a peer leaves this field zero; newer sources count the packet's zero pages there.
                    raise MalformedStream(f"packet with {zero} zero pages: the source uses a newer multifd "
                                          f"layout than {cfg.peer}'s (--peer-version)")
                if alloc > PAGES_PER_PACKET or normal > alloc or zero > alloc - normal:
                    raise MalformedStream(f"packet with {alloc} allocated, {normal} normal and {zero} zero pages "
                                          f"(at most {PAGES_PER_PACKET})")
                stats.packets += 1
                stats.bytes += HEADER_SIZE
                if normal or zero:
                    self._pages(ch, head, flags & mask, normal, zero, size, decomp, stats)
                if flags & FLAG_SYNC:
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

    def _splice(self, ch: Channel, i: int, block: RamBlock, at: int, want: int) -> bool:
        """Move ``want`` bytes from the channel into the RAM file at offset ``at`` without a copy into user space.

        The kernel moves the socket's buffers into a pipe and copies them
        into the file's page cache: no user-space copy, and, as with
        :meth:`RamBlock.store_pages`, fresh pages are neither zero-filled nor
        faulted in first.  False (nothing consumed) where the descriptors do
        not splice; the caller then reads the bytes another way.
        """
        pipe = self._pipes[i] if i < len(self._pipes) else None
        if pipe is None:
            return False
        r, w = pipe
        done = 0
        while done < want:
            try:
                k = os.splice(ch.fileno(), w, want - done, flags=os.SPLICE_F_MOVE)
            except OSError as e:
                if e.errno == errno.EINVAL and done == 0:
                    self._pipes[i] = None
                    os.close(r)
                    os.close(w)
                    return False
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

    def _splice_stored(self, ch: Channel, i: int, block: RamBlock, runs: list[tuple[int, int]],
                       payload: memoryview) -> int | None:
        """Splice a payload of stored zstd frames from the socket into RAM; None when it took it all.

        Our sender's frames for incompressible runs (single segment, content
        size stated, no checksum or dictionary) are the pages as they are,
        with a 3-byte header before each 128 KiB.  Headers are read into
        ``payload``; each block's bytes go from the socket through a pipe into
        the RAM file at their place in ``runs``, as uncompressed pages do
        (:meth:`_splice`): one copy fewer than receiving the payload and
        writing it out.  At anything else (another kind of frame or block, a
        frame still open where the payload ends, sizes that disagree) this
        stops, puts the part of the payload it consumed back together in
        ``payload`` (block bytes read back from RAM) and returns its length:
        the caller reads the rest and inflates the whole payload as usual,
        which also reports what is wrong.  The pages spliced by then are
        written again with the same bytes, or, for a malformed payload, stay
        written (as QEMU's receiver leaves the pages before the bad one).
        """
        if i >= len(self._pipes) or self._pipes[i] is None:
            return 0
        size = len(payload)
        ends = list(itertools.accumulate(n * PAGE_SIZE for _, n in runs))  # where each run ends in the content
        spliced: list[tuple[int, int, int]] = []  # (payload offset, RAM offset, bytes)

        def give_back(pos: int) -> int:
            for at, ram, n in spliced:
                payload[at:at + n] = block.view[ram:ram + n]
            return pos

        pos = out = 0
        while pos < size:
            if pos + 5 > size:
                return give_back(pos)
            _read_into(ch, payload[pos:pos + 5])
            fhd = payload[pos + 4]
            end = pos + _frame_header_size(fhd)
            if bytes(payload[pos:pos + 4]) != _ZSTD_MAGIC or fhd & 0x2F != 0x20 or end + 3 > size:
                return give_back(pos + 5)
            _read_into(ch, payload[pos + 5:end + 3])  # the rest of the header, the first block's header
            content = _frame_content(payload[pos:end])
            pos, counted = end, 0
            while True:
                last, kind, n = _block_header(payload, pos)
                pos += 3
                if kind or n > _ZSTD_BLOCK_MAX or pos + n > size or out + n > ends[-1]:
                    return give_back(pos)
                while n:  # the block's bytes, run by run
                    r = bisect.bisect_right(ends, out)
                    ram = runs[r][0] * PAGE_SIZE + out - (ends[r - 1] if r else 0)
                    take = min(n, ends[r] - out)
                    if not self._splice(ch, i, block, ram, take):
                        return give_back(pos)
                    spliced.append((pos, ram, take))
                    pos, out, counted, n = pos + take, out + take, counted + take, n - take
                if last:
                    break
                if pos + 3 > size:
                    return give_back(pos)
                _read_into(ch, payload[pos:pos + 3])
            if counted != content:
                return give_back(pos)
        return None if out == ends[-1] else give_back(pos)

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

    def _pages(self, ch: Channel, head: bytearray, comp_flag: int, normal: int, zero: int, size: int,
               decomp: _ZlibPages | _ZstdPages | None, stats: ChannelStats) -> None:
        raw = bytes(head[64:320])
        name = raw[:255].split(b"\0", 1)[0].decode(errors="replace")
        block = self.blocks.get(name)
        if block is None:
            raise MalformedStream(f"unknown ramblock '{name}'")
        self.named.add(name)
        offsets = np.frombuffer(head, dtype=">u8", count=normal + zero, offset=320).astype(np.int64)
        bad = np.flatnonzero((offsets > block.used_length - PAGE_SIZE) | (offsets % PAGE_SIZE != 0))
        if bad.size:
            raise MalformedStream(f"packet offset {int(offsets[bad[0]]):#x} is outside RAM block '{name}' "
                                  f"of {block.used_length:#x} bytes")
        pages = (offsets // PAGE_SIZE).tolist()
        expected = COMPRESSION_FLAGS[self.config.compression]
        if normal and comp_flag != expected:
            raise MalformedStream(f"packet compression flag {comp_flag:#x}, expected {expected:#x} "
                                  f"({self.config.compression})")
        runs = _runs(pages[:normal])
        if decomp is None:
            for p, n in runs:
                if not (block.stores_via_fd and self._splice(ch, stats.channel, block, p * PAGE_SIZE, n * PAGE_SIZE)):
                    block.populate(p, n)
                    _read_into(ch, block.view[p * PAGE_SIZE:(p + n) * PAGE_SIZE])
            stats.bytes += normal * PAGE_SIZE
        elif normal:
            if size > 2 * normal * PAGE_SIZE + 4096:
                raise MalformedStream(f"compressed payload of {size} bytes for {normal} pages")
            payload = memoryview(self._payload[stats.channel])[:size]
            taken: int | None = 0
            if isinstance(decomp, _ZstdPages) and not decomp.bound.in_frame and block.stores_via_fd:
                taken = self._splice_stored(ch, stats.channel, block, runs, payload)
            if taken is not None:
                _read_into(ch, payload[taken:])
                decomp.inflate_into(payload, block, runs, normal * PAGE_SIZE)
            stats.bytes += size
        block.clear(offsets[normal:] // PAGE_SIZE)
        stats.pages += normal
        stats.zero_pages += zero


def _pipe() -> tuple[int, int] | None:
    """A pipe that holds a whole packet's pages where the system allows it; None where splicing is not available."""
    if not hasattr(os, "splice"):
        return None
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size the default 64 KiB stays
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PAGES_PER_PACKET * PAGE_SIZE)
    return r, w


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_BLOCK_MAX = 128 << 10


def _frame_header_size(fhd: int) -> int:
    """The bytes of a zstd frame header, magic number included, from its descriptor byte."""
    single = (fhd >> 5) & 1
    return 5 + (1 - single) + (0, 1, 2, 4)[fhd & 3] + (single, 2, 4, 8)[fhd >> 6]


def _frame_content(header: memoryview) -> int | None:
    """The content size a whole frame header states; None where it states none."""
    fhd = header[4]
    size = ((fhd >> 5) & 1, 2, 4, 8)[fhd >> 6]
    if not size:
        return None
    value = int.from_bytes(header[len(header) - size:], "little")
    return value + 256 if size == 2 else value


def _block_header(data: memoryview, i: int) -> tuple[int, int, int]:
    """(last, kind, size) of the 3-byte zstd block header at ``i``."""
    head = data[i] | data[i + 1] << 8 | data[i + 2] << 16
    return head & 1, (head >> 1) & 3, head >> 3


class ZstdBound:
    """Walks a channel's zstd frames across packets: how much a payload can inflate to, before inflating it.

    A few bytes of zstd can claim 128 KiB each.  Block headers say it all: raw
    and RLE blocks give exactly their size, a compressed block at most 128 KiB.
    A frame that states its content size (ours: one per run of pages) gives at
    most that, which the decoder enforces.  QEMU (and we) flush each packet on
    a block boundary, so a payload is whole blocks, the first one after a
    frame header where no frame is open.
    """

    def __init__(self) -> None:
        self.in_frame = False
        self.checksum = False
        self.content: int | None = None  # the open frame's stated content size
        self.counted = 0  # what the open frame's blocks so far can inflate to
        # After bound(): where the payload is whole frames of stored blocks only, without checksums, whose
        # sizes agree with their frames' content sizes, the (offset, size) of each block's bytes.
        self.stored: list[tuple[int, int]] | None = None

    def bound(self, data: memoryview) -> tuple[int, bool]:
        """(most bytes ``data`` inflates to, whether that is exact: no compressed block)."""
        out = 0
        exact = True
        i, n = 0, len(data)
        self.counted = 0  # a frame left open by the last packet: its earlier blocks were counted there
        stored: list[tuple[int, int]] | None = None if self.in_frame else []
        while i < n:
            if not self.in_frame:
                if bytes(data[i:i + 4]) != _ZSTD_MAGIC or i + 5 > n:
                    raise MalformedStream("zstd payload does not start a frame or a block")
                end = i + _frame_header_size(data[i + 4])
                if end > n:
                    raise MalformedStream("zstd frame header cut short")
                self.content = _frame_content(data[i:end])
                self.checksum = bool((data[i + 4] >> 2) & 1)
                if self.checksum:
                    stored = None
                self.in_frame = True
                i = end
                continue
            if i + 3 > n:
                raise MalformedStream("zstd block header cut short")
            last, kind, size = _block_header(data, i)
            i += 3
            if kind == 0:  # raw
                if stored is not None:
                    stored.append((i, size))
                self.counted += size
                i += size
            elif kind == 1:  # RLE: one byte repeated
                stored = None
                self.counted += size
                i += 1
            elif kind == 2:
                stored = None
                self.counted += _ZSTD_BLOCK_MAX
                exact = False
                i += size
            else:
                raise MalformedStream("zstd block of the reserved type")
            if last:
                if self.content is not None and self.content != self.counted:
                    stored = None  # the decoder will say what is wrong
                out += self.counted if self.content is None else min(self.counted, self.content)
                self.counted = 0
                self.in_frame = False
                i += 4 if self.checksum else 0
        if i != n:
            raise MalformedStream("zstd block runs past the payload")
        self.stored = stored if not self.in_frame else None
        return out + self.counted, exact


class _Drained(Exception):
    """The zstd reader asked for input beyond the packet's payload."""


# An empty stored block: inflates to nothing, and is valid wherever a block may start.
_ZSTD_EMPTY_BLOCK = b"\x00\x00\x00"
# An empty frame (single segment, content size 0, one empty last block): valid wherever a frame may start.
_ZSTD_EMPTY_FRAME = _ZSTD_MAGIC + b"\x20\x00\x01\x00\x00"


class _ZstdFeed:
    """What python-zstandard's stream reader pulls input from: one packet's payload, then at most one empty block.

    The reader asks for input before it lets the decoder hand out output it
    already holds, so once the payload is all taken, each ``readinto`` may
    need one empty block to push that output out (an empty frame where the
    payload ended a frame: QEMU's sources keep one frame per channel, ours
    send a frame per run).  Beyond that, more input means the payload is
    short; ``b""`` is never returned, as the reader would take it for the
    end of the stream, for good.
    """

    def __init__(self) -> None:
        self.data: memoryview | None = None
        self.nudge = False
        self.filler = _ZSTD_EMPTY_BLOCK

    def read(self, size: int) -> memoryview | bytes:
        if self.data is not None:
            data, self.data = self.data, None
            return data
        if self.nudge:
            self.nudge = False
            return self.filler
        raise _Drained


class _ZstdPages:
    """A channel's zstd stream, inflated into a packet-sized buffer and written into RAM.

    ``stream_reader(...).readinto`` fills the buffer with the GIL released;
    the pages then go into the RAM file with ``pwritev``
    (:meth:`RamBlock.store_pages`), which allocates the file's pages without
    zero-filling them first.  Inflating straight into the mapping saves a
    copy of a cache-hot buffer but has the kernel clear every fresh page
    first, the larger cost (on this VM a third of the receiver's time).
    Where the block is written through its mapping anyway (preallocated),
    each run is inflated in place.  The payload must fill its pages
    exactly, as QEMU's ``zstd_recv_pages`` checks, and then the decoder must
    hold nothing more: a payload that inflates past its pages is an error
    too (QEMU does not notice that one), found before anything is written.
    Stored and RLE blocks, the usual case for incompressible pages, are
    counted before inflating, and a payload that could inflate far beyond
    its pages is refused then (see :class:`ZstdBound`).
    """

    def __init__(self) -> None:
        self.bound = ZstdBound()
        self.feed = _ZstdFeed()
        # The reader only ever calls read(); the stub asks for a whole IO[bytes].
        source = cast(IO[bytes], self.feed)
        self.reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=1 << 20, closefd=False,
                                                                 read_across_frames=True)
        self._probe = bytearray(1)
        self._stage = bytearray(PAGES_PER_PACKET * PAGE_SIZE)

    def inflate_into(self, payload: memoryview, block: RamBlock, runs: list[tuple[int, int]], want: int) -> None:
        most, exact = self.bound.bound(payload)
        if most > 2 * want + 2 * _ZSTD_BLOCK_MAX:
            raise MalformedStream(f"zstd payload of {len(payload)} bytes could inflate to {most} bytes, "
                                  f"for {want} bytes of pages")
        if exact and most != want:
            raise MalformedStream(f"zstd payload inflated to {most} bytes, expected {want}")
        stored = self.bound.stored
        if stored is not None and most == want:
            # Whole frames of stored blocks (ours, for incompressible pages) that were not spliced (a block
            # written in place, no splice, or a payload MultifdReceiver._splice_stored gave back): the pages
            # are in the payload as they are, and no later frame refers back to them.  Write them from
            # there, as QEMU's decoder would copy them, without inflating them into a buffer first.
            _store_runs(block, payload, runs, stored)
            return
        feed, reader = self.feed, self.reader
        feed.data = payload
        feed.filler = _ZSTD_EMPTY_BLOCK if self.bound.in_frame else _ZSTD_EMPTY_FRAME
        staged = block.stores_via_fd
        targets = [memoryview(self._stage)[:want]]
        if not staged:
            targets = [block.view[p * PAGE_SIZE:(p + n) * PAGE_SIZE] for p, n in runs]
            for p, n in runs:
                block.populate(p, n)
        done = 0
        try:
            for target in targets:
                at = 0
                while at < len(target):  # a read may stop short of the slice
                    feed.nudge = True
                    got = reader.readinto(target[at:])
                    if got <= 0:
                        raise _Drained  # the end of the stream
                    at += got
                    done += got
            feed.data, feed.nudge = None, True
            try:
                extra = reader.readinto(self._probe)
            except _Drained:
                extra = 0  # all input taken, no output held back
        except _Drained:
            raise MalformedStream(f"zstd payload inflated to less than its {want} bytes of pages "
                                  f"(the first {done} bytes filled)") from None
        except zstandard.ZstdError as e:
            raise MalformedStream(f"zstd stream is corrupt ({e})") from None
        if extra:
            raise MalformedStream(f"zstd payload of {len(payload)} bytes inflates past its {want} bytes of pages")
        if staged:
            _store_runs(block, targets[0], runs)


class _ZlibPages:
    """A channel's zlib stream: each payload inflated (at most one byte past its pages) and copied into RAM."""

    def __init__(self) -> None:
        self.decomp = zlib.decompressobj()

    def inflate_into(self, payload: memoryview, block: RamBlock, runs: list[tuple[int, int]], want: int) -> None:
        try:
            out = memoryview(self.decomp.decompress(payload, want + 1))
        except zlib.error as e:
            raise MalformedStream(f"zlib stream is corrupt ({e})") from None
        if len(out) != want:
            raise MalformedStream(f"zlib payload inflated to {len(out)} bytes, expected {want}")
        _store_runs(block, out, runs)


def _store_runs(block: RamBlock, data: memoryview, runs: list[tuple[int, int]],
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


def _read_into(ch: Channel, view: memoryview, may_end: bool = False) -> bool:
    """Fill ``view``; False when ``may_end`` and the stream ended before its first byte."""
    got = ch.read_full(view)
    if got == len(view):
        return True
    if may_end and got == 0:
        return False
    raise TransportError(ch.name, f"stream ended after {got} of {len(view)} bytes")


# -- connections --------------------------------------------------------------------------------------------------
def classify(ch: Channel, config: MultifdConfig, timeout: float) -> int | None:
    """None for the main channel (starts with QEVM); a multifd channel's id after its initial packet."""
    head = ch.peek(4, timeout)
    if head == b"QEVM":
        return None
    if len(head) == 4 and int.from_bytes(head, "big") == MULTIFD_MAGIC:
        return parse_initial(ch.read_exact(INITIAL_SIZE), config, ch.name)
    raise MultifdError(f"{ch.name}: a connection that is neither the main channel nor a multifd channel "
                       f"(starts with {head.hex() or 'nothing'})")


def accept_all(accept: Callable[[], Channel], config: MultifdConfig, timeout: float
               ) -> tuple[Channel, list[Channel]]:
    """Accept the main channel and every multifd channel, in any order."""
    main: Channel | None = None
    multifd: dict[int, Channel] = {}
    opened: list[Channel] = []
    try:
        while main is None or len(multifd) < config.channels:
            try:
                ch = accept()
            except TransportError as e:
                missing = [str(i) for i in range(config.channels) if i not in multifd]
                what = (["the main channel"] if main is None else []) + \
                    ([f"multifd channel(s) {', '.join(missing)}"] if missing else [])
                raise MultifdError(f"{' and '.join(what)} never connected ({e.message})") from None
            opened.append(ch)
            cid = classify(ch, config, timeout)
            if cid is None:
                if main is not None:
                    raise MultifdError(f"{ch.name}: a second main channel")
                main = ch
            elif cid in multifd:
                raise MultifdError(f"{ch.name}: channel id {cid} is already in use")
            else:
                multifd[cid] = ch
    except BaseException:
        for ch in opened:
            ch.abort()
        raise
    return main, [multifd[i] for i in range(config.channels)]

