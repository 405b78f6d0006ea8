"""``vmsd inspect`` on normal streams: the ``pc`` and ``q35`` machines with their default devices, saved by
QEMU 7.2 (the system QEMU), 10.0 and 11.1 (private peers).

A normal stream gives no warning: the one check that compares with the destination machine (``PCIBUS``'s
``nirq``) is a note explaining the machine's own value.  Every name inspect lists for a field is one
``--set`` takes: setting each to the value inspect shows rewrites the stream byte for byte, and changing a
sample of them makes ``diff`` print exactly that name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from private_peers import PRIVATE_QEMUS, Peer
from vmsd.cli import main
from vmsd.migration.stream import SpecSet, read_stream, write_stream
from vmsd.testing.qmp import Qemu
from vmsd.tools import streams
from vmsd.tools.errors import ToolError
from vmsd.tools.streamdiff import diff_streams

NIRQ = {"pc": 4, "q35": 8}  # PCI interrupt lines of the machine's chipset: PIIX3's PIRQs, ICH9's
VERSIONS = ["7.2", *PRIVATE_QEMUS]


@pytest.fixture(scope="module", params=[(v, m) for v in VERSIONS for m in NIRQ], ids=lambda p: f"{p[0]}-{p[1]}")
def normal(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(machine, path) of the stream a paused QEMU of that version saves with its default devices."""
    version, machine = request.param
    path = tmp_path_factory.mktemp("normal") / f"{version}-{machine}.mig"
    if version == "7.2":
        qemu = Qemu([], machine=machine, nodefaults=False)
    else:
        qemu = Peer.fetched(version).start([], machine=machine, nodefaults=False)
    with qemu as q:
        q.migrate_to_file(path)
    return machine, path


def _inspect(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["inspect", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_normal_stream_warns_of_nothing(normal: tuple[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    machine, path = normal
    rc, out, err = _inspect(capsys, str(path))
    assert rc == 0 and err == ""
    assert [line for line in out.splitlines() if line.startswith("warning:")] == []
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, notes
    seen = re.search(r"check on 'nirq' failed: (0x[0-9a-f]+) != 0x0", notes[0])
    assert seen is not None and int(seen[1], 16) == NIRQ[machine]
    assert f"{NIRQ[machine]} on {machine}'s " in notes[0]  # the explanation names this machine's value


def _leaves(fields: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(path, value) of every field of a section's JSON ``fields``, paths as docs/names.md spells them."""
    out: list[tuple[str, Any]] = []
    for key, value in fields.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.extend(_leaves(value, path))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                out.extend(_leaves(v, f"{path}[{i}]"))
        elif value is not None:
            out.append((path, value))
    return out


def _literal(value: Any) -> str:
    """``value`` as --set takes it: JSON's hex strings are bytes."""
    return repr(bytes.fromhex(value)) if isinstance(value, str) else repr(value)


@pytest.mark.parametrize("decoder", ["spec", "trailer"])
def test_every_name_inspect_lists_is_one_set_takes(normal: tuple[str, Path], decoder: str) -> None:
    """With the shipped specs, and with none (every section decoded from the trailer)."""
    _, path = normal
    data = path.read_bytes()
    specs = streams.shipped_specs(None, data) if decoder == "spec" else SpecSet()
    doc = streams.stream_json(read_stream(data, specs))
    stream = read_stream(data, specs)
    names = refused = 0
    for rec in doc["records"]:
        if "fields" not in rec:
            continue
        section = f"{rec['idstr']}:{rec['instance_id']}"
        leaves = _leaves(rec["fields"])
        assert {p for p, _ in leaves} <= set(rec["offsets"])  # the tree and offsets list the same names
        for name, value in leaves:
            names += 1
            try:
                streams.apply_set(stream, f"{section}.{name}={_literal(value)}")
            except ToolError as e:
                # Only unused bytes of a typed section have no value to set, and --set says so.
                assert rec["decoded_by"] == "spec" and "unused bytes" in str(e), e
                refused += 1
        assert write_stream(stream) == data, section  # the same values: the same bytes
    assert names > 1000 and refused < (20 if decoder == "spec" else 1)


def test_diff_prints_the_name_inspect_lists(normal: tuple[str, Path]) -> None:
    _, path = normal
    data = path.read_bytes()
    specs = streams.shipped_specs(None, data)
    before = read_stream(data, specs)
    doc = streams.stream_json(before)
    ints = [(rec, name, value) for rec in doc["records"] if "fields" in rec
            for name, value in _leaves(rec["fields"]) if type(value) is int]
    for rec, name, value in ints[:: max(1, len(ints) // 12)]:
        section = f"{rec['idstr']}:{rec['instance_id']}" if rec["instance_id"] else rec["idstr"]
        edited = streams.rewrite(data, specs, [f"{section} {name}={value ^ 1}"])
        lines = diff_streams(data, before, edited, read_stream(edited, specs))
        assert len(lines) == 1 and lines[0].startswith(f"{section} {name}: "), (name, lines)
        assert json.dumps(name) in json.dumps(rec["offsets"])
