"""Smoke tests of `flexnpu attach` and `flexnpu observe` as real processes under
`timeout --preserve-status -s INT` (bcc's tools smoke habit: a hang fails with an exit code
rather than stalling the suite, and Ctrl-C must end a command cleanly with 0), every error
with its exit code, and `--ebpf` without root."""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flexnpu import paths
from flexnpu.runtimes import ASCEND_RT
from flexnpu.observe.errors import EXIT_CODES
from flexnpu.runtimes import ASCENDCL, Op
from test_observe_fixtures import NEEDS_BPF, REPO, flexnpu_argv, obs_programs  # noqa: F401

KLIB = paths.emulator_kernel_library()
TIMEOUT = "60"
IS_ROOT = os.geteuid() == 0
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
SITE = sysconfig.get_paths()["purelib"]


@functools.cache
def nobody_python() -> str | None:
    """An interpreter user nobody can run with this environment's packages: this one, or
    the system's of the same version where this one lives under a private home."""
    if not IS_ROOT or shutil.which("setpriv") is None:
        return None
    same = f"{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (sys.executable, shutil.which(f"python{same}") or "", "/usr/bin/python3"):
        if not exe:
            continue
        r = subprocess.run([*NOBODY, exe, "-c", "import flexnpu.cli"], capture_output=True, cwd="/",
                           env={**os.environ, "PYTHONPATH": f"{REPO}:{SITE}"})
        if r.returncode == 0:
            return exe
    return None


as_nobody = pytest.mark.skipif(nobody_python() is None, reason="needs root and an interpreter user nobody can run")


def flexnpu(*args: str, timeout: str = TIMEOUT, user: str | None = None, env: dict | None = None,
            cwd: str | Path = REPO) -> subprocess.CompletedProcess[str]:
    """Runs the CLI of this checkout under timeout -s INT, optionally as user nobody."""
    argv = flexnpu_argv(*args)
    pythonpath = str(REPO)
    if user == "nobody":
        argv = [*NOBODY, nobody_python(), *argv[1:]]
        pythonpath += ":" + SITE
        cwd = "/"
    argv = ["timeout", "--preserve-status", "-s", "INT", timeout, *argv]
    e = {**os.environ, **(env or {}), "PYTHONPATH": pythonpath}
    return subprocess.run(argv, capture_output=True, text=True, env=e, cwd=cwd, stdin=subprocess.DEVNULL)


