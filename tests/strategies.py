"""Hypothesis strategies for generated vmsd classes, derived from their schema tables."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import strategies as st

from vmsd.runtime.scalars import BY_INFO
from vmsd.runtime.schema import FieldSpec
from vmsd.runtime.vmstate import impl

MAX_ELEMS = 4
# Above this many elements a fixed-size array draws a short head and pads it:
# QEMU states such as vmcs12 (4 KiB) would otherwise exhaust hypothesis.
BIG = 64


def exact_list(elem: st.SearchStrategy[Any], n: int, pad: Any) -> st.SearchStrategy[list[Any]]:
    if n <= BIG:
        return st.lists(elem, min_size=n, max_size=n)
    return st.lists(elem, max_size=8).map(lambda head: head + [pad] * (n - len(head)))


def exact_bytes(n: int) -> st.SearchStrategy[bytes]:
    if n <= BIG:
        return st.binary(min_size=n, max_size=n)
    return st.binary(max_size=16).map(lambda head: head + bytes(n - len(head)))


def scalar(info: str) -> st.SearchStrategy[Any]:
    s, _ = BY_INFO[info]
    if s.py_type == "bool":
        return st.booleans()
    if s.range is None:
        return st.floats(allow_nan=False, width=64)
    return st.integers(*s.range)


@st.composite
def instances(draw: st.DrawFn, cls: type, depth: int = 0) -> Any:
    """An object of ``cls`` (its registered implementation) with drawn field values."""
    obj = impl(cls)()
    fields = cls.VMSD.all_fields()
    counters = {f.count_attr for f in fields if f.count_attr}
    checked = {f.attr: f.info for f in fields if f.info.endswith(" equal") or f.info == "int32 le"}
    bitmap_only = {f.count_attr for f in fields if f.kind == "bitmap"} - {
        f.count_attr for f in fields if f.kind != "bitmap"
    }
    # Counters first: every variable-length field then draws exactly that many elements.  A count from
    # device configuration (``custom(NAME)``, a read-only property of the registered class) follows the
    # array instead.
    for name in sorted(c for c in counters if c and c not in checked and not _derived(obj, c)):
        setattr(obj, name, draw(st.integers(0, 200 if name in bitmap_only else MAX_ELEMS)))
    for f in fields:
        if f.attr is None or f.attr in counters:
            continue
        setattr(obj, f.attr, draw(_value(obj, f, checked, depth)))
    fixup = FIXUPS.get(cls.VMSD.name)
    if fixup is not None:
        fixup(obj, draw)
    return obj


def configuration_of(obj: Any) -> dict[tuple[str, str], int] | None:
    """The counts ``obj`` (at any depth) takes from device configuration, by (vmsd name, property), as
    vmsd.runtime.vmstate.device_configuration takes them; None when two objects of one vmsd disagree.

    The bytes alone cannot always give such a count (QEMU knows it from its machine), so a round trip
    loads with the counts the drawn object has."""
    out: dict[tuple[str, str], int] = {}

    def walk(o: Any) -> bool:
        spec = getattr(type(o), "VMSD", None)
        if spec is None:
            return True
        for f in spec.all_fields():
            value = getattr(o, f.attr, None) if f.attr else None
            if f.count_attr is not None and _derived(o, f.count_attr) and isinstance(value, list):
                key = (type(o).VMSD_NAME, f.count_attr)
                if out.setdefault(key, len(value)) != len(value):
                    return False
            for item in value if isinstance(value, list) else [value]:
                if not walk(item):
                    return False
        return True

    return out if walk(obj) else None


def _derived(obj: Any, name: str) -> bool:
    """Whether ``name`` is a count the class derives (a property without a setter)."""
    prop = getattr(type(obj), name, None)
    return isinstance(prop, property) and prop.fset is None


def _pci_config(obj: Any, draw: st.DrawFn) -> None:
    """PCIDevice saves 256 or 4096 config bytes; an express function carries the PCIe capability."""
    express = draw(st.booleans())
    _set_pci_config(obj, express)
    if obj.migrate_is_pcie(0) != express:  # a device class that fixes the answer (xHCI is always express)
        _set_pci_config(obj, not express)


def _set_pci_config(obj: Any, express: bool) -> None:
    if express:
        cfg = bytearray(obj.config_pcie or bytes(4096))
        cfg[6] |= 0x10  # status: capability list
        cfg[0x34] = 0x40
        cfg[0x40:0x42] = b"\x10\x00"  # PCI Express capability, end of list
        obj.config, obj.config_pcie = None, bytes(cfg)
    else:
        cfg = bytearray(obj.config or bytes(256))
        cfg[6] &= ~0x10 & 0xFF
        obj.config, obj.config_pcie = bytes(cfg), None


def _xhci_function(obj: Any, draw: st.DrawFn) -> None:
    """Every xHCI function is PCI Express: its loader insists on the 4096-byte config."""
    from vmsd.qemu.v7_2.extents import XHCIPciFunction

    function = XHCIPciFunction()
    _set_pci_config(function, True)
    obj.parent_obj = function


# States whose fields must agree with each other in ways the schema cannot say.
FIXUPS: dict[str, Callable[[Any, st.DrawFn], None]] = {"PCIDevice": _pci_config, "xhci": _xhci_function}


def _value(obj: Any, f: FieldSpec, checked: dict[str, str], depth: int) -> st.SearchStrategy[Any]:
    current = getattr(obj, f.attr or "")
    if f.kind == "scalar":
        if f.info.endswith(" equal"):
            return st.just(current)
        if f.info == "int32 le":
            return st.integers(0, max(current, 0))
        base = f.info
        elem = scalar(base)
        if isinstance(current, enum.Enum):
            elem = elem.map(type(current))
        pad = current[0] if isinstance(current, list) and current and not isinstance(current[0], list) else 0
        if f.count_attr is not None:
            n = max(getattr(obj, f.count_attr), 0) * f.multiply
            return exact_list(elem, n, pad)
        if len(f.dims) == 2:
            rows, cols = f.dims
            return exact_list(exact_list(elem, cols, pad), rows, [pad] * cols)
        if f.dims:
            return exact_list(elem, f.dims[0], pad)
        return elem
    if f.kind == "bytes":
        if f.count_attr is not None:
            n = max(getattr(obj, f.count_attr), 0) * f.multiply
            return exact_bytes(n)
        return exact_bytes(f.elem_size)
    if f.kind == "fd":
        return st.integers(-(1 << 31), (1 << 31) - 1)  # without a descriptor channel: be32 numbers
    if f.kind == "bitmap":
        nbits = f.dims[0] if f.dims else max(getattr(obj, f.count_attr or ""), 0) * f.multiply
        return st.integers(0, (1 << ((nbits + 63) // 64 * 64)) - 1)
    nested = instances(f.struct, depth + 1) if depth < 3 else st.builds(impl(f.struct))
    if f.kind == "struct":
        if f.nullable:
            return st.just(current)
        if f.count_attr is not None and _derived(obj, f.count_attr):
            return st.lists(nested, max_size=4)
        if f.count_attr is not None:
            n = max(getattr(obj, f.count_attr), 0) * f.multiply
            return st.lists(nested, min_size=n, max_size=n)
        if f.dims:
            n = f.dims[0]
            if n > BIG:  # thousands of elements (xHCI event rings): a drawn head, default elements after
                return st.lists(nested, max_size=4).map(lambda head: head + [impl(f.struct)() for _ in range(n - len(head))])
            return st.lists(nested, min_size=n, max_size=n)
        return nested
    if f.kind == "list":
        return st.lists(nested, max_size=3)
    if f.kind == "map":
        keys = st.integers(0, (1 << 64) - 1) if f.key is None else instances(f.key, depth + 1)
        return st.lists(st.tuples(keys, nested), max_size=3)
    if f.kind == "opaque":
        return _opaque(obj, f)
    raise AssertionError(f"no strategy for {f.kind}")


def _opaque(obj: Any, f: FieldSpec) -> st.SearchStrategy[bytes]:
    """Payloads of device-specific encodings, consistent with their extent functions."""
    if f.info == "capability":
        count = min(max(getattr(obj, "caps_count", 0), 0), 8)
        obj.caps_count = count
        name = st.binary(min_size=1, max_size=20)
        return st.lists(name, min_size=count, max_size=count).map(lambda ns: b"".join(bytes([len(n)]) + n for n in ns))
    pytest.skip(f"no strategy for the device-specific encoding '{f.info}' (covered by real QEMU streams)")

