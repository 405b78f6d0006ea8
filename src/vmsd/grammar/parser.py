"""Parse .vmsd text into the frozen AST (Lark LALR, positions kept).

The AST is built while the parser reduces (Lark's embedded transformer), so
no parse tree is kept and nothing recurses over the input: memory and time
grow linearly with the text, and the depth limits of
:mod:`vmsd.grammar.limits` are checked as each node is made.
"""

from __future__ import annotations

import ast as pyast
import functools
import math
import threading
import warnings
from collections.abc import Iterator
from importlib import resources
from typing import Any, TypeVar

import attrs
import lark
from lark import Token, Transformer

from vmsd.grammar import ast
from vmsd.grammar.diagnostics import Diagnostic, SpecError
from vmsd.grammar.limits import MAX_EXPR_DEPTH, MAX_LITERAL_CHARS, MAX_SUBSECTION_DEPTH

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


class _Limit(Exception):
    """A limit of :mod:`vmsd.grammar.limits` exceeded at a line and column of the text."""

    def __init__(self, line: int | None, col: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line or 1
        self.col = col or 1
        self.message = message


class _Nesting(lark.lark.PostLex):
    """Counts open parentheses and braces as tokens go by, refusing one level too many.

    Braces nest only through subsections (one level is the vmsd's own body).
    """

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        parens = braces = 0
        for tok in stream:
            if tok.type == "LPAR":
                parens += 1
                if parens > MAX_EXPR_DEPTH:
                    raise _Limit(tok.line, tok.column, f"parentheses nest more than {MAX_EXPR_DEPTH} deep")
            elif tok.type == "RPAR":
                parens -= 1
            elif tok.type == "LBRACE":
                braces += 1
                if braces > MAX_SUBSECTION_DEPTH + 1:
                    raise _Limit(tok.line, tok.column, f"subsections nest more than {MAX_SUBSECTION_DEPTH} deep")
            elif tok.type == "RBRACE":
                braces -= 1
            yield tok


@functools.cache
def _parser() -> tuple[lark.Lark, _ToAst]:
    text = resources.files("vmsd.grammar").joinpath("vmsd.lark").read_text(encoding="utf-8")
    builder = _ToAst()
    return lark.Lark(text, parser="lalr", maybe_placeholders=False, transformer=builder, postlex=_Nesting()), builder


# One parse at a time: the transformer embedded in the cached parser holds the current file's state.
_PARSE_LOCK = threading.Lock()


def _describe_terminal(name: str) -> str:
    if name in _READABLE:
        return _READABLE[name]
    try:
        pattern = _parser()[0].get_terminal(name).pattern
    except KeyError:
        return name
    if isinstance(pattern, lark.lexer.PatternStr):
        return f"'{pattern.value}'"
    return name.lower()


def _literal(tok: Token, what: str) -> str:
    text = str(tok)
    if len(text) > MAX_LITERAL_CHARS:
        raise _Limit(tok.line, tok.column, f"{what} literal of {len(text)} characters; the limit is {MAX_LITERAL_CHARS}")
    return text.replace("_", "")


def _int(tok: Token) -> int:
    digits = _literal(tok, "integer")
    return int(digits, 0) if digits[:2].lower() in ("0x", "0b") else int(digits, 10)


def _float(tok: Token) -> float:
    value = float(_literal(tok, "number"))
    if not math.isfinite(value):
        raise _Limit(tok.line, tok.column, f"number {tok} is out of range for float64")
    return value


class _BadString(Exception):
    """A quoted string whose escapes Python cannot decode, at a line and column of the text."""

    def __init__(self, tok: Token, message: str) -> None:
        super().__init__(message)
        self.line = tok.line or 1
        self.col = tok.column or 1
        self.message = message


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


_E = TypeVar("_E", ast.UnOp, ast.BinOp)


class _ToAst(Transformer[Token, Any]):
    def __init__(self) -> None:
        super().__init__()
        self.reset("<none>")

    def reset(self, path: str) -> None:
        """Start a file.  Depths are kept by ``id`` of the node: every node made
        during one parse stays alive (in its parent) until the parse ends."""
        self.path = path
        self.depth: dict[int, int] = {}

    def _pos(self, tok: Token) -> ast.Pos:
        return ast.Pos(self.path, tok.line or 1, tok.column or 1)

    def _nested(self, node: _E, children: list[Any], tok: Token) -> _E:
        depth = 1 + max((self.depth.get(id(c), 0) for c in children), default=0)
        if depth > MAX_EXPR_DEPTH:
            raise _Limit(tok.line, tok.column, f"expression nests more than {MAX_EXPR_DEPTH} operators deep")
        self.depth[id(node)] = depth
        return node

    # -- top level --------------------------------------------------------
    def start(self, items: list[Any]) -> list[Any]:
        return _attach_docs(items)

    def import_decl(self, items: list[Token]) -> ast.Import:
        keyword, path = items
        return ast.Import(_string(path), self._pos(keyword))

    def enum_decl(self, items: list[Any]) -> ast.Enum:
        name, base, *rest = items
        flags = bool(rest and isinstance(rest[0], Token) and rest[0].type == "FLAGS")
        members = [m for m in rest if isinstance(m, ast.EnumMember)]
        return ast.Enum(str(name), str(base), flags, tuple(members), self._pos(name))

    def enum_member(self, items: list[Any]) -> ast.EnumMember:
        docs = [str(t)[2:].strip() for t in items if isinstance(t, Token) and t.type == "DOC"]
        name = next(t for t in items if isinstance(t, Token) and t.type == "NAME")
        return ast.EnumMember(str(name), items[-1], self._pos(name), "\n".join(docs) or None)

    def class_clause(self, items: list[Token]) -> _ClassClause:
        return _ClassClause(str(items[0]), self._pos(items[0]))

    def vmsd_decl(self, items: list[Any]) -> ast.Vmsd:
        name_tok, version, minimum, *rest = items
        clause = rest[0] if rest and isinstance(rest[0], _ClassClause) else None
        members = _attach_docs(rest[1:] if clause is not None else rest)
        fields = tuple(m for m in members if isinstance(m, ast.Field))
        subs = tuple(m for m in members if isinstance(m, ast.Subsection))
        return ast.Vmsd(
            _name(name_tok), _int(version), _int(minimum), clause.name if clause else None, fields, subs,
            self._pos(name_tok), self._pos(version), self._pos(minimum), class_pos=clause.pos if clause else None,
        )

    def subsection(self, items: list[Any]) -> ast.Subsection:
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

    def fd_field(self, items: list[Any]) -> ast.Field:
        name, *rest = items
        return self._field("fd", name, name, rest)

    def validate_field(self, items: list[Any]) -> ast.Field:
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

    def default(self, items: list[Any]) -> _Clause:
        equal, value = items
        return _Clause(default=value, default_pos=self._pos(equal))

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
        value = _float(items[-1])
        return -value if len(items) == 2 else value

    def BOOL(self, tok: Token) -> bool:
        return str(tok) == "true"

    # -- expressions --------------------------------------------------------
    def int_lit(self, items: list[Token]) -> ast.IntLit:
        return ast.IntLit(_int(items[0]), self._pos(items[0]))

    def version_ref(self, items: list[Token]) -> ast.VersionRef:
        return ast.VersionRef(self._pos(items[0]))

    def len_call(self, items: list[Any]) -> ast.LenCall:
        return ast.LenCall(items[1], self._pos(items[0]), str(items[0]))

    def ref(self, items: list[Token]) -> ast.Ref:
        return ast.Ref(tuple(str(t) for t in items), self._pos(items[0]))

    def unop(self, items: list[Any]) -> ast.UnOp:
        op, operand = items
        return self._nested(ast.UnOp(str(op), operand, self._pos(op)), [operand], op)

    def binop(self, items: list[Any]) -> ast.Expr:
        left = items[0]
        for i in range(1, len(items), 2):
            op, right = items[i], items[i + 1]
            left = self._nested(ast.BinOp(str(op), left, right, self._pos(op)), [left, right], op)
        return left  # type: ignore[no-any-return]

    def _chain(self, op: str, items: list[Any]) -> ast.Expr:
        left = items[0]
        for right in items[1:]:
            pos = _expr_pos(right)
            node = ast.BinOp(op, left, right, pos)
            left = self._nested(node, [left, right], Token(op, op, line=pos.line, column=pos.col))
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
    parser, builder = _parser()
    with _PARSE_LOCK:
        builder.reset(path)
        try:
            # The embedded transformer's start() makes the list of declarations, not a tree.
            items: list[Any] = parser.parse(source)  # type: ignore[assignment]
        except lark.exceptions.UnexpectedInput as exc:
            raise SpecError([_syntax_diagnostic(exc, path, source)], {path: source}) from None
        except (_Limit, _BadString) as exc:
            raise SpecError([Diagnostic(ast.Pos(path, exc.line, exc.col), exc.message)], {path: source}) from None
        finally:
            builder.reset("<none>")
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
