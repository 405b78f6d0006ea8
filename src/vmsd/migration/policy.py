"""QEMU's precopy convergence rules, as functions of numbers.

The driver (:class:`~vmsd.migration.precopy.Migration`) measures -- bytes and pages sent in the
current bandwidth window and how long it has run, the pending dirty bytes, the pages dirtied in the
sync period -- and asks these functions what to do.  Nothing here reads a clock, sleeps, or touches
a machine, a thread or a socket: time comes in as seconds, so each rule can be checked with plain
numbers.  The rules and the QEMU 7.2 functions they follow:

* **window** (``migration_update_counters``): every :data:`BUFFER_DELAY` the window's bandwidth
  gives the threshold ``bandwidth x downtime-limit``, mbps, pages-per-second and the expected
  downtime (:func:`window_closed`, :func:`window_rates`);
* **completion** (``migration_iteration_run`` with ``ram_save_pending``): when the pending bytes
  are under the threshold the dirty log is synced and, if they still are (or nothing is pending),
  the migration completes (:func:`should_sync`, :func:`should_complete`);
* **rate limit** (``qemu_file_rate_limit``, ``migration_rate_limit``): a window may send its share
  of ``max-bandwidth``; an iteration stops after :data:`MAX_WAIT` or once the share is used, and
  the window then waits out its length (:func:`chunk_pages`, :func:`iteration_over`,
  :func:`rate_limit_delay`);
* **sync period** (``migration_bitmap_sync``): a dirty sync more than :data:`SYNC_PERIOD` after the
  period began ends it, giving ``dirty-pages-rate`` (:func:`period_over`, :func:`dirty_pages_rate`);
* **auto-converge** (``migration_trigger_throttle``, ``mig_throttle_guest_down``): at a period's
  end, bytes dirtied over ``throttle-trigger-threshold`` percent of the bytes sent make a period
  "high"; every second high period sets the throttle (:class:`AutoConverge`).
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from vmsd.migration.ram.blocks import PAGE_SIZE

BUFFER_DELAY = 0.1  # seconds: QEMU's bandwidth window
MAX_WAIT = 0.05  # seconds: longest iteration (one PART section)
SYNC_PERIOD = 1.0  # seconds: the dirty-rate period of migration_bitmap_sync


# -- completion -------------------------------------------------------------------------------------------------------
def threshold(bandwidth: float, downtime_limit: int) -> int:
    """Bytes that ``bandwidth`` (bytes/s) moves within ``downtime-limit`` (ms): QEMU's threshold_size."""
    return int(bandwidth * downtime_limit / 1000)


def should_sync(pending_bytes: int, threshold: int) -> bool:
    """Take the dirty log before deciding: the pass's own pages would fit in the downtime."""
    return pending_bytes < threshold


def should_complete(pending_bytes: int, threshold: int) -> bool:
    """Pause the machine and send the rest now (``pending_bytes`` counted after any sync).

    Nothing pending completes even before the first window has measured a bandwidth (threshold 0),
    as QEMU's ``pending_size && pending_size >= threshold_size`` test does."""
    return pending_bytes == 0 or pending_bytes < threshold


# -- rate limit -------------------------------------------------------------------------------------------------------
def window_share(max_bandwidth: int) -> float:
    """Bytes a window may send under ``max-bandwidth`` (bytes/s); 0 means unlimited."""
    return max_bandwidth * BUFFER_DELAY


