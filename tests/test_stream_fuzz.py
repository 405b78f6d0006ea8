"""Bounded fuzzing of the stream reader: anything either parses or raises VMSDError.

Inputs are random bytes after a valid header, and single-byte mutations,
truncations, insertions and deletions of a real QEMU 7.2 stream (saved by the
module fixture).  A mutated stream that parses must survive a rewrite:
``write_stream`` succeeds, its output parses to the same structure, and
rewriting that gives the same bytes again.  Every test is bounded by
``max_examples``; the whole module runs in well under a minute on two cores.
"""

from __future__ import annotations

import traceback
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmsd.migration.stream import Command, Section, SpecSet, Stream, read_stream, write_stream
from vmsd.qemu.v7_2 import spec_set
from vmsd.runtime.errors import VMSDError
from vmsd.testing.qmp import save_stream
from vmsd.tools import streams

HEADER = b"QEVM\x00\x00\x00\x03"

FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)


def specs() -> SpecSet:
    return spec_set()


def trailer_only() -> SpecSet:
    """Only the configuration record is typed: every section is decoded from the trailer."""
    conf = spec_set().lookup("configuration", "configuration")
    assert conf is not None
    return SpecSet({"configuration": conf})


class Real:
    """A real stream; ``regions`` are the (start, end) spans that mutations are spread over."""

    def __init__(self, data: bytes, regions: list[tuple[int, int]], trailer_body: tuple[int, int]) -> None:
        self.data = data
        self.regions = regions
        self.trailer_body = trailer_body

    def __repr__(self) -> str:
        return f"Real({len(self.data)} bytes)"


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Real:
    path = tmp_path_factory.mktemp("fuzz") / "pc.mig"
    save_stream(path, machine="pc")
    data = path.read_bytes()
    stream = read_stream(data, specs())
    assert stream.eof_offset is not None and stream.trailer_offset is not None
    records = stream.records
    first_full = next(r.offset for r in records if isinstance(r, Section) and r.kind == 4)
    part = next(r for r in records if isinstance(r, Section) and r.kind == 2)
    part_end = records[records.index(part) + 1].offset
    regions = [
        (0, records[0].offset),  # header and configuration
        (records[0].offset, part.offset + 64),  # RAM START (block list) and the first PART records
        (part.offset, part_end),  # RAM pages
        (part_end, first_full),  # RAM END
        (first_full, stream.eof_offset + 1),  # FULL sections (weighted below)
        (first_full, stream.eof_offset + 1),
        (first_full, stream.eof_offset + 1),
        (stream.eof_offset, stream.trailer_offset + 5),  # EOF and the trailer header
    ]
    return Real(data, regions, (stream.trailer_offset + 5, len(data)))


def offsets(r: Real, regions: list[tuple[int, int]] | None = None) -> st.SearchStrategy[int]:
    spans = regions if regions is not None else r.regions
    return st.sampled_from(spans).flatmap(lambda span: st.integers(span[0], span[1] - 1))


def shape(stream: Stream) -> str:
    """The decoded content, without offsets (repr: NaN floats compare equal to themselves)."""

    def rec(x: Section | Command) -> Any:
        if isinstance(x, Command):
            inner = None if x.packaged is None else [rec(y) for y in x.packaged]
            return ("command", x.cmd, x.data if inner is None else None, inner)
        return ("section", x.kind, x.section_id, x.idstr, x.instance_id, x.version_id, x.footer, x.vmsd_name, x.payload)

    conf = None if stream.configuration is None else stream.configuration.state
    return repr((stream.version, conf, [rec(x) for x in stream.records]))


def check(data: bytes, full_json: bool = False, using: SpecSet | None = None) -> Stream | None:
    """Parse or raise VMSDError; a parsed stream must rewrite to an equal structure."""
    using = using if using is not None else specs()
    try:
        stream = read_stream(data, using)
    except VMSDError:
        return None
    except Exception:
        pytest.fail(f"read_stream raised a non-VMSDError:\n{traceback.format_exc()}")
    try:
        streams.stream_tree(stream)
        if full_json:
            streams.stream_json(stream)
        once = write_stream(stream)
        again = read_stream(once, using)
        twice = write_stream(again)
    except Exception:
        pytest.fail(f"a stream that parsed did not survive inspect/rewrite:\n{traceback.format_exc()}")
    assert shape(again) == shape(stream)
    assert twice == once
    return stream


# ---------------------------------------------------------------------------
# Random bytes after a valid header


@settings(FUZZ, max_examples=600)
@given(st.binary(max_size=600))
def test_random_bytes_after_header(tail: bytes) -> None:
    check(HEADER + tail, full_json=True)


CONF = b"\x07\x00\x00\x00\x0dpc-i440fx-7.2"

