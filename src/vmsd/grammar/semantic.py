"""Name resolution and semantic checks over a loaded :class:`Program`.

Everything a later stage needs to know about names (which vmsd a ``struct``
refers to, which enum a field uses, which attributes a class has) is decided
here once; the code generator only reads the answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import attrs

from vmsd.grammar import ast
from vmsd.grammar.diagnostics import Diagnostic, SpecError
from vmsd.grammar.limits import MAX_STRUCT_DEPTH, MAX_UNUSED_BYTES
from vmsd.grammar.loader import Program
from vmsd.grammar.pynames import (
    enum_member_problem,
    member_name_problem,
    module_name_problem,
    python_attr_name,
    python_class_name,
)
from vmsd.runtime.kinds import KINDS
from vmsd.runtime.scalars import BY_NAME


@attrs.frozen
class Attr:
    """One attribute of a generated class (a field of the vmsd or of a subsection)."""

    field: ast.Field
    index: int  # position in stream order within the whole class
    in_subsection: bool
    py: str  # the Python attribute (see vmsd.grammar.pynames)


@attrs.define
class Resolved:
    program: Program
    vmsd_file: dict[int, str] = attrs.Factory(dict)
    class_names: dict[int, str] = attrs.Factory(dict)
    struct_target: dict[int, ast.Vmsd] = attrs.Factory(dict)  # id(field) -> vmsd (struct/list/map value)
    key_target: dict[int, ast.Vmsd] = attrs.Factory(dict)  # id(field) -> key vmsd of a map
    enum_target: dict[int, ast.Enum] = attrs.Factory(dict)  # id(field) -> enum
    enum_file: dict[int, str] = attrs.Factory(dict)
    attrs_of: dict[int, dict[str, Attr]] = attrs.Factory(dict)  # id(vmsd) -> attributes by name
    py_names: dict[int, str] = attrs.Factory(dict)  # id(field) -> its Python attribute
    # per file: the class and enum names of the file and of the files it imports
    module_names: dict[str, frozenset[str]] = attrs.Factory(dict)

    def attr(self, f: ast.Field) -> str:
        """The Python attribute of a named field."""
        return self.py_names[id(f)]

    def vmsd_of_struct(self, f: ast.Field) -> ast.Vmsd:
        return self.struct_target[id(f)]

    def class_name(self, v: ast.Vmsd) -> str:
        return self.class_names[id(v)]


class _Loaded:
    """The fields loaded before the one being checked, by identity (a set, so each lookup is O(1)).

    Subsections add their fields and take them off again when done
    (``truncate``), so that siblings do not see each other's fields.
    """

    def __init__(self) -> None:
        self.order: list[ast.Field] = []
        self.ids: set[int] = set()

    def append(self, f: ast.Field) -> None:
        self.order.append(f)
        self.ids.add(id(f))

    def __contains__(self, f: ast.Field) -> bool:
        return id(f) in self.ids

    def __len__(self) -> int:
        return len(self.order)

    def truncate(self, n: int) -> None:
        while len(self.order) > n:
            self.ids.discard(id(self.order.pop()))


def walk_fields(fields: tuple[ast.Field, ...], subs: tuple[ast.Subsection, ...]) -> Iterator[tuple[ast.Field, bool]]:
    for f in fields:
        yield f, False
    for s in subs:
        for f, _ in walk_fields(s.fields, s.subsections):
            yield f, True


def walk_subsections(subs: tuple[ast.Subsection, ...]) -> Iterator[ast.Subsection]:
    for s in subs:
        yield s
        yield from walk_subsections(s.subsections)


class _Checker:
    def __init__(self, program: Program) -> None:
        self.p = program
        self.r = Resolved(program)
        self.diags: list[Diagnostic] = []
        self._visible: dict[str, list[str]] = {}
        self._vmsd_index: dict[str, tuple[dict[str, list[ast.Vmsd]], ...]] = {}
        self._enum_index: dict[str, dict[str, ast.Enum]] = {}

    def error(self, pos: ast.Pos, msg: str) -> None:
        self.diags.append(Diagnostic(pos, msg))

    # -- scopes ------------------------------------------------------------
    # Lookups go through per-file indexes, so that checking stays linear in the
    # number of declarations (a scan per reference was quadratic).
    def visible_files(self, path: str) -> list[str]:
        out = self._visible.get(path)
        if out is None:
            spec = self.p.files[path]
            out, seen = [path], {path}
            for imp in spec.imports:
                target = self.p.import_targets.get((path, imp.path))
                if target in self.p.files and target not in seen:
                    out.append(target)
                    seen.add(target)
            self._visible[path] = out
        return out

    def vmsd_index(self, path: str) -> tuple[dict[str, list[ast.Vmsd]], ...]:
        """The file's vmsds by name, by class name and by either lowercased, in declaration order."""
        index = self._vmsd_index.get(path)
        if index is None:
            index = ({}, {}, {})
            for v in self.p.files[path].vmsds:
                cname = self.r.class_names[id(v)]
                index[0].setdefault(v.name, []).append(v)
                index[1].setdefault(cname, []).append(v)
                for key in dict.fromkeys((v.name.lower(), cname.lower())):
                    index[2].setdefault(key, []).append(v)
            self._vmsd_index[path] = index
        return index

    def find_vmsd(self, path: str, name: str) -> ast.Vmsd | None:
        files = self.visible_files(path)
        for which, key in ((0, name), (1, name), (2, name.lower())):
            found = [self.vmsd_index(f)[which].get(key, []) for f in files]
            hits = sum(len(h) for h in found)
            if hits:
                # The file's own declarations (files[0]) shadow imported ones.
                own = found[0]
                if len(own) == 1 or hits == 1:
                    return own[0] if own else next(h[0] for h in found if h)
                return None
        return None

    def find_enum(self, path: str, name: str) -> tuple[ast.Enum, str] | None:
        for f in self.visible_files(path):
            index = self._enum_index.get(f)
            if index is None:
                index = {}
                for e in self.p.files[f].enums:
                    index.setdefault(e.name, e)
                self._enum_index[f] = index
            if name in index:
                return index[name], f
        return None

    # -- entry ---------------------------------------------------------------
    def run(self) -> Resolved:
        for path, spec in self.p.files.items():
            for v in spec.vmsds:
                self.r.class_names[id(v)] = v.class_name or python_class_name(v.name)
                self.r.vmsd_file[id(v)] = path
        own = {path: frozenset([*(e.name for e in spec.enums), *(self.r.class_names[id(v)] for v in spec.vmsds)])
               for path, spec in self.p.files.items()}
        for path in self.p.files:
            self.r.module_names[path] = frozenset().union(*(own[f] for f in self.visible_files(path)))
        # Names are unique per file (one generated module); files that do not
        # import each other may reuse them (e.g. specs for two QEMU versions).
        for path, spec in self.p.files.items():
            seen_vmsd: dict[str, ast.Vmsd] = {}
            seen_class: dict[str, ast.Vmsd] = {}
            names: dict[str, ast.Pos] = {}
            for e in spec.enums:
                self.check_enum(e, self.r.module_names[path])
                if e.name in names:
                    self.error(e.pos, f"duplicate declaration '{e.name}'")
                elif (why := module_name_problem(e.name)) is not None:
                    self.error(e.pos, f"enum name '{e.name}' cannot be used ({why}); rename the enum")
                names[e.name] = e.pos
            for v in spec.vmsds:
                cname = self.r.class_names[id(v)]
                # One mistake, one message: a duplicate name also clashes as a class.
                if v.name in seen_vmsd:
                    other = seen_vmsd[v.name].pos
                    self.error(v.pos, f"duplicate vmsd '{v.name}' (first declared at {other.path}:{other.line})")
                elif cname in seen_class:
                    self.error(v.pos, f"vmsd '{v.name}' would generate class '{cname}', already used by vmsd '{seen_class[cname].name}'; pick another with 'class'")
                elif cname in names:
                    self.error(v.class_pos or v.pos, f"duplicate declaration '{cname}'")
                elif (why := module_name_problem(cname)) is not None:
                    if v.class_pos is not None:
                        self.error(v.class_pos, f"class name '{cname}' cannot be used ({why}); pick another")
                    else:
                        self.error(v.pos, f"vmsd '{v.name}' would generate class '{cname}' ({why}); pick another with 'class'")
                seen_vmsd.setdefault(v.name, v)
                seen_class.setdefault(cname, v)
                names.setdefault(cname, v.pos)
        for path, spec in self.p.files.items():
            for v in spec.vmsds:
                self.collect_attrs(path, v)
                for f, _ in walk_fields(v.fields, v.subsections):
                    if KINDS[f.kind].nested:
                        self.check_struct_ref(path, f)
        for path, spec in self.p.files.items():
            for v in spec.vmsds:
                self.check_vmsd(path, v)
            self.check_imported_names(path, spec, own[path])
        self.check_struct_cycles()
        return self.r

    def check_imported_names(self, path: str, spec: ast.SpecFile, own: frozenset[str]) -> None:
        """A class or enum of another file that this file's module imports must not meet one of its own
        names, or another imported one of that name, in the module's namespace."""
        imported: dict[str, str] = {}
        for v in spec.vmsds:
            for f, _ in walk_fields(v.fields, v.subsections):
                used = [(self.r.class_names[id(t)], self.r.vmsd_file[id(t)], f"struct '{t.name}'")
                        for t in (self.r.struct_target.get(id(f)), self.r.key_target.get(id(f))) if t is not None]
                if id(f) in self.r.enum_target:
                    used.append((self.r.enum_target[id(f)].name, self.r.enum_file[id(f)], f"enum '{f.enum}'"))
                for name, home, what in used:
                    if home == path:
                        continue
                    if name in own:
                        self.error(f.pos, f"{what} comes from {home} as '{name}', a name this file declares too; rename one of them")
                    elif imported.setdefault(name, home) != home:
                        self.error(f.pos, f"{what} comes from {home} as '{name}', and another '{name}' from {imported[name]}; rename one of them")

    def check_enum(self, e: ast.Enum, module_names: frozenset[str]) -> None:
        base = BY_NAME[e.base]
        if not base.integer:
            self.error(e.pos, f"enum '{e.name}' must have an integer base type, not '{e.base}'")
            return
        assert base.range is not None
        lo, hi = base.range
        seen: set[str] = set()
        for m in e.members:
            if m.name in seen:
                self.error(m.pos, f"duplicate member '{m.name}' in enum '{e.name}'")
            elif (why := enum_member_problem(m.name, module_names)) is not None:
                self.error(m.pos, f"enum member '{m.name}' cannot be used ({why}); rename it")
            seen.add(m.name)
            if not lo <= m.value <= hi:
                self.error(m.pos, f"value {m.value} of '{e.name}.{m.name}' is out of range for {e.base} ({lo}..{hi})")

    def collect_attrs(self, path: str, v: ast.Vmsd) -> None:
        attrs_by_name: dict[str, Attr] = {}
        by_attr: dict[str, ast.Field] = {}
        order = 0
        for f, in_sub in walk_fields(v.fields, v.subsections):
            if f.name is not None:
                if f.name in attrs_by_name:
                    first = attrs_by_name[f.name].field.pos
                    self.error(f.pos, f"duplicate field '{f.name}' in vmsd '{v.name}' (first at line {first.line})")
                    continue
                py = python_attr_name(f.name, self.r.module_names[path])
                if f.name.startswith("_"):
                    self.error(f.pos, f"field name '{f.name}' must not start with '_'")
                elif py in by_attr:
                    other = by_attr[py]
                    if py != f.name:
                        self.error(f.pos, f"field '{f.name}' would be the Python attribute '{py}' (Python or the generated code uses "
                                          f"'{f.name}'), which field '{other.name}' (line {other.pos.line}) is; rename one of them")
                    else:
                        self.error(f.pos, f"field '{f.name}' is the Python attribute that field '{other.name}' (line {other.pos.line}) "
                                          f"becomes (Python or the generated code uses '{other.name}'); rename one of them")
                by_attr.setdefault(py, f)
                attrs_by_name[f.name] = Attr(f, order, in_sub, py)
                self.r.py_names[id(f)] = py
            order += 1
        self.r.attrs_of[id(v)] = attrs_by_name

    def check_vmsd(self, path: str, v: ast.Vmsd) -> None:
        if not 0 <= v.version <= 0x7FFFFFFF:
            self.error(v.version_pos, f"version {v.version} is out of range (0..2147483647)")
        if v.minimum > v.version:
            self.error(v.minimum_pos, f"minimum version {v.minimum} is above version {v.version}")
        py_attrs = {a.py for a in self.r.attrs_of[id(v)].values()}
        customs = self.custom_methods(v)
        for name, pos in customs.items():
            if name in py_attrs:
                self.error(pos, f"custom predicate '{name}' clashes with a field or generated name")
            elif (why := member_name_problem(name, self.r.module_names[path])) is not None:
                self.error(pos, f"custom predicate '{name}' cannot be used ({why}); rename it")
        earlier = _Loaded()
        self.check_fields(path, v, v.fields, earlier, v.version)
        seen_subs: dict[str, ast.Pos] = {}
        self.check_subsections(path, v, v.subsections, v.name, earlier, seen_subs)

    def custom_methods(self, v: ast.Vmsd) -> dict[str, ast.Pos]:
        out: dict[str, ast.Pos] = {}
        conds: list[ast.Condition | None] = [f.exists for f, _ in walk_fields(v.fields, v.subsections)]
        conds += [s.needed for s in walk_subsections(v.subsections)]
        for c in conds:
            if isinstance(c, ast.Custom):
                out.setdefault(c.method, c.pos)
        return out

    def check_subsections(
        self, path: str, v: ast.Vmsd, subs: tuple[ast.Subsection, ...], parent: str,
        earlier: _Loaded, seen: dict[str, ast.Pos],
    ) -> None:
        for s in subs:
            if s.name in seen:
                self.error(s.pos, f"duplicate subsection '{s.name}'")
            seen[s.name] = s.pos
            if s.name == parent:
                self.error(s.pos, f"subsection name '{s.name}' must extend its parent's name (e.g. '{parent}/...')")
            elif not s.name.startswith(parent):
                self.error(s.pos, f"subsection name '{s.name}' must start with its parent's name '{parent}' (QEMU matches subsections by that prefix)")
            if len(s.name.encode()) > 255:
                self.error(s.pos, "subsection name is longer than 255 bytes")
            if not 0 <= s.version <= 255:
                self.error(s.pos, f"subsection version {s.version} is out of range (0..255: QEMU's loader keeps only the low 8 bits)")
            if s.minimum > s.version:
                self.error(s.pos, f"minimum version {s.minimum} is above version {s.version}")
            if s.needed is not None:
                self.check_condition(v, s.needed, None, None, "needed")
            # A subsection sees the fields loaded before it in its ancestors, not its siblings'.
            mark = len(earlier)
            self.check_fields(path, v, s.fields, earlier, s.version)
            self.check_subsections(path, v, s.subsections, s.name, earlier, seen)
            earlier.truncate(mark)

    # -- fields ----------------------------------------------------------------
    def check_fields(self, path: str, v: ast.Vmsd, fields: tuple[ast.Field, ...], earlier: _Loaded, version: int) -> None:
        for f in fields:
            what = f"'{f.name}'" if f.name else (f"validate '{f.wire_name}'" if f.kind == "validate" else "unused")
            if f.since > version:
                self.error(f.since_pos or f.pos, f"field {what} has 'since {f.since}' above the version {version} it belongs to")
            if f.exists is not None:
                self.check_condition(v, f.exists, earlier, f, "condition")
            if f.kind == "scalar":
                self.check_scalar(path, f, earlier, v)
            elif f.kind in ("bytes", "bitmap"):
                self.check_length(v, f, f.dims[0], earlier, what)
            elif f.kind == "unused":
                if f.size <= 0:
                    self.error(f.pos, "unused size must be positive")
                elif f.size > MAX_UNUSED_BYTES:
                    self.error(f.pos, f"unused size {f.size} is above the limit of {MAX_UNUSED_BYTES} bytes")
            elif f.kind == "struct":
                if f.tmp and (f.dims or f.nullable):
                    self.error(f.pos, f"tmp struct '{f.name}' must be a single struct (VMSTATE_WITH_TMP)")
                if len(f.dims) > 1:
                    self.error(f.pos, f"struct arrays have one dimension; '{f.name}' has {len(f.dims)}")
                for d in f.dims:
                    self.check_length(v, f, d, earlier, what)
                if f.nullable and (not f.dims or not isinstance(f.dims[0], ast.IntLit)):
                    self.error(f.pos, f"nullable struct '{f.name}' must be a fixed-size array (VMSTATE_ARRAY_OF_POINTER_TO_STRUCT)")
            elif f.kind == "validate":
                assert f.expr is not None
                self.check_expr(v, f.expr, earlier, f, "validation")
            earlier.append(f)

    def check_scalar(self, path: str, f: ast.Field, earlier: _Loaded, v: ast.Vmsd) -> None:
        if len(f.dims) > 2:
            self.error(f.pos, f"arrays have at most two dimensions; '{f.name}' has {len(f.dims)}")
        for i, d in enumerate(f.dims):
            if i and not isinstance(d, ast.IntLit):
                self.error(_pos(d), "only the first dimension of an array may be variable")
            self.check_length(v, f, d, earlier, f"'{f.name}'")
        scalar = BY_NAME[f.type]
        if f.enum is not None:
            found = self.find_enum(path, f.enum)
            if found is None:
                self.error(f.enum_pos or f.pos, f"unknown enum '{f.enum}'")
            else:
                self.r.enum_target[id(f)] = found[0]
                self.r.enum_file[id(f)] = found[1]
                if not scalar.integer:
                    self.error(f.enum_pos or f.pos, f"enum '{f.enum}' needs an integer field, not {f.type}")
        if f.check is not None:
            if f.dims:
                self.error(f.pos, f"'{f.check}' checks a single value; '{f.name}' is an array")
            elif not scalar.integer:
                self.error(f.pos, f"'{f.check}' needs a single integer field, not {f.type}")
            elif f.check == "le" and scalar.le_info is None:
                self.error(f.pos, f"'le' exists only for int32 fields (QEMU's INT32_POSITIVE_LE), not {f.type}")
        if f.default is not None:
            dpos = f.default_pos or f.pos
            if scalar.py_type == "float":
                if isinstance(f.default, bool):
                    self.error(dpos, f"default {f.default} does not fit {f.type}")
            elif scalar.py_type == "bool":
                if not isinstance(f.default, bool) and f.default not in (0, 1):
                    self.error(dpos, f"default {f.default} is out of range for bool")
            elif isinstance(f.default, float | bool):
                shown = str(f.default).lower() if isinstance(f.default, bool) else f.default
                self.error(dpos, f"default {shown} is not an integer ({f.name} is {f.type})")
            else:
                assert scalar.range is not None
                lo, hi = scalar.range
                if not lo <= int(f.default) <= hi:
                    self.error(dpos, f"default {f.default} is out of range for {f.type} ({lo}..{hi})")

    def check_struct_ref(self, path: str, f: ast.Field) -> None:
        target = self.find_vmsd(path, f.type)
        if target is None:
            self.error(f.pos, f"unknown struct '{f.type}' in field '{f.name}'")
        else:
            self.r.struct_target[id(f)] = target
            if f.struct_version is not None and not target.minimum <= f.struct_version <= target.version:
                self.error(f.pos, f"struct version {f.struct_version} is outside {target.name}'s range {target.minimum}..{target.version}")
        if f.kind == "map" and f.key is not None:
            # A scalar key is stored directly in the GTree: any integer type (bool
            # and timer too).  Any other key type names a vmsd.
            scalar = BY_NAME.get(f.key)
            if scalar is None or scalar.range is None:
                key = self.find_vmsd(path, f.key)
                if key is None:
                    self.error(f.pos, f"unknown map key type '{f.key}' in field '{f.name}'")
                else:
                    self.r.key_target[id(f)] = key

    def check_length(self, v: ast.Vmsd, f: ast.Field, d: ast.Expr, earlier: _Loaded, what: str) -> None:
        if isinstance(d, ast.IntLit):
            if d.value <= 0:
                self.error(d.pos, f"array size of {what} must be positive, not {d.value}")
            elif d.value > 1 << 31:
                self.error(d.pos, f"array size of {what} is out of range")
            return
        if isinstance(d, ast.LenCall) and d.function == "custom":
            # A count the stream does not carry (device configuration, e.g. the possible CPUs of
            # VMSTATE_STRUCT_VARRAY_POINTER_UINT32(devs, dev_count)): a property of the registered class.
            if f.kind != "struct":
                self.error(d.pos, f"custom() gives the length of a struct array only, not of {what}")
            elif len(d.ref.parts) != 1:
                self.error(d.ref.pos, f"custom() names one property, not '{'.'.join(d.ref.parts)}'")
            return
        counter: ast.Ref | None = None
        if isinstance(d, ast.Ref):
            counter = d
        elif isinstance(d, ast.BinOp) and d.op == "*":
            if isinstance(d.left, ast.Ref) and isinstance(d.right, ast.IntLit):
                counter = d.left
            elif isinstance(d.right, ast.Ref) and isinstance(d.left, ast.IntLit):
                counter = d.right
        if counter is None:
            self.error(_pos(d), f"length of {what} must be a number, a field, or a field times a number")
            return
        if len(counter.parts) != 1:
            self.error(counter.pos, f"length of {what} must name a field of the same vmsd, not '{'.'.join(counter.parts)}'")
            return
        target = self.resolve_name(v, counter, earlier, f, "length")
        if target is None:
            return
        if target.kind != "scalar" or target.dims or not BY_NAME[target.type].integer:
            self.error(counter.pos, f"length of {what} uses '{target.name}', which is not an integer field")
        elif BY_NAME[target.type].varray_flag is None:
            self.error(counter.pos, f"length of {what} uses '{target.name}' of type {target.type}; QEMU counts with uint8, uint16, uint32 or int32 only")

    def resolve_name(self, v: ast.Vmsd, ref: ast.Ref, earlier: _Loaded | None, user: ast.Field | None, role: str) -> ast.Field | None:
        name = ref.parts[0]
        known = self.r.attrs_of[id(v)]
        user_name = f"'{user.name}'" if user is not None and user.name else (f"validate '{user.wire_name}'" if user is not None and user.kind == "validate" else "this field")
        if name not in known:
            self.error(ref.pos, f"unknown field '{name}' in {role} of {user_name}" if user is not None else f"unknown field '{name}' in {role}")
            return None
        target = known[name].field
        if earlier is not None and target not in earlier:
            if user is not None and target is user:
                self.error(ref.pos, f"{role} of {user_name} refers to the field itself; it may only use fields loaded before it")
            elif user is not None and user.name in known and known[name].index < known[user.name].index:
                self.error(ref.pos, f"field '{name}' belongs to another subsection, which may be absent from the stream; a {role} may only use fields of this vmsd and of the enclosing subsections")
            else:
                self.error(ref.pos, f"field '{name}' is declared after {user_name}; a {role} may only use fields loaded before it")
            return None
        return target

    def check_condition(self, v: ast.Vmsd, c: ast.Condition, earlier: _Loaded | None, user: ast.Field | None, role: str) -> None:
        if isinstance(c, ast.Custom):
            return
        self.check_expr(v, c, earlier, user, role)

    def check_expr(self, v: ast.Vmsd, e: ast.Expr, earlier: _Loaded | None, user: ast.Field | None, role: str) -> None:
        if isinstance(e, ast.IntLit | ast.VersionRef):
            return
        if isinstance(e, ast.UnOp):
            self.check_expr(v, e.operand, earlier, user, role)
        elif isinstance(e, ast.BinOp):
            self.check_expr(v, e.left, earlier, user, role)
            self.check_expr(v, e.right, earlier, user, role)
        elif isinstance(e, ast.LenCall):
            if e.function != "len":
                self.error(e.pos, f"unknown function '{e.function}'; expressions have only len() (and a struct array's length custom())")
                return
            target = self.resolve_ref(v, e.ref, earlier, user, role)
            if target is not None and not (target.dims or KINDS[target.kind].measured):
                self.error(e.ref.pos, f"len() needs an array, list or map; '{target.name}' is a single {target.kind}")
        elif isinstance(e, ast.Ref):
            target = self.resolve_ref(v, e, earlier, user, role)
            if target is not None and (target.kind != "scalar" or target.dims or BY_NAME[target.type].py_type == "float"):
                self.error(e.pos, f"'{'.'.join(e.parts)}' is not an integer value and cannot be used in a {role}")

    def resolve_ref(self, v: ast.Vmsd, ref: ast.Ref, earlier: _Loaded | None, user: ast.Field | None, role: str) -> ast.Field | None:
        target = self.resolve_name(v, ast.Ref(ref.parts[:1], ref.pos), earlier, user, role)
        for part in ref.parts[1:]:
            if target is None:
                return None
            nested = self.r.struct_target.get(id(target)) if target.kind == "struct" and not target.dims else None
            if nested is None:
                self.error(ref.pos, f"'{target.name}' is not a single struct, so '.{part}' cannot be used")
                return None
            inner = self.r.attrs_of[id(nested)]
            if part not in inner:
                self.error(ref.pos, f"struct '{nested.name}' has no field '{part}'")
                return None
            target = inner[part].field
        return target

    def check_struct_cycles(self) -> None:
        """Plain structs must not contain themselves; nothing may nest deeper than MAX_STRUCT_DEPTH.

        Iterative depth-first searches: a long chain must not exhaust Python's stack.
        """
        # Only vmsds holding structs have entries: most vmsds hold none, and each entry costs more than the
        # text of a small vmsd.
        plain: dict[int, list[tuple[ast.Vmsd, ast.Field]]] = {}
        nested: dict[int, list[tuple[ast.Vmsd, ast.Field]]] = {}
        vmsds = [v for spec in self.p.files.values() for v in spec.vmsds]
        for v in vmsds:
            for f, _ in walk_fields(v.fields, v.subsections):
                t = self.r.struct_target.get(id(f))
                if t is None:
                    continue
                nested.setdefault(id(v), []).append((t, f))
                # Lists, maps and nullable slots may end recursion; plain structs cannot.
                if f.kind == "struct" and not f.nullable:
                    plain.setdefault(id(v), []).append((t, f))

        def cycle(path: list[ast.Vmsd], t: ast.Vmsd, f: ast.Field) -> None:
            chain = [v.name for v in path]
            self.error(f.pos, f"struct '{t.name}' contains itself: {' -> '.join([*chain, t.name])}")

        _depth_first(vmsds, plain, cycle, lambda v: None)
        # Levels of nesting below each vmsd; a cycle (reported above, or through a list) counts once.
        depth: dict[int, int] = {}

        def done(v: ast.Vmsd) -> None:
            below = nested.get(id(v), ())
            if below:
                depth[id(v)] = max(1 + depth.get(id(t), 0) for t, _ in below)
            for t, f in below:
                if depth.get(id(t)) == MAX_STRUCT_DEPTH:
                    self.error(f.pos, f"'{f.name}' nests structs more than {MAX_STRUCT_DEPTH} levels deep ('{t.name}' holds {MAX_STRUCT_DEPTH})")

        _depth_first(vmsds, nested, lambda path, t, f: None, done)


