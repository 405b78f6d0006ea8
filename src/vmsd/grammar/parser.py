"""Parse .vmsd text into the frozen AST (Lark LALR, positions kept)."""

from __future__ import annotations

import ast as pyast
import functools
import warnings
from importlib import resources
from typing import Any

import attrs
import lark
from lark import Token, Transformer, v_args

from vmsd.grammar import ast
from vmsd.grammar.diagnostics import Diagnostic, SpecError

_READABLE = {
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "STRING": "a quoted string",
    "SCALAR_TYPE": "a scalar type",
    "DOC": "a doc comment",
    "BOOL": "true or false",
    "$END": "end of file",
    "CHECK": "'equal' or 'le'",
    "LIST_KIND": "'list' or 'qlist'",
    "FLAGS": "'flags'",
    "TMP": "'tmp'",
    "ADD_OP": "'+' or '-'",
    "MUL_OP": "'*', '/' or '%'",
    "EQ_OP": "'==' or '!='",
    "REL_OP": "a comparison",
    "SHIFT_OP": "'<<' or '>>'",
    "UNARY_OP": "'!', '~' or '-'",
}


@functools.cache
def _parser() -> lark.Lark:
    text = resources.files("vmsd.grammar").joinpath("vmsd.lark").read_text(encoding="utf-8")
    return lark.Lark(text, parser="lalr", propagate_positions=True, maybe_placeholders=False)


def _describe_terminal(name: str) -> str:
    if name in _READABLE:
        return _READABLE[name]
    try:
        pattern = _parser().get_terminal(name).pattern
    except KeyError:
        return name
    if isinstance(pattern, lark.lexer.PatternStr):
        return f"'{pattern.value}'"
    return name.lower()


def _int(text: str) -> int:
    digits = text.replace("_", "")
    return int(digits, 0) if digits[:2].lower() in ("0x", "0b") else int(digits, 10)


class _BadString(Exception):
    """A quoted string whose escapes Python cannot decode (reported by parse with its position)."""

    def __init__(self, tok: Token, reason: str) -> None:
        super().__init__(reason)
        self.tok = tok
        self.reason = reason


def _string(tok: Token) -> str:
    text = str(tok)
    if "\0" in text:
        raise _BadString(tok, "a NUL character in a string; write \\x00")
    try:
        # An unknown escape such as \q is a warning in Python; here it is an error on every version.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            value = pyast.literal_eval(text)
    except SyntaxError as exc:
        raise _BadString(tok, f"cannot read this string: {str(exc.msg).removeprefix('(unicode error) ')}") from None
    assert isinstance(value, str)
    return value


