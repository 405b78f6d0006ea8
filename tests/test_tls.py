"""TLS on every migration channel: the channel itself, vmsd <-> vmsd (multifd too), and QEMU 7.2 / 11.1 both ways.

Certificates are made for the session by ``openssl`` (tests/tls_certs.py):
a CA with a server certificate for localhost / 127.0.0.1 and a client
certificate, and a second, unrelated CA with its own pairs (the "rogue"
one).  Folders are laid out as QEMU's ``tls-creds-x509`` reads them; QEMU
and vmsd use the same ones.
"""

from __future__ import annotations

import errno
import hashlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cli_process import one_line_error, run
from listening import free_port, unix_listening, wait_listening
from private_peers import Peer
from test_migration import devices_of, fill, make_machine, ram_of
from vmsd.cli import main
from vmsd.migration.incoming import Incoming, IncomingResult
from vmsd.migration.iovec import Scattered, buffer_address
from vmsd.migration.machine import Machine
from vmsd.migration.multifd import MultifdConfig
from vmsd.migration.precopy import Migration, parse_settings
from vmsd.migration.profile import peer_profile
from vmsd.migration.transport import (
    InvalidURI,
    TlsChannel,
    TlsConfig,
    TlsCredsError,
    TransportError,
    listen,
    open_incoming,
    open_outgoing,
)
from vmsd.testing.qmp import Qemu
from vmsd.testing.tls_certs import Pki, creds_dir, make_pki

MIB = 1 << 20
TIMEOUT = 30.0


@pytest.fixture(scope="session")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pki, Pki]:
    folder = tmp_path_factory.mktemp("pki")
    return make_pki(folder / "good", "ca"), make_pki(folder / "rogue", "rogue")


