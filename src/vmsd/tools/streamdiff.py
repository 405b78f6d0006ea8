"""What ``vmsd diff`` reports: the differences between two decoded streams, one line each.

Device sections are compared as QEMU describes them (the trailer's body, or
the typed spec's description of the decoded object), so fields carry the
names ``vmsd inspect`` prints.  RAM is compared page by page, keyed by block
and page offset; a mapped-ram block's pages as a loader gets them (a page the
file does not hold is zero).  When the decoded streams show no difference but
the bytes differ (an unused field, the trailer's spelling), the first
differing byte is reported with the record and field it falls in: two
different files never compare equal, unless they differ only in the bytes of
mapped-ram pages the file does not hold, which no loader reads.  The line
format is documented in docs/diff.md.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from itertools import chain, pairwise, zip_longest
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from vmsd.migration.ram.mapped import PAGE_SIZE, MappedRam, runs
from vmsd.migration.ram.records import (
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    TARGET_PAGE_SIZE,
    RamBlockInfo,
    RamPayload,
    RamRecord,
)
from vmsd.migration.stream import (
    IDSTR_RAM,
    QEMU_VM_SECTION_FULL,
    SECTION_NAMES,
    Command,
    CommandRun,
    Section,
    Stream,
    idstr_bytes,
    json_name,
)
from vmsd.runtime.scalars import BY_INFO
from vmsd.runtime.vmdesc import Obj
from vmsd.runtime.vmstate import VMStateObject
from vmsd.tools.sectiontree import Tree, children, join, nested_body, object_tree, section_tree

# Bytes shown on each side of the first difference of a buffer or page.
WINDOW = 8
# Differing elements listed per array, and differing pages per RAM block, before the rest is counted.
MAX_ITEMS = 16
# Pages of two mapped-ram blocks compared at once (16 MiB of each file).
_CHUNK_PAGES = 4096

_PAGE_FLAGS = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_XBZRLE | RAM_SAVE_FLAG_COMPRESS_PAGE
_PAGE_KIND = {RAM_SAVE_FLAG_ZERO: "zero", RAM_SAVE_FLAG_PAGE: "normal", RAM_SAVE_FLAG_XBZRLE: "xbzrle",
              RAM_SAVE_FLAG_COMPRESS_PAGE: "compressed"}


def diff_streams(data_a: bytes, a: Stream, data_b: bytes, b: Stream) -> list[str]:
    """The differences between stream ``a`` (read from ``data_a``) and ``b``, in stream order.

    Empty exactly when the two inputs are the same bytes but for those of mapped-ram pages the file does
    not hold."""
    out: list[str] = []
    if a.version != b.version:
        out.append(f"stream: version {a.version} -> {b.version}")
    _diff_configuration(a, b, out)
    alone = _diff_sections(a, data_a, b, data_b, out)
    if not _same_ram_bytes(a, data_a, b, data_b):
        _diff_ram(a, b, out)
    _diff_trailers(a, b, alone, out)
    if not out and data_a != data_b:
        first = _first_loaded_difference(data_a, a, data_b)
        if first is not None:
            out.append(_hidden_difference(data_a, a, data_b, first))
    return [printable(line) for line in out]


# ---- device state as QEMU describes it ------------------------------------------------------


def _where(section: str, path: str) -> str:
    return f"{section} {path}" if path else section


def _diff_tree(x: Tree, y: Tree, section: str, path: str, out: list[str]) -> None:
    if x.body.get("vmsd_name") != y.body.get("vmsd_name"):
        out.append(f"{_where(section, path)}: described as {x.body.get('vmsd_name')!r} -> {y.body.get('vmsd_name')!r}")
    if x.body.get("version") != y.body.get("version"):
        out.append(f"{_where(section, path)}: layouts differ, version {x.body.get('version')} -> {y.body.get('version')}")
    _diffchildren(x.body, x.values, y.body, y.values, section, path, out)


def _diffchildren(body_a: Obj | None, xa: Obj, body_b: Obj | None, xb: Obj, section: str, path: str,
                   out: list[str]) -> None:
    ca, cb = children(body_a, xa), children(body_b, xb)
    for key, child in ca.items():
        sub = join(path, key)
        other = cb.get(key)
        if other is None:
            out.append(f"{_where(section, sub)}: {child.kind} only in A (layouts differ)")
        elif child.kind == "subsection" and other.entry is not None and child.entry is not None:
            _diff_tree(Tree(child.entry, child.value), Tree(other.entry, other.value), section, sub, out)
        else:
            _diff_field(child.entry, child.value, other.entry, other.value, section, sub, out)
    for key, child in cb.items():
        if key not in ca:
            out.append(f"{_where(section, join(path, key))}: {child.kind} only in B (layouts differ)")


def _shape(entry: Obj | None) -> tuple[Any, ...] | None:
    if entry is None:
        return None
    return entry.get("type"), entry.get("size"), entry.get("array_len")


def _diff_field(ea: Obj | None, x: Any, eb: Obj | None, y: Any, section: str, path: str, out: list[str]) -> None:
    sa, sb = _shape(ea), _shape(eb)
    if sa is not None and sb is not None and sa != sb:
        out.append(f"{_where(section, path)}: layouts differ, {_shape_text(sa)} -> {_shape_text(sb)}")
    _diff_value(ea, x, eb, y, section, path, out)


def _shape_text(shape: tuple[Any, ...]) -> str:
    kind, size, n = shape
    return f"{kind}[{n}] of {size} bytes each" if n is not None else f"{kind} of {size} bytes"


def _diff_value(ea: Obj | None, x: Any, eb: Obj | None, y: Any, section: str, path: str, out: list[str],
                index: int = 0) -> None:
    """Values of one field (element ``index`` of it, for a list): nested bodies, lists, bytes or scalars."""
    if isinstance(x, Obj) and isinstance(y, Obj):
        _diffchildren(nested_body(ea, index), x, nested_body(eb, index), y, section, path, out)
    elif isinstance(x, list | tuple) and isinstance(y, list | tuple):
        _diff_list(ea, x, eb, y, section, path, out)
    elif isinstance(x, bytes) and isinstance(y, bytes):
        if x != y:
            out.append(f"{_where(section, path)}: {bytes_difference(x, y)}")
    elif not _same(x, y):
        out.append(f"{_where(section, path)}: {scalar_text(x, ea)} -> {scalar_text(y, eb)}")


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, float) and isinstance(y, float):
        return struct.pack(">d", x) == struct.pack(">d", y)  # a NaN equals itself here
    return type(x) is type(y) and bool(x == y)


def _diff_list(ea: Obj | None, x: Any, eb: Obj | None, y: Any, section: str, path: str, out: list[str]) -> None:
    where = _where(section, path)
    if len(x) != len(y):
        out.append(f"{where}: {len(x)} elements -> {len(y)}")
    lines: list[str] = []
    differing = 0
    for i, (p, q) in enumerate(zip(x, y, strict=False)):
        before = len(lines)
        _diff_value(ea, p, eb, q, section, f"{path}[{i}]", lines, i)
        if len(lines) > before:
            differing += 1
            if differing > MAX_ITEMS:
                del lines[before:]
    out.extend(lines)
    if differing > MAX_ITEMS:
        out.append(f"{where}: {differing - MAX_ITEMS} more differing elements not listed ({differing} in all)")


def scalar_text(v: Any, entry: Obj | None) -> str:
    """A value for a reader: integers in hex (two's complement for negatives) with decimal beside when it
    adds something, booleans as true/false."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        if 0 <= v < 10:
            return str(v)
        if v >= 0:
            return f"{v:#x} ({v})"
        row = BY_INFO.get(entry.get("type")) if entry is not None else None
        bits = 8 * row[0].size if row is not None else 64
        return f"{v & ((1 << bits) - 1):#x} ({v})"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else f"{v} ({struct.pack('>d', v).hex()})"
    if v is None:
        return "absent"
    return _json(v)


def bytes_difference(x: bytes, y: bytes, base: int | None = None) -> str:
    """Where two byte strings part: the first differing offset (and ``base`` + it, a page's offset in its
    block), both values there, how many bytes differ, and both sides of a window around that offset."""
    n = min(len(x), len(y))
    first = first_difference(x, y)
    differing = sum(1 for i in range(first, n) if x[i] != y[i]) + abs(len(x) - len(y))
    if first < n:
        block = f" (block offset {base + first:#x})" if base is not None else ""
        head = f"byte {first:#x}{block}: {x[first]:#04x} -> {y[first]:#04x}"
    else:
        head = f"length {len(x)} -> {len(y)}, the first {n} bytes equal"
    start = max(first - WINDOW, 0)
    tail = f"{differing} of {max(len(x), len(y))} bytes differ; from {start:#x}: "
    return f"{head} ({tail}{_window(x, start, first)} -> {_window(y, start, first)})"


def first_difference(x: bytes | memoryview, y: bytes | memoryview) -> int:
    """The first offset where ``x`` and ``y`` differ (the shorter one's length when one is a prefix)."""
    n = min(len(x), len(y))
    lo = 0
    step = 1 << 16
    # Whole slices compare in C: narrow down to one chunk before looking at single bytes.
    while lo + step <= n and x[lo : lo + step] == y[lo : lo + step]:
        lo += step
    return next((i for i in range(lo, n) if x[i] != y[i]), n)


def _window(data: bytes, start: int, mark: int) -> str:
    """Hex bytes from ``start`` on, the byte at ``mark`` in brackets (empty brackets past the end)."""
    before = data[start:mark].hex()
    at = data[mark : mark + 1].hex()
    after = data[mark + 1 : mark + 1 + WINDOW].hex()
    return f"{before}[{at}]{after}"


# ---- sections --------------------------------------------------------------------------------


def section_label(sec: Section, n: int = 0) -> str:
    """A section as the lines name it: its idstr, ``:INSTANCE`` when not 0, ``#N`` for a repeated one."""
    label = sec.idstr if sec.instance_id == 0 else f"{sec.idstr}:{sec.instance_id}"
    if sec.kind != QEMU_VM_SECTION_FULL:  # an iterative section: name its part
        label += f" {SECTION_NAMES.get(sec.kind, sec.kind)}"
    return label + (f"#{n + 1}" if n else "")


def printable(name: str) -> str:
    """Text made of names read from a stream, undecodable bytes and control characters escaped (``\\xae``)."""
    raw = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in raw)


