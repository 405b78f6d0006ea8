"""Real QEMU 7.2 saves streams; vmsd decodes, rewrites and edits them; QEMU loads them back.

QEMU is part of the test set-up (scripts/setup.sh installs it): its absence
is a failure, not a skip.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vmsd.cli import main
from vmsd.migration.precopy import parse_settings
from vmsd.migration.profile import peer_profile
from vmsd.migration.ram.records import RamPayload
from vmsd.migration.stream import (
    MIG_CMD_PACKAGED,
    QEMU_VM_SECTION_FULL,
    Command,
    RegistryError,
    Section,
    read_stream,
    write_stream,
)
from vmsd.qemu.v7_2 import spec_set
from vmsd.runtime import VMSDError
from vmsd.testing.qmp import QEMU_BINARY, Qemu, load_stream, save_stream

RICH = [
    "-netdev", "user,id=n0", "-device", "e1000,netdev=n0",
    "-netdev", "user,id=n1", "-device", "virtio-net-pci,netdev=n1",
    "-device", "isa-serial", "-device", "pvpanic",
    "-device", "qemu-xhci", "-device", "usb-tablet", "-device", "usb-ehci", "-device", "ich9-ahci",
    "-vga", "std",
]

CONFIGS: dict[str, dict[str, object]] = {
    "pc": {"machine": "pc"},
    "q35": {"machine": "q35"},
    "pc-rich-bios": {"machine": "pc", "args": RICH, "run_seconds": 1.0},
    "q35-rich-bios": {"machine": "q35", "args": RICH, "run_seconds": 1.0},
    "pc-no-footers": {"machine": "pc", "globals_": ["migration.send-section-footer=off"]},
    "pc-no-configuration": {"machine": "pc", "globals_": ["migration.send-configuration=off"]},
    "pc-no-trailer": {"machine": "pc,suppress-vmdesc=on"},
}


def test_qemu_is_installed() -> None:
    assert shutil.which(QEMU_BINARY), f"{QEMU_BINARY} is required (scripts/setup.sh installs qemu-system-x86)"


@pytest.fixture(scope="module")
def streams(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("streams")
    disk = d / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    out = {}
    for name, cfg in CONFIGS.items():
        args = list(cfg.get("args", []))  # type: ignore[call-overload]
        if "rich" in name:
            args += ["-drive", f"if=none,id=d0,file={disk},format=raw", "-device", "virtio-blk-pci,drive=d0"]
        path = d / f"{name}.mig"
        save_stream(path, args=args, machine=str(cfg["machine"]), run_seconds=float(cfg.get("run_seconds", 0.0)),  # type: ignore[arg-type]
                    globals_=list(cfg.get("globals_", [])))  # type: ignore[call-overload]
        out[name] = path
    return out


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "pc-no-trailer"])
def test_rewrite_is_byte_identical(streams: dict[str, Path], name: str, tmp_path: Path) -> None:
    data = streams[name].read_bytes()
    stream = read_stream(data, spec_set())
    assert write_stream(stream) == data
    out = tmp_path / "out.mig"
    assert main(["rewrite", str(streams[name]), "-o", str(out)]) == 0
    assert out.read_bytes() == data


def test_footers_and_configuration_detected(streams: dict[str, Path]) -> None:
    plain = read_stream(streams["pc"].read_bytes(), spec_set())
    assert plain.configuration is not None and plain.configuration.state.name == b"pc-i440fx-7.2"
    assert all(s.footer for s in plain.sections())
    assert not any(s.footer for s in read_stream(streams["pc-no-footers"].read_bytes(), spec_set()).sections())
    assert read_stream(streams["pc-no-configuration"].read_bytes(), spec_set()).configuration is None


# Sections allowed to decode only through the trailer (none: every section of
# these machines has a typed 7.2 spec).
PENDING_TYPED: set[str] = set()


@pytest.mark.parametrize("name", ["pc", "q35", "pc-rich-bios", "q35-rich-bios"])
def test_sections_decode_through_typed_specs(streams: dict[str, Path], name: str) -> None:
    stream = read_stream(streams[name].read_bytes(), spec_set())
    generic = sorted({s.idstr for s in stream.full_sections() if s.generic_body is not None})
    typed = sorted({s.idstr for s in stream.full_sections() if s.generic_body is None})
    assert {"cpu", "mc146818rtc", "i8254", "apic"} <= set(typed)
    unexpected = [i for i in generic if i.rsplit("/", 1)[-1] not in PENDING_TYPED]
    assert not unexpected, f"decoded only through the trailer: {unexpected}; warnings: {stream.warnings}"


def test_stream_without_trailer_needs_specs(streams: dict[str, Path]) -> None:
    data = streams["pc-no-trailer"].read_bytes()
    try:
        stream = read_stream(data, spec_set())
    except RegistryError as e:
        # A section without a typed spec is named, never guessed.
        assert "no spec for section" in str(e) and "no trailer" in str(e)
        return
    assert stream.trailer is None
    assert write_stream(stream) == data


def test_edited_stream_loads_in_qemu(streams: dict[str, Path], tmp_path: Path) -> None:
    edited = tmp_path / "edited.mig"
    assert main(["rewrite", str(streams["pc"]), "-o", str(edited), "--set", "mc146818rtc.cmos_data[14]=0x55"]) == 0
    back = tmp_path / "back.mig"
    q = load_stream(edited)
    try:
        q.migrate_to_file(back)
    finally:
        q.stop()
    assert _cmos(back)[14] == 0x55
    assert _cmos(streams["pc"])[14] != 0x55


def _cmos(path: Path) -> bytes:
    rtc = next(s for s in read_stream(path.read_bytes(), spec_set()).full_sections() if s.idstr == "mc146818rtc")
    if rtc.generic_body is not None:
        return bytes(rtc.payload.get("cmos_data"))
    return bytes(rtc.payload.cmos_data)


def _save_with_capabilities(path: Path, tmp: Path, caps: dict[str, bool]) -> None:
    mem = ["-object", f"memory-backend-file,id=m,size=32M,mem-path={tmp}/ram,share=on", "-machine", "memory-backend=m"]
    with Qemu(mem) as q:
        q.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": v} for c, v in caps.items()])
        q.migrate_to_file(path)


def test_packaged_command_and_ignore_shared(streams: dict[str, Path], tmp_path: Path) -> None:
    """Streams analyze-migration.py cannot read: commands (a PACKAGED one) and x-ignore-shared block lists."""
    stream = read_stream(streams["pc"].read_bytes(), spec_set())
    full = [r for r in stream.records if isinstance(r, Section) and r.kind == QEMU_VM_SECTION_FULL]
    rest = [r for r in stream.records if not (isinstance(r, Section) and r.kind == QEMU_VM_SECTION_FULL)]
    package = Command(MIG_CMD_PACKAGED, 0, b"", packaged=full, package_eof=True)
    stream.records = [*rest, package]
    data = write_stream(stream)
    packaged = tmp_path / "packaged.mig"
    packaged.write_bytes(data)
    again = read_stream(data, spec_set())
    assert [r.name for r in again.records if isinstance(r, Command)] == ["PACKAGED"]
    assert write_stream(again) == data
    load_stream(packaged).stop()  # QEMU loads the package as we wrote it

    shared = tmp_path / "shared.mig"
    mem = ["-object", f"memory-backend-file,id=m,size=32M,mem-path={tmp_path}/ram,share=on", "-machine", "memory-backend=m"]
    with Qemu(mem) as q:
        q.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
        q.migrate_to_file(shared)
    data = shared.read_bytes()
    stream = read_stream(data, spec_set())
    assert stream.configuration is not None and b"x-ignore-shared" in stream.configuration.state.capabilities
    blocks = [b for s in stream.sections() if isinstance(s.payload, RamPayload) for r in s.payload.records for b in r.blocks]
    assert blocks and all(b.addr is not None for b in blocks)
    assert write_stream(stream) == data


def test_serial_scratch_register_edit_survives_qemu(streams: dict[str, Path], tmp_path: Path) -> None:
    edited = tmp_path / "serial.mig"
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    assert main(["rewrite", str(streams["pc-rich-bios"]), "-o", str(edited), "--set", "serial.state.scr=0x5a"]) == 0
    args = [*RICH, "-drive", f"if=none,id=d0,file={disk},format=raw", "-device", "virtio-blk-pci,drive=d0"]
    back = tmp_path / "back.mig"
    q = load_stream(edited, args=args)
    try:
        q.migrate_to_file(back)
    finally:
        q.stop()
    serial = next(s for s in read_stream(back.read_bytes(), spec_set()).full_sections() if s.idstr == "serial")
    assert serial.generic_body is None and serial.payload.state.scr == 0x5A


def test_qemu_rejects_what_we_reject(streams: dict[str, Path], tmp_path: Path) -> None:
    """A stream cut before EOF: both QEMU and vmsd refuse it (QEMU with an I/O error)."""
    data = streams["pc"].read_bytes()
    stream = read_stream(data, spec_set())
    assert stream.eof_offset is not None
    cut = tmp_path / "cut.mig"
    cut.write_bytes(data[: stream.eof_offset])
    with pytest.raises(VMSDError):
        read_stream(cut.read_bytes(), spec_set())
    with pytest.raises(Exception, match="load of migration failed"):
        load_stream(cut).stop()


def test_parameter_defaults_are_qemus() -> None:
    """The peer profile's defaults are what QEMU 7.2 reports (max-bandwidth: MAX_THROTTLE, 128 MiB/s)."""
    with Qemu([]) as q:
        params = q.qmp.cmd("query-migrate-parameters")
    assert parse_settings(None, None, peer_profile("7.2"))[1]["max-bandwidth"] == params["max-bandwidth"]
