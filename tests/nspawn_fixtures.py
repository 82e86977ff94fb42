"""A real systemd as PID 1, for the service tests: a minimal Debian 12 tree booted with
`systemd-nspawn -b`, FlexNPU installed into it from a wheel of this checkout, controlled from
the host by `nsenter` into the container's namespaces.

The tree (debootstrap, then a venv with FlexNPU's dependencies) is built once and cached under
$FLEXNPU_NSPAWN_CACHE (default /var/cache/flexnpu-nspawn), in a directory named by a hash of
everything it is made from; a run boots it with `--volatile=overlay` (a tmpfs over the
read-only tree), so the cache is never written by a test and a run starts from the same state.

Why the container is started this way (docs/service.md, "Under a real systemd"):
- `--register=no --keep-unit`: the host's PID 1 need not be systemd (no machined, no scope);
- `--system-call-filter="bpf perf_event_open"`: nspawn's own allow list leaves both out, and
  every process under the container's systemd inherits it (the observer's map creation fails
  with EPERM without it);
- the host's kernel headers (/lib/modules, /usr/src, /usr/lib/linux-kbuild-*) read-only, for
  bcc's compiler, and the host's tracefs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FLEXNPU_NSPAWN_CACHE", "/var/cache/flexnpu-nspawn"))
MIRROR = os.environ.get("FLEXNPU_NSPAWN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
# systemd as init, Debian's Python and bcc (bcc is not on PyPI), as scripts/setup.sh installs them
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "python3-bpfcc", "libbpfcc", "procps")
VENV = "/opt/flexnpu"  # FlexNPU's venv inside the container: `flexnpu` is /opt/flexnpu/bin/flexnpu
RECIPE = 1  # bump when the way the tree is made changes


def dependencies() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def tree_key() -> str:
    """What the cached tree is made from: the suite, the Debian packages, the venv's packages."""
    text = json.dumps({"recipe": RECIPE, "suite": SUITE, "packages": PACKAGES, "deps": dependencies(),
                       "python": sys.version_info[:2]})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _run(argv: list[str], timeout: float, what: str) -> str:
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{what} failed ({p.returncode}): {' '.join(argv)}\n{p.stdout[-4000:]}")
    return p.stdout


def _nspawn_run(tree: Path, binds: list[str], cmd: str, timeout: float, what: str) -> str:
    """One command in the tree, in a container without an init (for building it)."""
    return _run(["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", f"--directory={tree}",
                 "--pipe", *binds, "/bin/sh", "-ec", cmd], timeout, what)


