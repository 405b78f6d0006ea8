"""The language's field kinds, one row each: what more than one stage asks of a kind.

A field's ``kind`` (``ast.Field.kind``, ``FieldSpec.kind`` in generated
tables) is a name from :data:`KINDS`.  The grammar's ``<kind>_field`` rules
produce the same names (tests/test_tables.py holds the two together).

Adding a kind (``fd``, QEMU's VMSTATE_FD, was the last) touches, in order:

1. ``grammar/vmsd.lark``: a ``<kind>_field`` rule, and an alternative of ``?field``.
2. ``grammar/parser.py``: ``_ToAst.<kind>_field`` builds the ``ast.Field``;
   a new clause also needs an attribute of ``ast.Field`` and a ``_ToAst``
   method, a new named terminal a ``_READABLE`` entry.
3. This table: a row.
4. ``grammar/semantic.py``: ``_Checker.check_fields``, the kind's own checks.
5. ``codegen/model.py``: ``annotation_and_default`` (Python type and default),
   ``load_field`` and ``save_field`` (the statements; ``fusable`` and
   ``fused`` if a fixed-size value should join fused runs), ``table_entry``
   (QEMU's JSON type name and VMS_* flags of its ``FieldSpec``), and
   ``fresh_value`` if a fresh instance must start from something else than
   its default.  The templates need nothing: they print what the model builds.
6. ``runtime/vmstate.py``: helpers the generated statements call, if any.
7. ``runtime/vmdesc.py``: ``_entry``, the size QEMU's JSON gives one element.
8. ``runtime/generic.py``: ``_decode_one`` and ``_encode_one``, unless QEMU's
   JSON type is a scalar of :data:`vmsd.runtime.scalars.BY_INFO` or raw bytes
   of its ``size``.
9. ``tools/importer.py``: ``_Decl.kind``, the spec text for QEMU's JSON type.
10. Tests: a field in ``specs/examples/kinds.vmsd`` (then ``vmsd compile``),
    ``tests/strategies.py`` ``_value`` to draw its values, bad specs for its
    checks; and a row in the field kinds of the language contract (design/language.md).
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Kind:
    name: str
    # Names a vmsd (``struct X``, ``list<X>``, ``map<K, X>``): the checker resolves
    # it, and values are built from the generated class.
    nested: bool = False
    # QEMU's JSON describes the value as one element: its dimension, if any, is
    # a length in bytes or bits, not an array of elements.
    whole: bool = False
    # ``len()`` of one value means something in a condition or validation.
    measured: bool = False


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("scalar"),
        Kind("bytes", whole=True, measured=True),
        Kind("unused", whole=True),
        Kind("struct", nested=True),
        Kind("bitmap", whole=True),
        Kind("list", nested=True, whole=True, measured=True),
        Kind("map", nested=True, whole=True, measured=True),
        Kind("validate"),
        Kind("opaque", whole=True),
        # A file descriptor (VMSTATE_FD); how it travels is the reader's and writer's
        # business (vmsd.runtime.io: a be32 number, or a byte with SCM_RIGHTS).
        Kind("fd"),
    )
}
