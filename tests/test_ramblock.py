"""RAM blocks: dirty tracking, zero pages, loading QEMU's RAM records and writing them back."""

from __future__ import annotations

import ctypes
import errno
import importlib
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsd.migration import iovec
from vmsd.migration.ram.blocks import PAGE_SIZE, RamBlock, RamBlocks, zero_pages
from vmsd.migration.ram.records import (
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    RamBlockInfo,
    RamPayload,
    RamRecord,
    read_ram,
    write_ram,
)
from vmsd.migration.ram.wire import apply_ram, ram_records, ram_section_payloads
from vmsd.migration.stream import read_stream, write_stream
from vmsd.qemu.v7_2 import spec_set
from vmsd.runtime.errors import MalformedStream, VMSDError
from vmsd.runtime.io import Reader, Writer
from vmsd.testing.qmp import load_stream, save_stream


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_fd_leaks() -> Iterator[None]:
    before = open_fds()
    yield
    leaked = open_fds() - before
    # listdir's own fd is transient; anything else that survives is a leak.
    alive = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not alive


def eos() -> RamRecord:
    return RamRecord(RAM_SAVE_FLAG_EOS, 0)


def mem_size(*blocks: tuple[str, int]) -> RamRecord:
    infos = [RamBlockInfo(n, s) for n, s in blocks]
    return RamRecord(RAM_SAVE_FLAG_MEM_SIZE, sum(s for _, s in blocks), blocks=infos)


# -- blocks -------------------------------------------------------------------------------------------------------------
def test_memfd_block_basics() -> None:
    with RamBlock.memfd("pc.ram", 16 * PAGE_SIZE, allow_sealing=True) as b:
        assert b.npages == 16 and b.page_size == 4096 and b.fd >= 0
        assert os.fstat(b.fd).st_size == 16 * PAGE_SIZE
        b.write(PAGE_SIZE + 10, b"hello")
        assert b.read(PAGE_SIZE + 10, 5) == b"hello"
        assert bytes(b.view[PAGE_SIZE + 10:PAGE_SIZE + 15]) == b"hello"
        assert os.pread(b.fd, 5, PAGE_SIZE + 10) == b"hello"  # the fd sees the mapping
        with pytest.raises(ValueError):
            b.write(16 * PAGE_SIZE - 2, b"abc")
    assert b.closed and b.fd == -1
    b.close()  # idempotent


