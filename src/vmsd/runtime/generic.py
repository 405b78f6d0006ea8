"""Decode and encode VMState payloads from QEMU's JSON description alone.

This is the interpretive path: it walks a trailer body field by field, the
way QEMU's ``analyze-migration.py`` does, and serves sections that have no
typed spec.  Every element's byte count is checked against the description's
``size``, so a description that does not match the bytes is reported at the
field where they part, never silently misread.
"""

from __future__ import annotations

import struct
from typing import Any

from vmsd.runtime.errors import MalformedStream, VMSDError
from vmsd.runtime.io import Reader, Writer
from vmsd.runtime.markers import NULLPTR_MARKER, QEMU_VM_SUBSECTION
from vmsd.runtime.scalars import BY_INFO
from vmsd.runtime.vmdesc import Obj

# QEMU's scalar type names (checked variants included), each with its codec.
_SCALARS: dict[str, struct.Struct] = {info: struct.Struct(">" + s.fmt) for info, (s, _) in BY_INFO.items()}


def inline_bodies(entry: Obj) -> list[Obj]:
    """Split the repeated inline bodies of a qtailq/qlist/gtree entry."""
    out: list[Obj] = []
    for k, v in entry:
        if k == "vmsd_name":
            out.append(Obj([(k, v)]))
        elif out and k in ("version", "fields", "subsections"):
            out[-1].append((k, v))
    return out


def decode_body(r: Reader, body: Obj, optional_subsections: bool = False) -> Obj:
    """Read the fields and subsections ``body`` describes; values by QEMU name.

    ``optional_subsections``: a described subsection the stream does not carry next is skipped (``body``
    lists all a spec has, not those a trailer says were sent).

    On an error, its ``partial`` holds the values read before it, the failing struct's (or array of
    structs') own as its last value; a scalar array cut short is left out."""
    values = Obj()
    for entry in body.get("fields", []):
        name = entry.get("name")
        try:
            values.append((name, _decode_entry(r, entry)))
        except VMSDError as e:
            _keep_partial(e, values, name)
            raise e.within(name) from None
    for sub in body.get("subsections", []) or []:
        sub_name = sub.get("vmsd_name")
        if optional_subsections and not _subsection_next(r, sub_name):
            continue
        try:
            at = r.tell()
            if r.u8() != QEMU_VM_SUBSECTION:
                raise MalformedStream(f"expected subsection '{sub_name}'", offset=at)
            got = r.counted_string().decode(errors="replace")
            if got != sub_name:
                raise MalformedStream(f"expected subsection '{sub_name}', found '{got}'", offset=at)
            version = r.u32()
            sub_values = decode_body(r, sub, optional_subsections)
            sub_values.wire_version = version  # QEMU reads only its low byte; a rewrite keeps all four
            values.append((sub_name, sub_values))
        except VMSDError as e:
            _keep_partial(e, values, sub_name, True)
            raise e.within(sub_name) from None
    return values


def _subsection_next(r: Reader, name: str) -> bool:
    raw = name.encode()
    return r.peek(2 + len(raw)) == bytes([QEMU_VM_SUBSECTION, len(raw)]) + raw


def _keep_partial(e: VMSDError, values: Obj, name: str, started: bool = False) -> None:
    """``e.partial`` becomes ``values``, with what was read of the failed value (if anything, or if
    ``started``: a subsection whose header was read) under ``name``."""
    if e.partial or (started and e.partial is not None):
        values.append((name, e.partial))
    e.partial = values


def _decode_entry(r: Reader, entry: Obj) -> Any:
    n = entry.get("array_len")
    if n is None:
        return _decode_one(r, entry)
    size = entry.get("size")
    left = r.remaining()
    if not isinstance(n, int) or not isinstance(size, int) or n < 0 or size < 0:
        raise MalformedStream(f"array_len {n!r} and size {size!r} are not counts", offset=r.tell())
    # The description comes from the input too: it may not claim more than the bytes hold.  Elements of
    # some bytes each end the loop where the bytes do, at the element they run out in; empty ones cannot.
    if left is not None and size == 0 and n > left + 1:
        raise MalformedStream(f"{n} elements of {size} bytes described, {left} bytes remain", offset=r.tell())
    out = []
    for i in range(n):
        try:
            out.append(_decode_one(r, entry))
        except VMSDError as e:
            done = [*out, e.partial] if e.partial is not None else out
            e.partial = done if any(isinstance(v, Obj) for v in done) else None
            raise e.within(f"[{i}]") from None
    return out