class _ToAst(Transformer[Token, Any]):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def _pos(self, item: Any) -> ast.Pos:
        line = getattr(item, "line", None)
        col = getattr(item, "column", None)
        return ast.Pos(self.path, line or 1, col or 1)

    # -- top level --------------------------------------------------------
    def start(self, items: list[Any]) -> list[Any]:
        return _attach_docs(items)

    @v_args(meta=True)
    def import_decl(self, meta: Any, items: list[Token]) -> ast.Import:
        return ast.Import(_string(items[0]), self._pos(meta))

    @v_args(meta=True)
    def enum_decl(self, meta: Any, items: list[Any]) -> ast.Enum:
        name, base, *rest = items
        flags = bool(rest and isinstance(rest[0], Token) and rest[0].type == "FLAGS")
        members = [m for m in rest if isinstance(m, ast.EnumMember)]
        return ast.Enum(str(name), str(base), flags, tuple(members), self._pos(name))

    @v_args(meta=True)
    def enum_member(self, meta: Any, items: list[Any]) -> ast.EnumMember:
        docs = [str(t)[2:].strip() for t in items if isinstance(t, Token) and t.type == "DOC"]
        name = next(t for t in items if isinstance(t, Token) and t.type == "NAME")
        return ast.EnumMember(str(name), items[-1], self._pos(name), "\n".join(docs) or None)

    def class_clause(self, items: list[Token]) -> _ClassClause:
        return _ClassClause(str(items[0]), self._pos(items[0]))

    @v_args(meta=True)
    def vmsd_decl(self, meta: Any, items: list[Any]) -> ast.Vmsd:
        name_tok, version, minimum, *rest = items
        clause = rest[0] if rest and isinstance(rest[0], _ClassClause) else None
        members = _attach_docs(rest[1:] if clause is not None else rest)
        fields = tuple(m for m in members if isinstance(m, ast.Field))
        subs = tuple(m for m in members if isinstance(m, ast.Subsection))
        return ast.Vmsd(
            _name(name_tok), _int(version), _int(minimum), clause.name if clause else None, fields, subs,
            self._pos(name_tok), self._pos(version), self._pos(minimum), class_pos=clause.pos if clause else None,
        )

    @v_args(meta=True)
    def subsection(self, meta: Any, items: list[Any]) -> ast.Subsection:
        name_tok, version, *rest = items
        minimum = _int(rest.pop(0)) if rest and isinstance(rest[0], Token) and rest[0].type == "INT" else min(1, _int(version))
        needed = rest.pop(0) if rest and isinstance(rest[0], _Needed) else None
        members = _attach_docs(rest)
        return ast.Subsection(
            _string(name_tok), _int(version), minimum, needed.cond if needed else None,
            tuple(m for m in members if isinstance(m, ast.Field)),
            tuple(m for m in members if isinstance(m, ast.Subsection)),
            self._pos(name_tok),
        )

    def needed(self, items: list[Any]) -> _Needed:
        return _Needed(items[0])

    # -- fields -------------------------------------------------------------
    def _field(self, kind: str, name: Token | None, pos_tok: Any, items: list[Any], **kw: Any) -> ast.Field:
        for it in items:
            if isinstance(it, _Clause):
                kw.update(it.values)
        return ast.Field(kind, str(name) if name is not None else None, self._pos(pos_tok), **kw)

    def scalar_field(self, items: list[Any]) -> ast.Field:
        typ, name, dims, *rest = items
        return self._field("scalar", name, name, rest, type=str(typ), dims=dims)

    def bytes_field(self, items: list[Any]) -> ast.Field:
        name, length, *rest = items
        return self._field("bytes", name, name, rest, dims=(length,))

    def unused_field(self, items: list[Any]) -> ast.Field:
        size, *rest = items
        return self._field("unused", None, size, rest, size=_int(size))

    def struct_field(self, items: list[Any]) -> ast.Field:
        typ, *rest = items
        nullable = bool(rest and isinstance(rest[0], Token) and rest[0].type == "NULLABLE")
        if nullable:
            rest = rest[1:]
        name, dims, *rest = rest
        return self._field("struct", name, name, rest, type=_name(typ), dims=dims, nullable=nullable)

    def bitmap_field(self, items: list[Any]) -> ast.Field:
        name, length, *rest = items
        return self._field("bitmap", name, name, rest, dims=(length,))

    def list_field(self, items: list[Any]) -> ast.Field:
        kind, typ, name, *rest = items
        return self._field("list", name, name, rest, type=_name(typ), list_kind=str(kind))

    def map_field(self, items: list[Any]) -> ast.Field:
        key, typ, name, *rest = items
        return self._field("map", name, name, rest, type=_name(typ), key=_name(key))

    def opaque_field(self, items: list[Any]) -> ast.Field:
        info, name, *rest = items
        return self._field("opaque", name, name, rest, info=_string(info))

    @v_args(meta=True)
    def validate_field(self, meta: Any, items: list[Any]) -> ast.Field:
        label, expr = items
        return ast.Field("validate", None, self._pos(label), wire_name=_string(label), expr=expr)

    def dims(self, items: list[Any]) -> tuple[ast.Expr, ...]:
        return tuple(items)

    def length(self, items: list[Any]) -> ast.Expr:
        return items[0]  # type: ignore[no-any-return]

    def wire_name(self, items: list[Token]) -> _Clause:
        return _Clause(wire_name=_string(items[0]))

    def enum_ref(self, items: list[Token]) -> _Clause:
        return _Clause(enum=str(items[0]), enum_pos=self._pos(items[0]))

    @v_args(meta=True)
    def default(self, meta: Any, items: list[Any]) -> _Clause:
        return _Clause(default=items[0], default_pos=self._pos(meta))

    def check(self, items: list[Token]) -> _Clause:
        return _Clause(check=str(items[0]))

    def since(self, items: list[Token]) -> _Clause:
        return _Clause(since=_int(items[0]), since_pos=self._pos(items[0]))

    def info(self, items: list[Token]) -> _Clause:
        return _Clause(info=_string(items[0]))

    def TMP(self, tok: Token) -> _Clause:
        return _Clause(tmp=True)

    def struct_version(self, items: list[Token]) -> _Clause:
        return _Clause(struct_version=_int(items[0]))

    def exists(self, items: list[Any]) -> _Clause:
        return _Clause(exists=items[0])

    def cond_expr(self, items: list[Any]) -> ast.Expr:
        return items[0]  # type: ignore[no-any-return]

    def cond_custom(self, items: list[Token]) -> ast.Custom:
        return ast.Custom(str(items[0]), self._pos(items[0]))

    def signed_int(self, items: list[Token]) -> int:
        value = _int(items[-1])
        return -value if len(items) == 2 else value

    def signed_float(self, items: list[Token]) -> float:
        value = float(str(items[-1]).replace("_", ""))
        return -value if len(items) == 2 else value

    def BOOL(self, tok: Token) -> bool:
        return str(tok) == "true"

    # -- expressions --------------------------------------------------------
    def int_lit(self, items: list[Token]) -> ast.IntLit:
        return ast.IntLit(_int(items[0]), self._pos(items[0]))

    @v_args(meta=True)
    def version_ref(self, meta: Any, items: list[Any]) -> ast.VersionRef:
        return ast.VersionRef(self._pos(meta))

    @v_args(meta=True)
    def len_call(self, meta: Any, items: list[Any]) -> ast.LenCall:
        return ast.LenCall(items[1], self._pos(meta), str(items[0]))

    def ref(self, items: list[Token]) -> ast.Ref:
        return ast.Ref(tuple(str(t) for t in items), self._pos(items[0]))

    def unop(self, items: list[Any]) -> ast.UnOp:
        op, operand = items
        return ast.UnOp(str(op), operand, self._pos(op))

    def binop(self, items: list[Any]) -> ast.Expr:
        left = items[0]
        for i in range(1, len(items), 2):
            op, right = items[i], items[i + 1]
            left = ast.BinOp(str(op), left, right, self._pos(op))
        return left  # type: ignore[no-any-return]

    def _chain(self, op: str, items: list[Any]) -> ast.Expr:
        left = items[0]
        for right in items[1:]:
            left = ast.BinOp(op, left, right, _expr_pos(right))
        return left  # type: ignore[no-any-return]

    def or_(self, items: list[Any]) -> ast.Expr:
        return self._chain("||", items)

    def and_(self, items: list[Any]) -> ast.Expr:
        return self._chain("&&", items)

    def bor(self, items: list[Any]) -> ast.Expr:
        return self._chain("|", items)

    def bxor(self, items: list[Any]) -> ast.Expr:
        return self._chain("^", items)

    def band(self, items: list[Any]) -> ast.Expr:
        return self._chain("&", items)


