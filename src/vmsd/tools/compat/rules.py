"""The checks of `vmsd compat`: can a QEMU described by DEST load what SOURCE saves?

Per section, as QEMU's loader decides it: the section must exist in DEST and the version SOURCE
writes must lie within DEST's ``[minimum_version_id, version_id]``; then the fields on the wire at
that version (``since`` no later than it) are compared position by position with those DEST reads at
the same version.  Nested descriptions are loaded at DEST's own version, so they are compared by
layout, not by version number.  Subsections are looked up by name and carry their own version.

Where two fields differ, the bytes decide:

- a field only one side has (the other side's next field is found again further on by name): the
  loader reads a different number of bytes there, so the load fails;
- fields that cover the same bytes under other names or in another split (``runstate[100]`` that became
  ``runstate[32]`` and three more fields): a one-for-one pair of the same element size and count, the
  same type where both sides know it, and related names (one name contains the other, or they share
  a word of three or more letters: ``num_timers``/``num_timers_save``) is a wire-compatible rename
  (info); a field that became padding is ignored by DEST (info); anything else loads, but DEST gives
  the bytes another meaning (changed);
- different byte counts at one position without a way to line the two sides up again: fail.

A subsection or field under a condition that only one side has is a "fail" worded with that condition
("fails when <predicate> holds"): spec sets and dumps describe every state a QEMU may save, and the
load fails for the states where it holds.  A stream SOURCE answers it: what it carries (and DEST's field
tests as the saving QEMU evaluated them: a conditional field the stream does not carry is one whose test
is false).
"""

from __future__ import annotations

import re

import attrs

from vmsd.tools.compat.model import CHANGED, FAIL, INFO, SENT, UNKNOWN, Desc, Field, Finding, Section, Side

# Stream commands newer than QEMU 7.2 (the oldest version vmsd has specs for), with the version that
# added them (migration/savevm.c's mig_cmd_args).  A QEMU that does not know a command refuses it.
COMMAND_SINCE = {"SWITCHOVER_START": "10.0"}
# QEMU 10.0 and later send SWITCHOVER_START unless the machine type's compat properties turn the
# migration object's "send-switchover-start" off (hw_compat_9_2: machine types 9.2 and older).
SWITCHOVER_START_MACHINES_AFTER = "9.2"
# Capabilities the configuration record lists (savevm.c's should_validate_capability) and the version
# that added each: a destination refuses a name it does not know, and one it has off.
CAPABILITY_SINCE = {"x-ignore-shared": "4.0", "mapped-ram": "9.0"}

_MACHINE_VERSION = re.compile(r"-(\d+)\.(\d+)$")
_WORD = re.compile(r"[A-Za-z0-9]+")
# How far (fields on each side) two runs of fields are followed to find where their bytes line up again.
_ALIGN_WINDOW = 16


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def machine_version(machine: str) -> str | None:
    """``pc-i440fx-7.2`` -> ``7.2``; None for a name without a version."""
    m = _MACHINE_VERSION.search(machine)
    return f"{int(m.group(1))}.{int(m.group(2))}" if m else None


