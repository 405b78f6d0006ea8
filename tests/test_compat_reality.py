"""Real migrations between QEMU 7.2, 10.0 and 11.1 against the recorded outcomes, and `vmsd compat` against them.

Each case of :func:`vmsd.testing.compat_matrix.cases` runs for real (source QEMU saves its paused
default-device machine, destination QEMU loads it and resumes): its outcome must equal the one in
tests/data/compat_reality.json, which docs/compat-verified.md shows as a table.  When reality changes
(a new Debian build of a QEMU, say), these tests fail until the data file is recorded again with
``python -m vmsd.testing.compat_matrix > tests/data/compat_reality.json`` and the table updated.

`vmsd compat` is then held to the same migrations (skipped while vmsd.tools.compat does not exist), with
what it says recorded in tests/data/compat_findings.json (``python -m vmsd.tools.compat.verified``) and
shown in the same doc, so neither can drift from what it reports now:

* ``vmsd compat STREAM DUMP_D --source-dump DUMP_S`` (the stream the source really sent against the
  destination's -dump-vmstate) must give the destination's verdict in every case, SCSI adapter included,
  and each "fail" finding must name the section QEMU refused;
* ``vmsd compat STREAM qemu:D`` the same where the spec set describes every device;
* on spec sets, ``vmsd compat qemu:S qemu:D --machine M`` judges every state a machine could be in
  (a conditional subsection counts as sent), so it may say "incompatible" where this stream loads,
  but never less than the stream check: a "compatible" verdict must be confirmed by the real
  migration loading, and every section the stream check fails must fail here too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cli_process import SRC
from vmsd.testing.compat_matrix import (
    CONFIGURATIONS,
    VERSIONS,
    Case,
    CompatRunError,
    Outcome,
    cases,
    failing_section,
    load_stream,
    record,
    save_source_stream,
    table,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "compat_reality.json"
DOC = ROOT / "docs" / "compat-verified.md"
FINDINGS = ROOT / "tests" / "data" / "compat_findings.json"
RECORDED: dict[str, dict[str, Any]] = {
    f"{r['source']}->{r['dest']} {r['configuration']}": r for r in json.loads(DATA.read_text())["migrations"]
}
# What `vmsd compat` said about each case (vmsd.tools.compat.verified), shown in docs/compat-verified.md.
JUDGED: dict[str, dict[str, Any]] = {
    f"{r['source']}->{r['dest']} {r['configuration']}": r for r in json.loads(FINDINGS.read_text())["findings"]
}
CASES = cases()
HAVE_COMPAT = importlib.util.find_spec("vmsd.tools.compat") is not None
needs_compat = pytest.mark.skipif(not HAVE_COMPAT, reason="vmsd compat (vmsd.tools.compat) is not in this tree yet")


class Migrations:
    """Each case migrated at most once per session, its stream kept for the compat tests."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.done: dict[str, tuple[Outcome, Path]] = {}

    def run(self, case: Case) -> tuple[Outcome, Path]:
        if case.id not in self.done:
            stream = self.folder / f"{len(self.done)}.stream"
            self.done[case.id] = (case.migrate(stream), stream)
        return self.done[case.id]


@pytest.fixture(scope="module")
def migrations(tmp_path_factory: pytest.TempPathFactory) -> Migrations:
    return Migrations(tmp_path_factory.mktemp("compat-reality"))


def test_data_covers_every_case_once() -> None:
    assert sorted(RECORDED) == sorted(case.id for case in CASES)
    assert len(CASES) == len(VERSIONS) ** 2 * len(CONFIGURATIONS)


def test_doc_table_is_the_recorded_data() -> None:
    expected = table(list(RECORDED.values()))
    assert expected in DOC.read_text(), f"docs/compat-verified.md should carry this table:\n{expected}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_real_migration_matches_record(case: Case, migrations: Migrations) -> None:
    outcome, _ = migrations.run(case)
    assert record(case, outcome) == RECORDED[case.id]


def test_a_refused_stream_is_seen_with_its_section(migrations: Migrations) -> None:
    """The harness's own control: another machine type at the destination is refused in `configuration`."""
    case = next(c for c in CASES if c.source == c.dest == "7.2" and c.configuration.machine == "pc-i440fx-7.2")
    _, stream = migrations.run(case)
    outcome = load_stream("11.1", "pc-q35-7.2", stream)
    assert not outcome.loads
    assert outcome.section == "configuration"
    assert "Machine type received is 'pc-i440fx-7.2' and local is 'pc-q35-7.2'" in outcome.error


def test_a_qemu_that_cannot_start_is_a_harness_error(tmp_path: Path) -> None:
    """Not an outcome: a machine type a version lacks stops the run with QEMU's own reason."""
    with pytest.raises(CompatRunError, match=r"QEMU 7\.2 \(pc-i440fx-99\.0\) did not start: .*unsupported machine type"):
        save_source_stream("7.2", "pc-i440fx-99.0", tmp_path / "stream")
    assert not (tmp_path / "stream").exists()


