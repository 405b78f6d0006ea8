"""The destination of a live migration: QEMU's ``qemu_loadvm_state`` for a :class:`Machine` or fresh RAM.

RAM records are applied straight into the blocks (and multifd packets by
the channel threads); device sections decode with the machine's device
classes, strictly, and replace the device objects only once the whole stream
has loaded, so a failed load leaves the machine as it was.  With QEMU's return
path open the source is answered ``SHUT`` with the load's status -- success
only after ``commit`` (a snapshot writer, say) has kept what was received, so
a source is never told to drop a VM whose state was then lost.
"""

from __future__ import annotations

import os
import stat
import struct
import time
from collections.abc import Callable

import attrs

from vmsd.migration.cpr import KEEPS_RAM, MODES
from vmsd.migration.cpr.exec import find_state
from vmsd.migration.cpr.ram import AdoptedRam
from vmsd.migration.cpr.state import CprError, CprState
from vmsd.migration.cpr.transfer import receive_state
from vmsd.migration.limits import MAX_RAM_BLOCKS, default_max_ram
from vmsd.migration.machine import Machine
from vmsd.migration.multifd import ChannelStats, MultifdConfig, MultifdError, MultifdReceiver, accept_all
from vmsd.migration.ram.blocks import RamBlocks
from vmsd.migration.ram.records import RamContext
from vmsd.migration.ram.wire import RamLoader
from vmsd.migration.stream import (
    MIG_RP_MSG_SHUT,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_START,
    Configuration,
    Decoder,
    Section,
    SpecSet,
)
from vmsd.migration.transport import (
    Channel,
    FileURI,
    Listener,
    TcpURI,
    TlsConfig,
    TransportError,
    UnixURI,
    listen,
    open_incoming,
    parse_uri,
)
from vmsd.runtime.errors import MalformedStream, VMSDError
from vmsd.runtime.io import Reader
from vmsd.runtime.vmdesc import Obj


@attrs.define
class IncomingResult:
    """What a destination received: the configuration, RAM, device sections, counters."""

    configuration: Configuration | None
    blocks: RamBlocks
    ram_section_id: int
    sections: list[Section]
    counters: dict[str, int]
    seconds: float
    channels: list[ChannelStats] = attrs.Factory(list)  # multifd, by channel id
    named_blocks: set[str] = attrs.Factory(set)  # blocks some page record named (see RamLoader.named)
    trailer: Obj | None = None  # the source's JSON trailer, when it sent a valid one