_Key = tuple[str, int, int, int]  # idstr, instance, kind, occurrence: a section's partner has the same
_Found = tuple[Section, memoryview | None]


def _with_bytes(stream: Stream, data: bytes) -> Iterator[_Found]:
    """The stream's sections in order, each with its bytes when it is a top-level one (a view made when the
    section is reached: the tool holds the views of the pair it compares, not one per section)."""
    view = memoryview(data)
    for start, end, rec, _ in _spans(stream):
        if isinstance(rec, Section):
            yield rec, view[start:end]
        elif isinstance(rec, Command) and rec.packaged:
            yield from ((r, None) for r in rec.packaged if isinstance(r, Section))


def _numbered(stream: Stream, data: bytes) -> Iterator[tuple[_Key, Section, memoryview | None]]:
    """:func:`_with_bytes` with each section's key: the n-th section of an idstr, instance and kind in one
    stream is compared with the n-th of the other."""
    seen: dict[tuple[str, int, int], int] = {}
    for sec, raw in _with_bytes(stream, data):
        base = (sec.idstr, sec.instance_id, sec.kind)
        n = seen.get(base, 0)
        seen[base] = n + 1
        yield (*base, n), sec, raw


def _same_bytes(x: memoryview | None, y: memoryview | None) -> bool:
    """Whether two sections are the same bytes (packaged ones, which have none here, are always compared)."""
    return x is not None and y is not None and x == y


