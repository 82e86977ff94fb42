"""The controller's policies as pure functions, on hand-made snapshot sequences: no sockets,
no clock (time is an argument), inputs never mutated."""

from __future__ import annotations

import copy

import pytest

from flexnpu.control.policies import POLICIES, flexpd, passthrough, static_split
from flexnpu.control.policies.base import Client
from flexnpu.control.roles import RoleAccess, RoleRules
from flexnpu.control.wire import OPEN, GateSetting
from flexnpu.snapshot import NodeSnapshot

MS = 1_000_000
T0 = 1_000_000 * MS  # an arbitrary CLOCK_MONOTONIC origin
DEC, PRE = 101, 202


def proc(pid: int, phase: str = "idle", step_ms: float | None = None, launches_per_s: float = 0.0,
         role: str | None = None, device: int = 0, observed: tuple[str, str] | None = None) -> dict:
    """observed: (phase, signal) the work showed where a declared role decided `phase`, as
    the observer publishes it (observed_phase, observed_source)."""
    p = {"pid": pid, "device": device, "comm": f"p{pid}", "role": role, "phase": phase,
         "rates": {"launches_per_s": launches_per_s},
         "iteration": {"mean_ms": step_ms}}
    if observed is not None:
        p.update(phase_source="role", observed_phase=observed[0], observed_source=observed[1])
    return p


def snap(t_ns: int, *procs: dict, seq: int = 0, interval_s: float = 0.1) -> NodeSnapshot:
    return NodeSnapshot.from_json({"schema": 1, "source": "shim", "seq": seq, "mono_ns": t_ns,
                                   "interval_s": interval_s, "devices": [], "processes": list(procs)})


def clients(*cs: Client) -> dict[int, tuple[Client, ...]]:
    out: dict[int, list[Client]] = {}
    for c in cs:
        out.setdefault(c.device, []).append(c)
    return {d: tuple(v) for d, v in out.items()}


def cl(pid: int, role: str = "auto", setting: GateSetting = OPEN, device: int = 0, owner: str | None = None,
       **kw) -> Client:
    return Client(pid, device, role, owner, setting, **kw)


class Run:
    """Feeds a policy a sequence of snapshots, carrying its state and the settings in force
    (as the controller would after applying them)."""

    def __init__(self, policy, options=None, roles: dict[int, str] | None = None, device: int = 0,
                 users: dict[int, dict] | None = None):
        self.policy = policy
        self.users = users or {}  # pid -> Client fields the controller fills in (may_declare, who)
        self.options = options or policy.Options()
        self.state = policy.initial_state()
        self.roles = roles if roles is not None else {DEC: "decode", PRE: "prefill"}
        self.inforce: dict[int, GateSetting] = {pid: OPEN for pid in self.roles}
        self.device = device

    def step(self, snapshot: NodeSnapshot | None, now_ns: int, **kw):
        cs = clients(*(cl(p, r, self.inforce.get(p, OPEN), self.device, **self.users.get(p, {}))
                       for p, r in self.roles.items()))
        before_state = copy.deepcopy(self.state)
        before_cs = copy.deepcopy(cs)
        out = self.policy.decide(snapshot, cs, self.state, self.options, now_ns, **kw)
        assert cs == before_cs and self.state == before_state, "decide mutated its input"
        self.state = out.state
        self.inforce = dict(out.settings.get(self.device, {}))
        self.reasons = out.reasons
        self.notes = out.notes
        return out

    def s(self, pid: int) -> GateSetting:
        return self.inforce[pid]


# ---------------------------------------------------------------- every policy


@pytest.mark.parametrize("name", list(POLICIES))
def test_observer_quiet_opens_every_gate(name: str) -> None:
    mod = POLICIES[name]
    closed = GateSetting(gate="closed", priority=3, inflight=1)
    cs = clients(cl(DEC, "decode", closed), cl(PRE, "prefill", closed), cl(303, "prefill", closed, device=1))
    for snapshot, now, words in ((None, T0, "no snapshot"),
                                 (snap(T0, proc(DEC, "decode", 2.0)), T0 + 1500 * MS, "silent for 1.5 s")):
        out = mod.decide(snapshot, cs, mod.initial_state(), mod.Options(), now, stale_after_ms=1000)
        assert out.settings == {0: {DEC: OPEN, PRE: OPEN}, 1: {303: OPEN}}
        assert set(out.reasons) == {(0, DEC), (0, PRE), (1, 303)}
        assert all("open" in r for r in out.reasons.values()), out.reasons
        if name != "passthrough":  # which opens everything anyway
            assert all(words in r for r in out.reasons.values()), out.reasons