def check(src: Side, dst: Side, machine: str | None) -> list[Finding]:
    """Every finding for SOURCE ``src`` loaded by DEST ``dst`` with machine type ``machine``."""
    out: list[Finding] = []
    machine = machine or src.machine
    _machine(src, dst, machine, out)
    _commands(src, dst, machine, out)
    both_dumps = src.kind == "dump" and dst.kind == "dump"
    dst_by_label = {s.label: s.desc for s in dst.sections} if both_dumps else {}
    matched: set[str] = set()
    not_described = []
    for sec in src.sections:
        candidates = [dst_by_label[sec.label]] if sec.label in dst_by_label else dst.descs.get(sec.vmsd, [])
        if not candidates:
            # The configuration record is QEMU's own, not a device's: a folder of device specs rarely has it.
            if both_dumps or (dst.complete and dst.kind != "dump" and sec.vmsd != "configuration"):
                out.append(Finding(FAIL, sec.label, None, f"DEST has no section '{sec.vmsd}'"))
            else:
                not_described.append(sec.label)
            continue
        matched.add(sec.vmsd)
        # A dump may hold several descriptions of one name (isa-vga's and VGA's "vga"): the section is the
        # one that fits it best.
        results: list[list[Finding]] = [_section(sec, d) for d in candidates]
        best: list[Finding] = min(results, key=_rank)
        out.extend(best)
    if not_described:
        why = ("a -dump-vmstate file lists the vmsds of device types only (cpu, apic, timer and others are "
               "registered otherwise)" if dst.kind == "dump" else "vmsd's shipped set has specs for some devices only")
        out.append(Finding(INFO, None, None, f"not checked, DEST does not describe them ({why}): "
                                             + ", ".join(not_described)))
    if src.kind != "stream":
        only = sorted({s.vmsd for s in dst.sections} - {s.vmsd for s in src.sections} - matched)
        if only:
            out.append(Finding(INFO, None, None, "sections only DEST has: " + ", ".join(only)))
    if src.stream is not None and src.stream.unstructured:
        names = ", ".join(f"{label} (version {v})" for label, v, _ in src.stream.unstructured)
        out.append(Finding(INFO, None, None, f"sections without a VMState layout (RAM, legacy handlers), not "
                                             f"compared: {names}"))
    return out


def _rank(findings: list[Finding]) -> tuple[int, int]:
    """Fewer failures and changes first, then fewer findings."""
    return sum(2 if f.category == FAIL else 1 for f in findings if f.category != INFO), len(findings)


def _machine(src: Side, dst: Side, machine: str | None, out: list[Finding]) -> None:
    if machine is None:
        return
    mv = machine_version(machine)
    if dst.version is not None and mv is not None:
        if version_key(mv) > version_key(dst.version):
            out.append(Finding(FAIL, None, None, f"machine type {machine} is newer than DEST's QEMU {dst.version}, "
                                                 "which does not know it"))
    elif dst.kind == "dump" and dst.machine is not None and dst.machine != machine:
        out.append(Finding(INFO, None, None, f"DEST's dump was made for machine type {dst.machine}, not {machine}: "
                                             "layouts that depend on the machine type may differ"))
    elif dst.kind != "dump":
        out.append(Finding(INFO, None, None, f"DEST's QEMU version is not known: machine type {machine} not checked"))
    if src.version is not None and mv is not None and version_key(mv) > version_key(src.version):
        out.append(Finding(INFO, None, None, f"SOURCE's QEMU {src.version} does not know machine type {machine}"))


def _commands(src: Side, dst: Side, machine: str | None, out: list[Finding]) -> None:
    sent: dict[str, str | None] = {}  # command -> the condition under which SOURCE sends it (None: it does)
    if src.stream is not None:
        sent = {c: None for c in src.stream.commands if c in COMMAND_SINCE}
    elif src.version is not None and version_key(src.version) >= version_key(COMMAND_SINCE["SWITCHOVER_START"]):
        mv = machine_version(machine) if machine else None
        cutoff = version_key(SWITCHOVER_START_MACHINES_AFTER)
        if mv is None:
            sent["SWITCHOVER_START"] = f"the machine type is newer than {SWITCHOVER_START_MACHINES_AFTER}"
        elif version_key(mv) > cutoff:
            sent["SWITCHOVER_START"] = None
    for name, when in sent.items():
        since = COMMAND_SINCE[name]
        if dst.version is None:
            out.append(Finding(INFO, None, None, f"SOURCE sends command {name} (QEMU {since} and later know it); "
                                                 "DEST's QEMU version is not known"))
        elif version_key(dst.version) < version_key(since):
            head = f"fails when {when}: " if when else ""
            out.append(Finding(FAIL, None, None, f"{head}SOURCE sends command {name}, which DEST's QEMU "
                                                 f"{dst.version} does not know (added in {since})"))
    caps = src.stream.capabilities if src.stream is not None else []
    for cap in caps:
        added = CAPABILITY_SINCE.get(cap)
        if dst.version is None or added is None:
            out.append(Finding(INFO, "configuration", None, f"capability {cap}: DEST must have it on"))
        elif version_key(dst.version) < version_key(added):
            out.append(Finding(FAIL, "configuration", None, f"capability {cap} is on in SOURCE; DEST's QEMU "
                                                            f"{dst.version} does not know it (added in {added})"))
        else:
            out.append(Finding(INFO, "configuration", None, f"capability {cap}: DEST must have it on too"))


