"""Fault under load: the emulated device's server killed with SIGKILL.

A node runs flexpd over three clients, two of them held (tests/faults_fixtures.py:
LoadedNode). With the device gone no client can make progress, so each must end with the
runtime's error, within a bound: D and P (P is held behind D, and released when D's slot
goes) at once; M, held by a gate a person closed, when its hold ends (its `max_hold`; the
shim does not ask the runtime while it holds a call). Every step a client synchronised
before the last status of the device is in its counts; the daemon, the observer and the
controller stay up, every slot is freed, and a device server started again serves new
clients under the same daemon. Repeated REPS times on one node.
"""

from __future__ import annotations

import pytest

from faults_fixtures import (
    Engine,
    Figures,
    LoadedNode,
    clients,
    finish_exact,
    kernels,
    loaded_node,
    now,
    wait_until,
)

pytestmark = pytest.mark.slow
REPS = 3
M_HOLD_MS = 1000.0  # M's max hold for this test: the bound on how long it can stay held


def _exits(engines: list[Engine], timeout: float) -> dict[str, float]:
    """Monotonic time at which each process exited."""
    left = {e.name: e for e in engines}
    out: dict[str, float] = {}
    deadline = now() + timeout
    while left and now() < deadline:
        for name, e in list(left.items()):
            if e.proc.poll() is not None:
                out[name] = now()
                del left[name]
    assert not left, f"still running {timeout:g} s after the device server's kill: {sorted(left)}"
    return out


def test_device_server_kill9_under_load(acl_programs, tmp_path) -> None:
    fig = Figures("device server kill -9")
    exe = acl_programs["engine_loop"]
    with loaded_node(tmp_path) as node:
        for rep in range(REPS):
            ln = LoadedNode(node, exe, m_hold_ms=M_HOLD_MS)
            assert ln.held(0.2), f"rep {rep}: P and M not held before the kill"
            t_status = now()
            counts = kernels(node)
            t_kill = now()
            node.kill_emulator()
            t_gone = now()
            ended = _exits(ln.all, 10.0 + M_HOLD_MS / 1e3)
            for e in ln.all:
                e._pump.join(5)
                err = e.error()
                assert e.proc.returncode == 1 and err is not None, (e.name, e.proc.returncode, e.lines[-2:])
                # the work it synchronised while the device lived was done
                assert counts[e.pid] >= 1 + e.steps_done_by(t_status) * e.k, (e.name, counts[e.pid])
            fig.add("kill -> server gone", t_gone - t_kill)
            fig.add("kill -> D (decode, running) exits with the error", ended["D"] - t_kill)
            fig.add("kill -> P (held by priority) exits with the error", ended["P"] - t_kill)
            fig.add(f"kill -> M (gate closed, max hold {M_HOLD_MS:g} ms) exits", ended["M"] - t_kill)
            assert ended["M"] - t_kill < M_HOLD_MS / 1e3 + 1.0
            t_free = wait_until(lambda: clients(node) == {} and now(), 5.0, "every slot freed")
            fig.add("kill -> every slot freed", t_free - t_kill)
            for name in ("daemon-0", "observe", "controller"):
                assert node.services[name].poll() is None, f"{name} died with the device server:\n{node.log(name)}"

            t_start = now()
            node.restart("emu")
            fig.add("restart -> device server ready", now() - t_start)
        # the same daemon, observer and controller serve clients of the new server
        ln = LoadedNode(node, exe)
        assert ln.held()
        ln.release_m()
        finish_exact(node, ln.all)
    fig.emit()
