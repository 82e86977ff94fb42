"""Fixtures and helpers shared by the observer's tests (test_observe_*.py, test_attach_*.py).
It holds no tests; the test modules import what they use (fixtures included) from here.

BPF tests carry the root_bpf marker and skip, saying why, where the process is not root or
bcc cannot be imported; CI runs them as root. Every probe session a test opens is closed
at teardown, which detaches its uprobes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from flexnpu import paths

PROGS = Path(__file__).resolve().parent / "progs"
REPO = PROGS.parent.parent

# the truth obs_workload prints: every number prime (tests/progs/obs_workload.c)
PRIME_OPS = {"kernel": 97, "memcpy_async": 23, "memcpy": 13, "memset_async": 7, "event_record": 5,
             "stream_wait": 5, "alloc": 19, "free": 11, "sync": 29, "device_set": 3}


def bpf_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to load BPF (CI runs these as root)"
    try:
        from flexnpu.observe.bpf import load_bcc

        load_bcc()
    except Exception as e:  # BccMissing
        return f"bcc is missing: {e}"
    return None


_REASON = bpf_unavailable_reason()
NEEDS_BPF = [pytest.mark.root_bpf, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def flexnpu_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "flexnpu.cli", *args]


def build(src: Path, exe: Path, *flags: str, link_acl: bool = True) -> Path:
    cmd = ["gcc", "-O2", "-Wall", str(src), "-o", str(exe), "-I", str(paths.acl_include_dir()), *flags]
    if link_acl:
        cmd += ["-L", str(paths.native_lib_dir()), "-lascendcl"]
    cmd += ["-ldl", "-lm", "-pthread"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"building {src.name} failed:\n{r.stderr}"
    return exe


@pytest.fixture
def flexnpu_proc(spawn: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """flexnpu_proc(*cli_args, env=...) runs `flexnpu ...` through conftest's spawn. At
    teardown each one still running gets SIGINT and up to a minute to exit cleanly before
    spawn kills it: the kernel takes a while to detach uprobes (about 0.1 s each in a VM)."""
    started: list[Any] = []

    def start(*args: str, env: dict | None = None) -> Any:
        it = spawn(flexnpu_argv(*args), env=env)
        started.append(it)
        return it

    yield start
    for it in started:
        if it.proc.poll() is None:
            it.proc.send_signal(signal.SIGINT)
    for it in started:
        try:
            it.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass  # spawn's teardown kills it


@pytest.fixture(scope="session")
def obs_programs(acl_programs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """obs_workload linked with libascendcl (conftest's build) and obs_workload_dlopen, the
    same source built never to link it (-DOBS_DLOPEN); obs_phases."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the C test programs (apt-get install gcc)", pytrace=False)
    out = tmp_path_factory.mktemp("obs-programs")
    dl = build(PROGS / "obs_workload.c", out / "obs_workload_dlopen", "-DOBS_DLOPEN", link_acl=False)
    return {"linked": acl_programs["obs_workload"], "dlopen": dl, "phases": acl_programs["obs_phases"]}


@pytest.fixture
def probes() -> Iterator[Callable[..., Any]]:
    """probes(**ProbeConfig fields) loads the observer's program and attaches it to the
    emulator's libascendcl.so by path (so processes started later are counted)."""
    from flexnpu.observe.bpf import ProbeSession
    from flexnpu.observe.probegen import ProbeConfig

    opened: list[ProbeSession] = []

    def open_session(**config: Any) -> ProbeSession:
        s = ProbeSession(ProbeConfig(**config))
        opened.append(s)
        assert s.attach(str(paths.emulator_library()), "libascendcl.so") > 0
        return s

    yield open_session
    for s in opened:
        s.close()


def observed_from_counters(reads: dict[tuple[int, int], dict], pid: int) -> dict:
    """One process's BPF counters summed over its devices, in the shape of the truth."""
    from flexnpu.runtimes import Direction, Op

    cs = [c for (p, _), c in reads.items() if p == pid]
    return {
        "ops": {k: sum(c["ops"][Op[k.upper()]] for c in cs) for k in PRIME_OPS},
        "bytes": {d: sum(c["bytes"][Direction[d.upper()]] for c in cs) for d in ("h2d", "d2h", "d2d")},
        "memset_bytes": sum(c["memset_bytes"] for c in cs),
        "live_bytes": sum(c["alloc_bytes"] - c["freed_bytes"] for c in cs),
    }


def observed_from_entries(entries: list[dict], pid: int) -> dict:
    """One process's snapshot entries (observe or attach --json) summed over its devices."""
    es = [e for e in entries if e["pid"] == pid]
    return {
        "ops": {k: sum(e["counters"]["ops"][k] for e in es) for k in PRIME_OPS},
        "bytes": {d: sum(e["counters"]["bytes"][d] for e in es) for d in ("h2d", "d2h", "d2d")},
        "memset_bytes": sum(e["counters"]["memset_bytes"] for e in es),
        "live_bytes": sum(e["counters"]["mem_bytes"] for e in es),
    }


def truth_of(report: dict) -> dict:
    """What obs_workload says it did, in the same shape."""
    return {"ops": report["ops"], "bytes": report["bytes"], "memset_bytes": report["memset_bytes"],
            "live_bytes": report["live_bytes"]}
