"""Scattered writes (numpy-built iovec arrays through writev/pwritev) and the zero-copy page records."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsd.migration import iovec
from vmsd.migration.iovec import Scattered, buffer_address, write_scattered
from vmsd.migration.ram.blocks import PAGE_SIZE, RamBlock
from vmsd.migration.ram.wire import RamEncoder
from vmsd.migration.transport import DescriptorChannel


def _scattered(pieces: list[bytes]) -> Scattered:
    iov = np.array([(buffer_address(p) if p else 0, len(p)) for p in pieces], dtype=np.uint64).reshape(-1, 2)
    return Scattered(iov, tuple(pieces))


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(st.binary(max_size=300), max_size=40), step=st.integers(1, 700), at=st.integers(0, 5000))
def test_short_writes_resume_where_they_stopped(tmp_path_factory: pytest.TempPathFactory, pieces: list[bytes],
                                                step: int, at: int) -> None:
    real = iovec._PWRITEV

    def short(fd: int, p: int, count: int, offset: int) -> int:
        rows = np.ctypeslib.as_array((ctypes.c_uint64 * (2 * count)).from_address(p)).reshape(-1, 2) if count else []
        data = b"".join(ctypes.string_at(int(a), int(n)) for a, n in rows)[:step]
        return os.pwrite(fd, data, offset)

    path = tmp_path_factory.mktemp("iov") / "f"
    iovec._PWRITEV = short
    try:
        with open(path, "w+b") as f:
            write_scattered(f.fileno(), _scattered(pieces), at)
            f.seek(0)
            got = f.read()
    finally:
        iovec._PWRITEV = real
    data = b"".join(pieces)
    assert got == (bytes(at) + data if data else b"")


def test_more_pieces_than_one_call_takes_and_a_non_blocking_socket() -> None:
    """Over IOV_MAX pieces; the reader is slow, so a non-blocking sender sees EAGAIN and waits."""
    rng = np.random.default_rng(5)
    pieces = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in rng.integers(1, 5000, 3000)]
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.setblocking(False)
    received = bytearray()

    def read() -> None:
        while chunk := b.recv(1 << 16):
            received.extend(chunk)

    t = threading.Thread(target=read)
    t.start()
    try:
        write_scattered(a.fileno(), _scattered(pieces))
    finally:
        a.close()
        t.join(10)
        b.close()
    assert bytes(received) == b"".join(pieces)


def test_a_closed_peer_is_an_os_error() -> None:
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(OSError) as info:
        write_scattered(a.fileno(), _scattered([b"x" * 100000]))
    a.close()
    assert info.value.errno in (errno.EPIPE, errno.ECONNRESET)


def test_channel_writes_scattered_records_between_plain_buffers(tmp_path: Path) -> None:
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    ch = DescriptorChannel("test", fd=fd)
    try:
        total = ch.writev([b"head", _scattered([b"one", b"", b"two"]), memoryview(b"mid"), _scattered([b"three"]), b"!"])
    finally:
        ch.close()
    assert path.read_bytes() == b"headonetwomidthree!" and total == 19


@pytest.mark.parametrize("pattern", ["contiguous", "scattered"])
def test_zero_copy_records_equal_the_staged_ones(pattern: str) -> None:
    rng = np.random.default_rng(6)
    with RamBlock.memfd("pc.ram", 64 * PAGE_SIZE) as block:
        block.bytes_[:] = rng.integers(0, 256, block.used_length, dtype=np.uint8)
        block.bytes_[7 * PAGE_SIZE:9 * PAGE_SIZE] = 0  # zero pages stay 9-byte records in both
        pages = np.arange(3, 40) if pattern == "contiguous" else np.array([1, 2, 5, 7, 8, 9, 30, 31, 63])
        staged = RamEncoder()
        direct = RamEncoder(zero_copy=True)
        a = b"".join(bytes(x) for x in staged.encode(block, pages))  # type: ignore[arg-type]
        out = direct.encode(block, pages)
        assert any(isinstance(x, Scattered) for x in out)
        b = b"".join(x.tobytes() if isinstance(x, Scattered) else bytes(x) for x in out)
        assert a == b
        assert staged.counters.transferred == direct.counters.transferred == len(a)
        assert staged.counters.normal == direct.counters.normal
