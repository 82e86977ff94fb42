"""Measures phase inference against the emulator's ground truth, per signal source.

Workloads run as real processes on the emulated device while the observer's probes are
attached; the probes and the emulator's status are sampled together each interval. Every
kernel the workloads launch has a name that says, to this harness only, which phase it
belongs to (TRUTH), so the emulator's busy time by kernel name gives, per interval and
process,

  idle     the process kept the device busy for less than 1% of the interval
  prefill  at least 80% of its device time was prefill kernels
  decode   at least 80% was decode kernels
  mixed    otherwise (and its prefill share, to compare with phase_share)

The classifier never sees TRUTH: its name table matches attention names only
(PromptFlashAttention_bf16, attention_prefill, ...), and in the "anon" mode even those
are k_attn_p / k_attn_d. Each source is scored on its own verdicts
(PhaseClassifier.last): "kernel" where kernels are named, "aclnn" where the engine calls
the emulator's libopapi.so (aclnnPromptFlashAttentionV3 / aclnnIncreFlashAttentionV4, which
launch its PromptFlashAttention / IncreFlashAttention kernels), "shape" everywhere.

Two families of workloads:
  engine   tests/progs/obs_engine.c, shaped unlike anything the classifier was built
           beside: 78 compute-bound kernels and one sync per 90 ms and no H2D copy
           (prefill), 78 short kernels per ~4 ms step (decode), chunked-prefill steps
           mixing both, a decode batch that grows 4x;
  own      tests/progs/obs_phases.c, the loops the first classifier was tuned on.

Used by tests/test_observe_accuracy.py and scripts/bench_observe.py --accuracy.
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

P, D = "prefill", "decode"
# the workloads' own kernels (their kernel library binds them)
KERNELS = {"prefill_layer": P, "decode_layer": D, "k_mlp_p": P, "k_mlp_d": D, "k_attn_p": P, "k_attn_d": D,
           "PromptFlashAttention_bf16": P, "IncreFlashAttention_bf16": D,
           "attention_prefill": P, "attention_decode": D}
# and the kernels the emulator's aclnn attention operators launch (docs/emulator.md)
TRUTH = {**KERNELS, "PromptFlashAttention": P, "IncreFlashAttention": D}
KERNEL_LIBRARY = "flexnpu-kernels 1\n" + "".join(
    f"kernel {n} {'synthetic' if not n.startswith('attention_') else n}\n" for n in KERNELS)
IDLE_SHARE, PURE_SHARE = 0.01, 0.8
SOURCES = ("aclnn", "kernel", "shape")
# which sources have something to go on in each way of running the engine
MODE_SOURCES = {"kernel": ("kernel", "shape"), "aclnn": ("aclnn", "kernel", "shape"), "anon": ("shape",),
                "own": ("shape",)}


@dataclass
class Scenario:
    name: str
    program: str  # "engine" (obs_engine) or "phases" (obs_phases)
    steps: list[list[str]]  # one argument list per process (options, then steps), all on device 0
    family: str = "engine"  # or "own"


ENGINE = [
    Scenario("prefill-78k-90ms", "engine", [["p:24"]]),
    Scenario("decode", "engine", [["d:450"]]),
    Scenario("chunked-prefill", "engine", [["--p-ms", "0.3", "c:50"]]),
    Scenario("decode-growing", "engine", [["--grow-to", "4", "g:260"]]),
]
OWN = [
    Scenario("own-prefill", "phases", [["p:12", "i:300", "p:12"]], "own"),
    Scenario("own-decode", "phases", [["d:250", "i:300", "d:250"]], "own"),
    Scenario("own-alternating", "phases", [["p:8", "d:150", "i:200", "p:8", "d:150"]], "own"),
    Scenario("own-mixed-rounds", "phases", [["--mix-decodes", "12", "m:10"]], "own"),
    Scenario("own-co-located", "phases", [["i:100", "p:6", "i:300", "p:6", "i:300", "p:6"], ["d:700"]], "own"),
]
MODES = ("kernel", "aclnn", "anon")


@dataclass
class Row:
    pid: int
    truth: str
    truth_share: float
    verdicts: dict[str, str]  # source -> phase ("none": that source had nothing to go on)
    shares: dict[str, float]
    final: str
    final_source: str


@dataclass
class Result:
    scenario: str
    mode: str
    family: str
    rows: list[Row] = field(default_factory=list)
    occupancy_err: list[float] = field(default_factory=list)

    def accuracy(self, source: str) -> float:
        rows = self.rows
        return sum(r.verdicts[source] == r.truth for r in rows) / len(rows) if rows else float("nan")

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scenario": self.scenario, "mode": self.mode, "family": self.family,
                               "intervals": len(self.rows),
                               "truth": dict(Counter(r.truth for r in self.rows))}
        for src in MODE_SOURCES[self.mode]:
            out[src] = {"accuracy": round(self.accuracy(src), 4),
                        "confusion": dict(sorted(Counter(f"{r.truth}->{r.verdicts[src]}" for r in self.rows).items()))}
            busy = [r for r in self.rows if r.truth != "idle" and r.verdicts[src] not in ("idle", "none")]
            if busy:
                out[src]["share_mae"] = round(sum(abs(r.shares[src] - r.truth_share) for r in busy) / len(busy), 4)
        out["final"] = {"accuracy": round(sum(r.final == r.truth for r in self.rows) / max(len(self.rows), 1), 4),
                        "sources": dict(Counter(r.final_source for r in self.rows))}
        out["occupancy_mae"] = round(sum(self.occupancy_err) / len(self.occupancy_err), 4) \
            if self.occupancy_err else None
        return out


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
        out[c["pid"]] = (sum(v for k, v in b.items() if TRUTH.get(k) == P),
                         sum(v for k, v in b.items() if TRUTH.get(k) == D))
    return out


def flops_for_ms(status: dict, ms: float) -> float:
    p = status["devices"][0]["params"]
    return p["peak_tflops"] * 1e12 * ms / 1e3 / p.get("time_scale", 1)


def _argv(s: Scenario, mode: str, programs: dict[str, Path], klib: Path, st: dict, opapi: Path | None,
          steps: list[str]) -> list[str]:
    if s.program == "phases":
        return [str(programs["phases"]), str(klib), "--prefill-flops", repr(flops_for_ms(st, 0.4)),
                "--decode-flops", repr(flops_for_ms(st, 0.08)), *steps]
    extra = ["--opapi", str(opapi)] if mode == "aclnn" else []
    return [str(programs["engine"]), str(klib), "--ms-flops", repr(flops_for_ms(st, 1.0)), "--attn", mode,
            *extra, *steps]


def run(scenario: Scenario, mode: str, programs: dict[str, Path], klib: Path, env: dict[str, str], rdir: Path,
        session: Any, opapi: Path | None = None, interval_s: float = 0.1, timeout_s: float = 120.0) -> Result:
    """Runs one scenario (mode: kernel, aclnn or anon for the engine; own for obs_phases)
    with probes already attached (session: a ProbeSession) and the emulator serving rdir."""
    st = control.status(rdir)
    res = Result(scenario.name, mode, scenario.family)
    session.read()
    builder = SnapshotBuilder("bpf")
    procs = [subprocess.Popen(_argv(scenario, mode, programs, klib, st, opapi, steps), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for steps in scenario.steps]
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
                by = builder.classifier.last.get((pid, e["device"] if e["device"] is not None else -1), {})
                idle = e["phase"] == "idle"
                verdicts = {s: "idle" if idle else (by[s].phase if by.get(s) else "none") for s in SOURCES}
                shares = {s: by[s].prefill_share if by.get(s) else 0.0 for s in SOURCES}
                res.rows.append(Row(pid, truth(dp, dd, dt_ns), dp / (dp + dd) if dp + dd > 0 else 0.0,
                                    verdicts, shares, e["phase"], e["phase_source"]))
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
                raise RuntimeError(f"{scenario.program} {scenario.name} exited {p.returncode}: {p.stderr.read()}")
            p.stderr.close()
    return res


def run_all(programs: dict[str, Path], klib: Path, env: dict[str, str], rdir: Path, session: Any,
            opapi: Path, own: bool = True, modes: tuple[str, ...] = MODES) -> list[Result]:
    out = [run(s, m, programs, klib, env, rdir, session, opapi) for s in ENGINE for m in modes]
    if own:
        out += [run(s, "own", programs, klib, env, rdir, session) for s in OWN]
    return out


def summary(results: list[Result]) -> dict[str, Any]:
    """Accuracy per source and family, over the intervals where the source applies."""
    out: dict[str, Any] = {}
    for fam in ("engine", "own"):
        for src in SOURCES:
            rows = [r for x in results if x.family == fam and src in MODE_SOURCES[x.mode] for r in x.rows]
            if rows:
                out[f"{fam}/{src}"] = {"intervals": len(rows),
                                       "accuracy": round(sum(r.verdicts[src] == r.truth for r in rows) / len(rows), 4)}
    return out


def kernel_library(dirpath: Path) -> Path:
    path = dirpath / "obs_accuracy.fxk"
    path.write_text(KERNEL_LIBRARY)
    return path


def opapi_library() -> Path:
    """The emulator's libopapi.so, whose attention operators the aclnn mode calls."""
    return paths.native_lib_dir() / "libopapi.so"


def emulator_library() -> str:
    return str(paths.emulator_library())
