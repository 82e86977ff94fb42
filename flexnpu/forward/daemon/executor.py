"""The daemon's side of forwarded execution: it makes the executor's socket, starts the
executor of its device (native, flexnpu/forward/native/executor/executor.c) and restarts it if it dies.

The daemon owns exec-<dev>.sock (made with the same mode and group as the admission socket,
so the same users may connect) and the gate table; the executor gets both as descriptors and
never opens a path a client could have planted. Because the daemon holds the listening
socket, clients that connect while an executor restarts wait in its backlog instead of
failing. What a restart loses is in docs/reliability.md: the forwarded clients' device state
(memory, streams), whose calls fail at once with ACL_ERROR_RT_SOCKET_CLOSE.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

from flexnpu import paths

log = logging.getLogger("flexnpu.daemon")

READY_TIMEOUT_S = 10.0
RESTART_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)  # after consecutive failures
STABLE_S = 10.0  # an executor that lived this long resets the backoff


class ExecutorSupervisor:
    """Starts and keeps the executor of one device. `start()` binds the socket and starts the
    executor (returns when it said ready, or raises); `stop()` ends it."""

    def __init__(self, device: int, rdir: Path, policy, verbose: bool = False):
        self.device = device
        self.rdir = rdir
        self.policy = policy
        self.verbose = verbose
        self.path = paths.executor_socket(device, rdir)
        self.sock: socket.socket | None = None
        self.ctl_fd = -1
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @staticmethod
    def available() -> bool:
        return paths.executor_binary().is_file()

    def start(self) -> None:
        """Makes the socket; the executor starts at the first wanted() (a client admitted in
        forward mode), so a node that runs no forwarded program has no executor holding a
        context on its device. A client that connects first waits in the socket's backlog."""
        self.path.unlink(missing_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        with self.policy.binding(self.path):
            s.bind(str(self.path))
        s.listen(128)
        self.sock = s
        self.ctl_fd = os.open(paths.gate_table(self.device, self.rdir), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)

    def wanted(self) -> None:
        """Starts the executor (and its watch) if it is not running yet; returns at once."""
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._first, name=f"executor-{self.device}", daemon=True)
            self._thread.start()

    def _first(self) -> None:
        try:
            self._spawn()
        except (OSError, RuntimeError) as e:
            log.error("%s", e)
            self.started_at = time.monotonic()
            with self._lock:
                self._thread = None  # the next forward-mode client tries again
            return
        self._watch()

    def _spawn(self) -> None:
        fds = (self.sock.fileno(), self.ctl_fd)
        cmd = [str(paths.executor_binary()), "--device", str(self.device), "--listen-fd", str(fds[0]),
               "--ctl-fd", str(fds[1])] + (["--verbose"] if self.verbose else [])
        proc = subprocess.Popen(cmd, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                                start_new_session=False)
        line = ""
        deadline = time.monotonic() + READY_TIMEOUT_S
        # the ready line, or its exit; read in a thread so a silent executor cannot hang the daemon
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=max(0.0, deadline - time.monotonic()))
        line = got[0] if got else ""
        if line.strip() != "ready":
            proc.kill()
            proc.wait()
            raise RuntimeError(f"device {self.device}: the executor did not start (exit {proc.returncode}); "
                               f"its reason is in the log above")
        with self._lock:
            if self._stop.is_set():  # stopped while it started
                proc.terminate()
                proc.wait()
                return
            self.proc = proc
        self.started_at = time.monotonic()
        log.info("device %d: executor pid %d serves forwarded clients on %s", self.device, proc.pid, self.path)

    def _watch(self) -> None:
        failures = 0
        while not self._stop.is_set():
            proc = self.proc
            if proc is None:
                return
            rc = proc.wait()
            if self._stop.is_set():
                return
            lived = time.monotonic() - self.started_at
            failures = 0 if lived >= STABLE_S else failures + 1
            delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            log.warning("device %d: the executor (pid %d) exited %s after %.1f s; its forwarded clients' calls now "
                        "fail; restarting in %.1f s", self.device, proc.pid, rc, lived, delay)
            if self._stop.wait(delay):
                return
            try:
                self._spawn()
                self.restarts += 1
            except (OSError, RuntimeError) as e:
                log.error("%s", e)
                self.started_at = time.monotonic()
                self.proc = proc  # wait() on it returns at once: the loop backs off and tries again

    def info(self) -> dict:
        p = self.proc
        return {"pid": p.pid if p and p.poll() is None else None, "restarts": self.restarts,
                "socket": str(self.path)}

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.sock is not None:
            self.sock.close()
            self.path.unlink(missing_ok=True)
        if self.ctl_fd >= 0:
            os.close(self.ctl_fd)
            self.ctl_fd = -1
