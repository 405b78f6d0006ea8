"""Migration progress for people and for logs.

:class:`Progress` takes the ``query-migrate`` dictionaries a
:class:`~vmsd.migration.precopy.Migration` reports.  On a terminal it redraws
one bar line; otherwise it prints a line at most once a second; in JSON-lines
mode every report is one JSON object per line (with a ``time`` field), for
log collectors.  :func:`summary` formats the final statistics.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

_BAR = 30


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    def __init__(self, out: TextIO | None = None, json_lines: bool = False, interval: float = 1.0) -> None:
        self.out = out if out is not None else sys.stderr
        self.json_lines = json_lines
        self.tty = self.out.isatty() and not json_lines
        self.interval = interval
        self._last = 0.0
        self._drawn = False

    def __call__(self, info: dict[str, Any]) -> None:
        now = time.monotonic()
        final = info.get("status") in ("completed", "failed", "cancelled")
        if self.json_lines:
            self.out.write(json.dumps({"time": round(time.time(), 3), **info}) + "\n")
            self.out.flush()
            return
        if not final and not self.tty and now - self._last < self.interval:
            return
        self._last = now
        line = self.line(info)
        if self.tty:
            self.out.write("\r\x1b[K" + line + ("\n" if final else ""))
            self._drawn = not final
        else:
            self.out.write(line + "\n")
        self.out.flush()

    @staticmethod
    def line(info: dict[str, Any]) -> str:
        ram = info.get("ram", {})
        total = ram.get("total", 0) or 1
        done = 1.0 if info.get("status") == "completed" else max(0.0, 1 - ram.get("remaining", total) / total)
        filled = int(done * _BAR)
        bar = "#" * filled + "." * (_BAR - filled)
        parts = [f"[{bar}] {done * 100:5.1f}%", info.get("status", "?"),
                 f"pass {ram.get('dirty-sync-count', 0)}",
                 f"sent {_size(ram.get('transferred', 0))}",
                 f"{ram.get('mbps', 0) / 8000:.2f} GB/s",
                 f"remaining {_size(ram.get('remaining', 0))}"]
        if ram.get("dirty-pages-rate"):
            parts.append(f"dirtying {ram['dirty-pages-rate']} pages/s")
        if info.get("cpu-throttle-percentage"):
            parts.append(f"throttle {info['cpu-throttle-percentage']}%")
        return "  ".join(parts)


def summary(info: dict[str, Any]) -> str:
    """The final statistics as aligned ``name: value`` lines, with QEMU's names."""
    rows: list[tuple[str, Any]] = [(k, v) for k, v in info.items() if not isinstance(v, dict)]
    for group in ("ram", "xbzrle-cache"):
        for k, v in info.get(group, {}).items():
            rows.append((f"{group}.{k}", v))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"   {k:<{width}}  {v}" for k, v in rows)
