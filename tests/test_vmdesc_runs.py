"""QEMU 10.0's trailer rule for arrays (``describe(..., runs=True)``) beside 7.2's.

Expected entries are QEMU 10.0's vmstate_save_state_v() worked by hand: an
element gets ``index`` only while more than one element of its run is left,
and a null slot of an array of pointers is a one-byte ``nullptr`` entry
whose runs are cut where null and non-null slots alternate.
"""

from __future__ import annotations

from typing import Any

from generated_classes import all_classes
from vmsd.generated.examples.kinds import Kinds, KindsSub
from vmsd.runtime.generic import decode_body
from vmsd.runtime.io import Reader
from vmsd.runtime.vmdesc import Obj, array_rule, describe, dumps, loads
from vmsd.runtime.vmstate import impl

all_classes()  # test implementations of the example's custom predicates


def _kinds(slots: list[Any]) -> Any:
    obj = impl(Kinds)()
    obj.slots = slots
    obj.subs = [KindsSub(a=0), KindsSub(a=1, extra=7)]
    return obj


def _entries(body: Obj, name: str) -> list[list[str]]:
    """The keys of the field entries named ``name``, with index/array_len values."""
    out = []
    for e in body.get("fields"):
        if e.get("name") == name:
            out.append([f"{k}={v}" if k in ("index", "array_len", "type") else k for k, v in e])
    return out


def test_last_element_has_no_index_from_10_0() -> None:
    obj = _kinds([KindsSub(a=1, extra=2)] * 3)
    old, _ = describe(obj)
    new, _ = describe(obj, runs=True)
    # kinds_sub has a subsection, so its arrays cannot be compressed: one entry per element.
    assert _entries(old, "subs") == [["name", "index=0", "type=struct", "struct", "size"],
                                     ["name", "index=1", "type=struct", "struct", "size"]]
    assert _entries(new, "subs") == [["name", "index=0", "type=struct", "struct", "size"],
                                     ["name", "type=struct", "struct", "size"]]


def test_null_slots_are_nullptr_runs_from_10_0() -> None:
    obj = _kinds([None, KindsSub(a=3), KindsSub(a=0)])
    old, _ = describe(obj)
    new, size = describe(obj, runs=True)
    assert _entries(old, "slots") == [["name", "index=0", "type=struct", "struct", "size"],
                                      ["name", "index=1", "type=struct", "struct", "size"],
                                      ["name", "index=2", "type=struct", "struct", "size"]]
    assert _entries(new, "slots") == [["name", "type=nullptr", "size"],
                                      ["name", "index=1", "type=struct", "struct", "size"],
                                      ["name", "type=struct", "struct", "size"]]
    # Both describe the bytes QEMU writes: the interpretive decoder walks them to the end.
    wire = obj.save()
    assert size == len(wire)
    r = Reader(wire)
    decode_body(r, loads(dumps(new)))
    assert r.tell() == len(wire)


def test_null_run_of_a_field_that_does_not_compress() -> None:
    obj = _kinds([None, None, KindsSub(a=0)])
    new, _ = describe(obj, runs=True)
    # QEMU's fake nullptr field compresses, so a null run starts with array_len; but whether the
    # writer stops describing is decided by the real field (kinds_sub has a subsection: it does not),
    # so the second null slot gets an entry too, counting the elements left in the array.
    assert _entries(new, "slots") == [["name", "array_len=2", "type=nullptr", "size"],
                                      ["name", "array_len=2", "type=nullptr", "size"],
                                      ["name", "type=struct", "struct", "size"]]


def test_no_element_has_an_index_from_11_1() -> None:
    """QEMU 11.1 describes the same runs as 10.0 without any element's index; array_len stays."""
    obj = _kinds([None, None, KindsSub(a=0)])
    runs, _ = describe(obj, runs=True)
    bare, size = describe(obj, runs=True, indexes=False)
    assert _entries(bare, "subs") == [["name", "type=struct", "struct", "size"]] * 2
    assert _entries(bare, "slots") == _entries(runs, "slots")  # array_len only: nothing to drop
    # Only the index entries differ: the same entries otherwise, and the same bytes described.
    assert size == len(obj.save())
    drop = [[(k, v) for k, v in e if k != "index"] for e in runs.get("fields")]
    assert [list(e) for e in bare.get("fields")] == drop


def test_the_rule_is_read_back_from_a_trailer() -> None:
    """array_rule tells the three rules apart by what describe() writes under each; repeated unused
    entries are no array, and a trailer without element-wise arrays tells nothing."""
    obj = _kinds([KindsSub(a=1), None, KindsSub(a=2)])
    for rule in ((False, True), (True, True), (True, False)):
        body, _ = describe(obj, runs=rule[0], indexes=rule[1])
        assert array_rule(Obj([("devices", [body])])) == rule
    unused = Obj([("name", "unused"), ("type", "unused_buffer"), ("size", 4)])
    assert array_rule(Obj([("devices", [Obj([("fields", [unused, unused])])])])) is None