@pytest.fixture(scope="session")
def creds(pkis: tuple[Pki, Pki], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders by role: ``server``/``client`` (QEMU's two endpoints), ``both`` (one folder for either end),
    ``impostor`` (trusts our CA, presents pairs the rogue CA signed), ``distrust`` (our pairs, trusts only
    the rogue CA)."""
    good, rogue = pkis
    root = tmp_path_factory.mktemp("creds")
    return {
        "server": creds_dir(root / "server", good.ca_cert, server=good.server),
        "client": creds_dir(root / "client", good.ca_cert, client=good.client),
        "both": creds_dir(root / "both", good.ca_cert, good.server, good.client),
        "impostor": creds_dir(root / "impostor", good.ca_cert, rogue.server, rogue.client),
        "distrust": creds_dir(root / "distrust", rogue.ca_cert, good.server, good.client),
    }


class _Accepting:
    """A TLS listener's one connection, accepted (and handshaken) in a thread."""

    def __init__(self, config: TlsConfig, uri: str = "tcp:127.0.0.1:0") -> None:
        self.listener = listen(uri, tls=config.server_context())
        self.channel: TlsChannel | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            ch = self.listener.accept(10)
            assert isinstance(ch, TlsChannel)
            self.channel = ch
        except BaseException as e:  # the test inspects it
            self.error = e

    def join(self) -> None:
        self._thread.join(20)
        assert not self._thread.is_alive()
        self.listener.close()


# ----------------------------------------------------------------------------------------------- the channel


def test_a_tls_channel_carries_bytes_both_ways_without_a_descriptor(creds: dict[str, Path]) -> None:
    cfg = TlsConfig(creds["both"])
    server = _Accepting(cfg)
    client = open_outgoing(server.listener.uri, 10, tls=cfg.client_context())
    server.join()
    peer = server.channel
    assert server.error is None and peer is not None and isinstance(client, TlsChannel)
    with client, peer:
        assert client.fileno() == -1 and peer.fileno() == -1 and not client.passes_fds
        assert client.version == "TLSv1.3"
        pages = [bytes([i]) * 4096 for i in range(1, 9)]
        keep = [bytearray(p) for p in pages]
        iov = np.array([(buffer_address(k), len(k)) for k in keep], dtype=np.uint64)
        payload = b"QEVM" + bytes(range(256)) * 1024
        sender = threading.Thread(target=lambda: client.writev(
            [payload[:4], memoryview(payload)[4:], Scattered(iov, tuple(keep)), b"!"]))
        sender.start()
        # peek keeps what it decrypted for the next read, as a socket's MSG_PEEK does
        assert peer.peek(4, 10) == b"QEVM"
        # No descriptor carries the stream, but the socket under it tells when input arrives; what the channel
        # decrypted already shows in buffered() (the RAM loader's read-ahead thread polls on both).
        assert peer.input_fd() >= 0 and peer.buffered() >= 4
        assert peer.read_exact(len(payload)) == payload
        assert peer.read_exact(8 * 4096 + 1) == b"".join(pages) + b"!"
        sender.join(10)
        peer.write(b"SHUT")
        assert client.read_exact(4) == b"SHUT"
        with pytest.raises(TransportError, match=r"nothing received within 0\.05s") as info:
            peer.peek(1, 0.05)
        assert info.value.errno == errno.ETIMEDOUT
        client.close()  # close_notify: the peer reads the end of the stream
        assert peer.readinto(bytearray(16)) == 0
    assert client.input_fd() == -1 and client.buffered() == 0


def test_shutdown_wakes_a_reader_blocked_in_tls(creds: dict[str, Path]) -> None:
    cfg = TlsConfig(creds["both"])
    server = _Accepting(cfg)
    client = open_outgoing(server.listener.uri, 10, tls=cfg.client_context())
    server.join()
    assert server.channel is not None
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.append(server.channel.readinto(bytearray(64))))  # type: ignore[union-attr]
    reader.start()
    time.sleep(0.1)
    server.channel.shutdown_read()
    reader.join(5)
    assert got == [0]
    server.channel.abort()
    client.abort()


@pytest.mark.parametrize("case", ["wrong hostname", "server signed by another CA", "client trusts another CA"])
def test_the_source_refuses_a_destination_it_cannot_trust(creds: dict[str, Path], case: str) -> None:
    server_dir = creds["impostor"] if case == "server signed by another CA" else creds["both"]
    client_cfg = TlsConfig(creds["distrust"] if case == "client trusts another CA" else creds["both"],
                           hostname="wrong.example" if case == "wrong hostname" else None)
    server = _Accepting(TlsConfig(server_dir))
    with pytest.raises(TransportError) as info:
        open_outgoing(server.listener.uri, 10, tls=client_cfg.client_context(), tls_hostname=client_cfg.hostname)
    server.join()
    # A server sends its CA along when it has it (OpenSSL builds the chain from the CAs it trusts).
    why = {"wrong hostname": "Hostname mismatch, certificate is not valid for 'wrong.example'.",
           "server signed by another CA": "unable to get local issuer certificate",
           "client trusts another CA": "self-signed certificate in certificate chain"}[case]
    assert str(info.value) == f"{server.listener.uri}: TLS handshake failed: the peer's certificate is refused: {why}"
    assert isinstance(server.error, TransportError) and "TLS handshake failed: the peer refused the session" in \
        str(server.error)


def test_the_destination_refuses_a_client_certificate_of_another_ca(creds: dict[str, Path]) -> None:
    server = _Accepting(TlsConfig(creds["both"]))
    client = open_outgoing(server.listener.uri, 10, tls=TlsConfig(creds["impostor"]).client_context())
    server.join()
    assert str(server.error) == (f"{server.listener.uri}: TLS handshake failed: the peer's certificate is refused: "
                                 "unable to get local issuer certificate")
    # TLS 1.3: the client's handshake ends before the server has checked its certificate; the refusal shows
    # at the first read or write.
    with pytest.raises(TransportError, match="the peer"):
        for _ in range(100):
            client.write(bytes(64 << 10))
    client.abort()


def test_a_destination_asks_for_a_client_certificate(creds: dict[str, Path]) -> None:
    server = _Accepting(TlsConfig(creds["both"]))
    client = open_outgoing(server.listener.uri, 10, tls=TlsConfig(creds["server"]).client_context())  # no client pair
    server.join()
    assert "TLS handshake failed: peer did not return a certificate" in str(server.error)
    client.abort()


def test_credentials_that_cannot_serve(creds: dict[str, Path], tmp_path: Path) -> None:
    assert TlsConfig(str(creds["both"])).creds == creds["both"]  # type: ignore[arg-type]  # a str names it too
    with pytest.raises(TlsCredsError, match=r"cannot load server-cert.pem with server-key.pem: No such file"):
        TlsConfig(creds["client"]).server_context()
    with pytest.raises(TlsCredsError, match=r"cannot load ca-cert.pem: No such file"):
        TlsConfig(tmp_path).client_context()
    with pytest.raises(TlsCredsError, match="not a folder"):
        TlsConfig(tmp_path / "nowhere").server_context()
    mixed = creds_dir(tmp_path / "mixed", creds["both"] / "ca-cert.pem", server=(
        creds["both"] / "server-cert.pem", creds["impostor"] / "server-key.pem"))
    with pytest.raises(TlsCredsError, match=r"cannot load server-cert\.pem with server-key\.pem: key values mismatch"):
        TlsConfig(mixed).server_context()
    (mixed / "ca-crl.pem").write_text("")
    with pytest.raises(TlsCredsError, match=r"ca-crl\.pem is not supported"):
        TlsConfig(mixed).client_context()


def test_tls_needs_a_socket_and_a_name(creds: dict[str, Path], tmp_path: Path) -> None:
    ctx = TlsConfig(creds["both"]).client_context()
    with pytest.raises(InvalidURI, match="TLS runs over a socket only"):
        open_outgoing(f"file:{tmp_path / 'x'}", tls=ctx)
    with pytest.raises(InvalidURI, match="TLS runs over a socket only"):
        open_incoming("exec:cat /dev/null", tls=TlsConfig(creds["both"]).server_context())
    with make_machine(ram=MIB) as m:
        with pytest.raises(ValueError, match="no hostname available for TLS on unix:"):
            Migration(m, f"unix:{tmp_path / 's'}", tls=TlsConfig(creds["both"]))
        with pytest.raises(ValueError, match="not file:"):
            Migration(m, f"file:{tmp_path / 'x'}", tls=TlsConfig(creds["both"]))
        with pytest.raises(TlsCredsError):  # before anything connects
            Migration(m, "tcp:127.0.0.1:1", tls=TlsConfig(tmp_path))
    with pytest.raises(ValueError, match=r"parameter 'tls-creds' is given as tls=TlsConfig"):
        parse_settings(None, {"tls-creds": 0})


# ------------------------------------------------------------------------------------------------ vmsd <-> vmsd


class _Destination:
    def __init__(self, machine: Machine, uri: str, **kw: Any) -> None:
        self.incoming = Incoming(machine, **kw)
        self.result: IncomingResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(uri,), daemon=True)
        self.thread.start()

    def _run(self, uri: str) -> None:
        try:
            self.result = self.incoming.run(uri, timeout=TIMEOUT)
        except BaseException as e:  # the test inspects it
            self.error = e

    def join(self) -> None:
        self.thread.join(60)
        assert not self.thread.is_alive()


