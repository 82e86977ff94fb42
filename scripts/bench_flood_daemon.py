#!/usr/bin/env python3
"""What a member of the flexnpu group can do to root's requests to a forwarding daemon.

    sudo .venv/bin/python scripts/bench_flood_daemon.py [--samples N] [--user USER]
                                                         [--code DIR] [--json]

It starts its own `flexnpu daemon --device 0` in a temp runtime dir (no device needed; soft
descriptor limit 1024 under a hard 16384, as a daemon started by hand gets; always stopped at
the end) with --clients admitted clients (32; forked children of the script holding their
admission connections), and, side by side in one run, times root's `ping` on
daemon-0.admin.sock (one at a time, 2 ms apart):

  - quiet:  nothing else;
  - list:   3 processes of the other user, 10 zmq REQ connections each to daemon-0.sock
            (all within the per-user cap), each sending `list` as soon as its last reply came;
  - list450: the same with 150 connections each;
  - conns:  4 processes of the other user opening plain unix connections to daemon-0.sock
            as fast as they can, each keeping its last 500 open.

Per scenario: p50/p99/max in ms and their ratio to quiet, the flood's `list` replies per
second, the daemon's most open descriptors, and whether it survived. A daemon that died
prints "died" with its exit status. --user runs the flood as that local user (a member of
the flexnpu group); without it a user is made for the run (and removed after), and the
flexnpu group too if the node has none. --code runs the daemon from another source tree (an
older one, for a before/after table).
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import zmq

from flexnpu.bench.node import stop_process

REPO = Path(__file__).resolve().parent.parent
GROUP = "flexnpu"

FLOODER = r"""
import json, os, socket, sys, threading, time
mode, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
count = [0]
if mode == "list":
    import zmq
    ctx = zmq.Context(io_threads=2)
    req = b'{"schema": 1, "cmd": "list"}'
    def send(s):  # never blocks: a connection the daemon closed has no peer until zmq reconnects
        try:
            s.send(req, zmq.NOBLOCK)
        except zmq.Again:
            pass
    socks = []
    for _ in range(n):
        s = ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.REQ_RELAXED, 1)
        s.setsockopt(zmq.REQ_CORRELATE, 1)
        s.connect("ipc://" + path)
        send(s)
        socks.append(s)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    def run():
        last = time.monotonic()
        while True:
            for s, _ in poller.poll(50):
                s.recv()
                count[0] += 1
                send(s)
            if time.monotonic() - last > 0.5:  # a cut connection lost its request: ask again
                last = time.monotonic()
                for s in socks:
                    if not s.poll(0):
                        send(s)
else:  # conns: plain connections, the last n kept open
    def run():
        held = []
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                time.sleep(0.0005)
                continue
            except OSError:
                s.close()
                time.sleep(0.01)
                continue
            count[0] += 1
            held.append(s)
            if len(held) > n:
                held.pop(0).close()
