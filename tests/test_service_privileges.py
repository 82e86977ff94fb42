"""Least privilege, proved by running each unit's ExecStart under the unit's own user, group
and capability set (setpriv):

- the observer works with exactly CAP_SYS_ADMIN, and fails with a clear message with one
  capability fewer; CAP_BPF + CAP_PERFMON instead of it load the program but cannot attach a
  uprobe on this kernel (the measurement behind the unit's choice);
- the emulator, the daemon and the controller hold no capability at all while they serve;
- every system call each service makes is in its unit's SystemCallFilter=, every socket it
  opens is in RestrictAddressFamilies=, and the units with MemoryDenyWriteExecute=yes never
  map memory writable and executable (strace of the real processes).

systemd itself is not PID 1 here, so the other sandboxing options are checked by
`systemd-analyze verify` (test_service_units.py) rather than by running under systemd.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from functools import cache
from pathlib import Path

import pytest
import zmq

from flexnpu import paths
from flexnpu.emulator import control
from flexnpu.service import install as inst
from flexnpu.service import units
from test_service_fixtures import (NotifySocket, account, needs_root, runner, service_config,  # noqa: F401
                                   service_rdir, service_section)

CAP_SYS_ADMIN = 21
START_S = 30.0


def _units(account, runner) -> dict[str, str]:
    conf = runner.rdir.parent / "flexnpu.toml"
    conf.write_text(inst.default_config_text(inst.installed_binary()))
    return units.render(service_config(account, conf))


def _caps(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:")):
            k, v = line.split()
            out[k[:-1]] = int(v, 16)
    return out


def _wait_ready(n: NotifySocket, svc, timeout: float = START_S) -> None:
    n.receive("READY=1", timeout, svc)


# ------------------------------------------------------------------ the observer


def _observer(runner, account, notify, caps=None):
    u = _units(account, runner)
    return runner.start("observe", u[units.OBSERVE], notify, caps=caps)


@needs_root
@pytest.mark.root_bpf
def test_observer_runs_with_exactly_its_capability(runner, account):
    n = NotifySocket(runner.rdir.parent / "notify.sock")
    try:
        svc = _observer(runner, account, n)
        _wait_ready(n, svc, 120)
        caps = _caps(svc.pid)
        assert caps["CapEff"] == caps["CapPrm"] == caps["CapAmb"] == caps["CapBnd"] == 1 << CAP_SYS_ADMIN, caps
        assert os.stat(f"/proc/{svc.pid}").st_uid != 0
        out = svc.output()
        assert re.search(r"attached \d+ probes to \S+libascendcl\.so", out), out
        assert "cannot attach" not in out, out
    finally:
        n.close()


@needs_root
@pytest.mark.root_bpf
def test_observer_with_one_capability_fewer_fails_clearly(runner, account):
    n = NotifySocket(runner.rdir.parent / "notify.sock")
    try:
        svc = _observer(runner, account, n, caps=[])
        rc = svc.wait_exit(60)
        out = svc.output().strip()
        assert rc != 0, out
        assert "READY=1" not in n.lines()
        last = out.splitlines()[-1]
        assert last.startswith("flexnpu observe: ") and "CAP_" in last, out
    finally:
        n.close()


@needs_root
@pytest.mark.root_bpf
def test_bpf_and_perfmon_without_sys_admin_cannot_attach_uprobes(runner, account):
    """The measurement behind OBSERVER_CAPS: the program loads, perf_event_open on the uprobe
    PMU is refused (EACCES), and bcc's tracefs fallback is root's."""
    n = NotifySocket(runner.rdir.parent / "notify.sock")
    try:
        svc = _observer(runner, account, n, caps=["CAP_BPF", "CAP_PERFMON"])
        deadline = time.monotonic() + 120
        while "cannot attach" not in svc.output() and svc.proc.poll() is None:
            assert time.monotonic() < deadline, svc.output()
            time.sleep(0.2)
        out = svc.output()
        assert "cannot attach" in out and not re.search(r"attached \d+ probes", out), out
        # and it says so and stops, rather than publishing empty "bpf" snapshots as if ready
        assert svc.wait_exit(60) != 0, svc.output()
        assert "READY=1" not in n.lines()
        assert "uprobes need root or CAP_SYS_ADMIN" in svc.output().strip().splitlines()[-1], svc.output()
    finally:
        n.close()


# ------------------------------------------------------------------ the others: no capability at all


@needs_root
def test_emulator_daemon_and_controller_hold_no_capability(runner, account):
    u = _units(account, runner)
    n = NotifySocket(None)
    try:
        started = [runner.start("emu", u[units.EMU], n)]
        _wait_ready(n, started[-1])
        for name, text, inst_ in (("daemon", u[units.DAEMON_TEMPLATE], "0"), ("controller", u[units.CONTROLLER], None)):
            n.messages.clear()
            started.append(runner.start(name, text, n, **({"instance": inst_} if inst_ else {})))
            _wait_ready(n, started[-1])
        for svc in started:
            caps = _caps(svc.pid)
            assert set(caps.values()) == {0}, (svc.name, caps)
            assert os.stat(f"/proc/{svc.pid}").st_uid != 0, svc.name
        assert control.status(runner.rdir)["devices"]
    finally:
        n.close()


# ------------------------------------------------------------------ system calls, address families, W^X


@cache
def _filter_sets() -> dict[str, set[str]]:
    """systemd's syscall groups, from the installed systemd-analyze."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True).stdout
    groups: dict[str, list[str]] = {}
    cur = None
    for line in out.splitlines():
        if line.startswith("@"):
            cur = line.strip()
            groups[cur] = []
        elif cur and line.strip() and not line.strip().startswith("#"):
            groups[cur].append(line.strip())

    def expand(name: str) -> set[str]:
        acc: set[str] = set()
        for m in groups.get(name, []):
            acc |= expand(m) if m.startswith("@") else {m}
        return acc

    return {g: expand(g) for g in groups}


