"""The destination of a live migration: QEMU's ``qemu_loadvm_state`` for a :class:`Machine` or fresh RAM.

RAM records are applied straight into the blocks (and multifd packets by
the channel threads); device sections decode with the machine's device
classes, strictly, and replace the device objects only once the whole stream
has loaded, so a failed load leaves the machine as it was.  With QEMU's return
path open the source is answered ``SHUT`` with the load's status.
"""

from __future__ import annotations

import struct
import time

import attrs

from vmsd.migration.limits import default_max_ram
from vmsd.migration.machine import Machine
from vmsd.migration.multifd import ChannelStats, MultifdConfig, MultifdError, MultifdReceiver, accept_all
from vmsd.migration.ram.blocks import RamBlocks
from vmsd.migration.ram.records import RamContext
from vmsd.migration.ram.wire import RamLoader
from vmsd.migration.stream import (
    MIG_RP_MSG_SHUT,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_START,
    QEMU_VM_VMDESCRIPTION,
    Configuration,
    Decoder,
    Section,
    SpecSet,
)
from vmsd.migration.transport import Channel, TransportError, listen, open_incoming
from vmsd.runtime.errors import MalformedStream, VMSDError
from vmsd.runtime.io import Reader


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


class Incoming:
    """Receives a live migration into ``machine`` (or, without one, into fresh RAM blocks).

    With a machine, the peer's block list must match the machine's RAM and
    every device section must name one of its devices; device state is
    decoded with the devices' classes, strictly (versions, checks, sizes), and
    replaces the device objects only once the whole stream has loaded.
    Without a machine (``specs`` given), blocks are created as announced and
    device sections decode with ``specs``.
    """

    def __init__(self, machine: Machine | None = None, specs: SpecSet | None = None,
                 blocks: RamBlocks | None = None, multifd: MultifdConfig | None = None,
                 max_ram: int | None = None) -> None:
        if machine is None and specs is None:
            raise ValueError("an Incoming without a machine needs specs")
        if machine is not None and blocks is not None:
            raise ValueError("an Incoming into a machine uses the machine's RAM blocks")
        self.machine = machine
        self.blocks = blocks  # without a machine: where announced blocks are created (default: memfd)
        # Without a machine or blocks: the RAM a peer may announce (default: this host's memory).
        self.max_ram = max_ram
        self.multifd = multifd
        # A machine's devices bring their classes; the configuration record needs no spec.
        self.specs = specs if specs is not None else SpecSet()
        self.status = "none"
        self.error: str | None = None

    def run(self, uri: str, timeout: float = 60.0) -> IncomingResult:
        """Accept one migration on ``uri`` and load it."""
        self.status = "setup"
        cfg = self.multifd
        try:
            if cfg is None:
                ch = open_incoming(uri, timeout=timeout)
                channels: list[Channel] = []
            else:
                with listen(uri) as lst:
                    ch, channels = accept_all(lambda: lst.accept(timeout), cfg, timeout)
        except (TransportError, VMSDError) as e:
            self.status, self.error = "failed", e.message
            raise
        with ch:
            return self.load(ch, channels)

    def load(self, ch: Channel, multifd_channels: list[Channel] | None = None) -> IncomingResult:
        """Load the stream of ``ch`` (and the pages of ``multifd_channels``, indexed by channel id)."""
        start = time.monotonic()
        m = self.machine
        blocks = (m.ram if m is not None else self.blocks if self.blocks is not None
                  else RamBlocks(limit=self.max_ram if self.max_ram is not None else default_max_ram()))
        loader = RamLoader(blocks, create_missing=m is None)
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

        def ram(sec: Section, context: RamContext) -> None:
            if sec.kind == QEMU_VM_SECTION_START:
                ram_ids.add(sec.section_id)
            loader.load_section(r, context)

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
            _drain_trailer(r)
            sections = [rec for rec in records if isinstance(rec, Section) and rec.kind == QEMU_VM_SECTION_FULL]
            if not ram_ids:
                raise MalformedStream("the stream carries no RAM section")
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
        counters = attrs.asdict(loader.counters)
        stats = receiver.stats if receiver is not None else []
        if receiver is not None:
            counters["normal"] += sum(st.pages for st in stats)
            counters["duplicate"] += sum(st.zero_pages for st in stats)
        return IncomingResult(dec.stream.configuration, blocks, min(ram_ids), sections, counters,
                              time.monotonic() - start, stats,
                              loader.named | receiver.named if receiver is not None else loader.named)


def _drain_trailer(r: Reader) -> None:
    """Read the JSON trailer after EOF, as QEMU's destination does.

    Closing with it unread would make the kernel answer the source's last
    writes with a reset, and the source would report a failed migration.
    """
    if r.peek(1) != bytes([QEMU_VM_VMDESCRIPTION]):
        return  # end of input, or a source that sends no trailer
    r.u8()
    left = r.u32()
    while left:
        left -= len(r.read(min(left, 1 << 20)))


def _send_shut(ch: Channel, status: int) -> None:
    try:
        ch.write(struct.pack(">HHI", MIG_RP_MSG_SHUT, 4, status))
    except TransportError:
        pass  # the source is gone; it reports its own failure
