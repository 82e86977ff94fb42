"""Snapshots: what every observed process did on every device during the last interval.

SnapshotBuilder turns successive reads of cumulative counters (from the BPF maps, or from
the shim's gate slots) into one JSON-ready dict per interval: per (process, device) the
counters, their rates over the interval, iteration statistics and the phase; per device
the totals and its phase occupancy (the share of the interval its work spent in prefill,
decode and idle). A value the source cannot give is None (printed N/A).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

from flexnpu import SCHEMA
from flexnpu.observe.phase import IntervalFeatures, NamedWork, PhaseClassifier, Shape
from flexnpu.runtimes import Direction, Op

Counters = dict[str, Any]  # fields of struct fx_stats (probes/observe.h); absent or None: unknown
_DISPATCH_OPS = [o for o in Op if o.dispatches]


@dataclass(frozen=True)
class ProcessInfo:
    comm: str
    role: str | None  # prefill or decode, given to the shim; None: infer


def _merge(a: Counters, b: Counters) -> Counters:
    out = dict(a)
    for k, v in b.items():
        mine = out.get(k)
        if mine is None or v is None:
            out[k] = v if mine is None else mine
        elif isinstance(v, list):
            out[k] = [x + y for x, y in zip(mine, v)]
        elif k == "iter_start_ns":
            out[k] = min(x for x in (mine, v) if x) if (mine or v) else 0
        elif k in ("iter_ns_last", "last_ns"):
            out[k] = max(mine, v)
        else:
            out[k] = mine + v
    return out


def resolve_devices(reads: dict[tuple[int, int], Counters]) -> dict[tuple[int, int], Counters]:
    """Calls made before a process selected a device (or before the probes saw it select
    one) are kept under device -1; where the process uses exactly one device, they are
    that device's."""
    devs: dict[int, set[int]] = defaultdict(set)
    for pid, dev in reads:
        if dev >= 0:
            devs[pid].add(dev)
    out: dict[tuple[int, int], Counters] = {}
    for (pid, dev), c in reads.items():
        if dev < 0 and len(devs[pid]) == 1:
            dev = next(iter(devs[pid]))
        out[(pid, dev)] = _merge(out[(pid, dev)], c) if (pid, dev) in out else c
    return out


def _d(c: Counters, p: Counters | None, k: str) -> int | None:
    v = c.get(k)
    if v is None:
        return None
    return v - ((p or {}).get(k) or 0)


def _dlist(c: Counters, p: Counters | None, k: str) -> list[int] | None:
    v = c.get(k)
    if v is None:
        return None
    pv = (p or {}).get(k) or [0] * len(v)
    return [x - y for x, y in zip(v, pv)]


def launches_of(c: Counters) -> int:
    """Kernel launches: where the lower runtime (rt*) saw launches, its count, since the
    AscendCL launch ends in one of those there; else the AscendCL count."""
    rt = c.get("rt_launches") or 0
    return rt if rt else c["ops"][Op.KERNEL]


def mem_bytes_of(c: Counters) -> int | None:
    if c.get("mem_bytes") is not None:
        return c["mem_bytes"]
    if c.get("alloc_bytes") is None:
        return None
    return c["alloc_bytes"] - (c.get("freed_bytes") or 0)


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