def allowed_syscalls(unit_text: str) -> tuple[set[str], set[str]]:
    """(allowed, denied) by the unit's SystemCallFilter= lines, merged as systemd does: the
    first (an allow list here) sets the default, then each line adds (plain) or removes (~)."""
    sets = _filter_sets()
    allow: set[str] = set()
    deny: set[str] = set()
    lines = service_section(unit_text).get("SystemCallFilter", [])
    assert lines and not lines[0].startswith("~"), lines
    for v in lines:
        items: set[str] = set()
        for item in v.lstrip("~").split():
            items |= sets[item] if item.startswith("@") else {item}
        if v.startswith("~"):
            allow -= items
            deny |= items
        else:
            allow |= items
            deny -= items
    return allow, deny


# uretprobe(2), x86_64 number 335 (Linux 6.11+; strace 5.x has no name for it): made by the
# kernel's return-probe trampoline when an observer's uretprobe fires in a traced process (any
# FlexNPU observer running on the machine), not by the program itself; seccomp passes it through
URETPROBE = "syscall_0x14f"

_CALL = re.compile(r"^\d+\s+(?:<\.\.\. )?([a-z_0-9]+)[( ]")


_OWN = re.compile(r'"/proc/(self|thread-self|\d+)(/|")')


def _trace(path: Path) -> tuple[set[str], set[str], list[str], list[str]]:
    """(syscall names, socket families, W+X mappings, /proc paths outside a process's own
    directory) in an strace -f output file."""
    names, families, wx, proc = set(), set(), [], []
    lines = path.read_text(errors="replace").splitlines()
    # systemd applies the unit's filters at the service's own execve: what prlimit and setpriv
    # do before it (setresuid, setgroups, capset) is systemd's part here
    start = next((i for i, ln in enumerate(lines) if re.search(r'execve\("[^"]*/flexnpu"', ln)), None)
    assert start is not None, f"no execve of flexnpu in {path}"
    for line in lines[start:]:
        m = _CALL.match(line)
        if not m or "resumed>" in line and not line.split("<... ", 1)[-1].startswith(m.group(1)):
            continue
        if m.group(1) == URETPROBE:
            continue
        names.add(m.group(1))
        if m.group(1) == "socket":
            f = re.search(r"socket\((AF_[A-Z0-9]+)", line)
            if f:
                families.add(f.group(1))
        if m.group(1) in ("mmap", "mprotect", "pkey_mprotect") and "PROT_WRITE" in line and "PROT_EXEC" in line:
            wx.append(line)
        if '"/proc/' in line and not _OWN.search(line):
            proc.append(line)
    return names, families, wx, proc