def _same_ram_bytes(a: Stream, data_a: bytes, b: Stream, data_b: bytes) -> bool:
    ra = ((s, raw) for s, raw in _with_bytes(a, data_a) if s.idstr == IDSTR_RAM)
    rb = ((s, raw) for s, raw in _with_bytes(b, data_b) if s.idstr == IDSTR_RAM)
    return all(x is not None and y is not None and _same_bytes(x[1], y[1]) for x, y in zip_longest(ra, rb))


def _diff_sections(a: Stream, data_a: bytes, b: Stream, data_b: bytes, out: list[str]) -> set[tuple[str, int]]:
    """Lines for the sections of ``a`` and ``b``, paired by key, walking both streams together: B's sections
    are held only while one of A's is looked for further on.  Returns the (trailer name, instance) of the
    sections only one stream has."""
    later_b = _numbered(b, data_b)
    passed: dict[_Key, _Found] = {}  # B's sections passed over, in B's order
    alone: set[tuple[str, int]] = set()
    renumbered: list[str] = []
    renumbered_count = 0
    for key, sec, raw in _numbered(a, data_a):
        label = section_label(sec, key[3])
        found = passed.pop(key, None)
        if found is None:
            for key_b, other, raw_b in later_b:
                if key_b == key:
                    found = other, raw_b
                    break
                passed[key_b] = other, raw_b
        if found is None:
            out.append(f"{label}: only in A")
            alone.add((json_name(sec.idstr), sec.instance_id))
            continue
        other, raw_b = found
        if sec.section_id != other.section_id:
            renumbered_count += 1
            if len(renumbered) <= 3:
                renumbered.append(f"{label}: section id {sec.section_id} -> {other.section_id}")
        if (_same_bytes(raw, raw_b) and type(sec.payload) is type(other.payload)
                and sec.generic_body == other.generic_body):
            continue  # the same bytes decoded the same way
        _diff_pair(label, sec, other, out)
    for key_b, (other, _) in chain(passed.items(), ((k, (s, r)) for k, s, r in later_b)):
        out.append(f"{section_label(other, key_b[3])}: only in B")
        alone.add((json_name(other.idstr), other.instance_id))
    # Sections are numbered in stream order: one added or left out renumbers all that follow.
    if renumbered_count > 3:
        out.append(f"stream: section ids differ in {renumbered_count} sections, the first {renumbered[0]}")
    else:
        out.extend(renumbered)
    return alone


