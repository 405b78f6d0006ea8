"""Hostile names and strings in every place a spec can hold them.

Each case puts one name (or quoted string) into one construct: a vmsd name, a class name, an enum, an enum
member, a field (in every role a field plays in generated code), a custom predicate, a subsection, a wire
name, a validation label, an ``info`` string, a doc comment, an imported file's name, a float default.
Every case ends in one of two ways:

- ``vmsd check`` (for two files that would be one module, ``vmsd compile``) rejects it with located
  diagnostics (``file:line:col: error: ...``, the source line and a caret), pointing at the line that
  holds the name; or
- the generated module imports, passes ``mypy --strict`` and round-trips ``load(save(x)) == x``.

Fields keep their QEMU name on the wire, so every field name the grammar takes must be accepted (its
Python attribute mangled); the other constructs may be rejected.  Strings carry payloads that would
create a file if any of them ran; none may.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest
from mypy import api as mypy_api

from vmsd.codegen.compiler import compile_specs
from vmsd.grammar import pynames
from vmsd.grammar.diagnostics import SpecError
from vmsd.grammar.loader import load
from vmsd.grammar.parser import parse
from vmsd.grammar.semantic import check
from vmsd.runtime.errors import SaveError
from vmsd.runtime.vmstate import VMStateObject

ROOT = Path(__file__).resolve().parent.parent
PWNED = "PWNED"  # created in the runner's working directory if anything from a spec runs

# Names that Python, the generated module, its base class, attrs, enum or the spec's own declarations use.
IDENTIFIERS = [
    "self", "cls", "None", "True", "class", "def", "lambda", "match", "case", "type", "_",
    "object", "int", "float", "bool", "bytes", "list", "tuple", "range", "len", "isinstance", "classmethod",
    "staticmethod", "NotImplemented", "print", "attrs", "struct", "enum", "abc", "Reader", "Writer",
    "ClassVar", "Self", "Any", "Sequence", "Iterator", "_rt", "_schema", "_S0", "__init__", "load", "save",
    "load_into", "pre_load", "post_save", "VMSD", "VMSD_NAME", "VERSION_ID", "name", "value", "mro", "real",
    "to_bytes", "Mode", "Inner", "r", "w", "buf", "p", "out", "other", "version_id", "self_",
]
RUN = f'__import__("pathlib").Path("{PWNED}").touch()'
# Quoted strings: payloads for every kind of string literal, escapes, control characters, odd lengths.
STRINGS = [
    f'x"""; {RUN}; """',
    f"x'); {RUN}; ('",
    f'x"); {RUN}; ("',
    "{" + RUN + "}",
    "\\", "'", '"', "\\N{BULLET} \\x41", "%s %(x)s {0}", "é ü 中", "\u2028", "\x00", "\n", "\r", "\x7f",
    "", "a" * 300,
]


def spec_string(text: str) -> str:
    """``text`` as a quoted spec string (the grammar's escapes are Python's)."""
    out = []
    for c in text:
        if c in '\\"':
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return '"' + "".join(out) + '"'


@attrs.frozen
class Case:
    id: str
    construct: str
    value: str
    files: dict[str, str]  # file name -> text; the first is the one checked
    must_accept: bool


def _field_roles(n: str) -> str:
    """One field named ``n`` in each role a field plays in generated code."""
    return textwrap.dedent(f"""\
        enum Mode : uint8 {{ OFF = 0  ON = 1 }}
        vmsd inner version 1 minimum 1 class Inner {{ uint8 {n} = 1 }}
        vmsd outer version 2 minimum 1 class Outer {{
            uint32 {n}
            uint8 arr[{n}]
            uint8 c if ({n} > 0)
            validate "v" ({n} >= 0)
            struct inner s
            uint8 d if (s.{n} >= 0 && len(arr) >= 0)
            subsection "outer/sub" version 1 needed ({n} != 0) {{ uint8 e }}
        }}
        vmsd fused version 2 minimum 1 class Fused {{ uint8 a  uint16 {n}  uint8 b since 2 }}
        vmsd grid version 2 minimum 1 class Grid {{ uint16 {n}[2][3] if (version >= 1) }}
        vmsd checked version 1 minimum 1 class Checked {{ uint8 {n} : Mode equal }}
        vmsd opt version 2 minimum 1 class Opt {{ struct inner {n} since 2 }}
        vmsd sub version 1 minimum 1 class Sub {{
            uint8 a = 1
            subsection "sub/s" version 1 needed (a != 0) {{ uint8 {n}[2]  struct inner {n}_s[2]  uint8 t = 2 }}
        }}
        vmsd blob version 1 minimum 1 class Blob {{ uint32 {n}  bytes b[{n}] }}
        vmsd buf version 1 minimum 1 class Buf {{ bytes {n}[4] }}
        vmsd lst version 1 minimum 1 class Lst {{ list<inner> {n} }}
        vmsd tree version 1 minimum 1 class Tree {{ map<uint32, inner> {n} }}
        vmsd bits version 1 minimum 1 class Bits {{ uint32 n = 8  bitmap {n}[n] }}
        vmsd flt version 1 minimum 1 class Flt {{ float64 {n} = 1.5  bool z = true }}
        vmsd slots version 1 minimum 1 class Slots {{ struct inner? {n}[2] }}
        vmsd fds version 1 minimum 1 class Fds {{ fd {n} }}
        """)


def _grammar_takes_as_field_name(n: str) -> bool:
    try:
        parse(f"vmsd x version 1 minimum 1 {{ uint8 {n} }}", "probe.vmsd")
    except SpecError:
        return False
    return True


def _cases() -> list[Case]:
    cases: list[Case] = []

    def add(construct: str, value: str, files: dict[str, str], must_accept: bool = False) -> None:
        cases.append(Case(f"{construct}-{len(cases)}", construct, value, files, must_accept))

    for n in IDENTIFIERS:
        # A field keeps its QEMU name: whatever the grammar reads as a name must work.
        add("field", n, {"spec.vmsd": _field_roles(n)}, must_accept=_grammar_takes_as_field_name(n) and not n.startswith("_"))
        add("vmsd", n, {"spec.vmsd": f"vmsd {n} version 1 minimum 1 {{ uint8 a }}\n"
                                    f"vmsd user version 1 minimum 1 class User {{ struct {n} f  list<{n}> l }}\n"})
        add("class", n, {"spec.vmsd": f"vmsd x version 1 minimum 1 class {n} {{ uint8 a }}\n"
                                     f"vmsd user version 1 minimum 1 class User {{ struct x f  map<x, x> m }}\n"})
        add("enum", n, {"spec.vmsd": f"enum {n} : uint8 flags {{ A = 1 }}\n"
                                    f"vmsd x version 1 minimum 1 class X {{ uint8 m : {n} = 1  uint8 l[2] : {n} }}\n"})
        add("member", n, {"spec.vmsd": f"enum Mode : uint8 {{\n    OFF = 0\n    {n} = 1\n}}\n"
                                      "vmsd x version 1 minimum 1 class X { uint8 m : Mode = 1 }\n"})
        add("custom", n, {"spec.vmsd": f"vmsd x version 1 minimum 1 class X {{\n    uint8 a if custom({n})\n"
                                      f"    subsection \"x/s\" version 1 needed custom({n}) {{ uint8 b }}\n}}\n"})
        add("file", n, {"spec.vmsd": f'import "{n}.vmsd"\nvmsd user version 1 minimum 1 class User {{ struct imported f }}\n',
                        f"{n}.vmsd": "vmsd imported version 1 minimum 1 class Imported { uint8 a }\n"})
    for s in STRINGS:
        printable = s.isprintable() and s != ""
        q = spec_string(s)
        add("vmsd-quoted", s, {"spec.vmsd": f"vmsd {q} version 1 minimum 1 {{ uint8 a }}\n"
                                            f"vmsd user version 1 minimum 1 class User {{ struct {q} f }}\n"})
        add("subsection", s, {"spec.vmsd": "vmsd x version 1 minimum 1 class X {\n    uint8 a = 1\n"
                                           f"    subsection {spec_string('x/' + s)} version 1 needed (a != 0) {{ uint8 b }}\n}}\n"},
            must_accept=printable and len(s.encode()) < 250)
        add("wire", s, {"spec.vmsd": f"vmsd x version 1 minimum 1 class X {{ uint8 a as {q}  uint8 b[2] as {q} }}\n"},
            must_accept=printable)
        add("validate", s, {"spec.vmsd": f"vmsd x version 1 minimum 1 class X {{ uint8 a = 1  validate {q} (a != 0) }}\n"},
            must_accept=printable)
        add("info", s, {"spec.vmsd": f"vmsd x version 1 minimum 1 class X {{ bytes a[4] info {q} }}\n"},
            must_accept=printable)
        if "\n" not in s and "\r" not in s and "\u2028" not in s:
            doc = f"## {s}\n"
            add("doc", s, {"spec.vmsd": f"{doc}enum Mode : uint8 {{\n    {doc}    ON = 1\n}}\n"
                                        f"{doc}vmsd x version 1 minimum 1 {{\n    {doc}    uint8 m : Mode\n}}\n"},
                must_accept=True)
    for lit in ["1.0e400", "-1.0e309", "9" * 5000 + ".0", "1.0e-400", "0.1", "1_000.0_5"]:
        add("default", lit, {"spec.vmsd": f"vmsd x version 1 minimum 1 class X {{ float64 f = {lit} }}\n"})
    for s in ["class", "None", "import", "__init__", "1x", "a b", "a-b", "é", "_rt", "attrs", "struct", "x'y"]:
        add("file", s, {"spec.vmsd": f"import {spec_string(s + '.vmsd')}\n"
                                     "vmsd user version 1 minimum 1 class User { struct imported f }\n",
                        f"{s}.vmsd": "vmsd imported version 1 minimum 1 class Imported { uint8 a }\n"})
    # Two files that would be one module.
    add("file", "a-b", {"spec.vmsd": 'import "a-b.vmsd"\nimport "a_b.vmsd"\n'
                                     "vmsd user version 1 minimum 1 class User { struct imported f  struct other g }\n",
                        "a-b.vmsd": "vmsd imported version 1 minimum 1 class Imported { uint8 a }\n",
                        "a_b.vmsd": "vmsd other version 1 minimum 1 class Other { uint8 a }\n"})
    return cases


CASES = _cases()
DIAGNOSTIC = re.compile(r"^(?P<path>[^\n]+?):(?P<line>\d+):(?P<col>\d+): error: (?P<msg>[^\n]+)\n    (?P<text>[^\n]*)\n    (?P<caret> *\^)$",
                        re.MULTILINE)


@attrs.define
class Outcome:
    case: Case
    package: str
    modules: list[str] = attrs.Factory(list)
    error: str | None = None  # vmsd check's output when it refused the case
    broken: str | None = None  # a generated module that does not compile (mypy would stop at it)


def _check_and_compile(case: Case, base: Path) -> Outcome:
    folder = base / "specs" / case.id
    folder.mkdir(parents=True)
    for name, text in case.files.items():
        (folder / name).write_text(text, encoding="utf-8")
    package = f"gen.{case.id.replace('-', '_')}"
    out = Outcome(case, package)
    spec = folder / next(iter(case.files))
    try:
        check(load([spec]))
        generated = compile_specs([spec], str(folder))
    except SpecError as exc:
        out.error = exc.render()
        return out
    target = base / Path(*package.split("."))
    for rel, text in generated.items():
        try:
            compile(text, str(rel), "exec")
        except (SyntaxError, ValueError) as exc:
            out.broken = f"{rel}: {exc!r}"
            return out
    for rel, text in generated.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        if rel.name != "__init__.py":
            out.modules.append(".".join([package, *rel.with_suffix("").parts]))
    (target / "__init__.py").touch()
    return out


RUNNER = """
import importlib, json, sys, traceback
from vmsd.runtime.vmstate import VMStateObject