@attrs.frozen
class _Ctx:
    section: str
    path: str = ""  # field path prefix inside the section ("timer." or "hpet/offset.")
    when: str | None = None  # the condition under which this part is on the wire at all
    actual: bool = False  # SOURCE is what one stream carried (see _fields)
    left_out: frozenset[str] | None = None  # fields the saving QEMU has and the stream does not carry


def _section(sec: Section, dst: Desc) -> list[Finding]:
    out: list[Finding] = []
    ctx = _Ctx(sec.label)
    if sec.versioned:
        if not _version_ok(sec.version, dst, ctx, None, out):
            return out
    _compare(sec.desc, sec.version, dst, sec.version, ctx, out)
    return out


def _version_ok(version: int, dst: Desc, ctx: _Ctx, sub: str | None, out: list[Finding]) -> bool:
    what = f"subsection '{sub}'" if sub else "section"
    if version > dst.version:
        _fail(out, ctx, None, f"{what} version {version} is newer than DEST's {dst.version}")
        return False
    if version < dst.minimum:
        _fail(out, ctx, None, f"{what} version {version} is older than DEST's minimum {dst.minimum}")
        return False
    return True


def _fail(out: list[Finding], ctx: _Ctx, field: str | None, message: str) -> None:
    head = f"fails when {ctx.when}: " if ctx.when else ""
    out.append(Finding(FAIL, ctx.section, field, head + message))


def _compare(src: Desc, sv: int, dst: Desc, dv: int, ctx: _Ctx, out: list[Finding]) -> None:
    if ctx.path and not src.needed and not dst.needed:  # a nested description, not a subsection
        where = ctx.path.rstrip(".")
        if src.name != dst.name:
            out.append(Finding(INFO, ctx.section, where, f"nested description '{src.name}' is '{dst.name}' in DEST "
                                                         "(names are not on the wire)"))
        if sv != dv and not src.actual:
            out.append(Finding(INFO, ctx.section, where, f"nested '{src.name}' is version {sv} in SOURCE and {dv} in "
                                                         "DEST: QEMU saves and loads a nested description at its own "
                                                         "version, so only the layouts below matter"))
    ctx = attrs.evolve(ctx, actual=src.actual, left_out=src.left_out)
    _fields(src.wire_fields(sv), dst.wire_fields(dv), ctx, out)
    _subsections(src, dst, ctx, out)


def _bytes_agree(a: Field, b: Field) -> bool:
    """False only when what is known of both sides' byte counts disagrees.

    A side whose element count is not known (a dump prints none for single fields and variable arrays,
    QEMU 7.2's none at all) agrees with any whole number of its elements."""
    if a.struct is not None or b.struct is not None:
        return (a.struct is None) == (b.struct is None) and (a.count is None or b.count is None or a.count == b.count)
    if a.c_size != b.c_size:
        return True  # a C size beside a wire size says nothing (see _pair)
    na, nb = a.wire_bytes(), b.wire_bytes()
    if na is not None and nb is not None:
        return na == nb
    if a.size is None or b.size is None:
        return True
    if na is not None:
        return na % b.size == 0
    if nb is not None:
        return nb % a.size == 0
    return a.size == b.size


