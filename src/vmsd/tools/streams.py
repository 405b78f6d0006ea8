"""What ``vmsd inspect`` and ``vmsd rewrite`` do with streams (``vmsd diff``: streamdiff), and the specs they use."""

from __future__ import annotations

import enum
import functools
import importlib
import importlib.util
import json
import linecache
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import attrs

from vmsd.migration.ram.mapped import MappedRam
from vmsd.migration.ram.records import RamPayload
from vmsd.migration.stream import (
    SECTION_NAMES,
    Command,
    CommandRun,
    Damage,
    Finding,
    MachineConfiguration,
    Section,
    SpecSet,
    Stream,
    capabilities_of,
    description_rule,
    idstr_bytes,
    read_stream,
    write_stream,
)
from vmsd.runtime.errors import VMSDError
from vmsd.runtime.vmdesc import Obj
from vmsd.runtime.vmstate import VMStateObject
from vmsd.tools.errors import ToolError, UsageError
from vmsd.tools.sectiontree import Tree, children, join, nested_body, object_tree, section_tree
from vmsd.tools.streamdiff import scalar_text


def shipped_specs(qemu: str | None, data: Any = None) -> SpecSet:
    """The shipped spec set of QEMU ``qemu`` (``--qemu``), else of the QEMU that wrote the stream
    ``data`` (bytes or a mapping of a file; see :mod:`vmsd.qemu.versions`), else the oldest."""
    from vmsd.qemu import versions

    if qemu is None:
        qemu = versions.choose(data).version if data is not None else next(iter(versions.SPEC_SETS))
    try:
        return versions.spec_set(qemu)
    except ValueError as e:
        raise ToolError(str(e)) from None


def load_hooks(modules: list[str] | None) -> None:
    """Import each ``--hooks`` module (a dotted name, or a path to a .py file); importing registers the
    implementations of custom predicates and hooks it defines (``vmsd.runtime.vmstate.register``).

    After :func:`load_specs`: the module may import the ``--specs`` classes (:data:`USER_SPECS`)."""
    for name in modules or []:
        try:
            if name.endswith(".py") or "/" in name:
                path = Path(name)
                if not path.is_file():
                    raise UsageError(f"--hooks {name}: no such file")
                spec = importlib.util.spec_from_file_location(f"vmsd_hooks_{path.stem}", path)
                if spec is None or spec.loader is None:
                    raise UsageError(f"--hooks {name}: not a Python module")
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except (UsageError, VMSDError):
            raise
        except ModuleNotFoundError as e:
            raise UsageError(f"--hooks {name}: {e}") from None
        except Exception as e:  # the module is the user's code: its failure is reported, not a traceback of ours
            raise ToolError(f"--hooks {name}: importing it failed: {type(e).__name__}: {e}") from None


USER_SPECS = "vmsd_specs"  # the package --hooks modules import --specs classes from


def load_specs(specs_dir: Path | None, shipped: SpecSet) -> SpecSet:
    """The ``shipped`` spec set, overridden by the .vmsd files of ``specs_dir``."""
    if specs_dir is None:
        return shipped
    from vmsd.bundled import specs_dir as bundled_specs
    from vmsd.codegen.compiler import compile_specs

    if not specs_dir.is_dir():
        raise UsageError(f"--specs {specs_dir}: not a folder")
    specs = sorted(specs_dir.rglob("*.vmsd"))
    if not specs:
        raise UsageError(f"--specs {specs_dir}: no .vmsd files there")
    # Shipped specs imported from the folder are the shipped classes (with their Python side), not copies.
    try:
        files = compile_specs(specs, str(specs_dir), {bundled_specs(): "vmsd.generated"})
    except ValueError as e:
        if isinstance(e, VMSDError):
            raise
        raise ToolError(f"the specs under {specs_dir} include a file outside it that vmsd does not ship ({e})") from None
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
        # The folder goes away; its sources stay readable (``inspect``: vmsd compat prints predicates).
        # An entry without a modification time is one linecache never drops as stale.
        for rel, text in files.items():
            name = str(Path(tmp) / package / rel)
            linecache.cache[name] = (len(text), None, text.splitlines(keepends=True), name)
    # A --hooks module imports the classes of DIR/dev.vmsd as vmsd_specs.dev (the package's own name
    # differs by folder, so that two folders in one process do not mix).
    for name in [m for m in sys.modules if m == USER_SPECS or m.startswith(USER_SPECS + ".")]:
        del sys.modules[name]
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        sys.modules[USER_SPECS + name[len(package):]] = sys.modules[name]
    merged = shipped.merged(SpecSet.from_modules(modules))
    merged.adopt_imported()
    return merged


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


