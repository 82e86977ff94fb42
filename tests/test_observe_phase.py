"""PhaseClassifier's rules, and snapshot building from counters (no BPF needed: the
counters are what struct fx_stats holds, written by hand)."""

from __future__ import annotations

import math

import pytest

from flexnpu.observe.phase import IntervalFeatures, NamedWork, PhaseClassifier, Shape, classify_name
from flexnpu.observe.render import HEADER, idle_line, process_line
from flexnpu.observe.snapshot import ProcessInfo, SnapshotBuilder, process_view, resolve_devices
from flexnpu.runtimes import Direction, Op

MS = 1_000_000
C = PhaseClassifier()


def feats(**kw) -> IntervalFeatures:
    base = dict(dt_s=0.1, dispatches=0, launches=0, iterations=0, iter_ns=0, h2d_bytes=0)
    return IntervalFeatures(**{**base, **kw})


def test_nothing_dispatched_is_idle_whatever_the_role() -> None:
    v = C.classify(feats())
    assert (v.phase, v.source, v.prefill_share) == ("idle", "idle", 0.0)
    assert C.classify(feats(), role="prefill").phase == "idle"


def named(p=0, d=0, both=0, p_ns=0, d_ns=0, both_ns=0, mix=(0, 0), calls=None, open_calls=(0, 0, 0),
          prev_open=(0, 0, 0)) -> NamedWork:
    return NamedWork(iters=(0, p, d, both), ns=(0, p_ns, d_ns, both_ns), mix=mix,
                     calls=calls if calls is not None else (0, 0, 0), open_calls=open_calls,
                     prev_open_calls=prev_open)


def shapes(*pts) -> tuple[Shape, ...]:
    """(iters, span_ms, launches per iteration[, contended]) -> histogram entries"""
    out = []
    for n, ms, launches, *cont in pts:
        bucket = (1 + int(2 * math.log2(ms * 1000)), 1 + int(2 * math.log2(launches)), int(bool(cont and cont[0])))
        out.append(Shape(bucket, n, int(n * ms * MS), n * launches))
    return tuple(out)


@pytest.mark.parametrize("name,cls", [
    ("PromptFlashAttention_bf16_tiling3", "prefill"), ("prompt_flash_attention", "prefill"),
    ("aclnnPromptFlashAttentionV3", "prefill"), ("FlashAttentionScore", "prefill"),
    ("attention_prefill", "prefill"), ("context_attention_fwd", "prefill"),
    ("IncreFlashAttention_fp16", "decode"), ("aclnnIncreFlashAttentionV4", "decode"),
    ("paged_attention_v1", "decode"), ("PagedAttention", "decode"), ("attention_decode", "decode"),
    ("aclnnFusedInferAttentionScoreV2", "either"), ("fused_infer_attention_score", "either"),
    ("gemm", None), ("k_attn_p", None), ("prefill_layer", None), ("elementwise", None), ("", None),
])
def test_name_table(name: str, cls: str | None) -> None:
    assert classify_name(name) == cls


def test_role_takes_precedence_over_every_signal() -> None:
    f = feats(dispatches=900, launches=800, iterations=20, iter_ns=70 * MS,
              kernel=named(d=20, d_ns=70 * MS, calls=(0, 520, 0)), shapes=shapes((20, 3.5, 40)))
    c = PhaseClassifier()
    assert (c.classify(f, key=1).phase, c.classify(f, key=1).source) == ("decode", "kernel")
    v = c.classify(f, role="prefill", key=1)
    assert (v.phase, v.source, v.prefill_share) == ("prefill", "role", 1.0)


