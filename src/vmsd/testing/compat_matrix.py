"""Real migrations between QEMU 7.2, 10.0 and 11.1: what a destination version makes of a source's stream.

A :class:`Case` is a source version, a destination version and a :class:`Configuration` (a versioned
machine type with its *default* devices, what users run, and optionally one more device).
:meth:`Case.migrate` starts the source QEMU paused, has it migrate to a UNIX socket whose bytes go into
a file, then starts the destination QEMU with ``-incoming defer``, has it load that file with
``migrate-incoming exec:cat FILE`` and resumes the guest.  The file is exactly the byte stream a live
migration from that source sends (QEMU writes the same precopy stream to any channel, and without the
return-path capability it never reads one), so ``vmsd compat FILE qemu:D`` judges the very bytes the
destination judged.

QEMU 7.2 is the system ``qemu-system-x86_64``; 10.0 and 11.1 are the private QEMUs of
:mod:`vmsd.testing.qemu10` and :mod:`vmsd.testing.qemu11` (fetched when missing).  Every QEMU is
started with bounded timeouts and has quit or been killed before the call returns.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from vmsd.testing.private_qemu import Command, PrivateQemu
from vmsd.testing.qemu10 import QEMU10
from vmsd.testing.qemu11 import QEMU11
from vmsd.testing.qmp import QEMU_BINARY, QMP, QMPError

VERSIONS = ("7.2", "10.0", "11.1")
PRIVATE: dict[str, PrivateQemu] = {q.version: q for q in (QEMU10, QEMU11)}

GUEST_MEMORY = "64M"
# A QEMU with default devices starts in well under a second on an idle machine; these bound a wedged one.
START_TIMEOUT = 30.0
MIGRATE_TIMEOUT = 60.0
QUIT_TIMEOUT = 5.0
# How long a resumed destination is watched before it counts as running: a machine that loaded but
# cannot run stops soon after `cont` (QEMU aborts, or the vCPU stops with an emulation error).
RUN_CHECK_SECONDS = 0.5

# QEMU's own messages when it refuses an incoming stream (migration/savevm.c, migration/vmstate.c of 7.2
# and of the newer versions, which reworded some), best first: a device's load error is followed by the
# line that names its section idstr, and a vmsd name (the second group of patterns) is only the fallback.
_SECTION_PATTERNS = (
    re.compile(r"error while loading state for instance 0x[0-9a-f]+ of device '(?P<section>[^']+)'"),
    re.compile(r"error while loading state section id \d+\((?P<section>[^)]+)\)"),
    re.compile(r"Unknown (?:savevm )?section or instance '(?P<section>[^']+)'"),
    re.compile(r"unsupported version \d+ for '(?P<section>[^']+)'"),
    re.compile(r"Missing section footer for (?P<section>\S+)"),
    # The configuration section's checks (machine type, capabilities, page size) do not name it in 7.2.
    re.compile(r"(?P<section>)(?:Machine type received is|Received unknown capability|Capability \S+ is "
               r"|Received TARGET_PAGE_BITS|Configuration section missing)"),
    re.compile(r"post load hook failed for: '?(?P<section>[^',]+)'?,"),
    re.compile(r"Failed to load (?P<section>[^:\s]+):"),
    re.compile(r"(?P<section>[^\s:]+): incoming version_id \d+ is too (?:old|new)"),
)


class CompatRunError(RuntimeError):
    """The harness could not run the migration at all (a QEMU did not start or the source did not save)."""


def qemu_command(version: str) -> Command:
    """The command line and extra environment that start QEMU ``version`` (7.2 is the system QEMU)."""
    if version == "7.2":
        return [QEMU_BINARY], {}
    if version not in PRIVATE:
        raise ValueError(f"no QEMU {version}: choose one of {', '.join(VERSIONS)}")
    private = PRIVATE[version]
    return private.command(private.ensure())


@attrs.frozen
class Outcome:
    """What the destination made of the stream.

    ``loads`` is true when the destination completed the incoming migration and its guest ran after
    ``cont``; otherwise ``error`` holds QEMU's own error lines (warnings such as "machine type is
    deprecated" are left out) and ``section`` the section they name, if any.
    """

    loads: bool
    error: str = ""
    section: str | None = None


def failing_section(error: str) -> str | None:
    """The section QEMU's load error names (its idstr, e.g. ``0000:00:02.0/vga``), or None."""
    for pattern in _SECTION_PATTERNS:
        m = pattern.search(error)
        if m:
            return m.group("section") or "configuration"
    return None


def error_lines(stderr: str) -> str:
    """QEMU's stderr without its warnings and notes (a deprecated machine type is not the failure)."""
    kept = [line for line in stderr.splitlines()
            if line.strip() and not re.match(r"[^:\s]*: (?:warning|info): ", line)]
    return "\n".join(kept)