def _fields(s: list[Field], d: list[Field], ctx: _Ctx, out: list[Finding]) -> None:
    i = j = 0
    while i < len(s) and j < len(d):
        a, b = s[i], d[j]
        if a.name == b.name and _bytes_agree(a, b):
            _pair(a, b, ctx, out)
            i, j = i + 1, j + 1
            continue
        # A stream answers DEST's field tests too: the QEMU that saved it evaluated the same tests on the same
        # device, so a field it has and does not carry is one whose test is false (or an empty array).  Which
        # fields it has, its dump says (``left_out``); without it every conditional field it does not carry
        # here is taken as one whose test is false, and every varying array as one with no elements (QEMU
        # describes none then).
        if ctx.actual and (b.name in ctx.left_out if ctx.left_out is not None else b.cond is not None or b.varying):
            j += 1
            continue
        # Fields moved into a struct of their own keep their bytes (the static checker's substructs).
        if _wraps(b, a.name):
            assert b.struct is not None
            out.append(Finding(INFO, ctx.section, ctx.path + b.name, f"DEST nests '{a.name}' and what follows in "
                                                                     f"'{b.name}' (same bytes)"))
            d = d[:j] + b.struct.wire_fields(b.struct.version) + d[j + 1:]
            continue
        if _wraps(a, b.name):
            assert a.struct is not None
            out.append(Finding(INFO, ctx.section, ctx.path + a.name, f"SOURCE nests '{b.name}' and what follows in "
                                                                     f"'{a.name}'; DEST has them flat (same bytes)"))
            s = s[:i] + a.struct.wire_fields(a.struct.version) + s[i + 1:]
            continue
        # Same bytes under other names, when both sides go on alike after them, come first; then a field only
        # one side has (found again further on by name; padding names say nothing); then same bytes anyway.
        window, confident = _window(s, i, d, j)
        k = None if a.unused else _find(d, j + 1, a.name)
        m = None if b.unused else _find(s, i + 1, b.name)
        # A conditional field of DEST that the saving QEMU does not have at all: its test is DEST's own
        # (often one on the version the stream carries, QEMU's esp), so the bytes decide, not the names:
        # DEST reads it from what the stream has at that position.
        if window is not None and ctx.actual and ctx.left_out is not None and b.cond is not None:
            k = m = None
        if not confident and k is not None and (m is None or k - j <= m - i):
            for extra in d[j:k]:
                _missing(extra, "DEST reads", "that SOURCE does not send", ctx, out)
            j = k
            continue
        if not confident and m is not None:
            for extra in s[i:m]:
                _missing(extra, "SOURCE sends", "that DEST does not read", ctx, out)
            i = m
            continue
        if a.struct is not None and b.struct is not None and a.struct.name == b.struct.name and _bytes_agree(a, b):
            out.append(Finding(INFO, ctx.section, ctx.path + a.name, f"renamed to '{b.name}' in DEST (the same nested "
                                                                     f"'{a.struct.name}' at the same position)"))
            _pair(a, b, ctx, out)
            i, j = i + 1, j + 1
            continue
        if window is None:
            _fail(out, ctx, ctx.path + a.name, f"SOURCE sends {_describe(a)} where DEST reads {_describe(b)}; "
                                               "the rest of this part cannot be lined up")
            return
        i2, j2 = window
        _regrouped(s[i:i2], d[j:j2], ctx, out)
        i, j = i2, j2
    for extra in s[i:]:
        _missing(extra, "SOURCE sends", "after DEST's last field", ctx, out)
    for extra in d[j:]:
        if not (ctx.actual and (extra.cond is not None or extra.varying
                                or (ctx.left_out is not None and extra.name in ctx.left_out))):
            _missing(extra, "DEST reads", "after SOURCE's last field", ctx, out)


def _wraps(f: Field, name: str) -> bool:
    if f.struct is None or f.count != 1 or f.struct.subsections:
        return False
    inner = f.struct.wire_fields(f.struct.version)
    return bool(inner) and inner[0].name == name


def _find(fields: list[Field], start: int, name: str) -> int | None:
    return next((k for k in range(start, len(fields)) if fields[k].name == name), None)


