"""Fixtures for the service tests: a throwaway system user and group, systemd's side of the
sd_notify protocol (a datagram socket where NOTIFY_SOCKET points), and a runner that starts a
unit's ExecStart exactly as the unit file gives it, under the unit's User=, Group=,
capabilities (setpriv), NoNewPrivileges=, UMask= and systemd's default LimitMEMLOCK=, with
a temp runtime dir. Every process started here is stopped at teardown, failed test or not."""

from __future__ import annotations

import os
import pwd
import secrets
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from conftest import new_runtime_dir
from flexnpu import paths
from flexnpu.service import install as inst
from flexnpu.service import units

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (users, groups, setpriv)")
SYSTEMD_MEMLOCK = 8 << 20  # systemd's default LimitMEMLOCK= (8 MiB)
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


# ------------------------------------------------------------------ units


def service_section(text: str) -> dict[str, list[str]]:
    """The [Service] keys of a unit file, each with its values in order."""
    out: dict[str, list[str]] = {}
    section = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def caps_of(svc: dict[str, list[str]], key: str) -> list[str]:
    return [c for v in svc.get(key, []) for c in v.split()]


@dataclass(frozen=True)
class Account:
    user: str
    group: str


@pytest.fixture(scope="module")
def account() -> Iterator[Account]:
    """A new system user in a new system group, as install makes them; removed after."""
    if os.geteuid() != 0:
        pytest.skip("needs root (useradd)")
    name = f"fxs{secrets.token_hex(3)}"
    subprocess.run(["groupadd", "--system", name], check=True)
    try:
        # in the node's client group too when it exists, as the real service user is: the daemon
        # gives its sockets to that group, which only a member may do without CAP_CHOWN
        extra = ["--groups", paths.CLIENT_GROUP] if inst.group_exists(paths.CLIENT_GROUP) else []
        subprocess.run(["useradd", "--system", "--gid", name, *extra, "--no-create-home", "--home-dir",
                        "/nonexistent", "--shell", "/usr/sbin/nologin", name], check=True)
        try:
            yield Account(name, name)
        finally:
            subprocess.run(["userdel", name], check=False)
    finally:
        if inst.group_exists(name):  # userdel removes a same-named primary group itself
            subprocess.run(["groupdel", name], check=False)


def service_config(account: Account, config_file: Path, devices: tuple[int, ...] = (0,),
                   emulator: bool = True, network: bool = False) -> units.ServiceConfig:
    return units.ServiceConfig(binary=inst.installed_binary(), devices=devices, emulator=emulator,
                               emu_devices=max(devices) + 1, user=account.user, group=account.group,
                               config_file=config_file, observe_network=network, controller_network=network)


# ------------------------------------------------------------------ sd_notify, systemd's side


