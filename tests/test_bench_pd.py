"""`flexnpu bench pd`: end to end with --quick (every configuration on the emulator; the
result file's schema; the emulator's ground truth agrees with the token counts), the
targets' arithmetic, and bad input (one line, exit 2)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexnpu.bench import pd

ROOT = Path(__file__).resolve().parents[1]


def flexnpu(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexnpu.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_quick_run_writes_every_configuration(tmp_path):
    out, png = tmp_path / "pd.json", tmp_path / "pd.png"
    r = flexnpu("bench", "pd", "--quick", "--json", str(out), "--plot", str(png))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["schema"] == 1 and rep["benchmark"] == "pd"
    assert png.stat().st_size > 10_000
    (point,) = rep["results"]
    # the forwarded configurations run where the forward build carries the default --ops; else
    # the default list leaves them out and says why
    # forward-less (where the build lacks it); static-disagg-xnode needs --nodes 2, so one node leaves it out
    left_out = pd.forward_refusal(pd.DEFAULT_OPS)
    assert set(point["configs"]) == set(pd.CONFIGS) - (set(pd.FORWARDED) if left_out else set()) - {
        "static-disagg-xnode"}
    assert (left_out is None) == ("flexnpu-forward" not in rep["options"]["left_out"])
    assert "static-disagg-xnode left out: it needs --nodes 2" in rep["options"]["left_out"]
    for name, c in point["configs"].items():
        assert c["completed"] == rep["options"]["n"], name
        # the emulator's kernel counts, bytes, busy time and tokens agree with the instances'
        assert c["problems"] == [] and c["busy_check"]["ok"], (name, c["problems"])
        for k in ("ttft_ms", "tpot_ms", "itl_ms"):
            assert set(c[k]) == {"p50", "p90", "p99"} and c[k]["p50"] > 0, (name, k)
        assert c["output_tps"] > 0 and c["request_ps"] > 0 and 0 <= c["slo_attainment"] <= 1
        assert all(0 < b <= 1.05 for b in c["busy_check"]["device_busy_share"] if b is not None), name
    # the sweep tried both static forms; the phase check ran where an observer did
    assert {s["form"] for s in point["static_sweep"]} == {"time", "vnpu"}
    assert point["configs"]["flexnpu-gated"]["phase"]["intervals"] > 0
    names = {t["name"] for t in rep["targets"]}
    assert "uncontrolled throughput vs no-shim" in names
    assert all(t["status"] in ("PASS", "MISS", "N/A") for t in rep["targets"])
    assert "PASS" in r.stdout or "MISS" in r.stdout


def test_targets_and_max_rate():
    def cfg(ttft, tpot, tps):
        ms = lambda v: {"p50": v, "p90": v, "p99": v}  # noqa: E731
        return {"ttft_ms": ms(ttft), "tpot_ms": ms(tpot), "itl_ms": ms(tpot), "output_tps": tps, "phase": {}}

    t = {x.name: x for x in pd.targets({"flexnpu-gated": cfg(5, 21, 1000), "static-colocation": cfg(100, 20, 1000),
                                        "static-disagg": cfg(50, 20, 900), "uncontrolled": cfg(6, 20, 995),
                                        "no-shim": cfg(6, 20, 1000), "flexnpu-forward": cfg(4, 22, 1000),
                                        "forward-uncontrolled": cfg(6, 20, 980)}, "balanced", None)}
    g = "flexnpu-gated"
    assert t[f"{g} TTFT p50 vs static-colocation"].ok and t[f"{g} TTFT p50 vs static-colocation"].ratio == 0.95
    assert t[f"{g} TPOT p50 vs static-colocation"].ok  # 1.05
    assert t[f"{g} throughput vs static-disagg (balanced trace)"].ok  # 1.11
    assert t[f"{g} throughput vs static-disagg (prefill-heavy trace)"].ok is None
    assert t["uncontrolled throughput vs no-shim"].ok
    assert t[f"{g} goodput vs static-disagg at its p90 SLO"].ok is None  # no sweep: N/A
    assert t[f"{g} saturation rate vs static-disagg (balanced trace)"].ok is None
    assert t[f"{g} TTFT p99 vs no-shim"].ratio == pytest.approx(5 / 6) and not t[f"{g} TTFT p99 vs no-shim"].ok
    assert t["flexnpu-forward TTFT p99 vs no-shim"].ok  # 4 / 6
    sweep = {"max_rate": {"flexnpu-forward": 42.0, "static-disagg": 40.0, "no-shim": 30.0},
             "base_attainment": {"flexnpu-forward": 0.99, "static-disagg": 0.9, "no-shim": 0.5}}
    t3 = {x.name: x for x in pd.targets({"flexnpu-forward": cfg(4, 22, 1000)}, "balanced", sweep)}
    assert t3["flexnpu-forward saturation rate vs static-disagg (balanced trace)"].ratio == 1.05
    assert t3["flexnpu-forward saturation rate vs static-disagg (balanced trace)"].ok
    assert t3["flexnpu-forward saturation rate vs static-disagg (prefill-heavy trace)"].ok is None
    assert t3["flexnpu-forward goodput vs static-disagg at its p90 SLO"].ratio == pytest.approx(1.1)
    assert t3["flexnpu-forward goodput vs no-shim at static-disagg's p90 SLO"].ok
    # the forwarded configuration has its own rows; forward-uncontrolled is 2% under no-shim
    assert t["flexnpu-forward TTFT p50 vs static-colocation"].ratio == 0.96
    assert not t["flexnpu-forward TPOT p50 vs static-colocation"].ok  # 1.1
    assert t["forward-uncontrolled throughput vs no-shim"].ok is False
    # without the forwarded configurations, no rows of theirs
    t2 = {x.name for x in pd.targets({"no-shim": cfg(6, 20, 1000)}, "balanced", None)}
    assert "flexnpu-gated TTFT p50 vs static-colocation" in t2 and not any("forward" in n for n in t2)
    assert not any("xnode" in n for n in t2 | set(t))  # no rows against a configuration not run
    # across nodes (--nodes 2): throughput and TTFT against the disaggregation the cluster runs
    tx = {x.name: x for x in pd.targets({"flexnpu-forward": cfg(30, 22, 1000),
                                         "static-disagg-xnode": cfg(40, 20, 800)}, "prefill-heavy", None)}
    assert tx["flexnpu-forward throughput vs static-disagg-xnode (prefill-heavy trace)"].ratio == 1.25
    assert tx["flexnpu-forward throughput vs static-disagg-xnode (prefill-heavy trace)"].ok
    assert tx["flexnpu-forward throughput vs static-disagg-xnode (balanced trace)"].ok is None
    assert tx["flexnpu-forward TTFT p50 vs static-disagg-xnode"].ratio == 0.75
    assert pd.max_rate([(1, 1.0), (2, 0.95), (3, 0.85)]) == pytest.approx(2.5)
    assert pd.max_rate([(1, 1.0), (2, 1.0)]) == 2
    assert pd.max_rate([(1, 0.5)]) is None


@pytest.mark.parametrize("args, says", [
    (["--rate", "-1"], "rates must be positive"),
    (["--configs", "nope"], "--configs"),
    (["--mode", "fast"], "--mode"),
    (["--trace", "/nonexistent.csv"], "--trace"),
    (["--devices", "1", "--configs", "static-disagg"], "static-disagg needs"),
    (["--rates", "1,x"], "--rates"),
    (["--json", "/nonexistent/dir/x.json"], "--json"),
    (["--ops", "cuda"], "--ops takes kernels, aclnn, aclnn-fia"),
    (["--link-gbit", "0"], "--link-gbit must be"),  # refused with one node too, not ignored
    (["--link-delay-us", "-1"], "--link-delay-us must be"),
])
def test_bad_input_is_one_line(args, says):
    r = flexnpu("bench", "pd", *args, timeout=60)
    assert r.returncode == 2
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_demo_refuses_unknown_ops():
    r = flexnpu("demo", "--ops", "cuda", timeout=60)
    assert r.returncode == 2
    assert "flexnpu demo: --ops takes kernels, aclnn, aclnn-fia" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("rows, says", [
    ("0.0,100,20\n0.5,abc,3\n", ":3: token counts must be integers"),
    ("0.0,100,20\n0.5,40000,3\n", "1 of 2 requests need more than qwen2.5-7b's 32768-token context"),
    ("", "no requests in the trace"),
])
def test_bad_trace_file_is_refused_before_any_run(tmp_path, rows, says):
    f = tmp_path / "trace.csv"
    f.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + rows)
    r = flexnpu("bench", "pd", "--trace", str(f), "--rate", "2", timeout=60)
    assert r.returncode == 2
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_help_has_examples():
    r = flexnpu("bench", "pd", "--help", timeout=60)
    assert r.returncode == 0 and "flexnpu bench pd --quick" in r.stdout and "--rates" in r.stdout


def _timings(n: int, ttft_s, tpot_s: float = 0.02, out: int = 4) -> list:
    """n requests 0.1 s apart; ttft_s(i) the i-th request's wait for its first token."""
    from flexnpu.workload.metrics import RequestTiming
    ts = []
    for i in range(n):
        t = RequestTiming(i, 0.1 * i, 100, out)
        first = t.arrival + ttft_s(i)
        t.token_times = [first + k * tpot_s for k in range(out)]
        ts.append(t)
    return ts


