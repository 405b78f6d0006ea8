"""The Python names a spec's names become, and the names a generated module keeps for itself.

A generated module binds the spec's classes and enums at top level next to its own imports, and its
code reads builtins and its own local variables; a generated class holds the spec's fields and custom
predicates next to its base class's API, and its body reads annotations and defaults.  A spec name that
is one of those would break the module or silently change what its code means, so:

- a class or enum name, an enum member or a custom predicate that Python or the generated code needs is
  an error (these names are Python's only: the spec author picks another);
- a field keeps its name on the wire (QEMU's JSON description, error messages) and its Python attribute
  gets a trailing underscore instead: ``class`` becomes ``class_``, ``self`` becomes ``self_``.

Everything the generated module binds itself besides the names below starts with ``_`` (``_rt``,
``_schema``, ``_S0``, ``_at``...), which spec names may not.  ``tests/test_spec_names.py`` reads every
name the generated modules of the test specs bind and read, and fails when one is missing here.
"""

from __future__ import annotations

import keyword
import re

# keyword.kwlist, not the soft keywords: ``match``, ``case``, ``type`` and ``_`` are names everywhere a
# spec name goes, and the generated code must not depend on the Python version that compiled it.
KEYWORDS = frozenset(keyword.kwlist)

# The names a generated module imports (codegen/templates/module.py.j2).
IMPORTED = frozenset({"abc", "attrs", "enum", "struct", "Any", "ClassVar", "Self", "Iterator", "Sequence", "Reader", "Writer"})

# Builtins a generated class body or ``__init__`` reads (annotations, defaults, decorators): a field or a
# predicate of that name would shadow them in the class.
CLASS_BUILTINS = frozenset(
    {"bool", "bytearray", "bytes", "classmethod", "float", "int", "list", "object", "property", "range", "staticmethod",
     "str", "tuple"}
)

# Builtins read only inside generated methods, where the spec's fields are attributes of ``self``.
METHOD_BUILTINS = frozenset({"isinstance", "len", "NotImplemented", "OverflowError", "TypeError"})

# Parameters and local variables of generated functions that do not start with "_": a class or enum of
# that name would be hidden inside them.
LOCALS = frozenset(
    {"buf", "cls", "e", "i", "member", "new", "objs", "other", "out", "p", "r", "rows", "self", "value", "values", "version_id", "w", "x"}
)

# Attributes every generated class has besides its fields: the base class's API and the constants of
# the class.  ``vmsd.runtime.vmstate.VMStateObject`` adds none that does not start with "_" (tested).
CLASS_API = frozenset(
    {"load", "load_into", "save", "pre_load", "post_load", "pre_save", "post_save", "VMSD", "VMSD_NAME", "VERSION_ID", "MINIMUM_VERSION_ID"}
)

# Attributes of every enum member (an int with a name and a value); ``mro`` is refused by Python's enum.
ENUM_API = frozenset(n for n in dir(int) if not n.startswith("_")) | {"name", "value", "mro"}

# Names a class or enum may not take (class bodies read the constants of CLASS_API too).
MODULE_RESERVED = KEYWORDS | IMPORTED | CLASS_BUILTINS | METHOD_BUILTINS | LOCALS | CLASS_API

# Names a class member may not take, besides the module's own classes and enums.
MEMBER_RESERVED = KEYWORDS | IMPORTED | CLASS_BUILTINS | CLASS_API | {"self"}


def python_class_name(vmsd_name: str) -> str:
    """The class of a vmsd without a ``class`` clause: its words, capitalised and joined."""
    parts = [p for p in re.split(r"[^A-Za-z0-9]+", vmsd_name) if p]
    name = "".join(p[0].upper() + p[1:] for p in parts) or "Vmsd"
    return "V" + name if name[0].isdigit() else name


def module_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a generated class or enum (what uses it in every generated module), or None."""
    if name.startswith("_"):
        return "names starting with '_' are kept for the generated code"
    if name in KEYWORDS:
        return "it is a Python keyword"
    if name in IMPORTED:
        return "the generated module imports that name"
    if name in CLASS_BUILTINS or name in METHOD_BUILTINS:
        return "the generated code uses Python's builtin of that name"
    if name in CLASS_API:
        return "every generated class has an attribute of that name"
    if name in LOCALS:
        return "the generated code has a variable of that name"
    return None


def member_name_problem(name: str, module_names: frozenset[str]) -> str | None:
    """Why ``name`` cannot name a custom predicate (a method of the generated class), or None."""
    if name in MEMBER_RESERVED or name.startswith("_"):
        return module_name_problem(name)
    if name in module_names:
        return "a class or enum of this module has that name"
    return None


def enum_member_problem(name: str, module_names: frozenset[str]) -> str | None:
    """Why ``name`` cannot name a member of a generated enum, or None."""
    if name.startswith("_") or name in KEYWORDS or name in CLASS_BUILTINS:
        return module_name_problem(name)
    if name in ENUM_API:
        return "every enum member has an attribute of that name"
    if name in module_names:
        return "a class or enum of this module has that name"
    return None


def python_attr_name(name: str, module_names: frozenset[str]) -> str:
    """A field's attribute: its name, with a trailing underscore when the class or Python needs the name."""
    return name + "_" if name in MEMBER_RESERVED or name in module_names else name
