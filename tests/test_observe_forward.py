"""The observer under forwarded execution: a forwarded client's calls never reach
libascendcl.so in its process (the device's executor makes them, for every client), yet each
launch, copy and byte is the client's. Real uprobes, a real `flexnpu daemon` (which starts
the real flexnpu-executor), the emulator's device server, and the same C programs run once
gated (libflexnpu_shim.so) and once forwarded (libflexnpu_fwd.so): the observer must give
the same exact counts for both, none to the executor, and the same phase verdict.
"""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path
from typing import Callable

import pytest

from flexnpu import paths
from flexnpu.observe import procs
from forward_fixtures import shim_env  # noqa: F401  (fixtures are used by name)
from test_daemon_fixtures import daemons  # noqa: F401
from test_observe_fixtures import (  # noqa: F401
    NEEDS_BPF, PRIME_OPS, flexnpu_proc, obs_programs, observed_from_entries, truth_of)

pytestmark = NEEDS_BPF
KLIB = paths.emulator_kernel_library()
# obs_workload --device-first: the main thread selects the device before it loads the kernels
# (forwarded execution loads a binary on the thread's device): one aclrtSetDevice more
TRUTH_OPS = {**PRIME_OPS, "device_set": PRIME_OPS["device_set"] + 1}


@pytest.fixture
def fwd_env(acl_env: dict[str, str]) -> dict[str, str]:
    """acl_env with the forward build of the shim preloaded (what `flexnpu run --forward` sets)."""
    lib = paths.forward_shim_library()
    if not lib.exists():
        pytest.fail(f"{lib} is missing; build it with `pip install .`", pytrace=False)
    env = {k: v for k, v in acl_env.items()
           if k not in ("FLEXNPU_DEVICES", "FLEXNPU_MEM_QUOTA", "FLEXNPU_ROLE", "FLEXNPU_DEBUG", "LD_PRELOAD")}
    env["LD_PRELOAD"] = str(lib)
    return env


