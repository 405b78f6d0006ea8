"""Drive a QEMU process over QMP: start it paused, save and load migration streams.

Used by the interop tests, the benchmarks and the tools that talk to a real
QEMU peer.  Only loopback and UNIX sockets are used.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

QEMU_BINARY = os.environ.get("VMSD_QEMU", "qemu-system-x86_64")


class QMPError(RuntimeError):
    pass


class QMP:
    """A minimal QMP client over a UNIX socket."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise QMPError("QMP connection closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def cmd(self, name: str, **args: Any) -> Any:
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise QMPError(f"{name}: {msg['error'].get('desc')}")
            return msg.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Qemu:
    """A QEMU process started with ``-S`` (no guest code runs unless resumed)."""

    def __init__(self, args: list[str], machine: str = "pc", memory: str = "32", incoming: str | None = None,
                 binary: str | None = None, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, nodefaults: bool = True) -> None:
        """``binary`` replaces :data:`QEMU_BINARY`, ``extra_args`` go right after it (e.g. ``-L`` paths)
        and ``env`` is added to the inherited environment; ``nodefaults=False`` keeps the machine's
        default devices (NIC, VGA, parallel port, floppy, ...)."""
        self.dir = Path(tempfile.mkdtemp(prefix="vmsd-qemu-"))
        qmp_path = str(self.dir / "qmp.sock")
        cmd = [
            binary or QEMU_BINARY, *(extra_args or []), "-M", machine, "-m", memory, *(["-nodefaults"] if nodefaults else []),
            "-nographic", "-S",
            "-display", "none", "-serial", "none", "-monitor", "none",
            "-qmp", f"unix:{qmp_path},server=on,wait=off", *args,
        ]
        if incoming is not None:
            cmd += ["-incoming", incoming]
        self.log = open(self.dir / "qemu.log", "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env} if env else None)
        try:
            self.qmp = QMP(qmp_path)
        except Exception:
            output = self.output()
            self.stop()
            raise QMPError(f"QEMU did not start: {output}") from None

    def output(self) -> str:
        self.log.flush()
        return (self.dir / "qemu.log").read_text(errors="replace")

    def migrate_to_file(self, path: Path, timeout: float = 60.0) -> None:
        """Save the whole machine state (a precopy stream) into ``path``."""
        self.qmp.cmd("migrate", uri=f"exec:cat > {path}")
        self.wait_migration(timeout)

    def wait_migration(self, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info: dict[str, Any] = self.qmp.cmd("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise QMPError(f"migration {status}: {info.get('error-desc', '')} {self.output()}")
            time.sleep(0.02)
        raise QMPError("migration did not finish in time")

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.qmp.cmd("quit")
                except Exception:
                    pass
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Qemu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def save_stream(path: Path, args: list[str] | None = None, machine: str = "pc", run_seconds: float = 0.0,
                globals_: list[str] | None = None, command: tuple[list[str], dict[str, str]] | None = None,
                nodefaults: bool = True) -> None:
    """Start QEMU with ``args``, optionally let the BIOS run, and save its state to ``path``.  ``command``:
    another QEMU than :data:`QEMU_BINARY`, as its argv start and extra environment (a private peer's);
    ``nodefaults=False`` keeps the machine's default devices."""
    extra = list(args or [])
    for g in globals_ or []:
        extra += ["-global", g]
    cmd, env = command if command is not None else ([QEMU_BINARY], {})
    with Qemu(extra, machine=machine, binary=cmd[0], extra_args=cmd[1:], env=env, nodefaults=nodefaults) as q:
        if run_seconds:
            q.qmp.cmd("cont")
            time.sleep(run_seconds)
            q.qmp.cmd("stop")
        q.migrate_to_file(path)


def load_stream(path: Path, args: list[str] | None = None, machine: str = "pc", timeout: float = 60.0,
                capabilities: dict[str, bool] | None = None, command: tuple[list[str], dict[str, str]] | None = None,
                nodefaults: bool = True) -> Qemu:
    """A QEMU that loaded ``path`` with ``-incoming`` (and ``capabilities`` set first, as a destination
    must for x-ignore-shared); the caller inspects it and stops it.  ``command``: another QEMU than
    :data:`QEMU_BINARY`, as its argv start and extra environment (a private peer's).

    Raises :class:`QMPError` with QEMU's own messages when the load fails.
    """
    cmd, env = command if command is not None else ([QEMU_BINARY], {})
    q = Qemu(list(args or []), machine=machine, incoming="defer", binary=cmd[0], extra_args=cmd[1:], env=env,
             nodefaults=nodefaults)
    try:
        if capabilities:
            q.qmp.cmd("migrate-set-capabilities",
                      capabilities=[{"capability": c, "state": on} for c, on in capabilities.items()])
        q.qmp.cmd("migrate-incoming", uri=f"exec:cat {path}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if q.proc.poll() is not None:
                raise QMPError(f"QEMU failed to load the stream: {q.output()}")
            try:
                status = q.qmp.cmd("query-migrate").get("status")
            except (OSError, QMPError):
                # QEMU exits when an incoming stream is refused.
                try:
                    q.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
                raise QMPError(f"QEMU failed to load the stream: {q.output()}") from None
            if status == "completed":
                return q
            if status == "failed":
                raise QMPError(f"QEMU failed to load the stream: {q.output()}")
            time.sleep(0.02)
        raise QMPError("incoming migration did not finish")
    except BaseException:
        q.stop()
        raise
