"""A live stream's sections that no spec describes are kept as received and decoded by the trailer after EOF.

The streams are QEMU 7.2's with its default devices (and a watchdog no spec
set covers); live decoding is compared with decoding the same bytes in
memory, where the trailer is known from the start.
"""

from __future__ import annotations

import io
import struct
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from listening import free_port, wait_listening
from private_peers import Peer
from test_live_migration import ram_args, vmsd_incoming
from vmsd.migration.stream import Decoder, SpecSet, Stream, read_stream, section_footer
from vmsd.migration.undescribed import decode_kept
from vmsd.qemu.v7_2 import spec_set
from vmsd.runtime import VMSDError
from vmsd.runtime.errors import MalformedStream, RegistryError, TruncatedStream
from vmsd.runtime.io import Reader
from vmsd.runtime.vmdesc import loads
from vmsd.testing.qmp import Qemu, load_stream

WATCHDOG = ["-device", "i6300esb"]  # in no shipped spec set
WATCHDOG_IDSTR = "0000:00:04.0/i6300esb_wdt"


@pytest.fixture(scope="module")
def streams(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("undescribed")
    out = {}
    for name, machine, extra in (("pc", "pc", []), ("q35", "q35", []), ("pc-no-trailer", "pc,suppress-vmdesc=on", []),
                                 ("pc-no-footers", "pc", ["-global", "migration.send-section-footer=off"])):
        with Qemu([*WATCHDOG, *extra], machine=machine, nodefaults=False) as q:  # the machine's default devices
            q.migrate_to_file(d / f"{name}.mig")
        out[name] = (d / f"{name}.mig").read_bytes()
    return out


def live(data: bytes, specs: SpecSet) -> Stream:
    """``data`` decoded as a live receiver decodes it: through a reader that cannot look ahead of what arrived."""
    dec = Decoder(b"", specs, strict_typed=True, enforce_checks=False, reader=Reader(source=io.BytesIO(data)))
    dec.read_header()
    dec.stream.records = dec.records(top=True)
    dec.finish_live()
    return dec.stream


def _full(stream: Stream) -> list[tuple[str, int, object, object, object]]:
    return [(s.idstr, s.instance_id, s.vmsd_name, s.generic_body, s.payload) for s in stream.full_sections()]


@pytest.mark.parametrize("name", ["pc", "q35"])
def test_no_spec_at_all_decodes_live_as_in_memory(streams: dict[str, bytes], name: str) -> None:
    """Without any spec every device section is kept and decoded by the trailer, to the same values as in
    memory."""
    data = streams[name]
    got = live(data, SpecSet())
    assert got.trailer is not None
    assert _full(got) == _full(read_stream(data, SpecSet()))
    assert all(s.generic_body is not None for s in got.full_sections())


def test_only_the_undescribed_section_waits(streams: dict[str, bytes]) -> None:
    data = streams["pc"]
    got = live(data, spec_set())
    specs = spec_set()
    by_trailer = [s for s in got.full_sections() if s.generic_body is not None]
    assert WATCHDOG_IDSTR in [s.idstr for s in by_trailer]
    assert all(specs.lookup(s.idstr, s.vmsd_name) is None for s in by_trailer)
    assert len(by_trailer) < len(got.full_sections()) // 4
    assert _full(got) == _full(read_stream(data, spec_set()))


def test_no_trailer_names_the_section(streams: dict[str, bytes]) -> None:
    """The first section without a spec is named (the machine's default devices come before the watchdog)."""
    specs = spec_set()
    data = streams["pc-no-trailer"]
    with pytest.raises(RegistryError, match=r"no spec for section '[^']+' .*and the stream has no trailer") as e:
        live(data, specs)
    assert e.value.section is not None and specs.lookup(e.value.section, None) is None


def test_no_footers_names_the_section(streams: dict[str, bytes]) -> None:
    with pytest.raises(RegistryError, match=r"no spec for section .*without section footers its end cannot be found"):
        live(streams["pc-no-footers"], spec_set())


def test_truncated_inside_a_kept_section(streams: dict[str, bytes]) -> None:
    data = streams["pc"]
    wdt = next(s for s in read_stream(data, SpecSet()).full_sections() if s.idstr == WATCHDOG_IDSTR)
    with pytest.raises(TruncatedStream) as e:
        live(data[: wdt.offset + 40], spec_set())
    assert e.value.section == WATCHDOG_IDSTR


def test_footer_pattern_inside_a_payload_is_an_error_not_a_value(streams: dict[str, bytes]) -> None:
    """A payload holding its own footer followed by bytes that look like a command ends the kept bytes too
    early; what follows is then read as records and the stream is refused, with its offset."""
    data = bytearray(streams["pc"])
    cpu = next(s for s in read_stream(bytes(data), SpecSet()).full_sections() if s.idstr == "cpu")
    inside = cpu.offset + 1 + 4 + 1 + len("cpu") + 8 + 64
    fake = section_footer(cpu.section_id) + struct.pack(">BHH", 0x08, 3, 4) + b"\0\0\0\1"  # then a PING
    data[inside : inside + len(fake)] = fake
    with pytest.raises(MalformedStream) as e:
        live(bytes(data), SpecSet())
    assert e.value.offset is not None and e.value.offset > inside


@pytest.mark.parametrize(("arrived", "message"), [
    (3, "the trailer describes more than the 3 bytes that arrived before the section's footer"),
    (5, "the trailer describes 4 bytes, 5 arrived before the section's footer"),
])
def test_kept_bytes_must_be_exactly_what_the_trailer_describes(arrived: int, message: str) -> None:
    device = loads(b'{"name": "d", "instance_id": 0, "vmsd_name": "d", "version": 1,'
                   b' "fields": [{"name": "x", "type": "uint32", "size": 4}]}')
    with pytest.raises(MalformedStream, match=message) as e:
        decode_kept(bytes(arrived), 0x100, device)
    assert e.value.offset == 0x100
    assert decode_kept(b"\0\0\0\7", 0x100, device) == [("x", 7)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_streams_raise_only_our_errors_and_never_other_values(streams: dict[str, bytes],
                                                                      data: st.DataObject) -> None:
    """Flipped or cut bytes: live decoding raises a VMSDError, or gives what decoding in memory gives."""
    raw = bytearray(streams["pc"])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    try:
        got = live(bytes(raw), SpecSet())
    except VMSDError:
        return
    try:
        expected = read_stream(bytes(raw), SpecSet())
    except VMSDError:
        return  # in memory, the bytes after the trailer are refused too; live stops reading at its end
    assert _full(got) == _full(expected)


# --- live, from real QEMUs ---------------------------------------------------------------------------------


def _migrate(src: Qemu, port: int, receiver: threading.Thread, result: list[int]) -> None:
    """Migrate ``src`` to the `vmsd incoming` of ``receiver`` and wait until both are done, successfully."""
    wait_listening(port, alive=receiver.is_alive)
    src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    src.wait_migration(60)
    receiver.join(60)
    assert result == [0]


def test_qemu72_default_devices_into_vmsd_incoming(shm: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """QEMU 7.2 with its default devices and a watchdog, return path on: `vmsd incoming` takes the watchdog
    from the trailer, writes a snapshot QEMU loads with identical RAM and the same watchdog state."""
    snapshot, saved = tmp_path / "snap.mig", tmp_path / "saved.mig"
    port = free_port()
    receiver, result = vmsd_incoming(port, snapshot, "--peer-version", "7.2")
    args = [*ram_args(shm / "source"), *WATCHDOG]
    with Qemu(args, nodefaults=False) as src:
        src.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
        src.qmp.cmd("cont")
        time.sleep(0.3)
        _migrate(src, port, receiver, result)
        source_bytes = (shm / "source").read_bytes()
    assert "warning" not in capsys.readouterr().err  # the right spec set was named
    ours = read_stream(snapshot.read_bytes(), spec_set())
    assert WATCHDOG_IDSTR in [s.idstr for s in ours.full_sections() if s.generic_body is not None]
    dest = load_stream(snapshot, args=[*ram_args(shm / "dest"), *WATCHDOG], nodefaults=False)
    try:
        assert (shm / "dest").read_bytes() == source_bytes
        dest.migrate_to_file(saved)  # what QEMU took from the snapshot, as QEMU writes it
    finally:
        dest.stop()
    # QEMU rewrites clocks on load (RTC, timers), so the two streams are compared where nothing ticks: the
    # section no spec describes, which QEMU loaded from the snapshot and saved again.
    again = read_stream(saved.read_bytes(), spec_set())
    assert [_full_of(again, WATCHDOG_IDSTR)] == [_full_of(ours, WATCHDOG_IDSTR)]


def _full_of(stream: Stream, idstr: str) -> tuple[object, object]:
    sec = next(s for s in stream.full_sections() if s.idstr == idstr)
    return sec.version_id, sec.payload


def test_private_peer_default_devices_into_vmsd_incoming(private_peer: Peer, shm: Path, tmp_path: Path) -> None:
    """QEMU 10.0 and 11.1 likewise, each with its own spec set (--peer-version), and back into the same QEMU."""
    snapshot = tmp_path / "snap.mig"
    port = free_port()
    receiver, result = vmsd_incoming(port, snapshot, "--peer-version", private_peer.version)
    args = [*ram_args(shm / "source"), *WATCHDOG]
    with private_peer.start(args, memory="32M", nodefaults=False) as src:
        _migrate(src, port, receiver, result)
        source_bytes = (shm / "source").read_bytes()
    kept = [s for s in read_stream(snapshot.read_bytes(), SpecSet()).full_sections() if s.idstr == WATCHDOG_IDSTR]
    assert len(kept) == 1
    with private_peer.start([*ram_args(shm / "dest"), *WATCHDOG], memory="32M", nodefaults=False,
                            incoming="defer") as dest:
        dest.qmp.cmd("migrate-incoming", uri=f"exec:cat {snapshot}")
        deadline = time.monotonic() + 30
        while (status := dest.qmp.cmd("query-migrate").get("status")) != "completed":
            assert status != "failed", dest.output()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert (shm / "dest").read_bytes() == source_bytes


def test_incoming_warns_when_the_trailer_fits_another_spec_set(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A live stream is decoded with the set the options name (default: the newest QEMU's); QEMU 7.2's
    trailer, arriving after EOF, shows that 7.2's fits, and incoming says so."""
    port = free_port()
    receiver, result = vmsd_incoming(port, tmp_path / "snap.mig")
    with Qemu([]) as src:
        _migrate(src, port, receiver, result)
    err = capsys.readouterr().err
    assert "the stream fits QEMU 7.2's specs (machine type pc-i440fx-7.2 and the trailer)" in err
    assert "Pass --peer-version 7.2" in err
