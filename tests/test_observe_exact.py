"""The observer's counts are exact: real uprobes on the emulator's real libascendcl.so,
real C programs making a prime number of each call from three threads, in a build that
links the runtime and one that dlopens it, with the probes attached before the program
starts (`flexnpu observe`, attached by library path) and while it runs (`flexnpu attach`).
Counts and bytes must equal what the program says it did, and live device memory what the
emulator reports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest
import zmq

from flexnpu import paths
from test_observe_fixtures import (  # noqa: F401  (fixtures are used by name)
    NEEDS_BPF, PRIME_OPS, flexnpu_argv, flexnpu_proc, obs_programs, observed_from_counters,
    observed_from_entries, probes, truth_of)

pytestmark = NEEDS_BPF
KLIB = paths.emulator_kernel_library()


def _until_equal(read: Callable[[], dict], observe: Callable[[dict], dict], truth: dict, timeout: float) -> dict:
    """Reads outputs until what they observe equals the truth (or the time is up); returns
    the last observation, for the assertion's diff."""
    deadline = time.monotonic() + timeout
    seen: dict = {}
    while time.monotonic() < deadline:
        seen = observe(read())
        if seen == truth:
            break
    return seen


def _check_emulator(emu, pid: int, truth: dict) -> None:
    client = emu.client(pid)
    assert client["memory_used"] == truth["live_bytes"]
    assert client["ops"]["kernel"] == truth["ops"]["kernel"]
    assert client["ops"]["copy"] == truth["ops"]["memcpy_async"] + truth["ops"]["memcpy"]
    assert client["memset_bytes"] == truth["memset_bytes"]
    for d in ("h2d", "d2h", "d2d"):
        assert client["bytes_copied"][d] == truth["bytes"][d], d


@pytest.mark.parametrize("build", ["linked", "dlopen"])
def test_exact_when_attached_before_start(build, emulator, spawn, acl_env, obs_programs,
                                          flexnpu_proc) -> None:
    emu = emulator()
    obs = flexnpu_proc("observe", "--interval-ms", "100", "--json", "--source", "bpf", env=acl_env)
    first = obs.read(timeout=60)  # the probes are attached before the first snapshot
    assert first["schema"] == 1 and first["source"] == "bpf"
    wl = spawn([obs_programs[build], KLIB, "--hold"])
    pid = wl.read(timeout=30)["pid"]
    truth = truth_of(wl.read(timeout=60))
    assert truth["ops"] == PRIME_OPS
    seen = _until_equal(lambda: obs.read(timeout=10), lambda s: observed_from_entries(s["processes"], pid),
                        truth, timeout=15)
    assert seen == truth
    assert seen["live_bytes"] == emu.client(pid)["memory_used"]
    _check_emulator(emu, pid, truth)


@pytest.mark.parametrize("build", ["linked", "dlopen"])
def test_exact_when_attached_while_running(build, emulator, spawn, acl_env, obs_programs, flexnpu_proc) -> None:
    emu = emulator()
    wl = spawn([obs_programs[build], KLIB, "--wait", "--hold"])
    pid = wl.read(timeout=30)["pid"]  # the runtime is loaded and initialised; no work yet
    att = flexnpu_proc("attach", str(pid), "0.1", "--json", env=acl_env)
    first = att.read(timeout=60)
    assert (first["schema"], first["source"], first["pid"]) == (1, "bpf", pid)
    wl.proc.stdin.write("go\n")
    wl.proc.stdin.flush()
    truth = truth_of(wl.read(timeout=60))
    assert truth["ops"] == PRIME_OPS
    seen = _until_equal(lambda: att.read(timeout=10), lambda d: observed_from_entries(d["processes"], pid),
                        truth, timeout=15)
    assert seen == truth
    _check_emulator(emu, pid, truth)


def test_exact_for_concurrent_processes_in_one_session(emulator, spawn, probes, obs_programs) -> None:
    """Both builds at once under one node-wide session: each process's counters are its own."""
    emu = emulator()
    session = probes()
    runs = [spawn([obs_programs[b], KLIB, "--hold"]) for b in ("linked", "dlopen", "linked")]
    pids = [r.read(timeout=30)["pid"] for r in runs]
    truths = [truth_of(r.read(timeout=60)) for r in runs]
    reads = session.read()
    for pid, truth in zip(pids, truths):
        assert observed_from_counters(reads, pid) == truth
        _check_emulator(emu, pid, truth)
        # every call came after aclrtSetDevice(0): nothing was left without a device
        assert {dev for p, dev in reads if p == pid} == {0}


def test_trace_holds_every_call(emulator, spawn, acl_env, obs_programs, flexnpu_proc, tmp_path: Path) -> None:
    emulator()
    wl = spawn([obs_programs["linked"], KLIB, "--wait", "--hold"])
    pid = wl.read(timeout=30)["pid"]
    trace = tmp_path / "trace.json"
    att = flexnpu_proc("attach", str(pid), "0.1", "--json", "--trace", str(trace), env=acl_env)
    att.read(timeout=60)
    wl.proc.stdin.write("go\n")
    wl.proc.stdin.flush()
    wl.read(timeout=60)
    att.read(timeout=10)
    att.read(timeout=10)  # an interval after the last call: its events are drained
    att.proc.send_signal(2)  # SIGINT: attach closes the trace and exits 0
    assert att.proc.wait(timeout=60) == 0
    events = json.loads(trace.read_text())  # a complete JSON array
    by_name: dict[str, int] = {}
    for e in events:
        by_name[e["name"]] = by_name.get(e["name"], 0) + 1
    assert by_name["aclrtLaunchKernel"] == 97
    assert by_name["aclrtMemcpyAsync"] == 23 and by_name["aclrtMemcpy"] == 13
    assert by_name["aclrtMalloc"] == 19 and by_name["aclrtFree"] == 11
    # 29 synchronisations, counted once each although the runtime nests them
    syncs = [e for e in events if e.get("cat") == "sync" and e["ph"] == "X"]
    assert len(syncs) == 29
    assert all(e["pid"] == pid for e in events)
    assert 0 < by_name["iteration"] <= 29


