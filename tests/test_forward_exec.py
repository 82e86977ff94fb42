"""Forwarded execution: programs run under `libflexnpu_fwd.so` (`flexnpu run --forward`), their
AscendCL calls carried to the device's executor (started by a real `flexnpu daemon`), which runs
them in the one context it owns on the emulator's real server.

Checked here: a forwarded program gets what it gets without FlexNPU (results and every error
code), its device work runs in the executor's context, IPC memory between two forwarded
programs is the same memory, the executor checks every pointer and handle a client names
(also for other users, and for a hostile ring), and the faults: an executor or daemon that
dies fails every call at once, a killed client's memory and streams are freed.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_daemon_fixtures import FLEXNPU, daemons, wait_for  # noqa: F401  (fixtures)
from users_fixtures import flexnpu_group, member, open_rdir  # noqa: F401  (fixtures)

from flexnpu import paths
from flexnpu.forward.daemon.admission import request_admission

PROGS = Path(__file__).resolve().parent / "progs"
MIB = 1 << 20
PARAM_INVALID = 100000
REFUSED = 507899
SOCKET_CLOSE = 507901  # ACL_ERROR_RT_SOCKET_CLOSE: the executor went away
D2D = 3
KLIB = str(paths.emulator_kernel_library())
# what the timing of a run depends on, left out of the comparisons
TIMING_KEYS = {"pid", "wall_ms", "event_ms", "elapsed_ms", "t_start_ns", "t_end_ns", "stream1_ms", "stream2_ms",
               "after_event_ms"}


@pytest.fixture
def node(emulator, daemons):  # noqa: F811
    """An emulator with one device and its daemon (which starts the executor)."""
    emu = emulator()
    d = daemons(0)
    wait_for(lambda: paths.executor_socket(0, emu.rdir).exists(), 10, "the executor's socket")
    return emu, d


@pytest.fixture
def fwd_env(acl_env):
    return {**acl_env, "LD_PRELOAD": str(paths.forward_shim_library()), "FLEXNPU_ROLE": "auto"}


def executor_pid(emu) -> int:
    """The executor: the emulator's client whose command is flexnpu-executor (the daemon starts
    it at the first client admitted in forward mode)."""
    def find():
        for c in emu.device()["clients"]:
            try:
                if c["alive"] and Path(f"/proc/{c['pid']}/exe").resolve().name == "flexnpu-executor":
                    return c["pid"]
            except OSError:
                pass
        return None

    return wait_for(find, 10, "an executor among the emulator's clients")


def run(argv, env, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def last_json(p: subprocess.CompletedProcess) -> dict:
    import json

    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"rc {p.returncode}\nstdout {p.stdout}\nstderr {p.stderr}"
    return json.loads(lines[-1])


def same_answers(workload, acl_env, fwd_env, *args) -> tuple[dict, dict]:
    direct = last_json(run([workload, *args], acl_env))
    fwd = last_json(run([workload, *args], fwd_env))
    a = {k: v for k, v in direct.items() if k not in TIMING_KEYS}
    b = {k: v for k, v in fwd.items() if k not in TIMING_KEYS}
    assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    return direct, fwd


# ---------------------------------------------------------------- as without FlexNPU


@pytest.mark.parametrize("args", [
    ("badargs", KLIB),
    ("copyback", str(3 * MIB + 17)),
    ("oom",),
    ("waitevent", KLIB, "1e12", "1e12"),
])
def test_a_forwarded_program_gets_what_it_gets_without_flexnpu(node, workload, acl_env, fwd_env, args):
    """Every return code (bad input included), every byte read back, every memory figure."""
    same_answers(workload, acl_env, fwd_env, *args)


def test_forwarded_work_runs_in_the_executors_context(node, workload, fwd_env):
    emu, d = node
    p = run([workload, "timing", KLIB, "1e10", "0", "25", "--reps", "2"], fwd_env)
    out = last_json(p)
    assert out["ok"], p.stderr
    ex = executor_pid(emu)
    # the program never opened the device itself: the executor ran its kernels
    assert all(c["pid"] != out["pid"] for c in emu.device()["clients"])
    assert emu.client(ex)["count_by_name"].get("synthetic", 0) == 1 + 25 * 2  # a warm-up kernel, 2 reps of 25
    assert emu.device()["context_switches"] == 0  # one context: no switch, whoever runs


def test_the_daemon_lists_a_forwarded_client_in_forward_mode(node, spawn, acl_programs, fwd_env):
    emu, d = node
    p = spawn([acl_programs["ipc_peer"]], env=fwd_env)
    assert p.read()["ready"]
    e = d.wait_admitted(p.proc.pid)
    assert e["mode"] == "forward"
    text = subprocess.run([FLEXNPU, "gate", "list", "--device", "0"], capture_output=True, text=True,
                          timeout=30, env=fwd_env | {"LD_PRELOAD": ""}).stdout
    assert any(line.split()[:3] == [str(p.proc.pid), "auto", "fwd"] for line in text.splitlines()), text


def test_flexnpu_run_forward_and_its_fallback(node, workload, acl_env, runtime_dir):
    env = {**acl_env}
    r = run([FLEXNPU, "run", "--forward", "--", workload, "copyback", "4096"], env)
    assert last_json(r)["ok"], r.stderr
    # a device with no executor: refused, or gated with --fallback gated
    r = run([FLEXNPU, "run", "--forward", "--device", "3", "--", workload, "copyback", "4096"], env)
    assert r.returncode == 1 and "device 3 has no executor" in r.stderr, r.stderr
    r = run([FLEXNPU, "run", "--forward", "--fallback", "gated", "--device", "0", "--", workload, "copyback",
             "4096"], env)
    assert last_json(r)["ok"] and "not forwarded" not in r.stderr, r.stderr
    r = run([FLEXNPU, "run", "--forward", "--fallback", "sometimes", "--", workload, "oom"], env)
    assert r.returncode == 2 and "--fallback takes gated or none" in r.stderr


# ---------------------------------------------------------------- IPC: the same memory


def ok(reply: dict) -> dict:
    assert reply["rc"] == 0, reply
    return reply


@pytest.fixture
def fpeer(spawn, acl_programs, fwd_env):
    def start(env=None):
        p = spawn([acl_programs["ipc_peer"]], env=env or fwd_env)
        assert p.read()["ready"]
        return p

    return start


def test_ipc_between_forwarded_programs_is_the_same_memory(node, fpeer):
    emu, _ = node
    a, b = fpeer(), fpeer()
    size = 2 * MIB + 5
    ha = ok(a.ask(f"malloc {size}"))["h"]
    ok(a.ask(f"fill {ha} 0 {size} 90"))
    ex = executor_pid(emu)
    before = emu.client(ex)
    key = ok(a.ask(f"export {ha} 0 {size} 0"))["key"]
    assert ok(b.ask("pid"))["pid"] == b.proc.pid  # the pid the exporter lists
    ok(a.ask(f"setpid {key} {b.proc.pid}"))
    hb = ok(b.ask(f"import {key} 0 {size}"))["h"]
    # the import is the exporter's memory itself: the same address in the one context
    assert ok(a.ask(f"ptr {ha}"))["ptr"] == ok(b.ask(f"ptr {hb}"))["ptr"]
    after = emu.client(ex)
    assert after["ops"]["copy"] == before["ops"]["copy"]
    assert after["bytes_copied"] == before["bytes_copied"]
    assert after["memory_used"] == before["memory_used"]  # counted once
    r = ok(b.ask(f"read {hb} 0 {size}"))
    assert r["first"] == 90 and r["same"]
    ok(b.ask(f"memset {hb} 4096 1000 17"))
    r = ok(a.ask(f"read {ha} 4096 1000"))
    assert r["first"] == 17 and r["same"]
    assert b.ask(f"read {hb} {size - 10} 20")["rc"] == PARAM_INVALID  # not a byte past the export
    # the exporter frees: the importer keeps the memory until it closes
    ok(a.ask(f"free {ha}"))
    r = ok(b.ask(f"read {hb} 0 16"))
    assert r["first"] == 90
    ok(b.ask(f"close {key}"))
    assert b.ask(f"read {hb} 0 16")["rc"] == PARAM_INVALID


def test_only_the_listed_process_may_import(node, fpeer):
    a, b, c = fpeer(), fpeer(), fpeer()
    ha = ok(a.ask(f"malloc {MIB}"))["h"]
    key = ok(a.ask(f"export {ha} 0 {MIB} 0"))["key"]
    assert c.ask(f"import {key} 0 16")["rc"] == REFUSED  # nobody listed
    ok(a.ask(f"setpid {key} {b.proc.pid}"))
    assert c.ask(f"import {key} 0 16")["rc"] == REFUSED  # someone else listed
    assert c.ask(f"setpid {key} {c.proc.pid}")["rc"] != 0  # nor may it list itself
    ok(b.ask(f"import {key} 0 16"))


# ---------------------------------------------------------------- trust: another process's memory


def test_a_client_cannot_name_another_clients_memory(node, fpeer):
    victim, thief = fpeer(), fpeer()
    hv = ok(victim.ask(f"malloc {MIB}"))["h"]
    ok(victim.ask(f"fill {hv} 0 {MIB} 77"))
    ptr = ok(victim.ask(f"ptr {hv}"))["ptr"]
    ht = ok(thief.ask(f"adopt {ptr} {MIB}"))["h"]
    mine = ok(thief.ask(f"malloc {4096}"))["h"]
    ok(thief.ask(f"fill {mine} 0 4096 5"))
    assert thief.ask(f"read {ht} 0 4096")["rc"] == PARAM_INVALID  # read
    assert thief.ask(f"read {ht} 0 4096 async")["rc"] == PARAM_INVALID
    assert thief.ask(f"fill {ht} 0 4096 1")["rc"] == PARAM_INVALID  # write
    assert thief.ask(f"fill {ht} 0 4096 1 async")["rc"] == PARAM_INVALID
    assert thief.ask(f"memset {ht} 0 4096 1")["rc"] == PARAM_INVALID
    assert thief.ask(f"copy {ht} {mine} 4096 {D2D}")["rc"] == PARAM_INVALID
    assert thief.ask(f"kernel {ht} {mine} 4096")["rc"] == PARAM_INVALID  # launch on it
    assert thief.ask(f"free {ht}")["rc"] == PARAM_INVALID  # free it
    assert thief.ask(f"export {ht} 0 4096 1")["rc"] != 0  # export it
    r = ok(victim.ask(f"read {hv} 0 {MIB}"))  # untouched
    assert r["first"] == 77 and r["same"]


@pytest.mark.root_users
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and groups")
def test_another_user_cannot_name_a_clients_memory(flexnpu_group, member, open_rdir, node, spawn,  # noqa: F811
                                                   acl_programs, fwd_env):
    victim = spawn([acl_programs["ipc_peer"]], env=fwd_env)
    assert victim.read()["ready"]
    exe = acl_programs["ipc_peer"]
    os.chmod(exe.parent, 0o755)
    thief = spawn(["setpriv", f"--reuid={member}", f"--regid={member}", "--init-groups", exe], env=fwd_env)
    r = thief.read()
    assert r["ready"], r
    hv = ok(victim.ask(f"malloc {MIB}"))["h"]
    ok(victim.ask(f"fill {hv} 0 {MIB} 66"))
    key = ok(victim.ask(f"export {hv} 0 {MIB} 1"))["key"]  # no pid list: the exporter's user only
    ptr = ok(victim.ask(f"ptr {hv}"))["ptr"]
    ht = ok(thief.ask(f"adopt {ptr} {MIB}"))["h"]
    assert thief.ask(f"read {ht} 0 16")["rc"] == PARAM_INVALID
    assert thief.ask(f"fill {ht} 0 16 1")["rc"] == PARAM_INVALID
    assert thief.ask(f"free {ht}")["rc"] == PARAM_INVALID
    assert thief.ask(f"import {key} 0 16")["rc"] == REFUSED
    r = ok(victim.ask(f"read {hv} 0 {MIB}"))
    assert r["first"] == 66 and r["same"]


# ---------------------------------------------------------------- faults


def test_a_killed_executor_fails_every_call_at_once_and_comes_back(node, fpeer, workload, fwd_env):
    emu, d = node
    a = fpeer()
    h = ok(a.ask(f"malloc {MIB}"))["h"]
    old = executor_pid(emu)
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: a.ask(f"read {h} 0 16")["rc"] == SOCKET_CLOSE, 5, "a failing call")
    assert time.monotonic() - t0 < 2.0
    for cmd in (f"fill {h} 0 16 1 async", "malloc 4096", f"read {h} 0 16"):
        t = time.monotonic()
        assert a.ask(cmd)["rc"] == SOCKET_CLOSE
        assert time.monotonic() - t < 0.5  # at once, never a hang
    # the daemon starts another: new programs work
    wait_for(lambda: any(c["pid"] != old for c in emu.device()["clients"]) or
             run([workload, "copyback", "4096"], fwd_env).returncode == 0, 15, "a new executor")
    r = run([workload, "copyback", "4096"], fwd_env)
    assert last_json(r)["ok"], r.stderr
    assert "the executor" in d.log() and "restarting" in d.log()


def test_a_killed_daemon_takes_its_executor_and_calls_fail_at_once(node, fpeer):
    emu, d = node
    a = fpeer()
    h = ok(a.ask(f"malloc {MIB}"))["h"]
    ex = executor_pid(emu)
    d.kill()
    wait_for(lambda: not Path(f"/proc/{ex}").exists() or
             Path(f"/proc/{ex}/stat").read_text().split(")")[1].split()[0] == "Z", 5, "the executor's end")
    t = time.monotonic()
    assert a.ask(f"read {h} 0 16")["rc"] == SOCKET_CLOSE
    assert time.monotonic() - t < 1.0


def test_a_client_killed_mid_operation_frees_its_memory_and_streams(node, fpeer):
    emu, _ = node
    a = fpeer()
    ex = executor_pid(emu)
    base = emu.client(ex)
    h1 = ok(a.ask(f"malloc {8 * MIB}"))["h"]
    ok(a.ask(f"malloc {MIB}"))
    ok(a.ask(f"fill {h1} 0 {8 * MIB} 3 async"))
    assert emu.client(ex)["memory_used"] > base["memory_used"]
    a.proc.stdin.write(f"fill {h1} 0 {8 * MIB} 4 async\n")  # in flight as it dies
    a.proc.stdin.flush()
    a.proc.kill()
    a.proc.wait()
    wait_for(lambda: emu.client(ex)["memory_used"] == base["memory_used"], 10, "the killed client's memory freed")
    c = emu.client(ex)
    assert c["allocs"] - c["frees"] == base["allocs"] - base["frees"]


# ---------------------------------------------------------------- the ring is untrusted input


class RawClient:
    """A process that is admitted in forward mode and then writes what it likes in its ring."""

    def __init__(self, rdir: Path, host_bytes: int = 1 << 20):
        self.welcome, fds, self.gate = request_admission(paths.gate_socket(0, rdir), mode=1)
        for fd in fds:
            os.close(fd)
        self.hdr, self.compl, self.ring_bytes = 4096, 64 * 512, 4 << 20
        self.ring_off = self.hdr + self.compl
        self.total = self.ring_off + self.ring_bytes + (8 << 20) + host_bytes
        self.fd = os.memfd_create("raw", os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, self.total)
        self.host_bytes = host_bytes
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(str(paths.executor_socket(0, rdir)))

    def hello(self, seal: bool = True, host_bytes: int | None = None) -> tuple[int, str]:
        import fcntl

        if seal:
            fcntl.fcntl(self.fd, 1033, 0x0002 | 0x0004 | 0x0001)  # F_ADD_SEALS: SHRINK | GROW | SEAL
        hb = self.host_bytes if host_bytes is None else host_bytes
        msg = struct.pack("<IIQQQ", 0x464E5046, 1, hb, 0x7F0000000000, 0)
        self.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", self.fd))])
        data = self.sock.recv(256)
        status = struct.unpack_from("<IIi", data)[2]
        self.mem = mmap.mmap(self.fd, self.total) if status == 0 else None
        return status, data[16:].split(b"\0")[0].decode()

    def put(self, raw: bytes, tail: int) -> None:
        off = self.ring_off + (tail % self.ring_bytes)
        self.mem[off:off + len(raw)] = raw
        struct.pack_into("<Q", self.mem, 64, tail + len(raw))  # fwd_hdr.tail (its own cache line)
        self.mem[72:76] = struct.pack("<I", struct.unpack_from("<I", self.mem, 72)[0] + 1)  # bell

    def close(self) -> None:
        self.sock.close()
        self.gate.close()
        os.close(self.fd)


def test_the_executor_refuses_what_it_cannot_trust_at_connect(node, runtime_dir):
    _, d = node
    r = RawClient(runtime_dir)
    try:
        status, why = r.hello(seal=False)  # a ring the client could shrink under the executor
        assert status != 0 and "sealed" in why
    finally:
        r.close()
    wait_for(lambda: d.entry(os.getpid()) is None, 10, "this process's admission gone")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # not admitted in forward mode
    try:
        s.connect(str(paths.executor_socket(0, runtime_dir)))
        fd = os.memfd_create("x")
        s.sendmsg([struct.pack("<IIQQQ", 0x464E5046, 1, 4096, 0, 0)],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
        data = s.recv(256)
        assert struct.unpack_from("<IIi", data)[2] != 0 and b"not admitted in forward mode" in data
        os.close(fd)
    finally:
        s.close()


def test_fuzzed_ring_records_never_crash_the_executor(node, runtime_dir, workload, fwd_env):
    emu, _ = node  # _: the daemon, whose log says how an executor ended
    assert last_json(run([workload, "copyback", "4096"], fwd_env))["ok"]  # the executor started
    ex = executor_pid(emu)
    rng = random.Random(1234)
    for round_ in range(6):
        r = RawClient(runtime_dir)
        try:
            status, why = r.hello()
            assert status == 0, why
            tail = 0
            for _ in range(300):
                kind = rng.random()
                if kind < 0.4:  # a well-formed head with random fields
                    plen = rng.choice([0, 8, 64, 200, 5000])
                    ln = (64 + plen + 63) // 64 * 64
                    head = struct.pack("<IHHII6Q", ln, rng.randrange(0, 64), rng.randrange(0, 70), plen, 0,
                                       *(rng.choice([0, 1, 2**63, 2**64 - 1, rng.getrandbits(64),
                                                     0x0F01000000000000 | rng.randrange(2048),
                                                     0x0F04000000000000 | rng.randrange(5000)]) for _ in range(6)))
                    raw = head + bytes(rng.getrandbits(8) for _ in range(ln - 64))
                else:  # garbage
                    raw = bytes(rng.getrandbits(8) for _ in range(rng.choice([64, 128, 640])))
                if tail % r.ring_bytes + len(raw) > r.ring_bytes:
                    break
                r.put(raw, tail)
                tail += len(raw)
            time.sleep(0.2)
        finally:
            r.close()
        assert Path(f"/proc/{ex}").exists() and executor_pid(emu) == ex, \
            f"the executor died in round {round_}: {_.log()[-3000:]}"
    # and it still serves an honest program
    p = run([workload, "copyback", str(MIB)], fwd_env)
    assert last_json(p)["ok"], p.stderr


def test_a_malformed_record_cuts_off_only_its_client(node, runtime_dir, fpeer):
    good = fpeer()
    h = ok(good.ask(f"malloc {MIB}"))["h"]
    r = RawClient(runtime_dir)
    try:
        assert r.hello()[0] == 0
        r.put(struct.pack("<IHHII6Q", 4096 * 4096, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0), 0)  # len past the tail
        wait_for(lambda: r.sock.recv(1, socket.MSG_DONTWAIT) == b"" if _readable(r.sock) else False, 5,
                 "the executor hanging up on the bad client")
    finally:
        r.close()
    ok(good.ask(f"fill {h} 0 {MIB} 9"))
    assert ok(good.ask(f"read {h} 0 {MIB}"))["first"] == 9


def _readable(s: socket.socket) -> bool:
    import select

    return bool(select.select([s], [], [], 0)[0])


# ---------------------------------------------------------------- scheduling is the executor's


def test_a_closed_gate_holds_a_forwarded_client_until_it_opens(node, fpeer):
    emu, d = node
    a = fpeer()
    h = ok(a.ask(f"malloc {MIB}"))["h"]
    d.wait_admitted(a.proc.pid)
    d.set(a.proc.pid, gate="closed", max_hold_ms=20000)
    a.proc.stdin.write(f"fill {h} 0 {MIB} 8 async\n")
    a.proc.stdin.flush()
    time.sleep(0.5)
    assert a.lines.empty(), "a forwarded call went on through a closed gate"
    d.set(a.proc.pid, gate="open")
    assert ok(a.read(timeout=5))
    assert ok(a.ask(f"read {h} 0 {MIB}"))["first"] == 8


def test_max_hold_bounds_a_closed_gate(node, fpeer):
    emu, d = node
    a = fpeer()
    h = ok(a.ask(f"malloc {MIB}"))["h"]
    d.wait_admitted(a.proc.pid)
    d.set(a.proc.pid, gate="closed", max_hold_ms=300)
    t = time.monotonic()
    ok(a.ask(f"fill {h} 0 {MIB} 8 async"))
    assert 0.25 <= time.monotonic() - t < 3.0


def test_a_flooding_client_does_not_hold_another_behind_its_queue(node, workload, fwd_env, spawn, acl_programs):
    """Two clients of the same priority and no settings: one queues 400 kernels of 5 ms (2 s),
    the other's kernel waits at most the fair share of queued work (16 launches), not all 2 s."""
    emu, _ = node
    flood = spawn([workload, "timing", KLIB, str(emu.flops_for_ms(5)), "0", "400"], env=fwd_env)
    time.sleep(0.3)  # its queue is deep by now
    t = time.monotonic()
    r = run([workload, "timing", KLIB, str(emu.flops_for_ms(0.1)), "0", "1"], fwd_env)
    took = time.monotonic() - t
    assert last_json(r)["ok"], r.stderr
    assert took < 1.0, f"the small client waited {took:.2f} s behind the flood"
    assert flood.proc.poll() is None  # the flood was still running: it was beside it


