"""What ``vmsd inspect``, ``vmsd rewrite`` and ``vmsd diff`` do with streams."""

from __future__ import annotations

import enum
import functools
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import attrs

from vmsd.migration.ram.mapped import PAGE_SIZE, MappedRam
from vmsd.migration.ram.records import RamPayload
from vmsd.migration.stream import SECTION_NAMES, Command, Section, SpecSet, Stream, read_stream, write_stream
from vmsd.runtime.vmdesc import Obj, describe
from vmsd.runtime.vmstate import VMStateObject
from vmsd.tools.errors import ToolError, UsageError


def load_specs(specs_dir: Path | None) -> SpecSet:
    """The shipped QEMU 7.2 specs, overridden by the .vmsd files of ``specs_dir``."""
    from vmsd.qemu.v7_2 import spec_set

    shipped = spec_set()
    if specs_dir is None:
        return shipped
    from vmsd.codegen.compiler import compile_specs

    if not specs_dir.is_dir():
        raise UsageError(f"--specs {specs_dir}: not a folder")
    specs = sorted(specs_dir.rglob("*.vmsd"))
    if not specs:
        raise UsageError(f"--specs {specs_dir}: no .vmsd files there")
    files = compile_specs(specs, str(specs_dir))
    import tempfile

    # Imported modules live on in memory: the folder is only needed while importing.
    with tempfile.TemporaryDirectory(prefix="vmsd-specs-") as tmp:
        package = f"vmsd_user_specs_{abs(hash(str(specs_dir.resolve())))}"
        for rel, text in files.items():
            target = Path(tmp) / package / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        (Path(tmp) / package / "__init__.py").write_text("")
        sys.path.insert(0, tmp)
        try:
            modules = [importlib.import_module(f"{package}." + ".".join(rel.with_suffix("").parts))
                       for rel in files if rel.name != "__init__.py"]
        finally:
            sys.path.remove(tmp)
    return shipped.merged(SpecSet.from_modules(modules))


def read_input(path: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


_JSON_READY = frozenset({int, bool, float, str, type(None)})


def plain(value: Any) -> Any:
    """JSON-ready form of a decoded value."""
    kind = type(value)
    if kind in _JSON_READY:
        return value
    if kind is list or kind is tuple:
        # Register arrays and buffers are long lists of plain ints: keep them whole.
        if set(map(type, value)) <= _JSON_READY:
            return value
        return [plain(v) for v in value]
    if isinstance(value, VMStateObject):
        cls: Any = kind  # every generated class is an attrs class
        byte_arrays = _byte_arrays(cls)
        return {
            f.name: bytes(getattr(value, f.name)).hex() if f.name in byte_arrays else plain(getattr(value, f.name))
            for f in attrs.fields(cls)
        }
    if isinstance(value, Obj):
        return {k: plain(v) for k, v in value}
    if isinstance(value, enum.Enum):
        return int(value.value)
    if isinstance(value, bytes):
        return value.hex()
    return value


@functools.cache
def _byte_arrays(cls: Any) -> frozenset[str]:
    """Attributes holding uint8 arrays: shown as hex like buffers (IDE's 128 KiB io_buffer)."""
    return frozenset(
        f.attr for f in cls.VMSD.all_fields() if f.attr and f.info == "uint8" and len(f.dims) == 1 and not f.count_attr
    )


def _ram_summary(p: RamPayload) -> dict[str, Any]:
    out: dict[str, Any] = {"records": p.record_count}
    blocks = p.block_list()
    if blocks:
        out["blocks"] = {b.name: b.used_length for b in blocks}
    pages = p.pages_by_block()
    if pages:
        out["pages"] = pages
    mapped = {b.name: _mapped_summary(b.mapped) for b in blocks if b.mapped is not None}
    if mapped:
        out["mapped_ram"] = mapped
    return out


def _mapped_summary(m: MappedRam) -> dict[str, int]:
    """A mapped-ram block's header and how many of its pages the bitmap says are in the file."""
    h = m.header
    return {"version": h.version, "page_size": h.page_size, "bitmap_offset": h.bitmap_offset,
            "pages_offset": h.pages_offset, "pages": m.npages, "in_file": int(m.present().sum())}


def section_json(sec: Section) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": SECTION_NAMES[sec.kind],
        "section_id": sec.section_id,
        "idstr": sec.idstr,
        "instance_id": sec.instance_id,
        "version_id": sec.version_id,
        "offset": sec.offset,
    }
    if isinstance(sec.payload, RamPayload):
        out["ram"] = _ram_summary(sec.payload)
    elif sec.generic_body is not None:
        out["decoded_by"] = "trailer"
        out["vmsd_name"] = sec.vmsd_name
        out["fields"] = plain(sec.payload)
    elif isinstance(sec.payload, VMStateObject):
        out["decoded_by"] = "spec"
        out["vmsd_name"] = sec.vmsd_name
        out["fields"] = plain(sec.payload)
    return out


