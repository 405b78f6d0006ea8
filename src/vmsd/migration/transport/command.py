"""``exec:``: a migration stream through a shell command's stdin or stdout."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import tempfile
from typing import IO

from vmsd.migration.transport.descriptor import DescriptorChannel
from vmsd.migration.transport.errors import TransportError, wrap

_STDERR_TAIL = 2000


class CommandChannel(DescriptorChannel):
    """``exec:``: a ``sh -c`` child whose stdin (outgoing) or stdout (incoming) is the channel."""

    def __init__(self, name: str, command: str, outgoing: bool, timeout: float) -> None:
        self._timeout = timeout
        self._outgoing = outgoing
        self._eof = False
        self._stderr: IO[bytes] = tempfile.TemporaryFile()
        rfd, wfd = os.pipe()
        ours, theirs = (wfd, rfd) if outgoing else (rfd, wfd)
        try:
            self._proc = subprocess.Popen(
                ["/bin/sh", "-c", command],
                stdin=theirs if outgoing else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if outgoing else theirs,
                stderr=self._stderr,
            )
        except OSError as exc:
            os.close(ours)
            self._stderr.close()
            raise wrap(name, "cannot start command", exc) from exc
        finally:
            os.close(theirs)
        super().__init__(name, fd=ours)

    def _stderr_tail(self) -> str:
        try:
            size = self._stderr.seek(0, os.SEEK_END)
            self._stderr.seek(max(0, size - _STDERR_TAIL))
            text = self._stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        return text

    def _describe(self, rc: int | None) -> str:
        if rc is None:
            status = "command did not exit"
        elif rc < 0:
            try:
                status = f"command killed by {signal.Signals(-rc).name}"
            except ValueError:
                status = f"command killed by signal {-rc}"
        else:
            status = f"command exited with status {rc}"
        tail = self._stderr_tail()
        return f"{status}: {tail}" if tail else status

    def _wait(self, timeout: float) -> int | None:
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _kill(self) -> int:
        with contextlib.suppress(OSError):
            self._proc.kill()
        return self._proc.wait()

    def _at_eof(self) -> None:
        if self._outgoing or self._eof:
            return
        self._eof = True
        rc = self._wait(self._timeout)
        if rc != 0:
            if rc is None:
                self._kill()
            raise TransportError(self.name, self._describe(rc))

    def _failure(self, what: str, exc: OSError) -> TransportError:
        if exc.errno == errno.EPIPE:
            rc = self._wait(min(self._timeout, 5.0))
            if rc is None:
                return TransportError(self.name, "command stopped reading its input: " + self._describe(rc), exc.errno)
            return TransportError(self.name, f"{what}: " + self._describe(rc), exc.errno)
        return super()._failure(what, exc)

    def _release(self) -> None:
        try:
            super()._release()
        finally:
            try:
                if self._outgoing:
                    rc = self._wait(self._timeout)
                    if rc is None:
                        self._kill()
                    if rc != 0:
                        raise TransportError(self.name, self._describe(rc))
                elif not self._eof:
                    # Reader gave up early: the command's remaining output is not wanted.
                    if self._wait(1.0) is None:
                        self._kill()
            finally:
                self._stderr.close()

    def abort(self) -> None:
        if not self.closed and self._proc.poll() is None:
            self._kill()
        super().abort()