def concrete(cls):
    # Custom predicates are abstract: a subclass answers True to each.
    if not getattr(cls, "__abstractmethods__", None):
        return cls
    return type(cls.__name__, (cls,), {m: (lambda self, version_id: True) for m in cls.__abstractmethods__})

results = {}
for package, modules in json.loads(sys.argv[1]).items():
    try:
        for name in modules:
            mod = importlib.import_module(name)
            for obj in list(vars(mod).values()):
                if isinstance(obj, type) and issubclass(obj, VMStateObject) and obj.__module__ == name:
                    cls = concrete(obj)
                    # A default object is saved as its loaded form is (absent conditional fields load as None).
                    wire = cls().save()
                    x = cls.load(wire)
                    assert x.save() == wire and cls.load(wire) == x, f"{cls.__name__} does not round-trip"
        results[package] = None
    except BaseException:
        results[package] = traceback.format_exc()
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Outcome]]:
    base = tmp_path_factory.mktemp("names")
    (base / "gen").mkdir()
    (base / "gen" / "__init__.py").touch()
    return base, {c.id: _check_and_compile(c, base) for c in CASES}


@pytest.fixture(scope="module")
def runs(outcomes: tuple[Path, dict[str, Outcome]]) -> dict[str, str | None]:
    base, found = outcomes
    todo = {o.package: o.modules for o in found.values() if o.modules}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(todo)], cwd=base, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(base), str(ROOT / "src")])},
    )
    assert done.returncode == 0, done.stderr
    assert not (base / PWNED).exists(), "a spec's text ran when its module was imported"
    results: dict[str, str | None] = json.loads(done.stdout)
    return results


