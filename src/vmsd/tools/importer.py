"""Turn QEMU's ``-dump-vmstate`` output into skeleton ``.vmsd`` specs.

``vmsd import-qemu DUMP.json [--stream FILE] -o DIR`` calls :func:`import_qemu`.
The dump lists every device class of a QEMU binary with its VMState layout:
field names, versions, whether a ``field_exists`` test is set, and C sizes,
but no types and no predicates.  A migration stream's JSON trailer (from
``--stream``) adds what was actually sent: QEMU's type names (``uint32``,
``int32 equal``, ``buffer``, ``struct`` ...), array lengths and wire sizes.

The importer writes one file per distinct top-level layout (the QOM types
that share it are listed in its doc comment), nested layouts used by several
files into ``common.vmsd`` (which the device files ``import``), and marks
everything a person must check: ``# GUESS:`` where a type or size was
inferred, ``# TODO:`` where a predicate (``field_exists``, subsection
``needed``) has to be transcribed from the C source.  The output always
passes ``vmsd check``; :func:`import_qemu` checks it before returning.
"""

from __future__ import annotations

import json
import keyword
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmsd.grammar import ast
from vmsd.grammar.pynames import MEMBER_RESERVED, module_name_problem, python_class_name
from vmsd.migration.stream import find_trailer
from vmsd.runtime.outfile import OutputError, write_file
from vmsd.runtime.scalars import BY_INFO, BY_NAME, SCALARS
from vmsd.runtime.vmdesc import Obj
from vmsd.tools.errors import ToolError

__all__ = ["ImportQemuError", "import_qemu"]


class ImportQemuError(ToolError):
    """Unusable input (missing file, malformed dump, stream without trailer)."""


# -- QEMU type names of the trailer -------------------------------------------
# A C size alone is taken for the unsigned integer of that size.
_GUESS_BY_SIZE = {s.size: s.name for s in SCALARS if s.integer and not s.signed}
_NULL_TYPES = frozenset({"nullptr", "ptr-marker"})

# Identifiers a field does not take: the compiler would give it a trailing underscore (pynames).
_AVOID_ATTRS = MEMBER_RESERVED
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A vmsd name the grammar takes for a keyword or scalar type has to be quoted.
_GRAMMAR_WORDS = frozenset({
    "as", "bitmap", "bytes", "class", "custom", "enum", "equal", "false", "flags", "if", "import", "info",
    "fd", "le", "list", "map", "minimum", "needed", "opaque", "qlist", "since", "struct", "subsection", "tmp",
    "true", "unused", "validate", "version", "vmsd",
}).union(BY_NAME)
_TODO_EXISTS = "TODO: transcribe field_exists from the C source"
_TODO_NEEDED = "TODO: transcribe the needed predicate from the C source"


# -- input model ---------------------------------------------------------------------
@dataclass(eq=False)
class _Field:
    name: str  # QEMU's field name
    version: int
    exists: bool
    size: int  # dump: C size; trailer-only: wire size of one element
    num: int | None
    desc: _Desc | None
    tname: str | None = None  # trailer name when it cannot be derived (trailer-only layouts)
    sometimes: bool = False  # trailer-only: absent from some instances


@dataclass(eq=False)
class _Desc:
    name: str
    version: int
    minimum: int
    fields: list[_Field]
    subsections: list[_Desc]
    has_fields: bool = True
    from_trailer: bool = False
    sig: tuple[Any, ...] | None = None  # cached layout signature
    groups: dict[str, _Group] | None = None  # cached trailer groups by trailer name


@dataclass
class _Group:
    """The trailer entries of one field (one entry, an ``array_len`` entry, or ``index`` runs)."""

    name: str
    type: str
    count: int
    size: int
    total: int
    nullable: bool = False
    body: Obj | None = None
    inline_version: int | None = None


def _fail(where: str, msg: str) -> ImportQemuError:
    return ImportQemuError(f"{where}: {msg}")


def _int(obj: dict[str, Any], key: str, where: str, default: int | None = None) -> int:
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        if v is None:
            raise _fail(where, f"missing integer '{key}'")
        raise _fail(where, f"'{key}' must be an integer, not {json.dumps(v)[:40]}")
    return v


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise _fail(where, f"missing string '{key}'" if v is None else f"'{key}' must be a string")
    return v


def _parse_desc(obj: Any, where: str) -> _Desc:
    if not isinstance(obj, dict):
        raise _fail(where, "a Description must be a JSON object")
    name = _str(obj, "name", where)
    where = f"{where} ({name})"
    version = _int(obj, "version_id", where)
    minimum = _int(obj, "minimum_version_id", where, 0)
    raw_fields = obj.get("Fields")
    raw_subs = obj.get("Subsections", [])
    if raw_fields is not None and not isinstance(raw_fields, list):
        raise _fail(where, "'Fields' must be a list")
    if not isinstance(raw_subs, list):
        raise _fail(where, "'Subsections' must be a list")
    fields: list[_Field] = []
    for i, rf in enumerate(raw_fields or []):
        fw = f"{where}.Fields[{i}]"
        if not isinstance(rf, dict):
            raise _fail(fw, "a field must be a JSON object")
        fname = _str(rf, "field", fw)
        exists = rf.get("field_exists", False)
        if not isinstance(exists, bool):
            raise _fail(fw, "'field_exists' must be true or false")
        num = rf.get("num")
        if num is not None and (isinstance(num, bool) or not isinstance(num, int)):
            raise _fail(fw, "'num' must be an integer")
        nested = _parse_desc(rf["Description"], f"{fw}.Description") if "Description" in rf else None
        fields.append(_Field(fname, _int(rf, "version_id", fw, 0), exists, _int(rf, "size", fw, 0), num, nested))
    subs = [_parse_desc(s, f"{where}.Subsections[{i}]") for i, s in enumerate(raw_subs)]
    return _Desc(name, version, minimum, fields, subs, raw_fields is not None)