@pytest.mark.parametrize(("channels", "compression", "layout"),
                         [(0, "none", "11.1"), (2, "none", "11.1"), (3, "zstd", "11.1"), (2, "none", "7.2")])
def test_vmsd_to_vmsd_over_tls(creds: dict[str, Path], channels: int, compression: str, layout: str) -> None:
    """Every channel is TLS (the destination accepts nothing else); RAM and devices arrive intact."""
    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    cfg = MultifdConfig(channels=channels, compression=compression, peer=peer_profile(layout)) if channels else None
    with make_machine(ram=32 * MIB) as src, make_machine(ram=32 * MIB) as dst:
        fill(src)
        rx = _Destination(dst, uri, multifd=cfg, tls=TlsConfig(creds["server"]))
        wait_listening(port, TIMEOUT, alive=rx.thread.is_alive)
        mig = Migration(src, uri, capabilities={"return-path": True}, parameters={"max-bandwidth": 0}, multifd=cfg,
                        tls=TlsConfig(creds["client"]))
        info = mig.run()
        rx.join()
        assert rx.error is None and info["status"] == "completed", (info, rx.error)
        assert ram_of(src) == ram_of(dst) and devices_of(src) == devices_of(dst)
        assert not mig.encoder.zero_copy  # no descriptor to writev pages from: records are built in one buffer
        if cfg is not None:
            assert rx.result is not None and all(c.pages > 0 for c in rx.result.channels)
            assert info["ram"]["multifd-bytes"] > 16 * MIB


