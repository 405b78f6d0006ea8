"""The canonical layout of a .vmsd file (``vmsd fmt``; docs/spec-format.md describes it).

The text is parsed twice: once by :func:`vmsd.grammar.parser.parse`, which
reports a bad spec with its usual located error and enforces the limits of
:mod:`vmsd.grammar.limits`, and once by a parser that keeps every token and
hands over the comments the grammar otherwise ignores.  The second parse's
tree says where each declaration, field and closing brace starts; each
becomes one output line of its tokens with canonical spacing.  Comments are
put back by position: one after code on its line stays at the end of that
code's output line, one on a line of its own goes before the next line.
The result is parsed again and must describe the same declarations (the
two parses' digests are compared, one parse alive at a time), so a
formatting bug can never change what a spec means.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import threading
from importlib import resources
from typing import Any

import attrs
import lark
from lark import Token, Tree

from vmsd.grammar import ast
from vmsd.grammar.parser import parse

INDENT = "    "
# A subsection header longer than this breaks before ``needed``.
MAX_HEADER = 100
# Continuation lines of a header are indented this much more than the header.
CONTINUATION = 2 * INDENT

_FIELDS = frozenset({
    "scalar_field", "bytes_field", "unused_field", "struct_field", "bitmap_field",
    "list_field", "map_field", "validate_field", "opaque_field", "fd_field",
})
# Field parts after the name: the third column of an aligned block.
_CLAUSES = frozenset({"wire_name", "enum_ref", "default", "check", "since", "struct_version", "info", "exists"})
_OPEN = frozenset({"(", "[", "."})
_CLOSE = frozenset({")", "]", ",", ".", "[", "?"})


class _Comments:
    """Collects the ignored ``#`` comments of the parse in progress (one parse at a time)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens: list[Token] = []

    def add(self, tok: Token) -> Token:
        self.tokens.append(_slim(tok))
        return tok


_COMMENTS = _Comments()


# Rules whose layout is their tokens in a row: the parser hands them over as a flat
# list instead of a tree (an expression is a dozen nested rules per operand here).
_FLAT = ("expr", "or_expr", "and_expr", "bor_expr", "xor_expr", "band_expr", "eq_expr", "rel_expr", "shift_expr",
         "add_expr", "mul_expr", "unary", "atom", "or_", "and_", "bor", "bxor", "band", "binop", "unop", "int_lit",
         "version_ref", "len_call", "ref", "condition", "cond_expr", "cond_custom", "length", "dims", "signed_int",
         "signed_float", "needed", "class_clause", "vmsd_name", "map_key")


def _flat(children: list[Any]) -> list[Token]:
    out: list[Token] = []
    for child in children:
        if isinstance(child, list):
            out.extend(child)
        else:
            out.append(child)
    return out


class _Flatten(lark.Transformer[Token, Any]):
    pass


for _rule in _FLAT:
    setattr(_Flatten, _rule, staticmethod(_flat))


def _slim(tok: Token) -> Token:
    """``tok`` without what the layout does not use: its offsets and the matched text kept beside its
    own (the parse holds every token of the file at once)."""
    tok.value = tok.start_pos = tok.end_pos = None
    return tok


@functools.cache
def _layout_parser() -> lark.Lark:
    text = resources.files("vmsd.grammar").joinpath("vmsd.lark").read_text(encoding="utf-8")
    options: dict[str, Any] = {"parser": "lalr", "keep_all_tokens": True, "maybe_placeholders": False}
    terminals = [t.name for t in lark.Lark(text, **options).terminals]
    callbacks = {name: _COMMENTS.add if name == "COMMENT" else _slim for name in terminals}
    return lark.Lark(text, **options, lexer_callbacks=callbacks, transformer=_Flatten())