def record_json(rec: Section | Command) -> dict[str, Any]:
    if isinstance(rec, Section):
        return section_json(rec)
    entry: dict[str, Any] = {"type": "COMMAND", "command": rec.name, "offset": rec.offset, "data": rec.data.hex()}
    if rec.count > 1:
        entry["count"] = rec.count
    if rec.packaged is not None:
        entry["packaged"] = [section_json(r) if isinstance(r, Section) else _inner_command_json(r) for r in rec.packaged]
    return entry


def _inner_command_json(rec: Command) -> dict[str, Any]:
    return {"command": rec.name, "count": rec.count} if rec.count > 1 else {"command": rec.name}


def stream_json(stream: Stream) -> dict[str, Any]:
    out: dict[str, Any] = {"version": stream.version}
    if stream.configuration is not None:
        out["configuration"] = plain(stream.configuration.state)
    out["records"] = [record_json(rec) for rec in stream.records]
    out.update(_json_tail(stream))
    return out


def _json_tail(stream: Stream) -> dict[str, Any]:
    out: dict[str, Any] = {"eof_offset": stream.eof_offset}
    out["trailer"] = {"offset": stream.trailer_offset, "size": len(stream.trailer_text or b"")} if stream.trailer else None
    if stream.warnings:
        out["warnings"] = stream.warnings
    return out


def write_json(stream: Stream, out: TextIO) -> None:
    """``json.dumps(stream_json(stream))``, compact, written a record at a time.

    A stream of many small records would otherwise need all their dicts (and the
    whole text) at once: several times the stream's own memory.
    """
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    head = {"version": stream.version}
    if stream.configuration is not None:
        head["configuration"] = plain(stream.configuration.state)
    out.write(dumps(head)[:-1] + ',"records":[')
    for i, rec in enumerate(stream.records):
        if i:
            out.write(",")
        out.write(dumps(record_json(rec)))
    out.write("]," + dumps(_json_tail(stream))[1:])


def _field_lines(body: Obj, values: Any, offset: int, indent: str, out: list[str]) -> int:
    """Print fields with their offsets, walking the description's sizes."""
    entries = body.get("fields", [])
    for entry in entries:
        name = entry.get("name")
        size = int(entry.get("size", 0))
        count = int(entry.get("array_len", 1))
        value = _value_of(values, entry)
        if entry.get("type") == "struct" and isinstance(entry.get("struct"), Obj) and entry.get("struct"):
            out.append(f"{indent}{offset:#08x} {name}: struct {entry.get('struct').get('vmsd_name')}")
            items = value if isinstance(value, list) and "array_len" in [k for k, _ in entry] else [value]
            for item in items:
                offset = _field_lines(entry.get("struct"), item, offset, indent + "    ", out)
            continue
        shown = plain(value)
        text = str(shown)
        if len(text) > 100:
            text = text[:97] + "..."
        out.append(f"{indent}{offset:#08x} {name} ({entry.get('type')}, {size * count} bytes) = {text}")
        offset += size * count
    for sub in body.get("subsections", []) or []:
        name = sub.get("vmsd_name")
        offset += 2 + len(name.encode()) + 4
        out.append(f"{indent}subsection {name} v{sub.get('version')}")
        offset = _field_lines(sub, values, offset, indent + "    ", out)
    return offset


def _value_of(values: Any, entry: Obj) -> Any:
    name = entry.get("name")
    if isinstance(values, Obj):
        return values.get(name)
    if isinstance(values, VMStateObject):
        for f in values.VMSD.all_fields():
            if f.name == name and f.attr is not None:
                return getattr(values, f.attr)
    return None


def stream_tree(stream: Stream) -> str:
    return "\n".join(tree_lines(stream))