def test_aclnn_then_kernel_then_shape() -> None:
    c = PhaseClassifier()
    both = feats(dispatches=80, launches=78, iterations=1, iter_ns=90 * MS,
                 aclnn=named(p=1, p_ns=90 * MS, calls=(26, 0, 0)), kernel=named(d=1, d_ns=90 * MS, calls=(0, 26, 0)),
                 shapes=shapes((1, 90, 78)))
    v = c.classify(both, key=1)
    assert (v.phase, v.source) == ("prefill", "aclnn")
    assert c.last[1]["kernel"].phase == "decode" and c.last[1]["shape"].phase == "prefill"
    no_names = feats(dispatches=80, launches=78, iterations=1, iter_ns=90 * MS, shapes=shapes((1, 90, 78)))
    assert c.classify(no_names, key=2).source == "shape"


def test_fused_attention_names_no_phase() -> None:
    """aclnnFusedInferAttentionScore serves both phases: the next signal decides."""
    c = PhaseClassifier()
    f = feats(dispatches=80, launches=78, iterations=1, iter_ns=4 * MS,
              aclnn=NamedWork((1, 0, 0, 0), (4 * MS, 0, 0, 0), (0, 0), (0, 0, 26)),
              shapes=shapes((1, 4, 78)))
    v = c.classify(f, key=1)
    assert c.last[1]["aclnn"] is None and (v.phase, v.source) == ("decode", "shape")


def test_chunked_prefill_is_mixed_with_its_share() -> None:
    """Pure decode steps teach the cost of a decode-attention call; a mixed step's decode
    part is that many calls' worth, the rest is its prefill chunk."""
    c = PhaseClassifier()
    # 10 ms: pure decode steps, 26 decode calls each, 4 ms a step
    warm = feats(dispatches=800, launches=780, iterations=10, iter_ns=40 * MS,
                 kernel=named(d=10, d_ns=40 * MS, calls=(0, 260, 0)))
    assert c.classify(warm, key=7).phase == "decode"
    # then: 2 chunked steps of 30 ms (26 prefill + 26 decode calls each) and 3 decode steps
    f = feats(dispatches=400, launches=380, iterations=5, iter_ns=72 * MS,
              kernel=named(d=3, d_ns=12 * MS, both=2, both_ns=60 * MS, mix=(52, 52), calls=(52, 130, 0)))
    v = c.classify(f, key=7)
    # decode: 12 ms + 52 calls x (4 ms / 26) = 8 ms; prefill: 60 - 8 = 52 ms of 72
    assert (v.phase, v.source) == ("mixed", "kernel")
    assert v.prefill_share == pytest.approx(52 / 72, abs=0.01)
    # with no pure step to learn from, the calls' ratio splits a mixed step
    only_mixed = feats(dispatches=200, launches=200, iterations=2, iter_ns=60 * MS,
                       kernel=named(both=2, both_ns=60 * MS, mix=(52, 52), calls=(52, 52, 0)))
    v = PhaseClassifier().classify(only_mixed, key=8)
    assert v.phase == "mixed" and v.prefill_share == pytest.approx(0.5)


def test_shape_single_mode_uses_time_per_launch_not_h2d() -> None:
    """A 90 ms pass of 78 compute-bound kernels with no H2D is prefill; 4 ms of 78 is decode."""
    c = PhaseClassifier()
    pre = feats(dispatches=79, launches=78, iterations=1, iter_ns=90 * MS, h2d_bytes=0, shapes=shapes((1, 90, 78)))
    v = c.classify(pre, key="a")
    assert (v.phase, v.source) == ("prefill", "shape") and v.prefill_share == 1.0
    dec = feats(dispatches=2000, launches=1950, iterations=25, iter_ns=100 * MS, h2d_bytes=64 << 20,
                shapes=shapes((25, 4, 78)))
    assert c.classify(dec, key="b").phase == "decode"  # H2D alone decides nothing