def _tokens(node: Tree[Token] | list[Token] | Token) -> list[Token]:
    """The tokens under ``node`` in text order."""
    if isinstance(node, Token):
        return [node]
    if isinstance(node, list):
        return node
    return _flat([_tokens(child) for child in node.children])


def _generic(tok: Token) -> bool:
    """``<`` or ``>`` of ``list<T>`` / ``map<K, T>``, not a comparison."""
    return tok in ("<", ">") and tok.type not in ("REL_OP", "SHIFT_OP")


def _join(tokens: list[Token]) -> str:
    out: list[str] = []
    prev: Token | None = None
    for tok in tokens:
        if prev is not None and not _tight(prev, tok):
            out.append(" ")
        out.append(str(tok))
        prev = tok
    return "".join(out)


def _tight(a: Token, b: Token) -> bool:
    """No space between ``a`` and ``b``."""
    if a in _OPEN or b in _CLOSE or a.type in ("UNARY_OP", "SIGN"):
        return True
    if (_generic(a) and a == "<") or _generic(b):
        return True
    # len(x), custom(name)
    return b == "(" and (a.type == "NAME" or a == "custom")


@attrs.define
class _Line:
    """One output line: a declaration header, a field, a doc comment, a brace."""

    depth: int
    cells: list[str]  # one cell, or three aligned columns of a field
    tokens: list[Token]
    field: bool = False
    doc: bool = False
    closing: bool = False
    before: list[Token] = attrs.Factory(list)  # own-line comments
    trailing: list[Token] = attrs.Factory(list)  # at most one
    blank: bool = False  # a blank line before it in the source
    blank_before: list[bool] = attrs.Factory(list)  # the same for each comment of ``before``


class _Lines:
    def __init__(self) -> None:
        self.lines: list[_Line] = []

    def add(self, depth: int, tokens: list[Token], cells: list[str] | None = None, **kw: Any) -> None:
        self.lines.append(_Line(depth, cells or [_join(tokens)], tokens, **kw))

    def item(self, node: Tree[Token] | Token, depth: int) -> None:
        if isinstance(node, Token):  # a doc comment
            self.add(depth, [node], [str(node).rstrip()], doc=True)
        elif node.data in _FIELDS:
            # validate "label" (expr) is not aligned: the label is no name
            cells = _field_cells(node) if node.data != "validate_field" else [_join(_tokens(node))]
            self.add(depth, _tokens(node), cells, field=True)
        elif node.data in ("vmsd_decl", "subsection", "enum_decl"):
            self.block(node, depth)
        elif node.data == "enum_member":
            *docs, name, equal, value = node.children
            for doc in docs:
                self.item(doc, depth)
            self.add(depth, _tokens(node)[len(docs):], [str(name), _join(_tokens(equal) + _tokens(value))], field=True)
        else:  # import
            self.add(depth, _tokens(node))

    def block(self, node: Tree[Token], depth: int) -> None:
        kids = node.children
        brace = next(i for i, k in enumerate(kids) if isinstance(k, Token) and k == "{")
        head = [t for k in kids[:brace + 1] for t in _tokens(k)]
        self.add(depth, head)
        for kid in kids[brace + 1:-1]:
            self.item(kid, depth + 1)
        close = kids[-1]
        assert isinstance(close, Token)
        self.add(depth, [close], closing=True)


def _field_cells(node: Tree[Token]) -> list[str]:
    """Kind (through ``>`` of list<T>), name with its dimensions, then the clauses."""
    kids = node.children
    end = next((i for i, k in enumerate(kids) if (isinstance(k, Tree) and k.data in _CLAUSES)
                or (isinstance(k, Token) and k.type == "TMP")), len(kids))
    names = [i for i, k in enumerate(kids[:end]) if isinstance(k, Token) and k.type == "NAME"]
    name = names[-1] if names else 1  # unused N, validate "label" (expr)
    kind = next((i + 1 for i, k in enumerate(kids[:name]) if isinstance(k, Token) and k == ">"), 1)
    parts = [kids[:kind], kids[kind:end], kids[end:]]
    return [_join([t for k in part for t in _tokens(k)]) for part in parts]


