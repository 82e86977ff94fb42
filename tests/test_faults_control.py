"""Faults under load in the control loop: the controller killed with SIGKILL and
restarted; the observer killed with SIGKILL and restarted.

A node runs flexpd over three clients, two of them held (tests/faults_fixtures.py:
LoadedNode): P held behind D by flexpd's priority, M by a gate a person closed.

- Controller killed: its settings revert to the defaults when its lease runs out (lease
  500 ms + one daemon heartbeat), so P goes on; M's manual gate stays closed; nobody stalls
  or loses work. Restarted: it applies its settings again and P is held again.
- Observer killed: the controller calls it stale after `stale_after_ms` (1 s) and opens
  every gate, so P goes on. Restarted: it publishes again, the controller takes it up
  ("observer": "ok") and P is held again.

Repeated REPS times on one node each; the times go to docs/reliability.md.
"""

from __future__ import annotations

import time

import pytest

from faults_fixtures import (
    Figures,
    LoadedNode,
    ReportWatcher,
    assert_work_kept,
    clients,
    finish_exact,
    kernels,
    loaded_node,
    max_gap_after,
    now,
    wait_until,
)
from flexnpu.snapshot import SnapshotSubscriber

pytestmark = pytest.mark.slow
REPS = 3


def _p_runs(ln: LoadedNode, base: int) -> bool:
    """P ran a whole step's worth of kernels since base (a held P slips one in now and then)."""
    return kernels(ln.node).get(ln.p.pid, 0) >= base + ln.p.k


def _check_running(ln: LoadedNode, t_fault: float, t_release: float, fig: Figures, what: str) -> None:
    """D and P step on (P from its release), no client erred, no work lost."""
    for e in (ln.d, ln.p):
        e.next(lambda s, t=t_fault: "step" in s and s["t0_ms"] / 1e3 > t, 5.0, f"a step after {what}")
    for e in ln.all:
        assert e.proc.poll() is None and e.error() is None, (e.name, e.lines[-2:])
    assert_work_kept(ln.node, ln.all)
    fig.add(f"longest stall of D, {what} -> +0.3 s", max_gap_after(ln.d, t_fault, now()))
    fig.add("longest stall of P once released", max_gap_after(ln.p, t_release, now()))


def test_controller_kill9_and_restart_under_load(acl_programs, tmp_path) -> None:
    fig = Figures("controller kill -9/restart")
    with loaded_node(tmp_path) as node:
        ln = LoadedNode(node, acl_programs["engine_loop"])
        d, p, m = ln.d, ln.p, ln.m
        for rep in range(REPS):
            assert ln.held(), f"rep {rep}: P and M not held before the kill"
            base = kernels(node)
            t_kill = now()
            node.kill("controller")
            t_rev = wait_until(lambda: (clients(node).get(p.pid) or {}).get("owner") is None and now(), 3.0,
                               "P's controller settings reverted by the lease")
            t_p = wait_until(lambda: _p_runs(ln, base[p.pid]) and now(), 3.0, "P running")
            fig.add("kill -> lease out, P's settings reverted", t_rev - t_kill)
            fig.add("kill -> P (held by priority) runs a step", t_p - t_kill)
            cs = clients(node)
            assert cs[d.pid]["owner"] is None and cs[d.pid]["priority"] == 0, cs[d.pid]
            assert cs[m.pid]["owner"] == "manual" and cs[m.pid]["gate"] == "closed"  # a person's hold stays
            time.sleep(0.3)
            _check_running(ln, t_kill, t_p, fig, "kill")
            assert kernels(node)[m.pid] == base[m.pid], "M ran while its manual gate was closed"

            t_start = now()
            node.restart("controller")
            t_up = now()
            t_set = wait_until(lambda: ln.controlled() and now(), 10.0, "flexpd's settings applied again")
            t_held = wait_until(lambda: ln.held(0.2) and now(), 10.0, "P held again")
            fig.add("restart -> controller socket bound", t_up - t_start)
            fig.add("restart -> flexpd's settings in force again", t_set - t_start)
            fig.add("restart -> P held again", t_held - t_start)
        ln.release_m()
        finish_exact(node, ln.all)
        assert node.log("daemon-0").count("the controller's lease ran out") >= REPS
    fig.emit()


def test_observer_kill9_and_restart_under_load(acl_programs, tmp_path) -> None:
    fig = Figures("observer kill -9/restart")
    with loaded_node(tmp_path) as node:
        ln = LoadedNode(node, acl_programs["engine_loop"])
        d, p = ln.d, ln.p
        reports = ReportWatcher(node)
        snaps = SnapshotSubscriber(node.rdir)
        try:
            for rep in range(REPS):
                assert ln.held(), f"rep {rep}: P and M not held before the kill"
                reports.drain()
                base = kernels(node)
                t_kill = now()
                node.kill("observe")
                t_stale = reports.wait(lambda r: r["observer"] == "stale", 5.0, '"observer": "stale"')
                t_open = wait_until(lambda: (clients(node).get(d.pid) or {}).get("priority") == 0 and now(), 3.0,
                                    "D's priority dropped (every gate open)")
                t_p = wait_until(lambda: _p_runs(ln, base[p.pid]) and now(), 3.0, "P running")
                fig.add('kill -> controller reports "stale"', t_stale - t_kill)
                fig.add("kill -> every gate open (D priority 0)", t_open - t_kill)
                fig.add("kill -> P (held by priority) runs a step", t_p - t_kill)
                time.sleep(0.3)
                _check_running(ln, t_kill, t_p, fig, "kill")

                while snaps.latest() is not None:  # what the dead observer left queued
                    pass
                reports.drain()
                t_start = now()
                node.restart("observe")
                t_up = now()
                got = snaps.recv(10.0)
                t_pub = now()
                assert got is not None, "the restarted observer published nothing in 10 s"
                t_ok = reports.wait(lambda r: r["observer"] == "ok", 10.0, '"observer": "ok"')
                t_set = wait_until(lambda: ln.controlled() and now(), 10.0, "flexpd's settings applied again")
                t_held = wait_until(lambda: ln.held(0.2) and now(), 10.0, "P held again")
                fig.add("restart -> observe.sock bound", t_up - t_start)
                fig.add("restart -> first snapshot published", t_pub - t_start)
                fig.add('restart -> controller reports "ok"', t_ok - t_start)
                fig.add("restart -> flexpd's settings in force again", t_set - t_start)
                fig.add("restart -> P held again", t_held - t_start)
        finally:
            reports.close()
            snaps.close()
        ln.release_m()
        finish_exact(node, ln.all)
    fig.emit()
