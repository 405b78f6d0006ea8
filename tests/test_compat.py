"""`vmsd compat SOURCE DEST`: findings on small spec folders, streams written here, and the shipped
spec sets against the -dump-vmstate output of the QEMU binaries they describe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from private_peers import Peer
from vmsd.cli import main
from vmsd.migration.stream import (
    QEMU_VM_SECTION_FULL,
    Command,
    Configuration,
    MachineConfiguration,
    Section,
    Stream,
    regenerate_trailer,
    write_stream,
)
from vmsd.qemu.versions import spec_set
from vmsd.testing.qmp import QEMU_BINARY, Qemu
from vmsd.tools.compat import compat, model
from vmsd.tools.compat.model import CHANGED, FAIL, INFO, Finding
from vmsd.tools.compat.rules import check
from vmsd.tools.compat.sources import load_side, with_source_dump

DEV_V2 = """
vmsd "dev" version 2 minimum 1 class Dev {
    uint32 a
    uint16 b since 2
    uint8  c
    subsection "dev/extra" version 1 needed (a != 0) {
        uint32 extra
    }
}
"""


def _folder(tmp_path: Path, name: str, text: str) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "dev.vmsd").write_text(text)
    return str(d)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = main(["compat", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def _only(findings: list[Finding], *categories: str) -> list[Finding]:
    return [f for f in findings if f.category in categories]


def test_identical_folders_are_compatible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _folder(tmp_path, "a", DEV_V2), _folder(tmp_path, "b", DEV_V2)
    code, out = _run(capsys, a, b)
    assert code == 0
    assert out == {"source": a, "dest": b, "verdict": "compatible", "findings": []}


def test_version_too_new_for_dest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = _folder(tmp_path, "old", 'vmsd "dev" version 1 minimum 1 class Dev {\n    uint32 a\n    uint8 c\n}\n')
    new = _folder(tmp_path, "new", DEV_V2)
    code, out = _run(capsys, new, old)
    assert code == 1 and out["verdict"] == "incompatible"
    fails = [f for f in out["findings"] if f["category"] == FAIL]
    assert fails[0] == {"category": FAIL, "section": "dev", "field": None,
                        "message": "section version 2 is newer than DEST's 1"}
    # The other way, version 1 is within [1, 2]: the new DEST reads b only from version 2 on.
    assert _only(compat(old, new), FAIL, CHANGED) == []


def test_version_below_dest_minimum(tmp_path: Path) -> None:
    old = _folder(tmp_path, "old", 'vmsd "dev" version 1 minimum 1 class Dev {\n    uint32 a\n}\n')
    new = _folder(tmp_path, "new", 'vmsd "dev" version 3 minimum 2 class Dev {\n    uint32 a\n}\n')
    [f] = _only(compat(old, new), FAIL)
    assert f.section == "dev" and "older than DEST's minimum 2" in f.message


def test_missing_section_and_missing_field(tmp_path: Path) -> None:
    src = _folder(tmp_path, "src", DEV_V2 + 'vmsd "other" version 1 minimum 1 class Other {\n    uint8 x\n}\n')
    dst = _folder(tmp_path, "dst", DEV_V2.replace("    uint8  c\n", ""))
    fails = _only(compat(src, dst), FAIL)
    assert {(f.section, f.field) for f in fails} == {("other", None), ("dev", "c")}
    assert any("DEST has no section 'other'" in f.message for f in fails)
    assert any("SOURCE sends 'c' (1 bytes) after DEST's last field" in f.message for f in fails)


def test_size_change_fails(tmp_path: Path) -> None:
    src = _folder(tmp_path, "src", DEV_V2)
    dst = _folder(tmp_path, "dst", DEV_V2.replace("uint16 b since 2", "uint32 b since 2"))
    [f] = _only(compat(src, dst), FAIL, CHANGED)
    assert (f.category, f.field) == (FAIL, "b")
    assert "'b' (2 bytes) where DEST reads 'b' (4 bytes)" in f.message


def test_renamed_same_size_field_is_info_but_unrelated_name_is_changed(tmp_path: Path) -> None:
    src = _folder(tmp_path, "src", DEV_V2)
    renamed = _folder(tmp_path, "renamed", DEV_V2.replace("uint16 b since 2", "uint16 b_save since 2"))
    findings = compat(src, renamed)
    assert _only(findings, FAIL, CHANGED) == []
    assert [(f.field, f.message) for f in _only(findings, INFO)] == [
        ("b", "renamed to 'b_save' in DEST (same position, size and type: wire-compatible)")]
    other = _folder(tmp_path, "other", DEV_V2.replace("uint16 b since 2", "uint16 zz since 2"))
    [f] = _only(compat(src, other), FAIL, CHANGED)
    assert (f.category, f.field) == (CHANGED, "b") and "'zz'" in f.message
    signed = _folder(tmp_path, "signed", DEV_V2.replace("uint16 b since 2", "int16 b since 2"))
    [f] = _only(compat(src, signed), FAIL, CHANGED)
    assert f.category == CHANGED and "uint16" in f.message and "int16" in f.message


def test_field_split_with_the_same_bytes_is_changed(tmp_path: Path) -> None:
    src = _folder(tmp_path, "src", 'vmsd "g" version 1 minimum 1 class G {\n    uint8 s[8]\n    uint8 t\n}\n')
    dst = _folder(tmp_path, "dst", 'vmsd "g" version 1 minimum 1 class G {\n    uint8 s[4]\n    uint8 flag\n'
                                   '    unused 3\n    uint8 t\n}\n')
    [f] = _only(compat(src, dst), FAIL, CHANGED)
    assert f.category == CHANGED and "the same 8 bytes" in f.message


def test_subsection_missing_in_dest_names_its_predicate(tmp_path: Path) -> None:
    src = _folder(tmp_path, "src", DEV_V2)
    dst = _folder(tmp_path, "dst", DEV_V2[:DEV_V2.index("    subsection")] + "}\n")
    [f] = _only(compat(src, dst), FAIL, CHANGED)
    assert (f.category, f.section, f.field) == (FAIL, "dev", "dev/extra")
    assert f.message.startswith("fails when a != 0 holds: DEST has no subsection 'dev/extra'")
    # The other way round the subsection is only DEST's: harmless.
    [i] = compat(dst, src)
    assert (i.category, i.field) == (INFO, "dev/extra")


def _hpet_stream(path: Path, rtc_irq_level: int, commands: tuple[int, ...] = ()) -> str:
    base: Any = spec_set("7.2").get("hpet")

    class Hpet(base):  # type: ignore[misc,valid-type]
        def offset_needed(self, version_id: int) -> bool:
            return False  # the HPET is off: no offset subsection

    cls: Any = Hpet
    hpet = cls(num_timers=3, timer=[cls.VMSD.fields[5].struct() for _ in range(3)], rtc_irq_level=rtc_irq_level)
    records: list[Section | Command] = [Command(cmd, 0, b"") for cmd in commands]
    records.append(Section(QEMU_VM_SECTION_FULL, 1, 0, "hpet", 0, 2, payload=hpet, vmsd_name="hpet"))
    stream = Stream(configuration=Configuration(0, MachineConfiguration(b"pc-i440fx-7.2")), records=records)
    path.write_bytes(write_stream(stream, trailer=regenerate_trailer(stream)))
    return str(path)


def test_stream_source_answers_with_the_subsections_it_carries(tmp_path: Path) -> None:
    text = (Path(__file__).parents[1] / "specs" / "qemu" / "7.2" / "hpet.vmsd").read_text()
    start = text.index('    ## hpet_rtc_irq_level_needed.')
    end = text.index('    ## hpet_offset_needed')
    dst = _folder(tmp_path, "dst", text[:start] + text[end:])
    without = _hpet_stream(tmp_path / "without.mig", rtc_irq_level=0)
    assert _only(compat(without, dst), FAIL, CHANGED) == []
    carrying = _hpet_stream(tmp_path / "with.mig", rtc_irq_level=1)
    [f] = _only(compat(carrying, dst), FAIL, CHANGED)
    assert (f.section, f.field) == ("hpet", "hpet/rtc_irq_level")
    assert f.message == "DEST has no subsection 'hpet/rtc_irq_level' (this stream carries it)"


def _dump_file(path: Path, fields: list[tuple[str, int, bool]]) -> str:
    """A -dump-vmstate file with one device type "dev": fields as (name, size, has a field_exists test)."""
    desc = {"name": "dev", "version_id": 1, "minimum_version_id": 1, "Subsections": [],
            "Fields": [{"field": n, "version_id": 0, "field_exists": c, "size": size} for n, size, c in fields]}
    path.write_text(json.dumps({"dev": {"Name": "dev", "version_id": 1, "minimum_version_id": 1, "Description": desc}}))
    return str(path)


def _carried(names: list[str]) -> model.Side:
    """A stream SOURCE carrying one section "dev" with these one-byte fields."""
    desc = model.Desc("dev", 1, 1, tuple(model.Field(n, 1, 1, type="uint8") for n in names), actual=True)
    return model.Side("s.mig", "stream", None, {"dev": [desc]}, [model.Section("dev", "dev", 1, desc)],
                      stream=model.StreamFacts())


# Shaped like QEMU's esp across 7.2, 10.0 and 11.1: tests on the version the stream carries decide which
# fields a destination reads, and a newer QEMU renamed a field it reads only from old streams (mig_cmd).
OLD = [("x", 1, False), ("cmd", 1, True), ("lun", 1, True)]
NEW = [("x", 1, False), ("mig_cmd", 1, True), ("lun", 1, True), ("drq", 1, False)]
NEWER = [*NEW, ("asc", 1, True)]


def test_source_dump_tells_tests_of_dest_from_fields_the_stream_left_out(tmp_path: Path) -> None:
    old, new, newer = (_dump_file(tmp_path / f"{n}.json", f) for n, f in (("old", OLD), ("new", NEW), ("newer", NEWER)))
    # NEW saved x, lun, drq (its mig_cmd test false).  OLD has no mig_cmd: its own test decides cmd, and on
    # QEMU's esp it holds, so OLD reads cmd and lun from the bytes of lun and drq: it loads, meaning changed.
    stream = _carried(["x", "lun", "drq"])
    findings = check(with_source_dump(stream, load_side(new, "--source-dump")), load_side(old, "DEST"), None)
    assert [(f.category, f.field, f.message) for f in _only(findings, FAIL, CHANGED)] == [
        (CHANGED, "lun", "DEST reads another field, 'cmd', from these 1 bytes"),
        (CHANGED, "drq", "DEST reads another field, 'lun', from these 1 bytes")]
    # Without the saving QEMU's dump, a conditional field the stream does not carry counts as a false test.
    [f] = _only(check(stream, load_side(old, "DEST"), None), FAIL, CHANGED)
    assert (f.category, f.field) == (FAIL, "drq")
    # NEWER saved x, lun, drq, asc: NEW has mig_cmd too and skips it as NEWER did; asc is one byte too many.
    stream = _carried(["x", "lun", "drq", "asc"])
    [f] = _only(check(with_source_dump(stream, load_side(newer, "--source-dump")), load_side(new, "DEST"), None),
                FAIL, CHANGED)
    assert (f.category, f.field, f.message) == (FAIL, "asc", "SOURCE sends 'asc' (1 bytes) after DEST's last field")
    # OLD saved x, cmd, lun: NEW reads mig_cmd from cmd (a rename) and then drq, which OLD never sends.
    stream = _carried(["x", "cmd", "lun"])
    findings = check(with_source_dump(stream, load_side(old, "--source-dump")), load_side(new, "DEST"), None)
    assert [(f.category, f.field) for f in findings if f.section == "dev"] == [(INFO, "cmd"), (FAIL, "drq")]


def test_source_dump_knows_an_empty_array_from_a_missing_field(tmp_path: Path) -> None:
    # A variable array with no elements leaves no trace in a stream (memory hot-plug slots' devs).
    fields = [("x", 1, False), ("devs", 0, False)]
    dump = load_side(_dump_file(tmp_path / "d.json", fields), "DEST")
    stream = _carried(["x"])
    assert [f.field for f in _only(check(stream, dump, None), FAIL)] == ["devs"]
    source_dump = load_side(_dump_file(tmp_path / "s.json", fields), "--source-dump")
    assert _only(check(with_source_dump(stream, source_dump), dump, None), FAIL, CHANGED) == []


def test_source_dump_needs_a_stream_and_a_dump(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dump = _dump_file(tmp_path / "d.json", OLD)
    assert main(["compat", dump, dump, "--source-dump", dump]) == 2
    assert "only a stream SOURCE can use it" in capsys.readouterr().err


def test_stream_commands_and_machine_type_against_a_version(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    plain = _hpet_stream(tmp_path / "plain.mig", 0)
    code, out = _run(capsys, plain, "qemu:7.2")
    assert code == 0 and out["verdict"] == "compatible"
    switchover = _hpet_stream(tmp_path / "switch.mig", 0, commands=(11,))
    code, out = _run(capsys, switchover, "qemu:7.2")
    assert code == 1
    assert [f["message"] for f in out["findings"] if f["category"] == FAIL] == [
        "SOURCE sends command SWITCHOVER_START, which DEST's QEMU 7.2 does not know (added in 10.0)"]
    assert _only(compat(switchover, "qemu:10.0"), FAIL) == []
    [f] = _only(compat(plain, "qemu:7.2", machine="pc-q35-10.0"), FAIL)
    assert "machine type pc-q35-10.0 is newer than DEST's QEMU 7.2" in f.message


def test_spec_set_source_sends_switchover_start_by_machine_type() -> None:
    def fails(machine: str | None) -> list[str]:
        return [f.message for f in compat("qemu:10.0", "qemu:7.2", machine) if "SWITCHOVER_START" in f.message]

    assert fails("pc-i440fx-7.2") == []  # hw_compat_9_2 turns send-switchover-start off
    assert fails("pc-i440fx-10.0") == ["SOURCE sends command SWITCHOVER_START, which DEST's QEMU 7.2 does not know "
                                       "(added in 10.0)"]
    assert fails(None)[0].startswith("fails when the machine type is newer than 9.2")


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stream = _hpet_stream(tmp_path / "s.mig", 0)
    assert main(["compat", "qemu:7.2", stream]) == 2  # a stream is no DEST
    assert main(["compat", "qemu:9.9", "qemu:7.2"]) == 2
    assert main(["compat", "qemu:7.2", str(tmp_path / "absent.json")]) == 2
    assert main(["compat", "qemu:7.2"]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"hpet": {"Description": {"name": "hpet", "version_id": "2"}}}')
    assert main(["compat", "qemu:7.2", str(bad)]) == 1
    assert "'version_id' is not an integer" in capsys.readouterr().err


@pytest.mark.parametrize("text", [
    "[]",
    '{"x": 1}',
    '{"x": {"Description": {"name": "x", "version_id": 1, "Fields": {}}}}',
    '{"x": {"Description": {"name": "x", "version_id": 1, "Fields": [{"field": "a", "size": "1"}]}}}',
    '{"x": {"Description": {"name": "x", "version_id": 1, "Subsections": [1]}}}',
    '{"x": {"Description": ' * 400 + '{}' + '}}' * 400,
])
def test_malformed_dump_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    assert main(["compat", str(bad), "qemu:7.2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vmsd compat: error: ") and err.count("\n") == 1 and "internal" not in err


def test_truncated_stream_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    whole = Path(_hpet_stream(tmp_path / "s.mig", 1)).read_bytes()
    cut = tmp_path / "cut.mig"
    cut.write_bytes(whole[:40])
    assert main(["compat", str(cut), "qemu:7.2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vmsd compat: error: ") and "internal" not in err


# ---- the shipped spec sets against the dumps of the binaries they describe ----

# QEMU 11.1 migrates ich9_smb's irq_enabled and smb unconditionally; the 11.1 set reuses 7.2's spec,
# whose test (ich9_vmstate_need_smbus) is true for every machine type 11.1 has, so the bytes agree.
KNOWN_11_1 = {("ich9_smb", "irq_enabled"), ("ich9_smb", "smb")}


def _dump(cmd: list[str], env: dict[str, str], machine: str, out: Path) -> Path:
    subprocess.run([*cmd, "-M", machine, "-dump-vmstate", str(out)], env={**os.environ, **env}, check=True,
                   timeout=60, capture_output=True)
    return out


@pytest.fixture(scope="module")
def dumps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    assert shutil.which(QEMU_BINARY), f"{QEMU_BINARY} is required (scripts/setup.sh installs qemu-system-x86)"
    d = tmp_path_factory.mktemp("dumps")
    out = {"7.2": _dump([QEMU_BINARY], {}, "pc-i440fx-7.2", d / "7.2.json")}
    for version in ("10.0", "11.1"):
        peer = Peer.fetched(version)
        out[version] = _dump(peer.cmd, peer.env, "pc", d / f"{version}.json")
        out[f"{version}@7.2"] = _dump(peer.cmd, peer.env, "pc-i440fx-7.2", d / f"{version}-pc-7.2.json")
    return out


@pytest.mark.parametrize("version", ["7.2", "10.0", "11.1"])
def test_shipped_set_agrees_with_its_qemu_dump(dumps: dict[str, Path], version: str) -> None:
    findings = compat(f"qemu:{version}", str(dumps[version]))
    bad = {(f.section, f.field) for f in _only(findings, FAIL, CHANGED)}
    known = KNOWN_11_1 if version == "11.1" else set()
    assert bad <= known, [f for f in findings if (f.section, f.field) in bad - known]
    # Sections the dump cannot show (no device type registers them) are named, not checked.
    [skipped] = [f for f in findings if f.message.startswith("not checked")]
    assert "cpu" in skipped.message and "globalstate" in skipped.message


def _field(desc: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The first field called ``name`` in ``desc`` or the descriptions nested in it (depth first)."""
    for f in desc.get("Fields", []):
        if f["field"] == name:
            return f  # type: ignore[no-any-return]
        found = _field(f["Description"], name) if "Description" in f else None
        if found is not None:
            return found
    return None


