"""Malformed migration streams: one clear error, with offset and section, never a traceback.

Every case is built from bytes: either a real QEMU 7.2 stream (saved by the
module fixture) patched in one place, or a minimal synthetic stream.  Each case
is checked twice: ``read_stream`` must raise the named :class:`VMSDError`
subclass at the named offset, and ``vmsd inspect`` must exit 1 with exactly one
line on stderr that names the offset (and the section and field when known).

The last part runs real QEMU on the same bytes: where QEMU and vmsd disagree,
the test records both verdicts; docs/stream-errors.md is the table of them.

Cases marked ``xfail(strict=True, reason="BUG: ...")`` are requirements vmsd
does not meet yet; they turn into failures the day they are fixed, so that the
marker is removed.
"""

from __future__ import annotations

import signal
import struct
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmsd.cli import main
from vmsd.migration.stream import (
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    Section,
    SpecSet,
    Stream,
    read_stream,
    write_stream,
)
from vmsd.qemu.v7_2 import spec_set
from vmsd.runtime.errors import MalformedStream, RegistryError, TruncatedStream, VersionMismatch, VMSDError
from vmsd.testing.qmp import QMPError, load_stream, save_stream

MAGIC = struct.pack(">I", 0x5145564D)
HEADER = MAGIC + struct.pack(">I", 3)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def shipped() -> SpecSet:
    """The specs `vmsd inspect` uses."""
    return spec_set()


def trailer_only() -> SpecSet:
    """Only the configuration record is typed: every section decodes from the trailer."""
    conf = spec_set().lookup("configuration", "configuration")
    assert conf is not None
    return SpecSet({"configuration": conf})


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail with TimeoutError when the block runs longer than ``seconds``."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------
# The real stream and where its records are


@dataclass
class Real:
    """A real pc stream and the offsets of its parts."""

    data: bytes
    stream: Stream

    def full(self, idstr: str) -> Section:
        return next(
            s
            for s in self.stream.records
            if isinstance(s, Section) and s.kind == QEMU_VM_SECTION_FULL and s.idstr == idstr
        )

    def ram(self, kind: int) -> Section:
        return next(s for s in self.stream.records if isinstance(s, Section) and s.idstr == "ram" and s.kind == kind)

    def end(self, rec: Any) -> int:
        """Offset of the record after ``rec`` (the EOF byte after the last one)."""
        records = self.stream.records
        i = records.index(rec)
        if i + 1 < len(records):
            return records[i + 1].offset
        assert self.stream.eof_offset is not None
        return self.stream.eof_offset

    def footer(self, rec: Section) -> int:
        return self.end(rec) - 5

    def version_at(self, sec: Section) -> int:
        return sec.offset + 1 + 4 + 1 + len(sec.idstr.encode()) + 4

    def patch(self, offset: int, new: bytes) -> bytes:
        return self.data[:offset] + new + self.data[offset + len(new) :]

    def insert(self, offset: int, new: bytes) -> bytes:
        return self.data[:offset] + new + self.data[offset:]

    @property
    def conf_end(self) -> int:
        """End of the configuration record: where the first record starts."""
        return self.stream.records[0].offset

    @property
    def eof(self) -> int:
        assert self.stream.eof_offset is not None
        return self.stream.eof_offset

    @property
    def trailer(self) -> int:
        assert self.stream.trailer_offset is not None
        return self.stream.trailer_offset

    @property
    def sub(self) -> int:
        """The ``cpu/poll_control_msr`` subsection marker of the cpu section."""
        at = self.data.find(b"\x05\x14cpu/poll_control_msr", self.full("cpu").offset)
        assert at > 0
        return at

    @property
    def no_trailer(self) -> bytes:
        return self.data[: self.eof + 1]


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Real:
    path = tmp_path_factory.mktemp("streams") / "pc.mig"
    save_stream(path, machine="pc")
    data = path.read_bytes()
    return Real(data, read_stream(data, trailer_only()))