def test_file_block_shares_memory(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    with RamBlock.from_file("m", path, 4 * PAGE_SIZE) as b:
        b.write(3 * PAGE_SIZE, b"\xaa" * PAGE_SIZE)
        assert path.read_bytes()[3 * PAGE_SIZE:] == b"\xaa" * PAGE_SIZE
    with RamBlock.from_file("m", path) as again:
        assert again.used_length == 4 * PAGE_SIZE
        assert again.read(3 * PAGE_SIZE, 2) == b"\xaa\xaa"


def test_close_with_outstanding_view() -> None:
    b = RamBlock.memfd("x", PAGE_SIZE)
    held = np.frombuffer(b.view, dtype=np.uint8)
    b.close()  # must not raise; the fd is closed now, the mapping goes with ``held``
    assert b.fd == -1
    del held


def test_block_order_is_qemus() -> None:
    with RamBlocks() as blocks:
        for name, size in [("a", 2), ("big", 8), ("b", 2), ("mid", 4), ("c", 1)]:
            blocks.create(name, size * PAGE_SIZE)
        assert blocks.names() == ["big", "mid", "a", "b", "c"]
        blocks.create("resizable", PAGE_SIZE, max_length=5 * PAGE_SIZE)
        blocks.create("peer-order", 16 * PAGE_SIZE, append=True)
        assert blocks.names() == ["big", "resizable", "mid", "a", "b", "c", "peer-order"]
        with pytest.raises(ValueError):
            blocks.create("a", PAGE_SIZE)


def test_dirty_tracking() -> None:
    with RamBlock.memfd("r", 200 * PAGE_SIZE) as b:
        assert b.dirty_count() == 0
        b.write(PAGE_SIZE - 1, b"xy")  # straddles pages 0 and 1
        b.mark_dirty(63 * PAGE_SIZE, 3 * PAGE_SIZE)  # crosses a bitmap word
        b.mark_dirty(199 * PAGE_SIZE, PAGE_SIZE)
        b.mark_dirty(5, 0)
        assert b.dirty_count() == 6
        assert b.take_dirty().tolist() == [0, 1, 63, 64, 65, 199]
        assert b.dirty_count() == 0 and b.take_dirty().tolist() == []
        b.mark_all_dirty()
        assert b.dirty_count() == 200
        assert b.take_dirty().tolist() == list(range(200))


@given(st.lists(st.tuples(st.integers(0, 300 * PAGE_SIZE - 1), st.integers(1, 70 * PAGE_SIZE)), max_size=8))
@settings(max_examples=60, deadline=None)
def test_dirty_ranges_match_naive(ranges: list[tuple[int, int]]) -> None:
    with RamBlock.memfd("r", 300 * PAGE_SIZE) as b:
        expect: set[int] = set()
        for off, length in ranges:
            length = min(length, b.used_length - off)
            b.mark_dirty(off, length)
            expect.update(range(off // PAGE_SIZE, (off + length - 1) // PAGE_SIZE + 1))
        assert b.dirty_count() == len(expect)
        assert b.take_dirty().tolist() == sorted(expect)


# -- zero pages ---------------------------------------------------------------------------------------------------------
@given(st.integers(1, 600), st.lists(st.tuples(st.integers(0, 600 * PAGE_SIZE), st.integers(1, 255)), max_size=40),
       st.booleans())
@settings(max_examples=80, deadline=None)
def test_zero_pages_match_naive(npages: int, pokes: list[tuple[int, int]], fill_all: bool) -> None:
    with RamBlock.memfd("z", npages * PAGE_SIZE) as b:
        if fill_all:
            b.bytes_[::PAGE_SIZE] = 1  # every page non-zero at its first byte
        for off, value in pokes:
            off %= b.used_length
            b.bytes_[off] = value
        naive = [not any(b.view[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]) for p in range(npages)]
        assert zero_pages(b).tolist() == naive
        some = list(range(0, npages, 3))
        assert zero_pages(b, some).tolist() == [naive[p] for p in some]
        assert zero_pages(b, range(npages)).tolist() == naive
        assert zero_pages(b, []).tolist() == []
        with pytest.raises(IndexError):
            zero_pages(b, [npages])


@given(st.integers(1, 1200), st.lists(st.tuples(st.integers(0, 1200 * PAGE_SIZE), st.integers(1, 255)), max_size=40),
       st.sampled_from(["zero", "first-word-zero", "mixed"]), st.integers(0, 2 ** 32 - 1))
@settings(max_examples=80, deadline=None)
def test_zero_mask_matches_naive_for_runs_and_scattered_pages(npages: int, pokes: list[tuple[int, int]],
                                                              fill: str, seed: int) -> None:
    """zero_mask reads runs of candidate pages in place, piece by piece: every way of listing pages agrees with
    a page-by-page look, whatever the content (pieces all zero, pages zero only at their first word, a mix)."""
    from vmsd.migration.ram.wire import zero_mask

    rng = np.random.default_rng(seed)
    with RamBlock.memfd("z", npages * PAGE_SIZE) as b:
        os.pwrite(b.fd, bytes(b.used_length), 0)  # held everywhere: every page is read, none is a hole
        if fill != "zero":
            rows = np.frombuffer(b.view, np.uint8).reshape(npages, PAGE_SIZE)
            chosen = rng.random(npages) < (1.0 if fill == "first-word-zero" else 0.3)
            rows[chosen, 8 + rng.integers(0, PAGE_SIZE - 8)] = 1  # data, but never in the first word
        for off, value in pokes:
            b.bytes_[off % b.used_length] = value
        naive = np.array([not any(b.view[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]) for p in range(npages)])
        every = np.arange(npages, dtype=np.int64)
        start = int(rng.integers(0, npages))
        listings = [every, every[start:], every[::2], np.sort(rng.choice(every, size=(npages + 1) // 2, replace=False)),
                    np.concatenate([every[:npages // 3], every[2 * npages // 3:]])]
        for pages in listings:
            assert zero_mask(b, pages).tolist() == naive[pages].tolist()


def test_zero_pages_last_word_only() -> None:
    with RamBlock.memfd("z", 1024 * PAGE_SIZE) as b:
        b.bytes_[PAGE_SIZE * 700 - 1] = 1  # last byte of page 699
        b.bytes_[PAGE_SIZE * 3 + 8] = 1  # second word of page 3
        z = zero_pages(b)
        assert np.flatnonzero(~z).tolist() == [3, 699]


# -- loading -----------------------------------------------------------------------------------------------------------
def test_apply_pages_zero_continue_compress() -> None:
    page = bytes(range(256)) * 16
    comp = zlib.compress(bytes([7]) * PAGE_SIZE, 1)
    recs = [
        mem_size(("pc.ram", 4 * PAGE_SIZE), ("rom", PAGE_SIZE)),
        RamRecord(RAM_SAVE_FLAG_PAGE, 0, block="pc.ram", data=page),
        RamRecord(RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE, PAGE_SIZE, data=b"\x00"),
        RamRecord(RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE, 2 * PAGE_SIZE, data=b"\x5a"),
        RamRecord(RAM_SAVE_FLAG_COMPRESS_PAGE | RAM_SAVE_FLAG_CONTINUE, 3 * PAGE_SIZE,
                  data=len(comp).to_bytes(4, "big") + comp),
        RamRecord(RAM_SAVE_FLAG_PAGE, 0, block="rom", data=page[::-1]),
        eos(),
    ]
    with RamBlocks() as blocks:
        apply_ram(blocks, RamPayload(recs))
        assert blocks.complete and blocks.failed is None
        ram = blocks["pc.ram"]
        assert ram.read(0, PAGE_SIZE) == page
        assert ram.read(PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
        assert ram.read(2 * PAGE_SIZE, PAGE_SIZE) == b"\x5a" * PAGE_SIZE
        assert ram.read(3 * PAGE_SIZE, PAGE_SIZE) == b"\x07" * PAGE_SIZE
        assert blocks["rom"].read(0, PAGE_SIZE) == page[::-1]
        assert ram.dirty_count() == 0  # loading is not guest writing
        # A zero page over existing data clears it.
        apply_ram(blocks, RamPayload([RamRecord(RAM_SAVE_FLAG_ZERO, 0, block="pc.ram", data=b"\x00"), eos()]))
        assert ram.read(0, PAGE_SIZE) == bytes(PAGE_SIZE)
        # CONTINUE carries across sections (QEMU's last_recv_block).
        apply_ram(blocks, RamPayload([RamRecord(RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE, PAGE_SIZE,
                                                data=page), eos()]), mark_dirty=True)
        assert ram.read(PAGE_SIZE, PAGE_SIZE) == page and ram.take_dirty().tolist() == [1]


def test_apply_block_list_validation() -> None:
    with RamBlocks() as blocks:
        blocks.create("pc.ram", 4 * PAGE_SIZE)
        apply_ram(blocks, RamPayload([mem_size(("pc.ram", 4 * PAGE_SIZE)), eos()]), create_missing=False)
    with RamBlocks() as blocks:
        blocks.create("pc.ram", 4 * PAGE_SIZE)
        with pytest.raises(MalformedStream, match=r"wrong block list from the peer.*'pc\.ram'"):
            apply_ram(blocks, RamPayload([mem_size(("new", PAGE_SIZE), ("pc.ram", 8 * PAGE_SIZE)), eos()]))
        assert "new" not in blocks  # nothing created by a rejected list
        assert blocks.failed is not None and not blocks.complete
        with pytest.raises(MalformedStream, match="earlier failed load"):
            apply_ram(blocks, RamPayload([eos()]))
    with RamBlocks() as blocks, pytest.raises(MalformedStream, match="unknown RAM block 'x'"):
        apply_ram(blocks, RamPayload([mem_size(("x", PAGE_SIZE)), eos()]), create_missing=False)


TWO_PAGES = zlib.compress(bytes(2 * PAGE_SIZE))  # more than a page: refused


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (RamRecord(RAM_SAVE_FLAG_PAGE, 4 * PAGE_SIZE, block="pc.ram", data=bytes(PAGE_SIZE)),
         r"illegal RAM offset 0x4000 in block 'pc\.ram'"),
        (RamRecord(RAM_SAVE_FLAG_ZERO, 1 << 40, block="pc.ram", data=b"\x00"), r"offset 0x10000000000 in block"),
        (RamRecord(RAM_SAVE_FLAG_PAGE, 0, block="nope", data=bytes(PAGE_SIZE)), "can't find RAM block 'nope'"),
        (RamRecord(RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE, 0, data=bytes(PAGE_SIZE)), "never named"),
        (RamRecord(RAM_SAVE_FLAG_COMPRESS_PAGE, 0, block="pc.ram", data=b"\x00\x00\x00\x03abc"), "decompress"),
        (RamRecord(RAM_SAVE_FLAG_COMPRESS_PAGE, 0, block="pc.ram",
                   data=len(TWO_PAGES).to_bytes(4, "big") + TWO_PAGES), "decompress data failed"),
        (RamRecord(RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_ZERO, 0, block="pc.ram", data=b""), "unknown combination"),
    ],
)
def test_apply_malformed(record: RamRecord, message: str) -> None:
    with RamBlocks() as blocks:
        blocks.create("pc.ram", 4 * PAGE_SIZE)
        with pytest.raises(MalformedStream, match=message):
            apply_ram(blocks, RamPayload([record, eos()]))
        assert blocks.failed is not None and not blocks.complete


def test_apply_without_eos() -> None:
    with RamBlocks() as blocks, pytest.raises(MalformedStream, match="without EOS"):
        apply_ram(blocks, RamPayload([mem_size(("a", PAGE_SIZE))]))


def test_xbzrle_records() -> None:
    old = bytes(range(256)) * 16
    new = bytearray(old)
    new[100:108] = b"ABCDEFGH"
    with RamBlocks() as blocks:
        ram = blocks.create("pc.ram", PAGE_SIZE)
        ram.write(0, old)
        try:
            xbzrle = importlib.import_module("vmsd.migration.ram.xbzrle")
        except ImportError:
            rec = RamRecord(RAM_SAVE_FLAG_XBZRLE, 0, block="pc.ram", data=b"\x01\x00\x02\x01\x00")
            with pytest.raises(MalformedStream, match=r"XBZRLE pages need vmsd\.runtime\.xbzrle"):
                apply_ram(blocks, RamPayload([rec, eos()]))
            return
        delta = xbzrle.encode(old, bytes(new), PAGE_SIZE)
        rec = RamRecord(RAM_SAVE_FLAG_XBZRLE, 0, block="pc.ram", data=b"\x01" + len(delta).to_bytes(2, "big") + delta)
        apply_ram(blocks, RamPayload([rec, eos()]))
        assert ram.read(0, PAGE_SIZE) == bytes(new)
        bad = RamRecord(RAM_SAVE_FLAG_XBZRLE | RAM_SAVE_FLAG_CONTINUE, 0, data=b"\x01\x00\x02\xff\xff")
        with pytest.raises(MalformedStream):
            apply_ram(blocks, RamPayload([bad, eos()]))


# -- writing ------------------------------------------------------------------------------------------------------------
def fill_random(blocks: RamBlocks, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for b in blocks:
        for p in rng.choice(b.npages, size=b.npages // 2, replace=False):
            b.write(int(p) * PAGE_SIZE + int(rng.integers(0, PAGE_SIZE - 64)), rng.bytes(64))


def test_records_round_trip() -> None:
    with RamBlocks() as src, RamBlocks() as dst:
        src.create("pc.ram", 64 * PAGE_SIZE)
        src.create("pc.bios", 8 * PAGE_SIZE)
        src.create("/rom@etc/acpi/rsdp", PAGE_SIZE)
        fill_random(src, 1)
        src["pc.bios"].write(0, b"\x00")  # dirty but zero
        records = list(ram_records(src))
        assert records[0].flags == RAM_SAVE_FLAG_MEM_SIZE and records[0].offset == src.total()
        assert [r.flags for r in records[-2:]] == [RAM_SAVE_FLAG_EOS] * 2
        names = [r.block for r in records if r.block is not None]
        assert names == ["pc.ram", "pc.bios", "/rom@etc/acpi/rsdp"]
        payloads = ram_section_payloads(src, pages_per_part=10)
        assert len(payloads) == 2 + 8
        dst.create("pc.bios", 8 * PAGE_SIZE)  # an existing block of the right size is reused
        dst["pc.bios"].write(PAGE_SIZE, b"junk")  # and zero pages clear it
        for payload in payloads:
            w = Writer()
            write_ram(w, payload)
            again = read_ram(Reader(w.getvalue()))
            assert again == payload
            apply_ram(dst, again)
        assert dst.complete
        assert dst.names() == ["pc.bios", "pc.ram", "/rom@etc/acpi/rsdp"]  # pre-existing first, then the peer order
        for b in src:
            assert bytes(dst[b.name].view) == bytes(b.view)


# -- real QEMU ----------------------------------------------------------------------------------------------------------
SHM = "/dev/shm/vmsd-test-ram"
SHM_BACK = "/dev/shm/vmsd-test-ram-loaded"


def backend(path: str) -> list[str]:
    return ["-object", f"memory-backend-file,id=m,size=32M,mem-path={path},share=on", "-machine", "memory-backend=m"]


@pytest.fixture
def qemu_stream(tmp_path: Path) -> Iterator[bytes]:
    path = tmp_path / "s.mig"
    try:
        save_stream(path, args=backend(SHM), run_seconds=1.0)
        yield path.read_bytes()
    finally:
        for p in (SHM, SHM_BACK):
            if os.path.exists(p):
                os.unlink(p)


def test_qemu_stream_loads_and_saves(qemu_stream: bytes, tmp_path: Path) -> None:
    stream = read_stream(qemu_stream, spec_set())
    ram_sections = [s for s in stream.sections() if isinstance(s.payload, RamPayload)]
    assert len(ram_sections) >= 3
    with RamBlocks() as blocks:
        for sec in ram_sections:
            apply_ram(blocks, sec.payload)
        assert blocks.complete
        # The memory backend's id names the main RAM block; QEMU is paused after migrating, so the file is stable.
        with open(SHM, "rb") as f:
            expected = f.read()
        assert len(expected) == blocks["m"].used_length
        assert bytes(blocks["m"].view) == expected
        assert not zero_pages(blocks["m"]).all()

        # Our records, in place of QEMU's RAM sections, load into a real QEMU with identical memory.
        # QEMU ends a PART section (EOS) wherever an iteration ran out of time, so
        # how many there are depends on the machine's load: compare the pages.
        ours = list(ram_records(blocks))
        qemu_records = [r for s in ram_sections for r in s.payload.records]
        assert [(r.flags, r.offset, r.block, r.data) for r in ours if r.flags != RAM_SAVE_FLAG_EOS] == \
            [(r.flags, r.offset, r.block, r.data) for r in qemu_records if r.flags != RAM_SAVE_FLAG_EOS]
        payloads = ram_section_payloads(blocks, pages_per_part=1000)
        first_part = ram_sections[1]
        idx = stream.records.index(first_part)
        for sec in ram_sections[1:-1]:
            stream.records.remove(sec)
        ram_sections[0].payload = payloads[0]
        ram_sections[-1].payload = payloads[-1]
        for n, payload in enumerate(payloads[1:-1]):
            stream.records.insert(idx + n, type(first_part)(first_part.kind, first_part.section_id, 0, "ram",
                                                            payload=payload, footer=first_part.footer))
        out = tmp_path / "ours.mig"
        out.write_bytes(write_stream(stream))
        q = load_stream(out, args=backend(SHM_BACK))
        try:
            with open(SHM_BACK, "rb") as f:
                assert f.read() == expected
        finally:
            q.stop()


@pytest.mark.parametrize("prealloc", [False, True])
def test_store_pages_writes_strided_pages_into_place(prealloc: bool) -> None:
    """Records are 8-byte headers each followed by a page: the pages land contiguously, seen by the mapping."""
    stride = PAGE_SIZE + 8
    rng = np.random.default_rng(3)
    records = rng.integers(0, 256, 1500 * stride, dtype=np.uint8).tobytes()  # more pages than one pwritev takes
    with RamBlock.memfd("m", 2048 * PAGE_SIZE, prealloc=prealloc) as block:
        block.store_pages(100, memoryview(records), 8, stride, 1500)
        for i in (0, 1023, 1024, 1499):
            assert bytes(block.page(100 + i)) == records[8 + i * stride:8 + i * stride + PAGE_SIZE]
        assert not block.words[:100].any() and not block.words[1600:].any()


def _iov_bytes(p: int, count: int) -> bytes:
    """What the ``count`` iovecs at address ``p`` point to, back to back."""
    rows = np.ctypeslib.as_array((ctypes.c_uint64 * (2 * count)).from_address(p)).reshape(-1, 2)
    return b"".join(ctypes.string_at(int(a), int(n)) for a, n in rows)


def _failing_pwritev(err: int) -> object:
    def fail(fd: int, p: int, count: int, at: int) -> int:
        ctypes.set_errno(err)
        return -1

    return fail


@pytest.mark.parametrize("cut", [1, PAGE_SIZE, 3 * PAGE_SIZE + 5])
def test_store_views_finishes_a_short_write(monkeypatch: pytest.MonkeyPatch, cut: int) -> None:
    """pwritev may write less than asked (a signal, a nearly full file): the rest follows, byte-exact."""

    def short(fd: int, p: int, count: int, at: int) -> int:
        return os.pwrite(fd, _iov_bytes(p, count)[:cut], at)

    monkeypatch.setattr(iovec, "_PWRITEV", short)
    data = np.random.default_rng(4).integers(0, 256, 5 * PAGE_SIZE, dtype=np.uint8).tobytes()
    with RamBlock.memfd("m", 8 * PAGE_SIZE) as block:
        mv = memoryview(data)
        block.store_views(2, [mv[:3 * PAGE_SIZE + 100], mv[3 * PAGE_SIZE + 100:]])
        assert bytes(block.view[2 * PAGE_SIZE:7 * PAGE_SIZE]) == data
        assert not block.words[:2].any() and not block.words[7:].any()
        stride = PAGE_SIZE + 8
        records = bytes(8) + b"".join(bytes(8) + data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i in range(5))
        block.store_pages(1, memoryview(records), 16, stride, 5)  # strided pages, cut anywhere
        assert bytes(block.view[PAGE_SIZE:6 * PAGE_SIZE]) == data


def test_store_pages_falls_back_to_the_mapping_where_the_file_refuses_writes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iovec, "_PWRITEV", _failing_pwritev(errno.EINVAL))  # hugetlbfs
    with RamBlock.memfd("m", 8 * PAGE_SIZE) as block:
        block.store_pages(2, memoryview(b"\x07" * (3 * PAGE_SIZE)), 0, PAGE_SIZE, 3)
        assert bytes(block.view[2 * PAGE_SIZE:5 * PAGE_SIZE]) == b"\x07" * (3 * PAGE_SIZE)
        assert not block.stores_via_fd


def test_store_pages_on_a_full_filesystem_is_an_error_naming_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(iovec, "_PWRITEV", _failing_pwritev(errno.ENOSPC))
    with RamBlock.memfd("pc.ram", 8 * PAGE_SIZE) as block, \
            pytest.raises(VMSDError, match=r"RAM block 'pc\.ram': cannot store pages: No space left on device"):
        block.store_pages(0, memoryview(bytes(PAGE_SIZE)), 0, PAGE_SIZE, 1)


def test_populate_maps_just_the_run_and_keeps_its_contents() -> None:
    with RamBlock.memfd("m", 16 * PAGE_SIZE) as block:
        block.bytes_[5 * PAGE_SIZE] = 9
        block.populate(4, 3)
        assert np.flatnonzero(block.holds(0, 16)).tolist() == [4, 5, 6]
        assert block.bytes_[5 * PAGE_SIZE] == 9 and not block.words[4].any() and not block.words[6].any()


class _Madvise:
    """Stands in for a block's mapping, with an madvise that fails as told and counts its calls."""

    def __init__(self, mm: object, err: int) -> None:
        self.mm, self.err, self.calls = mm, err, 0

    def madvise(self, *args: int) -> None:
        self.calls += 1
        raise OSError(self.err, os.strerror(self.err))

    def __getattr__(self, name: str) -> object:
        return getattr(self.mm, name)


def test_populate_steps_aside_on_a_kernel_without_populate_write() -> None:
    with RamBlock.memfd("m", 8 * PAGE_SIZE) as block:
        mm = block._mm
        fake = _Madvise(mm, errno.EINVAL)
        block._mm = fake  # type: ignore[assignment]
        try:
            block.populate(0, 2)
            block.populate(2, 2)  # not asked again
        finally:
            block._mm = mm
        assert fake.calls == 1
        block.view[0:PAGE_SIZE] = b"\x01" * PAGE_SIZE  # the copy's own page faults do the work


def test_populate_on_a_full_filesystem_is_an_error_naming_the_block() -> None:
    """Where the copy through the mapping would die of SIGBUS, populating first turns it into an error."""
    with RamBlock.memfd("pc.ram", 8 * PAGE_SIZE) as block:
        mm = block._mm
        block._mm = _Madvise(mm, errno.EFAULT)  # type: ignore[assignment]
        try:
            with pytest.raises(VMSDError, match=r"RAM block 'pc\.ram': cannot store pages: Bad address"):
                block.populate(0, 2)
        finally:
            block._mm = mm


def test_populate_after_prealloc_asks_nothing() -> None:
    with RamBlock.memfd("m", 8 * PAGE_SIZE, prealloc=True) as block:
        mm = block._mm
        fake = _Madvise(mm, errno.EFAULT)
        block._mm = fake  # type: ignore[assignment]
        try:
            block.populate(0, 8)
        finally:
            block._mm = mm
        assert fake.calls == 0


def test_holds_tells_written_pages_from_holes_without_allocating() -> None:
    with RamBlock.memfd("m", 16 * PAGE_SIZE) as block:
        block.bytes_[3 * PAGE_SIZE] = 1
        block.store_pages(7, memoryview(bytes(2 * PAGE_SIZE)), 0, PAGE_SIZE, 2)
        assert np.flatnonzero(block.holds(0, 16)).tolist() == [3, 7, 8]
        assert block.holds(10, 6).tolist() == [False] * 6
        assert os.fstat(block.fd).st_blocks * 512 == 3 * PAGE_SIZE  # asking allocated nothing


def test_zero_mask_answers_holes_without_reading_them() -> None:
    from vmsd.migration.ram.wire import zero_mask

    with RamBlock.memfd("m", 64 * PAGE_SIZE) as block:
        block.bytes_[5 * PAGE_SIZE + 100] = 1  # page 5: data
        block.bytes_[6 * PAGE_SIZE] = 0  # page 6: held, all zero
        contiguous = np.arange(0, 16, dtype=np.int64)
        assert np.flatnonzero(~zero_mask(block, contiguous)).tolist() == [5]
        scattered = np.array([1, 5, 6, 9, 40], dtype=np.int64)
        assert zero_mask(block, scattered).tolist() == [True, False, True, True, True]
        assert os.fstat(block.fd).st_blocks * 512 == 2 * PAGE_SIZE  # pages 5 and 6 only


def test_holds_counts_a_page_mincore_misses_as_held_when_the_file_has_data_there(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """mincore says no for a swapped-out page: SEEK_DATA must overrule it, or a swapped page would pass for zero."""
    import vmsd.migration.ram.blocks as ramblock

    class Swapped:  # a C library whose mincore reports every page as not in memory
        @staticmethod
        def mincore(addr: object, length: ctypes.c_size_t, vec: ctypes.c_void_p) -> int:
            ctypes.memset(vec, 0, length.value // PAGE_SIZE)
            return 0

    with RamBlock.memfd("m", 32 * PAGE_SIZE) as block:
        block.bytes_[4 * PAGE_SIZE] = 1
        block.bytes_[20 * PAGE_SIZE:22 * PAGE_SIZE] = 2
        monkeypatch.setattr(ramblock, "_LIBC", Swapped())
        assert np.flatnonzero(block.holds(0, 32)).tolist() == [4, 20, 21]


def test_zero_records_clear_data_and_leave_holes_unallocated() -> None:
    """Main channel: ZERO records, in a contiguous run and scattered, zero the pages that hold data and leave
    the holes among them unallocated."""
    from vmsd.migration.ram.wire import RamEncoder, RamLoader

    with RamBlocks() as src_blocks, RamBlocks() as dst_blocks:
        src = src_blocks.create("pc.ram", 64 * PAGE_SIZE)
        src.bytes_[0] = 1  # page 0 carries data, so the block is named by a normal page
        dst = dst_blocks.create("pc.ram", 64 * PAGE_SIZE)
        dst.bytes_[3 * PAGE_SIZE:5 * PAGE_SIZE] = 7  # stale data the zero pages must clear
        dst.bytes_[30 * PAGE_SIZE] = 7
        enc = RamEncoder()
        data = enc.block_list(src_blocks) + enc.eos()
        for pages in (np.arange(0, 12, dtype=np.int64), np.array([30, 40, 50], dtype=np.int64)):
            data += b"".join(bytes(b) for b in enc.encode(src, pages))
        data += enc.eos()
        loader = RamLoader(dst_blocks)
        r = Reader(data)
        loader.load_section(r)
        loader.load_section(r)
        assert os.fstat(dst.fd).st_blocks * 512 == 4 * PAGE_SIZE  # pages 0, 3, 4 and 30 only
        assert os.pread(dst.fd, 64 * PAGE_SIZE, 0) == os.pread(src.fd, 64 * PAGE_SIZE, 0)  # reads allocate nothing