@pytest.mark.parametrize("channels", [0, 2])
def test_a_plain_source_is_refused_by_a_tls_destination(creds: dict[str, Path], channels: int) -> None:
    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    cfg = MultifdConfig(channels=channels) if channels else None
    with make_machine(ram=4 * MIB) as src, make_machine(ram=4 * MIB) as dst:
        fill(src)
        ram, devs = ram_of(src), devices_of(src)
        rx = _Destination(dst, uri, multifd=cfg, tls=TlsConfig(creds["server"]))
        wait_listening(port, TIMEOUT, alive=rx.thread.is_alive)
        info = Migration(src, uri, parameters={"max-bandwidth": 0}, multifd=cfg).run()
        rx.join()
        assert info["status"] == "failed"
        assert isinstance(rx.error, TransportError) and "TLS handshake failed" in str(rx.error)
        assert src.running and ram_of(src) == ram and devices_of(src) == devs


@pytest.mark.parametrize("case", ["wrong hostname", "wrong CA"])
def test_a_refused_destination_leaves_the_source_running_and_intact(creds: dict[str, Path], case: str) -> None:
    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    cfg = MultifdConfig(channels=2)
    with make_machine(ram=4 * MIB) as src, make_machine(ram=4 * MIB) as dst:
        fill(src)
        ram, devs = ram_of(src), devices_of(src)
        rx = _Destination(dst, uri, multifd=cfg, tls=TlsConfig(creds["server"]))
        wait_listening(port, TIMEOUT, alive=rx.thread.is_alive)
        tls = TlsConfig(creds["client"], hostname="wrong.example") if case == "wrong hostname" \
            else TlsConfig(creds["distrust"])
        info = Migration(src, uri, parameters={"max-bandwidth": 0}, multifd=cfg, tls=tls).run()
        rx.join()
        assert info["status"] == "failed"
        assert info["error-desc"].startswith("TLS handshake failed: the peer's certificate is refused: ")
        assert src.running and ram_of(src) == ram and devices_of(src) == devs
        assert rx.error is not None


# --------------------------------------------------------------------------------------------------- with QEMU


@pytest.fixture
def shm() -> Iterator[Path]:
    d = Path("/dev/shm") / f"vmsd-tls-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def _ram(path: Path, size: str = "64M") -> list[str]:
    return ["-object", f"memory-backend-file,id=m,size={size},mem-path={path},share=on",
            "-machine", "memory-backend=m"]


def _tls_object(folder: Path, endpoint: str) -> list[str]:
    return ["-object", f"tls-creds-x509,id=tls0,dir={folder},endpoint={endpoint},verify-peer=on"]


def _qemu_tls(q: Qemu, hostname: str | None = None, channels: int = 0) -> None:
    if channels:
        q.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
        q.qmp.cmd("migrate-set-parameters", **{"multifd-channels": channels})
    q.qmp.cmd("migrate-set-parameters", **{"tls-creds": "tls0", **({"tls-hostname": hostname} if hostname else {})})


def _starter(version: str) -> Any:
    """``start(args, incoming)``: a QEMU of ``version`` (7.2 is the system's) with 64 MiB of guest RAM."""
    if version == "7.2":
        return lambda args, incoming: Qemu(args, memory="64", incoming=incoming)
    peer = Peer.fetched(version)
    return lambda args, incoming: peer.start(args, incoming, memory="64")


def _fill_guest(path: Path) -> bytes:
    content = np.random.default_rng(5).integers(0, 256, 64 * MIB, dtype=np.uint8)
    content[: 16 * MIB] = 0
    path.write_bytes(content.tobytes())
    return content.tobytes()


@pytest.mark.parametrize("channels", [0, 2], ids=["main channel", "multifd"])
@pytest.mark.parametrize("version", ["7.2", "11.1"])
def test_qemu_to_vmsd_and_back_over_tls(creds: dict[str, Path], shm: Path, tmp_path: Path, version: str,
                                        channels: int) -> None:
    """QEMU (client creds) -> ``vmsd incoming --tls-creds`` -> snapshot -> ``vmsd outgoing --tls-creds`` ->
    QEMU (server creds): the same certificates on both sides, every channel TLS; RAM compared."""
    start = _starter(version)
    _fill_guest(shm / "src")
    snap = tmp_path / "snap.mig"
    opts = ["--peer-version", version, *(["--capability", "multifd=on", "--parameter",
                                          f"multifd-channels={channels}"] if channels else [])]
    port = free_port()
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(main(["incoming", f"tcp:127.0.0.1:{port}", "-o", str(snap),
                                                        "--timeout", "30", "--tls-creds", str(creds["server"]),
                                                        *opts])))
    t.start()
    wait_listening(port, alive=t.is_alive)
    with start([*_ram(shm / "src"), *_tls_object(creds["client"], "client")], None) as src:
        _qemu_tls(src, channels=channels)
        src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 10**10})
        src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        t.join(60)
        src.wait_migration(30)
        source = (shm / "src").read_bytes()
    assert rc == [0]
    vm_uuid = "6c4fa2a8-3f1e-4f60-9d7e-2b1c5e0f9a11"
    port = free_port()
    with start([*_ram(shm / "dst"), "-uuid", vm_uuid, *_tls_object(creds["server"], "server")], "defer") as dst:
        _qemu_tls(dst, channels=channels)
        dst.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        assert main(["outgoing", str(snap), f"tcp:127.0.0.1:{port}", "--uuid", vm_uuid,
                     "--tls-creds", str(creds["client"]), *opts]) == 0
        dst.wait_migration(30)
        assert (shm / "dst").read_bytes() == source