def test_shipped_set_comparison_reaches_nested_structs(dumps: dict[str, Path], tmp_path: Path) -> None:
    # xhci's event queue sits two structs deep (xhci-core, xhci-intr); a field only the dump has there must show.
    dumped = json.loads(dumps["7.2"].read_text())
    xhcis = [e["Description"] for e in dumped.values() if isinstance(e, dict) and e.get("Description", {}).get("name") == "xhci"]
    assert xhcis
    for desc in xhcis:
        queue = _field(desc, "ev_buffer")
        assert queue is not None
        queue["Description"]["Fields"].insert(0, {"field": "extra", "version_id": 0, "field_exists": False, "size": 4})
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(dumped))
    bad = {(f.section, f.field) for f in _only(compat("qemu:7.2", str(edited)), FAIL, CHANGED)}
    assert bad == {("xhci", "xhci.intr.ev_buffer.extra")}


def test_dumps_of_7_2_and_10_0_for_pc_i440fx_7_2(dumps: dict[str, Path]) -> None:
    forward = compat(str(dumps["7.2"]), str(dumps["10.0@7.2"]))
    backward = compat(str(dumps["10.0@7.2"]), str(dumps["7.2"]))

    def find(findings: list[Finding], section: str, field: str | None) -> list[Finding]:
        return [f for f in findings if f.section == section and f.field == field]

    # hpet's num_timers -> num_timers_save is a rename, both ways (QEMU's static checker reports it).
    [f] = find(forward, "hpet", "num_timers")
    assert f.category == INFO and "renamed to 'num_timers_save'" in f.message
    assert find(backward, "hpet", "num_timers_save")[0].category == INFO
    # esp: version 7 > 6 is harmless in itself (a nested description loads at DEST's version), but
    # 10.0 appends drq_state, which 7.2 does not read.
    [drq] = find(backward, "sysbus-esp", "esp.drq_state")
    assert drq.category == FAIL and "after DEST's last field" in drq.message
    # acpi-ged/cpuhp exists only in 10.0: a failure when 10.0 sends it, harmless the other way.
    [cpuhp] = find(backward, "acpi-ged", "acpi-ged/cpuhp")
    assert cpuhp.category == FAIL and cpuhp.message.startswith("fails when SOURCE sends subsection")
    assert find(forward, "acpi-ged", "acpi-ged/cpuhp")[0].category == INFO
    # e1000e: two interrupt flags became padding (10.0 ignores them; 7.2 reads its flags from padding).
    assert {f.category for f in find(forward, "e1000e", "core.itr_intr_pending")} == {INFO}
    assert {f.category for f in find(backward, "e1000e", "unused[0]") + find(backward, "e1000e", "unused[1]")} == {CHANGED}
    assert any(f.category == FAIL for f in forward) and any(f.category == FAIL for f in backward)


