"""The engine's own pieces of the savevm stream: the configuration record, the framing writer, profiles."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmsd.migration.profile import NEWEST, PROFILES, peer_profile
from vmsd.migration.stream import (
    MIG_CMD_OPEN_RETURN_PATH,
    MachineConfiguration,
    SavevmWriter,
    Section,
    capabilities_of,
    read_stream,
)
from vmsd.qemu.v7_2 import spec_set
from vmsd.runtime.errors import SaveError, VMSDError
from vmsd.runtime.io import Reader, Writer
from vmsd.runtime.vmstate import impl

# QEMU 7.2's bytes for x-ignore-shared (captured from its stream, see the RAM/CPR spec).
IGNORE_SHARED_SUBSECTION = b"\x05\x1aconfiguration/capabilities" + bytes.fromhex("00000001 00000001") + b"\x0fx-ignore-shared"

names = st.binary(min_size=1, max_size=64).filter(lambda b: b"\0" not in b)
caps = st.lists(st.binary(min_size=1, max_size=40), max_size=4).map(tuple)


def test_configuration_record_is_qemus() -> None:
    plain = MachineConfiguration(b"pc-i440fx-7.2")
    assert plain.encode() == bytes.fromhex("0000000d") + b"pc-i440fx-7.2"
    shared = MachineConfiguration(b"pc-i440fx-7.2", (b"x-ignore-shared",))
    assert shared.encode() == plain.encode() + IGNORE_SHARED_SUBSECTION


@given(names, caps)
def test_configuration_round_trips_and_matches_the_7_2_spec(name: bytes, capabilities: tuple[bytes, ...]) -> None:
    conf = MachineConfiguration(name, capabilities)
    data = conf.encode()
    assert MachineConfiguration.decode(Reader(data)) == conf
    # The spec set's typed record reads the same bytes to the same values.
    cls = spec_set().lookup("configuration", "configuration")
    assert cls is not None
    typed = impl(cls)()
    typed.load_into(Reader(data), 0)
    assert bytes(typed.name) == name and capabilities_of(typed) == capabilities
    w = Writer()
    typed._save_nested(w, 1)
    assert w.getvalue() == data


@given(st.binary(max_size=300))
def test_configuration_from_random_bytes_raises_only_our_errors(data: bytes) -> None:
    try:
        MachineConfiguration.decode(Reader(data))
    except VMSDError:
        pass


def test_configuration_refuses_unknown_subsections_and_versions() -> None:
    base = MachineConfiguration(b"pc").encode()
    with pytest.raises(VMSDError, match="unknown subsection 'configuration/nope'"):
        MachineConfiguration.decode(Reader(base + b"\x05\x12configuration/nope" + bytes(4)))
    with pytest.raises(VMSDError, match="version 2"):
        MachineConfiguration.decode(Reader(base + b"\x05\x1econfiguration/target-page-bits" + bytes.fromhex("00000002")))
    caps = base + IGNORE_SHARED_SUBSECTION[:-20]
    with pytest.raises(VMSDError, match="4294967295 capabilities"):
        MachineConfiguration.decode(Reader(caps + bytes.fromhex("ffffffff") + bytes(1 << 16)))
    with pytest.raises(VMSDError, match="capability 0 of 2 has an empty name"):
        MachineConfiguration.decode(Reader(caps + bytes.fromhex("00000002") + bytes(2)))
    skipped = base + b"\x05\x1econfiguration/target-page-bits" + bytes.fromhex("00000001 0000000c")
    assert MachineConfiguration.decode(Reader(skipped)) == MachineConfiguration(b"pc")


def test_writer_frames_a_stream_tools_read_back() -> None:
    f = SavevmWriter()
    empty_ram = bytes.fromhex("0000000000000004") + bytes.fromhex("0000000000000010")  # MEM_SIZE 0, EOS
    data = (f.head(MachineConfiguration(b"pc", (b"x-ignore-shared",))) + f.command(MIG_CMD_OPEN_RETURN_PATH)
            + f.start(1, "ram", 4) + empty_ram + f.footer(1)
            + f.part(1) + bytes.fromhex("0000000000000010") + f.footer(1)
            + f.end(1) + bytes.fromhex("0000000000000010") + f.footer(1)
            + f.tail([]))
    stream = read_stream(data, spec_set())
    assert [r.name for r in stream.records if not isinstance(r, Section)] == ["OPEN_RETURN_PATH"]
    assert [(s.kind, s.section_id, s.footer) for s in stream.sections()] == [(1, 1, True), (2, 1, True), (3, 1, True)]
    assert stream.configuration is not None and capabilities_of(stream.configuration.state) == (b"x-ignore-shared",)


def test_writer_refuses_what_qemus_loader_would() -> None:
    f = SavevmWriter()
    with pytest.raises(SaveError, match="was not started"):
        f.part(3)
    f.start(3, "ram", 4)
    with pytest.raises(SaveError, match="started twice"):
        f.start(3, "ram", 4)
    with pytest.raises(SaveError, match="have not ended"):
        f.tail([])
    f.end(3)
    with pytest.raises(SaveError, match="was not started or has ended"):
        f.end(3)
    f.tail([])
    with pytest.raises(SaveError, match="EOF written"):
        f.command(MIG_CMD_OPEN_RETURN_PATH)
    assert SavevmWriter(footers=False).footer(1) == b""


def test_profiles() -> None:
    assert peer_profile(NEWEST.version) is NEWEST
    assert {p.max_bandwidth for p in PROFILES.values()} == {128 << 20}  # QEMU's MAX_THROTTLE since 2.x
    legacy = peer_profile("7.2")
    assert not (legacy.multifd_flush_records or legacy.multifd_zero_pages or legacy.multifd_classifies_channels)
    with pytest.raises(ValueError, match=r"peer version '6\.2' is not one of 7\.2, 10\.0"):
        peer_profile("6.2")
