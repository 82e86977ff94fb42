#!/usr/bin/env python3
"""Benchmark of the emulator's IPC memory calls: what an export, an import and the closes cost
two real processes, for an allocation never written and for one written whole.

    python3 scripts/bench_emu_ipc.py [--json] [--reps 3] [--gib 1]

It builds tests/progs/ipc_peer.c (an ordinary AscendCL program) into a temp dir, starts its
own device server in a temp runtime dir (always stopped at the end), and times, per case and
rep, the call round trips as the peers see them: aclrtIpcMemGetExportKey, SetImportPid,
ImportByKey, then both closes and the free. The importer reads the exporter's bytes back
each time (checked, not timed). Prints one line per case (medians of the reps), or with
--json one JSON object with "schema": 1. Results: docs/emulator.md, "IPC memory".
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

REPO = Path(__file__).resolve().parent.parent
PEER_SRC = REPO / "tests" / "progs" / "ipc_peer.c"

try:
    from flexnpu import SCHEMA, paths
    from flexnpu.bench.node import machine
    from flexnpu.emulator import control
except ImportError:
    sys.exit("bench_emu_ipc: flexnpu is not installed; run `pip install .` in the repository first")


class Peer:
    def __init__(self, exe: Path, env: dict) -> None:
        self.p = subprocess.Popen([str(exe)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  bufsize=1)
        self.pid = self.p.pid
        if not json.loads(self.p.stdout.readline()).get("ready"):
            raise SystemExit("bench_emu_ipc: the peer could not open the device")

    def ask(self, cmd: str) -> dict:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        out = json.loads(self.p.stdout.readline())
        if out.get("rc", 0) != 0:
            raise SystemExit(f"bench_emu_ipc: {cmd.split()[0]} failed: {out}")
        return out

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=10)


def one(a: Peer, b: Peer, size: int, written: int) -> dict:
    h = a.ask(f"malloc {size}")["h"]
    if written:
        a.ask(f"memset {h} 0 {written} 7")
    t = [time.perf_counter()]
    key = a.ask(f"export {h} 0 {size} 0")["key"]
    t.append(time.perf_counter())
    a.ask(f"setpid {key} {b.pid}")
    t.append(time.perf_counter())
    hb = b.ask(f"import {key} 0 {size}")["h"]
    t.append(time.perf_counter())
    if b.ask(f"read {hb} 0 4096")["first"] != (7 if written else 0):
        raise SystemExit("bench_emu_ipc: the importer does not see the exporter's bytes")
    t0 = time.perf_counter()
    b.ask(f"close {key}")
    a.ask(f"close {key}")
    a.ask(f"free {h}")
    t1 = time.perf_counter()
    return {"export_ms": (t[1] - t[0]) * 1e3, "set_pid_ms": (t[2] - t[1]) * 1e3,
            "import_ms": (t[3] - t[2]) * 1e3, "close_free_ms": (t1 - t0) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gib", type=int, default=1, help="size of the large allocation, GiB")
    o = ap.parse_args()
    if shutil.which("gcc") is None:
        sys.exit("bench_emu_ipc: gcc is needed to build the peer program (apt-get install gcc)")
    gib = o.gib << 30
    cases = [("never written", gib, 0), ("64 MiB written", 64 << 20, 64 << 20), ("all written", gib, gib)]
    with tempfile.TemporaryDirectory(prefix="fxipc-") as td:
        exe = Path(td) / "ipc_peer"
        r = subprocess.run(["gcc", "-O2", str(PEER_SRC), "-o", str(exe), "-I", str(paths.acl_include_dir()),
                            "-L", str(paths.native_lib_dir()), "-lascendcl"], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"bench_emu_ipc: building {PEER_SRC.name} failed:\n{r.stderr}")
        rdir = Path(tempfile.mkdtemp(prefix="fxrt-", dir="/tmp"))
        control.start(1, "910b", "serial", 1.0, rdir=rdir)
        peers: list[Peer] = []
        try:
            env = {**os.environ, **control.emulator_env(rdir)}
            peers = [Peer(exe, env), Peer(exe, env)]
            results = []
            for name, size, written in cases:
                reps = [one(*peers, size, written) for _ in range(o.reps)]
                med = {k: round(statistics.median(x[k] for x in reps), 3) for k in reps[0]}
                results.append({"case": name, "bytes": size, "written": written, **med})
        finally:
            for p in peers:
                p.stop()
            control.stop(rdir)
            shutil.rmtree(rdir, ignore_errors=True)
    if o.json:
        print(json.dumps({"schema": SCHEMA, "machine": machine(), "reps": o.reps, "results": results}))
        return
    for r in results:
        print(f"{r['case']:>14} ({r['bytes'] >> 20} MiB): export {r['export_ms']:.2f} ms, set pid "
              f"{r['set_pid_ms']:.2f} ms, import {r['import_ms']:.2f} ms, closes + free {r['close_free_ms']:.2f} ms")


if __name__ == "__main__":
    main()