def _diff_pair(label: str, sec: Section, other: Section, out: list[str]) -> None:
    if sec.has_header and sec.version_id != other.version_id:
        out.append(f"{label}: layouts differ, section version {sec.version_id} -> {other.version_id}")
    if sec.footer != other.footer:
        out.append(f"{label}: section footer {'present' if sec.footer else 'absent'} -> "
                   f"{'present' if other.footer else 'absent'}")
    ta, tb = section_tree(sec), section_tree(other)
    if isinstance(ta, Tree) and isinstance(tb, Tree):
        _diff_tree(ta, tb, label, "", out)
    elif isinstance(ta, bytes) and isinstance(tb, bytes):
        if ta != tb:
            out.append(f"{label}: {bytes_difference(ta, tb)}")
    elif ta is not None or tb is not None:
        out.append(f"{label}: layouts differ, {_form(ta)} -> {_form(tb)}")


def _form(t: Tree | bytes | None) -> str:
    if isinstance(t, Tree):
        return f"described as {t.body.get('vmsd_name')!r}"
    return "legacy bytes" if isinstance(t, bytes) else "no state"


def _diff_configuration(a: Stream, b: Stream, out: list[str]) -> None:
    if a.configuration is None or b.configuration is None:
        if a.configuration is not None or b.configuration is not None:
            out.append(f"configuration: only in {'A' if a.configuration is not None else 'B'}")
        return
    ta, tb = _configuration_tree(a.configuration.state), _configuration_tree(b.configuration.state)
    _diff_tree(ta, tb, "configuration", "", out)