def test_a_stopped_client_holds_others_at_most_their_max_hold(node, fpeer):
    """A high-priority client stopped (SIGSTOP) with work since its last sync: a lower-priority
    client is held, but not past its max_hold."""
    emu, d = node
    hi, lo = fpeer(), fpeer()
    hh = ok(hi.ask(f"malloc {MIB}"))["h"]
    hl = ok(lo.ask(f"malloc {MIB}"))["h"]
    d.wait_admitted(hi.proc.pid)
    d.wait_admitted(lo.proc.pid)
    d.set(hi.proc.pid, priority=7)
    d.set(lo.proc.pid, priority=0, max_hold_ms=400)
    hi.proc.stdin.write(f"fill {hh} 0 {MIB} 1 async nosync\n")  # its work since its last sync...
    hi.proc.stdin.flush()
    hi.read()
    ok(hi.ask("meminfo"))  # a synchronous call after it: the executor has taken the copy (in order)
    os.kill(hi.proc.pid, signal.SIGSTOP)  # ...and it stops before the next
    try:
        t = time.monotonic()
        ok(lo.ask(f"fill {hl} 0 {MIB} 2 async", timeout=10))
        took = time.monotonic() - t
        assert 0.3 <= took < 3.0, took
    finally:
        os.kill(hi.proc.pid, signal.SIGCONT)


def test_the_config_file_chooses_the_mode_per_role(node, acl_programs, acl_env, runtime_dir, spawn):
    _, d = node
    cfg = runtime_dir / "flexnpu.toml"
    cfg.write_text('[run.decode]\nmode = "forward"\nfallback = "gated"\n')
    env = {**acl_env, "FLEXNPU_CONFIG": str(cfg)}
    modes = {}
    for role, extra in (("decode", []), ("prefill", []), ("decode", ["--gated"])):
        p = spawn([FLEXNPU, "run", "--role", role, *extra, "--", acl_programs["ipc_peer"]], env=env)
        assert p.read()["ready"]
        modes[(role, *extra)] = d.wait_admitted(p.proc.pid)["mode"]
    assert modes == {("decode",): "forward", ("prefill",): "gated", ("decode", "--gated"): "gated"}
    cfg.write_text('[run.decode]\nmode = "sideways"\n')
    r = run([FLEXNPU, "run", "--role", "decode", "--", acl_programs["ipc_peer"]], env)
    assert r.returncode == 2 and "[run.decode] mode" in r.stderr, r.stderr
