"""The language's tables (vmsd.runtime.scalars, vmsd.runtime.kinds) agree with each stage that reads them."""

from __future__ import annotations

import re
import struct
import tempfile
import types
from pathlib import Path
from typing import Any

import pytest

from vmsd.codegen.compiler import compile_specs
from vmsd.grammar.loader import load
from vmsd.grammar.parser import _parser
from vmsd.grammar.semantic import walk_fields
from vmsd.runtime.generic import decode_body, encode_body
from vmsd.runtime.io import Reader, Writer
from vmsd.runtime.kinds import KINDS
from vmsd.runtime.scalars import BY_INFO, BY_NAME, SCALARS, Scalar
from vmsd.runtime.vmdesc import describe

SPECS = Path(__file__).parent.parent / "specs"

# The VMStateInfo names QEMU gives fixed-size scalar values
# (migration/vmstate-types.c, migration/savevm.c): what a stream's JSON says.
QEMU_SCALAR_INFOS = {
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "int32 equal", "int32 le", "uint8 equal", "uint16 equal", "uint32 equal", "int64 equal",
    "timer", "float64", "CPU_Double_U",
}
# QEMU's flags for an array counted by another field (include/migration/vmstate.h).
QEMU_VARRAY_FLAGS = {"VMS_VARRAY_INT32", "VMS_VARRAY_UINT8", "VMS_VARRAY_UINT16", "VMS_VARRAY_UINT32"}


def test_every_scalar_type_of_the_grammar_has_one_row() -> None:
    pattern = _parser()[0].get_terminal("SCALAR_TYPE").pattern.value
    alternatives = re.fullmatch(r"\(\?:(.*)\)", pattern)
    assert alternatives is not None, pattern
    assert set(alternatives.group(1).split("|")) == set(BY_NAME)
    assert len(BY_NAME) == len(SCALARS)


def test_every_field_rule_of_the_grammar_is_a_kind() -> None:
    rules = {str(r.origin.name) for r in _parser()[0].rules}
    assert {name.removesuffix("_field") for name in rules if name.endswith("_field")} == set(KINDS)


def _kinds_in(paths: list[Path]) -> set[str]:
    program = load(paths)
    return {f.kind for spec in program.files.values() for v in spec.vmsds for f, _ in walk_fields(v.fields, v.subsections)}


def test_every_kind_appears_in_the_shipped_specs() -> None:
    # kinds.vmsd is property-tested field by field; an opaque field needs a
    # registered extent, which QEMU's specs have.
    assert _kinds_in([SPECS / "examples" / "kinds.vmsd"]) == set(KINDS) - {"opaque"}
    assert "opaque" in _kinds_in(sorted((SPECS / "qemu").rglob("*.vmsd")))


@pytest.mark.parametrize("s", SCALARS, ids=lambda s: s.name)
def test_scalar_size_range_and_python_type_match_its_struct_format(s: Scalar) -> None:
    fmt = struct.Struct(">" + s.fmt)
    assert fmt.size == s.size
    if s.py_type == "float":
        assert s.range is None and s.signed
        assert fmt.unpack(fmt.pack(-1.5)) == (-1.5,)
        return
    assert s.range is not None
    lo, hi = s.range
    assert s.signed == (lo < 0)
    named = re.fullmatch(r"(u?)int([0-9]+)", s.name)
    assert s.integer == bool(named)
    if named:  # the name says the signedness and width
        assert (s.signed, s.size * 8) == (not named.group(1), int(named.group(2)))
    if s.py_type == "bool":
        assert (lo, hi) == (0, 1) and fmt.unpack(fmt.pack(True)) == (True,)
        return
    assert fmt.unpack(fmt.pack(lo)) == (lo,) and fmt.unpack(fmt.pack(hi)) == (hi,)
    for outside in (lo - 1, hi + 1):
        with pytest.raises(struct.error):
            fmt.pack(outside)


def test_qemu_scalar_type_names_map_back_to_one_row_each() -> None:
    assert set(BY_INFO) == QEMU_SCALAR_INFOS
    infos = [info for s in SCALARS for info in (s.info, s.equal_info, s.le_info) if info is not None]
    assert len(infos) == len(set(infos))  # no name stands for two rows
    assert BY_INFO["int64 equal"] == (BY_NAME["uint64"], "equal")
    assert BY_INFO["CPU_Double_U"] == (BY_NAME["cpudouble"], None)
    assert {s.varray_flag for s in SCALARS} - {None} == QEMU_VARRAY_FLAGS
    for s in SCALARS:
        # Only integers are checked or count arrays, each with the flag of its own type.
        assert s.integer or (s.equal_info, s.le_info, s.varray_flag) == (None, None, None)
        assert s.varray_flag in (None, f"VMS_VARRAY_{s.name.upper()}")


def _compile(source: str) -> types.ModuleType:
    with tempfile.TemporaryDirectory() as d:
        spec = Path(d) / "probe.vmsd"
        spec.write_text(source)
        text = compile_specs([spec], d)[Path("probe.py")]
    module = types.ModuleType("probe")
    exec(compile(text, "probe.py", "exec"), module.__dict__)
    return module


def _sample(s: Scalar) -> Any:
    if s.py_type == "bool":
        return True
    if s.range is None:
        return -1.5
    return s.range[0] if s.signed else s.range[1]


@pytest.mark.parametrize("s", SCALARS, ids=lambda s: s.name)
def test_each_scalar_agrees_across_codegen_description_decoder_and_importer(s: Scalar) -> None:
    """Typed save, its JSON description, the interpretive decoder and the importer's
    reading of that description all use the same row."""
    checks = [(check, info) for check, info in (("equal", s.equal_info), ("le", s.le_info)) if info is not None]
    extra = "".join(f"    {s.name} {check}_field {check}\n" for check, _ in checks)
    counter = f"    {s.name} n\n    uint8 counted[n]\n" if s.varray_flag is not None else ""
    module = _compile(f"vmsd probe version 1 minimum 1 {{\n    {s.name} one\n    {s.name} two[2]\n{extra}{counter}}}\n")
    obj = module.Probe()
    value = _sample(s)
    obj.one = value
    obj.two = [value, value]
    if s.varray_flag is not None:
        obj.n = 2
        obj.counted = [7, 8]
    data = obj.save()
    values_of_s = 3 + len(checks) + (1 if counter else 0)
    assert len(data) == values_of_s * s.size + (2 if counter else 0)

    fields = {f.attr: f for f in module.Probe.VMSD.fields}
    assert (fields["one"].info, fields["one"].elem_size) == (s.info, s.size)
    for check, info in checks:
        assert fields[f"{check}_field"].info == info
    if s.varray_flag is not None:
        assert s.varray_flag in fields["counted"].flags
    for f in fields.values():
        if f.kind == "scalar" and f.attr != "counted":
            assert BY_INFO[f.info][0] == s  # the importer writes this field back with this type

    body, size = describe(obj)
    assert size == len(data)
    values = dict(decode_body(Reader(data), body))
    assert values["one"] == value and values["two"] == [value, value]
    w = Writer()
    encode_body(w, body, decode_body(Reader(data), body))
    assert bytes(w.buf) == data
