"""Which field a failed save is about.

Generated savers pack runs of scalar fields with one ``struct.Struct`` call,
so the error ``struct`` raises (``'I' format requires 0 <= number <= ...``)
names no field, and the saver only knows which run it was in.  When a save
fails, :func:`blame` looks at the values again, field by field in the order
they are saved, and names the first one that cannot be encoded: its path,
its value and what its type allows.  The fields before it in that order were
written, so the first bad value is the one the save stopped at.  Only the
error path pays for this.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from vmsd.runtime.errors import SaveError, VMSDError
from vmsd.runtime.scalars import BY_INFO, Scalar
from vmsd.runtime.schema import FieldSpec, VmsdSpec


def blame(obj: Any, subsection: str | None, version: int, error: Exception, at: str) -> VMSDError:
    """The error to raise for ``error``, met while saving ``obj`` (its ``subsection`` of that name, or its
    main fields) at ``version``; ``at`` is the field (or first field of a fused run) being saved."""
    if isinstance(error, VMSDError) and (error.path or not isinstance(error, SaveError)):
        return error.within(at)  # from a nested object or a check: it already says where
    try:
        found = _first_bad(obj, _fields(obj.VMSD, subsection), version)
    except Exception:  # a predicate that fails here leaves the original error standing
        found = None
    if found is not None:
        path, problem = found
        return SaveError(problem, path=path)
    if isinstance(error, VMSDError):
        return error.within(at)
    return SaveError(str(error), path=at)


def _fields(spec: VmsdSpec, subsection: str | None) -> tuple[FieldSpec, ...]:
    if subsection is None:
        return spec.fields
    return next(s.fields for s in spec.all_subsections() if s.name == subsection)


def _label(f: FieldSpec) -> str:
    """The field's name in the spec, as the generated code's error paths give it: the attribute, without
    the underscore added to a name Python or the class needs (``load_`` is the field ``load``)."""
    assert f.attr is not None
    if f.attr.endswith("_") and re.sub(r"\[[0-9]+\]$", "", f.name) == f.attr[:-1]:
        return f.attr[:-1]
    return f.attr


def _count_label(obj: Any, attr: str) -> str:
    """The spec name of the field held in attribute ``attr`` (a length field: main or subsection field)."""
    spec: VmsdSpec = obj.VMSD
    every = [*spec.fields, *(f for s in spec.all_subsections() for f in s.fields)]
    return next((_label(c) for c in every if c.attr == attr), attr)


def _first_bad(obj: Any, fields: Sequence[FieldSpec], version: int) -> tuple[str, str] | None:
    for f in fields:
        if f.attr is None or f.since > version or (f.test is not None and not getattr(obj, f.test)(version)):
            continue
        value = getattr(obj, f.attr)
        if value is None and f.kind in ("scalar", "bytes"):
            return _label(f), f"is None, but saving version {version} needs a value"
        problem = _check(obj, f, value)
        if problem is not None:
            return problem[0], problem[1]
    return None


def _check(obj: Any, f: FieldSpec, value: Any) -> tuple[str, str] | None:
    name = _label(f)
    if f.kind == "bytes":
        n = _count(obj, f)
        if not isinstance(value, bytes | bytearray | memoryview):
            return name, f"{_show(value)} is not bytes"
        if n is not None and len(value) != n:
            return name, f"has {_many(len(value), 'byte')}, {_fixed_or_counted(obj, f, n)}"
        return None
    if f.kind != "scalar":
        return None  # nested objects, lists and maps name their own problems
    scalar = BY_INFO[f.info][0] if f.info in BY_INFO else None
    if scalar is None:
        return None
    if not f.dims and f.count_attr is None:
        bad = _bad_scalar(value, scalar)
        return (name, bad) if bad else None
    if len(f.dims) == 2:
        rows, cols = f.dims
        if not _sequence(value) or len(value) != rows or any(not _sequence(r) or len(r) != cols for r in value):
            return name, f"must be {rows} rows of {cols} elements"
        for i, row in enumerate(value):
            for j, x in enumerate(row):
                bad = _bad_scalar(x, scalar)
                if bad:
                    return f"{name}[{i}][{j}]", bad
        return None
    n = _count(obj, f)
    if not _sequence(value):
        return name, f"{_show(value)} is not a list of {scalar.name}"
    if n is not None and len(value) != n:
        return name, f"has {_many(len(value), 'element')}, {_fixed_or_counted(obj, f, n)}"
    for i, x in enumerate(value):
        bad = _bad_scalar(x, scalar)
        if bad:
            return f"{name}[{i}]", bad
    return None


def _count(obj: Any, f: FieldSpec) -> int | None:
    """Elements (bytes, for a buffer) the field must hold; None when its length field is no count."""
    if f.count_attr is not None:
        n = getattr(obj, f.count_attr)
        return max(n, 0) * f.multiply if isinstance(n, int) else None
    if f.kind == "bytes":
        return f.elem_size  # a fixed buffer's table entry gives its whole size
    return f.dims[0] if f.dims else None


def _fixed_or_counted(obj: Any, f: FieldSpec, n: int) -> str:
    if f.count_attr is not None:
        return f"its length field {_count_label(obj, f.count_attr)} says {n}"
    return f"the spec fixes {n}"


def _many(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _sequence(value: Any) -> bool:
    return isinstance(value, list | tuple | bytes | bytearray)


def _bad_scalar(value: Any, scalar: Scalar) -> str | None:
    if scalar.range is None:  # floats
        return None if isinstance(value, int | float) else f"{_show(value)} is not a number ({scalar.name})"
    if scalar.name == "bool":
        return None  # struct packs any value's truth
    if not isinstance(value, int):
        return f"{_show(value)} is not an integer ({scalar.name})"
    lo, hi = scalar.range
    if lo <= value <= hi:
        return None
    return f"{_number(value)} is out of range for {scalar.name} ({lo}..{hi})"


def _number(v: int) -> str:
    if -10 < v < 10:
        return str(v)
    return f"{v} ({v:#x})" if v >= 0 else f"{v} (-{-v:#x})"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


__all__ = ["blame"]
