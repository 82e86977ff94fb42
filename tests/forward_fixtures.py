"""Fixtures and helpers for the forwarding-layer tests (the LD_PRELOAD shim and the runtime
profile it is generated from). Test modules import what they use by name; the emulator,
runtime dir and C program fixtures come from conftest.py.

Programs run as real processes with the real shim preloaded; each run records its pid so a
test can find the process's own record in the emulator's status.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from flexnpu import paths

PROGS = Path(__file__).resolve().parent / "progs"
RUN_TIMEOUT_S = 60

# The parts of an emulator client record that depend only on what the program asked the
# device to do (busy times depend on timing, pids and ids on the run).
WORK_KEYS = ("ops", "bytes_copied", "memset_bytes", "allocs", "frees", "memory_used", "count_by_name")


def shim_library() -> Path:
    return paths.native_lib_dir() / "libflexnpu_shim.so"


@dataclass
class Run:
    """One finished run of a program."""

    argv: list[str]
    pid: int
    rc: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        """The last JSON line the program printed."""
        objs = [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]
        assert objs, f"{self.argv[0]} printed no JSON (rc {self.rc})\nstdout: {self.stdout}\nstderr: {self.stderr}"
        return objs[-1]

    def ok(self) -> Run:
        assert self.rc == 0, f"{' '.join(self.argv)} exited {self.rc}\nstdout: {self.stdout}\nstderr: {self.stderr}"
        return self

    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()


def run_program(argv: list, env: dict[str, str], timeout: float = RUN_TIMEOUT_S) -> Run:
    """Runs a program to its end; a hang fails the test instead of stalling the suite."""
    args = [str(a) for a in argv]
    with subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            pytest.fail(f"{' '.join(args)} did not finish in {timeout} s\nstdout: {out}\nstderr: {err}")
        return Run(args, p.pid, p.returncode, out, err)


def work_of(client: dict) -> dict:
    """The timing-independent part of an emulator client record."""
    return {k: client[k] for k in WORK_KEYS}


def client_record(status: dict, pid: int, device: int) -> dict | None:
    for c in status["devices"][device]["clients"]:
        if c["pid"] == pid:
            return c
    return None


def devices_of(status: dict, pid: int) -> list[int]:
    """The physical devices a process opened."""
    return [d["index"] for d in status["devices"] if any(c["pid"] == pid for c in d["clients"])]


@pytest.fixture
def shim_env(acl_env: dict[str, str]) -> dict[str, str]:
    """acl_env with the shim preloaded and every FLEXNPU_* knob of the shim cleared."""
    lib = shim_library()
    if not lib.exists():
        pytest.fail(f"{lib} is missing; build it with `pip install .`", pytrace=False)
    env = {k: v for k, v in acl_env.items()
           if k not in ("FLEXNPU_DEVICES", "FLEXNPU_MEM_QUOTA", "FLEXNPU_ROLE", "FLEXNPU_DEBUG", "LD_PRELOAD")}
    env["LD_PRELOAD"] = str(lib)
    return env


@pytest.fixture
def plain_env(acl_env: dict[str, str]) -> dict[str, str]:
    """acl_env without the shim (and without any FLEXNPU_* knob of the shim)."""
    return {k: v for k, v in acl_env.items()
            if k not in ("FLEXNPU_DEVICES", "FLEXNPU_MEM_QUOTA", "FLEXNPU_ROLE", "FLEXNPU_DEBUG", "LD_PRELOAD")}


def build_dlopen_program(out_dir: Path) -> Path:
    """fwd_dlopen built the way a dlopen-ing program is: headers for the types, never
    linked with -lascendcl."""
    exe = out_dir / "fwd_dlopen_nolink"
    cmd = ["gcc", "-O2", "-Wall", str(PROGS / "fwd_dlopen.c"), "-o", str(exe),
           "-I", str(paths.acl_include_dir()), "-ldl", "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"building fwd_dlopen.c failed:\n{r.stderr}"
    return exe


@pytest.fixture(scope="session")
def fwd_programs(acl_programs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The programs the shim tests run, by name: the conftest's builds, except that
    fwd_dlopen is the build that does not link the runtime."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the C test programs (apt-get install gcc)", pytrace=False)
    progs = dict(acl_programs)
    progs["fwd_dlopen"] = build_dlopen_program(tmp_path_factory.mktemp("fwd-programs"))
    return progs


@pytest.fixture
def run_both(plain_env: dict[str, str], shim_env: dict[str, str]) -> Callable[..., tuple[Run, Run]]:
    """run_both(argv, **extra_env) runs a program without and then with the shim."""

    def run(argv: list, **extra: str) -> tuple[Run, Run]:
        return run_program(argv, {**plain_env, **extra}), run_program(argv, {**shim_env, **extra})

    return run
