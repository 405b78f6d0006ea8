"""Multifd: vmsd <-> vmsd in both packet layouts, QEMU 7.2 on either end, and channel faults."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import struct
import threading
import time
import uuid as uuidlib
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from listening import free_port, wait_listening
from private_peers import Peer
from test_migration import Dirtier, devices_of, fill, make_machine, ram_of
from vmsd.cli import main
from vmsd.migration.incoming import Incoming, IncomingResult
from vmsd.migration.machine import Machine
from vmsd.migration.multifd import (
    HEADER_SIZE,
    MULTIFD_MAGIC,
    MultifdConfig,
    MultifdError,
    MultifdReceiver,
    MultifdSender,
    accept_all,
    initial_packet,
)
from vmsd.migration.multifd.codecs import _ZstdFeed
from vmsd.migration.multifd.packet import runs
from vmsd.migration.multifd.pageio import store_runs
from vmsd.migration.precopy import Migration
from vmsd.migration.profile import peer_profile
from vmsd.migration.ram.blocks import PAGE_SIZE, RamBlock, RamBlocks
from vmsd.migration.transport import listen, memory_pair, open_outgoing, socket_channel
from vmsd.testing.qmp import Qemu

MIB = 1 << 20


class Receiver:
    def __init__(self, machine: Machine, uri: str, cfg: MultifdConfig, timeout: float = 20) -> None:
        self.incoming = Incoming(machine, multifd=cfg)
        self.result: IncomingResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(uri, timeout), daemon=True)
        self.thread.start()
        time.sleep(0.1)

    def _run(self, uri: str, timeout: float) -> None:
        try:
            self.result = self.incoming.run(uri, timeout=timeout)
        except BaseException as e:  # inspected by the test
            self.error = e

    def join(self) -> None:
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    yield
    deadline = time.monotonic() + 5
    while True:
        left = [t.name for t in threading.enumerate() if t.name.startswith(("multifd", "migration"))]
        if not left:
            return
        assert time.monotonic() < deadline, f"threads left running: {left}"
        time.sleep(0.05)


@pytest.mark.parametrize("layout", ["7.2", "10.0"])
@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
def test_vmsd_to_vmsd(layout: str, compression: str) -> None:
    cfg = MultifdConfig(channels=2 if compression != "none" else 4, compression=compression, peer=peer_profile(layout))
    uri = f"tcp:127.0.0.1:{free_port()}"
    with make_machine(ram=32 * MIB) as src, make_machine(ram=32 * MIB) as dst:
        fill(src)
        work = Dirtier(src)
        rx = Receiver(dst, uri, cfg)
        info = Migration(src, uri, capabilities={"return-path": True}, parameters={"max-bandwidth": 0},
                         multifd=cfg).run()
        rx.join()
        assert rx.error is None and info["status"] == "completed", (info, rx.error)
        assert ram_of(src) == ram_of(dst)
        assert devices_of(src) == devices_of(dst)
        channels = info["multifd-channels"]
        assert len(channels) == cfg.channels and all(c["pages"] > 0 for c in channels)
        assert info["ram"]["multifd-bytes"] == sum(c["bytes"] for c in channels)
        assert rx.result is not None
        got = rx.result.channels
        assert [c.pages for c in got] == [c["pages"] for c in channels]
        if layout == "10.0":  # zero pages ride in the packets
            assert sum(c.zero_pages for c in got) > 0
        else:
            assert sum(c.zero_pages for c in got) == 0 and rx.result.counters["duplicate"] > 0
        if compression != "none":
            assert info["ram"]["multifd-bytes"] < info["ram"]["normal-bytes"] * 1.1
        work.finish()


def test_connections_in_any_order_and_a_wrong_uuid() -> None:
    cfg = MultifdConfig(channels=2, uuid=uuidlib.uuid4().bytes)
    with listen(f"tcp:127.0.0.1:{free_port()}") as lst:
        uri = lst.uri
        peers = [open_outgoing(uri) for _ in range(3)]
        peers[0].write(initial_packet(cfg.uuid, 1))  # channel 1 first, then main, then channel 0
        peers[1].write(b"QEVM\0\0\0\3")
        peers[2].write(initial_packet(cfg.uuid, 0))
        main_ch, channels = accept_all(lambda: lst.accept(5), cfg, 5)
        assert main_ch.read_exact(4) == b"QEVM"
        for ch in [main_ch, *channels, *peers]:
            ch.close()
        bad = open_outgoing(uri)
        bad.write(initial_packet(bytes(16), 0))
        with pytest.raises(MultifdError, match="received uuid '00000000-0000-0000-0000-000000000000' and expected"):
            accept_all(lambda: lst.accept(5), cfg, 5)
        bad.close()
        junk = open_outgoing(uri)
        junk.write(b"\xde\xad\xbe\xef" + bytes(60))
        with pytest.raises(MultifdError, match="neither the main channel nor a multifd channel"):
            accept_all(lambda: lst.accept(5), cfg, 5)
        junk.close()


def test_a_channel_that_never_connects() -> None:
    cfg = MultifdConfig(channels=2)
    with listen(f"tcp:127.0.0.1:{free_port()}") as lst:
        main_peer = open_outgoing(lst.uri)
        main_peer.write(b"QEVM\0\0\0\3")
        one = open_outgoing(lst.uri)
        one.write(initial_packet(bytes(16), 0))
        with pytest.raises(MultifdError, match=r"multifd channel\(s\) 1 never connected"):
            accept_all(lambda: lst.accept(0.5), cfg, 0.5)
        main_peer.close()
        one.close()


@pytest.mark.parametrize("compression", ["none", "zlib", "zstd"])
def test_channels_without_a_descriptor(compression: str) -> None:
    """Channels with no descriptor to splice from (memory, TLS) carry pages too: they are read instead."""
    with RamBlocks() as src, RamBlocks() as dst:
        block = src.create("pc.ram", 4 * MIB)
        block.bytes_[:MIB] = np.random.default_rng(2).integers(0, 256, MIB, dtype=np.uint8)
        block.bytes_[2 * MIB:3 * MIB] = 7
        into = dst.create("pc.ram", 4 * MIB)
        into.bytes_[:] = 1
        cfg = MultifdConfig(channels=2, compression=compression)
        pairs = [memory_pair(f"m{i}") for i in range(2)]
        sender = MultifdSender(cfg, [a for a, _ in pairs])
        for i, (_, b) in enumerate(pairs):
            assert b.read_exact(64) == initial_packet(cfg.uuid, i)
        rx = MultifdReceiver(cfg, [b for _, b in pairs], dst)
        zero = ~block.words.any(axis=1)
        sender.send(block, np.flatnonzero(~zero), np.flatnonzero(zero))
        sender.sync()
        rx.sync()
        sender.close()
        rx.close()
        assert bytes(into.view) == bytes(block.view)


def test_a_stalled_channel_holds_up_no_other() -> None:
    """Batches go to whichever channel is free, as in QEMU: while channel 0's peer reads nothing,
    channel 1 carries everything but the batch channel 0 is stuck writing; SYNC still reaches both."""
    pairs = [socket.socketpair() for _ in range(2)]
    got = [0, 0]

    def drain(i: int) -> None:
        while chunk := pairs[i][1].recv(1 << 20):
            got[i] += len(chunk)

    with RamBlocks() as blocks:
        block = blocks.create("pc.ram", 32 * MIB)
        sender = MultifdSender(MultifdConfig(channels=2), [socket_channel(f"c{i}", p[0]) for i, p in enumerate(pairs)])
        readers = [threading.Thread(target=drain, args=(1,))]
        readers[0].start()
        sending = threading.Thread(target=sender.send, args=(block, np.arange(block.npages), np.arange(0)))
        sending.start()
        sending.join(10)
        stuck = sending.is_alive()
        readers.append(threading.Thread(target=drain, args=(0,)))
        readers[1].start()  # let channel 0 go, whatever happened
        sending.join(10)
        sender.sync()
        sender.close()
        for a, _ in pairs:
            a.close()
        for t in readers:
            t.join(10)
        assert not stuck, "the sender waited for the stalled channel"
        packets = [st.packets for st in sender.stats]
        # 64 batches of 128 pages and one SYNC each; channel 0 took what its socket buffer held, and one more
        assert packets[0] < 10 and packets[0] + packets[1] == 64 + 2
        assert sum(st.pages for st in sender.stats) == block.npages
        assert got == [64 + st.bytes for st in sender.stats]  # after each channel's initial packet
        for _, b in pairs:
            b.close()


@pytest.mark.parametrize("pages", ["normal", "zero"])
def test_packets_of_zero_pages_do_not_wait_for_a_busy_channel(pages: str) -> None:
    """At most two packets per channel with pages to send wait in the queue; packets that only list zero
    pages cost a channel next to nothing, so they are queued at once, and the migration thread goes on
    to its next chunk while the channel works through what is queued."""
    a, b = socket.socketpair()
    with RamBlocks() as blocks:
        block = blocks.create("pc.ram", 32 * MIB)
        sender = MultifdSender(MultifdConfig(channels=1), [socket_channel("c0", a)])
        # The channel's thread takes the first packet and stays stuck writing it; two more may wait.
        normal = np.arange((4 if pages == "normal" else 3) * 128)
        zero = np.arange(4 * 128, block.npages)  # and then, in the newest layout, 60 packets of zero pages

        def send() -> None:
            with contextlib.suppress(MultifdError):  # the abort below, while it waits
                sender.send(block, normal, zero)

        sending = threading.Thread(target=send)
        sending.start()  # nobody reads the channel's peer
        sending.join(3)
        waited = sending.is_alive()
        sender.abort()
        sending.join(10)
    a.close()
    b.close()
    assert waited == (pages == "normal")


def _packet(name: str, offsets: list[int], payload: bytes, flags: int = 0, normal: int | None = None) -> bytes:
    head = bytearray(HEADER_SIZE)
    n = len(offsets) if normal is None else normal
    struct.pack_into(">IIIIIIQI", head, 0, MULTIFD_MAGIC, 1, flags, 128, n, len(payload), 0, 0)
    head[64:64 + len(name)] = name.encode()
    for i, off in enumerate(offsets):
        struct.pack_into(">Q", head, 320 + 8 * i, off)
    return bytes(head) + payload


def _receive_one(cfg: MultifdConfig, data: bytes) -> MultifdError:
    """Feed ``data`` to a one-channel receiver; the error it ends with."""
    with RamBlocks() as blocks:
        block = blocks.create("pc.ram", 16 * PAGE_SIZE)
        block.bytes_[:] = 9
        before = bytes(block.view)
        a, b = socket.socketpair()
        rx = MultifdReceiver(cfg, [socket_channel("test channel", b)], blocks)
        a.sendall(data)
        a.close()
        with pytest.raises(MultifdError) as e:
            rx.sync()
        rx.close()
        assert bytes(block.view) == before  # a rejected packet writes nothing
        return e.value


def _receive_pages(offsets: list[int], payload: bytes) -> bytes:
    """Feed one uncompressed packet and a SYNC to a one-channel receiver; the block's bytes afterwards."""
    with RamBlocks() as blocks:
        block = blocks.create("pc.ram", 16 * PAGE_SIZE)
        a, b = socket.socketpair()
        rx = MultifdReceiver(MultifdConfig(channels=1), [socket_channel("test channel", b)], blocks)
        a.sendall(_packet("pc.ram", offsets, payload) + _packet("", [], b"", flags=1))
        rx.sync()
        a.close()
        rx.close()
        return bytes(block.view)