def _describe(f: Field) -> str:
    n = f.wire_bytes()
    if f.struct is not None:
        return f"'{f.name}' (a nested '{f.struct.name}')"
    return f"'{f.name}' ({n} bytes)" if n is not None else f"'{f.name}'"


def _missing(f: Field, who: str, what: str, ctx: _Ctx, out: list[Finding]) -> None:
    if f.cond is not None:
        owner = "SOURCE" if who.startswith("SOURCE") else "DEST"
        ctx = attrs.evolve(ctx, when=_join(ctx.when, f"{owner}'s {_cond(f.cond)} holds"))
    _fail(out, ctx, ctx.path + f.name, f"{who} {_describe(f)} {what}")


def _join(a: str | None, b: str | None) -> str | None:
    return " and ".join(x for x in (a, b) if x) or None


def _window(s: list[Field], i: int, d: list[Field], j: int) -> tuple[tuple[int, int] | None, bool]:
    """Ends of the runs from ``i`` and ``j`` that cover the same bytes (or None), and whether both sides go
    on with fields of one name after them (or both end there).

    Candidates: one field for another of agreeing size (a dump knows no counts, so no byte sums
    either), then the shortest runs with equal byte sums, taking an unknown count as 1.  The first
    after which both sides go on alike wins, else the first."""
    candidates = []
    if s[i].struct is None and d[j].struct is None and _bytes_agree(s[i], d[j]):
        candidates.append((i + 1, j + 1))
    aligned = _align(s, i, d, j)
    if aligned is not None and aligned not in candidates:
        candidates.append(aligned)
    for i2, j2 in candidates:
        if (i2 == len(s) and j2 == len(d)) or (i2 < len(s) and j2 < len(d) and s[i2].name == d[j2].name):
            return (i2, j2), True
    return (candidates[0] if candidates else None), False


def _assumed_bytes(f: Field) -> int | None:
    if f.struct is not None or f.size is None:
        return None
    return f.size * (1 if f.count is None else f.count)


def _align(s: list[Field], i: int, d: list[Field], j: int) -> tuple[int, int] | None:
    """Ends of the shortest runs from ``i`` and ``j`` covering the same number of bytes (an unknown
    count taken as 1), or None."""
    sa, sb = _assumed_bytes(s[i]), _assumed_bytes(d[j])
    i2, j2 = i + 1, j + 1
    while sa is not None and sb is not None:
        if sa == sb:
            return i2, j2
        if i2 - i > _ALIGN_WINDOW or j2 - j > _ALIGN_WINDOW:
            return None
        if sa < sb:
            if i2 >= len(s):
                return None
            n = _assumed_bytes(s[i2])
            sa = None if n is None else sa + n
            i2 += 1
        else:
            if j2 >= len(d):
                return None
            n = _assumed_bytes(d[j2])
            sb = None if n is None else sb + n
            j2 += 1
    return None


def _related(a: str, b: str) -> bool:
    if a in b or b in a:
        return True
    return bool({w for w in _WORD.findall(a) if len(w) >= 3} & {w for w in _WORD.findall(b) if len(w) >= 3})


def _base(t: str | None) -> str | None:
    return t.split()[0] if t else None  # "int32 equal" is an int32 with a check


