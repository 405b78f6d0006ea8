"""The channel protocol without a descriptor: MemoryChannel, and the engine running over it.

A TLS channel has no descriptor whose bytes are the stream's either; what
works here over memory is what a TLS channel gets without touching the engine.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import vmsd.migration.precopy as precopy
from test_migration import devices_of, fill, make_machine, ram_of
from test_transport import PAYLOAD, Worker, recv_all, send_all
from vmsd.migration.incoming import Incoming, IncomingResult
from vmsd.migration.iovec import Scattered, buffer_address
from vmsd.migration.multifd import MultifdConfig, accept_all
from vmsd.migration.precopy import Migration
from vmsd.migration.ram.blocks import PAGE_SIZE, RamBlocks
from vmsd.migration.ram.wire import RamEncoder, RamLoader
from vmsd.migration.transport import Channel, MemoryChannel, TransportError, memory_pair
from vmsd.runtime.io import Reader, Writer


def _scattered(pieces: list[bytes]) -> Scattered:
    keep = [bytearray(p) for p in pieces]
    iov = np.array([(buffer_address(k) if k else 0, len(k)) for k in keep], dtype=np.uint64).reshape(-1, 2)
    return Scattered(iov, tuple(keep))


def test_roundtrip_both_ways() -> None:
    a, b = memory_pair(capacity=64 << 10)  # far less than the payload: writers wait for the reader
    sender = Worker(lambda: send_all(a))
    assert recv_all(b) == PAYLOAD
    sender.join_result()
    a, b = memory_pair()
    sender = Worker(lambda: send_all(b, b"back"))
    assert recv_all(a) == b"back"
    sender.join_result()


def test_what_a_channel_without_a_descriptor_says() -> None:
    a, b = memory_pair("mem")
    with a, b:
        assert a.fileno() == -1 and not a.passes_fds
        assert (a.name, b.name) == ("mem[0]", "mem[1]") and repr(a) == "<MemoryChannel mem[0]>"
    assert repr(a) == "<MemoryChannel mem[0] closed>"


def test_writev_copies_scattered_pages_in_order() -> None:
    a, b = memory_pair()
    with a, b:
        n = a.writev([b"head", _scattered([b"one", b"", b"two"]), memoryview(b"mid"), _scattered([b"three"]), b"!"])
        assert n == 19 and b.read_exact(19) == b"headonetwomidthree!"


def test_peek_looks_ahead_and_times_out() -> None:
    a, b = memory_pair()
    with a, b:
        with pytest.raises(TransportError, match=r"^memory\[1\]: nothing received within 0.01s") as info:
            b.peek(4, timeout=0.01)
        assert info.value.errno == errno.ETIMEDOUT
        a.write(b"QEVM....")
        assert b.peek(4, timeout=5) == b"QEVM"
        assert b.read_exact(8) == b"QEVM...."
        a.close()
        assert b.peek(4, timeout=5) == b""  # end of stream


def test_reader_and_writer_over_memory() -> None:
    a, b = memory_pair()
    w = Writer(a)
    w.u32(0x5145564D)
    w.write(PAYLOAD[:100_000])
    worker = Worker(lambda: (w.flush(), a.close()))
    r = Reader(source=b)
    assert r.u32() == 0x5145564D and r.read(100_000) == PAYLOAD[:100_000] and r.at_end()
    worker.join_result()
    b.close()


def test_shutdown_wakes_a_blocked_reader_and_writer() -> None:
    a, b = memory_pair(capacity=10)
    reader = Worker(lambda: b.readinto(bytearray(10)))
    b.shutdown()  # before or after the reader blocks: it sees the end of the stream
    assert reader.join_result() == 0

    def write() -> None:
        a.write(b"x" * 100)

    writer = Worker(write)
    a.shutdown()
    with pytest.raises(TransportError, match=r"^memory\[0\]: write failed") as info:
        writer.join_result()
    assert info.value.errno == errno.EPIPE
    a.close()
    b.close()


def test_shutdown_read_keeps_writing() -> None:
    a, b = memory_pair()
    with a, b:
        b.shutdown_read()
        assert b.readinto(bytearray(4)) == 0
        with pytest.raises(TransportError, match="the peer stopped reading"):
            a.write(b"lost")
        b.write(b"answer")  # a return-path message still goes out
        assert a.read_exact(6) == b"answer"


def test_closing_ends_the_peers_stream_after_the_rest() -> None:
    a, b = memory_pair()
    a.write(b"last words")
    a.close()
    with pytest.raises(TransportError, match="closed"):
        a.write(b"more")
    assert b.read_exact(10) == b"last words"
    assert b.readinto(bytearray(4)) == 0
    with pytest.raises(TransportError, match=r"stream ended after 0 of 1 bytes"):
        b.read_exact(1)
    with pytest.raises(TransportError, match="the peer stopped reading"):
        b.write(b"to nobody")
    b.close()


# ---------------------------------------------------------------- the engine over memory


@pytest.fixture
def memory_transport(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[MemoryChannel]]:
    """The precopy source opens memory channels (the main one, then multifd ones) instead of connecting;
    the list holds the destination's ends in that order."""
    pairs = [memory_pair(f"memory#{i}") for i in range(3)]
    ours = iter([a for a, _ in pairs])

    def open_outgoing(uri: str, timeout: float = 30.0, idle_timeout: float | None = None, tls: None = None,
                      tls_hostname: None = None) -> Channel:
        return next(ours)  # a memory channel has no idle limit: its peer is this process

    monkeypatch.setattr(precopy, "open_outgoing", open_outgoing)
    yield [b for _, b in pairs]
    for a, b in pairs:
        a.abort()
        b.abort()


