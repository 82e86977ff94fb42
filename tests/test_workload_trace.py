"""Trace generator (seeded, distributions) and the Azure CSV loader (good files; malformed
lines get their line number and reason in one line)."""

import math
import statistics

import pytest

from flexnpu.workload.trace import TraceError, TraceSpec, generate, load_azure_csv


def test_seeded_and_reproducible():
    a, b = generate(TraceSpec(n=50, rate=3, seed=7)), generate(TraceSpec(n=50, rate=3, seed=7))
    assert a == b
    assert a != generate(TraceSpec(n=50, rate=3, seed=8))
    assert a[0].arrival_s == 0.0 and all(x.arrival_s <= y.arrival_s for x, y in zip(a, a[1:]))


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrivals_follow_rate_and_burstiness(burstiness):
    reqs = generate(TraceSpec(n=4001, rate=5.0, burstiness=burstiness, seed=1))
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(reqs, reqs[1:])]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / 5.0, rel=0.08)
    # gamma with shape k: coefficient of variation 1/sqrt(k) (Poisson: 1)
    assert statistics.pstdev(gaps) / mean == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)


def test_sharegpt_like_lengths():
    reqs = generate(TraceSpec(n=4000, seed=2))
    prompts, outs = [r.prompt_tokens for r in reqs], [r.output_tokens for r in reqs]
    assert statistics.median(prompts) == pytest.approx(170, rel=0.1)
    assert statistics.median(outs) == pytest.approx(150, rel=0.1)
    assert min(prompts) >= 4 and max(prompts) <= 4096 and min(outs) >= 1 and max(outs) <= 2048
    fixed = generate(TraceSpec(n=3, fixed_prompt=32, fixed_output=128))
    assert {(r.prompt_tokens, r.output_tokens) for r in fixed} == {(32, 128)}


def test_azure_datetime_and_seconds(tmp_path):
    f = tmp_path / "code.csv"
    f.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:15:46.6805900,4808,10\n"
                 "2023-11-16 18:15:50.9951690,3180,8\n\n"
                 "2023-11-16 18:15:51.0000000,110,0\n")
    r = load_azure_csv(f)
    assert [(x.prompt_tokens, x.output_tokens) for x in r] == [(4808, 10), (3180, 8), (110, 1)]
    assert r[0].arrival_s == 0.0 and r[1].arrival_s == pytest.approx(4.314579, abs=1e-6)
    g = tmp_path / "s.csv"
    g.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n100.5,10,2\n101.0,20,3\n")
    assert [x.arrival_s for x in load_azure_csv(g)] == [0.0, 0.5]
    assert len(load_azure_csv(f, limit=2)) == 2


@pytest.mark.parametrize("body, line, reason", [
    ("1.0,10,2\nabc,10,2\n", 3, "TIMESTAMP 'abc'"),
    ("1.0,10,2\n2.0,10\n", 3, "expected 3 fields"),
    ("1.0,10,x\n", 2, "integers"),
    ("1.0,0,2\n", 2, "ContextTokens must be >= 1"),
    ("2.0,10,2\n1.0,10,2\n", 3, "back in time"),
])
def test_azure_malformed_lines(tmp_path, body, line, reason):
    f = tmp_path / "bad.csv"
    f.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + body)
    with pytest.raises(TraceError) as e:
        load_azure_csv(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}:{line}: ") and reason in msg and "\n" not in msg


def test_azure_bad_header_and_missing_file(tmp_path):
    f = tmp_path / "h.csv"
    f.write_text("time,in,out\n1,2,3\n")
    with pytest.raises(TraceError, match=r":1: header must be"):
        load_azure_csv(f)
    with pytest.raises(TraceError, match="cannot read"):
        load_azure_csv(tmp_path / "missing.csv")