@pytest.mark.parametrize("name", list(POLICIES))
def test_no_reason_when_nothing_changes(name: str) -> None:
    mod = POLICIES[name]
    out = mod.decide(None, clients(cl(DEC, "decode")), mod.initial_state(), mod.Options(), T0)
    assert out.settings == {0: {DEC: OPEN}} and out.reasons == {}


def test_passthrough_opens_everything_with_no_budget() -> None:
    r = Run(passthrough)
    r.inforce[PRE] = GateSetting(gate="closed", inflight=2)
    r.step(snap(T0, proc(DEC, "decode", 2.0, 500), proc(PRE, "prefill", 30.0, 900)), T0)
    assert r.s(DEC) == OPEN and r.s(PRE) == OPEN
    assert r.reasons == {(0, PRE): "passthrough: gate open, no budget"}


# ---------------------------------------------------------------- flexpd


def test_flexpd_prefill_first_swaps_the_sides() -> None:
    r = Run(flexpd, flexpd.Options(first="prefill", decode_inflight=3, decode_max_hold_ms=40.0))
    r.step(snap(T0, proc(DEC, "decode", 2.0, 500), proc(PRE, "prefill", 30.0, 900)), T0)
    assert r.s(PRE) == GateSetting("open", 7, 200.0, 0) and r.s(DEC) == GateSetting("open", 0, 40.0, 3)
    assert "prefill first" in r.reasons[(0, DEC)] and "prefill first" in r.reasons[(0, PRE)]


def test_flexpd_prefill_first_guards_decode_with_tpot_ms() -> None:
    """first = prefill with tpot_ms: decode's step over tpot_ms turns the device decode first
    (decode priority 7, prefill priority 0 with a budget from prefill_inflight); prefill goes
    first again only once the step is under prefill_first_below x tpot_ms, not at tpot_ms."""
    o = flexpd.Options(first="prefill", decode_inflight=32, tpot_ms=10.0, prefill_first_below=0.8)
    r = Run(flexpd, o)
    t = T0
    r.step(snap(t, proc(DEC, "decode", 6.0, 500), proc(PRE, "prefill", 30.0, 900)), t)
    assert r.s(PRE).priority == 7 and r.s(DEC) == GateSetting("open", 0, 50.0, 32)
    t += 100 * MS
    r.step(snap(t, proc(DEC, "decode", 12.0, 500), proc(PRE, "prefill", 30.0, 900)), t)
    assert r.s(DEC) == GateSetting("open", 7, 200.0, 0)
    assert r.s(PRE) == GateSetting("open", 0, 100.0, 1)
    assert "step 12.00 ms > tpot_ms 10: decode first" in r.reasons[(0, PRE)]
    assert "decode first" in flexpd.describe(r.state, 0)
    # under tpot_ms but over 0.8 x: still decode first (no flapping at the edge)
    t += 100 * MS
    r.step(snap(t, proc(DEC, "decode", 9.0, 500), proc(PRE, "prefill", 30.0, 900)), t)
    assert r.s(DEC).priority == 7 and r.s(PRE).priority == 0
    t += 100 * MS
    r.step(snap(t, proc(DEC, "decode", 7.0, 500), proc(PRE, "prefill", 30.0, 900)), t)
    assert r.s(PRE).priority == 7 and r.s(DEC) == GateSetting("open", 0, 50.0, 32)
    assert "prefill first again" in r.reasons[(0, DEC)]
    # the same snapshot seen twice changes nothing
    r.step(snap(t, proc(DEC, "decode", 20.0, 500), proc(PRE, "prefill", 30.0, 900)), t + MS)
    assert r.s(PRE).priority == 7


def test_flexpd_prefill_first_without_tpot_ms_never_swaps() -> None:
    r = Run(flexpd, flexpd.Options(first="prefill", decode_inflight=32))
    for k in range(4):
        t = T0 + k * 100 * MS
        r.step(snap(t, proc(DEC, "decode", 50.0 * (k + 1), 500), proc(PRE, "prefill", 30.0, 900)), t)
        assert r.s(PRE).priority == 7 and r.s(DEC).inflight == 32


def test_flexpd_one_client_alone_steps_aside() -> None:
    r = Run(flexpd, roles={DEC: "decode"})
    r.inforce[DEC] = GateSetting(priority=7, inflight=3)
    r.step(snap(T0, proc(DEC, "decode", 2.0, 500)), T0)
    assert r.s(DEC) == OPEN
    assert "alone on device 0" in r.reasons[(0, DEC)] and "steps aside" in r.reasons[(0, DEC)]