def executor_of(daemon) -> int:
    """The pid of the executor the daemon started: its child whose executable is the
    installed flexnpu-executor (found from /proc, not through the observer's own code)."""
    exe = paths.executor_binary().resolve()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for pid in procs.pids():
            try:
                ppid = int((procs.PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == daemon.pid and Path(os.readlink(f"/proc/{pid}/exe")) == exe:
                    return pid
            except (OSError, IndexError, ValueError):
                continue
        time.sleep(0.1)
    raise AssertionError(f"daemon {daemon.pid} started no executor:\n{daemon.log()}")


def _until_equal(read: Callable[[], dict], observe: Callable[[dict], dict], truth: dict, timeout: float,
                 seen_docs: list | None = None) -> dict:
    deadline = time.monotonic() + timeout
    seen: dict = {}
    while time.monotonic() < deadline:
        doc = read()
        if seen_docs is not None:
            seen_docs.append(doc)
        seen = observe(doc)
        if seen == truth:
            break
    return seen


def _stop(it) -> None:
    """SIGINT an observer and wait for it (detaching uprobes takes a while)."""
    if it.proc.poll() is None:
        it.proc.send_signal(signal.SIGINT)
    assert it.proc.wait(timeout=90) == 0


def _attached(spawn, flexnpu_proc, acl_env: dict, env: dict, exe: Path) -> tuple[int, dict, dict]:
    """Runs obs_workload under env, attaches `flexnpu attach` once it is ready, lets it work;
    returns its pid, what it says it did after the attach, and what attach counted."""
    wl = spawn([exe, KLIB, "--device-first", "--wait", "--hold"], env=env)
    pid = wl.read(timeout=30)["pid"]
    att = flexnpu_proc("attach", str(pid), "0.1", "--json", env=acl_env)
    first = att.read(timeout=60)
    assert (first["schema"], first["source"], first["pid"]) == (1, "bpf", pid)
    wl.proc.stdin.write("go\n")
    wl.proc.stdin.flush()
    truth = truth_of(wl.read(timeout=60))
    assert truth["ops"] == TRUTH_OPS
    # the main thread's aclrtSetDevice came before the attach
    truth["ops"]["device_set"] -= 1
    seen = _until_equal(lambda: att.read(timeout=10), lambda d: observed_from_entries(d["processes"], pid),
                        truth, timeout=15)
    _stop(att)
    return pid, truth, seen


def test_attach_counts_a_forwarded_client_exactly_as_a_gated_one(emulator, daemons, spawn, acl_env, shim_env,
                                                                 fwd_env, obs_programs, flexnpu_proc) -> None:
    emu = emulator()
    d = daemons(0, env=acl_env)
    g_pid, g_truth, g_seen = _attached(spawn, flexnpu_proc, acl_env, shim_env, obs_programs["linked"])
    f_pid, f_truth, f_seen = _attached(spawn, flexnpu_proc, acl_env, fwd_env, obs_programs["linked"])
    ex = executor_of(d)  # started with the daemon, or with its first forwarded client
    assert g_seen == g_truth
    assert f_seen == f_truth
    assert f_seen == g_seen  # the same program, the same counts and bytes, whichever way it ran
    # the forwarded client's work ran in the executor: the device saw the executor do it
    assert f_pid not in {c["pid"] for c in emu.device(0)["clients"]}
    assert emu.client(ex)["ops"]["kernel"] >= PRIME_OPS["kernel"]
    assert emu.client(g_pid)["ops"]["kernel"] == PRIME_OPS["kernel"]


def test_observe_gives_each_forwarded_client_its_work_and_the_executor_none(
        emulator, daemons, spawn, acl_env, shim_env, fwd_env, obs_programs, flexnpu_proc) -> None:
    """Node-wide, the observer started before the daemon (so the executor appears while it
    runs): two forwarded clients (linked and dlopen builds) and a gated one at once. Each
    has exactly its own counts; the executor, which made every forwarded call into
    libascendcl.so, is in no snapshot at all."""
    emu = emulator()
    obs = flexnpu_proc("observe", "--interval-ms", "100", "--json", "--source", "bpf", env=acl_env)
    docs = [obs.read(timeout=60)]
    d = daemons(0, env=acl_env)
    runs = [spawn([obs_programs[b], KLIB, "--device-first", "--hold"], env=env)
            for b, env in (("linked", fwd_env), ("dlopen", fwd_env), ("linked", shim_env))]
    pids = [r.read(timeout=30)["pid"] for r in runs]
    ex = executor_of(d)  # started with the daemon, or with its first forwarded client
    truths = [truth_of(r.read(timeout=60)) for r in runs]
    for pid, truth in zip(pids, truths):
        assert truth["ops"] == TRUTH_OPS
        seen = _until_equal(lambda: obs.read(timeout=10), lambda s: observed_from_entries(s["processes"], pid),
                            truth, timeout=15, seen_docs=docs)
        assert seen == truth, pid
    docs += [obs.read(timeout=10) for _ in range(3)]
    _stop(obs)
    everyone = {e["pid"] for s in docs for e in s["processes"]} | {p for s in docs for dv in s["devices"]
                                                                   for p in dv["pids"]}
    assert ex not in everyone
    last = docs[-1]
    assert sum(e["counters"]["launches"] for e in last["processes"] if e["pid"] in pids) == 3 * PRIME_OPS["kernel"]
    # the executor did the two forwarded clients' kernels on the device
    assert emu.client(ex)["ops"]["kernel"] == 2 * PRIME_OPS["kernel"]


# engine_loop KLIB DEV K MS: a prefill-shaped loop (4 compute-bound kernels of 2 ms a step, no
# pause) and a decode-shaped one (40 kernels of 50 us a step, 2 ms between steps: enough
# kernels a step that the host's jitter on a loaded machine does not make a second mode)
SHAPES = {
    "prefill": ["4", "2.0", "--warm-ms", "2.0"],
    "decode": ["40", "0.05", "--gap-ms", "2", "--warm-ms", "0.05"],
}


def _verdict(docs: list[dict], pid: int) -> tuple[str, collections.Counter]:
    phases = collections.Counter(e["phase"] for s in docs for e in s["processes"]
                                 if e["pid"] == pid and e["phase"] != "idle")
    assert phases, f"pid {pid} was never seen busy"
    return phases.most_common(1)[0][0], phases


def test_phase_of_a_forwarded_loop_is_that_of_the_gated_one(emulator, daemons, spawn, acl_env, shim_env, fwd_env,
                                                           acl_programs, flexnpu_proc) -> None:
    emulator()
    d = daemons(0, env=acl_env)
    obs = flexnpu_proc("observe", "--interval-ms", "100", "--json", "--source", "bpf", env=acl_env)
    obs.read(timeout=60)
    verdicts: dict[tuple[str, str], tuple[str, collections.Counter]] = {}
    everyone: set[int] = set()
    for shape, args in SHAPES.items():
        for mode, env in (("gated", shim_env), ("forwarded", fwd_env)):
            wl = spawn([acl_programs["engine_loop"], KLIB, "0", *args, "--seconds", "2.5"], env=env)
            pid = wl.read(timeout=30)["pid"]
            docs = []
            while wl.proc.poll() is None:
                docs.append(obs.read(timeout=10))
                everyone |= {e["pid"] for e in docs[-1]["processes"]}
            assert wl.proc.wait(timeout=30) == 0, wl.proc.stderr.read()
            docs += [obs.read(timeout=10) for _ in range(2)]
            verdicts[(shape, mode)] = _verdict(docs, pid)
    ex = executor_of(d)
    _stop(obs)
    for shape in SHAPES:
        g, f = verdicts[(shape, "gated")], verdicts[(shape, "forwarded")]
        assert g[0] == f[0] == shape, verdicts
    assert ex not in everyone


def test_an_executor_is_known_by_its_executable(tmp_path: Path) -> None:
    """procs.is_executor: this install's executor, or a root-owned flexnpu-executor nobody else
    may write; not a program a user copied to that name, nor one others may write."""
    import shutil
    import subprocess

    sleep = shutil.which("sleep")
    assert sleep
    cases = {}
    for name, owner, mode in (("own", 65534, 0o755), ("root", 0, 0o755), ("writable", 0, 0o775),
                              ("other-name", 0, 0o755)):
        d = tmp_path / name
        d.mkdir()
        d.chmod(0o755)
        exe = d / ("flexnpu-executor" if name != "other-name" else "flexnpu-executor2")
        shutil.copy2(sleep, exe)
        os.chown(exe, owner, owner)
        exe.chmod(mode)
        cases[name] = exe
    tmp_path.chmod(0o755)
    started = {name: subprocess.Popen([str(exe), "30"]) for name, exe in cases.items()}
    try:
        time.sleep(0.3)  # exec'ed
        got = {name: procs.is_executor(p.pid) for name, p in started.items()}
        # the installed executor's file is recognised as such whatever its owner
        known = procs.is_executor(started["own"].pid, known=cases["own"])
    finally:
        for p in started.values():
            p.kill()
            p.wait(timeout=10)
    assert got == {"own": False, "root": True, "writable": False, "other-name": False}
    assert known
    assert not procs.is_executor(os.getpid()) and not procs.is_executor(2 ** 22 + 1)


def test_observe_finds_a_forward_library_at_a_new_path(emulator, daemons, spawn, acl_env, fwd_env, obs_programs,
                                                       flexnpu_proc, tmp_path: Path) -> None:
    """A forwarded client whose libflexnpu_fwd.so is at a path the observer was never told
    about (another install) is found in its maps and probed from then on, as a runtime is."""
    import shutil

    emulator()
    daemons(0, env=acl_env)
    elsewhere = tmp_path / "other-install"
    elsewhere.mkdir()
    lib = elsewhere / paths.forward_shim_library().name
    shutil.copy2(paths.forward_shim_library(), lib)
    obs = flexnpu_proc("observe", "--interval-ms", "100", "--json", "--source", "bpf", env=acl_env)
    obs.read(timeout=60)
    wl = spawn([obs_programs["linked"], KLIB, "--device-first", "--wait", "--hold"],
               env={**fwd_env, "LD_PRELOAD": str(lib)})
    pid = wl.read(timeout=30)["pid"]
    assert str(lib) in Path(f"/proc/{pid}/maps").read_text()
    time.sleep(2.5)  # new processes are scanned every interval, all of them every second
    wl.proc.stdin.write("go\n")
    wl.proc.stdin.flush()
    truth = truth_of(wl.read(timeout=60))
    truth["ops"]["device_set"] -= 1  # made before the library was found
    seen = _until_equal(lambda: obs.read(timeout=10), lambda s: observed_from_entries(s["processes"], pid),
                        truth, timeout=15)
    assert seen == truth
    _stop(obs)


def test_attach_to_the_executor_shows_the_work_it_runs_for_its_clients(emulator, daemons, spawn, acl_env, fwd_env,
                                                                       obs_programs, flexnpu_proc) -> None:
    """Asked for by pid, the executor is observed like any process (one process only: no
    skip map): its runtime calls are the forwarded clients' work, all of it."""
    emulator()
    d = daemons(0, env=acl_env)
    wl = spawn([obs_programs["linked"], KLIB, "--device-first", "--wait", "--hold"], env=fwd_env)
    wl.read(timeout=30)  # connected to the executor (its device is selected)
    ex = executor_of(d)
    att = flexnpu_proc("attach", str(ex), "0.1", "--json", env=acl_env)
    assert att.read(timeout=60)["pid"] == ex
    wl.proc.stdin.write("go\n")
    wl.proc.stdin.flush()
    truth = truth_of(wl.read(timeout=60))
    launches = _until_equal(lambda: att.read(timeout=10),
                            lambda doc: {"kernel": sum(e["counters"]["ops"]["kernel"] for e in doc["processes"])},
                            {"kernel": truth["ops"]["kernel"]}, timeout=15)
    assert launches == {"kernel": truth["ops"]["kernel"]}
    _stop(att)
