"""A decoded section as QEMU describes it, and the names of its fields (docs/names.md).

``vmsd inspect`` (tree and JSON), ``vmsd diff`` and ``vmsd rewrite --set`` all see a section through
:func:`section_tree`: a typed section is described by its spec and its saved bytes read back by that
description, so that it has the same shape and the same names as one decoded from the trailer.
"""

from __future__ import annotations

from typing import Any

import attrs

from vmsd.migration.ram.records import RamPayload
from vmsd.migration.stream import Section
from vmsd.runtime.generic import decode_body, inline_bodies
from vmsd.runtime.io import Reader
from vmsd.runtime.vmdesc import NOT_ELEMENT_TYPES, Obj, describe
from vmsd.runtime.vmstate import VMStateObject


@attrs.frozen
class Tree:
    """A decoded body: its description (fields, subsections) and its values by QEMU name, in order."""

    body: Obj
    values: Obj


def section_tree(sec: Section, rule: tuple[bool, bool] = (False, True)) -> Tree | bytes | None:
    """What a FULL section holds: a tree, the bytes of a legacy section, or None (RAM).

    ``rule``: how a typed section describes arrays element by element (:func:`describe`'s ``runs`` and
    ``indexes``; a stream's is :func:`vmsd.migration.stream.description_rule`), so that it is described
    as its stream's trailer describes it."""
    p = sec.payload
    if isinstance(p, RamPayload) or p is None:
        return None
    if isinstance(p, bytes):
        return p
    if sec.generic_body is not None:
        return Tree(sec.generic_body, p)
    return object_tree(p, sec.version_id, rule)


def object_tree(obj: VMStateObject, version: int | None = None, rule: tuple[bool, bool] = (False, True)) -> Tree:
    """A typed object as its trailer would describe it: the bytes it saves, read back by its description.

    One comparison then serves typed and trailer-decoded sections alike, with QEMU's field names."""
    body, _ = describe(obj, version, *rule)
    values = decode_body(Reader(obj.save(version_id=version)), body)
    return Tree(body, values)


@attrs.frozen
class Child:
    """A field or subsection of a body, as :func:`children` names it."""

    kind: str  # "field" or "subsection"
    entry: Obj | None  # its description, when known
    value: Any


def children(body: Obj | None, values: Obj) -> dict[str, Child]:
    """A body's fields and subsections by name; a repeated name (QEMU's ``tmp``, ``unused``) gets ``#2``...

    An array described element by element is ``name[i]``, numbered by its entries: QEMU 10.0 leaves
    ``index`` off the last element of a run and off a lone null slot, 11.1 off every element
    (vmsd.runtime.vmdesc), so an element without one is the one after the previous entry of that name,
    and every version's elements are named as a typed object's are."""
    fields: list[Obj] = body.get("fields", []) if body is not None else []
    subs: list[Obj] = (body.get("subsections") or []) if body is not None else []
    seen: set[str] = set()
    repeated: set[str] = set()
    for e in fields:
        if e.get("type") not in NOT_ELEMENT_TYPES:
            name = str(e.get("name"))
            (repeated if name in seen else seen).add(name)
    # Arrays described element by element: a name with an index or a null slot, or repeated.
    arrays = repeated | {str(e.get("name")) for e in fields if e.get("index") is not None or e.get("type") == "nullptr"}
    out: dict[str, Child] = {}
    next_index: dict[str, int] = {}  # by name: the number of its next element
    for i, (name, value) in enumerate(values):
        entry: Obj | None = None
        kind = "field"
        key = str(name)
        if i < len(fields):
            entry = fields[i]
            index = entry.get("index")
            if index is None and key in arrays:
                index = next_index.get(key, 0)
            if isinstance(index, int):
                next_index[key] = index + 1
            if index is not None:
                key += f"[{index}]"
        elif i - len(fields) < len(subs):
            entry, kind = subs[i - len(fields)], "subsection"
        n = 2
        unique = key
        while unique in out:
            unique, n = f"{key}#{n}", n + 1
        out[unique] = Child(kind, entry, value)
    return out


def join(path: str, key: str) -> str:
    if key.startswith("["):
        return path + key
    return f"{path}.{key}" if path else key


def nested_body(entry: Obj | None, index: int) -> Obj | None:
    """The description of a struct-like value (element ``index`` of a list) under ``entry``."""
    if entry is None:
        return None
    kind = entry.get("type")
    if kind == "struct":
        nested = entry.get("struct")
        return nested if isinstance(nested, Obj) else None
    if kind in ("vstruct", "tmp"):
        return entry
    if kind in ("qtailq", "qlist"):
        bodies = inline_bodies(entry)
        return bodies[index] if index < len(bodies) else None
    return None


__all__ = ["Child", "Tree", "children", "join", "nested_body", "object_tree", "section_tree"]