@contextlib.contextmanager
def cached_tree(log) -> Iterator[Path]:
    """The tree for this checkout's dependencies, made (debootstrap, venv) if missing, held
    in use (a shared lock on <key>.use) while the caller boots it. Trees made from other
    inputs (about 820 MB each) that no run is using are removed, and the log says so."""
    key = tree_key()
    CACHE.mkdir(parents=True, exist_ok=True)
    with _held(CACHE / f"{key}.use"):  # taken before the tree is made: a pruning run sees it in use
        tree = _made(key, log)
        with open(CACHE / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for what in prune(CACHE, key):
                log(what)
        yield tree


@contextlib.contextmanager
def _held(path: Path) -> Iterator[None]:
    """A shared lock on path, on the file that is there once it is held (a pruning run may
    have removed the one opened while it waited)."""
    while True:
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            try:
                same = os.fstat(f.fileno()).st_ino == path.stat().st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield
                return


def prune(cache: Path, keep: str) -> list[str]:
    """Removes every cached tree but `keep` that no run holds (its <key>.use lock), and
    unfinished builds; the caller holds cache/.lock. Returns what it did, a line each."""
    done = []
    for d in sorted(cache.iterdir()):
        if not d.is_dir() or d.name == keep:
            continue
        key = d.name.removesuffix(".tmp")
        if key == keep and d.name.endswith(".tmp"):
            continue
        with open(cache / f"{key}.use", "a") as use:
            try:
                fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another run boots it now
            size = sum(f.lstat().st_size for f in d.rglob("*") if not f.is_symlink() and f.is_file())
            shutil.rmtree(d, ignore_errors=True)
            (cache / f"{key}.use").unlink(missing_ok=True)
        done.append(f"removed the cached tree {d.name} ({size / 1e6:.0f} MB): made from other inputs, not in use")
    return done


def _made(key: str, log) -> Path:
    final = CACHE / key / "root"
    if (CACHE / key / "ok").exists():
        return final
    with open(CACHE / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once build it once
        if (CACHE / key / "ok").exists():
            return final
        work = CACHE / f"{key}.tmp"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        tree = work / "root"
        t0 = time.monotonic()
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(tree), MIRROR],
             900, "debootstrap")
        log(f"debootstrap {SUITE}: {time.monotonic() - t0:.0f} s")
        # The dependencies' wheels come through the host's pip (its index and certificates), so
        # the container needs no network configuration of its own.
        wheels = work / "wheels"
        t1 = time.monotonic()
        _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "-d", str(wheels),
              *dependencies()], 600, "pip download")
        # --system-site-packages: Debian's bcc, the only package in the tree's dist-packages that matters
        _nspawn_run(tree, [f"--bind-ro={wheels}:/mnt/wheels"],
                    f"python3 -m venv --system-site-packages {VENV}; "
                    f"{VENV}/bin/pip install -q --disable-pip-version-check --no-index --find-links /mnt/wheels "
                    + " ".join(f"'{d}'" for d in dependencies())
                    + f"; {VENV}/bin/python -c 'import bcc, zmq'", 600, "the venv")
        log(f"venv with {len(dependencies())} dependencies: {time.monotonic() - t1:.0f} s")
        shutil.rmtree(wheels)
        shutil.rmtree(CACHE / key, ignore_errors=True)
        work.rename(CACHE / key)
        (CACHE / key / "ok").write_text(json.dumps({"made_s": round(time.monotonic() - t0, 1)}) + "\n")
    return final