def section_json(sec: Section, rule: tuple[bool, bool] = (False, True)) -> dict[str, Any]:
    """A section for ``inspect --json``; ``rule``: the stream's :func:`description_rule`."""
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
    elif sec.generic_body is not None and isinstance(sec.payload, bytes):
        out["decoded_by"] = "trailer"
        out["legacy_bytes"] = sec.payload.hex()
    elif sec.generic_body is not None or isinstance(sec.payload, VMStateObject):
        out["decoded_by"] = "trailer" if sec.generic_body is not None else "spec"
        out["vmsd_name"] = sec.vmsd_name
        tree = section_tree(sec, rule)
        assert isinstance(tree, Tree)  # a decoded section, neither RAM nor legacy bytes
        out["fields"] = fields_json(tree.body, tree.values)
        # Where each field starts in the stream, by the same names; absent subsections as null.
        out["offsets"] = {line.path: (line.offset if "absent" not in line.text or line.size is not None else None)
                          for line in _section_fields(sec, rule)}
    return out


def configuration_json(state: Any) -> dict[str, Any]:
    """The configuration record by QEMU's names (docs/names.md), only what the stream carries, with the
    machine name as text (QEMU writes ASCII; other bytes escaped) and ``capabilities`` as a list of names."""
    if isinstance(state, MachineConfiguration):  # a spec set without a configuration spec
        out: dict[str, Any] = {"name": state.name}
    else:
        tree = object_tree(state, 0)  # QEMU saves and loads the configuration at version 0
        out = fields_json(tree.body, tree.values)
        out["name"] = bytes(state.name)
    out["name"] = out["name"].decode("ascii", "backslashreplace")
    out["capabilities"] = [c.decode("ascii", "backslashreplace") for c in capabilities_of(state)]
    return out


def _commands(rec: Command | CommandRun) -> Iterator[Command]:
    return rec.commands() if isinstance(rec, CommandRun) else iter((rec,))


def record_json(rec: Section | Command | CommandRun, rule: tuple[bool, bool] = (False, True)
                ) -> Iterator[dict[str, Any]]:
    """The JSON entries of a record: one, or one per command of a :class:`CommandRun`."""
    if isinstance(rec, Section):
        yield section_json(rec, rule)
        return
    for cmd in _commands(rec):
        entry: dict[str, Any] = {"type": "COMMAND", "command": cmd.name, "offset": cmd.offset, "data": cmd.data.hex()}
        if cmd.count > 1:
            entry["count"] = cmd.count
        if cmd.packaged is not None:
            entry["packaged"] = [e for r in cmd.packaged for e in _inner_json(r, rule)]
        yield entry


def _inner_json(rec: Section | Command | CommandRun, rule: tuple[bool, bool]) -> Iterator[dict[str, Any]]:
    """A packaged record's entries: a section's, or each command's name (and count)."""
    if isinstance(rec, Section):
        yield section_json(rec, rule)
        return
    for cmd in _commands(rec):
        yield {"command": cmd.name, "count": cmd.count} if cmd.count > 1 else {"command": cmd.name}


def stream_json(stream: Stream) -> dict[str, Any]:
    out: dict[str, Any] = {"version": stream.version}
    if stream.configuration is not None:
        out["configuration"] = configuration_json(stream.configuration.state)
    rule = description_rule(stream)
    out["records"] = [entry for rec in stream.records for entry in record_json(rec, rule)]
    out.update(_json_tail(stream))
    return out


