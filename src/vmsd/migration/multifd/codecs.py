"""Multifd compression methods (none, zlib, zstd) behind one protocol, as QEMU's ``MultiFDMethods``.

A :class:`Codec` names a method and its packet flag and makes, for each
channel thread, a :class:`Compressor` (QEMU's ``send_prepare``: a packet's
pages into payload pieces) or a :class:`Decompressor` (QEMU's ``recv``: a
packet's payload from the channel into its pages in RAM).  Each channel's
compressor and decompressor keep one stream across packets, as QEMU's do.
The channel threads look their codec up once, in :data:`CODECS`.

Sending, the pieces go out as they are (one iovec each) straight from RAM:
joining them would copy every byte once more.  Receiving, pages are spliced
from the socket into the RAM file where the kernel allows (uncompressed
pages, and zstd's stored blocks), else read into the mapping, or inflated
into a buffer and written from there.  zlib and zstd release the GIL, so
the channel threads run in parallel with the migration thread.
"""

from __future__ import annotations

import bisect
import itertools
import zlib
from collections.abc import Callable, Sequence
from typing import IO, Protocol, cast

import attrs
import zstandard

from vmsd.migration.multifd.packet import PAGES_PER_PACKET
from vmsd.migration.multifd.pageio import PageReader, store_runs
from vmsd.migration.multifd.zstd_frames import (
    BLOCK_MAX,
    EMPTY_BLOCK,
    EMPTY_FRAME,
    MAGIC,
    ZstdBound,
    block_header,
    frame_content,
    frame_header_size,
)
from vmsd.migration.ram.blocks import PAGE_SIZE, RamBlock
from vmsd.runtime.errors import MalformedStream

Runs = list[tuple[int, int]]  # (first page, count), in packet order


class Compressor(Protocol):
    def send_prepare(self, runs: list[memoryview]) -> Sequence[bytes | memoryview]:
        """The payload of a packet whose normal pages are ``runs`` (one view of RAM per run, at least one):
        pieces to write in order."""


class Decompressor(Protocol):
    def recv(self, block: RamBlock, runs: Runs, normal: int, size: int) -> int:
        """Take a packet's payload from the channel into its ``normal`` pages (``runs`` of ``block``);
        ``size``: the payload size the header states.  Returns the bytes taken from the channel."""


@attrs.frozen
class Codec:
    name: str
    flag: int  # in the packet flags
    compressor: Callable[[int], Compressor]  # from the method's level
    decompressor: Callable[[PageReader], Decompressor]
    splices: bool  # whether its receivers splice from the socket (they need a pipe per channel)


# -- none ---------------------------------------------------------------------------------------------------------
class _RawSend:
    def __init__(self, level: int) -> None:
        pass

    def send_prepare(self, runs: list[memoryview]) -> Sequence[bytes | memoryview]:
        return runs


class _RawRecv:
    """Pages spliced from the socket into the RAM file, else read straight into the mapping."""

    def __init__(self, reader: PageReader) -> None:
        self.reader = reader

    def recv(self, block: RamBlock, runs: Runs, normal: int, size: int) -> int:
        reader = self.reader
        for p, n in runs:
            if not (block.stores_via_fd and reader.splice(block, p * PAGE_SIZE, n * PAGE_SIZE)):
                block.populate(p, n)
                reader.read_into(block.view[p * PAGE_SIZE:(p + n) * PAGE_SIZE])
        return normal * PAGE_SIZE  # the header's payload size plays no part here, as in QEMU


# -- compressed payloads ------------------------------------------------------------------------------------------
class _Payloads:
    """A receive buffer for compressed payloads: at most two packets of pages, checked before use."""

    def __init__(self, reader: PageReader) -> None:
        self.reader = reader
        self._payload = bytearray(2 * PAGES_PER_PACKET * PAGE_SIZE + 4096)

    def _take(self, normal: int, size: int) -> memoryview:
        if size > 2 * normal * PAGE_SIZE + 4096:
            raise MalformedStream(f"compressed payload of {size} bytes for {normal} pages")
        return memoryview(self._payload)[:size]


