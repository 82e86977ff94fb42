"""The forwarding daemon's faults: killed, restarted, stopped, absent; clients killed.

Applications must keep running whatever happens to the control plane: a daemon that dies
fails open at once (its admission connection hangs up), a restarted one adopts the gate
table and re-admits the live clients, which reconnect, with their gate settings; a dead
client frees its slot and whatever it held. Every wait here has a timeout, so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from flexnpu.forward.daemon.gate import GateTable
from test_daemon_fixtures import (  # noqa: F401  (fixtures)
    busy_ns,
    daemons,
    finish,
    gate_loop,
    no_output,
    ready,
    send,
    wait_for,
)

LONG_HOLD_MS = 60_000
STALE_S = 1.0  # FX_HEARTBEAT_STALE_NS


def _admit_all(d, *clients) -> None:
    for c in clients:
        ready(c)
        d.wait_admitted(c.pid)


@pytest.mark.slow
def test_daemon_killed_clients_fail_open_and_finish(emulator, daemons, gate_loop):
    emulator(mode="shared")  # the held clients' kernels run beside c's long one
    d = daemons(0)
    a = gate_loop(5, 2, 2, "--wait-stdin")  # held by its closed gate
    b = gate_loop(5, 2, 2, "--wait-stdin")  # held by priority: c has work pending
    c = gate_loop(1, 6_000, 1, "--wait-stdin")  # one 6 s kernel at priority 7
    _admit_all(d, a, b, c)
    d.set(a.pid, gate="closed", max_hold_ms=LONG_HOLD_MS)
    d.set(b.pid, priority=0, max_hold_ms=LONG_HOLD_MS)
    d.set(c.pid, priority=7)
    send(c)
    wait_for(lambda: d.entry(c.pid)["pending"], 15, "c's work pending")
    send(a)
    send(b)
    wait_for(lambda: all(d.entry(x.pid)["waiting"] == 1 for x in (a, b)), 15, "a and b held")
    time.sleep(0.3)
    assert no_output(a) and no_output(b), "a held client ran an iteration"

    d.kill()
    t_kill = time.monotonic()
    for x in (a, b):
        rc, out = finish(x, 30)
        assert rc == 0 and out[-1]["done"] and out[-1]["iters"] == 5, out
    gone = time.monotonic() - t_kill
    # released by the daemon's connection hanging up (seen within a 10 ms wait slice), long
    # before its heartbeat would be stale: c's kernel is still running, so its priority hold
    # would still stand; 5 iterations of 2 x 2 ms follow the release
    assert gone < STALE_S - 0.2, gone
    assert c.proc.poll() is None, "c finished first: a and b were not released by fail-open"
    rc, out = finish(c, 60)
    assert rc == 0 and out[-1]["iters"] == 1


def test_restarted_daemon_adopts_segment_and_live_clients(emulator, daemons, gate_loop, runtime_dir):
    emu = emulator()
    d1 = daemons(0)
    a = gate_loop(0, 2, 2, "--seconds", "60", "--wait-stdin", "--quiet")
    b = gate_loop(0, 2, 2, "--seconds", "60", "--wait-stdin", "--quiet")
    _admit_all(d1, a, b)
    d1.set(a.pid, gate="closed", priority=3, max_hold_ms=LONG_HOLD_MS)
    d1.set(b.pid, priority=6, max_hold_ms=1234)
    slots = {c["pid"]: c["slot"] for c in d1.list()}
    send(a)
    send(b)
    wait_for(lambda: d1.entry(a.pid)["waiting"] == 1, 15, "a held")
    ctl = runtime_dir / "gate-0.ctl"
    inode = ctl.stat().st_ino

    d1.kill()
    d2 = daemons(0)
    assert d2.pid != d1.pid and ctl.stat().st_ino == inode  # the same table, not a new one
    # the shims see the old connection hang up and ask again (at most once a second)
    got = wait_for(lambda: g if len(g := {c["pid"]: c for c in d2.list()}) == 2 else None, 10,
                   "both clients re-admitted")
    assert set(got) == {a.pid, b.pid}, got
    assert {p: got[p]["slot"] for p in got} == slots
    assert (got[a.pid]["gate"], got[a.pid]["priority"], got[a.pid]["max_hold_ms"]) == ("closed", 3, LONG_HOLD_MS)
    assert (got[b.pid]["gate"], got[b.pid]["priority"], got[b.pid]["max_hold_ms"]) == ("open", 6, 1234)
    assert all(got[p]["admitted_pid"] == p for p in got)
    assert "2 live clients kept for their reconnect" in d2.log()
    assert d2.log().count("re-admitted pid") == 2

    # the kept settings are enforced again: a (which may have failed open while no daemon
    # lived) is held once the new heartbeat runs; b runs
    wait_for(lambda: d2.entry(a.pid)["waiting"] == 1, 15, "a held by the new daemon")
    a0, b0 = busy_ns(emu, a.pid), busy_ns(emu, b.pid)
    time.sleep(0.5)
    assert busy_ns(emu, a.pid) == a0
    assert busy_ns(emu, b.pid) > b0
    # and the new daemon controls them: opened and raised above b (which, busy without a
    # pause at priority 6, would otherwise keep a waiting up to its long max_hold)
    d2.set(a.pid, gate="open", priority=7)
    wait_for(lambda: busy_ns(emu, a.pid) > a0, 15, "a running after the new daemon opened it")


def test_killed_client_frees_its_slot_and_its_priority_hold(emulator, daemons, gate_loop):
    emulator(mode="shared")
    d = daemons(0)
    a = gate_loop(1, 30_000, 1, "--wait-stdin")  # priority 7, work pending for 30 s
    b = gate_loop(5, 2, 2, "--wait-stdin")
    _admit_all(d, a, b)
    d.set(a.pid, priority=7)
    d.set(b.pid, priority=0, max_hold_ms=LONG_HOLD_MS)
    send(a)
    wait_for(lambda: d.entry(a.pid)["pending"], 15, "a's work pending")
    send(b)
    wait_for(lambda: d.entry(b.pid)["waiting"] == 1, 15, "b held behind a")
    time.sleep(0.3)
    assert no_output(b)

    os.kill(a.pid, signal.SIGKILL)
    t_kill = time.monotonic()
    wait_for(lambda: d.entry(a.pid) is None, 5, "a's slot freed", interval=0.005)
    freed = time.monotonic() - t_kill
    assert freed < 1.0, f"slot freed {freed:.3f} s after the kill"
    a.proc.wait(timeout=10)
    rc, out = finish(b, 30)
    assert rc == 0 and out[-1]["iters"] == 5
    assert time.monotonic() - t_kill < STALE_S + 10
    wait_for(lambda: d.list() == [], 5, "b's slot freed after it exited")


def test_sigterm_opens_every_gate_and_removes_the_socket(emulator, daemons, gate_loop, runtime_dir):
    emulator()
    d = daemons(0)
    a = gate_loop(5, 2, 2, "--wait-stdin")
    _admit_all(d, a)
    slot = d.set(a.pid, gate="closed", max_hold_ms=LONG_HOLD_MS)["slot"]
    send(a)
    wait_for(lambda: d.entry(a.pid)["waiting"] == 1, 15, "a held")
    assert d.socket.exists()

    d.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert d.wait_exit(15) == 0, d.log()
    assert not d.socket.exists()
    rc, out = finish(a, 30)
    assert rc == 0 and out[-1]["iters"] == 5
    assert time.monotonic() - t0 < 15
    seg = GateTable.open_readonly(0, runtime_dir)  # the daemon is gone: reading its table is safe
    try:
        assert seg.slot(slot).gate == "open"
        assert all(seg.slot(i).gate == "open" for i in range(seg.max_slots))
        assert seg.default("heartbeat_ns") == 0  # shims fail open at once, not after 1 s
    finally:
        seg.close()


def test_no_daemon_program_runs_normally(emulator, gate_loop, runtime_dir):
    emu = emulator()
    a = gate_loop(5, 2, 2)
    rc, out = finish(a, 60)
    assert rc == 0 and out[-1]["iters"] == 5, out
    assert abs(busy_ns(emu, a.pid) - 5 * 2 * 2e6) < 1e5  # all ten 2 ms kernels ran
    assert not list(runtime_dir.glob("gate-*"))


def test_stale_files_of_a_killed_daemon_hold_nobody(emulator, daemons, gate_loop, runtime_dir):
    """A daemon killed with every new client's gate closed by default: a client that starts
    later finds nobody on the admission socket and runs without a gate."""
    emu = emulator()
    d = daemons(0, "--gate", "closed", "--max-hold-ms", str(LONG_HOLD_MS))
    d.kill()
    a = gate_loop(5, 2, 2)
    rc, out = finish(a, 60)
    assert rc == 0 and out[-1]["iters"] == 5, out
    assert out[-1]["max_call_ms"] < 500, out[-1]  # no hold to speak of
    assert abs(busy_ns(emu, a.pid) - 5 * 2 * 2e6) < 1e5
    seg = GateTable.open_readonly(0, runtime_dir)
    try:  # and nothing was admitted for it
        assert not [i for i in range(seg.max_slots) if seg.slot(i).pid == a.pid]
    finally:
        seg.close()


def test_held_client_is_released_within_100_ms_of_the_daemons_kill(emulator, daemons, gate_loop):
    """kill -9 of the daemon while a client is held by a closed gate (max_hold 60 s): the
    client sees the admission connection hang up in its next wait slice and goes."""
    emu = emulator()
    d = daemons(0)
    a = gate_loop(0, 2, 1, "--seconds", "30", "--wait-stdin", "--quiet")
    _admit_all(d, a)
    d.set(a.pid, gate="closed", max_hold_ms=LONG_HOLD_MS)
    send(a)
    wait_for(lambda: d.entry(a.pid)["waiting"] == 1, 15, "a held")
    b0 = busy_ns(emu, a.pid)
    t0 = time.monotonic()
    d.proc.kill()
    wait_for(lambda: busy_ns(emu, a.pid) > b0, 5, "a running after the kill", interval=0.002)
    lag = time.monotonic() - t0
    d.proc.wait(timeout=10)
    assert lag < 0.1 + 0.002, f"released {lag * 1e3:.1f} ms after the kill (its kernel takes 2 ms)"


def test_a_second_daemon_for_a_served_device_refuses_to_start(daemons, runtime_dir):
    first = daemons(0)
    first.wait_ready()
    second = daemons(0, ready=False)
    assert second.wait_exit(15) == 1
    assert f"already served by the daemon with pid {first.pid}" in second.log()
    assert first.list() == []  # the first still answers, its socket and segment untouched
    assert first.socket.exists()
