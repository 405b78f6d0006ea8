"""Valid but adversarial inputs for the memory bounds: many tiny records of every kind, big specs.

Each maker takes a byte budget and returns an input of about that size, made
of the smallest records of its kind, so that per-record costs (objects, not
bytes) dominate.  tests/test_memory_bounds.py asserts on them and
benchmarks/memory.py measures every tool on them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

from vmsd.runtime.vmdesc import dumps, loads

HEADER = b"QEVM\x00\x00\x00\x03"
EOF = b"\x00"
FOOTER = 0x7E

# Command numbers (QEMU's enum qemu_vm_cmd).
OPEN_RETURN_PATH, PING, POSTCOPY_ADVISE, POSTCOPY_LISTEN = 1, 2, 3, 4
POSTCOPY_RAM_DISCARD, PACKAGED, ENABLE_COLO, RECV_BITMAP, SWITCHOVER_START = 6, 7, 8, 10, 11

RAM_ZERO, RAM_MEM_SIZE, RAM_EOS, RAM_CONTINUE = 0x02, 0x04, 0x10, 0x20
PAGE = 4096


def command(cmd: int, data: bytes = b"") -> bytes:
    return b"\x08" + struct.pack(">HH", cmd, len(data)) + data


def packaged(inner: bytes) -> bytes:
    return command(PACKAGED, struct.pack(">I", len(inner))) + inner


def full_section(section_id: int, idstr: bytes, payload: bytes, instance: int = 0, version: int = 1) -> bytes:
    return (b"\x04" + struct.pack(">I", section_id) + bytes([len(idstr)]) + idstr
            + struct.pack(">II", instance, version) + payload + struct.pack(">BI", FOOTER, section_id))


def _ram_head(section_id: int, kind: int) -> bytes:
    if kind == 1:  # START carries idstr, instance, version 4
        return b"\x01" + struct.pack(">I", section_id) + b"\x03ram" + struct.pack(">II", 0, 4)
    return bytes([kind]) + struct.pack(">I", section_id)


def ram_section(section_id: int, kind: int, records: bytes) -> bytes:
    """A RAM START (kind 1), PART (2) or END (3) section: ``records``, EOS, footer."""
    return _ram_head(section_id, kind) + records + struct.pack(">Q", RAM_EOS) + struct.pack(">BI", FOOTER, section_id)


def mem_size(blocks: list[tuple[bytes, int]]) -> bytes:
    out = struct.pack(">Q", sum(n for _, n in blocks) | RAM_MEM_SIZE)
    return out + b"".join(bytes([len(name)]) + name + struct.pack(">Q", n) for name, n in blocks)


def ram_prologue(block: bytes = b"pc.ram", size: int = 1 << 20) -> bytes:
    """A RAM START announcing one block (what incoming needs before anything else)."""
    return ram_section(1, 1, mem_size([(block, size)]))


def trailer(devices: list[dict[str, object]]) -> bytes:
    """The JSON trailer as QEMU prints it (so that a rewrite, which regenerates it, gives the same bytes)."""
    text = dumps(loads(json.dumps({"page_size": PAGE, "devices": devices}))).encode()
    return b"\x06" + struct.pack(">I", len(text)) + text


def _fill(budget: int, make: Callable[[int], bytes]) -> list[bytes]:
    out, used, i = [], 0, 0
    while used < budget:
        piece = make(i)
        out.append(piece)
        used += len(piece)
        i += 1
    return out


def _commands(budget: int, make: Callable[[int], bytes], ram: bool) -> bytes:
    head = HEADER + (ram_prologue() if ram else b"")
    tail = ram_section(1, 3, b"") if ram else b""
    return head + b"".join(_fill(budget, make)) + tail + EOF


_ZERO_LENGTH = (OPEN_RETURN_PATH, POSTCOPY_LISTEN, ENABLE_COLO, SWITCHOVER_START)


# ---- streams: name -> maker(budget, ram) ------------------------------------------------------------
# ``ram``: frame the records with a RAM section (vmsd incoming needs one).

def distinct_pings(budget: int, ram: bool = False) -> bytes:
    """PINGs, each with another value: no two neighbours alike (9 bytes each)."""
    return _commands(budget, lambda i: command(PING, struct.pack(">I", i)), ram)


def alternating_empty_commands(budget: int, ram: bool = False) -> bytes:
    """Commands without data, each kind after another kind (5 bytes each)."""
    return _commands(budget, lambda i: command(_ZERO_LENGTH[i % len(_ZERO_LENGTH)]), ram)


def distinct_advises(budget: int, ram: bool = False) -> bytes:
    """POSTCOPY_ADVISE with its two be64 page sizes, each pair different (21 bytes each)."""
    return _commands(budget, lambda i: command(POSTCOPY_ADVISE, struct.pack(">QQ", PAGE, i)), ram)


def distinct_discards(budget: int, ram: bool = False) -> bytes:
    """POSTCOPY_RAM_DISCARD, version 0, a block name, one range (5 + 22 bytes each)."""
    return _commands(budget, lambda i: command(
        POSTCOPY_RAM_DISCARD, b"\x00\x04ram" + bytes([i & 0xFF]) + b"\x00" + struct.pack(">QQ", i * PAGE, PAGE)), ram)


def distinct_bitmaps(budget: int, ram: bool = False) -> bytes:
    """RECV_BITMAP of a block name that changes every time (5 + 5 bytes each)."""
    return _commands(budget, lambda i: command(RECV_BITMAP, b"\x04" + struct.pack(">I", i)), ram)


def empty_packages(budget: int, ram: bool = False) -> bytes:
    """PACKAGED commands that hold only an EOF (10 bytes each)."""
    return _commands(budget, lambda i: packaged(EOF), ram)


def deep_packages(budget: int, ram: bool = False) -> bytes:
    """Packages nested to the limit (8), the innermost holding distinct PINGs."""
    from vmsd.migration.limits import MAX_PACKAGE_DEPTH

    inner = b"".join(_fill(budget, lambda i: command(PING, struct.pack(">I", i)))) + EOF
    for _ in range(MAX_PACKAGE_DEPTH - 1):
        inner = packaged(inner) + EOF
    if ram:
        return HEADER + ram_prologue() + packaged(inner) + ram_section(1, 3, b"") + EOF
    return HEADER + packaged(inner) + EOF


def typed_sections(budget: int, ram: bool = False) -> bytes:
    """FULL sections of port92 (a one-byte spec of every shipped set), no trailer (26 bytes each)."""
    return _commands(budget, lambda i: full_section(2 + i, b"port92", bytes([i & 0xFF]), instance=i), ram)


def described_sections(budget: int, ram: bool = False) -> bytes:
    """FULL sections of a device no spec knows, each described by its own trailer entry."""
    n = budget // 110
    body = {"vmsd_name": "tiny", "version": 1, "fields": [{"name": "b", "type": "uint8", "size": 1}]}
    devices: list[dict[str, object]] = [{"name": "tiny", "instance_id": i, **body} for i in range(n)]
    sections = b"".join(full_section(2 + i, b"tiny", bytes([i & 0xFF]), instance=i) for i in range(n))
    head = HEADER + (ram_prologue() if ram else b"")
    return head + sections + (ram_section(1, 3, b"") if ram else b"") + EOF + trailer(devices)


def wide_section(budget: int, ram: bool = False) -> bytes:
    """One FULL section whose trailer entry lists a one-byte field per ~40 bytes of budget."""
    n = budget // 40
    fields = [{"name": f"f{i}", "type": "uint8", "size": 1} for i in range(n)]
    device = {"name": "wide", "instance_id": 0, "vmsd_name": "wide", "version": 1, "fields": fields}
    head = HEADER + (ram_prologue() if ram else b"")
    return head + full_section(2, b"wide", bytes(n)) + (ram_section(1, 3, b"") if ram else b"") + EOF + trailer([device])


def many_subsections(budget: int, ram: bool = False) -> bytes:
    """One FULL section of a trailer body with a one-byte subsection per ~60 bytes of budget."""
    n = budget // 60
    subs = [{"vmsd_name": f"w/{i}", "version": 1, "fields": [{"name": "b", "type": "uint8", "size": 1}]}
            for i in range(n)]
    device = {"name": "w", "instance_id": 0, "vmsd_name": "w", "version": 1,
              "fields": [{"name": "a", "type": "uint8", "size": 1}], "subsections": subs}
    payload = b"\x00" + b"".join(b"\x05" + bytes([len(f"w/{i}")]) + f"w/{i}".encode() + struct.pack(">I", 1) + b"\x01"
                                 for i in range(n))
    head = HEADER + (ram_prologue() if ram else b"")
    return head + full_section(2, b"w", payload) + (ram_section(1, 3, b"") if ram else b"") + EOF + trailer([device])


def tiny_ram_sections(budget: int, ram: bool = True) -> bytes:
    """RAM PART sections holding only EOS (18 bytes each), after a START."""
    parts = b"".join(_fill(budget, lambda i: ram_section(1, 2, b"")))
    return HEADER + ram_prologue() + parts + ram_section(1, 3, b"") + EOF


def many_ram_blocks(budget: int, ram: bool = True) -> bytes:
    """One MEM_SIZE record announcing a one-page block per 14 bytes of budget."""
    n = budget // 14
    blocks = [(b"b%x" % i, PAGE) for i in range(n)]
    return HEADER + ram_section(1, 1, mem_size(blocks)) + ram_section(1, 3, b"") + EOF


def zero_pages_of_many_blocks(budget: int, ram: bool = True) -> bytes:
    """Blocks of one page, each announced (14 bytes) and then sent as a zero page naming it (15 bytes)."""
    n = budget // 29
    names = [b"b%x" % i for i in range(n)]
    pages = b"".join(struct.pack(">Q", RAM_ZERO) + bytes([len(name)]) + name + b"\x00" for name in names)
    return HEADER + ram_section(1, 1, mem_size([(name, PAGE) for name in names])) + ram_section(1, 3, pages) + EOF


STREAMS: dict[str, Callable[..., bytes]] = {
    "distinct PINGs": distinct_pings,
    "alternating empty commands": alternating_empty_commands,
    "distinct ADVISEs": distinct_advises,
    "distinct RAM_DISCARDs": distinct_discards,
    "distinct RECV_BITMAPs": distinct_bitmaps,
    "empty PACKAGEDs": empty_packages,
    "packages 8 deep": deep_packages,
    "typed 1-byte sections": typed_sections,
    "trailer-described sections": described_sections,
    "one section, many fields": wide_section,
    "one section, many subsections": many_subsections,
    "empty RAM sections": tiny_ram_sections,
    "many RAM blocks": many_ram_blocks,
    "zero pages of many blocks": zero_pages_of_many_blocks,
}


# ---- specs: name -> maker(budget) ------------------------------------------------------------------

def many_vmsds(budget: int) -> str:
    return "".join(f'vmsd "v{i}" version 1 minimum 1 {{ uint8 a }}\n' for i in range(budget // 40))


def many_fields(budget: int) -> str:
    n = budget // 30
    return 'vmsd "big" version 1 minimum 1 {\n' + "".join(
        f"    uint8 f{i} if (f{i - 1} == 1)\n" if i else "    uint8 f0\n" for i in range(n)) + "}\n"


def long_docs(budget: int) -> str:
    n = budget // 80
    return "".join(f"## {'word ' * 14}{i}\n" for i in range(n)) + 'vmsd "d" version 1 minimum 1 { uint8 a }\n'


def many_comments(budget: int) -> str:
    n = budget // 20
    return 'vmsd "c" version 1 minimum 1 {\n' + "".join(f"    # c{i}\n    uint8 f{i}\n" for i in range(n)) + "}\n"


SPECS: dict[str, Callable[[int], str]] = {
    "many vmsds": many_vmsds,
    "many fields": many_fields,
    "long docs": long_docs,
    "many comments": many_comments,
}
