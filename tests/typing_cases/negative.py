# ruff: noqa
# fmt: off
"""Misuse of generated classes that ``mypy --strict`` must reject.

Each offending line ends with the exact error mypy must report for it,
``# E: <message>  [code]`` (a line with two errors carries two ``# E:``).
tests/test_typing.py checks that mypy reports exactly these errors (notes are
not compared): a misuse mypy stops catching fails the test, and so does an
error on a line that is not annotated.  This file is only type-checked, never
run.  ``field_kinds`` is compiled from field_kinds.vmsd by the test.
"""

from __future__ import annotations

from field_kinds import FieldKinds, Item, Mode

from vmsd.generated.examples.fifo8 import Fifo8
from vmsd.generated.examples.hpet import Hpet, HpetTimer
from vmsd.generated.examples.i8254 import I8254, PitChannel
from vmsd.generated.examples.serial import Serial
from vmsd.generated.examples.uart16550 import LineControl, Uart16550
from vmsd.runtime import register


class FieldKindsDevice(FieldKinds):
    def has_gate(self, version_id: int) -> bool:
        return True


s = Serial()
k = FieldKindsDevice()

# -- wrong field types at construction ----------------------------------------

Serial(rbr="0x41")  # E: Argument "rbr" to "Serial" has incompatible type "str"; expected "int"  [arg-type]
Serial(divider="12")  # E: Argument "divider" to "Serial" has incompatible type "str"; expected "int | None"  [arg-type]
FieldKindsDevice(mac=0x525400123456)  # E: Argument "mac" to "FieldKindsDevice" has incompatible type "int"; expected "bytes"  [arg-type]
FieldKindsDevice(blob="abc")  # E: Argument "blob" to "FieldKindsDevice" has incompatible type "str"; expected "bytes"  [arg-type]
FieldKindsDevice(enabled=1)  # E: Argument "enabled" to "FieldKindsDevice" has incompatible type "int"; expected "bool"  [arg-type]
FieldKindsDevice(ratio="0.5")  # E: Argument "ratio" to "FieldKindsDevice" has incompatible type "str"; expected "float"  [arg-type]
FieldKindsDevice(extra=4)  # E: Argument "extra" to "FieldKindsDevice" has incompatible type "int"; expected "bytes | None"  [arg-type]
names: list[str] = ["a", "b"]
Fifo8(data=names)  # E: Argument "data" to "Fifo8" has incompatible type "list[str]"; expected "list[int]"  [arg-type]
Fifo8(data=b"\x00\x01")  # E: Argument "data" to "Fifo8" has incompatible type "bytes"; expected "list[int]"  [arg-type]
Fifo8(data=[1, "2"])  # E: List item 1 has incompatible type "str"; expected "int"  [list-item]
FieldKindsDevice(tab=[[1, 2, 3], 4])  # E: List item 1 has incompatible type "int"; expected "list[int]"  [list-item]
FieldKindsDevice(fregs=["1.0"])  # E: List item 0 has incompatible type "str"; expected "float"  [list-item]

# -- None for a field that exists at every version ------------------------------

Serial(rbr=None)  # E: Argument "rbr" to "Serial" has incompatible type "None"; expected "int"  [arg-type]
Serial(recv_fifo=None)  # E: Argument "recv_fifo" to "Serial" has incompatible type "None"; expected "Fifo8"  [arg-type]
FieldKindsDevice(mac=None)  # E: Argument "mac" to "FieldKindsDevice" has incompatible type "None"; expected "bytes"  [arg-type]
s.rbr = None  # E: Incompatible types in assignment (expression has type "None", variable has type "int")  [assignment]
s.recv_fifo = None  # E: Incompatible types in assignment (expression has type "None", variable has type "Fifo8")  [assignment]
s.recv_fifo.data = None  # E: Incompatible types in assignment (expression has type "None", variable has type "list[int]")  [assignment]

# -- unknown fields -----------------------------------------------------------

Serial(baud=9600)  # E: Unexpected keyword argument "baud" for "Serial"  [call-arg]
Serial(thr_ipending_=1)  # E: Unexpected keyword argument "thr_ipending_" for "Serial"; did you mean "thr_ipending"?  [call-arg]
s.dividr = 1  # E: "Serial" has no attribute "dividr"; maybe "divider"?  [attr-defined]
print(s.baud)  # E: "Serial" has no attribute "baud"  [attr-defined]

# -- optional fields used without narrowing -------------------------------------

s.divider + 1  # E: Unsupported operand types for + ("None" and "int")  [operator]
baud = 115200 // s.divider  # E: Unsupported operand types for // ("int" and "None")  [operator]
divider: int = s.divider  # E: Incompatible types in assignment (expression has type "int | None", variable has type "int")  [assignment]
range(s.fcr_vmstate)  # E: Argument 1 to "range" has incompatible type "int | None"; expected "SupportsIndex"  [arg-type]
Hpet.load(b"").num_timers > 3  # E: Unsupported operand types for < ("int" and "None")  [operator]
k.extra[0]  # E: Value of type "bytes | None" is not indexable  [index]
k.gated.bit_length()  # E: Item "None" of "int | None" has no attribute "bit_length"  [union-attr]
k.slots[0].v  # E: Item "None" of "Item | None" has no attribute "v"  [union-attr]

