"""Passing descriptors over unix-socket channels (SCM_RIGHTS), as QEMU's cpr-transfer sends RAM memfds."""

from __future__ import annotations

import errno
import os
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fds import open_fds
from test_transport import Worker
from vmsd.migration.transport import (
    Channel,
    SocketChannel,
    TransportError,
    UnixChannel,
    listen,
    memory_pair,
    open_incoming,
    open_outgoing,
    socket_channel,
)
from vmsd.runtime.io import Reader

FD_BYTE = b" "  # what QEMU's qemu_file_put_fd sends each descriptor with


pytestmark = pytest.mark.usefixtures("no_leaked_fds")


def memfd(content: bytes) -> int:
    fd = os.memfd_create("vmsd-test", os.MFD_CLOEXEC)
    os.write(fd, content)
    return fd


def pair() -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    return socket_channel("pair:a", a), socket_channel("pair:b", b)


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


# ------------------------------------------------------------------------- passing


def test_memfd_over_a_socketpair_is_the_same_file() -> None:
    src, dst = pair()
    with src, dst:
        assert isinstance(src, UnixChannel) and src.passes_fds
        fd = memfd(b"guest RAM")
        src.send_fds(FD_BYTE, [fd])
        data, fds = dst.recv_fds(1, 1)
        assert data == FD_BYTE and len(fds) == 1
        got = fds[0]
        try:
            assert got != fd and same_file(fd, got)
            assert not os.get_inheritable(got)  # MSG_CMSG_CLOEXEC
            assert os.pread(got, 9, 0) == b"guest RAM"
            os.pwrite(got, b"written by the new process", 100)  # and back through the sender's descriptor
            assert os.pread(fd, 26, 100) == b"written by the new process"
        finally:
            os.close(got)
            os.close(fd)


def _exchange(sender: Channel, receiver: Channel, count: int) -> None:
    """Labels as plain bytes, each followed by a memfd holding it; the receiver matches every pair."""
    fds = [memfd(b"memfd %03d" % i) for i in range(count)]

    def send() -> None:
        for i, fd in enumerate(fds):
            sender.write(b"label %03d" % i)
            sender.send_fds(FD_BYTE, [fd])
        sender.write(b"end")

    worker = Worker(send)
    try:
        for i in range(count):
            assert receiver.read_exact(9) == b"label %03d" % i
            data, got = receiver.recv_fds(1, 1)
            assert data == FD_BYTE and len(got) == 1
            assert os.pread(got[0], 9, 0) == b"memfd %03d" % i
            os.close(got[0])
        assert receiver.read_exact(3) == b"end"
        worker.join_result()
    finally:
        for fd in fds:
            os.close(fd)


def test_unix_listen_and_open_outgoing_pass_both_ways(tmp_path: Path) -> None:
    with listen(f"unix:{tmp_path}/cpr.sock") as listener:
        outgoing = open_outgoing(listener.uri, timeout=5)
        incoming = listener.accept(timeout=5)
    with outgoing, incoming:
        assert outgoing.passes_fds and incoming.passes_fds
        _exchange(outgoing, incoming, 20)
        _exchange(incoming, outgoing, 3)


def test_open_incoming_receives(tmp_path: Path) -> None:
    uri = f"unix:{tmp_path}/in.sock"
    receiver = Worker(lambda: open_incoming(uri, timeout=10))
    deadline = time.monotonic() + 10
    while True:  # the receiver listens once its thread runs
        try:
            sender = open_outgoing(uri, timeout=5)
            break
        except TransportError:
            assert time.monotonic() < deadline and receiver.is_alive()
            time.sleep(0.01)
    with sender, receiver.join_result() as incoming:
        _exchange(sender, incoming, 5)


def test_fd_uri_naming_a_unix_socket_passes_descriptors() -> None:
    a, b = socket.socketpair()
    with open_outgoing(f"fd:{a.detach()}") as src, open_incoming(f"fd:{b.detach()}") as dst:
        assert src.passes_fds and dst.passes_fds
        _exchange(src, dst, 2)


def test_descriptors_stay_in_order_with_a_reader_that_reads_ahead() -> None:
    """A Reader fills its buffer with whatever the channel has, past descriptors' bytes: the channel keeps
    those descriptors, in order, until the consumer reaches their bytes and takes them."""
    src, dst = pair()
    fds = [memfd(b"memfd %d" % i) for i in range(3)]
    with src, dst:
        src.write(b"QEVM")
        for i, fd in enumerate(fds):
            src.send_fds(FD_BYTE, [fd])
            src.write(b"after %d" % i)
        r = Reader(source=dst)
        assert r.read(4) == b"QEVM"
        for i in range(3):
            assert r.u8() == FD_BYTE[0]
            (got,) = dst.take_fds(1)
            assert os.pread(got, 7, 0) == b"memfd %d" % i
            os.close(got)
            assert r.read(7) == b"after %d" % i
        with pytest.raises(TransportError, match=r"1 descriptor\(s\) wanted, 0 received"):
            dst.take_fds(1)
    for fd in fds:
        os.close(fd)


def test_several_descriptors_and_bytes_in_one_message() -> None:
    src, dst = pair()
    fds = [memfd(b"%d" % i) for i in range(4)]
    with src, dst:
        src.send_fds(b"four", fds)
        data, got = dst.recv_fds(4, 8)
        assert data == b"four" and [os.pread(fd, 1, 0) for fd in got] == [b"0", b"1", b"2", b"3"]
        assert all(same_file(a, b) for a, b in zip(fds, got, strict=True))
        for fd in fds + got:
            os.close(fd)


