"""Each kind of `vmsd compat` input as a :class:`~vmsd.tools.compat.model.Side`.

- ``qemu:VERSION``: a shipped spec set (:mod:`vmsd.qemu.versions`);
- a folder: its ``.vmsd`` files compiled as ``--specs`` does (shipped specs they import included);
- a ``-dump-vmstate`` JSON file: every device type of one QEMU binary, for one machine type;
- a stream (SOURCE only): the sections it carries, as its trailer describes them (else as its
  decoded sections describe themselves), its commands and its configuration record.

Spec classes give layouts with their conditions; a dump gives them without the conditions' meaning
(it says only that a field has a ``field_exists`` test) and with C struct sizes where a field nests a
description, which are not wire sizes; a stream gives what one saved machine actually sent.
"""

from __future__ import annotations

import inspect
import json
import re
import struct
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from vmsd.runtime.kinds import KINDS
from vmsd.runtime.schema import FieldSpec, SubsectionSpec
from vmsd.runtime.vmdesc import NOT_ELEMENT_TYPES, Obj, describe
from vmsd.tools.compat.model import SENT, UNKNOWN, Desc, Field, Section, Side, StreamFacts
from vmsd.tools.errors import ToolError, UsageError

_STREAM_MAGIC = struct.pack(">I", 0x5145564D)  # "QEVM"


def load_side(text: str, role: str) -> Side:
    """The side named ``text`` on the command line; ``role`` is "SOURCE" or "DEST" (a stream is only a SOURCE)."""
    if text.startswith("qemu:"):
        return _shipped(text)
    path = Path(text)
    if path.is_dir():
        return _folder(text, path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{role} {text}: cannot read it: {e.strerror}") from None
    if data.startswith(_STREAM_MAGIC):
        if role != "SOURCE":
            raise UsageError(f"{role} {text}: a stream can only be the SOURCE (it is what a QEMU saved)")
        return _stream(text, data)
    return _dump(text, data)


# ---- spec classes (shipped sets and folders) ----


def _shipped(text: str) -> Side:
    from vmsd.qemu.versions import SPEC_SETS, spec_set

    version = text[len("qemu:"):]
    if version not in SPEC_SETS:
        raise UsageError(f"{text}: no shipped spec set for QEMU '{version}' (known: {', '.join(SPEC_SETS)})")
    classes = dict(spec_set(version).load_all().classes)
    return _class_side(text, "qemu", version, classes, complete=False)


def _folder(text: str, path: Path) -> Side:
    from vmsd.migration.stream import SpecSet
    from vmsd.tools.streams import load_specs

    classes = dict(load_specs(path, SpecSet()).load_all().classes)
    return _class_side(text, "specs", None, classes, complete=True)


def _class_side(label: str, kind: str, version: str | None, classes: dict[str, Any], complete: bool) -> Side:
    converter = _ClassConverter()
    descs = {name: [converter.desc(cls)] for name, cls in sorted(classes.items())}
    nested = {f.struct.VMSD.name for cls in classes.values() for f in cls.VMSD.all_fields() if f.struct is not None}
    # A vmsd that another only nests is no section of its own: its changes show in the sections nesting it.
    sections = [Section(name, name, d[0].version, d[0], versioned=name != "configuration")
                for name, d in descs.items() if name not in nested]
    return Side(label, kind, version, descs, sections, complete=complete)


class _ClassConverter:
    """Generated classes' static descriptions (:mod:`vmsd.runtime.schema`) as :class:`Desc`, each class once."""

    def __init__(self) -> None:
        self._done: dict[type, Desc] = {}

    def desc(self, cls: Any, version: int | None = None) -> Desc:
        if cls in self._done and version is None:
            return self._done[cls]
        spec = cls.VMSD
        out = Desc(spec.name, spec.version if version is None else version, spec.minimum,
                   self._fields(cls, spec.fields), tuple(self._sub(cls, s) for s in spec.subsections))
        if version is None:
            self._done[cls] = out
        return out

    def _sub(self, cls: Any, s: SubsectionSpec) -> Desc:
        needed = None if s.needed is None else predicate_text(cls, s.needed)
        return Desc(s.name, s.version, s.minimum, self._fields(cls, s.fields),
                    tuple(self._sub(cls, n) for n in s.subsections), needed=needed)

    def _fields(self, cls: Any, fields: tuple[FieldSpec, ...]) -> tuple[Field, ...]:
        out = []
        for f in fields:
            if f.kind == "validate":
                continue  # VMSTATE_VALIDATE puts nothing on the wire
            kind = KINDS[f.kind]
            count: int | None = 1
            if f.count_attr is not None or (kind.measured and f.kind != "bytes"):
                count = None  # a count from another field, or a list or tree measured as it goes
            elif not kind.whole and f.dims:
                count = 1
                for d in f.dims:
                    count *= d
            nested = None
            if f.struct is not None and f.kind == "struct":
                nested = self.desc(f.struct, f.struct_version if f.inline else None)
            out.append(Field(
                f.name, f.elem_size or None if f.kind != "struct" else None, count, f.since,
                predicate_text(cls, f.test) if f.test else None, f.info, nested, f.kind == "unused",
                varying=f.count_attr is not None))
        return tuple(out)


_RETURN = re.compile(r"^\s*return\s+(.*?)\s*$", re.M)


def predicate_text(cls: Any, method: str) -> str:
    """A predicate of a generated class in words: a spec expression as its generated Python (``self.``
    dropped), ``custom(NAME)`` for one the spec leaves to Python."""
    fn = getattr(cls, method, None)
    if fn is None or not method.startswith("_"):
        return f"custom({method})"
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):  # a folder's modules are compiled into a temporary folder, gone by now
        return method
    found = _RETURN.findall(source)
    return found[-1].replace("self.", "") if len(found) == 1 else method


