"""Bounds on what a spec may ask of the compiler.

A spec is untrusted input: every recursion over it and every size it names
is capped here, so that a hostile or broken spec gets one located error
instead of a RecursionError, a MemoryError or minutes of work.  The values
are far above what QEMU's own VMState descriptions need (docs/limits.md).
"""

from __future__ import annotations

# Bytes of one spec file; a bigger file is refused before it is parsed.
MAX_SPEC_BYTES = 4 << 20
# Bytes of all the files of one program together.
MAX_PROGRAM_BYTES = 16 << 20
# Files in one program (the files asked for and everything they import).
MAX_SPEC_FILES = 1024
# Length of an import chain (a imports b imports c ...).
MAX_IMPORT_DEPTH = 32
# Depth of an expression tree: nested parentheses, chained unary operators and
# each operator of a chain such as 'a && b && c' count one level.  The
# generated Python nests about two parentheses per level; Python's parser
# stops at 200.
MAX_EXPR_DEPTH = 64
# Subsections inside subsections.
MAX_SUBSECTION_DEPTH = 16
# Structs inside structs (longest chain of plain struct fields); loading and
# saving recurse once per level.
MAX_STRUCT_DEPTH = 32
# Characters of one number literal: a 64-bit value in binary with separators
# fits; Python's int() refuses over 4,300 digits and is quadratic below that.
MAX_LITERAL_CHARS = 100
# Bytes of one 'unused' field (QEMU's VMSTATE_UNUSED are a few bytes).
MAX_UNUSED_BYTES = 1 << 20