class SnapshotBuilder:
    """Keeps the previous read so each snapshot holds the last interval's deltas."""

    def __init__(self, source: str, classifier: PhaseClassifier | None = None, note: str | None = None,
                 start_ns: int | None = None) -> None:
        self.source = source
        self.note = note
        self.classifier = classifier or PhaseClassifier()
        self.prev: dict[tuple[int, int], Counters] = {}
        self.prev_ns = start_ns if start_ns is not None else time.monotonic_ns()
        self.seq = 0

    def build(self, reads: dict[tuple[int, int], Counters], now_ns: int | None = None,
              info: Callable[[int], ProcessInfo] | None = None) -> dict[str, Any]:
        now_ns = now_ns if now_ns is not None else time.monotonic_ns()
        dt_ns = max(now_ns - self.prev_ns, 1)
        reads = resolve_devices(reads)
        entries = []
        for (pid, dev), c in sorted(reads.items()):
            pi = info(pid) if info else ProcessInfo("?", None)
            entries.append(self._entry(pid, dev, c, self.prev.get((pid, dev)), dt_ns, now_ns, pi))
        snap = {
            "schema": SCHEMA,
            "source": self.source,
            "note": self.note,
            "seq": self.seq,
            "time": time.time(),
            "mono_ns": now_ns,
            "interval_s": round(dt_ns / 1e9, 6),
            "devices": self._devices(entries, dt_ns),
            "processes": entries,
        }
        self.prev = reads
        self.prev_ns = now_ns
        self.seq += 1
        return snap

    def _entry(self, pid: int, dev: int, c: Counters, p: Counters | None, dt_ns: int, now_ns: int,
               pi: ProcessInfo) -> dict[str, Any]:
        dt = dt_ns / 1e9
        ops = _dlist(c, p, "ops") or [0] * len(Op)
        nbytes = _dlist(c, p, "bytes") or [0] * len(Direction)
        launches = launches_of(c) - (launches_of(p) if p else 0)
        dispatches = sum(ops[o] for o in _DISPATCH_OPS) + (_d(c, p, "rt_launches") or 0)
        iters = _d(c, p, "iterations") or 0
        iter_ns = _d(c, p, "iter_ns") or 0
        start = c.get("iter_start_ns") or 0
        open_ns = now_ns - start if 0 < start <= now_ns else 0
        # busy time in this interval: iterations that ended, less the part of one that was
        # open at the previous read (counted then), plus the one open now
        pstart = (p or {}).get("iter_start_ns") or 0
        carry = self.prev_ns - pstart if 0 < pstart <= self.prev_ns else 0
        busy_ns = min(max(iter_ns - carry + open_ns, 0), dt_ns) if iters or open_ns else 0
        open_launches = max(c.get("iter_launches") or 0, c.get("iter_launches_rt") or 0) if open_ns else 0

        def named(sig: int) -> NamedWork | None:
            # struct fx_stats: named/iter_named [sig*3 + class-1], sig_iters/sig_ns [sig*4 + held]
            si, sn, sm, nc = (_dlist(c, p, k) for k in ("sig_iters", "sig_ns", "sig_mix", "named"))
            if si is None or sn is None or sm is None or nc is None:
                return None
            now_open = c.get("iter_named") or [0] * 6
            was_open = (p or {}).get("iter_named") or [0] * 6
            if not any(nc[sig * 3:sig * 3 + 3]) and not any(now_open[sig * 3:sig * 3 + 3]):
                return None
            return NamedWork(iters=tuple(si[sig * 4:sig * 4 + 4]), ns=tuple(sn[sig * 4:sig * 4 + 4]),
                             mix=tuple(sm[sig * 2:sig * 2 + 2]), calls=tuple(nc[sig * 3:sig * 3 + 3]),
                             open_calls=tuple(now_open[sig * 3:sig * 3 + 3]) if open_ns else (0, 0, 0),
                             prev_open_calls=tuple(was_open[sig * 3:sig * 3 + 3]))

        shapes = None
        if c.get("shapes") is not None:
            before = (p or {}).get("shapes") or {}
            shapes = []
            for b, v in c["shapes"].items():
                d = [x - y for x, y in zip(v, before.get(b, [0, 0, 0]))]
                if d[0] > 0:
                    shapes.append(Shape(b, d[0], d[1], d[2]))
            shapes = tuple(shapes)
        feats = IntervalFeatures(
            dt_s=dt, dispatches=dispatches, launches=launches, iterations=iters, iter_ns=iter_ns,
            h2d_bytes=nbytes[Direction.H2D], open_iter_ns=open_ns, open_launches=open_launches,
            open_h2d_bytes=(c.get("iter_h2d") or 0) if open_ns else 0,
            kernel=named(0), aclnn=named(1), shapes=shapes)
        verdict = self.classifier.classify(feats, pi.role, key=(pid, dev))
        sync_ns = _d(c, p, "sync_ns")
        per_iter = iters if iters else None
        counters = {
            "launches": launches_of(c),
            "rt_launches": c.get("rt_launches"),
            "ops": {o.name.lower(): c["ops"][o] for o in Op},
            "bytes": {d.name.lower(): c["bytes"][d] for d in Direction},
            "memset_bytes": c.get("memset_bytes"),
            "allocs": c.get("allocs"),
            "alloc_failures": c.get("alloc_failures"),
            "frees": c["ops"][Op.FREE],
            "mem_bytes": mem_bytes_of(c),
            "syncs": c["ops"][Op.SYNC],
            "sync_ns": c.get("sync_ns"),
            "iterations": c.get("iterations"),
            "iter_ns": c.get("iter_ns"),
        }
        return {
            "pid": pid,
            "device": dev if dev >= 0 else None,
            "comm": pi.comm,
            "role": pi.role,
            "phase": verdict.phase,
            "phase_source": verdict.source,
            "phase_share": round(verdict.prefill_share, 4) if verdict.phase != "idle" else 0.0,
            "phase_reason": verdict.reason,
            "counters": counters,
            "rates": {
                "launches_per_s": _r(launches / dt, 1),
                "h2d_Bps": _r(nbytes[Direction.H2D] / dt, 0),
                "d2h_Bps": _r(nbytes[Direction.D2H] / dt, 0),
                "d2d_Bps": _r(nbytes[Direction.D2D] / dt, 0),
                "iterations_per_s": _r(iters / dt, 2),
                "sync_wait": _r(sync_ns / dt_ns if sync_ns is not None else None, 4),
                "busy": _r(busy_ns / dt_ns, 4),
            },
            "iteration": {
                "count": iters,
                "contended": _d(c, p, "contended"),
                "mean_ms": _r(iter_ns / iters / 1e6 if iters else None, 3),
                "last_ms": _r((c.get("iter_ns_last") or 0) / 1e6 if c.get("iter_ns_last") is not None else None, 3),
                "open_ms": _r(open_ns / 1e6, 3),
                "launches_per_iter": _r(launches / per_iter if per_iter else None, 1),
                "h2d_per_iter": _r(nbytes[Direction.H2D] / per_iter if per_iter else None, 0),
            },
            "_busy_ns": busy_ns,
            "_prefill_share": verdict.prefill_share,
            **self._observed(verdict, (pid, dev)),
        }

    def _observed(self, verdict, key: tuple[int, int]) -> dict[str, Any]:
        """Where the declared role decided the phase, what the work itself showed (the
        strongest signal with evidence, as if nothing were declared): a consumer checks the
        declaration against it."""
        if verdict.source != "role":
            return {}
        by = self.classifier.last.get(key) or {}
        seen = next((by[s] for s in ("aclnn", "kernel", "shape") if by.get(s) is not None), None)
        if seen is None:
            # no evidence this interval (copies only, a pass too short to tell): as the
            # classifier says of undeclared work, what it showed before, else no phase. Never
            # decode for want of evidence: a role refused to its user would get decode's
            # priority through it.
            seen = self.classifier.seen(key)
            if seen is None:
                return {"observed_phase": "idle", "observed_source": "idle"}
        return {"observed_phase": seen.phase, "observed_source": seen.source}

    def _devices(self, entries: list[dict[str, Any]], dt_ns: int) -> list[dict[str, Any]]:
        by_dev: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for e in entries:
            if e["device"] is not None:
                by_dev[e["device"]].append(e)
        out = []
        for dev, es in sorted(by_dev.items()):
            pre = dec = 0.0
            for e in es:
                b = e["_busy_ns"]
                if e["phase"] in ("prefill", "decode", "mixed"):
                    pre += b * e["_prefill_share"]
                    dec += b * (1 - e["_prefill_share"])
            scale = min(1.0, dt_ns / (pre + dec)) if pre + dec > 0 else 1.0
            pre, dec = pre * scale / dt_ns, dec * scale / dt_ns
            mems = [e["counters"]["mem_bytes"] for e in es]
            out.append({
                "device": dev,
                "pids": sorted({e["pid"] for e in es}),
                "launches_per_s": _r(sum(e["rates"]["launches_per_s"] for e in es), 1),
                "h2d_Bps": sum(e["rates"]["h2d_Bps"] for e in es),
                "d2h_Bps": sum(e["rates"]["d2h_Bps"] for e in es),
                "d2d_Bps": sum(e["rates"]["d2d_Bps"] for e in es),
                "mem_bytes": None if any(m is None for m in mems) else sum(mems),
                "phase_occupancy": {"prefill": _r(pre, 4), "decode": _r(dec, 4),
                                    "idle": _r(max(0.0, 1 - pre - dec), 4)},
            })
        for e in entries:
            e.pop("_busy_ns")
            e.pop("_prefill_share")
        return out


