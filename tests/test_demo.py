"""`flexnpu demo --quick` runs to the end, and leaves nothing running (no process, no socket,
no temporary dir) at the end and when interrupted with SIGINT midway."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _demo(tmp: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, TMPDIR=str(tmp))
    return subprocess.Popen([sys.executable, "-m", "flexnpu.cli", "demo", "--quick", "--out", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _leftovers(tmp: Path) -> list[str]:
    """Processes that still refer to the demo's temporary dirs, and the dirs themselves."""
    left = [p.name for p in tmp.iterdir() if p.name != "out"]
    key = str(tmp).encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if key in (d / "environ").read_bytes() or key in (d / "cmdline").read_bytes():
                left.append(f"pid {d.name}: {(d / 'cmdline').read_bytes()[:120]!r}")
        except OSError:
            pass
    return left


def _wait_clean(tmp: Path, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := _leftovers(tmp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.mark.slow
def test_demo_quick_runs_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    p = _demo(tmp_path, out)
    o, e = p.communicate(timeout=600)
    assert p.returncode == 0, e[-3000:]
    assert "flexnpu top" in o and "targets" in o and (out / "pd.json").exists() and (out / "pd.png").exists()
    # it says how the live workload runs: forwarded where the forward build carries its --ops
    from flexnpu.bench import pd

    forwarded = pd.forward_refusal(pd.DEFAULT_OPS) is None
    assert ("mode: forwarded" if forwarded else "mode: gated") in o
    configs = set(json.loads((out / "pd.json").read_text())["results"][0]["configs"])
    assert ("flexnpu-forward" in configs) == forwarded and "flexnpu-gated" in configs
    assert _wait_clean(tmp_path) == []


@pytest.mark.slow
def test_demo_sigint_midway_cleans_up(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    p = _demo(tmp_path, out)
    # wait until the node runs (its runtime dir exists) and the workload is under way
    deadline = time.monotonic() + 60
    while not any(x.name.startswith("flexnpu-node-") for x in tmp_path.iterdir()):
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(2.0)
    p.send_signal(signal.SIGINT)
    o, e = p.communicate(timeout=60)
    assert p.returncode == 130, e[-3000:]
    assert "interrupted" in e
    assert _wait_clean(tmp_path) == []


def _wait_node(p: subprocess.Popen, tmp: Path) -> None:
    """Until the node runs (its runtime dir exists) and the workload is under way."""
    deadline = time.monotonic() + 60
    while not any(x.name.startswith("flexnpu-node-") for x in tmp.iterdir()):
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(2.0)


@pytest.mark.slow
def test_demo_sighup_midway_cleans_up(tmp_path):
    """The terminal closed or the ssh session dropped: stopped as by SIGTERM."""
    out = tmp_path / "out"
    out.mkdir()
    p = _demo(tmp_path, out)
    _wait_node(p, tmp_path)
    p.send_signal(signal.SIGHUP)
    o, e = p.communicate(timeout=60)
    assert p.returncode == 129, e[-3000:]
    assert "hung up (SIGHUP)" in e and "Traceback" not in e
    assert _wait_clean(tmp_path) == []


@pytest.mark.slow
def test_demo_killed_outright_leaves_nothing_running(tmp_path):
    """kill -9: no handler runs, and the node's guard stops the device server, daemon,
    observer, controller and workload, and removes the node's dir."""
    out = tmp_path / "out"
    out.mkdir()
    p = _demo(tmp_path, out)
    _wait_node(p, tmp_path)
    running = [x for x in _leftovers(tmp_path) if x.startswith("pid ")]
    assert any(b"emu-server" in x.encode() or "emu-server" in x for x in running), running
    p.kill()
    p.communicate(timeout=30)
    assert _wait_clean(tmp_path, timeout=20) == []
