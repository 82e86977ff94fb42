"""Bad input, as a new user types it: every case gets one line on stderr that says what to do,
a non-zero exit, and no traceback (DESIGN: "Bad input gets a one-line error that says what
to do, a non-zero exit, and loses nothing"). Each runs the real CLI as a process under
`timeout -s INT`; the one-per-node rules run two real observers and two real controllers."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from flexnpu import paths
from flexnpu.observe import attach
from flexnpu.pidlock import AlreadyRunning, PidLock

REPO = Path(__file__).resolve().parent.parent
SITE = sysconfig.get_paths()["purelib"]
IS_ROOT = os.geteuid() == 0
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
TIMEOUT = "60"


@pytest.fixture(autouse=True)
def isolated(runtime_dir: Path) -> Path:
    return runtime_dir


@functools.cache
def nobody_python() -> str | None:
    """An interpreter user nobody can run with this environment's packages (this one, or the
    system's of the same version where this one lives under a private home)."""
    if not IS_ROOT or shutil.which("setpriv") is None:
        return None
    same = f"{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (sys.executable, shutil.which(f"python{same}") or "", "/usr/bin/python3"):
        if exe and subprocess.run([*NOBODY, exe, "-c", "import flexnpu.cli"], capture_output=True, cwd="/",
                                  env={**os.environ, "PYTHONPATH": f"{REPO}:{SITE}"}).returncode == 0:
            return exe
    return None


def flexnpu(*args: str, user: str | None = None, timeout: str = TIMEOUT) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "flexnpu.cli", *args]
    pythonpath, cwd = str(REPO), str(REPO)
    if user == "nobody":
        argv = [*NOBODY, nobody_python(), *argv[1:]]
        pythonpath += ":" + SITE
        cwd = "/"
    return subprocess.run(["timeout", "--preserve-status", "-s", "INT", timeout, *argv], capture_output=True,
                          text=True, cwd=cwd, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": pythonpath})


def one_line(r: subprocess.CompletedProcess[str], code: int, *says: str) -> str:
    """Asserts the exit code, a one-line stderr without a traceback, and what it says."""
    err = r.stderr.strip()
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(err.splitlines()) == 1, r.stderr
    for s in says:
        assert s in err, err
    return err


# ---------------------------------------------------------------- daemon, run, gate


def test_daemon_device_beyond_the_emulators(emulator, runtime_dir: Path) -> None:
    emulator(devices=2)
    err = one_line(flexnpu("daemon", "--device", "99"), 2, "no device 99", "the emulator has 2 devices (0-1)")
    assert "--device" in err
    assert not list(runtime_dir.glob("gate-99*")) and not list(runtime_dir.glob("daemon-99*"))


def test_daemon_negative_device() -> None:
    one_line(flexnpu("daemon", "--device", "-1"), 2, "--device takes a physical device id from 0 to 63, not -1")


def test_daemon_without_emulator_or_cann_says_so(runtime_dir: Path) -> None:
    from flexnpu.forward.cli import _real_cann_present

    if _real_cann_present():
        pytest.skip("CANN is installed: the device count comes from it")
    log = runtime_dir / "d.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flexnpu.cli", "daemon", "--device", "5"], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 30
        while "not checked" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert "device 5 not checked: no CANN devices (/dev/davinciN) and no emulator running" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_run_same_device_twice() -> None:
    one_line(flexnpu("run", "--device", "1,1", "--", "true"), 2, "--device lists device 1 twice in '1,1'")


def test_run_a_file_that_is_not_executable() -> None:
    err = one_line(flexnpu("run", "--", "/etc/passwd"), 126, "/etc/passwd: is not executable", "chmod +x")
    assert "not found" not in err


def test_run_a_directory() -> None:
    one_line(flexnpu("run", "--", "/tmp"), 126, "/tmp: is a directory")


def test_run_missing_program() -> None:
    one_line(flexnpu("run", "--", "no-such-program-fx"), 127, "no-such-program-fx: command not found")


def test_gate_set_negative_device_suggests_nothing_refused() -> None:
    err = one_line(flexnpu("gate", "set", "--device", "-1", "4242"), 2,
                   "--device takes a physical device id from 0 to 63, not -1")
    assert "flexnpu daemon --device -1" not in err


@pytest.mark.parametrize("cmd", [["gate", "set", "-1"], ["gate", "release", "-1"]], ids=" ".join)
def test_gate_negative_pid(cmd: list[str]) -> None:
    err = one_line(flexnpu(*cmd), 2, "PID takes a process id (a number from 1 to 2147483647), not -1")
    assert "No such option" not in err