def test_shape_adapts_to_each_process() -> None:
    """The same 8 ms pass of 80 launches (100 us a launch) is decode in a process whose
    passes are all like it, and prefill in one whose other mode is 1 ms passes."""
    c = PhaseClassifier()
    for _ in range(5):
        v_big = c.classify(feats(dispatches=1000, launches=960, iterations=12, iter_ns=96 * MS,
                                 shapes=shapes((12, 8, 80))), key="big-model-decode")
    assert v_big.phase == "decode"
    for _ in range(5):
        c.classify(feats(dispatches=5000, launches=4800, iterations=60, iter_ns=60 * MS,
                         shapes=shapes((60, 1, 80))), key="small-model")
    v = c.classify(feats(dispatches=1000, launches=960, iterations=12, iter_ns=96 * MS,
                         shapes=shapes((12, 8, 80))), key="small-model")
    assert v.phase == "prefill" and "two modes" in v.reason
    both = c.classify(feats(dispatches=1000, launches=960, iterations=42, iter_ns=66 * MS,
                            shapes=shapes((6, 8, 80), (30, 0.6, 80))), key="small-model")
    assert both.phase == "mixed" and both.prefill_share == pytest.approx(48 / 66, abs=0.01)


def test_shape_growing_decode_batch_stays_decode() -> None:
    c = PhaseClassifier()
    for i in range(40):  # 4 s of decode whose steps slow 4x (50 -> 200 us a launch)
        ms = 3.9 * (1 + 3 * i / 39)
        v = c.classify(feats(dispatches=2000, launches=78 * 10, iterations=10, iter_ns=int(10 * ms * MS),
                             shapes=shapes((10, ms, 78))), key=1)
        assert v.phase == "decode", (i, v.reason)


def test_shape_overlapped_pass_follows_its_own_kind() -> None:
    """A decode step held up behind another process's prefill (long, contended) stays decode."""
    c = PhaseClassifier()
    for _ in range(10):
        c.classify(feats(dispatches=1000, launches=1000, iterations=25, iter_ns=90 * MS,
                         shapes=shapes((25, 3.6, 40))), key=1)
    v = c.classify(feats(dispatches=300, launches=280, iterations=7, iter_ns=100 * MS,
                         shapes=shapes((6, 3.6, 40), (1, 80, 40, True))), key=1)
    assert v.phase == "decode"