def test_flexpd_prefill_low_priority_small_budget_decode_high() -> None:
    r = Run(flexpd)
    r.step(snap(T0, proc(DEC, "decode", 2.0, 500), proc(PRE, "prefill", 30.0, 900)), T0)
    assert r.s(DEC) == GateSetting(gate="open", priority=7, max_hold_ms=200.0, inflight=0)
    assert r.s(PRE) == GateSetting(gate="open", priority=0, max_hold_ms=100.0, inflight=1)
    assert f"decode pid {DEC}" in r.reasons[(0, DEC)]
    assert f"prefill pid {PRE}" in r.reasons[(0, PRE)] and "in-flight 1" in r.reasons[(0, PRE)]


def test_flexpd_learns_alone_step_only_while_prefill_is_quiet() -> None:
    r = Run(flexpd)
    r.step(snap(T0, proc(DEC, "decode", 2.0, 500), proc(PRE, "prefill", None, 0)), T0)
    assert r.state.devices[0].alone_ms == {DEC: 2.0}
    # prefill busy: the (slower) step is not taken as the alone time
    r.step(snap(T0 + 100 * MS, proc(DEC, "decode", 2.6, 500), proc(PRE, "prefill", 30.0, 900)), T0 + 100 * MS)
    assert r.state.devices[0].alone_ms == {DEC: 2.0}
    # quiet again: a moving average with learn_alpha 0.2
    r.step(snap(T0 + 200 * MS, proc(DEC, "decode", 3.0, 500), proc(PRE, "prefill", None, 0)), T0 + 200 * MS)
    assert r.state.devices[0].alone_ms[DEC] == pytest.approx(2.2)
    assert "alone 2.20 ms" in flexpd.describe(r.state, 0)


def test_flexpd_shrinks_when_over_budget_and_grows_when_well_under() -> None:
    opts = flexpd.Options(prefill_inflight=4, prefill_inflight_max=6)
    r = Run(flexpd, opts)
    t = T0
    r.step(snap(t, proc(DEC, "decode", 2.0, 500), proc(PRE, "prefill", None, 0)), t)  # learn 2.0: budget 2.2
    assert r.s(PRE).inflight == 4
    t += 100 * MS
    r.step(snap(t, proc(DEC, "decode", 2.3, 500), proc(PRE, "prefill", 30.0, 900)), t)
    assert r.s(PRE).inflight == 2
    assert r.reasons[(0, PRE)] == f"decode pid {DEC} step 2.30 ms > budget 2.20 ms: prefill pid {PRE} in-flight 4 -> 2"
    # ticks between snapshots use the same snapshot once only
    for k in range(1, 5):
        r.step(snap(t, proc(DEC, "decode", 2.3, 500), proc(PRE, "prefill", 30.0, 900)), t + k * 5 * MS)
        assert r.s(PRE).inflight == 2 and r.reasons == {}
    t += 100 * MS
    r.step(snap(t, proc(DEC, "decode", 2.5, 500), proc(PRE, "prefill", 30.0, 900)), t)
    assert r.s(PRE).inflight == 1
    t += 100 * MS
    r.step(snap(t, proc(DEC, "decode", 2.15, 500), proc(PRE, "prefill", 30.0, 900)), t)  # between the marks
    assert r.s(PRE).inflight == 1 and r.reasons == {}
    t += 100 * MS
    r.step(snap(t, proc(DEC, "decode", 2.05, 500), proc(PRE, "prefill", 30.0, 900)), t)  # within 0.4 of the slack
    assert r.s(PRE).inflight == 2
    assert r.reasons[(0, PRE)] == (f"decode pid {DEC} step 2.05 ms, +0.05 ms from alone 2.00 ms, within 0.4 x its "
                                   f"slack 0.20 ms: prefill pid {PRE} in-flight 1 -> 2")
    t += 100 * MS
    r.step(snap(t, proc(DEC, "decode", 2.18, 500), proc(PRE, "prefill", 30.0, 900)), t)  # past 0.8 of the slack
    assert r.s(PRE).inflight == 1 and "over 0.8 x its slack 0.20 ms" in r.reasons[(0, PRE)]
    t += 100 * MS
    r.step(snap(t, proc(DEC, "decode", 2.05, 500), proc(PRE, "prefill", 30.0, 900)), t)
    assert r.s(PRE).inflight == 2
    for want in (3, 4, 5, 6, 6):
        t += 100 * MS
        r.step(snap(t, proc(DEC, "decode", 1.6, 500), proc(PRE, "prefill", 30.0, 900)), t)
        assert r.s(PRE).inflight == want
    assert "prefill in-flight 6" in flexpd.describe(r.state, 0)