# ---- -dump-vmstate ----


def _dump(text: str, data: bytes) -> Side:
    try:
        top = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ToolError(f"{text}: neither a migration stream nor a -dump-vmstate JSON file ({e})") from None
    if not isinstance(top, dict):
        raise ToolError(f"{text}: not a -dump-vmstate file (its JSON is not an object of device types)")
    machine = None
    descs: dict[str, list[Desc]] = {}
    sections = []
    for key, value in top.items():
        if key == "vmschkmachine":
            name = value.get("Name") if isinstance(value, dict) else None
            machine = name if isinstance(name, str) else None
            continue
        where = f"{text}: device type {key!r}"
        if not isinstance(value, dict) or not isinstance(value.get("Description"), dict):
            raise ToolError(f"{where}: no 'Description' object")
        try:
            desc = _dump_desc(value["Description"], where, key)
        except RecursionError:
            raise ToolError(f"{where}: descriptions nested too deeply") from None
        sections.append(Section(key, desc.name, desc.version, desc))
        _index(desc, descs)
    return Side(text, "dump", None, descs, sections, machine=machine, complete=True)


def _index(desc: Desc, out: dict[str, list[Desc]]) -> None:
    """Every description at any depth by name (a spec set's section may be a dump's nested one), once each."""
    found = out.setdefault(desc.name, [])
    if desc not in found:
        found.append(desc)
    for f in desc.fields:
        if f.struct is not None:
            _index(f.struct, out)


