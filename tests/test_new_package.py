"""``vmsd new`` starts a device package whose wheel ships typed state classes its consumers can check.

The first tests run ``vmsd new`` here and look at what it wrote.  The rest
go the way of a device author, in one fresh virtualenv holding the vmsd
wheel built from this checkout (with the compiler, hatchling, mypy and
pytest): the installed ``vmsd new`` makes the project (so the templates
are package data), pip builds its wheel through the build hook
(``--no-build-isolation``: the hook comes from that wheel, never from an
index), the wheel is installed, the project's own CI script passes, and
``mypy --strict`` on code outside the project that imports the installed
classes passes when they are used right and names each misuse.
"""

from __future__ import annotations

import os
import re
import tomllib
import zipfile
from pathlib import Path

import pytest

import vmsd
from installed import ENV, make_venv, ok, run
from vmsd.cli import main

NAME = "mydevice"
LAYOUT = [
    "ci/check.sh",
    "pyproject.toml",
    "specs/device.vmsd",
    f"src/{NAME}/__init__.py",
    f"src/{NAME}/py.typed",
    f"src/{NAME}/state/__init__.py",
    f"src/{NAME}/state/device.py",
    "tests/test_device.py",
]


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_new_writes_the_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["new", "my-device"]) == 0  # the name comes from the folder, '-' as '_'
    out = capsys.readouterr().out
    project = tmp_path / "my-device"
    assert _files(project) == [p.replace(NAME, "my_device") for p in LAYOUT]
    assert out.splitlines()[1:-1] == [f"  {p.replace(NAME, 'my_device')}" for p in LAYOUT]
    meta = tomllib.loads((project / "pyproject.toml").read_text())
    assert meta["build-system"]["requires"] == ["hatchling", f"vmsd[compiler]>={vmsd.__version__}"]
    assert meta["project"]["name"] == "my_device"
    assert meta["project"]["dependencies"] == [f"vmsd>={vmsd.__version__}"]
    assert meta["tool"]["hatch"]["build"]["hooks"]["vmsd"] == {"specs": "specs", "output": "src/my_device/state"}
    assert "vmsd compile -o src/my_device/state --check specs/*.vmsd" in (project / "ci/check.sh").read_text()
    assert 'vmsd "my_device" version 2 minimum 1 class DeviceState' in (project / "specs/device.vmsd").read_text()
    # The checked-in generated modules are what CI's `vmsd compile --check` expects.
    monkeypatch.chdir(project)
    assert main(["compile", "-o", "src/my_device/state", "--check", "specs/device.vmsd"]) == 0


def test_name_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["new", "board", "--name", NAME]) == 0
    assert _files(tmp_path / "board") == LAYOUT


@pytest.mark.parametrize(("argv", "message"), [
    (["new", "3d-printer"], "'3d_printer' is not a valid Python package name (from the folder name '3d-printer'; "
                            "pass --name)"),
    (["new", "dev", "--name", "my.device"], "'my.device' is not a valid Python package name:"),
    (["new", "dev", "--name", "class"], "'class' is not a valid Python package name:"),
    (["new", "json"], "'json' would shadow the module of that name (from the folder name 'json'; pass --name)"),
    (["new", "dev", "--name", "vmsd"], "'vmsd' would shadow the module of that name"),
])
def test_bad_names_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                               argv: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"vmsd new: {message}"), captured.err
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")
    assert main(["new", str(tmp_path), "--name", NAME]) == 2
    assert capsys.readouterr().err == f"vmsd new: {tmp_path} is not empty: give a new or empty folder\n"
    assert _files(tmp_path) == ["notes.txt"]
    (tmp_path / "file").write_text("")
    assert main(["new", str(tmp_path / "file"), "--name", NAME]) == 2
    assert capsys.readouterr().err == f"vmsd new: {tmp_path / 'file'} exists and is not a folder\n"


def test_an_empty_folder_is_used(tmp_path: Path) -> None:
    assert main(["new", str(tmp_path), "--name", NAME]) == 0
    assert _files(tmp_path) == LAYOUT


# --- as a device author, from the installed vmsd wheel ---------------------------------------------------------------