def test_unknown_option_is_still_refused() -> None:
    one_line(flexnpu("gate", "set", "-1", "--bogus"), 2, "flexnpu gate set: No such option:",
             "see `flexnpu gate set --help`")


@pytest.mark.parametrize("args,says", [
    (["attach", "x"], "flexnpu attach: Invalid value for 'pid'"),
    (["top", "--interval", "fast"], "flexnpu top: Invalid value for '--interval'"),
    (["run"], "flexnpu run: Missing argument 'cmd'"),
    (["no-such-command"], "flexnpu: No such command 'no-such-command'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_usage_errors_are_one_line(args: list[str], says: str) -> None:
    """click's own refusals (wrong type, unknown option or command, missing argument): one
    line naming the command, and where its help is, instead of a usage block and a box."""
    one_line(flexnpu(*args), 2, says, "--help`")


# ---------------------------------------------------------------- attach


@pytest.mark.parametrize("interval", ["nan", "inf", "-inf", "0", "-0.5", "1e300"])
def test_attach_interval_not_a_positive_number(interval: str) -> None:
    one_line(flexnpu("attach", str(os.getpid()), interval), 2, "interval must be a number above 0")


def test_attach_negative_count_is_named() -> None:
    err = one_line(flexnpu("attach", str(os.getpid()), "1", "-1"), 2, "count must be at least 1, not -1")
    assert "No such option" not in err


def test_attach_negative_pid_is_named() -> None:
    one_line(flexnpu("attach", "-5"), 2, "PID takes a process id (a number from 1 to 2147483647), not -5")


def test_attach_trace_in_a_missing_dir() -> None:
    one_line(flexnpu("attach", str(os.getpid()), "0.5", "1", "--trace", "/nonexistent/dir/t.json"), 2,
             "--trace /nonexistent/dir/t.json: /nonexistent/dir is not a directory")


def test_attach_trace_is_a_directory(tmp_path: Path) -> None:
    one_line(flexnpu("attach", str(os.getpid()), "--trace", str(tmp_path)), 2, "is a directory; give a file name")


def test_attach_unreadable_maps_as_root_says_what_is_wrong() -> None:
    """In a VM or sandbox whose init holds capabilities root here lacks, /proc/1/maps is
    refused even to root: "run it as root" would be wrong."""
    if not IS_ROOT:
        pytest.skip("needs root")
    try:
        Path("/proc/1/maps").read_bytes()
        pytest.skip("/proc/1/maps is readable here")
    except PermissionError:
        pass
    err = one_line(flexnpu("attach", "1"), 5, "cannot read /proc/1/maps", "even to root")
    assert "run it as root" not in err


def test_maps_refusal_names_the_capabilities_root_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    caps = {"self": 0x1FFFEFFFFFF, 4242: 0x1FFFFFFFFFF}
    monkeypatch.setattr(attach.os, "geteuid", lambda: 0)
    monkeypatch.setattr(attach, "_caps", lambda pid, field: caps[pid])
    msg = attach.maps_refusal(4242)
    assert "even to root" in msg and "(cap_sys_resource)" in msg and "run it as root" not in msg
    caps[4242] = caps["self"]
    assert "another user namespace" in attach.maps_refusal(4242)
    monkeypatch.setattr(attach.os, "geteuid", lambda: 1000)
    assert attach.maps_refusal(4242).endswith("another user's process; run it as root (sudo)")


@pytest.mark.skipif(nobody_python() is None, reason="needs root and an interpreter user nobody can run")
def test_attach_as_nobody_to_roots_process() -> None:
    one_line(flexnpu("attach", str(os.getpid()), user="nobody"), 5, "another user's process; run it as root")


# ---------------------------------------------------------------- observe


def test_observe_missing_pid() -> None:
    one_line(flexnpu("observe", "-p", "999999", "--count", "1"), 3, "no process with pid 999999")


@pytest.mark.parametrize("count", ["-1", "0"])
def test_observe_count_below_one(count: str) -> None:
    one_line(flexnpu("observe", "--count", count), 2, f"--count must be at least 1, not {count}")


@pytest.mark.parametrize("ms", ["nan", "inf", "-1", "0"])
def test_observe_interval_not_a_positive_number(ms: str) -> None:
    one_line(flexnpu("observe", "--interval-ms", ms, "--count", "1"), 2, "--interval-ms must be a number above 0")


def test_observe_negative_pid() -> None:
    one_line(flexnpu("observe", "-p", "-3"), 2, "-p takes a process id (a number from 1 to 2147483647), not -3")


@pytest.mark.skipif(nobody_python() is None, reason="needs root and an interpreter user nobody can run")
def test_observe_unprivileged(runtime_dir: Path) -> None:
    """As user nobody in root's runtime dir (0755): no traceback, and it says what to do."""
    runtime_dir.chmod(0o755)
    one_line(flexnpu("observe", "--count", "1", user="nobody"), 5, "permission denied", "run it as root")


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "flexnpu.cli", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=out, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})


def _wait_for(cond, what: str, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{log.read_text()}"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_second_observer_refuses_naming_the_first(runtime_dir: Path) -> None:
    sock = paths.observe_socket(runtime_dir)
    first = _start(["observe", "--source", "shim", "--interval-ms", "50"], runtime_dir / "o1.log")
    try:
        _wait_for(sock.exists, "observe.sock", first, runtime_dir / "o1.log")
        one_line(flexnpu("observe", "--source", "shim", "--count", "1"), 1,
                 f"an observer is already running on this node (pid {first.pid})")
        assert sock.exists() and first.poll() is None  # the first still serves, reachable
    finally:
        _stop(first)
    assert first.returncode == 0 and not sock.exists()
    r = flexnpu("observe", "--source", "shim", "--count", "1", "--interval-ms", "10")
    assert r.returncode == 0, r.stderr  # its lock went with it


def test_second_controller_refuses_naming_the_first(runtime_dir: Path) -> None:
    sock = paths.controller_socket(runtime_dir)
    first = _start(["controller"], runtime_dir / "c1.log")
    try:
        _wait_for(sock.exists, "controller.sock", first, runtime_dir / "c1.log")
        one_line(flexnpu("controller"), 1, f"a controller is already running on this node (pid {first.pid})")
        assert sock.exists() and first.poll() is None
    finally:
        _stop(first)


def test_pid_lock_is_released_by_the_holders_death(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    code = f"from flexnpu.pidlock import PidLock; import sys, time; PidLock({str(path)!r}).acquire(); " \
           "print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(AlreadyRunning) as e:
            PidLock(path).acquire()
        assert e.value.pid == holder.pid
    finally:
        holder.kill()
        holder.wait()
    with PidLock(path):
        assert path.read_text().strip() == str(os.getpid())


# ---------------------------------------------------------------- output that cannot be written


def _to(stdout: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with its stdout a full device (`>/dev/full`) or closed (`>&-`)."""
    redirect = {"full": ">/dev/full", "closed": ">&-"}[stdout]
    return subprocess.run(["timeout", "--preserve-status", "-s", "INT", TIMEOUT, "sh", "-c",
                           f'exec "$@" {redirect}', "sh", sys.executable, "-m", "flexnpu.cli", *args],
                          capture_output=False, stderr=subprocess.PIPE, text=True, cwd=REPO,
                          stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("args", [["emu", "status", "--json"], ["doctor", "--json"], ["emu", "env"], ["--help"],
                                  ["service", "status", "--json"], ["gate", "--help"]], ids=" ".join)
def test_output_to_a_full_device(args: list[str]) -> None:
    cmd = " ".join(["flexnpu", *(a for a in args if not a.startswith("-"))])
    r = _to("full", *args)
    r.stdout = ""
    one_line(r, 1, f"{cmd}: cannot write to standard output: No space left on device")


@pytest.mark.parametrize("args", [["emu", "status", "--json"], ["emu", "env"]], ids=" ".join)
def test_output_to_a_closed_stdout(args: list[str]) -> None:
    r = _to("closed", *args)
    r.stdout = ""
    one_line(r, 1, "cannot write to standard output: it is closed")


def test_output_to_a_closed_pipe_exits_1_quietly() -> None:
    """A reader that went away (`flexnpu emu env | head -0`): exit 1 without a word, as click
    does for every command (a message there would only clutter the pipeline's stderr)."""
    argv = [sys.executable, "-m", "flexnpu.cli", "doctor", "--json"]
    rd, wr = os.pipe()
    os.close(rd)  # the reader is gone before the first write
    try:
        p = subprocess.run(argv, stdout=wr, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        os.close(wr)
    assert p.returncode == 1 and p.stderr.strip() == "", (p.returncode, p.stderr)


# ---------------------------------------------------------------- numbers and sizes


@pytest.mark.parametrize("args,says", [
    (["top", "--interval", "nan"], "flexnpu top: --interval must be a number above 0 and at most 86400 s, not nan"),
    (["top", "--interval", "inf"], "flexnpu top: --interval must be a number above 0"),
    (["top", "--interval", "-0"], "flexnpu top: --interval must be a number above 0"),
    (["run", "--mem-quota", "0.0000000001", "--", "true"], "flexnpu run: --mem-quota must be at least 1 byte"),
    (["run", "--mem-quota", "0.5", "--", "true"], "flexnpu run: --mem-quota must be at least 1 byte"),
    (["run", "--mem-quota", "99999999T", "--", "true"], "below 16 EiB"),
    (["run", "--mem-quota", "nan", "--", "true"], "--mem-quota takes a size such as 8G"),
    (["gate", "set", "4242", "--max-hold-ms", "nan"], "flexnpu gate set: --max-hold-ms must be a number from 0.01"),
    (["gate", "defaults", "--pending-grace-ms", "inf"], "flexnpu gate defaults: --pending-grace-ms must be"),
    (["gate", "defaults", "--max-hold-ms", "1e300"], "--max-hold-ms must be a number from 0.01 to 60000 ms"),
    (["daemon", "--max-hold-ms", "inf"], "flexnpu daemon: --max-hold-ms must be a number from 0.01"),
    (["daemon", "--pending-grace-ms", "nan"], "flexnpu daemon: --pending-grace-ms must be a number from 0"),
    (["demo", "--seconds", "inf"], "flexnpu demo: --seconds must be a number above 0"),
    (["demo", "--seconds", "1e300"], "flexnpu demo: --seconds must be a number above 0"),
    (["bench", "pd", "--rate", "1e-300"], "request rates must be positive numbers from 0.01"),
    (["bench", "pd", "--rates", "1e300"], "request rates must be positive numbers from 0.01"),
    (["bench", "pd", "--slo-ttft-ms", "nan"], "--slo-ttft-ms must be a number above 0"),
    (["bench", "pd", "-n", str(10**30)], "-n must be from 1 to"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_numbers_out_of_range_are_usage_errors(args: list[str], says: str) -> None:
    one_line(flexnpu(*args), 2, says)


def test_size_bytes_reads_sizes_as_the_shim_does() -> None:
    from flexnpu.cliargs import size_bytes

    assert size_bytes("q", "8G") == 8 << 30 and size_bytes("q", " 512MiB ") == 512 << 20
    assert size_bytes("q", "1.5k") == 1536 and size_bytes("q", "0.5K") == 512 and size_bytes("q", "1") == 1
    assert size_bytes("q", "4096b") == 4096 and size_bytes("q", ".5t") == 1 << 39
    for bad in ["0", "0.9", "1e-10", "-1G", "nan", "inf", "1e3", "0x10", "", "G", "1GG", "1 iB", "20000000000T"]:
        with pytest.raises(ValueError):
            size_bytes("q", bad)


# ---------------------------------------------------------------- files and directories


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    f = tmp_path / "fifo"
    os.mkfifo(f)
    return f


def test_attach_trace_to_a_fifo_is_refused_without_waiting(fifo: Path) -> None:
    one_line(flexnpu("attach", str(os.getpid()), "--trace", str(fifo), timeout="20"), 2,
             f"--trace {fifo}: is a FIFO, not a regular file")


@pytest.mark.parametrize("where", ["fifo", "/dev/null", "/proc/version", "/sys/kernel/notes"])
def test_bench_json_to_no_regular_file(where: str, fifo: Path) -> None:
    path = str(fifo) if where == "fifo" else where
    one_line(flexnpu("bench", "pd", "--json", path, timeout="20"), 2, f"--json {path}: is ")


@pytest.mark.parametrize("out", ["/proc", "/etc/passwd"])
def test_demo_out_not_a_directory_for_results(out: str) -> None:
    one_line(flexnpu("demo", "--out", out, timeout="20"), 2, f"flexnpu demo: --out {out}: is ")


@pytest.mark.parametrize("prefix,says", [
    ("/proc/version", "--prefix /proc/version is not a directory"),
    ("/etc/passwd/units", "--prefix /etc/passwd/units: /etc/passwd is not a directory"),
    ("/proc/1", "--prefix /proc/1 is on proc, a file system the kernel makes up"),
    ("/sys/kernel", "--prefix /sys/kernel is on sysfs"),
])
@pytest.mark.parametrize("cmd", [["service", "install", "--dry-run"], ["service", "status"]], ids=" ".join)
def test_service_prefix_one_cannot_install_under(cmd: list[str], prefix: str, says: str) -> None:
    one_line(flexnpu(*cmd, "--prefix", prefix), 2, f"flexnpu {' '.join(cmd[:2])}: {says}")
