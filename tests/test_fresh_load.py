"""How ``load()`` builds objects: bare instances where that is safe, full defaults where hooks may look.

The equality of ``load()`` and ``load_into()`` for every shipped class is a
property test in test_roundtrip.py; these are the rules around it.
"""

from __future__ import annotations

from typing import Any

import pytest

from generated_classes import all_classes
from vmsd.generated.examples.fifo8 import Fifo8
from vmsd.generated.examples.serial import Serial
from vmsd.runtime import register
from vmsd.runtime.vmstate import _IMPLS, ABSENT, impl, new_array

FLAT = [c for c in all_classes() if getattr(c, "_FLAT", None) is not None]


@pytest.mark.parametrize("cls", FLAT, ids=[c.__name__ for c in FLAT])
def test_default_arrays_of_flat_structs_equal_constructed_ones(cls: Any) -> None:
    built = new_array(cls, 5)
    assert built == [impl(cls)() for _ in range(5)]
    assert len({id(x) for x in built}) == 5  # distinct objects


def test_absent_subsection_fields_get_their_defaults_and_present_ones_their_values() -> None:
    # recv_fifo (a struct in a subsection) absent: built with its defaults after the load.
    bare = Serial.load(Serial(divider=12, poll_msl=-1).save())
    assert bare.recv_fifo == Fifo8()
    assert bare.poll_msl == 0  # the poll subsection was not sent: the default, as in QEMU
    fifo = Fifo8(head=3, num=2)  # capacity is an "equal" check: the default 0 on both sides
    loaded = Serial.load(Serial(divider=12, recv_fifo=fifo).save())
    assert loaded.recv_fifo == fifo
    assert all(getattr(loaded, a.name) is not ABSENT for a in Serial.__attrs_attrs__)


def test_a_pre_load_hook_sees_a_fully_defaulted_object() -> None:
    seen: list[dict[str, Any]] = []

    class Watched(Serial):
        def pre_load(self) -> None:
            seen.append({a.name: getattr(self, a.name) for a in Serial.__attrs_attrs__})

    register(Watched)
    try:
        obj = Serial.load(Serial(divider=7, lcr=3).save())
    finally:
        _IMPLS.pop(Serial, None)
    assert type(obj) is Watched and obj.divider == 7 and obj.lcr == 3
    assert seen == [{a.name: getattr(Serial(), a.name) for a in Serial.__attrs_attrs__}]


def test_a_post_load_hook_sees_every_field_set() -> None:
    seen: list[dict[str, Any]] = []

    class Watched(Serial):
        def post_load(self, version_id: int) -> None:
            seen.append({a.name: getattr(self, a.name) for a in Serial.__attrs_attrs__})

    register(Watched)
    try:
        source = Serial(divider=7, lcr=3, recv_fifo=Fifo8(head=1, num=1))
        Serial.load(source.save())
    finally:
        _IMPLS.pop(Serial, None)
    assert seen and ABSENT not in seen[0].values()
    assert seen[0]["recv_fifo"] == source.recv_fifo and seen[0]["divider"] == 7


def test_a_bad_element_of_a_packed_struct_array_is_named() -> None:
    from vmsd.generated.bench.heavy import Heavy, HeavyEntry
    from vmsd.runtime import SaveError

    good = Heavy(count=2, entries=[HeavyEntry(addr=1), HeavyEntry(addr=2)])
    assert Heavy.load(good.save()) == good  # the packed loop wrote both elements
    bad = Heavy(count=2, entries=[HeavyEntry(addr=1), HeavyEntry(addr=1 << 64)])
    with pytest.raises(SaveError, match=r"entries.*\[1\]"):
        bad.save()
