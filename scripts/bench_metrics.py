#!/usr/bin/env python3
"""Benchmark of the observer's metrics endpoint (run as root, after `bash scripts/setup.sh`):

1. the time one scrape of `flexnpu observe --metrics` takes over HTTP, and the size of its
   text, with N live processes on a device (tests/progs/metrics_short.c --hold: each made
   its calls and holds a page of device memory), on a LocalNode with the BPF observer at
   100 ms snapshots; the emulator admits at most 64 live processes per user, hence the
   default counts;
2. the collector alone (no HTTP) on a state fed snapshots of S synthetic processes, for
   counts a real node of many processes would have.

    .venv/bin/python scripts/bench_metrics.py [--processes 10,30,60] [--synthetic 1000,10000] [--json]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from flexnpu import paths
from flexnpu.bench.node import LocalNode, machine, wait_for

REPO = Path(__file__).resolve().parent.parent
DEV = 11  # a device index other nodes on the machine are unlikely to use


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def process_series(text: str) -> int:
    return sum(1 for line in text.splitlines()
               if line.startswith("flexnpu_process_launches_total{") and f'id="{DEV}"' in line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", default="10,30,60", help="comma list of live process counts")
    ap.add_argument("--synthetic", default="1000,10000", help="comma list of synthetic process counts")
    ap.add_argument("--scrapes", type=int, default=20, help="scrapes timed at each count")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    a = ap.parse_args()
    counts = [int(x) for x in a.processes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
    exe = tmp / "metrics_short"
    subprocess.run(["gcc", "-O2", str(REPO / "tests" / "progs" / "metrics_short.c"), "-o", str(exe),
                    "-I", str(paths.acl_include_dir()), "-L", str(paths.native_lib_dir()), "-lascendcl"], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/metrics"
    rows = []
    with LocalNode(devices=DEV + 1, observer="bpf", observe_interval_ms=100, daemons=False,
                   observe_args=["--metrics", f"127.0.0.1:{port}"]) as node:
        wait_for(lambda: _ok(url), 60, "the metrics endpoint")
        env = node.program_env(shim=False)
        for n in counts:
            procs = [subprocess.Popen([str(exe), str(paths.emulator_kernel_library()), str(DEV), "--hold"], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for _ in range(n)]
            try:
                for p in procs:
                    line = p.stdout.readline()
                    if not line:
                        p.wait(30)
                        raise SystemExit(f"metrics_short exited {p.returncode}: {p.stderr.read().strip()}")
                wait_for(lambda: process_series(scrape(url)) == n, 60, f"{n} process series", interval=0.2)
                times, size = [], 0
                for _ in range(a.scrapes):
                    t0 = time.perf_counter()
                    text = scrape(url)
                    times.append((time.perf_counter() - t0) * 1e3)
                    size = len(text)
                    time.sleep(0.05)
                rows.append({"processes": n, "scrape_ms_median": round(statistics.median(times), 2),
                             "scrape_ms_max": round(max(times), 2), "bytes": size,
                             "series": sum(1 for line in text.splitlines() if line and not line.startswith("#"))})
            finally:
                for p in procs:
                    try:
                        p.stdin.close()
                    except OSError:
                        pass
                for p in procs:
                    try:
                        p.wait(30)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
                    p.stdout.close()
                    p.stderr.close()
    synth = [collect_synthetic(int(x), a.scrapes) for x in a.synthetic.split(",") if x]
    result = {"schema": 1, "machine": machine(), "interval_ms": 100, "results": rows, "synthetic": synth}
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'processes':>9} {'scrape ms (median)':>18} {'max':>8} {'bytes':>9} {'series':>7}")
        for r in rows:
            print(f"{r['processes']:>9} {r['scrape_ms_median']:>18} {r['scrape_ms_max']:>8} {r['bytes']:>9} {r['series']:>7}")
        print(f"{'synthetic':>9} {'collect ms (median)':>18} {'max':>8} {'bytes':>9} {'series':>7}")
        for r in synth:
            print(f"{r['processes']:>9} {r['collect_ms_median']:>18} {r['collect_ms_max']:>8} {r['bytes']:>9} {r['series']:>7}")
    return 0


def collect_synthetic(n: int, repeat: int) -> dict:
    """The collector's own time (generate_latest, as a scrape runs it) for n processes."""
    from prometheus_client import generate_latest

    from flexnpu.observe.metrics import MetricsState, registry

    procs = [{"pid": 100000 + i, "device": i % 8, "comm": f"engine-{i}", "role": "decode" if i % 2 else "prefill",
              "phase": "decode", "phase_source": "shape",
              "counters": {"launches": 1000 + i, "bytes": {"h2d": 4096 * i, "d2h": 4096, "d2d": 0}, "mem_bytes": 1 << 20},
              "rates": {"busy": 0.5, "sync_wait": 0.1}} for i in range(n)]
    devs = [{"device": d, "pids": [p["pid"] for p in procs if p["device"] == d], "mem_bytes": 1 << 30,
             "phase_occupancy": {"prefill": 0.3, "decode": 0.5, "idle": 0.2}} for d in range(8)]
    st = MetricsState()
    st.update({"source": "bpf", "interval_s": 0.1, "processes": procs, "devices": devs})
    reg = registry(st)
    times, text = [], b""
    for _ in range(repeat):
        t0 = time.perf_counter()
        text = generate_latest(reg)
        times.append((time.perf_counter() - t0) * 1e3)
    lines = text.decode().splitlines()
    return {"processes": n, "collect_ms_median": round(statistics.median(times), 2),
            "collect_ms_max": round(max(times), 2), "bytes": len(text),
            "series": sum(1 for line in lines if line and not line.startswith("#"))}


def _ok(url: str) -> bool:
    try:
        scrape(url)
        return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
