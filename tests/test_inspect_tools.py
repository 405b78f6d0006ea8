"""``vmsd inspect``/``rewrite`` on a real QEMU 7.2 stream: ``--strict``, ``--hooks``, one naming scheme with
``--set`` and ``diff``, and what the tree and the JSON show (hex values, indices, offsets, partial trees).

The stream is saved by QEMU (pc machine with a std VGA and an e1000: a PCI device with subsections, two ``dma``
instances); spec folders are written per test.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmsd.bundled import specs_dir
from vmsd.cli import main
from vmsd.migration.stream import SpecSet, Stream, layout_difference, read_stream, write_stream
from vmsd.qemu.v7_2 import spec_set
from vmsd.runtime.vmdesc import Obj, describe
from vmsd.testing.qmp import Qemu, save_stream
from vmsd.tools.streams import stream_json, strict_problems

E1000 = "0000:00:03.0/e1000"


@dataclass
class Real:
    data: bytes
    path: Path

    def stream(self) -> Stream:
        return read_stream(self.data, spec_set())


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Real:
    path = tmp_path_factory.mktemp("streams") / "pc.mig"
    save_stream(path, machine="pc", args=["-netdev", "user,id=n0", "-device", "e1000,netdev=n0", "-vga", "std"])
    return Real(path.read_bytes(), path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def spec_folder(tmp_path: Path, text: str, name: str = "port92.vmsd") -> Path:
    folder = tmp_path / "specs"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)
    return folder


# ---- --strict ---------------------------------------------------------------------------------------------

def test_strict_accepts_a_normal_stream_and_explains_the_machine_check(
        real: Real, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, "inspect", str(real.path), "--strict")
    assert (rc, err) == (0, "")
    # The nirq check fails against vmsd's default on every pc stream: a note saying why, no warning.
    assert not [line for line in out.splitlines() if line.startswith("warning:")]
    note = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "nirq" in note[0] and "chipset" in note[0]
    assert strict_problems(real.stream()) == []


def test_strict_names_the_field_a_wrong_spec_sizes_differently(
        real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = spec_folder(tmp_path, 'vmsd "port92" version 1 minimum 1 class Port92 {\n    uint16 outport\n}\n')
    rc, out, err = run(capsys, "inspect", str(real.path), "--specs", str(folder))
    assert rc == 0 and err == ""  # without --strict: decoded from the trailer, with a warning
    assert "field 'outport' is 2 bytes in the spec, 1 in the trailer" in out
    rc, out, err = run(capsys, "inspect", str(real.path), "--specs", str(folder), "--strict")
    assert rc == 1 and "FULL port92" in out
    assert err.splitlines() == [
        "vmsd inspect: error: strict: section 'port92': spec read 2 bytes, the trailer describes 1: "
        f"field 'outport' is 2 bytes in the spec, 1 in the trailer (at offset {_port92_body(real):#x})"]
    target = tmp_path / "out.mig"
    rc, _, err = run(capsys, "rewrite", str(real.path), "-o", str(target), "--specs", str(folder), "--strict")
    assert rc == 1 and "field 'outport'" in err and not target.exists()


def _port92_body(real: Real) -> int:
    sec = next(s for s in real.stream().full_sections() if s.idstr == "port92")
    return sec.offset + 1 + 4 + 1 + len("port92") + 8


def test_strict_refuses_a_section_version_qemu_refuses(
        real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/stream-errors.md, section-version-too-high: QEMU refuses it; strict inspect too."""
    timer = next(s for s in real.stream().full_sections() if s.idstr == "timer")
    at = timer.offset + 1 + 4 + 1 + len("timer") + 4
    assert struct.unpack_from(">I", real.data, at)[0] == timer.version_id
    path = tmp_path / "v3.mig"
    path.write_bytes(real.data[:at] + struct.pack(">I", timer.version_id + 1) + real.data[at + 4 :])
    assert run(capsys, "inspect", str(path))[0] == 0
    rc, _, err = run(capsys, "inspect", str(path), "--strict")
    assert rc == 1
    assert f"section 'timer': version {timer.version_id + 1} is newer than the spec's {timer.version_id}" in err


