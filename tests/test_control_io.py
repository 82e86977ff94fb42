"""`flexnpu controller` as a process, against real daemons, real clients under the shim (on
the emulator's real server) and real zmq sockets.

The observer is played by a publisher of hand-made snapshots on observe.sock (the snapshot is
a contract, flexnpu/snapshot.py): the test then knows exactly what the policy sees. Reports
are read both from controller.sock (zmq SUB) and from --json on stdout.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import zmq

from flexnpu import paths
from flexnpu.control.wire import ControllerReport
from test_daemon_fixtures import daemons, gate_loop, ready, send, wait_for  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parent.parent
LEASE_MS = 300.0
HEARTBEAT_MS = 100.0  # the daemon's watcher checks the lease each heartbeat
CONFIG = f"""
[controller]
policy = "flexpd"
tick_ms = 5
lease_ms = {LEASE_MS}
renew_ms = 50
rescan_ms = 200
list_ms = 50
report_ms = 200
"""


class ObserverStandIn:
    """Publishes a snapshot of `procs` every 50 ms on observe.sock, from its own thread (whose
    socket it is), until stop() (which also removes the socket file, as the observer does)."""

    def __init__(self, rdir: Path) -> None:
        self.path = paths.observe_socket(rdir)
        self.procs: list[dict] = []
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._bound.wait(10), "observer stand-in did not bind"

    def _run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"ipc://{self.path}")
        self._bound.set()
        seq = 0
        try:
            while not self._stop.wait(0.05):
                seq += 1
                sock.send(json.dumps({"schema": 1, "source": "shim", "seq": seq, "time": time.time(),
                                      "mono_ns": time.monotonic_ns(), "interval_s": 0.05, "devices": [],
                                      "processes": list(self.procs)}).encode())
        finally:
            sock.close(0)
            self.path.unlink(missing_ok=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def proc(pid: int, phase: str, step_ms: float, role: str) -> dict:
    return {"pid": pid, "device": 0, "comm": "gate_loop", "role": role, "phase": phase,
            "rates": {"launches_per_s": 500.0}, "iteration": {"mean_ms": step_ms}}


class ControllerProcess:
    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc = proc
        self.log = log
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def report(self, pred: Callable[[ControllerReport], bool] = lambda r: True, timeout: float = 15.0
               ) -> ControllerReport:
        """The first --json report (from now on) that satisfies pred."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no matching report in {timeout} s; log:\n{self.log_text()}") from None
            if line is None:
                raise AssertionError(f"controller exited {self.proc.wait(5)}:\n{self.log_text()}")
            rep = ControllerReport.from_json(line)
            if pred(rep):
                return rep

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture
def controller(runtime_dir: Path, tmp_path: Path) -> Iterator[Callable[..., ControllerProcess]]:
    """controller(*args, config=CONFIG) runs `flexnpu controller --json` from this source tree
    on the test's runtime dir. Teardown: SIGTERM, then SIGKILL."""
    started: list[ControllerProcess] = []

    def start(*args: str, config: str = CONFIG, env: dict | None = None) -> ControllerProcess:
        cfg = tmp_path / f"controller{len(started)}.toml"
        cfg.write_text(config)
        log = tmp_path / f"controller{len(started)}.log"
        env = {**os.environ, "FLEXNPU_RUNTIME_DIR": str(runtime_dir), "PYTHONPATH": str(REPO), **(env or {})}
        with open(log, "wb") as err:
            p = subprocess.Popen([sys.executable, "-m", "flexnpu.cli", "controller", "--json", "--config", str(cfg),
                                  *args], env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=err, text=True, bufsize=1)
        started.append(ControllerProcess(p, log))
        return started[-1]

    yield start
    for c in started:
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
            try:
                c.proc.wait(10)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(10)
        c.pump.join(5)
        c.proc.stdout.close()


