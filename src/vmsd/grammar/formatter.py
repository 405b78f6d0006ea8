"""The canonical layout of a .vmsd file (``vmsd fmt``; docs/spec-format.md describes it).

The text is parsed twice: once by :func:`vmsd.grammar.parser.parse`, which
reports a bad spec with its usual located error and enforces the limits of
:mod:`vmsd.grammar.limits`, and once by a parser that keeps every token and
hands over the comments the grammar otherwise ignores.  That second parser
makes each declaration header, field, doc comment and closing brace into
one output line of its tokens with canonical spacing as soon as it has
reduced it, keeping only the line's text and where it starts and ends: the
file's tokens are never all alive at once.  Comments are put back by
position: one after code on its line stays at the end of that code's
output line, one on a line of its own goes before the next line.
The result is parsed again and must describe the same declarations (the
two parses' digests are compared, one parse alive at a time), so a
formatting bug can never change what a spec means.
"""

from __future__ import annotations

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
    """Collects the ignored ``#`` comments of the parse in progress (one parse at a time), as
    (position, text) pairs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.found: list[tuple[int, str]] = []

    def add(self, tok: Token) -> Token:
        self.found.append((_pos(tok), str(tok).rstrip()))
        return tok


_COMMENTS = _Comments()


def _pos(tok: Token) -> int:
    """The line and column of ``tok`` in one int that sorts like the pair (no token spans lines)."""
    return ((tok.line or 0) << 32) | (tok.column or 0)


def _line_of(pos: int) -> int:
    return pos >> 32


@attrs.define
class _Line:
    """One output line: a declaration header, a field, a doc comment, a brace.

    Built as soon as the parser has its tokens, which are then dropped: only the
    text of its cells and the positions comments are placed by stay.
    """

    cells: list[str]  # one cell, or three aligned columns of a field (two of an enum member)
    start: int  # _pos of its first token
    last: int  # _pos of its last token
    # _pos of every token when they span source lines (a comment may sit between them)
    spread: tuple[int, ...] | None = None
    field: bool = False
    doc: bool = False
    opens: bool = False
    closing: bool = False
    depth: int = 0
    before: list[tuple[str, bool]] | None = None  # own-line comments, each with a blank line before it
    trailing: str | None = None
    blank: bool = False  # a blank line before it in the source


def _make_line(tokens: list[Token], cells: list[str] | None = None, **kw: Any) -> _Line:
    start, last = _pos(tokens[0]), _pos(tokens[-1])
    spread = tuple(_pos(t) for t in tokens) if _line_of(start) != _line_of(last) else None
    return _Line(cells or [_join(tokens)], start, last, spread, **kw)


def _flat(children: list[Any]) -> list[Token]:
    out: list[Token] = []
    for child in children:
        if isinstance(child, list):
            out.extend(child)
        else:
            out.append(child)
    return out


def _field(children: list[Any]) -> _Line:
    return _make_line(_flat([_tokens(child) for child in children]), _field_cells(children), field=True)


def _items(kids: list[Any]) -> list[_Line]:
    """The lines of a body's members (or of the file's items), in text order."""
    out: list[_Line] = []
    for kid in kids:
        if isinstance(kid, Token):  # a doc comment
            out.append(_make_line([kid], [str(kid).rstrip()], doc=True))
        elif isinstance(kid, list):  # a block or an enum member
            out.extend(kid)
        else:
            out.append(kid)
    return out


def _block(children: list[Any]) -> list[_Line]:
    brace = next(i for i, k in enumerate(children) if isinstance(k, Token) and k == "{")
    head = _make_line(_flat([_tokens(k) for k in children[:brace + 1]]), opens=True)
    return [head, *_items(children[brace + 1:-1]), _make_line([children[-1]], closing=True)]


class _Layout(lark.Transformer[Token, Any]):
    """Made into lines as the parser reduces, so that the file's tokens are never all alive at once."""

    def import_decl(self, children: list[Token]) -> _Line:
        return _make_line(children)

    def validate_field(self, children: list[Any]) -> _Line:
        """validate "label" (expr) is not aligned: the label is no name."""
        return _make_line(_flat([_tokens(child) for child in children]), field=True)

    def enum_member(self, children: list[Any]) -> list[_Line]:
        *docs, name, equal, value = children
        rest = _tokens(equal) + _tokens(value)
        return [*_items(docs), _make_line([name, *rest], [str(name), _join(rest)], field=True)]

    def start(self, children: list[Any]) -> list[_Line]:
        return _items(children)