def _place_comments(lines: list[_Line], comments: list[Token]) -> list[Token]:
    """Attach each comment to a line, keeping their order; those after the last line are returned.

    A comment after the last token of a line's code, on the same source line, ends that
    line; any other goes on a line of its own before the next line (a comment inside a
    construct written over several lines: before the construct).
    """
    code = sorted((t.line or 0, t.column or 0, i) for i, line in enumerate(lines) for t in line.tokens)
    keys = [(c[0], c[1]) for c in code]
    tail: list[Token] = []
    for com in comments:
        at = bisect.bisect(keys, (com.line or 0, com.column or 0))
        after = code[at][2] if at < len(code) else None
        if at and code[at - 1][0] == com.line and code[at - 1][2] != after:
            lines[code[at - 1][2]].trailing.append(com)
        else:
            (lines[after].before if after is not None else tail).append(com)
    return tail


def _blank_lines(lines: list[_Line], comments: list[Token], tail: list[Token]) -> list[bool]:
    """Mark the lines and own-line comments that follow a blank line of the source; the same for ``tail``."""
    ends = sorted((t.end_line or 0, t.end_column or 0) for t in [*(t for line in lines for t in line.tokens), *comments])

    def gap(tok: Token) -> bool:
        """Whether a blank line separates ``tok`` from the token or comment before it."""
        i = bisect.bisect_left(ends, (tok.line or 0, tok.column or 0))
        return i > 0 and (tok.line or 0) - ends[i - 1][0] >= 2

    for line in lines:
        line.blank_before = [gap(c) for c in line.before]
        line.blank = gap(min(line.tokens, key=lambda t: (t.line or 0, t.column or 0)))
    return [gap(c) for c in tail]


def _aligned(lines: list[_Line]) -> list[str]:
    """Each line's code; the fields of a run (one body's fields and doc comments,
    up to a blank line, a subsection or a brace) in columns: kind, name, clauses."""
    texts = [" ".join(c for c in line.cells if c) for line in lines]
    run: list[int] = []
    for n, line in enumerate([*lines, None]):
        if line is not None and (line.doc or line.field) and not line.blank and not any(line.blank_before) and (
                not run or line.depth == lines[run[0]].depth):
            run.append(n)
            continue
        _columns([lines[k] for k in run if lines[k].field], texts, [k for k in run if lines[k].field])
        run = [n] if line is not None and (line.doc or line.field) else []
    return texts


def _columns(run: list[_Line], texts: list[str], where: list[int]) -> None:
    """Pad the cells of ``run`` in place in ``texts``; a kind such as ``map<K, T>``
    longer than the keywords above and below it does not widen the column."""
    kinds = [len(line.cells[0]) for line in run if len(line.cells) > 2 and "<" not in line.cells[0]]
    width = max(kinds, default=0) + 1
    heads = [line.cells[0] + " " * max(1, width - len(line.cells[0])) + line.cells[1] if len(line.cells) > 2
             else line.cells[0] for line in run]
    clause = max((len(h) for h, line in zip(heads, run, strict=True) if len(line.cells) > 2 and line.cells[2]), default=0) + 1
    member = max((len(line.cells[0]) for line in run if len(line.cells) == 2), default=0) + 1
    for n, head, line in zip(where, heads, run, strict=True):
        if len(line.cells) == 2:  # an enum member
            texts[n] = head.ljust(member) + line.cells[1]
        elif len(line.cells) > 2:
            texts[n] = (head.ljust(clause) + line.cells[2]) if line.cells[2] else head.rstrip()


def _header(text: str, depth: int) -> list[str]:
    pad = INDENT * depth
    at = text.find(" needed ")
    if len(pad) + len(text) <= MAX_HEADER or not text.startswith("subsection ") or at < 0:
        return [pad + text]
    return [pad + text[:at], pad + CONTINUATION + text[at + 1:]]