@pytest.mark.parametrize("refuse", [None, "socket", "file"])
def test_uncompressed_pages_are_spliced_or_read_into_place(monkeypatch: pytest.MonkeyPatch, refuse: str | None) -> None:
    """Pages go from the socket into the RAM file by splice; where a descriptor does not splice
    (EINVAL: the socket's kind, or a file like hugetlbfs that takes no writes) they are read or copied."""
    real = os.splice
    calls: list[bool] = []

    def splice(src: int, dst: int, count: int, **kw: Any) -> int:
        calls.append(kw.get("offset_dst") is not None)
        if refuse == "socket" and kw.get("offset_dst") is None:
            raise OSError(errno.EINVAL, "Invalid argument")
        if refuse == "file" and kw.get("offset_dst") is not None:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(src, dst, count, **kw)

    monkeypatch.setattr(os, "splice", splice)
    pages = np.random.default_rng(5).integers(0, 256, 5 * PAGE_SIZE, dtype=np.uint8).tobytes()
    got = _receive_pages([3 * PAGE_SIZE, 4 * PAGE_SIZE, 9 * PAGE_SIZE, 10 * PAGE_SIZE, 11 * PAGE_SIZE], pages)
    want = bytearray(16 * PAGE_SIZE)
    want[3 * PAGE_SIZE:5 * PAGE_SIZE] = pages[:2 * PAGE_SIZE]
    want[9 * PAGE_SIZE:12 * PAGE_SIZE] = pages[2 * PAGE_SIZE:]
    assert got == bytes(want)
    assert calls and (refuse == "socket" or True in calls)  # the path under test was taken


