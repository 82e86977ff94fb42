#!/usr/bin/env python3
"""A decode loop beside a prefill loop on one emulated device, side by side in one run:
what each gets alone, co-located forwarded (`flexnpu run --forward`, roles declared, no
controller: the roles' settings apply at admission), and co-located gated (the same, with the
gated shim: what gating gives before a controller's first setting).

The loops are tests/progs/engine_loop.c, an ordinary AscendCL program: each step launches K
kernels of MS ms of modelled device time, synchronises, then pauses GAP ms. Several shapes
are run (--shapes), none tuned to the policy.

Figures per shape and way of running:
  decode step p50 / p99 against alone, and p99 over the first second (from the first step);
  prefill's share of the device time decode leaves: prefill's modelled busy time in the
  window where both ran / (window - decode's busy time in it). Targets (forwarded): decode
  p99 <= 1.05x alone from the first step; prefill >= 90% of what decode leaves.

    .venv/bin/python scripts/bench_colocate.py [--seconds 4] [--json] [--shapes "24x0.4+2,8x3+0;..."]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flexnpu import paths  # noqa: E402
from flexnpu.bench.node import machine  # noqa: E402
from flexnpu.emulator import control  # noqa: E402

ENGINE = Path(__file__).resolve().parent.parent / "tests" / "progs" / "engine_loop.c"
FLEXNPU = str(Path(sys.executable).with_name("flexnpu"))
# (decode K, ms, gap) + (prefill K, ms, gap): a short decode step among long prefill kernels,
# a decode step as long as a prefill kernel, and an idle-ish decode beside back-to-back prefill
SHAPES = "24x0.25+2,8x2+0;12x0.8+4,4x1+0;32x0.15+8,16x4+1"


def parse_shapes(text: str) -> list[tuple[tuple[int, float, float], tuple[int, float, float]]]:
    out = []
    for pair in text.split(";"):
        d, p = pair.split(",")
        out.append(tuple(_one(x) for x in (d, p)))
    return out


def _one(s: str) -> tuple[int, float, float]:
    k, rest = s.split("x")
    ms, gap = rest.split("+")
    return int(k), float(ms), float(gap)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


class Loop:
    def __init__(self, exe: Path, shape, seconds: float, start_ms: float, env: dict, role: str, forward: bool):
        k, ms, gap = shape
        argv = [str(exe), str(paths.emulator_kernel_library()), "0", str(k), str(ms), "--seconds", str(seconds),
                "--gap-ms", str(gap), "--start-ms", str(start_ms), "--warm-ms", str(ms)]
        run = [FLEXNPU, "run", "--role", role] + (["--forward"] if forward else []) + ["--"]
        self.busy_per_step = k * ms
        self.proc = subprocess.Popen(run + argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.steps: list[dict] = []
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("{"):
                m = json.loads(line)
                if "step" in m:
                    self.steps.append(m)

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.t.join(timeout=5)
        if self.proc.returncode != 0:
            raise RuntimeError(f"a loop exited {self.proc.returncode}: {self.proc.stderr.read()[-400:]}")


def run_case(exe, env, dshape, pshape, seconds, forward: bool, which: str) -> dict:
    start = time.clock_gettime(time.CLOCK_MONOTONIC) * 1000 + 800
    loops = {}
    if which in ("decode", "both"):
        loops["decode"] = Loop(exe, dshape, seconds, start, env, "decode", forward)
    if which in ("prefill", "both"):
        loops["prefill"] = Loop(exe, pshape, seconds, start, env, "prefill", forward)
    for lp in loops.values():
        lp.wait(seconds + 30)
    out = {}
    d = loops.get("decode")
    if d:
        st = [s["step_ms"] for s in d.steps]
        t0 = d.steps[0]["t0_ms"] if d.steps else 0
        first = [s["step_ms"] for s in d.steps if s["t0_ms"] - t0 < 1000]
        out["decode"] = {"steps": len(st), "p50_ms": statistics.median(st), "p99_ms": pct(st, 0.99),
                         "first_s_p99_ms": pct(first, 0.99), "max_ms": max(st)}
    p = loops.get("prefill")
    if p and d and d.steps and p.steps:
        lo = max(d.steps[0]["t0_ms"], p.steps[0]["t0_ms"])
        hi = min(d.steps[-1]["t0_ms"] + d.steps[-1]["step_ms"], p.steps[-1]["t0_ms"] + p.steps[-1]["step_ms"])
        win = hi - lo
        dbusy = sum(d.busy_per_step for s in d.steps if lo <= s["t0_ms"] and s["t0_ms"] + s["step_ms"] <= hi)
        pbusy = sum(p.busy_per_step for s in p.steps if lo <= s["t0_ms"] and s["t0_ms"] + s["step_ms"] <= hi)
        out["window_ms"] = win
        out["prefill_share_of_left"] = pbusy / max(1e-9, win - dbusy)
    if p:
        out["prefill"] = {"steps": len(p.steps), "p50_ms": statistics.median([s["step_ms"] for s in p.steps])}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--shapes", default=SHAPES, help="';'-separated decode,prefill pairs of KxMS+GAP")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    shapes = parse_shapes(a.shapes)
    tmp = Path(tempfile.mkdtemp(prefix="fxcol-"))
    exe = tmp / "engine_loop"
    subprocess.run(["gcc", "-O2", str(ENGINE), "-o", str(exe), "-I", str(paths.acl_include_dir()), "-L",
                    str(paths.native_lib_dir()), "-lascendcl", "-lm", "-pthread"], check=True)
    rdir = tmp / "rt"
    rdir.mkdir(mode=0o700)
    env = {**os.environ, **control.emulator_env(rdir), "FLEXNPU_RUNTIME_DIR": str(rdir)}
    control.start(1, "910b", "contexts", 1.0, rdir=rdir)
    daemon = subprocess.Popen([FLEXNPU, "daemon", "--device", "0"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    results = []
    try:
        deadline = time.monotonic() + 15
        while not paths.executor_socket(0, rdir).exists():
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError("the daemon did not start its executor")
            time.sleep(0.05)
        for dshape, pshape in shapes:
            row = {"decode_shape": dshape, "prefill_shape": pshape}
            alone = run_case(exe, env, dshape, pshape, a.seconds, True, "decode")["decode"]
            row["decode_alone"] = alone
            row["prefill_alone"] = run_case(exe, env, dshape, pshape, a.seconds, True, "prefill")["prefill"]
            for mode, fwd in (("forward", True), ("gated", False)):
                r = run_case(exe, env, dshape, pshape, a.seconds, fwd, "both")
                d = r["decode"]
                row[mode] = {**r, "decode_p50_x": d["p50_ms"] / alone["p50_ms"],
                             "decode_p99_x": d["p99_ms"] / alone["p99_ms"],
                             "decode_first_s_p99_x": d["first_s_p99_ms"] / alone["p99_ms"]}
            results.append(row)
            if not a.json:
                print(f"decode {dshape} beside prefill {pshape}: decode alone p50 {alone['p50_ms']:.2f} "
                      f"p99 {alone['p99_ms']:.2f} ms", flush=True)
                for mode in ("forward", "gated"):
                    m = row[mode]
                    print(f"  {mode:8s} decode p50 {m['decode_p50_x']:.3f}x  p99 {m['decode_p99_x']:.3f}x  "
                          f"first-second p99 {m['decode_first_s_p99_x']:.3f}x  "
                          f"prefill {100 * m.get('prefill_share_of_left', float('nan')):.1f}% of what decode leaves",
                          flush=True)
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        control.stop(rdir)
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"schema": 1, "machine": machine(), "seconds": a.seconds, "results": results,
           "targets": {"decode_p99_x": 1.05, "prefill_share_of_left": 0.90}}
    if a.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