def test_flexpd_absolute_tpot_needs_no_learning() -> None:
    r = Run(flexpd, flexpd.Options(tpot_ms=5.0, prefill_inflight=2))
    r.step(snap(T0, proc(DEC, "decode", 6.0, 500), proc(PRE, "prefill", 30.0, 900)), T0)
    assert r.s(PRE).inflight == 1 and "budget 5.00 ms" in r.reasons[(0, PRE)]


def test_flexpd_without_a_learned_step_keeps_the_initial_budget() -> None:
    r = Run(flexpd, flexpd.Options(prefill_inflight=3))
    for k in range(5):
        r.step(snap(T0 + k * 100 * MS, proc(DEC, "decode", 9.0, 500), proc(PRE, "prefill", 30.0, 900)),
               T0 + k * 100 * MS)
        assert r.s(PRE).inflight == 3
    assert "alone not learned yet" in flexpd.describe(r.state, 0)


def test_flexpd_decode_batch_growth_is_measured_again() -> None:
    """Decode's step grows for good (a larger batch): prefill at 1 and still over budget for
    relearn_after snapshots closes prefill for one interval, learns the new alone step, and
    reopens prefill."""
    r = Run(flexpd, flexpd.Options(relearn_after=3))
    t = T0
    r.step(snap(t, proc(DEC, "decode", 2.0, 500), proc(PRE, "prefill", None, 0)), t)
    for _ in range(2):
        t += 100 * MS
        r.step(snap(t, proc(DEC, "decode", 4.0, 500), proc(PRE, "prefill", 30.0, 900)), t)
        assert r.s(PRE).gate == "open"
    t += 100 * MS
    r.step(snap(t, proc(DEC, "decode", 4.0, 500), proc(PRE, "prefill", 30.0, 900)), t)
    assert r.s(PRE).gate == "closed" and r.s(PRE).max_hold_ms >= 400
    assert "measure it alone" in r.reasons[(0, PRE)]
    probe = t
    # the next snapshot's interval began before the close: not yet
    t += 50 * MS
    r.step(snap(t, proc(DEC, "decode", 4.0, 500), proc(PRE, "prefill", 30.0, 450)), t)
    assert r.s(PRE).gate == "closed"
    t = probe + 110 * MS
    r.step(snap(t, proc(DEC, "decode", 3.8, 500), proc(PRE, "prefill", None, 0)), t)
    assert r.s(PRE).gate == "open" and r.s(PRE).max_hold_ms == 100.0
    assert r.state.devices[0].alone_ms[DEC] == pytest.approx(2.0 + 0.2 * 1.8)
    assert "prefill reopens" in r.reasons[(0, PRE)]


def test_flexpd_probes_less_often_when_prefill_kernels_are_the_cause() -> None:
    """Over budget at in-flight 1 but decode alone is as fast as before: the overrun is
    prefill's kernel length (queued work cannot be pulled back), so the next probe waits twice
    as long, and the device note says why."""
    r = Run(flexpd, flexpd.Options(relearn_after=2))
    t = T0
    r.step(snap(t, proc(DEC, "decode", 2.0, 500), proc(PRE, "prefill", None, 0)), t)

    def over_until_closed() -> int:
        nonlocal t
        n = 0
        while r.s(PRE).gate == "open":
            t += 100 * MS
            n += 1
            r.step(snap(t, proc(DEC, "decode", 3.0, 500), proc(PRE, "prefill", 30.0, 900)), t)
        t += 110 * MS
        r.step(snap(t, proc(DEC, "decode", 2.0, 500), proc(PRE, "prefill", None, 0)), t)  # alone: unchanged
        assert r.s(PRE).gate == "open"
        return n

    assert over_until_closed() == 2
    assert "prefill's kernels exceed decode's slack (next check in 4 snapshots)" in flexpd.describe(r.state, 0)
    assert over_until_closed() == 4
    assert over_until_closed() == 8
    # a step within budget again clears the note
    t += 100 * MS
    r.step(snap(t, proc(DEC, "decode", 2.1, 500), proc(PRE, "prefill", 30.0, 900)), t)
    assert "slack" not in flexpd.describe(r.state, 0)


def test_flexpd_client_leaving_and_coming_back() -> None:
    r = Run(flexpd)
    t = T0
    r.step(snap(t, proc(DEC, "decode", 2.0, 500), proc(PRE, "prefill", 30.0, 900)), t)
    assert r.s(PRE).inflight == 1
    del r.roles[DEC]
    t += 100 * MS
    r.step(snap(t, proc(PRE, "prefill", 30.0, 900)), t)
    assert r.s(PRE) == OPEN and "steps aside" in r.reasons[(0, PRE)]
    assert DEC not in r.state.devices[0].alone_ms
    r.roles[DEC] = "decode"
    t += 100 * MS
    r.step(snap(t, proc(DEC, "decode", 2.0, 500), proc(PRE, "prefill", 30.0, 900)), t)
    assert r.s(PRE).inflight == 1 and r.s(DEC).priority == 7


