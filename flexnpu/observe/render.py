"""Text output of the observer's commands: one line per interval, under 80 columns, in the
style of bcc's tools. A value the source does not have prints as N/A."""

from __future__ import annotations

import time
from typing import Any

NA = "N/A"
HEADER = (f"{'TIME':<8} {'LAUNCH/s':>9} {'H2D MB/s':>9} {'D2H MB/s':>9} {'D2D MB/s':>9} "
          f"{'DEVMEM':>8} {'SYNC%':>6} {'PHASE':<7}")


def human_bytes(n: float | None) -> str:
    if n is None:
        return NA
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{int(n)}B"


def _num(v: float | None, fmt: str) -> str:
    return NA if v is None else format(v, fmt)


def _mb(v: float | None) -> str:
    return _num(None if v is None else v / 1e6, ".1f")


def process_line(view: dict[str, Any], wall: float | None = None) -> str:
    """One interval of one process (snapshot.process_view)."""
    t = time.strftime("%H:%M:%S", time.localtime(wall if wall is not None else time.time()))
    sync = view["sync_wait"]
    return (f"{t:<8} {_num(view['launches_per_s'], '.1f'):>9} {_mb(view['h2d_Bps']):>9} "
            f"{_mb(view['d2h_Bps']):>9} {_mb(view['d2d_Bps']):>9} {human_bytes(view['mem_bytes']):>8} "
            f"{_num(None if sync is None else 100 * sync, '.1f'):>6} {view['phase']:<7}")


def idle_line(wall: float | None = None) -> str:
    """An interval in which the process made no call the probes count."""
    return process_line({"launches_per_s": 0.0, "h2d_Bps": 0, "d2h_Bps": 0, "d2d_Bps": 0,
                         "mem_bytes": None, "sync_wait": 0.0, "phase": "idle"}, wall)
