"""The runtime dir and the files root's services make in it, attacked by real local users
(docs/security.md, "The runtime dir").

- An outsider who can open a lock file (even read-only) can hold an flock on it and keep the
  observer and the controller from starting: lock files are the owner's alone, and an older
  wider one is replaced.
- A runtime dir someone else made (or may write in), holding links under the names root is
  about to write, must be refused before anything is opened; inside a trusted dir, a link
  under one of those names is replaced or refused, never followed.
- The observer's and the controller's sockets are for root and the flexnpu group, and a
  user refused by them hears so from `flexnpu top` instead of waiting.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from flexnpu import paths
from flexnpu.bench.node import stop_process
from test_emu_cli import flexnpu_cli
from users_fixtures import flexnpu_group, member, open_rdir, outsider, run_as  # noqa: F401 (fixtures)

pytestmark = [
    pytest.mark.root_users,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and groups"),
]

REPO = Path(__file__).resolve().parents[1]
# a process that holds a shared flock on a file it opened read-only, as anyone who can open it may
HOLD_SHARED = ("import fcntl, os, sys, time\n"
               "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
               "fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)\n"
               "print('held', flush=True)\n"
               "time.sleep(60)\n")


def _env(rdir: Path) -> dict[str, str]:
    return {**os.environ, "FLEXNPU_RUNTIME_DIR": str(rdir), "PYTHONPATH": str(REPO)}


def _cli(rdir: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([flexnpu_cli(), *args], capture_output=True, text=True, timeout=timeout, cwd="/",
                          env=_env(rdir), stdin=subprocess.DEVNULL)


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    return lines[0]


def _last_line(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    return r.stderr.strip().splitlines()[-1]


def _wait_for(cond, what: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


@pytest.fixture
def holder_as(open_rdir: Path) -> Iterator:
    """holder_as(user, path): a process of user holding a shared flock on path (or None when
    it could not open the file); stopped at teardown."""
    procs: list[subprocess.Popen] = []

    def start(user: str, path: Path) -> subprocess.Popen | None:
        p = subprocess.Popen(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                              sys.executable, "-c", HOLD_SHARED, str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd="/", stdin=subprocess.DEVNULL)
        procs.append(p)
        line = p.stdout.readline().strip()
        return p if line == "held" else None

    yield start
    for p in procs:
        p.kill()
        p.wait()


# ------------------------------------------------------------------ locks

def test_an_outsider_cannot_hold_the_observer_lock(open_rdir: Path, outsider: str, holder_as) -> None:
    lock = open_rdir / "observe.lock"
    # a lock file as an older FlexNPU left it (0644): readable, so lockable, by anyone
    lock.write_text("1\n")
    lock.chmod(0o644)
    assert holder_as(outsider, lock) is not None  # the outsider holds it
    r = _cli(open_rdir, "observe", "--source", "shim", "--count", "1", "--interval-ms", "10")
    assert r.returncode == 0, r.stderr  # the observer starts all the same
    assert stat.S_IMODE(lock.stat().st_mode) == paths.LOCK_FILE_MODE and lock.stat().st_uid == 0
    # and the lock it left cannot even be opened by the outsider
    assert holder_as(outsider, lock) is None
    r = _cli(open_rdir, "observe", "--source", "shim", "--count", "1", "--interval-ms", "10")
    assert r.returncode == 0, r.stderr


def test_an_outsider_cannot_hold_the_controller_lock(open_rdir: Path, outsider: str, holder_as) -> None:
    lock = open_rdir / "controller.lock"
    lock.write_text("1\n")
    lock.chmod(0o644)
    assert holder_as(outsider, lock) is not None
    ctl = subprocess.Popen([flexnpu_cli(), "controller"], env=_env(open_rdir), cwd="/", stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        _wait_for(paths.controller_socket(open_rdir).exists, "controller.sock", ctl)
        assert ctl.poll() is None
        assert stat.S_IMODE(lock.stat().st_mode) == paths.LOCK_FILE_MODE
        assert holder_as(outsider, lock) is None
    finally:
        stop_process(ctl, 20)


# ------------------------------------------------------------------ someone else's runtime dir

@pytest.fixture
def precious() -> Iterator[dict[str, Path]]:
    """Root-owned files (0600, in a root-only dir) that links will point at, by link name."""
    d = Path(tempfile.mkdtemp(prefix="fxprecious-"))
    out = {}
    for name in ("emu.pid", "emu.log", "observe.lock", "controller.lock", "gate-0.ctl"):
        f = d / (name + ".target")
        f.write_text(f"precious {name}\n")
        f.chmod(0o600)
        out[name] = f
    try:
        yield out
    finally:
        for f in out.values():
            f.unlink(missing_ok=True)
        d.rmdir()


def _untouched(targets: dict[str, Path]) -> None:
    for name, f in targets.items():
        st = f.stat()
        assert f.read_text() == f"precious {name}\n", name
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0 and st.st_gid == 0, name


COMMANDS = {
    "emu start": ["emu", "start", "--devices", "1"],
    "observe": ["observe", "--source", "shim", "--count", "1", "--interval-ms", "10"],
    "controller": ["controller"],
    "daemon": ["daemon", "--device", "0"],
}


@pytest.fixture
def foreign_rdir(outsider: str, precious: dict[str, Path]) -> Iterator[Path]:
    """A runtime dir the outsider made, holding links to root's files under the names root writes."""
    rdir = Path(tempfile.gettempdir()) / f"fxforeign-{os.getpid()}-{time.monotonic_ns()}"
    env = {"PATH": os.environ["PATH"]}
    assert run_as(outsider, ["mkdir", "-m", "0755", rdir], env).returncode == 0
    for name, target in precious.items():
        assert run_as(outsider, ["ln", "-s", target, rdir / name], env).returncode == 0
    try:
        yield rdir
    finally:
        subprocess.run(["rm", "-rf", str(rdir)], timeout=30)


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_root_refuses_a_runtime_dir_someone_else_made(cmd: str, foreign_rdir: Path, outsider: str,
                                                     precious: dict[str, Path]) -> None:
    r = _cli(foreign_rdir, *COMMANDS[cmd], timeout=60)
    try:
        assert r.returncode != 0, (r.stdout, r.stderr)
        line = _last_line(r)  # the daemon may first warn that no device could be checked
        assert str(foreign_rdir) in line and f"belongs to {outsider}" in line, line
    finally:
        _cli(foreign_rdir, "emu", "stop")  # had it started, it must not outlive the test
    _untouched(precious)
    assert not (foreign_rdir / "emu.sock").exists() and not (foreign_rdir / "observe.sock").exists()


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775])
def test_root_refuses_a_runtime_dir_others_may_write(mode: int, runtime_dir: Path) -> None:
    runtime_dir.chmod(mode)
    for cmd in COMMANDS.values():
        r = _cli(runtime_dir, *cmd, timeout=60)
        assert r.returncode != 0, (cmd, r.stderr)
        line = _last_line(r)
        assert "writable by others" in line and str(runtime_dir) in line, line
    assert not any(runtime_dir.iterdir())


