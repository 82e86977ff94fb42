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
from typing import Any, Callable

from flexnpu.workload import metrics as MX
from flexnpu.workload.aclnn import DEFAULT_OPS
from flexnpu.workload.model import model_by_name
from flexnpu.workload.trace import Request

COPY_NAMES = ("memcpy", "memset")


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
    forward: bool = False  # forwarded: the instances' calls run in the device's executor (needs the node's daemons)
    ops: str = DEFAULT_OPS  # how the instances express a step: kernels, aclnn, aclnn-fia (instance --ops)
    slo: MX.Slo = field(default_factory=MX.Slo)
    busy_tolerance: float = 0.02
    timeout_s: float = 600.0

    def describe(self) -> dict:
        d = dict(vars(self))
        d["slo"] = vars(self.slo)
        return d


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


class _Proc:
    def __init__(self, p: subprocess.Popen, name: str, on_event) -> None:
        self.p, self.name = p, name
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.info: dict = {}
        self.imported: dict = {}  # its "imported" event (decode)
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


def _argv(role: str, s: Setup, device: int, kv_tokens: int, src: int | None = None) -> list[str]:
    a = [sys.executable, "-m", "flexnpu.workload.instance", "--role", role, "--model", s.model, "--profile", s.profile,
         "--device", str(device), "--chunk-tokens", str(s.chunk_tokens), "--max-batched-tokens",
         str(s.max_batched_tokens), "--max-num-seqs", str(s.max_num_seqs), "--kv-tokens", str(kv_tokens),
         "--ops", s.ops]
    if src is not None:
        a += ["--kv-src-device", str(src)]
    if role == "prefill" and s.kv_ipc:
        a += ["--kv-export"]
    return a + ([] if s.weights else ["--no-weights"])


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


