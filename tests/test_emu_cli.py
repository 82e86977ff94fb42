"""`flexnpu emu start/status/stop/env` through the real CLI, in real processes under
`timeout -s INT` (bcc's smoke-test habit), reading exit codes and output."""

from __future__ import annotations

import os
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import track_server, wait_gone
from flexnpu.emulator import control


def flexnpu_cli() -> str:
    exe = Path(sys.executable).parent / "flexnpu"
    found = str(exe) if exe.exists() else shutil.which("flexnpu")
    if not found:
        pytest.fail("the flexnpu command is not installed (pip install .)", pytrace=False)
    return found


@pytest.fixture
def cli(runtime_dir):
    """cli("emu", "status", "--json") runs the installed `flexnpu` against this test's runtime
    dir; any server it started is stopped at teardown."""

    def run(*args: str, timeout: int = 30) -> subprocess.CompletedProcess:
        r = subprocess.run(["timeout", "-s", "INT", str(timeout), flexnpu_cli(), *args], capture_output=True,
                           text=True, stdin=subprocess.DEVNULL, timeout=timeout + 10)
        assert r.returncode != 124, f"flexnpu {' '.join(args)} timed out"
        pidfile = runtime_dir / "emu.pid"
        if pidfile.exists():
            track_server(int(pidfile.read_text()))
        return r

    yield run
    pidfile = runtime_dir / "emu.pid"
    pid = int(pidfile.read_text()) if pidfile.exists() else None
    control.stop(runtime_dir)
    if pid is not None:
        assert wait_gone(pid), f"server {pid} still running"


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}: {text!r}"
    return lines[0]


def test_start_status_stop(cli, runtime_dir, run_acl, workload):
    r = cli("emu", "start", "--devices", "2", "--mode", "serial,shared", "--time-scale", "1.5")
    assert r.returncode == 0, r.stderr
    assert one_line(r.stdout).startswith("emulator started: pid ")
    pid = int((runtime_dir / "emu.pid").read_text())
    assert f"pid {pid}," in r.stdout

    again = cli("emu", "start", "--devices", "1")
    assert again.returncode == 1
    assert "already running" in one_line(again.stderr) and "flexnpu emu stop" in again.stderr

    out = run_acl([workload, "copyback", 10000])
    text = cli("emu", "status")
    assert text.returncode == 0, text.stderr
    assert "device 0" in text.stdout and "device 1" in text.stdout and str(out["pid"]) in text.stdout

    js = cli("emu", "status", "--json")
    assert js.returncode == 0, js.stderr
    st = json.loads(js.stdout)
    assert st["schema"] == 1 and st["running"] is True and st["pid"] == pid
    assert [d["mode"] for d in st["devices"]] == ["serial", "shared"]
    assert {d["params"]["time_scale"] for d in st["devices"]} == {1.5}
    assert st["devices"][0]["clients"][0]["bytes_copied"]["h2d"] == 10000

    env = cli("emu", "env")
    assert env.returncode == 0
    assert f"export FLEXNPU_RUNTIME_DIR={runtime_dir}" in env.stdout
    assert "export LD_LIBRARY_PATH=" in env.stdout and "export FLEXNPU_EMU_KERNELS=" in env.stdout

    stop = cli("emu", "stop")
    assert stop.returncode == 0 and one_line(stop.stdout) == "emulator stopped"
    assert wait_gone(pid)
    assert not (runtime_dir / "emu.sock").exists() and not (runtime_dir / "emu.pid").exists()

    after = cli("emu", "status", "--json")
    assert after.returncode == 1
    st = json.loads(after.stdout)
    assert st["schema"] == 1 and st["running"] is False and "flexnpu emu start" in st["error"]
    plain = cli("emu", "status")
    assert plain.returncode == 1 and "flexnpu emu start" in one_line(plain.stderr)

    idle = cli("emu", "stop")
    assert idle.returncode == 0 and "no emulator running" in one_line(idle.stdout)


@pytest.mark.parametrize("args, says", [
    (["--profile", "nope"], "unknown profile 'nope'"),
    (["--mode", "bogus"], "--mode takes contexts, serial, shared"),
    (["--context-switch-us", "-1"], "--context-switch-us must be >= 0"),
    (["--devices", "2", "--mode", "serial,shared,serial"], "one per device"),
    (["--devices", "0"], "--devices must be between 1 and 16"),
    (["--devices", "17"], "--devices must be between 1 and 16"),
    (["--time-scale", "0"], "--time-scale must be positive"),
])
def test_bad_start_options_one_line_error(cli, runtime_dir, args, says):
    r = cli("emu", "start", *args)
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert line.startswith("flexnpu emu start: ") and says in line, line
    assert not (runtime_dir / "emu.sock").exists() and not (runtime_dir / "emu.pid").exists()


def test_help(cli):
    r = cli("emu", "--help")
    assert r.returncode == 0
    for cmd in ("start", "stop", "status", "env"):
        assert cmd in r.stdout


@pytest.mark.parametrize("rdir", ["/etc/passwd", "/etc/passwd/sub"])
@pytest.mark.parametrize("cmd", ["start", "stop", "status", "status --json"])
def test_runtime_dir_not_a_directory_one_line_error(rdir, cmd):
    env = {**os.environ, "FLEXNPU_RUNTIME_DIR": rdir}
    r = subprocess.run(["timeout", "-s", "INT", "30", flexnpu_cli(), "emu", *cmd.split()], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, timeout=40, env=env)
    assert r.returncode == 1, (r.stdout, r.stderr)
    if cmd.endswith("--json"):
        st = json.loads(r.stdout)
        assert st["running"] is False and "is not a directory" in st["error"], st
        return
    line = one_line(r.stderr)
    assert line == (f"flexnpu emu {cmd}: FLEXNPU_RUNTIME_DIR={rdir} is not a directory; set it to a "
                    "directory (default /run/flexnpu)"), line
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, says", [
    (["--devices", "-1"], "--devices must be between 1 and 16"),
    (["--time-scale", "inf"], "--time-scale must be positive and finite"),
    (["--time-scale", "nan"], "--time-scale must be positive and finite"),
    (["--devices", "x"], "Invalid value for '--devices'"),
])
def test_more_bad_start_options(cli, runtime_dir, args, says):
    r = cli("emu", "start", *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert says in r.stderr, r.stderr
    assert not (runtime_dir / "emu.sock").exists()


def test_stale_pid_file_is_not_signalled(cli, runtime_dir):
    """emu.pid naming a process that is not this dir's server (a reused pid): stop leaves it be."""
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (runtime_dir / "emu.pid").write_text(f"{sleeper.pid}\n")
        r = cli("emu", "stop")
        assert r.returncode == 0 and "no emulator running" in one_line(r.stdout)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
