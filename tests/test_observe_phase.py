"""PhaseClassifier's rules, and snapshot building from counters (no BPF needed: the
counters are what struct fx_stats holds, written by hand)."""

from __future__ import annotations

import pytest

from flexnpu.observe.phase import IntervalFeatures, PhaseClassifier, PhaseRules
from flexnpu.observe.render import HEADER, idle_line, process_line
from flexnpu.observe.snapshot import ProcessInfo, SnapshotBuilder, process_view, resolve_devices
from flexnpu.runtimes import Direction, Op

MS = 1_000_000
C = PhaseClassifier()


def feats(**kw) -> IntervalFeatures:
    base = dict(dt_s=0.1, dispatches=0, launches=0, iterations=0, iter_ns=0, h2d_bytes=0)
    return IntervalFeatures(**{**base, **kw})


def test_nothing_dispatched_is_idle_whatever_the_role() -> None:
    assert C.classify(feats()).phase == "idle"
    assert C.classify(feats(), role="prefill").phase == "idle"


def test_role_takes_precedence_over_inference() -> None:
    decode_shaped = feats(dispatches=900, launches=800, iterations=20, iter_ns=70 * MS,
                          decode_iters=20, decode_ns=70 * MS, prefill_iters=0, prefill_ns=0)
    assert C.classify(decode_shaped).phase == "decode"
    v = C.classify(decode_shaped, role="prefill")
    assert (v.phase, v.source) == ("prefill", "role")


def test_iteration_rule_needs_two_of_three() -> None:
    assert C.iteration_is_prefill(64 * MS, 160, 4 << 20)
    assert C.iteration_is_prefill(64 * MS, 160, 0)
    assert C.iteration_is_prefill(1 * MS, 160, 4 << 20)
    # a decode pass held up behind another process's prefill: long, but light
    assert not C.iteration_is_prefill(80 * MS, 40, 8192)
    assert not C.iteration_is_prefill(3 * MS, 40, 8192)


def test_by_iteration_classes() -> None:
    prefill = feats(dispatches=330, launches=320, iterations=1, iter_ns=64 * MS, h2d_bytes=4 << 20,
                    prefill_iters=1, prefill_ns=64 * MS, decode_iters=0, decode_ns=0)
    assert C.classify(prefill).phase == "prefill"
    decode = feats(dispatches=1100, launches=1000, iterations=25, iter_ns=90 * MS, h2d_bytes=25 * 8192,
                   prefill_iters=0, prefill_ns=0, decode_iters=25, decode_ns=90 * MS)
    assert C.classify(decode).phase == "decode"
    mixed = feats(dispatches=500, launches=400, iterations=7, iter_ns=86 * MS, h2d_bytes=4 << 20,
                  prefill_iters=1, prefill_ns=64 * MS, decode_iters=6, decode_ns=22 * MS)
    v = C.classify(mixed)
    assert v.phase == "mixed" and v.prefill_share == pytest.approx(64 / 86)
    # one decode step beside a long prefill is still prefill (below mixed_share)
    mostly = feats(dispatches=200, launches=200, iterations=2, iter_ns=67 * MS, h2d_bytes=4 << 20,
                   prefill_iters=1, prefill_ns=64 * MS, decode_iters=1, decode_ns=3 * MS)
    assert C.classify(mostly).phase == "prefill"


def test_open_iteration_counts_with_what_it_did_so_far() -> None:
    # a prefill pass that dispatched everything earlier and now waits in its sync
    waiting = feats(open_iter_ns=150 * MS, open_launches=160, open_h2d_bytes=4 << 20,
                    prefill_iters=0, prefill_ns=0, decode_iters=0, decode_ns=0)
    assert C.classify(waiting).phase == "prefill"
    short = feats(dispatches=41, launches=40, open_iter_ns=2 * MS, open_launches=40, open_h2d_bytes=8192,
                  prefill_iters=0, prefill_ns=0, decode_iters=0, decode_ns=0)
    assert C.classify(short).phase == "decode"