def test_stability_is_queue_growth():
    flat = pd.stability(_timings(30, lambda i: 0.05))
    assert flat["stable"] and flat["ttft_growth"] == 1.0 and flat["tpot_growth"] == 1.0
    growing = pd.stability(_timings(30, lambda i: 0.05 + 0.01 * i))  # the prefill queue grows
    assert not growing["stable"] and growing["ttft_growth"] > pd.STABLE_GROWTH
    unfinished = _timings(30, lambda i: 0.05)
    unfinished[-1].token_times.pop()
    assert not pd.stability(unfinished)["stable"]


def test_rate_auto_takes_the_highest_rate_a_static_split_serves():
    """Each rate's static splits are tried (vNPU first, the one that served the rate below
    first; one that failed a lower rate is not tried again) until one serves it (stable,
    >= 90% within the SLO); the first rate where none does ends the sweep."""
    o = pd.quick(pd.Options())
    assert o.rate == 40.0 and o.auto_rates == pd.AUTO_RATES_QUICK
    o = pd.replace(o, rate=None, shares=(0.3, 0.5))
    tried = []

    def runs(v, rate):
        tried.append((rate, v.form, v.share))
        # the time splits keep up but miss the SLO; the 0.5 partition serves up to 80 req/s, 0.3 up to 40
        ok = v.form == "time" or rate <= {0.3: 40, 0.5: 80}[v.share]
        ts = _timings(12, (lambda i: 0.01) if ok else (lambda i: 0.01 * (i + 1)),
                      tpot_s=0.5 if v.form == "time" else 0.005)
        return pd.Run(v, "serial", rate, pd.MX.compute(ts, o.slo), ts, [], {"ok": True, "problems": 0,
                      "device_busy_share": [0.5]}, {"accuracy": None}, 1.0)

    op = pd.operating_point(o, runs, lambda s: None)
    assert op["rate"] == 80.0
    assert tried[:2] == [(20.0, "vnpu", 0.3), (40.0, "vnpu", 0.3)]
    assert tried[2:5] == [(80.0, "vnpu", 0.3), (80.0, "vnpu", 0.5), (160.0, "vnpu", 0.5)]
    # at 160 the time splits are tried (stable, but out of the SLO); vnpu 0.3 failed at 80: not again
    assert tried[5:] == [(160.0, "time", 0.3), (160.0, "time", 0.5)]
    rows = {(r["rate"], r["form"], r["prefill_share"]): r for r in op["sweep"]}
    assert rows[(160.0, "time", 0.3)]["stable"] and not rows[(160.0, "time", 0.3)]["serves"]
    assert not any(r["serves"] for r in op["sweep"] if r["rate"] == 160.0)


