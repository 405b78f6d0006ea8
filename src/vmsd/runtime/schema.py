"""Static descriptions of generated vmsds, as data.

Generated modules attach one :class:`VmsdSpec` to each class.  The runtime
walks these tables to produce QEMU's JSON descriptions (the stream trailer
and the ``-dump-vmstate`` form); load and save never consult them.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class FieldSpec:
    name: str  # QEMU's name in JSON, already numbered (``unused[1]``)
    attr: str | None  # Python attribute; None for unused and validate
    info: str  # QEMU's type name in JSON (``uint8``, ``int32 equal``, ``struct`` …)
    kind: str  # a name of vmsd.runtime.kinds.KINDS
    elem_size: int = 0  # wire bytes of one element when fixed
    dims: tuple[int, ...] = ()  # fixed dimensions; () for a single element
    count_attr: str | None = None  # attribute holding a variable count
    multiply: int = 1
    since: int = 0
    test: str | None = None  # method (self, version_id) -> bool deciding presence
    struct: Any = None  # nested generated class (struct, list and map values)
    key: Any = None  # map key class, or None for direct integer keys
    struct_version: int | None = None
    inline: bool = False  # vstruct and tmp: the nested body's keys sit in the field entry
    nullable: bool = False
    flags: tuple[str, ...] = ()  # QEMU VMS_* flags, for dump and compatibility checks


@attrs.frozen
class SubsectionSpec:
    name: str
    version: int
    minimum: int
    needed: str | None  # method (self, version_id) -> bool; None = always sent
    fields: tuple[FieldSpec, ...]
    subsections: tuple[SubsectionSpec, ...] = ()


@attrs.frozen
class VmsdSpec:
    name: str
    version: int
    minimum: int
    fields: tuple[FieldSpec, ...]
    subsections: tuple[SubsectionSpec, ...] = ()

    def all_subsections(self) -> list[SubsectionSpec]:
        """Subsections at every depth, parents before children."""
        out: list[SubsectionSpec] = []
        todo = list(self.subsections)
        while todo:
            sub = todo.pop(0)
            out.append(sub)
            todo.extend(sub.subsections)
        return out

    def all_fields(self) -> list[FieldSpec]:
        """Fields of the vmsd and of all its subsections (they share one class)."""
        return [*self.fields, *(f for sub in self.all_subsections() for f in sub.fields)]
