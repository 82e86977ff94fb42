"""Helpers for the fault tests under load (tests/test_faults_*.py): a whole node
(`flexnpu.bench.node.LocalNode`: the emulator, a daemon, the observer, the flexpd
controller) with engine-shaped clients running, two of them held, and the checks every
fault must pass: no client hangs, no client work lost, held clients released, and each
part back with its settings once restarted.

The emulator's per-process kernel counts are the ground truth for work. Each figure a test
measures is printed and, when FLEXNPU_FAULTS_OUT names a file, appended to it as a JSON
line (docs/reliability.md is written from those lines).
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from flexnpu import paths
from flexnpu.bench.node import LocalNode, machine
from flexnpu.forward.api import DaemonClient, DaemonError
from test_daemon_fixtures import wait_for

KLIB = str(paths.emulator_kernel_library())
LONG_HOLD_MS = 60_000  # a held client goes only when something releases it, never by its max_hold
POLL_S = 0.002  # resolution of the figures (each poll is one emulator status or daemon list)
RUN_CAP_S = 300  # a client's --seconds: a safety cap only; tests stop them with a line on stdin
GRACE_MS = 5.0
FLEXPD_HOLD = f"[policy.flexpd]\nprefill_max_hold_ms = {LONG_HOLD_MS}\n"


def now() -> float:
    return time.monotonic()


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = POLL_S) -> Any:
    """test_daemon_fixtures.wait_for, polling at the figures' resolution."""
    return wait_for(pred, timeout, what, interval)


class Engine:
    """One `engine_loop --until-stdin` under the shim on a node: K kernels of MS ms a step,
    a GAP ms pause. A thread reads its JSON lines as they come, so a full pipe never stalls
    it and every read has a timeout."""

    def __init__(self, node: LocalNode, exe: Path, role: str, k: int, ms: float, gap_ms: float = 0.0,
                 name: str = "") -> None:
        self.name = name or role
        self.k, self.ms = k, ms
        self.proc = node.spawn([str(exe), KLIB, "0", str(k), str(ms), "--seconds", str(RUN_CAP_S),
                                "--gap-ms", str(gap_ms), "--until-stdin"], role=role, stdin=subprocess.PIPE)
        self.lines: list[dict] = []
        self._new: queue.Queue[dict | None] = queue.Queue()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()
        ready = self.next(lambda d: d.get("ready"), 30, "ready")
        self.pid = ready["pid"]

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                d = json.loads(line)
                d["_at"] = now()
                self.lines.append(d)
                self._new.put(d)
        self._new.put(None)

    def next(self, pred: Callable[[dict], Any], timeout: float, what: str) -> dict:
        deadline = now() + timeout
        while True:
            try:
                d = self._new.get(timeout=max(0.0, deadline - now()))
            except queue.Empty:
                raise AssertionError(f"{self.name} (pid {self.proc.pid}) did not print {what} in {timeout:g} s; "
                                     f"last lines {self.lines[-3:]}") from None
            if d is None:
                self.proc.wait(5)
                raise AssertionError(f"{self.name} exited {self.proc.returncode} before {what}: "
                                     f"{self.lines[-3:]} {self.proc.stderr.read()}")
            if pred(d):
                return d

    def steps(self) -> list[dict]:
        return [d for d in self.lines if "step" in d]

    def steps_done_by(self, t: float) -> int:
        """Steps this client synchronised before monotonic time t (by its own clock)."""
        return sum(1 for s in self.steps() if (s["t0_ms"] + s["step_ms"]) / 1e3 < t)

    def stop_loop(self, timeout: float = 30.0) -> dict:
        """Ends the loop at its next step end; the process stays alive (see finish)."""
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        return self.next(lambda d: d.get("done"), timeout, "done")

    def finish(self, timeout: float = 30.0) -> int:
        self.proc.stdin.write("exit\n")
        self.proc.stdin.close()
        rc = self.proc.wait(timeout)
        self._pump.join(5)
        return rc

    def error(self) -> dict | None:
        return next((d for d in self.lines if d.get("ok") is False), None)


def kernels(node: LocalNode) -> dict[int, int]:
    """Kernels the emulator ran per client process (ground truth)."""
    return {c["pid"]: c["ops"]["kernel"] for c in node.emulator_status()["devices"][0]["clients"]}


def clients(node: LocalNode, timeout: float = 2.0) -> dict[int, dict]:
    """The daemon's client list by pid ({} while no daemon answers)."""
    try:
        with DaemonClient(0, node.rdir, timeout=timeout) as c:
            return {x.pid: dict(x.raw) for x in c.list()}
    except DaemonError:
        return {}