def _depth_first(
    vmsds: list[ast.Vmsd],
    edges: dict[int, list[tuple[ast.Vmsd, ast.Field]]],
    on_cycle: Callable[[list[ast.Vmsd], ast.Vmsd, ast.Field], None],
    on_done: Callable[[ast.Vmsd], None],
) -> None:
    """Visit every vmsd with edges, and those they reach, once, children first: ``on_cycle`` for each
    edge back into the current path (with that path), ``on_done`` once a vmsd's children are all done.
    A vmsd without edges that none reaches is not visited: it has no children and is in no cycle."""
    state: dict[int, int] = {}  # 1 on the current path, 2 done
    for root in vmsds:
        if id(root) in state or id(root) not in edges:
            continue
        state[id(root)] = 1
        path = [root]
        todo = [iter(edges[id(root)])]
        while todo:
            for t, f in todo[-1]:
                if state.get(id(t)) == 1:
                    on_cycle(path, t, f)
                elif id(t) not in state:
                    state[id(t)] = 1
                    path.append(t)
                    todo.append(iter(edges.get(id(t), ())))
                    break
            else:
                todo.pop()
                v = path.pop()
                state[id(v)] = 2
                on_done(v)


def _pos(e: ast.Expr) -> ast.Pos:
    return e.pos


def check(program: Program) -> Resolved:
    """Resolve names and check the program; raise :class:`SpecError` on findings."""
    checker = _Checker(program)
    resolved = checker.run()
    if checker.diags:
        diags = sorted(checker.diags, key=lambda d: (d.pos.path, d.pos.line, d.pos.col))
        raise SpecError(diags, program.sources)
    return resolved