def test_observe_publishes_snapshots_on_zmq(emulator, spawn, acl_env, runtime_dir, flexnpu_proc) -> None:
    emulator()
    obs = flexnpu_proc("observe", "--interval-ms", "100", "--json", env=acl_env)
    obs.read(timeout=60)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVTIMEO, 5000)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"ipc://{runtime_dir / 'observe.sock'}")
        snap = json.loads(sub.recv())
        assert snap["schema"] == 1 and snap["source"] == "bpf"
        assert {"devices", "processes", "interval_s", "seq"} <= set(snap)
    finally:
        sub.close(0)
        ctx.term()


FAKE_LIBRUNTIME = r"""
#include <stdint.h>
static volatile unsigned long calls;
__attribute__((noinline)) int rtKernelLaunch(const void *stub, uint32_t blockDim, void *args,
                                             uint32_t argsSize, void *smDesc, void *stm)
{ calls++; return 0; }
__attribute__((noinline)) int rtKernelLaunchWithHandle(void *hdl, const uint64_t tilingKey, uint32_t blockDim,
                                                       void *argsInfo, void *smDesc, void *stm, const void *ki)
{ calls++; return 0; }
"""


@pytest.fixture
def fake_libruntime(tmp_path: Path) -> Path:
    src = tmp_path / "fake_runtime.c"
    src.write_text(FAKE_LIBRUNTIME)
    lib = tmp_path / "cann" / "libruntime.so"
    lib.parent.mkdir()
    r = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", str(src), "-o", str(lib)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return lib


def test_rt_launches_counted_where_libruntime_is_mapped(emulator, spawn, acl_env, acl_programs, flexnpu_proc,
                                                         fake_libruntime) -> None:
    """`flexnpu attach` finds libruntime.so in the process's maps (at any path) and counts
    launches there: 31 + 2 (prime) launches through two rt* entry points."""
    emulator()
    wl = spawn([acl_programs["obs_rtlaunch"], fake_libruntime, "31", "2", "--wait"])
    pid = wl.read(timeout=30)["pid"]
    att = flexnpu_proc("attach", str(pid), "0.1", "--json", env=acl_env)
    att.read(timeout=60)
    wl.proc.stdin.write("go\n")
    wl.proc.stdin.flush()
    assert wl.read(timeout=30)["rt_launches"] == 33

    def launches(doc: dict) -> tuple:
        es = [e for e in doc["processes"] if e["pid"] == pid]
        return (sum(e["counters"]["rt_launches"] for e in es), sum(e["counters"]["launches"] for e in es))

    assert _until_equal(lambda: att.read(timeout=10), launches, (33, 33), timeout=15) == (33, 33)


def test_observe_finds_a_runtime_at_a_new_path(emulator, spawn, acl_env, obs_programs, flexnpu_proc,
                                               tmp_path: Path) -> None:
    """A runtime library at a path nobody told the observer about (a CANN install
    elsewhere) is found in the process's maps and probed from then on."""
    emulator()
    elsewhere = tmp_path / "cann" / "lib64"
    elsewhere.mkdir(parents=True)
    shutil.copy2(paths.emulator_library(), elsewhere / "libascendcl.so")
    obs = flexnpu_proc("observe", "--interval-ms", "100", "--json", env=acl_env)
    obs.read(timeout=60)
    env = {**acl_env, "LD_LIBRARY_PATH": f"{elsewhere}:{acl_env['LD_LIBRARY_PATH']}"}
    wl = spawn([obs_programs["dlopen"], KLIB, "--wait", "--hold"], env=env)
    pid = wl.read(timeout=30)["pid"]
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert str(elsewhere / "libascendcl.so") in maps
    time.sleep(2.5)  # new processes are scanned every interval, all of them every second
    wl.proc.stdin.write("go\n")
    wl.proc.stdin.flush()
    truth = truth_of(wl.read(timeout=60))
    seen = _until_equal(lambda: obs.read(timeout=10), lambda s: observed_from_entries(s["processes"], pid),
                        truth, timeout=15)
    assert seen == truth


def test_attach_ends_when_the_process_exits(emulator, spawn, acl_env, obs_programs) -> None:
    emulator()
    wl = spawn([obs_programs["linked"], KLIB, "--wait"])
    pid = wl.read(timeout=30)["pid"]
    att = subprocess.Popen(flexnpu_argv("attach", str(pid), "0.2"), env=acl_env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # attached
        wl.proc.stdin.write("go\n")
        wl.proc.stdin.flush()
        wl.read(timeout=60)
        out, err = att.communicate(timeout=30)
    finally:
        if att.poll() is None:
            att.kill()
            att.communicate()
    assert att.returncode == 0, err
    assert f"pid {pid} exited" in err
    lines = out.splitlines()
    assert lines[0].startswith("TIME") and len(lines) >= 2
