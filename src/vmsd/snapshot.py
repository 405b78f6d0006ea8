"""Receive a live migration from a QEMU peer into a snapshot file, and send one back.

``vmsd incoming URI -o SNAPSHOT`` accepts a precopy migration (any number of
iterations, XBZRLE pages included), applies its RAM records to memfd-backed
RAM blocks, and writes a compact stream: the configuration, one pass of RAM
(zero pages and full pages), the device sections as received, EOF and a
trailer.  QEMU loads it with ``-incoming``.  ``vmsd outgoing SNAPSHOT URI``
sends a stream file to a QEMU started with ``-incoming``.
"""

from __future__ import annotations

from pathlib import Path

from vmsd.runtime.errors import MalformedStream
from vmsd.runtime.ram import RamPayload
from vmsd.runtime.ramblock import RamBlocks, apply_ram, ram_section_payloads
from vmsd.runtime.stream import (
    IDSTR_RAM,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    Section,
    SpecSet,
    Stream,
    read_stream,
    write_stream,
)
from vmsd.runtime.transport import open_incoming, open_outgoing

_CHUNK = 1 << 20


def receive(uri: str, timeout: float = 60.0) -> bytes:
    """Everything a peer sends on ``uri`` until it closes the connection."""
    chunks: list[bytes] = []
    with open_incoming(uri, timeout=timeout) as ch:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while True:
            n = ch.readinto(view)
            if not n:
                break
            chunks.append(bytes(view[:n]))
    return b"".join(chunks)


def compact(stream: Stream) -> tuple[Stream, RamBlocks]:
    """The stream's final state as one RAM pass plus its device sections."""
    blocks = RamBlocks()
    ram_id: int | None = None
    for sec in stream.sections():
        if isinstance(sec.payload, RamPayload):
            ram_id = sec.section_id
            apply_ram(blocks, sec.payload)
    if ram_id is None:
        raise MalformedStream("the stream carries no RAM section")
    payloads = ram_section_payloads(blocks)
    kinds = [QEMU_VM_SECTION_START] + [QEMU_VM_SECTION_PART] * (len(payloads) - 2) + [QEMU_VM_SECTION_END]
    ram_version = next(s.version_id for s in stream.sections() if s.idstr == IDSTR_RAM and s.has_header)
    records: list[Section] = [
        Section(kind, ram_id, 0, IDSTR_RAM, 0, ram_version, payload=p, footer=_footers(stream))
        for kind, p in zip(kinds, payloads, strict=True)
    ]
    records += [s for s in stream.sections() if s.kind == QEMU_VM_SECTION_FULL]
    out = Stream(
        version=stream.version,
        configuration=stream.configuration,
        records=list(records),
        trailer=stream.trailer,
    )
    return out, blocks


def _footers(stream: Stream) -> bool:
    return any(s.footer for s in stream.sections())


def incoming(uri: str, output: Path, specs: SpecSet, timeout: float = 60.0) -> Stream:
    """Receive a migration and write a snapshot QEMU loads; returns the compacted stream."""
    data = receive(uri, timeout)
    stream = read_stream(data, specs)
    snapshot, blocks = compact(stream)
    try:
        tmp = output.with_name(output.name + ".partial")
        try:
            tmp.write_bytes(write_stream(snapshot))
            tmp.replace(output)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    finally:
        blocks.close()
    return snapshot


def outgoing(snapshot: Path, uri: str, timeout: float = 60.0) -> int:
    """Send a stream file to a peer; returns the bytes sent."""
    data = snapshot.read_bytes()
    with open_outgoing(uri, timeout=timeout) as ch:
        ch.write(data)
    return len(data)