def test_zero_pages_in_packets_clear_data_and_leave_holes_unallocated() -> None:
    """Newest layout: a packet's zero pages must end up zero; pages never written stay holes in the file."""
    with RamBlocks() as blocks:
        block = blocks.create("pc.ram", 64 * PAGE_SIZE)
        block.bytes_[8 * PAGE_SIZE:10 * PAGE_SIZE] = 0xAB  # pages 8, 9 hold data; the rest is a hole
        head = bytearray(_packet("pc.ram", [8 * PAGE_SIZE, 9 * PAGE_SIZE, 40 * PAGE_SIZE, 41 * PAGE_SIZE], b"",
                                 normal=0))
        struct.pack_into(">I", head, 32, 4)  # four zero pages
        a, b = socket.socketpair()
        rx = MultifdReceiver(MultifdConfig(channels=1), [socket_channel("test channel", b)], blocks)
        a.sendall(bytes(head) + _packet("", [], b"", flags=1))
        rx.sync()
        a.close()
        rx.close()
        with pytest.raises(OSError) as nothing:  # no data past page 9: pages 40 and 41 stayed holes
            os.lseek(block.fd, 10 * PAGE_SIZE, os.SEEK_DATA)
        assert nothing.value.errno == errno.ENXIO
        assert not block.words.any()


def test_packet_offset_outside_its_block() -> None:
    err = _receive_one(MultifdConfig(channels=1), _packet("pc.ram", [16 * PAGE_SIZE], bytes(PAGE_SIZE)))
    assert "multifd channel 0: packet offset 0x10000 is outside RAM block 'pc.ram'" in err.message


def test_a_huge_offset_is_not_a_negative_one() -> None:
    """Offsets are unsigned: one of 2**64 - 4096 is outside the block, not its last page counted from the end."""
    head = bytearray(_packet("pc.ram", [(1 << 64) - PAGE_SIZE], b"", normal=0))
    struct.pack_into(">I", head, 32, 1)  # a zero page
    err = _receive_one(MultifdConfig(channels=1), bytes(head))
    assert "multifd channel 0: packet offset 0xfffffffffffff000 is outside RAM block 'pc.ram'" in err.message


def test_bad_compression_stream() -> None:
    cfg = MultifdConfig(channels=1, compression="zlib")
    err = _receive_one(cfg, _packet("pc.ram", [0], b"\x78\x01garbage-not-deflate", flags=0x02))
    assert "multifd channel 0: zlib stream is corrupt" in err.message
    # Stored blocks are counted before inflating: nothing is written.
    stored = b"\x28\xb5\x2f\xfd\x00\x58" + (100 << 3).to_bytes(3, "little") + bytes(100)
    err = _receive_one(MultifdConfig(channels=1, compression="zstd"), _packet("pc.ram", [0], stored, flags=0x04))
    assert "zstd payload inflated to 100 bytes, expected 4096" in err.message
    garbage = b"\x28\xb5\x2f\xfd\x00\x58" + (40 << 3 | 2 << 1).to_bytes(3, "little") + b"\xff" * 40
    err = _zstd_error(garbage, [0])
    assert "multifd channel 0: zstd stream is corrupt" in err.message