def test_strict_counts_sections_without_a_typed_spec(real: Real) -> None:
    conf = spec_set().lookup("configuration", "configuration")
    assert conf is not None
    stream = read_stream(real.data, SpecSet({"configuration": conf}))
    problems = strict_problems(stream)
    assert len(problems) == len(stream.full_sections()) - sum(1 for s in stream.full_sections() if s.idstr == "ram")
    assert all("has no typed spec" in p for p in problems)


def test_layout_difference_names_a_missing_subsection(real: Real) -> None:
    stream = real.stream()
    sec = next(s for s in stream.full_sections() if s.idstr == E1000)
    ours = describe(sec.payload, sec.version_id)[0]
    trailer = next(d for d in stream.trailer.get("devices") if d.get("name") == E1000)  # type: ignore[union-attr]
    assert layout_difference(ours, trailer) == ""
    subs = list(ours.get("subsections"))
    assert len(subs) >= 2
    fewer = Obj([(k, v) if k != "subsections" else (k, subs[1:]) for k, v in ours])
    name = subs[0].get("vmsd_name")
    assert layout_difference(fewer, trailer) == f"subsection '{name}' is in the stream but the spec did not read it"
    assert layout_difference(trailer, fewer) == f"the spec read subsection '{name}', which the trailer does not list"


# ---- --hooks and imports in --specs ----------------------------------------------------------------------

PREDICATE_SPEC = 'vmsd "port92" version 1 minimum 1 class Port92 {\n    uint8 outport if custom(has_outport)\n}\n'
HOOKS = '''from vmsd.runtime.vmstate import register
from vmsd_specs.port92 import Port92


@register
class Port92Model(Port92):
    def has_outport(self, version_id: int) -> bool:
        return True
'''


