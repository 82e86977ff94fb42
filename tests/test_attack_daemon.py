"""The forwarding daemon's control sockets under a hostile member of the flexnpu group.

A member (a real user made for the test, removed after) may connect to daemon-0.sock, and
tries to take the daemon away from root with what that allows: more plain connections than
the daemon has descriptors (libzmq aborts the process when accept() fails with EMFILE), and
a flood of `list` requests from hundreds of zmq connections while root sends its requests to
the admin socket. The daemon is started the way a node starts it without systemd: a soft
descriptor limit of 1024 under a higher hard one. A last test checks, under strace, that
the daemon gives its three sockets their mode at bind and their group without following a
link at their paths.

Every process a test starts is stopped at teardown (the attackers by their process group).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import zmq

from flexnpu import SCHEMA, paths
from flexnpu.forward.daemon import control
from flexnpu.forward.daemon import server as forward_daemon
from test_daemon_fixtures import FLEXNPU, DaemonProcess, wait_for
from users_fixtures import _gid, flexnpu_group, member, open_rdir  # noqa: F401 (fixtures)

pytestmark = [
    pytest.mark.root_users,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and groups"),
]

REPO = Path(__file__).resolve().parents[1]
SOFT, HARD = 1024, 16384  # a node's usual limits for a process started by hand
CAP = 32  # control.CONNECTIONS_PER_UID (checked below)
LEAST_FDS = 4096  # daemon.MIN_FD_LIMIT (checked below)

# The attacker, run as the member: prints one JSON line when its attack is in place, then
# (conns) one more after `hold` seconds, and holds until its stdin closes.
ATTACKER = r"""
import json, os, socket, sys, threading, time
mode, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def say(**kw):
    print(json.dumps(kw), flush=True)
if mode == "conns":  # n plain unix connections that never speak ZMTP
    hold = float(sys.argv[4])
    held, refused, t0 = [], 0, time.monotonic()
    while len(held) < n and time.monotonic() - t0 < 30:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            s.connect(path)
        except BlockingIOError:  # the listen backlog is full: once more, after the daemon accepted some
            s.close()
            time.sleep(0.001)
            continue
        except OSError:
            s.close()
            refused += 1
            if refused > 200:  # nobody listens any more
                break
            continue
        held.append(s)
    say(opened=len(held), refused=refused, s=round(time.monotonic() - t0, 2))
    time.sleep(hold)
    alive = 0
    for s in held:  # past the daemon's ZMTP greeting: open, or at its end
        try:
            while s.recv(4096):
                pass
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    say(opened=len(held), alive=alive)
elif mode == "list":  # n zmq REQ connections, each sending `list` as fast as replies come
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
        s.setsockopt(zmq.REQ_RELAXED, 1)  # a cut connection: send again instead of waiting forever
        s.setsockopt(zmq.REQ_CORRELATE, 1)
        s.connect("ipc://" + path)
        send(s)
        socks.append(s)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    replies = [0]
    def pump():
        last = time.monotonic()
        while True:
            for s, _ in poller.poll(50):
                s.recv()
                replies[0] += 1
                send(s)
            if time.monotonic() - last > 0.5:  # requests lost with a cut connection: ask again
                last = time.monotonic()
                for s in socks:
                    if not s.poll(0):
                        send(s)
    threading.Thread(target=pump, daemon=True).start()
    time.sleep(1.0)
    say(flooding=len(socks), replies=replies[0])