def test_peek_leaves_descriptors_where_they_are() -> None:
    src, dst = pair()
    fd = memfd(b"x")
    with src, dst:
        src.send_fds(FD_BYTE, [fd])
        before = open_fds()
        assert dst.peek(1, timeout=5) == FD_BYTE
        assert open_fds() == before  # peeking received no copy of the descriptor
        data, (got,) = dst.recv_fds(1, 1)
        assert data == FD_BYTE and same_file(fd, got)
        os.close(got)
    os.close(fd)


def test_recv_fds_refuses_while_read_ahead_descriptors_wait() -> None:
    src, dst = pair()
    fd = memfd(b"x")
    with src, dst:
        src.send_fds(FD_BYTE, [fd])
        src.send_fds(FD_BYTE, [fd])
        assert dst.read_exact(1) == FD_BYTE  # a plain read: the descriptor waits in the channel
        with pytest.raises(TransportError, match="take them with take_fds") as info:
            dst.recv_fds(1, 1)
        assert info.value.errno == errno.EPROTO
        (first,) = dst.take_fds(1)
        data, (second,) = dst.recv_fds(1, 1)
        assert data == FD_BYTE and same_file(first, fd) and same_file(second, fd)
        os.close(first)
        os.close(second)
    os.close(fd)


def test_descriptors_nobody_took_are_closed_with_the_channel() -> None:
    src, dst = pair()
    fds = [memfd(b"x") for _ in range(3)]
    src.send_fds(FD_BYTE, fds)
    before = open_fds()
    assert dst.read_exact(1) == FD_BYTE
    assert len(open_fds() - before) == 3  # received, kept for take_fds
    dst.close()
    src.close()
    for fd in fds:
        os.close(fd)


# --------------------------------------------------------------------- failures


def test_more_descriptors_than_asked_for_are_closed() -> None:
    src, dst = pair()
    fds = [memfd(b"x") for _ in range(3)]
    with src, dst:
        src.send_fds(FD_BYTE, fds)
        before = open_fds()
        with pytest.raises(TransportError, match=r"^pair:b: 3 descriptors came with 1 bytes, at most 2 expected"):
            dst.recv_fds(1, 2)
        assert open_fds() == before
    for fd in fds:
        os.close(fd)


def test_truncated_ancillary_data_closes_what_arrived() -> None:
    """With room in the descriptor table for one of three, the kernel installs one and flags MSG_CTRUNC."""
    src, dst = pair()
    fds = [memfd(b"x") for _ in range(3)]
    src.send_fds(FD_BYTE, fds)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = open_fds()
    free = [n for n in range(max(open_now) + 3) if n not in open_now]
    resource.setrlimit(resource.RLIMIT_NOFILE, (free[1], hard))  # only free[0] is below the limit
    try:
        with pytest.raises(TransportError, match=r"^pair:b: descriptors were lost .*closed the 1 that arrived"):
            dst.recv_fds(1, 3)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert open_fds() == open_now
    dst.close()
    src.close()
    for fd in fds:
        os.close(fd)


def test_bad_arguments() -> None:
    src, dst = pair()
    with src, dst:
        with pytest.raises(ValueError, match="at least one byte"):
            src.send_fds(b"", [0])
        with pytest.raises(ValueError, match="1 to 253 descriptors"):
            src.send_fds(FD_BYTE, [])
        with pytest.raises(TransportError, match="sending descriptors failed: Bad file descriptor"):
            src.send_fds(FD_BYTE, [_unused_fd()])
    with pytest.raises(TransportError, match="closed"):
        src.send_fds(FD_BYTE, [0])


def _unused_fd() -> int:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    return r


@pytest.fixture
def refusing(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Channel]:
    kind = request.param
    if kind == "tcp":
        with listen("tcp:127.0.0.1:0") as listener:
            ch = open_outgoing(listener.uri)
            peer = listener.accept(5)
        with ch, peer:
            yield ch
    elif kind == "file-out":
        ch = open_outgoing(f"file:{tmp_path}/out.mig")
        yield ch
        ch.abort()
    elif kind == "file-in":
        (tmp_path / "in.mig").write_bytes(b"QEVM")
        with open_incoming(f"file:{tmp_path}/in.mig") as ch:
            yield ch
    elif kind == "exec":
        ch = open_outgoing("exec:cat > /dev/null")
        yield ch
        ch.abort()
    elif kind == "fd-pipe":
        r, w = os.pipe()
        os.close(w)
        with open_incoming(f"fd:{r}") as ch:
            yield ch
    else:
        a, b = memory_pair()
        with a, b:
            yield a


@pytest.mark.parametrize("refusing", ["tcp", "file-out", "file-in", "exec", "fd-pipe", "memory"], indirect=True)
def test_channels_without_a_unix_socket_refuse(refusing: Channel) -> None:
    assert not refusing.passes_fds
    fd = memfd(b"x")
    try:
        for call in (lambda: refusing.send_fds(FD_BYTE, [fd]), lambda: refusing.recv_fds(1, 1),
                     lambda: refusing.take_fds(1)):
            with pytest.raises(TransportError, match="cannot pass file descriptors: only a unix socket can") as info:
                call()
            assert str(info.value).startswith(f"{refusing.name}: ")
            assert info.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)


def test_socket_channel_picks_the_channel_for_its_socket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with socket_channel("unix pair", a) as ch:
        assert type(ch) is UnixChannel and ch.name == "unix pair" and ch.passes_fds
    b.close()
    with socket_channel("tcp", socket.socket()) as ch:
        assert type(ch) is SocketChannel and not ch.passes_fds
