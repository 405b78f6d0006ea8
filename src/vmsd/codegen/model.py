"""Resolved model of one generated module: every string the templates print.

The model turns checked AST declarations into Python names, annotations,
defaults, precompiled ``struct`` formats (consecutive fixed-size scalars are
fused into one format) and the statement lists of ``_load_fields`` and
``_save_fields``.  Templates only loop over what is built here.

What a template prints per field (attributes, statements, predicates, field
specs) is not kept: a :class:`Replay` makes it again each time the template
goes over it, and the module's classes are made one at a time for each of
the template's two passes over them.  A first pass over every class names
their methods and formats and notes their imports, which the module's header
lists.  Memory is the checked spec plus one class's fixed parts.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import keyword
import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import attrs

from vmsd.grammar import ast
from vmsd.grammar.semantic import Resolved, walk_fields, walk_subsections
from vmsd.runtime.kinds import KINDS
from vmsd.runtime.markers import QEMU_VM_SUBSECTION
from vmsd.runtime.scalars import BY_NAME

T = TypeVar("T")

_C_OPS = {"&&": "and", "||": "or"}
_BOOL_OPS = frozenset({"&&", "||", "==", "!=", "<", "<=", ">", ">="})


def _identifier(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", text)
    return "v" + name if not name or name[0].isdigit() else name


def module_name(part: str) -> str:
    """The module (or package) a spec file (or folder) becomes: a keyword such as ``class`` or a name
    such as ``__init__`` gets a trailing underscore, as it could not be imported otherwise."""
    name = _identifier(part)
    return name + "_" if keyword.iskeyword(name) or (name.startswith("__") and name.endswith("__")) else name


@attrs.frozen
class Replay(Generic[T]):
    """A sequence made again each time it is gone over: what a template prints once or a few times per
    field is never all held (a module's code is tens of times its spec)."""

    make: Callable[[], Iterator[T]]
    size: int

    def __iter__(self) -> Iterator[T]:
        return self.make()

    def __bool__(self) -> bool:
        return self.size > 0


@attrs.frozen
class AttrModel:
    name: str
    annotation: str
    default: str  # source after '=' in the class body
    doc: str | None
    fresh: str | None = None  # value load() starts from, None when loading always assigns it first
    fill: str | None = None  # statement completing a fresh instance after its load
    value: str = ""  # the default's value source
    factory: bool = False  # built per instance (lists, nested structs)

    @property
    def init_default(self) -> str:
        """Default of the ``__init__`` parameter: a shared sentinel for built defaults."""
        return "_rt.DEFAULT" if self.factory else self.value

    @property
    def init_value(self) -> str:
        if self.factory:
            return f"{self.value} if {self.name} is _rt.DEFAULT else {self.name}"
        return self.name


@attrs.frozen
class SubsectionModel:
    name: str
    parent: str
    method: str  # loader method for this subsection
    save_method: str
    version: int
    minimum: int
    needed: str | None  # predicate method name
    load: list[str]
    save: list[str]


@attrs.frozen
class ClassModel:
    name: str
    vmsd_name: str
    version: int
    minimum: int
    doc: str | None
    attrs: Replay[AttrModel]
    abstract_methods: list[str]
    abstract_counts: list[str]  # properties named by custom() array lengths
    predicates: Replay[tuple[str, str]]  # (method, expression source)
    load: Replay[str]
    save: Replay[str]
    subsections: list[SubsectionModel]
    table_fields: Replay[str]  # sources of the VmsdSpec's FieldSpecs
    subsection_specs: list[str]  # sources of its SubsectionSpecs
    flat_struct: str | None = None  # the one Struct of a state that is a single fused run
    flat_targets: tuple[str, ...] = ()
    flat_defaults: tuple[str, ...] = ()  # default value source of each flat target
    row_writes: tuple[str, ...] = ()  # a state that is one fused run: the statements writing it (to ``out``)
    peeks: bool = False  # custom predicates here or in nested structs may look at the reader

    @property
    def table_head(self) -> str:
        """Source of the VmsdSpec expression up to its field specs (one a line after it)."""
        return f"_schema.VmsdSpec({self.vmsd_name!r}, {self.version}, {self.minimum}, ("

    @property
    def table_tail(self) -> str:
        """Source of the VmsdSpec expression after its field specs."""
        return "), (" + "".join(f"\n    {t}," for t in self.subsection_specs) + ("\n" if self.subsection_specs else "") + "))"

    @property
    def fresh(self) -> list[tuple[str, str]]:
        return [(a.name, a.fresh) for a in self.attrs if a.fresh is not None]

    @property
    def fills(self) -> list[str]:
        return [a.fill for a in self.attrs if a.fill is not None]

    @property
    def sub_tables(self) -> list[tuple[str, list[SubsectionModel]]]:
        """Subsection loaders grouped by the vmsd or subsection that holds them."""
        groups: dict[str, list[SubsectionModel]] = {}
        for s in self.subsections:
            groups.setdefault(s.parent, []).append(s)
        return list(groups.items())


@attrs.frozen
class EnumModel:
    name: str
    base: str  # IntEnum | IntFlag
    members: list[tuple[str, int, str | None]]
    doc: str | None


@attrs.frozen
class ModuleModel:
    spec_path: str
    spec_hash: str
    tool_version: str
    imports: list[str]
    structs: list[tuple[str, str]]  # (constant, format)
    enums: list[EnumModel]
    classes: Replay[ClassModel]  # made again for each of the template's two passes, one class at a time
    uses_flat: bool
    uses_rows: bool
    uses_abc: bool

    @property
    def typing_names(self) -> list[str]:
        names = ["ClassVar"]
        if self.uses_rows:
            names.insert(0, "Any")
        if self.classes:
            names.append("Self")
        return names


class _Formats:
    """Module-level precompiled ``struct.Struct`` constants, deduplicated."""

    def __init__(self) -> None:
        self.by_format: dict[str, str] = {}

    def get(self, fmt: str) -> str:
        if fmt not in self.by_format:
            self.by_format[fmt] = f"_S{len(self.by_format)}"
        return self.by_format[fmt]


@attrs.frozen
class _Ctx:
    """What expression and step code needs to know about the enclosing class."""

    attrs_: dict[str, ast.Field]
    optional: frozenset[str]
    in_subsection: frozenset[str] = frozenset()


class ModuleBuilder:
    def __init__(self, resolved: Resolved, path: str, module_of: dict[str, tuple[str, ...]], tool_version: str,
                 absolute: frozenset[tuple[str, ...]] = frozenset()) -> None:
        self.r = resolved
        self.path = path
        self.spec = resolved.program.files[path]
        self.module_of = module_of
        self.absolute = absolute  # modules compiled elsewhere (an installed package): imported by full name
        self.tool_version = tool_version
        self.formats = _Formats()
        # Set by steps(): the Struct and targets when the fields are one simple fused run.
        self.flat_run: tuple[str, list[str], list[str], bool] | None = None
        self.imports: dict[tuple[str, ...], set[str]] = {}
        self.methods: dict[int, str] = {}  # id of a field or subsection -> its generated method's name (per class)
        self.method_names: set[str] = set()  # the values of ``methods``
        self.buffered: dict[int, bool] = {}  # id of a fields tuple -> whether its save statements use ``out``

    # -- names ---------------------------------------------------------------
    def class_ref(self, v: ast.Vmsd) -> str:
        name = self.r.class_name(v)
        self.note_import(self.r.vmsd_file[id(v)], name)
        return name

    def enum_ref(self, f: ast.Field) -> str:
        e = self.r.enum_target[id(f)]
        self.note_import(self.r.enum_file[id(f)], e.name)
        return e.name

    def note_import(self, file: str, name: str) -> None:
        if file != self.path:
            self.imports.setdefault(self.module_of[file], set()).add(name)

    def import_lines(self) -> list[str]:
        here = self.module_of[self.path]
        lines = []
        for target, names in sorted(self.imports.items()):
            if target in self.absolute:
                lines.append(f"from {'.'.join(target)} import {', '.join(sorted(names))}")
                continue
            common = 0
            while common < min(len(here), len(target)) - 0 and common < len(here) - 1 and here[common] == target[common]:
                common += 1
            dots = "." * (len(here) - common)
            mod = ".".join(target[common:])
            lines.append(f"from {dots}{mod} import {', '.join(sorted(names))}")
        return lines

    # -- module ----------------------------------------------------------------
    def build(self) -> ModuleModel:
        enums = [self.enum_model(e) for e in self.spec.enums]
        # A first pass over the classes names their methods and Struct formats and notes their imports
        # (the module's header lists these) without keeping them.
        uses_flat = uses_rows = uses_abc = False
        for v in self.spec.vmsds:
            c = self.class_model(v)
            uses_flat = uses_flat or bool(c.flat_struct)
            uses_rows = uses_rows or bool(c.row_writes)
            uses_abc = uses_abc or bool(c.abstract_methods or c.abstract_counts)
        vmsds = self.spec.vmsds
        return ModuleModel(
            spec_path=self.path,
            spec_hash=hashlib.sha256(self.spec.source.encode()).hexdigest(),
            tool_version=self.tool_version,
            imports=self.import_lines(),
            structs=[(const, fmt) for fmt, const in self.formats.by_format.items()],
            enums=enums,
            classes=Replay(lambda: (self.class_model(v) for v in vmsds), len(vmsds)),
            uses_flat=uses_flat,
            uses_rows=uses_rows,
            uses_abc=uses_abc,
        )

    def enum_model(self, e: ast.Enum) -> EnumModel:
        return EnumModel(e.name, "IntFlag" if e.flags else "IntEnum", [(m.name, m.value, m.doc) for m in e.members], e.doc)

    def method_name(self, key: int, base: str) -> str:
        """A generated method's name, ``base`` unless another of this class has it (then ``base_2``...):
        names made from subsection names, or from the field names unnamed fields lack, can meet."""
        if key not in self.methods:
            name, n = base, 2
            while name in self.method_names:
                name, n = f"{base}_{n}", n + 1
            self.methods[key] = name
            self.method_names.add(name)
        return self.methods[key]

    def class_model(self, v: ast.Vmsd) -> ClassModel:
        """The model of ``v``'s class; its per-field parts are made again each time they are gone over.

        Making it goes over them once: methods and Struct formats are named, in the order they
        appear, and imports noted before the templates ask for any."""
        methods: dict[int, str] = {}
        method_names: set[str] = set()
        self.methods, self.method_names = methods, method_names
        known = self.r.attrs_of[id(v)]
        optional = frozenset(
            name for name, a in known.items() if not a.in_subsection and (a.field.since or a.field.exists is not None)
        )
        ctx = _Ctx({n: a.field for n, a in known.items()}, optional, frozenset(n for n, a in known.items() if a.in_subsection))
        # Code outside the spec (extents, custom presence tests) runs mid-load
        # and may look at fields not loaded yet: they hold their defaults.
        counts = _custom_counts(v)
        sees = bool(counts) or any(
            f.kind == "opaque" or isinstance(f.exists, ast.Custom) for f, _ in walk_fields(v.fields, v.subsections)
        )
        named = [a for a in known.values() if a.field.name]

        def attr_models() -> Iterator[AttrModel]:
            return (self.attr_model(a.field, a.field.name in optional, a.in_subsection, sees) for a in named)

        def chunks() -> Iterator[tuple[list[str], list[str], list[str], list[tuple[str, str]]]]:
            self.methods, self.method_names = methods, method_names
            return self.step_chunks(v.fields, ctx)

        abstract: list[str] = []
        for f, _ in walk_fields(v.fields, v.subsections):
            if isinstance(f.exists, ast.Custom) and f.exists.method not in abstract:
                abstract.append(f.exists.method)
        for s in walk_subsections(v.subsections):
            if isinstance(s.needed, ast.Custom) and s.needed.method not in abstract:
                abstract.append(s.needed.method)
        for _ in attr_models():
            pass
        sizes = [0, 0, 0, 0]  # load, save and table lines, predicates
        for more_load, more_save, more_tables, more_predicates in chunks():
            for i, n in enumerate((len(more_load), len(more_save), len(more_tables), len(more_predicates))):
                sizes[i] += n
        # A "flat" state is one fused run of single scalars: arrays of it load
        # with one iter_unpack over all elements.
        run = self.flat_run if not v.subsections else None
        flat = run if run is not None and run[3] else None
        load_tail = ['_at = ""', *_subsections_load(v.name, True)] if v.subsections else []
        sub_predicates: list[tuple[str, str]] = []
        save_tail: list[str] = []
        subs, sub_tables = self.subsections(v.subsections, v.name, ctx, sub_predicates, save_tail)
        save_head = ["out = w.buf"] if self.buffered[id(v.fields)] else []

        def load() -> Iterator[str]:
            for chunk in chunks():
                yield from chunk[0]
            yield from load_tail

        def save() -> Iterator[str]:
            yield from save_head
            for chunk in chunks():
                yield from chunk[1]
            yield from save_tail

        def table() -> Iterator[str]:
            for chunk in chunks():
                yield from chunk[2]

        def predicates() -> Iterator[tuple[str, str]]:
            for chunk in chunks():
                yield from chunk[3]
            yield from sub_predicates

        defaults = {a.name: a.default for a in attr_models()} if flat else {}
        return ClassModel(
            name=self.r.class_name(v),
            vmsd_name=v.name,
            version=v.version,
            minimum=v.minimum,
            doc=v.doc,
            attrs=Replay(attr_models, len(named)),
            abstract_methods=abstract,
            abstract_counts=counts,
            predicates=Replay(predicates, sizes[3] + len(sub_predicates)),
            load=Replay(load, sizes[0] + len(load_tail)),
            save=Replay(save, len(save_head) + sizes[1] + len(save_tail)),
            subsections=subs,
            table_fields=Replay(table, sizes[2]),
            subsection_specs=sub_tables,
            flat_struct=flat[0] if flat else None,
            flat_targets=tuple(flat[1]) if flat else (),
            flat_defaults=tuple(defaults[t.removeprefix("self.")] for t in flat[1]) if flat else (),
            row_writes=tuple(run[2]) if run else (),
            peeks=self.peeks(v),
        )

    def peeks(self, v: ast.Vmsd, seen: frozenset[int] = frozenset()) -> bool:
        """Whether loading ``v`` may run a custom predicate (which may ask for the reader)."""
        if _custom_counts(v):
            return True
        for f, _ in walk_fields(v.fields, v.subsections):
            if isinstance(f.exists, ast.Custom):
                return True
            target = self.r.struct_target.get(id(f))
            if target is not None and id(target) not in seen and self.peeks(target, seen | {id(v)}):
                return True
        return any(isinstance(s.needed, ast.Custom) for s in walk_subsections(v.subsections))

    def subsections(
        self, subs: tuple[ast.Subsection, ...], parent: str, ctx: _Ctx, predicates: list[tuple[str, str]], parent_save: list[str]
    ) -> tuple[list[SubsectionModel], list[str]]:
        models: list[SubsectionModel] = []
        tables: list[str] = []
        if subs:
            parent_save.append('_at = ""')  # a subsection's fields are the object's own: no enclosing field
        for s in subs:
            slug = self.method_name(id(s), _identifier(s.name.split("/")[-1]).lower())
            method = f"_load_sub_{slug}"
            needed: str | None = None
            test = ""  # the save-time test: a custom predicate's call, a spec predicate's expression inline
            if isinstance(s.needed, ast.Custom):
                needed = s.needed.method
                test = f"self.{needed}(version_id)"
            elif s.needed is not None:
                needed = f"_needed_{slug}"
                test = self.expr(s.needed, ctx)
                predicates.append((needed, test))
            load, save, table_fields = self.steps(s.fields, ctx, predicates)
            nested_models, nested_tables = self.subsections(s.subsections, s.name, ctx, predicates, save)
            if s.subsections:
                load.append('_at = ""')
                load.extend(_subsections_load(s.name, False))
            models.append(SubsectionModel(s.name, parent, method, f"_save_sub_{slug}", s.version, s.minimum, needed, load, save))
            models.extend(nested_models)
            emit = [
                f"_rt.write_subsection_header(w, {s.name.encode()!r}, {s.version})",
                f"self._save_sub_{slug}(w, {s.version})",
            ]
            if test:
                parent_save.append(f"if {test}:")
                emit = ["    " + line for line in emit]
            parent_save.extend(emit)
            tables.append(
                f"_schema.SubsectionSpec({s.name!r}, {s.version}, {s.minimum}, {needed!r}, ("
                + "".join(f"\n        {t}," for t in table_fields)
                + ("\n    " if table_fields else "")
                + "), ("
                + "".join(f"\n        {t}," for t in nested_tables)
                + "))"
            )
        return models, tables

    # -- attributes ---------------------------------------------------------------
    def attr_model(self, f: ast.Field, optional: bool, in_subsection: bool, sees: bool) -> AttrModel:
        assert f.name is not None
        ann, value, factory = self.annotation_and_default(f)
        if _never_present(f):
            # QEMU describes it but its test always says no (xhci's event queue, 5632 events per
            # interrupter): no value is ever read or written, so none is built.
            value, factory, optional = "None", False, True
        if optional:
            ann = f"{ann} | None"
        default = f"attrs.field(factory=lambda: {value})" if factory else value
        if value == "[]":
            default = "attrs.field(factory=list)"
        name = self.r.attr(f)
        start, fill = self.fresh_value(f, name, value, factory, optional, in_subsection, sees)
        return AttrModel(name, ann, default, f.doc, start, fill, value, factory)

    def fresh_value(
        self, f: ast.Field, name: str, value: str, factory: bool, optional: bool, in_subsection: bool, sees: bool
    ) -> tuple[str | None, str | None]:
        """What ``_fresh`` assigns before a load (None: the loader always
        assigns first) and what ``_fill`` does after it.

        A subsection field keeps its default when the subsection is absent:
        built defaults (lists, struct arrays) start as ``_rt.ABSENT`` and are
        built only when the load did not reach them.  A checked field is
        compared with the value held before loading, a nullable array's NULL
        slots decide what is read, and a nested struct is loaded into what is
        there (a subsection's nested struct is made when its subsection
        arrives): those start from a real value.  When outside code runs
        mid-load (``sees``), only the structs loaded unconditionally into
        what is there start empty; every other field holds its default.
        """
        if f.check is not None or (f.kind == "struct" and f.nullable):
            return value, None
        if sees and (in_subsection or optional or f.kind != "struct"):
            return value, None
        if in_subsection:
            if factory:
                return "_rt.ABSENT", f"if self.{name} is _rt.ABSENT:\n            self.{name} = {value}"
            return value, None
        if f.kind != "struct":
            return None, None
        if optional:
            return "None", None
        if f.dims:
            return "[]", None
        return f"_rt.fresh({self.class_ref(self.r.struct_target[id(f)])})", None

    def annotation_and_default(self, f: ast.Field) -> tuple[str, str, bool]:
        """Annotation, default value source, and whether it must be built per instance."""
        if f.kind == "scalar":
            base = self.enum_ref(f) if id(f) in self.r.enum_target else BY_NAME[f.type].py_type
            zero = _scalar_default(f)
            if id(f) in self.r.enum_target:
                zero = f"{base}({zero})"
            if not f.dims:
                return base, zero, False
            if len(f.dims) == 2:
                fixed = _int_dim(f.dims[-1])
                rows = f.dims[0].value if isinstance(f.dims[0], ast.IntLit) else 0
                return f"list[list[{base}]]", f"[[{zero}] * {fixed} for _ in range({rows})]", True
            if isinstance(f.dims[0], ast.IntLit):
                return f"list[{base}]", f"[{zero}] * {f.dims[0].value}", True
            return f"list[{base}]", "[]", True
        if f.kind == "bytes":
            d = f.dims[0]
            return "bytes", f"bytes({d.value})" if isinstance(d, ast.IntLit) else 'b""', False
        if f.kind == "bitmap":
            return "int", "0", False
        if f.kind == "opaque":
            return "bytes", 'b""', False
        if f.kind == "fd":
            return "int", "-1", False  # -1: no descriptor, as QEMU's unset fds
        target = self.r.struct_target[id(f)]
        cls = self.class_ref(target)
        if f.kind == "struct":
            if not f.dims:
                return cls, f"_rt.impl({cls})()", True
            if f.nullable:
                n = _int_dim(f.dims[0])
                return f"list[{cls} | None]", f"[None] * {n}", True
            if isinstance(f.dims[0], ast.IntLit):
                return f"list[{cls}]", f"_rt.new_array({cls}, {f.dims[0].value})", True
            return f"list[{cls}]", "[]", True
        if f.kind == "list":
            return f"list[{cls}]", "[]", True
        # map: GTree entries in stream order
        key_target = self.r.key_target.get(id(f))
        key = self.class_ref(key_target) if key_target is not None else "int"
        return f"list[tuple[{key}, {cls}]]", "[]", True

    # -- expressions ----------------------------------------------------------------
    def expr(self, e: ast.Condition, ctx: _Ctx) -> str:
        if isinstance(e, ast.Custom):
            return f"self.{e.method}(version_id)"
        src = self._expr(e, ctx)
        if isinstance(e, ast.BinOp) and e.op not in ("/", "%"):
            src = src[1:-1]  # drop the outermost parentheses
            if e.op in _BOOL_OPS:
                return src
        if isinstance(e, ast.UnOp) and e.op == "!":
            return src[1:-1]
        return f"bool({src})"

    def _expr(self, e: ast.Expr, ctx: _Ctx) -> str:
        if isinstance(e, ast.IntLit):
            return str(e.value)
        if isinstance(e, ast.VersionRef):
            return "version_id"
        if isinstance(e, ast.LenCall):
            return f"len({self._ref(e.ref, ctx)})"
        if isinstance(e, ast.Ref):
            return self._ref(e, ctx)
        if isinstance(e, ast.UnOp):
            inner = self._expr(e.operand, ctx)
            return f"(not {inner})" if e.op == "!" else f"({e.op}{inner})"
        left, right = self._expr(e.left, ctx), self._expr(e.right, ctx)
        if e.op in _C_OPS:
            return f"({_truth(e.left, left)} {_C_OPS[e.op]} {_truth(e.right, right)})"
        if e.op == "/":
            return f"_rt.c_div({left}, {right})"
        if e.op == "%":
            return f"_rt.c_mod({left}, {right})"
        return f"({left} {e.op} {right})"

    def _ref(self, ref: ast.Ref, ctx: _Ctx) -> str:
        head = ref.parts[0]
        field = ctx.attrs_[head]
        src = f"self.{self.r.attr(field)}"
        if head in ctx.optional:
            src = f"_rt.opt({src}, {head!r})"
        for part in ref.parts[1:]:
            target = self.r.struct_target[id(field)]
            inner = self.r.attrs_of[id(target)]
            a = inner[part]
            src += f".{a.py}"
            if not a.in_subsection and (a.field.since or a.field.exists is not None):
                src = f"_rt.opt({src}, {part!r})"
            field = a.field
        return src

    # -- load and save statements ---------------------------------------------------
    def steps(
        self, fields: tuple[ast.Field, ...], ctx: _Ctx, predicates: list[tuple[str, str]]
    ) -> tuple[list[str], list[str], list[str]]:
        """The load and save statements and table entries of ``fields``, all at once; their predicates
        are appended to ``predicates``."""
        load: list[str] = []
        save: list[str] = []
        tables: list[str] = []
        for more_load, more_save, more_tables, more_predicates in self.step_chunks(fields, ctx):
            load += more_load
            save += more_save
            tables += more_tables
            predicates += more_predicates
        if self.buffered[id(fields)]:
            save.insert(0, "out = w.buf")
        return load, save, tables

    def step_chunks(
        self, fields: tuple[ast.Field, ...], ctx: _Ctx
    ) -> Iterator[tuple[list[str], list[str], list[str], list[tuple[str, str]]]]:
        """The load and save statements, table entries and predicates of ``fields``, a field or a fused
        run at a time: made again each time a template goes over them, a huge vmsd's statements are
        never all held.  The save statements start with ``out = w.buf`` when ``self.buffered`` says so
        for ``fields``, which is known once this has run through."""
        load: list[str] = []
        save: list[str] = []
        tables: list[str] = []
        predicates: list[tuple[str, str]] = []
        run: list[ast.Field] = []
        names = _qemu_names(fields)
        runs: list[tuple[str, list[str], list[str], bool] | None] = []
        buffered = False
        def flush() -> None:
            if not run:
                return
            pieces = [list(g) for _, g in itertools.groupby(run, key=lambda f: f.since)]
            if len(pieces) == 1:
                runs.append(self.fused(run, load, save, ctx))
            else:
                # Fields from several versions on: at a version that has them
                # all (saving and loading the newest, the usual case) one
                # Struct call covers them; older versions (and loads whose
                # bytes are not all buffered yet) go run by run.
                newest = max(f.since or 0 for f in run)
                whole_load: list[str] = []
                whole_save: list[str] = []
                self.fused(run, whole_load, whole_save, ctx, whole=newest)
                part_load: list[str] = []
                part_save: list[str] = []
                for piece in pieces:
                    self.fused(piece, part_load, part_save, ctx)
                load.extend(whole_load)
                save.append(f"if version_id >= {newest}:")
                save.extend("    " + line for line in whole_save)
                for out, part in ((load, part_load), (save, part_save)):
                    out.append("else:")
                    out.extend("    " + line for line in part)
                runs.append(None)
            run.clear()

        for f in fields:
            tables.append(self.table_entry(f, names.get(id(f)) or _wire_base(f), ctx))
            if self.fusable(f):
                run.append(f)
                yield [], [], tables, []  # a long run's table entries are not held until it ends
                tables = []
                continue
            flush()
            runs.append(None)
            self.field_steps(f, ctx, predicates, load, save)
            buffered = buffered or _writes_out(save)
            yield load, save, tables, predicates
            load, save, tables, predicates = [], [], [], []
        flush()
        self.flat_run = runs[0] if len(runs) == 1 else None
        self.buffered[id(fields)] = buffered or _writes_out(save)
        yield load, save, tables, predicates


    def fusable(self, f: ast.Field) -> bool:
        """Whether ``f`` joins a fused run: fixed size and plain, present
        always or from a version on (one run per ``since``)."""
        if f.exists is not None:
            return False
        if f.kind == "scalar":
            return f.enum is None and f.check is None and all(isinstance(d, ast.IntLit) for d in f.dims)
        return f.kind in ("bytes", "unused") and all(isinstance(d, ast.IntLit) for d in f.dims)

    def fused(
        self, run: list[ast.Field], load: list[str], save: list[str], ctx: _Ctx, whole: int = 0
    ) -> tuple[str, list[str], list[str], bool] | None:
        """Statements for one fused run; unless it depends on a version: its
        Struct, targets, write statements and whether it is all single values.

        A run of fields present ``since`` a version is read and written under
        one version test; below it, vmsd-level fields become None.  ``whole``:
        the run spans several ``since`` values, the newest of which is
        ``whole``; the statements cover versions that have them all, and the
        caller adds the others (``else:``).
        """
        since = 0 if whole else run[0].since
        fmt = ">"
        size = 0
        targets: list[str] = []  # per value-producing field: how to assign from _v
        assigned: list[str] = []  # what each of ``targets`` assigns to
        values: list[str] = []
        checks: list[str] = []
        absent: list[str] = []  # attributes set to None below ``since``
        index = 0
        simple = True
        for f in run:
            attr = f"self.{self.r.attr(f)}" if f.name else ""
            value = attr
            if (since or whole) and f.name and f.name in ctx.optional:
                absent.append(attr)
                value = f"{attr} if {attr} is not None else _rt.missing({f.name!r})"
            if f.kind == "unused":
                fmt += f"{f.size}x"
                size += f.size
                continue
            if f.kind == "bytes":
                n = _int_dim(f.dims[0])
                fmt += f"{n}s"
                size += n
                targets.append(f"{attr} = _v[{index}]")
                assigned.append(attr)
                values.append(value)
                checks.extend(_len_check(value, str(n), f.name))
                index += 1
                continue
            scalar = BY_NAME[f.type]
            code, width = scalar.fmt, scalar.size
            dims = [_int_dim(d) for d in f.dims]
            total = 1
            for d in dims:
                total *= d
            fmt += f"{total}{code}" if dims else code
            size += total * width
            if not dims:
                targets.append(f"{attr} = _v[{index}]")
                assigned.append(attr)
                values.append(value)
            elif len(dims) == 1:
                simple = False
                targets.append(f"{attr} = list(_v[{index}:{index + total}])")
                assigned.append(attr)
                values.append(f"*{value}" if value == attr else f"*({value})")
                checks.extend(_len_check(value, str(total), f.name))
            else:
                simple = False
                rows, cols = dims
                targets.append(f"{attr} = [list(_v[i:i + {cols}]) for i in range({index}, {index + total}, {cols})]")
                assigned.append(attr)
                values.append(f"*_rt.flat({value}, {rows}, {cols}, {f.name!r})")
            index += total
        const = self.formats.get(fmt)
        first = next((f.name for f in run if f.name), "unused")
        unpack: list[str] = []  # once the run's bytes are at buf[p:]
        byte_list = len(targets) == 1 and fmt == f">{index}B" and run[0].kind == "scalar"
        if byte_list:
            # A uint8 array alone (an IDE drive's 128 KiB buffer): list() of the
            # bytes, four times faster than unpacking and copying a tuple.
            unpack.append(f"{assigned[0]} = list(buf[p : p + {size}])")
        elif simple and index:
            unpack.append(f"({', '.join(assigned)},) = {const}.unpack_from(buf, p)")
        elif index:
            unpack.append(f"_v = {const}.unpack_from(buf, p)")
            unpack.extend(targets)
        reads = [*_take(size), *unpack] if index else [f"r.take({size})"]
        writes = [*checks, f"out += {const}.pack({', '.join(values)})"]
        save.append(f"_at = {first!r}")
        if whole:
            # Only when the bytes are buffered: a short input takes the
            # run-by-run path, whose errors name the field that is cut.
            load.append("buf, p = r.buf, r.pos")
            load.append(f"if version_id >= {whole} and p + {size} <= len(buf):")
            load.append(f"    r.pos = p + {size}")
            load.extend("    " + line for line in unpack)
            save.extend(writes)
            return None
        load.append(f"_at = {first!r}")
        if not since:
            load.extend(reads)
            save.extend(writes)
            return (const, assigned, writes, simple) if index else None
        load.append(f"if version_id >= {since}:")
        load.extend("    " + line for line in reads)
        if absent:
            load.append("else:")
            load.append("    " + " = ".join(absent) + " = None")
        save.append(f"if version_id >= {since}:")
        save.extend("    " + line for line in writes)
        return None

    def has_method(self, f: ast.Field) -> str:
        """The predicate of a field's ``if (...)``."""
        return self.method_name(id(f), f"_has_{self.r.attr(f) if f.name else 'field'}")

    def field_steps(self, f: ast.Field, ctx: _Ctx, predicates: list[tuple[str, str]], load: list[str], save: list[str]) -> None:
        label = f.name or f.wire_name or "unused"
        attr = f"self.{self.r.attr(f)}" if f.name else ""
        conds = []
        if f.since:
            conds.append(f"version_id >= {f.since}")
        if f.exists is not None:
            if isinstance(f.exists, ast.Custom):
                conds.append(f"self.{f.exists.method}(version_id)")
            else:
                method = self.has_method(f)
                predicates.append((method, self.expr(f.exists, ctx)))
                conds.append(f"self.{method}(version_id)")
        # Only vmsd-level conditional fields are Optional; a subsection field
        # that is absent keeps its current value, as in QEMU.
        optional = bool(conds) and f.name is not None and f.name in ctx.optional
        value = f"{attr} if {attr} is not None else _rt.missing({f.name!r})"
        local = f"_v_{self.r.attr(f)}" if f.name else ""
        inner_load = self.load_field(f, attr, ctx)
        inner_save = self.save_field(f, local if optional else attr, ctx)
        load.append(f"_at = {label!r}")
        save.append(f"_at = {label!r}")
        if not conds:
            load.extend(inner_load)
            save.extend(inner_save)
            return
        cond = " and ".join(conds)
        load.append(f"if {cond}:")
        load.extend("    " + line for line in inner_load)
        if optional:
            load.append("else:")
            load.append(f"    {attr} = None")
        save.append(f"if {cond}:")
        if optional:
            save.append(f"    {local} = {value}")
        save.extend("    " + line for line in inner_save)

    def count_src(self, d: ast.Expr, ctx: _Ctx) -> str:
        if isinstance(d, ast.IntLit):
            return str(d.value)
        if isinstance(d, ast.LenCall):  # custom(name): the registered class's property
            return f"_rt.count(self.{d.ref.parts[0]})"
        if isinstance(d, ast.Ref):
            return f"_rt.count({self._ref(d, ctx)})"
        assert isinstance(d, ast.BinOp)
        return f"_rt.count({self._expr(d, ctx)[1:-1]})"

    def load_field(self, f: ast.Field, attr: str, ctx: _Ctx) -> list[str]:
        if f.kind == "unused":
            return [f"r.take({f.size})"]
        if f.kind == "validate":
            assert f.expr is not None
            return [f"if not ({self.expr(f.expr, ctx)}):", f"    _rt.check_failed({f.wire_name!r}, 'validation failed', r.tell())"]
        if f.kind == "bytes":
            return [f"{attr} = r.read({self.count_src(f.dims[0], ctx)})"]
        if f.kind == "bitmap":
            return [f"{attr} = _rt.load_bitmap(r, {self.count_src(f.dims[0], ctx)})"]
        if f.kind == "opaque":
            return [f"{attr} = r.read(_rt.opaque_extent({f.info!r}, r, self))"]
        if f.kind == "fd":
            return [f"{attr} = r.get_fd()"]
        if KINDS[f.kind].nested:
            target = self.r.struct_target[id(f)]
            cls = self.class_ref(target)
            version = f.struct_version if f.struct_version is not None else target.version
            if f.tmp:
                # QEMU loads a tmp struct at the field's version, saves it at its own.
                version = f.since
            if f.kind == "list":
                return [f"{attr} = _rt.load_qlist(r, {cls}, {f.since or target.version})"]
            if f.kind == "map":
                key_t = self.r.key_target.get(id(f))
                key = self.class_ref(key_t) if key_t is not None else "None"
                return [f"{attr} = _rt.load_gtree(r, {key}, {cls}, {f.since or target.version})"]
            if not f.dims:
                lines = []
                if f.name in ctx.optional:
                    lines += [f"if {attr} is None:", f"    {attr} = _rt.impl({cls})()"]
                elif f.name in ctx.in_subsection:
                    lines += [f"if {attr} is _rt.ABSENT:", f"    {attr} = _rt.fresh({cls})"]
                return [*lines, f"{attr}._load_nested(r, {version})"]
            n = self.count_src(f.dims[0], ctx)
            existing = f"{attr} or []" if f.name in ctx.optional else attr
            if f.nullable:
                return [f"{attr} = _rt.load_nullable_array(r, {n}, {version}, {existing})"]
            return [f"{attr} = _rt.load_struct_array(r, {cls}, {n}, {version}, {existing})"]
        # scalars that are not fused: enums, checks, conditional or variable arrays
        scalar = BY_NAME[f.type]
        code, width = scalar.fmt, scalar.size
        conv = self.enum_ref(f) if id(f) in self.r.enum_target else ""
        if not f.dims:
            const = self.formats.get(">" + code)
            lines = [*_take(width), f"_t = {const}.unpack_from(buf, p)[0]"]
            if f.check == "equal":
                lines += [f"if _t != {attr}:", f"    _rt.check_failed({f.name!r}, f'{{_t:#x}} != {{{attr}:#x}}', r.tell() - {width})"]
            elif f.check == "le":
                lines += [
                    f"if not 0 <= _t <= {attr}:",
                    f"    _rt.check_failed({f.name!r}, f'Invalid value {{_t}} expecting positive value <= {{{attr}}}', r.tell() - {width})",
                ]
            lines.append(f"{attr} = {conv}(_t)" if conv else f"{attr} = _t")
            return lines
        dims = f.dims
        n = self.count_src(dims[0], ctx)
        cols = _int_dim(dims[1]) if len(dims) == 2 else 1
        total = f"{n} * {cols}" if cols != 1 else n
        lines = [f"_n = {total}", f"buf, p = r.take(_n * {width})", f"_v = struct.unpack_from(f'>{{_n}}{code}', buf, p)"]
        if code == "B" and cols == 1 and not conv:
            return [*lines[:2], f"{attr} = list(buf[p : p + _n])"]
        items = f"[{conv}(x) for x in _v]" if conv else "list(_v)"
        if cols != 1:
            tmp = f"_items_{self.r.attr(f)}"
            lines.append(f"{tmp} = {items}")
            lines.append(f"{attr} = [{tmp}[i:i + {cols}] for i in range(0, _n, {cols})]")
        else:
            lines.append(f"{attr} = {items}")
        return lines

    def save_field(self, f: ast.Field, value: str, ctx: _Ctx) -> list[str]:
        if f.kind == "unused":
            return [f"out += bytes({f.size})"]
        if f.kind == "validate":
            assert f.expr is not None
            return [f"if not ({self.expr(f.expr, ctx)}):", f"    raise _rt.SaveError({f'validation {f.wire_name} fails for this state'!r})"]
        if f.kind == "bytes":
            return [*_len_check(value, self.count_src(f.dims[0], ctx), f.name), f"out += {value}"]
        if f.kind == "bitmap":
            return [f"_rt.save_bitmap(w, {value}, {self.count_src(f.dims[0], ctx)}, {f.name!r})"]
        if f.kind == "opaque":
            return [f"out += {value}"]
        if f.kind == "fd":
            return [f"w.put_fd({value})"]
        if KINDS[f.kind].nested:
            target = self.r.struct_target[id(f)]
            version = f.struct_version if f.struct_version is not None else target.version
            if f.kind == "list":
                return [f"_rt.save_qlist(w, {value}, {target.version})"]
            if f.kind == "map":
                direct = id(f) not in self.r.key_target
                return [f"_rt.save_gtree(w, {value}, {target.version}, {direct})"]
            if not f.dims:
                return [f"{value}._save_nested(w, {version})"]
            n = self.count_src(f.dims[0], ctx)
            fn = "save_nullable_array" if f.nullable else "save_struct_array"
            return [f"_rt.{fn}(w, {value}, {n}, {version}, {f.name!r})"]
        code = BY_NAME[f.type].fmt
        if not f.dims:
            const = self.formats.get(">" + code)
            return [f"out += {const}.pack({value})"]
        n = self.count_src(f.dims[0], ctx)
        if len(f.dims) == 2:
            cols = _int_dim(f.dims[1])
            return [
                f"_n = {n}",
                f"_flat = _rt.flat({value}, _n, {cols}, {f.name!r})",
                f"out += struct.pack(f'>{{len(_flat)}}{code}', *_flat)",
            ]
        return [*_len_check(value, n, f.name), f"out += struct.pack(f'>{{len({value})}}{code}', *{value})"]

    # -- description tables ------------------------------------------------------------
    def table_entry(self, f: ast.Field, qemu_name: str, ctx: _Ctx) -> str:
        args = [repr(qemu_name), repr(self.r.attr(f) if f.name else None)]
        kw: dict[str, str] = {}
        flags: list[str] = []
        if f.kind == "scalar":
            scalar = BY_NAME[f.type]
            info = scalar.info
            if f.check == "equal":
                # The checker allows 'equal' on int8, int16 and int64 too, which QEMU
                # has no check for: those are named after the type.
                info = scalar.equal_info or f"{f.type} equal"
            elif f.check == "le":
                assert scalar.le_info is not None
                info = scalar.le_info
            kw["elem_size"] = str(scalar.size)
        elif f.kind == "bytes":
            info = f.info or "buffer"
            flags.append("VMS_BUFFER" if isinstance(f.dims[0], ast.IntLit) else "VMS_VBUFFER")
        elif f.kind == "opaque":
            info = f.info or "opaque"
        elif f.kind == "fd":
            info = "fd"
            kw["elem_size"] = "4"  # QEMU describes the int32 it holds
        elif f.kind == "unused":
            info = "unused_buffer"
            kw["elem_size"] = str(f.size)
            flags.append("VMS_BUFFER")
        elif f.kind == "bitmap":
            info = "bitmap"
            flags.append("VMS_VBUFFER")
        elif f.kind == "struct":
            if f.tmp:
                info = "tmp"
                kw["inline"] = "True"
            elif f.struct_version is not None:
                info = "vstruct"
                flags.append("VMS_VSTRUCT")
                kw["inline"] = "True"
            else:
                info = "struct"
                flags.append("VMS_STRUCT")
            if f.nullable:
                flags.append("VMS_ARRAY_OF_POINTER")
                kw["nullable"] = "True"
            if f.struct_version is not None:
                kw["struct_version"] = str(f.struct_version)
        elif f.kind == "list":
            info = "qlist" if f.list_kind == "qlist" else "qtailq"
        elif f.kind == "map":
            info = "gtree"
            key_t = self.r.key_target.get(id(f))
            if key_t is not None:
                kw["key"] = self.class_ref(key_t)
        else:
            info = "validate"
            flags += ["VMS_ARRAY", "VMS_MUST_EXIST"]
        args += [repr(info), repr(f.kind)]
        if KINDS[f.kind].nested:
            kw["struct"] = self.class_ref(self.r.struct_target[id(f)])
        dims: list[int] = []
        for i, d in enumerate(f.dims):
            if isinstance(d, ast.IntLit):
                dims.append(d.value)
            elif i == 0 and isinstance(d, ast.LenCall):
                kw["count_attr"] = repr(d.ref.parts[0])
                flags.append("VMS_VARRAY_UINT32")  # QEMU's VARRAY_POINTER_UINT32: the count is configuration
            elif i == 0:
                counter, mult = _counter(d)
                kw["count_attr"] = repr(self.r.attr(ctx.attrs_[counter]))
                if f.kind in ("bytes", "bitmap"):
                    kw["elem_size"] = "1" if f.kind == "bytes" else "0"
                else:
                    varray = BY_NAME[ctx.attrs_[counter].type].varray_flag
                    assert varray is not None
                    flags.append(varray)
                if mult != 1:
                    kw["multiply"] = str(mult)
                    flags.append("VMS_MULTIPLY_ELEMENTS" if f.kind not in ("bytes",) else "VMS_MULTIPLY")
        if dims and f.kind == "bitmap":
            kw["dims"] = repr(tuple(dims))
        elif dims and f.kind != "bytes":
            kw["dims"] = repr(tuple(dims))
            flags.insert(0, "VMS_ARRAY")
        elif f.kind == "bytes" and dims:
            kw["elem_size"] = str(dims[0])
        if f.since:
            kw["since"] = str(f.since)
        if f.exists is not None:
            kw["test"] = repr(f.exists.method if isinstance(f.exists, ast.Custom) else self.has_method(f))
        if f.kind == "scalar" and not dims and "count_attr" not in kw:
            flags.insert(0, "VMS_SINGLE")
        if flags:
            kw["flags"] = repr(tuple(flags))
        return f"_schema.FieldSpec({', '.join(args + [f'{k}={v}' for k, v in kw.items()])})"


def _writes_out(save: list[str]) -> bool:
    """Whether save statements append to ``out`` (the writer's buffer, then fetched first)."""
    return any(line.lstrip().startswith("out +=") for line in save)


def _take(size: int) -> list[str]:
    """``buf, p = r.take(size)`` with the common case (bytes already buffered) inline: no call."""
    return [
        "buf, p = r.buf, r.pos",
        f"if p + {size} <= len(buf):",
        f"    r.pos = p + {size}",
        "else:",
        f"    buf, p = r.take({size})",
    ]


def _subsections_load(parent: str, top: bool) -> list[str]:
    """The subsection loop, entered only when a subsection may follow (the next
    byte is QEMU_VM_SUBSECTION or not read yet) or the object keeps track of
    the subsections it was loaded with."""
    return [
        "buf, p = r.buf, r.pos",
        f"if (buf[p] == {QEMU_VM_SUBSECTION} if p < len(buf) else not r.eof) or self._TRACKED:",
        f"    _rt.load_subsections(self, r, {parent.encode()!r}, {top}, self._SUBSECTIONS[{parent!r}])",
    ]


def _len_check(value: str, n: str, name: str | None) -> list[str]:
    """The length test inline, the call (which words the error) only when it fails."""
    check = "check_fixed_len" if n.isdigit() else "check_len"  # a literal count is the spec's, not a field's
    return [f"if len({value}) != {n}:", f"    _rt.{check}({value}, {n}, {name!r})"]


def _truth(e: ast.Expr, src: str) -> str:
    """``src`` as a bool, without a redundant ``bool()`` around comparisons."""
    if (isinstance(e, ast.BinOp) and e.op in _BOOL_OPS) or (isinstance(e, ast.UnOp) and e.op == "!"):
        return src
    return f"bool({src})"


def _wire_base(f: ast.Field) -> str:
    """The name QEMU's JSON gives ``f``, before numbering."""
    if f.wire_name is not None and f.kind != "validate":
        return f.wire_name
    if f.kind == "unused":
        return "unused"
    if f.kind == "validate":
        return f.wire_name or "validate"
    return f.name or ""


def _qemu_names(fields: tuple[ast.Field, ...]) -> dict[int, str]:
    """QEMU numbers repeated field names ``name[0]``, ``name[1]`` in its JSON: the numbered names, by id
    of field, of those whose name repeats (the others' is their :func:`_wire_base`)."""
    totals = collections.Counter(_wire_base(f) for f in fields)
    repeated = {name for name, n in totals.items() if n > 1}
    del totals
    seen: dict[str, int] = {}
    out: dict[int, str] = {}
    for f in fields:
        name = _wire_base(f)
        if name in repeated:
            out[id(f)] = f"{name}[{seen.get(name, 0)}]"
            seen[name] = seen.get(name, 0) + 1
    return out


def _counter(d: ast.Expr) -> tuple[str, int]:
    if isinstance(d, ast.Ref):
        return d.parts[0], 1
    assert isinstance(d, ast.BinOp)
    if isinstance(d.left, ast.Ref):
        assert isinstance(d.right, ast.IntLit)
        return d.left.parts[0], d.right.value
    assert isinstance(d.right, ast.Ref) and isinstance(d.left, ast.IntLit)
    return d.right.parts[0], d.left.value


def _custom_counts(v: ast.Vmsd) -> list[str]:
    """The properties ``v``'s struct arrays take their lengths from (``devs[custom(dev_count)]``)."""
    names: list[str] = []
    for f, _ in walk_fields(v.fields, v.subsections):
        d = f.dims[0] if f.dims else None
        if isinstance(d, ast.LenCall) and d.function == "custom" and d.ref.parts[0] not in names:
            names.append(d.ref.parts[0])
    return names


def _never_present(f: ast.Field) -> bool:
    """Whether ``f``'s condition is the constant ``0`` (``if (0)``)."""
    return isinstance(f.exists, ast.IntLit) and f.exists.value == 0


def _int_dim(d: ast.Expr) -> int:
    assert isinstance(d, ast.IntLit)
    return d.value


def _scalar_default(f: ast.Field) -> str:
    py_type = BY_NAME[f.type].py_type
    if py_type == "bool":
        return "True" if f.default else "False"
    if py_type == "float":
        return repr(float(f.default)) if f.default is not None else "0.0"
    return str(int(f.default)) if f.default is not None else "0"