sys.stdin.readline()
"""


def next_line(p: subprocess.Popen, timeout: float = 60) -> dict:
    """The attacker's next JSON line, read unbuffered (a buffered read could take the line
    after it too, and select would not see that one)."""
    line, deadline = b"", time.monotonic() + timeout
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
        byte = os.read(p.stdout.fileno(), 1) if ready else b""
        assert byte, f"the attacker said nothing more (exit {p.poll()}) after {line!r}"
        line += byte
    return json.loads(line)


@contextlib.contextmanager
def attackers(user: str, rdir: Path, mode: str, *args: object, count: int = 1) -> Iterator[list[subprocess.Popen]]:
    """count attacker processes of user, each past its first line (in p.said); all of them
    (their whole process groups) are killed at exit, whatever happened."""
    procs = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen(
                ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", sys.executable, "-c", ATTACKER,
                 mode, str(paths.daemon_socket(0, rdir)), *map(str, args)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0, cwd="/",
                start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)}))
        for p in procs:
            p.said = next_line(p)
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait(timeout=10)
            p.stdin.close()
            p.stdout.close()


@pytest.fixture
def limited_daemon(runtime_dir: Path, open_rdir: Path, flexnpu_group: str) -> Iterator:
    """Factory: a `flexnpu daemon --device 0` with RLIMIT_NOFILE soft:hard, after the
    flexnpu group exists (so daemon-0.sock is the group's). Stopped at teardown."""
    started: list[DaemonProcess] = []

    def start(soft: int = SOFT, hard: int = HARD, *argv: str) -> DaemonProcess:
        log = runtime_dir / f"daemon-0.{len(started)}.log"

        def limits() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        with open(log, "wb") as out:
            proc = subprocess.Popen([FLEXNPU, "daemon", "--device", "0", *argv], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=limits)
        d = DaemonProcess(0, runtime_dir, proc, log)
        started.append(d)
        d.wait_ready()
        return d

    yield start
    for d in started:
        d.stop()


def fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:  # gone
        return 0


@contextlib.contextmanager
def fd_peak(pid: int) -> Iterator[list[int]]:
    """The most descriptors pid held while the block ran (sampled every ms), in peak[0]."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], fds(pid))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield peak
    finally:
        done.set()
        t.join(timeout=5)


class Root:
    """Root's own zmq client of the admin socket, timing each request."""

    def __init__(self, rdir: Path, admin: bool = True):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 5000)
        self.sock.connect(f"ipc://{paths.daemon_admin_socket(0, rdir) if admin else paths.daemon_socket(0, rdir)}")

    def ask(self, cmd: str = "ping") -> tuple[dict, float]:
        t = time.perf_counter()
        self.sock.send(json.dumps({"schema": SCHEMA, "cmd": cmd}).encode())
        reply = json.loads(self.sock.recv())
        return reply, (time.perf_counter() - t) * 1e3

    def latencies(self, n: int, gap_s: float = 0.002) -> list[float]:
        out = []
        for _ in range(n):
            reply, ms = self.ask()
            assert reply["ok"], reply
            out.append(ms)
            time.sleep(gap_s)
        return sorted(out)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@contextlib.contextmanager
def root_client(rdir: Path, admin: bool = True) -> Iterator[Root]:
    r = Root(rdir, admin)
    try:
        yield r
    finally:
        r.close()


def pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# ---------------------------------------------------------------- connections


@pytest.mark.slow
def test_a_connection_flood_is_capped_per_user_and_never_aborts_the_daemon(limited_daemon, member, open_rdir):
    """1500 plain connections from one member, against a daemon started with 1024
    descriptors: it keeps serving root, holds at most its per-user cap of them, and ends
    with the descriptors it started with."""
    d = limited_daemon()
    base = fds(d.pid)
    with attackers(member, open_rdir, "conns", 1500, 1.0) as (a,):
        assert a.said["opened"] > SOFT, a.said  # more than the daemon's soft limit got through connect
        assert d.proc.poll() is None, d.log()[-2000:]
        with root_client(open_rdir) as root:
            lat = root.latencies(20)
        assert pct(lat, 0.5) < 50, lat
        assert d.client.ping()["pid"] == d.pid
        assert fds(d.pid) < base + 4 * CAP + 64, (base, fds(d.pid))
        assert next_line(a)["alive"] <= CAP  # the rest were closed by the daemon
    assert d.proc.poll() is None, d.log()[-2000:]
    assert "the most one user may" in d.log() and control.CONNECTIONS_PER_UID == CAP
    wait_for(lambda: fds(d.pid) <= base + 2, 10, f"the daemon back to its {base} descriptors")


def test_root_is_not_capped_while_a_member_is_cut_beyond_its_cap(limited_daemon, member, open_rdir):
    """The member's plain connections beyond its cap are closed at once (the others after
    the handshake interval); root's 2 x cap zmq connections are all served meanwhile."""
    d = limited_daemon()
    cap = CAP
    with attackers(member, open_rdir, "conns", 3 * cap, 0.5) as (a,):
        assert a.said["opened"] == 3 * cap, a.said
        ctx = zmq.Context()
        try:
            socks = []
            for _ in range(2 * cap):
                s = ctx.socket(zmq.REQ)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.RCVTIMEO, 5000)
                s.connect(f"ipc://{d.socket}")
                socks.append(s)
            for s in socks:
                s.send(b'{"schema": 1, "cmd": "ping"}')
            assert all(json.loads(s.recv())["ok"] for s in socks)
        finally:
            ctx.destroy(0)
        assert next_line(a)["alive"] <= cap
    assert "the most one user may" in d.log()