@pytest.fixture
def observer(runtime_dir: Path) -> Iterator[Callable[[], ObserverStandIn]]:
    started: list[ObserverStandIn] = []

    def start() -> ObserverStandIn:
        started.append(ObserverStandIn(runtime_dir))
        return started[-1]

    yield start
    for o in started:
        o.stop()


@pytest.fixture
def pair(emulator, daemons, gate_loop):
    """A device 0 with its daemon and two registered clients: (daemon, decode pid, prefill pid)."""
    emulator()
    d = daemons(0)
    dec = gate_loop(0, 1, 1, "--seconds", "120", "--wait-stdin", "--quiet", role="decode")
    pre = gate_loop(0, 5, 1, "--seconds", "120", "--wait-stdin", "--quiet", role="prefill")
    ready(dec)
    ready(pre)
    d.wait_admitted(dec.pid)
    d.wait_admitted(pre.pid)
    return d, dec.pid, pre.pid


def controlled(d, dec: int, pre: int) -> bool:
    a, b = d.entry(dec), d.entry(pre)
    return bool(a and b and a["owner"] == "controller" and a["priority"] == 7 and b["owner"] == "controller"
                and b["priority"] == 0 and b["inflight"] >= 1)  # 1, or 2 once flexpd sees room (decode at its alone step)


def released(d, *pids: int) -> bool:
    es = [d.entry(p) for p in pids]
    return all(e and e["owner"] is None and e["gate"] == "open" and e["priority"] == 0 and e["inflight"] == 0
               for e in es)


def both(dec: int, pre: int) -> list[dict]:
    return [proc(dec, "decode", 2.0, "decode"), proc(pre, "prefill", 30.0, "prefill")]


def test_applies_settings_and_publishes_reports(pair, observer, controller, runtime_dir) -> None:
    d, dec, pre = pair
    obs = observer()
    obs.procs = both(dec, pre)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(f"ipc://{paths.controller_socket(runtime_dir)}")
    try:
        c = controller()
        rep = c.report(lambda r: bool(r.decisions))
        wait_for(lambda: controlled(d, dec, pre), 5, "the controller's settings in the daemon")
        assert rep.policy == "flexpd" and rep.observer == "ok"
        why = {x.pid: x.reason for x in rep.decisions}
        assert f"decode pid {dec}" in why[dec] and f"prefill pid {pre}" in why[pre], why
        assert rep.decisions[0].device == 0 and {x.setting.priority for x in rep.decisions} == {0, 7}
        dev = rep.devices[0]
        assert dev.device == 0 and dev.daemon == "ok" and dev.note.startswith("flexpd")
        assert {cs.pid: cs.owner for cs in dev.clients} == {dec: "controller", pre: "controller"}
        # the same reports on controller.sock; one at least every report_ms when nothing changes
        assert sub.poll(3000), "nothing published on controller.sock"
        first = ControllerReport.from_json(sub.recv())
        assert sub.poll(3000)
        second = ControllerReport.from_json(sub.recv())
        assert second.seq > first.seq and second.pid == c.proc.pid
        # joined after the decisions: they are in recent, numbered by decided
        assert second.decided is not None and second.decided >= len(rep.decisions)
        assert all(d in second.new_decisions(None)[0] for d in rep.decisions), (rep.decisions, second.recent)
    finally:
        sub.close(0)


def test_manual_setting_is_not_overwritten(pair, observer, controller) -> None:
    d, dec, pre = pair
    d.set(pre, gate="closed", priority=5)  # a person, `flexnpu gate set`
    assert d.entry(pre)["owner"] == "manual"
    obs = observer()
    obs.procs = both(dec, pre)
    c = controller()
    wait_for(lambda: (d.entry(dec) or {}).get("owner") == "controller", 5, "decode under the controller")
    time.sleep(0.5)  # many ticks and list reads
    e = d.entry(pre)
    assert e["owner"] == "manual" and e["gate"] == "closed" and e["priority"] == 5
    rep = c.report(lambda r: bool(r.devices and r.devices[0].clients))
    assert {cs.pid: cs.owner for cs in rep.devices[0].clients}[pre] == "manual"
    assert "Traceback" not in c.log_text()


