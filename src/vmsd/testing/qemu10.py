"""QEMU 10.0 as a peer, unpacked from Debian bookworm-backports by ``fetch-qemu10.sh``.

It runs with the host's glibc: the script adds only the libraries the host
lacks, which this command then puts on ``LD_LIBRARY_PATH``::

    cmd, env = qemu10_command(ensure_qemu10())
"""

from __future__ import annotations

import os
from pathlib import Path

from vmsd.testing.private_qemu import Command, PrivateQemu

BINARY = Path("usr/bin/qemu-system-x86_64")
LIB_DIR = Path("usr/lib/x86_64-linux-gnu")
# Firmware folders after the private ones; the unpacked QEMU 10.0 searches its
# compiled-in /usr/share/qemu (the system 7.2 data) only after these.
SYSTEM_FIRMWARE_DIRS = (Path("/usr/share/seabios"), Path("/usr/lib/ipxe/qemu"))


def _command(d: Path) -> Command:
    cmd = [str(d / BINARY)]
    firmware = [d / "usr/share/qemu", d / "usr/share/seabios", d / "usr/lib/ipxe/qemu", *SYSTEM_FIRMWARE_DIRS]
    for f in firmware:
        if f.is_dir():
            cmd += ["-L", str(f)]
    env = {"QEMU_MODULE_DIR": str(d / LIB_DIR / "qemu")}
    lib_dir = d / LIB_DIR
    if lib_dir.is_dir() and any(p.name.startswith("lib") and ".so" in p.name for p in lib_dir.iterdir()):
        # Libraries the host lacked, unpacked next to QEMU by the fetch script.
        inherited = os.environ.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = f"{lib_dir}:{inherited}" if inherited else str(lib_dir)
    return cmd, env


QEMU10 = PrivateQemu(version="10.0", folder_name="qemu-10.0", env_var="VMSD_QEMU10_DIR",
                     fetch_script="fetch-qemu10.sh", executable=BINARY, build_command=_command)


def ensure_qemu10(timeout: float = 900.0) -> Path:
    """The QEMU 10.0 folder, running ``fetch-qemu10.sh`` first if it is missing."""
    return QEMU10.ensure(timeout)


def qemu10_command(d: Path) -> Command:
    """``[binary, -L ..., -L ...]`` and the extra environment to run the QEMU 10.0 in ``d``."""
    return QEMU10.command(d)
