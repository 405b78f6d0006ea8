"""Correct uses of generated classes: must pass ``mypy --strict`` with no error.

Checked by tests/test_typing.py, which also runs this file, so every use here
works at run time too.  ``assert_type`` pins the exact static type of each
attribute: a generated annotation that drifts (``int`` becoming ``Any``, an
optional field losing ``| None``) fails the check.  ``field_kinds`` is compiled
from field_kinds.vmsd by the test.
"""

from __future__ import annotations

from typing import assert_type

import attrs
from field_kinds import FieldKinds, Item, Mode

from vmsd.generated.examples.fifo8 import Fifo8
from vmsd.generated.examples.hpet import Hpet, HpetTimer
from vmsd.generated.examples.i8254 import I8254, PitChannel
from vmsd.generated.examples.serial import Serial
from vmsd.generated.examples.uart16550 import LineControl, Uart16550
from vmsd.runtime import Reader, VMStateObject, Writer, register

# -- construction with keyword arguments, defaults, nested structs -----------

s = Serial(divider=12, lcr=0x03, recv_fifo=Fifo8(capacity=16, data=[0] * 16))
assert_type(s, Serial)
assert_type(s.rbr, int)
assert_type(s.thr_ipending, int)  # subsection fields keep their default when absent
assert_type(s.recv_fifo, Fifo8)
assert_type(s.recv_fifo.data, list[int])
s.recv_fifo.data[0] = 0x41
s.recv_fifo.num += 1
s.modem_status_poll = -1  # a timer is its int64 expiry
Serial(divider=None, fcr_vmstate=None)  # fields that exist only from some version accept None

# -- optional fields must be narrowed before use as their value type --------

assert_type(s.divider, int | None)
if s.divider is not None:
    assert_type(s.divider, int)
    baud = 115200 // s.divider
divider: int = s.divider if s.divider is not None else 0
assert_type(s.fcr_vmstate, int | None)
v2 = Serial(fcr_vmstate=None)  # absent at version 2, so a version 2 save accepts None
v2.save(version_id=2)

# -- class constants ---------------------------------------------------------

assert_type(Serial.VMSD_NAME, str)
assert_type(Serial.VERSION_ID, int)
assert_type(Serial.MINIMUM_VERSION_ID, int)

# -- save and load -----------------------------------------------------------

plain = Serial(divider=12, lcr=0x03)
wire = plain.save()
assert_type(wire, bytes)
assert_type(plain.save(version_id=2), bytes)
back = Serial.load(wire)
assert_type(back, Serial)
assert back == plain
assert_type(Serial.load(bytearray(wire)), Serial)
assert_type(Serial.load(memoryview(wire), version_id=3), Serial)
assert_type(Serial.load(Reader(wire)), Serial)
w = Writer()
s.save(w)
into = Serial()  # QEMU loads into a realized device: the FIFO capacity must match
into.recv_fifo = Fifo8(capacity=16, data=[0] * 16)
into.load_into(bytes(w.buf))
assert into == s
assert_type(attrs.evolve(s, rbr=1), Serial)


def save_any(obj: VMStateObject) -> bytes:
    """Every generated class is a VMStateObject."""
    return obj.save()


save_any(s)
save_any(Uart16550())

# -- a custom(...) predicate: subclass, implement it, register ---------------


@register
class HpetDevice(Hpet):
    """The spec's custom(offset_needed), supplied by the device author."""

    def offset_needed(self, version_id: int) -> bool:
        return self.hpet_offset != 0

    def post_load(self, version_id: int) -> None:
        if self.num_timers is None:  # a version 1 stream has no num_timers
            self.num_timers = len(self.timer)


