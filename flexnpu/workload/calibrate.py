"""The calibration runs behind docs/bench.md: the reference workload on the emulator against
published Qwen2.5-7B serving figures on the Ascend 910B.

    python -m flexnpu.workload.calibrate [--model qwen2.5-7b] [--only NAME ...] [--json]

Each scenario runs on a fresh LocalNode (one device, serial mode, profile 910b, no shim),
prefill and decode instances on the same device; prints one line per scenario (p50s, ms) and
the emulator check's verdict.
"""

from __future__ import annotations

import argparse
import json
import sys

from flexnpu.bench.node import LocalNode, machine
from flexnpu.workload import driver, trace

SCENARIOS = {
    # name: (trace spec, what it isolates)
    "ttft-1024": (trace.TraceSpec(n=1, fixed_prompt=1024, fixed_output=2), "prefill of one 1024-token prompt"),
    "decode-b1": (trace.TraceSpec(n=1, fixed_prompt=256, fixed_output=128), "decode step, batch 1"),
    "decode-b8": (trace.TraceSpec(n=8, rate=1e6, fixed_prompt=32, fixed_output=128), "decode step, batch 8"),
    "sharegpt-qps1": (trace.TraceSpec(n=40, rate=1.0, seed=0), "ShareGPT-like, Poisson 1 req/s"),
    "sharegpt-qps4": (trace.TraceSpec(n=80, rate=4.0, seed=0), "ShareGPT-like, Poisson 4 req/s"),
}


def run_one(name: str, model: str) -> dict:
    spec, what = SCENARIOS[name]
    with LocalNode(devices=1, mode="serial", profile="910b", observer=None, daemons=False) as node:
        res = driver.run(node, trace.generate(spec), driver.Setup(model=model, shim=False))
    m = res.metrics
    return {"scenario": name, "what": what, "trace": spec.describe(), "ttft_p50_ms": m["ttft_s"]["p50"] * 1e3,
            "tpot_p50_ms": m["tpot_s"]["p50"] * 1e3, "itl_p50_ms": m["itl_s"]["p50"] * 1e3,
            "output_throughput": m["output_throughput"], "problems": res.problems}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flexnpu.workload.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-7b")
    p.add_argument("--only", nargs="*", choices=sorted(SCENARIOS))
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rows = [run_one(n, a.model) for n in (a.only or SCENARIOS)]
    if a.json:
        print(json.dumps({"schema": 1, "machine": machine(), "model": a.model, "rows": rows}))
    else:
        for r in rows:
            print(f"{r['scenario']:<14} TTFT {r['ttft_p50_ms']:8.1f}  TPOT {r['tpot_p50_ms']:6.1f}  "
                  f"ITL {r['itl_p50_ms']:6.1f} ms  out {r['output_throughput']:7.1f} tok/s  "
                  f"check {'ok' if not r['problems'] else r['problems']}")
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
