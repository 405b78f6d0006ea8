"""Typing is tested, not assumed: mypy --strict over uses of generated classes.

In the style of mypy-protobuf's ``test_negative``: ``typing_cases/positive.py``
must type-check without a single error (and run), and ``typing_cases/negative.py``
must produce exactly the errors written on its lines as ``# E: <message>  [code]``
comments, no more and no fewer.  ``typing_cases/field_kinds.vmsd`` covers the
field kinds the shipped specs lack (bytes, bool, float, ...); it is compiled into
a temporary directory, so its generated module is type-checked strictly as well.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tokenize
import tomllib
from collections import Counter
from pathlib import Path

import pytest
from mypy import api as mypy_api

from vmsd.codegen.compiler import compile_specs

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).resolve().parent / "typing_cases"

# "negative.py:12: error: Unexpected keyword argument "baud" for "Serial"  [call-arg]"
MYPY_LINE = re.compile(r"^(?P<path>.+?):(?P<line>\d+): (?P<severity>error|warning|note): (?P<message>.*)$")
EXPECTED_MARK = "# E:"


class TypingEnv:
    """A mypy configuration over src/ and the modules compiled from the typing-case specs."""

    def __init__(self, base: Path) -> None:
        self.generated = base / "generated"
        for rel, text in compile_specs(sorted(CASES.glob("*.vmsd"))).items():
            target = self.generated / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        self.config = base / "mypy.ini"
        # The project's settings (pyproject.toml's [tool.mypy]) without its `files`, which
        # would replace the file we name; and a search path that finds src/ and the cases' modules.
        project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
        assert project["strict"] is True
        self.config.write_text(
            "[mypy]\n"
            "strict = True\n"
            f"python_version = {project['python_version']}\n"
            f"mypy_path = {ROOT / 'src'},{self.generated}\n"
            f"cache_dir = {base / 'mypy_cache'}\n",
            encoding="utf-8",
        )

    def mypy(self, case: Path) -> list[tuple[str, int, str, str]]:
        """Run mypy on one typing case; (path, line, severity, message) per reported line."""
        stdout, stderr, status = mypy_api.run(
            [
                "--config-file",
                str(self.config),
                "--show-error-codes",
                "--no-error-summary",
                "--hide-error-context",
                "--no-pretty",
                "--no-color-output",
                str(case),
            ]
        )
        assert status in (0, 1) and not stderr, f"mypy failed to run (status {status}):\n{stderr}{stdout}"
        found = []
        for line in stdout.splitlines():
            m = MYPY_LINE.match(line)
            assert m, f"unexpected mypy output line: {line!r}"
            found.append((_relative(m["path"]), int(m["line"]), m["severity"], _normalize(m["message"])))
        return found


def _relative(path: str) -> str:
    """A reported path, relative to typing_cases/ when it lies there."""
    p = Path(path).resolve()
    return str(p.relative_to(CASES)) if p.is_relative_to(CASES) else str(p)


def _normalize(message: str) -> str:
    return " ".join(message.split())


def _expected_errors(path: Path) -> Counter[tuple[int, str]]:
    """The ``# E:`` annotations of a case file: (line, message) pairs, one per annotation."""
    expected: Counter[tuple[int, str]] = Counter()
    source = path.read_text(encoding="utf-8")
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.string.startswith(EXPECTED_MARK):
            for message in tok.string.split(EXPECTED_MARK)[1:]:
                expected[(tok.start[0], _normalize(message))] += 1
    return expected


def _listing(case: str, errors: Counter[tuple[int, str]]) -> str:
    return "\n".join(f"  {case}:{line}: {message}" for (line, message) in sorted(errors.elements()))


@pytest.fixture(scope="module")
def typing_env(tmp_path_factory: pytest.TempPathFactory) -> TypingEnv:
    return TypingEnv(tmp_path_factory.mktemp("typing"))


def test_positive_cases_type_check_cleanly(typing_env: TypingEnv) -> None:
    reported = typing_env.mypy(CASES / "positive.py")
    errors = [
        f"{path}:{line}: {severity}: {message}" for path, line, severity, message in reported if severity != "note"
    ]
    assert not errors, "mypy --strict rejects correct uses:\n" + "\n".join(errors)


def test_positive_cases_run(typing_env: TypingEnv) -> None:
    """What type-checks also works: positive.py asserts its own round trips."""
    path = os.pathsep.join([str(ROOT / "src"), str(typing_env.generated)])
    done = subprocess.run(
        [sys.executable, "positive.py"],
        cwd=CASES,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_negative_cases_are_rejected_exactly(typing_env: TypingEnv) -> None:
    case = CASES / "negative.py"
    expected = _expected_errors(case)
    assert len(expected) >= 20, "negative.py lost its '# E:' annotations"
    reported = typing_env.mypy(case)
    elsewhere = [
        f"{path}:{line}: {message}"
        for path, line, severity, message in reported
        if severity == "error" and path != case.name
    ]
    assert not elsewhere, "mypy reports errors outside negative.py:\n" + "\n".join(elsewhere)
    actual: Counter[tuple[int, str]] = Counter(
        (line, message) for path, line, severity, message in reported if severity == "error" and path == case.name
    )
    missing = expected - actual
    unexpected = actual - expected
    assert not missing and not unexpected, (
        "mypy's errors differ from the '# E:' annotations of negative.py\n"
        f"expected but not reported:\n{_listing(case.name, missing)}\n"
        f"reported but not expected:\n{_listing(case.name, unexpected)}"
    )
