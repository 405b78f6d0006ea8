"""QEMU 7.2's default pc and q35 machines (no -nodefaults) against the 7.2 spec set.

The system QEMU 7.2 saves the streams.  Every section decodes by spec, the
default devices' (serial and parallel port, VGA, NIC, floppy) included.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmsd.migration.stream import read_stream, write_stream
from vmsd.qemu.versions import spec_set
from vmsd.testing.qmp import save_stream


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_qemu72_default_machine_decodes_by_spec(machine: str, tmp_path: Path) -> None:
    path = tmp_path / f"{machine}.mig"
    # The QMP driver turns the default serial port off (-serial none); a null backend brings it back.
    save_stream(path, ["-serial", "null"], machine=machine, nodefaults=False)
    data = path.read_bytes()
    stream = read_stream(data, spec_set("7.2"))
    full = stream.full_sections()
    assert [s.idstr for s in full if s.generic_body is not None] == []
    idstrs = {s.idstr.rsplit("/", 1)[-1] for s in full}
    assert {"serial", "parallel_isa", "vga", *(["e1000e"] if machine == "q35" else ["e1000", "fdc"])} <= idstrs
    if machine == "q35":
        nic = next(s.payload for s in full if s.idstr.endswith("/e1000e"))
        # QEMU's first default MAC address, and 7.2's interrupt-pending flags (unused bytes since).
        assert bytes(nic.permanent_mac) == bytes.fromhex("525400123456")
        assert (nic.itr_intr_pending, nic.eitr_intr_pending) == (False, [False] * 5)
    # The parallel port as parallel_reset() leaves it: data registers all ones, status
    # BUSY|ACK|ONLINE|ERROR|TMOUT, control SELECT|INIT|0xc0.
    port = next(s.payload for s in full if s.idstr == "parallel_isa")
    assert (port.dataw, port.datar, port.status, port.control) == (0xFF, 0xFF, 0xD9, 0xCC)
    assert write_stream(stream) == data