def build_wheel(dest: Path) -> Path:
    """A wheel of this checkout (the native parts built as `pip install` builds them)."""
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check", "-w", str(dest),
          str(REPO)], 600, "pip wheel")
    return next(dest.glob("flexnpu-*.whl"))


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def _tree(pid: int) -> list[int]:
    """pid and every descendant, parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += _children(p)
    return out


def _nspid(pid: int) -> list[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return []


def _is_systemd(pid: int) -> bool:
    """PID 1 of the container once nspawn's child has exec'd systemd (before that, nsenter would
    enter a mount namespace that is not yet the container's)."""
    try:
        return os.readlink(f"/proc/{pid}/exe").endswith("/systemd")
    except OSError:
        return False


def _kernel_headers() -> list[str]:
    """Read-only binds of the host's kernel headers, where bcc looks for them."""
    binds = []
    for d in [Path("/lib/modules"), Path("/usr/src"), *Path("/usr/lib").glob("linux-kbuild-*")]:
        if d.is_dir():
            binds.append(f"--bind-ro={d}")
    # tracefs, as systemd mounts it on a host (in the container its mount unit's condition,
    # CAP_SYS_RAWIO, fails): bcc looks up its probes there when it detaches them
    if os.path.ismount("/sys/kernel/tracing"):
        binds.append("--bind=/sys/kernel/tracing")
    return binds


@dataclass
class Container:
    """A booted container: `run` and `popen` execute in its namespaces, as its root."""

    nspawn: subprocess.Popen
    machine: str
    leader: int  # the container's PID 1, as the host numbers it
    console: Path
    clients: list[subprocess.Popen] = field(default_factory=list)

    def argv(self, *cmd: str) -> list[str]:
        return ["nsenter", "-t", str(self.leader), "-a", *cmd]

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(self.argv(*cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
        return p

    def sh(self, script: str, timeout: float = 60, check: bool = True) -> str:
        return self.run("/bin/sh", "-c", script, timeout=timeout, check=check).stdout

    def popen(self, *cmd: str) -> subprocess.Popen:
        """A long-running program in the container (its own session: stopped at teardown)."""
        p = subprocess.Popen(self.argv(*cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        self.clients.append(p)
        return p

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", "-p", ",".join(props), unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        return self.run("journalctl", "-b", "-u", unit, "-o", "cat", "--no-pager", check=False).stdout

    def host_pid(self, container_pid: int) -> int | None:
        """The host's number for a process of the container (whose pid namespace is the leader's)."""
        for p in _tree(self.leader):
            ns = _nspid(p)
            if len(ns) >= 2 and ns[-1] == container_pid:
                return p
        return None


def _stop_client(p: subprocess.Popen) -> None:
    if p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(10)


def leftovers(machine: str, nspawn_pid: int) -> list[str]:
    """What a stopped container could leave on the host: its processes, its mounts, machine state."""
    out = []
    if Path(f"/proc/{nspawn_pid}").exists() and _cmdline_has(nspawn_pid, "systemd-nspawn"):
        out.append(f"systemd-nspawn (pid {nspawn_pid}) still running")
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if "nspawn-volatile" in line or f"/{machine}" in line:
            out.append(f"mount: {line}")
    for d in (Path("/var/lib/machines") / machine, Path("/run/systemd/nspawn/propagate") / machine,
              Path("/run/systemd/nspawn/unix-export") / machine):
        if d.exists():
            out.append(f"left: {d}")
    return out


def _cmdline_has(pid: int, word: str) -> bool:
    try:
        return word in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _remove_state(machine: str) -> None:
    # nspawn makes these for machined's use; they are empty and only its run's
    for d in (Path("/run/systemd/nspawn/propagate") / machine, Path("/run/systemd/nspawn/unix-export") / machine):
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def booted(tree: Path, work: Path, binds: list[str], log, boot_timeout: float = 90) -> Iterator[Container]:
    """Boots the tree (overlay over it), yields the container once systemd says it is up, and
    powers it off at the end; a container that does not go within 60 s is killed, process by
    process. Every client started through `popen` is killed first."""
    machine = f"flexnpu-test-{os.getpid()}"
    console = work / "console.log"
    argv = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--boot", f"--directory={tree}",
            "--volatile=overlay", f"--machine={machine}", "--console=pipe",
            "--system-call-filter=bpf perf_event_open", *_kernel_headers(), *binds]
    t0 = time.monotonic()
    with open(console, "w") as out:
        ns = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True)
    c = None
    try:
        deadline = time.monotonic() + boot_timeout
        leader = None
        while leader is None:
            if ns.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {ns.returncode} at boot:\n{console.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no container PID 1 within {boot_timeout} s:\n{console.read_text()[-4000:]}")
            leader = next((p for p in _tree(ns.pid)[1:] if _nspid(p)[-1:] == [1] and _is_systemd(p)), None)
            time.sleep(0.05)
        c = Container(ns, machine, leader, console)
        # PID 1 is nspawn's own until it execs systemd, and systemctl answers once systemd's
        # private socket is bound (before that: nothing, or "offline")
        state = ""
        while state in ("", "offline"):
            if ns.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the container's systemd did not come up within {boot_timeout} s:\n"
                                   f"{console.read_text()[-4000:]}")
            left = max(1.0, deadline - time.monotonic())
            state = c.run("systemctl", "is-system-running", "--wait", timeout=left, check=False).stdout.strip()
            if state in ("", "offline"):
                time.sleep(0.1)
        if state not in ("running", "degraded"):
            raise RuntimeError(f"the container's systemd is {state!r}:\n{console.read_text()[-4000:]}")
        if state == "degraded":
            log("container degraded: " + c.sh("systemctl --failed --no-legend --plain", check=False).strip())
        log(f"booted in {time.monotonic() - t0:.1f} s ({state})")
        yield c
    finally:
        for p in (c.clients if c else []):
            _stop_client(p)
        if ns.poll() is None:
            ns.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to halt
            try:
                ns.wait(60)  # the halt stops the units: the observer's uprobes take seconds to go
            except subprocess.TimeoutExpired:
                for p in reversed(_tree(ns.pid)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)
                ns.wait(10)
        _remove_state(machine)
        log(f"container gone {time.monotonic() - t0:.1f} s after its start")
