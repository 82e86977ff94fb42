"""The in-flight budget, enforced: real daemon process, real emulator server (serial mode),
gate_loop under the shim. How much work a client really had queued is read from the
emulator's own count of the device's pending ops (its ground truth), not from the shim.
"""

from __future__ import annotations

import time

from forward_fixtures import client_record, plain_env, run_both, shim_env, work_of  # noqa: F401  (fixtures)
from test_daemon_fixtures import (  # noqa: F401  (fixtures)
    daemons,
    finish,
    finish_listed,
    gate_loop,
    ready,
    send,
    wait_for,
)

LONG_HOLD_MS = 60_000  # nothing is released by max_hold unless the test says so


def _iterations(lines: list[dict]) -> list[dict]:
    return [x for x in lines if "iter" in x]


def _max_pending(emu, client, seconds: float) -> int:
    """The most ops the device had queued, sampled while the client runs."""
    top, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline and client.proc.poll() is None:
        top = max(top, int(emu.device(0)["pending_ops"]))
        time.sleep(0.005)
    return top


def test_budget_bounds_outstanding_work(emulator, daemons, gate_loop):
    emu = emulator()
    d = daemons(0)
    ms, k = 20, 6
    a = gate_loop(4, ms, k, "--wait-stdin")
    ready(a)
    d.wait_admitted(a.pid)
    v = d.set(a.pid, inflight=1, max_hold_ms=LONG_HOLD_MS)
    assert (v["inflight"], v["owner"]) == (1, "manual")
    send(a)
    top = _max_pending(emu, a, 1.0)
    rc, out = finish(a, 60)
    assert rc == 0
    its = _iterations(out)
    assert len(its) == 4
    # every launch after an iteration's first waits for the kernel before it: ~MS each
    for it in its:
        assert it["call_ms"] >= 0.7 * ms, its
        assert it["iter_ms"] >= 0.9 * k * ms, its
    # ground truth: one kernel (and the shim's event after it) queued at a time, never k
    assert top <= 2, f"the device had {top} ops queued under a budget of 1"
    rec = emu.client(a.pid)
    assert rec["ops"]["kernel"] == 1 + 4 * k
    # stride 1: an event recorded after each budgeted launch, none by the application
    assert 4 * k - 1 <= rec["ops"]["event_record"] <= 4 * k + 1, rec["ops"]


def test_budget_of_two_keeps_two_queued(emulator, daemons, gate_loop):
    emu = emulator()
    d = daemons(0)
    ms, k = 20, 8
    a = gate_loop(3, ms, k, "--wait-stdin", "--wait-end")
    ready(a)
    d.wait_admitted(a.pid)
    d.set(a.pid, inflight=2, max_hold_ms=LONG_HOLD_MS)
    send(a)
    top = _max_pending(emu, a, 1.0)
    rc, out, v = finish_listed(a, d, 60)
    assert rc == 0
    for it in _iterations(out):
        assert it["call_ms"] >= 0.7 * ms, it  # the third launch of a step waits for the first
    assert 2 <= top <= 4, f"the device had {top} ops queued under a budget of 2 (2 kernels + 2 events)"
    assert v["inflight_waits"] >= 3 * (k - 2) and v["inflight_wait_ms"] >= 3 * (k - 2) * ms * 0.5, v
    assert v["inflight_now"] == 0  # its last sync finished everything
    assert v["gate_expired"] == 0


def test_budget_zero_is_unlimited(emulator, daemons, gate_loop):
    emu = emulator()
    d = daemons(0)
    ms, k = 20, 6
    a = gate_loop(2, ms, k, "--wait-stdin", "--wait-end")
    ready(a)
    d.wait_admitted(a.pid)
    d.set(a.pid, inflight=1, max_hold_ms=LONG_HOLD_MS)
    d.set(a.pid, inflight=0)
    send(a)
    top = _max_pending(emu, a, 0.1)
    rc, out, v = finish_listed(a, d, 60)
    assert rc == 0
    for it in _iterations(out):
        assert it["call_ms"] < 0.5 * ms, it  # launches return at once: all k queue
    assert top >= k - 1, f"only {top} ops queued without a budget"
    assert emu.client(a.pid)["ops"]["event_record"] == 0  # the shim records nothing without a budget
    assert v["inflight_waits"] == 0 and v["inflight"] == 0


def test_budget_wait_ends_by_max_hold(emulator, daemons, gate_loop):
    emulator()
    d = daemons(0)
    ms, k, hold = 40, 5, 5
    a = gate_loop(3, ms, k, "--wait-stdin", "--wait-end")
    ready(a)
    d.wait_admitted(a.pid)
    d.set(a.pid, inflight=1, max_hold_ms=hold)
    send(a)
    rc, out, v = finish_listed(a, d, 60)
    assert rc == 0
    for it in _iterations(out):
        # the second launch waits max_hold, then the client is released until its sync
        assert 0.5 * hold <= it["call_ms"] < 0.5 * ms, it
    assert v["gate_expired"] >= 3 and v["inflight_waits"] >= 3, v


def test_dead_daemon_fails_the_budget_open(emulator, daemons, gate_loop):
    emulator()
    d = daemons(0)
    ms = 50
    a = gate_loop(0, ms, 4, "--seconds", "6", "--wait-stdin")
    ready(a)
    d.wait_admitted(a.pid)
    d.set(a.pid, inflight=1, max_hold_ms=LONG_HOLD_MS)
    send(a)
    first = a.read(15)
    assert first["call_ms"] >= 0.7 * ms, first  # held by the budget while the daemon lives
    d.kill()
    rc, out = finish(a, 60)
    assert rc == 0
    its = _iterations(out)
    late = [it for it in its if it["t_ms"] > its[0]["t_ms"] + 2000]  # the heartbeat is stale after 1 s
    assert late, its[-3:]
    assert all(it["call_ms"] < 0.5 * ms for it in late), late[:3]


def _preset_budget(daemon, inflight: int) -> None:
    """The device default budget: a program admitted later runs under it from its first launch."""
    daemon.client.defaults(max_hold_ms=LONG_HOLD_MS, inflight=inflight)


def test_threads_streams_and_contexts_under_a_budget(emulator, daemons, acl_programs, kernel_library, run_both,
                                                     runtime_dir):
    """fwd_threads (threads on their own streams, a context made and destroyed by the main
    thread, device resets) under budgets of 1 and 3: same results and the same device work
    as without the shim, and no crash."""
    emu = emulator()
    d = daemons(0)
    argv = [acl_programs["fwd_threads"], kernel_library, 0]
    for budget in (1, 3):
        _preset_budget(d, budget)
        plain, shimmed = run_both(argv)
        plain.ok(), shimmed.ok()
        assert plain.json() == shimmed.json()
        status = emu.status()
        a, b = client_record(status, plain.pid, 0), client_record(status, shimmed.pid, 0)
        work_a, work_b = work_of(a), work_of(b)
        # the shim's own events are its only extra device ops
        assert b["ops"]["event_record"] > a["ops"]["event_record"]
        for w in (work_a, work_b):
            w["ops"] = {k: v for k, v in w["ops"].items() if k != "event_record"}
        assert work_b == work_a
