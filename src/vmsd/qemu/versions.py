"""The shipped QEMU spec sets by version, and which one a stream was written by.

A QEMU version's spec set lives in ``vmsd.qemu.vX_Y`` (its ``spec_set()``);
:data:`SPEC_SETS` lists them, oldest first.  A stream says which to use in
two ways, both read without decoding any section:

- its machine type (the configuration record, ``pc-i440fx-10.0``): QEMU
  knows no machine type newer than itself, so the writer is at least that
  version (``pc``/``q35`` aliases are resolved before they are saved);
- its JSON trailer, written by the QEMU that saved the stream: how it
  describes arrays (:func:`vmsd.runtime.vmdesc.array_rule`, the profile's
  ``vmdesc_array_runs`` and ``vmdesc_element_index``) and the field names
  of the vmsds a set has specs for (``num_timers`` or ``num_timers_save``).

:func:`choose` keeps the sets the machine type allows, takes those whose
specs name the trailer's fields best, among them those whose array rule the
trailer follows, and then the oldest (the machine type's own version when it
has a set).
"""

from __future__ import annotations

import importlib
import re
import struct
from typing import Any

import attrs

from vmsd.migration.stream import QEMU_VM_CONFIGURATION, QEMU_VM_FILE_MAGIC, SpecSet, find_trailer
from vmsd.runtime.vmdesc import Obj, array_rule

# Version -> module with ``spec_set()``; oldest first.
SPEC_SETS: dict[str, str] = {
    "7.2": "vmsd.qemu.v7_2",
    "10.0": "vmsd.qemu.v10_0",
    "11.1": "vmsd.qemu.v11_1",
}

_MACHINE_VERSION = re.compile(rb"-(\d+)\.(\d+)$")


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def spec_set(version: str) -> SpecSet:
    """The shipped spec set of QEMU ``version``; ValueError naming the known versions otherwise."""
    module = SPEC_SETS.get(version)
    if module is None:
        raise ValueError(f"no spec set for QEMU '{version}' (known: {', '.join(SPEC_SETS)})")
    found: SpecSet = importlib.import_module(module).spec_set()
    return found


def nearest(version: str) -> str:
    """The newest version with a spec set that is not newer than ``version`` (else the oldest): the set
    for a peer named by version (a live stream cannot be looked at before it is decoded)."""
    older = [v for v in SPEC_SETS if _key(v) <= _key(version)]
    return older[-1] if older else next(iter(SPEC_SETS))


@attrs.frozen
class Choice:
    version: str
    reason: str  # what in the stream decided it, for messages


def machine_type(data: bytes) -> bytes | None:
    """The machine type named by the stream's configuration record, if it has one."""
    if len(data) < 13 or struct.unpack_from(">I", data)[0] != QEMU_VM_FILE_MAGIC or data[8] != QEMU_VM_CONFIGURATION:
        return None
    n = struct.unpack_from(">I", data, 9)[0]
    name = data[13 : 13 + n]
    return name if len(name) == n else None


def machine_version(name: bytes | None) -> str | None:
    """``pc-q35-10.0`` -> ``10.0``; None for a name without a version."""
    m = _MACHINE_VERSION.search(name or b"")
    return f"{int(m.group(1))}.{int(m.group(2))}" if m else None


def _rule(specs: SpecSet) -> tuple[bool, bool] | None:
    """The trailer rule for arrays of the set's QEMU version (see :func:`vmsd.runtime.vmdesc.array_rule`)."""
    p = specs.profile
    return (p.vmdesc_array_runs, p.vmdesc_element_index) if p is not None else None


def _misnamed(specs: SpecSet, trailer: Obj) -> int:
    """How many top-level field names in the trailer's devices the set's specs of those vmsds lack."""
    count = 0
    devices = trailer.get("devices")
    for d in devices if isinstance(devices, list) else []:
        if not isinstance(d, Obj) or not isinstance(d.get("vmsd_name"), str):
            continue
        cls: Any = specs.get(d.get("vmsd_name"))
        fields = d.get("fields")
        if cls is None or not isinstance(fields, list):
            continue
        known = {f.name for f in cls.VMSD.fields}
        count += sum(1 for f in fields if isinstance(f, Obj) and f.get("name") not in known)
    return count


def choose(data: bytes) -> Choice:
    """The version whose spec set fits the stream ``data`` best (see the module's docstring)."""
    found = find_trailer(data)
    return choose_by(machine_type(data), found[1] if found is not None else None)


def choose_by(name: bytes | None, trailer: Obj | None) -> Choice:
    """:func:`choose` for a stream whose machine type ``name`` and ``trailer`` are known (a live one, after EOF)."""
    versions = list(SPEC_SETS)
    floor = machine_version(name)
    why = []
    if floor is not None:
        newer = [v for v in versions if _key(v) >= _key(floor)]
        versions = newer or versions[-1:]
        why.append(f"machine type {name.decode(errors='replace')}" if name else "")
    if trailer is not None and len(versions) > 1:
        # Field names first: they say which layouts encoded the sections.  The array rule only says who
        # wrote the description, which need not be the QEMU whose layouts these are (vmsd outgoing describes
        # a 7.2 snapshot's sections by its peer's rule), so it only breaks a tie.
        scores = {v: _misnamed(spec_set(v), trailer) for v in versions}
        best = min(scores.values())
        versions = [v for v in versions if scores[v] == best]
        rule = array_rule(trailer)
        if rule is not None and len(versions) > 1:
            versions = [v for v in versions if _rule(spec_set(v)) == rule] or versions
        why.append("the trailer")
    reason = " and ".join(w for w in why if w) or "nothing in the stream (the oldest set)"
    return Choice(versions[0], reason)
