"""Request traces: a seeded generator and a loader for Azure LLM inference trace CSVs.

Generator. Arrivals: gamma-distributed inter-arrival times with mean 1/rate and shape
`burstiness` (vLLM's serving benchmark uses the same definition: 1 is a Poisson process,
below 1 burstier, above 1 more regular). Lengths: "ShareGPT-like", log-normal prompt and
output lengths, clipped. Defaults: prompt median 170 tokens, sigma 1.0 (mean ~280), clipped to
[4, 4096]; output median 150, sigma 0.9 (mean ~225), clipped to [1, 2048]. ShareGPT's prompt
and reply lengths are heavy-tailed and right-skewed, which a log-normal captures; the medians
are of the order of the ShareGPT subsets used by serving benchmarks (docs/bench.md says where
from, and that they are an assumption, not a fit).

Loader. The Azure LLM inference traces (AzurePublicDataset, 2023 and 2024) are CSVs with
the header `TIMESTAMP,ContextTokens,GeneratedTokens`; TIMESTAMP is a datetime string
("2023-11-16 18:15:46.6805900", seven fractional digits) in the public files, or plain
seconds. Arrival times are made relative to the first request.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True)
class Request:
    id: int
    arrival_s: float  # since the trace's start
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class LengthDist:
    median: float
    sigma: float
    lo: int
    hi: int

    def sample(self, rng: random.Random) -> int:
        return int(min(self.hi, max(self.lo, round(rng.lognormvariate(math.log(self.median), self.sigma)))))


SHAREGPT_PROMPT = LengthDist(170, 1.0, 4, 4096)
SHAREGPT_OUTPUT = LengthDist(150, 0.9, 1, 2048)


@dataclass(frozen=True)
class TraceSpec:
    n: int = 100
    rate: float = 1.0  # requests per second
    burstiness: float = 1.0  # gamma shape; 1 = Poisson
    seed: int = 0
    prompt: LengthDist = SHAREGPT_PROMPT
    output: LengthDist = SHAREGPT_OUTPUT
    fixed_prompt: int = 0  # > 0: every prompt this long (latency tests)
    fixed_output: int = 0

    def describe(self) -> dict:
        return {"n": self.n, "rate": self.rate, "burstiness": self.burstiness, "seed": self.seed,
                "prompt": self.fixed_prompt or vars(self.prompt), "output": self.fixed_output or vars(self.output)}


def generate(spec: TraceSpec) -> list[Request]:
    if spec.n < 0 or not spec.rate > 0 or not spec.burstiness > 0:
        raise ValueError("n must be >= 0, rate and burstiness > 0")
    rng = random.Random(spec.seed)
    t, out = 0.0, []
    theta = 1.0 / (spec.rate * spec.burstiness)
    for i in range(spec.n):
        if i:
            t += rng.gammavariate(spec.burstiness, theta)
        p = spec.fixed_prompt or spec.prompt.sample(rng)
        o = spec.fixed_output or spec.output.sample(rng)
        out.append(Request(i, t, p, o))
    return out


class TraceError(ValueError):
    """A malformed trace file: str() is one line with the file, line number and reason."""


def _seconds(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        pass
    s = s.strip()
    if "." in s:  # the public traces carry 7 fractional digits; datetime takes 6
        head, frac = s.rsplit(".", 1)
        s = f"{head}.{(frac + '000000')[:6]}" if frac.isdigit() else s
    return datetime.fromisoformat(s).timestamp()


def load_azure_csv(path: str | Path, limit: int | None = None) -> list[Request]:
    path = Path(path)
    try:
        f = path.open(newline="")
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror}") from None
    with f:
        rows = csv.reader(f)
        header = next(rows, None)
        want = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
        if header is None or [h.strip() for h in header[:3]] != want:
            raise TraceError(f"{path}:1: header must be {','.join(want)}, got {','.join(header or []) or 'nothing'}")
        reqs: list[tuple[float, int, int]] = []
        for row in rows:
            ln = rows.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < 3:
                raise TraceError(f"{path}:{ln}: expected 3 fields, got {len(row)}")
            try:
                t = _seconds(row[0])
            except ValueError:
                raise TraceError(f"{path}:{ln}: TIMESTAMP {row[0]!r} is neither seconds nor a datetime") from None
            try:
                p, o = int(row[1]), int(row[2])
            except ValueError:
                raise TraceError(f"{path}:{ln}: token counts must be integers, got {row[1]!r}, {row[2]!r}") from None
            if p < 1 or o < 0:
                raise TraceError(f"{path}:{ln}: ContextTokens must be >= 1 and GeneratedTokens >= 0")
            if reqs and t < reqs[-1][0]:
                raise TraceError(f"{path}:{ln}: TIMESTAMP goes back in time")
            reqs.append((t, p, o))
            if limit and len(reqs) >= limit:
                break
    t0 = reqs[0][0] if reqs else 0.0
    # a request that generates nothing still gets its first token from the prefill
    return [Request(i, t - t0, p, max(o, 1)) for i, (t, p, o) in enumerate(reqs)]