def _render(lines: list[_Line], tail: list[Token], tail_blank: list[bool]) -> str:
    texts = _aligned(lines)
    rows = [_header(texts[n], line.depth) if not line.field else [INDENT * line.depth + texts[n]]
            for n, line in enumerate(lines)]
    # Trailing comments of consecutive fields (or imports) of one body share a column.
    column: dict[int, int] = {}
    run: list[int] = []
    for n, line in enumerate([*lines, None]):
        if (line is not None and line.trailing and not line.before and not line.blank and run
                and (lines[run[-1]].depth, lines[run[-1]].field) == (line.depth, line.field) and not line.closing):
            run.append(n)
            continue
        width = max((len(rows[k][-1]) for k in run), default=0)
        column.update((k, width + 2) for k in run)
        run = [n] if line is not None and line.trailing else []
    out: list[str] = []
    prev_open = True
    for n, line in enumerate(lines):
        pad = INDENT * (line.depth + (1 if line.closing else 0))
        for com, blank in zip(line.before, line.blank_before, strict=True):
            if blank and not prev_open:
                out.append("")
            out.append(pad + str(com).rstrip())
            prev_open = False
        if line.blank and not prev_open and not line.closing:
            out.append("")
        if line.trailing:
            rows[n][-1] = rows[n][-1].ljust(column[n]) + str(line.trailing[0]).rstrip()
        out.extend(rows[n])
        prev_open = texts[n].endswith("{")
    for com, blank in zip(tail, tail_blank, strict=True):
        if blank and out:
            out.append("")
        out.append(str(com).rstrip())
    return "\n".join(out) + "\n" if out else ""


def format_source(source: str, path: str) -> str:
    """The canonical text of a spec; :class:`~vmsd.grammar.diagnostics.SpecError` if it does not parse."""
    # A spec error, or a limit exceeded, as the compiler reports it.  One parse's declarations at a time,
    # and of each only a digest kept: memory stays a small multiple of the spec's size.
    meaning = _meaning(parse(source, path))
    text = _layout(source)
    if _meaning(parse(text, path)) != meaning:
        raise AssertionError(f"vmsd fmt would change the meaning of {path}; please report this")
    return text


def _layout(source: str) -> str:
    with _COMMENTS.lock:
        _COMMENTS.tokens = []
        try:
            tree = _layout_parser().parse(source)
        finally:
            comments, _COMMENTS.tokens = _COMMENTS.tokens, []
    lines = _Lines()
    for item in tree.children:
        lines.item(item, 0)
    tail = _place_comments(lines.lines, comments)
    return _render(lines.lines, tail, _blank_lines(lines.lines, comments, tail))


def _meaning(spec: ast.SpecFile) -> bytes:
    """A digest of the declarations of a parsed file, without positions or text."""
    digest = hashlib.sha256()
    _digest(digest, spec)
    return digest.digest()


def _digest(digest: Any, value: Any) -> None:
    """Feed ``value`` to ``digest`` unambiguously: the type and every attribute but positions and the
    source for AST nodes, each item of a tuple, ``repr`` for the rest.  Recursion follows the nesting
    of declarations and expressions, which the parser's limits bound."""
    if attrs.has(type(value)):
        digest.update(type(value).__name__.encode() + b"(")
        for a in attrs.fields(type(value)):
            item = getattr(value, a.name)
            if a.name != "source" and not a.name.endswith("pos") and not isinstance(item, ast.Pos):
                digest.update(a.name.encode() + b"=")
                _digest(digest, item)
        digest.update(b")")
    elif isinstance(value, tuple):
        digest.update(b"[")
        for item in value:
            _digest(digest, item)
            digest.update(b",")
        digest.update(b"]")
    else:
        digest.update(repr(value).encode() + b";")