class _Process:
    """One QEMU process, paused, with QMP on a socket and stderr in a file of a private folder.

    The folder is a fresh short one under the temporary directory: a socket path longer than 107 bytes
    (a deep pytest folder, say) cannot be bound.
    """

    def __init__(self, version: str, machine: str, incoming: bool, args: Sequence[str]) -> None:
        cmd, env = qemu_command(version)
        self.folder = Path(tempfile.mkdtemp(prefix="vmsd-compat-"))
        qmp_path = self.folder / "qmp.sock"
        self.stderr_path = self.folder / "stderr"
        self.qmp: QMP | None = None
        self.label = f"QEMU {version} ({machine})"
        command = [
            *cmd, "-M", machine, "-m", GUEST_MEMORY, "-S", "-display", "none",
            # Default devices stay; their character devices go nowhere instead of a text console.
            "-serial", "null", "-parallel", "null", "-monitor", "none",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            *(["-incoming", "defer"] if incoming else []), *args,
        ]
        try:
            with open(self.stderr_path, "wb") as stderr:
                self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=stderr, env={**os.environ, **env})
        except OSError as e:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise CompatRunError(f"{self.label} did not start: {e}") from None
        try:
            # The socket or the exit, whichever comes first: QMP's own connect would retry until its
            # timeout even after QEMU has refused its command line.
            deadline = time.monotonic() + START_TIMEOUT
            while not qmp_path.exists() and self.alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            if not self.alive():
                raise QMPError("exited")
            self.qmp = QMP(str(qmp_path), timeout=START_TIMEOUT)
        except (OSError, QMPError):
            message = f"{self.label} did not start: {self.stderr().strip()}"
            self.kill()
            raise CompatRunError(message) from None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cmd(self, name: str, **args: Any) -> Any:
        if self.qmp is None:
            raise QMPError(f"{self.label}: QMP is closed")
        return self.qmp.cmd(name, **args)

    def quit(self) -> None:
        """Quit over QMP, kill if QEMU does not exit in time, reap it and close QMP (stderr stays)."""
        if self.alive():
            try:
                self.cmd("quit")
            except (OSError, QMPError):
                pass
            try:
                self.proc.wait(QUIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.qmp is not None:
            try:
                self.qmp.close()
            except OSError:
                # A command QEMU quit before reading is still buffered; the socket is gone either way.
                self.qmp.sock.close()
            self.qmp = None

    def kill(self) -> None:
        """:meth:`quit`, then remove the private folder."""
        self.quit()
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def _started(version: str, machine: str, incoming: bool = False, args: Sequence[str] = ()) -> Iterator[_Process]:
    process = _Process(version, machine, incoming, args)
    try:
        yield process
    finally:
        process.kill()


class _StreamReceiver:
    """Accepts one connection on a UNIX socket and copies it into a file until the sender closes it.

    A source QEMU reports its migration completed once the last byte is in the socket, so the file is
    whole only when this copy ends (``exec:cat > FILE`` would leave ``cat`` still writing, and QEMU 7.2
    has no ``file:``).
    """

    def __init__(self, path: Path) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="vmsd-compat-"))
        self.uri = f"unix:{self.folder / 'stream.sock'}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.folder / "stream.sock"))
        self.listener.listen(1)
        self.listener.settimeout(MIGRATE_TIMEOUT)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._copy, args=(path,), daemon=True)
        self.thread.start()

    def _copy(self, path: Path) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn, open(path, "wb") as out:
                conn.settimeout(MIGRATE_TIMEOUT)
                while chunk := conn.recv(1 << 20):
                    out.write(chunk)
        except OSError as e:
            self.error = e

    def wait(self) -> None:
        """Until the sender has closed the connection and every byte is in the file."""
        self.thread.join(MIGRATE_TIMEOUT)
        if self.thread.is_alive():
            raise CompatRunError(f"the stream did not end within {MIGRATE_TIMEOUT:.0f} s")
        if self.error is not None:
            raise CompatRunError(f"receiving the stream failed: {self.error}")

    def close(self) -> None:
        # shutdown() wakes an accept() still waiting in the thread (close() alone would not on Linux).
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(MIGRATE_TIMEOUT)
        shutil.rmtree(self.folder, ignore_errors=True)


def save_source_stream(version: str, machine: str, path: Path, args: Sequence[str] = ()) -> None:
    """Have QEMU ``version`` with ``machine``, its default devices and ``args`` save its paused state to ``path``."""
    receiver = _StreamReceiver(path)
    try:
        with _started(version, machine, args=args) as source:
            source.cmd("migrate", uri=receiver.uri)
            deadline = time.monotonic() + MIGRATE_TIMEOUT
            while True:
                info = source.cmd("query-migrate")
                status = info.get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise CompatRunError(f"{source.label} could not save its state: "
                                         f"{info.get('error-desc', '')} {source.stderr().strip()}")
                if time.monotonic() > deadline:
                    raise CompatRunError(f"{source.label} did not finish saving in {MIGRATE_TIMEOUT:.0f} s")
                time.sleep(0.02)
        # The source has quit: its end of the socket is closed whatever it did.
        receiver.wait()
    finally:
        receiver.close()