class Incoming:
    """Receives a live migration into ``machine`` (or, without one, into fresh RAM blocks).

    With a machine, the peer's block list must match the machine's RAM and
    every device section must name one of its devices; device state is
    decoded with the devices' classes, strictly (versions, checks, sizes), and
    replaces the device objects only once the whole stream has loaded.
    Without a machine (``specs`` given), blocks are created as announced and
    device sections decode with ``specs``; a section none of them describes
    (or describes at its version) is kept as received and decoded by the JSON
    trailer that follows EOF, as ``vmsd inspect`` decodes it.

    ``commit`` is called with the result once the whole stream has loaded and
    before the source is told so; if it raises, the load fails (the source
    hears ``SHUT`` with failure and keeps the VM) and the exception propagates.
    """

    def __init__(self, machine: Machine | None = None, specs: SpecSet | None = None,
                 blocks: RamBlocks | None = None, multifd: MultifdConfig | None = None, mode: str = "normal",
                 cpr_channel: str | None = None, commit: Callable[[IncomingResult], None] | None = None,
                 max_ram: int | None = None, tls: TlsConfig | None = None,
                 max_ram_blocks: int = MAX_RAM_BLOCKS) -> None:
        """``tls``: QEMU's ``tls-creds``; every connection (main and multifd) must then complete a TLS
        handshake, presenting the folder's server certificate and, with ``verify_peer``, checking the
        source's against its CA.

        ``mode`` is the migration mode of the old side (QEMU's ``mode``).  In cpr-transfer the CPR state
        arrives first on ``cpr_channel`` (a ``unix:`` URI we listen on), in cpr-exec it is found through
        the environment; either way the RAM blocks are built on the memory it hands over (a machine
        given here must have none of its own) and no page may come on the main channel."""
        if mode not in MODES:
            raise ValueError(f"migration mode '{mode}' is not one of {', '.join(MODES)}")
        if (mode == "cpr-transfer") != (cpr_channel is not None):
            raise ValueError("a cpr channel is what cpr-transfer needs, and only it")
        if cpr_channel is not None and not isinstance(parse_uri(cpr_channel), UnixURI):
            raise ValueError("the cpr channel must be a unix: socket")
        if mode in KEEPS_RAM and multifd is not None:
            raise ValueError(f"migration mode '{mode}' does not use multifd channels")
        if machine is None and specs is None:
            raise ValueError("an Incoming without a machine needs specs")
        if tls is not None and mode != "normal":
            raise ValueError(f"TLS with migration mode '{mode}' is not supported")
        # Built now, so that a credentials folder that cannot serve fails here, before anything listens.
        self._tls = tls.server_context() if tls is not None else None
        if machine is not None and blocks is not None:
            raise ValueError("an Incoming into a machine uses the machine's RAM blocks")
        self.machine = machine
        self.blocks = blocks  # without a machine: where announced blocks are created (default: memfd)
        # Without a machine or blocks: the RAM a peer may announce (default: this host's memory).
        self.max_ram = max_ram
        self.max_ram_blocks = max_ram_blocks  # likewise, how many blocks (docs/limits.md)
        self.multifd = multifd
        self.commit = commit
        # A machine's devices bring their classes; the configuration record needs no spec.
        self.specs = specs if specs is not None else SpecSet()
        self.status = "none"
        self.error: str | None = None
        self.mode = mode
        self.cpr_channel = cpr_channel
        self.cpr_state: CprState | None = None  # what the old side handed over (CPR modes)

    def run(self, uri: str, timeout: float = 60.0) -> IncomingResult:
        """Accept one migration on ``uri`` (after the CPR state, in cpr-transfer) and load it.

        ``timeout`` (seconds) bounds waiting for each connection and is the idle limit of the channels
        (:mod:`vmsd.migration.transport.idle`): when nothing arrives for that long the load fails with
        ``ETIMEDOUT`` instead of waiting for a source that vanished."""
        if not 0 < timeout < float("inf"):
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if self.mode == "cpr-transfer" and not isinstance(parse_uri(uri), TcpURI | UnixURI):
            raise ValueError("in cpr-transfer the main channel is a socket (tcp: or unix:)")
        self.status = "setup"
        cfg = self.multifd
        lst: Listener | None = None
        channels: list[Channel] = []
        try:
            try:
                if self.mode == "cpr-transfer":
                    lst = self._receive_cpr_state(uri, timeout)
                elif self.mode == "cpr-exec":
                    self._adopt(find_state())
                if cfg is not None and not isinstance(parse_uri(uri), FileURI):
                    with listen(uri, tls=self._tls) as mlst:
                        ch, channels = accept_all(lambda: mlst.accept(timeout, timeout), cfg, timeout)
                elif lst is not None:
                    ch = lst.accept(timeout, timeout)
                else:
                    ch = open_incoming(uri, timeout=timeout, idle_timeout=timeout, tls=self._tls)
            finally:
                if lst is not None:
                    lst.close()
        except (TransportError, VMSDError) as e:
            self.status, self.error = "failed", e.message
            self._drop_cpr_state()
            raise
        with ch:
            try:
                return self.load(ch, channels)
            finally:
                self._drop_cpr_state()

    def _receive_cpr_state(self, uri: str, timeout: float) -> Listener:
        """cpr-transfer: the CPR state from the old side, then listen on ``uri``, then hang up (the signal)."""
        assert self.cpr_channel is not None
        with listen(self.cpr_channel, backlog=1) as clst, clst.accept(timeout) as cch:
            self._adopt(receive_state(cch))
            # The old side connects the main channel when it sees the hang-up: listen before it.
            return listen(uri, backlog=1)

    def _adopt(self, state: CprState) -> None:
        """RAM blocks from now on map the memory ``state`` hands over."""
        blocks = self.machine.ram if self.machine is not None else self.blocks
        if blocks is None:
            blocks = self.blocks = RamBlocks()
        if len(blocks):
            state.close()
            raise CprError(f"a {self.mode} destination takes its RAM from the old side, but it already has "
                           f"RAM blocks ({', '.join(blocks.names())})")
        self.cpr_state = state
        blocks.factory = AdoptedRam(state)

    def _drop_cpr_state(self) -> None:
        """Close the descriptors of the CPR state that no RAM block took (vhost, tap, ...: not ours to use)."""
        if self.cpr_state is not None:
            self.cpr_state.close()

    def load(self, ch: Channel, multifd_channels: list[Channel] | None = None) -> IncomingResult:
        """Load the stream of ``ch`` (and the pages of ``multifd_channels``, indexed by channel id)."""
        start = time.monotonic()
        m = self.machine
        blocks = (m.ram if m is not None else self.blocks if self.blocks is not None
                  else RamBlocks(limit=self.max_ram if self.max_ram is not None else default_max_ram(),
                                 max_blocks=self.max_ram_blocks))
        in_place = self.mode in KEEPS_RAM
        loader = RamLoader(blocks, create_missing=m is None or in_place)
        receiver: MultifdReceiver | None = None
        if multifd_channels:
            cfg = self.multifd
            if cfg is None:
                raise ValueError("multifd channels without a multifd configuration")
            receiver = MultifdReceiver(cfg, multifd_channels, blocks, on_failure=ch.shutdown_read)
            loader.sync_hook = receiver.sync
            loader.legacy_sync = cfg.legacy_sync
        r = Reader(source=ch)
        dec = Decoder(b"", self.specs, strict_typed=True, enforce_checks=m is not None, reader=r)
        ram_ids: set[int] = set()
        file_offset = _file_position(ch)

        def ram(sec: Section, context: RamContext) -> None:
            if sec.kind == QEMU_VM_SECTION_START:
                ram_ids.add(sec.section_id)
            if self.multifd is not None and not multifd_channels and not context.mapped_ram:
                # QEMU reads a file: with multifd only when it is mapped-ram (the pages' places are known)
                raise MalformedStream("multifd from a file: needs a mapped-ram stream", offset=sec.offset)
            loader.load_section(r, attrs.evolve(context, in_place=in_place, file_offset=file_offset))

        dec.ram_handler = ram
        if m is not None:
            dec.section_classes = {key: type(dev.state) for key, dev in m.devices.items()}
        self.status = "active"
        try:
            dec.read_header()
            conf = dec.stream.configuration
            if m is not None and conf is not None:
                name = bytes(conf.state.name).decode(errors="replace")
                if name != m.name:
                    raise MalformedStream(f"Machine type received is '{name}' and local is '{m.name}'")
            records = dec.records(top=True)
            dec.finish_live()  # the trailer, and by it the sections no spec describes
            sections = [rec for rec in records if isinstance(rec, Section) and rec.kind == QEMU_VM_SECTION_FULL]
            if not ram_ids:
                raise MalformedStream("the stream carries no RAM section")
            counters = attrs.asdict(loader.counters)
            stats: list[ChannelStats] = []
            named = loader.named
            if receiver is not None:
                receiver.close()  # every page is in: the channels' threads are done
                stats, named = receiver.stats, named | receiver.named
                receiver = None
                counters["normal"] += sum(st.pages for st in stats)
                counters["duplicate"] += sum(st.zero_pages for st in stats)
            result = IncomingResult(dec.stream.configuration, blocks, min(ram_ids), sections, counters,
                                    time.monotonic() - start, stats, named, dec.stream.trailer)
            if self.commit is not None:
                self.commit(result)
        except BaseException as e:
            self.status = "failed"
            cause = receiver.failure(0.5) if receiver is not None and not isinstance(e, MultifdError) else None
            self.error = cause.message if cause is not None else e.message if isinstance(e, VMSDError) else str(e)
            if dec.return_path:
                _send_shut(ch, 1)
            if cause is not None:
                raise cause from e
            raise
        finally:
            if receiver is not None:
                receiver.close()
        if m is not None:  # device state changes only after the whole stream loaded
            for sec in sections:
                dev = m.devices[(sec.idstr, sec.instance_id)]
                dev.state = sec.payload
                dev.version_id = sec.version_id
        if dec.return_path:
            _send_shut(ch, 0)
        self.status = "completed"
        return result


def _file_position(ch: Channel) -> int:
    """Where in its file the stream of ``ch`` starts (``file:PATH,offset=N``): mapped-ram headers place pages
    by file offset.  0 for anything that is not a regular file."""
    fd = ch.fileno()
    try:
        return os.lseek(fd, 0, os.SEEK_CUR) if fd >= 0 and stat.S_ISREG(os.fstat(fd).st_mode) else 0
    except OSError:
        return 0


def _send_shut(ch: Channel, status: int) -> None:
    try:
        ch.write(struct.pack(">HHI", MIG_RP_MSG_SHUT, 4, status))
    except TransportError:
        pass  # the source is gone; it reports its own failure
