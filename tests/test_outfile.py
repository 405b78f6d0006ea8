"""Output files (vmsd.runtime.outfile and every command that writes one): complete under their name or absent.

Planted symbolic links and files are never followed or overwritten, FIFOs, devices and folders are refused,
an existing output needs --force, streams are private (0600), and nothing is left behind by a failure.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_process import vmsd_binary
from listening import free_port, wait_listening
from test_migration import MIB, make_machine
from vmsd.cli import main
from vmsd.migration.precopy import Migration
from vmsd.migration.stream import read_stream
from vmsd.migration.transport import open_outgoing
from vmsd.runtime.outfile import OutputError, OutputExists, OutputFile, write_file
from vmsd.tools.streams import load_specs, shipped_specs

SPECS = Path(__file__).resolve().parents[1] / "specs"


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small migration stream of a vmsd machine (1 MiB of RAM, two devices)."""
    path = tmp_path_factory.mktemp("stream") / "small.mig"
    with make_machine(1 * MIB) as m:
        assert Migration(m, f"file:{path}", parameters={"max-bandwidth": 0}).run()["status"] == "completed"
    return path


@pytest.fixture
def predictable_names(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The random parts OutputFile will draw, in order (from a seeded sequence an attacker could have guessed)."""
    drawn = [f"{i:016x}" for i in range(100)]
    queue = iter(drawn)
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(queue))
    yield drawn


def _temp_name(target: Path, token: str) -> Path:
    return target.with_name(f".{target.name}.{token}.partial")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# ------------------------------------------------------------------ the module


def test_planted_link_at_a_temporary_name_is_never_followed(tmp_path: Path, predictable_names: list[str]) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "out.mig"
    for token in predictable_names[:3]:  # the first three names taken by links to the victim
        _temp_name(target, token).symlink_to(victim)
    write_file(target, b"new stream", private=True)
    assert target.read_bytes() == b"new stream" and not target.is_symlink()
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["victim", "out.mig", *(_temp_name(target, t).name for t in predictable_names[:3])])


def test_every_name_planted_is_an_error_not_a_followed_link(tmp_path: Path, predictable_names: list[str]) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "out.mig"
    for token in predictable_names:
        _temp_name(target, token).symlink_to(victim)
    with pytest.raises(OutputError, match="every random name tried exists"):
        write_file(target, b"x")
    assert victim.read_bytes() == b"precious" and not target.exists()


def test_the_old_predictable_name_is_not_used(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "out.mig"
    (tmp_path / "out.mig.partial").symlink_to(victim)
    (tmp_path / "out.mig.tmp").symlink_to(victim)
    write_file(target, b"new")
    assert victim.read_bytes() == b"precious" and target.read_bytes() == b"new"


def test_existing_output_needs_force(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"old")
    with pytest.raises(OutputExists):
        write_file(target, b"new")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out"]
    write_file(target, b"new", force=True)
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out"]


def test_output_appearing_while_written_is_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with OutputFile(target) as out:
        out.file.write(b"ours")
        target.write_bytes(b"someone else's")
        with pytest.raises(OutputExists, match="appeared"):
            out.commit()
    assert target.read_bytes() == b"someone else's" and os.listdir(tmp_path) == ["out"]


def test_symlink_target_is_replaced_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"untouched")
    target = tmp_path / "out"
    target.symlink_to(elsewhere)
    with pytest.raises(OutputExists):
        write_file(target, b"new")
    write_file(target, b"new", force=True)
    assert not target.is_symlink() and target.read_bytes() == b"new"
    assert elsewhere.read_bytes() == b"untouched"


def test_non_regular_targets_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match=r"not a regular file \(a FIFO\)"):
        OutputFile(fifo, force=True)
    with pytest.raises(OutputError, match="it is a folder"):
        OutputFile(tmp_path, force=True)
    with pytest.raises(OutputError, match="a device"):
        OutputFile("/dev/null", force=True)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and os.listdir(tmp_path) == ["fifo"]


def test_in_place_writes_a_device_without_renaming(tmp_path: Path) -> None:
    with OutputFile("/dev/null", in_place=True) as out:
        assert out.in_place
        out.file.write(b"discarded")
        out.commit()
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_private_files_are_0600_others_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_file(tmp_path / "stream", b"guest RAM", private=True)
        write_file(tmp_path / "spec", b"text")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "stream") == 0o600
    assert _mode(tmp_path / "spec") == 0o644


def test_missing_folder_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"cannot create a file in .*No such file"):
        OutputFile(tmp_path / "gone" / "out")


def test_failed_sync_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"old")

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(OutputError, match="Input/output error"):
        write_file(target, b"new", force=True)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out"]


def test_an_exception_in_the_body_discards(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), OutputFile(tmp_path / "out") as out:
        out.file.write(b"half")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ the commands


def test_rewrite_refuses_an_existing_output_without_force(stream: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.mig"
    out.write_bytes(b"keep me")
    assert main(["rewrite", str(stream), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists (--force replaces it)" in err
    assert out.read_bytes() == b"keep me"
    assert main(["rewrite", str(stream), "-o", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == stream.read_bytes()[:4] and _mode(out) == 0o600
    assert os.listdir(tmp_path) == ["out.mig"]


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_rewrite_refuses_non_regular_targets(stream: Path, tmp_path: Path, kind: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    target = {"fifo": tmp_path / "fifo", "device": Path("/dev/null"), "folder": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(target)
    before = target.lstat()
    assert main(["rewrite", str(stream), "-o", str(target), "--force"]) == 1
    assert "vmsd rewrite: error: cannot write" in capsys.readouterr().err
    after = target.lstat()
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert os.listdir(tmp_path) == (["fifo"] if kind == "fifo" else [])


def test_rewrite_to_stdout(stream: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    assert main(["rewrite", str(stream), "-o", "-"]) == 0
    assert capfdbinary.readouterr().out[:4] == stream.read_bytes()[:4]


def test_failed_rewrite_leaves_nothing(stream: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.mig"
    assert main(["rewrite", str(stream), "-o", str(out), "--set", "nosuch.field=1"]) == 1
    assert os.listdir(tmp_path) == []


def test_incoming_refuses_an_existing_snapshot_before_listening(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "snap.mig"
    out.write_bytes(b"an earlier snapshot")
    # Port 1 cannot be listened on by anyone here: an error about the output proves it came first.
    assert main(["incoming", "tcp:127.0.0.1:1", "-o", str(out)]) == 1
    assert "snap.mig exists (--force replaces it)" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier snapshot"


def test_outgoing_to_an_existing_file_uri_needs_force(stream: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "copy.mig"
    out.write_bytes(b"keep me")
    assert main(["outgoing", str(stream), f"file:{out}"]) == 1
    assert "exists (--force replaces it)" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def test_import_qemu_refuses_to_overwrite_specs_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dump = tmp_path / "dump.json"
    core = {"name": "core", "version_id": 1, "minimum_version_id": 1,
            "Fields": [{"field": "x", "version_id": 0, "field_exists": False, "size": 4}]}
    dump.write_text(json.dumps({"core-dev": {"Name": "core-dev", "version_id": 1, "minimum_version_id": 1,
                                             "Description": core}}))
    out = tmp_path / "specs"
    assert main(["import-qemu", str(dump), "-o", str(out)]) == 0
    [spec] = out.iterdir()
    spec.write_text("# edited by hand\n" + spec.read_text())
    capsys.readouterr()
    assert main(["import-qemu", str(dump), "-o", str(out)]) == 1
    assert "--force replaces them" in capsys.readouterr().err
    assert spec.read_text().startswith("# edited by hand")
    assert main(["import-qemu", str(dump), "-o", str(out), "--force"]) == 0
    assert not spec.read_text().startswith("# edited by hand") and os.listdir(out) == [spec.name]


def test_compile_never_uses_a_predictable_temporary_name(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "gen"
    out.mkdir()
    (out / "serial.py.tmp").symlink_to(victim)  # where compile used to write before renaming
    assert main(["compile", "-o", str(out), str(SPECS / "examples" / "serial.vmsd")]) == 0
    assert victim.read_bytes() == b"precious"
    # serial imports fifo8, a spec vmsd ships: its module is vmsd.generated's, not written here.
    assert sorted(p.name for p in out.iterdir()) == ["serial.py", "serial.py.tmp"]


def test_specs_folder_leaves_no_temporary_folder(stream: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert main(["inspect", str(stream), "--specs", str(SPECS / "examples")]) == 0
    assert os.listdir(scratch) == []


# ------------------------------------------------------------------ file: URIs and standard output


def test_file_uri_writes_a_fifo_in_place(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    with open_outgoing(f"file:{fifo}") as ch:
        ch.write(b"through the pipe")
    reader.join(30)
    assert got == [b"through the pipe"]
    assert os.listdir(tmp_path) == ["fifo"] and stat.S_ISFIFO(fifo.lstat().st_mode)


def test_file_uri_follows_a_link_as_qemu_does(tmp_path: Path) -> None:
    real = tmp_path / "real.mig"
    real.write_bytes(b"old")
    link = tmp_path / "link.mig"
    link.symlink_to(real)
    with open_outgoing(f"file:{link}") as ch:
        ch.write(b"new stream")
    assert link.is_symlink() and real.read_bytes() == b"new stream" and _mode(real) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["link.mig", "real.mig"]


def test_incoming_to_stdout(tmp_path: Path) -> None:
    port = free_port()
    proc = vmsd_binary("incoming", f"tcp:127.0.0.1:{port}", "-o", "-", "--specs", str(SPECS / "examples"))
    try:
        wait_listening(port, alive=lambda: proc.poll() is None)
        with make_machine(4 * MIB) as m:
            info = Migration(m, f"tcp:127.0.0.1:{port}", capabilities={"return-path": True},
                             parameters={"max-bandwidth": 0}).run()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert info["status"] == "completed" and proc.returncode == 0, err
    assert b"snapshot written to -" in err  # the summary keeps out of the snapshot's way
    stream = read_stream(out, load_specs(SPECS / "examples", shipped_specs(None, out)))
    assert {s.idstr for s in stream.full_sections()} == {"serial", "i8254"}