def test_flexpd_classes_from_phase_when_no_role() -> None:
    """auto clients: the observed phase decides; mixed counts as decode; idle keeps its class;
    never seen working: left open."""
    r = Run(flexpd, roles={DEC: "auto", PRE: "auto", 303: "auto"})
    t = T0
    r.step(snap(t, proc(DEC, "mixed", 3.0, 500), proc(PRE, "prefill", 30.0, 900), proc(303, "idle")), t)
    assert r.s(DEC).priority == 7 and r.s(PRE).priority == 0 and r.s(303) == OPEN
    # a prefill burst ends: it keeps its class while idle
    t += 100 * MS
    r.step(snap(t, proc(DEC, "decode", 3.0, 500), proc(PRE, "idle"), proc(303, "idle")), t)
    assert r.s(PRE).priority == 0 and r.s(PRE).inflight >= 1
    # the snapshot's role (given to the shim) wins over the phase: two decoders, no prefill
    t += 100 * MS
    r.step(snap(t, proc(DEC, "decode", 3.0, 500), proc(PRE, "prefill", 30.0, 900, role="decode"),
                proc(303, "idle")), t)
    assert r.s(PRE) == OPEN and r.s(DEC) == OPEN and "no prefill client" in r.reasons[(0, PRE)]
    # mixed_as = prefill: a chunked-prefill engine yields to a pure decoder
    r2 = Run(flexpd, flexpd.Options(mixed_as="prefill"), roles={DEC: "auto", PRE: "auto"})
    r2.step(snap(T0, proc(DEC, "decode", 2.0, 500), proc(PRE, "mixed", 30.0, 900)), T0)
    assert r2.s(PRE).priority == 0 and r2.s(DEC).priority == 7


def test_flexpd_devices_are_independent() -> None:
    cs = clients(cl(1, "decode", device=0), cl(2, "prefill", device=0), cl(3, "decode", device=1))
    out = flexpd.decide(snap(T0, proc(1, "decode", 2.0, 5), proc(2, "prefill", 9.0, 5), proc(3, "decode", 2.0, 5,
                                                                                          device=1)),
                        cs, flexpd.initial_state(), flexpd.Options(), T0)
    assert out.settings[0][2].inflight == 1 and out.settings[1][3] == OPEN


# ---------------------------------------------------------------- static-split


def test_static_split_turns_and_shares() -> None:
    opts = static_split.Options(prefill_share=0.25, quantum_ms=20.0, inflight=2)
    r = Run(static_split, opts)
    s = snap(T0, proc(DEC, "decode", 2.0, 500), proc(PRE, "prefill", 30.0, 900))
    r.step(s, T0)
    assert r.s(PRE) == GateSetting("open", 0, 20.0, 2) and r.s(DEC) == GateSetting("closed", 0, 20.0, 2)
    assert r.reasons[(0, DEC)].startswith("turn: prefill's turn on device 0 (5 of 20 ms")
    r.step(s, T0 + 6 * MS)
    assert r.s(PRE).gate == "closed" and r.s(DEC).gate == "open"
    assert "decode's turn" in r.reasons[(0, PRE)]
    # over many cycles at a 1 ms tick prefill holds the device a quarter of the time
    turns = []
    for k in range(400):
        r.step(s, T0 + k * MS)
        turns.append(r.s(PRE).gate == "open")
        assert r.s(PRE).gate != r.s(DEC).gate
    assert sum(turns) / len(turns) == pytest.approx(0.25, abs=0.01)


def test_static_split_steps_aside_with_one_side_only() -> None:
    r = Run(static_split, roles={DEC: "decode", 303: "decode"})
    r.inforce[DEC] = GateSetting(gate="closed", inflight=2)
    r.step(snap(T0, proc(DEC, "decode", 2.0, 500), proc(303, "decode", 2.0, 500)), T0)
    assert r.s(DEC) == OPEN and r.s(303) == OPEN
    assert "no prefill client on device 0" in r.reasons[(0, DEC)]
    assert r.state.epoch_ns == {}


