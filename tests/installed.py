"""Helpers for tests that install vmsd from its wheel into fresh virtualenvs (test_wheel, test_new_package).

Every command runs without PYTHONPATH, PYTHONHOME or VIRTUAL_ENV, so a fresh
virtualenv imports only what was installed into it, never the checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT = 600.0
RUN_TIMEOUT = 240.0

# The environment of every command: without these the fresh virtualenv could
# import vmsd from the checkout (PYTHONPATH=src) or from another environment.
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def run(cmd: list[str | Path], cwd: Path, timeout: float = RUN_TIMEOUT,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=ENV if env is None else env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def ok(cmd: list[str | Path], cwd: Path, timeout: float = RUN_TIMEOUT,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = run(cmd, cwd, timeout, env)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def build_vmsd_wheel(dist: Path) -> Path:
    """The vmsd wheel built from this checkout into ``dist``."""
    # Build isolation on: the wheel is built with what [build-system] declares, as pip would from an sdist.
    ok([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", dist, ROOT], dist, INSTALL_TIMEOUT)
    (built,) = dist.glob("vmsd-*.whl")
    return built


def make_venv(parent: Path, *requirements: str) -> Path:
    """A new virtualenv under ``parent`` with ``requirements`` installed; its bin folder."""
    ok([sys.executable, "-m", "venv", parent / "venv"], parent)
    bin_dir = parent / "venv" / "bin"
    ok([bin_dir / "python", "-m", "pip", "install", "--quiet", *requirements], parent, INSTALL_TIMEOUT)
    where = Path(ok([bin_dir / "python", "-c", "import vmsd; print(vmsd.__file__)"], parent).stdout.strip())
    assert where.resolve().is_relative_to((parent / "venv").resolve()), f"vmsd imported from {where}, not the new venv"
    return bin_dir