def tree_lines(stream: Stream) -> Iterator[str]:
    """The lines of :func:`stream_tree`, a record's at a time (its memory stays the stream's)."""
    yield f"QEVM stream version {stream.version}"
    if stream.configuration is not None:
        state = stream.configuration.state
        yield f"{stream.configuration.offset:#08x} CONFIGURATION machine={state.name.decode(errors='replace')!r}"
    for rec in stream.records:
        out: list[str] = []
        _record_lines(rec, out, "")
        yield from out
    yield f"{stream.eof_offset:#08x} EOF"
    if stream.trailer is not None:
        yield f"{stream.trailer_offset:#08x} VMDESCRIPTION {len(stream.trailer_text or b'')} bytes of JSON"
    for w in stream.warnings:
        yield f"warning: {w}"


def _record_lines(rec: Section | Command, out: list[str], indent: str) -> None:
    if isinstance(rec, Command):
        repeated = f" (repeated {rec.count} times)" if rec.count > 1 else ""
        out.append(f"{indent}{rec.offset:#08x} COMMAND {rec.name} {rec.data.hex()}{repeated}")
        for inner in rec.packaged or []:
            _record_lines(inner, out, indent + "    ")
        return
    head = f"{indent}{rec.offset:#08x} {SECTION_NAMES[rec.kind]} {rec.idstr} id={rec.section_id}"
    if rec.has_header:
        head += f" instance={rec.instance_id} version={rec.version_id}"
    p = rec.payload
    if isinstance(p, RamPayload):
        summary = _ram_summary(p)
        out.append(f"{head} ram: {summary}")
        return
    if rec.generic_body is not None and isinstance(p, bytes):
        out.append(f"{head} legacy, {len(p)} bytes")
        return
    source = "trailer" if rec.generic_body is not None else "spec"
    out.append(f"{head} [{rec.vmsd_name}, decoded by {source}]")
    header_size = 1 + 4 + 1 + len(rec.idstr.encode()) + 8
    body = rec.generic_body if rec.generic_body is not None else describe(p, rec.version_id)[0]
    _field_lines(body, p, rec.offset + header_size, indent + "    ", out)


# ---- --set ------------------------------------------------------------------

def apply_set(stream: Stream, assignment: str) -> None:
    """``SECTION[:INSTANCE].path.to[3].field=VALUE`` on a decoded section."""
    target, sep, raw = assignment.partition("=")
    if not sep:
        raise UsageError(f"--set needs SECTION.FIELD=VALUE, got {assignment!r}")
    sections = stream.full_sections()
    match = None
    for sec in sections:
        for name in (f"{sec.idstr}:{sec.instance_id}.", f"{sec.idstr}."):
            if target.startswith(name) and (match is None or len(name) > len(match[1])):
                if name.endswith(":0.") or ":" not in name or name == f"{sec.idstr}:{sec.instance_id}.":
                    match = (sec, name)
    if match is None:
        raise ToolError(f"--set {assignment!r}: no section matches (sections: {', '.join(sorted({s.idstr for s in sections}))})")
    sec, prefix = match
    path = target[len(prefix) :]
    steps = _parse_path(path)
    sec.payload = _assign(sec.payload, steps, _parse_value(raw), assignment)


def _assign(holder: Any, steps: list[str | int], value: Any, assignment: str) -> Any:
    """Set the value at ``steps`` below ``holder``; returns the holder (new for bytes)."""
    step = steps[0]
    if len(steps) > 1:
        value = _assign(_get(holder, step, assignment), steps[1:], value, assignment)
    if isinstance(holder, bytes):
        # A byte inside a buffer: bytes are immutable, so rebuild the buffer.
        if not isinstance(step, int) or not isinstance(value, int) or not 0 <= value <= 255:
            raise ToolError(f"--set {assignment!r}: a buffer element takes a byte value 0..255")
        _get(holder, step, assignment)
        edited = bytearray(holder)
        edited[step] = value
        return bytes(edited)
    _set(holder, step, value, assignment)
    return holder


def _parse_path(path: str) -> list[str | int]:
    steps: list[str | int] = []
    for part in path.replace("]", "").split("."):
        name, *indexes = part.split("[")
        if name:
            steps.append(name)
        steps.extend(int(i, 0) for i in indexes)
    if not steps:
        raise UsageError("--set needs a field path after the section")
    return steps


