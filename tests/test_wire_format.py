"""Byte-level vectors: each field kind encodes exactly as QEMU's VMState does."""

from __future__ import annotations

import struct

import pytest

from generated_classes import KindsForTests
from vmsd.generated.examples.kinds import Irq, KindsElem, KindsKey, KindsSub, Mode
from vmsd.generated.examples.serial import Serial
from vmsd.runtime import CheckFailed, MalformedStream, SaveError
from vmsd.runtime.io import Reader, Writer
from vmsd.runtime.vmstate import (
    load_bitmap,
    load_gtree,
    load_nullable_array,
    save_bitmap,
    save_gtree,
    save_nullable_array,
)


def test_pcspk_style_vector_from_qemu() -> None:
    # 'timer' section payload in a QEMU 7.2 stream: int64, 8 unused bytes, int64 (all zero).
    s = Serial(divider=0x0102, rbr=3, ier=4, iir=5, lcr=6, mcr=7, lsr=8, msr=9, scr=10, fcr_vmstate=11, poll_msl=-1)
    assert s.save() == bytes.fromhex("0102 03 04 05 06 07 08 09 0a 0b")


def test_subsection_header_and_version() -> None:
    s = Serial(poll_msl=1, modem_status_poll=-1)
    tail = s.save()[11:]
    assert tail == b"\x05\x0bserial/poll" + b"\x00\x00\x00\x01" + b"\x00\x00\x00\x01" + b"\xff" * 8


def test_subsection_version_keeps_low_byte_only() -> None:
    wire = bytearray(Serial(poll_msl=1).save())
    wire[11 + 2 + 11 : 11 + 2 + 11 + 4] = struct.pack(">I", 0x101)  # QEMU loads 0x101 as version 1
    assert Serial.load(bytes(wire)).poll_msl == 1


def test_bitmap_words_are_lsb_first_be64() -> None:
    w = Writer()
    save_bitmap(w, (1 << 0) | (1 << 65), 70, "b")
    assert w.getvalue() == struct.pack(">QQ", 1, 2)
    assert load_bitmap(Reader(w.getvalue()), 70) == (1 << 0) | (1 << 65)
    with pytest.raises(SaveError):
        save_bitmap(Writer(), 1 << 128, 70, "b")


def test_nullable_slots_use_qemu_marker() -> None:
    slots: list[KindsSub | None] = [None, KindsSub(a=0), None]
    w = Writer()
    save_nullable_array(w, slots, 3, 1, "slots")
    assert w.getvalue() == b"\x30\x00\x30"
    # The destination's own slots decide which elements are markers.
    back = load_nullable_array(Reader(w.getvalue()), 3, 1, [None, KindsSub(a=9), None])
    assert back == slots
    with pytest.raises(MalformedStream):
        load_nullable_array(Reader(b"\x31\x00\x30"), 3, 1, [None, KindsSub(), None])


def test_gtree_count_markers_and_direct_keys() -> None:
    items = [(0x1000, KindsElem(id=1, bias=-1)), (0x2000, KindsElem(id=2, bias=2))]
    w = Writer()
    save_gtree(w, items, 2, True)
    elem = lambda i, b: struct.pack(">Hb", i, b)  # noqa: E731
    expected = b"\x00\x00\x00\x02" + b"\x01" + struct.pack(">Q", 0x1000) + elem(1, -1)
    expected += b"\x01" + struct.pack(">Q", 0x2000) + elem(2, 2) + b"\x00"
    assert w.getvalue() == expected
    assert load_gtree(Reader(expected), None, KindsElem, 2) == items
    with pytest.raises(MalformedStream):
        load_gtree(Reader(b"\x00\x00\x00\x01" + expected[4:]), None, KindsElem, 2)


def test_gtree_with_struct_keys() -> None:
    items = [(KindsKey(lo=1, hi=2), KindsElem(id=3, bias=4))]
    w = Writer()
    save_gtree(w, items, 2, False)
    assert w.getvalue() == b"\x00\x00\x00\x01\x01" + struct.pack(">II", 1, 2) + struct.pack(">Hb", 3, 4) + b"\x00"
    assert load_gtree(Reader(w.getvalue()), KindsKey, KindsElem, 2) == items


def test_kinds_layout_and_checks() -> None:
    k = KindsForTests(mode=Mode.WAIT, irq=Irq.RX | Irq.TX, n=1, vals=[1, 2], words=[3], blob=b"z", var=[KindsElem()])
    k.queue = [KindsElem(id=7)]
    k.maybe = None  # 'if (n > 1 && ...)' is false: not sent, loads as None
    wire = k.save()
    back = KindsForTests.load(wire)
    assert back == k and back.mode is Mode.WAIT and isinstance(back.irq, Irq)
    # A value outside the enum survives the round trip.
    k.mode = Mode(77)
    assert KindsForTests.load(k.save()).mode == 77
    # equal: the destination's cap is 8; a stream saying 9 is refused with the offset.
    k2 = KindsForTests(cap=9)
    with pytest.raises(CheckFailed, match="0x9 != 0x8"):
        KindsForTests.load(k2.save())
    # le: 0 <= incoming <= destination's 100
    with pytest.raises(CheckFailed, match="expecting positive value <= 100"):
        KindsForTests.load(KindsForTests(limit=101).save())
    with pytest.raises(SaveError, match="n small"):
        KindsForTests(n=65, vals=[0] * 130, words=[0] * 65, blob=bytes(65), var=[KindsElem()] * 65).save()