def _zstd_error(data: bytes, offsets: list[int]) -> MultifdError:
    """The error a one-channel zstd receiver ends with after one packet, which wrote nothing into RAM
    (the payload is inflated into a buffer and checked first; QEMU may have written some pages by then)."""
    with RamBlocks() as blocks:
        block = blocks.create("pc.ram", 16 * PAGE_SIZE)
        block.bytes_[:] = 9
        a, b = socket.socketpair()
        rx = MultifdReceiver(MultifdConfig(channels=1, compression="zstd"), [socket_channel("test channel", b)],
                             blocks)
        a.sendall(_packet("pc.ram", offsets, data, flags=0x04))
        a.close()
        with pytest.raises(MultifdError) as e:
            rx.sync()
        rx.close()
        assert not (block.bytes_ != 9).any()
    return e.value


def _zstd_packet(payload: bytes) -> bytes:
    z = zstandard.ZstdCompressor().compressobj()
    return z.compress(payload) + z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)


def test_a_compressed_zstd_payload_must_fill_its_pages_exactly() -> None:
    """Compressed blocks give no exact size up front: each run must fill (as QEMU checks), and nothing may be left."""
    err = _zstd_error(_zstd_packet(b"vmsd" * 500), [0, PAGE_SIZE])
    assert "multifd channel 0: zstd payload inflated to less than its 8192 bytes of pages" in err.message
    err = _zstd_error(_zstd_packet(b"vmsd" * 3 * PAGE_SIZE), [0, 2 * PAGE_SIZE])  # 3 pages' worth for 2
    assert "inflates past its 8192 bytes of pages" in err.message


def _frame_per_run(pages: list[int], content: bytes) -> bytes:
    """How our sender frames a packet: each run of pages its own frame, compressed in one call."""
    z = zstandard.ZstdCompressor()
    out, at = [], 0
    for run in np.split(np.array(pages), np.flatnonzero(np.diff(pages) != 1) + 1):
        n = int(run.size) * PAGE_SIZE
        out.append(z.compress(content[at:at + n]))
        at += n
    return b"".join(out)


def _zstd_receiver(blocks: RamBlocks, pages: int, prealloc: bool) -> tuple[RamBlock, socket.socket, MultifdReceiver]:
    """A block "pc.ram" of ``pages`` pages and a one-channel zstd receiver; the sending end of its socket."""
    block = blocks.create("pc.ram", pages * PAGE_SIZE)
    if prealloc:
        block.prealloc()
    a, b = socket.socketpair()
    rx = MultifdReceiver(MultifdConfig(channels=1, compression="zstd"), [socket_channel("test channel", b)], blocks)
    return block, a, rx


@pytest.mark.parametrize("prealloc", [False, True], ids=["staged then pwritev", "in place"])
@pytest.mark.parametrize("framing", ["stream", "frame per run", "both"])
def test_zstd_pages_in_scattered_runs(framing: str, prealloc: bool) -> None:
    """Many short runs per packet: the decoder's held-back output must reach every run, whether the
    channel is one frame flushed per packet (QEMU) or a frame per run (us), or frames then a stream."""
    pages = [0, 2, 3, 5, 9, 10, 11, 15]
    content = b"".join(bytes([p + 1]) * 8 + bytes(PAGE_SIZE - 8) for p in pages)
    packets = {"stream": [_zstd_packet(content)], "frame per run": [_frame_per_run(pages, content)],
               # QEMU's frame never ends, so only ours can come before it
               "both": [_frame_per_run(pages, content), _frame_per_run(pages, content), _zstd_packet(content)]}
    with RamBlocks() as blocks:
        block, a, rx = _zstd_receiver(blocks, 16, prealloc)
        for data in packets[framing]:
            block.bytes_[:] = 7
            a.sendall(_packet("pc.ram", [p * PAGE_SIZE for p in pages], data, flags=0x04))
            a.sendall(_packet("", [], b"", flags=0x01))  # SYNC
            rx.sync()
            for p in range(16):
                want = bytes([p + 1]) * 8 + bytes(PAGE_SIZE - 8) if p in pages else b"\x07" * PAGE_SIZE
                assert block.view[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] == want
        a.close()
        rx.close()