# -- enum fields take their enum ------------------------------------------------

Uart16550(lcr=Mode.BUSY)  # E: Argument "lcr" to "Uart16550" has incompatible type "Mode"; expected "LineControl"  [arg-type]
Uart16550(lcr=0x80)  # E: Argument "lcr" to "Uart16550" has incompatible type "int"; expected "LineControl"  [arg-type]
FieldKindsDevice(mode=LineControl.DLAB)  # E: Argument "mode" to "FieldKindsDevice" has incompatible type "LineControl"; expected "Mode"  [arg-type]
u = Uart16550()
u.lcr = 0x80  # E: Incompatible types in assignment (expression has type "int", variable has type "LineControl")  [assignment]
k.mode = 1  # E: Incompatible types in assignment (expression has type "int", variable has type "Mode")  [assignment]

# -- nested structs take their own class ----------------------------------------

Serial(recv_fifo=HpetTimer())  # E: Argument "recv_fifo" to "Serial" has incompatible type "HpetTimer"; expected "Fifo8"  [arg-type]
s.recv_fifo = PitChannel()  # E: Incompatible types in assignment (expression has type "PitChannel", variable has type "Fifo8")  [assignment]
I8254(channels=[HpetTimer()])  # E: List item 0 has incompatible type "HpetTimer"; expected "PitChannel"  [list-item]
I8254().channels.append(Fifo8())  # E: Argument 1 to "append" of "list" has incompatible type "Fifo8"; expected "PitChannel"  [arg-type]
FieldKindsDevice(one=Fifo8())  # E: Argument "one" to "FieldKindsDevice" has incompatible type "Fifo8"; expected "Item"  [arg-type]
FieldKindsDevice(slots=[Fifo8(), None])  # E: List item 0 has incompatible type "Fifo8"; expected "Item | None"  [list-item]
FieldKindsDevice(tree=[(Item(), 1)])  # E: List item 0 has incompatible type "tuple[Item, int]"; expected "tuple[int, Item]"  [list-item]
FieldKindsDevice(queue=Item())  # E: Argument "queue" to "FieldKindsDevice" has incompatible type "Item"; expected "list[Item]"  [arg-type]
s.recv_fifo.data.append("A")  # E: Argument 1 to "append" of "list" has incompatible type "str"; expected "int"  [arg-type]

# -- custom(...) predicates must be implemented ---------------------------------

Hpet()  # E: Cannot instantiate abstract class "Hpet" with abstract attribute "offset_needed"  [abstract]
FieldKinds()  # E: Cannot instantiate abstract class "FieldKinds" with abstract attribute "has_gate"  [abstract]


class ForgotPredicate(Hpet):
    def post_load(self, version_id: int) -> None:
        pass


ForgotPredicate()  # E: Cannot instantiate abstract class "ForgotPredicate" with abstract attribute "offset_needed"  [abstract]
register(Hpet)  # E: Only concrete class can be given where "type[Hpet]" is expected  [type-abstract]
register(ForgotPredicate)  # E: Only concrete class can be given where "type[ForgotPredicate]" is expected  [type-abstract]


class WrongSignature(Hpet):
    def offset_needed(self) -> bool:  # E: Signature of "offset_needed" incompatible with supertype "vmsd.generated.examples.hpet.Hpet"  [override]
        return True


class WrongReturn(Hpet):
    def offset_needed(self, version_id: int) -> int:  # E: Return type "int" of "offset_needed" incompatible with return type "bool" in supertype "vmsd.generated.examples.hpet.Hpet"  [override]
        return 1


class WrongHook(Hpet):
    def offset_needed(self, version_id: int) -> bool:
        return True

    def post_load(self) -> None:  # E: Signature of "post_load" incompatible with supertype "vmsd.runtime.vmstate.VMStateObject"  [override]
        pass


register(int)  # E: Value of type variable "T" of "register" cannot be "int"  [type-var]

# -- save and load ----------------------------------------------------------

data: str = s.save()  # E: Incompatible types in assignment (expression has type "bytes", variable has type "str")  [assignment]
wrong: Hpet = Serial.load(b"")  # E: Incompatible types in assignment (expression has type "Serial", variable has type "Hpet")  [assignment]
Serial.load(b"", "3")  # E: Argument 2 to "load" of "VMStateObject" has incompatible type "str"; expected "int | None"  [arg-type]
s.save(version_id="3")  # E: Argument "version_id" to "save" of "VMStateObject" has incompatible type "str"; expected "int | None"  [arg-type]
s.load_into(b"", 3, 4)  # E: Too many arguments for "load_into" of "VMStateObject"  [call-arg]

# -- class constants are not per instance ---------------------------------------

s.VERSION_ID = 4  # E: Cannot assign to class variable "VERSION_ID" via instance  [misc]  # E: Trying to assign name "VERSION_ID" that is not in "__slots__" of type "vmsd.generated.examples.serial.Serial"  [misc]
