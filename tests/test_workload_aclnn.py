"""The reference workload with its step as CANN aclnn operator calls (`--ops aclnn`,
`--ops aclnn-fia`) on the emulator's real libopapi.so: the same modelled time per step as the
kernel path, the emulator's accounting agreeing with what the instances say they launched,
and the observer learning each instance's phase from the operators it calls."""

from __future__ import annotations

import pytest

from flexnpu.bench.node import LocalNode
from flexnpu.bench.phasecheck import PhaseCheck
from flexnpu.workload import driver
from flexnpu.workload.model import model_by_name
from flexnpu.workload.trace import Request
from test_observe_fixtures import NEEDS_BPF

MODEL = "qwen2.5-7b:2"
LAYERS = model_by_name(MODEL).layers
REQS = [Request(0, 0.0, 300, 12), Request(1, 0.02, 120, 20), Request(2, 0.04, 700, 6)]


def device_busy(res: driver.Result) -> dict[str, float]:
    """The emulator's busy time of each instance's kernels (copies left out), by role."""
    by_pid = {c["pid"]: c for d in res.status["devices"] for c in d["clients"]}
    return {role: sum(v for k, v in by_pid[st["pid"]]["busy_by_name"].items() if not k.startswith(driver.COPY_NAMES))
            for role, st in res.stats.items()}


@pytest.fixture(scope="module")
def node():
    with LocalNode(devices=1, observer=None, daemons=False) as n:
        yield n


def assert_modelled_time(res: driver.Result) -> None:
    """The emulator's busy time of each instance is the time the kernel path's formulas give
    for the steps it ran (model.step_seconds, which the instance sums), within 1%."""
    busy = device_busy(res)
    for role, st in res.stats.items():
        assert busy[role] == pytest.approx(st["modelled_s"] * 1e9, rel=0.01), role


@pytest.mark.parametrize("ops", ["aclnn", "aclnn-fia"])
def test_aclnn_steps_take_the_kernel_steps_time(node, ops) -> None:
    base = driver.run(node, REQS, driver.Setup(model=MODEL, shim=False, ops="kernels"))
    nn = driver.run(node, REQS, driver.Setup(model=MODEL, shim=False, ops=ops))
    # counts by kernel name, bytes, tokens and busy time against the modelled time: as on the kernel path
    assert base.problems == [] and nn.problems == []
    assert_modelled_time(base)
    assert_modelled_time(nn)
    # each prompt's prefill has the same cost either way, whatever the batching
    assert device_busy(nn)["prefill"] == pytest.approx(device_busy(base)["prefill"], rel=0.01)
    pre, dec = nn.stats["prefill"], nn.stats["decode"]
    assert pre["ops"] == dec["ops"] == ops
    attn_p = "aclnnFusedInferAttentionScoreV2" if ops == "aclnn-fia" else "aclnnPromptFlashAttentionV3"
    attn_d = "aclnnFusedInferAttentionScoreV2" if ops == "aclnn-fia" else "aclnnIncreFlashAttentionV4"
    assert pre["operators"][attn_p] == LAYERS * len(REQS)
    assert dec["operators"][attn_d] == LAYERS * dec["steps"]
    assert pre["kernels"]["PromptFlashAttention"] == LAYERS * len(REQS)
    assert dec["kernels"]["IncreFlashAttention"] == LAYERS * dec["steps"]
    # every projection is a Matmul: QKV, O, gate-up, down per layer, and the LM head
    assert dec["operators"]["aclnnMatmul"] == (4 * LAYERS + 1) * dec["steps"]
    assert nn.metrics["output_tokens"] == base.metrics["output_tokens"] == sum(r.output_tokens for r in REQS)


def test_chunked_prefill_on_aclnn(node) -> None:
    """A chunk after cached tokens is FusedInferAttentionScore (its query attends past itself);
    a prompt's first chunk PromptFlashAttention, the decode batch IncreFlashAttention."""
    reqs = [Request(0, 0.0, 300, 20), Request(1, 0.01, 200, 5)]
    nn = driver.run(node, reqs, driver.Setup(model=MODEL, mixed=True, chunk_tokens=64, shim=False, ops="aclnn"))
    assert nn.problems == []
    assert_modelled_time(nn)
    st = nn.stats["prefill"]
    ops, k = st["operators"], st["kernels"]
    assert ops["aclnnPromptFlashAttentionV3"] == LAYERS * 2  # each prompt's first chunk
    assert ops["aclnnFusedInferAttentionScoreV2"] >= LAYERS * (4 + 3)  # 300 -> 5+ chunks of <= 64, 200 -> 4+
    assert k["PromptFlashAttention"] == ops["aclnnPromptFlashAttentionV3"] + ops["aclnnFusedInferAttentionScoreV2"]
    assert k["IncreFlashAttention"] == ops["aclnnIncreFlashAttentionV4"] > 0
    assert nn.metrics["output_tokens"] == 25


def needs_bpf(f):
    for mark in NEEDS_BPF:
        f = mark(f)
    return f


@needs_bpf
@pytest.mark.parametrize("ops,source", [("aclnn", "aclnn"), ("aclnn-fia", "kernel")])
def test_the_observer_learns_each_instances_phase_from_its_operators(ops, source) -> None:
    """No FLEXNPU_ROLE (no shim): the observer finds the real libopapi.so in each instance's
    maps and classes its work by the attention operators it calls (aclnn), or, where the
    fused operator names no phase, by the kernels it launches (PromptFlashAttention /
    IncreFlashAttention). The observer looks for newly mapped libraries every second, so
    the trace runs for about five."""
    reqs = [Request(i, 0.25 * i, 600, 120) for i in range(20)]
    with LocalNode(devices=1, observer="bpf", daemons=False) as node:
        checker = PhaseCheck(node.rdir).start()
        try:
            res = driver.run(node, reqs, driver.Setup(model="qwen2.5-7b:8", shim=False, ops=ops))
        finally:
            got = checker.stop()
    assert res.problems == []
    roles = {res.stats[r]["pid"]: r for r in ("prefill", "decode")}
    score = PhaseCheck.score(got, roles)
    assert score["error"] is None and score["intervals"] >= 10, score
    busy = {s: n for s, n in score["phase_sources"].items() if s not in ("idle", "absent")}
    assert busy and max(busy, key=busy.get) == source, score
    assert score["accuracy"] >= 0.85, score
