"""The QEMU 11.1 spec set's layouts against QEMU 11.1 itself.

Every vmsd of the set that QEMU 11.1's ``-dump-vmstate`` describes has its
layout (tests/vmstate_dump.py).  The x86 CPU is no device with a vmsd, so the
dump leaves it out: its subsections new in 11.1 are checked on real bytes
instead.  TCG offers none of the CPU features that make QEMU send cpu/cet,
cpu/cet_shstk or cpu/apx, so vmsd writes a stream carrying them and QEMU 11.1
must load it (a wrong size or name fails the load: the section footer or the
next subsection header would not be where QEMU looks); cpu/msr_pl0_ssp and
cpu/error_code depend on values only, so QEMU sends them back when it saves
again.  The peer comes from tests/private_peers.py (fetched when missing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from private_peers import Peer
from vmsd.migration.stream import Section, Stream, find_trailer, read_stream, write_stream
from vmsd.qemu.versions import spec_set
from vmsd.testing.qmp import QMPError, load_stream
from vmstate_dump import by_vmsd_name, differences, dump

TIMEOUT = 30.0

@pytest.fixture(scope="module")
def peer() -> Peer:
    return Peer.fetched("11.1")


def test_qemu11_specs_match_dump_vmstate(peer: Peer, tmp_path: Path) -> None:
    # The dump describes every device type the binary has, whatever the machine.
    described = by_vmsd_name(dump(peer.cmd, peer.env, "q35", tmp_path / "dump.json"))
    specs = spec_set("11.1").load_all()
    found = []
    compared = set()
    for name in specs.names():
        cls = specs.get(name)
        if cls is not None and name in described:
            compared.add(name)
            found += differences(cls, described[name])
    # The device sections of the default pc and q35 machines (nested vmsds are compared inside them).
    assert {"I440FX", "ICH9LPC", "PIIX3", "dma", "e1000", "e1000e", "fdc", "fw_cfg", "hpet", "i8254", "i8259",
            "ich9_ahci", "ich9_smb", "ide", "ioapic", "kvm-tpr-opt", "mc146818rtc", "mch", "parallel_isa", "pckbd",
            "pcspk", "piix4_pm", "port92", "ps2kbd", "ps2mouse", "vga", "vmmouse", "xhci"} <= compared
    assert found == []


def _stream(peer: Peer, path: Path, args: list[str]) -> bytes:
    with peer.start(args, machine="pc") as q:
        q.migrate_to_file(path, timeout=TIMEOUT)
    return path.read_bytes()


def _cpu(stream: Stream) -> Section:
    return next(s for s in stream.full_sections() if s.idstr == "cpu")


def _cpu_subsections(data: bytes) -> list[str]:
    found = find_trailer(data)
    assert found is not None
    cpu = next(d for d in found[1].get("devices") if d.get("name") == "cpu")
    return [s.get("vmsd_name") for s in cpu.get("subsections", [])]


def test_qemu11_cpu_max_stream_decodes_by_spec(peer: Peer, tmp_path: Path) -> None:
    """-cpu max under TCG: QEMU's trailer describes its cpu as the spec does (byte-exact rewrite)."""
    data = _stream(peer, tmp_path / "max.mig", ["-cpu", "max"])
    stream = read_stream(data, spec_set("11.1"))
    assert _cpu(stream).generic_body is None
    assert set(_cpu_subsections(data)) <= {s.name for s in type(_cpu(stream).payload).VMSD.subsections}
    assert write_stream(stream) == data


def _with_features(payload: Any) -> Any:
    """``payload`` again, as a CPU whose model has CET (shadow stacks, IBT) and APX."""
    class WithFeatures(type(payload)):  # type: ignore[misc]
        def cet_needed(self, version_id: int) -> bool:
            return True

        def shstk_needed(self, version_id: int) -> bool:
            return True

        def apx_needed(self, version_id: int) -> bool:
            return True

    return WithFeatures.load(payload.save())


NEW_STATE = {
    "u_cet": 0x11, "s_cet": 0x22, "pl1_ssp": 0x1000, "pl2_ssp": 0x2000, "pl3_ssp": 0x3000,
    "int_ssp_table": 0x4000, "guest_ssp": 0x5000, "pl0_ssp": 0x6000,
    # A #PF (vector 14) with its error code pending delivery.
    "exception_nr": 14, "has_error_code": 1, "error_code": 6,
}


def _written_with_new_subsections(peer: Peer, tmp_path: Path) -> tuple[bytes, Stream]:
    stream = read_stream(_stream(peer, tmp_path / "src.mig", []), spec_set("11.1"))
    sec = _cpu(stream)
    cpu = _with_features(sec.payload)
    for name, value in NEW_STATE.items():
        setattr(cpu, name, value)
    cpu.egprs = [0x1600 + i for i in range(16)]
    sec.payload = cpu
    return write_stream(stream), stream


def test_qemu11_loads_the_new_cpu_subsections_vmsd_writes(peer: Peer, tmp_path: Path) -> None:
    data, _ = _written_with_new_subsections(peer, tmp_path)
    new = ["cpu/error_code", "cpu/msr_pl0_ssp", "cpu/cet", "cpu/apx"]  # in QEMU's order; cet holds cet_shstk
    assert [s for s in _cpu_subsections(data) if s in new] == new
    path = tmp_path / "new.mig"
    path.write_bytes(data)
    q = load_stream(path, machine="pc", command=(peer.cmd, peer.env), timeout=TIMEOUT)
    try:
        again = tmp_path / "again.mig"
        q.migrate_to_file(again, timeout=TIMEOUT)
    finally:
        q.stop()
    # Saved again by QEMU: the value-driven subsections come back with their values, the
    # feature-driven ones stay away (TCG's CPU has neither CET nor APX).
    resaved = again.read_bytes()
    sent_back = _cpu_subsections(resaved)
    assert {"cpu/error_code", "cpu/msr_pl0_ssp"} <= set(sent_back)
    assert not {"cpu/cet", "cpu/cet_shstk", "cpu/apx"} & set(sent_back)
    stream = read_stream(resaved, spec_set("11.1"))
    cpu = _cpu(stream).payload
    assert (cpu.pl0_ssp, cpu.exception_nr, cpu.has_error_code, cpu.error_code) == (0x6000, 14, 1, 6)
    assert write_stream(stream) == resaved


def test_qemu11_refuses_a_cet_shstk_subsection_one_field_short(peer: Peer, tmp_path: Path) -> None:
    """The control: QEMU 11.1 does check these bytes, so the load above proves their layout."""
    data, _ = _written_with_new_subsections(peer, tmp_path)
    header = b"\x05\x0dcpu/cet_shstk\x00\x00\x00\x01"
    at = data.index(header) + len(header)
    path = tmp_path / "short.mig"
    path.write_bytes(data[:at] + data[at + 8:])
    with pytest.raises(QMPError):
        load_stream(path, machine="pc", command=(peer.cmd, peer.env), timeout=TIMEOUT).stop()
