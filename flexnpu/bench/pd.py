"""`flexnpu bench pd`: one trace under several ways of sharing the devices, one after another,
on the emulator with the same hardware for each, and the targets as ratios of the same run.

Configurations (CONFIGS):

  no-shim            prefill and decode co-located, no FlexNPU at all
  uncontrolled       co-located under the shim, the `passthrough` policy
  static-colocation  co-located with a fixed split, the better of a time split (`static-split`,
                     its prefill_share) and a spatial split (the emulator's vNPU-like
                     `--partition`), the share chosen by a sweep at the trace's load
  static-disagg      prefill and decode instances on separate devices of one node, xPyD: x
                     prefill and y decode instances (x + y the node's devices), the best ratio
                     of a sweep (1P1D on two devices; 1P3D, 2P2D, 3P1D on four), one router
                     (driver.Router), the KV pulled over the device link from the prefill's
                     pool (imported with peer access)
  static-disagg-xnode  (--nodes 2) the prefill instances on node 0's x devices, the decode
                     instances on node 1's y devices (x + y = --devices, the same sweep), every
                     request's KV over the shaped link with Mooncake's transfer engine (TCP),
                     the bytes on the link checked against the KV's size
  flexnpu-gated      co-located under the shim, the `flexpd` policy (`flexnpu` in --configs
                     is another name for it, the configuration's name before forwarding)
  forward-uncontrolled  co-located, forwarded (the instances' calls run in the device's
                     executor), the `passthrough` policy, no settings by declared role
  flexnpu-forward    co-located, forwarded, the `flexpd` policy (its settings reach the
                     executor through the daemon's gate table, as the gated shim's do)

--devices N is the total every configuration gets. On N devices every co-located
configuration runs N prefill/decode pairs (the trace dealt round-robin), static-disagg one
xPyD group. With --nodes 2 the nodes are network namespaces joined by a shaped link
(flexnpu/bench/netns.py; root): the co-located configurations and static-disagg run on both
nodes, N/2 devices each, each node with its own daemons, observer and controller, the trace
dealt across them; static-disagg-xnode spans the two. A co-located pair hands the KV over through IPC
memory: nothing is copied (forwarded, the decode instance's import is the prefill's memory in
the executor's context). Every run ends with the workload's own check against the emulator
(kernel counts, busy time, bytes, no byte copied on one device, tokens; forwarded, the
executor's record against the sum of its instances') and, where an observer runs, the
observer's phase of each instance against the workload's ground truth (`phasecheck`).
Forwarded configurations observe with the shim's counters (the forwarded clients keep them in
their pages): with BPF the probes in libascendcl.so see only the executor.

    from flexnpu.bench import pd
    report = pd.run(pd.Options(quick=True))     # the dict `--json` writes
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from flexnpu.bench.netns import DEFAULT_LINK, LinkError, LinkSpec, NetnsError, Topology, require_root
from flexnpu.bench.node import LocalNode, machine
from flexnpu.bench.phasecheck import PhaseCheck
from flexnpu.workload import driver, metrics as MX, model as M, trace as T
from flexnpu.workload.aclnn import DECODE_ATTENTION, DEFAULT_OPS, OPS, PREFILL_ATTENTION

CONFIGS = ("no-shim", "uncontrolled", "static-colocation", "static-disagg", "static-disagg-xnode", "flexnpu-gated",
           "forward-uncontrolled", "flexnpu-forward")
ALIASES = {"flexnpu": "flexnpu-gated"}  # old command lines' names
FORWARDED = ("forward-uncontrolled", "flexnpu-forward")
DISAGG = ("static-disagg", "static-disagg-xnode")
SWEPT = ("static-colocation", *DISAGG)  # configurations whose best variant a sweep picks
XNODE_NEEDS = "static-disagg-xnode needs --nodes 2 (prefill instances on node 0, decode instances on node 1)"
# The KV's bytes against the prefill node's bytes sent on the link (its interface's kernel
# counter): at least the KV, at most the KV plus TCP/IP and Ethernet headers (66 bytes a
# segment: 0.74% at the link's 9000-byte MTU; GSO counts fewer, 0.2% measured), the engine's
# request and handshake messages and the ACKs of the few bytes going the other way. The band:
LINK_OVERHEAD = 0.02  # share of the KV
LINK_SLACK = 256 * 1024  # bytes, whatever the KV
# how each configuration's instances run: "none" (no FlexNPU), "gated" (the shim), "forwarded"
EXECUTION = {"no-shim": "none", "static-disagg": "none", "static-disagg-xnode": "none",
             "static-colocation": "gated", "uncontrolled": "gated",
             "flexnpu-gated": "gated", "forward-uncontrolled": "forwarded", "flexnpu-forward": "forwarded"}
MODES = ("contexts", "serial", "shared")
DEFAULT_MODE = "contexts"  # as Ascend shares a device: contexts take turns, streams of one share cores (docs/emulator.md)
# The bench's traces. Outputs are clipped shorter than trace.SHAREGPT_OUTPUT's 2048: a run's
# throughput is over its whole duration, and one 2048-token reply would be most of it.
TRACES = {
    "balanced": dict(prompt=T.LengthDist(170, 1.0, 4, 2048), output=T.LengthDist(150, 0.9, 1, 512)),
    "prefill-heavy": dict(prompt=T.LengthDist(1024, 0.5, 128, 4096), output=T.LengthDist(24, 0.6, 1, 128)),
}
# flexpd as a serving node runs it: prefill first (TTFT); decode held at most 50 ms a call and
# at most 16 launches queued ahead of a prompt (unlimited, a prompt waited behind a whole
# decode step: TTFT p50 41.5 -> 27.2 ms at 24 req/s; 4 starved decode on the host; docs/bench.md)
FLEXPD_TOML = '[policy.flexpd]\nfirst = "prefill"\ndecode_inflight = 16\n'
ATTAIN = 0.9  # a load is served at an SLO when this share of its requests meet it
# --rate auto: the rates tried, lowest first, for the full model and for --quick's two layers
AUTO_RATES = (4.0, 8.0, 16.0, 24.0, 32.0, 48.0, 64.0)
AUTO_RATES_QUICK = (20.0, 40.0, 80.0, 160.0)
# a run is stable when the later requests wait no longer than the earlier ones: the median
# TTFT and TPOT of the last third of the requests (by arrival) within this factor of the first third's
STABLE_GROWTH = 1.25


class BenchError(ValueError):
    """Bad input: str() is one line saying what to change."""


# Bounds of what a run on two cores can mean: a rate below MIN_RATE spreads even a short trace
# over hours (and a tiny one puts arrivals past what a timestamp holds); above MAX_RATE every
# request arrives at once. An SLO over an hour is no objective.
MIN_RATE, MAX_RATE = 0.01, 10_000.0
MAX_SLO_S = 3600.0
MAX_REQUESTS, MAX_REPEAT = 1_000_000, 1000


@dataclass
class Options:
    trace: str = "balanced"  # balanced | prefill-heavy | an Azure CSV file
    n: int = 120
    rate: float | None = None  # requests/s the targets are judged at; None: auto (the operating point)
    auto_rates: tuple[float, ...] = AUTO_RATES  # the rates --rate auto tries
    rates: tuple[float, ...] = ()  # a load sweep besides
    burstiness: float = 1.0
    seed: int = 0
    model: str = "qwen2.5-7b"
    profile: str = "910b"
    devices: int = 2
    modes: tuple[str, ...] = (DEFAULT_MODE,)
    repeat: int = 1
    configs: tuple[str, ...] = CONFIGS
    shares: tuple[float, ...] = (0.3, 0.5, 0.7)  # prefill shares the static sweep tries
    slo_ttft_s: float = 1.0
    slo_tpot_s: float = 0.06
    observer: str = "auto"  # bpf where it can attach, else the shim's counters
    ops: str = DEFAULT_OPS  # how the instances express a step (instance --ops)
    quick: bool = False
    left_out: str = ""  # why configurations were left out of the default list (`runnable`)
    nodes: int = 1  # 2: two nodes in network namespaces joined by a shaped link
    link_gbit: float = DEFAULT_LINK.rate_gbit
    link_delay_us: float = DEFAULT_LINK.delay_us

    def check(self) -> None:
        if self.trace not in TRACES and not Path(self.trace).is_file():
            raise BenchError(f"--trace takes {', '.join(TRACES)} or an Azure trace CSV file; {self.trace!r} is neither")
        if not 1 <= self.n <= MAX_REQUESTS:
            raise BenchError(f"-n must be from 1 to {MAX_REQUESTS}, got {self.n}")
        for r in (*([] if self.rate is None else [self.rate]), *self.rates, *self.auto_rates):
            if not (MIN_RATE <= r <= MAX_RATE):  # NaN fails both comparisons
                raise BenchError(f"request rates must be positive numbers from {MIN_RATE:g} to {MAX_RATE:g} "
                                 f"(requests/s), got {r:g}")
        for name, v in (("--slo-ttft-ms", self.slo_ttft_s), ("--slo-tpot-ms", self.slo_tpot_s)):
            if not (0 < v <= MAX_SLO_S):
                raise BenchError(f"{name} must be a number above 0 and at most {MAX_SLO_S * 1e3:g} ms, "
                                 f"got {v * 1e3:g}")
        if not 1 <= self.devices <= 16:
            raise BenchError(f"--devices must be 1..16, got {self.devices}")
        if not 1 <= self.repeat <= MAX_REPEAT:
            raise BenchError(f"--repeat must be from 1 to {MAX_REPEAT}, got {self.repeat}")
        self.configs = canonical(self.configs)
        bad = [c for c in self.configs if c not in CONFIGS]
        if bad or not self.configs:
            raise BenchError(f"--configs takes a comma list of {', '.join(CONFIGS)} (flexnpu: flexnpu-gated); "
                             f"got {','.join(bad) or 'nothing'}")
        if self.ops not in OPS:
            raise BenchError(f"--ops takes {', '.join(OPS)}, got {self.ops!r}")
        fwd = [c for c in self.configs if c in FORWARDED]
        why = forward_refusal(self.ops) if fwd else None
        if why:
            raise BenchError(f"{', '.join(fwd)} cannot run: {why}")
        if any(m not in MODES for m in self.modes) or not self.modes:
            raise BenchError(f"--mode takes {', '.join(MODES)} or all, got {','.join(self.modes)}")
        if not self.shares or any(not 0.05 <= s <= 0.95 for s in self.shares):
            raise BenchError("--shares takes prefill shares between 0.05 and 0.95")
        if self.nodes not in (1, 2):
            raise BenchError(f"--nodes takes 1 or 2, got {self.nodes}")
        if self.devices % self.nodes:
            raise BenchError(f"--devices is the total over the nodes: with --nodes {self.nodes} it must be a multiple "
                             f"of {self.nodes}, got {self.devices}")
        if "static-disagg" in self.configs and self.devices < 2:
            raise BenchError("static-disagg needs --devices 2 or more (prefill and decode on separate devices)")
        if "static-disagg" in self.configs and self.devices // self.nodes < 2:
            raise BenchError(f"static-disagg needs 2 or more devices a node (prefill and decode on separate devices): "
                             f"--devices {2 * self.nodes} or more with --nodes {self.nodes}")
        if "static-disagg-xnode" in self.configs and self.nodes != 2:
            raise BenchError(XNODE_NEEDS)
        if "static-disagg-xnode" in self.configs:
            from flexnpu.workload.kvnet import available

            why = available()
            if why:
                raise BenchError(f"static-disagg-xnode cannot run: {why}")
        # checked with one node too: an option given and then ignored would be a silent mistake
        try:
            LinkSpec(self.link_gbit, self.link_delay_us)
        except LinkError as e:
            option = {"rate_gbit": "--link-gbit", "delay_us": "--link-delay-us"}.get(e.field, e.field)
            raise BenchError(f"{option} must be {e.want}, got {e.value:g}") from None
        if self.nodes > 1:
            try:
                require_root()
            except NetnsError as e:
                raise BenchError(f"--nodes {self.nodes}: {e}") from None
        try:
            M.model_by_name(self.model)
        except (KeyError, ValueError) as e:
            raise BenchError(f"--model: {e}") from None
        if self.trace not in TRACES:  # a file: read it now, so a bad line is reported before any run
            try:
                reqs = T.load_azure_csv(self.trace, limit=self.n)
                if not reqs:
                    raise BenchError(f"{self.trace}: no requests in the trace")
                driver.too_long(reqs, driver.Setup(model=self.model, profile=self.profile))
            except (T.TraceError, ValueError) as e:
                raise BenchError(str(e)) from None

    @property
    def slo(self) -> MX.Slo:
        return MX.Slo(self.slo_ttft_s, self.slo_tpot_s)


def forward_refusal(ops: str) -> str | None:
    """Why the forwarded configurations cannot run here with these --ops (None: they can)."""
    from flexnpu import paths
    from flexnpu.forward.daemon.executor import ExecutorSupervisor

    if not paths.forward_shim_library().is_file() or not ExecutorSupervisor.available():
        return "this FlexNPU was built without forwarded execution (libflexnpu_fwd.so, flexnpu-executor)"
    return driver.ops_refusal(ops)


def runnable(o: Options) -> Options:
    """The default configuration list less the forwarded ones where they cannot run,
    static-disagg-xnode with one node and static-disagg with one device a node (the reasons
    in `left_out`, printed with the results); a list given by name is left as it is."""
    why = forward_refusal(o.ops) if any(c in FORWARDED for c in o.configs) else None
    notes = []
    if why:
        notes.append(f"{', '.join(c for c in o.configs if c in FORWARDED)} left out: {why}")
        o = replace(o, configs=tuple(c for c in o.configs if c not in FORWARDED))
    if "static-disagg-xnode" in o.configs:
        from flexnpu.workload.kvnet import available

        why = f"it {XNODE_NEEDS.split(' ', 1)[1]}" if o.nodes == 1 else available()
        if why:
            notes.append(f"static-disagg-xnode left out: {why}")
            o = replace(o, configs=tuple(c for c in o.configs if c != "static-disagg-xnode"))
    if o.nodes > 1 and o.devices // o.nodes < 2 and "static-disagg" in o.configs:
        notes.append(f"static-disagg left out: it needs 2 or more devices a node (--devices {2 * o.nodes} or more "
                     f"with --nodes {o.nodes}); static-disagg-xnode disaggregates across the nodes")
        o = replace(o, configs=tuple(c for c in o.configs if c != "static-disagg"))
    return replace(o, left_out="; ".join(notes)) if notes else o


def canonical(configs: tuple[str, ...]) -> tuple[str, ...]:
    """Configuration names with the old ones (ALIASES) replaced, each once, in order."""
    return tuple(dict.fromkeys(ALIASES.get(c, c) for c in configs))


def quick(o: Options) -> Options:
    """--quick: a CI-sized run (two layers, a dozen requests, one share per form): seconds a run."""
    return replace(o, model="qwen2.5-7b:2" if o.model == "qwen2.5-7b" else o.model, n=min(o.n, 16),
                   rate=o.rate if o.rate != Options.rate else 40.0,
                   auto_rates=AUTO_RATES_QUICK if o.auto_rates == AUTO_RATES else o.auto_rates,
                   shares=o.shares[:1] if len(o.shares) < 3 else (0.5,),
                   slo_ttft_s=0.1 if o.slo_ttft_s == Options.slo_ttft_s else o.slo_ttft_s,
                   slo_tpot_s=0.01 if o.slo_tpot_s == Options.slo_tpot_s else o.slo_tpot_s, quick=True)


def make_trace(o: Options, rate: float) -> tuple[list[T.Request], dict]:
    if o.trace in TRACES:
        spec = T.TraceSpec(n=o.n, rate=rate, burstiness=o.burstiness, seed=o.seed, **TRACES[o.trace])
        d = spec.describe()
        d["name"] = o.trace
        return T.generate(spec), d
    reqs = T.load_azure_csv(o.trace, limit=o.n)
    base = o.rate or rate  # the file's own rate is the base; other rates scale its arrivals
    if reqs and len(reqs) > 1:
        base = (len(reqs) - 1) / max(reqs[-1].arrival_s, 1e-9)
    k = base / rate
    return ([T.Request(r.id, r.arrival_s * k, r.prompt_tokens, r.output_tokens) for r in reqs],
            {"name": o.trace, "n": len(reqs), "rate": rate, "file_rate": base})


# ---------------------------------------------------------------- one configuration, one run

@dataclass
class Variant:
    """How one run is set up: the node's parts and the instances' placement."""
    config: str
    form: str = ""  # static-colocation: "time" or "vnpu"
    share: float = 0.0
    ratio: str = ""  # static-disagg*: xPyD, e.g. "1P3D"

    @property
    def label(self) -> str:
        return f"{self.form} {self.share:.2f}" if self.form else self.ratio

    @property
    def xy(self) -> tuple[int, int]:
        x, y = self.ratio.rstrip("D").split("P")
        return int(x), int(y)


@dataclass
class Run:
    variant: Variant
    mode: str
    rate: float
    metrics: dict
    timings: list[MX.RequestTiming]
    problems: list[str]
    busy: dict  # the emulator's busy-time check
    phase: dict  # the observer's phase against the workload's
    wall_s: float
    nodes: int = 1
    kv_net: dict | None = None  # static-disagg-xnode: the KV across the link against the link's counters
    link: dict | None = None  # --nodes 2: the topology's link as built (rate, delay, MTU, how the delay is made)

    def summary(self) -> dict:
        return summarize(self)


def ratios(devices: int) -> list[tuple[int, int]]:
    """The xPyD ratios `devices` allow: x prefill and y decode instances, x + y = devices."""
    return [(x, devices - x) for x in range(1, devices)]


def disagg_variants(c: str, o: Options) -> list[Variant]:
    """static-disagg: the ratios of one node's devices; static-disagg-xnode: of all devices."""
    per = o.devices if c == "static-disagg-xnode" else o.devices // o.nodes
    return [Variant(c, ratio=driver.ratio_name(x, y)) for x, y in ratios(per)]


