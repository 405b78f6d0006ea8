"""``file:`` outgoing: a file that only appears under its name once the whole stream is in it."""

from __future__ import annotations

import os

from vmsd.migration.transport.descriptor import DescriptorChannel
from vmsd.migration.transport.errors import TransportError, wrap
from vmsd.runtime.outfile import OutputError, OutputFile


class FileSink(DescriptorChannel):
    """``file:`` outgoing through an :class:`~vmsd.runtime.outfile.OutputFile`.

    As QEMU's ``file:``, an existing file is replaced and a device or FIFO
    written in place; a symbolic link named by the URI is followed, as
    QEMU's open(2) does, so the file it points to is the one replaced.  The
    stream holds guest RAM: the file is created 0600.  Renamed into place on
    :meth:`close`, removed on failure or :meth:`abort`.
    """

    def __init__(self, name: str, path: str, offset: int) -> None:
        target = os.path.realpath(path) if os.path.islink(path) else path
        existed = os.path.isfile(target)
        try:
            self._out = OutputFile(target, force=True, private=True, in_place=True)
        except OutputError as exc:
            raise TransportError(name, exc.message) from None
        super().__init__(name, fd=self._out.fileno())
        if not offset:
            return
        try:
            if self._out.in_place:
                os.lseek(self._fd, offset, os.SEEK_SET)
                return
            if existed:
                with open(target, "rb") as old:
                    self.write(old.read(offset))
            os.ftruncate(self._fd, offset)
            os.lseek(self._fd, offset, os.SEEK_SET)
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
        self._fd = -1  # the OutputFile's, closed by it
        if self._aborting:
            self._out.discard()
            return
        try:
            self._out.commit()
        except OutputError as exc:
            raise TransportError(self.name, exc.message) from None
