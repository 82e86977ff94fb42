"""Fault under load: the forwarding daemon killed with SIGKILL, then restarted.

A node runs flexpd over three clients, two of them held (tests/faults_fixtures.py:
LoadedNode). Killing the daemon must release the held clients at once (their admission
connection hangs up), lose no client work and stall no client; the restarted daemon must
adopt every live client with its settings (the manual gate closed again, flexpd's settings
kept), the controller must find it and renew its settings, and the held clients must be
held again. Repeated REPS times on one node; the times go to docs/reliability.md.
"""

from __future__ import annotations

import time

import pytest

from faults_fixtures import (
    LONG_HOLD_MS,
    Figures,
    LoadedNode,
    assert_work_kept,
    clients,
    finish_exact,
    kernels,
    loaded_node,
    log_count,
    max_gap_after,
    now,
    ran_since,
    wait_until,
)

pytestmark = pytest.mark.slow
REPS = 3
DOWN_S = 1.5  # how long the node runs without a daemon before the restart


def _adopted(ln: LoadedNode) -> bool:
    cs = clients(ln.node, timeout=1.0)
    d, p, m = (cs.get(e.pid) for e in ln.all)
    return bool(d and p and m and m["owner"] == "manual" and m["gate"] == "closed"
                and m["max_hold_ms"] == LONG_HOLD_MS and d["priority"] == 7 and p["priority"] == 0
                and d["owner"] == p["owner"] == "controller"
                and all(cs[e.pid]["admitted_pid"] == e.pid for e in ln.all))


def test_daemon_kill9_and_restart_under_load(acl_programs, tmp_path) -> None:
    fig = Figures("daemon kill -9/restart")
    with loaded_node(tmp_path) as node:
        ln = LoadedNode(node, acl_programs["engine_loop"])
        d, p, m = ln.d, ln.p, ln.m
        for rep in range(REPS):
            assert ln.held(), f"rep {rep}: P and M not held before the kill"
            slots = {pid: c["slot"] for pid, c in clients(node).items()}
            base = kernels(node)
            t_kill = now()
            node.kill("daemon-0")
            t_m = wait_until(lambda: ran_since(node, m.pid, base[m.pid]) and now(), 2.0, "M released")
            t_p = wait_until(lambda: ran_since(node, p.pid, base[p.pid]) and now(), 2.0, "P released")
            fig.add("kill -> M (gate closed) runs", t_m - t_kill)
            fig.add("kill -> P (held by priority) runs", t_p - t_kill)
            # without a daemon every client goes on: a step of each ends, none errs
            for e in ln.all:
                e.next(lambda s, t=t_kill: "step" in s and s["t0_ms"] / 1e3 > t, 5.0, "a step after the kill")
            time.sleep(max(0.0, t_kill + DOWN_S - now()))
            assert_work_kept(node, ln.all)
            for e in ln.all:
                fig.add("longest stall of a client, kill -> +1.5 s", max_gap_after(e, t_kill, now()))

            answers = log_count(node, "controller", "daemon answers")
            t_start = now()
            node.restart("daemon-0")
            t_up = now()
            t_adopt = wait_until(lambda: _adopted(ln) and now(), 10.0, "every live client adopted with its settings")
            assert {pid: c["slot"] for pid, c in clients(node).items()} == slots  # the same slots
            t_ctl = wait_until(lambda: log_count(node, "controller", "daemon answers") > answers and now(), 10.0,
                               "the controller to find the new daemon")
            wait_until(lambda: (clients(node).get(m.pid) or {}).get("waiting") == 1, 10.0, "M held again")
            t_held = wait_until(lambda: ln.held(0.2) and now(), 10.0, "P and M held again")
            fig.add("restart -> daemon answers", t_up - t_start)
            fig.add("restart -> 3 clients re-admitted, settings kept", t_adopt - t_start)
            fig.add("restart -> controller uses the new daemon", t_ctl - t_start)
            fig.add("restart -> P and M held again", t_held - t_start)
            for e in ln.all:
                assert e.proc.poll() is None and e.error() is None, (e.name, e.lines[-2:])
            assert_work_kept(node, ln.all)
        ln.release_m()
        finish_exact(node, ln.all)
        assert "re-admitted pid" in node.log("daemon-0")
    fig.emit()