def variants(c: str, o: Options) -> list[Variant]:
    """The variants a configuration's sweep tries (one for a configuration without a sweep)."""
    if c == "static-colocation":
        return static_variants(o)
    if c in DISAGG:
        return disagg_variants(c, o)
    return [Variant(c)]


def _layout(v: Variant, o: Options) -> list[int]:
    """Each node's device count: static-disagg-xnode x on node 0 and y on node 1, every other
    configuration --devices / --nodes on each."""
    if v.config == "static-disagg-xnode":
        return list(v.xy)
    return [o.devices // o.nodes] * o.nodes


def _node(v: Variant, o: Options, mode: str, tmp: Path, devices: int | None = None,
          netns: str | None = None) -> tuple[LocalNode, bool, bool, bool]:
    """The node of a variant, whether the instances run under the shim, whether they carry
    FLEXNPU_ROLE without it, and whether they run forwarded."""
    common: dict[str, Any] = dict(devices=o.devices if devices is None else devices, mode=mode, profile=o.profile)
    if netns is not None:
        common["netns"] = netns
    if v.config in ("no-shim", *DISAGG):
        return LocalNode(observer=None, daemons=False, **common), False, False, False
    if v.config == "static-colocation" and v.form == "vnpu":
        part = f"prefill={v.share:g},decode={1 - v.share:g}"
        return LocalNode(observer=None, daemons=False, partition=part, **common), False, True, False
    policy = {"uncontrolled": "passthrough", "flexnpu-gated": "flexpd", "static-colocation": "static-split",
              "forward-uncontrolled": "passthrough", "flexnpu-forward": "flexpd"}[v.config]
    forward = v.config in FORWARDED
    # forwarded: the shim's counters (BPF's probes in libascendcl.so see the executor alone);
    # uncontrolled: no settings by declared role at admission either
    observer = "shim" if forward and o.observer else o.observer
    daemon_args = ["--no-role-admission"] if v.config == "forward-uncontrolled" else []
    args: list[str] = []
    if policy == "static-split":
        cfg = tmp / f"static-{v.share:g}.toml"
        cfg.write_text(f"[policy.static-split]\nprefill_share = {v.share:g}\n")
        args = ["--config", str(cfg)]
    elif policy == "flexpd":
        cfg = tmp / "flexpd.toml"
        cfg.write_text(FLEXPD_TOML)
        args = ["--config", str(cfg)]
    return (LocalNode(observer=observer, policy=policy, controller_args=args, daemon_args=daemon_args, **common),
            True, False, forward)


def _units(v: Variant, o: Options, nodes: list[LocalNode], shim: bool, role_env: bool,
           forward: bool) -> list[tuple[list[int], driver.Setup]]:
    """The variant's driver runs: (the nodes it spans, by index, its setup). Co-located: a
    pair on every device of every node; static-disagg: one xPyD group a node;
    static-disagg-xnode: one group across the two."""
    base = dict(model=o.model, profile=o.profile, shim=shim, role_env=role_env, slo=o.slo, ops=o.ops, forward=forward)
    if v.config == "static-disagg-xnode":
        x, y = v.xy
        # kv_check: each prompt's KV filled with its request's own byte, found again on node 1
        return [([0, 1], driver.Setup(placements=driver.xpyd(x, y, nodes=2), kv_check=True,
                                      node_addrs=tuple(n.host for n in nodes), **base))]
    if v.config == "static-disagg":
        x, y = v.xy
        return [([i], driver.Setup(placements=driver.xpyd(x, y), **base)) for i in range(len(nodes))]
    return [([i], driver.Setup(prefill_device=d, decode_device=d, **base))
            for i, n in enumerate(nodes) for d in range(n.devices)]


def run_one(v: Variant, reqs: list[T.Request], o: Options, mode: str, rate: float,
            on_done: Callable[[int], None] | None = None) -> Run:
    """Runs the trace once under one variant on fresh nodes (with --nodes 2 in a fresh
    topology); everything it started is gone after."""
    t_start = time.monotonic()
    if v.config in DISAGG and not v.ratio:  # the plain configuration name: its first ratio
        v = disagg_variants(v.config, o)[0]
    with tempfile.TemporaryDirectory(prefix="flexnpu-bench-") as td, contextlib.ExitStack() as stack:
        topo = None
        if o.nodes > 1:
            topo = stack.enter_context(Topology(nodes=o.nodes, link=LinkSpec(o.link_gbit, o.link_delay_us)))
        made = [_node(v, o, mode, Path(td), k, topo.names[i] if topo else None)
                for i, k in enumerate(_layout(v, o))]
        nodes = [stack.enter_context(n) for n, *_ in made]
        _, shim, role_env, forward = made[0]
        units = _units(v, o, nodes, shim, role_env, forward)
        parts = [reqs[i::len(units)] for i in range(len(units))]
        checkers = [PhaseCheck(n.rdir) if n.observer else None for n in nodes]
        for c in checkers:
            if c:
                c.start()
        links = [topo.link_bytes(i) for i in range(o.nodes)] if topo else None
        try:
            work = [([nodes[i] for i in at], s, part) for (at, s), part in zip(units, parts) if part]
            results = run_pairs(work, on_done)
        finally:
            samples = [c.stop() if c else None for c in checkers]
        links_after = [topo.link_bytes(i) for i in range(o.nodes)] if topo else None
        link = {k: v for k, v in topo.describe().items() if k in ("link", "delay", "addrs")} if topo else None
        status = driver._status(nodes)
    spans_of = [at for (at, _), part in zip(units, parts) if part]
    timings = [t for r in results for t in r.requests]
    problems = [f"pair {i}: {p}" for i, r in enumerate(results) for p in r.problems]
    problems += _token_truth(results, status, o.model)
    m = MX.compute(timings, o.slo)
    kv_net = None
    if v.config == "static-disagg-xnode":
        kv = {k: sum(r.kv_net.get(k, 0) for r in results) for k in ("requests", "bytes", "reported", "d2h", "checked",
                                                                      "bad")}
        kv_net = link_check(kv, links, links_after)
        if not kv_net["ok"]:
            problems.append(f"KV across the link: {kv_net['note']}")
    # each instance's role and its node (global index), for each node's observer
    roles: list[dict[int, str]] = [{} for _ in nodes]
    spans: list[dict[int, list]] = [{} for _ in nodes]
    for r, at in zip(results, spans_of):
        for name, st in r.stats.items():
            if st:
                pl = r.placements[name]
                roles[at[pl["node"]]][st["pid"]] = pl["role"]
                spans[at[pl["node"]]][st["pid"]] = st.get("step_spans", [])
    # forwarded, the emulator knows only the executor's time: each instance's own step spans
    # say when it had work on the device
    scores = [PhaseCheck.score(sm, roles[i], spans[i] if forward else None)
              for i, sm in enumerate(samples) if sm is not None]
    phase = _phase(scores) if scores else {"accuracy": None, "note": "no observer"}
    busy = _busy(status, m.get("duration_s", 0.0), problems)
    return Run(v, mode, rate, m, timings, problems, busy, phase, time.monotonic() - t_start, len(nodes), kv_net,
               link)


def link_check(kv: dict, before: list[dict] | None, after: list[dict] | None) -> dict:
    """The KV that crossed nodes (the model's bytes; what the decode instances read) against
    the prefill node's bytes sent on its link (node 0's interface counter) over the run:
    within [KV, KV x (1 + LINK_OVERHEAD) + LINK_SLACK]."""
    out = dict(kv, band=f"[KV, KV x {1 + LINK_OVERHEAD:g} + {LINK_SLACK // 1024} KiB]")
    if before is None or after is None:
        out.update(ok=kv["bytes"] == kv["reported"], link_tx_bytes=None,
                   note="no link counters (the nodes share this namespace)")
        return out
    sent = after[0]["tx_bytes"] - before[0]["tx_bytes"]
    got = after[1]["rx_bytes"] - before[1]["rx_bytes"]
    hi = kv["bytes"] * (1 + LINK_OVERHEAD) + LINK_SLACK
    ok = kv["bytes"] == kv["reported"] and kv["bytes"] <= sent <= hi
    out.update(ok=ok, link_tx_bytes=sent, link_rx_bytes=got,
               overhead=round(sent / kv["bytes"] - 1, 5) if kv["bytes"] else None,
               note=(f"node 0 sent {sent} bytes on the link for {kv['bytes']} bytes of KV "
                     f"({kv['requests']} prompts; the decode instances read {kv['reported']}, "
                     f"{kv['checked'] - kv['bad']} of {kv['checked']} with the bytes prefill wrote); "
                     f"want {out['band']}"))
    return out


def _phase(scores: list[dict]) -> dict:
    """Each node's observer's score, together: accuracy over all their intervals."""
    if len(scores) == 1:
        return scores[0]
    total = sum(s["intervals"] for s in scores)
    right = sum((s["accuracy"] or 0) * s["intervals"] for s in scores)
    wrong: dict[str, int] = {}
    for s in scores:
        for k, n in s.get("wrong", {}).items():
            wrong[k] = wrong.get(k, 0) + n
    return {"accuracy": round(right / total, 4) if total else None, "intervals": total,
            "edge": sum(s.get("edge", 0) for s in scores), "wrong": wrong, "source": scores[0].get("source"),
            "phase_sources": scores[0].get("phase_sources"), "error": next((s["error"] for s in scores
                                                                             if s.get("error")), None),
            "nodes": len(scores)}


def run_pairs(work: list[tuple[Any, driver.Setup, list[T.Request]]],
              on_done: Callable[[int], None] | None = None) -> list[driver.Result]:
    """driver.run for each (node or nodes, setup, requests) at once, in daemon threads: an
    interrupt in the caller's thread is not held up by them (the node's stop ends their
    instances)."""
    out: list[Any] = [None] * len(work)

    def one(i: int, node: Any, s: driver.Setup, reqs: list[T.Request]) -> None:
        try:
            out[i] = driver.run(node if len(node) > 1 else node[0], reqs, s, on_done)
        except BaseException as e:  # handed to the caller's thread
            out[i] = e

    threads = [threading.Thread(target=one, args=(i, n, s, r), daemon=True) for i, (n, s, r) in enumerate(work)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out


def _token_truth(results: list[driver.Result], status: dict, model: str) -> list[str]:
    """The emulator's kernel counts against the tokens timed: one prefill attention kernel per
    layer per prompt (each gives a first token) and one decode attention kernel per layer per
    decode step (the step's batch gives one token each); attention_prefill / attention_decode
    under --ops kernels, the aclnn operators' PromptFlashAttention / IncreFlashAttention."""
    layers = M.model_by_name(model).layers
    by_pid: dict[int, dict[str, int]] = {}
    for dev in status["devices"]:
        for c in dev["clients"]:
            acc = by_pid.setdefault(c["pid"], {})
            for k, n in c["count_by_name"].items():
                acc[k] = acc.get(k, 0) + n
    out = []
    for i, r in enumerate(results):
        # forwarded, the kernels are the executor's: only the prefill instance launches prefill
        # attention and only the decode instance decode attention, so its counts still tell them apart
        ex = r.executors or {}

        def pids(roles: tuple[str, ...]) -> set:
            return {ex.get(pl["device"], (r.stats.get(n) or {}).get("pid")) for n, pl in r.placements.items()
                    if pl["role"] in roles}

        firsts = sum(by_pid.get(p, {}).get(k, 0) for p in pids(("prefill", "mixed")) for k in PREFILL_ATTENTION)
        steps = sum(by_pid.get(p, {}).get(k, 0) for p in pids(("decode",)) for k in DECODE_ATTENTION)
        n = len(r.requests)
        later = sum(len(t.token_times) - 1 for t in r.requests)
        if firsts != layers * n:
            out.append(f"pair {i}: emulator ran {firsts} prefill attention kernels, {layers} x {n} prompts expected")
        if steps != layers * len(r.decode_batches) or sum(r.decode_batches) != later:
            out.append(f"pair {i}: emulator ran {steps} decode attention kernels for {len(r.decode_batches)} steps "
                       f"of {sum(r.decode_batches)} tokens; the driver timed {later} tokens after the first")
    return out


def _busy(status: dict, duration_s: float, problems: list[str]) -> dict:
    devs = status["devices"]
    share = [round(d["busy_ns"] / (duration_s * 1e9), 3) if duration_s > 0 else None for d in devs]
    return {"ok": not problems, "problems": len(problems), "device_busy_share": share,
            "check": "kernel counts, inter-device and host<->device bytes and tokens per instance; no byte "
                     "copied on a same-device hand-off (the KV pool shared through IPC memory); busy time against the "
                     "modelled kernel times (serial and contexts modes, partitions; 2%); forwarded: the "
                     "executor's counts, bytes and busy time against the sum of its instances', the "
                     "instances' own pids idle, the decode's imported pointer the prefill's pool"}


# ---------------------------------------------------------------- summaries and targets

def ttft_floor(reqs: list[T.Request], model: str, profile: str) -> dict:
    """Each prompt's own prefill, alone on a whole device (the modelled kernel times): no
    configuration's TTFT goes under it. p50/p99 over the trace, in ms."""
    from flexnpu.emulator.profiles import PROFILES

    cfg, prof = M.model_by_name(model), PROFILES[profile]
    alone = [M.step_seconds(M.step_kernels(cfg, (M.Chunk(r.prompt_tokens, r.prompt_tokens, True),)),
                            prof.peak_tflops * 1e12, prof.hbm_tbps * 1e12, prof.efficiency) for r in reqs]
    pct = MX.summary(alone)
    return {q: round(pct[q] * 1e3, 3) for q in ("p50", "p99")}


def _ms(s: dict) -> dict:
    return {k: (round(s[k] * 1e3, 3) if isinstance(s.get(k), float) and math.isfinite(s[k]) else None)
            for k in ("p50", "p90", "p99")}


def summarize(r: Run) -> dict:
    m = r.metrics
    return {
        "variant": r.variant.label or None,
        "execution": EXECUTION[r.variant.config],
        "nodes": r.nodes,
        "completed": m.get("completed", 0),
        "duration_s": round(m.get("duration_s", 0.0), 3),
        "ttft_ms": _ms(m["ttft_s"]), "tpot_ms": _ms(m["tpot_s"]), "itl_ms": _ms(m["itl_s"]),
        "output_tokens": m.get("output_tokens"),
        "output_tps": round(m["output_throughput"], 2), "request_ps": round(m["request_throughput"], 3),
        "slo_attainment": round(m["slo_attainment"], 4), "goodput": round(m["goodput"], 3),
        "busy_check": r.busy, "problems": r.problems, "phase": r.phase, "wall_s": round(r.wall_s, 1),
        **({"kv_net": r.kv_net} if r.kv_net is not None else {}),
        **({"link": r.link} if r.link is not None else {}),
    }


KEYS = [("ttft_ms", "p50"), ("ttft_ms", "p90"), ("ttft_ms", "p99"), ("tpot_ms", "p50"), ("tpot_ms", "p90"),
        ("tpot_ms", "p99"), ("itl_ms", "p50"), ("itl_ms", "p90"), ("itl_ms", "p99")]
FLAT = ("output_tps", "request_ps", "slo_attainment", "goodput")


def combine(runs: list[dict]) -> dict:
    """Repeats of one configuration: the median of each figure, and its spread (min, max)."""
    out = dict(runs[0])
    out["repeats"] = len(runs)
    spread: dict[str, list] = {}
    for a, b in KEYS:
        xs = [r[a][b] for r in runs if r[a][b] is not None]
        out[a] = dict(out[a])
        out[a][b] = statistics.median(xs) if xs else None
        spread[f"{a}.{b}"] = [min(xs), max(xs)] if xs else None
    for k in FLAT:
        xs = [r[k] for r in runs]
        out[k] = statistics.median(xs)
        spread[k] = [min(xs), max(xs)]
    out["spread"] = spread
    out["problems"] = [p for r in runs for p in r["problems"]]
    acc = [r["phase"]["accuracy"] for r in runs if r["phase"].get("accuracy") is not None]
    if acc:
        out["phase"] = dict(runs[0]["phase"], accuracy=min(acc))
    return out


@dataclass
class Target:
    name: str
    ratio: float | None
    want: str
    ok: bool | None
    how: str

    def to_json(self) -> dict:
        return {"name": self.name, "ratio": None if self.ratio is None else round(self.ratio, 4), "want": self.want,
                "status": "N/A" if self.ok is None else "PASS" if self.ok else "MISS", "how": self.how}


def _get(c: dict | None, a: str, b: str | None = None) -> float | None:
    if c is None:
        return None
    v = c[a][b] if b else c[a]
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def _ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def targets(cfgs: dict[str, dict], trace_name: str, sweep: dict | None, floor: dict | None = None) -> list[Target]:
    """floor: the trace's TTFT floor (`ttft_floor`), to say how much lower any TTFT could be.
    FlexNPU's targets for each of its configurations run (flexnpu-gated, flexnpu-forward)."""
    s, d = cfgs.get("static-colocation"), cfgs.get("static-disagg")
    n = cfgs.get("no-shim")
    g = (sweep or {}).get("max_rate", {})
    out = []
    for name in ("flexnpu-gated", "flexnpu-forward"):
        f = cfgs.get(name)
        if f is None and (name != "flexnpu-gated" or "flexnpu-forward" in cfgs):
            continue  # with neither run, flexnpu-gated's rows say N/A
        for q in ("p50", "p99"):
            r = _ratio(_get(f, "ttft_ms", q), _get(s, "ttft_ms", q))
            cut = None if r is None else 1 - r
            how = f"1 - {name} / static-colocation"
            st = _get(s, "ttft_ms", q)
            if floor and floor.get(q) and st:
                how += (f"; the prompts' own prefill alone (the TTFT floor) is {floor[q]:.1f} ms at {q}: at most "
                        f"{1 - floor[q] / st:.1%} lower is possible")
            out.append(Target(f"{name} TTFT {q} vs static-colocation", cut, ">= 0.92 lower",
                              None if cut is None else cut >= 0.92, how))
        r = _ratio(_get(f, "tpot_ms", "p50"), _get(s, "tpot_ms", "p50"))
        out.append(Target(f"{name} TPOT p50 vs static-colocation", r, "<= 1.05", None if r is None else r <= 1.05,
                          f"{name} / static-colocation"))
        r = _ratio(_get(f, "output_tps"), _get(s, "output_tps"))
        out.append(Target(f"{name} throughput vs static-colocation", r, ">= 0.97", None if r is None else r >= 0.97,
                          f"output tokens/s, {name} / static-colocation"))
        r = _ratio(_get(f, "output_tps"), _get(d, "output_tps"))
        for kind, want in (("balanced", 1.05), ("prefill-heavy", 1.25)):
            mine = trace_name == kind
            out.append(Target(f"{name} throughput vs static-disagg ({kind} trace)", r if mine else None,
                              f">= {want:g}", (r >= want if r is not None else None) if mine else None,
                              f"output tokens/s, {name} / static-disagg" + ("" if mine else f": run with --trace {kind}")))
        x = cfgs.get("static-disagg-xnode")
        if x is not None:  # disaggregation across nodes, as the paper's cluster runs it (--nodes 2)
            r = _ratio(_get(f, "output_tps"), _get(x, "output_tps"))
            for kind, want in (("balanced", 1.05), ("prefill-heavy", 1.25)):
                mine = trace_name == kind
                out.append(Target(f"{name} throughput vs static-disagg-xnode ({kind} trace)", r if mine else None,
                                  f">= {want:g}", (r >= want if r is not None else None) if mine else None,
                                  f"output tokens/s, {name} / static-disagg-xnode"
                                  + ("" if mine else f": run with --trace {kind}")))
            r = _ratio(_get(f, "ttft_ms", "p50"), _get(x, "ttft_ms", "p50"))
            out.append(Target(f"{name} TTFT p50 vs static-disagg-xnode", r, "<= 1.0",
                              None if r is None else r <= 1.0, f"{name} / static-disagg-xnode"))
        att = (sweep or {}).get("base_attainment", {})
        r = _ratio(att.get(name), att.get("static-disagg"))
        out.append(Target(f"{name} goodput vs static-disagg at its p90 SLO", r, ">= 1.0",
                          None if r is None else r >= 1.0,
                          "requests within static-disagg's own p90 TTFT and TPOT, at this rate"
                          + ("" if sweep else ": run with --rates")))
        r = _ratio(g.get(name), g.get("static-disagg"))
        for kind, want in (("balanced", 1.05), ("prefill-heavy", 1.25)):
            mine = trace_name == kind
            out.append(Target(f"{name} saturation rate vs static-disagg ({kind} trace)", r if mine else None,
                              f">= {want:g}", (r >= want if r is not None else None) if mine else None,
                              "highest rate the sweep tried with >= 90% of requests within static-disagg's p90 TTFT "
                              "and TPOT at the base rate" + ("" if sweep else ": run with --rates")
                              + ("" if mine else f"; run with --trace {kind}")))
        r = _ratio(_get(f, "ttft_ms", "p99"), _get(n, "ttft_ms", "p99"))
        out.append(Target(f"{name} TTFT p99 vs no-shim", r, "<= 0.8", None if r is None else r <= 0.8,
                          f"{name} / no-shim: plain co-location, what a user has for free"))
        r = _ratio(att.get(name), att.get("no-shim"))
        out.append(Target(f"{name} goodput vs no-shim at static-disagg's p90 SLO", r, ">= 1.0",
                          None if r is None else r >= 1.0, f"{name} / no-shim, requests within the SLO"))
    for name in ("uncontrolled", "forward-uncontrolled"):
        u = cfgs.get(name)
        if u is None and name != "uncontrolled":
            continue
        r = _ratio(_get(u, "output_tps"), _get(n, "output_tps"))
        out.append(Target(f"{name} throughput vs no-shim", r, "within 1%", None if r is None else abs(r - 1) <= 0.01,
                          f"output tokens/s, {name} / no-shim"))
    for name, c in cfgs.items():
        acc = (c.get("phase") or {}).get("accuracy")
        if acc is not None:
            out.append(Target(f"phase classification right, {name}", acc, ">= 0.97", acc >= 0.97,
                              f"share of observer intervals right (source {c['phase'].get('source')})"))
    return out


def max_rate(points: list[tuple[float, float]]) -> float | None:
    """Highest rate served at ATTAIN, by linear interpolation where attainment crosses it;
    points are (rate, attainment). None when the lowest rate already misses."""
    pts = sorted(points)
    if not pts or pts[0][1] < ATTAIN:
        return None
    best = pts[0][0]
    for (r0, a0), (r1, a1) in zip(pts, pts[1:]):
        if a1 >= ATTAIN:
            best = r1
            continue
        best = r0 + (r1 - r0) * (a0 - ATTAIN) / (a0 - a1) if a0 > a1 else r0
        break
    return best


# ---------------------------------------------------------------- the whole benchmark

@dataclass
class Plan:
    """What will run, for the progress bar: (mode, rate, repeat, variant or 'static')."""
    steps: list[tuple[str, float, int, Variant | None]] = field(default_factory=list)
    requests_per_run: int = 0

    @property
    def total_requests(self) -> int:
        return len(self.steps) * self.requests_per_run


def plan(o: Options) -> Plan:
    """With --rate auto, the operating point's sweep counts as one run a rate tried (more run
    where a rate's first static split is not stable), and the targets' runs at its lowest rate."""
    p = Plan(requests_per_run=len(make_trace(o, o.rate or o.auto_rates[0])[0]))
    if o.rate is None:
        p.steps += [(o.modes[0], r, 0, Variant("static-colocation")) for r in o.auto_rates]
        o = replace(o, rate=o.auto_rates[0])
    for mode in o.modes:
        for rate in rates_of(o):
            for rep in range(o.repeat):
                for c in o.configs:
                    if c not in SWEPT:
                        p.steps.append((mode, rate, rep, Variant(c)))
                    elif rep == 0:
                        p.steps += [(mode, rate, rep, v) for v in variants(c, o)]
                    else:
                        p.steps.append((mode, rate, rep, None))  # the sweep's choice
    return p


def rates_of(o: Options) -> list[float]:
    return sorted(set(o.rates) | ({o.rate} if o.rate is not None else set()))


def stability(timings: list[MX.RequestTiming]) -> dict:
    """Whether a run kept up with its load: every request finished, and the last third of the
    requests (by arrival) waited no longer than the first third, within STABLE_GROWTH, for the
    first token (the prefill side's queue) and per later token (the decode side's). Output
    tokens/s against the trace's would not tell: a run's throughput is over its whole
    duration, the last long replies' tail included (docs/bench.md)."""
    ts = sorted(timings, key=lambda t: t.arrival)
    k = max(1, len(ts) // 3)
    done = all(len(t.token_times) >= t.output_tokens for t in ts)

    def med(xs: list[float]) -> float | None:
        return statistics.median(xs) if xs else None

    def ttft(g: list[MX.RequestTiming]) -> float | None:
        return med([t.ttft for t in g if t.token_times])

    def tpot(g: list[MX.RequestTiming]) -> float | None:
        return med([t.tpot for t in g if t.tpot is not None])

    out: dict[str, Any] = {"complete": done}
    ok = done and len(ts) >= 3
    for name, f in (("ttft", ttft), ("tpot", tpot)):
        a, b = f(ts[:k]), f(ts[-k:])
        g = b / a if a and b is not None else None
        out[f"{name}_first_ms"] = None if a is None else round(a * 1e3, 3)
        out[f"{name}_last_ms"] = None if b is None else round(b * 1e3, 3)
        out[f"{name}_growth"] = None if g is None else round(g, 3)
        ok = ok and (g is None or g <= STABLE_GROWTH)
    out["stable"] = ok
    return out


def serves(r: Run) -> dict:
    """`stability`, and whether the run served its load: stable, and at least ATTAIN of its
    requests within the SLO (a split that keeps up only by missing the SLO is not one a
    serving node would run at that load)."""
    st = stability(r.timings)
    att = r.metrics.get("slo_attainment", 0.0)
    return {**st, "slo_attainment": round(att, 4), "serves": bool(st["stable"] and att >= ATTAIN)}


def operating_point(o: Options, runs: Callable[[Variant, float], Run], say: Callable[[str], None]) -> dict:
    """--rate auto: the highest of o.auto_rates at which static co-location serves its load
    (`serves`: stable, within the SLO), in the first mode. At each rate the static splits are
    tried (vNPU partitions first, the one that served the rate below before the rest; a split
    that did not serve a lower rate is not tried again) until one serves; the sweep stops at
    the first rate where none does. runs(variant, rate) runs (or recalls) one."""
    order = sorted(static_variants(o), key=lambda v: v.form != "vnpu")
    failed: set[tuple[str, float]] = set()
    rows: list[dict] = []
    chosen: float | None = None
    for rate in sorted(o.auto_rates):
        ok = None
        for v in order:
            if (v.form, v.share) in failed:
                continue
            r = runs(v, rate)
            st = serves(r)
            s = summarize(r)
            rows.append({"rate": rate, "form": v.form, "prefill_share": v.share, **st,
                         "ttft_p50_ms": s["ttft_ms"]["p50"], "ttft_p99_ms": s["ttft_ms"]["p99"],
                         "tpot_p50_ms": s["tpot_ms"]["p50"], "output_tps": s["output_tps"],
                         "device_busy_share": s["busy_check"]["device_busy_share"]})
            say(f"operating point: {rate:g} req/s, static {v.label}: "
                f"{'serves' if st['serves'] else 'does NOT serve'} it ({'stable' if st['stable'] else 'NOT stable'}: "
                f"TTFT p50 first/last third {st['ttft_first_ms']}/{st['ttft_last_ms']} ms, TPOT "
                f"{st['tpot_first_ms']}/{st['tpot_last_ms']} ms; {st['slo_attainment']:.0%} within the SLO)")
            if st["serves"]:
                ok = v
                break
            failed.add((v.form, v.share))
        if ok is None:
            break
        chosen = rate
        order = [ok] + [v for v in order if v != ok]
    note = (f"the highest rate tried at which a static split serves its load: stable (TTFT and TPOT of the last "
            f"third of requests within {STABLE_GROWTH:g}x the first third's, every request done) and "
            f">= {ATTAIN:.0%} of requests within the SLO")
    if chosen is None:
        chosen = min(o.auto_rates)
        note = "no static split served any rate tried: the lowest is used"
    elif chosen == max(o.auto_rates):
        note += "; stable at the top rate tried, so a lower bound"
    say(f"operating point: {chosen:g} req/s ({note})")
    return {"rate": chosen, "mode": o.modes[0], "note": note, "growth_limit": STABLE_GROWTH,
            "rates_tried": sorted(o.auto_rates), "sweep": rows}


def static_variants(o: Options) -> list[Variant]:
    return [Variant("static-colocation", form, s) for form in ("time", "vnpu") for s in o.shares]


def _better(a: Run, b: Run) -> Run:
    """The honest best static split (or xPyD ratio): one that serves the load (`serves`), else a stable one
    (one whose queue grows over the run is overloaded at this load, whatever its goodput over
    a finite trace); then more goodput; then lower TTFT p99."""
    sa, sb = serves(a), serves(b)
    ka = (sa["serves"], sa["stable"], round(a.metrics["goodput"], 6), -a.metrics["ttft_s"]["p99"])
    kb = (sb["serves"], sb["stable"], round(b.metrics["goodput"], 6), -b.metrics["ttft_s"]["p99"])
    return a if ka >= kb else b


def run(o: Options, progress: Callable[[str, int], None] | None = None,
        log: Callable[[str], None] | None = None) -> dict:
    """Runs the whole benchmark; returns the report (`--json`). progress(description, done
    requests since the last call) and log(line) are called as it goes."""
    o.check()
    say = log or (lambda s: None)
    tick = progress or (lambda d, k: None)
    if o.left_out:
        say(o.left_out)
    t0 = time.time()
    points: list[dict] = []
    cache: dict[tuple, Run] = {}  # the operating point's runs, reused by the targets' static sweep

    def static_run(v: Variant, rate: float, mode: str) -> Run:
        key = (mode, rate, v.form, v.share)
        if key not in cache:
            desc = f"{mode} {rate:g} req/s operating point: static {v.label}"
            tick(desc, 0)
            cache[key] = run_one(v, make_trace(o, rate)[0], o, mode, rate, on_done=lambda _id: tick(desc, 1))
        return cache[key]

    op = None
    if o.rate is None:
        op = operating_point(o, lambda v, r: static_run(v, r, o.modes[0]), say)
        o = replace(o, rate=op["rate"])
    for mode in o.modes:
        for rate in rates_of(o):
            reqs, tdesc = make_trace(o, rate)
            runs: dict[str, list[dict]] = {}
            raw: dict[str, list[Run]] = {}
            sweep: list[dict] = []
            dsweep: dict[str, list[dict]] = {}
            choices: dict[str, Variant] = {}
            for rep in range(o.repeat):
                for c in o.configs:
                    chosen = choices.get(c)
                    vs = variants(c, o) if chosen is None else [chosen]
                    best: Run | None = None
                    for v in vs:
                        desc = f"{mode} {rate:g} req/s #{rep + 1}: {c}" + (f" ({v.label})" if v.label else "")
                        tick(desc, 0)
                        key = (mode, rate, v.form, v.share)
                        r = (cache[key] if c == "static-colocation" and rep == 0 and key in cache else
                             run_one(v, reqs, o, mode, rate, on_done=lambda _id, d=desc: tick(d, 1)))
                        say(f"{desc}: TTFT p50 {_get(summarize(r), 'ttft_ms', 'p50')} ms, TPOT p50 "
                            f"{_get(summarize(r), 'tpot_ms', 'p50')} ms, {r.metrics['output_throughput']:.1f} tok/s, "
                            f"goodput {r.metrics['goodput']:.2f} req/s" + (f"; PROBLEMS: {r.problems}" if r.problems else ""))
                        if c == "static-colocation" and chosen is None:
                            sweep.append({"form": v.form, "prefill_share": v.share, **_brief(summarize(r)),
                                          "stable": stability(r.timings)["stable"], "serves": serves(r)["serves"]})
                        elif c in DISAGG and chosen is None:
                            dsweep.setdefault(c, []).append({"ratio": v.ratio, **_brief(summarize(r)),
                                                             "stable": stability(r.timings)["stable"],
                                                             "serves": serves(r)["serves"]})
                        best = r if best is None else _better(best, r)
                    if c in SWEPT and chosen is None and best is not None:
                        choices[c] = best.variant
                        if len(vs) > 1:
                            say(f"{mode} {rate:g} req/s: {c} uses {best.variant.label} (best of the sweep)")
                    runs.setdefault(c, []).append(summarize(best))
                    raw.setdefault(c, []).append(best)
            point = {"mode": mode, "rate": rate, "trace": tdesc, "ttft_floor_ms": ttft_floor(reqs, o.model, o.profile),
                     "configs": {c: combine(rs) for c, rs in runs.items()}, "static_sweep": sweep,
                     "static_choice": choices["static-colocation"].label if "static-colocation" in choices else None,
                     "disagg_sweep": dsweep, "disagg_choice": {c: choices[c].label for c in DISAGG if c in choices}}
            point["_raw"] = raw
            points.append(point)
    return report(o, points, time.time() - t0, op)


def _brief(s: dict) -> dict:
    return {"ttft_p50_ms": s["ttft_ms"]["p50"], "ttft_p99_ms": s["ttft_ms"]["p99"], "tpot_p50_ms": s["tpot_ms"]["p50"],
            "output_tps": s["output_tps"], "goodput": s["goodput"], "slo_attainment": s["slo_attainment"]}


def load_sweep(o: Options, points: list[dict], mode: str) -> dict | None:
    """TTFT p99 and goodput against rate per configuration, and the goodput target's rates:
    the SLO is static-disagg's p90 TTFT and TPOT at the base rate (what it just meets)."""
    mine = [p for p in points if p["mode"] == mode]
    if not mine:
        return None
    base = next(p for p in mine if p["rate"] == o.rate)
    d = base["configs"].get("static-disagg")
    slo = MX.Slo(d["ttft_ms"]["p90"] / 1e3, d["tpot_ms"]["p90"] / 1e3) if d else o.slo
    curves: dict[str, list[dict]] = {}
    best: dict[str, float | None] = {}
    for c in o.configs:
        pts = []
        for p in mine:
            runs = p["_raw"][c]
            att = statistics.median(MX.compute(r.timings, slo)["slo_attainment"] for r in runs)
            s = p["configs"][c]
            pts.append({"rate": p["rate"], "ttft_p99_ms": s["ttft_ms"]["p99"], "goodput": s["goodput"],
                        "output_tps": s["output_tps"], "attainment_at_disagg_slo": round(att, 4)})
        curves[c] = pts
        # a saturation rate needs rates to choose from (--rates): one rate says only the goodput there
        best[c] = max_rate([(x["rate"], x["attainment_at_disagg_slo"]) for x in pts]) if len(pts) > 1 else None
    return {"slo": {"ttft_ms": round(slo.ttft_s * 1e3, 3), "tpot_ms": round(slo.tpot_s * 1e3, 3),
                    "from": "static-disagg p90 at the base rate" if d else "--slo-*"},
            "attain": ATTAIN, "curves": curves, "max_rate": best,
            "base_attainment": {c: next(x["attainment_at_disagg_slo"] for x in pts if x["rate"] == o.rate)
                                for c, pts in curves.items()},
            "note": f"max_rate: highest rate with >= {ATTAIN:.0%} of requests within the SLO; the sweep's top "
                    f"rate ({max(p['rate'] for p in mine):g}) when every rate met it (a lower bound)"}


def report(o: Options, points: list[dict], wall_s: float, op: dict | None = None) -> dict:
    out_points = []
    tg: list[dict] = []
    sweeps = {}
    for mode in o.modes:
        sweeps[mode] = load_sweep(o, points, mode)
    for p in points:
        q = {k: v for k, v in p.items() if k != "_raw"}
        if p["rate"] == o.rate:
            for t in targets(p["configs"], o.trace if o.trace in TRACES else "file", sweeps.get(p["mode"]),
                             p.get("ttft_floor_ms")):
                tg.append(dict(t.to_json(), mode=p["mode"], rate=p["rate"]))
        out_points.append(q)
    return {
        "schema": 1,
        "benchmark": "pd",
        "options": {**{k: v for k, v in vars(o).items()
                       if k not in ("modes", "rates", "configs", "shares", "auto_rates")},
                    "modes": list(o.modes), "rates": rates_of(o), "configs": list(o.configs),
                    "shares": list(o.shares), "auto_rates": list(o.auto_rates) if op else None},
        "machine": machine(),
        "flexpd_config": FLEXPD_TOML,
        "network": ({"nodes": o.nodes, "link": {"rate_gbit": o.link_gbit, "delay_us": o.link_delay_us},
                     "kv_link_band": f"[KV, KV x {1 + LINK_OVERHEAD:g} + {LINK_SLACK // 1024} KiB]"}
                    if o.nodes > 1 else {"nodes": 1}),
        "operating_point": op or {"rate": o.rate, "note": "given with --rate"},
        "observer": _observer_note(points),
        "wall_s": round(wall_s, 1),
        "results": out_points,
        "load_sweep": sweeps,
        "targets": tg,
        "_points": points,
    }


def _observer_note(points: list[dict]) -> str:
    srcs = {c.get("phase", {}).get("source") for p in points for c in p["configs"].values()} - {None}
    return ", ".join(sorted(srcs)) or "none"


def json_ready(rep: dict) -> dict:
    return {k: v for k, v in rep.items() if not k.startswith("_")}


def default_observer() -> str:
    """bpf where this process may load it (root), else the shim's counters."""
    return "auto" if os.geteuid() == 0 else "shim"