def _json_tail(stream: Stream, error: VMSDError | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"eof_offset": stream.eof_offset}
    if error is not None:
        out["error"] = {"message": str(error), "offset": error.offset}
        if stream.damage is not None:
            out["error"]["section"] = stream.damage.section.idstr
            out["error"]["field"] = stream.damage.field
    out["trailer"] = {"offset": stream.trailer_offset, "size": len(stream.trailer_text or b"")} if stream.trailer else None
    if stream.warnings:
        out["warnings"] = stream.warnings
    return out


def write_json(stream: Stream, out: TextIO, error: VMSDError | None = None) -> None:
    """``json.dumps(stream_json(stream))``, compact, written a record at a time.

    A stream of many small records would otherwise need all their dicts (and the
    whole text) at once: several times the stream's own memory.
    """
    encoder = json.JSONEncoder(separators=(",", ":"))
    dumps = encoder.encode
    head: dict[str, Any] = {"version": stream.version}
    if stream.configuration is not None:
        head["configuration"] = configuration_json(stream.configuration.state)
    out.write(dumps(head)[:-1] + ',"records":[')
    rule = description_rule(stream)
    first = True
    for rec in stream.records:
        for entry in record_json(rec, rule):
            if not first:
                out.write(",")
            first = False
            if isinstance(rec, Section):
                _write_entry(out, encoder, entry)
            else:  # commands' entries are small: one string each is cheaper than its pieces
                out.write(dumps(entry))
    if error is not None and stream.damage is not None:
        out.write(("" if first else ",") + dumps(damage_json(stream.damage, rule)))
    out.write("]," + dumps(_json_tail(stream, error))[1:])


_JSON_PIECE = 1 << 12  # characters of an entry's text gathered before they are written


def _write_entry(out: TextIO, encoder: json.JSONEncoder, entry: dict[str, Any]) -> None:
    """``encoder.encode(entry)`` written in pieces of about 4 KiB: one section (RAM listing thousands of
    blocks, a device of thousands of fields) can be most of the stream, its text several times that."""
    pieces: list[str] = []
    size = 0
    for piece in encoder.iterencode(entry):
        pieces.append(piece)
        size += len(piece)
        if size >= _JSON_PIECE:
            out.write("".join(pieces))
            pieces.clear()
            size = 0
    out.write("".join(pieces))


def damage_json(damage: Damage, rule: tuple[bool, bool]) -> dict[str, Any]:
    """The section a damaged stream's error is in, as far as it was read (marked ``partial``)."""
    out = section_json(damage.section, rule)
    out["decoded_by"] = "spec" if damage.by_spec else "trailer"
    out["partial"] = True
    return out


@attrs.frozen
class FieldLine:
    """One line of a section's tree: a field (``entry`` its description), a struct header, or a subsection."""
    depth: int
    offset: int
    path: str  # as --set and diff name it, below the section
    text: str
    size: int | None = None  # wire bytes of a field


def field_lines(body: Obj, values: Obj, offset: int, spec: Any = None, depth: int = 0,
                prefix: str = "") -> Iterator[FieldLine]:
    """The fields of a section's tree (:mod:`vmsd.tools.sectiontree`) with their offsets, walking the
    description's sizes; ``spec`` (a typed section's VmsdSpec) adds the subsections it did not send.

    Values that stop early (a section cut by damage) end the walk where they stop."""
    sent = set()
    for key, child in children(body, values).items():
        path = join(prefix, key)
        entry = child.entry
        if entry is None:
            continue  # more values than the description has entries: none on a decoded section
        if child.kind == "subsection":
            name = str(entry.get("vmsd_name"))
            sent.add(name)
            yield FieldLine(depth, offset, path, f"subsection {name} v{entry.get('version')}")
            offset += 2 + len(name.encode()) + 4
            for line in field_lines(entry, child.value, offset, None, depth + 1, path):
                offset = max(offset, line.offset + (line.size or 0))
                yield line
            continue
        kind = entry.get("type")
        # A struct's body is under "struct"; a tmp's or vstruct's entry is its body.
        struct_body = entry.get("struct") if kind == "struct" else entry if kind in ("tmp", "vstruct") else None
        if isinstance(struct_body, Obj) and struct_body:
            is_array = isinstance(child.value, list) and not isinstance(child.value, Obj)
            items = child.value if is_array else [child.value]
            for i, item in enumerate(items):
                at = f"{path}[{i}]" if is_array else path
                yield FieldLine(depth, offset, at, f"{at}: {kind} {struct_body.get('vmsd_name')}")
                if isinstance(item, Obj):
                    for line in field_lines(struct_body, item, offset, None, depth + 1, at):
                        offset = max(offset, line.offset + (line.size or 0))
                        yield line
            continue
        size = int(entry.get("size", 0)) * int(entry.get("array_len", 1))
        yield FieldLine(depth, offset, path, f"{path} ({entry.get('type')}, {size} bytes) = "
                        f"{_value_text(child.value, entry)}", size)
        offset += size
    for sub in spec.subsections if spec is not None else ():
        if sub.name not in sent:
            yield FieldLine(depth, offset, join(prefix, sub.name), f"subsection {sub.name}: absent (not sent)")


