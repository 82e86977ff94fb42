#!/usr/bin/env python3
"""How busy one shared device is kept under each way of sharing it, in the steady part of a run.

One prefill and one decode instance (the reference workload, docs/bench.md) share one emulated
910B; the same trace is replayed under each variant on a fresh node, one after another. A
thread samples the emulator's busy time every 0.25 s; the figure is the device's busy share
between the run's first second and its last arrival (the steady part: no start-up, no tail of
the last replies), with each instance's share beside it, and the run's throughput, TTFT and
TPOT medians. It answers "where does the device time go" for a policy, which `bench pd`'s
whole-run busy share (tail included) does not.

    .venv/bin/python scripts/bench_busy.py                       # every variant, 12 req/s
    .venv/bin/python scripts/bench_busy.py --rate 16 uncontrolled flexpd
    .venv/bin/python scripts/bench_busy.py --json busy.json

Variants: no-shim, uncontrolled (passthrough), flexpd (the bench's configuration: prefill
first, decode's in-flight budget 16), flexpd-nobudget (decode_inflight 0), flexpd-grace0
(the daemon's pending grace 0.01 ms instead of 1 ms).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flexnpu.bench import pd  # noqa: E402
from flexnpu.bench.node import LocalNode, machine  # noqa: E402
from flexnpu.workload import driver  # noqa: E402

NOBUDGET_TOML = '[policy.flexpd]\nfirst = "prefill"\ndecode_inflight = 0\n'


def variants(cfgdir: Path) -> dict[str, dict]:
    (cfgdir / "flexpd.toml").write_text(pd.FLEXPD_TOML)
    (cfgdir / "nobudget.toml").write_text(NOBUDGET_TOML)
    flexpd = dict(observer="auto", policy="flexpd", controller_args=["--config", str(cfgdir / "flexpd.toml")])
    return {
        "no-shim": dict(observer=None, daemons=False),
        "uncontrolled": dict(observer="auto", policy="passthrough"),
        "flexpd": flexpd,
        "flexpd-nobudget": dict(flexpd, controller_args=["--config", str(cfgdir / "nobudget.toml")]),
        "flexpd-grace0": dict(flexpd, daemon_args=["--pending-grace-ms", "0.01"]),
    }


def run(name: str, node_kw: dict, reqs: list, model: str) -> dict:
    last_arrival = max(r.arrival_s for r in reqs)
    samples: list[tuple[float, int, dict[int, float]]] = []
    stop = threading.Event()
    with LocalNode(devices=1, **node_kw) as node:
        def sample() -> None:
            while not stop.is_set():
                dev = node.emulator_status()["devices"][0]
                samples.append((time.monotonic(), dev["busy_ns"],
                                {c["pid"]: sum(c["busy_by_name"].values()) for c in dev["clients"]}))
                time.sleep(0.25)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.monotonic()
        try:
            res = driver.run(node, reqs, driver.Setup(model=model, shim=name != "no-shim"))
        finally:
            stop.set()
            th.join(5)

    def at(t: float):
        return min(samples, key=lambda s: abs(s[0] - t))

    a, b = at(t0 + 1.0), at(t0 + last_arrival)
    span_ns = (b[0] - a[0]) * 1e9
    role = {res.stats[k]["pid"]: k for k in res.stats if res.stats[k]}
    m = res.metrics
    return {"variant": name, "steady_busy": round((b[1] - a[1]) / span_ns, 4) if span_ns > 0 else None,
            "by_instance": {role.get(p, str(p)): round((b[2].get(p, 0) - a[2].get(p, 0)) / span_ns, 4)
                            for p in b[2]} if span_ns > 0 else {},
            "window_s": round(span_ns / 1e9, 2), "output_tps": round(m["output_throughput"], 1),
            "ttft_p50_ms": round(m["ttft_s"]["p50"] * 1e3, 2), "tpot_p50_ms": round(m["tpot_s"]["p50"] * 1e3, 2),
            "problems": res.problems}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("variants", nargs="*", help="variants to run (default: all)")
    ap.add_argument("--rate", type=float, default=12.0, help="requests/s on the one device (default 12)")
    ap.add_argument("-n", type=int, default=120, help="requests in the trace (default 120)")
    ap.add_argument("--trace", default="balanced", help="balanced, prefill-heavy or an Azure trace CSV")
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="flexnpu-busy-") as td:
        vs = variants(Path(td))
        names = a.variants or list(vs)
        bad = [v for v in names if v not in vs]
        if bad:
            ap.error(f"unknown variant {bad[0]!r}; known: {', '.join(vs)}")
        o = pd.Options(trace=a.trace, n=a.n, model=a.model)
        try:
            o.check()
        except pd.BenchError as e:
            ap.error(str(e))
        reqs, spec = pd.make_trace(o, a.rate)
        print(f"one device, {a.rate:g} req/s, trace {spec.get('name')} ({len(reqs)} requests), model {a.model}; "
              f"steady window: 1 s to the last arrival", flush=True)
        print(f"{'variant':16s} {'busy':>6s}  {'prefill':>7s} {'decode':>7s}  {'tok/s':>7s} {'TTFT p50':>9s} "
              f"{'TPOT p50':>9s}  checks", flush=True)
        out = []
        for name in names:
            r = run(name, vs[name], reqs, a.model)
            out.append(r)
            bi = r["by_instance"]
            print(f"{name:16s} {r['steady_busy']:6.1%}  {bi.get('prefill', 0):7.1%} {bi.get('decode', 0):7.1%}  "
                  f"{r['output_tps']:7.0f} {r['ttft_p50_ms']:9.1f} {r['tpot_p50_ms']:9.1f}  "
                  f"{'ok' if not r['problems'] else '; '.join(r['problems'])}", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"schema": 1, "machine": machine(), "rate": a.rate, "trace": spec,
                                      "results": out}, indent=1))
    return 0 if all(not r["problems"] for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
