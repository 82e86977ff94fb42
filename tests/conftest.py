"""Fixtures for FlexNPU's tests: temporary runtime dirs, the emulator's real device server,
environments and helpers for AscendCL programs run as real processes, and the C test
programs, built once per session.

Every server a test starts is stopped at teardown, and the session fails if one is still
running at the end (as pyzmq's conftest fails a test whose context will not terminate).
A run in which every collected test skipped fails too: nothing was tested.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from flexnpu import paths
from flexnpu.emulator import control
from flexnpu.emulator.profiles import PROFILES, DeviceProfile

REPO = Path(__file__).resolve().parent.parent
PROGS = Path(__file__).resolve().parent / "progs"
SERVER_NAME = "flexnpu-emu-server"


# A shell without job control starts background jobs with SIGINT ignored, and an ignored
# signal stays ignored across exec: run that way, every program a test stops with SIGINT
# (attach, demo, the controller) would never see it. A handler here instead makes the
# programs the tests start get the default disposition (exec resets a caught signal).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Runtime dirs and server pids the tests created: the session-end check looks for these.
_RUNTIME_DIRS: list[Path] = []
_SERVER_PIDS: set[int] = set()
_OUTCOMES = {"passed": 0, "skipped": 0, "failed": 0}


# ---------------------------------------------------------------- processes


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def server_alive(pid: int) -> bool:
    """True if pid is a running (not zombie) device server."""
    argv = _cmdline(pid)  # a zombie's cmdline is empty
    return bool(argv) and argv[0].endswith(SERVER_NAME)


def _server_socket(argv: list[str]) -> str:
    for i, a in enumerate(argv[:-1]):
        if a == "--socket":
            return argv[i + 1]
    return ""


def leftover_servers() -> list[int]:
    """Device servers started by these tests (by pid, or by a socket in a test's runtime
    dir) that are still running. Servers of other users of this machine are not ours."""
    roots = [str(d) + os.sep for d in _RUNTIME_DIRS]
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if not server_alive(pid):
            continue
        sock = _server_socket(_cmdline(pid))
        if pid in _SERVER_PIDS or any(sock.startswith(r) for r in roots):
            found.add(pid)
    return sorted(found)


def track_server(pid: int) -> None:
    """Registers a server pid a test started some other way (e.g. through the CLI)."""
    _SERVER_PIDS.add(pid)


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server_alive(pid):
            return True
        time.sleep(0.02)
    return not server_alive(pid)


# ---------------------------------------------------------------- runtime dir and emulator


def new_runtime_dir() -> Path:
    # Short and under /tmp: a unix socket path must fit in 108 bytes, and tmp_path may not.
    d = Path(tempfile.mkdtemp(prefix="fxrt-"))
    _RUNTIME_DIRS.append(d)
    return d


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh runtime dir, also exported as FLEXNPU_RUNTIME_DIR."""
    d = new_runtime_dir()
    monkeypatch.setenv("FLEXNPU_RUNTIME_DIR", str(d))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@dataclass
class Emulator:
    """A running device server in a test's runtime dir."""

    pid: int
    rdir: Path
    devices: int
    profile: DeviceProfile
    mode: str
    time_scale: float
    stopped: bool = field(default=False)

    def status(self) -> dict:
        return control.status(self.rdir)

    def device(self, index: int = 0) -> dict:
        return self.status()["devices"][index]

    def client(self, pid: int, index: int = 0) -> dict:
        """The status record of one client process on one device."""
        for c in self.device(index)["clients"]:
            if c["pid"] == pid:
                return c
        raise AssertionError(f"pid {pid} is not a client of device {index}: {self.device(index)['clients']}")

    def flops_for_ms(self, ms: float) -> float:
        """FLOPs of a compute-bound kernel modelled at `ms` (before the time scale)."""
        return self.profile.peak_tflops * 1e12 * ms / 1e3

    def hbm_bytes_for_ms(self, ms: float) -> float:
        """HBM bytes of a memory-bound kernel modelled at `ms` (before the time scale)."""
        return self.profile.hbm_tbps * 1e12 * ms / 1e3

    def stop(self) -> None:
        control.stop(self.rdir)
        self.stopped = True


@pytest.fixture
def emulator(runtime_dir: Path) -> Iterator[Callable[..., Emulator]]:
    """Factory: emulator(devices=1, profile="910b", mode="contexts", time_scale=1.0) starts the
    real device server in this test's runtime dir. Teardown always stops it and checks that
    the process is gone."""
    started: list[Emulator] = []

    def start(devices: int = 1, profile: str = "910b", mode: str = control.DEFAULT_MODE, time_scale: float = 1.0,
              context_switch_us: float | None = None) -> Emulator:
        _require_native()
        pid = control.start(devices, profile, mode, time_scale, rdir=runtime_dir, context_switch_us=context_switch_us)
        _SERVER_PIDS.add(pid)
        emu = Emulator(pid, runtime_dir, devices, PROFILES[profile], mode, time_scale)
        started.append(emu)
        return emu

    yield start
    survivors = []
    for emu in started:
        try:
            control.stop(emu.rdir)
        finally:
            if not wait_gone(emu.pid):
                os.kill(emu.pid, signal.SIGKILL)
                survivors.append(emu.pid)
    assert not survivors, f"device servers {survivors} did not stop on SIGTERM"


