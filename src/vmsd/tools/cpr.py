"""vmsd between two QEMUs during a CPR upgrade: ``vmsd relay`` (cpr-transfer) and ``vmsd cpr-exec-wrap``.

**relay.**  The old QEMU sends its CPR state to the relay's ``--from-cpr``
socket, as it would to a new QEMU; the relay passes the descriptors on to the
new QEMU's ``--to-cpr`` socket (they are never mapped or read here, so guest
RAM is never copied), waits until the new QEMU listens, then listens itself
for the old QEMU's main stream.  That stream carries no RAM, only device
state: it is decoded with the specs, edited with ``--set`` if asked, and sent
on to the new QEMU; the return path, if the old QEMU opened one, is passed
back.

**cpr-exec-wrap.**  Named as QEMU's ``cpr-exec-command`` in front of the new
QEMU's command line, it runs in the old QEMU's process after its ``exec``:
it reports the CPR state (a memfd named by ``QEMU_CPR_EXEC_STATE``) and the
main stream QEMU left in its ``-incoming file:`` target, edits that stream if
asked, and then execs the real QEMU with the environment and descriptors
untouched.  After QEMU's exec there is no way back, so nothing here may lose
the VM: whatever cannot be decoded or edited is reported on stderr and QEMU is
exec'd unchanged.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

import attrs

from vmsd.migration import stream as savevm
from vmsd.migration.cpr import exec as cpr_exec
from vmsd.migration.cpr.state import CprState, read_state
from vmsd.migration.cpr.transfer import await_hangup, receive_state, send_state
from vmsd.migration.profile import PeerProfile
from vmsd.migration.stream import Decoder, SpecSet, read_stream
from vmsd.migration.transport import Channel, FileURI, TransportError, listen, open_outgoing, parse_uri
from vmsd.runtime.errors import VMSDError
from vmsd.runtime.io import Reader
from vmsd.runtime.outfile import OutputFile
from vmsd.tools.errors import ToolError
from vmsd.tools.streams import apply_set

# The main stream of a CPR migration holds device state only (its RAM section lists blocks, no pages):
# a few hundred KiB.  More than this is not a CPR stream, and the relay will not hold it in memory.
MAX_DEVICE_STREAM = 64 << 20


@attrs.frozen
class RelayReport:
    descriptors: list[str]  # "name id" of each descriptor passed on
    sections: int
    edited: bool
    stream_bytes: int


class _Recording:
    """A byte source that keeps what it read (the stream is passed on as it came, unless edited)."""

    def __init__(self, ch: Channel, limit: int) -> None:
        self.ch = ch
        self.limit = limit
        self.data = bytearray()

    def readinto(self, buffer: memoryview, /) -> int:
        n = self.ch.readinto(buffer)
        self.data += buffer[:n]
        if len(self.data) > self.limit:
            raise ToolError(f"{self.ch.name}: more than {self.limit} bytes of device state: not a CPR migration "
                            "(its RAM would be in the stream)")
        return n


def read_device_stream(ch: Channel, specs: SpecSet) -> tuple[bytes, bool]:
    """A whole main stream from ``ch`` up to the end of its trailer, and whether it opened a return path.

    Read record by record (the source may wait for the return path's answer before it closes).
    """
    rec = _Recording(ch, MAX_DEVICE_STREAM)
    r = Reader(source=rec)
    dec = Decoder(b"", specs, strict_typed=False, enforce_checks=False, reader=r)
    dec.read_header()
    dec.records(top=True)
    dec.finish_live()
    return bytes(rec.data[:r.tell()]), dec.return_path


def edit_stream(data: bytes, specs: SpecSet, sets: Sequence[str]) -> tuple[bytes, int]:
    """``data`` with ``sets`` applied (unchanged without any) and its count of device sections."""
    stream = read_stream(data, specs)
    sections = sum(1 for s in stream.sections() if s.idstr != savevm.IDSTR_RAM)
    for pages in (s for s in stream.sections() if s.idstr == savevm.IDSTR_RAM):
        if pages.payload is not None and pages.payload.pages_by_block():
            raise ToolError("the main stream carries RAM pages: the old side is not in a CPR mode that keeps RAM")
    if not sets:
        return data, sections
    for s in sets:
        apply_set(stream, s)
    return savevm.write_stream(stream), sections


def relay_cpr_transfer(from_cpr: str, from_uri: str, to_cpr: str, to_uri: str, specs: SpecSet,
                       sets: Sequence[str], peer: PeerProfile, timeout: float,
                       log: Callable[[str], None] = lambda _: None) -> RelayReport:
    """Stand between an old QEMU (migrating in cpr-transfer mode to ``from_cpr``/``from_uri``) and a new one
    (started with ``-incoming`` on ``to_uri`` and a cpr channel on ``to_cpr``).

    Until the old QEMU's main channel connects, any failure leaves it running (it sees the cpr channel
    close and its main channel refused).
    """
    with listen(from_cpr, backlog=1) as clst:
        with clst.accept(timeout) as old_cpr:
            state = receive_state(old_cpr)
            try:
                names = [f"{e.name} {e.id}" for e in state.entries]
                log(f"received {len(names)} descriptors from the old QEMU: {', '.join(names)}")
                with open_outgoing(to_cpr, timeout=timeout) as new_cpr:
                    send_state(new_cpr, state.entries, peer, state.vfio_devices)
                    await_hangup(new_cpr, timeout)
                log("the new QEMU took the descriptors and listens")
            finally:
                state.close()  # the new QEMU has its own copies
            # The old QEMU connects its main channel when the cpr channel closes: listen first.
            main = listen(from_uri, backlog=1)
    with main, main.accept(timeout) as old_main:
        data, return_path = read_device_stream(old_main, specs)
        out, sections = edit_stream(data, specs, sets)
        log(f"{sections} device sections ({len(data)} bytes){', edited' if sets else ''}")
        with open_outgoing(to_uri, timeout=timeout) as new_main:
            new_main.write(out)
            if return_path:  # the new QEMU's SHUT tells the old one the load's outcome
                _pass_back(new_main, old_main)
    return RelayReport(names, sections, bool(sets), len(data))


def _pass_back(new: Channel, old: Channel) -> None:
    buf = bytearray(4096)
    while n := new.readinto(buf):
        old.write(buf[:n])


def _incoming_file(argv: Sequence[str]) -> str | None:
    """The ``file:`` path of the last ``-incoming`` of a QEMU command line (None for anything else)."""
    path = None
    for flag, value in itertools.pairwise(argv):
        if flag in ("-incoming", "--incoming") and value.startswith("file:"):
            target = parse_uri(value)
            path = target.path if isinstance(target, FileURI) else None
    return path


def cpr_exec_wrap(argv: Sequence[str], specs: SpecSet | None, sets: Sequence[str], err: TextIO = sys.stderr,
                  execvp: Callable[[str, list[str]], None] = os.execvp) -> None:
    """Report and (with ``sets``) edit what a cpr-exec predecessor left, then exec ``argv``; returns only if
    that exec failed (the caller exits with an error: the old QEMU is gone)."""
    try:
        _report_and_edit(argv, specs, sets, err)
    except (VMSDError, ToolError, OSError, TransportError) as e:
        print(f"vmsd cpr-exec-wrap: {e}; starting QEMU with what it left, unchanged", file=err)
    except Exception as e:  # whatever happens, QEMU must still start
        print(f"vmsd cpr-exec-wrap: internal error {type(e).__name__}: {e}; starting QEMU unchanged", file=err)
    err.flush()
    execvp(argv[0], list(argv))


def _report_and_edit(argv: Sequence[str], specs: SpecSet | None, sets: Sequence[str], err: TextIO) -> None:
    value = os.environ.get(cpr_exec.ENV)
    if value is None:
        raise ToolError(f"{cpr_exec.ENV} is not set: not started by a cpr-exec migration")
    state = _peek_state(value)
    print(f"vmsd cpr-exec-wrap: CPR state holds {len(state.entries)} descriptors: "
          + ", ".join(f"{e.name} (fd {e.fd})" for e in state.entries), file=err)
    path = _incoming_file(argv)
    if path is None:
        if sets:
            raise ToolError("--set needs the new QEMU's -incoming file:PATH on its command line")
        return
    with open(path, "rb") as f:
        data = f.read(MAX_DEVICE_STREAM + 1)
    if len(data) > MAX_DEVICE_STREAM:
        raise ToolError(f"{path} holds more than {MAX_DEVICE_STREAM} bytes: not a cpr-exec stream")
    assert specs is not None
    out, sections = edit_stream(data, specs, sets)
    print(f"vmsd cpr-exec-wrap: {path}: {sections} device sections", file=err)
    if sets:
        with OutputFile(path, force=True, private=True) as o:
            o.file.write(out)
            o.commit()
        print(f"vmsd cpr-exec-wrap: edited {', '.join(sets)}", file=err)


def _peek_state(value: str) -> CprState:
    """The CPR state in the memfd ``value`` names, read without disturbing it: QEMU reads it after us."""
    if not value.isdigit() or len(value) > 9:
        raise ToolError(f"{cpr_exec.ENV}={value!r} does not name a descriptor")
    fd = int(value)
    size = os.fstat(fd).st_size
    if size > MAX_DEVICE_STREAM:
        raise ToolError(f"the CPR state is {size} bytes")
    return read_state(Reader(os.pread(fd, size, 0)))