def load_stream(version: str, machine: str, path: Path, args: Sequence[str] = ()) -> Outcome:
    """Have QEMU ``version`` with ``machine``, its default devices and ``args`` load ``path`` and resume the guest."""
    with _started(version, machine, incoming=True, args=args) as dest:
        dest.cmd("migrate-incoming", uri=f"exec:cat {shlex.quote(str(path))}")
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        status = None
        while status not in ("completed", "failed"):
            if time.monotonic() > deadline:
                raise CompatRunError(f"{dest.label} did not finish loading in {MIGRATE_TIMEOUT:.0f} s")
            try:
                status = dest.cmd("query-migrate").get("status")
            except (OSError, QMPError):
                # A refused incoming stream makes QEMU exit (exit-on-error); its stderr says why.
                status = "failed"
            if not dest.alive():
                status = "failed"
            time.sleep(0.02)
        if status == "completed":
            try:
                dest.cmd("cont")
                time.sleep(RUN_CHECK_SECONDS)
                running = dest.cmd("query-status").get("status")
            except (OSError, QMPError):
                running = "exited"
            if running == "running" and dest.alive():
                return Outcome(True)
            status = f"not running after cont ({running})"
        dest.quit()
        error = error_lines(dest.stderr()) or f"{dest.label}: incoming migration {status}"
        return Outcome(False, error, failing_section(error))


@attrs.frozen
class Configuration:
    """A machine type and the devices added to its defaults, the same on both sides of a migration."""

    name: str            # a column of the table in docs/compat-verified.md
    machine: str
    args: tuple[str, ...] = ()
    # Whether vmsd's spec sets describe every device of this configuration, so that `vmsd compat` can
    # be held to the outcome.
    specs_cover: bool = True


CONFIGURATIONS = (
    Configuration("pc-i440fx-7.2", "pc-i440fx-7.2"),
    Configuration("pc-q35-7.2", "pc-q35-7.2"),
    # A PCI SCSI adapter whose state QEMU 10.0 and 11.1 changed without regard to the machine type: of
    # the devices tried on pc-i440fx-7.2 (qemu-xhci, usb-ehci, ich9-ahci, e1000e, virtio-net-pci,
    # pvpanic, am53c974) the only one whose migration between these versions fails.  No spec set has it.
    Configuration("pc-i440fx-7.2 + am53c974", "pc-i440fx-7.2", ("-device", "am53c974"), specs_cover=False),
)


@attrs.frozen
class Case:
    """One directed migration: QEMU ``source`` to QEMU ``dest``, both with ``configuration``."""

    source: str
    dest: str
    configuration: Configuration

    @property
    def id(self) -> str:
        return f"{self.source}->{self.dest} {self.configuration.name}"

    def migrate(self, stream: Path) -> Outcome:
        """QEMU ``source`` saves into ``stream`` (kept for the caller), QEMU ``dest`` loads it."""
        machine, args = self.configuration.machine, self.configuration.args
        save_source_stream(self.source, machine, stream, args)
        return load_stream(self.dest, machine, stream, args)


def cases() -> list[Case]:
    """Every directed pair of versions and the three same-version controls, in every configuration."""
    return [Case(source, dest, configuration)
            for configuration in CONFIGURATIONS for source in VERSIONS for dest in VERSIONS]


def record(case: Case, outcome: Outcome) -> dict[str, Any]:
    """The JSON object the data file keeps for ``case``."""
    return {"source": case.source, "dest": case.dest, "configuration": case.configuration.name,
            "loads": outcome.loads, "section": outcome.section, "error": outcome.error}


def cause(error: str) -> str:
    """The first line of QEMU's error without its program name and the generic "load of migration failed"."""
    line = error.splitlines()[0] if error else ""
    line = re.sub(r"^[^:\s]*qemu-system-x86_64: ", "", line)
    return re.sub(r"^load of migration failed: [^:]+: ", "", line)


def table(records: list[dict[str, Any]]) -> str:
    """The Markdown table of docs/compat-verified.md: a row per directed pair, a column per configuration."""
    cells = {(r["source"], r["dest"], r["configuration"]): r for r in records}
    names = [c.name for c in CONFIGURATIONS]
    lines = ["| source → destination | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for source in VERSIONS:
        for dest in VERSIONS:
            row = []
            for name in names:
                r = cells[(source, dest, name)]
                row.append("loads" if r["loads"] else f"fails: `{r['section']}`: {cause(r['error'])}")
            lines.append(f"| {source} → {dest} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run every case once, one at a time, and print the data file tests/data/compat_reality.json."""
    with tempfile.TemporaryDirectory(prefix="vmsd-compat-") as d:
        records = [record(case, case.migrate(Path(d) / "stream")) for case in cases()]
    print(json.dumps({"migrations": records}, indent=1))


if __name__ == "__main__":
    main()