def _decode_one(r: Reader, entry: Obj) -> Any:
    kind = entry.get("type")
    size = entry.get("size")
    start = r.tell()
    value: Any
    scalar = _SCALARS.get(kind)
    if scalar is not None and size == scalar.size:
        buf, p = r.take(scalar.size)
        return scalar.unpack_from(buf, p)[0]
    if kind == "struct":
        nested = entry.get("struct")
        if not nested and size == 1:
            if r.u8() != NULLPTR_MARKER:
                raise MalformedStream("expected the NULL slot marker 0x30", offset=start)
            return None
        value = decode_body(r, nested)
    elif kind in ("vstruct", "tmp"):
        value = decode_body(r, entry)
    elif kind in ("qtailq", "qlist", "gtree"):
        try:
            value = _decode_gtree(r, entry) if kind == "gtree" else _decode_list(r, entry)
        except VMSDError as e:
            e.partial = None  # an element's values are not the list's: the list is left out
            raise
    elif kind == "fd":
        value = r.get_fd()  # QEMU describes it as 4 bytes; passed, it is one carrier byte
    else:
        # buffer, unused_buffer, bitmap and device-specific types: raw bytes
        value = r.read(size)
    if r.tell() - start != size:
        raise MalformedStream(f"description says {size} bytes, decoding used {r.tell() - start}", offset=start)
    return value


def _decode_list(r: Reader, entry: Obj) -> list[Obj]:
    value = []
    for b in inline_bodies(entry):
        if not r.u8():
            raise MalformedStream("list ended before its description", offset=r.tell() - 1)
        value.append(decode_body(r, b))
    if r.u8():
        raise MalformedStream("list holds more elements than its description", offset=r.tell() - 1)
    return value


def _decode_gtree(r: Reader, entry: Obj) -> list[tuple[Any, Any]]:
    start = r.tell()
    nnodes = r.u32()
    bodies = inline_bodies(entry)
    keyed = len(bodies) == 2 * nnodes and nnodes > 0
    if not keyed and nnodes > len(bodies):
        # The trailer describes each node's body; a node without one cannot be read.
        raise MalformedStream(f"tree announces {nnodes} nodes, its description has {len(bodies)}", offset=start)
    out: list[tuple[Any, Any]] = []
    for i in range(nnodes):
        if not r.u8():
            raise MalformedStream(f"tree announces {nnodes} nodes but holds {i}", offset=start)
        key = decode_body(r, bodies[2 * i]) if keyed else r.u64()
        value = decode_body(r, bodies[2 * i + 1] if keyed else bodies[i])
        out.append((key, value))
    if r.u8():
        raise MalformedStream(f"tree holds more than its {nnodes} nodes", offset=start)
    return out


def encode_body(w: Writer, body: Obj, values: Obj) -> None:
    """Write what :func:`decode_body` read, byte for byte."""
    it = iter(values)
    for entry in body.get("fields", []):
        _, value = next(it)
        n = entry.get("array_len")
        for v in value if n is not None else [value]:
            _encode_one(w, entry, v)
    for sub in body.get("subsections", []) or []:
        _, value = next(it)
        name = sub.get("vmsd_name").encode()
        w.u8(QEMU_VM_SUBSECTION)
        w.counted_string(name)
        w.u32(getattr(value, "wire_version", sub.get("version")))
        encode_body(w, sub, value)


def _encode_one(w: Writer, entry: Obj, value: Any) -> None:
    kind = entry.get("type")
    size = entry.get("size")
    scalar = _SCALARS.get(kind)
    if scalar is not None and size == scalar.size:
        w.buf += scalar.pack(value)
    elif kind == "struct":
        if value is None:
            w.u8(NULLPTR_MARKER)
        else:
            encode_body(w, entry.get("struct"), value)
    elif kind in ("vstruct", "tmp"):
        encode_body(w, entry, value)
    elif kind in ("qtailq", "qlist"):
        for b, v in zip(inline_bodies(entry), value, strict=True):
            w.u8(1)
            encode_body(w, b, v)
        w.u8(0)
    elif kind == "fd":
        w.put_fd(value)
    elif kind == "gtree":
        bodies = inline_bodies(entry)
        keyed = len(bodies) == 2 * len(value) and value
        w.u32(len(value))
        for i, (key, v) in enumerate(value):
            w.u8(1)
            if keyed:
                encode_body(w, bodies[2 * i], key)
                encode_body(w, bodies[2 * i + 1], v)
            else:
                w.u64(key)
                encode_body(w, bodies[i], v)
        w.u8(0)
    else:
        w.write(value)