def _configuration_tree(state: Any) -> Tree:
    if isinstance(state, VMStateObject):
        return object_tree(state)
    # The engine's own record (no spec set): its two parts, named as QEMU's description names them.
    values = Obj([("name", bytes(state.name)), ("capabilities", [bytes(c) for c in state.capabilities])])
    return Tree(Obj([("vmsd_name", "configuration")]), values)


# ---- RAM ---------------------------------------------------------------------------------------


@attrs.define
class _Ram:
    blocks: dict[str, RamBlockInfo] = attrs.Factory(dict)
    pages: dict[tuple[str, int, int], RamRecord] = attrs.Factory(dict)  # (block, offset, n-th copy)
    mapped: dict[str, MappedRam] = attrs.Factory(dict)  # mapped-ram blocks: their pages are in the file


def _ram(stream: Stream) -> _Ram:
    """Every page record of the stream's RAM sections under its block: a record that continues the previous
    block is keyed by that block, not by its offset alone."""
    ram = _Ram()
    block = ""
    for sec in stream.sections():
        if sec.idstr != IDSTR_RAM or not isinstance(sec.payload, RamPayload):
            continue
        for rec in sec.payload.records:
            for info in rec.blocks:
                ram.blocks.setdefault(info.name, info)
                if info.mapped is not None:
                    ram.mapped.setdefault(info.name, info.mapped)
            if not rec.flags & _PAGE_FLAGS:
                continue
            if rec.block is not None:
                block = rec.block
            n = 0
            while (block, rec.offset, n) in ram.pages:
                n += 1
            ram.pages[(block, rec.offset, n)] = rec
    return ram


def _diff_ram(a: Stream, b: Stream, out: list[str]) -> None:
    ra, rb = _ram(a), _ram(b)
    for name, info in ra.blocks.items():
        other = rb.blocks.get(name)
        if other is None:
            out.append(f"ram block {name}: only in A")
        elif info != other:
            for field in ("used_length", "page_size", "addr"):
                va, vb = getattr(info, field), getattr(other, field)
                if va != vb:
                    out.append(f"ram block {name}: {field} {scalar_text(va, None)} -> {scalar_text(vb, None)}")
    for name in rb.blocks:
        if name not in ra.blocks:
            out.append(f"ram block {name}: only in B")
    listed: dict[str, int] = {}
    alone = ra.blocks.keys() ^ rb.blocks.keys()  # said above: their pages are no news
    for name in ra.mapped.keys() & rb.mapped.keys():
        for i, x, y in _mapped_differences(ra.mapped[name], rb.mapped[name]):
            line = _page_difference(x, y, i * PAGE_SIZE)
            if line is not None:
                _ram_line((name, i * PAGE_SIZE, 0), line, listed, out)
    # A block mapped in one stream only: its pages as records, to compare with the other's.
    for side, opposite in ((ra, rb), (rb, ra)):
        for name in side.mapped.keys() - opposite.mapped.keys():
            mapped = side.mapped[name]
            present = mapped.present()
            for i in range(mapped.npages):
                side.pages.setdefault((name, i * PAGE_SIZE, 0), _mapped_page(mapped, i, bool(present[i])))
    for key, rec in ra.pages.items():
        if key[0] in alone:
            continue
        twin = rb.pages.get(key)
        line = f"only in A ({_kind(rec)} page)" if twin is None else _page_difference(rec, twin, key[1])
        if line is not None:
            _ram_line(key, line, listed, out)
    for key, rec in rb.pages.items():
        if key not in ra.pages and key[0] not in alone:
            _ram_line(key, f"only in B ({_kind(rec)} page)", listed, out)
    for block, count in listed.items():
        if count > MAX_ITEMS:
            out.append(f"ram {block}: {count - MAX_ITEMS} more differing pages not listed ({count} in all)")