def test_static_split_follows_a_client_leaving() -> None:
    r = Run(static_split)
    s = snap(T0, proc(DEC, "decode", 2.0, 500), proc(PRE, "prefill", 30.0, 900))
    r.step(s, T0 + 15 * MS)
    del r.roles[PRE]
    r.step(snap(T0, proc(DEC, "decode", 2.0, 500)), T0 + 16 * MS)
    assert r.s(DEC) == OPEN and "only 1 client" in r.reasons[(0, DEC)]


# ---------------------------------------------------------------- declared roles

LIAR = 303  # declares decode, runs prefill


def _victim_and_liar(t: int, liar_seen: str = "prefill", signal: str = "kernel",
                     liar_busy: bool = True) -> NodeSnapshot:
    liar = (proc(LIAR, "decode", 30.0, 900, role="decode", observed=(liar_seen, signal)) if liar_busy else
            proc(LIAR, "idle", role="decode"))
    return snap(t, proc(PRE, "prefill", 30.0, 900, role="prefill"), liar)


def test_a_declared_role_its_user_may_not_declare_is_treated_as_undeclared() -> None:
    """[roles] decode does not list the liar's user: its declaration counts for nothing and
    the observed phase (prefill) decides, so it does not go before the other prefill; the
    reason names the pid, the role and the user, once."""
    refused = {"may_declare": frozenset({"prefill"}), "who": "uid 1001 (mallory)"}
    r = Run(flexpd, roles={PRE: "prefill", LIAR: "decode"}, users={LIAR: refused})
    r.inforce = {PRE: GateSetting("open", 0, 100.0, 1), LIAR: GateSetting("open", 7, 200.0, 0)}  # as today
    r.step(_victim_and_liar(T0, signal="shape"), T0)
    assert r.s(LIAR) == OPEN and r.s(PRE) == OPEN
    said = ("pid 303 declared decode, which uid 1001 (mallory) may not declare ([roles] decode): treated as "
            "undeclared, observed prefill")
    assert r.reasons[(0, LIAR)].startswith(said), r.reasons
    assert "flexpd steps aside" in r.reasons[(0, LIAR)]
    assert said in flexpd.describe(r.state, 0)
    # said once, on the snapshot that found it; the note stays in the device's summary
    r.step(_victim_and_liar(T0 + 100 * MS, signal="shape"), T0 + 100 * MS)
    assert r.notes == {} and r.reasons == {} and said in flexpd.describe(r.state, 0)
    # beside a real decode client it is treated as the prefill it is
    r2 = Run(flexpd, roles={DEC: "decode", LIAR: "decode"}, users={LIAR: refused})
    r2.step(snap(T0, proc(DEC, "decode", 2.0, 500, role="decode"),
                 proc(LIAR, "decode", 30.0, 900, role="decode", observed=("prefill", "shape"))), T0)
    assert r2.s(DEC).priority == 7 and r2.s(LIAR).priority == 0 and r2.s(LIAR).inflight == 1
    # its user allowed (the default: no [roles] lists): the declaration holds, as before
    r3 = Run(flexpd, roles={PRE: "prefill", LIAR: "decode"})
    r3.step(_victim_and_liar(T0, signal="shape"), T0)
    assert r3.s(LIAR).priority == 7 and r3.s(PRE).priority == 0


def test_a_refused_role_with_no_phase_observed_yet_is_left_open() -> None:
    refused = {"may_declare": frozenset(), "who": "uid 1001"}
    r = Run(flexpd, roles={DEC: "decode", LIAR: "decode"}, users={LIAR: refused})
    r.step(snap(T0, proc(DEC, "decode", 2.0, 500, role="decode"), proc(LIAR, "idle", role="decode")), T0)
    assert r.s(LIAR) == OPEN and r.s(DEC) == OPEN
    assert "no phase observed yet" in r.notes[(0, LIAR)]