def run(node: Any, reqs: list[Request], setup: Setup, on_done: Callable[[int], None] | None = None) -> Result:
    """Runs the trace on the node (a started LocalNode) and returns metrics and checks.
    on_done(request id) is called, from a reader thread, as each request finishes."""
    too_long(reqs, setup)
    timing = {r.id: MX.RequestTiming(r.id, 0.0, r.prompt_tokens, r.output_tokens) for r in reqs}
    by_id = {r.id: r for r in reqs}
    done = threading.Event()
    remaining = [len(reqs)]
    lock = threading.Lock()
    procs: dict[str, _Proc] = {}
    batches: list[int] = []
    handshake = {"allowed": threading.Event(), "imported": threading.Event()}
    shared = setup.kv_ipc and not setup.mixed and setup.prefill_device == setup.decode_device

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
            if rt.output_tokens <= 1:
                finished(ev["id"])
        elif kind == "handoff":
            r = by_id[ev["id"]]
            procs["decode"].send(op="kv", id=r.id, prompt=r.prompt_tokens, output=r.output_tokens,
                                 kv_start=ev.get("kv_start", -1))
        elif kind == "taken" and not shared or kind == "done":  # the decode instance needs the prefill's KV no more
            procs["prefill"].send(op="release", id=ev["id"])
        elif kind in handshake:
            handshake[kind].set()
        elif kind == "tokens":
            batches.append(len(ev["ids"]))
            for rid in ev["ids"]:
                rt = timing[rid]
                rt.token_times.append(ev["t"])
                if len(rt.token_times) >= rt.output_tokens:
                    finished(rid)

    def spawn(name: str, argv: list[str], role: str) -> _Proc:
        env_role = role if role in ("prefill", "decode") else "auto"
        extra = {"FLEXNPU_ROLE": env_role} if setup.role_env and not setup.shim else None
        p = node.spawn(argv, role=env_role, shim=setup.shim, extra_env=extra, stdin=subprocess.PIPE, stderr=None,
                       forward=setup.forward)
        procs[name] = _Proc(p, name, on_event)
        if not procs[name].ready.wait(60):
            how = " forwarded (its reason is on stderr above)" if setup.forward else ""
            raise RuntimeError(f"the {name} instance did not start{how} (exit {p.poll()})")
        return procs[name]

    cross = setup.prefill_device != setup.decode_device
    handoff = None
    executors: dict[int, int] | None = None
    if setup.forward:
        if cross:
            raise RuntimeError("cannot forward: forwarded instances are co-located here (prefill and decode on one "
                               "device); run the cross-device pair gated")
        why = node.forward_refusal(sorted({setup.prefill_device, setup.decode_device})) or ops_refusal(setup.ops)
        if why:
            raise RuntimeError(f"cannot forward: {why}")

    def executors_now() -> dict[int, int]:
        # a daemon starts its executor at the first forwarded client: the instances are up now
        out = {d: node.executor_pid(d) for d in {setup.prefill_device, setup.decode_device}}
        if any(pid is None for pid in out.values()):
            raise RuntimeError(f"cannot forward: no executor serves device(s) "
                               f"{sorted(d for d, p in out.items() if p is None)}")
        return out

    try:
        if setup.mixed:
            spawn("prefill", _argv("mixed", setup, setup.prefill_device, setup.decode_kv_tokens), "mixed")
            executors = executors_now() if setup.forward else None
        else:  # prefill first: its weights are on the device when decode sizes its KV pool
            spawn("prefill", _argv("prefill", setup, setup.prefill_device, setup.prefill_kv_tokens), "prefill")
            spawn("decode", _argv("decode", setup, setup.decode_device, setup.decode_kv_tokens,
                                  setup.prefill_device if cross else None), "decode")
            executors = executors_now() if setup.forward else None
            if setup.kv_ipc:
                handoff = _share_kv(node, procs["prefill"], procs["decode"], handshake, executors)
        t0 = time.monotonic()
        for r in sorted(reqs, key=lambda r: r.arrival_s):
            delay = t0 + r.arrival_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            timing[r.id].arrival = time.monotonic()
            procs["prefill"].send(op="req", id=r.id, prompt=r.prompt_tokens, output=r.output_tokens)
        deadline = time.monotonic() + setup.timeout_s
        while reqs and not done.wait(0.2):  # an instance that dies ends the run now, not at the timeout
            gone = [(n, p.p.returncode) for n, p in procs.items() if p.p.poll() is not None]
            if gone:
                raise RuntimeError(f"the {gone[0][0]} instance exited {gone[0][1]} with {remaining[0]} of {len(reqs)} "
                                   f"requests unfinished (its reason is on stderr above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{remaining[0]} of {len(reqs)} requests unfinished after {setup.timeout_s:g} s")
        for name in ("decode", "prefill"):  # an importer closes before its exporter (CANN's order)
            if (p := procs.get(name)) is None:
                continue
            p.send(op="drain")
            p.p.stdin.close()
            if p.p.wait(60) != 0:
                raise RuntimeError(f"the {name} instance exited {p.p.returncode}")
            p.thread.join(10)
        status = node.emulator_status()
    finally:
        for p in procs.values():
            if p.p.poll() is None:
                p.p.kill()
                p.p.wait()
    stats = {name: p.stats or {} for name, p in procs.items()}
    if executors is not None and any(node.executor_pid(d) != pid for d, pid in executors.items()):
        raise RuntimeError(f"an executor restarted during the run (pids {executors} before); its clients' work "
                           "was lost")
    problems = check(stats, status, timing, setup, node.time_scale, node.mode, handoff, executors)
    return Result(MX.compute(list(timing.values()), setup.slo), list(timing.values()), stats, status, problems,
                  setup.describe(), batches, handoff, executors)


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