def _page_rows(m: MappedRam) -> npt.NDArray[np.uint8]:
    """The block's pages in the file, one row each (a view)."""
    base = m.header.pages_offset - m.region_at
    return np.frombuffer(m.region, dtype=np.uint8, count=m.npages * PAGE_SIZE, offset=base).reshape(-1, PAGE_SIZE)


def _mapped_page(m: MappedRam, i: int, present: bool) -> RamRecord:
    """Page ``i`` as a record a loader would get the same page from: zero when the file does not hold it."""
    if not present:
        return RamRecord(RAM_SAVE_FLAG_ZERO, i * PAGE_SIZE, data=b"\0")
    return RamRecord(RAM_SAVE_FLAG_PAGE, i * PAGE_SIZE, data=_page_rows(m)[i].tobytes())


def _mapped_differences(a: MappedRam, b: MappedRam) -> Iterator[tuple[int, RamRecord, RamRecord]]:
    """The pages (of those both blocks have) a loader would get differently from ``a`` and from ``b``,
    compared a chunk at a time (a block may be gigabytes)."""
    pa, pb = a.present(), b.present()
    rows_a, rows_b = _page_rows(a), _page_rows(b)
    n = min(a.npages, b.npages)
    for start in range(0, n, _CHUNK_PAGES):
        stop = min(start + _CHUNK_PAGES, n)
        xa, xb = pa[start:stop], pb[start:stop]
        # Loaded content: the page where its bit is set, zero elsewhere.
        ca = rows_a[start:stop] * xa[:, None].astype(np.uint8)
        cb = rows_b[start:stop] * xb[:, None].astype(np.uint8)
        for j in np.flatnonzero((ca != cb).any(axis=1)):
            i = start + int(j)
            yield i, _mapped_page(a, i, bool(pa[i])), _mapped_page(b, i, bool(pb[i]))


def _ram_line(key: tuple[str, int, int], line: str, listed: dict[str, int], out: list[str]) -> None:
    block, offset, n = key
    listed[block] = listed.get(block, 0) + 1
    if listed[block] <= MAX_ITEMS:
        copy = f" (copy {n + 1})" if n else ""
        out.append(f"ram {block} page {offset:#x}{copy}: {line}")


def _kind(rec: RamRecord) -> str:
    return _PAGE_KIND.get(rec.flags & _PAGE_FLAGS, f"flags {rec.flags:#x}")


def _content(rec: RamRecord) -> bytes | None:
    """The page as the destination gets it, for zero and normal pages."""
    kind = rec.flags & _PAGE_FLAGS
    if kind == RAM_SAVE_FLAG_ZERO:
        return rec.data * TARGET_PAGE_SIZE
    if kind == RAM_SAVE_FLAG_PAGE:
        return rec.data
    return None


def _page_difference(x: RamRecord, y: RamRecord, offset: int) -> str | None:
    kinds = f"{_kind(x)} page -> {_kind(y)} page"
    cx, cy = _content(x), _content(y)
    if cx is not None and cy is not None:
        if cx == cy:
            return None if _kind(x) == _kind(y) else f"{kinds}, same content"
        where = bytes_difference(cx, cy, base=offset)
        return where if _kind(x) == _kind(y) else f"{kinds}, {where}"
    if _kind(x) == _kind(y) and x.data == y.data:
        return None
    prefix = f"{_kind(x)} payload" if _kind(x) == _kind(y) else kinds
    return f"{prefix}: {bytes_difference(x.data, y.data)}"


