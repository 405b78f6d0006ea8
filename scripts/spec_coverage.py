"""How many sections of real QEMU streams vmsd's spec sets decode.

For each QEMU version (7.2: the system's qemu-system-x86_64; 10.0 and 11.1:
unpacked under ~/.cache/vmsd by their fetch scripts when missing) and for
the pc and q35 machines with their default devices and with -nodefaults,
saves a stream from the real QEMU and counts its FULL sections decoded by
the version's typed spec and those decoded from QEMU's trailer, naming the
latter.  Prints a Markdown table (docs/index.md carries its output).

    .venv/bin/python scripts/spec_coverage.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from vmsd.migration.stream import read_stream
from vmsd.qemu.versions import spec_set
from vmsd.testing.qemu10 import QEMU10
from vmsd.testing.qemu11 import QEMU11
from vmsd.testing.qmp import QEMU_BINARY, save_stream

MACHINES = ["pc", "q35"]


def command(version: str) -> tuple[list[str], dict[str, str]]:
    if version == "7.2":
        return [QEMU_BINARY], {}
    private = {"10.0": QEMU10, "11.1": QEMU11}[version]
    return private.command(private.ensure())


def coverage(version: str, machine: str, defaults: bool, work: Path) -> tuple[int, list[str]]:
    """(sections decoded by spec, idstrs of those decoded from the trailer) of one saved stream."""
    path = work / f"{version}-{machine}-{defaults}.mig"
    # The QMP driver turns the default serial port off (-serial none); a null backend brings it back.
    save_stream(path, ["-serial", "null"] if defaults else [], machine=machine, command=command(version),
                nodefaults=not defaults)
    full = read_stream(path.read_bytes(), spec_set(version)).full_sections()
    by_trailer = [s.idstr for s in full if s.generic_body is not None]
    return len(full) - len(by_trailer), by_trailer


def main() -> None:
    print("| QEMU | machine | devices | by spec | from the trailer |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="vmsd-coverage-") as d:
        for version in ("7.2", "10.0", "11.1"):
            for machine in MACHINES:
                for defaults in (True, False):
                    typed, by_trailer = coverage(version, machine, defaults, Path(d))
                    named = f"{len(by_trailer)}: " + ", ".join(f"`{n}`" for n in by_trailer) if by_trailer else "0"
                    print(f"| {version} | {machine} | {'default' if defaults else '-nodefaults'} "
                          f"| {typed} of {typed + len(by_trailer)} | {named} |")


if __name__ == "__main__":
    main()
