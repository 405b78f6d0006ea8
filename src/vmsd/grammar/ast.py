"""Frozen AST of .vmsd files: what the text says, with positions, nothing resolved."""

from __future__ import annotations

import attrs


@attrs.frozen
class Pos:
    path: str
    line: int
    col: int


# ---- expressions -----------------------------------------------------------


@attrs.frozen
class IntLit:
    value: int
    pos: Pos


@attrs.frozen
class VersionRef:
    pos: Pos


@attrs.frozen
class Ref:
    """``name`` or ``name.member.member``."""

    parts: tuple[str, ...]
    pos: Pos


@attrs.frozen
class LenCall:
    ref: Ref
    pos: Pos
    # "len", or "custom" as a whole struct array length (a property of the registered class);
    # anything else is reported by the checker
    function: str = "len"


@attrs.frozen
class UnOp:
    op: str
    operand: Expr
    pos: Pos


@attrs.frozen
class BinOp:
    op: str
    left: Expr
    right: Expr
    pos: Pos


Expr = IntLit | VersionRef | Ref | LenCall | UnOp | BinOp


@attrs.frozen
class Custom:
    """``custom(method)``: a predicate the device author implements."""

    method: str
    pos: Pos


Condition = Expr | Custom

# ---- declarations -----------------------------------------------------------


@attrs.frozen
class Field:
    kind: str  # a name of vmsd.runtime.kinds.KINDS
    name: str | None
    pos: Pos
    type: str = ""  # scalar type, or referenced vmsd for struct/list/map
    dims: tuple[Expr, ...] = ()
    wire_name: str | None = None
    enum: str | None = None
    enum_pos: Pos | None = None
    default: int | float | bool | None = None
    default_pos: Pos | None = None
    check: str | None = None  # equal | le
    since: int = 0
    since_pos: Pos | None = None
    exists: Condition | None = None
    nullable: bool = False
    struct_version: int | None = None
    tmp: bool = False  # VMSTATE_WITH_TMP: nested fields inline, loaded at the field's version
    info: str | None = None  # QEMU type name of an opaque buffer (``pci config``)
    list_kind: str = ""
    key: str | None = None  # map key: scalar type or vmsd name
    size: int = 0  # unused
    expr: Expr | None = None  # validate
    doc: str | None = None


@attrs.frozen
class Subsection:
    name: str
    version: int
    minimum: int
    needed: Condition | None
    fields: tuple[Field, ...]
    subsections: tuple[Subsection, ...]
    pos: Pos
    doc: str | None = None


@attrs.frozen
class Vmsd:
    name: str
    version: int
    minimum: int
    class_name: str | None
    fields: tuple[Field, ...]
    subsections: tuple[Subsection, ...]
    pos: Pos
    version_pos: Pos
    minimum_pos: Pos
    doc: str | None = None
    class_pos: Pos | None = None  # of the name after 'class'


@attrs.frozen
class EnumMember:
    name: str
    value: int
    pos: Pos
    doc: str | None = None


@attrs.frozen
class Enum:
    name: str
    base: str
    flags: bool
    members: tuple[EnumMember, ...]
    pos: Pos
    doc: str | None = None


@attrs.frozen
class Import:
    path: str
    pos: Pos


@attrs.frozen
class SpecFile:
    path: str
    source: str
    imports: tuple[Import, ...]
    enums: tuple[Enum, ...]
    vmsds: tuple[Vmsd, ...]