@pytest.mark.slow
def test_at_the_least_descriptor_limit_a_flood_from_six_processes_is_survived(limited_daemon, member, open_rdir):
    """The daemon's descriptor limit is what it asks for at the least (daemon.MIN_FD_LIMIT,
    nothing to raise to): 24000 connections from six processes of one member, as fast as
    they connect, never bring it to the limit (libzmq aborts there)."""
    d = limited_daemon(LEAST_FDS, LEAST_FDS)
    assert "file descriptors at most" not in d.log()  # no warning at this limit
    with fd_peak(d.pid) as peak, attackers(member, open_rdir, "conns", 4000, 0.2, count=6) as procs:
        for p in procs:
            assert p.said["opened"] == 4000, p.said
            next_line(p)
    assert d.proc.poll() is None, d.log()[-2000:]
    assert d.client.ping()["pid"] == d.pid
    assert peak[0] < LEAST_FDS * 3 // 4, peak
    assert forward_daemon.MIN_FD_LIMIT == LEAST_FDS


# ---------------------------------------------------------------- a list flood


@pytest.mark.slow
def test_a_list_flood_does_not_delay_roots_admin_requests(limited_daemon, member, open_rdir):
    """Three member processes flood `list` from 150 zmq connections each (450, as many as
    they like): the daemon holds at most the member's cap of them, serves the rest of the
    flood from those, and root's requests to the admin socket are answered within a bound
    meanwhile (they wait for one read request at most, on their own zmq I/O thread)."""
    d = limited_daemon()
    base = fds(d.pid)
    with root_client(open_rdir) as root:
        quiet = root.latencies(100)
        with fd_peak(d.pid) as peak, attackers(member, open_rdir, "list", 150, count=3) as procs:
            assert sum(p.said["replies"] for p in procs) > 0, [p.said for p in procs]  # the flood is served
            flooded = root.latencies(300)
            held = fds(d.pid) - base
    assert d.proc.poll() is None, d.log()[-2000:]
    summary = {"quiet p50": pct(quiet, 0.5), "flood p50": pct(flooded, 0.5), "flood p99": pct(flooded, 0.99),
               "flood max": flooded[-1], "member connections held": held, "most descriptors": peak[0] - base}
    assert held <= CAP + 8, summary  # + root's and a few being closed
    assert summary["flood p50"] < 2.0, summary
    assert summary["flood p99"] < 15.0, summary


# ---------------------------------------------------------------- the sockets' modes


def test_the_sockets_mode_and_group_never_follow_a_link(runtime_dir, flexnpu_group, tmp_path):
    """The daemon gives daemon-0.sock, daemon-0.admin.sock and gate-0.sock their mode with the
    umask at bind and their group with lchown: under strace, no chmod and no chown that
    follows a link names any of them, and each gets its group without following one."""
    log = tmp_path / "strace.log"
    socks = [paths.daemon_socket(0, runtime_dir), paths.daemon_admin_socket(0, runtime_dir),
             paths.gate_socket(0, runtime_dir)]
    proc = subprocess.Popen(["strace", "-f", "-qq", "-o", str(log), "-e",
                             "trace=chmod,fchmodat,chown,fchownat,lchown,fchown,fchmod", FLEXNPU, "daemon",
                             "--device", "0"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    d = DaemonProcess(0, runtime_dir, proc, tmp_path / "none.log")  # its pid is strace's
    try:
        wait_for(lambda: d.socket.exists() and socks[2].exists() and d.client.ping(), 30, "the daemon under strace")
        gid = _gid(flexnpu_group)
        for path, mode in zip(socks, (0o660, 0o600, 0o660)):
            st = path.lstat()
            assert (oct(st.st_mode & 0o777), st.st_gid == gid or mode == 0o600) == (oct(mode), True), path
    finally:
        # the daemon first: strace stopped by a signal detaches and leaves its tracee running
        try:
            traced = [int(x) for x in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        except OSError:
            traced = []
        for pid in traced:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        d.stop()
        for pid in traced:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    calls = log.read_text().splitlines()
    for path in socks:
        mine = [c for c in calls if f'"{path}"' in c]
        following = [c for c in mine if re.search(r"\b(chmod|fchmodat|chown)\(", c)
                     or (re.search(r"\bfchownat\(", c) and "AT_SYMLINK_NOFOLLOW" not in c)]
        assert not following, following
        if path != socks[1]:  # the admin socket keeps root's group without --admin-group
            assert any(re.search(r"\b(lchown|fchownat)\(", c) for c in mine), (path, mine)
