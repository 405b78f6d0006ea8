"""QEMU's JSON descriptions of vmsd instances and definitions.

:func:`describe` produces the body QEMU writes into a stream's trailer for
one saved object (field entries with sizes, ``array_len`` for compressible
arrays, subsections actually sent), and :func:`dumps` prints JSON exactly
as QEMU's writer does (``": "``, ``", "``, ``\\uXXXX`` escapes), keeping
duplicate keys where QEMU repeats them (lists and trees).  :func:`loads` reads
a trailer back; a number with a fraction or exponent (QEMU writes none, but a
trailer is input) comes back as a :class:`JSONFloat` that :func:`dumps` writes
as it was read.
:func:`dump_vmstate` gives the static ``-dump-vmstate`` form of a class.

How an array whose elements are described one by one is written changed in
QEMU 10.0 and again later, so :func:`describe` takes the writer's rule
(``runs`` and ``indexes``, from the peer profile of the QEMU version whose
trailer is wanted):

- before 10.0, every element of an array that cannot be compressed into one
  ``array_len`` entry carries its ``"index"``, and a null slot of an array of
  pointers is an empty ``"struct"``;
- from 10.0 on (``runs``), the writer counts the elements left in the current
  run: an element gets ``"index"`` (or a compressed run its ``"array_len"``)
  only while more than one remain, so the last element has none; in an array
  of pointers a change between null and non-null slots starts a new run, and
  a null slot is a ``"nullptr"`` entry of one byte;
- QEMU 11.1 writes runs as 10.0 does but gives no element an ``"index"``
  (``indexes=False``): only a compressed run has its ``"array_len"``.
"""

from __future__ import annotations

import enum
from typing import Any

from vmsd.runtime.kinds import KINDS
from vmsd.runtime.schema import FieldSpec, SubsectionSpec, VmsdSpec


class JSONFloat(float):
    """A JSON number with a fraction or exponent, holding the text it was read from.

    Reprinting the value could change its spelling (``1e8`` is ``100000000.0``
    to Python), and a rewrite must give back the trailer it read.
    """

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> JSONFloat:
        self = super().__new__(cls, text)
        self.text = text
        return self


class Obj(list[tuple[str, Any]]):
    """A JSON object as ordered pairs; keys may repeat, as in QEMU's output."""

    # Set on decoded subsection values: the version word the stream carried.
    wire_version: int
    # Set on a typed object's field entries whose values are enum members: their enum (describe()).
    enum: type[enum.Enum]

    def get(self, key: str, default: Any = None) -> Any:
        for k, v in self:
            if k == key:
                return v
        return default


def _present(obj: Any, f: FieldSpec, version: int) -> bool:
    if f.since > version:
        return False
    return f.test is None or bool(getattr(obj, f.test)(version))


def _count(obj: Any, f: FieldSpec) -> int:
    if KINDS[f.kind].whole:
        return 1
    if f.kind == "validate":
        return 0  # QEMU's VMSTATE_VALIDATE is an array of zero elements
    n = 1
    for d in f.dims:
        n *= d
    if f.count_attr is not None:
        n = max(getattr(obj, f.count_attr), 0) * f.multiply
    return n


def _can_compress(f: FieldSpec) -> bool:
    if f.test is not None:
        return False
    if "VMS_STRUCT" in f.flags:
        spec: VmsdSpec = f.struct.VMSD
        return not spec.subsections and all(_can_compress(sf) for sf in spec.fields)
    return True


def _elements(value: Any, f: FieldSpec) -> list[Any]:
    if KINDS[f.kind].whole:
        return [value]
    if not f.dims and f.count_attr is None:
        return [value]
    if len(f.dims) == 2:
        return [x for row in value for x in row]
    return list(value)


def describe(obj: Any, version: int | None = None, runs: bool = False, indexes: bool = True,
             every_subsection: bool = False) -> tuple[Obj, int]:
    """The trailer body of ``obj`` saved at ``version`` and its size in bytes.

    ``runs``: describe arrays as QEMU 10.0 and later do; ``indexes=False``: without the elements'
    ``index``, as QEMU 11.1 does (see the module's docstring).  ``every_subsection``: all the spec's
    subsections, needed or not (to read a stream whose subsections say which were sent:
    ``decode_body(..., optional_subsections=True)``).
    """
    spec: VmsdSpec = obj.VMSD
    v = spec.version if version is None else version
    return _body(obj, spec.name, v, spec.fields, spec.subsections, runs, indexes, every_subsection)


