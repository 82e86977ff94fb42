"""What every policy shares: its inputs, its output, and the checks every policy makes first.

A policy is a module with `NAME`, an `Options` dataclass (its `[policy.NAME]` keys, each an
`opt(...)` field), `initial_state()`, `describe(state, device) -> str` and

    decide(snapshot, clients, state, options, now_ns, stale_after_ms, roles) -> PolicyOutput

It is a pure function: no sockets, no clock (time is `now_ns`, CLOCK_MONOTONIC, and the
snapshot's own `mono_ns`), no mutation of its inputs. `settings` maps device -> pid ->
GateSetting for every client the controller may set; `reasons` maps (device, pid) -> a plain
sentence, for the clients whose setting the policy changed and why; `notes` the same for a
client whose declared role the policy stopped (or started again) taking as its class, once,
even where its setting stays. The controller applies only what differs from what is in
force, so a policy may return the same settings every tick.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping, NamedTuple

from flexnpu.control.roles import ROLES, RoleRules, Trust, distrust_note, judge
from flexnpu.control.wire import OPEN, GateSetting
from flexnpu.forward.api import ClientView
from flexnpu.snapshot import NA, NodeSnapshot, ProcessSample

Settings = dict[int, dict[int, GateSetting]]
Reasons = dict[tuple[int, int], str]

ANY_ROLE = frozenset(ROLES)
DEFAULT_ROLES = RoleRules()


def opt(default: Any, help: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
        choices: tuple[str, ...] | None = None) -> Any:
    """A configuration field: its default, a one-line help and its valid range or choices
    (checked by flexnpu.control.config, which names the key in any refusal)."""
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "lo_open": lo_open,
                                            "choices": choices})


@lru_cache(maxsize=4096)
def setting(gate: str = "open", priority: int = 0, max_hold_ms: float = OPEN.max_hold_ms,
            inflight: int = 0, max_inflight_ms: float = 0.0) -> GateSetting:
    """A GateSetting, one object per distinct value: the controller's diff then finds most
    unchanged settings by identity, without comparing fields (a tick stays well under 1 ms)."""
    return GateSetting(gate, priority, max_hold_ms, inflight, max_inflight_ms)


class Client(NamedTuple):
    """A client of a device's daemon as the controller last listed it. (A NamedTuple: the
    controller builds one per changed setting, and a tick must stay cheap.)"""

    pid: int
    device: int
    role: str = "auto"  # prefill / decode given to the shim (FLEXNPU_ROLE), else auto
    owner: str | None = None  # who set its gate: None (device defaults), "controller", "manual"
    setting: GateSetting = OPEN  # in force now
    uid: int | None = None  # its user, as the kernel told the daemon at connect (SO_PEERCRED)
    may_declare: frozenset[str] = ANY_ROLE  # the roles its user may declare ([roles]; the controller's I/O)
    who: str = ""  # its user as a sentence names it, e.g. "uid 1001 (bob)"

    @classmethod
    def from_view(cls, device: int, v: ClientView) -> Client:
        """From the daemon's `list` record, decoded by the API (settings it did not send: OPEN's)."""
        return cls(pid=v.pid, device=device, role=v.role, owner=v.owner,
                   setting=setting(v.gate or OPEN.gate, OPEN.priority if v.priority is None else v.priority,
                                   OPEN.max_hold_ms if v.max_hold_ms is None else round(v.max_hold_ms, 6),
                                   v.inflight or 0, round(v.max_inflight_ms or 0.0, 6)),
                   uid=v.uid)

    @classmethod
    def from_daemon(cls, device: int, d: Mapping[str, Any]) -> Client:
        """From a raw `list` record (ApiError if it is not one)."""
        return cls.from_view(device, ClientView.from_wire(d))


Clients = Mapping[int, tuple[Client, ...]]  # device -> its clients


class PolicyOutput(NamedTuple):
    settings: Settings
    state: Any
    reasons: Reasons
    notes: Reasons = {}  # a declared role refused, set aside or believed again: said once (see above)


def observer_quiet(snapshot: NodeSnapshot | None, now_ns: int, stale_after_ms: float) -> str | None:
    """Why the snapshot cannot be trusted (no observer, or silent past stale_after_ms), or None."""
    if snapshot is None:
        return "no snapshot from the observer"
    age_ms = (now_ns - snapshot.mono_ns) / 1e6
    if age_ms > stale_after_ms:
        return f"observer silent for {age_ms / 1e3:.1f} s (> {stale_after_ms / 1e3:g} s)"
    return None


def all_open(clients: Clients, why: str) -> tuple[Settings, Reasons]:
    """Every client of every device open without budget, each with the same reason."""
    settings = {dev: {c.pid: OPEN for c in cs} for dev, cs in clients.items()}
    reasons = {(dev, c.pid): why for dev, cs in clients.items() for c in cs if c.setting != OPEN}
    return settings, reasons


# the last snapshot indexed and its index, one tuple so that threads swap it whole: a memo,
# invisible to callers (a snapshot is immutable)
_index: list[tuple[object, dict[int, dict[int, ProcessSample]]]] = [(None, {})]


@dataclass(frozen=True)
class Classes:
    """The class of each client of one device, and the snapshot it was worked out from."""

    mono_ns: int = -1
    of: dict[int, str] = field(default_factory=dict)  # pid -> prefill / decode / unknown
    notes: dict[int, str] = field(default_factory=dict)  # pid -> why its declared role is not its class
    events: dict[int, str] = field(default_factory=dict)  # pid -> a change in that, at this snapshot
    flags: dict[int, str] = field(default_factory=dict)  # pid -> the kind of its note
    trust: dict[int, Trust] = field(default_factory=dict)  # pid -> its declared role's record


def classify(snapshot: NodeSnapshot | None, device: int, cs: tuple[Client, ...], mixed_as: str,
             previous: Classes | None, rules: RoleRules = DEFAULT_ROLES) -> Classes:
    """Every client's class: its declared role (the daemon's slot, else FLEXNPU_ROLE as the
    observer read it) when its user may declare it ([roles]: `Client.may_declare`) and its
    work has not contradicted it past `distrust_after_ms` (roles.judge, once per snapshot);
    else the observed phase, the declaration aside (`ProcessSample.observed_phase`; a
    "mixed" process, a chunked-prefill engine whose every step carries decode tokens, counts
    as `mixed_as`); an idle one keeps its last class; one never seen working is "unknown".
    `notes` says, for each client whose declared role is not its class, why; `events` what
    changed in that since `previous`, which a policy says when the result is new
    (`classes is not previous`).

    Worked out once per snapshot: on the ticks between two snapshots the previous result is
    returned as it is, unless a client is new. (Run for every client on the tick that takes
    a snapshot: kept to plain lookups, no call per client on the common paths.)"""
    mono = snapshot.mono_ns if snapshot is not None else -1
    prev = previous.of if previous is not None else _EMPTY
    if previous is not None and previous.mono_ns == mono and all(c.pid in prev for c in cs):
        return previous
    samples = samples_by_pid(snapshot, device)
    interval_ns = int(snapshot.interval_s * 1e9) if snapshot is not None else 0
    old_flags = previous.flags if previous is not None else _EMPTY
    old_trust = previous.trust if previous is not None else _EMPTY
    judged = rules.contradicted_by
    of: dict[int, str] = {}
    notes: dict[int, str] = {}
    events: dict[int, str] = {}
    flags: dict[int, str] = {}
    trust: dict[int, Trust] = {}
    for c in cs:
        pid = c.pid
        sample = samples.get(pid)
        declared = c.role
        if sample is not None:
            ph = sample.observed_phase
            seen = ph if ph in ROLES else mixed_as if ph == "mixed" else None
            if declared not in ROLES:
                declared = sample.role
        else:
            seen = None
        flag = ""
        if declared not in ROLES:  # none declared: the work decides
            last = prev.get(pid)
            of[pid] = seen or (None if last == "unknown" else last) or "unknown"
        elif declared not in c.may_declare:
            last = prev.get(pid)
            k = of[pid] = seen or (None if last == "unknown" else last) or "unknown"
            flag = f"refused {declared}"
            notes[pid] = (f"pid {pid} declared {declared}, which {c.who or 'its user'} may not declare "
                          f"([roles] {declared}): treated as undeclared"
                          + (f", observed {k}" if k != "unknown" else ", no phase observed yet"))
        else:
            t = old_trust.get(pid)
            if t is None or t.declared != declared:
                t = Trust(declared)
            if sample is not None and sample.observed_source in judged and sample.observed_phase in ROLES:
                t = judge(t, (sample.observed_phase, sample.observed_source), mono, interval_ns, rules)
            trust[pid] = t
            if t.distrusted:
                of[pid] = t.seen
                flag = f"distrusted {declared}"
                notes[pid] = distrust_note(pid, t, mono)
            else:
                of[pid] = declared
        if flag:
            flags[pid] = flag
        was = old_flags.get(pid, "") if old_flags else ""
        if flag != was:
            if flag:
                events[pid] = notes[pid]
            elif was.startswith("distrusted") and pid in trust:
                events[pid] = f"pid {pid} declared {declared} and its work agrees again: treated as {of[pid]}"
    return Classes(mono, of, notes, events, flags, trust)


def role_note(classes: Classes, pid: int, fresh: bool) -> str:
    """What a reason about pid says first: a change in how its declared role is taken (on
    the tick that found it), else why its declared role is not its class, else nothing."""
    return (classes.events.get(pid) if fresh else None) or classes.notes.get(pid, "")


def with_note(note: str, reason: str) -> str:
    return f"{note}; {reason}" if note else reason


def role_events(classes: Classes, device: int, fresh: bool) -> Reasons:
    """The policy's `notes` for one device: each change in how a declared role is taken, on
    the tick that found it."""
    return {(device, pid): e for pid, e in classes.events.items()} if fresh else {}


def samples_by_pid(snapshot: NodeSnapshot | None, device: int) -> dict[int, ProcessSample]:
    """The snapshot's processes on one device, by pid (do not modify the dict returned)."""
    if snapshot is None:
        return {}
    seen, by_dev = _index[0]
    if seen is not snapshot:
        by_dev = {}
        for p in snapshot.processes:
            if p.device is not None:
                by_dev.setdefault(p.device, {})[p.pid] = p
        _index[0] = (snapshot, by_dev)
    return by_dev.get(device, _EMPTY)


_EMPTY: dict[int, ProcessSample] = {}


def is_quiet(sample: ProcessSample | None) -> bool:
    """Whether a process had no work on the device during the snapshot's interval (absent
    counts). Its busy share when the observer gives it: a prefill held by priority launches
    nothing for a while, yet the kernels it queued before still run ahead of decode's."""
    if sample is None:
        return True
    if sample.busy is not NA:
        return sample.busy == 0
    return sample.launches_per_s is not NA and sample.launches_per_s == 0


def fmt_setting(s: GateSetting) -> str:
    budget = "no budget" if s.inflight == 0 else f"in-flight {s.inflight}"
    return f"{s.gate}, priority {s.priority}, max hold {s.max_hold_ms:g} ms, {budget}"
