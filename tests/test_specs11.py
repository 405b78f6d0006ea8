"""The QEMU 11.1 spec set against streams QEMU 11.1 saves.

The peer comes from tests/private_peers.py: fetched when missing (package
registry only), a failed fetch fails the test; never skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from private_peers import Peer
from vmsd.cli import main
from vmsd.migration.stream import find_trailer, read_stream, write_stream
from vmsd.qemu.versions import choose, spec_set

TIMEOUT = 15.0

STREAM_CONFIGS: dict[str, tuple[str, bool, int]] = {  # name: (machine, default devices, possible CPUs)
    "pc": ("pc", False, 1),
    "q35": ("q35", False, 1),
    "pc-defaults": ("pc", True, 1),
    "q35-defaults": ("q35", True, 1),
    "pc-maxcpus3": ("pc", False, 3),
    "q35-maxcpus3": ("q35", False, 3),
}


@pytest.fixture(scope="module")
def streams11(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    peer = Peer.fetched("11.1")
    d = tmp_path_factory.mktemp("streams11")
    out = {}
    for name, (machine, defaults, cpus) in STREAM_CONFIGS.items():
        path = out[name] = d / f"{name}.mig"
        with peer.start(["-smp", f"1,maxcpus={cpus}"], machine=machine, nodefaults=not defaults) as q:
            q.migrate_to_file(path, timeout=TIMEOUT)
    return out


def _cpuhp(payload: Any) -> Any:
    return payload.pm.cpuhp_state if hasattr(payload, "pm") else payload.cpuhp_state


@pytest.mark.parametrize("name", list(STREAM_CONFIGS))
def test_qemu11_stream_decodes_by_spec_and_rewrites_byte_exact(streams11: dict[str, Path], name: str,
                                                                 tmp_path: Path) -> None:
    machine, defaults, cpus = STREAM_CONFIGS[name]
    data = streams11[name].read_bytes()
    assert choose(data).version == "11.1"
    stream = read_stream(data, spec_set("11.1"))
    full = stream.full_sections()
    assert [s.idstr for s in full if s.generic_body is not None] == []
    idstrs = {s.idstr.rsplit("/", 1)[-1] for s in full}
    assert {"globalstate", "hpet", "cpu", "apic", "mc146818rtc"} <= idstrs
    if defaults:
        assert {"parallel_isa", "vga", "fdc" if machine == "pc" else "e1000e"} <= idstrs
    # The CPU hot-plug state QEMU 11.1 always sends: one element per possible CPU, none inserting.
    pm = next(s.payload for s in full if s.idstr.endswith(("piix4_pm", "ICH9LPC")))
    devs = _cpuhp(pm).devs
    assert len(devs) == cpus
    assert not any(d.is_inserting or d.is_removing for d in devs)
    assert write_stream(stream) == data
    out = tmp_path / "out.mig"
    assert main(["rewrite", str(streams11[name]), "-o", str(out)]) == 0
    assert out.read_bytes() == data


def test_qemu11_cpuhp_measured_without_trailer(streams11: dict[str, Path]) -> None:
    """Cut before its trailer (as a live stream is while its sections arrive), the stream still sizes the
    CPU hot-plug array by spec."""
    data = streams11["q35-maxcpus3"].read_bytes()
    found = find_trailer(data)
    assert found is not None
    cut = data[: found[0]]  # up to the trailer's command byte
    stream = read_stream(cut, spec_set("11.1"))
    assert stream.trailer is None
    pm = next(s.payload for s in stream.full_sections() if s.idstr.endswith("ICH9LPC"))
    assert len(_cpuhp(pm).devs) == 3