def _qemu_status(q: Qemu, deadline: float) -> dict[str, Any]:
    while True:
        info: dict[str, Any] = q.qmp.cmd("query-migrate")
        if info.get("status") in ("failed", "completed", "cancelled") or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


@pytest.mark.parametrize("case", ["wrong hostname", "server certificate of another CA"])
@pytest.mark.parametrize("version", ["7.2", "11.1"])
def test_qemu_refuses_vmsd_incoming_it_cannot_trust(creds: dict[str, Path], shm: Path, tmp_path: Path, version: str,
                                                     case: str) -> None:
    """QEMU's migration fails, its guest runs on with its RAM, and ``vmsd incoming`` says why in one line."""
    start = _starter(version)
    content = _fill_guest(shm / "src")
    port = free_port()
    server_dir = creds["impostor"] if case == "server certificate of another CA" else creds["server"]
    incoming = _InThread(["incoming", f"tcp:127.0.0.1:{port}", "-o", str(tmp_path / "snap.mig"),
                               "--timeout", "20", "--tls-creds", str(server_dir)])
    wait_listening(port, alive=incoming.is_alive)
    with start([*_ram(shm / "src"), *_tls_object(creds["client"], "client")], None) as src:
        _qemu_tls(src, hostname="wrong.example" if case == "wrong hostname" else None)
        src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = _qemu_status(src, time.monotonic() + TIMEOUT)
        assert info["status"] == "failed", info
        desc = info.get("error-desc", "")
        assert ("wrong.example" in desc) if case == "wrong hostname" else ("issuer" in desc), desc
        src.qmp.cmd("cont")
        assert src.qmp.cmd("query-status")["status"] == "running"
        src.qmp.cmd("stop")
        # Nothing ran but the BIOS, which writes low memory and its tables at the top of RAM: what lies
        # between is as it was (compared by digest: a failing byte comparison of 28 MiB would take pytest
        # minutes to explain).
        after = (shm / "src").read_bytes()
        assert hashlib.sha256(after[32 * MIB:60 * MIB]).hexdigest() == hashlib.sha256(content[32 * MIB:60 * MIB]).hexdigest()
    code, err = incoming.result()
    # QEMU checks the certificate once its side of the handshake is done, then hangs up.
    assert code == 1 and one_line_error(err, "incoming"), err
    assert "the peer ended the TLS session before sending anything (did it refuse our certificate" in err, err
    assert not (tmp_path / "snap.mig").exists()


@pytest.mark.parametrize("case", ["wrong hostname", "trusts another CA", "client certificate of another CA"])
@pytest.mark.parametrize("version", ["7.2", "11.1"])
def test_vmsd_outgoing_and_a_qemu_destination_that_do_not_trust_each_other(
        creds: dict[str, Path], shm: Path, tmp_path: Path, version: str, case: str) -> None:
    """``vmsd outgoing`` fails with one line; the QEMU destination stays waiting for a migration."""
    start = _starter(version)
    snap = tmp_path / "saved.mig"
    with start(_ram(shm / "src"), None) as q:
        q.migrate_to_file(snap)
    port = free_port()
    client = {"wrong hostname": creds["client"], "trusts another CA": creds["distrust"],
              "client certificate of another CA": creds["impostor"]}[case]
    with start([*_ram(shm / "dst"), *_tls_object(creds["server"], "server")], "defer") as dst:
        _qemu_tls(dst)
        dst.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        code, err = run("outgoing", str(snap), f"tcp:127.0.0.1:{port}", "--peer-version", version,
                        "--tls-creds", str(client), "--timeout", "10",
                        *(["--tls-hostname", "wrong.example"] if case == "wrong hostname" else []))
        # The progress bar, then one line.
        last = err.splitlines()[-1]
        assert code == 1 and last.startswith("vmsd outgoing: error: migration failed: ") and "Traceback" not in err
        if case == "client certificate of another CA":
            # TLS 1.3: our side of the handshake ends before QEMU checks our certificate; QEMU hangs up.
            assert last.endswith("the peer closed the connection (did it refuse our certificate, or the name we "
                                 "checked?)"), err
        else:
            why = "Hostname mismatch" if case == "wrong hostname" else "unable to get local issuer certificate"
            assert f"TLS handshake failed: the peer's certificate is refused: {why}" in last, err
        assert dst.qmp.cmd("query-status")["status"] == "inmigrate"


