"""The one way vmsd writes an output file: complete under its name, or not there at all.

:class:`OutputFile` checks the target when it is created -- before a tool
spends minutes receiving a migration -- and writes into a temporary file
beside it: a random name created with ``O_EXCL | O_NOFOLLOW`` (a file or
symbolic link planted at any name is never opened or followed), fsynced and
renamed into place on :meth:`~OutputFile.commit`, the folder fsynced after, so
that the name only ever holds nothing, the old file or the whole new one.
Leaving the ``with`` block without a commit (an error, Ctrl-C, SIGTERM
turned into an exception) removes the temporary file.

The target, looked at without following a symbolic link:

* absent: created.
* a regular file or a symbolic link: replaced only with ``force`` (a link is
  replaced by the file; what it pointed to is left alone).  Without
  ``force`` the refusal is also atomic at the end: the file is linked in
  under its name, which fails if something appeared there meanwhile.
* a folder: refused.
* a FIFO, device or socket: refused, unless ``in_place`` (QEMU's ``file:``
  URIs write to ``/dev/null`` or a FIFO): then it is opened and written
  directly, there is nothing to rename.
* ``-`` with ``stdout``: standard output, written directly.

``private`` files (migration streams and snapshots: they hold guest RAM) are
created 0600; others get 0666 less the umask, as any new file.

This module is in the runtime, the bottom layer, because the migration
engine's ``file:`` transport, the compiler's package writer and the tools
all write through it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import sys
from collections.abc import Iterable
from types import TracebackType
from typing import BinaryIO

from vmsd.runtime.errors import VMSDError

# Attempts at a fresh random name before giving up: a collision of 64 random bits means someone is guessing.
_NAME_TRIES = 16
# Characters of the target's name kept in the temporary one (for whoever finds it after a crash): at 4 bytes
# each, with the random part, within a name's 255 bytes.
_NAME_KEEP = 48
# Filesystems without hard links (vfat, some FUSE): the no-replace commit falls back to a checked rename.
_NO_LINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS})
# fsync on a pipe, a terminal or some devices has nothing to flush.
_NOT_SYNCABLE = frozenset({errno.EINVAL, errno.EROFS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})


class OutputError(VMSDError):
    """An output file cannot be written where asked (a folder, a FIFO, no such folder, no room)."""


class OutputExists(OutputError):
    """The output exists and replacing it was not asked for (``force``)."""


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


class OutputFile:
    """A file written to a temporary name beside ``path`` and renamed there on :meth:`commit`.

    ``file`` is a buffered binary file; ``fileno()`` its descriptor (flush
    ``file`` before writing to the descriptor directly).
    """

    def __init__(self, path: str | os.PathLike[str], *, force: bool = False, private: bool = False,
                 in_place: bool = False, stdout: bool = False) -> None:
        self.path = os.fspath(path)
        self._temp: str | None = None
        self._force = force
        self._done = False
        if stdout and self.path == "-":
            sys.stdout.flush()  # what was printed before comes first
            self._fd = os.dup(sys.stdout.fileno())  # ours to close; the interpreter keeps its own
        else:
            self._fd = self._open(force, private, in_place)
        self.file: BinaryIO = open(self._fd, "wb", closefd=False)

    def _open(self, force: bool, private: bool, in_place: bool) -> int:
        try:
            st: os.stat_result | None = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {_why(exc)}") from None
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                raise OutputError(f"cannot write {self.path}: it is a folder")
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                if not in_place:
                    raise OutputError(f"cannot write {self.path}: not a regular file ({_kind(st.st_mode)})")
                try:
                    return os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError as exc:
                    raise OutputError(f"cannot write {self.path}: {_why(exc)}") from None
            if not force:
                raise OutputExists(f"{self.path} exists")
        folder, name = os.path.split(self.path)
        if not name:
            raise OutputError(f"cannot write {self.path}: it names a folder")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(_NAME_TRIES):
            temp = os.path.join(folder, f".{name[:_NAME_KEEP]}.{secrets.token_hex(8)}.partial")
            try:
                fd = os.open(temp, flags, 0o600 if private else 0o666)
            except FileExistsError:
                continue
            except OSError as exc:
                raise OutputError(f"cannot create a file in {folder or '.'}: {_why(exc)}") from None
            self._temp = temp
            return fd
        raise OutputError(f"cannot create a file in {folder or '.'}: every random name tried exists")

    def fileno(self) -> int:
        return self._fd

    @property
    def in_place(self) -> bool:
        """Written directly (standard output, a FIFO or device): no temporary file, nothing to rename."""
        return self._temp is None

    def commit(self) -> None:
        """Flush and fsync, then put the file under its name and fsync the folder.  Raises :class:`OutputError`."""
        if self._done:
            raise OutputError(f"{self.path}: already committed or discarded")
        try:
            self.file.flush()
            try:
                os.fsync(self._fd)
            except OSError as exc:
                if self._temp is not None or exc.errno not in _NOT_SYNCABLE:
                    raise
        except OSError as exc:
            self.discard()
            raise OutputError(f"cannot write {self.path}: {_why(exc)}") from None
        self._close()
        temp = self._temp
        if temp is None:
            return
        try:
            self._place(temp)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        self._sync_folder()

    def _place(self, temp: str) -> None:
        try:
            if self._force:
                os.replace(temp, self.path)
                return
            try:
                os.link(temp, self.path, follow_symlinks=False)
            except FileExistsError:
                raise OutputExists(f"{self.path} exists (it appeared while it was being written)") from None
            except OSError as exc:
                if exc.errno not in _NO_LINKS:
                    raise
                if os.path.lexists(self.path):
                    raise OutputExists(f"{self.path} exists (it appeared while it was being written)") from None
                os.replace(temp, self.path)
                return
            os.unlink(temp)
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {_why(exc)}") from None

    def _sync_folder(self) -> None:
        try:
            dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            if exc.errno not in _NOT_SYNCABLE:
                raise OutputError(f"{self.path} is written but its folder could not be synced: {_why(exc)}") from None

    def discard(self) -> None:
        """Close and remove the temporary file; never raises.  Nothing happens after :meth:`commit`."""
        if self._done:
            return
        self._close()
        if self._temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._temp)

    def _close(self) -> None:
        self._done = True
        with contextlib.suppress(OSError):
            self.file.close()  # flushes what is buffered; on discard that may fail, and nothing is kept anyway
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.discard()  # after commit a no-op; otherwise whatever was written is not kept


def write_file(path: str | os.PathLike[str], data: bytes | str | Iterable[str], *, force: bool = False,
               private: bool = False) -> None:
    """Write ``data`` (text as UTF-8, or text in pieces) to ``path`` through an :class:`OutputFile`."""
    with OutputFile(path, force=force, private=private) as out:
        try:
            if isinstance(data, bytes | str):
                out.file.write(data.encode() if isinstance(data, str) else data)
            else:
                for piece in data:
                    out.file.write(piece.encode())
        except OSError as exc:
            raise OutputError(f"cannot write {out.path}: {_why(exc)}") from None
        out.commit()


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket"
