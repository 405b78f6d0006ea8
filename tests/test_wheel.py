"""vmsd installed from its wheel into a fresh virtualenv works outside the checkout.

The wheel is built from this checkout and installed as a user would install
it, dependencies from the package index.  One virtualenv has no extras (the
runtime, the stream tools and the live demo must work there, and whatever
needs the compiler must name the extra to install), another has ``[compiler]``.
Every command runs from a folder outside the checkout without PYTHONPATH, so
only the installed files are used.  The real QEMU 7.2 stream comes from the
system QEMU, part of the test set-up as in test_qemu_interop.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from installed import ENV, ROOT, make_venv, ok, run
from private_peers import PRIVATE_QEMUS, Peer
from vmsd.migration.stream import read_stream
from vmsd.qemu.v7_2 import spec_set
from vmsd.testing.qmp import save_stream

EXTRA_HINT = "pip install 'vmsd[compiler]'"


@pytest.fixture(scope="module")
def bare(vmsd_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install vmsd``: no extras."""
    return make_venv(tmp_path_factory.mktemp("bare"), str(vmsd_wheel))


@pytest.fixture(scope="module")
def full(vmsd_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install 'vmsd[compiler]'``."""
    return make_venv(tmp_path_factory.mktemp("full"), f"{vmsd_wheel}[compiler]")


def test_live_demo_without_compiler(bare: Path, tmp_path: Path) -> None:
    for module in ("lark", "jinja2"):
        assert run([bare / "python", "-c", f"import {module}"], tmp_path).returncode != 0, f"{module} is installed"
    out = ok([bare / "vmsd", "demo", "--live-only", "--ram", "64M"], tmp_path).stdout
    assert "RAM block pc.ram" in out and "DIFFERENT" not in out
    assert "OK: the destination holds the source's final RAM and device state" in out


def test_inspect_real_qemu_stream(bare: Path, tmp_path: Path) -> None:
    stream = tmp_path / "pc.mig"
    save_stream(stream, args=["-device", "isa-serial"])
    doc = json.loads(ok([bare / "vmsd", "inspect", "--json", stream], tmp_path).stdout)
    devices = [r for r in doc["records"] if r.get("type") == "FULL"]
    by_spec = {(r["idstr"], r["instance_id"]) for r in devices if r.get("decoded_by") == "spec"}
    assert {("mc146818rtc", 0), ("serial", 0)} <= by_spec
    # The installed package decodes every device section as the checkout does.
    here = read_stream(stream.read_bytes(), spec_set()).full_sections()
    assert [(r["idstr"], r["instance_id"]) for r in devices] == [(s.idstr, s.instance_id) for s in here]
    assert by_spec == {(s.idstr, s.instance_id) for s in here if s.generic_body is None}
    tree = ok([bare / "vmsd", "inspect", stream], tmp_path).stdout
    assert "FULL mc146818rtc" in tree and "[mc146818rtc, decoded by spec]" in tree


@pytest.mark.parametrize("argv", [["compile", "serial.vmsd", "-o", "out"], ["check", "serial.vmsd"], ["fmt", "serial.vmsd"],
                                  ["demo"]])
def test_compiler_commands_name_the_extra(bare: Path, tmp_path: Path, argv: list[str]) -> None:
    (tmp_path / "serial.vmsd").write_text((ROOT / "specs" / "examples" / "serial.vmsd").read_text())
    proc = run([bare / "vmsd", *argv], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and EXTRA_HINT in proc.stderr, proc.stderr
    assert proc.stdout == ""


def test_compile_a_spec_and_import_it(full: Path, tmp_path: Path) -> None:
    for name in ("serial.vmsd", "fifo8.vmsd"):  # serial.vmsd imports fifo8.vmsd
        (tmp_path / name).write_text((ROOT / "specs" / "examples" / name).read_text())
    out = ok([full / "vmsd", "compile", "serial.vmsd", "-o", "out/mydev"], tmp_path).stdout
    assert out.startswith("wrote 2 of 2 files under out/mydev")
    # The module compiled here saves the bytes of the one generated from the bundled spec.
    check = """
from mydev.serial import Serial
from vmsd.generated.examples import serial
args = dict(divider=12, ier=0x0F, lcr=0x03, scr=0x5A, poll_msl=3, modem_status_poll=123456789)
wire = Serial(**args).save()
assert wire == serial.Serial(**args).save(), wire.hex()
assert Serial.load(wire) == Serial(**args)
print(len(wire))
"""
    assert int(ok([full / "python", "-c", check], tmp_path / "out").stdout) > 0


def test_bare_compile_names_the_bundled_specs(full: Path, tmp_path: Path) -> None:
    proc = run([full / "vmsd", "compile"], tmp_path)
    assert proc.returncode == 2 and "not inside the vmsd repository" in proc.stderr
    bundled = Path(proc.stderr.rstrip().rpartition("under ")[2].rstrip(")"))
    assert bundled.is_relative_to(full.parent) and (bundled / "examples" / "serial.vmsd").is_file()
    shipped = sorted(p.relative_to(bundled) for p in bundled.rglob("*.vmsd"))
    assert shipped == sorted(p.relative_to(ROOT / "specs") for p in (ROOT / "specs").rglob("*.vmsd"))


def test_full_demo_compiles_the_bundled_specs(full: Path, tmp_path: Path) -> None:
    out = ok([full / "vmsd", "demo", "--ram", "64M"], tmp_path).stdout
    compiled_from = out.splitlines()[0].rpartition(" from ")[2]
    assert Path(compiled_from).resolve().is_relative_to(full.parent.resolve()), out[:400]
    assert "loaded back equal: True" in out
    assert "OK: the destination holds the source's final RAM and device state" in out
    assert "byte-identical = True" in out and "saved it back as 0x55" in out


def test_fetch_scripts_run_from_the_installed_package(bare: Path, tmp_path: Path, private_peer: Peer) -> None:
    """The fetch scripts are package data and source their common part from beside themselves: run from the
    installed package on a folder fetched already, each says so and exits at once (nothing downloaded)."""
    private = PRIVATE_QEMUS[private_peer.version]
    folder = private.present()
    assert folder is not None
    code = "import importlib.resources as r; print(r.files('vmsd.testing'))"
    installed = Path(ok([bare / "python", "-c", code], tmp_path).stdout.strip())
    assert installed.resolve().is_relative_to(bare.parent.resolve())  # the venv's copy, not the checkout's
    proc = ok(["bash", installed / private.fetch_script], tmp_path, env={**ENV, private.env_var: str(folder)})
    assert f"QEMU {private.version} already present in {folder}" in proc.stderr
