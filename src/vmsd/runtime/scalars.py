"""The language's scalar types, one row each: every fact a stage needs about one.

The checker reads value ranges and which types may be enum bases, checked or
counters; the code generator reads struct formats, sizes, Python types and
QEMU's type names; the interpretive decoder (:mod:`vmsd.runtime.generic`)
and the importer go from QEMU's type names in a stream's JSON back to a row
with :data:`BY_INFO`.  The grammar's ``SCALAR_TYPE`` terminal lists the same
names (tests/test_tables.py holds the two together).
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Scalar:
    name: str  # the type's name in specs
    fmt: str  # struct format letter; QEMU writes every scalar big-endian
    size: int  # bytes on the wire
    py_type: str  # annotation of a value in generated code: int, bool or float
    range: tuple[int, int] | None  # lowest and highest value; None for floats
    info: str  # QEMU's VMStateInfo name, the "type" of QEMU's JSON
    # An integer proper: may be an enum's base, carry 'equal'/'le', count an array.
    integer: bool = False
    equal_info: str | None = None  # QEMU's VMStateInfo of the EQUAL check on this type, where QEMU has one
    le_info: str | None = None  # QEMU's VMStateInfo of the POSITIVE_LE check, where QEMU has one
    varray_flag: str | None = None  # QEMU's VMS_VARRAY_* flag, where QEMU can count a variable array with it

    @property
    def signed(self) -> bool:
        """Whether the type holds negative values (floats do)."""
        return self.range is None or self.range[0] < 0


def _int(
    name: str, fmt: str, size: int, *, equal: str | None = None, le: str | None = None, varray: str | None = None
) -> Scalar:
    """An integer type; struct's lower-case letters are the signed ones."""
    bits = size * 8
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if fmt.islower() else (0, (1 << bits) - 1)
    return Scalar(name, fmt, size, "int", (lo, hi), name, True, equal, le, varray)


SCALARS: tuple[Scalar, ...] = (
    Scalar("bool", "?", 1, "bool", (0, 1), "bool"),
    _int("int8", "b", 1),
    _int("int16", "h", 2),
    _int("int32", "i", 4, equal="int32 equal", le="int32 le", varray="VMS_VARRAY_INT32"),
    _int("int64", "q", 8),
    _int("uint8", "B", 1, equal="uint8 equal", varray="VMS_VARRAY_UINT8"),
    _int("uint16", "H", 2, equal="uint16 equal", varray="VMS_VARRAY_UINT16"),
    _int("uint32", "I", 4, equal="uint32 equal", varray="VMS_VARRAY_UINT32"),
    # QEMU names vmstate_info_uint64_equal "int64 equal".
    _int("uint64", "Q", 8, equal="int64 equal"),
    # A QEMUTimer's expiry time: an int64 on the wire, but no enum base, check or counter.
    Scalar("timer", "q", 8, "int", (-(1 << 63), (1 << 63) - 1), "timer"),
    Scalar("float64", "d", 8, "float", None, "float64"),
    Scalar("cpudouble", "d", 8, "float", None, "CPU_Double_U"),
)

BY_NAME: dict[str, Scalar] = {s.name: s for s in SCALARS}

# QEMU's JSON type name -> the row and the check ('equal', 'le', or None) it stands for.
BY_INFO: dict[str, tuple[Scalar, str | None]] = {
    info: (s, check)
    for s in SCALARS
    for info, check in ((s.info, None), (s.equal_info, "equal"), (s.le_info, "le"))
    if info is not None
}
