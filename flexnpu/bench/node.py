"""A whole FlexNPU node in a temporary runtime dir, for benchmarks, end-to-end tests and
the demo: the emulated device, a forwarding daemon per device, the observer and the
controller, each a real process started the way a person would start it, and programs run
under the shim beside them.

    with LocalNode(devices=1, observer="shim", policy="flexpd") as node:
        p = node.spawn([exe, ...], role="decode")
        ...
    # everything it started is stopped (SIGTERM, then SIGKILL), also on an exception

If the owner dies without stopping them (kill -9, a crash), the node's guard
(flexnpu/bench/guard.py, a process in its own session that the owner feeds every pid it
starts) stops them and removes the runtime dir. An owner that handles SIGINT, SIGTERM and
SIGHUP (stop_signals) unwinds through `stop()` on each of them.

With netns (a network namespace, e.g. one node of a flexnpu.bench.netns.Topology), every
process the node starts (device server, daemons, observer, controller, spawned programs)
runs inside that namespace, as its own pid (nsenter execs it); `host` is the node's address
there, for peers on other nodes to reach its services.

Benchmarks import this, never tests/ (tests may import it too).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from flexnpu import paths

# The services run this interpreter on the very flexnpu package that imported this module (a
# source checkout or the installed one), so what a benchmark or test measures is that code.
FLEXNPU = [sys.executable, "-m", "flexnpu.cli"]
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
START_TIMEOUT_S = 30.0  # Python services on two loaded cores can be slow to start


class NodeError(RuntimeError):
    """A part of the node did not start."""


def machine() -> dict[str, Any]:
    """What a figure was measured on: printed beside every benchmark's results (the machine
    is shared and noisy, so its load is part of the record)."""
    os_name = cpu = "?"
    try:
        os_name = next(line.split("=", 1)[1].strip().strip('"') for line in
                       Path("/etc/os-release").read_text().splitlines() if line.startswith("PRETTY_NAME="))
    except (OSError, StopIteration):
        pass
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine() or "?"
    return {"os": os_name, "cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "load1": round(os.getloadavg()[0], 2)}


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Polls pred until it returns something true; NodeError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise NodeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def stop_signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """handler for SIGTERM and SIGHUP while in the block (SIGINT is KeyboardInterrupt already):
    a closed terminal or a dropped ssh session (SIGHUP) stops a node owner as `kill` does, so
    it unwinds through every `stop()`. A SIGHUP ignored on the way in (nohup) stays ignored."""
    sigs = [signal.SIGTERM] + ([signal.SIGHUP] if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN else [])
    owner = os.getpid()

    def guarded(signum: int, frame: Any) -> None:
        # a child forked without exec (pyroute2's namespace helper) inherits the handler: it is
        # no owner, and unwinding the owner's stack there would run the owner's cleanup
        if os.getpid() != owner:
            os._exit(128 + signum)
        handler(signum, frame)

    old = {s: signal.signal(s, guarded) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_process(p: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after timeout; always reaped."""
    if p.poll() is None:
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        except ProcessLookupError:
            pass
    else:
        p.wait()