# Pieces of real records, so that random sequences get past the first byte.
PIECES = [
    b"\x00",
    b"\x06",
    b"\x7e\x00\x00\x00\x00",
    b"\x04\x00\x00\x00\x00\x05timer\x00\x00\x00\x00\x00\x00\x00\x02",
    b"\x04\x00\x00\x00\x01\x05pcspk\x00\x00\x00\x00\x00\x00\x00\x01",
    b"\x04\x00\x00\x00\x02\x05i8259\x00\x00\x00\x00\x00\x00\x00\x01",
    b"\x01\x00\x00\x00\x02\x03ram\x00\x00\x00\x00\x00\x00\x00\x04",
    b"\x02\x00\x00\x00\x02",
    b"\x03\x00\x00\x00\x02",
    b"\x00\x00\x00\x00\x00\x00\x10\x04\x06pc.ram\x00\x00\x00\x00\x00\x00\x10\x00",  # MEM_SIZE 4 KiB
    b"\x00\x00\x00\x00\x00\x00\x00\x10",  # EOS
    b"\x00\x00\x00\x00\x00\x00\x00\x02\x06pc.ram\x00",  # zero page
    b"\x00\x00\x00\x00\x00\x00\x10\x22\x00",  # zero page, CONTINUE
    b"\x05\x14cpu/poll_control_msr\x00\x00\x00\x01",
    b"\x05\x1aconfiguration/capabilities\x00\x00\x00\x01\x00\x00\x00\x01\x0fx-ignore-shared",
    b"\x08\x00\x07\x00\x04",
    b"\x08\x00\x02\x00\x04\x00\x00\x00\x01",
    b"\x08\x00\x05\x00\x00",
    b'\x06\x00\x00\x00\x22{"page_size": 4096, "devices": []}',
]


@settings(FUZZ, max_examples=600)
@given(st.lists(st.one_of(st.sampled_from(PIECES), st.binary(min_size=1, max_size=12)), max_size=14), st.booleans())
def test_record_pieces_after_header(pieces: list[bytes], with_conf: bool) -> None:
    check(HEADER + (CONF if with_conf else b"") + b"".join(pieces), full_json=True)


# ---------------------------------------------------------------------------
# Mutations of a real stream (the trailer's JSON text is left alone here: see the last test)


@settings(FUZZ, max_examples=100)
@given(st.data())
def test_single_byte_mutation(real: Real, data: st.DataObject) -> None:
    at = data.draw(offsets(real), label="offset")
    value = data.draw(st.integers(0, 255).filter(lambda v: v != real.data[at]), label="value")
    check(real.data[:at] + bytes([value]) + real.data[at + 1 :])


@settings(FUZZ, max_examples=60)
@given(st.data())
def test_single_byte_mutation_decoded_from_trailer(real: Real, data: st.DataObject) -> None:
    """As above, with every section decoded from the trailer (the path for devices without a spec)."""
    at = data.draw(offsets(real), label="offset")
    value = data.draw(st.integers(0, 255).filter(lambda v: v != real.data[at]), label="value")
    check(real.data[:at] + bytes([value]) + real.data[at + 1 :], using=trailer_only())


@settings(FUZZ, max_examples=120)
@given(st.data())
def test_truncation(real: Real, data: st.DataObject) -> None:
    at = data.draw(
        st.one_of(offsets(real, [*real.regions, real.trailer_body]), st.integers(0, len(real.data) - 1)), label="cut"
    )
    stream = check(real.data[:at])
    if stream is not None:
        # Only a cut right after EOF leaves a complete stream (one without the optional trailer).
        assert stream.eof_offset == at - 1 and stream.trailer is None


@settings(FUZZ, max_examples=120)
@given(st.data())
def test_insertion(real: Real, data: st.DataObject) -> None:
    at = data.draw(offsets(real), label="offset")
    new = data.draw(st.binary(min_size=1, max_size=16), label="inserted")
    check(real.data[:at] + new + real.data[at:])


@settings(FUZZ, max_examples=100)
@given(st.data())
def test_deletion(real: Real, data: st.DataObject) -> None:
    at = data.draw(offsets(real), label="offset")
    n = data.draw(st.integers(1, 16), label="length")
    check(real.data[:at] + real.data[at + n :])


@settings(FUZZ, max_examples=150)
@given(st.data())
def test_trailer_mutation(real: Real, data: st.DataObject) -> None:
    """One JSON-ish byte of the trailer changed; every section is decoded from that trailer."""
    at = data.draw(offsets(real, [real.trailer_body]), label="offset")
    value = data.draw(st.sampled_from(b'[]{}",:0123456789-.aenlrstu '), label="value")
    check(real.data[:at] + bytes([value]) + real.data[at + 1 :], using=trailer_only())
