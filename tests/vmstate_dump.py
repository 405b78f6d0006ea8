"""Compare a spec's vmsd with QEMU's ``-dump-vmstate`` description of it (a test helper).

``differences(cls, desc)`` lists, as readable lines, where the generated
class's layout departs from QEMU's: vmsd name, versions, each field's name,
version, test, element count and size, nested vmsds and subsections (all of
them, whatever their ``needed``).  What the dump cannot tell apart is not a
difference: a size only for fields without a nested vmsd (QEMU prints a
struct's C size, vmsd its wire size) and when QEMU's is not 0 (a size or
count read from the device at run time prints 0), nor a C field wider than
the bytes that only older versions sent (QEMU's VMSTATE_*_HACK infos, such as
fw_cfg's cur_offset: a uint32 that version 1 streams carry as 2 bytes, which
QEMU loads and never saves); a count only when QEMU prints one (fixed
arrays); a field's version only above its vmsd's minimum (at or below it,
the field is always there).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from vmsd.runtime.schema import FieldSpec, SubsectionSpec, VmsdSpec
from vmsd.runtime.vmdesc import dump_vmstate
from vmsd.runtime.vmstate import impl


def dump(cmd: list[str], env: dict[str, str], machine: str, out: Path, timeout: float = 60.0) -> dict[str, Any]:
    """QEMU's ``-dump-vmstate`` of ``machine`` (QEMU ``cmd`` with extra ``env``), parsed."""
    subprocess.run([*cmd, "-M", machine, "-dump-vmstate", str(out)], env={**os.environ, **env}, check=True,
                   timeout=timeout, stdin=subprocess.DEVNULL, capture_output=True)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def by_vmsd_name(dumped: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The dump's descriptions by vmsd name (several device types may share one vmsd)."""
    return {entry["Description"]["name"]: entry["Description"]
            for entry in dumped.values() if isinstance(entry, dict) and "Description" in entry}


def differences(cls: Any, desc: dict[str, Any]) -> list[str]:
    """Where ``cls``'s layout and QEMU's dump ``desc`` of the same vmsd differ (empty when they agree)."""
    out: list[str] = []
    _compare(dump_vmstate(cls), desc, desc["name"], out, cls, cls.VMSD)
    return out


def _older_versions_only(cls: Any, field: FieldSpec) -> bool:
    """Whether ``field`` of ``cls`` is absent from what ``cls``'s current version saves (a fresh object)."""
    return field.test is not None and not getattr(impl(cls)(), field.test)(cls.VMSD.version)


def _numbered(names: list[str]) -> list[str]:
    # QEMU's trailer, and vmsd's field names with it, number a name repeated in one field list.
    seen: dict[str, int] = {}
    result = []
    for n in names:
        if names.count(n) > 1:
            result.append(f"{n}[{seen.get(n, 0)}]")
            seen[n] = seen.get(n, 0) + 1
        else:
            result.append(n)
    return result


def _since(field: dict[str, Any], minimum: int) -> int:
    return field["version_id"] if field["version_id"] > minimum else 0


def _compare(ours: dict[str, Any], theirs: dict[str, Any], path: str, out: list[str], cls: Any,
             spec: VmsdSpec | SubsectionSpec) -> None:
    """Append to ``out`` where ``ours`` (the dump of ``spec``, ``cls``'s vmsd or one of its subsections) and
    ``theirs`` differ."""
    for key in ("name", "version_id", "minimum_version_id"):
        if ours[key] != theirs[key]:
            out.append(f"{path}: {key} {ours[key]!r} here, {theirs[key]!r} in QEMU")
    minimum = theirs["minimum_version_id"]
    mine, qemu = ours.get("Fields", []), theirs.get("Fields", [])
    names = _numbered([f["field"] for f in qemu])
    if [f["field"] for f in mine] != names:
        out.append(f"{path}: fields {[f['field'] for f in mine]} here, {names} in QEMU")
    else:
        # The entries of ``mine`` are spec's fields, less the validations the dump leaves out.
        specs = [f for f in spec.fields if "VMS_MUST_EXIST" not in f.flags]
        for a, b, name, field in zip(mine, qemu, names, specs, strict=True):
            at = f"{path}.{name}"
            if _since(a, minimum) != _since(b, minimum):
                out.append(f"{at}: version_id {a['version_id']} here, {b['version_id']} in QEMU")
            if a["field_exists"] != b["field_exists"]:
                out.append(f"{at}: field_exists {a['field_exists']} here, {b['field_exists']} in QEMU")
            if "num" in b and a.get("num") != b["num"]:
                out.append(f"{at}: num {a.get('num')} here, {b['num']} in QEMU")
            if ("Description" in a) != ("Description" in b):
                out.append(f"{at}: {'a' if 'Description' in a else 'no'} nested vmsd here, not in QEMU")
            elif "Description" in a:
                _compare(a["Description"], b["Description"], at, out, field.struct, field.struct.VMSD)
            elif b["size"] and a["size"] != b["size"]:
                if a["size"] < b["size"] and _older_versions_only(cls, field):
                    continue
                out.append(f"{at}: size {a['size']} here, {b['size']} in QEMU")
    subs, qsubs = ours.get("Subsections", []), theirs.get("Subsections", [])
    if [s["name"] for s in subs] != [s["name"] for s in qsubs]:
        out.append(f"{path}: subsections {[s['name'] for s in subs]} here, {[s['name'] for s in qsubs]} in QEMU")
    else:
        for s, q, sub in zip(subs, qsubs, spec.subsections, strict=True):
            _compare(s, q, s["name"], out, cls, sub)