def flexnpu_unprivileged(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a process that is not root and cannot import bcc, whoever runs the test."""
    code = ("import os, sys; os.geteuid = lambda: 65534; sys.modules['bcc'] = None; "
            f"sys.argv = ['flexnpu', *{list(args)!r}]; from flexnpu.cli import main; main()")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)


@pytest.mark.parametrize("cmd", ["attach", "observe"])
def test_help(cmd: str) -> None:
    r = flexnpu(cmd, "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout
    assert "--ebpf" not in r.stdout  # hidden, as in bcc's tools


# ---------------------------------------------------------------- --ebpf, without root


def _assert_every_probe(text: str) -> None:
    for s in ASCENDCL.symbols:
        assert f"int fx_enter_{s.name}(struct pt_regs *ctx)" in text, s.name
        if s.op in (Op.SYNC, Op.ALLOC, Op.DEVICE_SET):
            assert f"int fx_return_{s.name}(struct pt_regs *ctx)" in text, s.name
    for s in ASCEND_RT.symbols:
        assert f"int fx_enter_{s.name}(struct pt_regs *ctx)" in text, s.name
        assert f"fx_dispatch(FX_SYM_{s.name}, FX_OP_KERNEL, 0, FX_DIR_NONE, 1, 0)" in text  # no handle: rt* launches are not named


@as_nobody
def test_attach_ebpf_prints_the_program_without_root() -> None:
    r = flexnpu("attach", "4242", "--ebpf", user="nobody")
    assert r.returncode == 0, r.stderr
    _assert_every_probe(r.stdout)
    assert "#define FX_TGID 4242" in r.stdout and "#define FX_TRACE 0" in r.stdout
    r = flexnpu("attach", "4242", "--trace", "/dev/null", "--ebpf", user="nobody")
    assert r.returncode == 0 and "#define FX_TRACE 1" in r.stdout and "BPF_RINGBUF_OUTPUT" in r.stdout


def test_ebpf_needs_neither_root_nor_bcc() -> None:
    r = flexnpu_unprivileged("observe", "--ebpf")
    assert r.returncode == 0, r.stderr
    _assert_every_probe(r.stdout)
    assert "#define FX_TGID 0" in r.stdout
    r = flexnpu_unprivileged("attach", "77", "--ebpf")
    assert r.returncode == 0 and "#define FX_TGID 77" in r.stdout
    r = flexnpu_unprivileged("observe", "-p", "78", "--ebpf")
    assert r.returncode == 0 and "#define FX_TGID 78" in r.stdout


@as_nobody
def test_observe_ebpf_as_nobody() -> None:
    r = flexnpu("observe", "--ebpf", user="nobody")
    assert r.returncode == 0, r.stderr
    _assert_every_probe(r.stdout)
    assert "#define FX_TGID 0" in r.stdout


# ---------------------------------------------------------------- errors and exit codes


def test_exit_codes_are_distinct() -> None:
    assert sorted(EXIT_CODES.values()) == [3, 4, 5, 6, 7]


def test_attach_no_such_process() -> None:
    r = flexnpu("attach", "2147483000", "1", "1")
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip() == "flexnpu attach: no process with pid 2147483000"


def test_attach_process_without_runtime() -> None:
    with subprocess.Popen(["sleep", "60"]) as p:
        try:
            r = flexnpu("attach", str(p.pid), "1", "1")
        finally:
            p.kill()
    assert r.returncode == 4, r.stderr
    assert "maps no libascendcl.so" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["0"], ["1", "0"], ["-1"]], ids=["interval0", "count0", "negative"])
def test_attach_bad_arguments(args: list[str]) -> None:
    r = flexnpu("attach", str(os.getpid()), *args)
    assert r.returncode == 2


def test_observe_bad_source() -> None:
    assert flexnpu("observe", "--source", "magic").returncode == 2


@pytest.fixture
def runtime_process(emulator, spawn, obs_programs):
    """An AscendCL program that has loaded the runtime and waits."""
    emulator()
    wl = spawn([obs_programs["linked"], KLIB, "--wait"])
    wl.read(timeout=30)
    return wl


@as_nobody
def test_attach_without_privileges(runtime_process) -> None:
    r = flexnpu("attach", str(runtime_process.pid), "1", "1", user="nobody")
    assert r.returncode == 5, r.stderr
    assert "root" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not IS_ROOT, reason="the privilege check comes first")
def test_attach_bcc_missing(runtime_process, acl_env) -> None:
    code = ("import sys; sys.modules['bcc'] = None; "
            f"sys.argv = ['flexnpu', 'attach', '{runtime_process.pid}', '1', '1']; "
            "from flexnpu.cli import main; main()")
    r = subprocess.run(["timeout", "--preserve-status", "-s", "INT", TIMEOUT, sys.executable, "-c", code],
                       capture_output=True, text=True, env={**acl_env, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert r.returncode == 7, r.stderr
    assert "flexnpu doctor" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_attach_bpf_unavailable(runtime_process, monkeypatch) -> None:
    from flexnpu.cli import app
    from flexnpu.observe import bpf
    from flexnpu.observe.errors import BpfUnavailable

    def no_uprobes() -> None:
        raise BpfUnavailable("this kernel has no uprobe support (CONFIG_UPROBE_EVENTS); run `flexnpu doctor`")

    monkeypatch.setattr(bpf, "check_privileges", lambda: None)
    monkeypatch.setattr(bpf, "load_bcc", lambda: None)
    monkeypatch.setattr(bpf, "check_kernel", no_uprobes)
    r = CliRunner().invoke(app, ["attach", str(runtime_process.pid), "1", "1"])
    assert r.exit_code == 6
    assert "flexnpu doctor" in r.output


# ---------------------------------------------------------------- runs, ended by SIGINT


@pytest.mark.root_bpf
@pytest.mark.skipif(NEEDS_BPF[1].args[0], reason=NEEDS_BPF[1].kwargs["reason"])
def test_attach_runs_until_sigint(runtime_process, acl_env) -> None:
    r = flexnpu("attach", str(runtime_process.pid), "0.5", timeout="6", env=acl_env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["TIME", "LAUNCH/s", "H2D"]
    assert len(lines) >= 4 and all(len(line) < 80 for line in lines)
    assert all(line.rstrip().endswith("idle") for line in lines[1:])  # it waits on stdin


@pytest.mark.root_bpf
@pytest.mark.skipif(NEEDS_BPF[1].args[0], reason=NEEDS_BPF[1].kwargs["reason"])
def test_attach_count_ends_it(runtime_process, acl_env) -> None:
    r = flexnpu("attach", str(runtime_process.pid), "0.2", "3", "--json", env=acl_env)
    assert r.returncode == 0, r.stderr
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(docs) == 3 and all(d["schema"] == 1 and d["source"] == "bpf" for d in docs)


@pytest.mark.root_bpf
@pytest.mark.skipif(NEEDS_BPF[1].args[0], reason=NEEDS_BPF[1].kwargs["reason"])
def test_observe_runs_until_sigint(runtime_dir, acl_env) -> None:
    r = flexnpu("observe", "--interval-ms", "200", "--json", timeout="20", env=acl_env)
    assert r.returncode == 0, r.stderr
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(docs) >= 3 and all(d["schema"] == 1 and d["source"] == "bpf" for d in docs)
    assert not (runtime_dir / "observe.sock").exists()  # removed on the way out


@pytest.fixture
def open_runtime_dir():
    """A runtime dir of user nobody's own (one that others may write would be refused)."""
    rdir = Path(tempfile.mkdtemp(prefix="fxobs-"))
    rdir.chmod(0o755)
    os.chown(rdir, pwd.getpwnam("nobody").pw_uid, -1)
    yield rdir
    shutil.rmtree(rdir, ignore_errors=True)


@as_nobody
def test_observe_falls_back_to_the_shim_without_bpf(open_runtime_dir: Path) -> None:
    rdir = open_runtime_dir
    r = flexnpu("observe", "--interval-ms", "200", "--json", timeout="4", user="nobody",
                env={"FLEXNPU_RUNTIME_DIR": str(rdir)})
    assert r.returncode == 0, r.stderr
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert docs and all(d["source"] == "shim" and "BPF unavailable" in d["note"] for d in docs)
    assert "BPF unavailable" in r.stderr


@as_nobody
def test_observe_source_bpf_fails_without_privileges() -> None:
    r = flexnpu("observe", "--source", "bpf", "--count", "1", user="nobody",
                env={"FLEXNPU_RUNTIME_DIR": "/nonexistent"})
    assert r.returncode == 5, r.stderr
