"""The services under a real systemd: a Debian 12 container booted by systemd-nspawn, FlexNPU
installed into it from a wheel of this checkout and `flexnpu service install --devices 0,1`
run there, as on a host (tests/nspawn_fixtures.py).

Checked: the units start in their declared order and are active only once they serve (their
READY=1 and STATUS=); the observer attaches its uprobes holding exactly the unit's capability;
`systemctl kill -s KILL` of each unit is followed by systemd's restart, with a client program
under the shim running on (the device server's kill ends the client with the runtime's error,
as docs/reliability.md says, and a new client runs); `systemctl stop` leaves no process, no
socket and no BPF program of the units; `flexnpu service uninstall` removes what install made.
The container and what it mounted are gone at the end, also when a test fails.

Cold (no cached tree: debootstrap and the venv) about 2 minutes on the development VM, warm
about 1; docs/service.md gives the figures.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

import nspawn_fixtures as nsf

EMU, OBSERVE, CONTROLLER = "flexnpu-emu.service", "flexnpu-observe.service", "flexnpu-controller.service"
DAEMONS = ("flexnpu-daemon@0.service", "flexnpu-daemon@1.service")
ALL = (EMU, *DAEMONS, OBSERVE, CONTROLLER)
FLEXNPU = f"{nsf.VENV}/bin/flexnpu"
PYTHON = f"{nsf.VENV}/bin/python"
PKG = f"{nsf.VENV}/lib/python3.11/site-packages/flexnpu"
SAMPLE = f"{PKG}/samples/sample_loop.py"
KERNELS = f"{PKG}/_native/share/kernels.fxk"
CAP_SYS_ADMIN = 21
SYS_BPF = {"x86_64": 321, "aarch64": 280}  # the bpf() system call's number (asm/unistd.h)

_missing = [t for t in ("systemd-nspawn", "debootstrap", "nsenter") if shutil.which(t) is None]
pytestmark = [
    pytest.mark.systemd_nspawn,
    pytest.mark.root_bpf,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (systemd-nspawn, debootstrap)"),
    pytest.mark.skipif(bool(_missing), reason=f"needs {', '.join(_missing)} (apt-get install systemd-container "
                                              "debootstrap util-linux; scripts/setup.sh does)"),
]

TIMINGS: dict[str, float] = {}


def _log(msg: str) -> None:
    print(f"[nspawn] {msg}", flush=True)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """The container with FlexNPU's services installed and started by `flexnpu service install`."""
    t0 = time.monotonic()
    work = tmp_path_factory.mktemp("nspawn")
    with contextlib.ExitStack() as stack:
        tree = stack.enter_context(nsf.cached_tree(_log))
        TIMINGS["tree_s"] = time.monotonic() - t0
        wheel = nsf.build_wheel(work / "wheel")
        TIMINGS["wheel_s"] = time.monotonic() - t0 - TIMINGS["tree_s"]
        c = stack.enter_context(nsf.booted(tree, work, [f"--bind-ro={wheel.parent}:/mnt/wheel"], _log))
        try:
            TIMINGS["boot_s"] = time.monotonic() - t0 - TIMINGS["tree_s"] - TIMINGS["wheel_s"]
            c.run(f"{nsf.VENV}/bin/pip", "install", "-q", "--no-deps", "--no-index", f"/mnt/wheel/{wheel.name}",
                  timeout=120)
            t1 = time.monotonic()
            out = c.run(FLEXNPU, "service", "install", "--devices", "0,1", timeout=300).stdout
            TIMINGS["install_s"] = time.monotonic() - t1
            _log(f"service install: {TIMINGS['install_s']:.1f} s\n{out}")
            assert "ran: systemctl enable --now" in out, out
            yield c
        finally:
            if c.nspawn.poll() is None:
                _log("journal of the units:\n" + c.run("journalctl", "-b", "-u", "flexnpu*", "-o", "short-monotonic",
                                                        "--no-pager", check=False).stdout[-12000:])
    left = nsf.leftovers(c.machine, c.nspawn.pid)
    TIMINGS["total_s"] = time.monotonic() - t0
    _log("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in TIMINGS.items()))
    assert not left, left


def _mono(v: str) -> int:
    return int(v)


def test_units_start_in_declared_order_and_report_ready(node):
    props = ("Type", "ActiveState", "SubState", "MainPID", "StatusText", "NRestarts", "After",
             "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    s = {u: node.show(u, *props) for u in ALL}
    for u in ALL:
        assert s[u]["Type"] == "notify", (u, s[u])
        assert (s[u]["ActiveState"], s[u]["SubState"]) == ("active", "running"), (u, s[u], node.journal(u))
        assert int(s[u]["MainPID"]) > 0 and s[u]["NRestarts"] == "0", (u, s[u], node.journal(u))
        assert node.run("systemctl", "is-active", u).stdout.strip() == "active"
    # STATUS= of each, sent with READY=1 once it serves
    assert re.fullmatch(r"2 x \S+, serving /run/flexnpu/emu\.sock", s[EMU]["StatusText"]), s[EMU]
    for d, u in enumerate(DAEMONS):
        assert s[u]["StatusText"] == f"forwarding device {d}", s[u]
    assert s[OBSERVE]["StatusText"] == "source bpf", s[OBSERVE]
    assert re.fullmatch(r"policy \S+, tick \d+ ms, 2 devices", s[CONTROLLER]["StatusText"]), s[CONTROLLER]
    # the order the units declare: a daemon starts only once the device server is ready, the
    # controller only once both daemons are; the observer is not ordered
    for u in DAEMONS:
        assert EMU in s[u]["After"].split(), s[u]["After"]
        assert _mono(s[u]["ExecMainStartTimestampMonotonic"]) >= _mono(s[EMU]["ActiveEnterTimestampMonotonic"])
    for u in (EMU, *DAEMONS):
        assert u in s[CONTROLLER]["After"].split(), s[CONTROLLER]["After"]
        assert (_mono(s[CONTROLLER]["ExecMainStartTimestampMonotonic"])
                >= _mono(s[u]["ActiveEnterTimestampMonotonic"])), (u, s)
    # ready means serving: every socket is there, with its mode and group
    socks = node.sh("cd /run/flexnpu && stat -c '%n %a %U %G' *.sock").split("\n")
    have = {ln.split()[0]: ln.split()[1:] for ln in socks if ln}
    for name in ("emu.sock", "daemon-0.sock", "daemon-1.sock", "observe.sock", "controller.sock"):
        assert have.get(name) == ["660", "flexnpu", "flexnpu"], (name, have)
    for name in ("daemon-0.admin.sock", "daemon-1.admin.sock"):
        assert have.get(name) == ["600", "flexnpu", "flexnpu"], (name, have)
    st = json.loads(node.run(FLEXNPU, "service", "status", "--json").stdout)
    assert [(u["unit"], u["enabled"], u["active"]) for u in st["units"]] == [(u, "enabled", "active") for u in ALL], st
    # doctor's service checks, under systemd: the group, the runtime dir's modes, every unit active
    doc = json.loads(node.run(FLEXNPU, "doctor", "--json", check=False, timeout=120).stdout)
    checks = {c["name"]: c for c in doc["checks"]}
    for name in ("service_group", "runtime_modes", "services"):
        assert checks[name]["ok"], checks[name]
    _log("doctor: " + "; ".join(f"{c['name']} {'ok' if c['ok'] else 'FAIL'}: {c['detail']}" for c in doc["checks"]))
    # whether this kernel's cgroups let systemd account (and so limit) memory and tasks here
    _log("cgroup accounting: " + ", ".join(f"{u} {node.show(u, 'MemoryCurrent', 'TasksCurrent')}" for u in ALL))


def _caps(node, unit: str) -> dict[str, int]:
    pid = node.show(unit, "MainPID")["MainPID"]
    text = node.sh(f"cat /proc/{pid}/status")
    return {k: int(v, 16) for k, v in re.findall(r"^Cap(\w+):\s+([0-9a-f]+)$", text, re.M)}


def test_observer_attaches_its_probes_with_the_units_capability(node):
    log = node.journal(OBSERVE)
    attached = {m[1]: int(m[0]) for m in re.findall(r"attached (\d+) probes to (\S+)", log)}
    lib = f"{PKG}/_native/lib/libascendcl.so"
    assert attached.get(lib, 0) > 0, log
    _log(f"observer attached: {attached}")
    want = node.show(OBSERVE, "CapabilityBoundingSet", "AmbientCapabilities")
    assert want == {"CapabilityBoundingSet": "cap_sys_admin", "AmbientCapabilities": "cap_sys_admin"}, want
    caps = _caps(node, OBSERVE)
    assert caps == {k: 1 << CAP_SYS_ADMIN for k in ("Inh", "Prm", "Eff", "Bnd", "Amb")}, caps
    for u in (EMU, *DAEMONS, CONTROLLER):
        assert all(v == 0 for v in _caps(node, u).values()), (u, _caps(node, u))
    # its snapshots say so
    snap = json.loads(node.run(PYTHON, "-c", _SUB.format(sock="/run/flexnpu/observe.sock"), timeout=30).stdout)
    assert snap["source"] == "bpf", snap


# One message from a zmq PUB socket in the container, as JSON on stdout.
_SUB = """
import zmq, sys
c = zmq.Context(); s = c.socket(zmq.SUB); s.setsockopt(zmq.LINGER, 0); s.setsockopt(zmq.SUBSCRIBE, b"")
s.connect("ipc://{sock}")
if not s.poll(20000): sys.exit("nothing published on {sock} in 20 s")
sys.stdout.write(s.recv().decode())
"""


def _kernels(node, pid: int) -> int | None:
    """Kernels the device server ran for container pid `pid` on device 0 (None: not a client)."""
    p = node.run(FLEXNPU, "emu", "status", "--json", check=False)
    if p.returncode != 0:
        return None
    for c in json.loads(p.stdout)["devices"][0]["clients"]:
        if c["pid"] == pid and c["alive"]:
            return c["ops"]["kernel"]
    return None


def _admitted(node, pid: int) -> bool:
    p = node.run(FLEXNPU, "gate", "list", "--device", "0", "--json", check=False)
    return p.returncode == 0 and any(c["pid"] == pid for c in json.loads(p.stdout).get("clients", []))


def _until(what: str, pred, timeout: float, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(every)


def _client_pids(node, proc) -> tuple[int, int]:
    """The sample loop started through `flexnpu run` (which execs it): its pid in the
    container and on the host."""
    def find():
        for p in nsf._tree(proc.pid):
            ns = nsf._nspid(p)
            if len(ns) >= 2 and SAMPLE.encode() in Path(f"/proc/{p}/cmdline").read_bytes():
                return ns[-1], ns[0]
        return None
    return _until("the client's process", find, 20)


def _kill_and_wait_restart(node, unit: str, timeout: float = 60) -> float:
    before = node.show(unit, "MainPID", "NRestarts")
    t0 = time.monotonic()
    node.run("systemctl", "kill", "-s", "KILL", unit)

    def restarted():
        s = node.show(unit, "ActiveState", "SubState", "MainPID", "NRestarts")
        return (s["ActiveState"] == "active" and s["SubState"] == "running" and s["MainPID"] not in ("0", before["MainPID"])
                and int(s["NRestarts"]) == int(before["NRestarts"]) + 1) and s
    s = _until(f"{unit} restarted by systemd after SIGKILL\n{node.journal(unit)[-3000:]}", restarted, timeout)
    took = time.monotonic() - t0
    _log(f"{unit}: SIGKILL -> active again (pid {before['MainPID']} -> {s['MainPID']}) in {took:.2f} s")
    return took


def _runs_on(node, pid: int, proc, what: str) -> None:
    """The client is alive and the device server counts new kernels of it."""
    k0 = _until(f"client {pid} a client of the device server ({what})", lambda: _kernels(node, pid), 10)
    _until(f"client {pid} runs kernels ({what})", lambda: (_kernels(node, pid) or 0) > k0 + 20, 10)
    assert proc.poll() is None, (what, proc.stdout.read() if proc.stdout else "")


def test_killed_units_are_restarted_and_clients_run_on(node):
    app = node.popen(FLEXNPU, "run", "--role", "decode", "--device", "0", "--",
                     PYTHON, SAMPLE, KERNELS, "--seconds", "300", "--kernel-ms", "1")
    pid, host_pid = _client_pids(node, app)
    _until("client admitted by daemon 0", lambda: _admitted(node, pid), 20)
    _runs_on(node, pid, app, "before any kill")
    took = {}
    for unit in (*DAEMONS, OBSERVE, CONTROLLER):
        took[unit] = _kill_and_wait_restart(node, unit, timeout=180 if unit == OBSERVE else 60)
        _runs_on(node, pid, app, f"after {unit} was killed and restarted")
        if unit == DAEMONS[0]:
            _until("client re-admitted by the restarted daemon 0", lambda: _admitted(node, pid), 20)
    # the restarted observer and controller see the client again
    obs = f"{nsf.VENV}/bin/python"

    seen: list[dict] = []

    def in_snapshot():
        snap = json.loads(node.run(obs, "-c", _SUB.format(sock="/run/flexnpu/observe.sock"), timeout=30).stdout)
        seen[:] = [snap]
        # uprobes report the kernel's pid (the host's), not the container's: docs/service.md
        return snap["source"] == "bpf" and any(p.get("pid") == host_pid for p in snap["processes"])
    try:
        _until("client in the restarted observer's snapshot", in_snapshot, 30, every=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}; container pid {pid}, host pid {host_pid}; last: {json.dumps(seen)[:2000]}")

    def in_report():
        r = json.loads(node.run(obs, "-c", _SUB.format(sock="/run/flexnpu/controller.sock"), timeout=30).stdout)
        return r.get("observer") == "ok" and any(
            d["device"] == 0 and d["daemon"] == "ok" and any(c["pid"] == pid for c in d["clients"])
            for d in r.get("devices", []))
    _until("client in the restarted controller's report", in_report, 30, every=0.5)
    # The device server: its clients' device state goes with it, so the client ends with the
    # runtime's error; systemd restarts it and a new client runs.
    took[EMU] = _kill_and_wait_restart(node, EMU)
    rc = app.wait(30)
    out = app.stdout.read()
    assert rc != 0, out
    again = node.run(FLEXNPU, "run", "--device", "0", "--", PYTHON, SAMPLE, KERNELS, "--seconds", "2",
                     "--kernel-ms", "1", timeout=60)
    res = json.loads(again.stdout.strip().splitlines()[-1])
    assert res["steps"] > 0, again.stdout
    assert all(node.run("systemctl", "is-active", u, check=False).stdout.strip() == "active" for u in ALL)
    TIMINGS.update({f"restart {u}": t for u, t in took.items()})


def _bpf_prog_exists(prog_id: int) -> bool:
    """BPF_PROG_GET_FD_BY_ID on the host: is the program still loaded?"""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint8 * 128)()
    ctypes.memmove(attr, ctypes.byref(ctypes.c_uint32(prog_id)), 4)
    fd = libc.syscall(SYS_BPF[os.uname().machine], 13, attr, 128)  # BPF_PROG_GET_FD_BY_ID
    if fd >= 0:
        os.close(fd)
        return True
    assert ctypes.get_errno() == errno.ENOENT, os.strerror(ctypes.get_errno())
    return False


def test_stop_leaves_nothing_behind(node):
    obs_pid = node.host_pid(int(node.show(OBSERVE, "MainPID")["MainPID"]))
    assert obs_pid is not None
    prog_ids = {int(m) for f in Path(f"/proc/{obs_pid}/fdinfo").iterdir()
                for m in re.findall(r"^prog_id:\s+(\d+)$", f.read_text(), re.M)}
    assert prog_ids and all(_bpf_prog_exists(i) for i in prog_ids), prog_ids
    uid = node.sh("id -u flexnpu").strip()
    t0 = time.monotonic()
    node.run("systemctl", "stop", *ALL, timeout=180)
    TIMINGS["stop_s"] = time.monotonic() - t0
    for u in ALL:
        s = node.show(u, "ActiveState", "MainPID", "ControlGroup", "Result")
        # ControlGroup= is empty once systemd has removed the unit's cgroup, which it does when
        # no process is left in it; Result=success: it exited cleanly on SIGTERM
        assert (s["ActiveState"], s["MainPID"], s["ControlGroup"], s["Result"]) == ("inactive", "0", "", "success"), \
            (u, s, node.journal(u)[-3000:])
    # no process of the units: none of the service user's, no unit cgroup left with a process
    procs = node.sh(f"ps -o pid=,comm= -u {uid} || true").strip()
    assert procs == "", procs
    # no socket in the runtime dir (the directory stays, by RuntimeDirectoryPreserve=yes)
    left = node.sh("find /run/flexnpu -type s").strip()
    assert left == "", left
    _log("runtime dir after stop: " + node.sh("ls -l /run/flexnpu").replace("\n", "; "))
    # the observer's BPF programs are unloaded (with them its uprobes: each held its probe)
    _until(f"BPF programs {sorted(prog_ids)} unloaded", lambda: not any(_bpf_prog_exists(i) for i in prog_ids), 30)
    events = Path("/sys/kernel/tracing/uprobe_events")
    if events.exists():
        mine = [ln for ln in events.read_text().splitlines() if nsf.VENV in ln]
        assert not mine, mine
    # and uninstall, under systemd, removes what install made
    out = node.run(FLEXNPU, "service", "uninstall", timeout=120).stdout
    _log(f"service uninstall:\n{out}")
    assert node.sh("ls /etc/systemd/system | grep flexnpu || true").strip() == ""
    assert node.run("id", "flexnpu", check=False).returncode != 0