# Rules whose layout is their tokens in a row: the parser hands them over as a flat
# list instead of a tree (an expression is a dozen nested rules per operand here).
_FLAT = ("expr", "or_expr", "and_expr", "bor_expr", "xor_expr", "band_expr", "eq_expr", "rel_expr", "shift_expr",
         "add_expr", "mul_expr", "unary", "atom", "or_", "and_", "bor", "bxor", "band", "binop", "unop", "int_lit",
         "version_ref", "len_call", "ref", "condition", "cond_expr", "cond_custom", "length", "dims", "signed_int",
         "signed_float", "needed", "class_clause", "vmsd_name", "map_key")

for _rule in _FLAT:
    setattr(_Layout, _rule, staticmethod(_flat))
for _rule in _FIELDS - {"validate_field"}:
    setattr(_Layout, _rule, staticmethod(_field))
for _rule in ("vmsd_decl", "subsection", "enum_decl"):
    setattr(_Layout, _rule, staticmethod(_block))


@functools.cache
def _layout_parser() -> lark.Lark:
    text = resources.files("vmsd.grammar").joinpath("vmsd.lark").read_text(encoding="utf-8")
    options: dict[str, Any] = {"parser": "lalr", "keep_all_tokens": True, "maybe_placeholders": False}
    return lark.Lark(text, **options, lexer_callbacks={"COMMENT": _COMMENTS.add}, transformer=_Layout())


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


def _field_cells(kids: list[Any]) -> list[str]:
    """Kind (through ``>`` of list<T>), name with its dimensions, then the clauses."""
    end = next((i for i, k in enumerate(kids) if (isinstance(k, Tree) and k.data in _CLAUSES)
                or (isinstance(k, Token) and k.type == "TMP")), len(kids))
    names = [i for i, k in enumerate(kids[:end]) if isinstance(k, Token) and k.type == "NAME"]
    name = names[-1] if names else 1  # unused N
    kind = next((i + 1 for i, k in enumerate(kids[:name]) if isinstance(k, Token) and k == ">"), 1)
    parts = [kids[:kind], kids[kind:end], kids[end:]]
    return [_join([t for k in part for t in _tokens(k)]) for part in parts]


def _depths(lines: list[_Line]) -> None:
    """Each line's depth of nesting, from the braces before it."""
    depth = 0
    for line in lines:
        depth -= line.closing
        line.depth = depth
        depth += line.opens