def test_a_runtime_dir_under_a_directory_others_may_write_is_refused(outsider: str) -> None:
    parent = Path(tempfile.mkdtemp(prefix="fxparent-"))
    try:
        parent.chmod(0o777)  # anyone could rename the runtime dir away and put their own there
        rdir = parent / "rt"
        r = _cli(rdir, *COMMANDS["observe"])
        assert r.returncode != 0 and "above the runtime dir" in _one_line(r), r.stderr
    finally:
        subprocess.run(["rm", "-rf", str(parent)], timeout=30)


def test_links_in_a_trusted_dir_are_never_followed(runtime_dir: Path, precious: dict[str, Path]) -> None:
    runtime_dir.chmod(0o755)
    for name, target in precious.items():
        (runtime_dir / name).symlink_to(target)
    r = _cli(runtime_dir, *COMMANDS["observe"])
    assert r.returncode == 0, r.stderr  # its lock is replaced by a file of its own
    ctl = subprocess.Popen([flexnpu_cli(), "controller"], env=_env(runtime_dir), cwd="/", stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        _wait_for(paths.controller_socket(runtime_dir).exists, "controller.sock", ctl)
    finally:
        stop_process(ctl, 20)
    try:
        r = _cli(runtime_dir, *COMMANDS["emu start"])
        # a log that is a link is refused (it may be an administrator's choice: say so, don't follow)
        assert r.returncode == 1 and "emu.log" in _last_line(r), r.stderr
    finally:
        _cli(runtime_dir, "emu", "stop")
    _untouched(precious)
    for name in ("observe.lock", "controller.lock"):
        assert not (runtime_dir / name).is_symlink(), name


# ------------------------------------------------------------------ published sockets and top

@pytest.fixture
def observer(open_rdir: Path) -> Iterator[subprocess.Popen]:
    p = subprocess.Popen([flexnpu_cli(), "observe", "--source", "shim", "--interval-ms", "50"], env=_env(open_rdir),
                         cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    try:
        _wait_for(paths.observe_socket(open_rdir).exists, "observe.sock", p)
        yield p
    finally:
        stop_process(p, 20)


def test_members_read_the_observer_and_outsiders_hear_why_not(flexnpu_group: str, observer, open_rdir: Path,
                                                              member: str, outsider: str) -> None:
    import grp

    sock = paths.observe_socket(open_rdir)
    st = sock.stat()
    assert stat.S_IMODE(st.st_mode) == paths.PUBLISH_SOCKET_MODE and st.st_gid == grp.getgrnam(flexnpu_group).gr_gid
    env = {"PATH": os.environ["PATH"], "FLEXNPU_RUNTIME_DIR": str(open_rdir), "PYTHONPATH": str(REPO)}
    r = run_as(member, [flexnpu_cli(), "top", "--json"], env, timeout=30)
    assert r.returncode == 0, r.stderr
    frame = json.loads(r.stdout)
    assert frame["snapshot"] is not None and frame["snapshot"]["schema"] >= 1  # it connected and read
    t0 = time.monotonic()
    r = run_as(outsider, [flexnpu_cli(), "top", "--json"], env, timeout=30)
    assert time.monotonic() - t0 < 10 and r.returncode == 1, r.stderr
    line = _one_line(r)
    assert line.startswith("flexnpu top: permission denied") and "observe.sock" in line, line
