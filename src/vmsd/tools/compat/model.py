"""What `vmsd compat` compares: each side's sections as wire layouts, and the findings.

A :class:`Desc` is one VMState description reduced to what decides the bytes on the wire: fields in
order with the version they appear in, their element size and count, the condition that guards them,
nested descriptions and subsections with the condition under which they are sent.  Every kind of input
(a shipped spec set, a folder of specs, a ``-dump-vmstate`` file, a stream) becomes these, so one set
of rules compares any two of them.
"""

from __future__ import annotations

import attrs

# A subsection's ``needed`` when a stream shows it was sent (a definite answer, not a predicate).
SENT = "sent in this stream"
# A subsection's ``needed`` when the input does not say (a -dump-vmstate file has no predicates).
UNKNOWN = "SOURCE's predicate (a -dump-vmstate file does not name it)"

FAIL, CHANGED, INFO = "fail", "changed", "info"


@attrs.frozen
class Field:
    name: str
    size: int | None  # wire bytes of one element; None when unknown (a dump's struct sizes are C sizes)
    count: int | None  # elements; None when variable or unknown (7.2's dumps print no "num")
    since: int = 0  # the section version the field appears in
    cond: str | None = None  # the field_exists test guarding it, in words; None: none
    type: str | None = None  # QEMU's type name (uint8, struct, unused_buffer ...); None when unknown
    struct: Desc | None = None  # nested description (struct, vstruct, tmp)
    unused: bool = False  # VMSTATE_UNUSED padding
    c_size: bool = False  # ``size`` is the C field's (a dump's), which some types do not put on the wire as is
    # Its count is another field's or the device configuration's (a spec's ``x[count]``, ``x[custom(N)]``): it
    # may be 0, and a stream's description then has no entry for it.
    varying: bool = False

    def wire_bytes(self) -> int | None:
        """Bytes of all elements; None when a size or the count is not fixed."""
        if self.size is None or self.count is None:
            return None
        return self.size * self.count


@attrs.frozen
class Desc:
    name: str
    version: int
    minimum: int
    fields: tuple[Field, ...]
    subsections: tuple[Desc, ...] = ()
    needed: str | None = None  # of a subsection: when it is sent, in words; None: always
    origin: str = ""  # where it came from, for messages (a dump's device type)
    actual: bool = False  # what one stream carried: its subsections are those sent, nothing more
    # Of a stream's description, with the saving QEMU's -dump-vmstate given: the fields that QEMU's
    # description has and the stream does not carry (a test that was false, an empty array).  None: not known.
    left_out: frozenset[str] | None = None

    def wire_fields(self, version: int) -> list[Field]:
        """The fields a section of this description carries at ``version`` (QEMU's ``version_id <= v``)."""
        return [f for f in self.fields if f.since <= version]


@attrs.define
class StreamFacts:
    """What a stream SOURCE shows beyond its sections' layouts."""

    commands: list[str] = attrs.Factory(list)  # command names in stream order (each once)
    capabilities: list[str] = attrs.Factory(list)  # the configuration record's validated capabilities
    # idstr, instance id, version and vmsd name of each section that has no VMState layout (ram, legacy)
    unstructured: list[tuple[str, int, int]] = attrs.Factory(list)


@attrs.define
class Section:
    """One section SOURCE sends: its name in messages, the version on the wire and its layout."""

    label: str  # idstr (and instance) for a stream, the vmsd name or device type otherwise
    vmsd: str
    version: int
    desc: Desc
    versioned: bool = True  # the configuration record carries no version: QEMU loads it at 0


@attrs.define
class Side:
    label: str  # as named on the command line
    kind: str  # "qemu", "specs", "dump" or "stream"
    version: str | None  # the QEMU version, when known
    # Descriptions by vmsd name; a dump may hold several under one name (isa-vga's and VGA's "vga").
    descs: dict[str, list[Desc]]
    # Top-level sections, in order: what this side sends as SOURCE.
    sections: list[Section]
    machine: str | None = None  # the machine type a stream or a dump names
    stream: StreamFacts | None = None
    # Whether a section missing from it means its QEMU lacks that section: true for a dump (every
    # device type of the binary) and a folder; a shipped set covers some devices only.
    complete: bool = True


@attrs.frozen
class Finding:
    category: str  # FAIL, CHANGED or INFO
    section: str | None
    field: str | None
    message: str
