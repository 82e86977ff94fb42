"""The dispatch gate, enforced: real daemon process, real emulator server, real workloads
under the shim. What a held client did or did not dispatch is read from the emulator's own
per-client busy time (its ground truth), not from the shim's counters.
"""

from __future__ import annotations

import statistics
import time

import pytest

from test_daemon_fixtures import (  # noqa: F401  (fixtures)
    busy_ns,
    daemons,
    finish,
    gate_list_cli,
    gate_loop,
    ready,
    send,
    wait_for,
)

LONG_HOLD_MS = 60_000  # nothing is released by max_hold within these tests


def _busy_over(emu, pid: int, seconds: float) -> tuple[int, int]:
    b0 = busy_ns(emu, pid)
    time.sleep(seconds)
    return b0, busy_ns(emu, pid)


def test_closed_gate_dispatches_nothing_until_opened(emulator, daemons, gate_loop):
    emu = emulator()
    d = daemons(0)
    a = gate_loop(0, 5, 2, "--seconds", "60", "--wait-stdin", "--quiet")
    ready(a)
    d.wait_admitted(a.pid)
    v = d.set(a.pid, gate="closed", max_hold_ms=LONG_HOLD_MS)
    assert (v["gate"], v["max_hold_ms"]) == ("closed", LONG_HOLD_MS)

    # closed before its first timed launch: held there, nothing reaches the device
    send(a)
    wait_for(lambda: d.entry(a.pid)["waiting"] == 1, 15, "the client held at its gate")
    b0, b1 = _busy_over(emu, a.pid, 0.6)
    assert b1 == b0, f"a client behind a closed gate got {(b1 - b0) / 1e6:.1f} ms of device time"
    assert d.entry(a.pid)["waiting"] == 1

    t_open = time.monotonic()
    d.set(a.pid, gate="open")
    wait_for(lambda: busy_ns(emu, a.pid) >= b1 + 50e6, 15, "device time once the gate opened")
    held = gate_list_cli(0)
    v = next(c for c in held["clients"] if c["pid"] == a.pid)
    assert v["gate"] == "open" and v["gate_waits"] >= 1
    assert v["gate_wait_ns"] >= 0.5e9, v  # held across the 0.6 s window at least
    assert 0 < v["last_release_lag_ns"] < 1e9  # gate opened -> the held call went

    # closed while running: after the work already dispatched drains, nothing more
    d.set(a.pid, gate="closed")
    wait_for(lambda: d.entry(a.pid)["waiting"] == 1, 15, "the running client held again")
    b2, b3 = _busy_over(emu, a.pid, 0.6)
    assert b3 == b2, f"got {(b3 - b2) / 1e6:.1f} ms of device time while closed"
    d.set(a.pid, gate="open")
    wait_for(lambda: busy_ns(emu, a.pid) >= b3 + 50e6, 15, "device time once reopened")
    after = next(c for c in gate_list_cli(0)["clients"] if c["pid"] == a.pid)
    assert after["gate_waits"] > v["gate_waits"]
    assert after["gate_wait_ns"] - v["gate_wait_ns"] >= 0.5e9
    assert time.monotonic() - t_open < 60


def _shares(emu, a, b, seconds: float) -> dict:
    """Device time (ms) of a and b over a window."""
    a0, b0 = busy_ns(emu, a.pid), busy_ns(emu, b.pid)
    time.sleep(seconds)
    a1, b1 = busy_ns(emu, a.pid), busy_ns(emu, b.pid)
    return {"a": (a1 - a0) / 1e6, "b": (b1 - b0) / 1e6}