def _body(
    obj: Any, name: str, version: int, fields: tuple[FieldSpec, ...], subsections: tuple[SubsectionSpec, ...],
    runs: bool, indexes: bool, every_subsection: bool = False,
) -> tuple[Obj, int]:
    entries: list[Obj] = []
    total = 0
    for f in fields:
        if not _present(obj, f, version):
            continue
        n = _count(obj, f)
        if n == 0:
            continue
        value = getattr(obj, f.attr) if f.attr else None
        elems = _elements(value, f) if f.attr else [None] * n
        total += _describe_elements(obj, f, elems, n, runs, indexes, entries)
    body = Obj([("vmsd_name", name), ("version", version), ("fields", entries)])
    subs: list[Obj] = []
    for s in subsections:
        if not every_subsection and s.needed is not None and not getattr(obj, s.needed)(version):
            continue
        sub_body, sub_size = _body(obj, s.name, s.version, s.fields, s.subsections, runs, indexes, every_subsection)
        subs.append(sub_body)
        total += 2 + len(s.name.encode()) + 4 + sub_size
    if subs:
        body.append(("subsections", subs))
    return body, total


def _describe_elements(obj: Any, f: FieldSpec, elems: list[Any], n: int, runs: bool, indexes: bool,
                       entries: list[Obj]) -> int:
    """Append the entries of one field's ``n`` elements as QEMU's writer does; their wire size."""
    compress = _can_compress(f)
    total = 0
    if not runs:
        for i, elem in enumerate(elems):
            entry, size = _entry(obj, f, elem, n if n > 1 else 0, i, compress, runs, indexes)
            total += size
            if not compress or i == 0:
                entries.append(entry)
        return total
    # vmstate_save_state_v() of QEMU 10.0: ``left`` is the number of elements the entry speaks for.
    described = True  # whether this element still gets an entry (after a compressed one, none until a new run)
    prev_null = False
    for i, elem in enumerate(elems):
        left = n - i
        is_null = f.nullable and elem is None
        if f.nullable and is_null != prev_null:
            prev_null, described = is_null, True
            left = next((j for j in range(i + 1, n) if (elems[j] is None) != is_null), n) - i
        entry, size = _entry(obj, f, elem, left if left > 1 else 0, i, compress or is_null, runs, indexes)
        total += size
        if described:
            entries.append(entry)
            # A compressed entry stands for the rest of its run (the field's rule, not the null slot's).
            described = not compress
    return total


def _entry(obj: Any, f: FieldSpec, elem: Any, n: int, i: int, compress: bool, runs: bool,
           indexes: bool) -> tuple[Obj, int]:
    """One element's entry; ``n`` is the count it reports (0: no ``array_len``/``index``)."""
    entry = Obj([("name", f.name)])
    if n and compress:
        entry.append(("array_len", n))
    elif n and indexes:
        entry.append(("index", i))
    if f.kind == "struct" and elem is None and runs:  # QEMU 10.0's fake field for a NULL slot
        entry.extend([("type", "nullptr"), ("size", 1)])
        return entry, 1
    entry.append(("type", f.info))
    if isinstance(elem, enum.Enum):  # for tools that show values by name; not part of the JSON
        entry.enum = type(elem)
    if f.kind == "struct":
        if elem is None:  # NULL slot of an array of pointers: QEMU's marker byte
            entry.append(("struct", Obj()))
            size = 1
        elif f.inline:
            nested, size = describe(elem, f.struct_version, runs, indexes)
            entry.extend(nested)
        else:
            nested, size = describe(elem, None, runs, indexes)
            entry.append(("struct", nested))
    elif f.kind == "scalar":
        size = f.elem_size
    elif f.kind in ("unused", "fd"):
        size = f.elem_size
    elif f.kind in ("bytes", "opaque"):
        size = len(elem)
    elif f.kind == "bitmap":
        nbits = max(getattr(obj, f.count_attr), 0) * f.multiply if f.count_attr else f.dims[0]
        size = (nbits + 63) // 64 * 8
    elif f.kind == "list":
        size = 1
        for item in elem:
            nested, item_size = describe(item, None, runs, indexes)
            entry.extend(nested)
            size += 1 + item_size
    else:  # map: GTree
        size = 4 + 1
        for key, item in elem:
            size += 1
            if f.key is None:
                size += 8
            else:
                nested, key_size = describe(key, None, runs, indexes)
                entry.extend(nested)
                size += key_size
            nested, item_size = describe(item, None, runs, indexes)
            entry.extend(nested)
            size += item_size
    entry.append(("size", size))
    return entry, size


# Entry types QEMU repeats under one name in a body that are no array's elements.
NOT_ELEMENT_TYPES = frozenset({"unused_buffer", "tmp"})


