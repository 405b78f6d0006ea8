"""Run ``vmsd`` as a separate process, as a user does: exit status, stderr, signals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Holds a snapshot between its last byte written and its commit, and says so on stderr: the moment a
# test sends its signal "during the snapshot write" is then an event, not a guess.
HOLD_COMMIT = """
import sys, time
from vmsd.runtime import outfile
real = outfile.OutputFile.commit
def held(self):
    print("test: snapshot written, commit held", file=sys.stderr, flush=True)
    time.sleep(600)
    real(self)
outfile.OutputFile.commit = held
from vmsd.cli import main
sys.exit(main(sys.argv[1:]))
"""
HELD = "test: snapshot written, commit held"


def vmsd(*args: str, hold_commit: bool = False) -> subprocess.Popen[str]:
    """``vmsd ARGS`` from this checkout, stdout and stderr piped (text)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("VMSD_TRACEBACK", None)
    code = ["-c", HOLD_COMMIT] if hold_commit else ["-m", "vmsd"]
    return subprocess.Popen([sys.executable, *code, *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def vmsd_binary(*args: str) -> subprocess.Popen[bytes]:
    """``vmsd ARGS`` from this checkout, stdout (a stream, say) and stderr piped as bytes."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-m", "vmsd", *args], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(*args: str, timeout: float = 120) -> tuple[int, str]:
    """``vmsd ARGS`` to its end: exit status and stderr."""
    proc = vmsd(*args)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def one_line_error(err: str, command: str) -> bool:
    """stderr is exactly one line from ``vmsd COMMAND``, no traceback."""
    return err.count("\n") == 1 and err.startswith(f"vmsd {command}: ") and "Traceback" not in err