def _saved_stream(out: Path, peer: Peer | None, machine: str) -> str:
    if peer is None:
        with Qemu([], machine=machine, memory="32M") as q:
            q.migrate_to_file(out, timeout=30)
    else:
        with peer.start([], machine=machine) as q:
            q.migrate_to_file(out, timeout=30)
    return str(out)


def test_real_streams_against_spec_sets(tmp_path: Path) -> None:
    own = _saved_stream(tmp_path / "72.mig", None, "pc")
    findings = compat(own, "qemu:7.2")
    assert _only(findings, FAIL, CHANGED) == [], findings
    qemu11 = Peer.fetched("11.1")
    new = _saved_stream(tmp_path / "111.mig", qemu11, "pc")
    assert _only(compat(new, "qemu:11.1"), FAIL, CHANGED) == []
    fails = [f.message for f in _only(compat(new, "qemu:7.2"), FAIL)]
    assert fails == ["machine type pc-i440fx-11.1 is newer than DEST's QEMU 7.2, which does not know it",
                     "SOURCE sends command SWITCHOVER_START, which DEST's QEMU 7.2 does not know (added in 10.0)"]
    # With the old machine type 11.1 sends no SWITCHOVER_START; what is left is globalstate's new split.
    old_machine = _saved_stream(tmp_path / "111-72.mig", qemu11, "pc-i440fx-7.2")
    findings = compat(old_machine, "qemu:7.2")
    assert _only(findings, FAIL) == []
    assert [(f.section, f.field) for f in _only(findings, CHANGED)] == [("globalstate", "runstate")]