def test_open_iteration_counts_with_what_it_did_so_far() -> None:
    # a prefill pass that dispatched everything earlier and now waits in its sync
    waiting = feats(open_iter_ns=150 * MS, open_launches=160, shapes=())
    assert PhaseClassifier().classify(waiting, key=1).phase == "prefill"
    # a first pass 2 ms under way is no evidence of decode: its kernels may only have been
    # queued (a new prefill process caught early is not put first); once it ends, it says
    for short in (feats(dispatches=41, launches=40, open_iter_ns=2 * MS, open_launches=40, shapes=()),
                  feats(dispatches=41, launches=40, open_iter_ns=2 * MS, open_launches=40)):  # shim totals
        c = PhaseClassifier()
        v = c.classify(short, key=1)
        assert (v.phase, v.source) == ("idle", "idle") and "too short to tell" in v.reason, v
        ended = feats(dispatches=41, launches=40, iterations=1, iter_ns=2 * MS,
                      shapes=shapes((1, 2.0, 40)) if short.shapes is not None else None)
        assert c.classify(ended, key=1).phase == "decode"
        v = c.classify(short, key=1)  # the next one under way: as the process's passes go
        assert v.phase == "decode", v
    # a prefill pass caught 0.5 ms in after queueing 2 kernels: already 250 us a launch
    v = PhaseClassifier().classify(feats(dispatches=2, launches=2, open_iter_ns=MS // 2, open_launches=2), key=1)
    assert v.phase == "prefill", v
    # named: the open iteration's calls say what it is
    c = PhaseClassifier()
    v = c.classify(feats(dispatches=30, launches=30, open_iter_ns=80 * MS, open_launches=30,
                         kernel=named(calls=(10, 0, 0), open_calls=(10, 0, 0))), key=2)
    assert (v.phase, v.source) == ("prefill", "kernel")


def test_by_totals_when_there_are_no_histograms() -> None:
    """The shim's counters: averages per iteration; the time per launch decides alone."""
    prefill = feats(dispatches=79, launches=78, iterations=1, iter_ns=90 * MS, h2d_bytes=0)
    assert C.classify(prefill).phase == "prefill"
    decode = feats(dispatches=1100, launches=1000, iterations=25, iter_ns=90 * MS, h2d_bytes=25 * 8192)
    assert C.classify(decode).phase == "decode"
    assert C.classify(decode).source == "shape"



def test_work_without_a_kernel_is_no_evidence_of_decode() -> None:
    """Copies or a synchronisation but no kernel launched: a new process is not called
    decode (flexpd would put it first), and a known one keeps what it ran before."""
    c = PhaseClassifier()
    copies = feats(dispatches=3, launches=0, iterations=0, iter_ns=0, h2d_bytes=1 << 20, open_iter_ns=2 * MS)
    v = c.classify(copies, key=1)
    assert (v.phase, v.source) == ("idle", "idle"), v
    assert c.classify(feats(dispatches=79, launches=78, iterations=1, iter_ns=90 * MS), key=1).phase == "prefill"
    v = c.classify(copies, key=1)
    assert (v.phase, v.source) == ("prefill", "shape") and "no kernel launched" in v.reason, v
    assert c.classify(copies, key=2).phase == "idle"  # another process: its own history


# ---------------------------------------------------------------- snapshots


def counters(**kw) -> dict:
    c = {"ops": [0] * len(Op), "bytes": [0] * len(Direction), "memset_bytes": 0, "rt_launches": 0, "allocs": 0,
         "alloc_failures": 0, "alloc_bytes": 0, "frees_known": 0, "freed_bytes": 0, "sync_ns": 0, "iterations": 0,
         "iter_ns": 0, "iter_ns_last": 0, "iter_start_ns": 0, "last_ns": 0, "iter_launches": 0,
         "iter_launches_rt": 0, "iter_h2d": 0, "named": [0] * 6, "iter_named": [0] * 6, "sig_iters": [0] * 8,
         "sig_ns": [0] * 8, "sig_mix": [0] * 4, "contended": 0, "shapes": None}
    for k, v in kw.items():
        if k in Op.__members__:
            c["ops"][Op[k]] = v
        elif k in Direction.__members__:
            c["bytes"][Direction[k]] = v
        else:
            c[k] = v
    return c


def test_snapshot_rates_and_occupancy() -> None:
    b = SnapshotBuilder("bpf", start_ns=0)
    s0 = b.build({(10, 0): counters(), (11, 0): counters()}, now_ns=100 * MS)
    assert s0["schema"] == 1 and s0["source"] == "bpf"
    # in 100 ms: pid 10 runs one 60 ms prefill pass, pid 11 ten 3 ms decode passes
    s1 = b.build({
        (10, 0): counters(KERNEL=160, MEMCPY_ASYNC=1, H2D=4 << 20, SYNC=1, iterations=1, iter_ns=60 * MS,
                          shapes={(33, 15, 0): [1, 60 * MS, 160]}, alloc_bytes=1 << 30, sync_ns=58 * MS),
        (11, 0): counters(KERNEL=400, SYNC=10, iterations=10, iter_ns=30 * MS,
                          shapes={(24, 11, 0): [10, 30 * MS, 400]}),
    }, now_ns=200 * MS, info=lambda pid: ProcessInfo("p", None))
    assert s1["interval_s"] == pytest.approx(0.1)
    p10, p11 = s1["processes"]
    assert (p10["phase"], p11["phase"]) == ("prefill", "decode")
    assert p10["rates"]["launches_per_s"] == 1600.0
    assert p10["rates"]["h2d_Bps"] == (4 << 20) * 10
    assert p10["rates"]["sync_wait"] == pytest.approx(0.58)
    assert p10["counters"]["mem_bytes"] == 1 << 30
    occ = s1["devices"][0]["phase_occupancy"]
    assert occ == {"prefill": 0.6, "decode": 0.3, "idle": 0.1}


def test_occupancy_of_an_overfull_interval_is_scaled_to_one() -> None:
    b = SnapshotBuilder("bpf", start_ns=0)
    b.build({(1, 0): counters(), (2, 0): counters()}, now_ns=100 * MS)
    s = b.build({(1, 0): counters(KERNEL=200, SYNC=1, iterations=1, iter_ns=90 * MS,
                                  shapes={(34, 16, 1): [1, 90 * MS, 200]}),
                 (2, 0): counters(KERNEL=400, SYNC=1, iterations=1, iter_ns=90 * MS,
                                  shapes={(34, 18, 1): [1, 90 * MS, 400]})}, now_ns=200 * MS)
    assert [e["phase"] for e in s["processes"]] == ["prefill", "decode"]
    occ = s["devices"][0]["phase_occupancy"]
    assert occ["prefill"] == pytest.approx(0.5) and occ["decode"] == pytest.approx(0.5) and occ["idle"] == 0


def test_open_iteration_is_busy_time_once() -> None:
    """A pass open across three reads is counted in each interval once, not again at its end."""
    b = SnapshotBuilder("bpf", start_ns=0)
    b.build({(1, 0): counters(KERNEL=160, iter_start_ns=50 * MS, iter_launches=160, shapes={})}, now_ns=100 * MS)
    s = b.build({(1, 0): counters(KERNEL=160, iter_start_ns=50 * MS, iter_launches=160, shapes={})},
                now_ns=200 * MS)
    assert s["processes"][0]["rates"]["busy"] == pytest.approx(1.0)
    assert s["processes"][0]["phase"] == "prefill"  # 150 ms open and 160 launches
    s = b.build({(1, 0): counters(KERNEL=160, SYNC=1, iterations=1, iter_ns=180 * MS,
                                  shapes={(35, 15, 0): [1, 180 * MS, 160]})}, now_ns=300 * MS)
    assert s["processes"][0]["rates"]["busy"] == pytest.approx(0.3)  # 230 ms end - 200 ms


def test_calls_before_a_device_was_set_join_the_only_device() -> None:
    merged = resolve_devices({(5, -1): counters(DEVICE_COUNT=1), (5, 2): counters(KERNEL=3),
                              (6, -1): counters(KERNEL=1)})
    assert set(merged) == {(5, 2), (6, -1)}
    assert merged[(5, 2)]["ops"][Op.DEVICE_COUNT] == 1 and merged[(5, 2)]["ops"][Op.KERNEL] == 3


def test_launches_prefer_the_lower_runtime_count() -> None:
    b = SnapshotBuilder("bpf", start_ns=0)
    s = b.build({(1, 0): counters(KERNEL=10, rt_launches=25)}, now_ns=100 * MS)
    assert s["processes"][0]["counters"]["launches"] == 25


def test_shim_counters_without_bpf_fields() -> None:
    c = counters(KERNEL=500, SYNC=5, iterations=5, iter_ns=20 * MS)
    for k in ("alloc_bytes", "freed_bytes", "allocs", "sync_ns", "named", "iter_named", "sig_iters", "sig_ns",
              "sig_mix", "contended", "shapes", "iter_start_ns"):
        c[k] = None
    c["mem_bytes"] = 4096
    b = SnapshotBuilder("shim", note="BPF unavailable", start_ns=0)
    s = b.build({(1, 0): c}, now_ns=100 * MS)
    e = s["processes"][0]
    assert s["source"] == "shim" and s["note"] == "BPF unavailable"
    assert e["counters"]["mem_bytes"] == 4096 and e["rates"]["sync_wait"] is None
    assert e["phase"] == "decode"
    view = process_view(s, 1)
    line = process_line(view)
    assert "N/A" in line and len(line) < 80


def test_lines_fit_80_columns() -> None:
    assert len(HEADER) < 80 and len(idle_line()) < 80
    big = {"launches_per_s": 123456789.0, "h2d_Bps": 9.99e12, "d2h_Bps": 9.99e12, "d2d_Bps": 9.99e12,
           "mem_bytes": 1 << 50, "sync_wait": 99.9, "phase": "prefill"}
    assert len(process_line(big)) < 80