def _splices(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the bytes each splice into a file moves, from now on."""
    real = os.splice
    into_file: list[int] = []

    def splice(src: int, dst: int, count: int, **kw: Any) -> int:
        n = real(src, dst, count, **kw)
        if kw.get("offset_dst") is not None:
            into_file.append(n)
        return n

    monkeypatch.setattr(os, "splice", splice)
    return into_file


def _decoder_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records each time the zstd decoder asks for input, from now on."""
    reads: list[int] = []
    real = _ZstdFeed.read

    def read(self: _ZstdFeed, size: int) -> memoryview | bytes:
        reads.append(size)
        return real(self, size)

    monkeypatch.setattr(_ZstdFeed, "read", read)
    return reads


@pytest.mark.parametrize("prealloc", [False, True], ids=["spliced", "in place"])
def test_stored_zstd_frames_are_written_without_the_decoder(monkeypatch: pytest.MonkeyPatch, prealloc: bool) -> None:
    """Incompressible runs, a frame each (what our sender makes of them), are all stored blocks: the pages
    go from the socket into the RAM file by splice, or, where the block is written in place, straight from
    the payload (a run of 40 pages spans two blocks).  A later packet in QEMU's one-frame style still goes
    through the decoder, which the shortcut left between frames."""
    pages = [*range(0, 40), 50, 60, 61]
    content = np.random.default_rng(8).integers(0, 256, len(pages) * PAGE_SIZE, dtype=np.uint8).tobytes()
    ours = _frame_per_run(pages, content)
    qemu = _zstd_packet(content[:3 * PAGE_SIZE])
    reads = _decoder_reads(monkeypatch)
    into_file = _splices(monkeypatch)
    with RamBlocks() as blocks:
        block, a, rx = _zstd_receiver(blocks, 64, prealloc)
        a.sendall(_packet("pc.ram", [p * PAGE_SIZE for p in pages], ours, flags=0x04) + _packet("", [], b"", flags=1))
        rx.sync()
        assert not reads  # the decoder was not asked for input
        assert sum(into_file) == (0 if prealloc else len(pages) * PAGE_SIZE)
        for i, p in enumerate(pages):
            assert block.view[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] == content[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        assert not block.words[40:50].any()
        a.sendall(_packet("pc.ram", [10 * PAGE_SIZE, 11 * PAGE_SIZE, 12 * PAGE_SIZE], qemu, flags=0x04)
                  + _packet("", [], b"", flags=1))
        rx.sync()
        assert reads
        assert block.view[10 * PAGE_SIZE:13 * PAGE_SIZE] == content[:3 * PAGE_SIZE]
        a.close()
        rx.close()


def _stored_frame(content: bytes, blocks: list[int], ends: bool = True, states: int | None = None) -> bytes:
    """A single-segment zstd frame of raw blocks of the sizes ``blocks`` (``content`` in turn), the kind our
    sender makes of incompressible pages; ``states``: the content size its header gives (default: true)."""
    out = [b"\x28\xb5\x2f\xfd\xe0", (len(content) if states is None else states).to_bytes(8, "little")]
    at = 0
    for k, n in enumerate(blocks):
        last = ends and k == len(blocks) - 1
        out += [(n << 3 | last).to_bytes(3, "little"), content[at:at + n]]
        at += n
    return b"".join(out)


_RND = np.random.default_rng(12).integers(0, 256, 64 * PAGE_SIZE, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("case", ["raw then RLE", "stored then QEMU's frame", "frame open across packets",
                                  "a block across runs"])
def test_splicing_stops_where_frames_are_not_stored(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """Splicing stops at the first thing that is not a stored block of a frame that ends in the payload;
    what it spliced is read back from RAM and the whole payload goes through the decoder, so every page
    ends up right however the payload mixes blocks and frames."""
    half = _RND[:32 * PAGE_SIZE] + bytes(32 * PAGE_SIZE)  # zstd stores the first 128 KiB, RLEs the rest
    packets = {  # (pages, payload, content), one packet after another
        "raw then RLE": [(list(range(64)), zstandard.ZstdCompressor().compress(half), half)],
        "stored then QEMU's frame": [([0, 1, 5, 6], _stored_frame(_RND[:2 * PAGE_SIZE], [2 * PAGE_SIZE])
                                      + _zstd_packet(_RND[2 * PAGE_SIZE:4 * PAGE_SIZE]), _RND[:4 * PAGE_SIZE])],
        "frame open across packets": [([7], _stored_frame(_RND[:2 * PAGE_SIZE], [PAGE_SIZE], ends=False),
                                        _RND[:PAGE_SIZE]),
                                       ([9], (PAGE_SIZE << 3 | 1).to_bytes(3, "little") + _RND[PAGE_SIZE:2 * PAGE_SIZE],
                                        _RND[PAGE_SIZE:2 * PAGE_SIZE])],
        "a block across runs": [([1, 3, 4, 8], _stored_frame(_RND[:4 * PAGE_SIZE], [PAGE_SIZE // 2, 3 * PAGE_SIZE,
                                                                                    PAGE_SIZE // 2]),
                                 _RND[:4 * PAGE_SIZE])],
    }[case]
    reads = _decoder_reads(monkeypatch)
    into_file = _splices(monkeypatch)
    with RamBlocks() as blocks:
        block, a, rx = _zstd_receiver(blocks, 64, False)
        want = bytearray(64 * PAGE_SIZE)
        for pages, payload, content in packets:
            a.sendall(_packet("pc.ram", [p * PAGE_SIZE for p in pages], payload, flags=0x04))
            for i, p in enumerate(pages):
                want[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = content[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        a.sendall(_packet("", [], b"", flags=1))
        rx.sync()
        assert bytes(block.view) == bytes(want)
        assert into_file  # something was spliced first
        assert bool(reads) == (case != "a block across runs")
        a.close()
        rx.close()


@pytest.mark.parametrize("case", ["content size", "past the pages"])
def test_a_bad_stored_frame_found_while_splicing(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """A stored frame that disagrees with its header or its pages, after one that spliced fine: the error
    the decoder's checks give, as for any payload (the pages spliced before it stay written)."""
    good = _stored_frame(_RND[:PAGE_SIZE], [PAGE_SIZE])
    bad = {"content size": _stored_frame(_RND[:PAGE_SIZE], [PAGE_SIZE], states=2 * PAGE_SIZE),
           "past the pages": _stored_frame(_RND[:2 * PAGE_SIZE], [2 * PAGE_SIZE])}[case]
    message = {"content size": "zstd stream is corrupt",
               "past the pages": "zstd payload inflated to 12288 bytes, expected 8192"}[case]
    into_file = _splices(monkeypatch)
    with RamBlocks() as blocks:
        _, a, rx = _zstd_receiver(blocks, 16, False)
        a.sendall(_packet("pc.ram", [0, PAGE_SIZE], good + bad, flags=0x04))
        a.close()
        with pytest.raises(MultifdError) as e:
            rx.sync()
        rx.close()
    assert message in e.value.message
    assert into_file


_PAGE_KINDS = {"random": _RND[:PAGE_SIZE], "zero": bytes(PAGE_SIZE), "text": b"vmsd" * (PAGE_SIZE // 4)}


@settings(max_examples=40, deadline=None)
@given(pages=st.lists(st.integers(0, 63), min_size=1, max_size=64, unique=True).map(sorted),
       kinds=st.lists(st.sampled_from(sorted(_PAGE_KINDS)), min_size=64, max_size=64),
       framing=st.sampled_from(["frame per run", "stream", "stored"]),
       cuts=st.lists(st.integers(0, 64 * PAGE_SIZE), max_size=6))
def test_any_zstd_payload_lands_in_its_pages(pages: list[int], kinds: list[str], framing: str,
                                             cuts: list[int]) -> None:
    """Whatever the framing (ours, QEMU's, or one stored frame cut into blocks anywhere) and contents,
    each page of a packet ends up in RAM as sent, and nothing else is touched."""
    content = b"".join(_PAGE_KINDS[kinds[p]][:-1] + bytes([p]) for p in pages)
    if framing == "frame per run":
        payload = _frame_per_run(pages, content)
    elif framing == "stream":
        payload = _zstd_packet(content)
    else:
        ends = sorted({c for c in cuts if 0 < c < len(content)} | {len(content)})
        sizes = [b - a for a, b in itertools.pairwise([0, *ends])]
        sizes = [piece for n in sizes for piece in [128 << 10] * (n >> 17) + [n & ((128 << 10) - 1)] if piece]
        payload = _stored_frame(content, sizes)
    with RamBlocks() as blocks:
        block, a, rx = _zstd_receiver(blocks, 64, False)
        a.sendall(_packet("pc.ram", [p * PAGE_SIZE for p in pages], payload, flags=0x04) + _packet("", [], b"", flags=1))
        rx.sync()
        want = bytearray(64 * PAGE_SIZE)
        for i, p in enumerate(pages):
            want[p * PAGE_SIZE:(p + 1) * PAGE_SIZE] = content[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        assert bytes(block.view) == bytes(want)
        a.close()
        rx.close()


@given(st.one_of(st.lists(st.integers(0, 300), max_size=140),
                 st.builds(lambda a, n: list(range(a, a + n)), st.integers(0, 1 << 40), st.integers(0, 128))))
def test_runs_cover_the_pages_in_order(pages: list[int]) -> None:
    """Packets' pages as (first, count) runs: consecutive pages join a run, anything else starts one."""
    got = runs(pages)
    assert [p for first, n in got for p in range(first, first + n)] == pages
    assert all(a + n != b for (a, n), (b, _) in itertools.pairwise(got))


@pytest.mark.parametrize("prealloc", [False, True], ids=["pwritev", "in place"])
def test_pieces_split_anywhere_land_in_their_runs(prealloc: bool) -> None:
    """Stored blocks need not end on page boundaries: pieces and runs are matched byte by byte."""
    pages = np.random.default_rng(9).integers(0, 256, 3 * PAGE_SIZE, dtype=np.uint8).tobytes()
    data = pages[:5000] + b"gap" + pages[5000:]
    with RamBlocks() as blocks:
        block = blocks.create("pc.ram", 16 * PAGE_SIZE)
        if prealloc:
            block.prealloc()
        store_runs(block, memoryview(data), [(2, 1), (7, 2)], [(0, 5000), (5003, 3 * PAGE_SIZE - 5000)])
        assert block.view[2 * PAGE_SIZE:3 * PAGE_SIZE] == pages[:PAGE_SIZE]
        assert block.view[7 * PAGE_SIZE:9 * PAGE_SIZE] == pages[PAGE_SIZE:]
        assert not block.words[:2].any() and not block.words[3:7].any() and not block.words[9:].any()


def test_a_zstd_bomb_is_refused_before_inflating() -> None:
    """A few hundred bytes of RLE blocks that would inflate to megabytes for one page."""
    frame = b"\x28\xb5\x2f\xfd" + bytes([0x00, 0x58])  # frame header: no content size, a window descriptor
    rle = ((128 << 10) << 3 | 1 << 1).to_bytes(3, "little") + b"\x00"  # 128 KiB of zeros each
    err = _receive_one(MultifdConfig(channels=1, compression="zstd"),
                       _packet("pc.ram", [0], frame + rle * 100, flags=0x04))
    assert "zstd payload of 406 bytes could inflate to 13107200 bytes, for 4096 bytes of pages" in err.message


def test_unknown_block_and_wrong_compression_flag() -> None:
    err = _receive_one(MultifdConfig(channels=1), _packet("nope", [0], bytes(PAGE_SIZE)))
    assert "unknown ramblock 'nope'" in err.message
    z = zlib.compressobj(1)
    data = z.compress(bytes(PAGE_SIZE)) + z.flush(zlib.Z_SYNC_FLUSH)
    err = _receive_one(MultifdConfig(channels=1), _packet("pc.ram", [0], data, flags=0x02))
    assert "compression flag 0x2, expected 0x0 (none)" in err.message


class _Proxy:
    """A proxy for one multifd connection: ``relay`` decides what reaches the destination, then both ends
    are reset."""

    def __init__(self, target_port: int) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target = target_port
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def relay(self, conn: socket.socket, up: socket.socket) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        conn, _ = self.server.accept()
        up = socket.create_connection(("127.0.0.1", self.target))
        self.relay(conn, up)
        for s in (conn, up):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        self.server.close()


def _second_channel_via(mig: Migration, proxy: _Proxy) -> None:
    """Open a two-channel migration's channel 0 directly and channel 1 through ``proxy``."""
    real_open = mig._open_multifd

    def open_via_proxy(c: MultifdConfig) -> None:
        real_open(MultifdConfig(channels=1, peer=c.peer, uuid=c.uuid))
        ch = open_outgoing(f"tcp:127.0.0.1:{proxy.port}")
        ch.write(initial_packet(c.uuid, 1))  # the source introduces each channel as it opens it
        mig._multifd_channels.append(ch)

    mig._open_multifd = open_via_proxy  # type: ignore[method-assign]


class _Killer(_Proxy):
    """Forwards ``limit`` bytes, then resets the connection."""

    def __init__(self, target_port: int, limit: int) -> None:
        self.limit = limit
        super().__init__(target_port)

    def relay(self, conn: socket.socket, up: socket.socket) -> None:
        sent = 0
        while sent < self.limit:
            data = conn.recv(65536)
            if not data:
                break
            up.sendall(data)
            sent += len(data)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_channel_dying_mid_transfer_fails_cleanly(compression: str) -> None:
    """The destination sees channel 1 reset (pages spliced or zstd's stored blocks spliced, mid-packet);
    the source fails naming a channel and keeps running intact."""
    cfg = MultifdConfig(channels=2, peer=peer_profile("7.2"), compression=compression)
    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    with make_machine(ram=32 * MIB) as src, make_machine(ram=32 * MIB) as dst:
        fill(src)
        ram, devs = ram_of(src), devices_of(src)
        rx = Receiver(dst, uri, cfg)
        mig = Migration(src, uri, parameters={"max-bandwidth": 0}, multifd=cfg)
        _second_channel_via(mig, _Killer(port, 2 * MIB))
        info = mig.run()
        rx.join()
        assert info["status"] == "failed", info
        assert "multifd channel" in info["error-desc"] or "connection" in info["error-desc"], info["error-desc"]
        assert src.running
        assert ram_of(src) == ram, "the source's RAM changed"
        assert devices_of(src) == devs
        assert rx.error is not None and "multifd channel 1" in str(rx.error), rx.error


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise ConnectionError("closed")
        buf += got
    return bytes(buf)


class _Corrupter(_Proxy):
    """Forwards ``packets`` packets, then a packet with a bad magic, then stops reading from the source -- a
    destination channel that went wrong.  It hangs up on the source only when the destination hangs up on it,
    as a direct connection would."""

    def __init__(self, target_port: int, packets: int) -> None:
        self.packets = packets
        super().__init__(target_port)

    def relay(self, conn: socket.socket, up: socket.socket) -> None:
        up.sendall(_recv_exact(conn, 64))  # the initial packet
        for _ in range(self.packets):
            head = _recv_exact(conn, HEADER_SIZE)
            size = struct.unpack_from(">I", head, 20)[0]
            up.sendall(head + _recv_exact(conn, size))
        up.sendall(b"\xff" * HEADER_SIZE)
        up.settimeout(60)
        with contextlib.suppress(OSError):
            up.recv(1)  # until the destination shuts the channel down


def test_a_bad_packet_on_a_stalled_channel_fails_both_ends() -> None:
    """A destination channel that fails shuts its connections down, as QEMU's does: the main-channel loader
    and the source are not left waiting for each other."""
    cfg = MultifdConfig(channels=2, peer=peer_profile("10.0"))
    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    with make_machine(ram=64 * MIB) as src, make_machine(ram=64 * MIB) as dst:
        fill(src)
        ram, devs = ram_of(src), devices_of(src)
        rx = Receiver(dst, uri, cfg)
        mig = Migration(src, uri, parameters={"max-bandwidth": 0}, multifd=cfg)
        _second_channel_via(mig, _Corrupter(port, 2))
        done: list[dict[str, Any]] = []
        runner = threading.Thread(target=lambda: done.append(mig.run()), daemon=True)
        runner.start()
        runner.join(30)
        rx.join()
        assert done, "the source is still waiting"
        info = done[0]
        assert info["status"] == "failed", info
        assert "multifd channel" in info["error-desc"], info["error-desc"]  # the destination shut them all
        assert src.running
        assert ram_of(src) == ram, "the source's RAM changed"
        assert devices_of(src) == devs
        assert rx.error is not None and "multifd channel 1" in str(rx.error) and "magic" in str(rx.error), rx.error


@pytest.mark.parametrize(("source", "destination"), [("7.2", "10.0"), ("10.0", "7.2")])
def test_mismatched_layouts_fail_with_a_hint(source: str, destination: str) -> None:
    """QEMU does not negotiate the layout: a wrong --peer-version must fail, naming it, not wait for good."""
    uri = f"tcp:127.0.0.1:{free_port()}"
    with make_machine(ram=32 * MIB) as src, make_machine(ram=32 * MIB) as dst:
        fill(src)
        ram, devs = ram_of(src), devices_of(src)
        rx = Receiver(dst, uri, MultifdConfig(channels=2, peer=peer_profile(destination), sync_stall=1.0))
        info = Migration(src, uri, parameters={"max-bandwidth": 0},
                         multifd=MultifdConfig(channels=2, peer=peer_profile(source))).run()
        rx.join()
        assert info["status"] == "failed", info
        assert src.running and ram_of(src) == ram and devices_of(src) == devs
        assert rx.error is not None and "--peer-version" in str(rx.error), rx.error
        if destination == "10.0":
            assert "waited" in str(rx.error) and "7.2" in str(rx.error), rx.error


def test_xbzrle_and_multifd_are_incompatible() -> None:
    with make_machine(ram=4 * MIB) as m, pytest.raises(ValueError, match="not compatible"):
        Migration(m, "tcp:127.0.0.1:1", capabilities={"xbzrle": True, "multifd": True})


# -- QEMU 7.2 as the peer --------------------------------------------------------------------------------------------
@pytest.fixture
def shm() -> Iterator[Path]:
    d = Path("/dev/shm") / f"vmsd-mfd-{uuidlib.uuid4().hex[:8]}"
    d.mkdir()
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def _ram(path: Path, size: str = "64M") -> list[str]:
    return ["-object", f"memory-backend-file,id=m,size={size},mem-path={path},share=on",
            "-machine", "memory-backend=m"]


def _multifd_on(q: Qemu, channels: int, compression: str) -> None:
    q.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    q.qmp.cmd("migrate-set-parameters", **{"multifd-channels": channels, "multifd-compression": compression})


def _guest_ram(path: Path, size: int) -> None:
    """1 MiB chunks, written before QEMU maps the file: zero, random, compressible (so that compressed
    blocks, not only stored ones, cross the wire), and random pages between zero pages (runs of one
    page, several to a packet)."""
    rng = np.random.default_rng(3)
    text = b"".join(b"page %6d of a guest that compresses well; " % i for i in range(MIB // 40 + 1))[:MIB]
    with open(path, "wb") as f:
        for i in range(size // MIB):
            kind = i % 4
            if kind == 0:
                f.write(bytes(MIB))
            elif kind == 1:
                f.write(rng.bytes(MIB))
            elif kind == 2:
                f.write(text)
            else:
                pages = np.frombuffer(rng.bytes(MIB), dtype=np.uint8).reshape(-1, PAGE_SIZE).copy()
                pages[::2] = 0
                f.write(pages.tobytes())


def _round_trip(start: Any, shm: Path, tmp_path: Path, channels: int, compression: str, version: str) -> None:
    """QEMU -> ``vmsd incoming`` (snapshot) -> ``vmsd outgoing`` -> QEMU, multifd both ways; RAM compared.

    ``start(args, incoming)`` starts the QEMU peer of ``version``; the destination checks our ``--uuid``.
    """
    snap = tmp_path / "snap.mig"
    _guest_ram(shm / "src", 64 * MIB)
    opts = ["--capability", "multifd=on", "--parameter", f"multifd-channels={channels}",
            "--parameter", f"multifd-compression={compression}", "--peer-version", version]
    port = free_port()
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(main(["incoming", f"tcp:127.0.0.1:{port}", "-o", str(snap),
                                                        "--timeout", "30", *opts])))
    t.start()
    wait_listening(port, alive=t.is_alive)
    with start(_ram(shm / "src"), None) as src:
        _multifd_on(src, channels, compression)
        src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 10**10})
        src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        t.join(60)
        src.wait_migration(30)
    assert rc == [0]
    source = (shm / "src").read_bytes()
    vm_uuid = str(uuidlib.uuid4())
    port = free_port()
    with start([*_ram(shm / "dst"), "-uuid", vm_uuid], "defer") as dst:
        _multifd_on(dst, channels, compression)
        dst.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        assert main(["outgoing", str(snap), f"tcp:127.0.0.1:{port}", "--uuid", vm_uuid, *opts]) == 0
        dst.wait_migration(30)
        assert (shm / "dst").read_bytes() == source


@pytest.mark.parametrize(("channels", "compression"), [(2, "none"), (4, "zlib"), (2, "zstd"), (4, "none")])
def test_qemu72_to_vmsd_and_back(shm: Path, tmp_path: Path, channels: int, compression: str) -> None:
    _round_trip(lambda args, incoming: Qemu(args, memory="64", incoming=incoming), shm, tmp_path, channels,
                compression, "7.2")


def test_qemu72_refuses_a_wrong_uuid(shm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snap = tmp_path / "snap.mig"
    with Qemu(_ram(shm / "a", "32M")) as q:
        q.migrate_to_file(snap)
    port = free_port()
    with Qemu([*_ram(shm / "b", "32M"), "-uuid", str(uuidlib.uuid4())], incoming="defer") as dst:
        _multifd_on(dst, 2, "none")
        dst.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        rc = main(["outgoing", str(snap), f"tcp:127.0.0.1:{port}", "--capability", "multifd=on",
                   "--peer-version", "7.2", "--uuid", str(uuidlib.uuid4()), "--timeout", "10"])
        assert rc == 1
        assert "migration failed" in capsys.readouterr().err
        # 7.2 logs the refusal and drops the channel (it neither exits nor marks the migration failed)
        deadline = time.monotonic() + 10
        while "expected uuid" not in dst.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "received uuid" in dst.output() and "expected uuid" in dst.output()


# -- QEMU 10.0 and 11.1 (the newest layout) as the peer ---------------------------------------------------------------
@pytest.mark.parametrize(("channels", "compression"), [(2, "none"), (4, "zstd"), (2, "zlib")])
def test_private_qemu_to_vmsd_and_back(private_peer: Peer, shm: Path, tmp_path: Path,
                                       channels: int, compression: str) -> None:
    _round_trip(lambda args, incoming: private_peer.start(args, incoming, memory="64"), shm, tmp_path, channels,
                compression, private_peer.version)
