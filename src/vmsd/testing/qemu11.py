"""QEMU 11.1 as a peer, unpacked from Debian sid by ``fetch-qemu11.sh``.

sid's QEMU needs sid's glibc, so the script unpacks the whole dependency
closure and writes ``bin/qemu-system-x86_64``, a wrapper that execs QEMU
through that folder's own dynamic loader with its firmware and modules.  The
wrapper keeps the PID, descriptors and environment, so it also serves as the
``argv[0]`` of a ``cpr-exec-command``::

    cmd, env = qemu11_command(ensure_qemu11())   # env is empty: the wrapper sets what QEMU needs
"""

from __future__ import annotations

from pathlib import Path

from vmsd.testing.private_qemu import Command, PrivateQemu

WRAPPER = Path("bin/qemu-system-x86_64")

QEMU11 = PrivateQemu(version="11.1", folder_name="qemu-11.1", env_var="VMSD_QEMU11_DIR",
                     fetch_script="fetch-qemu11.sh", executable=WRAPPER,
                     build_command=lambda d: ([str(d / WRAPPER)], {}))


def ensure_qemu11(timeout: float = 900.0) -> Path:
    """The QEMU 11.1 folder, running ``fetch-qemu11.sh`` first if it is missing."""
    return QEMU11.ensure(timeout)


def qemu11_command(d: Path) -> Command:
    """``[wrapper]`` and the (empty) extra environment to run the QEMU 11.1 in ``d``."""
    return QEMU11.command(d)