@pytest.mark.slow
def test_priority_holds_lower_priority_while_higher_has_work_pending(emulator, daemons, gate_loop):
    emu = emulator(mode="serial")
    d = daemons(0)
    # identical workloads: 4 kernels of 5 ms, then a sync
    a = gate_loop(0, 5, 4, "--seconds", "60", "--wait-stdin", "--quiet")
    b = gate_loop(0, 5, 4, "--seconds", "60", "--wait-stdin", "--quiet")
    for c in (a, b):
        ready(c)
        d.wait_admitted(c.pid)
    d.set(a.pid, priority=5, max_hold_ms=LONG_HOLD_MS)
    d.set(b.pid, priority=0, max_hold_ms=LONG_HOLD_MS)
    send(a)
    send(b)
    time.sleep(0.5)
    waited0 = d.entry(b.pid)["gate_wait_ns"]
    prio = _shares(emu, a, b, 2.0)
    # b goes only in the moments between a's sync and a's next launch: at most about one
    # 5 ms kernel per 20 ms iteration of a, usually less (on a loaded machine, often none)
    assert prio["a"] > 800, prio  # a kept the device busy
    assert prio["b"] < 0.3 * prio["a"], prio

    d.set(a.pid, priority=0)
    time.sleep(0.5)
    # a hold is counted when it ends, and b's last one ended when a's priority dropped
    waited = (d.entry(b.pid)["gate_wait_ns"] - waited0) / 1e6
    assert waited > 1000, (waited, prio)  # b was held for most of the 2 s window
    waited0 = d.entry(b.pid)["gate_wait_ns"]
    equal = _shares(emu, a, b, 2.0)
    assert equal["a"] + equal["b"] > 1000, equal
    assert 0.5 < equal["b"] / equal["a"] < 2.0, equal
    assert d.entry(b.pid)["gate_wait_ns"] == waited0  # nobody above b now: never held
    assert prio["b"] / prio["a"] < 0.5 * equal["b"] / equal["a"], (prio, equal)


ITERS = 7  # prime: an exact count of holds, not one that an off-by-one multiple could fake


def test_max_hold_bounds_every_hold_of_a_closed_gate(emulator, daemons, gate_loop):
    emulator()
    d = daemons(0)
    b = gate_loop(ITERS, 2, 2, "--wait-stdin", "--wait-end")
    ready(b)
    d.wait_admitted(b.pid)
    d.set(b.pid, gate="closed", max_hold_ms=100)
    t0 = time.monotonic()
    send(b)
    out = []
    while not out or not out[-1].get("done"):
        out.append(b.read(30))
    elapsed = time.monotonic() - t0
    iters = [o for o in out if "iter" in o]
    assert out[-1]["iters"] == ITERS and len(iters) == ITERS
    calls = [o["call_ms"] for o in iters]
    # each iteration: its first launch held exactly max_hold, then released until the sync
    assert min(calls) >= 99.0, calls
    assert statistics.median(calls) < 150 and max(calls) < 500, calls
    assert ITERS * 0.1 <= elapsed < ITERS * 0.5 + 5, elapsed
    v = d.entry(b.pid)
    assert v["gate_expired"] == ITERS and v["gate_waits"] == ITERS, v
    assert 99e6 <= v["gate_wait_ns"] / ITERS < 150e6, v
    assert v["iterations"] == ITERS + 1  # and the warm-up before the gate closed
    send(b, "end")
    rc, _ = finish(b, 30)
    assert rc == 0


def test_max_hold_bounds_a_priority_hold(emulator, daemons, gate_loop):
    emulator(mode="shared")  # b's kernels need not queue behind a's long one
    d = daemons(0)
    a = gate_loop(1, 20_000, 1, "--wait-stdin")  # one 20 s kernel: work pending all along
    b = gate_loop(ITERS, 2, 2, "--wait-stdin", "--wait-end")
    for c in (a, b):
        ready(c)
        d.wait_admitted(c.pid)
    d.set(a.pid, priority=7)
    d.set(b.pid, priority=1, max_hold_ms=100)
    send(a)
    wait_for(lambda: d.entry(a.pid)["pending"], 15, "a's work pending")
    send(b)
    out = []
    while not out or not out[-1].get("done"):
        out.append(b.read(30))
    calls = [o["call_ms"] for o in out if "iter" in o]
    assert len(calls) == ITERS and min(calls) >= 99.0 and statistics.median(calls) < 150, calls
    v = d.entry(b.pid)
    assert v["gate_expired"] == ITERS, v
    assert d.entry(a.pid)["pending"], "a's kernel ended early: the holds were not priority holds"