def array_rule(trailer: Obj) -> tuple[bool, bool] | None:
    """How a trailer describes arrays element by element, as :func:`describe`'s ``(runs, indexes)``:
    ``(False, True)`` an index on every element (before 10.0), ``(True, True)`` on all but the last of a
    run (10.0), ``(True, False)`` on none (11.1); None when it has no such array or its arrays disagree.

    An array described element by element is a run of entries of one name (QEMU numbers the names of
    distinct fields that would repeat), without ``array_len``."""
    found: set[tuple[bool, bool]] = set()

    def body(desc: Obj) -> None:
        fields = desc.get("fields")
        entries = [e for e in fields if isinstance(e, Obj)] if isinstance(fields, list) else []
        i = 0
        while i < len(entries):
            j = i + 1
            while j < len(entries) and entries[j].get("name") == entries[i].get("name"):
                j += 1
            run = entries[i:j]
            if (len(run) > 1 and all(e.get("array_len") is None for e in run)
                    and not any(e.get("type") in NOT_ELEMENT_TYPES for e in run)):
                indexed = [e.get("index") is not None for e in run]
                if all(indexed):
                    found.add((False, True))
                elif any(indexed):
                    found.add((True, True))
                else:
                    found.add((True, False))
            i = j
        for e in entries:
            inner = e.get("struct")
            body(inner if isinstance(inner, Obj) else e)  # a vstruct's body sits in its entry
        subs = desc.get("subsections")
        for s in subs if isinstance(subs, list) else []:
            if isinstance(s, Obj):
                body(s)

    devices = trailer.get("devices")
    for d in devices if isinstance(devices, list) else []:
        if isinstance(d, Obj):
            body(d)
    return found.pop() if len(found) == 1 else None


def dumps(value: Any) -> str:
    """JSON text exactly as QEMU's JSON writer prints it."""
    parts: list[str] = []
    _write(value, parts)
    return "".join(parts)


def _write(value: Any, out: list[str]) -> None:
    if isinstance(value, Obj):
        out.append("{")
        for i, (k, v) in enumerate(value):
            if i:
                out.append(", ")
            out.append(_quote(k))
            out.append(": ")
            _write(v, out)
        out.append("}")
    elif isinstance(value, dict):
        _write(Obj(value.items()), out)
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, v in enumerate(value):
            if i:
                out.append(", ")
            _write(v, out)
        out.append("]")
    elif isinstance(value, bool):
        out.append("true" if value else "false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, str):
        out.append(_quote(value))
    elif isinstance(value, JSONFloat):
        out.append(value.text)
    elif value is None:
        out.append("null")
    else:
        raise TypeError(f"cannot write {type(value).__name__} as JSON")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quote(s: str) -> str:
    out = ['"']
    for ch in s:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04X}\\u{0xDC00 + (code & 0x3FF):04X}")
        else:
            out.append(f"\\u{code:04X}")
    out.append('"')
    return "".join(out)


def _not_json(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON value")


def loads(text: str | bytes) -> Any:
    """Parse JSON keeping objects as :class:`Obj` (duplicate keys survive) and non-integers as :class:`JSONFloat`.

    Every failure is a ValueError (``json.JSONDecodeError`` when it has a position in the text).
    """
    import json

    try:
        return json.loads(text, object_pairs_hook=Obj, parse_float=JSONFloat, parse_constant=_not_json)
    except RecursionError:
        # Nesting deeper than the parser's recursion: input too, so the same error as any other bad text.
        raise ValueError("JSON nested too deeply") from None


def dump_vmstate(cls: Any) -> dict[str, Any]:
    """The ``-dump-vmstate`` description of a generated class (sizes are wire sizes)."""
    spec: VmsdSpec = cls.VMSD
    return _dump_desc(spec.name, spec.version, spec.minimum, spec.fields, spec.subsections)


def _dump_desc(
    name: str, version: int, minimum: int, fields: tuple[FieldSpec, ...], subsections: tuple[SubsectionSpec, ...]
) -> dict[str, Any]:
    desc: dict[str, Any] = {"name": name, "version_id": version, "minimum_version_id": minimum}
    out_fields = []
    for f in fields:
        if "VMS_MUST_EXIST" in f.flags:
            continue  # QEMU leaves VMSTATE_VALIDATE out of the dump
        entry: dict[str, Any] = {"field": f.name, "version_id": f.since, "field_exists": f.test is not None}
        if "VMS_ARRAY" in f.flags and f.dims:
            entry["num"] = f.dims[0] if len(f.dims) == 1 else f.dims[0] * f.dims[1]
        entry["size"] = f.elem_size
        if f.struct is not None:
            entry["Description"] = dump_vmstate(f.struct)
        out_fields.append(entry)
    desc["Fields"] = out_fields
    if subsections:
        desc["Subsections"] = [_dump_desc(s.name, s.version, s.minimum, s.fields, s.subsections) for s in subsections]
    return desc