def test_hooks_implement_a_custom_predicate(real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = spec_folder(tmp_path, PREDICATE_SPEC)
    rc, out, err = run(capsys, "inspect", str(real.path), "--specs", str(folder), "--strict")
    assert rc == 1 and "needs custom predicates implemented (port92.has_outport)" in err
    assert "port92, decoded by trailer" in out
    hooks = tmp_path / "port92_hooks.py"
    hooks.write_text(HOOKS)
    rc, out, err = run(capsys, "inspect", str(real.path), "--specs", str(folder), "--strict", "--hooks", str(hooks))
    assert (rc, err) == (0, "") and "port92, decoded by spec" in out
    target = tmp_path / "out.mig"
    assert run(capsys, "rewrite", str(real.path), "-o", str(target), "--specs", str(folder), "--hooks",
               str(hooks), "--strict", "--set", "port92.outport=3")[0] == 0
    rc, out, _ = run(capsys, "diff", str(real.path), str(target), "--specs", str(folder), "--hooks", str(hooks))
    assert rc == 1 and out.splitlines() == ["port92 outport: 0 -> 3"]


@pytest.mark.parametrize("hook", ["no_such_module_xyz", "missing.py"])
def test_a_hooks_module_that_is_not_there_is_a_usage_error(
        real: Real, hook: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, "inspect", str(real.path), "--hooks", str(tmp_path / hook) if hook.endswith(".py")
                     else hook)
    assert rc == 2 and err.startswith("vmsd inspect: error: --hooks ")


def test_a_failing_hooks_module_is_one_error_line(real: Real, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    hooks = tmp_path / "broken.py"
    hooks.write_text("raise RuntimeError('not today')\n")
    rc, _, err = run(capsys, "inspect", str(real.path), "--hooks", str(hooks))
    assert rc == 1 and err.splitlines() == [
        f"vmsd inspect: error: --hooks {hooks}: importing it failed: RuntimeError: not today"]


def test_specs_imports_resolve_as_check_resolves_them(
        real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A shipped spec imported by a relative path works in both; a file outside the folder fails in both,
    with the same message."""
    deep = tmp_path / "specs" / "a" / "b"
    deep.mkdir(parents=True)
    shipped_pci = os.path.relpath(specs_dir() / "qemu" / "7.2" / "pci.vmsd", deep)
    (deep / "port92.vmsd").write_text(f'import "{shipped_pci}"\n'
                                      'vmsd "port92" version 1 minimum 1 class Port92 {\n    uint8 outport\n}\n')
    assert run(capsys, "check", str(deep / "port92.vmsd"))[0] == 0
    rc, out, _ = run(capsys, "inspect", str(real.path), "--specs", str(tmp_path / "specs"), "--strict")
    assert rc == 0 and "port92, decoded by spec" in out
    (tmp_path / "elsewhere.vmsd").write_text('vmsd "x" version 1 minimum 1 {\n    uint8 a\n}\n')
    (deep / "port92.vmsd").write_text('import "../../../elsewhere.vmsd"\n'
                                      'vmsd "port92" version 1 minimum 1 class Port92 {\n    uint8 outport\n}\n')
    rc_check, _, err_check = run(capsys, "check", str(deep / "port92.vmsd"))
    rc, _, err = run(capsys, "inspect", str(real.path), "--specs", str(tmp_path / "specs"))
    assert rc_check == rc == 1
    assert "outside the folders of the specs given" in err_check
    assert err == err_check  # the same located error, with its caret


# ---- one naming scheme -----------------------------------------------------------------------------------

def _json(real: Real, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    rc, out, _ = run(capsys, "inspect", "--json", str(real.path))
    assert rc == 0
    return json.loads(out)  # type: ignore[no-any-return]


@pytest.mark.parametrize(("idstr", "instance", "path"), [
    ("cpu", 0, "env.eip"),
    ("cpu", 0, "env.regs[2]"),
    ("cpu", 0, "env.segs[1].base"),
    ("cpu", 0, "cpu/poll_control_msr.env.poll_control_msr"),
    ("dma", 1, "command"),
    (E1000, 0, "eecd_state.val_in"),
    (E1000, 0, "e1000/full_mac_state.mac_reg[3]"),
    ("slirp", 0, "bootp_clients[3].allocated"),
])
def test_inspect_names_are_what_set_takes_and_diff_prints(
        real: Real, idstr: str, instance: int, path: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    section = f"{idstr}:{instance}" if instance else idstr
    # An array of numbers is one line (its elements by index); a struct array's elements have lines.
    base = path[: path.rindex("[")] if path.endswith("]") else path
    rc, tree, _ = run(capsys, "inspect", str(real.path))
    assert f" {base} (" in tree  # the tree prints the path as --set takes it
    doc = _json(real, capsys)
    rec = next(r for r in doc["records"]  # type: ignore[attr-defined]
               if r.get("idstr") == idstr and r.get("type") == "FULL" and r["instance_id"] == instance)
    assert base in rec["offsets"]
    out = tmp_path / "edited.mig"
    for name in (f"{section}.{path}", f"{section} {path}"):  # as inspect joins it, and as diff prints it
        assert run(capsys, "rewrite", str(real.path), "-o", str(out), "--force", "--set", f"{name}=5")[0] == 0
        rc, lines, _ = run(capsys, "diff", str(real.path), str(out))
        assert rc == 1 and len(lines.splitlines()) == 1 and lines.startswith(f"{section} {path}: "), lines


def test_instance_suffix_optional_when_unambiguous(real: Real, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "edited.mig"
    with_suffix = tmp_path / "suffix.mig"
    assert run(capsys, "rewrite", str(real.path), "-o", str(out), "--set", f"{E1000}.mac_reg[3]=7")[0] == 0
    assert run(capsys, "rewrite", str(real.path), "-o", str(with_suffix), "--set", f"{E1000}:0.mac_reg[3]=7")[0] == 0
    assert out.read_bytes() == with_suffix.read_bytes() != real.data
    rc, _, err = run(capsys, "rewrite", str(real.path), "-o", str(tmp_path / "x.mig"), "--set", "dma.command=1")
    assert rc == 1 and "several instances of 'dma': name one (dma:0, dma:1)" in err


def test_attribute_names_still_work(real: Real, tmp_path: Path) -> None:
    """The spelling --set took before (a typed section's Python attribute names) edits the same bytes."""
    old, new = tmp_path / "old.mig", tmp_path / "new.mig"
    assert main(["rewrite", str(real.path), "-o", str(old), "--set", "cpu.eip=0x1234"]) == 0
    assert main(["rewrite", str(real.path), "-o", str(new), "--set", "cpu.env.eip=0x1234"]) == 0
    assert old.read_bytes() == new.read_bytes() != real.data


def test_a_trailer_decoded_section_is_editable(real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = spec_folder(tmp_path, 'vmsd "port92" version 1 minimum 1 class Port92 {\n    uint16 outport\n}\n')
    out = tmp_path / "edited.mig"
    assert run(capsys, "rewrite", str(real.path), "-o", str(out), "--specs", str(folder),
               "--set", "port92.outport=2")[0] == 0
    rc, lines, _ = run(capsys, "diff", str(real.path), str(out))
    assert rc == 1 and lines.splitlines() == ["port92 outport: 0 -> 2"]


def test_json_fields_are_the_same_for_a_typed_and_a_trailer_decoded_section(real: Real) -> None:
    """The same stream read with its specs and with none (every section from the trailer): each section the
    specs decode has the same ``fields`` and ``offsets`` both ways, by the scheme's names."""
    typed, bare = stream_json(real.stream()), stream_json(read_stream(real.data, SpecSet()))
    pairs = [(a, b) for a, b in zip(typed["records"], bare["records"], strict=True) if a.get("decoded_by") == "spec"]
    assert len(pairs) > 20 and all(b["decoded_by"] == "trailer" for _, b in pairs if b["idstr"] != "slirp")
    for a, b in pairs:
        if a["idstr"] == "slirp":
            # A legacy save_state section: QEMU describes it as one buffer, only the spec knows its fields.
            assert "fields" not in b and b["legacy_bytes"]
            continue
        assert a["fields"] == b["fields"], a["idstr"]
        assert {k: v for k, v in a["offsets"].items() if v is not None} == b["offsets"], a["idstr"]
    cpu = next(a for a, _ in pairs if a["idstr"] == "cpu")
    obj = next(s for s in real.stream().full_sections() if s.idstr == "cpu").payload
    assert cpu["fields"]["env.eip"] == obj.eip and cpu["fields"]["env.segs"][1]["base"] == obj.segs[1].base
    assert "eip" not in cpu["fields"]  # the typed class's attribute names are gone from the JSON
    sent = [k for k in cpu["fields"] if k.startswith("cpu/")]
    assert sent and all(isinstance(cpu["fields"][k], dict) for k in sent)


# ---- what inspect shows ----------------------------------------------------------------------------------

def test_registers_in_hex_with_decimal(real: Real, capsys: pytest.CaptureFixture[str]) -> None:
    cpu = next(s for s in real.stream().full_sections() if s.idstr == "cpu").payload
    _, tree, _ = run(capsys, "inspect", str(real.path))
    assert cpu.eip >= 10
    assert f" env.eip (uint64, 8 bytes) = {cpu.eip:#x} ({cpu.eip})" in tree
    regs = ", ".join(str(v) if v < 10 else hex(v) for v in cpu.regs)
    assert f" env.regs (uint64, 128 bytes) = [{regs}]" in tree


def test_struct_array_elements_carry_their_index(real: Real, capsys: pytest.CaptureFixture[str]) -> None:
    cpu = next(s for s in real.stream().full_sections() if s.idstr == "cpu").payload
    _, tree, _ = run(capsys, "inspect", str(real.path))
    for i in range(len(cpu.segs)):
        assert f" env.segs[{i}]: struct segment" in tree
        assert f" env.segs[{i}].base (uint64, 8 bytes) = " in tree
    assert f" env.segs[{len(cpu.segs)}]" not in tree


def test_absent_subsections_are_marked(real: Real, capsys: pytest.CaptureFixture[str]) -> None:
    sec = next(s for s in real.stream().full_sections() if s.idstr == "cpu")
    sent = {s.get("vmsd_name") for s in describe(sec.payload, sec.version_id)[0].get("subsections") or []}
    _, tree, _ = run(capsys, "inspect", str(real.path))
    assert sent
    for sub in sec.payload.VMSD.subsections:
        assert (f"subsection {sub.name}: absent (not sent)" in tree) == (sub.name not in sent)
        assert (f"subsection {sub.name} v" in tree) == (sub.name in sent)


def test_json_configuration_uses_qemus_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The configuration record by QEMU's names, only what the stream carries, with the capabilities as names."""
    path = tmp_path / "caps.mig"
    with Qemu([]) as q:
        q.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
        q.migrate_to_file(path)
    code, out, _ = run(capsys, "inspect", "--json", str(path))
    assert code == 0
    conf = json.loads(out)["configuration"]
    assert conf["name"] == "pc-i440fx-7.2" and conf["len"] == len("pc-i440fx-7.2")
    assert conf["capabilities"] == ["x-ignore-shared"]
    assert conf["configuration/capabilities"]["caps_count"] == 1
    assert "target_page_bits" not in conf and "configuration/target-page-bits" not in conf  # 7.2 sends none


def test_json_has_the_machine_name_and_field_offsets(real: Real, capsys: pytest.CaptureFixture[str]) -> None:
    stream = real.stream()
    doc = _json(real, capsys)
    assert stream.configuration is not None
    assert doc["configuration"]["name"] == stream.configuration.state.name.decode()  # type: ignore[index]
    cpu = next(s for s in stream.full_sections() if s.idstr == "cpu").payload
    rec = next(r for r in doc["records"] if r.get("idstr") == "cpu")  # type: ignore[attr-defined]
    at = rec["offsets"]["env.eip"]
    assert struct.unpack_from(">Q", real.data, at)[0] == cpu.eip
    at = rec["offsets"]["env.segs[1].base"]
    assert struct.unpack_from(">Q", real.data, at)[0] == cpu.segs[1].base
    absent = [k for k, v in rec["offsets"].items() if v is None]
    assert absent and all("/" in k for k in absent)


def _section_lines(tree: str, idstr: str) -> list[str]:
    """The lines of section ``idstr`` in an inspect tree: its header and the indented lines below it."""
    lines = tree.splitlines()
    at = next(i for i, line in enumerate(lines) if f" FULL {idstr} id=" in line)
    end = next((i for i in range(at + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    return lines[at:end]


@pytest.mark.parametrize(("idstr", "field", "into", "failed", "last"), [
    # inside a struct array's element: the element's fields before it are shown
    ("cpu", "env.segs[1].base", 3, "env.segs[1].base", " env.segs[1].selector (uint32, 4 bytes) = "),
    # inside a subsection, in its 41st register: the subsection is shown begun (an array cut short is not)
    (E1000, "e1000/full_mac_state.mac_reg", 4 * 40 + 2, "e1000/full_mac_state.mac_reg[40]",
     " subsection e1000/full_mac_state v1"),
])
def test_a_cut_stream_shows_the_section_up_to_the_field_it_ends_in(
        real: Real, idstr: str, field: str, into: int, failed: str, last: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    whole = _json(real, capsys)
    rec = next(r for r in whole["records"] if r.get("idstr") == idstr)  # type: ignore[attr-defined]
    cut = rec["offsets"][field] + into
    path = tmp_path / "cut.mig"
    path.write_bytes(real.data[:cut])
    rc, out, err = run(capsys, "inspect", str(path))
    assert rc == 1 and err.startswith(f"vmsd inspect: error: section '{idstr}': {failed}: ") and " ended " in err
    assert f" ERROR in {failed}: " in out.splitlines()[-1]
    # The section's lines up to the cut, each as the whole stream's tree prints it (offset, path, value).
    _, full_tree, _ = run(capsys, "inspect", str(real.path))
    partial, full = _section_lines(out, idstr), _section_lines(full_tree, idstr)
    assert partial[0].endswith("decoded by spec] cut short by the error below")
    assert partial[0].split(" [")[0] == full[0].split(" [")[0]
    assert 10 < len(partial) - 1 < len(full) - 1 and set(partial[1:]) <= set(full[1:])
    shown = {line.split()[1] for line in partial[1:] if line.strip().startswith("0x")}
    assert all(rec["offsets"][p] < cut for p in shown if p in rec["offsets"])
    assert last in partial[-1]
    # --json: the records before, then this section marked partial, with the field values read.
    rc, text, _ = run(capsys, "inspect", "--json", str(path))
    doc = json.loads(text)
    last = doc["records"][-1]
    assert rc == 1 and last["idstr"] == idstr and last["partial"] is True and last["decoded_by"] == "spec"
    assert doc["error"]["section"] == idstr and doc["error"]["field"] == failed and doc["eof_offset"] is None
    assert last["offsets"] and all(rec["offsets"][k] == v for k, v in last["offsets"].items())
    assert {k: v for k, v in last["fields"].items() if k in rec["fields"] and not isinstance(v, dict | list)} == {
        k: rec["fields"][k] for k, v in last["fields"].items() if not isinstance(v, dict | list)}
    before = [r["idstr"] for r in whole["records"] if r.get("type") == "FULL" and r["offset"] < rec["offset"]]
    assert [r["idstr"] for r in doc["records"] if r.get("type") == "FULL"] == [*before, idstr]


def test_a_damaged_length_field_shows_what_it_made_the_spec_read(
        real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """hpet's timer count says 200 (it sent 3) in a stream without a trailer to fall back on: the spec reads
    200 timers from the bytes after them, and the footer is not where it should be."""
    stream = real.stream()
    whole = _json(real, capsys)
    rec = next(r for r in whole["records"] if r.get("idstr") == "hpet")  # type: ignore[attr-defined]
    assert rec["fields"]["num_timers"] == 3
    data = bytearray(real.data[: stream.eof_offset + 1])  # without the trailer
    data[rec["offsets"]["num_timers"]] = 200
    path = tmp_path / "damaged.mig"
    path.write_bytes(bytes(data))
    rc, out, err = run(capsys, "inspect", str(path))
    assert rc == 1 and err.startswith("vmsd inspect: error: section 'hpet': missing section footer for hpet")
    lines = _section_lines(out, "hpet")
    assert any(line.endswith(" num_timers (uint8, 1 bytes) = 0xc8 (200)") for line in lines)
    assert sum(": struct hpet_timer" in line for line in lines) == 200
    assert out.splitlines()[-1].split(" ERROR: ")[1].startswith("missing section footer for hpet")
    rc, text, _ = run(capsys, "inspect", "--json", str(path))
    doc = json.loads(text)
    assert rc == 1 and doc["records"][-1]["partial"] and doc["records"][-1]["fields"]["num_timers"] == 200
    assert len(doc["records"][-1]["fields"]["timer"]) == 200 and doc["error"]["field"] is None


def test_rewrite_is_still_byte_identical(real: Real) -> None:
    assert write_stream(real.stream()) == real.data