def _expr_pos(e: Any) -> ast.Pos:
    pos = e.pos
    assert isinstance(pos, ast.Pos)
    return pos


class _Clause:
    def __init__(self, **values: Any) -> None:
        self.values = values


@attrs.frozen
class _ClassClause:
    name: str
    pos: ast.Pos


class _Needed:
    def __init__(self, cond: ast.Condition) -> None:
        self.cond = cond


def _name(tok: Token) -> str:
    return _string(tok) if tok.type == "STRING" else str(tok)


def _attach_docs(items: list[Any]) -> list[Any]:
    """Attach ``##`` doc comments to the declaration that follows them."""
    out: list[Any] = []
    docs: list[str] = []
    for item in items:
        if isinstance(item, Token) and item.type == "DOC":
            docs.append(str(item)[2:].strip())
            continue
        if docs and hasattr(item, "doc"):
            item = _with_doc(item, "\n".join(docs))
        docs = []
        out.append(item)
    return out


def _with_doc(item: Any, doc: str) -> Any:
    return attrs.evolve(item, doc=doc)


def parse(source: str, path: str) -> ast.SpecFile:
    """Parse one file; raise :class:`SpecError` with a located message on bad syntax."""
    try:
        tree = _parser().parse(source)
    except lark.exceptions.UnexpectedInput as exc:
        raise SpecError([_syntax_diagnostic(exc, path, source)], {path: source}) from None
    try:
        items = _ToAst(path).transform(tree)
    except lark.exceptions.VisitError as exc:
        if not isinstance(exc.orig_exc, _BadString):
            raise
        bad = exc.orig_exc
        raise SpecError([Diagnostic(ast.Pos(path, bad.tok.line or 1, bad.tok.column or 1), bad.reason)], {path: source}) from None
    return ast.SpecFile(
        path,
        source,
        tuple(i for i in items if isinstance(i, ast.Import)),
        tuple(i for i in items if isinstance(i, ast.Enum)),
        tuple(i for i in items if isinstance(i, ast.Vmsd)),
    )


def _end_position(source: str) -> tuple[int, int]:
    lines = source.rstrip().splitlines() or [""]
    return len(lines), len(lines[-1]) + 1


def _syntax_diagnostic(exc: lark.exceptions.UnexpectedInput, path: str, source: str) -> Diagnostic:
    line = getattr(exc, "line", 1) or 1
    col = getattr(exc, "column", 1) or 1
    expected: set[str] = set()
    if isinstance(exc, lark.exceptions.UnexpectedToken):
        expected = set(exc.accepts or exc.expected)
        tok = exc.token
        if tok.type == "$END":
            found = "end of file"
            line, col = _end_position(source)
        else:
            found = f"'{tok}'"
            line, col = tok.line or line, tok.column or col
    elif isinstance(exc, lark.exceptions.UnexpectedCharacters):
        expected = set(exc.allowed or ())
        found = f"character {exc.char!r}"
    else:
        found = "end of file"
        line, col = _end_position(source)
        expected = set(getattr(exc, "expected", ()) or ())
    names = sorted({_describe_terminal(e) for e in expected if not e.startswith("__")})
    anon = sorted({_describe_terminal(e) for e in expected if e.startswith("__")})
    wanted = names + anon
    msg = f"unexpected {found}"
    if wanted:
        msg += ", expected " + (wanted[0] if len(wanted) == 1 else "one of: " + ", ".join(wanted))
    return Diagnostic(ast.Pos(path, line, col), msg)
