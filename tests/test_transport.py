"""Migration transports: every scheme in both directions, failures, and real QEMU 7.2 peers."""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from listening import free_port
from vmsd.migration.stream import read_stream
from vmsd.migration.transport import (
    Channel,
    ExecURI,
    FdURI,
    FileURI,
    InvalidURI,
    TcpURI,
    TransportError,
    UnixURI,
    listen,
    open_incoming,
    open_outgoing,
    parse_uri,
    register_fd,
    socket_channel,
    unregister_fd,
)
from vmsd.qemu.v7_2 import spec_set
from vmsd.runtime.io import Reader, Writer
from vmsd.testing.qmp import Qemu, QMPError, save_stream

PAYLOAD = os.urandom(3 << 20) + bytes(1 << 20)  # 4 MiB, random then zeros


pytestmark = pytest.mark.usefixtures("no_leaked_fds")


class Worker(threading.Thread):
    """Runs ``fn`` in a thread and re-raises its exception on ``join_result``."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc

    def join_result(self, timeout: float = 30.0) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "worker hung"
        if self.error is not None:
            raise self.error
        return self.result


def send_all(ch: Channel, data: bytes = PAYLOAD) -> None:
    """Send with a mix of write and writev, then close."""
    with ch:
        view = memoryview(data)
        head = min(1000, len(view))
        half = max(head, len(view) // 2)
        ch.write(view[:head])
        pieces = [view[i:min(i + 4096, half)] for i in range(head, half, 4096)]
        assert ch.writev(pieces) == half - head
        ch.write(view[half:])


def recv_all(ch: Channel) -> bytes:
    out = bytearray()
    buf = memoryview(bytearray(1 << 16))
    with ch:
        while n := ch.readinto(buf):
            out += buf[:n]
    return bytes(out)


def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# ----------------------------------------------------------------- URI parsing


def test_parse_uri() -> None:
    assert parse_uri("file:/tmp/x") == FileURI("/tmp/x")
    assert parse_uri("file:/tmp/a,b,offset=0x1000") == FileURI("/tmp/a,b", 4096)
    assert parse_uri("file:/tmp/x,offset=2M") == FileURI("/tmp/x", 2 << 20)
    assert parse_uri("tcp:127.0.0.1:4444") == TcpURI("127.0.0.1", 4444)
    assert parse_uri("tcp:[::1]:4444") == TcpURI("::1", 4444)
    assert parse_uri("tcp::4444") == TcpURI("", 4444)
    assert str(TcpURI("::1", 5)) == "tcp:[::1]:5"
    assert parse_uri("unix:/tmp/s") == UnixURI("/tmp/s")
    assert parse_uri("fd:7") == FdURI(7)
    assert parse_uri("fd:migfd") == FdURI(None, "migfd")
    assert parse_uri("exec:cat > /x") == ExecURI("cat > /x")


@pytest.mark.parametrize("uri", [
    "", "nothing", "http://x", "tcp:host", "tcp:::1:44", "tcp:h:port", "tcp:h:70000", "tcp:[::1]44",
    "file:", "file:/x,offset=lots", "unix:", "fd:", "fd:1abc", "exec:", "exec:  ",
])
def test_bad_uri(uri: str) -> None:
    with pytest.raises(InvalidURI) as info:
        parse_uri(uri)
    assert isinstance(info.value, ValueError)
    assert "accepted: file:" in str(info.value) and "exec:COMMAND" in str(info.value)
    with pytest.raises(ValueError):
        open_outgoing(uri)


# ------------------------------------------------------------ sockets


def _socket_roundtrip(uri: str) -> None:
    with listen(uri) as listener:
        sender = Worker(lambda: send_all(open_outgoing(listener.uri, timeout=5)))
        got = recv_all(listener.accept(timeout=10))
    sender.join_result()
    assert got == PAYLOAD


def test_tcp_ipv4_both_directions() -> None:
    _socket_roundtrip("tcp:127.0.0.1:0")


def test_tcp_ipv6() -> None:
    if not has_ipv6_loopback():
        pytest.skip("no ::1 on this machine")
    _socket_roundtrip("tcp:[::1]:0")


def test_unix_both_directions(tmp_path: Path) -> None:
    path = tmp_path / "mig.sock"
    _socket_roundtrip(f"unix:{path}")
    assert not path.exists()  # the listener removes its socket file


def test_open_incoming_accepts_one_and_closes_listener(tmp_path: Path) -> None:
    path = tmp_path / "in.sock"
    uri = f"unix:{path}"
    receiver = Worker(lambda: recv_all(open_incoming(uri, timeout=10)))
    deadline = time.monotonic() + 10
    while True:
        try:
            ch = open_outgoing(uri, timeout=5)
            break
        except TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    send_all(ch)
    assert receiver.join_result() == PAYLOAD
    assert not path.exists()
    with pytest.raises(TransportError):
        open_outgoing(uri, timeout=1)


def test_listener_accepts_several_connections() -> None:
    with listen("tcp:127.0.0.1:0") as listener:
        def sender(i: int) -> Callable[[], None]:
            return lambda: send_all(open_outgoing(listener.uri), bytes([i]) * 100_000)
        senders = [Worker(sender(i)) for i in range(3)]
        got = sorted(recv_all(listener.accept(5)) for _ in senders)
    for s in senders:
        s.join_result()
    assert got == sorted(bytes([i]) * 100_000 for i in range(3))


def test_tcp_listen_any_host() -> None:
    with listen("tcp::0") as listener:
        port = parse_uri(listener.uri)
        assert isinstance(port, TcpURI) and port.port > 0
        sender = Worker(lambda: send_all(open_outgoing(f"tcp:127.0.0.1:{port.port}"), b"hello"))
        assert recv_all(listener.accept(5)) == b"hello"
    sender.join_result()


def test_accept_timeout() -> None:
    with listen("tcp:127.0.0.1:0") as listener:
        start = time.monotonic()
        with pytest.raises(TransportError, match="no connection within"):
            listener.accept(timeout=0.2)
        assert time.monotonic() - start < 5
    with pytest.raises(TransportError, match=r"^tcp:127\.0\.0\.1:\d+: no connection within 0\.2s"):
        open_incoming("tcp:127.0.0.1:0", timeout=0.2)


def test_connect_timeout() -> None:
    # A listener whose accept queue is full drops further SYNs, so connect hangs.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        port = srv.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                c = socket.socket()
                fillers.append(c)
                c.setblocking(False)
                try:
                    c.connect(("127.0.0.1", port))
                except BlockingIOError:
                    pass
            time.sleep(0.1)
            start = time.monotonic()
            with pytest.raises(TransportError, match=r"no connection within 0\.5s") as info:
                open_outgoing(f"tcp:127.0.0.1:{port}", timeout=0.5)
            assert info.value.errno == errno.ETIMEDOUT
            assert time.monotonic() - start < 5
        finally:
            for c in fillers:
                c.close()


def test_connect_refused(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransportError, match=f"tcp:127.0.0.1:{port}: cannot connect") as info:
        open_outgoing(f"tcp:127.0.0.1:{port}", timeout=2)
    assert info.value.errno == errno.ECONNREFUSED
    with pytest.raises(TransportError, match="cannot connect"):
        open_outgoing(f"unix:{tmp_path}/absent.sock", timeout=2)


def test_peer_closes_while_we_write() -> None:
    with listen("tcp:127.0.0.1:0") as listener:
        def reader() -> None:
            with listener.accept(5) as ch:
                ch.read_exact(1000)
        peer = Worker(reader)
        with open_outgoing(listener.uri) as ch, pytest.raises(TransportError, match="write failed"):
            for _ in range(200):
                ch.write(PAYLOAD)
        peer.join_result()


def test_peer_closes_while_we_read() -> None:
    with listen("tcp:127.0.0.1:0") as listener:
        peer = Worker(lambda: send_all(open_outgoing(listener.uri), b"x" * 100))
        with listener.accept(5) as ch, pytest.raises(TransportError, match="ended after 100 of 1000 bytes"):
            ch.read_exact(1000)
        peer.join_result()


def test_reader_and_writer_over_a_channel() -> None:
    with listen("tcp:127.0.0.1:0") as listener:
        def produce() -> None:
            with open_outgoing(listener.uri) as ch:
                w = Writer(ch)
                w.u32(0x5145564D)
                w.u64(7)
                w.write(PAYLOAD)
                w.flush()
        peer = Worker(produce)
        with listener.accept(5) as ch:
            r = Reader(source=ch)
            assert r.u32() == 0x5145564D
            assert r.u64() == 7
            assert r.read(len(PAYLOAD)) == PAYLOAD
            assert r.at_end()
        peer.join_result()


def test_closed_channel_refuses_io() -> None:
    a, b = socket.socketpair()
    b.close()
    ch = socket_channel("test", a)
    ch.close()
    ch.close()
    with pytest.raises(TransportError, match="closed"):
        ch.write(b"x")


# ------------------------------------------------------------------- file:


def test_file_both_directions(tmp_path: Path) -> None:
    path = tmp_path / "state.mig"
    ch = open_outgoing(f"file:{path}")
    ch.write(PAYLOAD[:1000])
    [partial] = tmp_path.iterdir()  # a temporary name beside it until complete
    assert partial.name.startswith(".state.mig.") and not path.exists()
    assert stat.S_IMODE(partial.stat().st_mode) == 0o600  # it holds guest RAM
    ch.writev([memoryview(PAYLOAD)[1000:5000], PAYLOAD[5000:]])
    ch.close()
    assert path.read_bytes() == PAYLOAD and os.listdir(tmp_path) == ["state.mig"]
    assert recv_all(open_incoming(f"file:{path}")) == PAYLOAD


def test_file_replaces_only_on_success(tmp_path: Path) -> None:
    path = tmp_path / "state.mig"
    path.write_bytes(b"old complete stream")
    with pytest.raises(RuntimeError), open_outgoing(f"file:{path}") as ch:
        ch.write(PAYLOAD)
        raise RuntimeError("producer failed")
    assert path.read_bytes() == b"old complete stream"
    assert os.listdir(tmp_path) == ["state.mig"]
    ch = open_outgoing(f"file:{path}")
    ch.write(b"abc")
    ch.abort()
    assert path.read_bytes() == b"old complete stream"
    assert os.listdir(tmp_path) == ["state.mig"]


def test_file_offset(tmp_path: Path) -> None:
    path = tmp_path / "with-header.img"
    header = b"HDR!" * 1024
    path.write_bytes(header + b"stale data that gets replaced")
    with open_outgoing(f"file:{path},offset=4K") as ch:
        ch.write(PAYLOAD)
    assert path.read_bytes() == header + PAYLOAD
    assert recv_all(open_incoming(f"file:{path},offset=4096")) == PAYLOAD
    fresh = tmp_path / "fresh.img"
    with open_outgoing(f"file:{fresh},offset=100") as ch:
        ch.write(b"payload")
    assert fresh.read_bytes() == bytes(100) + b"payload"


def test_file_missing_and_unwritable(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="cannot open") as info:
        open_incoming(f"file:{tmp_path}/absent")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(TransportError, match="cannot create"):
        open_outgoing(f"file:{tmp_path}/no/such/dir/x")


def test_file_dev_full_is_enospc() -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open_outgoing("file:/dev/full") as ch, pytest.raises(TransportError, match="No space left") as info:
        ch.write(PAYLOAD)
    assert info.value.errno == errno.ENOSPC
    assert "file:/dev/full" in str(info.value)
    assert not [n for n in os.listdir("/dev") if n.startswith(".full.")]


@pytest.mark.parametrize("call", ["write", "writev"])
def test_file_enospc_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str) -> None:
    path = tmp_path / "big.mig"
    real = getattr(os, call)
    calls = [0]

    def full(fd: int, data: Any) -> int:
        calls[0] += 1
        if calls[0] > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        result: int = real(fd, data)
        return result

    ch = open_outgoing(f"file:{path}")
    monkeypatch.setattr(os, call, full)
    with pytest.raises(TransportError) as info:
        for _ in range(10):
            if call == "write":
                ch.write(PAYLOAD[:65536])
            else:
                ch.writev([PAYLOAD[:65536], PAYLOAD[:10]])
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert str(info.value).startswith(f"file:{path}: write failed: No space left")
    assert os.listdir(tmp_path) == []
    ch.close()  # already discarded; closing is harmless
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- fd:


def test_fd_pipe_both_directions() -> None:
    r, w = os.pipe()
    sender = Worker(lambda: send_all(open_outgoing(f"fd:{w}")))
    assert recv_all(open_incoming(f"fd:{r}")) == PAYLOAD
    sender.join_result()


def test_fd_registered_names() -> None:
    r, w = os.pipe()
    register_fd("mig-out", w)
    register_fd("mig-in", r)
    sender = Worker(lambda: send_all(open_outgoing("fd:mig-out")))
    assert recv_all(open_incoming("fd:mig-in")) == PAYLOAD
    sender.join_result()
    with pytest.raises(TransportError, match="no descriptor registered as 'mig-in'"):
        open_incoming("fd:mig-in")  # opening consumed the name
    r, w = os.pipe()
    register_fd("spare", r)
    register_fd("spare", w)  # replacing closes the old descriptor
    unregister_fd("spare")
    with pytest.raises(KeyError):
        unregister_fd("spare")
    with pytest.raises(ValueError):
        register_fd("1st", 0)


def test_fd_socket_uses_socket_io() -> None:
    a, b = socket.socketpair()
    sender = Worker(lambda: send_all(open_outgoing(f"fd:{a.detach()}")))
    assert recv_all(open_incoming(f"fd:{b.detach()}")) == PAYLOAD
    sender.join_result()


def test_fd_bad_descriptor() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(TransportError, match="bad descriptor"):
        open_incoming(f"fd:{r}")


# -------------------------------------------------------------------- exec:


def test_exec_both_directions(tmp_path: Path) -> None:
    path = tmp_path / "via-cat"
    ch = open_outgoing(f"exec:cat > {path}")
    send_all(ch)
    assert path.read_bytes() == PAYLOAD
    assert ch._proc.returncode == 0  # type: ignore[attr-defined]
    ch = open_incoming(f"exec:cat {path}")
    assert recv_all(ch) == PAYLOAD
    assert ch._proc.returncode == 0  # type: ignore[attr-defined]


def test_exec_pipeline_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "compressed.gz"
    send_all(open_outgoing(f"exec:gzip -1 > {path}"))
    assert recv_all(open_incoming(f"exec:gzip -dc {path}")) == PAYLOAD


def test_exec_command_not_found() -> None:
    ch = open_outgoing("exec:no-such-command-vmsd-xyz")
    with pytest.raises(TransportError) as info:
        try:
            for _ in range(100):
                ch.write(PAYLOAD)
        finally:
            ch.close()
    assert "status 127" in str(info.value) and "not found" in str(info.value)
    assert ch._proc.returncode is not None  # type: ignore[attr-defined]
    ch = open_incoming("exec:no-such-command-vmsd-xyz")
    with pytest.raises(TransportError, match=r"status 127.*not found"):
        recv_all(ch)
    assert ch._proc.returncode is not None  # type: ignore[attr-defined]


def test_exec_early_exit_is_epipe() -> None:
    ch = open_outgoing("exec:head -c 10 > /dev/null; echo gave up >&2")
    with pytest.raises(TransportError, match="gave up") as info, ch:
        for _ in range(100):
            ch.write(PAYLOAD)
    assert info.value.errno == errno.EPIPE
    assert ch._proc.returncode is not None  # type: ignore[attr-defined]


def test_exec_nonzero_exit() -> None:
    ch = open_outgoing("exec:cat > /dev/null; echo disk on fire >&2; exit 3")
    ch.write(PAYLOAD)
    with pytest.raises(TransportError, match="status 3: disk on fire"):
        ch.close()
    ch = open_incoming("exec:printf partial; echo truncated source >&2; exit 4")
    with pytest.raises(TransportError, match="status 4: truncated source"):
        recv_all(ch)
    ch = open_incoming("exec:printf abcdef; kill -9 $$")
    with pytest.raises(TransportError, match="killed by SIGKILL"):
        recv_all(ch)


def test_exec_reader_stops_early_reaps_child() -> None:
    ch = open_incoming("exec:yes")
    assert ch.read_exact(4) == b"y\ny\n"
    ch.close()
    assert ch._proc.returncode is not None  # type: ignore[attr-defined]


def test_exec_abort_kills_child() -> None:
    ch = open_outgoing("exec:sleep 30")
    start = time.monotonic()
    ch.abort()
    assert time.monotonic() - start < 5
    assert ch._proc.returncode is not None  # type: ignore[attr-defined]


# ----------------------------------------------------------------- real QEMU


@pytest.mark.parametrize("scheme", ["tcp", "unix"])
def test_qemu_migrates_into_our_incoming(scheme: str, tmp_path: Path) -> None:
    uri = "tcp:127.0.0.1:0" if scheme == "tcp" else f"unix:{tmp_path}/qemu-out.sock"
    with Qemu([]) as q, listen(uri) as listener:
        q.qmp.cmd("migrate", uri=listener.uri)
        data = recv_all(listener.accept(timeout=30))
        q.wait_migration(30)
    assert data.startswith(b"QEVM")
    stream = read_stream(data, spec_set())
    assert len(stream.sections()) > 5


def test_qemu_accepts_our_outgoing(tmp_path: Path) -> None:
    saved = tmp_path / "saved.mig"
    save_stream(saved)
    port = free_port()
    with Qemu([], incoming="defer") as q:
        q.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        with open_outgoing(f"tcp:127.0.0.1:{port}", timeout=10) as ch, saved.open("rb") as f:
            while chunk := f.read(1 << 16):
                ch.write(chunk)
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            if q.proc.poll() is not None:
                raise QMPError(f"destination QEMU exited: {q.output()}")
            status = q.qmp.cmd("query-migrate").get("status")
            if status in ("completed", "failed"):
                break
            time.sleep(0.02)
        assert status == "completed", q.output()
