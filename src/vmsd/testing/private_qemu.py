"""A QEMU peer unpacked from Debian packages into a private folder, not installed.

Each version has a fetch script (package data beside this module, so an
installed vmsd has it too) that downloads and unpacks it into a folder under
``~/.cache/vmsd`` (or the folder its environment variable names); the system
QEMU 7.2 stays.  A :class:`PrivateQemu` finds that folder, runs the script
when it is missing, and builds the command line and environment to start that
QEMU, e.g.::

    cmd, env = QEMU11.command(QEMU11.ensure())
    Qemu(args, binary=cmd[0], extra_args=cmd[1:], env=env)

The versions themselves are in :mod:`vmsd.testing.qemu10` and :mod:`vmsd.testing.qemu11`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import attrs

Command = tuple[list[str], dict[str, str]]


@attrs.frozen
class PrivateQemu:
    version: str          # "10.0", as in messages
    folder_name: str      # under ~/.cache/vmsd
    env_var: str          # overrides the folder
    fetch_script: str     # a resource of this package
    executable: Path      # relative to the folder: what ``command`` starts
    # (folder) -> the command line and the extra environment that run this QEMU.
    build_command: Callable[[Path], Command]

    def target_dir(self) -> Path:
        env = os.environ.get(self.env_var)
        return Path(env).expanduser() if env else Path.home() / ".cache" / "vmsd" / self.folder_name

    def present(self) -> Path | None:
        """The folder if the QEMU in it is there (fetched completely: the scripts rename it into place last)."""
        d = self.target_dir()
        return d if os.access(d / self.executable, os.X_OK) else None

    def ensure(self, timeout: float = 900.0) -> Path:
        """The folder, running the fetch script first if it is missing."""
        d = self.present()
        if d is not None:
            return d
        resource = resources.files(__package__) / self.fetch_script
        if not resource.is_file():
            raise RuntimeError(f"QEMU {self.version} is not in {self.target_dir()} and {self.fetch_script} "
                               f"is missing from {__package__}")
        # bash needs a file name: as_file gives the installed one, beside the common part it sources.
        with resources.as_file(resource) as script:
            try:
                proc = subprocess.run(["bash", str(script)], stdin=subprocess.DEVNULL, capture_output=True,
                                      text=True, timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{script} did not finish within {timeout:.0f} s") from None
        d = self.present()
        if proc.returncode != 0 or d is None:
            output = (proc.stdout + proc.stderr).strip()[-4000:]
            raise RuntimeError(f"fetching QEMU {self.version} failed (bash {script}, "
                               f"exit status {proc.returncode}):\n{output}")
        return d

    def command(self, d: Path) -> Command:
        """``[executable, args...]`` and the extra environment to run the QEMU in folder ``d``."""
        return self.build_command(d)
