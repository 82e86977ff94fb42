"""Replays a trace through a prefill and a decode instance and measures it.

    from flexnpu.bench.node import LocalNode
    from flexnpu.workload import driver, trace
    with LocalNode(devices=1, observer=None, daemons=False) as node:
        res = driver.run(node, trace.generate(trace.TraceSpec(n=50, rate=2)), driver.Setup())
    res.metrics["ttft_s"]["p99"], res.problems   # problems: [] when the emulator agrees

Each request is sent to the prefill instance at its arrival time (FCFS there, batched up to
a token budget); its first token and hand-off come back on the prefill instance's stdout,
the hand-off goes to the decode instance, whose "taken" releases the prefill's KV, and the
decode instance's token events give every later token's time. With `Setup.mixed` one
instance does both (a chunked-prefill engine). The instances run with the node's
environment, under the FlexNPU shim unless `Setup.shim` is False; with `Setup.forward`
forwarded (the shim's forward build: their calls run in the device's executor, started by
the node's daemon), and a node that cannot forward fails the run with its reason.

With `Setup.kv_ipc` (the default) the KV is handed over through AscendCL's IPC memory calls
(instance.py): before the first request the driver has the prefill instance allow the decode
instance's pid (both from their "ready") and the decode instance import the prefill's KV pool;
on one device the prefill's range is then released when the decode instance is "done" with the
request, as the decode instance reads the prompt's KV where it is.

xPyD (`Setup.placements`): one run is a list of instance placements (role, node, device) on
one or more nodes (a LocalNode each) and one `Router`: each request goes to the prefill
instance with the fewest prompt tokens outstanding (sent, not yet prefilled), and once
prefilled to the decode instance with the fewest sequences in hand (handed over, not
finished), then the fewest KV tokens (prompt + output of those), then the first listed. The
KV goes the way the two instances' places allow: on one device the decode instance reads it
in the prefill's pool (IPC, nothing copied); on one node across devices it pulls it over the
device link from the imported pool (every decode instance imports every prefill pool of its
node); across nodes it goes over TCP with the transfer engine (instance.py --kv-net, each
node's address from `Setup.node_addrs`, else the node's `host`), and `Result.kv_net` holds
the bytes that crossed (the model's prompt_tokens x kv_bytes_per_token of each such
request), for a caller to compare with the link's own counters. Without placements the run is the one pair of
`prefill_device` and `decode_device` (or the one mixed instance) on the one node, as always.

Every run ends with `check`: the emulator's per-process kernel counts must equal what each
instance says it launched, its busy time the sum of the modelled kernel times within
`Setup.busy_tolerance` (serial mode; contexts mode too for an instance that copied nothing
between devices: its only stream then runs one op at a time at full speed), and on one device
the hand-off must have copied nothing.

Forwarded, the instances' device work is the executor's (one emulator client per device, the
executor's pid; the instances' own pids must have run nothing), so the check is per device:
the executor's kernel counts must equal the sum of what the device's instances launched, its
busy time the sum of their modelled times (serial mode) or, in contexts mode, where their
streams share the cores in its one context, at least the larger and at most the sum (within
`Setup.busy_tolerance`), and on one device nothing copied. The IPC hand-off within one
executor is the exporter's memory itself (the executor exports once through the runtime and
imports nothing): the decode instance's imported pointer must be the prefill's pool.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from flexnpu.workload import metrics as MX
from flexnpu.workload.aclnn import DEFAULT_OPS
from flexnpu.workload.model import model_by_name
from flexnpu.workload.trace import Request

COPY_NAMES = ("memcpy", "memset")
ROLES = ("prefill", "decode", "mixed")


@dataclass(frozen=True)
class Placement:
    """Where one instance runs: its role, the node (an index into the run's nodes) and device."""
    role: str
    node: int = 0
    device: int = 0

    def to_json(self) -> dict:
        return {"role": self.role, "node": self.node, "device": self.device}


def ratio_name(x: int, y: int) -> str:
    """1P3D: x prefill and y decode instances."""
    return f"{x}P{y}D"


def xpyd(x: int, y: int, nodes: int = 1) -> tuple[Placement, ...]:
    """x prefill instances on devices 0..x-1 and y decode instances on the devices after them,
    one node; with nodes=2 the prefill instances on node 0's devices 0..x-1 and the decode
    instances on node 1's devices 0..y-1."""
    if nodes == 1:
        return tuple([Placement("prefill", 0, d) for d in range(x)] + [Placement("decode", 0, x + d) for d in range(y)])
    return tuple([Placement("prefill", 0, d) for d in range(x)] + [Placement("decode", 1, d) for d in range(y)])


@dataclass
class Setup:
    model: str = "qwen2.5-7b"
    profile: str = "910b"  # must be the node's; the instances model time with its efficiencies
    prefill_device: int = 0
    decode_device: int = 0
    mixed: bool = False  # one chunked-prefill instance instead of prefill + decode
    chunk_tokens: int = 0
    max_batched_tokens: int = 8192
    max_num_seqs: int = 256
    prefill_kv_tokens: int = 65536
    decode_kv_tokens: int = 0  # 0: 90% of the device memory free when it starts
    weights: bool = True
    shim: bool = True
    role_env: bool = False  # FLEXNPU_ROLE in the instances' environment without the shim (vNPU partitions)
    kv_ipc: bool = True  # hand the KV over through IPC memory (the decode instance imports the prefill's pool)
    placements: tuple[Placement, ...] = ()  # xPyD: every instance's place (empty: the pair above)
    node_addrs: tuple[str, ...] = ()  # each node's address for KV across nodes (default: the node's .host)
    kv_check: bool = False  # KV across nodes: filled with each request's own byte and read back (--kv-check)
    forward: bool = False  # forwarded: the instances' calls run in the device's executor (needs the node's daemons)
    ops: str = DEFAULT_OPS  # how the instances express a step: kernels, aclnn, aclnn-fia (instance --ops)
    slo: MX.Slo = field(default_factory=MX.Slo)
    busy_tolerance: float = 0.02
    timeout_s: float = 600.0

    def describe(self) -> dict:
        d = dict(vars(self))
        d["slo"] = vars(self.slo)
        d["placements"] = [p.to_json() for p in self.placements]
        d["node_addrs"] = list(self.node_addrs)
        return d

    def instances(self) -> list[tuple[str, Placement]]:
        """Every instance's name and place, prefill instances first. The names are the roles
        where each role has one instance ("prefill", "decode"; the mixed instance is "prefill"),
        else role-index ("prefill-0", "decode-2")."""
        if not self.placements:
            if self.mixed:
                return [("prefill", Placement("mixed", 0, self.prefill_device))]
            return [("prefill", Placement("prefill", 0, self.prefill_device)),
                    ("decode", Placement("decode", 0, self.decode_device))]
        order = sorted(self.placements, key=lambda p: p.role != "prefill")
        out, seen = [], {}
        for p in order:
            k = seen[p.role] = seen.get(p.role, -1) + 1
            many = sum(q.role == p.role for q in order) > 1
            out.append((f"{p.role}-{k}" if many else ("prefill" if p.role == "mixed" else p.role), p))
        return out

    def addr(self, node: int) -> str:
        return self.node_addrs[node] if node < len(self.node_addrs) else "127.0.0.1"

    def refusal(self) -> str | None:
        """Why these placements cannot run (None: they can)."""
        if not self.placements:
            return None
        roles = [p.role for p in self.placements]
        if any(r not in ROLES for r in roles):
            return f"placements take the roles {', '.join(ROLES)}, got {roles}"
        if "mixed" in roles and len(roles) > 1:
            return "a mixed instance runs alone"
        if "mixed" not in roles and ("prefill" not in roles or "decode" not in roles):
            return "xPyD needs at least one prefill and one decode instance"
        if len(set(self.placements)) != len(self.placements):
            return "two instances of one role on one device"
        if not self.kv_ipc and len({(p.node, p.device) for p in self.placements if p.role == "prefill"}) > 1:
            return "several prefill instances need the KV shared through IPC memory (kv_ipc)"
        return None


@dataclass
class Result:
    metrics: dict
    requests: list[MX.RequestTiming]
    stats: dict[str, dict]  # per instance role: what it says it did
    status: dict  # the emulator's status after the run
    problems: list[str]
    setup: dict
    decode_batches: list[int]  # requests decoded in each decode step, in order
    handoff: dict | None = None  # kv_ipc: the emulator's IPC record of each instance once the import is made
    executors: dict[int, int] | None = None  # forward: device -> its executor's pid (the emulator's client)
    placements: dict[str, dict] = field(default_factory=dict)  # instance name -> its role, node, device
    routes: dict[int, list[str]] = field(default_factory=dict)  # request id -> [prefill, decode] instance names
    kv_net: dict = field(default_factory=dict)  # KV across nodes: requests, bytes (the model's), reported


class _Proc:
    def __init__(self, p: subprocess.Popen, name: str, on_event) -> None:
        self.p, self.name = p, name
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.info: dict = {}
        self.imported: dict = {}  # its "imported" event (decode; the last one)
        self.acks: dict[str, threading.Semaphore] = {"allowed": threading.Semaphore(0),
                                                     "imported": threading.Semaphore(0)}
        self.stats: dict | None = None
        self.thread = threading.Thread(target=self._read, args=(on_event,), daemon=True)
        self.thread.start()

    def _read(self, on_event) -> None:
        for line in self.p.stdout:
            ev = json.loads(line)
            if ev["ev"] == "ready":
                self.info = ev
                self.ready.set()
            elif ev["ev"] == "stats":
                self.stats = ev
            else:
                if ev["ev"] == "imported":
                    self.imported = ev
                on_event(self, ev)

    def send(self, **msg) -> None:
        with self.lock:
            self.p.stdin.write(json.dumps(msg) + "\n")
            self.p.stdin.flush()


def _argv(role: str, s: Setup, device: int, kv_tokens: int, src: int | None = None, export: bool | None = None,
          net: str | None = None, net_log: str | None = None) -> list[str]:
    """An instance's command line; src: the one prefill device it pulls from (--kv-src-device);
    export: whether a prefill exports its pool (default: with kv_ipc); net: its --kv-net address."""
    a = [sys.executable, "-m", "flexnpu.workload.instance", "--role", role, "--model", s.model, "--profile", s.profile,
         "--device", str(device), "--chunk-tokens", str(s.chunk_tokens), "--max-batched-tokens",
         str(s.max_batched_tokens), "--max-num-seqs", str(s.max_num_seqs), "--kv-tokens", str(kv_tokens),
         "--ops", s.ops]
    if src is not None:
        a += ["--kv-src-device", str(src)]
    if role == "prefill" and (s.kv_ipc if export is None else export):
        a += ["--kv-export"]
    if net is not None:
        a += ["--kv-net", net] + (["--kv-check"] if s.kv_check else []) + (["--kv-net-log", net_log] if net_log else [])
    return a + ([] if s.weights else ["--no-weights"])


class Router:
    """Deals requests to x prefill and y decode instances (module docstring): prefill by the
    fewest prompt tokens outstanding, decode by the fewest sequences in hand, then the fewest
    KV tokens, then the order given. Called from the instances' reader threads: locked."""

    def __init__(self, prefills: Sequence[str], decodes: Sequence[str]) -> None:
        self.prefills, self.decodes = list(prefills), list(decodes)
        self.outstanding = {n: 0 for n in self.prefills}  # prompt tokens sent, not yet prefilled
        self.seqs = {n: 0 for n in self.decodes}  # requests handed over, not finished
        self.kv = {n: 0 for n in self.decodes}  # their prompt + output tokens
        self.lock = threading.Lock()

    def prefill_for(self, r: Request) -> str:
        with self.lock:
            name = min(self.prefills, key=self.outstanding.__getitem__)  # ties: the first listed
            self.outstanding[name] += r.prompt_tokens
            return name

    def prefilled(self, name: str, r: Request) -> None:
        with self.lock:
            self.outstanding[name] -= r.prompt_tokens

    def decode_for(self, r: Request) -> str:
        with self.lock:
            name = min(self.decodes, key=lambda n: (self.seqs[n], self.kv[n]))  # ties: the first listed
            self.seqs[name] += 1
            self.kv[name] += r.prompt_tokens + r.output_tokens
            return name

    def finished(self, name: str, r: Request) -> None:
        with self.lock:
            self.seqs[name] -= 1
            self.kv[name] -= r.prompt_tokens + r.output_tokens


def too_long(reqs: list[Request], setup: Setup) -> None:
    """ValueError (one line) when a request cannot be served at all: longer than the model's
    context, or a prompt larger than the prefill instance's KV pool. It would wait forever."""
    limit = model_by_name(setup.model).max_context
    bad = [r for r in reqs if r.prompt_tokens + r.output_tokens > limit]
    if bad:
        r = bad[0]
        raise ValueError(f"{len(bad)} of {len(reqs)} requests need more than {setup.model}'s {limit}-token context "
                         f"(the first: request {r.id}, {r.prompt_tokens} prompt + {r.output_tokens} output tokens)")
    big = [r for r in reqs if r.prompt_tokens > setup.prefill_kv_tokens and not setup.mixed]
    if big:
        raise ValueError(f"{len(big)} prompts are larger than the prefill instance's KV pool "
                         f"({setup.prefill_kv_tokens} tokens; the first: request {big[0].id}, {big[0].prompt_tokens})")


def _nodes(node: Any) -> list[Any]:
    return list(node) if isinstance(node, (list, tuple)) else [node]


def _kv_way(p: Placement, d: Placement, kv_ipc: bool) -> str:
    """How the KV goes from prefill p to decode d: "shared" (one device, IPC), "peer" (one
    node, pulled over the device link), "net" (across nodes, the transfer engine)."""
    if p.node != d.node:
        return "net"
    return "shared" if p.device == d.device and kv_ipc else "peer"


def run(node: Any, reqs: list[Request], setup: Setup, on_done: Callable[[int], None] | None = None) -> Result:
    """Runs the trace on the node (a started LocalNode; for placements on several nodes, a
    list of them, node i of a placement being nodes[i]) and returns metrics and checks.
    on_done(request id) is called, from a reader thread, as each request finishes."""
    too_long(reqs, setup)
    nodes = _nodes(node)
    why = setup.refusal()
    if why:
        raise ValueError(f"cannot run: {why}")
    insts = setup.instances()
    place = dict(insts)
    if any(p.node >= len(nodes) for p in place.values()):
        raise ValueError(f"placements name node {max(p.node for p in place.values())}, the run has {len(nodes)}")
    prefills = [n for n, p in insts if p.role in ("prefill", "mixed")]
    decodes = [n for n, p in insts if p.role == "decode"]
    mixed = any(p.role == "mixed" for p in place.values())
    router = Router(prefills, decodes or prefills)
    timing = {r.id: MX.RequestTiming(r.id, 0.0, r.prompt_tokens, r.output_tokens) for r in reqs}
    by_id = {r.id: r for r in reqs}
    done = threading.Event()
    remaining = [len(reqs)]
    lock = threading.Lock()
    procs: dict[str, _Proc] = {}
    batches: list[int] = []
    routes: dict[int, list[str]] = {}
    kvb = model_by_name(setup.model).kv_bytes_per_token
    net = {"requests": 0, "bytes": 0}

    def finished(rid: int) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()
        if on_done is not None:
            on_done(rid)

    def on_event(src: _Proc, ev: dict) -> None:
        kind = ev["ev"]
        if kind == "first":
            rt = timing[ev["id"]]
            rt.token_times.append(ev["t"])
            router.prefilled(src.name, by_id[ev["id"]])
            if rt.output_tokens <= 1:
                finished(ev["id"])
        elif kind == "handoff":
            r = by_id[ev["id"]]
            dname = router.decode_for(r)
            way = _kv_way(place[src.name], place[dname], setup.kv_ipc)
            routes[r.id] = [src.name, dname, way]
            msg: dict[str, Any] = dict(op="kv", id=r.id, prompt=r.prompt_tokens, output=r.output_tokens,
                                       kv_start=ev.get("kv_start", -1))
            if way == "net":
                msg.update(segment=ev["segment"], addr=ev["addr"])
                with lock:
                    net["requests"] += 1
                    net["bytes"] += r.prompt_tokens * kvb
            elif setup.kv_ipc and len(prefills) > 1:
                msg["peer"] = src.name
            procs[dname].send(**msg)
        elif kind == "taken" and routes[ev["id"]][2] != "shared" or kind == "done":
            # the decode instance needs the prefill's KV no more
            procs[routes[ev["id"]][0]].send(op="release", id=ev["id"])
        elif kind in src.acks:
            src.acks[kind].release()
        elif kind == "tokens":
            batches.append(len(ev["ids"]))
            for rid in ev["ids"]:
                rt = timing[rid]
                rt.token_times.append(ev["t"])
                if len(rt.token_times) >= rt.output_tokens:
                    finished(rid)
                    router.finished(src.name, by_id[rid])

    def spawn(name: str, argv: list[str], p: Placement) -> _Proc:
        env_role = p.role if p.role in ("prefill", "decode") else "auto"
        extra = {"FLEXNPU_ROLE": env_role} if setup.role_env and not setup.shim else None
        proc = nodes[p.node].spawn(argv, role=env_role, shim=setup.shim, extra_env=extra, stdin=subprocess.PIPE,
                                   stderr=None, forward=setup.forward)
        procs[name] = _Proc(proc, name, on_event)
        if not procs[name].ready.wait(60):
            how = " forwarded (its reason is on stderr above)" if setup.forward else ""
            raise RuntimeError(f"the {name} instance did not start{how} (exit {proc.poll()})")
        return procs[name]

    handoff = None
    executors: dict[int, int] | None = None
    fwd_devices = sorted({p.device for p in place.values()})
    if setup.forward:
        if len(fwd_devices) > 1 or any(p.node for p in place.values()):
            raise RuntimeError("cannot forward: forwarded instances are co-located here (prefill and decode on one "
                               "device); run the cross-device pair gated")
        why = nodes[0].forward_refusal(fwd_devices) or ops_refusal(setup.ops)
        if why:
            raise RuntimeError(f"cannot forward: {why}")

    def executors_now() -> dict[int, int]:
        # a daemon starts its executor at the first forwarded client: the instances are up now
        out = {d: nodes[0].executor_pid(d) for d in fwd_devices}
        if any(pid is None for pid in out.values()):
            raise RuntimeError(f"cannot forward: no executor serves device(s) "
                               f"{sorted(d for d, p in out.items() if p is None)}")
        return out

    # each node's address for the transfer engine: given, else the node's own (LocalNode.host)
    addrs = [setup.addr(i) if setup.node_addrs else getattr(n, "host", "127.0.0.1") for i, n in enumerate(nodes)]

    def argv(name: str, p: Placement) -> list[str]:
        others = [place[n] for n in (decodes if p.role == "prefill" else prefills)]
        crosses = any(o.node != p.node for o in others)
        net_addr = addrs[p.node] if crosses and p.role != "mixed" else None
        logs = getattr(nodes[p.node], "logs", None)  # the engine's start-up lines: in the node's logs
        net_log = str(logs / f"kvnet-{name}.log") if net_addr and logs is not None else None
        if p.role == "mixed":
            return _argv("mixed", setup, p.device, setup.decode_kv_tokens)
        if p.role == "prefill":
            export = setup.kv_ipc and any(o.node == p.node for o in others)
            return _argv("prefill", setup, p.device, setup.prefill_kv_tokens, export=export, net=net_addr,
                         net_log=net_log)
        near = [o for o in others if o.node == p.node]
        # one prefill instance on another device of this node: --kv-src-device, as the pair always ran
        src = near[0].device if len(near) == 1 and near[0].device != p.device else None
        return _argv("decode", setup, p.device, setup.decode_kv_tokens, src, net=net_addr, net_log=net_log)

    try:
        for name, p in insts:  # prefill first: its weights are on the device when decode sizes its KV pool
            spawn(name, argv(name, p), p)
        executors = executors_now() if setup.forward else None
        if setup.kv_ipc and not mixed:
            handoff = _share_kv(nodes, procs, place, executors)
        t0 = time.monotonic()
        for r in sorted(reqs, key=lambda r: r.arrival_s):
            delay = t0 + r.arrival_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            timing[r.id].arrival = time.monotonic()
            procs[router.prefill_for(r)].send(op="req", id=r.id, prompt=r.prompt_tokens, output=r.output_tokens)
        deadline = time.monotonic() + setup.timeout_s
        while reqs and not done.wait(0.2):  # an instance that dies ends the run now, not at the timeout
            gone = [(n, p.p.returncode) for n, p in procs.items() if p.p.poll() is not None]
            if gone:
                raise RuntimeError(f"the {gone[0][0]} instance exited {gone[0][1]} with {remaining[0]} of {len(reqs)} "
                                   f"requests unfinished (its reason is on stderr above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{remaining[0]} of {len(reqs)} requests unfinished after {setup.timeout_s:g} s")
        for name in decodes + prefills:  # an importer closes before its exporter (CANN's order)
            if (p := procs.get(name)) is None:
                continue
            p.send(op="drain")
            p.p.stdin.close()
            if p.p.wait(60) != 0:
                raise RuntimeError(f"the {name} instance exited {p.p.returncode}")
            p.thread.join(10)
        status = _status(nodes)
    finally:
        for p in procs.values():
            if p.p.poll() is None:
                p.p.kill()
                p.p.wait()
    stats = {name: p.stats or {} for name, p in procs.items()}
    if executors is not None and any(nodes[0].executor_pid(d) != pid for d, pid in executors.items()):
        raise RuntimeError(f"an executor restarted during the run (pids {executors} before); its clients' work "
                           "was lost")
    kv_net = dict(net, reported=sum(st.get("net_bytes", 0) for st in stats.values()),
                  d2h=sum(st.get("d2h_bytes", 0) for n, st in stats.items() if place[n].role == "prefill"))
    if setup.kv_check:
        kv_net.update(checked=sum(st.get("kv_checked", 0) for st in stats.values()),
                      bad=sum(st.get("kv_bad", 0) for st in stats.values()))
    problems = check(stats, status, timing, setup, nodes[0].time_scale, nodes[0].mode, handoff, executors, kv_net)
    return Result(MX.compute(list(timing.values()), setup.slo), list(timing.values()), stats, status, problems,
                  setup.describe(), batches, handoff, executors, {n: p.to_json() for n, p in insts},
                  {k: v[:2] for k, v in routes.items()}, kv_net)


def _status(nodes: list[Any]) -> dict:
    """The emulator's status: one node's as it is; several nodes' devices one after another
    (each tagged with its node), and each node's own under "nodes"."""
    if len(nodes) == 1:
        return nodes[0].emulator_status()
    each = [n.emulator_status() for n in nodes]
    devices = [dict(d, node=i) for i, st in enumerate(each) for d in st["devices"]]
    return {"devices": devices, "nodes": each}


def ops_refusal(ops: str) -> str | None:
    """Why instances with --ops `ops` cannot run forwarded (None: they can): the aclnn
    operators they call must be carried by the forward build (flexnpu run --forward's list)."""
    if ops == "kernels":
        return None
    from flexnpu.forward.cli import carried_calls
    from flexnpu.workload.aclnn import _OPERATORS

    try:
        carried = set(carried_calls())
    except OSError:  # no nm on this node: the instances will say it themselves
        return None
    missing = sorted({n for op in _OPERATORS for n in (op, op + "GetWorkspaceSize")} - carried)
    if missing:
        return (f"--ops {ops} calls {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}, which forwarding "
                f"does not carry yet; run with --ops kernels")
    return None


def _share_kv(nodes: list[Any], procs: dict[str, _Proc], place: dict[str, Placement],
              executors: dict[int, int] | None = None) -> dict:
    """On each node, every prefill instance lets every decode instance's pid import its KV pool,
    then every decode instance imports every prefill pool (one node, one device: the pair's
    one pool). Returns the emulator's IPC record of each instance, taken then; forwarded, the
    executors' records (by device) and the exported and imported device pointers."""
    for i in range(len(nodes)):
        pre = [n for n, p in place.items() if p.node == i and p.role == "prefill"]
        dec = [n for n, p in place.items() if p.node == i and p.role == "decode"]
        if not pre or not dec:
            continue
        for n in pre:
            pids = [procs[d].info["pid"] for d in dec]
            procs[n].send(op="allow", **({"pid": pids[0]} if len(pids) == 1 else {"pids": pids}))
            if not procs[n].acks["allowed"].acquire(timeout=60):
                raise RuntimeError(f"the {n} instance did not allow the import (exit {procs[n].p.poll()})")
        for d in dec:
            for n in pre:
                info = procs[n].info
                procs[d].send(op="import", key=info["kv_key"], tokens=info["kv_tokens"], peer=n,
                              device=place[n].device)
                if not procs[d].acks["imported"].acquire(timeout=60):
                    raise RuntimeError(f"the {d} instance did not import {n}'s KV pool (exit {procs[d].p.poll()})")
    ipc: dict[str, Any] = {}
    whose = [(n, p.info["pid"], place[n].node) for n, p in procs.items()]
    if executors is not None:
        whose += [(f"executor-{d}", pid, 0) for d, pid in executors.items()]
        pre = next(n for n, p in place.items() if p.role == "prefill")
        dec = next(n for n, p in place.items() if p.role == "decode")
        ipc.update(exported_ptr=procs[pre].info.get("kv_ptr"), imported_ptr=procs[dec].imported.get("ptr"))
    for i, node in enumerate(nodes):
        for dev in node.emulator_status()["devices"]:
            for c in dev["clients"]:
                for name, pid, at in whose:
                    if c["pid"] == pid and at == i:
                        rec = ipc.setdefault(name, {"exports": 0, "export_bytes": 0, "imports": 0, "import_bytes": 0})
                        for k in rec:
                            rec[k] += c["ipc"][k]
    return ipc


def check(stats: dict[str, dict], status: dict, timing: dict[int, MX.RequestTiming], setup: Setup,
          time_scale: float = 1.0, mode: str = "contexts", handoff: dict | None = None,
          executors: dict[int, int] | None = None, kv_net: dict | None = None) -> list[str]:
    """What the instances report against the emulator's ground truth; [] when they agree.
    handoff: the emulator's IPC records once the KV import was made (Setup.kv_ipc);
    executors: forwarded, device -> the executor's pid, whose record holds the instances' work;
    kv_net: the KV that crossed nodes (`Result.kv_net`): the model's bytes against what the
    decode instances read and the prefill instances copied out."""
    if executors is not None:
        problems = check_forwarded(stats, status, setup, time_scale, mode, handoff, executors)
    else:
        problems = _check_gated(stats, status, setup, time_scale, mode, handoff)
    reported = sum(st.get("tokens", 0) for st in stats.values())
    measured = sum(len(t.token_times) for t in timing.values())
    if reported != measured:
        problems.append(f"instances report {reported} tokens, the driver saw {measured}")
    if kv_net and (kv_net.get("bytes") or kv_net.get("reported") or kv_net.get("d2h")):
        if not kv_net["reported"] == kv_net["d2h"] == kv_net["bytes"]:
            problems.append(f"KV across nodes: the decode instances read {kv_net['reported']} bytes over the network "
                            f"and the prefill instances copied {kv_net['d2h']} out, want the {kv_net['requests']} "
                            f"prompts' {kv_net['bytes']} (prompt tokens x the model's KV bytes per token)")
        if "checked" in kv_net and (kv_net["bad"] or kv_net["checked"] != kv_net["requests"]):
            problems.append(f"KV across nodes: {kv_net['bad']} of the {kv_net['checked']} requests read back had "
                            f"other bytes than prefill wrote ({kv_net['requests']} crossed)")
    return problems


def _check_gated(stats: dict[str, dict], status: dict, setup: Setup, time_scale: float, mode: str,
                 handoff: dict | None) -> list[str]:
    """Each instance its own emulator client: its record against what it says it did."""
    problems: list[str] = []
    place = dict(setup.instances())
    mixed = any(p.role == "mixed" for p in place.values())
    pair = sorted(place) == ["decode", "prefill"] and place["decode"].node == place["prefill"].node
    if setup.kv_ipc and pair:  # the prefill's whole pool, exported once and imported once
        pool = stats.get("prefill", {}).get("kv_pool_bytes", 0)
        exp, imp = (handoff or {}).get("prefill", {}), (handoff or {}).get("decode", {})
        if exp.get("exports") != 1 or imp.get("imports") != 1 or not \
                pool <= imp.get("import_bytes", -1) == exp.get("export_bytes"):
            problems.append(f"emulator shows {exp.get('exports')} exports of {exp.get('export_bytes')} bytes and "
                            f"{imp.get('imports')} imports of {imp.get('import_bytes')} once the KV was shared, "
                            f"want one each of the prefill's {pool}-byte pool")
    elif setup.kv_ipc and not mixed:  # each prefill's pool exported once, imported once by each decode of its node
        h = handoff or {}
        for name, p in place.items():
            peers = [n for n, q in place.items() if q.node == p.node and q.role != p.role]
            if not peers:
                continue
            if p.role == "prefill":
                pool = stats.get(name, {}).get("kv_pool_bytes", 0)
                exp = h.get(name, {})
                if exp.get("exports") != 1 or not pool <= exp.get("export_bytes", -1):
                    problems.append(f"emulator shows {exp.get('exports')} exports of {exp.get('export_bytes')} bytes "
                                    f"by {name} once the KV was shared, want one of its {pool}-byte pool")
            else:
                imp = h.get(name, {})
                want = sum(h.get(n, {}).get("export_bytes", 0) for n in peers)
                pools = sum(stats.get(n, {}).get("kv_pool_bytes", 0) for n in peers)
                if imp.get("imports") != len(peers) or not pools <= imp.get("import_bytes", -1) == want:
                    problems.append(f"emulator shows {imp.get('imports')} imports of {imp.get('import_bytes')} bytes "
                                    f"by {name} once the KV was shared, want {len(peers)} of the exported "
                                    f"{want} ({'+'.join(peers)}'s pools, {pools} bytes)")
    clients = {}
    for dev in status["devices"]:
        for c in dev["clients"]:
            clients.setdefault(c["pid"], []).append(c)
    for name, st in stats.items():
        if not st:
            problems.append(f"{name}: no stats reported")
            continue
        p = place.get(name)
        others = [q for q in place.values() if p is not None and q.role != p.role]
        # the hand-off maps the prefill's KV where every counterpart is on this very device
        same_device = not mixed and bool(others) and all((q.node, q.device) == (p.node, p.device) for q in others)
        recs = clients.get(st["pid"], [])
        counts: dict[str, int] = {}
        busy = 0.0
        for c in recs:
            for k, v in c["count_by_name"].items():
                if not k.startswith(COPY_NAMES):
                    counts[k] = counts.get(k, 0) + v
            busy += sum(v for k, v in c["busy_by_name"].items() if not k.startswith(COPY_NAMES))
        copied = sum(c["bytes_copied"].get("inter_d2d", 0) for c in recs)
        if copied != st.get("copied_bytes", 0):
            problems.append(f"{name}: emulator copied {copied} bytes between devices, the instance {st['copied_bytes']}")
        host = 0
        for kind, key in (("d2h", "d2h_bytes"), ("h2d", "h2d_bytes")):  # KV across nodes, through host memory
            moved = sum(c["bytes_copied"].get(kind, 0) for c in recs)
            host += moved
            if moved != st.get(key, 0):
                problems.append(f"{name}: emulator copied {moved} bytes {kind}, the instance {st.get(key, 0)}")
        if same_device:  # the hand-off maps the prefill's KV: no copy of any kind, by anyone
            moved = sum(sum(c["bytes_copied"].values()) for c in recs)
            if moved or any(c["ops"]["copy"] for c in recs):
                problems.append(f"{name}: emulator copied {moved} bytes on a same-device hand-off (want 0)")
        if counts != st["kernels"]:
            problems.append(f"{name}: emulator counted {counts}, the instance launched {st['kernels']}")
        want = st["modelled_s"] * 1e9 * time_scale
        # In contexts mode a KV copy on the instance's second stream may run beside its kernels,
        # and the device's time is then split between them: only an instance that copied
        # nothing must match its modelled kernel time.
        exact = mode == "serial" or (mode == "contexts" and not copied and not host)
        if exact and want > 0 and abs(busy - want) > setup.busy_tolerance * want:
            problems.append(f"{name}: emulator busy {busy / 1e6:.3f} ms, modelled {want / 1e6:.3f} ms "
                            f"(tolerance {setup.busy_tolerance:.0%})")
    return problems


def _records(status: dict) -> dict[tuple[int, int], list[dict]]:
    """The emulator's client records by (device, pid)."""
    out: dict[tuple[int, int], list[dict]] = {}
    for i, dev in enumerate(status["devices"]):
        for c in dev["clients"]:
            out.setdefault((dev.get("index", i), c["pid"]), []).append(c)
    return out


def check_forwarded(stats: dict[str, dict], status: dict, setup: Setup, time_scale: float, mode: str,
                    handoff: dict | None, executors: dict[int, int]) -> list[str]:
    """Forwarded instances: their device's executor's record against the sum of what they say
    they did (module docstring); the instances themselves ran nothing on the emulator."""
    problems: list[str] = []
    recs = _records(status)
    device = {n: p.device for n, p in setup.instances()}
    same_device = not setup.mixed and len(set(device.values())) == 1
    for name, st in stats.items():
        if not st:
            problems.append(f"{name}: no stats reported")
            continue
        own = [c for (d, pid), cs in recs.items() if pid == st["pid"] for c in cs]
        ran = sum(sum(c["count_by_name"].values()) for c in own) + sum(c["busy_ns"] for c in own)
        if ran:
            problems.append(f"{name}: the emulator ran work of its own pid {st['pid']} (not forwarded)")
    for dev in sorted(set(device[n] for n in stats)):
        ex = executors.get(dev)
        mine = {n: st for n, st in stats.items() if st and device[n] == dev}
        who = "+".join(mine)
        if ex is None:
            problems.append(f"device {dev}: no executor")
            continue
        er = recs.get((dev, ex), [])
        counts: dict[str, int] = {}
        for c in er:
            for k, v in c["count_by_name"].items():
                if not k.startswith(COPY_NAMES):
                    counts[k] = counts.get(k, 0) + v
        want: dict[str, int] = {}
        for st in mine.values():
            for k, v in st["kernels"].items():
                want[k] = want.get(k, 0) + v
        if counts != want:
            problems.append(f"device {dev}: executor (pid {ex}) counted {counts}, the instances ({who}) launched {want}")
        copied = sum(c["bytes_copied"].get("inter_d2d", 0) for c in er)
        said = sum(st.get("copied_bytes", 0) for st in mine.values())
        if copied != said:
            problems.append(f"device {dev}: executor copied {copied} bytes between devices, the instances {said}")
        if same_device:  # the hand-off is the prefill's memory in the executor's context: nothing copied
            moved = sum(sum(c["bytes_copied"].values()) for c in er)
            if moved or any(c["ops"]["copy"] for c in er):
                problems.append(f"device {dev}: executor copied {moved} bytes on a same-device hand-off (want 0)")
        busy = sum(sum(v for k, v in c["busy_by_name"].items() if not k.startswith(COPY_NAMES)) for c in er)
        each = [st["modelled_s"] * 1e9 * time_scale for st in mine.values()]
        tol = setup.busy_tolerance
        if copied or not each or sum(each) <= 0 or mode not in ("serial", "contexts"):
            continue
        # serial: one op at a time, so each kernel its own modelled time. contexts: the
        # instances' streams share the cores of the executor's one context, so overlapping
        # kernels split the time they overlap: no less than the larger instance's work, no
        # more than both one after the other.
        lo, hi = (sum(each), sum(each)) if mode == "serial" else (max(each), sum(each))
        if not lo * (1 - tol) <= busy <= hi * (1 + tol):
            problems.append(f"device {dev}: executor busy {busy / 1e6:.3f} ms, the instances ({who}) modelled "
                            + (f"{hi / 1e6:.3f} ms" if lo == hi else f"{lo / 1e6:.3f} to {hi / 1e6:.3f} ms")
                            + f" (tolerance {tol:.0%})")
    if setup.kv_ipc and not setup.mixed:
        # One executor holds both instances' memory: the import is the export itself (the
        # executor exports once through the runtime and imports nothing); the decode instance's
        # pointer must be the prefill's pool, which a copy or a second mapping would not be.
        pool = stats.get("prefill", {}).get("kv_pool_bytes", 0)
        h = handoff or {}
        exp = h.get(f"executor-{setup.prefill_device}", {})
        if exp.get("exports") != 1 or exp.get("imports") != 0 or not pool <= exp.get("export_bytes", -1):
            problems.append(f"executor of device {setup.prefill_device} shows {exp.get('exports')} exports of "
                            f"{exp.get('export_bytes')} bytes and {exp.get('imports')} imports once the KV was "
                            f"shared, want one export of the prefill's {pool}-byte pool and no import")
        if not h.get("exported_ptr") or h.get("imported_ptr") != h.get("exported_ptr"):
            problems.append(f"the decode instance imported the KV pool at {h.get('imported_ptr')}, the prefill's "
                            f"is at {h.get('exported_ptr')}: not the same memory")
    return problems