@pytest.fixture(scope="module")
def mypy_errors(outcomes: tuple[Path, dict[str, Outcome]]) -> dict[str, list[str]]:
    base, _ = outcomes
    config = base / "mypy.ini"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]["python_version"]
    config.write_text(f"[mypy]\nstrict = True\npython_version = {version}\nmypy_path = {ROOT / 'src'}\n"
                      f"cache_dir = {base / 'mypy_cache'}\n", encoding="utf-8")
    stdout, stderr, status = mypy_api.run(["--config-file", str(config), "--no-error-summary", "--hide-error-context",
                                           "--no-pretty", "--no-color-output", "--show-error-codes", str(base / "gen")])
    assert status in (0, 1) and not stderr, stderr
    by_package: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        rel = Path(line.split(":", 1)[0]).resolve().relative_to(base)
        by_package.setdefault(".".join(rel.parts[:2]), []).append(line)
    return by_package


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_name(case: Case, outcomes: tuple[Path, dict[str, Outcome]], runs: dict[str, str | None],
                      mypy_errors: dict[str, list[str]]) -> None:
    _, found = outcomes
    out = found[case.id]
    if out.error is not None:
        assert not case.must_accept, f"{case.construct} {case.value!r} must be accepted:\n{out.error}"
        diags = list(DIAGNOSTIC.finditer(out.error))
        assert diags and len("".join(d[0] for d in diags)) + len(diags) - 1 == len(out.error), out.error
        if case.construct != "file" and case.value.isidentifier():
            assert any(re.search(rf"\b{re.escape(case.value)}\b", d["text"]) for d in diags), out.error
        return
    assert out.broken is None, out.broken
    assert out.modules
    assert runs[out.package] is None, runs[out.package]
    assert not mypy_errors.get(out.package), "\n".join(mypy_errors[out.package])


