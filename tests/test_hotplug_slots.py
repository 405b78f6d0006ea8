"""Memory hot-plug slots and an xHCI controller in real streams of QEMU 7.2, 10.0 and 11.1.

The memory hot-plug state's array has one element per memory slot (``-m
...,slots=N``), a count the stream does not carry: the specs measure it while
loading.  The xHCI interrupters carry the event-queue fields QEMU describes
but never sends.  Each stream must decode by the typed specs (``inspect
--strict``) and rewrite byte for byte, also cut before its trailer as a live
stream is while its sections arrive.  QEMU 7.2 is the system one; the others
come from tests/private_peers.py (fetched when missing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from private_peers import Peer
from vmsd.cli import main
from vmsd.migration.stream import find_trailer, read_stream, write_stream
from vmsd.qemu.versions import choose, spec_set
from vmsd.testing.qmp import Qemu

TIMEOUT = 30.0
SLOTS = 2
MEMORY = f"64M,slots={SLOTS},maxmem=1G"
# One DIMM in the first slot; the second stays empty.
ARGS = ["-object", "memory-backend-ram,id=d1,size=64M", "-device", "pc-dimm,memdev=d1",
        "-device", "qemu-xhci", "-device", "usb-tablet"]
CASES = [(v, m) for v in ("7.2", "10.0", "11.1") for m in ("pc", "q35")]


@pytest.fixture(scope="module")
def streams(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    d = tmp_path_factory.mktemp("hotplug")
    out = {}
    for version, machine in CASES:
        path = out[version, machine] = d / f"{version}-{machine}.mig"
        if version == "7.2":
            q = Qemu(ARGS, machine=machine, memory=MEMORY)
        else:
            q = Peer.fetched(version).start(ARGS, machine=machine, memory=MEMORY)
        with q:
            q.migrate_to_file(path, timeout=TIMEOUT)
    return out


def _memhp(data: bytes, version: str) -> Any:
    stream = read_stream(data, spec_set(version))
    full = stream.full_sections()
    assert [s.idstr for s in full if s.generic_body is not None] == []
    pm = next(s.payload for s in full if s.idstr.endswith(("piix4_pm", "ICH9LPC")))
    return (pm.pm if hasattr(pm, "pm") else pm).acpi_memory_hotplug


@pytest.mark.parametrize(("version", "machine"), CASES)
def test_slots_and_xhci_decode_by_spec_and_rewrite(streams: dict[tuple[str, str], Path], version: str, machine: str,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = streams[version, machine]
    data = path.read_bytes()
    assert choose(data).version == version
    assert main(["inspect", "--strict", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "xhci.intr[0].er_full_unused" in shown
    memhp = _memhp(data, version)
    assert [d.is_enabled for d in memhp.devs] == [True, False]  # the DIMM's slot, then the empty one
    stream = read_stream(data, spec_set(version))
    assert write_stream(stream) == data
    out = tmp_path / "out.mig"
    assert main(["rewrite", str(path), "-o", str(out)]) == 0
    assert out.read_bytes() == data


@pytest.mark.parametrize(("version", "machine"), CASES)
def test_slots_measured_without_trailer(streams: dict[tuple[str, str], Path], version: str, machine: str) -> None:
    data = streams[version, machine].read_bytes()
    found = find_trailer(data)
    assert found is not None
    cut = data[: found[0]]  # up to the trailer's command byte
    assert len(_memhp(cut, version).devs) == SLOTS
    assert write_stream(read_stream(cut, spec_set(version))) == cut