# -- zlib ---------------------------------------------------------------------------------------------------------
class _ZlibSend:
    """One deflate stream per channel, flushed at the end of each packet (Z_SYNC_FLUSH) as QEMU does."""

    def __init__(self, level: int) -> None:
        self.z = zlib.compressobj(level)

    def send_prepare(self, runs: list[memoryview]) -> Sequence[bytes | memoryview]:
        return [*(self.z.compress(v) for v in runs), self.z.flush(zlib.Z_SYNC_FLUSH)]


class _ZlibPages(_Payloads):
    """A channel's zlib stream: each payload inflated (at most one byte past its pages) and copied into RAM."""

    def __init__(self, reader: PageReader) -> None:
        super().__init__(reader)
        self.decomp = zlib.decompressobj()

    def recv(self, block: RamBlock, runs: Runs, normal: int, size: int) -> int:
        payload = self._take(normal, size)
        self.reader.read_into(payload)
        self.inflate_into(payload, block, runs, normal * PAGE_SIZE)
        return size

    def inflate_into(self, payload: memoryview, block: RamBlock, runs: Runs, want: int) -> None:
        try:
            out = memoryview(self.decomp.decompress(payload, want + 1))
        except zlib.error as e:
            raise MalformedStream(f"zlib stream is corrupt ({e})") from None
        if len(out) != want:
            raise MalformedStream(f"zlib payload inflated to {len(out)} bytes, expected {want}")
        store_runs(block, out, runs)


# -- zstd ---------------------------------------------------------------------------------------------------------
class _ZstdSend:
    """Each run compressed as a frame of its own, in one call straight from RAM into its output.

    A streaming compressor would copy the pages into its window and its
    output once more, which on incompressible pages costs as much as
    compressing.  QEMU's receivers decode frame after frame (tested); ours
    splice a frame of stored blocks (incompressible pages) into RAM as it is.
    """

    def __init__(self, level: int) -> None:
        self.z = zstandard.ZstdCompressor(level=level)

    def send_prepare(self, runs: list[memoryview]) -> Sequence[bytes | memoryview]:
        return [self.z.compress(v) for v in runs]


class _Drained(Exception):
    """The zstd reader asked for input beyond the packet's payload."""


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
        self.filler = EMPTY_BLOCK

    def read(self, size: int) -> memoryview | bytes:
        if self.data is not None:
            data, self.data = self.data, None
            return data
        if self.nudge:
            self.nudge = False
            return self.filler
        raise _Drained