def _int(obj: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    value = obj.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ToolError(f"{where}: '{key}' is not an integer")
    return value


def _dump_desc(d: dict[str, Any], where: str, origin: str, needed: str | None = None) -> Desc:
    name = d.get("name")
    if not isinstance(name, str):
        raise ToolError(f"{where}: a description without a 'name'")
    where = f"{where}, {name}"
    version = _int(d, "version_id", where)
    minimum = _int(d, "minimum_version_id", where, 0)
    fields = []
    raw = d.get("Fields", [])
    subs = d.get("Subsections", [])
    if not isinstance(raw, list) or not isinstance(subs, list):
        raise ToolError(f"{where}: 'Fields' and 'Subsections' must be lists")
    for f in raw:
        if not isinstance(f, dict) or not isinstance(f.get("field"), str):
            raise ToolError(f"{where}: a field without a 'field' name")
    # Names that repeat in one description are numbered (``unused[1]``), as QEMU's trailers and vmsd's
    # specs name them.
    repeats = Counter(f["field"] for f in raw)
    seen: Counter[str] = Counter()
    for f in raw:
        fw = f"{where}, field {f['field']!r}"
        nested = f.get("Description")
        sub = _dump_desc(nested, fw, origin) if isinstance(nested, dict) else None
        num = f.get("num")
        # QEMU 10.0 and later print "num" for fixed arrays; a field without it is single or a variable
        # array (7.2 prints no "num" at all), so its count is not known.
        unused = f["field"] == "unused"
        # VMSTATE_UNUSED's size is all its bytes.
        count = _int(f, "num", fw) if num is not None else 1 if unused else None
        # A nested description's "size" is its C struct's, not what goes on the wire; a buffer sized by
        # another field has size 0.
        size = None if sub is not None else _int(f, "size", fw) or None
        cond = "its field_exists test" if f.get("field_exists") is True else None
        name_n = f["field"] if repeats[f["field"]] == 1 else f"{f['field']}[{seen[f['field']]}]"
        seen[f["field"]] += 1
        fields.append(Field(name_n, size, count, _int(f, "version_id", fw, 0), cond, None, sub, unused,
                            c_size=True))
    subsections = []
    for s in subs:
        if not isinstance(s, dict):
            raise ToolError(f"{where}: a subsection that is not an object")
        subsections.append(_dump_desc(s, where, origin, needed=UNKNOWN))
    return Desc(name, version, minimum, tuple(fields), tuple(subsections), needed=needed, origin=origin)


# ---- streams ----


def _stream(text: str, data: bytes) -> Side:
    from vmsd.migration.stream import (
        QEMU_VM_SECTION_FULL,
        QEMU_VM_SECTION_START,
        Command,
        CommandRun,
        json_name,
        read_stream,
    )
    from vmsd.qemu.versions import choose, machine_type, spec_set

    choice = choose(data)
    stream = read_stream(data, spec_set(choice.version))
    facts = StreamFacts()
    devices: dict[tuple[str, int], list[Obj]] = {}
    trailer_devices = stream.trailer.get("devices") if stream.trailer is not None else None
    for d in trailer_devices if isinstance(trailer_devices, list) else []:
        if isinstance(d, Obj):
            devices.setdefault((str(d.get("name")), d.get("instance_id")), []).append(d)
    sections = []
    descs: dict[str, list[Desc]] = {}
    for rec in stream.records:
        inner = rec.packaged if isinstance(rec, Command) and rec.packaged else [rec]
        for r in inner:
            if isinstance(r, Command | CommandRun):
                for command in _command_names(r):
                    if command not in facts.commands:
                        facts.commands.append(command)
                continue
            if r.kind not in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
                continue
            label = r.idstr if r.instance_id == 0 else f"{r.idstr}:{r.instance_id}"
            queue = devices.get((json_name(r.idstr), r.instance_id))
            body = queue.pop(0) if queue else None
            if body is None and r.payload is not None and hasattr(r.payload, "VMSD") and not r.legacy:
                body, _ = describe(r.payload, r.version_id)
            if body is None or r.legacy or not isinstance(body.get("fields"), list):
                facts.unstructured.append((label, r.version_id, r.instance_id))
                continue
            desc = _body_desc(body, r.version_id)
            sections.append(Section(label, desc.name, r.version_id, desc))
            descs.setdefault(desc.name, []).append(desc)
    if stream.configuration is not None:
        state = stream.configuration.state
        if hasattr(state, "VMSD"):
            body, _ = describe(state)
            desc = _body_desc(body, None)
            sections.insert(0, Section("configuration", desc.name, desc.version, desc, versioned=False))
            descs.setdefault(desc.name, []).append(desc)
        from vmsd.migration.stream import capabilities_of

        facts.capabilities = [c.decode(errors="replace") for c in capabilities_of(state)]
    name = machine_type(data)
    machine = name.decode(errors="replace") if name else None
    return Side(text, "stream", choice.version, descs, sections, machine=machine, stream=facts)


def _command_names(rec: Any) -> Iterator[str]:
    """The names of a command, of the commands of a CommandRun (kept as bytes), and of those in their packages."""
    from vmsd.migration.stream import CommandRun

    for cmd in rec.commands() if isinstance(rec, CommandRun) else [rec]:
        yield cmd.name
        for inner in cmd.packaged or []:
            if not hasattr(inner, "kind"):  # a package's commands; its sections are read as records above
                yield from _command_names(inner)


def _body_desc(body: Obj, version: int | None) -> Desc:
    """A trailer body (what one saved object put on the wire) as a description of exactly that."""
    name = str(body.get("vmsd_name", body.get("name", "")))
    v = body.get("version")
    version = version if version is not None else (v if isinstance(v, int) else 0)
    fields: list[Field] = []
    for e in body.get("fields", []) or []:
        if not isinstance(e, Obj):
            continue
        ename, etype = str(e.get("name")), e.get("type")
        size = e.get("size") if isinstance(e.get("size"), int) else None
        n = e.get("array_len") if isinstance(e.get("array_len"), int) else 1
        nested_body = e.get("struct") if isinstance(e.get("struct"), Obj) else (e if e.get("fields") is not None else None)
        nested = _body_desc(nested_body, None) if nested_body is not None and nested_body.get("fields") is not None \
            else None
        last = fields[-1] if fields else None
        # Elements of one array: consecutive entries of one name (QEMU numbers distinct fields that repeat).
        if last is not None and last.name == ename and etype not in NOT_ELEMENT_TYPES and last.count is not None:
            same = last.size == size and last.struct == nested
            fields[-1] = Field(ename, size if same else None, last.count + n, 0, None, last.type, last.struct)
            continue
        # A compressed run's entry gives one element's size and the run's length.
        fields.append(Field(ename, size if nested is None else None, n, 0, None, str(etype), nested,
                            etype == "unused_buffer"))
    subs = tuple(_body_desc(s, None) for s in body.get("subsections", []) or [] if isinstance(s, Obj))
    subs = tuple(attrs.evolve(s, needed=SENT) for s in subs)
    return Desc(name, version, version, tuple(fields), subs, actual=True)


def with_source_dump(src: Side, dump: Side) -> Side:
    """A stream SOURCE whose descriptions know which fields the saving QEMU has and left out.

    A stream carries only the fields whose test held (and arrays with elements); the saving QEMU's dump
    lists all of them.  A field it lists and the stream does not carry is one that DEST, which runs the
    same test on the same name, skips too; one it does not list at all is new to DEST, and its test is
    DEST's alone (see rules._fields)."""
    if src.kind != "stream":
        raise UsageError(f"--source-dump {dump.label}: only a stream SOURCE can use it ({src.label} is no stream)")
    if dump.kind != "dump":
        raise UsageError(f"--source-dump {dump.label}: not a -dump-vmstate file")
    known: dict[str, frozenset[str]] = {}

    def learn(desc: Desc) -> None:
        known[desc.name] = known.get(desc.name, frozenset()) | {f.name for f in desc.fields}
        for f in desc.fields:
            if f.struct is not None:
                learn(f.struct)
        for sub in desc.subsections:
            learn(sub)

    for found in dump.descs.values():
        for d in found:
            learn(d)

    def mark(desc: Desc) -> Desc:
        fields = tuple(attrs.evolve(f, struct=mark(f.struct)) if f.struct is not None else f for f in desc.fields)
        subs = tuple(mark(s) for s in desc.subsections)
        names = known.get(desc.name)
        left_out = None if names is None else names - {f.name for f in desc.fields}
        return attrs.evolve(desc, fields=fields, subsections=subs, left_out=left_out)

    sections = [attrs.evolve(s, desc=mark(s.desc)) for s in src.sections]
    descs: dict[str, list[Desc]] = {}
    for s in sections:
        descs.setdefault(s.desc.name, []).append(s.desc)
    return attrs.evolve(src, sections=sections, descs=descs)