def test_a_declared_role_the_operators_contradict_past_the_bound_is_set_aside() -> None:
    """Declared decode, prefill-named kernels: believed for distrust_after_ms (2 s), then
    treated as prefill and the reason says why; brief agreement does not wipe the record;
    believed again after agreeing for trust_after_ms (1 s)."""
    r = Run(flexpd, roles={PRE: "prefill", LIAR: "decode"})
    t = T0
    for _ in range(19):  # 1.9 s of prefill operators, the first interval from T0 - 100 ms
        r.step(_victim_and_liar(t), t)
        assert r.s(LIAR).priority == 7 and r.s(PRE).priority == 0, (t - T0) / MS
        t += 100 * MS
    r.step(_victim_and_liar(t), t)  # 2.0 s
    assert r.s(LIAR) == OPEN and r.s(PRE) == OPEN
    said = "pid 303 declared decode but runs prefill operators for 2.0 s: treated as prefill"
    assert r.reasons[(0, LIAR)].startswith(said), r.reasons
    assert said in flexpd.describe(r.state, 0)
    # it agrees for 0.5 s, idles, then contradicts again: still set aside, no new reason
    for seen, busy in [("decode", True)] * 5 + [("decode", False)] * 3 + [("prefill", True)] * 2:
        t += 100 * MS
        r.step(_victim_and_liar(t, seen, liar_busy=busy), t)
        assert r.s(LIAR) == OPEN and r.reasons == {}, ((t - T0) / MS, r.reasons)
    # agreement shorter than trust_after_ms does not end the contradiction: counted from its start
    assert "runs prefill operators for 3.0 s" in flexpd.describe(r.state, 0)
    # agreeing for 1 s gives the declaration back, and says so
    for i in range(10):
        t += 100 * MS
        r.step(_victim_and_liar(t, "decode"), t)
        assert (r.s(LIAR).priority == 7) == (i == 9), i
    assert r.reasons[(0, LIAR)].startswith("pid 303 declared decode and its work agrees again: treated as decode")
    assert "declared" not in flexpd.describe(r.state, 0)


def test_a_short_agreement_does_not_reset_the_contradiction() -> None:
    """Agreeing for one interval now and then (less than trust_after_ms) does not keep the
    claim: the contradiction is counted from its start."""
    r = Run(flexpd, roles={PRE: "prefill", LIAR: "decode"})
    t = T0
    for i in range(25):
        seen = "decode" if i % 5 == 4 else "prefill"
        r.step(_victim_and_liar(t, seen), t)
        t += 100 * MS
    assert r.s(LIAR) == OPEN and "declared decode but runs prefill operators" in flexpd.describe(r.state, 0)


def test_only_the_configured_signals_contradict_a_declaration() -> None:
    """Shape is the observer's weakest signal (a decode step of long kernels looks like
    prefill): by default it never sets a declaration aside; listed in contradicted_by, it does."""
    r = Run(flexpd, roles={PRE: "prefill", LIAR: "decode"})
    t = T0
    for _ in range(40):
        r.step(_victim_and_liar(t, signal="shape"), t)
        t += 100 * MS
    assert r.s(LIAR).priority == 7
    rules = RoleRules(contradicted_by=("aclnn", "kernel", "shape"), distrust_after_ms=500.0)
    r = Run(flexpd, roles={PRE: "prefill", LIAR: "decode"})
    t = T0
    for _ in range(4):
        r.step(_victim_and_liar(t, signal="shape"), t, roles=rules)
        assert r.s(LIAR).priority == 7
        t += 100 * MS
    r.step(_victim_and_liar(t, signal="shape"), t, roles=rules)
    assert r.s(LIAR) == OPEN
    assert r.reasons[(0, LIAR)].startswith("pid 303 declared decode but runs prefill-shaped work for 0.5 s")


def test_an_observer_that_does_not_say_what_it_saw_changes_nothing() -> None:
    """An older observer (no observed_phase where the role decided): nothing contradicts."""
    r = Run(flexpd, roles={PRE: "prefill", LIAR: "decode"})
    t = T0
    for _ in range(40):
        r.step(snap(t, proc(PRE, "prefill", 30.0, 900, role="prefill"),
                    {**proc(LIAR, "decode", 30.0, 900, role="decode"), "phase_source": "role"}), t)
        t += 100 * MS
    assert r.s(LIAR).priority == 7


def test_static_split_checks_declared_roles_too() -> None:
    refused = {"may_declare": frozenset({"prefill"}), "who": "uid 1001"}
    r = Run(static_split, roles={PRE: "prefill", LIAR: "decode"}, users={LIAR: refused})
    r.step(_victim_and_liar(T0, signal="shape"), T0)
    assert r.s(LIAR) == OPEN and r.s(PRE) == OPEN  # one side only: steps aside
    assert "may not declare ([roles] decode)" in r.notes[(0, LIAR)]
    assert "may not declare" in static_split.describe(r.state, 0)
    r = Run(static_split, roles={PRE: "prefill", LIAR: "decode"})
    t = T0
    for _ in range(21):
        r.step(_victim_and_liar(t), t)
        t += 100 * MS
    assert r.s(LIAR) == OPEN and r.s(PRE) == OPEN
    assert "declared decode but runs prefill operators" in static_split.describe(r.state, 0)


