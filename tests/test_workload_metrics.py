"""Serving metrics (flexnpu/workload/metrics.py) on hand-made timelines, against vLLM's
definitions: TTFT includes queueing, TPOT = (e2e - ttft) / (tokens - 1), ITL every gap."""

import math

import pytest

from flexnpu.workload.metrics import RequestTiming, Slo, compute, percentile


def timelines() -> list[RequestTiming]:
    return [
        RequestTiming(0, arrival=10.0, prompt_tokens=100, output_tokens=4, token_times=[10.5, 10.6, 10.7, 11.0]),
        RequestTiming(1, arrival=10.2, prompt_tokens=50, output_tokens=1, token_times=[10.4]),
        RequestTiming(2, arrival=11.0, prompt_tokens=10, output_tokens=3, token_times=[12.0, 12.2, 12.4]),
    ]


def test_per_request_definitions():
    a, b, c = timelines()
    assert a.ttft == pytest.approx(0.5) and a.e2e == pytest.approx(1.0)
    assert a.tpot == pytest.approx((1.0 - 0.5) / 3)
    assert a.itls == pytest.approx([0.1, 0.1, 0.3])
    assert b.tpot is None and b.itls == []
    assert c.ttft == pytest.approx(1.0) and c.tpot == pytest.approx(0.2)


def test_run_metrics():
    m = compute(timelines())
    assert m["completed"] == 3 and m["output_tokens"] == 8 and m["input_tokens"] == 160
    assert m["duration_s"] == pytest.approx(12.4 - 10.0)
    assert m["output_throughput"] == pytest.approx(8 / 2.4)
    assert m["request_throughput"] == pytest.approx(3 / 2.4)
    assert m["ttft_s"]["mean"] == pytest.approx((0.5 + 0.2 + 1.0) / 3)
    assert m["ttft_s"]["p50"] == pytest.approx(0.5)
    # TPOT over requests with > 1 token only: 1/6 and 0.2
    assert m["tpot_s"]["mean"] == pytest.approx((1 / 6 + 0.2) / 2)
    # ITL pools every gap: 0.1, 0.1, 0.3, 0.2, 0.2
    assert m["itl_s"]["p50"] == pytest.approx(0.2)
    assert m["itl_s"]["p99"] == pytest.approx(percentile([0.1, 0.1, 0.3, 0.2, 0.2], 99))


def test_percentile_interpolates_like_numpy():
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(xs, 90) == pytest.approx(3.7)
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert math.isnan(percentile([], 50))


def test_slo_attainment_and_goodput():
    # TTFT <= 0.6 s: requests 0 and 1; TPOT <= 0.18: request 0 (1/6), 1 has no TPOT
    m = compute(timelines(), Slo(ttft_s=0.6, tpot_s=0.18))
    assert m["slo_attainment"] == pytest.approx(2 / 3)
    assert m["goodput"] == pytest.approx(2 / 2.4)
    assert compute(timelines(), Slo(tpot_s=0.1))["slo_attainment"] == pytest.approx(1 / 3)
    assert compute(timelines())["slo_attainment"] == 1.0