class _InThread:
    """``vmsd ARGS`` as a separate process in a thread: :meth:`result` is its exit status and stderr."""

    def __init__(self, args: list[str]) -> None:
        self._box: list[tuple[int, str]] = []
        self._thread = threading.Thread(target=lambda: self._box.append(run(*args)), daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def result(self) -> tuple[int, str]:
        self._thread.join(60)
        assert self._box
        return self._box[0]


def test_cli_refuses_tls_settings_it_cannot_use(creds: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "in.mig").write_bytes(b"")
    code, err = run("outgoing", str(tmp_path / "in.mig"), "tcp:127.0.0.1:1", "--tls-hostname", "x")
    assert code == 2 and one_line_error(err, "outgoing") and "--tls-hostname needs --tls-creds" in err
    code, err = run("incoming", "tcp:127.0.0.1:1", "-o", str(tmp_path / "o.mig"), "--parameter", "tls-creds=tls0")
    assert code == 2 and one_line_error(err, "incoming") and "--tls-creds DIR" in err
    code, err = run("incoming", "tcp:127.0.0.1:1", "-o", str(tmp_path / "o.mig"), "--tls-creds", str(tmp_path))
    assert code == 1 and one_line_error(err, "incoming") and "cannot load server-cert.pem" in err
    assert not (tmp_path / "o.mig").exists()


def test_unix_socket_with_tls_hostname(creds: dict[str, Path], tmp_path: Path) -> None:
    """A unix: channel has no host to check: tls-hostname names it (here the certificate's localhost)."""
    uri = f"unix:{tmp_path / 'mig.sock'}"
    with make_machine(ram=4 * MIB) as src, make_machine(ram=4 * MIB) as dst:
        fill(src)
        rx = _Destination(dst, uri, tls=TlsConfig(creds["server"]))
        deadline = time.monotonic() + TIMEOUT
        while not unix_listening(str(tmp_path / "mig.sock")):
            assert time.monotonic() < deadline and rx.thread.is_alive()
            time.sleep(0.02)
        info = Migration(src, uri, parameters={"max-bandwidth": 0},
                         tls=TlsConfig(creds["client"], hostname="localhost")).run()
        rx.join()
        assert rx.error is None and info["status"] == "completed", (info, rx.error)
        assert ram_of(src) == ram_of(dst)



def test_the_idle_limit_ends_a_stalled_tls_channel(creds: dict[str, Path]) -> None:
    """A peer that sends nothing, or reads nothing, fails the channel once nothing moved for the idle limit
    (the TLS socket's timeout), with the idle limit's message."""
    cfg = TlsConfig(creds["both"])
    with listen("tcp:127.0.0.1:0", tls=cfg.server_context()) as lst:
        box: list[Any] = []
        accepting = threading.Thread(target=lambda: box.append(lst.accept(10, idle_timeout=0.5)))
        accepting.start()
        client = open_outgoing(lst.uri, 10, idle_timeout=0.5, tls=cfg.client_context())
        accepting.join(10)
        server = box[0]
        with client, server:
            client.write(b"QEVM")
            assert server.read_exact(4) == b"QEVM"
            with pytest.raises(TransportError, match=r"read failed: nothing moved for 0\.5s, the idle limit") as info:
                server.read_exact(1)
            assert info.value.errno == errno.ETIMEDOUT
            with pytest.raises(TransportError, match=r"write failed: nothing moved for 0\.5s, the idle limit"):
                for _ in range(1024):  # far more than the sockets hold: the peer reads nothing
                    client.write(bytes(1 << 20))
