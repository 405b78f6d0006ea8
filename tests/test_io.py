"""Reader and writer primitives over memory and streams."""

from __future__ import annotations

import io
import socket
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmsd.generated.bench.heavy import Heavy
from vmsd.generated.examples.serial import Serial
from vmsd.runtime import MalformedStream, TruncatedStream, VMSDError
from vmsd.runtime.io import Reader, SocketSource, Writer


class Trickle(io.RawIOBase):
    """A source that returns at most ``step`` bytes per read, like a slow socket."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.pos, self.step = data, 0, step
        self.largest_request = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        self.largest_request = max(self.largest_request, len(buf))
        n = min(self.step, len(buf), len(self.data) - self.pos)
        buf[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def test_primitives_round_trip() -> None:
    w = Writer()
    w.u8(0xAB)
    w.u16(0x1234)
    w.u32(0xDEADBEEF)
    w.u64(1 << 63)
    w.s32(-2)
    w.s64(-3)
    w.counted_string(b"serial")
    r = Reader(w.getvalue())
    assert (r.u8(), r.u16(), r.u32(), r.u64(), r.s32(), r.s64()) == (0xAB, 0x1234, 0xDEADBEEF, 1 << 63, -2, -3)
    assert r.counted_string() == b"serial"
    assert r.at_end()
    with pytest.raises(ValueError):
        w.counted_string(b"x" * 256)


@given(st.binary(max_size=64), st.integers(1, 7))
def test_stream_reader_matches_memory_reader(data: bytes, step: int) -> None:
    a, b = Reader(data), Reader(source=Trickle(data, step))
    while True:
        assert a.peek(3) == b.peek(3)
        if a.at_end():
            assert b.at_end()
            break
        assert a.u8() == b.u8()
        assert a.tell() == b.tell()


def test_objects_load_from_a_trickling_stream() -> None:
    dev = Serial(divider=7, poll_msl=1)
    data = dev.save()
    r = Reader(source=Trickle(data, 3))
    assert Serial.load(r) == dev
    assert r.tell() == len(data)


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("step", [None, 1, 5])
def test_fields_of_several_versions_load_at_each_version(version: int, step: int | None) -> None:
    # divider (since 2), rbr..scr, fcr_vmstate (since 3): one Struct call at
    # version 3 when all 11 bytes are buffered, run by run otherwise.
    dev = Serial(divider=7, rbr=1, ier=2, iir=3, lcr=4, mcr=5, lsr=6, msr=7, scr=8, fcr_vmstate=9, poll_msl=1)
    data = dev.save(version_id=version)
    assert data[:2] == b"\x00\x07" and data[2:10] == bytes(range(1, 9))
    assert (data[10] == 9) == (version == 3)
    loaded = Serial.load(data if step is None else Reader(source=Trickle(data, step)), version_id=version)
    assert loaded.fcr_vmstate == (9 if version == 3 else None)
    assert (loaded.divider, loaded.scr, loaded.poll_msl) == (7, 8, 1)
    assert loaded.save(version_id=version) == data


def test_truncation_names_field_and_offset() -> None:
    data = Serial(divider=7).save()
    with pytest.raises(TruncatedStream) as info:
        Serial.load(data[:5])
    err = info.value
    assert isinstance(err, EOFError) and isinstance(err, VMSDError)
    assert err.path == "serial.rbr" and err.offset == 2
    assert str(err) == "serial.rbr: expected 8 bytes, stream ended after 3 (at offset 0x2)"
    # Cut inside the part present since version 3: the error names that field.
    with pytest.raises(TruncatedStream) as info:
        Serial.load(Serial(divider=7).save()[:10])
    assert info.value.path == "serial.fcr_vmstate" and info.value.offset == 10


def test_huge_length_field_allocates_only_what_arrives() -> None:
    """A count of 2**32-1 entries over a 100-byte stream fails without a giant allocation."""
    data = b"\xff\xff\xff\xff" + bytes(100)
    src = Trickle(data, 1 << 20)
    with pytest.raises(TruncatedStream):
        Heavy.load(Reader(source=src))
    assert src.largest_request <= 1 << 20


def test_socket_source() -> None:
    a, b = socket.socketpair()
    dev = Serial(scr=0x42, poll_msl=5)
    data = dev.save()

    def send() -> None:
        for i in range(0, len(data), 4):
            a.sendall(data[i : i + 4])
        a.close()

    t = threading.Thread(target=send)
    t.start()
    try:
        assert Serial.load(Reader(source=SocketSource(b))) == dev
    finally:
        t.join()
        b.close()


def test_readinto_fills_exactly() -> None:
    data = bytes(range(200))
    r = Reader(source=Trickle(data, 7))
    r.u8()
    out = bytearray(150)
    r.readinto(memoryview(out))
    assert bytes(out) == data[1:151] and r.tell() == 151
    with pytest.raises(TruncatedStream):
        r.readinto(memoryview(bytearray(100)))


def test_negative_read_is_malformed() -> None:
    with pytest.raises(MalformedStream):
        Reader(b"abc").read(-1)