# ---------------------------------------------------------------- AscendCL programs


def _require_native() -> None:
    if not paths.emulator_library().exists() or not paths.emulator_server_binary().exists():
        pytest.fail(f"the emulator's native parts are missing under {paths.native_dir()}; "
                    "build them with `pip install .`", pytrace=False)


@pytest.fixture
def acl_env(runtime_dir: Path) -> dict[str, str]:
    """Environment for an AscendCL program: it loads the emulated libascendcl.so and talks to
    this test's server; FLEXNPU_EMU_KERNELS names the default kernel library."""
    env = dict(os.environ)
    env.update(control.emulator_env(runtime_dir))
    env["FLEXNPU_EMU_KERNELS"] = str(paths.emulator_kernel_library())
    return env


@pytest.fixture(scope="session")
def acl_programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The C test programs (tests/progs/*.c) and the C sample, built against the emulator's
    AscendCL headers and library, by name."""
    _require_native()
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the C test programs (apt-get install gcc)", pytrace=False)
    out = tmp_path_factory.mktemp("acl-programs")
    sources = sorted(PROGS.glob("*.c")) + [REPO / "flexnpu" / "samples" / "sample_acl.c"]
    built = {}
    for src in sources:
        exe = out / src.stem
        cmd = ["gcc", "-O2", "-Wall", str(src), "-o", str(exe), "-I", str(paths.acl_include_dir()),
               "-L", str(paths.native_lib_dir()), "-lascendcl", "-lm", "-pthread"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"building {src.name} failed:\n{r.stderr}"
        built[src.stem] = exe
    return built


@pytest.fixture
def workload(acl_programs: dict[str, Path]) -> Path:
    return acl_programs["acl_workload"]


@pytest.fixture
def kernel_library() -> Path:
    return paths.emulator_kernel_library()


def parse_json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def run_acl(acl_env: dict[str, str]) -> Callable[..., dict]:
    """run_acl(argv, check=True, timeout=60) runs a program to the end and returns the last
    JSON object it printed, with its exit code ("rc") and stderr ("stderr") added."""

    def run(argv: list, check: bool = True, timeout: float = 60, env: dict | None = None) -> dict:
        r = subprocess.run([str(a) for a in argv], env=env or acl_env, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        objs = parse_json_lines(r.stdout)
        if check:
            assert r.returncode == 0 and objs, (
                f"{argv[0]} {argv[1] if len(argv) > 1 else ''} exited {r.returncode}\n"
                f"stdout: {r.stdout}\nstderr: {r.stderr}")
        return {**(objs[-1] if objs else {}), "rc": r.returncode, "stderr": r.stderr}

    return run


@pytest.fixture
def run_program(acl_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess]:
    """run_program(argv, timeout=60): runs a program in the AscendCL environment to the end."""

    def run(argv: list, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in argv], env=env or acl_env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    return run


class Interactive:
    """A long-running program that reads commands on stdin and answers one JSON line each.
    A thread reads its stdout, so every read has a timeout and none can hang the test."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read(self, timeout: float = 15.0) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"pid {self.pid} said nothing for {timeout} s") from None
        if line is None:
            self.proc.wait(timeout=5)
            raise AssertionError(f"pid {self.pid} exited {self.proc.returncode}: {self.proc.stderr.read()}")
        return json.loads(line)

    def ask(self, command: str, timeout: float = 15.0) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)


@pytest.fixture
def spawn(acl_env: dict[str, str]) -> Iterator[Callable[..., Interactive]]:
    """spawn(argv) starts a program with pipes on stdin/stdout/stderr; every one is killed
    and reaped at teardown, whatever the test did."""
    started: list[Interactive] = []

    def start(argv: list, env: dict | None = None) -> Interactive:
        p = subprocess.Popen([str(a) for a in argv], env=env or acl_env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        started.append(Interactive(p))
        return started[-1]

    yield start
    for it in started:
        if it.proc.poll() is None:
            it.proc.kill()
        it.proc.wait(timeout=10)
        it.pump.join(timeout=5)  # stdout is at EOF now; let the reader finish before closing
        for f in (it.proc.stdin, it.proc.stdout, it.proc.stderr):
            f.close()


# ---------------------------------------------------------------- session checks


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed:
        _OUTCOMES["passed"] += 1
    elif report.skipped:
        _OUTCOMES["skipped"] += 1
    elif report.failed:
        _OUTCOMES["failed"] += 1


def _say(session: pytest.Session, msg: str) -> None:
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(msg, red=True, bold=True)
    else:
        print(msg, file=sys.stderr)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = leftover_servers()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if left:
        _say(session, f"FAILED: device servers left running by the tests (now killed): {left}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    for d in _RUNTIME_DIRS:
        shutil.rmtree(d, ignore_errors=True)
    if (exitstatus == pytest.ExitCode.OK and session.testscollected > 0 and _OUTCOMES["passed"] == 0
            and _OUTCOMES["skipped"] > 0):
        _say(session, f"FAILED: all {_OUTCOMES['skipped']} tests skipped; no test passed, so nothing was tested")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
