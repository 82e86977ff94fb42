"""A LocalNode's owner killed outright (kill -9): its guard stops every process the node
started, the device server in its own session included, and removes the node's dir; an owner
that stops the node itself leaves its guard nothing to do."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from flexnpu import paths
from flexnpu.bench.guard import start_time

REPO = Path(__file__).resolve().parent.parent

OWNER = """
import sys, time
from flexnpu.bench.node import LocalNode
node = LocalNode(devices=1, observer=None, daemons=False).start()
p = node.spawn(["sleep", "300"], shim=False)
print(node.rdir, node.emu_pid, p.pid, node._guard.pid, flush=True)
if sys.argv[1] == "stop":
    node.stop()
    print("stopped", flush=True)
time.sleep(300)
"""


def _owner(how: str) -> tuple[subprocess.Popen, Path, list[int], int]:
    p = subprocess.Popen([sys.executable, "-c", OWNER, how], stdout=subprocess.PIPE, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    rdir, emu, prog, guard = p.stdout.readline().split()
    return p, Path(rdir), [int(emu), int(prog)], int(guard)


def _gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [q for q in pids if start_time(q) is not None]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_owner_killed_outright(runtime_dir: Path) -> None:
    p, rdir, started, guard = _owner("kill")
    try:
        assert _gone(started, 0) == started and rdir.is_dir()
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        assert _gone([*started, guard], 15) == []
        assert not rdir.exists()
    finally:
        for q in (*started, guard):
            if start_time(q) is not None:
                os.kill(q, signal.SIGKILL)
        p.stdout.close()


def test_owner_that_stops_the_node_dismisses_its_guard(runtime_dir: Path) -> None:
    p, rdir, started, guard = _owner("stop")
    try:
        assert p.stdout.readline().strip() == "stopped"
        assert _gone([*started, guard], 5) == [] and not rdir.exists()
    finally:
        p.kill()
        p.wait(10)
        p.stdout.close()


@contextlib.contextmanager
def _serving(args: list[str], sock: Path, nohup: bool = False) -> Iterator[subprocess.Popen]:
    """`flexnpu ARGS` until sock exists (SIGHUP ignored on the way in with nohup, as `nohup`
    does); killed at the end if still running."""
    p = subprocess.Popen([sys.executable, "-m", "flexnpu.cli", *args], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if nohup else None)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else ""
            time.sleep(0.05)
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stderr.close()


OBSERVE = ["observe", "--source", "shim", "--interval-ms", "50"]


def test_hangup_stops_a_command_as_its_sigterm_does(runtime_dir: Path) -> None:
    """`flexnpu observe` (a service with a SIGTERM handler) on SIGHUP: exits 0 and removes its
    socket, as on SIGTERM, instead of dying with the socket left behind."""
    sock = paths.observe_socket(runtime_dir)
    with _serving(OBSERVE, sock) as p:
        p.send_signal(signal.SIGHUP)
        _, err = p.communicate(timeout=20)
        assert p.returncode == 0, err
        assert not sock.exists()


def test_hangup_ignored_on_the_way_in_stays_ignored(runtime_dir: Path) -> None:
    """Under nohup (SIGHUP ignored before exec) a hang-up does not stop the command."""
    sock = paths.observe_socket(runtime_dir)
    with _serving(OBSERVE, sock, nohup=True) as p:
        p.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert p.poll() is None and sock.exists()
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0


@pytest.mark.parametrize("nohup", [False, True], ids=["hangup", "nohup"])
def test_the_device_server_in_the_foreground_on_a_hangup(runtime_dir: Path, nohup: bool) -> None:
    """`flexnpu emu start --foreground` (the C server in the command's place) stops on SIGHUP
    and removes its socket, unless SIGHUP was ignored on the way in."""
    sock = paths.emulator_socket(runtime_dir)
    with _serving(["emu", "start", "--foreground", "--devices", "1"], sock, nohup) as p:
        p.send_signal(signal.SIGHUP)
        if nohup:
            time.sleep(1.0)
            assert p.poll() is None and sock.exists()
        else:
            assert p.wait(10) == 0 and not sock.exists()