threading.Thread(target=run, daemon=True).start()
time.sleep(1.0)
print(json.dumps({"ready": True}), flush=True)
t0, c0 = time.monotonic(), count[0]
sys.stdin.readline()
print(json.dumps({"rate": (count[0] - c0) / (time.monotonic() - t0)}), flush=True)
"""


def pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@contextlib.contextmanager
def flood_user(name: str | None) -> Iterator[str]:
    """The flooding user: name, or one made for the run (and the group if missing), removed after."""
    if name:
        yield name
        return
    made_group = False
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", GROUP], check=True, capture_output=True)
        made_group = True
    user = "fxbench" + secrets.token_hex(3)
    try:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G", GROUP, user], check=True,
                       capture_output=True)
        yield user
    finally:
        subprocess.run(["userdel", user], capture_output=True)
        if made_group:
            subprocess.run(["groupdel", GROUP], capture_output=True)


@contextlib.contextmanager
def clients(rdir: Path, n: int) -> Iterator[None]:
    """n admitted clients of the daemon (forked children of this process, each holding its
    admission connection as a shim does), so that `list` has their records to gather."""
    from flexnpu.forward.daemon.admission import request_admission

    r, w = os.pipe()
    pids = []
    try:
        for _ in range(n):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(w)
                    answer, fds, conn = request_admission(rdir / "gate-0.sock")
                    code = 0 if answer["status"] == 0 else 1
                    os.read(r, 1)  # holds its slot until the parent closes the pipe (or dies)
                finally:
                    os._exit(code)
            pids.append(pid)
        yield
    finally:
        os.close(w)
        os.close(r)
        for pid in pids:
            os.waitpid(pid, 0)


class Daemon:
    def __init__(self, rdir: Path, code: Path):
        self.rdir = rdir
        self.log = open(rdir / "daemon.log", "wb")
        env = {**os.environ, "FLEXNPU_RUNTIME_DIR": str(rdir), "PYTHONPATH": str(code)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from flexnpu.cli import main; main()", "daemon", "--device", "0"], env=env,
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd="/",
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 16384)))
        self.ctx = zmq.Context()
        self.sock = None
        deadline = time.monotonic() + 30
        while not (rdir / "daemon-0.admin.sock").exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"the daemon did not start:\n{(rdir / 'daemon.log').read_text()[-2000:]}")
            time.sleep(0.05)
        self.sock = self._socket()
        self.ping()

    def _socket(self) -> zmq.Socket:
        s = self.ctx.socket(zmq.REQ)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 5000)
        s.connect(f"ipc://{self.rdir / 'daemon-0.admin.sock'}")
        return s

    def ping(self) -> float | None:
        """ms for one admin ping, None when no answer came within 5 s."""
        t = time.perf_counter()
        try:
            self.sock.send(b'{"schema": 1, "cmd": "ping"}')
            json.loads(self.sock.recv())
        except zmq.ZMQError:
            self.sock.close(0)
            self.sock = self._socket()
            return None
        return (time.perf_counter() - t) * 1e3

    def clients(self) -> int:
        self.sock.send(b'{"schema": 1, "cmd": "ping"}')
        return json.loads(self.sock.recv())["clients"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.ctx.term()
        stop_process(self.proc, 10)
        self.log.close()


@contextlib.contextmanager
def flooders(user: str, path: Path, mode: str, n: int, count: int) -> Iterator[list[subprocess.Popen]]:
    procs = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen(
                ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", sys.executable, "-c", FLOODER,
                 mode, str(path), str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True, cwd="/", start_new_session=True))
        for p in procs:
            line = p.stdout.readline()
            if not line:
                raise SystemExit(f"a {mode} flooder did not start")
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def rates(procs: list[subprocess.Popen]) -> float:
    total = 0.0
    for p in procs:
        try:
            p.stdin.write("stop\n")
            p.stdin.flush()
            total += json.loads(p.stdout.readline())["rate"]
        except (OSError, ValueError, KeyError):
            pass
    return total


def scenario(d: Daemon, samples: int) -> dict:
    lat, lost, peak = [], 0, [fds(d.proc.pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], fds(d.proc.pid))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    for _ in range(samples):
        if not d.alive():
            break
        ms = d.ping()
        if ms is None:
            lost += 1
        else:
            lat.append(ms)
        time.sleep(0.002)
    done.set()
    t.join()
    lat.sort()
    return {"p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99), "max_ms": lat[-1] if lat else float("nan"),
            "answered": len(lat), "unanswered": lost, "peak_fds": peak[0], "alive": d.alive(),
            "exit": d.proc.returncode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=400, help="admin pings per scenario")
    ap.add_argument("--clients", type=int, default=32, help="clients the daemon serves (their records make `list`)")
    ap.add_argument("--user", help="an existing member of the flexnpu group to flood as")
    ap.add_argument("--code", type=Path, default=REPO, help="source tree the daemon runs from")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_flood_daemon: needs root (a second user floods the daemon)")
    rdir = Path(tempfile.mkdtemp(prefix="fxbench-"))
    rdir.chmod(0o755)
    out: dict[str, dict] = {}
    stack = contextlib.ExitStack()
    try:
        with flood_user(a.user) as user:
            d = Daemon(rdir, a.code.resolve())  # after the group exists: the read socket is the group's
            try:
                stack.enter_context(clients(rdir, a.clients))
                deadline = time.monotonic() + 30
                while d.clients() < a.clients:
                    if time.monotonic() > deadline or not d.alive():
                        raise SystemExit(f"{a.clients} clients not admitted: {d.clients()}")
                    time.sleep(0.05)
                sock = rdir / "daemon-0.sock"
                out["quiet"] = scenario(d, a.samples)
                for name, conns in (("list", 10), ("list450", 150)):
                    if d.alive():
                        with flooders(user, sock, "list", conns, 3) as procs:
                            out[name] = scenario(d, a.samples)
                            out[name]["flood_per_s"] = rates(procs)
                if d.alive():
                    with flooders(user, sock, "conns", 500, 4) as procs:
                        out["conns"] = scenario(d, a.samples)
                        out["conns"]["flood_per_s"] = rates(procs)
                out["log_tail"] = {"text": (rdir / "daemon.log").read_text(errors="replace")[-600:]}
            finally:
                stack.close()
                d.stop()
    finally:
        shutil.rmtree(rdir, ignore_errors=True)
    if a.json:
        print(json.dumps(out, indent=1))
        return
    q = out["quiet"]
    print(f"root's ping on daemon-0.admin.sock, {a.samples} per scenario, daemon from {a.code} with "
          f"{a.clients} clients")
    print(f"{'scenario':9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'p50 x':>6} {'p99 x':>6} {'max x':>6} "
          f"{'flood/s':>9} {'peak fds':>8}  daemon")
    for name in ("quiet", "list", "list450", "conns"):
        r = out.get(name)
        if r is None:
            print(f"{name:9} (not run: the daemon had died)")
            continue
        state = "alive" if r["alive"] else f"died (exit {r['exit']})"
        if r["unanswered"]:
            state += f", {r['unanswered']} pings unanswered"
        print(f"{name:9} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['max_ms']:8.3f} {r['p50_ms'] / q['p50_ms']:6.1f} "
              f"{r['p99_ms'] / q['p99_ms']:6.1f} {r['max_ms'] / q['max_ms']:6.1f} {r.get('flood_per_s', 0):9.0f} "
              f"{r['peak_fds']:8d}  {state}")


if __name__ == "__main__":
    main()