def _traced(runner, name, text, notify, **kw):
    """Starts the unit's command under strace -f (strace outside setpriv, so it may trace)."""
    out = runner.rdir.parent / f"{name}.strace"
    return runner.start(name, text, notify, wrap=("strace", "-f", "-qq", "-s", "120", "-o", str(out)), **kw), out


def _check_trace(text: str, trace: Path, pids: set[int] | None = None) -> None:
    names, families, wx, proc = _trace(trace)
    allow, deny = allowed_syscalls(text)
    # execve of the first binary happens before systemd would apply the filter (it is in @default anyway)
    outside = sorted(names - allow)
    where = [ln for ln in trace.read_text(errors="replace").splitlines()
             if (m := _CALL.match(ln)) and m.group(1) in outside][:4]
    assert not outside, f"outside SystemCallFilter=: {outside}: {where}"
    fams = {f for v in service_section(text)["RestrictAddressFamilies"] for f in v.split()}
    assert families <= fams, f"socket families {families} beyond RestrictAddressFamilies={fams}"
    if service_section(text).get("MemoryDenyWriteExecute") == ["yes"]:
        assert not wx, wx[:3]
    if service_section(text).get("ProcSubset") == ["pid"]:  # only per-process /proc files
        assert not proc, proc[:3]
    if service_section(text).get("ProtectProc") == ["invisible"] and pids is not None:
        # only its own processes' /proc directories (strace -f: every pid in the trace is its own)
        own = {int(ln.split()[0]) for ln in trace.read_text(errors="replace").splitlines() if ln[:1].isdigit()}
        other = [ln for ln in trace.read_text(errors="replace").splitlines()
                 if (m := re.search(r'"/proc/(\d+)/', ln)) and int(m.group(1)) not in own]
        assert not other, other[:3]


needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")


@needs_root
@needs_strace
def test_emulator_daemon_controller_stay_in_their_filters(runner, account):
    u = _units(account, runner)
    n = NotifySocket(None)
    traces = []
    try:
        for name, key, kw in (("emu", units.EMU, {}), ("daemon", units.DAEMON_TEMPLATE, {"instance": "0"}),
                              ("controller", units.CONTROLLER, {})):
            n.messages.clear()
            svc, tr = _traced(runner, name, u[key], n, **kw)
            _wait_ready(n, svc, 60)
            traces.append((name, u[key], svc, tr))
        # exercise them: a status query, a ping, and a few controller ticks and reports
        assert control.status(runner.rdir)["devices"]
        ctx = zmq.Context()
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        try:
            req.connect(f"ipc://{paths.daemon_socket(0, runner.rdir)}")
            req.send(json.dumps({"schema": 1, "cmd": "ping"}).encode())
            assert req.poll(5000)
            req.recv()
        finally:
            req.close(0)
            ctx.term()
        time.sleep(1.5)
        for name, text, svc, tr in reversed(traces):
            assert svc.stop() == 0, (name, svc.output())
            _check_trace(text, tr, pids=set())
    finally:
        n.close()


@needs_root
@needs_strace
@pytest.mark.root_bpf
def test_observer_stays_in_its_filter(runner, account):
    u = _units(account, runner)
    n = NotifySocket(None)
    try:
        svc, tr = _traced(runner, "observe", u[units.OBSERVE], n)
        _wait_ready(n, svc, 180)
        time.sleep(1.0)
        assert svc.stop(30) == 0, svc.output()
        _check_trace(u[units.OBSERVE], tr)
    finally:
        n.close()


