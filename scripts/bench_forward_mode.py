#!/usr/bin/env python3
"""Forward mode's costs, side by side in one run (scripts/bench_forward.py prints them as its
forward-mode lines; this script runs them alone):

  launch      added client-side cost per asynchronous launch (zero-work aclrtLaunchKernel,
              back to back): forwarded median - direct median (target <= 1 us)
  sync        round trip of a synchronous call (an idle stream's sync, the executor asleep
              before each) against the floor: a futex request and answer between two sleeping
              processes (target p99 <= 1.5x the floor's p99)
  small       kernels/s of 10 us kernels back to back on one stream, one client: forwarded /
              direct (target >= 0.90)
  cpu         the executor's CPU time while one client launches 10,000 zero-work kernels per
              second: CPU seconds per second (a share of one core)

Every variant is a separate process of tests/progs/fwd_rtt.c (an ordinary AscendCL program),
direct (the emulated libascendcl.so alone) or forwarded (libflexnpu_fwd.so preloaded), in
interleaved rounds on one emulator and one daemon, medians over rounds.

    .venv/bin/python scripts/bench_forward_mode.py [--rounds 5] [--json]
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flexnpu import paths  # noqa: E402
from flexnpu.bench.node import machine  # noqa: E402
from flexnpu.emulator import control  # noqa: E402
from flexnpu.emulator.profiles import PROFILES  # noqa: E402

PROG = Path(__file__).resolve().parent.parent / "tests" / "progs" / "fwd_rtt.c"
FLEXNPU = str(Path(sys.executable).with_name("flexnpu"))
KLIB = str(paths.emulator_kernel_library())
TARGETS = {"launch_added_ns": 1000, "sync_p99_x_floor": 1.5, "small_kernels_x": 0.90}


def _json(p: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"fwd_rtt exited {p.returncode}: {p.stdout[-300:]} {p.stderr[-300:]}")
    return json.loads(lines[-1])


def _cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def executor_pid(rdir: Path) -> int:
    for c in control.status(rdir)["devices"][0]["clients"]:
        try:
            if Path(f"/proc/{c['pid']}/exe").resolve().name == "flexnpu-executor":
                return c["pid"]
        except OSError:
            pass
    raise RuntimeError("no executor among the emulator's clients")


def measure(rounds: int = 5, quick: bool = False) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="fxfm-"))
    exe = tmp / "fwd_rtt"
    subprocess.run(["gcc", "-O2", str(PROG), "-o", str(exe), "-I", str(paths.acl_include_dir()), "-L",
                    str(paths.native_lib_dir()), "-lascendcl", "-pthread"], check=True)
    rdir = tmp / "rt"
    rdir.mkdir(mode=0o700)
    env = {**os.environ, **control.emulator_env(rdir), "FLEXNPU_RUNTIME_DIR": str(rdir)}
    fwd = {**env, "LD_PRELOAD": str(paths.forward_shim_library())}
    control.start(1, "910b", "contexts", 1.0, rdir=rdir)
    daemon = subprocess.Popen([FLEXNPU, "daemon", "--device", "0"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    prof = PROFILES["910b"]
    flops_10us = prof.peak_tflops * 1e12 * 10e-6
    n_launch, n_sync, n_small = (2000, 300, 20000) if quick else (5000, 1000, 50000)
    out: dict = {"launch": {"direct": [], "forward": []}, "sync": {"direct": [], "forward": [], "floor": []},
                 "small": {"direct": [], "forward": []}}
    try:
        deadline = time.monotonic() + 15
        while not paths.executor_socket(0, rdir).exists():
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError("the daemon did not start its executor")
            time.sleep(0.05)
        run = lambda args, e: _json(subprocess.run([str(exe), *map(str, args)], env=e, capture_output=True,
                                                    text=True, timeout=300))
        for r in range(rounds):
            order = [("direct", env), ("forward", fwd)] if r % 2 == 0 else [("forward", fwd), ("direct", env)]
            for name, e in order:
                out["launch"][name].append(run([KLIB, "launch", n_launch, 9], e)["median_ns"])
                out["sync"][name].append(run([KLIB, "sync", n_sync], e))
                out["small"][name].append(run([KLIB, "small", n_small, flops_10us], e)["kernels_per_s"])
            out["sync"]["floor"].append(run(["-", "floor", n_sync], env))
        # the executor's CPU at 10k launches/s (forwarded), against the client's own
        ex = executor_pid(rdir)
        c0 = _cpu_s(ex)
        t0 = time.monotonic()
        p = subprocess.Popen([str(exe), KLIB, "rate", "10000", "3" if quick else "5"], env=fwd,
                             stdout=subprocess.PIPE, text=True)
        res = json.loads(p.communicate(timeout=120)[0].splitlines()[-1])
        wall = time.monotonic() - t0
        cpu = _cpu_s(ex) - c0
        out["cpu"] = {"launches": res["launches"], "wall_s": res["wall_s"], "executor_cpu_s": round(cpu, 3),
                      "executor_cpu_per_s": round(cpu / wall, 3)}
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        control.stop(rdir)
        shutil.rmtree(tmp, ignore_errors=True)
    med = statistics.median
    launch = {k: med(v) for k, v in out["launch"].items()}
    sync = {k: {"p50_us": med(x["p50_us"] for x in v), "p99_us": med(x["p99_us"] for x in v)}
            for k, v in out["sync"].items()}
    small = {k: med(v) for k, v in out["small"].items()}
    return {
        "schema": 1, "machine": machine(), "rounds": rounds,
        "launch_ns": launch, "launch_added_ns": launch["forward"] - launch["direct"],
        "sync_us": sync, "sync_p99_x_floor": sync["forward"]["p99_us"] / sync["floor"]["p99_us"],
        "small_kernels_per_s": small, "small_kernels_x": small["forward"] / small["direct"],
        "executor_cpu": out["cpu"], "targets": TARGETS,
    }


def lines(r: dict) -> list[str]:
    s = r["sync_us"]
    return [
        f"forward, async launch: {r['launch_ns']['forward']:.0f} ns per call vs direct {r['launch_ns']['direct']:.0f} "
        f"ns: added {r['launch_added_ns']:.0f} ns (target <= {TARGETS['launch_added_ns']} ns)",
        f"forward, sync round trip: p50 {s['forward']['p50_us']:.1f} us, p99 {s['forward']['p99_us']:.1f} us; "
        f"futex request+answer floor p50 {s['floor']['p50_us']:.1f}, p99 {s['floor']['p99_us']:.1f} us: "
        f"p99 {r['sync_p99_x_floor']:.2f}x (target <= {TARGETS['sync_p99_x_floor']}x); direct sync p99 "
        f"{s['direct']['p99_us']:.1f} us",
        f"forward, 10 us kernels: {r['small_kernels_per_s']['forward']:.0f}/s vs direct "
        f"{r['small_kernels_per_s']['direct']:.0f}/s: {r['small_kernels_x']:.3f}x (target >= {TARGETS['small_kernels_x']})",
        f"forward, executor CPU at 10k launches/s: {r['executor_cpu']['executor_cpu_per_s']:.3f} s per s "
        f"({r['executor_cpu']['launches']} launches in {r['executor_cpu']['wall_s']:.1f} s)",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    r = measure(a.rounds, a.quick)
    print(json.dumps(r, indent=1) if a.json else "\n".join(lines(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