# ---- the trailer -------------------------------------------------------------------------------


def _diff_trailers(a: Stream, b: Stream, alone: set[tuple[str, int]], out: list[str]) -> None:
    """``alone``: the sections only one stream has; their descriptions are no news."""
    if (a.trailer is None) != (b.trailer is None):
        out.append(f"trailer: only in {'A' if a.trailer is not None else 'B'}")
        return
    if a.trailer is None or b.trailer is None or a.trailer_text == b.trailer_text:
        return
    for name in dict.fromkeys([k for k, _ in a.trailer] + [k for k, _ in b.trailer]):
        if name != "devices" and a.trailer.get(name) != b.trailer.get(name):
            out.append(f"trailer {name}: {_json(a.trailer.get(name))} -> {_json(b.trailer.get(name))}")
    da, db = _devices(a.trailer), _devices(b.trailer)
    for key, x in da.items():
        y = db.get(key)
        if y is None:
            if key[:2] not in alone:
                out.append(f"trailer {_device_label(key)}: description only in A")
        elif x != y:
            path, p, q = _first_json_difference(x, y, "")
            out.append(f"trailer {_device_label(key)}: layouts differ, description{path}: {_json(p)} -> {_json(q)}")
    for key in db:
        if key not in da and key[:2] not in alone:
            out.append(f"trailer {_device_label(key)}: description only in B")


def _devices(trailer: Obj) -> dict[tuple[Any, Any, int], Any]:
    """The trailer's device descriptions by name, instance and occurrence."""
    out: dict[tuple[Any, Any, int], Any] = {}
    for device in trailer.get("devices") or []:
        name = device.get("name") if isinstance(device, Obj) else None
        instance = device.get("instance_id") if isinstance(device, Obj) else None
        n = 0
        while (name, instance, n) in out:
            n += 1
        out[(name, instance, n)] = device
    return out


def _device_label(key: tuple[Any, Any, int]) -> str:
    name, instance, n = key
    label = str(name) if instance in (0, None) else f"{name}:{instance}"
    return label + (f"#{n + 1}" if n else "")


class _Absent:
    def __repr__(self) -> str:
        return "absent"


def _first_json_difference(x: Any, y: Any, path: str) -> tuple[str, Any, Any]:
    """Where two JSON values first part: a path (``.fields[3].name``) and both values there."""
    if isinstance(x, Obj) and isinstance(y, Obj):
        n = min(len(x), len(y))
        for i in range(n):
            (kx, vx), (ky, vy) = x[i], y[i]
            if kx != ky:
                return f"{path} key #{i}", kx, ky
            if vx != vy:
                return _first_json_difference(vx, vy, f"{path}.{kx}")
        if len(x) > n:
            return f"{path}.{x[n][0]}", x[n][1], _Absent()
        if len(y) > n:
            return f"{path}.{y[n][0]}", _Absent(), y[n][1]
    if isinstance(x, list) and isinstance(y, list):
        for i, (p, q) in enumerate(zip(x, y, strict=False)):
            if p != q:
                return _first_json_difference(p, q, f"{path}[{i}]")
        n = min(len(x), len(y))
        return f"{path}[{n}]", x[n] if n < len(x) else _Absent(), y[n] if n < len(y) else _Absent()
    return path, x, y


