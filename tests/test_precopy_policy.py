"""The precopy engine's rules without a thread, a socket, a clock or a machine: QEMU's convergence policy
(vmsd.migration.policy), the status table (vmsd.migration.status) and the statistics behind query-migrate
(vmsd.migration.stats), each fed plain numbers."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmsd.migration import policy
from vmsd.migration.policy import BUFFER_DELAY, MAX_WAIT, AutoConverge
from vmsd.migration.ram.blocks import PAGE_SIZE
from vmsd.migration.ram.wire import RamCounters
from vmsd.migration.stats import MigrationStats
from vmsd.migration.status import TRANSITIONS, IllegalTransition, MigrationStatus, check_transition

MIB = 1 << 20
S = MigrationStatus


# -- threshold and completion -----------------------------------------------------------------------------------------
def test_threshold_is_what_the_bandwidth_moves_within_the_downtime_limit() -> None:
    assert policy.threshold(100 * MIB, 300) == 30 * MIB
    assert policy.threshold(1000.0, 1) == 1
    assert policy.threshold(999.0, 1) == 0  # rounded down: a partial byte does not fit
    assert policy.threshold(0.0, 300) == 0  # nothing measured yet


def test_completion_waits_for_the_pending_bytes_to_fit_under_the_threshold() -> None:
    t = 30 * MIB
    assert policy.should_complete(30 * MIB - PAGE_SIZE, t)
    assert not policy.should_complete(30 * MIB, t)  # strictly under, as QEMU's pending >= threshold iterates
    assert not policy.should_complete(64 * MIB, t)
    # Before the first window there is no threshold: only an empty pass completes.
    assert not policy.should_complete(PAGE_SIZE, 0)
    assert policy.should_complete(0, 0)


def test_sync_comes_first_when_the_pass_alone_would_fit() -> None:
    t = 30 * MIB
    assert policy.should_sync(MIB, t)
    assert not policy.should_sync(30 * MIB, t)
    assert not policy.should_sync(0, 0)  # no threshold yet: an empty pass completes without a sync


def test_a_closed_window_gives_bandwidth_threshold_and_expected_downtime() -> None:
    # 10 MiB and 2560 pages in 0.125 s, 40 MiB pending, downtime-limit 300 ms.
    rates = policy.window_rates(10 * MIB, 2560, 0.125, 40 * MIB, 300)
    assert rates.bandwidth == 80 * MIB
    assert rates.threshold == 24 * MIB
    assert rates.mbps == pytest.approx(10 * MIB * 8 / 0.125 / 1e6)
    assert rates.pages_per_second == 20480
    assert rates.expected_downtime == 0.5
    # A window that sent nothing has no bandwidth: no threshold, and no estimate of the downtime.
    idle = policy.window_rates(0, 0, 0.2, 40 * MIB, 300)
    assert (idle.bandwidth, idle.threshold, idle.expected_downtime) == (0, 0, None)


def test_windows_close_after_buffer_delay_and_periods_after_a_second() -> None:
    assert not policy.window_closed(BUFFER_DELAY - 0.001)
    assert policy.window_closed(BUFFER_DELAY)
    assert not policy.period_over(1.0)  # QEMU: more than 1000 ms
    assert policy.period_over(1.001)
    assert policy.dirty_pages_rate(3000, 1.5) == 2000
    assert policy.dirty_pages_rate(10, 3.0) == 3  # whole pages per second


@settings(max_examples=300, deadline=None)
@given(pending=st.integers(0, 1 << 40), bandwidth=st.floats(1.0, 1e11), limit=st.integers(0, 10_000))
def test_completion_is_decided_iff_the_pending_bytes_fit_the_downtime(pending: int, bandwidth: float,
                                                                      limit: int) -> None:
    t = policy.threshold(bandwidth, limit)
    done = policy.should_complete(pending, t)
    assert done == (pending == 0 or pending < t)
    if done and pending:  # then sending what is pending at that bandwidth takes no longer than the limit
        assert pending / bandwidth * 1000 <= limit * (1 + 1e-12)
    if pending + 1 <= bandwidth * limit / 1000 * (1 - 1e-12):
        assert done
    # A sync is taken exactly when the pass's remainder would complete with a threshold to compare with.
    assert policy.should_sync(pending, t) == (pending < t)


# -- the rate limit ---------------------------------------------------------------------------------------------------
def test_unlimited_bandwidth_takes_whole_chunks_and_never_waits() -> None:
    assert policy.chunk_pages(0, 10 * MIB, 2048) == 2048
    assert not policy.iteration_over(MAX_WAIT, 0, 1 << 40)
    assert policy.iteration_over(MAX_WAIT + 0.001, 0, 0)
    assert policy.rate_limit_delay(0, 1 << 40, 0.01) == 0.0


def test_a_bandwidth_limit_cuts_chunks_to_the_windows_share() -> None:
    bw = 20 * MIB  # a 2 MiB share per 100 ms window: 512 pages
    assert policy.window_share(bw) == pytest.approx(2 * MIB)
    assert policy.chunk_pages(bw, 0, 2048) == 513  # one page over, so that the share is reached
    assert policy.chunk_pages(bw, MIB, 2048) == 257
    assert policy.chunk_pages(bw, 2 * MIB - 1, 2048) == 1
    assert policy.chunk_pages(bw, 3 * MIB, 2048) == 1  # over the share: a page at a time, never none
    assert policy.chunk_pages(1 << 40, 0, 2048) == 2048  # a generous share: the chunk size rules
    assert not policy.iteration_over(0.01, bw, 2 * MIB - 1)
    assert policy.iteration_over(0.01, bw, 2 * MIB)


def test_a_used_share_waits_out_the_rest_of_the_window() -> None:
    bw = 20 * MIB
    assert policy.rate_limit_delay(bw, 2 * MIB, 0.03) == pytest.approx(0.07)
    assert policy.rate_limit_delay(bw, 2 * MIB - 1, 0.03) == 0.0  # share not used
    assert policy.rate_limit_delay(bw, 4 * MIB, BUFFER_DELAY) == 0.0  # the window is over already


@settings(max_examples=300, deadline=None)
@given(bw=st.integers(0, 1 << 34), window_bytes=st.integers(0, 1 << 32), most=st.integers(1, 4096))
def test_a_chunk_never_exceeds_the_windows_share_by_a_page(bw: int, window_bytes: int, most: int) -> None:
    n = policy.chunk_pages(bw, window_bytes, most)
    assert 1 <= n <= most
    share = policy.window_share(bw)
    if share:
        left = share - window_bytes
        assert (n - 1) * PAGE_SIZE <= max(0.0, left)
        if n < most:  # cut by the share: a chunk of normal pages reaches it
            assert n * PAGE_SIZE > left
    else:
        assert n == most


@settings(max_examples=200, deadline=None)
@given(most=st.integers(1, 2048), costs=st.lists(st.integers(PAGE_SIZE // 16, PAGE_SIZE), min_size=1, max_size=64),
       data=st.data())
def test_an_iteration_sends_its_share_and_less_than_a_page_more(most: int, costs: list[int],
                                                                data: st.DataObject) -> None:
    """Chunks taken as the driver takes them (elapsed time aside), a page costing PAGE_SIZE/16..PAGE_SIZE bytes
    (a share of at most 64 whole chunks keeps the loop short)."""
    bw = data.draw(st.integers(PAGE_SIZE * 10, most * PAGE_SIZE * 640))
    share = policy.window_share(bw)
    sent = 0
    for cost in itertools.islice(itertools.cycle(costs), 100_000):
        sent += policy.chunk_pages(bw, sent, most) * cost
        if policy.iteration_over(0.0, bw, sent):
            break
    assert share <= sent <= share + PAGE_SIZE


@settings(max_examples=300, deadline=None)
@given(bw=st.integers(0, 1 << 34), window_bytes=st.integers(0, 1 << 32), elapsed=st.floats(0.0, 1.0))
def test_the_rate_limit_waits_only_for_the_rest_of_a_used_window(bw: int, window_bytes: int, elapsed: float) -> None:
    delay = policy.rate_limit_delay(bw, window_bytes, elapsed)
    used = bool(bw) and window_bytes >= policy.window_share(bw)
    if used and elapsed < BUFFER_DELAY:
        assert 0 < delay <= BUFFER_DELAY
        assert elapsed + delay == pytest.approx(BUFFER_DELAY)
    else:
        assert delay == 0.0


# -- auto-converge ----------------------------------------------------------------------------------------------------
def _converge(initial: int = 20, increment: int = 10, maximum: int = 99, trigger: int = 50) -> AutoConverge:
    return AutoConverge.from_parameters({"cpu-throttle-initial": initial, "cpu-throttle-increment": increment,
                                         "max-cpu-throttle": maximum, "throttle-trigger-threshold": trigger})


HIGH = (100, 100 * PAGE_SIZE)  # dirtied as many bytes as sent: over a 50% trigger
LOW = (10, 100 * PAGE_SIZE)


def _run(ac: AutoConverge, periods: list[tuple[int, int]], throttle: int = 0) -> list[int]:
    """Feed periods as the driver does (it sets the machine's throttle); the throttle after each."""
    out = []
    for dirty, sent in periods:
        pct = ac.period_end(dirty, sent, throttle)
        if pct is not None:
            throttle = pct
        out.append(throttle)
    return out


def test_a_period_is_high_when_it_dirties_more_than_the_trigger_share_of_what_it_sent() -> None:
    assert policy.dirty_rate_high(51, 100 * PAGE_SIZE, 50)
    assert not policy.dirty_rate_high(50, 100 * PAGE_SIZE, 50)  # equal is not more
    assert policy.dirty_rate_high(1, 0, 50)  # nothing sent: any dirtying is too much
    assert not policy.dirty_rate_high(0, 0, 1)
    assert not policy.dirty_rate_high(100, 100 * PAGE_SIZE, 100)


def test_auto_converge_starts_at_the_initial_value_on_the_second_high_period() -> None:
    assert _run(_converge(), [HIGH, HIGH]) == [0, 20]


def test_auto_converge_raises_by_the_increment_every_second_high_period_up_to_the_maximum() -> None:
    assert _run(_converge(initial=20, increment=30, maximum=90), [HIGH] * 10) == \
        [0, 20, 20, 50, 50, 80, 80, 90, 90, 90]


def test_auto_converge_counts_high_periods_not_consecutive_ones() -> None:
    """QEMU's migration_trigger_throttle leaves its count alone on a low period: high, low, high raises."""
    assert _run(_converge(), [HIGH, LOW, HIGH]) == [0, 0, 20]
    assert _run(_converge(), [LOW, LOW, LOW, HIGH, LOW]) == [0] * 5


def test_auto_converge_starts_counting_again_after_each_raise() -> None:
    ac = _converge()
    assert _run(ac, [HIGH, HIGH, HIGH], throttle=0) == [0, 20, 20]
    assert ac.high_periods == 1
    assert _run(_converge(), [HIGH, HIGH, LOW, HIGH, LOW, HIGH]) == [0, 20, 20, 20, 20, 30]


def test_auto_converge_adds_to_a_throttle_already_set() -> None:
    assert _run(_converge(), [HIGH, HIGH], throttle=45) == [45, 55]


def test_an_initial_value_above_the_maximum_is_set_then_brought_down_as_in_qemu() -> None:
    """mig_throttle_guest_down does not cap cpu-throttle-initial, only the increments."""
    assert _run(_converge(initial=50, maximum=30), [HIGH] * 4) == [0, 50, 50, 30]


_PCT = st.integers(1, 99)
_PERIOD = st.tuples(st.integers(0, 10_000), st.integers(0, 10_000 * PAGE_SIZE))


@settings(max_examples=300, deadline=None)
@given(initial=_PCT, increment=_PCT, maximum=_PCT, trigger=st.integers(1, 100),
       periods=st.lists(_PERIOD, max_size=40))
def test_the_throttle_rises_on_every_second_high_period_and_never_past_the_maximum(
        initial: int, increment: int, maximum: int, trigger: int, periods: list[tuple[int, int]]) -> None:
    ac = _converge(initial, increment, maximum, trigger)
    throttle, highs, raises = 0, 0, 0
    for (dirty, sent), after in zip(periods, _run(ac, periods), strict=True):
        highs += policy.dirty_rate_high(dirty, sent, trigger)
        if highs == 2 * (raises + 1):  # the second high period since the last raise
            raises += 1
            assert after == (initial if throttle == 0 else min(throttle + increment, maximum))
        else:
            assert after == throttle
        if initial <= maximum:
            assert throttle <= after <= maximum  # never down, never past max-cpu-throttle
        else:  # QEMU's uncapped start (see above), then the maximum
            assert after == (0 if raises == 0 else initial if raises == 1 else maximum)
        throttle = after


# -- the status table -------------------------------------------------------------------------------------------------
QEMU_STATUSES = {  # QEMU's MigrationStatus (qapi/migration.json)
    "none", "setup", "cancelling", "cancelled", "active", "postcopy-active", "postcopy-paused",
    "postcopy-recover-setup", "postcopy-recover", "completed", "failed", "colo", "pre-switchover", "device",
    "wait-unplug",
}


def _paths(start: MigrationStatus) -> list[tuple[MigrationStatus, ...]]:
    nexts = TRANSITIONS[start]
    if not nexts:
        return [(start,)]
    return [(start, *rest) for n in sorted(nexts) for rest in _paths(n)]


def test_statuses_are_qemus_names() -> None:
    assert {s.value for s in MigrationStatus} <= QEMU_STATUSES
    assert set(TRANSITIONS) == set(MigrationStatus)


def test_every_path_from_none_ends_completed_failed_or_cancelled() -> None:
    """The table is acyclic (the recursion ends) and these are all its paths."""
    got = {"->".join(p) for p in _paths(S.NONE)}
    assert got == {
        # completed is final except in cpr-exec, where a failed exec turns it into failed
        "none->setup->active->device->completed->failed",
        "none->setup->failed", "none->setup->cancelled",
        "none->setup->active->failed", "none->setup->active->cancelled",
        "none->setup->active->device->failed", "none->setup->active->device->cancelled",
    }
    for path in _paths(S.NONE):
        for old, new in itertools.pairwise(path):
            check_transition(old, new)


@pytest.mark.parametrize(("old", "new"), [
    (S.COMPLETED, S.ACTIVE), (S.COMPLETED, S.CANCELLED), (S.FAILED, S.SETUP), (S.CANCELLED, S.CANCELLED),
    (S.NONE, S.ACTIVE), (S.NONE, S.FAILED), (S.ACTIVE, S.SETUP), (S.DEVICE, S.ACTIVE), (S.SETUP, S.COMPLETED),
    (S.ACTIVE, S.COMPLETED), (S.ACTIVE, S.ACTIVE),
])
def test_illegal_transitions_are_refused(old: MigrationStatus, new: MigrationStatus) -> None:
    with pytest.raises(IllegalTransition, match=f"{old} -> {new}"):
        check_transition(old, new)


def test_exactly_the_tables_transitions_are_allowed() -> None:
    for old, new in itertools.product(MigrationStatus, repeat=2):
        try:
            check_transition(old, new)
            allowed = True
        except IllegalTransition:
            allowed = False
        assert allowed == (new in TRANSITIONS[old]), (old, new)


# -- statistics -------------------------------------------------------------------------------------------------------
def _completed_stats() -> MigrationStats:
    s = MigrationStats()
    s.entered(S.SETUP, 100.0)
    s.entered(S.ACTIVE, 100.25)
    s.dirty_sync_count = 3
    s.entered(S.DEVICE, 101.5)
    s.downtime_bytes = 3 * PAGE_SIZE
    s.entered(S.COMPLETED, 101.625)
    return s


def test_status_changes_set_the_timings() -> None:
    s = _completed_stats()
    assert (s.start, s.setup_time, s.window_start, s.period_start) == (100.0, 0.25, 100.25, 100.25)
    assert (s.downtime, s.end) == (0.125, 101.625)
    failed = MigrationStats()
    failed.entered(S.SETUP, 5.0)
    failed.entered(S.FAILED, 6.0)
    assert (failed.end, failed.downtime) == (6.0, None)


def test_windows_add_up_into_the_period_and_the_period_resets() -> None:
    s = MigrationStats()
    s.entered(S.SETUP, 0.0)
    s.entered(S.ACTIVE, 1.0)
    s.window_bytes, s.window_pages = 5 * MIB, 1280
    s.close_window(1.1, policy.window_rates(5 * MIB, 1280, 0.125, 10 * MIB, 300))
    assert (s.window_bytes, s.window_pages, s.window_start, s.period_bytes) == (0, 0, 1.1, 5 * MIB)
    assert (s.threshold, s.pages_per_second, s.expected_downtime) == (12 * MIB, 10240, 0.25)
    s.window_bytes = MIB
    assert s.period_sent() == 6 * MIB  # the open window counts for auto-converge
    s.close_window(1.3, policy.window_rates(0, 0, 0.2, 10 * MIB, 300))
    assert s.expected_downtime == 0.25  # an idle window keeps the last estimate
    assert s.threshold == 0
    s.period_dirty = 500
    s.close_period(2.5, 333)
    assert (s.period_start, s.period_dirty, s.period_bytes, s.dirty_pages_rate) == (2.5, 0, 0, 333)


def test_query_uses_qemus_names() -> None:
    c = RamCounters(duplicate=10, normal=20, transferred=20 * (PAGE_SIZE + 8) + 90, xbzrle_pages=4,
                    xbzrle_bytes=100, xbzrle_cache_miss=4, skipped=1)
    out = _completed_stats().query(S.COMPLETED, 500.0, c, 1000, 64 * MIB, 1 << 26)
    transferred = c.transferred + 1000
    assert out == {
        "status": "completed", "total-time": 1625, "setup-time": 250, "downtime": 125,
        "ram": {
            "transferred": transferred, "remaining": 0, "total": 64 * MIB, "duplicate": 10, "skipped": 1,
            "normal": 20, "normal-bytes": 20 * PAGE_SIZE, "dirty-pages-rate": 0,
            "mbps": round(transferred * 8 / 1.625 / 1e6, 3),  # over: the whole migration's average
            "dirty-sync-count": 3, "postcopy-requests": 0, "page-size": PAGE_SIZE, "multifd-bytes": 1000,
            "pages-per-second": 0, "precopy-bytes": transferred - 3 * PAGE_SIZE, "downtime-bytes": 3 * PAGE_SIZE,
            "postcopy-bytes": 0,
        },
        "xbzrle-cache": {"cache-size": 1 << 26, "bytes": 100, "pages": 4, "cache-miss": 4, "cache-miss-rate": 0.5,
                         "encoding-rate": round(4 * PAGE_SIZE / 100, 3), "overflow": 0},
    }


def test_query_while_active_estimates_the_downtime_and_reports_the_last_window() -> None:
    s = MigrationStats()
    s.entered(S.SETUP, 10.0)
    s.entered(S.ACTIVE, 10.5)
    s.remaining = 8 * MIB
    s.close_window(10.625, policy.window_rates(10 * MIB, 2560, 0.125, 8 * MIB, 300))
    out = s.query(S.ACTIVE, 11.0, RamCounters(), 0, 64 * MIB, None)
    assert (out["total-time"], out["setup-time"], out["expected-downtime"]) == (1000, 500, 100)
    assert "downtime" not in out and "xbzrle-cache" not in out
    assert out["ram"]["mbps"] == round(10 * MIB * 8 / 0.125 / 1e6, 3)
    assert out["ram"]["pages-per-second"] == 20480 and out["ram"]["remaining"] == 8 * MIB
    # Paused for the last pass: neither an estimate nor a downtime yet.
    s.entered(S.DEVICE, 11.5)
    assert not {"downtime", "expected-downtime"} & set(s.query(S.DEVICE, 11.6, RamCounters(), 0, 0, None))
