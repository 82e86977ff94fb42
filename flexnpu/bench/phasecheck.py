"""The observer's phase of each serving instance against the workload's own ground truth,
while a benchmark runs.

A thread subscribes to the node's `observe.sock` and, on each snapshot, asks the emulator
for its per-process busy time. The workload's ground truth: the prefill instance's steps are
prefill, the decode instance's steps decode (the bench runs no chunked-prefill instance), so
in an interval a process is `idle` when the emulator ran its work for under IDLE_SHARE of the
interval, else its instance's phase. An interval whose busy share lies between IDLE_SHARE and
EDGE_SHARE is at the edge of a burst (the observer's interval and the emulator's are a few ms
apart): it is counted, but either answer is right there. The emulator's busy time is
interpolated (on CLOCK_MONOTONIC, which the snapshot's `mono_ns` also uses) to the ends of
each snapshot's own interval, so the few ms between a snapshot and the status query that
follows it do not count against the observer.

Forwarded instances' work is their executor's on the emulator (one client per device, busy
time not split by instance), so there the ground truth is each instance's own step spans
(`spans`: first launch to synchronisation, CLOCK_MONOTONIC, as the instance reports them),
the time it had work on the device; the executor's pid is no instance's and is not scored.

    pc = PhaseCheck(node.rdir); pc.start(); ...; samples = pc.stop()
    PhaseCheck.score(samples, {pid: "prefill", pid2: "decode"})
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

IDLE_SHARE, EDGE_SHARE = 0.01, 0.10


class PhaseCheck:
    def __init__(self, rdir: Path) -> None:
        self.rdir = Path(rdir)
        # (phase and source by pid, emulator busy ns by pid, when asked, snapshot end, its interval)
        self.samples: list[tuple[dict[int, tuple[str, str]], dict[int, float], float, float, float]] = []
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flexnpu-phasecheck", daemon=True)
        self.error: str | None = None

    def start(self) -> PhaseCheck:
        self._thread.start()
        return self

    def _run(self) -> None:
        from flexnpu.emulator import control
        from flexnpu.snapshot import SnapshotSubscriber

        try:
            with SnapshotSubscriber(self.rdir) as sub:
                while not self._stop.is_set():
                    snap = sub.recv(0.2)
                    if snap is None:
                        continue
                    st = control.status(self.rdir, timeout=2.0)
                    q = time.monotonic()
                    busy: dict[int, float] = {}
                    for d in st["devices"]:
                        for c in d["clients"]:
                            busy[c["pid"]] = busy.get(c["pid"], 0.0) + c["busy_ns"]
                    seen: dict[int, tuple[str, str]] = {}
                    for p in snap.processes:
                        if p.pid not in seen or seen[p.pid][0] == "idle":
                            seen[p.pid] = (p.phase, p.phase_source)
                    self.source = snap.source
                    self.samples.append((seen, busy, q, snap.mono_ns / 1e9, snap.interval_s))
        except Exception as e:  # reported with the score, never fatal to the run
            self.error = f"{type(e).__name__}: {e}"

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(5)
        return {"samples": self.samples, "source": self.source, "error": self.error}

    @staticmethod
    def score(got: dict[str, Any], roles: dict[int, str],
              spans: dict[int, list[tuple[float, float]]] | None = None) -> dict[str, Any]:
        """Share of (interval, instance) pairs the observer got right; roles: pid -> phase;
        spans: pid -> [start, end] seconds of each step, the ground truth instead of the
        emulator's busy time (forwarded instances)."""
        samples = got["samples"]
        # busy time of each process at the moments the emulator was asked (CLOCK_MONOTONIC),
        # interpolated to the ends of each snapshot's own interval
        qs = [x[2] for x in samples]

        def busy_at(pid: int, t: float) -> float | None:
            i = bisect.bisect_left(qs, t)
            if i == 0 or i >= len(qs):
                return None
            (b0, t0), (b1, t1) = (samples[i - 1][1].get(pid, 0.0), qs[i - 1]), (samples[i][1].get(pid, 0.0), qs[i])
            return b0 + (b1 - b0) * (t - t0) / (t1 - t0) if t1 > t0 else b1

        if spans is not None:
            cum = {pid: _cumulative(sorted(tuple(x) for x in sp)) for pid, sp in spans.items()}
            first, last = (qs[0], qs[-1]) if qs else (0.0, 0.0)

            def busy_at(pid: int, t: float) -> float | None:  # noqa: F811 (the forwarded ground truth)
                if pid not in cum or not first < t < last:  # as above: only while the run was sampled
                    return None
                return cum[pid](t)

        right = total = edge = 0
        wrong: Counter = Counter()
        sources: Counter = Counter()
        for seen, _, _, end, dt_s in samples:
            if dt_s <= 0:
                continue
            for pid, role in roles.items():
                a, b = busy_at(pid, end - dt_s), busy_at(pid, end)
                if a is None or b is None:
                    continue
                share = (b - a) / (dt_s * 1e9)
                truth = "idle" if share < IDLE_SHARE else role
                phase, src = seen.get(pid, ("idle", "absent"))
                sources[src] += 1
                total += 1
                at_edge = IDLE_SHARE <= share < EDGE_SHARE
                edge += at_edge
                if phase == truth or (at_edge and phase == "idle"):
                    right += 1
                else:
                    wrong[f"{truth}->{phase}"] += 1
        return {"accuracy": round(right / total, 4) if total else None, "intervals": total, "edge": edge,
                "wrong": dict(wrong), "source": got["source"], "phase_sources": dict(sources),
                "error": got["error"]}


def _cumulative(spans: list[tuple[float, float]]):
    """t -> ns of [start, end] spans (sorted, not overlapping) before t."""
    starts = [a for a, _ in spans]
    done = [0.0]
    for a, b in spans:
        done.append(done[-1] + max(0.0, b - a))

    def at(t: float) -> float:
        i = bisect.bisect_right(starts, t)
        if i == 0:
            return 0.0
        a, b = spans[i - 1]
        return (done[i - 1] + max(0.0, min(t, b) - a)) * 1e9

    return at