# -- the reserved names are the ones generated code uses ----------------------------------------------

KITCHEN_SINK = _field_roles("k") + textwrap.dedent("""\
    enum Irq : uint8 flags { A = 1  B = 2 }
    vmsd hooks version 1 minimum 1 class Hooks {
        uint8 a : Irq
        uint8 ea[a] : Irq
        uint8 eg[2][2] : Irq
        uint8 b if custom(has_b)
        unused 2 if (a != 0)
        subsection "hooks/x" version 1 needed custom(has_x) { uint8 c }
    }
    """)


@attrs.define
class _Uses:
    """What generated modules bind and read, by where (see _scan)."""

    imported: set[str] = attrs.Factory(set)  # imported at top level, not from a sibling generated module
    module_attrs: set[str] = attrs.Factory(set)  # ``Class.NAME = ...`` after the classes
    class_attrs: set[str] = attrs.Factory(set)  # bound in a class body, besides fields and custom predicates
    locals: set[str] = attrs.Factory(set)  # parameters and variables of functions, besides __init__'s fields
    class_reads: set[str] = attrs.Factory(set)  # names read in class bodies (with signatures) and __init__
    reads: set[str] = attrs.Factory(set)  # names read anywhere


def _scan(source: str, uses: _Uses) -> None:
    tree = ast.parse(source)

    def reads(node: ast.AST, into: set[str]) -> None:
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                into.add(n.id)
            elif isinstance(n, ast.arg):
                uses.locals.add(n.arg)
            elif isinstance(n, ast.Name):
                uses.locals.add(n.id)
            elif isinstance(n, ast.ExceptHandler) and n.name:
                uses.locals.add(n.name)

    for stmt in tree.body:
        if isinstance(stmt, ast.Import):
            uses.imported.update(a.asname or a.name for a in stmt.names)
        elif isinstance(stmt, ast.ImportFrom) and stmt.level == 0 and stmt.module != "__future__":
            uses.imported.update(a.asname or a.name for a in stmt.names)
        elif isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Attribute):
            uses.module_attrs.add(stmt.targets[0].attr)
            reads(stmt.value, uses.reads)
        elif isinstance(stmt, ast.ClassDef):
            init = next((s for s in stmt.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
            fields = {a.arg for a in init.args.kwonlyargs} if init else set()
            for deco in stmt.decorator_list:
                reads(deco, uses.class_reads)
            for s in stmt.body:
                if isinstance(s, ast.FunctionDef):
                    abstract = any("abstractmethod" in ast.unparse(d) for d in s.decorator_list)
                    if not abstract:
                        uses.class_attrs.add(s.name)
                    for part in [*s.decorator_list, *s.args.defaults, *s.args.kw_defaults, s.returns,
                                 *(a.annotation for a in [*s.args.args, *s.args.kwonlyargs])]:
                        if part is not None:
                            reads(part, uses.class_reads)
                    body_reads: set[str] = set()
                    for b in s.body:
                        reads(b, body_reads)
                    uses.reads.update(body_reads - fields if s is init else body_reads)
                    if s is init:
                        uses.class_reads.update(body_reads - fields)
                    uses.locals.update(a.arg for a in s.args.args)
                    if s is not init:
                        uses.locals.update(a.arg for a in s.args.kwonlyargs)
                elif isinstance(s, ast.AnnAssign | ast.Assign):
                    targets = [s.target] if isinstance(s, ast.AnnAssign) else s.targets
                    names = {t.id for t in targets if isinstance(t, ast.Name)}
                    if not names & fields and stmt.bases and "VMStateObject" in ast.unparse(stmt.bases[0]):
                        uses.class_attrs.update(names)
                    for part in [getattr(s, "annotation", None), s.value]:
                        if part is not None:
                            reads(part, uses.class_reads)
        elif isinstance(stmt, ast.Expr | ast.Assign):
            reads(stmt, uses.reads)
    uses.reads.update(uses.class_reads)
    uses.locals.difference_update(n for n in list(uses.locals) if n.startswith("_"))


def test_reserved_names_are_what_generated_code_uses(tmp_path: Path) -> None:
    """The lists of vmsd.grammar.pynames are exactly what generated modules import, read and bind: the shipped
    modules, the typing cases' and a spec with every construct (a name used by the templates but missing from
    the lists would let a spec shadow it; a name listed but no longer used would refuse good specs)."""
    spec = tmp_path / "sink.vmsd"
    spec.write_text(KITCHEN_SINK, encoding="utf-8")
    sources = [p.read_text() for p in (ROOT / "src" / "vmsd" / "generated").rglob("*.py") if p.name != "__init__.py"]
    sources += compile_specs([spec]).values()
    sources += compile_specs(sorted((ROOT / "tests" / "typing_cases").glob("*.vmsd"))).values()
    uses = _Uses()
    for source in sources:
        _scan(source, uses)
    builtin = set(dir(builtins))
    assert uses.imported == pynames.IMPORTED | {"_schema", "_rt"}
    assert {n for n in uses.class_reads if n in builtin} == pynames.CLASS_BUILTINS
    assert {n for n in uses.reads if n in builtin} == pynames.CLASS_BUILTINS | pynames.METHOD_BUILTINS
    assert uses.locals == pynames.LOCALS
    public = {n for n in uses.class_attrs | uses.module_attrs if not n.startswith("_")}
    assert public | {n for n in dir(VMStateObject) if not n.startswith("_")} == pynames.CLASS_API


# -- what the rules promise ---------------------------------------------------------------------------

def _compiled(tmp_path: Path, text: str) -> dict[str, Any]:
    """The namespace of the module generated from one spec file."""
    spec = tmp_path / "dev.vmsd"
    spec.write_text(text, encoding="utf-8")
    (source,) = compile_specs([spec]).values()
    namespace: dict[str, Any] = {}
    exec(compile(source, str(spec), "exec"), namespace)
    return namespace


def test_fields_python_needs_keep_their_wire_name(tmp_path: Path) -> None:
    """A field named like a keyword, a builtin, the class's API or a class of the module is the attribute with a
    trailing underscore; the wire, QEMU's JSON description and error paths keep the name."""
    from vmsd.runtime.vmdesc import describe

    ns = _compiled(tmp_path, textwrap.dedent("""\
        vmsd dev version 1 minimum 1 class Dev {
            uint8 self = 1
            uint32 int = 2
            uint8 load[int]
            uint8 lambda if (self != 0 && len(load) == int)
            struct dev_inner Dev
        }
        vmsd dev_inner version 1 minimum 1 class DevInner { uint8 x }
        """))
    dev = ns["Dev"](self_=7, int_=3, load_=[1, 2, 3], lambda_=9)
    wire = dev.save()
    assert wire == bytes([7, 0, 0, 0, 3, 1, 2, 3, 9, 0])
    back = ns["Dev"].load(wire)
    assert back == dev and (back.self_, back.int_, back.load_, back.lambda_) == (7, 3, [1, 2, 3], 9)
    assert isinstance(back.Dev_, ns["DevInner"])
    fields = dict(describe(dev)[0])["fields"]
    assert [dict(f)["name"] for f in fields] == ["self", "int", "load", "lambda", "Dev"]
    with pytest.raises(SaveError) as info:
        ns["Dev"](int_=2, load_=[1]).save()
    assert str(info.value) == "dev.load: has 1 element, its length field int says 2"


def test_subsections_named_alike_keep_their_own_loaders(tmp_path: Path) -> None:
    """Subsections whose names end alike ("dev/a", "dev/A", "dev/x/b", "dev/y/b") used to share a generated
    method name: the last one's loader read every one of them."""
    ns = _compiled(tmp_path, textwrap.dedent("""\
        vmsd dev version 1 minimum 1 class Dev {
            uint8 n
            subsection "dev/a" version 1 needed (n & 1) { uint8 a1 }
            subsection "dev/A" version 1 needed (n & 2) { uint16 a2 }
            subsection "dev/x" version 1 needed (n & 4) { subsection "dev/x/b" version 1 needed (n & 8) { uint8 b1 } }
            subsection "dev/y" version 1 needed (n & 4) { subsection "dev/y/b" version 1 needed (n & 8) { uint32 b2 } }
        }
        """))
    dev = ns["Dev"]
    for n in range(16):
        obj = dev(n=n, a1=0x11, a2=0x2222, b1=0x33, b2=0x44444444)
        back = dev.load(obj.save())
        assert back.save() == obj.save()
        present = {"a1": n & 1, "a2": n & 2, "b1": n & 12 == 12, "b2": n & 12 == 12}
        for name, here in present.items():
            assert getattr(back, name) == (getattr(obj, name) if here else 0), (n, name)


def test_conditional_unused_fields_keep_their_own_conditions(tmp_path: Path) -> None:
    """Two ``unused N if (...)`` used to share one predicate method: the second condition decided both."""
    dev = _compiled(tmp_path, "vmsd dev version 1 minimum 1 class Dev { uint8 a  unused 1 if (a == 1)  unused 2 if (a == 2) }")["Dev"]
    assert [len(dev(a=a).save()) for a in (0, 1, 2)] == [1, 2, 3]
    assert dev.load(b"\x01\x00") == dev(a=1)


def test_validation_label_is_text_in_the_error(tmp_path: Path) -> None:
    label = "it's \"odd\" {a} \\x00 %s"
    dev = _compiled(tmp_path, f"vmsd dev version 1 minimum 1 class Dev {{ uint8 a = 1  validate {spec_string(label)} (a != 0) }}")["Dev"]
    with pytest.raises(SaveError) as caught:
        dev(a=0).save()
    assert caught.value.args[0] == f"validation {label} fails for this state"


@pytest.mark.parametrize("raw", ["\x00", "\x1b[2J", "\x07"])
def test_raw_control_characters(tmp_path: Path, raw: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Written raw (not as an escape) inside a quoted string, a NUL is a located error rather than a traceback
    from Python's parser, and the error shows it as an escape; other control characters, and any in a doc
    comment, stay text.  A form feed in a comment does not shift the line the error shows."""
    from vmsd.cli import EXIT_FINDINGS, main

    spec = tmp_path / "dev.vmsd"
    spec.write_text(f'# \x0c\n## doc {raw}\nvmsd dev version 1 minimum 1 class Dev {{\n    uint8 a as "a{raw}b"\n}}\n',
                    encoding="utf-8")
    code = main(["check", str(spec)])
    err = capsys.readouterr().err
    if raw == "\x00":
        assert code == EXIT_FINDINGS
        assert err == (f"{spec}:4:16: error: a NUL character in a string; write \\x00\n"
                       '        uint8 a as "a\\x00b"\n'
                       "                   ^\n")
        return
    assert code == 0, err
    dev = _compiled(tmp_path, spec.read_text(encoding="utf-8"))["Dev"]
    assert dev.__doc__ == f"doc {raw}" and dev.VMSD.fields[0].name == f"a{raw}b"


def test_the_language_reference_lists_the_reserved_names() -> None:
    """docs/spec-names.md lists each set of vmsd.grammar.pynames exactly."""
    doc = " ".join((ROOT / "docs" / "spec-names.md").read_text(encoding="utf-8").split())
    lists = {
        "Imported by every generated module:": pynames.IMPORTED,
        "Builtins read in class bodies and `__init__`:": pynames.CLASS_BUILTINS,
        "Builtins read in methods:": pynames.METHOD_BUILTINS,
        "Variables of generated functions:": pynames.LOCALS,
        "Attributes of every generated class:": pynames.CLASS_API,
    }
    for label, names in lists.items():
        listed = doc.split(f"**{label}**", 1)[1].split(".", 1)[0]
        assert set(re.findall(r"`([^`]+)`", listed)) == names, label


def test_a_module_cannot_also_be_a_package(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a.vmsd").write_text("vmsd one version 1 minimum 1 { uint8 x }\n")
    (tmp_path / "a" / "b.vmsd").write_text("vmsd two version 1 minimum 1 { uint8 x }\n")
    with pytest.raises(SpecError) as caught:
        compile_specs([tmp_path / "a.vmsd", tmp_path / "a" / "b.vmsd"], str(tmp_path))
    assert caught.value.render().startswith(f"{tmp_path / 'a.vmsd'}:1:1: error: this file would be module 'a', which is also the package")