def _incoming_in_a_thread(load: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = load()
        except BaseException as e:  # the test inspects it
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_precopy_and_incoming_over_memory(memory_transport: list[MemoryChannel]) -> None:
    # Without the return path: with it, the source waits silently at the end, and the destination's RAM
    # receiver thread may be blocked reading then (see test_loader_stops_its_receiver_on_a_silent_channel).
    with make_machine() as src, make_machine() as dst:
        fill(src)
        t, box = _incoming_in_a_thread(lambda: Incoming(dst).load(memory_transport[0]))
        info = Migration(src, "tcp:memory:1", parameters={"max-bandwidth": 0}).run()
        t.join(30)
        assert info["status"] == "completed", info
        assert "error" not in box and isinstance(box["result"], IncomingResult)
        assert ram_of(dst) == ram_of(src) and devices_of(dst) == devices_of(src)


def _multifd(memory_transport: list[MemoryChannel], compression: str) -> None:
    cfg = MultifdConfig(channels=2, compression=compression)
    with make_machine() as src, make_machine() as dst:
        fill(src)

        def load() -> IncomingResult:
            ends = iter(memory_transport)
            main, channels = accept_all(lambda: next(ends), cfg, 10)
            return Incoming(dst, multifd=cfg).load(main, channels)

        t, box = _incoming_in_a_thread(load)
        info = Migration(src, "tcp:memory:1", parameters={"max-bandwidth": 0}, multifd=cfg).run()
        t.join(30)
        assert info["status"] == "completed", info
        assert "error" not in box, box
        assert ram_of(dst) == ram_of(src) and devices_of(dst) == devices_of(src)


def test_multifd_over_memory_zlib(memory_transport: list[MemoryChannel]) -> None:
    _multifd(memory_transport, "zlib")


def test_multifd_over_memory_uncompressed(memory_transport: list[MemoryChannel]) -> None:
    _multifd(memory_transport, "none")


def test_loader_stops_its_receiver_on_a_silent_channel() -> None:
    """The peer sends a RAM section and then waits (for a return-path answer): the section must load."""
    with RamBlocks() as src, RamBlocks() as dst:
        block = src.create("pc.ram", 1024 * PAGE_SIZE)
        block.bytes_[:20 * PAGE_SIZE] = 3  # normal pages, then zero pages: long enough for the receiver thread
        enc = RamEncoder()
        wire = enc.block_list(src) + enc.eos() + b"".join(bytes(b) for b in enc.encode(block, np.arange(40))) \
            + enc.eos()
        a, b = memory_pair(capacity=len(wire))
        a.write(wire)
        loader = RamLoader(dst)
        r = Reader(source=b)
        t, box = _incoming_in_a_thread(lambda: (loader.load_section(r), loader.load_section(r)))
        t.join(5)
        stuck = t.is_alive()
        a.close()  # let it go either way
        t.join(10)
        b.close()
        assert not stuck, "the loader waited for input it did not need"
        assert "error" not in box and bytes(dst["pc.ram"].view) == bytes(block.view)