@pytest.mark.parametrize(("error", "section"), [
    # QEMU 7.2 prints each error on its own line, the newer versions chain them on one.
    ("qemu-system-x86_64: Unknown savevm section or instance '0000:00:04.0/virtio-rng' 0. Make sure that ...\n"
     "qemu-system-x86_64: load of migration failed: Invalid argument", "0000:00:04.0/virtio-rng"),
    ("qemu-system-x86_64: load of migration failed: Invalid argument: Unknown section or instance "
     "'0000:00:04.0/virtio-rng' 0. Make sure that ...", "0000:00:04.0/virtio-rng"),
    ("qemu-system-x86_64: Failed to load pciespscsi:esp\nqemu-system-x86_64: error while loading state for "
     "instance 0x0 of device '0000:00:04.0/pciespscsi'", "0000:00:04.0/pciespscsi"),
    ("qemu-system-x86_64: load of migration failed: Invalid argument: post load hook failed for: "
     "configuration, version_id: 1, minimum_version: 0: Machine type received is 'pc' and local is 'q35'",
     "configuration"),
    ("qemu-system-x86_64: savevm: unsupported version 9 for 'hpet' v2", "hpet"),
    ("qemu-system-x86_64: load of migration failed: Invalid argument: MIG_CMD 0x9 unknown (len 0x0)", None),
])
def test_failing_section_reads_qemus_messages(error: str, section: str | None) -> None:
    assert failing_section(error) == section


def compat_json(*args: str) -> tuple[int, dict[str, Any]]:
    """``vmsd compat ARGS --json`` of this checkout: exit status and the parsed report."""
    proc = subprocess.run([sys.executable, "-m", "vmsd", "compat", *args, "--json"], env={**os.environ, "PYTHONPATH": str(SRC)},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    fails = [f for f in report["findings"] if f["category"] == "fail"]
    assert report["verdict"] == ("incompatible" if fails else "compatible")
    assert proc.returncode == (1 if fails else 0)
    return proc.returncode, report


def fail_sections(report: dict[str, Any]) -> set[str]:
    return {f["section"] for f in report["findings"] if f["category"] == "fail"}


def same_section(finding: str, qemu: str) -> bool:
    """A finding may name the section by its idstr (``0000:00:04.0/pciespscsi``) or by its VMSD name."""
    return finding in (qemu, qemu.rsplit("/", 1)[-1])


@pytest.fixture(scope="module")
def dumps(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from vmsd.tools.compat.verified import Dumps

    return Dumps(tmp_path_factory.mktemp("compat-dumps"))


@needs_compat
def test_findings_data_covers_every_case_once() -> None:
    assert sorted(JUDGED) == sorted(case.id for case in CASES)


@needs_compat
def test_doc_findings_table_is_the_recorded_data() -> None:
    from vmsd.tools.compat.verified import table as findings_table

    expected = findings_table(list(JUDGED.values()), list(RECORDED.values()))
    assert expected in DOC.read_text(), f"docs/compat-verified.md should carry this table:\n{expected}"


@needs_compat
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_compat_agrees_with_the_destination(case: Case, migrations: Migrations, dumps: Any) -> None:
    """What `vmsd compat` says now is what the data file (and so the doc) says, and it matches reality."""
    from vmsd.tools.compat import compat
    from vmsd.tools.compat.verified import judge

    outcome, stream = migrations.run(case)
    judged = judge(case, stream, dumps)
    assert judged == JUDGED[case.id]
    real = "compatible" if outcome.loads else "incompatible"
    # The stream against D's dump sees every device, the SCSI adapter included: always reality's verdict,
    # and a refusal named in the section QEMU named.
    on_dump = judged["stream_vs_dump"]
    assert on_dump["verdict"] == real, on_dump
    if not outcome.loads:
        assert outcome.section is not None, outcome.error
        assert all(same_section(s, outcome.section) for s in fail_sections(on_dump)), (outcome.error, on_dump)
    # The stream against D's spec set: reality's verdict where the set describes every device; where it
    # does not, the section QEMU refused is one compat names as not checked.
    on_set = judged["stream_vs_spec_set"]
    if case.configuration.specs_cover:
        assert on_set["verdict"] == real, on_set
        assert all(same_section(s, outcome.section or "") for s in fail_sections(on_set)), (outcome.error, on_set)
    elif not outcome.loads:
        assert outcome.section is not None
        [skipped] = [f.message for f in compat(str(stream), f"qemu:{case.dest}") if f.message.startswith("not checked")]
        assert outcome.section in skipped
    # Spec sets alone judge every state a machine could be in: never more optimistic than reality for the
    # devices they describe.
    on_sets = judged["spec_sets"]
    if on_sets["verdict"] == "compatible" and case.configuration.specs_cover:
        assert outcome.loads, outcome.error
    assert fail_sections(on_set) <= fail_sections(on_sets), (on_set, on_sets)


ESP_CASES = [c for c in CASES if not c.configuration.specs_cover]


@needs_compat
@pytest.mark.parametrize("case", ESP_CASES, ids=lambda c: c.id)
def test_compat_names_esp_where_the_scsi_adapter_breaks(case: Case, migrations: Migrations, dumps: Any) -> None:
    """The command line with --source-dump: the real failures are "fail" findings on esp inside pciespscsi,
    and 10.0 -> 7.2, which loads, reads two of esp's bytes as other fields ("changed")."""
    outcome, stream = migrations.run(case)
    machine = case.configuration.machine
    code, report = compat_json(str(stream), str(dumps.get(case.dest, machine)),
                               "--source-dump", str(dumps.get(case.source, machine)))
    esp = [f for f in report["findings"] if f["section"] == "0000:00:04.0/pciespscsi" and f["category"] != "info"]
    assert code == (0 if outcome.loads else 1)
    assert all(f["field"].startswith("esp.") for f in esp), esp
    if not outcome.loads:
        assert [f for f in esp if f["category"] == "fail"], report
    elif (case.source, case.dest) == ("10.0", "7.2"):
        assert {f["category"] for f in esp} == {"changed"}, report
    else:
        assert esp == [], report
