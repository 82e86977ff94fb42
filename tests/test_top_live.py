"""`flexnpu top` against real processes: the emulator, a forwarding daemon, the observer
(its shim source: no BPF needed) and gate_loop run under the shim. `--once` and `--json`
as a pipe reads them, nothing running, and the live screen in a real terminal (tmux), its
keys and the terminal restored after it. Every process and tmux server is ended at
teardown."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from test_daemon_fixtures import daemons, gate_loop, ready, wait_for  # noqa: F401  (fixtures by name)
from test_observe_fixtures import REPO, flexnpu_argv, flexnpu_proc  # noqa: F401

TIMEOUT_S = 60


def top(*args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """`flexnpu top ...` of this checkout with stdout a pipe (so it prints one frame)."""
    return subprocess.run(flexnpu_argv("top", *args), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "120"})


@pytest.fixture
def node(emulator, daemons, flexnpu_proc, gate_loop, acl_env) -> Callable[..., Any]:  # noqa: F811
    """node(observer=True): the emulator, device 0's daemon, optionally `flexnpu observe
    --source shim`, and one decode gate_loop under the shim; returns the workload."""

    def start(observer: bool = True) -> Any:
        emulator()
        daemons(0)
        if observer:
            obs = flexnpu_proc("observe", "--source", "shim", "--interval-ms", "100", "--json", env=acl_env)
            assert obs.read(timeout=60)["source"] == "shim"
        wl = gate_loop(0, 2.0, 2, "--seconds", "120", "--quiet", role="decode")
        ready(wl)
        return wl

    return start


def _pid_row(text: str, pid: int) -> str | None:
    return next((line for line in text.splitlines() if line.split()[:1] == [str(pid)]), None)


def test_once_and_json_show_the_client(node) -> None:
    wl = node()

    def decode_row() -> str | None:
        r = top("--once")
        assert r.returncode == 0, r.stderr
        row = _pid_row(r.stdout, wl.pid)
        return r.stdout if row and "decode" in row.split()[3:5] else None

    text = wait_for(decode_row, 30, f"top --once showing pid {wl.pid} in phase decode", interval=0.2)
    head = text.splitlines()[0]
    assert "source shim" in head and "observer ok" in head and "controller absent" in head
    assert "NPU 0" in text and "policy: none (no controller)" in text
    row = _pid_row(text, wl.pid)
    assert "gate_loop" in row and "open p0" in row

    r = top("--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["schema"] == 1 and data["observer"] == "ok" and data["controller"] == "absent"
    assert data["snapshot"]["source"] == "shim"
    assert any(p["pid"] == wl.pid for p in data["snapshot"]["processes"])
    (d0,) = data["daemons"]
    assert d0["device"] == 0 and d0["state"] == "ok"
    assert [c["pid"] for c in d0["clients"]] == [wl.pid]
    # two lists a few tens of ms apart: the time held at the gate has a rate (an open gate: 0)
    assert d0["clients"][0]["held_ms_per_s"] is not None


def test_daemons_only_without_an_observer(node) -> None:
    wl = node(observer=False)
    r = top("--once")
    assert r.returncode == 0, r.stderr
    assert "No observer: start one with `flexnpu observe` (as root)" in r.stdout
    row = _pid_row(r.stdout, wl.pid)
    assert row is not None and "gate_loop" in row and "N/A" in row


def test_nothing_running_exits_1_with_one_line(runtime_dir: Path) -> None:
    for args in (("--once",), ("--json",), ()):
        r = top(*args)
        assert r.returncode == 1
        assert r.stdout == ""
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("flexnpu top: nothing to show") and "flexnpu observe" in lines[0]


# ---------------------------------------------------------------- a real terminal


class Tmux:
    """A private tmux server (its own socket, in a temporary dir) with one 120x40 session."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fxtmux-"))
        self.socket = self.dir / "tmux.sock"
        self.session = "top"

    def tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-S", str(self.socket), *args], capture_output=True, text=True, timeout=10,
                              check=check, stdin=subprocess.DEVNULL)

    def start(self, command: str) -> None:
        self.tmux("-f", "/dev/null", "new-session", "-d", "-s", self.session, "-x", "120", "-y", "40", command)

    def screen(self) -> str:
        r = self.tmux("capture-pane", "-p", "-t", self.session, check=False)
        return r.stdout if r.returncode == 0 else ""

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.session, *keys)

    def alive(self) -> bool:
        return self.tmux("has-session", "-t", self.session, check=False).returncode == 0

    def kill(self) -> None:
        self.tmux("kill-server", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is needed for the terminal test (apt-get install tmux; scripts/setup.sh installs it)",
                    pytrace=False)
    t = Tmux()
    try:
        yield t
    finally:
        t.kill()


def test_live_screen_in_a_terminal(node, tmux: Tmux, runtime_dir: Path) -> None:
    wl = node()
    out = runtime_dir / "top-exit"
    argv = " ".join(shlex.quote(a) for a in flexnpu_argv("top", "--interval", "0.2"))
    # after top exits: its exit code and the terminal's modes, to see that cbreak was undone
    tmux.start(f"cd {shlex.quote(str(REPO))} && env FLEXNPU_RUNTIME_DIR={shlex.quote(str(runtime_dir))} {argv}; "
               f"echo rc=$? > {out}.tmp; stty -a >> {out}.tmp; mv {out}.tmp {out}")
    screen = wait_for(lambda: (s := tmux.screen()) and str(wl.pid) in s and "NPU 0" in s and s, 30,
                      "top's live screen showing the device panel and the client")
    assert "sort pid (s)" in screen and "prefill" in screen
    # drawn to the terminal's own size, whatever COLUMNS/LINES it inherited
    assert max(len(line) for line in screen.splitlines()) == 120
    tmux.keys("s")
    wait_for(lambda: "sort launches (s)" in tmux.screen(), 10, "the sort to change to launches/s")
    tmux.keys("p")
    wait_for(lambda: "PAUSED" in tmux.screen(), 10, "PAUSED on the screen")
    frozen = tmux.screen()
    time.sleep(0.6)  # three refreshes: a paused screen keeps its clock
    assert tmux.screen().splitlines()[0] == frozen.splitlines()[0]
    tmux.keys("p")
    wait_for(lambda: "PAUSED" not in tmux.screen(), 10, "PAUSED gone")
    tmux.keys("q")
    wait_for(lambda: out.exists(), 15, "top to exit on q")
    result = out.read_text()
    assert result.startswith("rc=0")
    modes = result.split()
    assert "icanon" in modes and "echo" in modes, result  # cbreak undone


def test_sigterm_restores_the_terminal(runtime_dir: Path, daemons, tmux: Tmux) -> None:  # noqa: F811
    daemons(0)
    out = runtime_dir / "top-exit"
    argv = " ".join(shlex.quote(a) for a in flexnpu_argv("top", "--interval", "0.2"))
    # the inner shell writes its pid and execs top, so top keeps the terminal as its stdin
    inner = f"echo $$ > {out}.pid; exec env FLEXNPU_RUNTIME_DIR={shlex.quote(str(runtime_dir))} {argv}"
    tmux.start(f"cd {shlex.quote(str(REPO))} && sh -c {shlex.quote(inner)}; "
               f"echo rc=$? > {out}.tmp; stty -a >> {out}.tmp; mv {out}.tmp {out}")
    wait_for(lambda: "NPU 0" in tmux.screen(), 30, "top's live screen")
    pid = int(Path(f"{out}.pid").read_text())
    os.kill(pid, 15)
    wait_for(lambda: out.exists(), 15, "top to exit on SIGTERM")
    modes = out.read_text().split()
    assert "icanon" in modes and "echo" in modes



def test_controller_policy_and_reasons_on_screen(acl_programs) -> None:
    """With the real controller (flexpd) deciding for a prefill and a decode client, `top`
    shows the policy in the device panel and a decision with its reason."""
    from flexnpu import paths
    from flexnpu.bench.node import LocalNode

    exe, klib = str(acl_programs["engine_loop"]), str(paths.emulator_kernel_library())
    with LocalNode(observer="shim", policy="flexpd") as n:
        dec = n.spawn([exe, klib, "0", "2", "1.0", "--seconds", "60", "--gap-ms", "2"], role="decode")
        pre = n.spawn([exe, klib, "0", "8", "1.0", "--seconds", "60"], role="prefill")
        env = {**os.environ, "COLUMNS": "120", "FLEXNPU_RUNTIME_DIR": str(n.rdir)}

        def shown() -> str | None:
            r = subprocess.run(flexnpu_argv("top", "--once"), capture_output=True, text=True, timeout=TIMEOUT_S,
                               cwd=REPO, stdin=subprocess.DEVNULL, env=env)
            assert r.returncode == 0, r.stderr
            ok = "flexpd" in r.stdout and f"prefill pid {pre.pid}" in r.stdout and _pid_row(r.stdout, dec.pid)
            return r.stdout if ok else None

        text = wait_for(shown, 30, "top to show flexpd's decisions")
        r = subprocess.run(flexnpu_argv("top", "--json"), capture_output=True, text=True, timeout=TIMEOUT_S,
                           cwd=REPO, stdin=subprocess.DEVNULL, env=env)
    assert "priority 7" in text or "priority 0" in text, text
    data = json.loads(r.stdout)
    assert data["schema"] == 1
    assert data["controller"] == "ok" and data["controller_report"]["policy"] == "flexpd"
    assert any(f"prefill pid {pre.pid}" in d["reason"] for d in data["decisions"]), data["decisions"]