def _json(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- bytes no decoded value shows ---------------------------------------------------------------


def _stale_ranges(stream: Stream) -> list[tuple[int, int]]:
    """File ranges of the mapped-ram pages whose bit is clear: a loader takes them as zero, unread."""
    out: list[tuple[int, int]] = []
    for m in _ram(stream).mapped.values():
        for start, stop in runs(~m.present()):
            out.append((m.header.pages_offset + start * PAGE_SIZE, m.header.pages_offset + stop * PAGE_SIZE))
    return sorted(out)


def _first_loaded_difference(data_a: bytes, a: Stream, data_b: bytes) -> int | None:
    """Where the inputs first part outside ``a``'s stale mapped-ram pages (their offsets in ``b`` are the
    same, or the bytes before them differ); None when they do not."""
    if len(data_a) != len(data_b):
        return first_difference(data_a, data_b)
    va, vb = memoryview(data_a), memoryview(data_b)
    at = 0
    for start, stop in [*_stale_ranges(a), (len(data_a), len(data_a))]:
        if va[at:start] != vb[at:start]:
            return at + first_difference(va[at:start], vb[at:start])
        at = max(at, stop)
    return None


def _hidden_difference(data_a: bytes, a: Stream, data_b: bytes, first: int) -> str:
    """The byte ``first``, where the inputs part, named by the record and field of ``a`` it falls in."""
    n = min(len(data_a), len(data_b))
    where = _locate(a, first)
    if first == n:
        return f"stream{where}: length {len(data_a)} -> {len(data_b)}, the first {n} bytes equal"
    return (f"stream{where}: byte {first:#x}: {data_a[first]:#04x} -> {data_b[first]:#04x}, "
            "bytes that decode to the same values")


def _spans(stream: Stream) -> Iterator[tuple[int, int, Section | Command | CommandRun | None, str]]:
    """Top-level parts of a stream with their byte ranges, in order."""
    records = stream.records
    last = stream.eof_offset if stream.eof_offset is not None else 1 << 62
    if stream.configuration is not None:
        yield stream.configuration.offset, records[0].offset if records else last, None, "configuration"
    # Each record ends where the next one starts (no list of the ends: a stream may have millions).
    for rec, nxt in pairwise(chain(records, (None,))):
        if rec is not None:
            yield rec.offset, nxt.offset if nxt is not None else last, rec, ""
    if stream.trailer_offset is not None:
        yield stream.trailer_offset, 1 << 62, None, "trailer"


def _locate(stream: Stream, offset: int) -> str:
    label = ""
    for start, end, rec, name in _spans(stream):
        if start <= offset < end:
            if isinstance(rec, Section):
                label = f" in section {section_label(rec)}" + _field_at(rec, offset)
            elif isinstance(rec, Command):
                label = f" in command {rec.name}"
            elif isinstance(rec, CommandRun):
                for cmd in rec.commands():
                    if cmd.offset > offset:
                        break
                    label = f" in command {cmd.name}"
            else:
                label = f" in the {name}"
    return label


def _field_at(sec: Section, offset: int) -> str:
    """`` field NAME`` when ``offset`` falls in a field of a FULL section (its fields' sizes laid end to end)."""
    tree = section_tree(sec)
    if not isinstance(tree, Tree):
        return ""
    at = sec.offset + 1 + 4 + 1 + len(idstr_bytes(sec.idstr)) + 8  # kind, id, idstr, instance, version
    found = _walk_offsets(tree.body, at, offset, "")
    return f" field {found}" if isinstance(found, str) else ""


def _walk_offsets(body: Obj, at: int, offset: int, path: str) -> str | int | None:
    """The field of ``body`` (laid out from ``at``) holding ``offset``; else where the body ends, or None when
    its sizes are not counts."""
    for entry in body.get("fields", []):
        size = entry.get("size")
        count = entry.get("array_len", 1)
        if not isinstance(size, int) or not isinstance(count, int):
            return None
        if at <= offset < at + size * count:
            return join(path, str(entry.get("name")))
        at += size * count
    for sub in body.get("subsections") or []:
        sub_name = str(sub.get("vmsd_name"))
        if at <= offset < at + 2 + len(sub_name.encode()) + 4:
            return join(path, sub_name)
        found = _walk_offsets(sub, at + 2 + len(sub_name.encode()) + 4, offset, join(path, sub_name))
        if not isinstance(found, int):
            return found
        at = found
    return at


__all__ = ["bytes_difference", "diff_streams", "section_label"]