def test_kill_9_leaves_gates_open_within_the_lease(pair, observer, controller) -> None:
    d, dec, pre = pair
    obs = observer()
    obs.procs = both(dec, pre)
    c = controller()
    wait_for(lambda: controlled(d, dec, pre), 10, "the controller's settings")
    c.proc.kill()
    t0 = time.monotonic()
    c.proc.wait(5)
    wait_for(lambda: released(d, dec, pre), 5, "gates open after the controller died", interval=0.01)
    took_ms = (time.monotonic() - t0) * 1e3
    # the last renewal was at most renew_ms before the kill; the watcher checks every heartbeat;
    # the margin is the list round trip on a loaded machine
    assert took_ms <= LEASE_MS + HEARTBEAT_MS + 150, f"gates open {took_ms:.0f} ms after kill -9"


def test_sigterm_releases_and_exits_0(pair, observer, controller) -> None:
    d, dec, pre = pair
    obs = observer()
    obs.procs = both(dec, pre)
    c = controller()
    wait_for(lambda: controlled(d, dec, pre), 10, "the controller's settings")
    t0 = time.monotonic()
    c.proc.send_signal(signal.SIGTERM)
    assert c.proc.wait(10) == 0, c.log_text()
    # released on the way out: open at once, and back to the defaults when the short lease ends
    wait_for(lambda: released(d, dec, pre), 2, "gates back to the defaults after SIGTERM", interval=0.01)
    assert time.monotonic() - t0 < 2
    assert "released 2 settings" in c.log_text()


def test_observer_absent_stale_and_back(pair, observer, controller) -> None:
    d, dec, pre = pair
    c = controller()
    rep = c.report(lambda r: r.observer == "absent" and bool(r.devices))
    assert rep.decisions == ()
    assert released(d, dec, pre)  # nothing set without snapshots
    obs = observer()
    obs.procs = both(dec, pre)
    wait_for(lambda: controlled(d, dec, pre), 10, "settings once the observer is there")
    obs.stop()
    rep = c.report(lambda r: r.observer == "stale" and bool(r.decisions), timeout=10)
    assert all("observer silent" in x.reason for x in rep.decisions), rep.decisions
    wait_for(lambda: all(d.entry(p)["gate"] == "open" and d.entry(p)["priority"] == 0
                         and d.entry(p)["inflight"] == 0 for p in (dec, pre)), 5, "every gate open")
    assert c.alive()
    obs2 = observer()
    obs2.procs = both(dec, pre)
    wait_for(lambda: controlled(d, dec, pre), 10, "settings again once the observer is back")
    assert c.alive()


def test_daemon_absent_then_back(emulator, daemons, gate_loop, observer, controller) -> None:
    emulator()
    obs = observer()
    c = controller()
    rep = c.report(lambda r: r.observer == "ok")
    assert rep.devices == ()  # no daemon socket: no device
    d = daemons(0)
    dec = gate_loop(0, 1, 1, "--seconds", "120", "--wait-stdin", "--quiet", role="decode")
    pre = gate_loop(0, 5, 1, "--seconds", "120", "--wait-stdin", "--quiet", role="prefill")
    ready(dec)
    ready(pre)
    obs.procs = both(dec.pid, pre.pid)
    wait_for(lambda: controlled(d, dec.pid, pre.pid), 10, "settings once the daemon is found")
    # the clients make calls from now on: a shim looks for a restarted daemon on its calls
    send(dec)
    send(pre)
    d.kill()  # kill -9: the socket file stays, nobody answers
    rep = c.report(lambda r: bool(r.devices) and r.devices[0].daemon == "absent", timeout=10)
    assert rep.devices[0].note  # why
    assert c.alive()
    d2 = daemons(0)  # adopts the segment and the live clients
    wait_for(lambda: d2.entry(dec.pid) and d2.entry(pre.pid), 10, "clients adopted")
    wait_for(lambda: controlled(d2, dec.pid, pre.pid), 10, "settings again once the daemon is back")
    rep = c.report(lambda r: bool(r.devices) and r.devices[0].daemon == "ok", timeout=10)
    assert c.alive()


