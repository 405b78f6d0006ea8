"""A value that cannot be saved is named: its path, the value, and what its type or spec allows.

The spec below puts scalars, a fixed array, a 2-D array and an optional field into one fused
``struct.Struct`` run (the compiler packs them with one call), next to a counted array, a buffer, a
struct array and a subsection, each of which names its own problems.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmsd.cli import main
from vmsd.generated.qemu.v7_2.mc146818rtc import Mc146818Rtc
from vmsd.runtime import SaveError
from vmsd.runtime.scalars import BY_NAME

SPEC = """\
vmsd "led" version 1 minimum 1 class Led {
    uint8 on
    uint16 duty
}
vmsd "blinker" version 2 minimum 1 class Blinker {
    uint32 period
    uint32 regs[4]
    int8 level
    uint16 extra since 2
    uint8 grid[2][3]
    uint32 n
    uint16 samples[n]
    bytes tag[4]
    struct led leds[2]
    subsection "blinker/more" version 1 needed (period != 0) {
        uint32 a
        uint64 b[2]
    }
}
"""


@pytest.fixture(scope="module")
def blinker(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    root = tmp_path_factory.mktemp("blame")
    spec = root / "blame_case.vmsd"
    spec.write_text(SPEC)
    out = root / "out"
    assert main(["compile", "-o", str(out), str(spec)]) == 0
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("blame_case")
    finally:
        sys.path.remove(str(out))


def save_error(obj: Any) -> str:
    with pytest.raises(SaveError) as info:
        obj.save()
    return str(info.value)


def test_the_fused_run_is_one_struct_call(blinker: ModuleType) -> None:
    """The premise: period, regs, level, extra and grid are packed together, so struct's error names none."""
    source = Path(blinker.__file__).read_text()
    assert "self.period, *self.regs, self.level" in source


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"regs": [1, 2, 3, 2**40]},
         "blinker.regs[3]: 1099511627776 (0x10000000000) is out of range for uint32 (0..4294967295)"),
        ({"level": 200}, "blinker.level: 200 (0xc8) is out of range for int8 (-128..127)"),
        ({"period": -1}, "blinker.period: -1 is out of range for uint32 (0..4294967295)"),
        ({"regs": [1, 2, 3, "x"]}, "blinker.regs[3]: 'x' is not an integer (uint32)"),
        ({"extra": None}, "blinker.extra: is None, but saving version 2 needs a value"),
        ({"grid": [[1, 2, 3], [4, 5, 256]]}, "blinker.grid[1][2]: 256 (0x100) is out of range for uint8 (0..255)"),
        # Two bad values in one run: the first in save order is the one named.
        ({"period": 2**32, "level": 1000},
         "blinker.period: 4294967296 (0x100000000) is out of range for uint32 (0..4294967295)"),
    ],
)
def test_a_bad_value_in_a_fused_run_is_named(blinker: ModuleType, values: dict[str, Any], message: str) -> None:
    assert save_error(blinker.Blinker(**values)) == message


def test_a_fixed_array_of_the_wrong_length_says_the_spec_fixes_it(blinker: ModuleType) -> None:
    assert save_error(blinker.Blinker(regs=[1, 2, 3])) == "blinker.regs: has 3 elements, the spec fixes 4"
    assert save_error(blinker.Blinker(grid=[[1, 2, 3]])) == "blinker.grid: must be 2 rows of 3 elements"
    assert save_error(blinker.Blinker(tag=b"abc")) == "blinker.tag: has 3 bytes, the spec fixes 4"


def test_a_counted_array_names_its_length_field(blinker: ModuleType) -> None:
    assert save_error(blinker.Blinker(n=2, samples=[1])) == "blinker.samples: has 1 element, its length field n says 2"
    assert save_error(blinker.Blinker(n=2, samples=[1, 70000])) == (
        "blinker.samples[1]: 70000 (0x11170) is out of range for uint16 (0..65535)"
    )


def test_struct_array_elements_and_subsection_fields_are_named(blinker: ModuleType) -> None:
    leds = [blinker.Led(), blinker.Led(duty=-1)]
    assert save_error(blinker.Blinker(leds=leds)) == "blinker.leds[1].duty: -1 is out of range for uint16 (0..65535)"
    # Subsection fields are attributes of the object itself: no enclosing field in the path.
    assert save_error(blinker.Blinker(period=1, b=[1, 2**64])) == (
        "blinker.b[1]: 18446744073709551616 (0x10000000000000000) is out of range for uint64 (0..18446744073709551615)"
    )
    blinker.Blinker(period=0, a=2**33).save()  # the subsection is not sent: its value is never encoded


_FUSED = [("period", None, "uint32"), ("regs", 0, "uint32"), ("regs", 3, "uint32"), ("level", None, "int8"),
          ("extra", None, "uint16"), ("grid", (1, 1), "uint8")]


@given(st.sampled_from(_FUSED), st.booleans(), st.integers(1, 2**70))
def test_any_out_of_range_value_of_the_run_is_named(
    blinker: ModuleType, field: tuple[str, Any, str], below: bool, excess: int
) -> None:
    name, index, type_name = field
    range_ = BY_NAME[type_name].range
    assert range_ is not None
    value = range_[0] - excess if below else range_[1] + excess
    obj = blinker.Blinker()
    path = name
    if index is None:
        setattr(obj, name, value)
    elif isinstance(index, tuple):
        getattr(obj, name)[index[0]][index[1]] = value
        path += f"[{index[0]}][{index[1]}]"
    else:
        getattr(obj, name)[index] = value
        path += f"[{index}]"
    message = save_error(obj)
    assert message.startswith(f"blinker.{path}: {value} ")
    assert message.endswith(f"is out of range for {type_name} ({range_[0]}..{range_[1]})")


def test_a_shipped_class_names_the_field() -> None:
    """mc146818rtc packs cmos_data .. next_alarm_time in one run: base_rtc, well inside it, is named."""
    rtc = Mc146818Rtc()
    rtc.base_rtc = 2**64
    assert save_error(rtc) == (
        "mc146818rtc.base_rtc: 18446744073709551616 (0x10000000000000000) is out of range for uint64 "
        "(0..18446744073709551615)"
    )
    rtc = Mc146818Rtc()
    rtc.cmos_data = bytes(127)
    assert save_error(rtc) == "mc146818rtc.cmos_data: has 127 bytes, the spec fixes 128"
