"""Phase classification: is a process in prefill, decode, idle or mixed, from what one
interval of its calls looked like.

An *iteration* is the work a process dispatches between two synchronisations: from the
first dispatching call after a sync to the return of the sync that waits for it. Serving
engines synchronise once per forward pass, so an iteration is a forward pass.

Rules (PhaseRules holds the thresholds):
  idle     nothing dispatched, no iteration ended and none open during the interval.
  role     a process given FLEXNPU_ROLE=prefill|decode (the shim's role) is in that phase
           whenever it is not idle: the operator knows better than any inference.
  mixed    both long and short iterations ended in the interval (span histogram), each
           holding at least `mixed_share` of the interval's iteration time.
  else     a vote of four features, each cast for prefill or decode:
             mean iteration span    >= long_iter_ms           -> prefill (a long pass)
             launches per iteration >= prefill_launches        -> prefill (a deep pass)
             H2D bytes per iteration >= prefill_h2d_bytes      -> prefill (prompts go up)
             iterations per second  <= decode_min_rate         -> prefill (decode is a
                                                                 steady, fast cadence)
           the majority wins; in a tie, the work a pass carries (launches and H2D) wins
           where those two agree, else the span.
An iteration still open at the end of the interval counts with the time it has run so
far, so a long prefill pass that dispatched everything in an earlier interval and now
waits is still prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

PHASES = ("prefill", "decode", "idle", "mixed")
SPAN_BUCKETS = 32  # FX_SPAN_BUCKETS in probes/observe.h: bucket b holds [2^b, 2^(b+1)) us


@dataclass(frozen=True)
class PhaseRules:
    long_iter_ms: float = 16.384  # 2^14 us: a bucket edge of the span histogram
    prefill_launches: float = 100.0
    prefill_h2d_bytes: float = 1 << 20
    decode_min_rate: float = 20.0  # iterations per second
    mixed_share: float = 0.2

    @property
    def long_bucket(self) -> int:
        """The first histogram bucket whose spans are all long."""
        us = self.long_iter_ms * 1000
        b = 0
        while (1 << b) < us and b < SPAN_BUCKETS:
            b += 1
        return b


@dataclass(frozen=True)
class IntervalFeatures:
    """What one process did on one device during one interval. Missing data is None."""

    dt_s: float
    dispatches: int  # calls that sent work to the device
    launches: int
    iterations: int  # iterations that ended in the interval
    iter_ns: int  # their spans
    h2d_bytes: int
    open_iter_ns: int = 0  # how long the iteration open at the end has run (0: none open)
    long_iter_ns: int | None = None  # of iter_ns, in iterations at least long_iter_ms long
    short_iter_ns: int | None = None
    long_iters: int | None = None
    short_iters: int | None = None


@dataclass(frozen=True)
class PhaseVerdict:
    phase: str
    source: str  # "role", "inferred" or "idle"
    prefill_share: float  # of the process's busy time, the part that was prefill (mixed splits)
    reason: str


class PhaseClassifier:
    def __init__(self, rules: PhaseRules | None = None) -> None:
        self.rules = rules or PhaseRules()

    def classify(self, f: IntervalFeatures, role: str | None = None) -> PhaseVerdict:
        r = self.rules
        if f.dispatches == 0 and f.iterations == 0 and f.open_iter_ns == 0:
            return PhaseVerdict("idle", "idle", 0.0, "no work dispatched or pending")
        if role in ("prefill", "decode"):
            return PhaseVerdict(role, "role", 1.0 if role == "prefill" else 0.0, f"FLEXNPU_ROLE={role}")
        long_ns, short_ns = f.long_iter_ns, f.short_iter_ns
        if (long_ns is not None and short_ns is not None and f.long_iters and f.short_iters
                and long_ns + short_ns > 0):
            share = long_ns / (long_ns + short_ns)
            if r.mixed_share <= share <= 1 - r.mixed_share:
                return PhaseVerdict("mixed", "inferred", share,
                                    f"{f.long_iters} long and {f.short_iters} short iterations")
        # an open iteration counts as one more, with the time it has run so far
        n = f.iterations + (1 if f.open_iter_ns else 0)
        span_ms = (f.iter_ns + f.open_iter_ns) / n / 1e6
        per_iter = max(n, 1)
        rate = f.iterations / f.dt_s if f.dt_s > 0 else 0.0
        votes = {
            "span": span_ms >= r.long_iter_ms,
            "launches": f.launches / per_iter >= r.prefill_launches,
            "h2d": f.h2d_bytes / per_iter >= r.prefill_h2d_bytes,
            "cadence": rate <= r.decode_min_rate,
        }
        pre = sum(votes.values())
        if pre == 2 and votes["launches"] == votes["h2d"]:
            # what a pass carries decides a tie: its span and cadence also stretch when
            # another process's work shares the device
            prefill = votes["launches"]
        else:
            prefill = pre > 2 or (pre == 2 and votes["span"])
        why = ", ".join(f"{k}:{'P' if v else 'D'}" for k, v in votes.items())
        why = f"span {span_ms:.1f} ms, {f.launches / per_iter:.0f} launches/iter, {rate:.0f} iter/s ({why})"
        return PhaseVerdict("prefill" if prefill else "decode", "inferred", 1.0 if prefill else 0.0, why)
