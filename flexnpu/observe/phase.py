"""Phase classification: is a process in prefill, decode, idle or mixed, from what one
interval of its calls looked like.

An *iteration* is the work a process dispatches between two synchronisations: from the
first dispatching call after a sync to the return of the sync that waits for it. Serving
engines synchronise once per forward pass, so an iteration is a forward pass.

Each iteration is classed when it ends (in the BPF program, with these rules passed as
-D flags): prefill-like when at least two of
    its span                  >= long_iter_ms        (a long pass)
    its kernel launches       >= prefill_launches    (a deep pass)
    its H2D bytes             >= prefill_h2d_bytes   (prompts go up; a decode step
                                                      sends a token's worth)
hold, else decode-like. Launches and H2D bytes are what the pass carries; its span also
stretches when another process's work holds the device, so it never decides alone.

An interval is then
  idle     nothing dispatched, no iteration ended and none open;
  <role>   for a process given FLEXNPU_ROLE=prefill|decode (the shim's role), whenever
           it is not idle: the operator knows better than any inference;
  mixed    when prefill-like and decode-like iterations each hold at least mixed_share
           of the interval's iteration time;
  else     the class holding most of that time.
The iteration open at the end of the interval counts with what it has done so far, so a
long prefill pass that dispatched everything earlier and now waits is still prefill.

Where only interval totals are known (the shim's counters: no per-iteration classes), the
same three features are taken per iteration on average, with a fourth, the cadence
(iterations per second <= decode_min_rate votes prefill: decode is a steady fast beat);
the majority wins, a tie goes to launches and H2D where they agree, else to the span.
"""

from __future__ import annotations

from dataclasses import dataclass

PHASES = ("prefill", "decode", "idle", "mixed")


@dataclass(frozen=True)
class PhaseRules:
    long_iter_ms: float = 16.0
    prefill_launches: int = 100
    prefill_h2d_bytes: int = 1 << 20
    decode_min_rate: float = 20.0  # iterations per second (interval totals only)
    mixed_share: float = 0.2

    def cflags(self) -> list[str]:
        """The per-iteration rule, for the BPF program."""
        return [f"-DFX_LONG_ITER_NS={int(self.long_iter_ms * 1e6)}ULL",
                f"-DFX_PREFILL_LAUNCHES={int(self.prefill_launches)}",
                f"-DFX_PREFILL_H2D={int(self.prefill_h2d_bytes)}ULL"]


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
    open_launches: int = 0  # what it has dispatched so far
    open_h2d_bytes: int = 0
    prefill_iters: int | None = None  # of the iterations that ended, the prefill-like ones
    prefill_ns: int | None = None
    decode_iters: int | None = None
    decode_ns: int | None = None


@dataclass(frozen=True)
class PhaseVerdict:
    phase: str
    source: str  # "role", "inferred" or "idle"
    prefill_share: float  # of the process's busy time, the part that was prefill
    reason: str


class PhaseClassifier:
    def __init__(self, rules: PhaseRules | None = None) -> None:
        self.rules = rules or PhaseRules()

    def iteration_is_prefill(self, span_ns: float, launches: float, h2d_bytes: float) -> bool:
        """The per-iteration rule (the BPF program applies the same one)."""
        r = self.rules
        return (span_ns >= r.long_iter_ms * 1e6) + (launches >= r.prefill_launches) + \
            (h2d_bytes >= r.prefill_h2d_bytes) >= 2

    def classify(self, f: IntervalFeatures, role: str | None = None) -> PhaseVerdict:
        if f.dispatches == 0 and f.iterations == 0 and f.open_iter_ns == 0:
            return PhaseVerdict("idle", "idle", 0.0, "no work dispatched or pending")
        if role in ("prefill", "decode"):
            return PhaseVerdict(role, "role", 1.0 if role == "prefill" else 0.0, f"FLEXNPU_ROLE={role}")
        if f.prefill_ns is not None and f.decode_ns is not None:
            v = self._by_iterations(f)
            if v is not None:
                return v
        return self._by_totals(f)

    def _by_iterations(self, f: IntervalFeatures) -> PhaseVerdict | None:
        r = self.rules
        p_ns, d_ns = float(f.prefill_ns or 0), float(f.decode_ns or 0)
        p_n, d_n = f.prefill_iters or 0, f.decode_iters or 0
        if f.open_iter_ns:
            open_ns = min(f.open_iter_ns, f.dt_s * 1e9)
            if self.iteration_is_prefill(f.open_iter_ns, f.open_launches, f.open_h2d_bytes):
                p_ns, p_n = p_ns + open_ns, p_n + 1
            else:
                d_ns, d_n = d_ns + open_ns, d_n + 1
        if p_ns + d_ns <= 0:
            return None
        share = p_ns / (p_ns + d_ns)
        why = f"{p_n} prefill-like and {d_n} decode-like iterations, {share:.0%} of their time prefill"
        if p_n and d_n and r.mixed_share <= share <= 1 - r.mixed_share:
            return PhaseVerdict("mixed", "inferred", share, why)
        return PhaseVerdict("prefill" if share > 0.5 else "decode", "inferred", share, why)

    def _by_totals(self, f: IntervalFeatures) -> PhaseVerdict:
        r = self.rules
        n = f.iterations + (1 if f.open_iter_ns else 0)
        per_iter = max(n, 1)
        span_ms = (f.iter_ns + f.open_iter_ns) / per_iter / 1e6
        rate = f.iterations / f.dt_s if f.dt_s > 0 else 0.0
        votes = {
            "span": span_ms >= r.long_iter_ms,
            "launches": f.launches / per_iter >= r.prefill_launches,
            "h2d": f.h2d_bytes / per_iter >= r.prefill_h2d_bytes,
            "cadence": rate <= r.decode_min_rate,
        }
        pre = sum(votes.values())
        if pre == 2 and votes["launches"] == votes["h2d"]:
            prefill = votes["launches"]
        else:
            prefill = pre > 2 or (pre == 2 and votes["span"])
        why = ", ".join(f"{k}:{'P' if v else 'D'}" for k, v in votes.items())
        why = f"span {span_ms:.1f} ms, {f.launches / per_iter:.0f} launches/iter, {rate:.0f} iter/s ({why})"
        return PhaseVerdict("prefill" if prefill else "decode", "inferred", 1.0 if prefill else 0.0, why)