@pytest.mark.slow
def test_quick_rate_auto_end_to_end(tmp_path):
    out = tmp_path / "pd.json"
    r = flexnpu("bench", "pd", "--quick", "--rate", "auto", "--configs", "static-colocation,flexnpu",
                "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    op = rep["operating_point"]
    assert op["rate"] in pd.AUTO_RATES_QUICK and op["sweep"]
    served = [s["rate"] for s in op["sweep"] if s["serves"]]
    assert op["rate"] == (max(served) if served else min(pd.AUTO_RATES_QUICK))
    (point,) = rep["results"]
    assert point["rate"] == op["rate"] and "operating point" in r.stdout


def test_best_static_split_is_a_stable_one():
    """An overloaded split loses to a stable one even with more goodput over the trace."""
    slo = pd.MX.Slo(1.0, 0.06)

    def run(ttft_s, label):
        ts = _timings(12, ttft_s)
        return pd.Run(pd.Variant("static-colocation", "vnpu", label), "serial", 10.0, pd.MX.compute(ts, slo), ts,
                      [], {}, {}, 1.0)

    growing = run(lambda i: 0.01 * (i + 1), 0.7)  # every request within the SLO, the queue growing
    flat = run(lambda i: 0.5 if i % 2 else 1.5, 0.5)  # half of them over the TTFT SLO, no growth
    assert growing.metrics["goodput"] > flat.metrics["goodput"]
    assert pd._better(growing, flat) is flat and pd._better(flat, growing) is flat


# ---------------------------------------------------------------- forwarded execution

def test_old_name_flexnpu_is_flexnpu_gated():
    from flexnpu.bench import cli

    o = cli.options_from("balanced", 4, "40", None, 2, "contexts", 1, "flexnpu,no-shim,flexnpu-gated", None, None, 0,
                         None, None, True, "kernels")
    assert o.configs == ("flexnpu-gated", "no-shim")
    r = flexnpu("bench", "pd", "--configs", "flexnpu-forward,nope", "--ops", "kernels", timeout=60)
    assert r.returncode == 2 and "flexnpu-gated" in r.stderr and "(flexnpu: flexnpu-gated)" in r.stderr


def test_ops_the_forward_build_does_not_carry_are_refused(monkeypatch):
    """A forwarded configuration whose instances would call an aclnn operator the forward
    build does not carry is refused before any run (one line), and left out of the default
    list with the reason; --ops kernels needs none."""
    from flexnpu.forward import cli as fcli
    from flexnpu.workload import driver
    from flexnpu.workload.aclnn import _OPERATORS

    every = [n for op in _OPERATORS for n in (op, op + "GetWorkspaceSize")]
    monkeypatch.setattr(fcli, "carried_calls", lambda: ["aclrtLaunchKernel"] + every[1:])
    why = driver.ops_refusal("aclnn")
    assert why and every[0] in why and "--ops kernels" in why
    assert driver.ops_refusal("kernels") is None
    with pytest.raises(pd.BenchError, match="flexnpu-forward cannot run: --ops aclnn calls"):
        pd.Options(configs=("flexnpu-forward",), ops="aclnn").check()
    o = pd.runnable(pd.Options(ops="aclnn"))
    assert not set(o.configs) & set(pd.FORWARDED) and "flexnpu-forward" in o.left_out
    one_node = tuple(c for c in pd.CONFIGS if c != "static-disagg-xnode")
    assert pd.runnable(pd.Options(ops="kernels")).configs == one_node
    assert pd.runnable(pd.Options(ops="kernels", nodes=2, devices=4)).configs == pd.CONFIGS
    monkeypatch.setattr(fcli, "carried_calls", lambda: every)
    assert driver.ops_refusal("aclnn") is None and pd.runnable(pd.Options(ops="aclnn")).configs == one_node


@pytest.mark.slow
def test_forwarded_pair_is_the_executors_work():
    """A co-located pair run forwarded: every kernel is the executor's (the emulator knows no
    instance's pid), the driver's check passes on the executor's record, the decode's import
    is the prefill's pool itself, and the check fails where the record disagrees."""
    import copy

    from flexnpu.bench.node import LocalNode
    from flexnpu.workload import driver, trace as T

    reqs = T.generate(T.TraceSpec(n=5, rate=40, seed=1, prompt=T.LengthDist(170, 1.0, 4, 2048),
                                  output=T.LengthDist(12, 0.9, 1, 24)))
    setup = driver.Setup(model="qwen2.5-7b:2", ops="kernels", forward=True)
    with LocalNode(devices=1, observer=None) as node:
        assert node.executor_pid(0) is None  # the daemon starts it with its first forwarded client
        r = driver.run(node, reqs, setup)
        ex = node.executor_pid(0)
        assert ex and Path(f"/proc/{ex}/cmdline").read_bytes().split(b"\0")[0].endswith(b"/flexnpu-executor")
    assert r.problems == [] and r.executors == {0: ex}
    pids = {r.stats[k]["pid"] for k in ("prefill", "decode")}
    (dev,) = r.status["devices"]
    seen = {c["pid"]: c for c in dev["clients"]}
    assert not pids & set(seen), "an instance ran in its own context"
    launched = sum(sum(r.stats[k]["kernels"].values()) for k in ("prefill", "decode"))
    assert sum(seen[ex]["count_by_name"].values()) == launched > 0
    assert seen[ex]["ops"]["copy"] == 0 and sum(seen[ex]["bytes_copied"].values()) == 0
    h = r.handoff
    assert h["imported_ptr"] == h["exported_ptr"] and h["exported_ptr"]
    assert h["executor-0"]["exports"] == 1 and h["executor-0"]["imports"] == 0
    # the check can fail: a kernel more than the executor ran, another pointer, busy time off
    timing = {t.id: t for t in r.requests}
    stats = copy.deepcopy(r.stats)
    stats["decode"]["kernels"]["attention_decode"] += 1
    assert any("executor" in p and "counted" in p for p in driver.check(stats, r.status, timing, setup,
                                                                           executors=r.executors, handoff=h))
    moved = dict(h, imported_ptr=h["exported_ptr"] + 4096)
    assert any("not the same memory" in p for p in driver.check(r.stats, r.status, timing, setup,
                                                                 executors=r.executors, handoff=moved))
    stats = copy.deepcopy(r.stats)
    for k in stats:
        stats[k]["modelled_s"] *= 0.5
    assert any("executor busy" in p for p in driver.check(stats, r.status, timing, setup,
                                                           executors=r.executors, handoff=h))
    # read as a gated run's, the same status has no record of either instance
    assert driver.check(r.stats, r.status, timing, setup, handoff=h)


def test_forwarding_without_an_executor_fails_with_its_reason():
    from flexnpu.bench.node import LocalNode
    from flexnpu.workload import driver, trace as T

    reqs = T.generate(T.TraceSpec(n=1, rate=10, seed=0))
    with LocalNode(devices=1, observer=None, daemons=False) as node:
        with pytest.raises(RuntimeError, match="cannot forward: device 0 has no daemon on this node"):
            driver.run(node, reqs, driver.Setup(model="qwen2.5-7b:2", ops="kernels", forward=True))
        assert node.programs == []  # refused before any instance started


@pytest.mark.slow
def test_quick_run_of_the_forwarded_configurations(tmp_path):
    out = tmp_path / "pd.json"
    r = flexnpu("bench", "pd", "--quick", "--ops", "kernels", "-n", "6", "--configs",
                "flexnpu,flexnpu-forward,forward-uncontrolled", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["options"]["configs"] == ["flexnpu-gated", "flexnpu-forward", "forward-uncontrolled"]
    (point,) = rep["results"]
    assert set(point["configs"]) == {"flexnpu-gated", "flexnpu-forward", "forward-uncontrolled"}
    for name, c in point["configs"].items():
        assert c["completed"] == 6, name
        assert c["problems"] == [] and c["busy_check"]["ok"], (name, c["problems"])
        assert c["execution"] == ("forwarded" if name in pd.FORWARDED else "gated"), name
        assert c["output_tps"] > 0
        assert c["phase"]["intervals"] > 0, name
    # forwarded runs observe with the shim's counters, scored against the instances' own steps
    assert point["configs"]["flexnpu-forward"]["phase"]["source"] == "shim"
    names = {t["name"] for t in rep["targets"]}
    assert {"flexnpu-forward TTFT p50 vs static-colocation", "forward-uncontrolled throughput vs no-shim",
            "flexnpu-gated TTFT p50 vs static-colocation"} <= names
    for row in ("flexnpu-gated", "flexnpu-forward", "forward-uncontrolled"):
        assert f"│ {row} " in r.stdout, row


def test_forwarded_nodes(tmp_path):
    """How each forwarded configuration's node is set up (nothing started): forwarded
    instances, the shim's counters as the observer, flexpd or passthrough, and no settings
    by declared role for forward-uncontrolled."""
    o = pd.Options(ops="kernels")
    for name, policy, args in (("flexnpu-forward", "flexpd", []), ("forward-uncontrolled", "passthrough",
                                                                  ["--no-role-admission"])):
        node, shim, role_env, forward = pd._node(pd.Variant(name), o, "contexts", tmp_path)
        try:
            assert (shim, role_env, forward) == (True, False, True)
            assert (node.policy, node.observer, node.daemon_args, node.want_daemons) == (policy, "shim", args, True)
        finally:
            node.stop()
    node, *_, forward = pd._node(pd.Variant("flexnpu-gated"), o, "contexts", tmp_path)
    node.stop()
    assert not forward and node.daemon_args == []
