"""The CLI as a process: every failure is one line and exit 1, a wrong command line exit 2; SIGINT/SIGTERM end it cleanly.

Signals are sent once the process is observably where the test wants it (its socket listening), and the
assertions are on what is left: the exit status, one line on stderr, no temporary file.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from cli_process import one_line_error, run, vmsd
from listening import free_port, wait_listening
from test_migration import MIB, fill, make_machine
from vmsd.migration.precopy import Migration

SPECS = Path(__file__).resolve().parents[1] / "specs"


@pytest.mark.parametrize(("args", "says"), [
    (["incoming", "tcp:127.0.0.1:1", "-o", "{tmp}/no/such/folder/snap.mig"], "cannot create a file in"),
    (["incoming", "tcp:127.0.0.1:1", "-o", "{tmp}"], "it is a folder"),
    (["check", "{tmp}/bad.vmsd"], "bad.vmsd:1:1: error: unexpected"),
])
def test_errors_are_one_line_and_exit_1(tmp_path: Path, args: list[str], says: str) -> None:
    if args[0] == "check":
        (tmp_path / "bad.vmsd").write_text("nonsense\n")
    rc, err = run(*(a.format(tmp=tmp_path) for a in args))
    assert rc == 1, err
    assert says in err
    if args[0] != "check":  # a spec error is rendered with its location, over several lines
        assert one_line_error(err, args[0]), err
        assert os.listdir(tmp_path) == []
    assert "Traceback" not in err


@pytest.mark.parametrize(("args", "says"), [
    (["incoming", "bogus-uri", "-o", "{tmp}/snap.mig"], "invalid migration URI"),
    (["incoming", "tcp:127.0.0.1:notaport", "-o", "{tmp}/snap.mig"], "invalid migration URI"),
    (["outgoing", "{tmp}/absent.mig", "tcp:127.0.0.1:1"], "cannot read {tmp}/absent.mig: No such file"),
    (["outgoing", "/dev/null", "nonsense"], "invalid migration URI"),
    (["outgoing", "/dev/null", "tcp:127.0.0.1:1", "--capability", "no-such=on"], "'no-such' is not supported"),
    (["outgoing", "/dev/null", "tcp:127.0.0.1:1", "--capability", "xbzrle"], "expected NAME=VALUE"),
    (["incoming", "tcp:127.0.0.1:1", "-o", "{tmp}/snap.mig", "--parameter", "multifd-channels=4"],
     "needs --capability multifd=on"),
    (["incoming", "tcp:127.0.0.1:1", "-o", "{tmp}/snap.mig", "--mode", "cpr-transfer"], "needs --cpr-channel"),
    (["incoming", "tcp:127.0.0.1:1", "-o", "{tmp}/snap.mig", "--max-ram", "1X"], "--max-ram: expected a number"),
    (["incoming", "tcp:127.0.0.1:1", "-o", "{tmp}/snap.mig", "--specs", "{tmp}/none"], "--specs {tmp}/none: not a folder"),
    (["inspect", "{tmp}/absent.mig"], "cannot read {tmp}/absent.mig: No such file"),
    (["inspect", "{tmp}"], "cannot read {tmp}: Is a directory"),
    (["rewrite", "{tmp}/absent.mig", "-o", "{tmp}/out.mig"], "cannot read {tmp}/absent.mig"),
    (["rewrite", "/dev/null", "-o", "{tmp}/out.mig", "--set", "no-equals-sign"], "--set needs SECTION.FIELD=VALUE"),
    (["diff", "{tmp}/absent.mig", "/dev/null"], "cannot read {tmp}/absent.mig"),
    (["check", "{tmp}/absent.vmsd"], "cannot read {tmp}/absent.vmsd: No such file or directory"),
    (["check", "{tmp}"], "cannot read {tmp}: it is a folder"),
    (["check", "/dev/null"], "cannot read /dev/null: not a regular file"),
    (["compile", "-o", "{tmp}/out", "{tmp}/absent.vmsd"], "cannot read {tmp}/absent.vmsd"),
    (["fmt", "{tmp}/absent.vmsd"], "cannot read {tmp}/absent.vmsd: No such file or directory"),
    (["fmt", "--check", "/dev/null"], "cannot read /dev/null: not a regular file"),
    (["import-qemu", "{tmp}/absent.json", "-o", "{tmp}/out"], "cannot read {tmp}/absent.json"),
    (["demo", "--ram", "lots"], "--ram: expected a number"),
    (["incoming", "tcp:127.0.0.1:1"], "the following arguments are required: -o/--output"),
    (["inspect"], "the following arguments are required: STREAM"),
    (["nosuchcommand"], "invalid choice"),
])
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], says: str) -> None:
    """A command line that is wrong (a file it names cannot be read, a malformed value): exit 2, one
    message naming the problem, without a made-up spec location, nothing written."""
    rc, err = run(*(a.format(tmp=tmp_path) for a in args))
    assert rc == 2, err
    assert says.format(tmp=tmp_path) in err
    assert "Traceback" not in err and ":1:1:" not in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_while_waiting_for_a_source(tmp_path: Path, sig: signal.Signals, status: int) -> None:
    port = free_port()
    proc = vmsd("incoming", f"tcp:127.0.0.1:{port}", "-o", str(tmp_path / "snap.mig"), "--timeout", "120")
    try:
        wait_listening(port, alive=lambda: proc.poll() is None)
        assert len(os.listdir(tmp_path)) == 1  # the output was checked and opened before listening
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, err
    assert one_line_error(err, "incoming"), err
    assert os.listdir(tmp_path) == []


def test_sigterm_during_outgoing_to_a_file(tmp_path: Path) -> None:
    snapshot = tmp_path / "snap.mig"
    with make_machine(16 * MIB) as m:
        fill(m)  # half random: 8 MiB to send at 1 MB/s, far longer than the test waits
        assert Migration(m, f"file:{snapshot}", parameters={"max-bandwidth": 0}).run()["status"] == "completed"
    proc = vmsd("outgoing", str(snapshot), f"file:{tmp_path / 'copy.mig'}", "--specs", str(SPECS / "examples"),
                "--parameter", "max-bandwidth=1M", "--json")
    try:
        assert proc.stderr is not None
        progress = json.loads(proc.stderr.readline())  # the progress lines: under way, copy.mig not yet there
        assert progress["status"] == "active", progress
        assert [n for n in os.listdir(tmp_path) if n.startswith(".copy.mig.")]  # its temporary file
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    *progress_lines, last = err.splitlines()
    assert last == "vmsd outgoing: terminated" and all(json.loads(line) for line in progress_lines)
    assert os.listdir(tmp_path) == ["snap.mig"]
