"""Golden tests of bad specs: ``vmsd check`` must reject each with exactly the expected diagnostics.

Every folder under ``tests/bad_specs/`` is one case: ``spec.vmsd`` is the file checked (plus any file it
imports) and ``expected.txt`` is the exact stderr of ``vmsd check spec.vmsd`` run inside that folder.
Each spec holds a single mistake, so each golden shows one targeted diagnostic.

Regenerate the goldens with ``VMSD_UPDATE_GOLDEN=1 pytest tests/test_bad_specs.py``, then read the
diff: every message must point at the mistake and say the right thing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmsd.cli import EXIT_FINDINGS, main

BAD_SPECS = Path(__file__).parent / "bad_specs"
ROOT_SPEC = "spec.vmsd"
EXPECTED = "expected.txt"
MIN_CASES = 30
UPDATE = os.environ.get("VMSD_UPDATE_GOLDEN") == "1"

CASES = sorted(d for d in BAD_SPECS.iterdir() if d.is_dir()) if BAD_SPECS.is_dir() else []


@pytest.mark.parametrize("case_dir", CASES, ids=[d.name for d in CASES])
def test_bad_spec(case_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert (case_dir / ROOT_SPEC).is_file(), f"{case_dir.name}: every case needs a {ROOT_SPEC}"
    monkeypatch.chdir(case_dir)
    code = main(["check", ROOT_SPEC])
    out, err = capsys.readouterr()
    assert code == EXIT_FINDINGS, f"{case_dir.name}: vmsd check exited {code}, expected {EXIT_FINDINGS}\n{out}{err}"
    assert out == ""
    golden = case_dir / EXPECTED
    if UPDATE:
        golden.write_text(err, encoding="utf-8", newline="")
        return
    assert golden.is_file(), f"{case_dir.name}: no {EXPECTED}; run with VMSD_UPDATE_GOLDEN=1 to create it"
    with golden.open(encoding="utf-8", newline="") as fh:
        expected = fh.read()
    assert err == expected


def test_enough_bad_specs() -> None:
    assert len(CASES) >= MIN_CASES, f"only {len(CASES)} bad-spec cases under {BAD_SPECS}, want at least {MIN_CASES}"