def gate_set_cli(node: LocalNode, pid: int, *args: str) -> None:
    """`flexnpu gate set PID ...` as a person types it."""
    r = subprocess.run([sys.executable, "-m", "flexnpu.cli", "gate", "set", str(pid), *args], env=node.base_env(),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def ran_since(node: LocalNode, pid: int, base: int) -> bool:
    return kernels(node).get(pid, 0) > base


def assert_work_kept(node: LocalNode, engines: list[Engine]) -> None:
    """Every step a client synchronised before a status of the emulator is in its counts, and
    at most the one step in flight past them (plus the warm-up kernel)."""
    t = now()
    got = kernels(node)
    for e in engines:
        if e.proc.poll() is not None:
            continue
        done = e.steps_done_by(t)
        assert got.get(e.pid, 0) >= 1 + done * e.k, (e.name, got.get(e.pid), done, e.k)


def finish_exact(node: LocalNode, engines: list[Engine]) -> None:
    """Stops every client's loop and checks, while each still lives, that the emulator ran
    exactly its warm-up kernel and K per step it reported: no work lost, none doubled."""
    for e in engines:
        e.stop_loop()
    got = kernels(node)
    for e in engines:
        n = len(e.steps())
        assert got.get(e.pid) == 1 + n * e.k, f"{e.name}: emulator ran {got.get(e.pid)} kernels, " \
                                             f"the client synced {n} steps of {e.k} (+1 warm-up)"
    for e in engines:
        assert e.finish() == 0, (e.name, e.proc.stderr.read())


def max_gap_after(e: Engine, t: float, end: float) -> float:
    """Longest time (s) between t and end without a step end of e: its worst stall."""
    ends = sorted((s["t0_ms"] + s["step_ms"]) / 1e3 for s in e.steps())
    marks = [t] + [x for x in ends if t < x < end] + [end]
    return max(b - a for a, b in zip(marks, marks[1:]))


# ---------------------------------------------------------------- the loaded node


class LoadedNode:
    """A node with flexpd controlling three clients on device 0:
    D, decode, busy without pause (priority 7: its work is pending nearly always);
    P, prefill, held behind D by flexpd's priority (max hold 60 s);
    M, whose gate a person closed with `flexnpu gate set M --gate closed` (max hold 60 s)."""

    def __init__(self, node: LocalNode, exe: Path, m_hold_ms: float = LONG_HOLD_MS) -> None:
        self.node = node
        self.m_hold_ms = m_hold_ms
        self.d = Engine(node, exe, "decode", 2, 2.0, name="D")
        self.p = Engine(node, exe, "prefill", 4, 2.0, name="P")
        self.m = Engine(node, exe, "auto", 2, 2.0, gap_ms=5.0, name="M")
        self.all = [self.d, self.p, self.m]
        gate_set_cli(node, self.m.pid, "--gate", "closed", "--max-hold-ms", f"{m_hold_ms:g}")
        wait_until(self.controlled, 30, "flexpd's settings and M's manual gate in force", 0.02)
        wait_until(lambda: clients(node)[self.m.pid]["waiting"] == 1, 15, "M held by its closed gate", 0.02)

    def controlled(self) -> bool:
        cs = clients(self.node)
        d, p, m = (cs.get(e.pid) for e in self.all)
        return bool(d and p and m and d["owner"] == p["owner"] == "controller" and d["priority"] == 7
                    and p["priority"] == 0 and p["max_hold_ms"] == LONG_HOLD_MS and m["owner"] == "manual"
                    and m["gate"] == "closed" and m["max_hold_ms"] == self.m_hold_ms)

    def held(self, window: float = 0.3) -> bool:
        """P and M ran nothing (or P a sliver) while D ran, over window seconds."""
        a = kernels(self.node)
        time.sleep(window)
        b = kernels(self.node)
        d_ran = b[self.d.pid] - a[self.d.pid]
        return b[self.m.pid] == a[self.m.pid] and d_ran > 0 and (b[self.p.pid] - a[self.p.pid]) * 4 < d_ran

    def release_m(self) -> None:
        with DaemonClient(0, self.node.rdir, timeout=5.0) as c:
            c.release(pid=self.m.pid)


def loaded_node(tmp_path: Path, **kw: Any) -> LocalNode:
    cfg = tmp_path / "flexnpu.toml"
    cfg.write_text(FLEXPD_HOLD)
    # a 5 ms grace (default 1): D's few microseconds between a sync and its next step can
    # stretch past 1 ms on two loaded cores, and P would slip a kernel in
    return LocalNode(observer="shim", observe_interval_ms=50, policy="flexpd",
                     controller_args=["--tick-ms", "5", "--config", str(cfg)],
                     daemon_args=["--pending-grace-ms", str(GRACE_MS)], **kw)


# ---------------------------------------------------------------- figures


class Figures:
    """Times measured by one test, by name (seconds); printed and appended to
    $FLEXNPU_FAULTS_OUT as JSON lines: {"fault", "what", "p50_ms", "max_ms", "n", ...}."""

    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.values: dict[str, list[float]] = {}

    def add(self, what: str, seconds: float) -> None:
        self.values.setdefault(what, []).append(seconds)

    def emit(self) -> None:
        out = os.environ.get("FLEXNPU_FAULTS_OUT")
        m = machine()
        for what, xs in self.values.items():
            row = {"fault": self.fault, "what": what, "n": len(xs), "p50_ms": round(statistics.median(xs) * 1e3, 1),
                   "max_ms": round(max(xs) * 1e3, 1), "all_ms": [round(x * 1e3, 1) for x in xs], "machine": m}
            print(f"{self.fault:<22} {what:<48} p50 {row['p50_ms']:8.1f} ms  max {row['max_ms']:8.1f} ms  (n={len(xs)})")
            if out:
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")


class ReportWatcher:
    """Subscribes to the controller's reports (controller.sock) and waits for one that
    satisfies a predicate. zmq reconnects by itself when the controller restarts."""

    def __init__(self, node: LocalNode) -> None:
        import zmq

        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 20)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 100)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(f"ipc://{paths.controller_socket(node.rdir)}")

    def wait(self, pred: Callable[[dict], Any], timeout: float, what: str) -> float:
        """Monotonic time at which a report satisfying pred arrived."""
        deadline = now() + timeout
        while now() < deadline:
            if self.sock.poll(int(max(0.0, deadline - now()) * 1000) or 1):
                rep = json.loads(self.sock.recv())
                if pred(rep):
                    return now()
        raise AssertionError(f"no controller report with {what} within {timeout:g} s")

    def drain(self) -> None:
        while self.sock.poll(0):
            self.sock.recv()

    def close(self) -> None:
        self.sock.close(0)


def log_count(node: LocalNode, name: str, text: str) -> int:
    return node.log(name).count(text)
