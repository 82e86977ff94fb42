"""Serving metrics as vLLM's serving benchmark (benchmarks/benchmark_serving.py) defines them.

Per request: TTFT = first token time - arrival (queueing included); E2E latency = last token
- arrival; TPOT = (E2E - TTFT) / (output tokens - 1), for requests with more than one token;
ITL = every gap between consecutive tokens. Over the run: duration from the first arrival to
the last token; output token throughput = output tokens / duration; request throughput =
completed requests / duration; goodput = requests meeting every SLO given / duration, and
SLO attainment = their share of the requests. Percentiles are linear interpolation (numpy's
default), as vLLM reports them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class RequestTiming:
    id: int
    arrival: float  # CLOCK_MONOTONIC seconds
    prompt_tokens: int
    output_tokens: int
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.arrival

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(xs: list[float]) -> dict[str, float]:
    return {"mean": sum(xs) / len(xs) if xs else math.nan, "p50": percentile(xs, 50),
            "p90": percentile(xs, 90), "p99": percentile(xs, 99)}


@dataclass(frozen=True)
class Slo:
    ttft_s: float | None = None
    tpot_s: float | None = None

    def met(self, r: RequestTiming) -> bool:
        if self.ttft_s is not None and r.ttft > self.ttft_s:
            return False
        tp = r.tpot
        return self.tpot_s is None or tp is None or tp <= self.tpot_s


def compute(reqs: list[RequestTiming], slo: Slo = Slo()) -> dict:
    """Metrics of completed requests (every one must have its tokens); times in seconds."""
    done = [r for r in reqs if r.token_times]
    if not done:
        return {"completed": 0}
    start = min(r.arrival for r in done)
    duration = max(r.token_times[-1] for r in done) - start
    out_tokens = sum(len(r.token_times) for r in done)
    good = sum(1 for r in done if slo.met(r))
    return {
        "completed": len(done),
        "duration_s": duration,
        "input_tokens": sum(r.prompt_tokens for r in done),
        "output_tokens": out_tokens,
        "request_throughput": len(done) / duration if duration > 0 else math.nan,
        "output_throughput": out_tokens / duration if duration > 0 else math.nan,
        "ttft_s": summary([r.ttft for r in done]),
        "tpot_s": summary([r.tpot for r in done if r.tpot is not None]),
        "itl_s": summary([x for r in done for x in r.itls]),
        "e2e_s": summary([r.e2e for r in done]),
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        "slo_attainment": good / len(done),
        "goodput": good / duration if duration > 0 else math.nan,
    }
