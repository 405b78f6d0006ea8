"""An outgoing migration's counters and timings, and the ``query-migrate`` answer made of them.

The migration thread updates a :class:`MigrationStats`; ``query-migrate`` reads it from any thread
without a lock (QEMU reads its counters without one too): an answer given while a window closes may
mix that window's values with the last one's.  Times are ``time.monotonic()`` seconds, passed in by
the driver.
"""

from __future__ import annotations

from typing import Any

import attrs

from vmsd.migration.policy import WindowRates
from vmsd.migration.ram.blocks import PAGE_SIZE
from vmsd.migration.ram.wire import RamCounters
from vmsd.migration.status import MigrationStatus


@attrs.define
class MigrationStats:
    """What one migration measured so far; the window and period fields are the inputs of vmsd.migration.policy."""

    start: float = 0.0
    paused: float = 0.0  # the machine paused for the last pass at
    setup_time: float = 0.0  # seconds from start to the first iteration
    end: float | None = None  # completed, failed or cancelled at
    downtime: float | None = None  # seconds paused, once completed
    downtime_bytes: int = 0  # bytes sent while paused
    dirty_sync_count: int = 0
    remaining: int = 0  # pending bytes, as last counted
    # The last closed window's outcome (see policy.window_rates).
    threshold: int = 0
    mbps: float = 0.0
    pages_per_second: float = 0.0
    expected_downtime: float = 0.0
    # The current bandwidth window (QEMU's iteration_start_time / iteration_initial_bytes).
    window_start: float = 0.0
    window_bytes: int = 0
    window_pages: int = 0
    # The current sync period (QEMU's time_last_bitmap_sync / num_dirty_pages_period / bytes_xfer_prev).
    period_start: float = 0.0
    period_dirty: int = 0  # pages dirtied
    period_bytes: int = 0  # bytes sent in the period's closed windows
    dirty_pages_rate: int = 0

    def entered(self, status: MigrationStatus, now: float) -> None:
        """The status changed to ``status`` at ``now``: the timings QEMU takes at that change."""
        match status:
            case MigrationStatus.SETUP:
                self.start = now
            case MigrationStatus.ACTIVE:  # after QEMU's first bitmap sync: the first window and period open
                self.setup_time = now - self.start
                self.window_start = self.period_start = now
            case MigrationStatus.DEVICE:
                self.paused = now
            case MigrationStatus.COMPLETED:
                self.end = now
                self.downtime = now - self.paused
            case MigrationStatus.FAILED | MigrationStatus.CANCELLED:
                self.end = now

    def close_window(self, now: float, rates: WindowRates) -> None:
        self.threshold = rates.threshold
        self.mbps = rates.mbps
        self.pages_per_second = rates.pages_per_second
        if rates.expected_downtime is not None:
            self.expected_downtime = rates.expected_downtime
        self.period_bytes += self.window_bytes
        self.window_bytes = self.window_pages = 0
        self.window_start = now

    def period_sent(self) -> int:
        """Bytes sent since the period began, the open window's included."""
        return self.period_bytes + self.window_bytes

    def close_period(self, now: float, dirty_pages_rate: int) -> None:
        self.dirty_pages_rate = dirty_pages_rate
        self.period_start = now
        self.period_dirty = 0
        self.period_bytes = 0

    def query(self, status: MigrationStatus, now: float, counters: RamCounters, multifd_bytes: int,
              ram_total: int, xbzrle_cache_size: int | None) -> dict[str, Any]:
        """``query-migrate``'s answer once started, up to ``xbzrle-cache`` (given a cache size), with QEMU's names."""
        out: dict[str, Any] = {"status": status.value}
        end = self.end if self.end is not None else now
        out["total-time"] = int((end - self.start) * 1000)
        out["setup-time"] = int(self.setup_time * 1000)
        if self.downtime is not None:
            out["downtime"] = int(self.downtime * 1000)
        elif status is MigrationStatus.ACTIVE:
            out["expected-downtime"] = int(self.expected_downtime * 1000)
        c = counters
        transferred = c.transferred + multifd_bytes
        out["ram"] = {
            "transferred": transferred,
            "remaining": self.remaining,
            "total": ram_total,
            "duplicate": c.duplicate,
            "skipped": c.skipped,
            "normal": c.normal,
            "normal-bytes": c.normal_bytes,
            "dirty-pages-rate": self.dirty_pages_rate,
            # While running, the last window's; once over, the whole migration's average.
            "mbps": round(self.mbps if self.end is None else transferred * 8 / max(end - self.start, 1e-9) / 1e6, 3),
            "dirty-sync-count": self.dirty_sync_count,
            "postcopy-requests": 0,
            "page-size": PAGE_SIZE,
            "multifd-bytes": multifd_bytes,
            "pages-per-second": int(self.pages_per_second),
            "precopy-bytes": transferred - self.downtime_bytes,
            "downtime-bytes": self.downtime_bytes,
            "postcopy-bytes": 0,
        }
        if xbzrle_cache_size is not None:
            out["xbzrle-cache"] = {
                "cache-size": xbzrle_cache_size,
                "bytes": c.xbzrle_bytes,
                "pages": c.xbzrle_pages,
                "cache-miss": c.xbzrle_cache_miss,
                "cache-miss-rate": round(c.xbzrle_cache_miss / max(c.xbzrle_cache_miss + c.xbzrle_pages, 1), 6),
                "encoding-rate": round(c.xbzrle_pages * PAGE_SIZE / max(c.xbzrle_bytes, 1), 3)
                if c.xbzrle_pages else 0,
                "overflow": c.xbzrle_overflow,
            }
        return out
