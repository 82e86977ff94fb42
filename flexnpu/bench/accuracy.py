"""Measures the phase classifier against the emulator's ground truth.

Workloads (tests/progs/obs_phases.c) run prefill-shaped and decode-shaped forward passes
whose kernels are named prefill_layer and decode_layer, so the emulator's busy time by
kernel name says, for every interval and process, what its device time went to. The
observer's probes and the emulator's status are sampled together each interval; the truth
of an interval is

  idle     the process kept the device busy for less than 1% of the interval
  prefill  at least 80% of its device time was prefill_layer
  decode   at least 80% was decode_layer
  mixed    otherwise

Used by tests/test_observe_accuracy.py and scripts/bench_observe.py.
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexnpu import paths
from flexnpu.emulator import control
from flexnpu.observe.snapshot import SnapshotBuilder

KERNEL_LIBRARY = "flexnpu-kernels 1\nkernel prefill_layer synthetic\nkernel decode_layer synthetic\n"
IDLE_SHARE, PURE_SHARE = 0.01, 0.8


@dataclass
class Scenario:
    name: str
    steps: list[list[str]]  # one list of obs_phases steps per process, all on device 0


# ~64 ms prefill passes (160 launches, 4 MiB H2D) and ~3.6 ms decode passes (40 launches)
SCENARIOS = [
    Scenario("prefill-like", [["p:12", "i:300", "p:12"]]),
    Scenario("decode-like", [["d:250", "i:300", "d:250"]]),
    Scenario("alternating", [["p:8", "d:150", "i:200", "p:8", "d:150"]]),
    Scenario("mixed-rounds", [["--mix-decodes", "12", "m:10"]]),
    Scenario("co-located", [["i:100", "p:6", "i:300", "p:6", "i:300", "p:6"], ["d:700"]]),
]


@dataclass
class Result:
    scenario: str
    rows: list[tuple[int, str, str]] = field(default_factory=list)  # (pid, truth, verdict)
    occupancy_err: list[float] = field(default_factory=list)  # |prefill+decode occupancy - truth|

    @property
    def accuracy(self) -> float:
        return sum(t == v for _, t, v in self.rows) / len(self.rows) if self.rows else float("nan")

    def as_dict(self) -> dict[str, Any]:
        confusion = Counter(f"{t}->{v}" for _, t, v in self.rows)
        return {"scenario": self.scenario, "intervals": len(self.rows), "accuracy": round(self.accuracy, 4),
                "confusion": dict(sorted(confusion.items())),
                "occupancy_mae": round(sum(self.occupancy_err) / len(self.occupancy_err), 4)
                if self.occupancy_err else None}


def truth(prefill_ns: float, decode_ns: float, dt_ns: float) -> str:
    total = prefill_ns + decode_ns
    if total < IDLE_SHARE * dt_ns:
        return "idle"
    if prefill_ns >= PURE_SHARE * total:
        return "prefill"
    if decode_ns >= PURE_SHARE * total:
        return "decode"
    return "mixed"


def _busy(status: dict) -> dict[int, tuple[float, float]]:
    out = {}
    for c in status["devices"][0]["clients"]:
        b = c.get("busy_by_name", {})
        out[c["pid"]] = (b.get("prefill_layer", 0.0), b.get("decode_layer", 0.0))
    return out


def flops_for_ms(status: dict, ms: float) -> float:
    p = status["devices"][0]["params"]
    return p["peak_tflops"] * 1e12 * ms / 1e3 / p.get("time_scale", 1)


def run(scenario: Scenario, program: Path, klib: Path, env: dict[str, str], rdir: Path, session: Any,
        interval_s: float = 0.1, timeout_s: float = 120.0) -> Result:
    """Runs one scenario with probes already attached (session: a ProbeSession) and the
    emulator serving rdir."""
    st = control.status(rdir)
    opts = ["--prefill-flops", repr(flops_for_ms(st, 0.4)), "--decode-flops", repr(flops_for_ms(st, 0.08))]
    res = Result(scenario.name)
    session.read()
    builder = SnapshotBuilder("bpf")
    procs = [subprocess.Popen([str(program), str(klib), *opts, *steps], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for steps in scenario.steps]
    pids = {p.pid for p in procs}
    prev_busy = _busy(control.status(rdir))
    prev_ns = time.monotonic_ns()
    deadline = time.monotonic() + timeout_s
    next_t = time.monotonic() + interval_s
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(max(0.0, next_t - time.monotonic()))
            next_t += interval_s
            reads = session.read()
            now_ns = time.monotonic_ns()
            busy = _busy(control.status(rdir))
            snap = builder.build(reads, now_ns=now_ns)
            dt_ns = now_ns - prev_ns
            prev_ns = now_ns
            truth_busy = 0.0
            for e in snap["processes"]:
                pid = e["pid"]
                if pid not in pids or pid not in busy or pid not in prev_busy:
                    continue
                dp = busy[pid][0] - prev_busy[pid][0]
                dd = busy[pid][1] - prev_busy[pid][1]
                truth_busy += dp + dd
                res.rows.append((pid, truth(dp, dd, dt_ns), e["phase"]))
            dev0 = next((d for d in snap["devices"] if d["device"] == 0), None)
            if dev0 is not None:
                occ = dev0["phase_occupancy"]
                res.occupancy_err.append(abs(occ["prefill"] + occ["decode"] - min(1.0, truth_busy / dt_ns)))
            prev_busy = busy
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.returncode:
                raise RuntimeError(f"{program.name} {scenario.name} exited {p.returncode}: {p.stderr.read()}")
            p.stderr.close()
    return res


def kernel_library(dirpath: Path) -> Path:
    path = dirpath / "obs_phases.fxk"
    path.write_text(KERNEL_LIBRARY)
    return path


def emulator_library() -> str:
    return str(paths.emulator_library())