GOOD = f"""\
from {NAME}.state.device import DeviceState


def divisor(dev: DeviceState) -> int:
    # Absent from version 1 streams, so typed int | None: narrowed before use.
    return 1 if dev.divider is None else dev.divider


dev = DeviceState(ctrl=0x81, divider=12, regs=[1, 2, 3, 4])
wire: bytes = dev.save()
back = DeviceState.load(wire)
assert back == dev
print(divisor(back), sum(back.regs), len(wire))
"""

# Each misuse and the error mypy must report for its line, no more and no fewer.
BAD = [
    ('dev = DeviceState(ctrl="0x81")',
     'error: Argument "ctrl" to "DeviceState" has incompatible type "str"; expected "int"  [arg-type]'),
    ("dev.baud = 9600", 'error: "DeviceState" has no attribute "baud"  [attr-defined]'),
    ("divider: int = dev.divider",
     'error: Incompatible types in assignment (expression has type "int | None", variable has type "int")  '
     "[assignment]"),
    ("DeviceState(speed=3)", 'error: Unexpected keyword argument "speed" for "DeviceState"  [call-arg]'),
    ("dev.regs = b'1234'",
     'error: Incompatible types in assignment (expression has type "bytes", variable has type "list[int]")  '
     "[assignment]"),
]
MYPY = ["--strict", "--no-error-summary", "--show-error-codes", "--no-pretty", "--no-color-output"]


@pytest.fixture(scope="module")
def author(vmsd_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The virtualenv's bin folder, and the project ``vmsd new`` made, built and installed into it."""
    base = tmp_path_factory.mktemp("author")
    bin_dir = make_venv(base, f"{vmsd_wheel}[compiler]", "hatchling", "mypy", "pytest")
    project = base / NAME
    ok([bin_dir / "vmsd", "new", project], base)
    ok([bin_dir / "python", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
        base / "dist", project], base)
    (wheel,) = (base / "dist").glob(f"{NAME}-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"{NAME}/state/device.py", f"{NAME}/state/__init__.py"} <= set(names)
    assert [n for n in names if n.endswith("py.typed")] == [f"{NAME}/py.typed"]
    ok([bin_dir / "python", "-m", "pip", "install", "--quiet", wheel], base)
    return bin_dir, project


def test_the_projects_ci_script_passes(author: tuple[Path, Path]) -> None:
    bin_dir, project = author
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}"}
    proc = ok(["sh", "ci/check.sh"], project, env=env)
    assert "Success: no issues found in 4 source files" in proc.stdout
    assert re.search(r"\b5 passed in\b", proc.stdout), proc.stdout


def test_installed_classes_round_trip(author: tuple[Path, Path], tmp_path: Path) -> None:
    bin_dir, _ = author
    (tmp_path / "good.py").write_text(GOOD)
    # Run from outside the project: the classes come from the installed wheel.
    where = ok([bin_dir / "python", "-c", f"import {NAME}.state.device as m; print(m.__file__)"], tmp_path).stdout
    assert Path(where.strip()).is_relative_to(bin_dir.parent)
    assert ok([bin_dir / "python", "good.py"], tmp_path).stdout.split() == ["12", "10", "8"]


def test_consumer_type_checks(author: tuple[Path, Path], tmp_path: Path) -> None:
    bin_dir, _ = author
    (tmp_path / "good.py").write_text(GOOD)
    proc = run([bin_dir / "mypy", *MYPY, "good.py"], tmp_path)
    # Without the package's py.typed this is the issue's `Skipping analyzing ... [import-untyped]`.
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_consumer_misuse_is_reported(author: tuple[Path, Path], tmp_path: Path) -> None:
    bin_dir, _ = author
    head = f"from {NAME}.state.device import DeviceState\n\ndev = DeviceState()\n"
    first = head.count("\n") + 1
    (tmp_path / "bad.py").write_text(head + "".join(line + "\n" for line, _ in BAD))
    proc = run([bin_dir / "mypy", *MYPY, "bad.py"], tmp_path)
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr
    errors = [line for line in proc.stdout.splitlines() if ": note: " not in line]  # notes point at definitions
    assert errors == [f"bad.py:{first + i}: {error}" for i, (_, error) in enumerate(BAD)]