def _share_kv(node: Any, prefill: _Proc, decode: _Proc, handshake: dict[str, threading.Event],
              executors: dict[int, int] | None = None) -> dict:
    """The prefill instance lets the decode instance's pid import its KV pool, then the decode
    instance imports it. Returns the emulator's IPC record of each, taken then; forwarded, the
    executors' records (by device) and the exported and imported device pointers."""
    pre, dec = prefill.info, decode.info
    prefill.send(op="allow", pid=dec["pid"])
    if not handshake["allowed"].wait(60):
        raise RuntimeError(f"the prefill instance did not allow the import (exit {prefill.p.poll()})")
    decode.send(op="import", key=pre["kv_key"], tokens=pre["kv_tokens"])
    if not handshake["imported"].wait(60):
        raise RuntimeError(f"the decode instance did not import the KV pool (exit {decode.p.poll()})")
    ipc: dict[str, Any] = {}
    whose = [("prefill", pre["pid"]), ("decode", dec["pid"])]
    if executors is not None:
        whose += [(f"executor-{d}", pid) for d, pid in executors.items()]
        ipc.update(exported_ptr=pre.get("kv_ptr"), imported_ptr=decode.imported.get("ptr"))
    for dev in node.emulator_status()["devices"]:
        for c in dev["clients"]:
            for name, pid in whose:
                if c["pid"] == pid:
                    rec = ipc.setdefault(name, {"exports": 0, "export_bytes": 0, "imports": 0, "import_bytes": 0})
                    for k in rec:
                        rec[k] += c["ipc"][k]
    return ipc


def check(stats: dict[str, dict], status: dict, timing: dict[int, MX.RequestTiming], setup: Setup,
          time_scale: float = 1.0, mode: str = "contexts", handoff: dict | None = None,
          executors: dict[int, int] | None = None) -> list[str]:
    """What the instances report against the emulator's ground truth; [] when they agree.
    handoff: the emulator's IPC records once the KV import was made (Setup.kv_ipc);
    executors: forwarded, device -> the executor's pid, whose record holds the instances' work."""
    if executors is not None:
        problems = check_forwarded(stats, status, setup, time_scale, mode, handoff, executors)
    else:
        problems = _check_gated(stats, status, setup, time_scale, mode, handoff)
    reported = sum(st.get("tokens", 0) for st in stats.values())
    measured = sum(len(t.token_times) for t in timing.values())
    if reported != measured:
        problems.append(f"instances report {reported} tokens, the driver saw {measured}")
    return problems


def _check_gated(stats: dict[str, dict], status: dict, setup: Setup, time_scale: float, mode: str,
                 handoff: dict | None) -> list[str]:
    """Each instance its own emulator client: its record against what it says it did."""
    problems: list[str] = []
    same_device = not setup.mixed and setup.prefill_device == setup.decode_device
    if setup.kv_ipc and not setup.mixed:  # the prefill's whole pool, exported once and imported once
        pool = stats.get("prefill", {}).get("kv_pool_bytes", 0)
        exp, imp = (handoff or {}).get("prefill", {}), (handoff or {}).get("decode", {})
        if exp.get("exports") != 1 or imp.get("imports") != 1 or not \
                pool <= imp.get("import_bytes", -1) == exp.get("export_bytes"):
            problems.append(f"emulator shows {exp.get('exports')} exports of {exp.get('export_bytes')} bytes and "
                            f"{imp.get('imports')} imports of {imp.get('import_bytes')} once the KV was shared, "
                            f"want one each of the prefill's {pool}-byte pool")
    clients = {}
    for dev in status["devices"]:
        for c in dev["clients"]:
            clients.setdefault(c["pid"], []).append(c)
    for name, st in stats.items():
        if not st:
            problems.append(f"{name}: no stats reported")
            continue
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
        if same_device:  # the hand-off maps the prefill's KV: no copy of any kind, by anyone
            moved = sum(sum(c["bytes_copied"].values()) for c in recs)
            if moved or any(c["ops"]["copy"] for c in recs):
                problems.append(f"{name}: emulator copied {moved} bytes on a same-device hand-off (want 0)")
        if counts != st["kernels"]:
            problems.append(f"{name}: emulator counted {counts}, the instance launched {st['kernels']}")
        want = st["modelled_s"] * 1e9 * time_scale
        # In contexts mode a KV pull on the instance's second stream may run beside its kernels,
        # and the device's time is then split between them: only an instance that pulled nothing
        # must match its modelled kernel time.
        exact = mode == "serial" or (mode == "contexts" and not copied)
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
    device = {"prefill": setup.prefill_device, "decode": setup.decode_device}
    same_device = not setup.mixed and setup.prefill_device == setup.decode_device
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
