"""The reference workload end to end on the emulator: a few requests through a prefill and a
decode instance (two layers of Qwen2.5-7B, so a run takes seconds), checked against the
emulator's own accounting; chunked prefill; the KV cache limiting the batch; a hand-off
between two devices."""

import json

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


def test_same_device_handoff_maps_the_prefills_kv_and_copies_nothing(node):
    reqs = [Request(i, 0.01 * i, 200 + 50 * i, 12) for i in range(4)]
    res = driver.run(node, reqs, driver.Setup(model=MODEL, shim=False, prefill_kv_tokens=4096))
    assert res.problems == []
    kvb = model_by_name(MODEL).kv_bytes_per_token
    # the prefill's pool, exported once and mapped by the decode instance: nothing else
    assert res.handoff == {"prefill": {"exports": 1, "export_bytes": 4096 * kvb, "imports": 0, "import_bytes": 0},
                           "decode": {"exports": 0, "export_bytes": 0, "imports": 1, "import_bytes": 4096 * kvb}}
    for name in ("prefill", "decode"):
        (c,) = [c for d in res.status["devices"] for c in d["clients"] if c["pid"] == res.stats[name]["pid"]]
        assert c["ops"]["copy"] == 0 and sum(c["bytes_copied"].values()) == 0
    assert res.stats["decode"]["copied_bytes"] == 0
    # the check sees a copy where there must be none
    st = json.loads(json.dumps(res.status))
    (c,) = [c for d in st["devices"] for c in d["clients"] if c["pid"] == res.stats["decode"]["pid"]]
    c["bytes_copied"]["d2d"], c["ops"]["copy"] = 4096, 1
    timing = {t.id: t for t in res.requests}
    setup = driver.Setup(model=MODEL, shim=False, prefill_kv_tokens=4096)
    assert driver.check(res.stats, st, timing, setup, handoff=res.handoff) == [
        "decode: emulator copied 4096 bytes on a same-device hand-off (want 0)"]
    assert "want one each" in driver.check(res.stats, res.status, timing, setup, handoff=None)[0]


def test_prefill_holds_a_prompts_kv_until_decode_is_done_with_it(node):
    """With IPC the decode instance reads the prompt's KV in the prefill's pool until the
    request ends: the prefill's pool (two prompts here) refills only then."""
    reqs = [Request(i, 0.0, 100, 30) for i in range(3)]
    res = driver.run(node, reqs, driver.Setup(model=MODEL, shim=False, prefill_kv_tokens=200))
    assert res.problems == []
    first_done = min(res.requests[0].token_times[-1], res.requests[1].token_times[-1])
    assert res.requests[2].token_times[0] > first_done
    copied = driver.run(node, reqs, driver.Setup(model=MODEL, shim=False, prefill_kv_tokens=200, kv_ipc=False))
    assert copied.problems == []  # released once the decode instance has taken a request: early
    assert copied.requests[2].token_times[0] < min(copied.requests[0].token_times[-1],
                                                    copied.requests[1].token_times[-1])


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


@pytest.mark.parametrize("kv_ipc", [True, False])
def test_kv_cache_limits_the_batch(node, kv_ipc):
    reqs = [Request(i, 0.0, 100, 30) for i in range(5)]
    # the decode instance's pool holds each request's output; its prompt too unless the prompt's
    # KV stays where prefill wrote it (IPC)
    two = 2 * 30 if kv_ipc else 2 * (100 + 30)
    res = driver.run(node, reqs, driver.Setup(model=MODEL, decode_kv_tokens=two, shim=False, kv_ipc=kv_ipc))
    assert res.problems == [] and res.metrics["completed"] == 5
    assert max(res.decode_batches) == 2
    # the last requests waited for KV space: their first decode token comes late
    assert res.requests[4].token_times[1] - res.requests[4].token_times[0] > \
        res.requests[0].token_times[1] - res.requests[0].token_times[0]
    roomy = driver.run(node, reqs, driver.Setup(model=MODEL, shim=False, kv_ipc=kv_ipc))
    assert max(roomy.decode_batches) >= 4


@pytest.mark.parametrize("kv_ipc", [True, False])
def test_handoff_across_devices_copies_the_kv(kv_ipc):
    """From the prefill's own pool, imported with peer access (IPC), or from a window the
    decode instance holds on the prefill device."""
    reqs = [Request(0, 0.0, 1000, 4), Request(1, 0.0, 500, 3)]
    # serial mode: the pull then runs alone and its busy time is its modelled time. In the
    # default contexts mode it runs on its own stream beside the decode kernels and the
    # device's busy time is split between them (docs/emulator.md, "Busy accounting").
    with LocalNode(devices=2, mode="serial", observer=None, daemons=False) as n:
        res = driver.run(n, reqs, driver.Setup(model=MODEL, prefill_device=0, decode_device=1, shim=False,
                                               kv_ipc=kv_ipc))
        st = n.emulator_status()
    assert res.problems == []
    assert (res.handoff or {}).get("decode", {}).get("imports") == (1 if kv_ipc else None)
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