assert_type(HpetDevice, type[HpetDevice])
hpet = HpetDevice(num_timers=3, timer=[HpetTimer(tn=i) for i in range(3)], hpet_offset=5)
assert_type(hpet.timer, list[HpetTimer])
assert_type(hpet.timer[0].qemu_timer, int)
assert_type(hpet.num_timers, int | None)
assert_type(hpet.legacy_route, int | None)
assert_type(hpet.offset_needed(2), bool)
assert_type(Hpet.load(hpet.save()), Hpet)  # builds the registered HpetDevice
assert isinstance(Hpet.load(hpet.save()), HpetDevice)
assert_type(HpetDevice.load(hpet.save()), HpetDevice)
as_base: Hpet = hpet


@attrs.define(eq=True)
class HpetWithExtras(Hpet):
    """A subclass may itself be an attrs class with state of its own."""

    irq_count: int = 0

    def offset_needed(self, version_id: int) -> bool:
        return False


assert_type(register(HpetWithExtras), type[HpetWithExtras])
assert_type(HpetWithExtras(config=1, irq_count=2).irq_count, int)
register(HpetDevice)

# -- enums -------------------------------------------------------------------

u = Uart16550(lcr=LineControl.DLAB)
assert_type(u.lcr, LineControl)
u.lcr |= LineControl.PARITY
u.lcr = LineControl.WORD_LEN_8 | LineControl.STOP_2
u.lcr = LineControl(0x83)
if u.lcr & LineControl.DLAB:
    u.lcr &= ~LineControl.DLAB
assert_type(Uart16550.load(u.save()).lcr, LineControl)
lcr_bits: int = u.lcr  # an IntFlag is an int

# -- fixed arrays of structs -------------------------------------------------

pit = I8254(ch0_irq_disabled=0, channels=[PitChannel(count=0x10000) for _ in range(3)])
assert_type(pit.channels, list[PitChannel])
assert_type(pit.channels[0].count, int)
assert_type(pit.ch0_irq_disabled, int | None)
assert_type(I8254.load(pit.save()), I8254)

# -- the other field kinds (field_kinds.vmsd) --------------------------------


@register
class FieldKindsDevice(FieldKinds):
    def has_gate(self, version_id: int) -> bool:
        return self.enabled


k = FieldKindsDevice(
    enabled=True,
    ratio=0.5,
    fregs=[1.0, 2.0],
    n=3,
    mac=b"\x52\x54\x00\x12\x34\x56",
    blob=bytes(3),
    regs=[1, 2, 3, 4],
    tab=[[1, 2, 3], [4, 5, 6]],
    mode=Mode.BUSY,
    one=Item(v=1),
    slots=[Item(v=2), None],
    queue=[Item(v=3)],
    tree=[(7, Item(v=4))],
    dirty=1 << 69,
    extra=b"abcd",
    gated=9,
)
assert_type(k.enabled, bool)
assert_type(k.ratio, float)
assert_type(k.fregs, list[float])
assert_type(k.mac, bytes)
assert_type(k.blob, bytes)
assert_type(k.regs, list[int])
assert_type(k.tab, list[list[int]])
assert_type(k.tab[1][2], int)
assert_type(k.mode, Mode)
assert_type(k.one, Item)
assert_type(k.slots, list[Item | None])
assert_type(k.queue, list[Item])
assert_type(k.tree, list[tuple[int, Item]])
assert_type(k.dirty, int)
assert_type(k.extra, bytes | None)
assert_type(k.gated, int | None)
k.ratio = 3  # int is acceptable where float is expected
k.blob = bytes(k.n)
slot = k.slots[0]
if slot is not None:
    assert_type(slot.v, int)
if k.extra is not None:
    assert_type(k.extra[0], int)
for key, item in k.tree:
    assert_type(key, int)
    assert_type(item, Item)
k2 = FieldKindsDevice(slots=[Item(), None])  # as in QEMU, a non-NULL slot must exist on the destination
k2.load_into(k.save())
assert k2 == k
assert_type(FieldKinds.load(attrs.evolve(k, slots=[None, None]).save()), FieldKinds)