def _parse_value(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        return int(raw, 0)
    except ValueError:
        pass
    try:
        import ast

        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _get(holder: Any, step: str | int, assignment: str) -> Any:
    try:
        if isinstance(step, int):
            return holder[step]
        if isinstance(holder, Obj):
            if step not in [k for k, _ in holder]:
                raise KeyError(step)
            return holder.get(step)
        return getattr(holder, step)
    except (KeyError, IndexError, AttributeError, TypeError):
        raise ToolError(f"--set {assignment!r}: no field {step!r}") from None


def _set(holder: Any, step: str | int, value: Any, assignment: str) -> None:
    current = _get(holder, step, assignment)
    if isinstance(current, bytes) and isinstance(value, int):
        raise ToolError(f"--set {assignment!r}: the field holds bytes; give a bytes literal like b'\\x01'")
    if isinstance(step, int):
        holder[step] = value
    elif isinstance(holder, Obj):
        i = [k for k, _ in holder].index(step)
        holder[i] = (step, value)
    else:
        setattr(holder, step, type(current)(value) if isinstance(current, enum.Enum) else value)


def rewrite(data: bytes, specs: SpecSet, sets: list[str]) -> bytes:
    stream = read_stream(data, specs)
    for s in sets:
        apply_set(stream, s)
    return write_stream(stream)


# ---- diff ----------------------------------------------------------------------

def diff(a: Stream, b: Stream) -> list[str]:
    out: list[str] = []
    keyed_a = _keyed(a)
    keyed_b = _keyed(b)
    for key in keyed_a.keys() | keyed_b.keys():
        label = f"{key[0]}:{key[1]} {SECTION_NAMES[key[2]]}#{key[3]}"
        if key not in keyed_b:
            out.append(f"{label}: only in A")
        elif key not in keyed_a:
            out.append(f"{label}: only in B")
        else:
            _diff_values(plain_payload(keyed_a[key]), plain_payload(keyed_b[key]), label, out)
    if a.configuration is not None or b.configuration is not None:
        ca = plain(a.configuration.state) if a.configuration else None
        cb = plain(b.configuration.state) if b.configuration else None
        _diff_values(ca, cb, "configuration", out)
    return sorted(out)


def plain_payload(sec: Section) -> Any:
    if isinstance(sec.payload, RamPayload):
        out: dict[str, Any] = {
            f"{rec.block or ''}@{rec.offset:#x}": rec.data.hex() if len(rec.data) < 16 else hash(rec.data)
            for rec in sec.payload.records
        }
        for block in sec.payload.block_list():
            if block.mapped is not None:
                out.update(_mapped_pages(block.name, block.mapped))
        return out
    return plain(sec.payload)


def _mapped_pages(name: str, m: MappedRam) -> dict[str, Any]:
    """A mapped-ram block's pages keyed as page records are: a page absent from the file is zero, whatever
    bytes lie at its place (those are not what a destination loads)."""
    present = m.present()
    base = m.header.pages_offset - m.region_at
    region = memoryview(m.region)
    return {
        f"{name}@{i * PAGE_SIZE:#x}": hash(bytes(region[base + i * PAGE_SIZE:base + (i + 1) * PAGE_SIZE]))
        if present[i] else "00"
        for i in range(m.npages)
    }


def _keyed(stream: Stream) -> dict[tuple[str, int, int, int], Section]:
    seen: dict[tuple[str, int, int], int] = {}
    out: dict[tuple[str, int, int, int], Section] = {}
    for sec in stream.sections():
        base = (sec.idstr, sec.instance_id, sec.kind)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out[(*base, n)] = sec
    return out


def _diff_values(x: Any, y: Any, path: str, out: list[str]) -> None:
    if isinstance(x, dict) and isinstance(y, dict):
        for k in x.keys() | y.keys():
            if k not in y:
                out.append(f"{path}.{k}: only in A")
            elif k not in x:
                out.append(f"{path}.{k}: only in B")
            else:
                _diff_values(x[k], y[k], f"{path}.{k}", out)
    elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        for i, (p, q) in enumerate(zip(x, y, strict=True)):
            _diff_values(p, q, f"{path}[{i}]", out)
    elif x != y:
        out.append(f"{path}: {_short(x)} -> {_short(y)}")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["apply_set", "diff", "load_specs", "read_input", "rewrite", "stream_json", "stream_tree", "tree_lines", "write_json"]
