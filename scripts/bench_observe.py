#!/usr/bin/env python3
"""Benchmark of the observer (run as root, from the repository, after `pip install .`):

1. per-call cost of probed AscendCL calls, side by side in one run: no probe, an empty
   uprobe (a bcc program whose probes return 0, on the same symbols, with a return probe
   wherever FlexNPU has one: the floor any uprobe pays), and FlexNPU's probes; reported
   as ns per call and as ratios to the empty uprobe;
2. CPU used by the observer's Python process (`flexnpu observe`, 100 ms snapshots) while
   processes make calls at a sustained high rate, from /proc/<pid>/stat; and the same for
   `flexnpu attach --trace`, where Python handles every event;
3. with --accuracy, phase inference against the emulator's ground truth, per signal source
   (aclnn operators, kernel names, iteration shape), on engine loops it was not built
   beside and on the project's own loops (flexnpu/bench/accuracy.py).

    .venv/bin/python scripts/bench_observe.py [--json] [--accuracy]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flexnpu import paths  # noqa: E402
from flexnpu.emulator import control  # noqa: E402
from flexnpu.bench import accuracy  # noqa: E402
from flexnpu.bench.node import machine  # noqa: E402
from flexnpu.observe.bpf import ProbeSession, load_bcc  # noqa: E402
from flexnpu.observe.probegen import ProbeConfig, build  # noqa: E402

KINDS = ("launch", "memcpy", "sync", "malloc_free")
EMPTY = "int fx_empty(struct pt_regs *ctx) { return 0; }\n"


def compile_prog(name: str, out: Path) -> Path:
    exe = out / name
    cmd = ["gcc", "-O2", str(REPO / "tests" / "progs" / f"{name}.c"), "-o", str(exe),
           "-I", str(paths.acl_include_dir()), "-L", str(paths.native_lib_dir()), "-lascendcl", "-ldl", "-lm",
           "-pthread"]
    subprocess.run(cmd, check=True)
    return exe


class EmptyProbes:
    """Uprobes that do nothing, on the symbols (and with the return probes) FlexNPU uses."""

    def __init__(self, lib: str) -> None:
        bcc = load_bcc()
        self.bpf = bcc.BPF(text=EMPTY.encode())
        for p in build().probes:
            if p.library != "libascendcl.so":
                continue
            if p.return_fn:
                self.bpf.attach_uretprobe(name=lib.encode(), sym=p.symbol.encode(), fn_name=b"fx_empty")
            self.bpf.attach_uprobe(name=lib.encode(), sym=p.symbol.encode(), fn_name=b"fx_empty")

    def close(self) -> None:
        self.bpf.cleanup()


def call_costs(exe: Path, klib: Path, env: dict, calls: int, rounds: int, repeat: int) -> dict:
    """Median over `repeat` runs of each configuration, the configurations interleaved."""
    lib = str(paths.emulator_library())
    runs: dict[str, dict[str, list[float]]] = {c: {k: [] for k in KINDS} for c in ("none", "empty", "flexnpu")}
    for _ in range(repeat):
        for config in ("none", "empty", "flexnpu"):
            probes = None
            if config == "empty":
                probes = EmptyProbes(lib)
            elif config == "flexnpu":
                probes = ProbeSession(ProbeConfig())
                probes.attach(lib, "libascendcl.so")
            try:
                out = subprocess.run([str(exe), str(klib), str(calls), str(rounds)], env=env, check=True,
                                     capture_output=True, text=True).stdout
            finally:
                if probes is not None:
                    probes.close()
            for line in out.splitlines():
                d = json.loads(line)
                runs[config][d["call"]].append(d["median"])
    res = {}
    for k in KINDS:
        none, empty, fx = (statistics.median(runs[c][k]) for c in ("none", "empty", "flexnpu"))
        res[k] = {"none_ns": round(none, 1), "empty_uprobe_ns": round(empty, 1), "flexnpu_ns": round(fx, 1),
                  "ratio_to_empty": round(fx / empty, 3),
                  "overhead_ratio_to_empty": round((fx - none) / (empty - none), 3) if empty > none else None}
    return res


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _first_snapshot(rdir: Path, timeout_ms: int = 60000) -> None:
    import zmq

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc://{rdir / 'observe.sock'}")
    try:
        sub.recv()
    finally:
        sub.close(0)
        ctx.term()


def observer_cpu(spin: Path, klib: Path, env: dict, rdir: Path, procs: int, seconds: float, mode: str) -> dict:
    """CPU of `flexnpu observe` (mode "observe") or `flexnpu attach --trace` (mode "trace")
    while `procs` processes make probed calls as fast as they can for `seconds`."""
    tmp = Path(tempfile.mkdtemp(prefix="fxbench-"))
    cli = [sys.executable, "-m", "flexnpu.cli"]
    delay = 0.0 if mode == "observe" else 4.0
    workers: list[subprocess.Popen] = []
    obs = None
    try:
        if mode == "observe":
            obs = subprocess.Popen([*cli, "observe", "--interval-ms", "100"], env={**env, "PYTHONPATH": str(REPO)},
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _first_snapshot(rdir)  # attached
        workers = [subprocess.Popen([str(spin), str(klib), "--spin", str(seconds), str(delay)], env=env,
                                    stdout=subprocess.PIPE, text=True) for _ in range(procs)]
        if mode == "trace":
            time.sleep(0.3)  # the worker maps the runtime (linked: from its start)
            obs = subprocess.Popen([*cli, "attach", str(workers[0].pid), "0.1", "--trace", str(tmp / "t.json")],
                                   env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            time.sleep(delay - 0.3)
        c0, t0 = cpu_seconds(obs.pid), time.monotonic()
        calls = sum(json.loads(w.communicate()[0])["calls"] for w in workers)
        c1, t1 = cpu_seconds(obs.pid), time.monotonic()
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        if obs is not None:
            obs.send_signal(signal.SIGINT)
            obs.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"mode": mode, "processes": procs, "calls_per_s": round(calls / seconds),
            "cpu_percent": round(100 * (c1 - c0) / (t1 - t0), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--calls", type=int, default=2000, help="calls per round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each configuration, interleaved")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each CPU measurement")
    ap.add_argument("--procs", type=int, default=2, help="processes making calls in the CPU measurement")
    ap.add_argument("--accuracy", action="store_true", help="also measure the phase classifier")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_observe.py: run it as root (it loads BPF)", file=sys.stderr)
        return 1
    rdir = Path(tempfile.mkdtemp(prefix="fxbench-rt-"))
    out = Path(tempfile.mkdtemp(prefix="fxbench-bin-"))
    control.start(1, rdir=rdir)
    try:
        env = {**os.environ, **control.emulator_env(rdir)}
        klib = paths.emulator_kernel_library()
        cost_exe = compile_prog("obs_callcost", out)
        result = {"schema": 1, "machine": machine(),
                  "call_cost": call_costs(cost_exe, klib, env, a.calls, a.rounds, a.repeat),
                  "observer_cpu": [observer_cpu(cost_exe, klib, env, rdir, a.procs, a.seconds, "observe"),
                                   observer_cpu(cost_exe, klib, env, rdir, 1, a.seconds, "trace")]}
        if a.accuracy:
            programs = {"phases": compile_prog("obs_phases", out), "engine": compile_prog("obs_engine", out)}
            opapi = accuracy.opapi_library()
            env["FLEXNPU_EMU_KERNELS"] = str(klib)
            session = ProbeSession(ProbeConfig())
            session.attach(str(paths.emulator_library()), "libascendcl.so")
            session.attach(str(opapi), "libopapi.so")
            try:
                fxk = accuracy.kernel_library(out)
                rs = accuracy.run_all(programs, fxk, env, rdir, session, opapi)
            finally:
                session.close()
            result["accuracy"] = {"interval_ms": 100, "by_source": accuracy.summary(rs),
                                  "scenarios": [x.as_dict() for x in rs]}
    finally:
        control.stop(rdir)
        shutil.rmtree(rdir, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['cpus']} CPUs, kernel {m['kernel']}")
    print(f"\nper-call cost, ns (median of {a.repeat} runs x {a.rounds} rounds x {a.calls} calls)")
    print(f"{'call':<12} {'no probe':>9} {'empty':>9} {'flexnpu':>9} {'/empty':>7} {'extra/empty':>12}")
    for k, r in result["call_cost"].items():
        extra = r["overhead_ratio_to_empty"]
        print(f"{k:<12} {r['none_ns']:>9.0f} {r['empty_uprobe_ns']:>9.0f} {r['flexnpu_ns']:>9.0f} "
              f"{r['ratio_to_empty']:>7.2f} {'N/A' if extra is None else f'{extra:.2f}':>12}")
    print("\nobserver CPU at a sustained call rate")
    for r in result["observer_cpu"]:
        print(f"  {r['mode']:<8} {r['processes']} process(es), {r['calls_per_s']:>8} calls/s: "
              f"{r['cpu_percent']:.1f}% of one CPU")
    if "accuracy" in result:
        acc = result["accuracy"]
        print("\nphase inference, accuracy per 100 ms interval, by signal source")
        for k, v in acc["by_source"].items():
            print(f"  {k:<14} {v['accuracy']:.1%} of {v['intervals']}")
        for s in acc["scenarios"]:
            srcs = "  ".join(f"{k} {s[k]['accuracy']:.0%}" for k in accuracy.SOURCES if k in s)
            print(f"  {s['scenario']:<18} {s['mode']:<6} {s['intervals']:>3}  {srcs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
