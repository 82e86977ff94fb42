"""Fixtures shared by the forwarding-daemon and dispatch-gate tests (test_daemon_*.py,
test_gate_*.py): real `flexnpu daemon` processes, the gate_loop workload run under the shim
with `flexnpu run`, and polling helpers. It holds no tests; the test modules import what
they use (fixtures included) from here.

Every daemon a test starts is stopped at teardown (SIGTERM, then SIGKILL), whatever the
test did; workloads are started through conftest's `spawn`, which kills and reaps them.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from flexnpu import paths
from flexnpu.bench.node import NodeError, stop_process
from flexnpu.bench.node import wait_for as node_wait_for
from flexnpu.forward.api import DaemonClient, DaemonError

FLEXNPU = str(Path(sys.executable).with_name("flexnpu"))
KLIB = str(paths.emulator_kernel_library())
START_TIMEOUT = 30.0  # a daemon is a Python process; two loaded cores can make it slow to start


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """flexnpu.bench.node.wait_for, failing the test (AssertionError) after timeout seconds."""
    try:
        return node_wait_for(pred, timeout, what, interval)
    except NodeError as e:
        raise AssertionError(str(e)) from None


class DaemonProcess:
    """A `flexnpu daemon --device N` process of one test, with a control-API client."""

    def __init__(self, device: int, rdir: Path, proc: subprocess.Popen, log: Path):
        self.device = device
        self.rdir = rdir
        self.proc = proc
        self.log_path = log
        self.client = DaemonClient(device, rdir, timeout=10.0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def socket(self) -> Path:
        return paths.daemon_socket(self.device, self.rdir)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode} while starting:\n{self.log()}")
            if self.socket.exists():
                try:
                    reply = self.client.ping()
                    if reply["pid"] == self.pid:
                        return reply
                except DaemonError:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not ready after {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def list(self) -> list[dict]:
        """The `list` reply's client records as sent (the wire; tests/test_daemon_api.py
        covers the typed view)."""
        return [dict(v.raw) for v in self.client.list()]

    def entry(self, pid: int) -> dict | None:
        """The `list` record of client pid, or None if it is not registered."""
        return next((c for c in self.list() if c["pid"] == pid), None)

    def set(self, pid: int, **settings: Any) -> dict:
        return dict(self.client.set(pid, **settings).raw)

    def wait_admitted(self, pid: int, timeout: float = 15.0) -> dict:
        return wait_for(lambda: self.entry(pid), timeout, f"pid {pid} admitted by the daemon")

    def wait_exit(self, timeout: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon pid {self.pid} still running after {timeout} s:\n{self.log()}") from None

    def kill(self) -> None:
        """kill -9: no clean-up at all, as a crash."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.client.close()
        stop_process(self.proc, 10)


@pytest.fixture
def daemons(runtime_dir: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Factory: daemons(device=0, *cli_args, env=None, ready=True, umask=-1) starts a real
    `flexnpu daemon --device N` on this test's runtime dir and (unless ready=False) waits
    until it answers ping. Teardown stops every one of them."""
    started: list[DaemonProcess] = []

    def start(device: int = 0, *args: str, env: dict | None = None, ready: bool = True,
              umask: int = -1) -> DaemonProcess:
        log = runtime_dir / f"daemon-{device}.{len(started)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([FLEXNPU, "daemon", "--device", str(device), *args],
                                    env=env or dict(os.environ), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, umask=umask)
        d = DaemonProcess(device, runtime_dir, proc, log)
        started.append(d)
        if ready:
            d.wait_ready()
        return d

    yield start
    for d in started:
        d.stop()


# ---------------------------------------------------------------- workloads


@pytest.fixture
def gate_loop(acl_programs: dict[str, Path], spawn: Callable) -> Callable[..., Any]:
    """Factory: gate_loop(iters, ms, k, *options, device=0, role="auto") runs
    tests/progs/gate_loop.c under the shim (`flexnpu run`) and returns conftest's
    Interactive for it. Its pid is the program's (flexnpu run execs it)."""
    exe = acl_programs["gate_loop"]

    def start(iters: int, ms: float, k: int, *options: str, device: int = 0, role: str = "auto",
              env: dict | None = None):
        return spawn([FLEXNPU, "run", "--role", role, "--", exe, KLIB, device, iters, ms, k, *options], env=env)

    return start


def send(client, line: str = "go") -> None:
    """Writes one line to a workload's stdin (the go / end signal of gate_loop)."""
    client.proc.stdin.write(line + "\n")
    client.proc.stdin.flush()


def ready(client, timeout: float = 30.0) -> dict:
    """Reads gate_loop's ready line; it is printed once the device is selected, so the shim
    has claimed its slot by then."""
    r = client.read(timeout)
    assert r.get("ready") and r["pid"] == client.pid, r
    return r


def finish(client, timeout: float) -> tuple[int, list[dict]]:
    """Reads a workload's remaining output up to EOF and reaps it; fails after timeout s."""
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            line = client.lines.get(timeout=max(0.01, left))
        except queue.Empty:
            raise AssertionError(f"pid {client.pid} still running after {timeout} s; said {out[-3:]}") from None
        if line is None:
            break
        out.append(json.loads(line))
    return client.proc.wait(timeout=10), out


def finish_listed(client, daemon, timeout: float) -> tuple[int, list[dict], dict | None]:
    """For a workload run with --wait-end: reads its output up to the "done" line, takes its
    `list` record while it is still a client (its slot is freed the moment it exits), then
    lets it end and reaps it."""
    out: list[dict] = []
    deadline = time.monotonic() + timeout
    while not (out and out[-1].get("done")):
        try:
            line = client.lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"pid {client.pid} not done after {timeout} s; said {out[-3:]}") from None
        if line is None:
            break
        out.append(json.loads(line))
    entry = daemon.entry(client.pid)
    send(client, "end")
    rc, rest = finish(client, timeout)
    return rc, out + rest, entry


def no_output(client) -> bool:
    """True if the workload printed nothing since it was last read."""
    return client.lines.empty()


def busy_ns(emu, pid: int, device: int = 0) -> int:
    """The emulator's own count of device time spent on pid's work."""
    return int(emu.client(pid, device)["busy_ns"])


def gate_list_cli(device: int = 0) -> dict:
    """`flexnpu gate list --json`, run as the CLI."""
    r = subprocess.run([FLEXNPU, "gate", "list", "--device", str(device), "--json"], capture_output=True,
                       text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply["schema"] == 1 and reply["ok"] is True
    return reply


GATE_CLIENT = Path(__file__).resolve().parent / "progs" / "gate_client.py"


def gate_client(rdir: Path, device: int = 0, *args: str, user: str | None = None, hold: float = 300,
                env: dict | None = None) -> tuple[subprocess.Popen, dict]:
    """Starts tests/progs/gate_client.py (as `user` if given, through setpriv with that user's
    groups): a process that asks to be admitted and, if it is, holds its slot until its stdin
    closes. Returns the process and its answer."""
    argv = [sys.executable, str(GATE_CLIENT), str(rdir), str(device), "--hold", str(hold), *args]
    if user:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env or dict(os.environ))
    line = p.stdout.readline()
    if not line:
        p.kill()
        raise AssertionError(f"gate_client said nothing: {p.stderr.read()}")
    return p, json.loads(line)


def end_client(p: subprocess.Popen) -> None:
    """Ends a gate_client (closes its stdin) and reaps it."""
    try:
        p.stdin.close()
    except OSError:
        pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=10)