class LocalNode:
    """Starts the parts asked for; `stop()` (or leaving the with-block) stops them all.

    observer: None (none), "shim", "bpf" or "auto" (the `flexnpu observe --source`);
    policy: None (no controller) or a policy name for `flexnpu controller`;
    controller_args: extra command-line options for the controller (e.g. ["--tick-ms", "5"]);
    daemon_args: extra command-line options for every daemon (e.g. ["--pending-grace-ms", "5"]);
    partition: the emulator's `--partition prefill=S,decode=S` (fixed shares by role), or None;
    observe_args: extra command-line options for the observer (e.g. ["--metrics", "127.0.0.1:9400"],
        ["--publish-tcp", "127.0.0.1:7781"]);
    netns: a network namespace (a name under /run/netns) in which all of it runs, or None.
    """

    def __init__(self, devices: int = 1, mode: str = "contexts", profile: str = "910b", time_scale: float = 1.0,
                 observer: str | None = "shim", observe_interval_ms: float = 50.0, policy: str | None = None,
                 controller_args: Sequence[str] = (), daemons: bool = True, rdir: Path | None = None,
                 partition: str | None = None, daemon_args: Sequence[str] = (),
                 observe_args: Sequence[str] = (), netns: str | None = None) -> None:
        self.netns = netns
        self.host = "127.0.0.1"  # the node's IPv4 address (its namespace's link address with netns)
        if netns is not None:  # before anything is made: a bad name leaves nothing behind
            from flexnpu.bench.netns import netns_address

            self.host = netns_address(netns)
        self.devices = devices
        self.mode = mode
        self.profile = profile
        self.time_scale = time_scale
        self.observer = observer
        self.observe_interval_ms = observe_interval_ms
        self.policy = policy
        self.controller_args = list(controller_args)
        self.daemon_args = list(daemon_args)
        self.observe_args = list(observe_args)  # extra options for the observer (e.g. --publish-tcp)
        self.partition = partition  # the emulator's --partition (vNPU-like split by role), or None
        self.want_daemons = daemons
        self._own_rdir = rdir is None
        self.rdir = Path(rdir) if rdir else Path(tempfile.mkdtemp(prefix="flexnpu-node-"))
        self.logs = self.rdir / "logs"
        self.emu_pid: int | None = None
        self.services: dict[str, subprocess.Popen] = {}
        self._argv: dict[str, list[str]] = {}  # each service's command line, for restart()
        self.programs: list[subprocess.Popen] = []
        self._guard: subprocess.Popen | None = None

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """argv as this node runs it: inside its network namespace, as the same pid."""
        if self.netns is None:
            return [str(a) for a in argv]
        from flexnpu.bench.netns import netns_argv

        return netns_argv(self.netns, argv)

    # -- environment
    def base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FLEXNPU_RUNTIME_DIR"] = str(self.rdir)
        env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("NOTIFY_SOCKET", None)
        return env

    def program_env(self, role: str = "auto", shim: bool = True, devices: str | None = None,
                    extra: dict[str, str] | None = None, forward: bool = False) -> dict[str, str]:
        """The environment of an AscendCL program on this node: the emulated runtime, and
        under the shim (as `flexnpu run` sets it) unless shim is False; forward: the shim's
        forward build (`flexnpu run --forward`), its calls run by the device's executor."""
        from flexnpu.emulator import control
        from flexnpu.forward.cli import run_env

        env = self.base_env()
        env.update(control.emulator_env(self.rdir))
        if shim or forward:
            env = run_env(devices, role, None, False, env, forward=forward)
        env.update(extra or {})
        return env

    # -- lifecycle
    def start(self) -> LocalNode:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        from flexnpu.emulator import control

        self.rdir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self._start_guard()
        self.emu_pid = control.start(self.devices, self.profile, self.mode, self.time_scale, rdir=self.rdir,
                                     partition=self.partition, wrap=self.wrap([]))
        self._watch(self.emu_pid)
        if self.want_daemons:
            for dev in range(self.devices):
                self._service(f"daemon-{dev}", ["daemon", "--device", str(dev), *self.daemon_args])
            for dev in range(self.devices):
                self._ready(f"daemon-{dev}", lambda d=dev: self._daemon_up(d))
        if self.observer:
            self._service("observe", ["observe", "--source", self.observer,
                                      "--interval-ms", f"{self.observe_interval_ms:g}", *self.observe_args])
            self._ready("observe", lambda: paths.observe_socket(self.rdir).exists())
        if self.policy:
            self._service("controller", ["controller", "--policy", self.policy, *self.controller_args])
            self._ready("controller", lambda: paths.controller_socket(self.rdir).exists())

    def _start_guard(self) -> None:
        if self._guard is not None:
            return
        env = self.base_env()
        del env["FLEXNPU_RUNTIME_DIR"]  # the guard is no part of the node, and must not look like one
        self._guard = subprocess.Popen([*FLEXNPU[:1], "-m", "flexnpu.bench.guard"], env=env,
                                       stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
        if self._own_rdir:
            self._tell_guard(b"dir " + os.fsencode(self.rdir))

    def _tell_guard(self, line: bytes) -> None:
        if self._guard is None or self._guard.stdin is None:
            return
        try:
            self._guard.stdin.write(line + b"\n")
            self._guard.stdin.flush()
        except OSError:  # the guard is gone (someone killed it): stop() still works
            pass

    def _watch(self, pid: int | None) -> None:
        """Tells the guard about a process this node started."""
        from flexnpu.bench.guard import start_time

        start = start_time(pid) if pid else None
        if start is not None:
            self._tell_guard(f"pid {pid} {start}".encode())

    def _stop_guard(self) -> None:
        from flexnpu.bench.guard import dismiss

        g, self._guard = self._guard, None
        dismiss(g)

    def _service(self, name: str, args: list[str]) -> None:
        self._argv[name] = args
        log = open(self.logs / f"{name}.log", "ab")  # a restarted service appends to its log
        try:
            self.services[name] = subprocess.Popen(self.wrap([*FLEXNPU, *args]), env=self.base_env(), stdout=log,
                                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        self._watch(self.services[name].pid)

    def _ready(self, name: str, pred: Callable[[], Any]) -> None:
        p = self.services[name]

        def up() -> Any:
            if p.poll() is not None:
                raise NodeError(f"{name} exited {p.returncode} while starting:\n{self.log(name)}")
            return pred()

        wait_for(up, START_TIMEOUT_S, f"{name} to start")

    def _daemon_up(self, dev: int) -> bool:
        from flexnpu.forward.api import DaemonClient, DaemonError

        if not paths.daemon_socket(dev, self.rdir).exists():
            return False
        try:
            with DaemonClient(dev, self.rdir, timeout=1.0) as c:
                return c.ping()["pid"] == self.services[f"daemon-{dev}"].pid
        except DaemonError:
            return False

    def executor_pid(self, dev: int) -> int | None:
        """The pid of device dev's executor (its daemon's `ping`), None when it has none."""
        from flexnpu.forward.api import DaemonClient, DaemonError

        if f"daemon-{dev}" not in self.services:
            return None
        try:
            with DaemonClient(dev, self.rdir, timeout=2.0) as c:
                return (c.ping().get("executor") or {}).get("pid")
        except DaemonError:
            return None

    def forward_refusal(self, devices: Sequence[int]) -> str | None:
        """Why programs on these devices cannot run forwarded on this node (None: they can)."""
        from flexnpu.forward.daemon.executor import ExecutorSupervisor

        if not paths.forward_shim_library().is_file():
            return f"{paths.forward_shim_library()} is missing (rebuild: bash scripts/setup.sh)"
        if not ExecutorSupervisor.available():
            return f"{paths.executor_binary()} is missing (rebuild: bash scripts/setup.sh)"
        for d in devices:
            if f"daemon-{d}" not in self.services:
                return f"device {d} has no daemon on this node (LocalNode daemons=False)"
            if not paths.executor_socket(d, self.rdir).exists():  # the executor starts with its first client
                return f"device {d}'s daemon serves no executor (its log: {self.logs / f'daemon-{d}.log'})"
        return None

    def log(self, name: str) -> str:
        try:
            return (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def spawn(self, argv: Sequence[str], role: str = "auto", shim: bool = True, devices: str | None = None,
              extra_env: dict[str, str] | None = None, forward: bool = False, **popen: Any) -> subprocess.Popen:
        """Starts an AscendCL program on this node (text stdout, piped, unless given);
        forward: forwarded (`forward_refusal` first says whether it can be)."""
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        popen.setdefault("stdin", subprocess.DEVNULL)
        popen.setdefault("text", True)
        p = subprocess.Popen(self.wrap(argv), env=self.program_env(role, shim, devices, extra_env, forward), **popen)
        self.programs.append(p)
        self._watch(p.pid)
        return p

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signals one service (fault injection); it stays in the table to be reaped."""
        p = self.services[name]
        if p.poll() is None:
            p.send_signal(sig)
            p.wait(10)

    def restart(self, name: str) -> None:
        """Starts a service again, as it was first started (after `kill`), and waits until it
        is ready: a daemon answers ping, the observer's and controller's sockets exist.
        "emu" kills nothing and restarts the device server in the same runtime dir."""
        from flexnpu.emulator import control

        if name == "emu":
            self.emu_pid = control.start(self.devices, self.profile, self.mode, self.time_scale, rdir=self.rdir,
                                         partition=self.partition, wrap=self.wrap([]))
            self._watch(self.emu_pid)
            return
        old = self.services[name]
        if old.poll() is None:
            raise NodeError(f"{name} is still running (pid {old.pid}); kill it first")
        sockets = {"observe": paths.observe_socket(self.rdir), "controller": paths.controller_socket(self.rdir)}
        if name in sockets:  # a killed one's file is still there: ready once the new one binds it again
            sockets[name].unlink(missing_ok=True)
        ready = {n: (lambda f=f: f.exists()) for n, f in sockets.items()}
        if name.startswith("daemon-"):
            dev = int(name.split("-", 1)[1])
            ready[name] = lambda: self._daemon_up(dev)
        self._service(name, self._argv[name])
        self._ready(name, ready[name])

    def kill_emulator(self, sig: int = signal.SIGKILL) -> None:
        """Signals the device server (fault injection) and waits until it is gone."""
        pid, self.emu_pid = self.emu_pid, None
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return

        def gone() -> bool:
            try:  # the server is this process's child (control.start): reap it
                return os.waitpid(pid, os.WNOHANG)[0] == pid
            except ChildProcessError:
                return not Path(f"/proc/{pid}").exists()

        wait_for(gone, 10.0, f"device server {pid} to exit", interval=0.002)

    def emulator_status(self) -> dict:
        from flexnpu.emulator import control

        return control.status(self.rdir)

    def stop(self) -> None:
        from flexnpu.emulator import control

        for p in self.programs:
            stop_process(p, 2.0)
        for name in ("controller", "observe", *sorted(n for n in self.services if n.startswith("daemon-"))):
            if name in self.services:
                stop_process(self.services[name])
        if self.emu_pid is not None:
            control.stop(self.rdir)
            self.emu_pid = None
        if self._own_rdir:
            shutil.rmtree(self.rdir, ignore_errors=True)
        self._stop_guard()

    def __enter__(self) -> LocalNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
