"""The device server under a hostile local user (docs/security.md, "The emulated device").

A member of the flexnpu group (a real user made for the test, removed after) may use the
emulator, and tries to take it away from everybody else with what the protocol allows:
connections that never say hello, status requests whose replies it never reads, kernel
launches it never waits for. Root plays the other user: its programs, `flexnpu emu status`
and its steps must go on in bounded time. A last test checks that the server never follows
a link placed at its socket path when it sets the socket's owner and mode.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from flexnpu import paths
from flexnpu.emulator import control
from flexnpu.emulator.profiles import PROFILES

from users_fixtures import _gid, flexnpu_group, member, open_rdir  # noqa: F401 (fixtures)

pytestmark = [
    pytest.mark.root_users,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and groups"),
]

REPO = Path(__file__).resolve().parents[1]
SAMPLE_LOOP = REPO / "flexnpu" / "samples" / "sample_loop.py"

# The attacker: one small program, run as the member, that prints one JSON line when its
# attack is in place (and, flooding, one per 0.2 s), then holds until killed.
ATTACKER = r"""
import ctypes, json, os, socket, struct, sys, threading, time
from flexnpu.emulator.control import _REQ, _REQ_STATUS
mode, sock, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
nstreams = int(sys.argv[4]) if len(sys.argv) > 4 else 1
def say(**kw):
    print(json.dumps(kw), flush=True)
def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(0.2)
    try:
        s.connect(sock)
    except OSError:
        s.close()
        return None
    s.setblocking(False)
    return s
held = []
if mode == "silent":
    end = time.monotonic() + 10
    while len(held) < n and time.monotonic() < end:
        s = connect()
        if s: held.append(s)
    say(opened=len(held))
elif mode == "hello":  # registered processes, as many as the server lets one user have
    refused = 0
    for i in range(n):
        s = connect()
        if not s: continue
        s.setblocking(True)
        s.send(_REQ.pack(1, 0, 2, 0, b""))
        msg, fds, _, _ = socket.recv_fds(s, 64, 4)
        for fd in fds: os.close(fd)
        if fds: held.append(s)
        else:
            refused += 1
            s.close()
    say(registered=len(held), refused=refused)
elif mode == "status":
    for i in range(n):
        s = connect()
        if not s: continue
        held.append(s)
        if i % 2:  # a registered client first, then the same abuse
            s.setblocking(True)
            s.send(_REQ.pack(1, 0, 2, 0, b""))
            msg, fds, _, _ = socket.recv_fds(s, 64, 4)
            for fd in fds: os.close(fd)
            s.setblocking(False)
    sent = 0
    for s in held:
        for _ in range(5000):
            try:
                s.send(_REQ.pack(_REQ_STATUS, 0, 0, 0, b""))
                sent += 1
            except OSError:  # its buffer is full: the replies are not read
                break
    say(sent=sent, conns=len(held))
elif mode == "flood":
    acl = ctypes.CDLL("libascendcl.so")
    assert acl.aclInit(None) == 0 and acl.aclrtSetDevice(0) == 0
    streams = [ctypes.c_void_p() for _ in range(nstreams)]
    binary, func = ctypes.c_void_p(), ctypes.c_void_p()
    assert all(acl.aclrtCreateStream(ctypes.byref(st)) == 0 for st in streams)
    assert acl.aclrtBinaryLoadFromFile(os.environ["FLEXNPU_EMU_KERNELS"].encode(), None, ctypes.byref(binary)) == 0
    assert acl.aclrtBinaryGetFunction(binary, b"synthetic", ctypes.byref(func)) == 0
    args = struct.pack("<dd", n * 1e-3 * 353.9e12, 0.0)
    count = [0]
    def report():
        while True:
            say(launches=count[0])
            time.sleep(0.2)
    threading.Thread(target=report, daemon=True).start()
    while True:
        if acl.aclrtLaunchKernel(func, 48, args, len(args), streams[count[0] % nstreams]) != 0:  # the whole device
            say(error=True)
            break
        count[0] += 1
