#!/usr/bin/env python3
"""Benchmark of the FlexNPU emulated Ascend device: what a launch costs the caller, and how
closely measured kernel times follow the performance model.

    python3 scripts/bench_emulator.py [--json] [--quick] [--profile 910b] [--no-contexts]

It builds tests/progs/acl_workload.c (an ordinary AscendCL program) into a temp dir, starts
its own device server in a temp runtime dir (always stopped at the end), and measures

  - launch cost: ns spent in each aclrtLaunchKernel call of a tiny kernel (p50/p99);
  - model accuracy: synthetic kernels modelled at 50 us .. 20 ms, compute-bound and
    memory-bound, timed by wall clock around launch+synchronize of a batch, and by events;
  - one kernel's launch-to-sync wall time against the model's (launch latency + kernel);
  - contexts mode (the default): streams of one process sharing cube and vector cores by
    blockDim, and two processes taking turns, measured against the model's analytic times,
    ratios side by side; and the cost of the context switch, swept over --switch-us values.

Prints a table, or with --json one JSON object with "schema": 1. Results: docs/emulator.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKLOAD_SRC = REPO / "tests" / "progs" / "acl_workload.c"

try:
    from flexnpu import SCHEMA, paths
    from flexnpu.emulator import control
    from flexnpu.emulator.profiles import PROFILES
    from flexnpu.bench.node import machine
except ImportError:
    sys.exit("bench_emulator: flexnpu is not installed; run `pip install .` in the repository first")

FULL_SIZES_MS = [0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0]
QUICK_SIZES_MS = [0.05, 0.5, 2.0, 20.0]
# contexts mode: the synthetic built-in under one name per core class (the library's last word)
CORE_LIBRARY = ("flexnpu-kernels 1\nkernel cube_k synthetic cube\nkernel vector_k synthetic vector\n"
                "kernel mix_k synthetic mix\n")
FULL = 48  # a blockDim that fills every class (24 cube, 48 vector cores)
SWITCH_SWEEP_US = [0.0, 20.0, 50.0, 100.0, 200.0, 500.0]


def build_workload(out_dir: Path) -> Path:
    if shutil.which("gcc") is None:
        sys.exit("bench_emulator: gcc is needed to build the workload program (apt-get install gcc)")
    exe = out_dir / "acl_workload"
    cmd = ["gcc", "-O2", str(WORKLOAD_SRC), "-o", str(exe), "-I", str(paths.acl_include_dir()),
           "-L", str(paths.native_lib_dir()), "-lascendcl", "-lm", "-pthread"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench_emulator: building {WORKLOAD_SRC.name} failed:\n{r.stderr}")
    return exe


def run_json(argv: list, env: dict) -> dict:
    r = subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        sys.exit(f"bench_emulator: {' '.join(map(str, argv[:2]))} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return json.loads(lines[-1])


def launch_cost(exe: Path, klib: Path, env: dict, n: int, runs: int) -> dict:
    results = [run_json([exe, "launchcost", klib, n], env) for _ in range(runs)]
    med = {k: statistics.median(r[k] for r in results) for k in ("p50_ns", "p90_ns", "p99_ns", "mean_ns")}
    return {"calls_per_run": n, "runs": runs, "p50_us": med["p50_ns"] / 1e3, "p90_us": med["p90_ns"] / 1e3,
            "p99_us": med["p99_ns"] / 1e3, "mean_us": med["mean_ns"] / 1e3,
            "max_us": max(r["max_ns"] for r in results) / 1e3}


def sweep(exe: Path, klib: Path, env: dict, sizes_ms: list[float], reps: int, batch_ms: float, profile) -> list[dict]:
    peak, hbm = profile.peak_tflops * 1e12, profile.hbm_tbps * 1e12
    rows = []
    for bound in ("compute", "memory"):
        for ms in sizes_ms:
            flops, nbytes = (peak * ms / 1e3, 0.0) if bound == "compute" else (0.0, hbm * ms / 1e3)
            n = max(3, math.ceil(batch_ms / ms))
            batch = run_json([exe, "timing", klib, repr(flops), repr(nbytes), n, "--reps", reps], env)
            single = run_json([exe, "timing", klib, repr(flops), repr(nbytes), 1, "--reps", reps], env)
            wall = statistics.median(batch["wall_ms"]) / n
            event = statistics.median(batch["event_ms"]) / n
            one = statistics.median(single["wall_ms"])
            one_model = ms + profile.launch_us / 1e3
            rows.append({
                "bound": bound, "modelled_ms": ms, "batch": n, "reps": reps,
                "wall_ms_per_kernel": wall, "wall_error_pct": 100 * (wall - ms) / ms,
                "event_ms_per_kernel": event, "event_error_pct": 100 * (event - ms) / ms,
                "single_wall_ms": one, "single_modelled_ms": one_model,
                "single_overhead_us": 1e3 * (one - one_model),
            })
    return rows


def together(exe: Path, env: dict, jobs: list[list], lead_s: float = 0.5) -> list[dict]:
    """Runs one program per argv in jobs, all starting their timed part at one CLOCK_MONOTONIC
    instant (--start-at); their last JSON objects."""
    start_at = time.monotonic_ns() + int(lead_s * 1e9)
    procs = [subprocess.Popen([str(a) for a in [exe, *job, "--start-at", start_at]], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for job in jobs]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            sys.exit(f"bench_emulator: a co-running process failed ({p.returncode}): {stdout}{stderr}")
        out.append(json.loads(lines[-1]))
    return out


def contexts_cases(exe: Path, klib: Path, env: dict, rdir: Path, profile, reps: int) -> list[dict]:
    """Measured against analytic, per case: medians of reps runs."""
    peak, hbm = profile.peak_tflops * 1e12, profile.hbm_tbps * 1e12
    f2, h2 = peak * 2e-3, hbm * 2e-3
    sw = profile.context_switch_us / 1e3
    streams = [  # (case, kernel 1, blockDim 1, kernel 2, blockDim 2, analytic ms: 5 x 2 ms on each stream)
        ("cube + vector, full: side by side", "cube_k", FULL, "vector_k", FULL, 10.0),
        ("cube + cube, full: in turn", "cube_k", FULL, "cube_k", FULL, 20.0),
        ("cube + cube, 12/24 each: half speed", "cube_k", 12, "cube_k", 12, 20.0),
        ("cube + cube, 6/24 each: 1/4 speed", "cube_k", 6, "cube_k", 6, 40.0),
        ("mix + vector, full: in turn", "mix_k", FULL, "vector_k", FULL, 20.0),
        ("mix 12 + vector 24/48: side by side", "mix_k", 12, "vector_k", 24, 20.0),
    ]
    rows = []
    for case, k1, b1, k2, b2, want in streams:
        got = [max(run_json([exe, "corun", klib, f2, 0, f2, 0, 5, "--kernel", k1, "--kernel2", k2,
                             "--block-dim", b1, "--block-dim2", b2], env)["event_ms"]) for _ in range(reps)]
        rows.append({"case": "2 streams: " + case, "analytic_ms": want, "measured_ms": statistics.median(got)})
    for case, bd, want in (("cube at blockDim 8/24", 8, 3 * 6.0), ("cube at blockDim 96 (waves)", 96, 3 * 2.0)):
        got = [statistics.median(run_json([exe, "timing", klib, f2, 0, 3, "--kernel", "cube_k", "--block-dim", bd,
                                           "--reps", 3], env)["event_ms"]) for _ in range(reps)]
        rows.append({"case": "1 stream: " + case, "analytic_ms": want, "measured_ms": statistics.median(got)})
    got, switches = [], []
    for _ in range(reps):
        before = control.status(rdir)["devices"][0]["context_switches"]
        res = together(exe, env, [["timing", klib, f2, 0, 10, "--kernel", "mix_k"],
                                  ["timing", klib, 0, h2, 10, "--kernel", "mix_k"]])
        switches.append(control.status(rdir)["devices"][0]["context_switches"] - before)
        got.append((max(r["t_end_ns"] for r in res) - min(r["t_start_ns"] for r in res)) / 1e6)
    n_sw = statistics.median(switches)
    rows.append({"case": f"2 processes, 2 x 10 x 2 ms: {n_sw:g} switches", "analytic_ms": 40.0 + n_sw * sw,
                 "measured_ms": statistics.median(got)})
    for r in rows:
        r["ratio"] = r["measured_ms"] / r["analytic_ms"]
    return rows


def switch_sweep(exe: Path, klib: Path, env: dict, rdir: Path, args, kernel_ms: float, n: int) -> list[dict]:
    """Two processes, n kernels of kernel_ms each, taking turns, at each switch cost: the
    makespan against the model's (2 n kernel_ms + switches x cost)."""
    profile = PROFILES[args.profile]
    flops = profile.peak_tflops * 1e12 * kernel_ms / 1e3
    rows = []
    for us in SWITCH_SWEEP_US:
        control.start(devices=1, profile=args.profile, rdir=rdir, context_switch_us=us)
        try:
            res = together(exe, env, [["timing", klib, flops, 0, n, "--kernel", "mix_k"]] * 2)
            switches = control.status(rdir)["devices"][0]["context_switches"]
        finally:
            control.stop(rdir)
        span = (max(r["t_end_ns"] for r in res) - min(r["t_start_ns"] for r in res)) / 1e6
        want = 2 * n * kernel_ms + switches * us / 1e3
        rows.append({"switch_us": us, "kernel_ms": kernel_ms, "kernels": 2 * n, "switches": switches,
                     "measured_ms": span, "analytic_ms": want, "ratio": span / want,
                     "device_share": 2 * n * kernel_ms / span})
    return rows


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=None if sys.stdout.isatty() else 100)
    m, lc = result["machine"], result["launch"]
    con.print(f"[bold]FlexNPU emulator benchmark[/], profile {result['profile']}: {m['os']}, "
              f"kernel {m['kernel']}, {m['cpus']} CPUs ({m['cpu']})")
    con.print(f"aclrtLaunchKernel call: p50 {lc['p50_us']:.2f} us, p90 {lc['p90_us']:.2f} us, "
              f"p99 {lc['p99_us']:.2f} us, mean {lc['mean_us']:.2f} us "
              f"({lc['runs']} x {lc['calls_per_run']} calls)")
    t = Table(title="modelled vs measured time per kernel (median of reps)")
    for col in ("bound", "model us", "batch", "wall us", "err %", "event us", "err %", "1-kernel us",
                "extra us"):
        t.add_column(col, justify="left" if col == "bound" else "right")
    for r in result["sweep"]:
        t.add_row(r["bound"], f"{r['modelled_ms'] * 1e3:.0f}", str(r["batch"]),
                  f"{r['wall_ms_per_kernel'] * 1e3:.1f}", f"{r['wall_error_pct']:+.2f}",
                  f"{r['event_ms_per_kernel'] * 1e3:.1f}", f"{r['event_error_pct']:+.2f}",
                  f"{r['single_wall_ms'] * 1e3:.1f}", f"{r['single_overhead_us']:+.1f}")
    con.print(t)
    con.print("wall: launch+synchronize of a batch / batch size; event: aclrtEventElapsedTime around the "
              "batch / batch size; 1-kernel: launch-to-synchronize wall time of one kernel; extra: that "
              "less the model's launch latency + kernel time")
    if result.get("contexts"):
        t = Table(title="contexts mode: measured vs analytic (2 ms kernels, 5 a stream)")
        for col in ("case", "analytic ms", "measured ms", "ratio"):
            t.add_column(col, justify="left" if col == "case" else "right")
        for r in result["contexts"]:
            t.add_row(r["case"], f"{r['analytic_ms']:.2f}", f"{r['measured_ms']:.2f}", f"{r['ratio']:.3f}")
        con.print(t)
        con.print("streams: the later stream's events; 1 stream: events around 3 kernels; processes: wall "
                  "clock from the first start to the last end, against 40 ms + switches x the switch cost")
    if result.get("switch_sweep"):
        t = Table(title="context switch cost: 2 processes taking turns (wall makespan)")
        for col in ("switch us", "kernels", "switches", "analytic ms", "measured ms", "ratio", "device busy"):
            t.add_column(col, justify="right")
        for r in result["switch_sweep"]:
            t.add_row(f"{r['switch_us']:g}", f"{r['kernels']} x {r['kernel_ms'] * 1e3:g} us", str(r["switches"]),
                      f"{r['analytic_ms']:.2f}", f"{r['measured_ms']:.2f}", f"{r['ratio']:.3f}",
                      f"{100 * r['device_share']:.0f} %")
        con.print(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and calls (a few seconds)")
    ap.add_argument("--profile", default="910b", choices=sorted(PROFILES), help="device profile")
    ap.add_argument("--no-contexts", action="store_true", help="skip the contexts-mode cases and the switch sweep")
    args = ap.parse_args()
    if not paths.emulator_server_binary().exists():
        sys.exit(f"bench_emulator: {paths.emulator_server_binary()} is missing; run `pip install .`")

    sizes = QUICK_SIZES_MS if args.quick else FULL_SIZES_MS
    reps, calls, runs, batch_ms = (3, 20000, 1, 20.0) if args.quick else (5, 100000, 3, 40.0)
    with tempfile.TemporaryDirectory(prefix="fxbench-") as tmp:
        tmp = Path(tmp)
        exe = build_workload(tmp)
        rdir = tmp / "rt"
        env = {**os.environ, **control.emulator_env(rdir), "FLEXNPU_RUNTIME_DIR": str(rdir)}
        klib = paths.emulator_kernel_library()
        cores = tmp / "cores.fxk"
        cores.write_text(CORE_LIBRARY)
        cases, sweep_rows = [], []
        control.start(devices=1, profile=args.profile, rdir=rdir)  # contexts: one process runs as serial
        try:
            launch = launch_cost(exe, klib, env, calls, runs)
            rows = sweep(exe, klib, env, sizes, reps, batch_ms, PROFILES[args.profile])
            if not args.no_contexts:
                cases = contexts_cases(exe, cores, env, rdir, PROFILES[args.profile], 1 if args.quick else 3)
        finally:
            control.stop(rdir)
        if not args.no_contexts:
            sweep_rows = switch_sweep(exe, cores, env, rdir, args, 0.2, 10 if args.quick else 50)
    result = {"schema": SCHEMA, "profile": args.profile, "quick": args.quick, "machine": machine(),
              "command": "python3 scripts/bench_emulator.py" + (" --quick" if args.quick else ""),
              "launch": launch, "sweep": rows, "contexts": cases, "switch_sweep": sweep_rows}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        render(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
