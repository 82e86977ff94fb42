"""static-split: static co-location by time. On a device with both prefill and decode
clients, device time goes in turns: each cycle of `quantum_ms` starts with prefill's turn
(`prefill_share` of the cycle; decode's gates closed) and ends with decode's turn (prefill's
gates closed). Each side has a small in-flight budget so the work it queued in its turn
does not run on into the other's. The controller's tick drives the turns, so their edges are
as sharp as the tick (default 5 ms). A device with only one side steps aside (all open).
Classes as flexpd's: a declared role its user may declare and its work does not contradict
for long, else the observed phase (flexnpu/control/roles.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flexnpu.control.policies.base import (
    DEFAULT_ROLES, Classes, Clients, PolicyOutput, Reasons, Settings, all_open, classify, observer_quiet, opt,
    role_events, role_note, setting, with_note,
)
from flexnpu.control.roles import RoleRules
from flexnpu.control.wire import OPEN, GateSetting
from flexnpu.snapshot import NodeSnapshot

NAME = "static-split"
TURN = "turn: "  # reasons that only say whose turn it is start so: the controller logs them quietly


@dataclass(frozen=True)
class Options:
    prefill_share: float = opt(0.5, "share of each cycle that is prefill's turn", lo=0.05, hi=0.95)
    quantum_ms: float = opt(20.0, "length of one cycle (prefill's turn, then decode's)", lo=1.0, hi=10000.0)
    inflight: int = opt(2, "in-flight budget of every client in a split (0 = unlimited)", lo=0, hi=1024)
    mixed_as: str = opt("decode", "how a 'mixed' (chunked-prefill) process counts", choices=("decode", "prefill"))


@dataclass(frozen=True)
class State:
    epoch_ns: dict[int, int] = field(default_factory=dict)  # device -> when its turns began
    turn: dict[int, str] = field(default_factory=dict)  # device -> whose turn it was last
    classes: dict[int, Classes] = field(default_factory=dict)  # device -> its clients' classes


def initial_state() -> State:
    return State()


def turn_at(epoch_ns: int, now_ns: int, options: Options) -> tuple[str, float]:
    """Whose turn it is at now_ns, and how far into the cycle (ms)."""
    cycle_ns = options.quantum_ms * 1e6
    pos_ns = (now_ns - epoch_ns) % cycle_ns
    return ("prefill" if pos_ns < options.prefill_share * cycle_ns else "decode"), pos_ns / 1e6


def decide(snapshot: NodeSnapshot | None, clients: Clients, state: State, options: Options, now_ns: int,
           stale_after_ms: float = 1000.0, roles: RoleRules = DEFAULT_ROLES) -> PolicyOutput:
    quiet = observer_quiet(snapshot, now_ns, stale_after_ms)
    if quiet:
        settings, reasons = all_open(clients, f"{quiet}: gate open")
        return PolicyOutput(settings, State(classes=state.classes), reasons)
    settings: Settings = {}
    reasons: Reasons = {}
    epochs: dict[int, int] = {}
    turns: dict[int, str] = {}
    classes: dict[int, Classes] = {}
    notes: Reasons = {}
    cycle = options.quantum_ms
    # a closed gate holds a call at most max_hold: a whole cycle outlasts any off-turn
    turn_open = setting("open", 0, cycle, options.inflight)
    turn_closed = setting("closed", 0, cycle, options.inflight)
    for dev, cs in clients.items():
        classes[dev] = known = classify(snapshot, dev, cs, options.mixed_as, state.classes.get(dev), roles)
        fresh = known is not state.classes.get(dev)
        notes.update(role_events(known, dev, fresh))
        cls = known.of
        present = {cls[c.pid] for c in cs}
        out: dict[int, GateSetting] = {}
        settings[dev] = out
        if not {"prefill", "decode"} <= present:
            why = (f"only {len(cs)} client on device {dev}" if len(cs) == 1 else
                   f"no {'prefill' if 'prefill' not in present else 'decode'} client on device {dev}")
            for c in cs:
                out[c.pid] = OPEN
                if c.setting != OPEN:
                    reasons[(dev, c.pid)] = with_note(role_note(known, c.pid, fresh),
                                                      f"{why}: static-split steps aside, pid {c.pid} open, no budget")
            continue
        epochs[dev] = epoch = state.epoch_ns.get(dev, now_ns)
        turn, pos = turn_at(epoch, now_ns, options)
        turns[dev] = turn
        share = options.prefill_share if turn == "prefill" else 1 - options.prefill_share
        why = None
        for c in cs:
            k = cls[c.pid]
            if k == "unknown":
                out[c.pid] = OPEN
                if c.setting != OPEN:
                    reasons[(dev, c.pid)] = f"pid {c.pid} on device {dev} shows no phase yet: open, no budget"
                continue
            s = turn_open if k == turn else turn_closed
            out[c.pid] = s
            if s is not c.setting and s != c.setting:
                if why is None:
                    why = (f"{TURN}{turn}'s turn on device {dev} ({share * cycle:g} of {cycle:g} ms, "
                           f"{pos:.1f} ms into the cycle)")
                reasons[(dev, c.pid)] = f"{why}: {k} pid {c.pid} {s.gate}, in-flight {s.inflight}"
                note = role_note(known, c.pid, fresh)
                if note:  # after the turn: a reason that starts with TURN is logged quietly
                    reasons[(dev, c.pid)] += f" ({note})"
    return PolicyOutput(settings, State(epochs, turns, classes), reasons, notes)


def describe(state: State, device: int) -> str:
    turn = state.turn.get(device)
    known = state.classes.get(device)
    roles = "".join(f"; {known.notes[p]}" for p in sorted(known.notes)) if known is not None else ""
    return (f"static-split: {turn}'s turn" if turn else "static-split: stepped aside (one side only)") + roles
