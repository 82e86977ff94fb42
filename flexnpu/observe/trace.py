"""Timelines of calls as Chrome trace-event JSON, which ui.perfetto.dev and chrome://tracing
open.

The file is written as it goes, in the trace-event "JSON Array Format", which viewers read
even when the closing bracket is missing, so a timeline cut short by a kill still opens.
Each call is an event on its thread's track: synchronisations and allocations as slices
with their duration, dispatching calls as instants; iterations get a track of their own
per process and device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from flexnpu.runtimes import Direction, Op

_ITER_TID_BASE = 1 << 30  # iteration tracks: one pseudo-thread per device, apart from real tids


class TraceWriter:
    def __init__(self, path: Path | str, symbols: list[str]) -> None:
        self.path = Path(path)
        self.symbols = symbols
        self._f: IO[str] = open(self.path, "w")
        self._f.write("[\n")
        self._first = True
        self._named: set[tuple[int, int]] = set()
        self.events = 0

    def _write(self, ev: dict[str, Any]) -> None:
        self._f.write(("" if self._first else ",\n") + json.dumps(ev, separators=(",", ":")))
        self._first = False

    def _name_track(self, pid: int, tid: int, name: str) -> None:
        if (pid, tid) not in self._named:
            self._named.add((pid, tid))
            self._write({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})

    def process(self, pid: int, name: str) -> None:
        self._write({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": f"{name} ({pid})"}})

    def add(self, e: dict[str, Any]) -> None:
        """One struct fx_event, as a dict."""
        sym = self.symbols[e["sym"]] if e["sym"] < len(self.symbols) else f"sym{e['sym']}"
        pid, ts = e["tgid"], e["ts_ns"] / 1e3
        args: dict[str, Any] = {"device": e["dev"]}
        if sym == "iteration":
            tid = _ITER_TID_BASE + max(e["dev"], 0)
            self._name_track(pid, tid, f"iterations (device {e['dev']})")
            self._write({"ph": "X", "name": "iteration", "cat": "iteration", "pid": pid, "tid": tid,
                         "ts": ts, "dur": e["dur_ns"] / 1e3, "args": args})
            self.events += 1
            return
        op = Op(e["op"]).name.lower() if e["op"] < len(Op) else "?"
        if e["bytes"]:
            args["bytes"] = e["bytes"]
        if e["dir"] < len(Direction):
            args["direction"] = Direction(e["dir"]).name
        ev = {"name": sym, "cat": op, "pid": pid, "tid": e["tid"], "ts": ts, "args": args}
        if e["dur_ns"]:
            ev.update(ph="X", dur=e["dur_ns"] / 1e3)
            args["ret"] = e["ret"]
        else:
            ev.update(ph="i", s="t")
        self._write(ev)
        self.events += 1

    def close(self) -> None:
        if not self._f.closed:
            self._f.write("\n]\n")
            self._f.close()