def _read_dump(path: Path) -> tuple[str, list[tuple[str, _Desc]]]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ImportQemuError(f"cannot read dump {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImportQemuError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ImportQemuError(f"{path}: not a -dump-vmstate file (expected a JSON object of device types)")
    machine = ""
    tops: list[tuple[str, _Desc]] = []
    for key, value in data.items():
        if key == "vmschkmachine":
            if isinstance(value, dict) and isinstance(value.get("Name"), str):
                machine = value["Name"]
            continue
        if not isinstance(value, dict) or "Description" not in value:
            raise ImportQemuError(f"{path}: entry '{key}' has no 'Description' (is this a -dump-vmstate file?)")
        tops.append((key, _parse_desc(value["Description"], f"{path}: '{key}'.Description")))
    if not tops:
        raise ImportQemuError(f"{path}: the dump describes no device types")
    return machine, tops


def _read_trailer(path: Path) -> Obj:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImportQemuError(f"cannot read stream {path}: {exc.strerror or exc}") from None
    found = find_trailer(data)
    if found is None:
        raise ImportQemuError(f"{path}: no JSON description (vmdesc trailer) found at the end of the stream")
    trailer = found[1]
    if not isinstance(trailer, Obj) or not isinstance(trailer.get("devices"), list):
        raise ImportQemuError(f"{path}: the stream's JSON trailer has no 'devices' list")
    return trailer


# -- trailer ------------------------------------------------------------------------------
def _obj(v: Any) -> Obj | None:
    return v if isinstance(v, Obj) else None


def _entries(body: Obj) -> list[Obj]:
    fields = body.get("fields")
    return [e for e in fields if isinstance(e, Obj)] if isinstance(fields, list) else []


def _inline_body(entry: Obj) -> Obj | None:
    """The nested body a tmp/vstruct/qtailq/... entry writes into itself (first one)."""
    if not isinstance(entry.get("vmsd_name"), str):
        return None
    out = Obj()
    for key in ("vmsd_name", "version", "fields", "subsections"):
        if entry.get(key) is not None:
            out.append((key, entry.get(key)))
    return out


def _nested_body(entry: Obj) -> Obj | None:
    if entry.get("type") == "struct":
        nested = _obj(entry.get("struct"))
        return nested if nested else None
    return _inline_body(entry)


def _size(entry: Obj) -> int:
    s = entry.get("size", 0)
    return s if isinstance(s, int) and not isinstance(s, bool) else 0


def _is_null(entry: Obj) -> bool:
    t = entry.get("type")
    return t in _NULL_TYPES or (t == "struct" and not _obj(entry.get("struct")) and _size(entry) == 1)


def _groups(body: Obj) -> list[_Group]:
    out: list[_Group] = []
    last_indexed = False
    for e in _entries(body):
        name, t = e.get("name"), e.get("type")
        if not isinstance(name, str):
            continue
        t = t if isinstance(t, str) else "unknown"
        null = _is_null(e)
        nested = _nested_body(e)
        version = e.get("version") if t in ("vstruct", "tmp") else None
        index = e.get("index")
        if isinstance(index, int) and last_indexed and out and out[-1].name == name and index == out[-1].count:
            g = out[-1]
            g.count += 1
            g.total += _size(e)
            g.nullable |= null
            if not null:
                if g.type in _NULL_TYPES:
                    g.type = t
                if g.size == 0:
                    g.size = _size(e)
                g.body = g.body or nested
            continue
        n = e.get("array_len")
        count = n if isinstance(n, int) and n > 0 else 1
        g = _Group(name, t, count, _size(e), _size(e) * count, null, nested,
                   version if isinstance(version, int) else None)
        if null:
            g.size = 0
        out.append(g)
        last_indexed = isinstance(index, int)
    return out


class _Trailer:
    def __init__(self, trailer: Obj | None) -> None:
        self.devices: list[Obj] = []
        self.bodies: dict[str, list[Obj]] = {}
        if trailer is None:
            return
        for dev in trailer.get("devices") or []:
            if isinstance(dev, Obj):
                self.devices.append(dev)
                self._index(dev)

    def _index(self, body: Obj) -> None:
        name = body.get("vmsd_name")
        if not isinstance(name, str):
            return  # a legacy (save_state) section: one opaque buffer
        self.bodies.setdefault(name, []).append(body)
        for e in _entries(body):
            nested = _nested_body(e)
            if nested is not None:
                self._index(nested)
        subs = body.get("subsections")
        for s in subs if isinstance(subs, list) else []:
            if isinstance(s, Obj):
                self._index(s)


def _trailer_names(desc: _Desc) -> list[str]:
    """The name QEMU's trailer gives each field: repeated names get ``[k]``."""
    counts: dict[str, int] = {}
    for f in desc.fields:
        counts[f.name] = counts.get(f.name, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for f in desc.fields:
        if f.tname is not None:
            out.append(f.tname)
        elif counts[f.name] > 1:
            k = seen.get(f.name, 0)
            seen[f.name] = k + 1
            out.append(f"{f.name}[{k}]")
        else:
            out.append(f.name)
    return out


def _compatible(desc: _Desc, body: Obj) -> bool:
    names = set(_trailer_names(desc))
    return all(g.name in names for g in _groups(body))


# -- the importer ----------------------------------------------------------------------------
@dataclass(eq=False)
class _File:
    stem: str
    top: _Desc | None
    labels: list[str] = field(default_factory=list)  # QOM types / section names
    decls: list[_Desc] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)
    common_layer: int | None = None
    shipped: Path | None = None  # a spec file vmsd ships: imported, never written

    @property
    def import_text(self) -> str:
        return self.shipped.as_posix() if self.shipped is not None else f"{self.stem}.vmsd"


@dataclass(frozen=True)
class _ShippedVmsd:
    name: str
    version: int
    class_name: str
    fields: tuple[str, ...]  # QEMU's field names, in order


def _qemu_field_names(v: ast.Vmsd) -> tuple[str, ...]:
    """The names a -dump-vmstate file lists for ``v``'s fields (it lists no VMSTATE_VALIDATE)."""
    return tuple(_unnumbered("unused" if f.kind == "unused" else (f.wire_name or f.name or "")) for f in v.fields
                 if f.kind != "validate")


def _unnumbered(name: str) -> str:
    """A field name without the ``[N]`` QEMU's JSON appends to repeated names (the dump does not)."""
    return re.sub(r"\[[0-9]+\]$", "", name)


def _shipped_specs(root: Path | None, machine: str) -> dict[Path, tuple[list[_ShippedVmsd], list[str]]]:
    """The QEMU spec files vmsd ships under ``root`` for the dump's QEMU, with their vmsds and enum names.

    That is the spec set :mod:`vmsd.qemu.versions` has for the machine type (``pc-i440fx-10.0``: 10.0's,
    the newest not newer; the oldest for a name without a version): the files of its folder
    ``qemu/X.Y`` and the files they import (a newer set imports the older specs it reuses).  Another
    version's files would bring other layouts of the same vmsds into scope.
    """
    from vmsd.grammar.diagnostics import SpecError
    from vmsd.grammar.parser import parse
    from vmsd.qemu.versions import SPEC_SETS, machine_version, nearest

    out: dict[Path, tuple[list[_ShippedVmsd], list[str]]] = {}
    if root is None:
        return out
    version = machine_version(machine.encode())
    folder = root / "qemu" / (nearest(version) if version is not None else next(iter(SPEC_SETS)))
    todo = sorted(p.resolve() for p in folder.glob("*.vmsd"))
    while todo:
        path = todo.pop(0)
        if path in out:
            continue
        try:
            spec = parse(path.read_text(encoding="utf-8"), str(path))
        except (OSError, SpecError) as exc:
            raise ImportQemuError(f"cannot read the shipped spec {path}: {exc}") from None
        vmsds = [_ShippedVmsd(v.name, v.version, v.class_name or python_class_name(v.name), _qemu_field_names(v))
                 for v in spec.vmsds]
        out[path] = (vmsds, [e.name for e in spec.enums])
        todo += sorted((path.parent / imp.path).resolve() for imp in spec.imports)
    return out


def _walk_fields(desc: _Desc) -> Iterator[_Field]:
    for _, f in _walk_owned(desc):
        yield f


def _walk_owned(desc: _Desc) -> Iterator[tuple[_Desc, _Field]]:
    """Fields of a vmsd and of its subsections (one namespace), with the layout holding each."""
    for f in desc.fields:
        yield desc, f
    for s in desc.subsections:
        yield from _walk_owned(s)


def _children(desc: _Desc) -> list[_Desc]:
    out: list[_Desc] = []
    for f in _walk_fields(desc):
        if f.desc is not None and all(c is not f.desc for c in out):
            out.append(f.desc)
    return out


def _quote(s: str) -> str:
    return json.dumps(s)


def _vmsd_token(name: str) -> str:
    return name if _IDENT.fullmatch(name) and name not in _GRAMMAR_WORDS else _quote(name)


def _sanitize(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "field"
    if s[0].isdigit():
        s = "f_" + s
    if keyword.iskeyword(s) or keyword.issoftkeyword(s):
        s += "_"
    if s in _AVOID_ATTRS:
        s += "_field"
    return s


def _stem(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "vmsd"
    return "v" + s if s[0].isdigit() else s


class _Importer:
    def __init__(self, dump_path: Path, stream_path: Path | None, shipped_root: Path | None = None) -> None:
        self.dump_path = dump_path
        self.stream_path = stream_path
        self.machine, raw_tops = _read_dump(dump_path)
        self.shipped_files = _shipped_specs(shipped_root, self.machine)
        # (vmsd name, version, field names) -> the shipped file declaring it (its set's own folder first)
        self.shipped_by_layout: dict[tuple[str, int, tuple[str, ...]], Path] = {}
        for path, (vmsds, _) in self.shipped_files.items():
            for v in vmsds:
                self.shipped_by_layout.setdefault((v.name, v.version, v.fields), path)
        self.trailer = _Trailer(_read_trailer(stream_path) if stream_path is not None else None)
        self.canon: dict[tuple[Any, ...], _Desc] = {}
        self.decls_by_name: dict[str, list[_Desc]] = {}
        self.pseudo: dict[tuple[str, int], _Desc | None] = {}
        self.clusters: dict[str, list[tuple[set[str], list[Obj]]]] = {}
        # Top-level layouts: distinct layouts, with the QOM types / sections using each.
        self.tops: list[tuple[_Desc, list[str]]] = []
        for qom, desc in raw_tops:
            self._add_top(self._canonical(desc), qom)
        for decls in self.decls_by_name.values():
            decls.sort(key=lambda d: len(d.fields), reverse=True)
        self._add_trailer_only()

    # -- canonical layouts -----------------------------------------------------------------
    def _sig(self, d: _Desc) -> tuple[Any, ...]:
        got = d.sig
        if got is None:
            fields = tuple(
                (f.name, f.tname, f.version, f.exists, f.sometimes, f.num,
                 None if f.desc is not None else f.size, None if f.desc is None else self._sig(f.desc))
                for f in d.fields
            )
            got = (d.name, d.version, d.minimum, d.has_fields, d.from_trailer, fields,
                   tuple(self._sig(s) for s in d.subsections))
            d.sig = got
        return got

    def _canonical(self, d: _Desc) -> _Desc:
        """One object per distinct layout; nested references point at canonical objects."""
        self._canonical_fields(d)
        key = self._sig(d)
        if key not in self.canon:
            self.canon[key] = d
            self.decls_by_name.setdefault(d.name, []).append(d)
        return self.canon[key]

    def _canonical_fields(self, d: _Desc) -> None:
        for f in d.fields:
            if f.desc is not None:
                f.desc = self._canonical(f.desc)
        for s in d.subsections:
            self._canonical_fields(s)

    def _add_top(self, d: _Desc, label: str) -> None:
        for top, labels in self.tops:
            if top is d:
                if label not in labels:
                    labels.append(label)
                return
        self.tops.append((d, [label]))

    # -- trailer types ------------------------------------------------------------------------
    def groups(self, d: _Desc) -> dict[str, _Group]:
        got = d.groups
        if got is None:
            got = {}
            for body in self.trailer.bodies.get(d.name, []):
                if not _compatible(d, body):
                    continue
                for g in _groups(body):
                    old = got.get(g.name)
                    if old is None or (old.body is None and g.body is not None) or old.type in _NULL_TYPES:
                        if old is not None:
                            g.nullable |= old.nullable
                        got[g.name] = g
                    else:
                        old.nullable |= g.nullable
            d.groups = got
        return got

    def _known_decl(self, body: Obj, dump_only: bool = False) -> _Desc | None:
        name = body.get("vmsd_name")
        for d in self.decls_by_name.get(name if isinstance(name, str) else "", []):
            if not (dump_only and d.from_trailer) and _compatible(d, body):
                return d
        return None

    def _add_trailer_only(self) -> None:
        """Sections of the stream whose vmsd the dump lacks (cpu, timer, PCIBUS ...)."""
        for dev in self.trailer.devices:
            name = dev.get("vmsd_name")
            if not isinstance(name, str) or self._known_decl(dev, dump_only=True) is not None:
                continue
            d = self._pseudo(dev)
            if d is None:
                continue
            idstr = dev.get("name")
            self._add_top(d, f"section {idstr}" if isinstance(idstr, str) else f"section {name}")

    def _pseudo(self, body: Obj) -> _Desc | None:
        """The layout of a body the dump lacks, merged over every body of the same kind.

        Bodies of one name whose field names overlap are instances of one
        layout; a wrapper and the core it holds (both "pckbd") are two.
        None while that layout is being built (a struct containing itself).
        """
        name = body.get("vmsd_name")
        if not isinstance(name, str):
            return None
        clusters = self.clusters.get(name)
        if clusters is None:
            clusters = []
            for b in self.trailer.bodies.get(name, []):
                if self._known_decl(b, dump_only=True) is not None:
                    continue
                names = {g.name for g in _groups(b)}
                hits = [c for c in clusters if (c[0] & names) or not (c[0] or names)]
                merged: tuple[set[str], list[Obj]] = (names, [b])
                for c in hits:
                    clusters.remove(c)
                    merged[0].update(c[0])
                    merged[1][:0] = c[1]
                clusters.append(merged)
            self.clusters[name] = clusters
        names = {g.name for g in _groups(body)}
        index = next((i for i, c in enumerate(clusters) if (c[0] & names) or not (c[0] or names)), None)
        if index is None:
            return None
        key = (name, index)
        if key in self.pseudo:
            return self.pseudo[key]
        self.pseudo[key] = None
        got = self._canonical(self._from_bodies(name, clusters[index][1]))
        self.pseudo[key] = got
        return got

    def _from_bodies(self, name: str, bodies: list[Obj]) -> _Desc:
        version = max((b.get("version") for b in bodies if isinstance(b.get("version"), int)), default=0)
        order: list[str] = []
        first: dict[str, _Group] = {}
        seen_in: dict[str, int] = {}
        for b in bodies:
            at = 0  # insert a name seen first here after the previous one of this body
            for g in _groups(b):
                seen_in[g.name] = seen_in.get(g.name, 0) + 1
                if g.name not in first:
                    first[g.name] = g
                    order.insert(at, g.name)
                elif first[g.name].body is None and g.body is not None:
                    first[g.name].body = g.body
                at = order.index(g.name) + 1
        # QEMU numbers repeated names (config[0], config[1]); names such as
        # env.cr[0], env.cr[2] are the C expression itself and stay as they are.
        bases = [re.sub(r"\[[0-9]+\]$", "", n) for n in order]
        numbered = {
            b for b in set(bases)
            if [n for n, nb in zip(order, bases, strict=True) if nb == b] == [f"{b}[{k}]" for k in range(bases.count(b))]
            and bases.count(b) > 1
        }
        fields: list[_Field] = []
        for tname, base in zip(order, bases, strict=True):
            g = first[tname]
            qname = base if base in numbered else tname
            nested: _Desc | None = None
            if g.body is not None:
                nested = self._known_decl(g.body) or self._pseudo(g.body)
            fields.append(_Field(qname, 0, False, g.size, None, nested, tname, seen_in[tname] < len(bodies)))
        sub_bodies: dict[str, list[Obj]] = {}
        for b in bodies:
            subs = b.get("subsections")
            for s in subs if isinstance(subs, list) else []:
                if isinstance(s, Obj) and isinstance(s.get("vmsd_name"), str):
                    sub_bodies.setdefault(s.get("vmsd_name"), []).append(s)
        subsections = [self._from_bodies(sname, sb) for sname, sb in sub_bodies.items()]
        return _Desc(name, version, version, fields, subsections, True, True)

    # -- placement ----------------------------------------------------------------------------
    def plan(self) -> list[_File]:
        self.tops.sort(key=lambda t: (t[0].name.lower(), t[0].from_trailer, t[1][0]))
        # Nested layouts vmsd ships (same name, version and fields) are imported from its specs: a rough copy
        # here would replace the shipped spec, and its Python side, wherever these files are used.
        top_ids = {id(top) for top, _ in self.tops}
        self.shipped: dict[int, Path] = {
            id(d): path for d in self.canon.values()
            if id(d) not in top_ids and (path := self.shipped_spec(d)) is not None
        }
        by_name: dict[str, int] = {}
        for top, _ in self.tops:
            by_name[top.name] = by_name.get(top.name, 0) + 1
        files: list[_File] = []
        used_stems: set[str] = set()
        for top, labels in self.tops:
            base = _stem(top.name)
            if by_name[top.name] > 1 and any(f.top is not None and f.top.name == top.name for f in files):
                base = _stem(f"{top.name}_{labels[0].removeprefix('section ')}")
            if re.fullmatch(r"common(_[0-9]+)?", base):
                base += "_dev"
            stem, n = base, 2
            while stem in used_stems:
                stem, n = f"{base}_{n}", n + 1
            used_stems.add(stem)
            files.append(_File(stem, top, labels))
        # Which files need which layout.
        reach: dict[int, list[_Desc]] = {}
        need: dict[int, set[int]] = {}
        all_decls: dict[int, _Desc] = {}
        for i, f in enumerate(files):
            assert f.top is not None
            order: list[_Desc] = []
            self._reach(f.top, order)
            reach[i] = order
            for d in order:
                need.setdefault(id(d), set()).add(i)
                all_decls[id(d)] = d
        # A top-level layout other files embed stays in its own file (they import
        # it) unless a shared layout embeds it too: common files import no device file.
        tops = {id(f.top) for f in files if f.top is not None}
        shared: set[int] = {k for k, v in need.items() if len(v) > 1 and k not in tops}
        while True:
            self._close(shared, all_decls)
            moved = False
            for i in range(len(files)):
                names: set[str] = set()
                for d in reach[i]:
                    if id(d) in shared or (id(d) in tops and d is not files[i].top):
                        continue
                    if d.name in names:
                        shared.add(id(d))
                        moved = True
                    names.add(d.name)
            if not moved:
                break
        home: dict[int, _File] = {}
        shipped_files = self._shipped_files(all_decls, home)
        device_files: list[_File] = []
        for i, f in enumerate(files):
            f.decls = [d for d in reach[i] if id(d) not in shared and (id(d) not in tops or d is f.top)]
            for d in f.decls:
                home[id(d)] = f
            if f.decls:
                device_files.append(f)
        # Shared layouts go to common.vmsd (common_2.vmsd ... when names repeat).
        commons: list[_File] = []
        layer_of: dict[int, int] = {}
        for d in self._topo([all_decls[k] for k in all_decls if k in shared]):
            k = max((layer_of[id(c)] for c in _children(d) if id(c) not in self.shipped), default=0)
            while k < len(commons) and any(o.name == d.name for o in commons[k].decls):
                k += 1
            if k == len(commons):
                commons.append(_File("common" if k == 0 else f"common_{k + 1}", None, common_layer=k))
            commons[k].decls.append(d)
            layer_of[id(d)] = k
            home[id(d)] = commons[k]
        self.home = home
        for f in [*commons, *device_files]:
            targets = [home[id(c)] for d in f.decls for c in _children(d)]
            for t in targets:
                if t is not f and t.stem not in f.imports:
                    f.imports.append(t.stem)
            f.imports.sort()
        # Tops that live in a common file (other layouts embed them): say so there.
        for f in files:
            if not f.decls and f.top is not None:
                host = home[id(f.top)]
                host.labels.append(f"{f.top.name}: {', '.join(f.labels)}")
        self._name_classes([*commons, *device_files], shipped_files)
        return [*commons, *device_files]

    def shipped_spec(self, d: _Desc) -> Path | None:
        """The shipped spec file declaring ``d``'s layout: its vmsd name, version and field names."""
        return self.shipped_by_layout.get((d.name, d.version, tuple(_unnumbered(f.name) for f in d.fields)))

    def _shipped_files(self, all_decls: dict[int, _Desc], home: dict[int, _File]) -> list[_File]:
        """A file for each shipped spec some layout imports, holding every vmsd it declares (all are in
        scope of the files importing it): the matched layouts themselves, stand-ins for the others."""
        wanted: dict[Path, list[_Desc]] = {}
        for d in all_decls.values():
            for c in _children(d):
                if id(c) in self.shipped:
                    got = wanted.setdefault(self.shipped[id(c)], [])
                    if all(o is not c for o in got):
                        got.append(c)
        out: list[_File] = []
        for path in sorted(wanted):
            f = _File(path.as_posix(), None, shipped=path)
            for v in self.shipped_files[path][0]:
                match = next((c for c in wanted[path] if c.name == v.name and c.version == v.version), None)
                stand_in = match or _Desc(v.name, v.version, 0, [], [])
                f.decls.append(stand_in)
                home[id(stand_in)] = f
            out.append(f)
        return out

    def _reach(self, d: _Desc, order: list[_Desc]) -> None:
        if any(o is d for o in order) or id(d) in self.shipped:
            return
        order.append(d)
        for c in _children(d):
            self._reach(c, order)

    def _close(self, shared: set[int], all_decls: dict[int, _Desc]) -> None:
        stack = [all_decls[k] for k in shared]
        while stack:
            d = stack.pop()
            for c in _children(d):
                if id(c) not in shared and id(c) not in self.shipped:
                    shared.add(id(c))
                    stack.append(c)

    def _topo(self, decls: list[_Desc]) -> list[_Desc]:
        out: list[_Desc] = []
        ids = {id(d) for d in decls}
        done: set[int] = set()

        def visit(d: _Desc) -> None:
            if id(d) in done:
                return
            done.add(id(d))
            for c in _children(d):
                if id(c) in ids:
                    visit(c)
            out.append(d)

        for d in decls:
            visit(d)
        return out

    # -- class names and struct references ---------------------------------------------------
    def _name_classes(self, files: list[_File], shipped: list[_File]) -> None:
        vmsd_names = {d.name for f in [*files, *shipped] for d in f.decls}
        taken: set[str] = set()
        self.cls: dict[int, str] = {}
        self.explicit: set[int] = set()
        # The names shipped files bring into scope are theirs: imported layouts keep their class names,
        # and no class of ours takes one of them.
        for f in shipped:
            assert f.shipped is not None
            vmsds, enums = self.shipped_files[f.shipped]
            taken.update(enums)
            for d, v in zip(f.decls, vmsds, strict=True):
                taken.add(v.class_name)
                self.cls[id(d)] = v.class_name
        for f in files:
            for d in f.decls:
                base = python_class_name(d.name)
                if keyword.iskeyword(base):
                    base += "_"
                cname, n = base, 2
                while cname in taken or cname.lower() in {t.lower() for t in taken} or module_name_problem(cname):
                    cname, n = f"{base}{n}", n + 1
                taken.add(cname)
                self.cls[id(d)] = cname
                if cname != python_class_name(d.name):
                    self.explicit.add(id(d))
        self.taken_classes = taken
        self.vmsd_names = vmsd_names
        self.by_stem = {f.stem: f for f in [*files, *shipped]}
        self.visible: dict[str, list[_Desc]] = {
            f.stem: [*f.decls, *(d for s in f.imports for d in self.by_stem[s].decls)] for f in files
        }
        # Decide every struct reference now, renaming classes where a name is ambiguous.
        self.refs: dict[tuple[str, int], str] = {}
        for _ in range(3):
            changed = False
            for f in files:
                for d in f.decls:
                    for c in _children(d):
                        ref = self._resolve(f, c)
                        if ref is not None:
                            self.refs[(f.stem, id(c))] = ref
                        elif id(c) not in self.shipped:  # a shipped class keeps its name (unique by `taken`)
                            self._rename_class(c)
                            changed = True
            if not changed:
                break
        for f in files:
            for d in f.decls:
                for c in _children(d):
                    if (f.stem, id(c)) not in self.refs:
                        raise ImportQemuError(f"{f.stem}.vmsd: no unambiguous name for vmsd {c.name!r} (importer bug)")

    def _find(self, f: _File, token: str) -> _Desc | None:
        """What the checker's find_vmsd answers for ``token`` in file ``f``."""
        visible = self.visible[f.stem]
        for test in (lambda v: v.name == token, lambda v: self.cls[id(v)] == token):
            hits = [v for v in visible if test(v)]
            if hits:
                own = [v for v in hits if self.home[id(v)] is f]
                return (own or hits)[0] if len(own) == 1 or len(hits) == 1 else None
        return None

    def _resolve(self, f: _File, target: _Desc) -> str | None:
        if self._find(f, target.name) is target:
            return _vmsd_token(target.name)
        cname = self.cls[id(target)]
        if self._find(f, cname) is target:
            return cname
        return None

    def _rename_class(self, d: _Desc) -> None:
        base = python_class_name(d.name) + "Vmsd"
        cname, n = base, 2
        while cname in self.taken_classes or cname in self.vmsd_names or module_name_problem(cname):
            cname, n = f"{base}{n}", n + 1
        self.taken_classes.add(cname)
        self.cls[id(d)] = cname
        self.explicit.add(id(d))

    # -- emission ----------------------------------------------------------------------------
    def header(self, f: _File) -> list[str]:
        src = f"{self.dump_path.name}"
        if self.machine:
            src += f" (machine {self.machine})"
        lines = [
            f"# Imported by `vmsd import-qemu` from the QEMU -dump-vmstate file {src}"
            + (f" and the JSON trailer of the migration stream {self.stream_path.name}." if self.stream_path else "."),
            "# This is a skeleton: every line marked GUESS (a type, size or count the input",
            "# does not state) or TODO (a field_exists test or subsection predicate the dump",
            "# does not carry) needs a person to check it against the QEMU C source.",
        ]
        if f.common_layer is not None:
            lines.append("# Layouts shared by several imported files.")
            for label in f.labels:
                lines.append(f"# Also the top-level vmsd of {label}.")
        elif f.top is not None and f.top.from_trailer:
            lines += [
                "# The dump does not describe this vmsd (not a device class); it was rebuilt",
                "# from the stream's trailer alone: fields and subsections the stream did not",
                "# carry are missing, and field versions (since) are unknown.",
            ]
        if any(self.by_stem[imp].shipped is not None for imp in f.imports):
            lines.append("# Layouts vmsd ships (same vmsd name, version and fields) are imported from its specs.")
        shipped = self.shipped_spec(f.top) if f.top is not None else None
        if shipped is not None and f.top is not None and any(d is f.top for d in f.decls):
            lines += [f"# vmsd ships a spec of {f.top.name} version {f.top.version} ({shipped.as_posix()}):",
                      "# used with --specs, this file replaces it."]
        for imp in f.imports:
            lines.append("")
            lines.append(f'import "{self.by_stem[imp].import_text}"')
        return lines

    def render(self, f: _File) -> str:
        out = self.header(f)
        for d in f.decls:
            out.append("")
            if f.top is d:
                what = "Sections" if d.from_trailer else "QOM types"
                labels = [lbl.removeprefix("section ") for lbl in f.labels]
                out.append(f"## {what}: {', '.join(labels)}.")
            out += _Decl(self, f, d).lines()
        return "\n".join(out) + "\n"


@dataclass
class _Line:
    code: str
    notes: list[str]
    indent: int


class _Decl:
    """The text of one vmsd declaration."""

    def __init__(self, imp: _Importer, f: _File, d: _Desc) -> None:
        self.imp = imp
        self.file = f
        self.d = d
        self.attrs: set[str] = set()
        self.methods: set[str] = set()
        self.out: list[_Line] = []

    def unique(self, base: str, pool: set[str], other: set[str]) -> str:
        name, n = base, 2
        while name in pool or name in other or name in _AVOID_ATTRS:
            name, n = f"{base}_{n}", n + 1
        pool.add(name)
        return name

    def lines(self) -> list[str]:
        d = self.d
        # Reserve field names first so predicate names never take one.
        self.idents: dict[int, str] = {}
        for owner, f in _walk_owned(d):
            if not self._is_unused(f, self._group(f, owner)):
                self.idents[id(f)] = self.unique(_sanitize(f.name), self.attrs, set())
        head = f"vmsd {_vmsd_token(d.name)} version {d.version} minimum {min(d.minimum, d.version)}"
        notes = []
        if d.minimum > d.version:
            notes.append(f"TODO: QEMU declares minimum_version_id {d.minimum} above version_id {d.version}")
        if d.from_trailer:
            notes.append("GUESS: minimum_version_id is not in the trailer")
        if id(d) in self.imp.explicit:
            head += f" class {self.imp.cls[id(d)]}"
        self.out.append(_Line(head + " {", notes, 0))
        if not d.has_fields:
            self.out.append(_Line("# the dump lists no fields (QEMU migrates nothing or marks it unmigratable)", [], 1))
        self.fields(d, d.fields, 1, d.version)
        self.subsections(d, d.name, 1, set())
        self.out.append(_Line("}", [], 0))
        return _align(self.out)

    def _group(self, f: _Field, owner: _Desc) -> _Group | None:
        groups = self.imp.groups(owner)
        for ff, tn in zip(owner.fields, _trailer_names(owner), strict=True):
            if ff is f:
                return groups.get(tn)
        return None

    def _is_unused(self, f: _Field, g: _Group | None) -> bool:
        if g is not None:
            return g.type == "unused_buffer" and f.name == "unused" and g.total > 0
        return f.name == "unused" and f.desc is None and f.size > 0

    def fields(self, owner: _Desc, fields: list[_Field], indent: int, version: int) -> None:
        for f in fields:
            self.out.append(self.field(owner, f, indent, version))

    def subsections(self, owner: _Desc, parent: str, indent: int, seen: set[str]) -> None:
        for s in owner.subsections:
            if s.name in seen or not s.name.startswith(parent) or s.name == parent:
                why = "repeats another subsection" if s.name in seen else f"does not extend its parent's name '{parent}'"
                self.out.append(_Line(f"# TODO: subsection {_quote(s.name)} left out: its name {why}", [], indent))
                continue
            seen.add(s.name)
            base = s.name[len(self.d.name):].strip("/") or s.name
            method = self.unique(_sanitize(base) + "_needed", self.methods, self.attrs)
            version = min(max(s.version, 0), 255)
            notes = [_TODO_NEEDED]
            if version != s.version:
                notes.append(f"TODO: QEMU declares version {s.version}")
            if s.minimum > version:
                notes.append(f"TODO: QEMU declares minimum_version_id {s.minimum} above its version")
            if s.from_trailer:
                notes.append("GUESS: minimum_version_id is not in the trailer")
            self.out.append(_Line(
                f"subsection {_quote(s.name)} version {version} minimum {min(s.minimum, version)} "
                f"needed custom({method}) {{", notes, indent))
            if not s.has_fields:
                self.out.append(_Line("# the dump lists no fields", [], indent + 1))
            self.fields(s, s.fields, indent + 1, version)
            self.subsections(s, s.name, indent + 1, seen)
            self.out.append(_Line("}", [], indent))

    def field(self, owner: _Desc, f: _Field, indent: int, version: int) -> _Line:
        g = self._group(f, owner)
        notes: list[str] = []
        code = self.kind(owner, f, g, notes)
        # presence
        if f.exists or f.sometimes:
            ident = self.idents.get(id(f), "unused")
            method = self.unique(f"{ident}_exists", self.methods, self.attrs)
            code += f" if custom({method})"
            if f.exists:
                extra = f" (QEMU ignores its version_id {f.version} when field_exists is set)" if f.version else ""
                notes.append(_TODO_EXISTS + extra)
            else:
                notes.append("TODO: absent from some instances in the stream; transcribe its condition from the C source")
        elif f.version > 0:
            since = f.version
            if since > version:
                notes.append(f"TODO: QEMU declares version_id {since} above the vmsd's {version}")
                since = version
            if since > 0:
                code += f" since {since}"
        return _Line(code, notes, indent)

    def wire(self, f: _Field) -> str:
        ident = self.idents[id(f)]
        return "" if ident == f.name else f" as {_quote(f.name)}"

    def dims(self, n: int) -> str:
        return f"[{n}]" if n > 1 else ""

    def kind(self, owner: _Desc, f: _Field, g: _Group | None, notes: list[str]) -> str:
        if self._is_unused(f, g):
            n = g.total if g is not None else f.size * max(f.num or 1, 1)
            return f"unused {n}"
        ident = self.idents[id(f)]
        wire = self.wire(f)
        count = g.count if g is not None else (f.num if f.num and f.num > 0 else 1)
        absent = "no trailer" if self.imp.stream_path is None else (
            "vmsd not in the stream" if owner.name not in self.imp.trailer.bodies else "field not in the stream")
        if f.desc is not None:
            target = self.imp.refs[(self.file.stem, id(f.desc))]
            t = g.type if g is not None else None
            if t == "vstruct" and g is not None and g.inline_version is not None:
                v = g.inline_version
                if f.desc.minimum <= v <= f.desc.version:
                    return f"struct {target} {ident} version {v}{wire}"
                notes.append(f"TODO: VMSTATE_VSTRUCT at version {v}, outside the nested vmsd's range")
                return f"struct {target} {ident}{wire}"
            if t == "tmp" or (t is None and f.name == "tmp"):
                if t is None:
                    notes.append(f"GUESS: VMSTATE_WITH_TMP assumed from the name ({absent})")
                return f"struct {target} {ident} tmp{wire}"
            if t in ("qtailq", "qlist"):
                return f"{'list' if t == 'qtailq' else 'qlist'}<{target}> {ident}{wire}"
            if t == "gtree":
                notes.append("GUESS: map key assumed to be a direct (uint64) key")
                return f"map<uint64, {target}> {ident}{wire}"
            if t is None:
                if f.num is None:
                    notes.append(f"GUESS: one plain struct (the dump gives neither kind nor count; {absent})")
            elif t not in ("struct", *_NULL_TYPES):
                notes.append(f"GUESS: trailer type {_quote(t)} with a nested vmsd, written as a struct")
            nullable = "?" if g is not None and g.nullable and count > 1 else ""
            if g is not None and g.nullable and count <= 1:
                notes.append("TODO: the only element was a NULL pointer in the stream")
            return f"struct {target}{nullable} {ident}{self.dims(count)}{wire}"
        if g is None:
            if f.size == 8 and "timer" in f.name.lower():
                notes.append(f"GUESS: C size 8 and the name -> a timer (pointer) ({absent})")
                return f"timer {ident}{self.dims(count)}{wire}"
            if f.size in _GUESS_BY_SIZE:
                notes.append(f"GUESS: C size {f.size} -> {_GUESS_BY_SIZE[f.size]} ({absent})")
                return f"{_GUESS_BY_SIZE[f.size]} {ident}{self.dims(count)}{wire}"
            if f.size > 0:
                notes.append(f"GUESS: C size {f.size} -> raw bytes ({absent})")
                return f"bytes {ident}[{f.size * count}]{wire}"
            if f.name == "virtio":
                notes.append(f"GUESS: VMSTATE_VIRTIO_DEVICE assumed from the name and C size 0 ({absent})")
                return f"opaque \"virtio\" {ident}{wire}"
            notes.append(f"GUESS: C size 0 (a pointer, VBUFFER or custom VMStateInfo; {absent}): "
                         "give it a real kind, or register an extent for this opaque field")
            return f"opaque \"unknown\" {ident}{wire}"
        t = g.type
        if t in BY_INFO:
            scalar, check = BY_INFO[t]
            if check is None:
                return f"{scalar.name} {ident}{self.dims(count)}{wire}"
            if count > 1:
                notes.append(f"TODO: QEMU type {_quote(t)} on an array; the check was dropped")
                return f"{scalar.name} {ident}{self.dims(count)}{wire}"
            return f"{scalar.name} {ident}{wire} {check}"
        if t == "buffer":
            if g.total <= 0:
                notes.append("GUESS: empty buffer in the stream; its length comes from another field")
                return f"opaque \"buffer\" {ident}{wire}"
            if f.desc is None and not f.tname and f.size not in (0, g.size):
                notes.append(f"GUESS: {g.total} bytes in the stream (C size {f.size}); the length may come from another field")
            elif f.size == 0:
                notes.append(f"GUESS: {g.total} bytes in the stream; the length may come from another field")
            return f"bytes {ident}[{g.total}]{wire}"
        if t == "fd":
            return f"fd {ident}{wire}"
        if t == "bitmap":
            notes.append(f"GUESS: {g.total * 8} bits fill the {g.total} bytes seen; the bit count comes from another field")
            return f"bitmap {ident}[{max(g.total * 8, 64)}]{wire}"
        if t == "unused_buffer":
            return f"bytes {ident}[{max(g.total, 1)}] info \"unused_buffer\"{wire}"
        if t in ("qtailq", "qlist", "gtree"):
            notes.append(f"TODO: QEMU {t} whose element vmsd is unknown (no element in the stream); give it one")
            return f"opaque {_quote(t)} {ident}{wire}"
        # A device-specific VMStateInfo ("pci config", "virtio" ...).
        if g.total <= 0 or (f.size == 0 and f.tname is None):
            # C size 0: QEMU's own codec decides the length (VMSTATE_VIRTIO_DEVICE, VMSTATE_MSIX).
            notes.append(f"TODO: custom VMStateInfo {_quote(t)} of variable size ({g.total} bytes in the stream): "
                         "register an extent function for it")
            return f"opaque {_quote(t)} {ident}{wire}"
        if count > 1 or f.tname is not None or f.size != g.size:
            notes.append(f"GUESS: custom VMStateInfo {_quote(t)} was {g.total} bytes in the stream; "
                         f"if its size varies use opaque {_quote(t)} with a registered extent")
        return f"bytes {ident}[{g.total}] info {_quote(t)}{wire}"


def _align(lines: Iterable[_Line]) -> list[str]:
    items = list(lines)
    width = max((len("    " * ln.indent + ln.code) for ln in items if ln.notes), default=0)
    width = min(width, 72)
    out = []
    for ln in items:
        text = "    " * ln.indent + ln.code
        if ln.notes:
            text = text.ljust(width) + "  # " + "; ".join(ln.notes)
        out.append(text)
    return out


def import_qemu(
    dump_path: Path, stream_path: Path | None, out_dir: Path, force: bool = False, use_shipped: bool = True
) -> list[Path]:
    """Write skeleton ``.vmsd`` specs for a QEMU ``-dump-vmstate`` file into ``out_dir``.

    CLI contract (``vmsd import-qemu DUMP.json [--stream FILE] -o DIR``):

    * ``DUMP.json``: the file ``qemu-system-* -M <machine> [-device ...] -dump-vmstate FILE``
      wrote.  ``--stream FILE``: optionally, a migration stream saved by the
      same QEMU with its JSON trailer; its field types, array lengths and wire
      sizes replace guesses for every vmsd it contains (matched by vmsd name),
      and sections of the stream the dump lacks (``cpu``, ``timer`` ...) are
      imported from the trailer alone.  ``-o DIR``: created if missing; if a
      file to write is there already (an earlier import, edited since, say),
      nothing is written unless ``force`` (``--force``) replaces them; other
      files are left alone.
    * Writes one ``<vmsd>.vmsd`` per distinct top-level layout (its doc comment
      lists the QOM types sharing it) and ``common.vmsd`` (``common_2.vmsd``
      ... when two shared layouts have the same name) for nested layouts used
      by several files; returns the written paths, common files first.  The
      CLI prints them, one per line, and exits 0.
    * A nested layout that vmsd ships a spec of (same vmsd name, version and field names, in the QEMU
      spec set of :func:`vmsd.bundled.specs_dir` for the dump's machine type) is not copied: the files
      that use it ``import`` the shipped spec file (by its absolute path), so that with ``--specs`` the
      shipped class and its Python side decode it.  ``use_shipped=False`` copies them too.
    * Every file passes ``vmsd check`` (this function checks them before
      returning).  Lines marked ``# GUESS:`` hold a type, size or count that
      was inferred; ``# TODO:`` marks predicates (``field_exists`` as
      ``if custom(<field>_exists)``, subsections as
      ``needed custom(<name>_needed)``) to transcribe from the C source.
    * Bad input (missing or unreadable file, malformed JSON, a stream without
      trailer) raises :class:`ImportQemuError` (a ``ToolError``: the CLI prints
      ``vmsd import-qemu: error: <message>`` and exits 1), never a traceback.
      Legacy (non-VMState) sections of the stream are skipped.
    """
    from vmsd.bundled import specs_dir

    imp = _Importer(Path(dump_path), Path(stream_path) if stream_path is not None else None,
                    specs_dir() if use_shipped else None)
    files = imp.plan()
    texts = {f.stem: imp.render(f) for f in files}
    out_dir = Path(out_dir)
    written = [out_dir / f"{f.stem}.vmsd" for f in files]
    present = [p.name for p in written if os.path.lexists(p)]
    if present and not force:
        raise ImportQemuError(f"{out_dir} already has {', '.join(present)} (--force replaces them)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for f, path in zip(files, written, strict=True):
            write_file(path, texts[f.stem], force=force)
    except OSError as exc:
        raise ImportQemuError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None
    except OutputError as exc:
        raise ImportQemuError(str(exc)) from None
    _self_check(written, specs_dir())
    return written


def _self_check(paths: list[Path], shipped: Path) -> None:
    from vmsd.grammar.diagnostics import SpecError
    from vmsd.grammar.loader import load
    from vmsd.grammar.semantic import check

    try:
        check(load(paths, also=[shipped]))
    except SpecError as exc:  # a bug of the importer: say so plainly
        raise ImportQemuError("the imported specs do not pass vmsd check (importer bug):\n" + exc.render()) from None