def process_view(snap: dict[str, Any], pid: int) -> dict[str, Any] | None:
    """One process's entries summed over its devices (what `flexnpu attach` prints)."""
    es = [e for e in snap["processes"] if e["pid"] == pid]
    if not es:
        return None
    phases = {e["phase"] for e in es} - {"idle"}
    phase = "idle" if not phases else phases.pop() if len(phases) == 1 else "mixed"

    def total(get: Callable[[dict], Any]) -> Any:
        vals = [get(e) for e in es]
        return None if any(v is None for v in vals) else sum(vals)

    return {
        "pid": pid,
        "comm": es[0]["comm"],
        "role": es[0]["role"],
        "phase": phase,
        "devices": sorted(e["device"] for e in es if e["device"] is not None),
        "launches_per_s": total(lambda e: e["rates"]["launches_per_s"]),
        "h2d_Bps": total(lambda e: e["rates"]["h2d_Bps"]),
        "d2h_Bps": total(lambda e: e["rates"]["d2h_Bps"]),
        "d2d_Bps": total(lambda e: e["rates"]["d2d_Bps"]),
        "sync_wait": total(lambda e: e["rates"]["sync_wait"]),
        "mem_bytes": total(lambda e: e["counters"]["mem_bytes"]),
        "entries": es,
    }
