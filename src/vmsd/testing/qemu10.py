"""QEMU 10.0 as a second peer, unpacked from Debian bookworm-backports into a private folder.

``fetch-qemu10.sh`` (package data beside this module, so an installed vmsd
has it too) downloads and unpacks it (nothing is installed system-wide, the
system QEMU 7.2 stays); this module finds that folder and builds the command
line and environment to run it, e.g.::

    cmd, env = qemu10_command(ensure_qemu10())
    Qemu(args, binary=cmd[0], extra_args=cmd[1:], env=env)
"""

from __future__ import annotations

import os
import subprocess
from importlib import resources
from pathlib import Path

DEFAULT_DIR = Path.home() / ".cache" / "vmsd" / "qemu-10.0"
FETCH_SCRIPT = "fetch-qemu10.sh"  # a resource of this package
BINARY = Path("usr/bin/qemu-system-x86_64")
LIB_DIR = Path("usr/lib/x86_64-linux-gnu")
MODULE_DIR = LIB_DIR / "qemu"
# Firmware folders after the private ones; the unpacked QEMU 10.0 searches its
# compiled-in /usr/share/qemu (the system 7.2 data) only after these.
SYSTEM_FIRMWARE_DIRS = (Path("/usr/share/seabios"), Path("/usr/lib/ipxe/qemu"))


def _target_dir() -> Path:
    env = os.environ.get("VMSD_QEMU10_DIR")
    return Path(env).expanduser() if env else DEFAULT_DIR


def qemu10_dir() -> Path | None:
    """The QEMU 10.0 folder (``$VMSD_QEMU10_DIR`` or ``~/.cache/vmsd/qemu-10.0``) if its binary is there."""
    d = _target_dir()
    return d if os.access(d / BINARY, os.X_OK) else None


def ensure_qemu10(timeout: float = 900.0) -> Path:
    """The QEMU 10.0 folder, running ``fetch-qemu10.sh`` first if it is missing."""
    d = qemu10_dir()
    if d is not None:
        return d
    resource = resources.files(__package__) / FETCH_SCRIPT
    if not resource.is_file():
        raise RuntimeError(f"QEMU 10.0 is not in {_target_dir()} and {FETCH_SCRIPT} is missing from {__package__}")
    # bash needs a file name: as_file gives the installed one (or a temporary copy).
    with resources.as_file(resource) as script:
        try:
            proc = subprocess.run(["bash", str(script)], stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{script} did not finish within {timeout:.0f} s") from None
    d = qemu10_dir()
    if proc.returncode != 0 or d is None:
        output = (proc.stdout + proc.stderr).strip()[-4000:]
        raise RuntimeError(f"fetching QEMU 10.0 failed (bash {script}, exit status {proc.returncode}):\n{output}")
    return d


def qemu10_command(d: Path) -> tuple[list[str], dict[str, str]]:
    """``[binary, -L ..., -L ...]`` and the extra environment to run the QEMU 10.0 in ``d``."""
    cmd = [str(d / BINARY)]
    firmware = [d / "usr/share/qemu", d / "usr/share/seabios", d / "usr/lib/ipxe/qemu", *SYSTEM_FIRMWARE_DIRS]
    for f in firmware:
        if f.is_dir():
            cmd += ["-L", str(f)]
    env = {"QEMU_MODULE_DIR": str(d / MODULE_DIR)}
    lib_dir = d / LIB_DIR
    if lib_dir.is_dir() and any(p.name.startswith("lib") and ".so" in p.name for p in lib_dir.iterdir()):
        # Libraries the host lacked, unpacked next to QEMU by the fetch script.
        inherited = os.environ.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = f"{lib_dir}:{inherited}" if inherited else str(lib_dir)
    return cmd, env