def test_hung_daemon_holds_up_only_its_own_device(emulator, daemons, gate_loop, observer, controller) -> None:
    """A daemon that stops answering (SIGSTOP: its socket is there, nobody replies) is marked
    absent after the request timeout, while the controller keeps ticking for the other device:
    no report comes late by a timeout's worth."""
    emulator(devices=2)
    d0, d1 = daemons(0), daemons(1)
    dec = gate_loop(0, 1, 1, "--seconds", "120", "--wait-stdin", "--quiet", role="decode")
    pre = gate_loop(0, 5, 1, "--seconds", "120", "--wait-stdin", "--quiet", role="prefill")
    ready(dec)
    ready(pre)
    obs = observer()
    obs.procs = both(dec.pid, pre.pid)
    c = controller(config=CONFIG.replace("report_ms = 200", "report_ms = 20"))
    wait_for(lambda: controlled(d0, dec.pid, pre.pid), 10, "settings on device 0")
    c.report(lambda r: [d.daemon for d in r.devices] == ["ok", "ok"])
    os.kill(d1.pid, signal.SIGSTOP)
    try:
        stamps, states = [], set()
        t_end = time.monotonic() + 2.0  # several rescans (200 ms), each a request that times out (250 ms)
        while time.monotonic() < t_end:
            r = c.report()
            stamps.append(r.mono_ns)
            states.add(r.devices[1].daemon)
    finally:
        os.kill(d1.pid, signal.SIGCONT)
    assert "absent" in states, states
    gaps_ms = [(b - a) / 1e6 for a, b in zip(stamps, stamps[1:])]
    # report_ms 20: a tick that waited for the stopped daemon would leave a gap of 250 ms or more
    assert max(gaps_ms) < 150, f"longest gap between reports {max(gaps_ms):.0f} ms"
    assert controlled(d0, dec.pid, pre.pid)
    c.report(lambda r: r.devices[1].daemon == "ok", timeout=10)  # answered again once continued
    assert c.alive() and "Traceback" not in c.log_text()


def test_tells_systemd_it_is_ready(observer, controller, runtime_dir) -> None:
    """No daemon, no clients: it still starts, says READY=1 with a status, and stops with 0."""
    path = runtime_dir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(20)
        observer()
        c = controller(env={"NOTIFY_SOCKET": str(path)})
        msg = s.recv(4096).decode()
        assert "READY=1" in msg and "STATUS=policy flexpd" in msg, msg
        c.proc.send_signal(signal.SIGINT)
        assert c.proc.wait(30) == 0, c.log_text()  # generous: the node may be loaded by other work
        assert "STOPPING=1" in s.recv(4096).decode()


def test_smoke_under_timeout_int(runtime_dir: Path) -> None:
    """bcc's smoke habit: alone on a node (no observer, no daemon) it runs until SIGINT from
    `timeout -s INT`, and exits 0; --help exits 0."""
    env = {**os.environ, "FLEXNPU_RUNTIME_DIR": str(runtime_dir), "PYTHONPATH": str(REPO),
           "FLEXNPU_CONFIG": str(runtime_dir / "none.toml")}
    base = [sys.executable, "-m", "flexnpu.cli", "controller"]
    # 10 s: on two loaded cores the interpreter alone can take seconds to import the CLI
    r = subprocess.run(["timeout", "--preserve-status", "-s", "INT", "10", *base], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "policy flexpd" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(["timeout", "-s", "INT", "60", *base, "--help"], env=env, cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "Usage:" in r.stdout