def _regrouped(a: list[Field], b: list[Field], ctx: _Ctx, out: list[Finding]) -> None:
    """Runs of fields covering the same bytes under other names or in another split."""
    names_a, names_b = ", ".join(f.name for f in a), ", ".join(f.name for f in b)
    known = [f.wire_bytes() for f in a]
    nbytes = f"{sum(n for n in known if n is not None)} bytes" if None not in known else "bytes"
    field = ctx.path + a[0].name
    if all(f.unused for f in a) and all(f.unused for f in b):
        return  # padding for padding (renumbered where another padding field came or went)
    if all(f.unused for f in b):
        out.append(Finding(INFO, ctx.section, field, f"DEST ignores these {nbytes} (unused): {names_a}"))
        return
    if len(a) == 1 and len(b) == 1:
        x, y = a[0], b[0]
        tx, ty = _base(x.type), _base(y.type)
        if x.unused:
            out.append(Finding(CHANGED, ctx.section, field, f"DEST reads '{y.name}' from bytes SOURCE sends as "
                                                            "unused"))
        elif tx is not None and ty is not None and tx != ty:
            out.append(Finding(CHANGED, ctx.section, field, f"same {nbytes}, but DEST reads them as "
                                                            f"'{y.name}' ({ty}), SOURCE sends '{x.name}' ({tx})"))
        elif _related(x.name, y.name):
            out.append(Finding(INFO, ctx.section, field, f"renamed to '{y.name}' in DEST (same position, size "
                                                         "and type: wire-compatible)"))
        else:
            out.append(Finding(CHANGED, ctx.section, field, f"DEST reads another field, '{y.name}', from these "
                                                            f"{nbytes}"))
        return
    out.append(Finding(CHANGED, ctx.section, field, f"the same {nbytes} are {names_a} in SOURCE and "
                                                    f"{names_b} in DEST"))


def _pair(a: Field, b: Field, ctx: _Ctx, out: list[Finding]) -> None:
    """Two fields of one name at one position."""
    name = ctx.path + a.name
    if ctx.actual:
        pass  # the stream carries it, so DEST's test holds for it (see _fields)
    elif a.cond is None and b.cond is not None:
        _fail(out, ctx, name, f"SOURCE always sends it; DEST reads it only when its {_cond(b.cond)} holds")
    elif a.cond is not None and b.cond is None:
        _fail(out, _Ctx(ctx.section, ctx.path, _join(ctx.when, f"SOURCE's {_cond(a.cond)} does not hold")),
              name, "DEST always reads it; SOURCE sends it only under a condition")
    if a.c_size != b.c_size and a.struct is None and a.size != b.size and a.size and b.size:
        dump, spec = ("SOURCE", "DEST") if a.c_size else ("DEST", "SOURCE")
        out.append(Finding(INFO, ctx.section, name, f"{dump}'s dump gives the C field's size "
                                                    f"({a.size if a.c_size else b.size}), {spec} the wire size "
                                                    f"({b.size if a.c_size else a.size}): not compared"))
    ta, tb = _base(a.type), _base(b.type)
    if ta is not None and tb is not None and ta != tb and a.struct is None:
        out.append(Finding(CHANGED, ctx.section, name, f"same bytes, but SOURCE sends {ta} and DEST reads {tb}"))
    if a.struct is not None and b.struct is not None:
        _compare(a.struct, a.struct.version, b.struct, b.struct.version, attrs.evolve(ctx, path=name + "."), out)


def _cond(text: str) -> str:
    return "field_exists test" if text.startswith("its ") else f"test {text}"


def _subsections(src: Desc, dst: Desc, ctx: _Ctx, out: list[Finding]) -> None:
    theirs = {s.name: s for s in dst.subsections}
    for sub in src.subsections:
        when = None if sub.needed in (None, SENT) else (
            f"SOURCE sends subsection '{sub.name}'" if sub.needed == UNKNOWN else f"{sub.needed} holds")
        sctx = _Ctx(ctx.section, ctx.path + sub.name + ".", _join(ctx.when, when))
        other = theirs.get(sub.name)
        if other is None:
            why = ("this stream carries it" if sub.needed == SENT else
                   "SOURCE always sends it" if sub.needed is None else "SOURCE sends it then")
            _fail(out, _Ctx(ctx.section, ctx.path, sctx.when), ctx.path + sub.name,
                  f"DEST has no subsection '{sub.name}' ({why})")
            continue
        if _version_ok(sub.version, other, sctx, sub.name, out):
            _compare(sub, sub.version, other, sub.version, sctx, out)
    if not src.actual:
        mine = {s.name for s in src.subsections}
        for sub in dst.subsections:
            if sub.name not in mine:
                out.append(Finding(INFO, ctx.section, ctx.path + sub.name,
                                   f"subsection '{sub.name}' exists only in DEST (SOURCE never sends it)"))
