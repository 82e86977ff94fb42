"""The reference workload end to end on the emulator: a few requests through a prefill and a
decode instance (two layers of Qwen2.5-7B, so a run takes seconds), checked against the
emulator's own accounting; chunked prefill; the KV cache limiting the batch; a hand-off
between two devices."""

import pytest

from flexnpu.bench.node import LocalNode
from flexnpu.emulator.profiles import PROFILES
from flexnpu.workload import driver
from flexnpu.workload.model import model_by_name
from flexnpu.workload.trace import Request, TraceSpec, generate

MODEL = "qwen2.5-7b:2"
OPS = ("kernels", "aclnn")  # the kernel path, and the default: aclnn operators (test_workload_aclnn.py)


def attention_calls(stats: dict, ops: str) -> tuple[int, int, int]:
    """Attention of whole prompts, of prompt chunks after cached tokens, and of decode batches,
    as the instance launched it: built-in kernels, or aclnn operators."""
    if ops == "kernels":
        k = stats["kernels"]
        return k.get("attention_prefill", 0), k.get("attention_prefill_chunk", 0), k.get("attention_decode", 0)
    o = stats["operators"]
    return (o.get("aclnnPromptFlashAttentionV3", 0), o.get("aclnnFusedInferAttentionScoreV2", 0),
            o.get("aclnnIncreFlashAttentionV4", 0))


@pytest.fixture
def node():
    with LocalNode(devices=1, observer=None, daemons=False) as n:
        yield n


@pytest.mark.parametrize("ops", OPS)
def test_pd_run_agrees_with_emulator(node, ops):
    reqs = generate(TraceSpec(n=5, rate=40, seed=3, fixed_prompt=0))
    reqs = [Request(r.id, r.arrival_s, r.prompt_tokens, min(r.output_tokens, 40)) for r in reqs]
    res = driver.run(node, reqs, driver.Setup(model=MODEL, shim=False, ops=ops))
    assert res.problems == []
    m = res.metrics
    assert m["completed"] == 5 and m["output_tokens"] == sum(r.output_tokens for r in reqs)
    for t in res.requests:
        assert len(t.token_times) == t.output_tokens and t.ttft > 0
        assert t.token_times == sorted(t.token_times)
    dec = res.stats["decode"]
    assert dec["tokens"] == sum(r.output_tokens - 1 for r in reqs)
    assert attention_calls(res.stats["prefill"], ops) == (2 * 5, 0, 0)  # two layers, one per prompt
    assert attention_calls(dec, ops) == (0, 0, 2 * dec["steps"])
    assert m["tpot_s"]["p50"] > 0 and 0 < m["slo_attainment"] <= 1


@pytest.mark.parametrize("ops", OPS)
def test_chunked_prefill_mixes_decode(node, ops):
    reqs = [Request(0, 0.0, 300, 20), Request(1, 0.01, 200, 5)]
    res = driver.run(node, reqs, driver.Setup(model=MODEL, mixed=True, chunk_tokens=64, shim=False, ops=ops))
    assert res.problems == []
    whole, chunks, decode = attention_calls(res.stats["prefill"], ops)
    assert whole == 2 * 2  # each prompt's first chunk
    assert chunks >= 2 * (4 + 3)  # 300 -> 5+ chunks of <= 64, 200 -> 4+
    # some step held both a prompt chunk and decode tokens: more attention launches than steps
    assert (whole + chunks + decode) // 2 > res.stats["prefill"]["steps"]
    assert res.metrics["output_tokens"] == 25


def test_kv_cache_limits_the_batch(node):
    reqs = [Request(i, 0.0, 100, 30) for i in range(5)]
    two = 2 * (100 + 30)
    res = driver.run(node, reqs, driver.Setup(model=MODEL, decode_kv_tokens=two, shim=False))
    assert res.problems == [] and res.metrics["completed"] == 5
    assert max(res.decode_batches) == 2
    # the last requests waited for KV space: their first decode token comes late
    assert res.requests[4].token_times[1] - res.requests[4].token_times[0] > \
        res.requests[0].token_times[1] - res.requests[0].token_times[0]
    roomy = driver.run(node, reqs, driver.Setup(model=MODEL, shim=False))
    assert max(roomy.decode_batches) >= 4


def test_handoff_across_devices_copies_the_kv():
    reqs = [Request(0, 0.0, 1000, 4), Request(1, 0.0, 500, 3)]
    with LocalNode(devices=2, observer=None, daemons=False) as n:
        res = driver.run(n, reqs, driver.Setup(model=MODEL, prefill_device=0, decode_device=1, shim=False))
        st = n.emulator_status()
    assert res.problems == []
    kvb = model_by_name(MODEL).kv_bytes_per_token
    assert res.stats["decode"]["copied_bytes"] == 1500 * kvb
    client = next(c for c in st["devices"][1]["clients"] if c["pid"] == res.stats["decode"]["pid"])
    copy_ns = client["busy_by_name"]["memcpy_inter_d2d"]
    assert copy_ns == pytest.approx(1500 * kvb / (PROFILES["910b"].p2p_gbps * 1e9) * 1e9, rel=0.02)


def test_kv_pull_does_not_stall_the_decode_loop():
    """A cross-device pull runs on the decode instance's transfer thread: a request already
    decoding keeps its pace while long prompts' KV is pulled (the emulator moves the bytes with
    the host's CPU, 8-25 ms for each 32 MiB here, far longer than a two-layer decode step)."""
    long_prompt = 8192  # 32 MiB of KV each at two layers
    reqs = [Request(0, 0.0, 16, 400)] + [Request(i, 0.3, long_prompt, 2) for i in range(1, 5)]
    with LocalNode(devices=2, observer=None, daemons=False) as n:
        res = driver.run(n, reqs, driver.Setup(model=MODEL, prefill_device=0, decode_device=1, shim=False))
    assert res.problems == []
    a, bs = res.requests[0], res.requests[1:]
    handoff = sorted(b.token_times[1] - b.token_times[0] for b in bs)  # first token -> pulled and decoded
    span = (min(b.token_times[0] for b in bs), max(b.token_times[1] for b in bs))
    gaps = [t1 - t0 for t0, t1 in zip(a.token_times, a.token_times[1:]) if span[0] <= t0 and t1 <= span[1]]
    assert len(gaps) >= 4, (gaps, span)  # request 0 was decoding through the pulls
    # inline in the decode loop, a pull stalled every step by its whole copy: request 0's
    # slowest token would be about as slow as a hand-off
    assert max(gaps) < 0.5 * handoff[len(handoff) // 2], (max(gaps), handoff)


def test_a_request_that_can_never_be_served_is_refused_at_once():
    """Rather than waiting for a KV reservation that cannot come (a hang until the timeout)."""
    with pytest.raises(ValueError, match="need more than qwen2.5-7b:2's 32768-token context"):
        driver.too_long([Request(0, 0.0, 100, 10), Request(1, 0.0, 32000, 1000)], driver.Setup(model=MODEL))
    with pytest.raises(ValueError, match="larger than the prefill instance's KV pool"):
        driver.too_long([Request(0, 0.0, 5000, 10)], driver.Setup(model=MODEL, prefill_kv_tokens=4096))
    driver.too_long([Request(0, 0.0, 32000, 768)], driver.Setup(model=MODEL))  # the whole context: fine
