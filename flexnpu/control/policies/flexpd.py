"""flexpd: dynamic prefill/decode co-location on one device.

Decode steps are never delayed past their budget; prefill gets every other moment.

- **Mechanism.** Decode clients get priority 7, prefill clients priority 0: a prefill call
  waits while a decode step is pending (the daemon's priority, with its short grace after a
  sync), so prefill fills the gaps between decode steps. What prefill already queued on the
  device cannot be pulled back, so prefill also gets a small in-flight budget (launches
  dispatched but unfinished; `prefill_inflight` to start, 1 by default): the most a decode
  step can find ahead of it. `prefill_max_hold_ms` bounds how long prefill waits in one go.
- **Budget.** `tpot_ms` if set, else the decode client's own step time when alone times
  (1 + `tpot_slack`). The alone step is learned (moving average, `learn_alpha`) from the
  snapshot intervals in which no prefill client on its device did any work.
- **Feedback**, once per new snapshot, from the decode steps measured while prefill ran:
  any step over its budget halves the prefill budget (down to 1); a step whose delay over its
  alone step is past `shrink_above` x its slack takes one back; every step within
  `grow_below` x its slack adds one (up to `prefill_inflight_max`). Prefill at 1 and still over
  for `relearn_after` snapshots (decode's batch grew, so its alone step did): prefill's gates
  close for one observer interval to measure decode alone again, then reopen.
- **Prefill first** (`first = "prefill"`): the other way round, for TTFT. Prefill gets
  priority 7 and no budget, so a prompt that arrives runs at once; decode gets priority 0, an
  in-flight budget of `decode_inflight` launches (the most a prompt finds queued ahead of it)
  and a max hold of `decode_max_hold_ms` (no decode call waits longer behind prefill).
  With `tpot_ms` set, decode's step is guarded: while the decode step measured exceeds
  `tpot_ms`, the device goes decode first (the mechanism above, with `tpot_ms` as the
  budget), and back to prefill first once the step is under `prefill_first_below` x
  `tpot_ms`: decode is never held past its budget for long, prefill gets every other moment.
- **Stepping aside.** A device without both a prefill and a decode client (one client
  alone, or only one side) gets every gate open and no budget.
- **Classes.** The role given to the shim (FLEXNPU_ROLE) if its user may declare it
  (`[roles]`) and its work does not contradict it for long (`distrust_after_ms`; see
  flexnpu/control/roles.py), else the observed phase. A "mixed" process (a chunked-prefill
  engine: each step carries decode tokens) counts as decode by default (`mixed_as`): its
  steps are what a TPOT target protects. An idle one keeps its last class; one never seen
  working is left open.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from flexnpu.control.policies.base import (
    DEFAULT_ROLES, Client, Classes, Clients, PolicyOutput, Reasons, Settings, all_open, classify, is_quiet,
    observer_quiet, opt, role_events, role_note, samples_by_pid, setting, with_note,
)
from flexnpu.control.roles import RoleRules
from flexnpu.forward import api
from flexnpu.control.wire import DEFAULT_MAX_HOLD_MS, OPEN, GateSetting
from flexnpu.snapshot import NA, NodeSnapshot, ProcessSample

NAME = "flexpd"
DECODE_PRIORITY = api.DECODE_PRIORITY
PREFILL_PRIORITY = api.PREFILL_PRIORITY


@dataclass(frozen=True)
class Options:
    tpot_slack: float = opt(0.10, "decode step budget relative to its step alone (0.1 = 10% over)",
                            lo=0.0, hi=10.0, lo_open=True)
    tpot_ms: float = opt(0.0, "absolute decode step budget in ms; 0 = use tpot_slack", lo=0.0, hi=60000.0)
    prefill_inflight: int = opt(1, "prefill's in-flight budget to start with", lo=1, hi=1024)
    prefill_inflight_max: int = opt(2, "the most prefill's in-flight budget grows to", lo=1, hi=1024)
    prefill_max_hold_ms: float = opt(100.0, "longest one prefill call waits for decode", lo=0.01, hi=60000.0)
    grow_below: float = opt(0.4, "grow prefill's budget while every decode step's delay over its alone step "
                                 "is under this share of its slack (budget - alone)", lo=0.0, hi=1.0, lo_open=True)
    shrink_above: float = opt(0.8, "take one launch back from prefill while a decode step's delay over its alone "
                                   "step is over this share of its slack, before it reaches the budget",
                              lo=0.0, hi=1.0, lo_open=True)
    learn_alpha: float = opt(0.2, "weight of a new sample in the learned alone step time", lo=0.0, hi=1.0,
                             lo_open=True)
    relearn_after: int = opt(10, "snapshots over budget with prefill at 1 before decode's alone step is "
                                 "measured again (0 = never)", lo=0, hi=100000)
    mixed_as: str = opt("decode", "how a 'mixed' (chunked-prefill) process counts", choices=("decode", "prefill"))
    first: str = opt("decode", "which side goes first: decode (prefill fills its gaps) or prefill (a prompt runs "
                               "at once; decode waits at most decode_max_hold_ms)", choices=("decode", "prefill"))
    decode_inflight: int = opt(4, "with first = prefill: decode's in-flight budget (0 = unlimited)", lo=0, hi=1024)
    decode_max_hold_ms: float = opt(50.0, "with first = prefill: longest one decode call waits for prefill",
                                    lo=0.01, hi=60000.0)
    prefill_first_below: float = opt(0.8, "with first = prefill and tpot_ms: after decode's step went over "
                                          "tpot_ms (decode first), prefill goes first again once the step is "
                                          "under this share of tpot_ms", lo=0.0, hi=1.0, lo_open=True)

    def check(self) -> tuple[str, str] | None:
        if self.grow_below >= self.shrink_above:
            return ("grow_below", f"{self.grow_below:g} must be under shrink_above ({self.shrink_above:g})")
        if self.prefill_inflight > self.prefill_inflight_max:
            return ("prefill_inflight", f"{self.prefill_inflight} is over prefill_inflight_max "
                                        f"({self.prefill_inflight_max})")
        return None


@dataclass(frozen=True)
class DeviceState:
    inflight: int  # prefill's in-flight budget now
    alone_ms: dict[int, float] = field(default_factory=dict)  # decode pid -> learned step when alone
    step_ms: dict[int, float] = field(default_factory=dict)  # decode pid -> last step measured
    last_mono_ns: int = 0  # the snapshot last learned from (each is used once)
    over: int = 0  # consecutive snapshots over budget with prefill at 1
    probe_ns: int = 0  # when prefill's gates closed to re-measure decode alone; 0: none
    probe_hold_ms: float = 0.0  # prefill's max_hold while closed: outlasts the probe
    probe_alone_ms: dict[int, float] = field(default_factory=dict)  # the alone steps before the probe
    relearn_every: int = 0  # snapshots over budget before the next probe; 0: relearn_after
    floor_note: str = ""  # why decode is over budget with prefill at 1, once a probe showed it
    decode_first: bool = False  # first = prefill with tpot_ms: decode's step went over tpot_ms


@dataclass(frozen=True)
class State:
    devices: dict[int, DeviceState] = field(default_factory=dict)
    classes: dict[int, Classes] = field(default_factory=dict)  # device -> its clients' classes


def initial_state() -> State:
    return State()


def budget_ms(options: Options, alone: float | None) -> float | None:
    if options.tpot_ms > 0:
        return options.tpot_ms
    return None if alone is None else alone * (1 + options.tpot_slack)


def _learn(ds: DeviceState, snapshot: NodeSnapshot, samples: dict[int, ProcessSample], decodes: list[Client],
           prefills: list[Client], options: Options, now_ns: int) -> tuple[DeviceState, str | None]:
    """The device state after one new snapshot, and why prefill's budget changed (or None)."""
    interval_start = snapshot.mono_ns - int(snapshot.interval_s * 1e9)
    prefill_quiet = all(is_quiet(samples.get(c.pid)) for c in prefills)
    steps = {c.pid: float(samples[c.pid].iter_mean_ms) for c in decodes
             if c.pid in samples and samples[c.pid].iter_mean_ms is not NA and samples[c.pid].iter_mean_ms > 0}
    alone = dict(ds.alone_ms)
    if prefill_quiet:
        for pid, ms in steps.items():
            old = alone.get(pid)
            alone[pid] = ms if old is None else old + options.learn_alpha * (ms - old)
    alone = {pid: v for pid, v in alone.items() if any(c.pid == pid for c in decodes)}
    ds = replace(ds, alone_ms=alone, step_ms=steps, last_mono_ns=snapshot.mono_ns)
    if ds.probe_ns:
        # the probe ends with the first interval that began after prefill's gates closed and in
        # which prefill's queued work was done (learned from above), or after three at most
        if (interval_start >= ds.probe_ns and prefill_quiet) or now_ns - ds.probe_ns > 3 * snapshot.interval_s * 1e9:
            learned = ", ".join(f"pid {p} {alone[p]:.2f} ms" for p in steps if p in alone and prefill_quiet)
            # decode's alone step did not grow past the old budget: its overrun comes from
            # prefill's kernels themselves (one is longer than decode's slack, and queued work
            # cannot be pulled back), so probing again soon would only cost prefill time
            grew = any(alone.get(p, 0) > budget_ms(options, old) for p, old in ds.probe_alone_ms.items())
            base = ds.relearn_every or options.relearn_after
            every = options.relearn_after if grew or not prefill_quiet else min(base * 2, 64 * options.relearn_after)
            note = "" if grew or not prefill_quiet else (
                f"over budget at prefill in-flight 1, decode alone unchanged: prefill's kernels exceed "
                f"decode's slack (next check in {every} snapshots)")
            return replace(ds, probe_ns=0, over=0, probe_alone_ms={}, relearn_every=every, floor_note=note), (
                f"decode measured alone again ({learned or 'no step seen'}): prefill reopens")
        return ds, None
    if prefill_quiet or not prefills:
        return ds, None
    judged = [(pid, ms, budget_ms(options, alone.get(pid))) for pid, ms in steps.items()]
    judged = [(pid, ms, b) for pid, ms, b in judged if b is not None]
    if not judged:
        return ds, None
    pid, ms, b = max(judged, key=lambda j: j[1] / j[2])  # the decode client closest to (or over) its budget
    if ms > b:
        if ds.inflight > 1:
            return replace(ds, inflight=max(1, ds.inflight // 2), over=0), (
                f"decode pid {pid} step {ms:.2f} ms > budget {b:.2f} ms")
        over = ds.over + 1
        if options.relearn_after and options.tpot_ms == 0 and over >= (ds.relearn_every or options.relearn_after):
            hold = round(min(60000.0, max(options.prefill_max_hold_ms, 4 * snapshot.interval_s * 1e3)), 3)
            return replace(ds, over=0, probe_ns=now_ns, probe_hold_ms=hold, probe_alone_ms=alone), (
                f"decode pid {pid} step {ms:.2f} ms > budget {b:.2f} ms for {over} snapshots with prefill at "
                f"in-flight 1: its load may have grown; prefill closed for one interval to measure it alone")
        return replace(ds, over=over), None
    ds = replace(ds, floor_note="") if ds.floor_note else ds
    a = alone.get(pid)
    if ds.inflight > 1 and a is not None and b > a and ms - a > options.shrink_above * (b - a):
        return replace(ds, inflight=ds.inflight - 1, over=0), (
            f"decode pid {pid} step {ms:.2f} ms, {ms - a:+.2f} ms from alone {a:.2f} ms, over "
            f"{options.shrink_above:g} x its slack {b - a:.2f} ms")
    if ds.inflight < options.prefill_inflight_max and all(_roomy(ms, b, alone.get(p), options) for p, ms, b in judged):
        if a is not None and b > a:
            return replace(ds, inflight=ds.inflight + 1, over=0), (
                f"decode pid {pid} step {ms:.2f} ms, {ms - a:+.2f} ms from alone {a:.2f} ms, within "
                f"{options.grow_below:g} x its slack {b - a:.2f} ms")
        return replace(ds, inflight=ds.inflight + 1, over=0), (
            f"decode pid {pid} step {ms:.2f} ms < {options.grow_below:g} x budget {b:.2f} ms")
    return replace(ds, over=0), None


def _roomy(ms: float, budget: float, alone: float | None, options: Options) -> bool:
    """Whether a decode step leaves room for more prefill: its delay over its alone step is
    within grow_below of its slack (the slack, not the whole budget: a decode step is mostly
    its own work), or, with no alone step known (tpot_ms given), the step is under grow_below
    of the budget."""
    if alone is not None and budget > alone:
        return ms - alone <= options.grow_below * (budget - alone)
    return ms < options.grow_below * budget


def decide(snapshot: NodeSnapshot | None, clients: Clients, state: State, options: Options, now_ns: int,
           stale_after_ms: float = 1000.0, roles: RoleRules = DEFAULT_ROLES) -> PolicyOutput:
    quiet = observer_quiet(snapshot, now_ns, stale_after_ms)
    if quiet:
        settings, reasons = all_open(clients, f"{quiet}: gate open, no budget")
        # what was learned stays; the budget starts again from prefill_inflight
        kept = {d: replace(ds, inflight=options.prefill_inflight, probe_ns=0, over=0)
                for d, ds in state.devices.items()}
        return PolicyOutput(settings, State(kept, state.classes), reasons)
    assert snapshot is not None
    settings: Settings = {}
    reasons: Reasons = {}
    notes: Reasons = {}
    devices: dict[int, DeviceState] = {}
    classes: dict[int, Classes] = {}
    for dev, cs in clients.items():
        classes[dev] = known = classify(snapshot, dev, cs, options.mixed_as, state.classes.get(dev), roles)
        fresh = known is not state.classes.get(dev)
        notes.update(role_events(known, dev, fresh))
        cls = known.of
        decodes = [c for c in cs if cls[c.pid] == "decode"]
        prefills = [c for c in cs if cls[c.pid] == "prefill"]
        ds = state.devices.get(dev) or DeviceState(inflight=options.prefill_inflight)
        why = None
        if snapshot.mono_ns != ds.last_mono_ns:
            ds, why = _learn(ds, snapshot, samples_by_pid(snapshot, dev), decodes, prefills, options, now_ns)
            ds, flip = _guard(ds, options)
            why = flip or why
        out: dict[int, GateSetting] = {}
        settings[dev] = out
        if not decodes or not prefills:
            aside = (f"pid {cs[0].pid} alone on device {dev}" if len(cs) == 1 else
                     f"no {'prefill' if not prefills else 'decode'} client on device {dev}")
            for c in cs:
                out[c.pid] = OPEN
                if c.setting != OPEN:
                    reasons[(dev, c.pid)] = with_note(role_note(known, c.pid, fresh),
                                                      f"{aside}: flexpd steps aside, pid {c.pid} open, no budget")
            # a new pair may differ (other kernels, other batch): the probing starts afresh
            devices[dev] = replace(ds, inflight=options.prefill_inflight, probe_ns=0, over=0, relearn_every=0,
                                   floor_note="", decode_first=False)
            continue
        devices[dev] = ds
        if options.first == "prefill" and not ds.decode_first:
            _prefill_first(cs, cls, options, out, reasons, dev, why)
            for c in cs:
                if (dev, c.pid) in reasons:
                    reasons[(dev, c.pid)] = with_note(role_note(known, c.pid, fresh), reasons[(dev, c.pid)])
            continue
        decode_set = setting("open", DECODE_PRIORITY, DEFAULT_MAX_HOLD_MS, 0)
        # while probing, a closed gate must outlast the probe, or prefill's calls would go anyway
        hold = ds.probe_hold_ms if ds.probe_ns else options.prefill_max_hold_ms
        prefill_set = setting("closed" if ds.probe_ns else "open", PREFILL_PRIORITY, hold, ds.inflight)
        for c in cs:
            k = cls[c.pid]
            s = decode_set if k == "decode" else prefill_set if k == "prefill" else OPEN
            out[c.pid] = s
            if s is c.setting or s == c.setting:
                continue
            if k == "unknown":
                reasons[(dev, c.pid)] = f"pid {c.pid} on device {dev} shows no phase yet: open, no budget"
            elif k == "decode":
                reasons[(dev, c.pid)] = (f"decode pid {c.pid} shares device {dev} with prefill: priority "
                                         f"{DECODE_PRIORITY}, no budget")
            elif why and c.setting.inflight != s.inflight and c.setting.priority == s.priority:
                reasons[(dev, c.pid)] = f"{why}: prefill pid {c.pid} in-flight {c.setting.inflight} -> {s.inflight}"
            elif why:
                reasons[(dev, c.pid)] = f"{why}: prefill pid {c.pid} {s.gate}, in-flight {s.inflight}"
            else:
                reasons[(dev, c.pid)] = (f"prefill pid {c.pid} shares device {dev} with decode pid "
                                         f"{', '.join(str(d.pid) for d in decodes)}: "
                                         f"priority {PREFILL_PRIORITY}, in-flight {s.inflight}, max hold {hold:g} ms")
            reasons[(dev, c.pid)] = with_note(role_note(known, c.pid, fresh), reasons[(dev, c.pid)])
    return PolicyOutput(settings, State(devices, classes), reasons, notes)


def _guard(ds: DeviceState, options: Options) -> tuple[DeviceState, str | None]:
    """first = prefill with tpot_ms: decode first while decode's step (the slowest decode
    client's, in the newest snapshot) is over tpot_ms, prefill first again once it is under
    prefill_first_below x tpot_ms (the gap keeps the two from trading places every interval)."""
    if options.first != "prefill" or options.tpot_ms <= 0 or not ds.step_ms:
        return ds, None
    pid, ms = max(ds.step_ms.items(), key=lambda kv: kv[1])
    if not ds.decode_first and ms > options.tpot_ms:
        # prefill's budget starts from the bottom: it is decode's turn to be protected
        return replace(ds, decode_first=True, inflight=options.prefill_inflight, over=0), (
            f"decode pid {pid} step {ms:.2f} ms > tpot_ms {options.tpot_ms:g}: decode first")
    back = options.prefill_first_below * options.tpot_ms
    if ds.decode_first and ms < back:
        return replace(ds, decode_first=False), (
            f"decode pid {pid} step {ms:.2f} ms < {back:g} ms ({options.prefill_first_below:g} x tpot_ms): "
            f"prefill first again")
    return ds, None


def _prefill_first(cs: list[Client], cls: dict[int, str], options: Options, out: dict[int, GateSetting],
                   reasons: Reasons, dev: int, why: str | None = None) -> None:
    pre = setting("open", DECODE_PRIORITY, DEFAULT_MAX_HOLD_MS, 0)
    dec = setting("open", PREFILL_PRIORITY, options.decode_max_hold_ms, options.decode_inflight)
    for c in cs:
        k = cls[c.pid]
        s = pre if k == "prefill" else dec if k == "decode" else OPEN
        out[c.pid] = s
        if s is not c.setting and s != c.setting:
            reasons[(dev, c.pid)] = ((f"{why}: " if why else "") +
                                     f"{k} pid {c.pid} on device {dev}, prefill first: priority {s.priority}, "
                                     f"in-flight {s.inflight or 'unlimited'}, max hold {s.max_hold_ms:g} ms")


def describe(state: State, device: int) -> str:
    ds = state.devices.get(device)
    known = state.classes.get(device)
    roles = "; ".join(known.notes[p] for p in sorted(known.notes)) if known is not None else ""
    if ds is None:
        return "flexpd: no clients seen"
    parts = []
    for pid in sorted(set(ds.alone_ms) | set(ds.step_ms)):
        alone, step = ds.alone_ms.get(pid), ds.step_ms.get(pid)
        parts.append(f"decode {pid} step {step:.2f} ms" if step is not None else f"decode {pid} step N/A")
        parts[-1] += f", alone {alone:.2f} ms" if alone is not None else ", alone not learned yet"
    parts.append(f"prefill in-flight {ds.inflight}" + (" (closed: measuring decode alone)" if ds.probe_ns else ""))
    if ds.decode_first:
        parts.append("decode first (its step went over tpot_ms)")
    if ds.floor_note:
        parts.append(ds.floor_note)
    if roles:
        parts.append(roles)
    return "flexpd: " + "; ".join(parts)