@needs_root
@pytest.mark.root_bpf
def test_observer_finds_libraries_of_other_users_without_sys_ptrace(runner, account):
    """Why the unit has no CAP_SYS_PTRACE: a process of another uid (nobody) that maps a copy
    of libascendcl.so from its own directory is found through /proc and its copy attached."""
    libdir = runner.rdir.parent / "otherlib"
    libdir.mkdir(mode=0o755)
    os.chmod(libdir, 0o755)
    lib = libdir / "libascendcl.so"
    shutil.copy(paths.emulator_library(), lib)
    os.chmod(lib, 0o755)
    other = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
                              f"import ctypes, time; ctypes.CDLL({str(lib)!r}); time.sleep(120)"],
                             start_new_session=True)
    n = NotifySocket(None)
    try:
        svc = _observer(runner, account, n)
        _wait_ready(n, svc, 120)
        deadline = time.monotonic() + 20
        while f"probes to {lib}" not in svc.output():
            assert other.poll() is None and time.monotonic() < deadline, svc.output()
            time.sleep(0.2)
        assert "CAP_SYS_PTRACE" not in service_section(units.render(service_config(
            account, runner.rdir.parent / "c.toml"))[units.OBSERVE])["CapabilityBoundingSet"][0]
        t0 = time.monotonic()
        assert svc.stop(90) == 0, svc.output()
        print(f"observer with two libraries attached stopped in {time.monotonic() - t0:.1f} s")
    finally:
        other.kill()
        other.wait(5)
        n.close()


@pytest.fixture
def client_group_view(runner, account) -> tuple[str, ...]:
    """A wrapper that shows the command a node where paths.CLIENT_GROUP exists and the service
    user is in it (as install makes it), without creating that group on this machine (other
    tests run here): a private mount namespace with a copy of /etc/group bound over it."""
    import grp

    if inst.group_exists(paths.CLIENT_GROUP):
        return ()  # the real one: the account fixture put the user in it
    used = {g.gr_gid for g in grp.getgrall()}
    gid = next(g for g in range(990, 100, -1) if g not in used)
    text = Path("/etc/group").read_text()
    view = runner.rdir.parent / "group"
    view.write_text(text + ("" if text.endswith("\n") else "\n") + f"{paths.CLIENT_GROUP}:x:{gid}:{account.user}\n")
    os.chmod(view, 0o644)
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c", 'mount --bind "$0" /etc/group && exec "$@"',
            str(view))


@needs_root
@needs_strace
def test_with_the_client_group_services_stay_in_their_filters(runner, account, client_group_view):
    """The path where the emulator, the daemon and the controller give their sockets to the
    client group (chown) and the first two check a peer's supplementary groups in /proc."""
    u = _units(account, runner)
    n = NotifySocket(None)
    traces = []
    try:
        for name, key, kw in (("emu", units.EMU, {}), ("daemon", units.DAEMON_TEMPLATE, {"instance": "0"}),
                              ("controller", units.CONTROLLER, {})):
            n.messages.clear()
            out = runner.rdir.parent / f"{name}-group.strace"
            svc = runner.start(name, u[key], n, wrap=("strace", "-f", "-qq", "-s", "120", "-o", str(out),
                                                      *client_group_view), **kw)
            _wait_ready(n, svc, 60)
            traces.append((name, u[key], svc, out))
        for p, mode in ((paths.emulator_socket(runner.rdir), paths.EMU_SOCKET_MODE),
                        (paths.daemon_socket(0, runner.rdir), paths.CLIENT_SOCKET_MODE),
                        (paths.controller_socket(runner.rdir), paths.PUBLISH_SOCKET_MODE)):
            st = p.stat()
            assert st.st_mode & 0o777 == mode and st.st_gid != os.stat(runner.rdir).st_gid, (p, oct(st.st_mode))
        assert control.status(runner.rdir)["devices"]
        for name, text, svc, tr in reversed(traces):
            assert svc.stop() == 0, (name, svc.output())
            _check_trace(text, tr)
    finally:
        n.close()