class _ZstdPages(_Payloads):
    """A channel's zstd stream, spliced or inflated into a packet-sized buffer and written into RAM.

    A payload of whole stored frames (ours, for incompressible pages) is
    spliced into the RAM file as it arrives (:meth:`_splice_stored`).  Else
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

    def __init__(self, reader: PageReader) -> None:
        super().__init__(reader)
        self.bound = ZstdBound()
        self.feed = _ZstdFeed()
        # The reader only ever calls read(); the stub asks for a whole IO[bytes].
        source = cast(IO[bytes], self.feed)
        self.stream = zstandard.ZstdDecompressor().stream_reader(source, read_size=1 << 20, closefd=False,
                                                                 read_across_frames=True)
        self._probe = bytearray(1)
        self._stage = bytearray(PAGES_PER_PACKET * PAGE_SIZE)

    def recv(self, block: RamBlock, runs: Runs, normal: int, size: int) -> int:
        payload = self._take(normal, size)
        taken: int | None = 0
        if not self.bound.in_frame and block.stores_via_fd:
            taken = self._splice_stored(block, runs, payload)
        if taken is not None:
            self.reader.read_into(payload[taken:])
            self.inflate_into(payload, block, runs, normal * PAGE_SIZE)
        return size

    def inflate_into(self, payload: memoryview, block: RamBlock, runs: Runs, want: int) -> None:
        most, exact = self.bound.bound(payload)
        if most > 2 * want + 2 * BLOCK_MAX:
            raise MalformedStream(f"zstd payload of {len(payload)} bytes could inflate to {most} bytes, "
                                  f"for {want} bytes of pages")
        if exact and most != want:
            raise MalformedStream(f"zstd payload inflated to {most} bytes, expected {want}")
        stored = self.bound.stored
        if stored is not None and most == want:
            # Whole frames of stored blocks (ours, for incompressible pages) that were not spliced (a block
            # written in place, no splice, or a payload _splice_stored gave back): the pages are in the
            # payload as they are, and no later frame refers back to them.  Write them from there, as
            # QEMU's decoder would copy them, without inflating them into a buffer first.
            store_runs(block, payload, runs, stored)
            return
        feed, stream = self.feed, self.stream
        feed.data = payload
        feed.filler = EMPTY_BLOCK if self.bound.in_frame else EMPTY_FRAME
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
                    got = stream.readinto(target[at:])
                    if got <= 0:
                        raise _Drained  # the end of the stream
                    at += got
                    done += got
            feed.data, feed.nudge = None, True
            try:
                extra = stream.readinto(self._probe)
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
            store_runs(block, targets[0], runs)

    def _splice_stored(self, block: RamBlock, runs: Runs, payload: memoryview) -> int | None:
        """Splice a payload of stored zstd frames from the socket into RAM; None when it took it all.

        Our sender's frames for incompressible runs (single segment, content
        size stated, no checksum or dictionary) are the pages as they are,
        with a 3-byte header before each 128 KiB.  Headers are read into
        ``payload``; each block's bytes go from the socket through a pipe into
        the RAM file at their place in ``runs``, as uncompressed pages do
        (:meth:`PageReader.splice`): one copy fewer than receiving the payload
        and writing it out.  At anything else (another kind of frame or block,
        a frame still open where the payload ends, sizes that disagree) this
        stops, puts the part of the payload it consumed back together in
        ``payload`` (block bytes read back from RAM) and returns its length:
        the caller reads the rest and inflates the whole payload as usual,
        which also reports what is wrong.  The pages spliced by then are
        written again with the same bytes, or, for a malformed payload, stay
        written (as QEMU's receiver leaves the pages before the bad one).
        """
        reader = self.reader
        if not reader.splices:
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
            reader.read_into(payload[pos:pos + 5])
            fhd = payload[pos + 4]
            end = pos + frame_header_size(fhd)
            if bytes(payload[pos:pos + 4]) != MAGIC or fhd & 0x2F != 0x20 or end + 3 > size:
                return give_back(pos + 5)
            reader.read_into(payload[pos + 5:end + 3])  # the rest of the header, the first block's header
            content = frame_content(payload[pos:end])
            pos, counted = end, 0
            while True:
                last, kind, n = block_header(payload, pos)
                pos += 3
                if kind or n > BLOCK_MAX or pos + n > size or out + n > ends[-1]:
                    return give_back(pos)
                while n:  # the block's bytes, run by run
                    r = bisect.bisect_right(ends, out)
                    ram = runs[r][0] * PAGE_SIZE + out - (ends[r - 1] if r else 0)
                    take = min(n, ends[r] - out)
                    if not reader.splice(block, ram, take):
                        return give_back(pos)
                    spliced.append((pos, ram, take))
                    pos, out, counted, n = pos + take, out + take, counted + take, n - take
                if last:
                    break
                if pos + 3 > size:
                    return give_back(pos)
                reader.read_into(payload[pos:pos + 3])
            if counted != content:
                return give_back(pos)
        return None if out == ends[-1] else give_back(pos)


CODECS: dict[str, Codec] = {c.name: c for c in [
    Codec("none", 0x00, _RawSend, _RawRecv, splices=True),
    Codec("zlib", 0x02, _ZlibSend, _ZlibPages, splices=False),
    Codec("zstd", 0x04, _ZstdSend, _ZstdPages, splices=True),
]}
