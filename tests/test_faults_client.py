"""Faults under load on the clients: a client killed with SIGKILL, and a held call whose
max_hold a person lowers.

A node runs flexpd over three clients, two of them held (tests/faults_fixtures.py:
LoadedNode). Killing D, the decode client P is held behind, must free D's slot and its
priority at once, so P goes on; the emulator drops D; flexpd steps aside (P alone with M,
whose role it does not know: every gate open, no budget). Killing M while its call is held
frees its slot and disturbs nobody. P loses no work. Repeated REPS times on one node.
"""

from __future__ import annotations

import os
import signal
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
    max_gap_after,
    now,
    wait_until,
)
from flexnpu.forward.api import DaemonClient

pytestmark = pytest.mark.slow
REPS = 3


def _emu_alive(node, pid: int) -> bool:
    """Whether the emulator still models pid (a dead one stays listed, alive false)."""
    return any(c["pid"] == pid and c["alive"] for c in node.emulator_status()["devices"][0]["clients"])


def test_client_kill9_under_load(acl_programs, tmp_path) -> None:
    fig = Figures("client kill -9")
    exe = acl_programs["engine_loop"]
    with loaded_node(tmp_path) as node:
        for rep in range(REPS):
            ln = LoadedNode(node, exe)
            d, p, m = ln.d, ln.p, ln.m
            assert ln.held(), f"rep {rep}: P and M not held before the kill"
            base = kernels(node)
            t_kill = now()
            os.kill(d.pid, signal.SIGKILL)
            t_slot = wait_until(lambda: d.pid not in clients(node) and now(), 3.0, "D's slot freed")
            t_p = wait_until(lambda: kernels(node).get(p.pid, 0) >= base[p.pid] + p.k and now(), 3.0, "P running")
            t_emu = wait_until(lambda: not _emu_alive(node, d.pid) and now(), 3.0, "D dropped by the emulator")
            t_ctl = wait_until(lambda: (c := clients(node).get(p.pid)) and c["inflight"] == 0 and now(), 5.0,
                               "flexpd stepping aside (P's budget 0)")
            assert d.proc.wait(5) == -signal.SIGKILL
            fig.add("kill D -> D's slot freed (daemon)", t_slot - t_kill)
            fig.add("kill D -> P (held behind D) runs a step", t_p - t_kill)
            fig.add("kill D -> D dropped by the emulator", t_emu - t_kill)
            fig.add("kill D -> flexpd steps aside (P's budget 0)", t_ctl - t_kill)
            time.sleep(0.3)
            p.next(lambda s: "step" in s and s["t0_ms"] / 1e3 > t_p, 5.0, "a step after its release")
            fig.add("longest stall of P once released", max_gap_after(p, t_p, now()))
            assert_work_kept(node, [p, m])
            assert kernels(node)[m.pid] == base[m.pid] and clients(node)[m.pid]["waiting"] == 1  # still held

            t_kill = now()
            os.kill(m.pid, signal.SIGKILL)  # killed inside a held call
            t_slot = wait_until(lambda: m.pid not in clients(node) and now(), 3.0, "M's slot freed")
            fig.add("kill M (held) -> its slot freed", t_slot - t_kill)
            assert m.proc.wait(5) == -signal.SIGKILL
            b = kernels(node)[p.pid]
            time.sleep(0.2)
            assert kernels(node)[p.pid] > b and p.error() is None
            finish_exact(node, [p])
            wait_until(lambda: clients(node) == {}, 5.0, "every slot freed")
    fig.emit()


def test_lowered_max_hold_bounds_a_call_already_held(acl_programs, tmp_path) -> None:
    """A person lowers the max hold of a client held by a closed gate with a long one: the
    call already held goes within the new bound (it kept the old one before the fix)."""
    fig = Figures("max hold lowered")
    with loaded_node(tmp_path) as node:
        ln = LoadedNode(node, acl_programs["engine_loop"])
        m = ln.m
        for _ in range(REPS):
            wait_until(lambda: clients(node)[m.pid]["waiting"] == 1, 5.0, "M held")
            time.sleep(0.3)  # held 0.3 s so far, with 60 s allowed
            base = kernels(node)[m.pid]
            t_set = now()
            with DaemonClient(0, node.rdir, timeout=5.0) as c:
                c.set(pid=m.pid, max_hold_ms=100.0)
            t_go = wait_until(lambda: kernels(node)[m.pid] > base and now(), 2.0, "M's held call going")
            fig.add("max hold 60 s -> 100 ms while held 0.3 s: call goes", t_go - t_set)
            with DaemonClient(0, node.rdir, timeout=5.0) as c:
                c.set(pid=m.pid, max_hold_ms=LONG_HOLD_MS)
        ln.release_m()
        finish_exact(node, ln.all)
    fig.emit()