class NotifySocket:
    """A bound AF_UNIX datagram socket, by path (mode 0777, as systemd's) or abstract name."""

    def __init__(self, where: Path | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if where is None:
            name = f"flexnpu-test-notify-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.addr = "@" + name
        else:
            self.sock.bind(str(where))
            os.chmod(where, 0o777)
            self.addr = str(where)
        self.messages: list[str] = []

    def receive(self, want: str, timeout: float, service: "Service | None" = None) -> list[str]:
        """Datagrams until one holds the line `want`; AssertionError after timeout seconds (with
        the service's output, if given)."""
        deadline = time.monotonic() + timeout
        while not any(want in m.split("\n") for m in self.messages):
            left = deadline - time.monotonic()
            if left <= 0:
                out = f"; its output:\n{service.output()}" if service else ""
                raise AssertionError(f"no {want} within {timeout} s; got {self.messages}{out}")
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue
        return self.messages

    def lines(self) -> list[str]:
        return [ln for m in self.messages for ln in m.split("\n")]

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------ running a unit


@dataclass
class Service:
    name: str
    argv: list[str]
    proc: subprocess.Popen
    log: Path
    rdir: Path
    wrapped: bool = False

    @property
    def pid(self) -> int:
        """The service's own pid (under a wrapper such as strace, the wrapper's child)."""
        if not self.wrapped:
            return self.proc.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            if kids:
                return int(kids[0])
            time.sleep(0.02)
        raise AssertionError(f"{self.name}: no child under {self.argv[0]}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)  # the service, not a wrapper (strace would detach)
            except (ProcessLookupError, AssertionError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test started
                self.proc.wait(60)  # closing many uprobes takes the kernel a while, even after a kill
        return self.proc.returncode


@dataclass
class Runner:
    account: Account
    rdir: Path
    started: list[Service] = field(default_factory=list)

    def command(self, unit_text: str, instance: str | None = None, caps: list[str] | None = None,
                with_bounding: bool = True) -> tuple[list[str], dict[str, str]]:
        """setpriv argv and environment for the unit's ExecStart. `caps` replaces the unit's
        AmbientCapabilities= (to run it with fewer)."""
        svc = service_section(unit_text)
        exec_start = svc["ExecStart"][0]
        if instance is not None:
            exec_start = exec_start.replace("%i", instance)
        assert "%" not in exec_start, exec_start
        ambient = caps_of(svc, "AmbientCapabilities") if caps is None else caps
        bounding = caps_of(svc, "CapabilityBoundingSet") if caps is None else caps

        def capspec(cs: list[str]) -> str:
            return ",".join(["-all"] + [f"+{c.removeprefix('CAP_').lower()}" for c in cs])

        argv = ["prlimit", f"--memlock={SYSTEMD_MEMLOCK}", "--",
                "setpriv", f"--reuid={svc['User'][0]}", f"--regid={svc['Group'][0]}", "--init-groups",
                f"--inh-caps={capspec(ambient)}", f"--ambient-caps={capspec(ambient)}"]
        if with_bounding:
            argv.append(f"--bounding-set={capspec(bounding)}")
        if svc.get("NoNewPrivileges") == ["yes"]:
            argv.append("--no-new-privs")
        argv += ["--", *shlex.split(exec_start)]
        pw = pwd.getpwnam(svc["User"][0])
        env = {**BASE_ENV, "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
               "SHELL": pw.pw_shell}
        for e in svc.get("Environment", []):
            k, v = e.split("=", 1)
            env[k] = v
        env["FLEXNPU_RUNTIME_DIR"] = str(self.rdir)  # the temp dir stands in for /run/flexnpu
        return argv, env

    def start(self, name: str, unit_text: str, notify: NotifySocket | None, wrap: tuple[str, ...] = (),
              **kw) -> Service:
        """Starts the unit's command; `wrap` goes before it (strace, run as root so it may trace)."""
        argv, env = self.command(unit_text, **kw)
        argv = [*wrap, *argv]
        if notify is not None:
            env["NOTIFY_SOCKET"] = notify.addr
        umask = int(service_section(unit_text).get("UMask", ["0022"])[0], 8)
        log = self.rdir.parent / f"{self.rdir.name}-{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=lambda: os.umask(umask))
        s = Service(name, argv, proc, log, self.rdir, wrapped=bool(wrap))
        self.started.append(s)
        return s

    def stop_all(self) -> None:
        for s in reversed(self.started):
            s.stop()


@pytest.fixture
def service_rdir(account: Account) -> Iterator[Path]:
    """A runtime dir as RuntimeDirectory= makes it: owned by the unit's user and group, with
    RuntimeDirectoryMode=."""
    parent = new_runtime_dir()
    os.chmod(parent, 0o755)
    rdir = parent / "rt"
    rdir.mkdir()
    os.chown(rdir, pwd.getpwnam(account.user).pw_uid, pwd.getpwnam(account.user).pw_gid)
    os.chmod(rdir, paths.RUNTIME_DIR_MODE)
    yield rdir


@pytest.fixture
def runner(account: Account, service_rdir: Path) -> Iterator[Runner]:
    r = Runner(account, service_rdir)
    try:
        yield r
    finally:
        r.stop_all()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, service_rdir: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(service_rdir.parent / "notify.sock" if request.param == "path" else None)
    try:
        yield s
    finally:
        s.close()