def _value_text(value: Any, entry: Obj) -> str:
    """Integers in hex with decimal beside (as diff shows them), enum members by name, lists of them in hex;
    the rest as JSON."""
    names: type[enum.Enum] | None = getattr(entry, "enum", None)
    if names is not None and type(value) is int:
        try:
            return f"{names(value).name} ({value})"
        except ValueError:
            pass  # a value outside the enum is kept as read
    if isinstance(value, int):
        return scalar_text(value, entry)
    if isinstance(value, list) and value and all(type(v) is int for v in value):
        text = "[" + ", ".join(str(v) if 0 <= v < 10 else hex(v) for v in value) + "]"
    else:
        shown = _json_value(entry, value)
        text = shown if isinstance(shown, str) else str(shown)
    return text if len(text) <= 100 else text[:97] + "..."


def fields_json(body: Obj | None, values: Obj) -> dict[str, Any]:
    """A section's values for ``inspect --json``, keyed by the names of docs/names.md: a struct or a
    subsection is an object, an array of them a list; buffers and uint8 arrays are hex strings."""
    out: dict[str, Any] = {}
    for key, child in children(body, values).items():
        if child.kind == "subsection":
            out[key] = fields_json(child.entry, child.value)
        else:
            out[key] = _json_value(child.entry, child.value)
    return out