def test_by_totals_when_there_are_no_iteration_classes() -> None:
    """The shim's counters: averages per iteration and the cadence vote."""
    prefill = feats(dispatches=330, launches=320, iterations=2, iter_ns=128 * MS, h2d_bytes=8 << 20)
    assert C.classify(prefill).phase == "prefill"
    decode = feats(dispatches=1100, launches=1000, iterations=25, iter_ns=90 * MS, h2d_bytes=25 * 8192)
    assert C.classify(decode).phase == "decode"
    # a tie: long and slow (held up), but light: what the pass carries decides
    held = feats(dispatches=80, launches=80, iterations=1, iter_ns=60 * MS, h2d_bytes=8192)
    assert C.classify(held).phase == "decode"


def test_rules_go_to_bpf_as_flags() -> None:
    flags = PhaseRules(long_iter_ms=20, prefill_launches=64, prefill_h2d_bytes=1000).cflags()
    assert flags == ["-DFX_LONG_ITER_NS=20000000ULL", "-DFX_PREFILL_LAUNCHES=64", "-DFX_PREFILL_H2D=1000ULL"]


# ---------------------------------------------------------------- snapshots


def counters(**kw) -> dict:
    c = {"ops": [0] * len(Op), "bytes": [0] * len(Direction), "memset_bytes": 0, "rt_launches": 0, "allocs": 0,
         "alloc_failures": 0, "alloc_bytes": 0, "frees_known": 0, "freed_bytes": 0, "sync_ns": 0, "iterations": 0,
         "iter_ns": 0, "iter_ns_last": 0, "iter_start_ns": 0, "last_ns": 0, "iter_launches": 0,
         "iter_launches_rt": 0, "iter_h2d": 0, "class_iters": [0, 0], "class_ns": [0, 0]}
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
                          class_iters=[0, 1], class_ns=[0, 60 * MS], alloc_bytes=1 << 30, sync_ns=58 * MS),
        (11, 0): counters(KERNEL=400, SYNC=10, iterations=10, iter_ns=30 * MS, class_iters=[10, 0],
                          class_ns=[30 * MS, 0]),
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
    s = b.build({(1, 0): counters(KERNEL=200, SYNC=1, iterations=1, iter_ns=90 * MS, class_iters=[0, 1],
                                  class_ns=[0, 90 * MS]),
                 (2, 0): counters(KERNEL=40, SYNC=1, iterations=1, iter_ns=90 * MS, class_iters=[1, 0],
                                  class_ns=[90 * MS, 0])}, now_ns=200 * MS)
    occ = s["devices"][0]["phase_occupancy"]
    assert occ["prefill"] == pytest.approx(0.5) and occ["decode"] == pytest.approx(0.5) and occ["idle"] == 0


def test_open_iteration_is_busy_time_once() -> None:
    """A pass open across three reads is counted in each interval once, not again at its end."""
    b = SnapshotBuilder("bpf", start_ns=0)
    b.build({(1, 0): counters(KERNEL=160, iter_start_ns=50 * MS, iter_launches=160)}, now_ns=100 * MS)
    s = b.build({(1, 0): counters(KERNEL=160, iter_start_ns=50 * MS, iter_launches=160)}, now_ns=200 * MS)
    assert s["processes"][0]["rates"]["busy"] == pytest.approx(1.0)
    assert s["processes"][0]["phase"] == "prefill"  # 150 ms open and 160 launches
    s = b.build({(1, 0): counters(KERNEL=160, SYNC=1, iterations=1, iter_ns=180 * MS, class_iters=[0, 1],
                                  class_ns=[0, 180 * MS])}, now_ns=300 * MS)
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
    c = counters(KERNEL=50, SYNC=5, iterations=5, iter_ns=20 * MS)
    for k in ("alloc_bytes", "freed_bytes", "allocs", "sync_ns", "class_iters", "class_ns", "iter_start_ns"):
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
