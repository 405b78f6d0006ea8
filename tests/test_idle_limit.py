"""The idle limit of socket channels: a peer or a relay that stops moving bytes fails the migration, cleanly.

Over loopback (no root needed); the same faults across a real link between two
network namespaces are tests/test_network_faults.py.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from listening import wait_listening
from relay import Relay
from test_migration import _assert_failed_intact, devices_of, fill, make_machine, ram_of
from vmsd.cli import main
from vmsd.migration.incoming import Incoming
from vmsd.migration.iovec import Scattered
from vmsd.migration.multifd import MultifdConfig, MultifdError
from vmsd.migration.precopy import Migration
from vmsd.migration.transport import Channel, TransportError, listen, open_outgoing
from vmsd.migration.transport.idle import receive_timeout

pytestmark = pytest.mark.usefixtures("no_leaked_fds")

MIB = 1 << 20


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel]]:
    """A TCP connection over loopback: (outgoing, accepted), both with a 0.3 s idle limit."""
    with listen("tcp:127.0.0.1:0") as lst:
        out = open_outgoing(lst.uri, timeout=5, idle_timeout=0.3)
        inc = lst.accept(5, idle_timeout=0.3)
    with out, inc:
        yield out, inc


def _sockopt(ch: Channel, level: int, name: int, size: int = 0) -> Any:
    sock = socket.socket(fileno=ch.fileno())
    try:
        return sock.getsockopt(level, name, size) if size else sock.getsockopt(level, name)
    finally:
        sock.detach()


def test_the_idle_limit_is_set_on_the_socket() -> None:
    with listen("tcp:127.0.0.1:0") as lst, open_outgoing(lst.uri, timeout=5, idle_timeout=2.5) as out, \
            lst.accept(5, idle_timeout=2.5) as inc:
        for ch in (out, inc):
            assert struct.unpack("@ll", _sockopt(ch, socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)) == (2, 500000)
            assert struct.unpack("@ll", _sockopt(ch, socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16)) == (2, 500000)
            assert _sockopt(ch, socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2500
            assert _sockopt(ch, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert _sockopt(ch, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 1
            assert receive_timeout(ch.fileno()) == 2.5


def test_without_an_idle_limit_nothing_is_set(tmp_path: Path) -> None:
    with listen("tcp:127.0.0.1:0") as lst, open_outgoing(lst.uri, timeout=5) as out, lst.accept(5) as inc:
        for ch in (out, inc):
            assert receive_timeout(ch.fileno()) is None
            assert _sockopt(ch, socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
            assert _sockopt(ch, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    with listen(f"unix:{tmp_path}/s") as lst, open_outgoing(lst.uri, timeout=5, idle_timeout=1) as out:
        assert receive_timeout(out.fileno()) == 1.0  # a unix socket: no TCP options, the same bound on calls
    r, w = socket.socketpair()
    with r, w:
        assert receive_timeout(r.fileno()) is None


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan")])
def test_an_idle_limit_is_a_positive_number_of_seconds(bad: float) -> None:
    with listen("tcp:127.0.0.1:0") as lst, pytest.raises(ValueError, match="positive number of seconds"):
        open_outgoing(lst.uri, timeout=5, idle_timeout=bad)


@pytest.mark.parametrize("call", ["readinto", "read_full", "read_exact"])
def test_a_silent_peer_fails_a_read(pair: tuple[Channel, Channel], call: str) -> None:
    out, inc = pair
    out.write(b"0123456789")  # some bytes, then nothing
    with pytest.raises(TransportError) as err:
        if call == "readinto":
            assert inc.readinto(bytearray(10)) == 10
            inc.readinto(bytearray(10))
        elif call == "read_full":
            inc.read_full(memoryview(bytearray(20)))
        else:
            inc.read_exact(20)
    assert err.value.errno == errno.ETIMEDOUT
    assert str(err.value) == (f"{inc.name}: read failed: nothing moved for 0.3s, the idle limit "
                              "(the peer or the network stalled)")


def test_a_peer_that_reads_nothing_fails_a_write(pair: tuple[Channel, Channel]) -> None:
    out, _ = pair
    with pytest.raises(TransportError, match=r"write failed: nothing moved for 0\.3s") as err:
        out.write(bytes(64 * MIB))  # more than both sockets' buffers hold
    assert err.value.errno == errno.ETIMEDOUT


def test_pages_written_from_ram_to_a_peer_that_reads_nothing_fail_too(pair: tuple[Channel, Channel]) -> None:
    """writev(2) of scattered pages returns EAGAIN at the send timeout: raised, not waited on for ever."""
    out, _ = pair
    ram = np.ones(64 * MIB, dtype=np.uint8)
    iov = np.array([[ram.ctypes.data + i * MIB, MIB] for i in range(64)], dtype=np.uint64)
    with pytest.raises(TransportError, match=r"write failed: nothing moved for 0\.3s"):
        out.writev([b"head", Scattered(iov, (ram,))])


def test_bytes_that_keep_coming_keep_the_channel_open() -> None:
    """The limit is on silence, not on the whole transfer: a slow, steady stream arrives whole."""
    with listen("tcp:127.0.0.1:0") as lst, open_outgoing(lst.uri, timeout=5, idle_timeout=5) as out, \
            lst.accept(5, idle_timeout=5) as inc:
        done = threading.Event()

        def trickle() -> None:
            for i in range(20):
                out.write(bytes([i]))
                done.wait(0.02)

        t = threading.Thread(target=trickle)
        t.start()
        assert inc.read_exact(20) == bytes(range(20))
        t.join()


# -- the engine: a relay that stops forwarding in the middle of a migration -----------------------------------------
def _stalled_migration(multifd: bool) -> BaseException | None:
    """Migrate through a relay that stalls after 2 MiB, both ends with a 0.5 s limit; the source fails and
    runs on intact.  Returns the destination's error."""
    cfg = MultifdConfig(channels=2) if multifd else None
    with make_machine() as src, make_machine() as dst:
        fill(src)
        ram, devs = ram_of(src), devices_of(src)
        incoming = Incoming(dst, multifd=cfg)
        error: list[BaseException] = []
        with listen("tcp:127.0.0.1:0") as probe:
            port = int(probe.uri.rsplit(":", 1)[1])
        dest_uri = f"tcp:127.0.0.1:{port}"

        def receive() -> None:
            try:
                incoming.run(dest_uri, timeout=0.5)
            except BaseException as e:
                error.append(e)

        rx = threading.Thread(target=receive)
        rx.start()
        with Relay(("127.0.0.1", 0), ("127.0.0.1", port), stall_after=2 * MIB) as relay:
            wait_listening(port, alive=rx.is_alive)
            # With the return path the source waits for the destination's word: without it, a stream that
            # fits in the sockets' buffers would count as sent (as in QEMU).
            info = Migration(src, relay.uri, capabilities={"multifd": multifd, "return-path": True},
                             parameters={"max-bandwidth": 0}, multifd=cfg, timeout=0.5).run()
            rx.join(30)
            assert not rx.is_alive()
            assert relay.wait_stalled(0)
        _assert_failed_intact(info, src, ram, devs, "nothing moved for 0.5s, the idle limit")
        assert incoming.status == "failed"
        return error[0] if error else None