def _json_value(entry: Obj | None, value: Any, index: int = 0) -> Any:
    if isinstance(value, Obj):
        return fields_json(nested_body(entry, index), value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        if entry is not None and entry.get("type") == "uint8" and all(type(v) is int for v in value):
            return bytes(value).hex()
        if set(map(type, value)) <= _JSON_READY:
            return value  # register arrays: long lists of plain ints, kept whole
        return [_json_value(entry, v, i) for i, v in enumerate(value)]
    return plain(value)


def stream_tree(stream: Stream) -> str:
    return "\n".join(tree_lines(stream))


# Checks that compare a stream with the destination machine's own configuration.  vmsd has no machine: it
# compares with the spec's default, so these fail on every normal stream and say nothing about it.
MACHINE_CHECKS = {
    ("PCIBUS", "nirq"): "the PCI bus's number of interrupt lines is set by the machine's chipset (4 on pc's "
                        "PIIX3, 8 on q35's ICH9); QEMU compares it with its own machine's, vmsd has no machine "
                        "to compare with",
}


def machine_check(finding: Finding) -> str | None:
    """Why a failed check is no problem of the stream, for the checks of :data:`MACHINE_CHECKS`."""
    if finding.kind != "check" or finding.field is None:
        return None
    return MACHINE_CHECKS.get((finding.idstr.rsplit("/", 1)[-1], finding.field))


def strict_problems(stream: Stream) -> list[str]:
    """Why QEMU's loader with the same spec set would refuse the stream, or a section is not decoded by a
    typed spec (``--strict``); empty when neither."""
    out: list[str] = []
    fallbacks = {(f.idstr, f.message) for f in stream.findings if f.kind == "fallback"}
    for idstr, message in sorted(fallbacks):
        out.append(f"section '{idstr}': {message}")
    failed = {i for i, _ in fallbacks}
    for sec in stream.full_sections():
        if sec.generic_body is not None and sec.idstr not in failed:
            out.append(f"section '{sec.idstr}' (instance {sec.instance_id}) has no typed spec: decoded from the "
                       "trailer")
    for f in stream.findings:
        if f.kind == "check" and machine_check(f) is None:
            out.append(f"section '{f.idstr}': {f.message}")
    return out


def _notes(stream: Stream) -> Iterator[str]:
    """The warnings, with the failed checks of :data:`MACHINE_CHECKS` as explained notes instead."""
    benign = {f"section '{f.idstr}': {f.message}": why for f in stream.findings if (why := machine_check(f))}
    for w in stream.warnings:
        why = benign.get(w)
        yield f"note: {w}: expected, {why}" if why else f"warning: {w}"


def tree_lines(stream: Stream, error: VMSDError | None = None) -> Iterator[str]:
    """The lines of :func:`stream_tree`, a record's at a time (its memory stays the stream's); with the
    ``error`` of a damaged stream (:func:`vmsd.migration.stream.read_partial`), the records before it."""
    yield f"QEVM stream version {stream.version}"
    if stream.configuration is not None:
        state = stream.configuration.state
        yield f"{stream.configuration.offset:#08x} CONFIGURATION machine={state.name.decode(errors='replace')!r}"
    rule = description_rule(stream)
    for rec in stream.records:
        yield from _record_lines(rec, "", rule)
    if error is not None:
        damage = stream.damage
        if damage is not None:
            out = list(_record_lines(damage.section, "", rule, "spec" if damage.by_spec else "trailer"))
            out[0] += "" if damage.whole else " cut short by the error below"
            yield from out
        yield from _notes(stream)
        at = f"{error.offset:#08x} " if error.offset is not None else ""
        field = f" in {damage.field}" if damage is not None and damage.field else ""
        yield (f"{at}ERROR{field}: {error.message} (the stream is damaged here; the records above were read "
               "before it)")
        return
    yield f"{stream.eof_offset:#08x} EOF"
    if stream.trailer is not None:
        yield f"{stream.trailer_offset:#08x} VMDESCRIPTION {len(stream.trailer_text or b'')} bytes of JSON"
    yield from _notes(stream)


def _record_lines(rec: Section | Command | CommandRun, indent: str, rule: tuple[bool, bool],
                  source: str | None = None) -> Iterator[str]:
    """The lines of a record; ``source`` says what decoded a section (default: whether it has a trailer
    body), for a damaged section read again by its spec's description."""
    if not isinstance(rec, Section):
        for cmd in _commands(rec):
            repeated = f" (repeated {cmd.count} times)" if cmd.count > 1 else ""
            yield f"{indent}{cmd.offset:#08x} COMMAND {cmd.name} {cmd.data.hex()}{repeated}"
            for inner in cmd.packaged or []:
                yield from _record_lines(inner, indent + "    ", rule)
        return
    head = f"{indent}{rec.offset:#08x} {SECTION_NAMES[rec.kind]} {rec.idstr} id={rec.section_id}"
    if rec.has_header:
        head += f" instance={rec.instance_id} version={rec.version_id}"
    p = rec.payload
    if isinstance(p, RamPayload):
        summary = _ram_summary(p)
        yield f"{head} ram: {summary}"
        return
    if rec.generic_body is not None and isinstance(p, bytes):
        yield f"{head} legacy, {len(p)} bytes"
        return
    source = source or ("trailer" if rec.generic_body is not None else "spec")
    yield f"{head} [{rec.vmsd_name}, decoded by {source}]"
    for line in _section_fields(rec, rule):
        yield (f"{indent}{'    ' * (line.depth + 1)}{line.offset:#08x} {line.text}"
               if line.size is not None or "absent" not in line.text
               else f"{indent}{'    ' * (line.depth + 1)}{line.text}")


def _section_fields(rec: Section, rule: tuple[bool, bool]) -> Iterator[FieldLine]:
    tree = section_tree(rec, rule)
    assert isinstance(tree, Tree)  # a decoded section, neither RAM nor legacy bytes
    header_size = 1 + 4 + 1 + len(idstr_bytes(rec.idstr)) + 8
    spec = rec.payload.VMSD if rec.generic_body is None else None
    return field_lines(tree.body, tree.values, rec.offset + header_size, spec)


# ---- --set ------------------------------------------------------------------

def apply_set(stream: Stream, assignment: str) -> None:
    """``SECTION[:INSTANCE].FIELD_PATH=VALUE`` on a decoded section (docs/names.md): the names inspect
    and diff print; a typed section also takes its Python attribute names (``cpu.eip``)."""
    target, sep, raw = assignment.partition("=")
    if not sep:
        raise UsageError(f"--set needs SECTION.FIELD=VALUE, got {assignment!r}")
    sec, path = find_section(stream, target, f"--set {assignment!r}")
    steps = _resolve(sec.payload, path, assignment)
    if not steps:
        raise UsageError("--set needs a field path after the section")
    sec.payload = _assign(sec.payload, steps, _parse_value(raw), assignment)


def find_section(stream: Stream, target: str, what: str) -> tuple[Section, str]:
    """The FULL section a name starts with, and the rest of the name: ``IDSTR:INSTANCE``, or ``IDSTR`` when
    the stream has one instance of it, followed by ``.`` or a space (diff prints a space)."""
    sections = [s for s in stream.full_sections() if not isinstance(s.payload, RamPayload)]
    instances: dict[str, list[Section]] = {}
    for sec in sections:
        instances.setdefault(sec.idstr, []).append(sec)
    best: tuple[int, Section | None, str] | None = None  # (length of the name, section or None: ambiguous, name)
    for idstr, secs in instances.items():
        names: list[tuple[str, Section | None]] = [(f"{idstr}:{s.instance_id}", s) for s in secs]
        names.append((idstr, secs[0] if len(secs) == 1 else None))
        for name, candidate in names:
            if target.startswith(name) and target[len(name) : len(name) + 1] in (".", " ", "["):
                if best is None or len(name) > best[0]:
                    best = (len(name), candidate, name)
    if best is None:
        raise ToolError(f"{what}: no section matches (sections: {', '.join(sorted(instances))})")
    length, found, name = best
    if found is None:
        ids = ", ".join(f"{name}:{s.instance_id}" for s in instances[name])
        raise ToolError(f"{what}: the stream has several instances of {name!r}: name one ({ids})")
    rest = target[length:]
    return found, rest[1:] if rest[:1] in (".", " ") else rest


def _names(holder: Any) -> dict[str, str | tuple[str, int] | None]:
    """The names a path step may use below ``holder``: QEMU's (as inspect prints them) first, then a typed
    object's attribute names; a repeated name of a trailer body (``tmp``) is ``tmp#2`` from its second."""
    if isinstance(holder, Obj):
        out: dict[str, str | tuple[str, int] | None] = {}
        seen: dict[str, int] = {}
        for i, (key, _) in enumerate(holder):
            n = seen[key] = seen.get(key, 0) + 1
            out[key if n == 1 else f"{key}#{n}"] = (key, i)
        # A name the body repeats is an array described element by element, as inspect and diff name it
        # (vmsd.tools.sectiontree.children): name[i] is its i-th entry.
        count: dict[str, int] = {}
        for i, (key, _) in enumerate(holder):
            if seen[key] > 1:
                k = count[key] = count.get(key, -1) + 1
                out.setdefault(f"{key}[{k}]", (key, i))
        return out
    if isinstance(holder, VMStateObject):
        cls: Any = type(holder)
        names: dict[str, str | tuple[str, int] | None] = {}
        # A subsection's fields are attributes of the object itself: its name is a step that stays put.
        names.update((sub.name, None) for sub in cls.VMSD.all_subsections())
        for f in cls.VMSD.all_fields():
            if f.attr is not None:
                names.setdefault(f.name, f.attr)
        for a in attrs.fields(cls):
            names.setdefault(a.name, a.name)
        return names
    return {}


def _resolve(holder: Any, path: str, assignment: str) -> list[Any]:
    """The steps (attribute names, (key, position) of trailer bodies, indices) a field path names.

    QEMU's names hold dots (``env.eip``), so each step takes the longest name that the path continues."""
    steps: list[Any] = []
    rest = path
    while rest:
        if rest[0] == ".":
            rest = rest[1:]
            continue
        if rest[0] == "[":
            close = rest.find("]")
            try:
                index = int(rest[1:close], 0) if close > 0 else None
            except ValueError:
                index = None
            if index is None:
                raise UsageError(f"--set {assignment!r}: a bad index at {rest!r}")
            steps.append(index)
            holder = _get(holder, index, assignment)
            rest = rest[close + 1 :]
            continue
        if isinstance(holder, list) and not isinstance(holder, Obj) and len(holder) == 1:
            # QEMU describes an array of one struct as the struct alone (no index): so does inspect.
            steps.append(0)
            holder = holder[0]
        names = _names(holder)
        fits = [n for n in names if rest.startswith(n) and rest[len(n) : len(n) + 1] in ("", ".", "[")]
        if not fits:
            if isinstance(holder, VMStateObject) and any(
                    f.kind == "unused" and f.name == rest for f in holder.VMSD.all_fields()):
                # inspect prints them (the trailer describes them); a typed object has no value to edit.
                raise ToolError(f"--set {assignment!r}: {rest!r} is unused bytes (VMSTATE_UNUSED): QEMU skips "
                                "them on load and the typed spec keeps none, so there is nothing to set")
            raise ToolError(f"--set {assignment!r}: no field {rest!r} (inspect prints the names --set takes)")
        name = max(fits, key=len)
        step = names[name]
        if step is not None:
            steps.append(step)
            holder = _get(holder, step, assignment)
        rest = rest[len(name) :]
    return steps


def _assign(holder: Any, steps: list[Any], value: Any, assignment: str) -> Any:
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


def _get(holder: Any, step: str | int | tuple[str, int], assignment: str) -> Any:
    try:
        if isinstance(step, int):
            return holder[step]
        if isinstance(step, tuple):  # a trailer body's field by position
            return holder[step[1]][1]
        return getattr(holder, step)
    except (KeyError, IndexError, AttributeError, TypeError):
        raise ToolError(f"--set {assignment!r}: no field {step!r}") from None


def _set(holder: Any, step: str | int | tuple[str, int], value: Any, assignment: str) -> None:
    current = _get(holder, step, assignment)
    if isinstance(current, bytes) and isinstance(value, int):
        raise ToolError(f"--set {assignment!r}: the field holds bytes; give a bytes literal like b'\\x01'")
    value = _rows_like(current, value)
    if isinstance(step, int):
        holder[step] = value
    elif isinstance(step, tuple):
        holder[step[1]] = (step[0], value)
    else:
        setattr(holder, step, type(current)(value) if isinstance(current, enum.Enum) else value)


def _rows_like(current: Any, value: Any) -> Any:
    """A flat list for a two-dimensional array (QEMU describes it, and inspect shows it, flat) cut into
    rows as the typed field holds it; any other value as given."""
    if (isinstance(current, list) and current and all(isinstance(row, list) for row in current)
            and isinstance(value, list) and value and not any(isinstance(v, list) for v in value)):
        width = len(current[0])
        if width and len(value) == width * len(current):
            return [value[i : i + width] for i in range(0, len(value), width)]
    return value


def refuse_unless_strict(stream: Stream) -> None:
    """``--strict``: a :class:`ToolError` naming the first problem of :func:`strict_problems` (and how many)."""
    problems = strict_problems(stream)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ToolError(f"strict: {problems[0]}{more}")


def rewrite(data: bytes, specs: SpecSet, sets: list[str], strict: bool = False) -> bytes:
    stream = read_stream(data, specs)
    if strict:
        refuse_unless_strict(stream)
    for s in sets:
        apply_set(stream, s)
    return write_stream(stream)


__all__ = [
    "apply_set",
    "configuration_json",
    "field_lines",
    "find_section",
    "load_hooks",
    "load_specs",
    "read_input",
    "refuse_unless_strict",
    "rewrite",
    "shipped_specs",
    "stream_json",
    "stream_tree",
    "strict_problems",
    "tree_lines",
    "write_json",
]