def test_role_access_resolves_users_and_groups() -> None:
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    rules = RoleRules(decode=("@root",), prefill=(str(nobody), "root"))
    access = RoleAccess(rules)
    assert access.of(0) == (frozenset({"prefill", "decode"}), "uid 0 (root)")
    assert access.of(nobody) == (frozenset({"prefill"}), f"uid {nobody} (nobody)")
    assert access.of(4_000_000) == (frozenset(), "uid 4000000")  # no entry: only its number names it
    assert access.of(None)[0] == frozenset()
    open_ = RoleAccess(RoleRules(decode=("*",)))
    assert open_.of(4_000_000)[0] == frozenset({"prefill", "decode"})
    assert RoleAccess(RoleRules()).of(4_000_000)[0] == frozenset({"prefill", "decode"})


def test_the_snapshot_says_what_the_work_showed_beside_a_declared_role() -> None:
    s = snap(T0, proc(1, "decode", role="decode", observed=("prefill", "kernel")), proc(2, "prefill"),
             {**proc(3, "decode", role="decode"), "phase_source": "role"})
    p1, p2, p3 = s.processes
    assert (p1.phase, p1.observed_phase, p1.observed_source) == ("decode", "prefill", "kernel")
    assert (p2.observed_phase, p2.observed_source) == ("prefill", "N/A")
    assert p3.observed_phase is None


def test_the_observer_publishes_what_the_work_showed_beside_a_declared_role() -> None:
    """The producer side: a process declared decode whose one pass is 60 ms of 160 launches
    (prefill by its shape) is published with phase decode (source role) and observed_phase
    prefill (source shape); an undeclared one gets no observed_* keys (its phase is them)."""
    from flexnpu.observe.snapshot import ProcessInfo, SnapshotBuilder
    from test_observe_phase import counters

    b = SnapshotBuilder("bpf", start_ns=0)
    b.build({(10, 0): counters(), (11, 0): counters()}, now_ns=100 * MS)
    work = dict(KERNEL=160, SYNC=1, iterations=1, iter_ns=60 * MS, shapes={(33, 15, 0): [1, 60 * MS, 160]})
    raw = b.build({(10, 0): counters(**work), (11, 0): counters(**work)}, now_ns=200 * MS,
                  info=lambda pid: ProcessInfo("p", "decode" if pid == 10 else None))
    liar, plain = raw["processes"]
    assert (liar["phase"], liar["phase_source"]) == ("decode", "role")
    assert (liar["observed_phase"], liar["observed_source"]) == ("prefill", "shape")
    assert plain["phase"] == "prefill" and "observed_phase" not in plain
    p = NodeSnapshot.from_json(raw).processes[0]
    assert (p.phase, p.observed_phase, p.observed_source) == ("decode", "prefill", "shape")


@pytest.mark.parametrize("source", ["bpf", "shim"])
def test_no_evidence_is_never_observed_decode(source: str) -> None:
    """A process declared decode whose interval shows nothing of its phase (set-up copies; a
    first pass only just queued) is published as observed idle, not decode: a user refused
    the decode role would otherwise get decode's priority in exactly those intervals. Once
    its work showed prefill, an interval without evidence keeps that."""
    from flexnpu.observe.snapshot import ProcessInfo, SnapshotBuilder
    from test_observe_phase import counters

    b = SnapshotBuilder(source, start_ns=0)
    shp = (lambda d: d) if source == "bpf" else (lambda d: None)
    info = lambda pid: ProcessInfo("p", "decode")  # noqa: E731
    b.build({(10, 0): counters(shapes=shp({}))}, now_ns=100 * MS, info=info)

    def observed(now_ms: int, **c) -> tuple[str, str]:
        e = b.build({(10, 0): counters(**c)}, now_ns=now_ms * MS, info=info)["processes"][0]
        assert (e["phase"], e["phase_source"]) == ("decode", "role"), e
        return e["observed_phase"], e["observed_source"]

    assert observed(200, MEMCPY=2, H2D=1 << 20, shapes=shp({})) == ("idle", "idle")  # set-up copies
    queued = dict(MEMCPY=2, H2D=1 << 20, KERNEL=4, iter_start_ns=300 * MS - 50_000, iter_launches=4, shapes=shp({}))
    assert observed(300, **queued) == ("idle", "idle")  # 4 kernels queued 50 us ago
    done = dict(MEMCPY=2, H2D=1 << 20, KERNEL=8, SYNC=1, iterations=1, iter_ns=8 * MS, iter_ns_last=8 * MS,
                shapes=shp({(27, 5, 0): [1, 8 * MS, 4]}))
    assert observed(400, **done)[0] == "prefill"  # a pass of 4 kernels, 2 ms each
    still = dict(done, iter_start_ns=500 * MS - 50_000, iter_launches=0)
    assert observed(500, **still)[0] == "prefill"  # nothing new: what it showed stands