def test_pristine_stream_inspects(real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The baseline every patch below starts from is accepted."""
    path = tmp_path / "pc.mig"
    path.write_bytes(real.data)
    assert main(["inspect", str(path)]) == 0
    assert capsys.readouterr().err == ""
    read_stream(real.data, shipped())
    assert real.full("timer").offset < real.full("cpu").offset < real.sub < real.end(real.full("cpu"))


# ---------------------------------------------------------------------------
# One case per malformation

Offset = Callable[[Real], int | tuple[int, ...]]


@dataclass
class Case:
    id: str
    build: Callable[[Real], bytes]
    exc: type[VMSDError]
    offset: Offset
    section: str | None = None
    path: str = ""  # substring of the error's field path
    message: str = ""  # substring of the message (case-insensitive)
    bug: str = ""  # xfail reason for both checks
    cli_bug: str = ""  # xfail reason for the CLI check only


def _synthetic_trailer(text: bytes) -> bytes:
    return b"\x06" + u32(len(text)) + text


EMPTY_TRAILER = _synthetic_trailer(b'{"page_size": 4096, "devices": []}')

CASES: list[Case] = [
    # -- header
    Case("empty-input", lambda r: b"", TruncatedStream, lambda r: 0),
    Case("short-magic", lambda r: MAGIC[:3], TruncatedStream, lambda r: 0),
    Case("bad-magic", lambda r: r.patch(0, b"QEVX"), MalformedStream, lambda r: 0, message="magic"),
    Case("bad-magic-synthetic", lambda r: bytes(4) + u32(3) + b"\x00", MalformedStream, lambda r: 0, message="magic"),
    Case("version-2-obsolete", lambda r: r.patch(4, u32(2)), MalformedStream, lambda r: 4, message="obsolete"),
    Case("version-4", lambda r: r.patch(4, u32(4)), MalformedStream, lambda r: 4, message="version 4"),
    Case(
        "version-ffffffff", lambda r: MAGIC + u32(0xFFFFFFFF) + b"\x00", MalformedStream, lambda r: 4, message="version"
    ),
    Case("header-only", lambda r: HEADER, TruncatedStream, lambda r: 8),
    # -- configuration record
    Case(
        "config-name-length-ffffffff",
        lambda r: r.patch(9, u32(0xFFFFFFFF)),
        TruncatedStream,
        lambda r: 13,
        section="configuration",
        path="configuration.name",
    ),
    Case(
        "config-name-length-ffffffff-synthetic",
        lambda r: HEADER + b"\x07" + u32(0xFFFFFFFF) + b"pc",
        TruncatedStream,
        lambda r: 13,
        section="configuration",
        path="configuration.name",
    ),
    Case(
        "config-record-twice",
        lambda r: r.insert(r.conf_end, r.data[8 : r.conf_end]),
        MalformedStream,
        lambda r: r.conf_end,
        message="section type 7",
    ),
    # -- record types and section headers
    Case(
        "unknown-section-type-synthetic",
        lambda r: HEADER + b"\x09",
        MalformedStream,
        lambda r: 8,
        message="section type 9",
    ),
    Case(
        "unknown-section-type",
        lambda r: r.patch(r.full("timer").offset, b"\x09"),
        MalformedStream,
        lambda r: r.full("timer").offset,
        message="section type 9",
    ),
    Case(
        "subsection-marker-at-top-level",
        lambda r: HEADER + b"\x05\x03cpu",
        MalformedStream,
        lambda r: 8,
        message="type 5",
    ),
    Case(
        "footer-marker-at-top-level",
        lambda r: HEADER + b"\x7e" + u32(0),
        MalformedStream,
        lambda r: 8,
        message="type 126",
    ),
    Case(
        "trailer-marker-before-eof",
        lambda r: r.insert(r.conf_end, b"\x06"),
        MalformedStream,
        lambda r: r.conf_end,
        message="type 6",
    ),
    Case(
        "part-of-unknown-section-synthetic",
        lambda r: HEADER + b"\x02" + u32(7),
        MalformedStream,
        lambda r: 8,
        message="unknown savevm section 7",
    ),
    Case(
        "part-of-unknown-section",
        lambda r: r.patch(r.ram(QEMU_VM_SECTION_PART).offset + 1, u32(99)),
        MalformedStream,
        lambda r: r.ram(QEMU_VM_SECTION_PART).offset,
        message="unknown savevm section 99",
    ),
    Case(
        "empty-idstr",
        lambda r: HEADER + b"\x04" + u32(0) + b"\x00" + u32(0) + u32(1),
        MalformedStream,
        lambda r: 8,
        message="idstr",
    ),
    Case(
        "idstr-length-past-end-synthetic",
        lambda r: HEADER + b"\x04" + u32(1) + b"\xffabc",
        TruncatedStream,
        lambda r: 14,
    ),
    Case(
        "idstr-length-past-end",
        lambda r: r.data[: r.full("timer").offset + 5] + b"\xfftimer",
        TruncatedStream,
        lambda r: r.full("timer").offset + 6,
    ),
    Case(
        "unknown-idstr",
        lambda r: r.patch(r.full("timer").offset + 6, b"tuner"),
        RegistryError,
        lambda r: r.full("timer").offset,
        section="tuner",
    ),
    Case(
        "idstr-with-newline",
        lambda r: HEADER + b"\x04" + u32(1) + b"\x03a\nb" + u32(0) + u32(1) + b"\x00",
        RegistryError,
        lambda r: 8,
    ),
    Case(
        "truncated-after-idstr",
        lambda r: r.data[: r.full("timer").offset + 13],
        TruncatedStream,
        lambda r: r.full("timer").offset + 11,
        section="timer",
    ),
    # -- versions
    Case(
        "ram-version-5",
        lambda r: r.patch(r.version_at(r.ram(1)), u32(5)),
        VersionMismatch,
        lambda r: r.ram(1).offset,
        section="ram",
        message="version",
    ),
    Case(
        "section-version-too-high-no-trailer",
        lambda r: (
            r.no_trailer[: r.version_at(r.full("timer"))] + u32(3) + r.no_trailer[r.version_at(r.full("timer")) + 4 :]
        ),
        VersionMismatch,
        lambda r: (r.full("timer").offset, r.version_at(r.full("timer")), r.version_at(r.full("timer")) + 4),
        section="timer",
        message="version",
    ),
    Case(
        "section-version-too-low-no-trailer",
        lambda r: (
            r.no_trailer[: r.version_at(r.full("timer"))] + u32(0) + r.no_trailer[r.version_at(r.full("timer")) + 4 :]
        ),
        VersionMismatch,
        lambda r: (r.full("timer").offset, r.version_at(r.full("timer")), r.version_at(r.full("timer")) + 4),
        section="timer",
        message="version",
    ),
    Case(
        "section-version-too-high",
        lambda r: r.patch(r.version_at(r.full("timer")), u32(3)),
        VersionMismatch,
        lambda r: (r.full("timer").offset, r.version_at(r.full("timer")), r.version_at(r.full("timer")) + 4),
        section="timer",
        message="version",
        bug="BY DESIGN (issue 3): a version the typed spec does not know is decoded from the trailer with a "
        "warning; QEMU refuses ('unsupported version 3'). Without a trailer vmsd refuses too",
    ),
    Case(
        "section-version-too-low",
        lambda r: r.patch(r.version_at(r.full("timer")), u32(0)),
        VersionMismatch,
        lambda r: (r.full("timer").offset, r.version_at(r.full("timer")), r.version_at(r.full("timer")) + 4),
        section="timer",
        message="version",
        bug="BY DESIGN (issue 3): decoded from the trailer with a warning; QEMU refuses ('too old for local "
        "minimum version_id 1'). Without a trailer vmsd refuses too",
    ),
    Case(
        "subsection-version-too-high-no-trailer",
        lambda r: r.no_trailer[: r.sub + 22] + u32(2) + r.no_trailer[r.sub + 26 :],
        VersionMismatch,
        lambda r: (r.sub, r.sub + 22),
        section="cpu",
        path="cpu/poll_control_msr",
        message="version",
    ),
    Case(
        "subsection-version-too-high",
        lambda r: r.patch(r.sub + 22, u32(2)),
        VersionMismatch,
        lambda r: (r.sub, r.sub + 22),
        section="cpu",
        path="cpu/poll_control_msr",
        message="version",
        bug="BY DESIGN (issue 3): a subsection version the spec does not know sends the section to the trailer "
        "decoder with a warning; QEMU refuses ('incoming version_id 2 is too new')",
    ),
    # -- footers
    Case(
        "footer-byte",
        lambda r: r.patch(r.footer(r.full("timer")), b"\x7f"),
        MalformedStream,
        lambda r: r.footer(r.full("timer")),
        section="timer",
        message="footer",
    ),
    Case(
        "footer-section-id",
        lambda r: r.patch(r.footer(r.full("timer")) + 1, u32(99)),
        MalformedStream,
        lambda r: r.footer(r.full("timer")),
        section="timer",
        message="footer",
    ),
    Case(
        "first-footer-byte",
        lambda r: r.patch(r.footer(r.ram(1)), b"\x00"),
        MalformedStream,
        lambda r: r.footer(r.ram(1)),
        section="ram",
        message="footer",
    ),
    Case(
        "first-footer-byte-not-a-record",
        lambda r: r.patch(r.footer(r.ram(1)), b"\x7f"),
        MalformedStream,
        lambda r: r.footer(r.ram(1)),
        section="ram",
        message="footer",
    ),
    Case(
        "first-footer-byte-trailer-marker",
        lambda r: r.patch(r.footer(r.ram(1)), b"\x06"),
        MalformedStream,
        lambda r: r.footer(r.ram(1)),
        section="ram",
        message="footer",
    ),
    # -- subsections
    Case(
        "subsection-foreign-prefix",
        lambda r: r.patch(r.sub + 2, b"cpX"),
        MalformedStream,
        lambda r: r.sub,
        section="cpu",
    ),
    Case(
        "subsection-unknown",
        lambda r: r.patch(r.sub + 2, b"cpu/poll_control_xyz"),
        MalformedStream,
        lambda r: r.sub,
        section="cpu",
        message="subsection",
    ),
    # -- RAM
    Case(
        "ram-unknown-flags",
        lambda r: r.patch(r.ram(1).offset + 17 + 6, b"\x04\x04"),
        MalformedStream,
        lambda r: r.ram(1).offset + 17,
        section="ram",
        message="flags",
    ),
    # -- commands
    Case("command-0", lambda r: HEADER + b"\x08\x00\x00\x00\x00", MalformedStream, lambda r: 8, message="MIG_CMD 0x0"),
    Case(
        "command-unknown",
        lambda r: r.insert(r.conf_end, b"\x08\x00\x0c\x00\x00"),
        MalformedStream,
        lambda r: r.conf_end,
        message="MIG_CMD 0xc",
    ),
    Case(
        "command-bad-length",
        lambda r: r.insert(r.conf_end, b"\x08\x00\x02\x00\x03abc"),
        MalformedStream,
        lambda r: r.conf_end,
        message="bad length",
    ),
    Case(
        "packaged-4gib-synthetic",
        lambda r: HEADER + b"\x08\x00\x07\x00\x04" + u32(0xFFFFFFFF) + b"\x00",
        TruncatedStream,
        lambda r: 8,
        message="PACKAGED",
    ),
    Case(
        "packaged-4gib",
        lambda r: r.insert(r.conf_end, b"\x08\x00\x07\x00\x04" + u32(0xFFFFFFFF)),
        TruncatedStream,
        lambda r: r.conf_end,
        message="PACKAGED",
    ),
    Case(
        "packaged-bad-record",
        lambda r: HEADER + b"\x08\x00\x07\x00\x04" + u32(1) + b"\x09\x00",
        MalformedStream,
        lambda r: 17,
        message="section type 9",
    ),
    Case(
        "packaged-truncated-section",
        lambda r: r.insert(r.conf_end, b"\x08\x00\x07\x00\x04" + u32(8) + r.data[r.full("timer").offset :][:8]),
        TruncatedStream,
        lambda r: (r.conf_end + 9 + 6,),
        message="expected",
    ),
    # -- EOF and trailer
    Case("trailer-type-only", lambda r: HEADER + b"\x00\x06", TruncatedStream, lambda r: 10),
    Case(
        "trailer-length-past-end",
        lambda r: HEADER + b"\x00\x06" + u32(0xFFFFFFFF) + b"{}",
        TruncatedStream,
        lambda r: 14,
    ),
    Case(
        "trailer-not-json",
        lambda r: HEADER + b"\x00" + _synthetic_trailer(b"abc"),
        MalformedStream,
        lambda r: 9,
        message="JSON",
    ),
    Case(
        "garbage-after-trailer-synthetic",
        lambda r: HEADER + b"\x00" + EMPTY_TRAILER + b"garbage",
        MalformedStream,
        lambda r: 9 + len(EMPTY_TRAILER),
        message="after the trailer",
    ),
    Case(
        "garbage-after-trailer",
        lambda r: r.data + b"garbage",
        MalformedStream,
        lambda r: len(r.data),
        message="after the trailer",
    ),
    Case(
        "garbage-after-eof",
        lambda r: HEADER + b"\x00garbage",
        MalformedStream,
        lambda r: 9,
        message="trailer",
    ),
]


def _params(which: str) -> list[Any]:
    out = []
    for c in CASES:
        reason = c.bug or (c.cli_bug if which == "cli" else "")
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def _offsets(case: Case, r: Real) -> tuple[int, ...]:
    got = case.offset(r)
    return got if isinstance(got, tuple) else (got,)


def check_error(e: VMSDError, case: Case, r: Real) -> None:
    assert type(e) is case.exc or isinstance(e, case.exc), f"{type(e).__name__}: {e}"
    assert e.offset in _offsets(case, r), f"offset {e.offset} not in {_offsets(case, r)}: {e}"
    if case.section is not None:
        assert e.section == case.section, str(e)
    assert case.path in e.path, f"path {e.path!r} lacks {case.path!r}"
    assert case.message.lower() in str(e).lower()


def inspect_error(path: Path, capsys: pytest.CaptureFixture[str], command: str = "inspect") -> str:
    """Run ``vmsd inspect`` on a bad stream; return its one stderr line."""
    capsys.readouterr()
    argv = [command, str(path)]
    if command == "rewrite":
        argv += ["-o", str(path.with_suffix(".out"))]
    elif command == "diff":
        argv += [str(path)]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    assert rc == 1, f"exit {rc}; stdout tail: {out[-300:]!r}"
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith(f"vmsd {command}: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("case", _params("read"))
def test_read_stream_raises(case: Case, real: Real) -> None:
    data = case.build(real)
    with pytest.raises(VMSDError) as info:
        read_stream(data, shipped())
    check_error(info.value, case, real)


@pytest.mark.parametrize("case", _params("cli"))
def test_inspect_reports_one_line(case: Case, real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.mig"
    path.write_bytes(case.build(real))
    line = inspect_error(path, capsys)
    assert any(f"at offset {o:#x}" in line for o in _offsets(case, real)), line
    if case.section is not None:
        assert f"section '{case.section}'" in line
    assert case.path in line


@pytest.mark.parametrize("command", ["rewrite", "diff"])
@pytest.mark.parametrize("case_id", ["bad-magic", "footer-byte", "config-name-length-ffffffff", "subsection-unknown"])
def test_other_commands_report_one_line(
    case_id: str, command: str, real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = next(c for c in CASES if c.id == case_id)
    path = tmp_path / "bad.mig"
    path.write_bytes(case.build(real))
    line = inspect_error(path, capsys, command)
    assert f"at offset {_offsets(case, real)[0]:#x}" in line
    assert not path.with_suffix(".out").exists()


def test_trailer_not_json_in_real_stream(real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real stream whose trailer is not JSON is refused (QEMU does not parse the trailer and accepts it)."""
    data = real.patch(real.trailer + 5, b"[")
    with pytest.raises(VMSDError) as info:
        read_stream(data, shipped())
    # Either the trailer itself is reported, or the first section that only the trailer could have described.
    assert info.value.offset is not None and info.value.offset <= real.trailer
    path = tmp_path / "bad.mig"
    path.write_bytes(data)
    inspect_error(path, capsys)


def test_trailer_not_json_names_the_trailer(real: Real) -> None:
    data = real.patch(real.trailer + 5, b"[")
    with pytest.raises(VMSDError, match=r"(?i)json|trailer at") as info:
        read_stream(data, trailer_only())
    assert f"trailer at offset {real.trailer:#x}" in str(info.value) and "not valid JSON" in str(info.value)
    assert info.value.section == "timer" and info.value.offset == real.full("timer").offset


def test_trailer_found_by_its_framing(real: Real) -> None:
    """A trailer that is valid JSON but does not start as QEMU's does (keys reordered) is still found and used."""
    text = real.data[real.trailer + 5 :]
    assert text.startswith(b'{"page_size": 4096, "devices": ')
    reordered = b'{"devices": ' + text[len(b'{"page_size": 4096, "devices": ') : -1] + b', "page_size": 4096}'
    data = real.data[: real.trailer] + _synthetic_trailer(reordered)
    stream = read_stream(data, trailer_only())
    assert stream.trailer_offset == real.trailer and stream.trailer_text == reordered
    assert len(stream.full_sections()) == len(real.stream.full_sections())


# ---------------------------------------------------------------------------
# Truncation anywhere


def _cut_points(r: Real) -> list[int]:
    cuts = set(range(r.conf_end + 1))  # every byte of header and configuration
    for rec in r.stream.records:
        for at in (rec.offset - 1, rec.offset, rec.offset + 1, rec.offset + 6, r.end(rec) - 5, r.end(rec) - 1):
            cuts.add(at)
    part = r.ram(QEMU_VM_SECTION_PART)
    for k in range(1, 12):  # spread through the RAM pages
        cuts.add(part.offset + k * (r.end(part) - part.offset) // 12)
    for name in ("cpu", "vmmouse", "globalstate"):
        sec = r.full(name)
        cuts.add((sec.offset + r.end(sec)) // 2)
    cuts.update(
        {r.eof, r.eof + 2, r.trailer + 3, r.trailer + 5, r.trailer + 6, (r.trailer + len(r.data)) // 2, len(r.data) - 1}
    )
    cuts.discard(r.eof + 1)  # a stream that ends right after EOF is complete (see test_missing_trailer)
    return sorted(c for c in cuts if 0 <= c < len(r.data))


def test_truncated_anywhere(real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cuts = _cut_points(real)
    assert len(cuts) > 150
    specs = shipped()
    for i, cut in enumerate(cuts):
        with pytest.raises(VMSDError) as info:
            read_stream(real.data[:cut], specs)
        e = info.value
        assert e.offset is not None and e.offset <= cut, (cut, str(e))
        if cut <= real.full("timer").offset:
            # Nothing typed or described was needed yet: it is the truncation that is reported.
            assert isinstance(e, TruncatedStream), (cut, str(e))
        if i % 8 == 0:
            path = tmp_path / "cut.mig"
            path.write_bytes(real.data[:cut])
            assert f"(at offset {e.offset:#x})" in inspect_error(path, capsys)


def test_truncated_in_a_typed_section_names_the_field(real: Real) -> None:
    timer = real.full("timer")
    payload = timer.offset + 1 + 4 + 1 + len("timer") + 8
    with pytest.raises(TruncatedStream) as info:
        read_stream(real.data[: payload + 3], shipped())
    assert info.value.offset == payload and info.value.section == "timer" and info.value.path.startswith("timer.")


# ---------------------------------------------------------------------------
# Absurd lengths: quick failure, memory bounded by the input


def _peak(data: bytes, specs: SpecSet, seconds: float) -> tuple[int, VMSDError | None]:
    """Peak traced allocation while parsing ``data`` (and the error, if any), within ``seconds``."""
    err = None
    tracemalloc.start()
    try:
        with deadline(seconds):
            try:
                read_stream(data, specs)
            except VMSDError as e:
                err = e
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, err


@pytest.fixture(scope="module")
def pristine_peak(real: Real) -> int:
    """What parsing the whole valid stream costs: the most a same-sized input can justify.

    (Decoded RAM records and typed objects cost well over the bytes they come from, so the
    valid stream's own peak, not a small multiple of its size, is the yardstick.)
    """
    return _peak(real.data, shipped(), 30.0)[0]


def _bounded(data: bytes, specs: SpecSet, seconds: float = 5.0, justified: int = 0) -> VMSDError:
    """Parse ``data``; return the VMSDError, asserting time and peak allocation stay small.

    The peak may reach a few times the input (plus a constant for tiny inputs), or what
    parsing the valid stream the input was patched from takes (``justified``).
    """
    peak, err = _peak(data, specs, seconds)
    if err is None:
        pytest.fail("accepted")
    limit = max(4 * len(data) + (256 << 10), int(justified * 1.25))
    assert peak < limit, f"peak {peak} bytes for {len(data)} bytes of input (limit {limit})"
    return err


def test_absurd_mem_size_total(real: Real, pristine_peak: int) -> None:
    start = real.ram(1)
    word = start.offset + 17
    assert struct.unpack_from(">Q", real.data, word)[0] & 0xFFF == 0x004
    err = _bounded(real.patch(word, struct.pack(">Q", 0xFFFFFFFFFFFFF004)), shipped(), justified=pristine_peak)
    assert isinstance(err, MalformedStream) and err.section == "ram" and err.offset is not None and err.offset >= word


def test_absurd_idstr_length() -> None:
    err = _bounded(HEADER + b"\x04" + u32(1) + b"\xff" + b"x" * 10, shipped())
    assert isinstance(err, TruncatedStream) and err.offset == 14


def test_absurd_packaged_length(real: Real, pristine_peak: int) -> None:
    err = _bounded(
        real.insert(real.conf_end, b"\x08\x00\x07\x00\x04" + u32(0xFFFFFFFF)), shipped(), justified=pristine_peak
    )
    assert isinstance(err, TruncatedStream) and err.offset == real.conf_end


@pytest.mark.parametrize("length", [0xFFFFFFFF, 0x7FFFFFFF])
def test_absurd_vbuffer_length(real: Real, length: int, pristine_peak: int) -> None:
    """The configuration's ``name[len]`` (a VBUFFER) with a huge ``len``."""
    err = _bounded(real.patch(9, u32(length)), shipped(), justified=pristine_peak)
    assert isinstance(err, TruncatedStream) and err.offset == 13 and err.path == "configuration.name"


def test_absurd_trailer_length(real: Real, pristine_peak: int) -> None:
    err = _bounded(real.patch(real.trailer + 1, u32(0xFFFFFFFF)), shipped(), justified=pristine_peak)
    assert err.offset is not None and err.offset <= real.trailer + 5


def _caps_stream(count: int, after: bytes) -> bytes:
    name = b"pc-i440fx-7.2"
    sub = b"configuration/capabilities"
    return HEADER + b"\x07" + u32(len(name)) + name + b"\x05" + bytes([len(sub)]) + sub + u32(1) + u32(count) + after


def test_absurd_capability_count_small_input() -> None:
    err = _bounded(_caps_stream(0xFFFFFFFF, bytes(2000)), shipped())
    assert err.offset is not None


class _OverBudget(BaseException):
    """Raised from the profile hook: BaseException, so no ``except Exception`` in the decoder swallows it."""


def _calls_within(budget: int, fn: Callable[[], object]) -> int:
    """Run ``fn`` counting function calls (Python and C); stop it with _OverBudget past ``budget``.

    A deterministic measure of work: a loop driven by an announced count of 2**32 runs
    into the budget at once instead of hanging the test, and a loaded machine changes nothing.
    """
    calls = 0

    def hook(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        calls += 1
        if calls > budget:
            raise _OverBudget(f"more than {budget} calls")

    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("names", [bytes(1 << 20), b"\x01x" * (1 << 19)], ids=["empty-names", "1-MiB-of-names"])
def test_absurd_capability_count_costs_what_the_input_holds(names: bytes) -> None:
    """2**32 capabilities announced: the work follows the bytes present, not the count."""
    data = _caps_stream(0xFFFFFFFF, names)
    errors: list[VMSDError] = []

    def parse() -> None:
        try:
            read_stream(data, shipped())
        except VMSDError as e:
            errors.append(e)

    shipped()  # importing the specs is not the parse's cost
    calls = _calls_within(2 * len(data), parse)
    assert errors and errors[0].section == "configuration"
    if not names[0]:
        assert calls < 10_000  # the first empty name ends it
    tracemalloc.start()
    try:
        parse()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(data) + (256 << 10), f"peak {peak} bytes for {len(data)} bytes of input"


def test_absurd_trailer_array_len() -> None:
    desc = (
        b'{"page_size": 4096, "devices": [{"name": "x", "instance_id": 0, "vmsd_name": "x", "version": 1, '
        b'"fields": [{"name": "a", "array_len": 300000, "type": "buffer", "size": 0}]}]}'
    )
    data = (
        HEADER + b"\x04" + u32(1) + b"\x01x" + u32(0) + u32(1) + b"\x7e" + u32(1) + b"\x00" + _synthetic_trailer(desc)
    )
    peak, _ = _peak(data, trailer_only(), 3.0)  # refusing it and decoding it cheaply are both fine
    assert peak < 4 * len(data) + (256 << 10), f"peak {peak} bytes for {len(data)} bytes of input"


# ---------------------------------------------------------------------------
# Malformed trailer descriptions (the generic decoder trusts the JSON)

TRAILER_MUTATIONS = [
    pytest.param(b'"size": 8}', b'"sizf": 8}', id="field-without-size"),
    pytest.param(b'"size": 8}', b'"size": "x"}', id="size-is-a-string"),
    pytest.param(b'"size": 8}', b'"size": 1.5}', id="size-is-a-float"),
    pytest.param(b'"array_len": 16', b'"array_len": []', id="array-len-is-a-list"),
    pytest.param(b'"type": "uint32"', b'"type": []', id="type-is-a-list"),
]


@pytest.mark.parametrize(("old", "new"), TRAILER_MUTATIONS)
def test_malformed_trailer_entry(
    real: Real, old: bytes, new: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = real.data[real.trailer + 5 :]
    assert old in text
    text = text.replace(old, new, 1)
    data = real.data[: real.trailer] + _synthetic_trailer(text)
    with pytest.raises(VMSDError):
        read_stream(data, trailer_only())
    path = tmp_path / "bad.mig"
    path.write_bytes(data)
    inspect_error(path, capsys)


def test_non_utf8_idstr_round_trips(real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vmsd.migration.stream import write_stream

    timer = real.full("timer")
    name = b"\xff" * 200 + b"/timer"
    sec = (
        real.data[timer.offset : timer.offset + 5]
        + bytes([len(name)])
        + name
        + real.data[timer.offset + 11 : real.end(timer)]
    )
    data = real.data[: timer.offset] + sec + real.data[real.end(timer) :]
    stream = read_stream(data, shipped())
    assert write_stream(stream) == data


def test_non_utf8_idstr_as_qemu_names_it(real: Real) -> None:
    """QEMU's trailer names a non-UTF-8 idstr with U+FFFD for each bad byte: the section is found there,
    decoded from it, and the stream rewrites byte for byte."""
    timer = real.full("timer")
    name = b"\xff\xfe/timer"
    head = real.data[timer.offset : timer.offset + 5] + bytes([len(name)]) + name
    sec = head + real.data[timer.offset + 11 : real.end(timer)]
    text = real.data[real.trailer + 5 :]
    old = b'{"name": "timer", "instance_id": 0'
    assert text.count(old) == 1
    text = text.replace(old, b'{"name": "\\uFFFD\\uFFFD/timer", "instance_id": 0')
    data = real.data[: timer.offset] + sec + real.data[real.end(timer) : real.trailer] + _synthetic_trailer(text)
    stream = read_stream(data, trailer_only())
    got = next(s for s in stream.full_sections() if s.idstr.endswith("/timer"))
    assert got.generic_body is not None
    assert write_stream(stream) == data


@pytest.mark.parametrize(
    ("change", "what"),
    [
        pytest.param(lambda s: setattr(s, "idstr", "x" * 256), "256 bytes", id="idstr-too-long"),
        pytest.param(lambda s: setattr(s, "idstr", "\ud800"), "idstr", id="idstr-lone-surrogate"),
        pytest.param(lambda s: setattr(s, "instance_id", -1), "encode", id="instance-id-negative"),
        pytest.param(lambda s: setattr(s, "payload", None), "encode", id="payload-missing"),
    ],
)
def test_write_failures_are_vmsd_errors(real: Real, change: Callable[[Section], None], what: str) -> None:
    """Whatever a caller put in a stream, write_stream fails with one VMSDError naming the section."""
    stream = read_stream(real.data, shipped())
    timer = next(s for s in stream.records if isinstance(s, Section) and s.idstr == "timer")
    at = timer.offset
    change(timer)
    with pytest.raises(VMSDError, match=what) as info:
        write_stream(stream)
    assert info.value.section == timer.idstr and info.value.offset == at


# ---------------------------------------------------------------------------
# QEMU 7.2 versus vmsd on the same bytes (docs/stream-errors.md)


@dataclass
class Verdict:
    id: str
    build: Callable[[Real], bytes]
    qemu_accepts: bool
    qemu_says: str  # substring of QEMU's output ("" = nothing printed)
    vmsd_accepts: bool
    vmsd_bug: str = ""


def _dup_timer(r: Real) -> bytes:
    t = r.full("timer")
    return r.insert(r.end(t), r.data[t.offset : r.end(t)])


def _drop_timer(r: Real) -> bytes:
    t = r.full("timer")
    return r.data[: t.offset] + r.data[r.end(t) :]


def _timer_instance_7(r: Real) -> bytes:
    return r.patch(r.full("timer").offset + 11, u32(7))


def _ram_only(r: Real) -> bytes:
    """Header, configuration, the RAM sections and EOF: QEMU loads it (devices keep their reset state)
    and vmsd needs no spec or trailer for it."""
    return r.data[: r.full("timer").offset] + b"\x00"


def _machine(name: bytes) -> Callable[[Real], bytes]:
    return lambda r: r.data[:8] + b"\x07" + u32(len(name)) + name + r.data[r.conf_end :]


VERDICTS = [
    # QEMU accepts, vmsd rejects
    Verdict(
        "garbage-after-trailer",
        lambda r: r.data + b"garbage",
        True,
        "",
        False,
    ),
    Verdict(
        "wrong-byte-after-eof",
        lambda r: _ram_only(r) + b"\x07garbage",
        True,
        "Expected vmdescription section, but got 7",
        False,
    ),
    Verdict("trailer-not-json", lambda r: r.patch(r.trailer + 5, b"["), True, "", False),
    Verdict("trailer-cut-in-length", lambda r: r.data[: r.trailer + 3], True, "", False),
    Verdict("trailer-cut-in-json", lambda r: r.data[: (r.trailer + len(r.data)) // 2], True, "", False),
    Verdict("trailer-last-byte-missing", lambda r: r.data[:-1], True, "", False),
    # both accept
    Verdict("subsection-version-0x101", lambda r: r.patch(r.sub + 22, u32(0x101)), True, "", True),
    Verdict("machine-type-prefix", _machine(b"pc-i440fx-7"), True, "", True),
    Verdict("section-missing", _drop_timer, True, "", True),
    Verdict("all-device-sections-missing", _ram_only, True, "Expected vmdescription section, but got 0", True),
    Verdict("section-duplicated-typed", _dup_timer, True, "", True),
    # QEMU rejects, vmsd accepts (vmsd is no destination machine)
    Verdict("unknown-instance-typed", _timer_instance_7, False, "Unknown savevm section or instance 'timer' 7", True),
    Verdict("machine-type-other", _machine(b"pc-i440fx-6.2"), False, "Machine type received is 'pc-i440fx-6.2'", True),
    Verdict(
        "configuration-missing",
        lambda r: r.data[:8] + r.data[r.conf_end :],
        False,
        "Configuration section missing",
        True,
    ),
    Verdict(
        "switchover-start-command",
        lambda r: r.insert(r.conf_end, b"\x08\x00\x0b\x00\x00"),
        False,
        "MIG_CMD 0xb unknown",
        True,
    ),
    Verdict(
        "ping-without-return-path",
        lambda r: r.insert(r.conf_end, b"\x08\x00\x02\x00\x04" + u32(1)),
        False,
        "received with no return path",
        True,
    ),
    # both reject
    Verdict("bad-magic", lambda r: r.patch(0, b"QEVX"), False, "Not a migration stream", False),
    Verdict("version-2", lambda r: r.patch(4, u32(2)), False, "SaveVM v2 format is obsolete", False),
    Verdict("version-4", lambda r: r.patch(4, u32(4)), False, "Unsupported migration stream version", False),
    Verdict(
        "unknown-section-type",
        lambda r: r.patch(r.full("timer").offset, b"\x09"),
        False,
        "Unknown savevm section type 9",
        False,
    ),
    Verdict(
        "unknown-idstr",
        lambda r: r.patch(r.full("timer").offset + 6, b"tuner"),
        False,
        "Unknown savevm section or instance 'tuner'",
        False,
    ),
    Verdict(
        "footer-byte",
        lambda r: r.patch(r.footer(r.full("timer")), b"\x7f"),
        False,
        "Missing section footer for timer",
        False,
    ),
    Verdict(
        "subsection-foreign-prefix",
        lambda r: r.patch(r.sub + 2, b"cpX"),
        False,
        "Missing section footer for cpu",
        False,
    ),
    Verdict(
        "subsection-unknown",
        lambda r: r.patch(r.sub + 2, b"cpu/poll_control_xyz"),
        False,
        "error while loading state for instance 0x0 of device 'cpu'",
        False,
    ),
    Verdict(
        "command-bad-length",
        lambda r: r.insert(r.conf_end, b"\x08\x00\x02\x00\x03abc"),
        False,
        "received with bad length",
        False,
    ),
    Verdict(
        "truncated-in-ram",
        lambda r: r.data[: r.ram(QEMU_VM_SECTION_PART).offset + 5000],
        False,
        "error while loading state section id 2(ram)",
        False,
    ),
    Verdict("truncated-before-eof", lambda r: r.data[: r.eof], False, "Input/output error", False),
    # QEMU rejects, vmsd accepts, and should not
    Verdict(
        "section-version-too-high",
        lambda r: r.patch(r.version_at(r.full("timer")), u32(3)),
        False,
        "unsupported version 3 for 'timer' v2",
        False,
        vmsd_bug="BY DESIGN (issue 3): decoded from the trailer with a warning",
    ),
    Verdict(
        "section-version-too-low",
        lambda r: r.patch(r.version_at(r.full("timer")), u32(0)),
        False,
        "too old for local minimum version_id",
        False,
        vmsd_bug="BY DESIGN (issue 3): decoded from the trailer with a warning",
    ),
    Verdict(
        "subsection-version-too-high",
        lambda r: r.patch(r.sub + 22, u32(2)),
        False,
        "cpu/poll_control_msr: incoming version_id 2 is too new",
        False,
        vmsd_bug="BY DESIGN (issue 3): decoded from the trailer with a warning",
    ),
    Verdict(
        "first-footer-byte",
        lambda r: r.patch(r.footer(r.ram(1)), b"\x00"),
        False,
        "Missing section footer for ram",
        False,
    ),
]


def qemu_verdict(path: Path) -> tuple[bool, str]:
    try:
        q = load_stream(path)
    except QMPError as e:
        return False, str(e)
    try:
        return True, q.output()
    finally:
        q.stop()


@pytest.mark.parametrize("v", [pytest.param(v, id=v.id) for v in VERDICTS])
def test_qemu_verdict(v: Verdict, real: Real, tmp_path: Path) -> None:
    path = tmp_path / "case.mig"
    path.write_bytes(v.build(real))
    accepted, output = qemu_verdict(path)
    assert accepted == v.qemu_accepts, output
    assert v.qemu_says in output


@pytest.mark.parametrize(
    "v",
    [
        pytest.param(v, id=v.id, marks=[pytest.mark.xfail(strict=True, reason=v.vmsd_bug)] if v.vmsd_bug else [])
        for v in VERDICTS
    ],
)
def test_vmsd_verdict(v: Verdict, real: Real, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "case.mig"
    path.write_bytes(v.build(real))
    if v.vmsd_accepts:
        assert main(["inspect", str(path)]) == 0
        assert capsys.readouterr().err == ""
    else:
        inspect_error(path, capsys)


def _timer_without_footer(r: Real) -> bytes:
    t = r.full("timer")
    return HEADER + r.data[t.offset : r.end(t) - 5]


@pytest.mark.parametrize(
    "tail", [pytest.param(b"", id="no-trailer"), pytest.param(EMPTY_TRAILER, id="trailer")]
)
def test_footerless_section_then_eof(real: Real, tail: bytes) -> None:
    """A footer-less stream may end right after its first section (when it is not a START): EOF, then
    the trailer or nothing."""
    stream = read_stream(_timer_without_footer(real) + b"\x00" + tail, shipped())
    assert [(s.idstr, s.footer) for s in stream.sections()] == [("timer", False)]


def test_footerless_section_then_eof_and_garbage(real: Real) -> None:
    """After the first section, EOF followed by what cannot follow EOF is a damaged footer (QEMU's default is
    footers), not a footer-less stream with garbage after its end."""
    data = _timer_without_footer(real) + b"\x00" + u32(0)
    with pytest.raises(MalformedStream, match="footer") as info:
        read_stream(data, shipped())
    assert info.value.offset == len(data) - 5 and info.value.section == "timer"


def test_subsection_version_low_byte(real: Real) -> None:
    """Like QEMU, only the low byte of a subsection version counts: 0x101 loads as version 1."""
    for specs in (shipped(), trailer_only()):
        stream = read_stream(real.patch(real.sub + 22, u32(0x101)), specs)
        assert any(s.idstr == "cpu" for s in stream.full_sections())


def test_subsection_version_word_survives_a_rewrite(real: Real) -> None:
    """A section decoded from the trailer keeps its subsection's whole version word when rewritten (a fuzz find:
    writing the trailer's version instead made the rewrite decode differently)."""
    data = real.patch(real.sub + 22, u32(0x101))
    stream = read_stream(data, trailer_only())
    assert write_stream(stream, trailer=stream.trailer) == data


def test_duplicate_section(real: Real) -> None:
    """QEMU loads a duplicated section twice.  vmsd shows both when a typed spec decodes them; the trailer
    lists every section once, so a duplicate that only the trailer could describe is refused."""
    data = _dup_timer(real)
    stream = read_stream(data, shipped())
    assert [s.idstr for s in stream.full_sections()].count("timer") == 2
    with pytest.raises(RegistryError) as info:
        read_stream(data, trailer_only())
    assert info.value.offset == real.end(real.full("timer")) and info.value.section == "timer"


def test_unknown_instance(real: Real) -> None:
    """QEMU refuses an instance id its machine does not have; vmsd knows no machine, so a typed spec decodes
    it, and only a section that the trailer must describe is refused."""
    data = _timer_instance_7(real)
    stream = read_stream(data, shipped())
    assert any(s.idstr == "timer" and s.instance_id == 7 for s in stream.full_sections())
    with pytest.raises(RegistryError) as info:
        read_stream(data, trailer_only())
    assert info.value.offset == real.full("timer").offset and info.value.section == "timer"


def test_missing_trailer(real: Real) -> None:
    """A stream that ends right after EOF is complete for QEMU ("Expected vmdescription section, but got 0").
    vmsd accepts it when typed specs decode every section; otherwise it names the first section it cannot decode."""
    data = real.no_trailer
    try:
        stream = read_stream(data, shipped())
    except VMSDError as e:
        assert e.offset in {s.offset for s in real.stream.full_sections()}, str(e)
    else:
        assert stream.trailer is None
    with pytest.raises(RegistryError) as info:
        read_stream(data, trailer_only())
    assert info.value.offset == real.full("timer").offset


def test_qemu_accepts_missing_trailer(real: Real, tmp_path: Path) -> None:
    path = tmp_path / "case.mig"
    path.write_bytes(real.no_trailer)
    accepted, output = qemu_verdict(path)
    assert accepted and "Expected vmdescription section, but got 0" in output


def test_trailer_with_float_rewrites(real: Real) -> None:
    from vmsd.migration.stream import write_stream

    old = b'"index": 148,'
    assert old in real.data[real.trailer :]
    data = real.data[: real.trailer] + real.data[real.trailer :].replace(old, b'"index": 1e8,', 1)
    stream = read_stream(data, trailer_only())  # the section holding "index" decoded from the trailer
    assert write_stream(stream) == data  # the number is written back as it was spelled