def _place_comments(lines: list[_Line], comments: list[tuple[int, str]]) -> list[tuple[str, bool]]:
    """Attach each comment to a line, keeping their order, and mark the lines and own-line comments that
    follow a blank line of the source; the comments after the last line are returned.

    A comment after the last token of a line's code, on the same source line, ends that
    line; any other goes on a line of its own before the next line (a comment inside a
    construct written over several lines: before the construct).  A blank line separates
    a line or comment from the token or comment before it when their source lines are
    two or more apart.
    """
    tail: list[tuple[str, bool]] = []
    at = 0  # the first line that starts after the comment in hand
    last_comment = 0  # _pos of the comment before it, 0 for none

    def gap(pos: int, prev: int) -> bool:
        return prev > 0 and _line_of(pos) - _line_of(prev) >= 2

    def passed() -> int:
        """_pos of the last token of the lines passed, or of the comment before, whichever is later."""
        return max(lines[at - 1].last if at else 0, last_comment)

    for pos, text in comments:
        while at < len(lines) and lines[at].start < pos:
            lines[at].blank = gap(lines[at].start, passed())
            at += 1
        spread = lines[at - 1].spread if at and pos < lines[at - 1].last else None
        if spread is not None:  # between two tokens of a line written over several source lines
            entry = (text, gap(pos, max(max(p for p in spread if p < pos), last_comment)))
            target: _Line | None = lines[at - 1]
        elif at and _line_of(lines[at - 1].last) == _line_of(pos):
            lines[at - 1].trailing = text
            last_comment = pos
            continue
        else:
            entry = (text, gap(pos, passed()))
            target = lines[at] if at < len(lines) else None
        if target is None:
            tail.append(entry)
        elif target.before is None:
            target.before = [entry]
        else:
            target.before.append(entry)
        last_comment = pos
    while at < len(lines):
        lines[at].blank = gap(lines[at].start, passed())
        at += 1
    return tail


def _aligned(lines: list[_Line]) -> list[str]:
    """Each line's code; the fields of a run (one body's fields and doc comments,
    up to a blank line, a subsection or a brace) in columns: kind, name, clauses."""
    texts = [" ".join(c for c in line.cells if c) for line in lines]
    run: list[int] = []
    for n, line in enumerate([*lines, None]):
        if line is not None and (line.doc or line.field) and not line.blank and not any(b for _, b in line.before or ()) and (
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


def _header(text: str, depth: int) -> str:
    """A header line, broken before ``needed`` (the two lines in one string) when it is too long."""
    pad = INDENT * depth
    at = text.find(" needed ")
    if len(pad) + len(text) <= MAX_HEADER or not text.startswith("subsection ") or at < 0:
        return pad + text
    return pad + text[:at] + "\n" + pad + CONTINUATION + text[at + 1:]


def _last_row(row: str) -> int:
    """The length of the last line of ``row``."""
    return len(row) - row.rfind("\n") - 1


def _render(lines: list[_Line], tail: list[tuple[str, bool]]) -> str:
    rows = _aligned(lines)
    for n, code in enumerate(lines):
        rows[n] = _header(rows[n], code.depth) if not code.field else INDENT * code.depth + rows[n]
    # Trailing comments of consecutive fields (or imports) of one body share a column.
    run: list[int] = []
    for n, line in enumerate([*lines, None]):
        if (line is not None and line.trailing and not line.before and not line.blank and run
                and (lines[run[-1]].depth, lines[run[-1]].field) == (line.depth, line.field) and not line.closing):
            run.append(n)
            continue
        width = max((_last_row(rows[k]) for k in run), default=0) + 2
        for k in run:
            rows[k] = rows[k] + " " * (width - _last_row(rows[k])) + (lines[k].trailing or "")
        run = [n] if line is not None and line.trailing else []
    out: list[str] = []
    prev_open = True
    for n, line in enumerate(lines):
        pad = INDENT * (line.depth + (1 if line.closing else 0))
        for com, blank in line.before or ():
            if blank and not prev_open:
                out.append("")
            out.append(pad + com)
            prev_open = False
        if line.blank and not prev_open and not line.closing:
            out.append("")
        out.append(rows[n])
        # a doc comment ending in "{" has always counted as an opening line: kept, so that no laid-out spec changes
        prev_open = line.opens or (line.doc and line.cells[0].endswith("{"))
    for com, blank in tail:
        if blank and out:
            out.append("")
        out.append(com)
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
        _COMMENTS.found = []
        try:
            lines: list[_Line] = _layout_parser().parse(source)  # type: ignore[assignment]
        finally:
            comments, _COMMENTS.found = _COMMENTS.found, []
    _depths(lines)
    tail = _place_comments(lines, comments)
    del comments
    return _render(lines, tail)


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