def chunk_pages(max_bandwidth: int, window_bytes: int, most: int) -> int:
    """Pages the next chunk of an iteration may take: ``most``, or under a bandwidth limit what the
    window's share has left, plus one page so that a chunk of normal pages reaches the share (and ends
    the iteration) rather than stopping a page short of it; never fewer than one, so a pass advances."""
    share = window_share(max_bandwidth)
    if not share:
        return most
    return max(1, min(most, int(share - window_bytes) // PAGE_SIZE + 1))


def iteration_over(elapsed: float, max_bandwidth: int, window_bytes: int) -> bool:
    """After a chunk: the iteration ends after :data:`MAX_WAIT` or once the window's share is used."""
    if elapsed > MAX_WAIT:
        return True
    share = window_share(max_bandwidth)
    return bool(share) and window_bytes >= share


def rate_limit_delay(max_bandwidth: int, window_bytes: int, window_elapsed: float) -> float:
    """Seconds to wait after an iteration: the rest of the window, if its share is used (else 0)."""
    share = window_share(max_bandwidth)
    if share and window_bytes >= share and window_elapsed < BUFFER_DELAY:
        return BUFFER_DELAY - window_elapsed
    return 0.0


# -- the bandwidth window -----------------------------------------------------------------------------------------------
def window_closed(window_elapsed: float) -> bool:
    """The window has run :data:`BUFFER_DELAY`: its rates replace the last window's."""
    return window_elapsed >= BUFFER_DELAY


@attrs.frozen
class WindowRates:
    """What a closed window measured."""

    bandwidth: float  # bytes/s
    threshold: int  # bytes: see threshold()
    mbps: float
    pages_per_second: float
    expected_downtime: float | None  # seconds to send the pending bytes; None: nothing sent, no estimate


def window_rates(window_bytes: int, window_pages: int, elapsed: float, pending_bytes: int,
                 downtime_limit: int) -> WindowRates:
    """The rates of a window that sent ``window_bytes`` (``window_pages`` pages) in ``elapsed`` seconds
    (> 0), ``pending_bytes`` still to send."""
    bandwidth = window_bytes / elapsed
    return WindowRates(
        bandwidth=bandwidth,
        threshold=threshold(bandwidth, downtime_limit),
        mbps=window_bytes * 8 / elapsed / 1e6,
        pages_per_second=window_pages / elapsed,
        expected_downtime=pending_bytes / bandwidth if bandwidth else None,
    )


# -- the sync period and auto-converge -------------------------------------------------------------------------------
def period_over(elapsed: float) -> bool:
    """A dirty sync this long after the period began ends the period."""
    return elapsed > SYNC_PERIOD


def dirty_pages_rate(dirty_pages: int, elapsed: float) -> int:
    """``dirty-pages-rate``: pages dirtied per second over a period of ``elapsed`` (> 0) seconds."""
    return int(dirty_pages / elapsed)


def dirty_rate_high(dirty_pages: int, sent_bytes: int, trigger_threshold: int) -> bool:
    """The period dirtied more than ``throttle-trigger-threshold`` percent of the bytes it sent."""
    return dirty_pages * PAGE_SIZE > sent_bytes * trigger_threshold / 100


def raised_throttle(current: int, initial: int, increment: int, maximum: int) -> int:
    """mig_throttle_guest_down: start at ``cpu-throttle-initial``, then add ``cpu-throttle-increment``
    up to ``max-cpu-throttle``.  As in QEMU the initial value is not capped: an initial value above the
    maximum is set, and the next raise brings it down to the maximum."""
    if current == 0:
        return initial
    return min(current + increment, maximum)


@attrs.define
class AutoConverge:
    """The ``auto-converge`` capability: migration_trigger_throttle's counter of high periods.

    As in QEMU, the high periods need not be consecutive (a period under the threshold leaves the
    count as it is) and the count starts again after each raise.  One instance per migration."""

    trigger_threshold: int  # throttle-trigger-threshold, percent
    initial: int  # cpu-throttle-initial
    increment: int  # cpu-throttle-increment
    maximum: int  # max-cpu-throttle
    high_periods: int = 0

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, int]) -> AutoConverge:
        return cls(parameters["throttle-trigger-threshold"], parameters["cpu-throttle-initial"],
                   parameters["cpu-throttle-increment"], parameters["max-cpu-throttle"])

    def period_end(self, dirty_pages: int, sent_bytes: int, throttle: int) -> int | None:
        """A sync period ended having dirtied ``dirty_pages`` and sent ``sent_bytes``, the machine
        throttled at ``throttle`` percent: the throttle to set now, or None to leave it."""
        if not dirty_rate_high(dirty_pages, sent_bytes, self.trigger_threshold):
            return None
        self.high_periods += 1
        if self.high_periods < 2:
            return None
        self.high_periods = 0
        return raised_throttle(throttle, self.initial, self.increment, self.maximum)