@pytest.mark.parametrize("multifd", [False, True], ids=["main-channel", "multifd"])
def test_a_stalled_relay_fails_both_ends_and_the_source_runs_on(multifd: bool) -> None:
    err = _stalled_migration(multifd)
    assert isinstance(err, TransportError | MultifdError), err  # a multifd channel's failure names the channel
    # Where the stall hits the destination decides the wording: inside the stream (the idle limit), or while
    # it still waits for a multifd channel's first bytes to tell the channels apart (its peek's timeout).
    assert ("read failed: nothing moved for 0.5s, the idle limit" in str(err)
            or (multifd and "nothing received within 0.5s" in str(err))), err


def test_a_destination_that_never_confirms_the_load_fails_the_source() -> None:
    """With the return path, the source waits for SHUT at most its limit, then fails and runs on."""
    with listen("tcp:127.0.0.1:0") as lst, make_machine() as src:
        fill(src)
        ram, devs = ram_of(src), devices_of(src)

        def swallow() -> None:  # reads the whole stream and never answers
            with lst.accept(10) as ch:
                while ch.readinto(bytearray(1 << 16)):
                    pass

        t = threading.Thread(target=swallow)
        t.start()
        info = Migration(src, lst.uri, capabilities={"return-path": True}, parameters={"max-bandwidth": 0},
                         timeout=0.5).run()
        t.join(10)
        _assert_failed_intact(info, src, ram, devs, "the destination did not confirm the load (read failed: "
                                                    "nothing moved for 0.5s, the idle limit")


def test_cli_timeout_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["incoming", "tcp:127.0.0.1:0", "-o", "/dev/null", "--timeout", "0"]) == 2
    assert "expected a positive number of seconds, got '0'" in capsys.readouterr().err
