"""Receive a live migration from a QEMU peer into a snapshot file, and send one back.

``vmsd incoming URI -o SNAPSHOT`` accepts a precopy migration (any number of
iterations, XBZRLE pages included) and applies its RAM records straight into
memfd-backed RAM blocks as they arrive; device sections are decoded with the
QEMU specs.  It then writes a compact stream -- the configuration, one pass of
RAM (zero pages and full pages), the device sections as received, EOF and a
trailer -- through an :class:`~vmsd.runtime.outfile.OutputFile` (0600: it holds
guest RAM), and only once it is durably under its name does the source hear,
on the return path, that the load succeeded; a snapshot that cannot be written
fails the migration, and QEMU keeps running the VM.  The output is checked
before the first connection is accepted.  QEMU loads the snapshot with
``-incoming``.  ``vmsd outgoing SNAPSHOT URI`` loads a snapshot into a
paused :class:`~vmsd.migration.machine.Machine` and migrates it with the precopy
engine to a QEMU started with ``-incoming`` (capabilities and parameters as
QEMU names them).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from vmsd.migration.incoming import Incoming, IncomingResult
from vmsd.migration.iovec import Scattered, write_scattered
from vmsd.migration.limits import MAX_RAM_BLOCKS, default_max_ram
from vmsd.migration.machine import Machine
from vmsd.migration.multifd import MultifdConfig
from vmsd.migration.precopy import Migration
from vmsd.migration.profile import PeerProfile
from vmsd.migration.ram.blocks import RamBlock, RamBlocks
from vmsd.migration.ram.mapped import CAP_MAPPED_RAM, MappedRamFile
from vmsd.migration.ram.records import RAM_SECTION_VERSION, RamContext
from vmsd.migration.ram.wire import RamEncoder, zero_mask
from vmsd.migration.stream import (
    CAP_IGNORE_SHARED,
    IDSTR_RAM,
    SavevmWriter,
    SpecSet,
    capabilities_of,
)
from vmsd.migration.transport import TlsConfig, open_incoming
from vmsd.runtime.errors import RegistryError
from vmsd.runtime.outfile import OutputError, OutputFile
from vmsd.tools.errors import ToolError

_PAGES_PER_WRITE = 4096  # 16 MiB of normal pages per write


def incoming(uri: str, output: Path | str, specs: SpecSet, timeout: float = 60.0,
             multifd: MultifdConfig | None = None, force: bool = False, mode: str = "normal",
             cpr_channel: str | None = None, max_ram: int | None = None,
             tls: TlsConfig | None = None, max_ram_blocks: int = MAX_RAM_BLOCKS) -> IncomingResult:
    """Receive a migration (with multifd channels when configured) and write a snapshot QEMU loads.

    ``output`` may be ``-`` (standard output); an existing file is replaced only with ``force``.  In
    cpr-transfer the old side hands its RAM over as memfds on ``cpr_channel``; the snapshot's pages are
    read from them.  ``max_ram``: the most RAM the peer may announce (default: this host's memory);
    ``max_ram_blocks``: the most RAM blocks.
    ``tls``: every connection is TLS (QEMU's ``tls-creds``).
    """
    blocks = RamBlocks(limit=max_ram if max_ram is not None else default_max_ram(), max_blocks=max_ram_blocks)
    try:
        with OutputFile(output, force=force, private=True, stdout=True) as out:
            return Incoming(specs=specs, multifd=multifd, blocks=blocks, mode=mode, cpr_channel=cpr_channel,
                            commit=lambda result: write_snapshot(result, out, specs.profile), tls=tls).run(uri, timeout)
    finally:
        blocks.close()


def write_snapshot(result: IncomingResult, out: OutputFile, profile: PeerProfile | None = None) -> None:
    """One RAM pass (START with the block list, one PART, END) and the device sections, committed to ``out``;
    the trailer by ``profile``'s rules (the QEMU version of the specs that decoded the sections).

    With x-ignore-shared (the configuration says so), the blocks the source left in place -- those no
    page record named -- get no pages here either: a destination that shares them would refuse any.
    """
    enc = RamEncoder(zero_copy=True)
    conf = result.configuration.state if result.configuration is not None else None
    caps = capabilities_of(conf)
    context = RamContext(ignore_shared=CAP_IGNORE_SHARED in caps, mapped_ram=CAP_MAPPED_RAM in caps)
    sent = [b for b in result.blocks if not context.ignore_shared or b.name in result.named_blocks]
    ram_id = result.ram_section_id
    framing = SavevmWriter(footers=any(s.footer for s in result.sections) or not result.sections, profile=profile)
    f = out.file
    try:
        if context.mapped_ram:  # the configuration says so: the snapshot is laid out as its source was
            _write_mapped(f, out, enc, result.blocks, sent, context, framing.head(conf)
                          + framing.start(ram_id, IDSTR_RAM, RAM_SECTION_VERSION))
            f.write(enc.eos() + framing.footer(ram_id))
            f.write(framing.end(ram_id) + enc.eos() + framing.footer(ram_id))
            framing.write_tail(f.write, result.sections)
            out.commit()
            return
        f.write(framing.head(conf) + framing.start(ram_id, IDSTR_RAM, RAM_SECTION_VERSION)
                + enc.block_list(result.blocks, context) + enc.eos() + framing.footer(ram_id))
        f.write(framing.part(ram_id))
        for block in sent:
            for start in range(0, block.npages, _PAGES_PER_WRITE):
                pages = np.arange(start, min(start + _PAGES_PER_WRITE, block.npages), dtype=np.int64)
                for buf in enc.encode(block, pages):
                    if isinstance(buf, Scattered):  # pages straight from the received RAM
                        f.flush()
                        write_scattered(f.fileno(), buf)
                    else:
                        f.write(buf)
        f.write(enc.eos() + framing.footer(ram_id))
        f.write(framing.end(ram_id) + enc.eos() + framing.footer(ram_id))
        framing.write_tail(f.write, result.sections)
    except OSError as exc:
        raise OutputError(f"cannot write {out.path}: {exc.strerror or exc}") from None
    out.commit()


def _write_mapped(f: BinaryIO, out: OutputFile, enc: RamEncoder, blocks: RamBlocks, sent: list[RamBlock],
                  context: RamContext, head: bytes) -> None:
    """``head``, then the block list of a mapped-ram stream with every non-zero page at its place and the
    bitmaps; the file's position is then where the stream goes on."""
    f.write(head)
    f.flush()
    fd = f.fileno()
    pages = MappedRamFile(fd, str(out.path))
    try:
        enc.mapped_block_list(blocks, context, pages)
        for block in sent:
            for start in range(0, block.npages, _PAGES_PER_WRITE):
                chunk = np.arange(start, min(start + _PAGES_PER_WRITE, block.npages), dtype=np.int64)
                pages.submit(block.name, block.bytes_.ctypes.data, chunk, zero_mask(block, chunk), block)
        pages.finish()
    finally:
        pages.close()
    f.seek(os.lseek(fd, 0, os.SEEK_CUR))  # the buffered file learns where the block list left the descriptor


def snapshot_specs(snapshot: Path, qemu: str | None) -> SpecSet:
    """The spec set of QEMU ``qemu``, else of the QEMU that wrote ``snapshot`` (read through a mapping)."""
    from vmsd.tools.streams import shipped_specs

    if qemu is not None:
        return shipped_specs(qemu)
    try:
        with open(snapshot, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return shipped_specs(None, data)
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise ToolError(f"cannot read {snapshot}: {getattr(e, 'strerror', None) or e}") from None


def load_machine(snapshot: Path, specs: SpecSet) -> Machine:
    """A paused :class:`Machine` holding a snapshot's RAM blocks and typed device sections."""
    with open_incoming(f"file:{snapshot}") as ch:
        result = Incoming(specs=specs).load(ch)
    conf = result.configuration
    name = bytes(conf.state.name).decode(errors="replace") if conf is not None else "pc"
    m = Machine(name)
    for block in result.blocks:
        m.ram.add(block, append=True)  # the stream's block order
    try:
        for sec in result.sections:
            if not hasattr(type(sec.payload), "VMSD_NAME"):
                raise RegistryError(f"section '{sec.idstr}' has no typed spec to send it with", offset=sec.offset)
            m.add_device(sec.idstr, sec.payload, sec.instance_id, sec.version_id)
    except BaseException:
        m.close()
        raise
    m.pause()  # a snapshot does not run
    return m


def outgoing(snapshot: Path, uri: str, specs: SpecSet, timeout: float = 60.0,
             capabilities: dict[str, bool] | None = None, parameters: dict[str, int] | None = None,
             on_progress: Callable[[dict[str, Any]], None] | None = None,
             multifd: MultifdConfig | None = None, peer: PeerProfile | None = None, mode: str = "normal",
             cpr_channel: str | None = None, tls: TlsConfig | None = None) -> dict[str, Any]:
    """Migrate a snapshot to a peer (e.g. QEMU with ``-incoming``) with the precopy engine; its ``query-migrate``.

    In cpr-transfer the snapshot's RAM (loaded into memfds) is handed to the new QEMU on ``cpr_channel``.
    ``tls``: every connection is TLS (QEMU's ``tls-creds`` and ``tls-hostname``)."""
    with load_machine(snapshot, specs) as m:
        m.resume()  # nothing runs on it; the engine pauses it for the final stage
        return Migration(m, uri, capabilities, parameters, on_progress=on_progress, timeout=timeout,
                         multifd=multifd, peer=peer, mode=mode, cpr_channel=cpr_channel, tls=tls).run()
