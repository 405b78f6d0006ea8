"""``file:`` outgoing: a file that only appears under its name once the whole stream is in it."""

from __future__ import annotations

import contextlib
import os
import stat

from vmsd.migration.transport.descriptor import DescriptorChannel
from vmsd.migration.transport.errors import TransportError, wrap


class FileSink(DescriptorChannel):
    """``file:`` outgoing: write ``PATH.partial``, rename on close, remove on failure."""

    def __init__(self, name: str, path: str, offset: int) -> None:
        target = os.path.realpath(path) if os.path.islink(path) else path
        try:
            st: os.stat_result | None = os.stat(target)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise wrap(name, "cannot open", exc) from exc
        self._partial: str | None = None
        self._target = target
        if st is not None and not stat.S_ISREG(st.st_mode):
            # A device or FIFO: write in place, nothing to rename.
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise wrap(name, "cannot open", exc) from exc
            super().__init__(name, fd=fd)
            if offset:
                try:
                    os.lseek(fd, offset, os.SEEK_SET)
                except OSError as exc:
                    self.abort()
                    raise wrap(name, f"cannot seek to offset {offset}", exc) from exc
            return
        partial = target + ".partial"
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise wrap(name, f"cannot create {partial}", exc) from exc
        self._partial = partial
        super().__init__(name, fd=fd)
        if offset:
            try:
                if st is not None:
                    with open(target, "rb") as old:
                        self.write(old.read(offset))
                os.ftruncate(fd, offset)
                os.lseek(fd, offset, os.SEEK_SET)
            except OSError as exc:
                self.abort()
                raise wrap(name, f"cannot prepare offset {offset}", exc) from exc

    def _failure(self, what: str, exc: OSError) -> TransportError:
        self.abort()  # never leave a partial file behind
        return super()._failure(what, exc)

    _aborting = False

    def abort(self) -> None:
        self._aborting = True
        super().abort()

    def _release(self) -> None:
        partial, self._partial = self._partial, None
        if partial is None:
            super()._release()
            return
        try:
            if self._aborting:
                with contextlib.suppress(OSError):
                    super()._release()
                os.unlink(partial)
                return
            os.fsync(self._fd)
            super()._release()
            os.replace(partial, self._target)
        except OSError:
            with contextlib.suppress(OSError):
                super()._release()
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise
        with contextlib.suppress(OSError):  # make the rename durable
            dfd = os.open(os.path.dirname(os.path.abspath(self._target)), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