sys.stdin.read()
"""


class Attacker:
    """The member's attack program; reads its JSON lines with timeouts."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.last: dict = {}

    def read(self, timeout: float = 20.0) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"the attacker said nothing for {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the attacker exited: {self.proc.stderr.read()}")
        self.last = json.loads(line)
        return self.last

    def latest(self, settle: float = 0.5) -> dict:
        """The last line it printed within `settle` seconds."""
        end = time.monotonic() + settle
        while time.monotonic() < end:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, end - time.monotonic()))
            if ready:
                self.read()
        return self.last

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()


@pytest.fixture
def user_env(acl_env):
    return {**acl_env, "PYTHONPATH": str(REPO)}


@pytest.fixture
def attack(member, user_env) -> Iterator:
    """attack(mode, sock, n): starts the attacker as the member; always killed after."""
    started: list[Attacker] = []

    def start(mode: str, sock: Path, n: int, *more) -> Attacker:
        argv = ["setpriv", f"--reuid={member}", f"--regid={member}", "--init-groups",
                sys.executable, "-c", ATTACKER, mode, str(sock), str(n), *map(str, more)]
        a = Attacker(subprocess.Popen(argv, env=user_env, cwd="/", stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def cpu_share(pid: int, seconds: float = 1.0) -> float:
    c0, t0 = cpu_s(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_s(pid) - c0) / (time.monotonic() - t0)


def wait_for(pred, timeout: float, step: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return pred()


def setdevice(workload: Path, env: dict, timeout: float = 15) -> dict:
    """A new program of root's: aclInit and aclrtSetDevice, to the end within `timeout`."""
    r = subprocess.run([str(workload), "setdevice", "0"], env=env, capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    return json.loads(r.stdout.strip().splitlines()[-1])


def steps(env: dict, seconds: float, timeout: float = 60) -> dict:
    """Root's serving loop: one 1 ms kernel and a synchronize per step; p50/p99 step ms."""
    r = subprocess.run([sys.executable, str(SAMPLE_LOOP), env["FLEXNPU_EMU_KERNELS"], "--seconds", str(seconds),
                        "--kernel-ms", "1", "--kernels", "1"], env=env, capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- connections without hello


@pytest.mark.slow
def test_silent_connections_are_bounded_closed_and_never_leak(flexnpu_group, emulator, open_rdir, attack,
                                                                acl_env, workload):
    emu = emulator()
    base = open_fds(emu.pid)
    a = attack("silent", open_rdir / "emu.sock", 300)
    assert a.read()["opened"] >= 100, a.last  # the server let them in (or its backlog held them)
    # the server holds a bounded number of them, and root's new programs go on, even a burst
    # of more at once than a user may have unregistered connections
    assert wait_for(lambda: open_fds(emu.pid) <= base + 40, 5), (base, open_fds(emu.pid))
    burst = [subprocess.Popen([str(workload), "setdevice", "0"], env=acl_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True) for _ in range(24)]
    try:
        outs = [p.communicate(timeout=30) for p in burst]
    finally:
        for p in burst:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for out, err in outs:
        assert json.loads(out.strip().splitlines()[-1])["set_device_rc"] == 0, (out, err)
    # one that never says anything is closed within the hello deadline, and nothing leaks
    assert wait_for(lambda: open_fds(emu.pid) <= base + 1, 15), (base, open_fds(emu.pid))
    a.stop()
    assert wait_for(lambda: open_fds(emu.pid) <= base, 5), (base, open_fds(emu.pid))
    assert emu.status()["devices"][0]["memory"]["used"] == 0


def test_one_user_cannot_fill_the_client_table(flexnpu_group, emulator, open_rdir, attack, acl_env, workload):
    emu = emulator()
    a = attack("hello", open_rdir / "emu.sock", 300)
    got = a.read(timeout=60)
    # a quarter of the table at most; the rest refused, not queued
    assert 0 < got["registered"] <= 64 and got["refused"] >= 300 - 64 - 16, got
    for _ in range(8):  # everyone else's programs still get in
        assert setdevice(workload, acl_env)["set_device_rc"] == 0
    a.stop()  # and its slots are free again once it goes
    a = attack("hello", open_rdir / "emu.sock", 8)
    assert a.read(timeout=60) == {"registered": 8, "refused": 0}


def test_at_the_descriptor_limit_the_server_neither_spins_nor_hangs_programs(flexnpu_group, emulator, open_rdir,
                                                                              attack, acl_env, workload):
    emu = emulator()
    base = open_fds(emu.pid)
    limit = base + 8  # fewer than the silent connections a user may have: the server runs out
    subprocess.run(["prlimit", f"--pid={emu.pid}", f"--nofile={limit}:{limit}"], check=True, timeout=10)
    a = attack("silent", open_rdir / "emu.sock", 200)
    assert a.read()["opened"] > 0, a.last
    assert cpu_share(emu.pid) < 0.5, "the server spins at the descriptor limit"
    for _ in range(3):  # each needs a socket and a device memory file
        out = setdevice(workload, acl_env)
        assert out["set_device_rc"] == 0, out
    st = control.status(open_rdir, timeout=3)
    assert st["devices"][0]["memory"]["used"] == 0
    assert "(uid" in (log := (open_rdir / "emu.log").read_text()) and "out of descriptors" in log, log


# ---------------------------------------------------------------- replies never read


def test_a_peer_that_never_reads_blocks_nobody(flexnpu_group, emulator, open_rdir, attack, acl_env, workload):
    emu = emulator()
    base = open_fds(emu.pid)
    a = attack("status", open_rdir / "emu.sock", 8)
    said = a.read()
    assert said["conns"] == 8 and said["sent"] > 8, said
    t0 = time.monotonic()
    st = control.status(open_rdir, timeout=3)  # `flexnpu emu status`
    assert time.monotonic() - t0 < 2 and st["devices"][0]["index"] == 0
    out = setdevice(workload, acl_env)
    assert out["set_device_rc"] == 0, out
    assert cpu_share(emu.pid) < 0.5, "the server spins on a peer that does not read"
    # asking again before reading the reply breaks request/reply: registered or not, each of
    # its connections was closed, while it still holds its end
    assert wait_for(lambda: open_fds(emu.pid) <= base, 5), (base, open_fds(emu.pid))
    assert "without reading the replies" in (open_rdir / "emu.log").read_text()
    a.stop()
    assert all(not c["alive"] for c in emu.status()["devices"][0]["clients"])


# ---------------------------------------------------------------- launches never waited for


@pytest.mark.slow
@pytest.mark.parametrize("mode,streams", [("serial", 1), ("serial", 8), ("shared", 8)])
def test_a_launch_flood_is_bounded_and_others_keep_their_latency(flexnpu_group, emulator, open_rdir, attack,
                                                                   acl_env, mode, streams):
    """A process that launches 1 ms kernels on `streams` streams and never waits: its queue
    stops at the bound, its launch sleeps, and root's 1 ms step waits for at most one of its
    ops (serial) or shares the device with it as one process (shared): about 2 ms."""
    emu = emulator(mode=mode)
    rss0 = rss_mb(emu.pid)
    alone = steps(acl_env, 1.0)
    a = attack("flood", open_rdir / "emu.sock", 1, streams)
    a.read()
    time.sleep(2)
    flooder = a.proc.pid
    launched = a.latest()["launches"]
    dev = emu.device()
    assert dev["pending_ops"] <= 4096, dev["pending_ops"]  # the stream depth of one process
    assert rss_mb(emu.pid) - rss0 < 64, (rss0, rss_mb(emu.pid))
    # the flooder's launch blocks (asleep, not spinning) and wakes as the device frees room
    assert cpu_share(flooder) < 0.5, "a launch on a full ring spins"
    time.sleep(0.5)
    assert 200 < a.latest()["launches"] - launched, (launched, a.last)
    busy = steps(acl_env, 2.0)
    assert busy["step_ms_p50"] < 4 * max(alone["step_ms_p50"], 1.0), (alone, busy)
    assert busy["step_ms_p99"] < 30, (alone, busy)
    assert rss_mb(emu.pid) - rss0 < 64, (rss0, rss_mb(emu.pid))


# ---------------------------------------------------------------- the socket's owner and mode


def test_the_socket_mode_and_group_never_follow_a_link(flexnpu_group, runtime_dir, tmp_path):
    """The server sets emu.sock's mode at bind (umask) and its group without following a
    link, so a link swapped in at the path after bind cannot redirect either to a file."""
    sock = runtime_dir / "emu.sock"
    log = tmp_path / "strace.log"
    argv = ["strace", "-f", "-qq", "-o", str(log), "-e",
            "trace=chmod,fchmodat,chown,fchownat,lchown,fchown,fchmod",
            str(paths.emulator_server_binary()), "--socket", str(sock), "--devices", "1", "--mode", "serial",
            *PROFILES["910b"].server_args(), "--client-group", flexnpu_group]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    server = None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready and proc.stdout.readline().strip() == b"ready"
        server = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        st = sock.lstat()
        assert oct(st.st_mode & 0o777) == oct(0o660) and st.st_gid == _gid(flexnpu_group)
    finally:
        # strace, signalled itself, would leave the server running: stop the server, and
        # strace ends with it
        if server is not None:
            os.kill(server, signal.SIGTERM)
            if not wait_for(lambda: proc.poll() is not None, 10):
                os.kill(server, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
    calls = [line for line in log.read_text().splitlines() if str(sock) in line]
    following = [c for c in calls if re.search(r"\b(chmod|fchmodat|chown)\(", c)
                 or (re.search(r"\bfchownat\(", c) and "AT_SYMLINK_NOFOLLOW" not in c)]
    assert not following, following
    assert any(re.search(r"\b(lchown|fchownat)\(", c) for c in calls), calls


# ---------------------------------------------------------------- replies that wait for room


def test_a_reply_larger_than_the_socket_takes_arrives_whole(emulator, open_rdir):
    """A status bigger than the socket buffer waits in the server for room and arrives whole;
    registration replies still carry their fds (the segment, the doorbell, device memory)."""
    import socket
    from flexnpu.emulator.control import _REP, _REQ, _REQ_STATUS

    emu = emulator(devices=16)
    conns = []
    try:
        for _ in range(56):  # 56 registered connections with 16 devices open each
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(5)
            s.connect(str(open_rdir / "emu.sock"))
            conns.append(s)
            s.send(_REQ.pack(1, 0, 2, 0, b""))
            _, fds, _, _ = socket.recv_fds(s, _REP.size, 4)
            assert len(fds) == 1
            for fd in fds:
                os.close(fd)
            for dev in range(16):
                s.send(_REQ.pack(2, dev, 0, 0, b""))
                msg, fds, _, _ = socket.recv_fds(s, _REP.size, 4)
                err, _, capacity, _ = _REP.unpack(msg)
                assert err == 0 and len(fds) == 3, (err, fds)
                assert os.fstat(fds[2]).st_size == capacity == emu.profile.capacity_gib * 2**30
                for fd in fds:
                    os.close(fd)
        q = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        q.settimeout(5)
        q.connect(str(open_rdir / "emu.sock"))
        conns.append(q)
        q.send(_REQ.pack(_REQ_STATUS, 0, 0, 0, b""))
        time.sleep(0.5)  # the server fills the socket and keeps the rest
        t0 = time.monotonic()
        st = control.status(open_rdir, timeout=3)  # meanwhile it serves others
        assert time.monotonic() - t0 < 2
        chunks = []
        while part := q.recv(1 << 16):
            chunks.append(part)
        data = b"".join(chunks)
        assert len(data) > 256 << 10, len(data)  # more than a unix socket holds
        got = json.loads(data)
        assert [len(d["clients"]) for d in got["devices"]] == [56] * 16
        assert len(st["devices"]) == 16
    finally:
        for s in conns:
            s.close()
