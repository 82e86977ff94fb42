"""The gates' trust boundary (docs/security.md), tried by real unprivileged users.

A user made for the test (useradd; userdel at teardown, whatever happened) plays the hostile
local user: not root, not in the flexnpu group. A second one is a member of flexnpu (the
group is created for the test if the node lacks it, and removed after). The victim is a
root client under the shim dispatching kernels all along; the emulator's own per-process
busy time is the ground truth that its rate did not change. Every attack of the issue is
tried: writing any gate file, claiming to be someone (there is nothing to claim: identity
is the kernel's), another client's role and memory, the control sockets, filling the slots.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flexnpu import paths
from flexnpu.forward.daemon.gate import layout
from test_daemon_fixtures import (  # noqa: F401  (fixtures)
    FLEXNPU,
    busy_ns,
    daemons,
    end_client,
    gate_client,
    gate_loop,
    ready,
    send,
    wait_for,
)

pytestmark = [
    pytest.mark.root_users,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and groups"),
]



from users_fixtures import flexnpu_group, member, open_rdir, outsider, run_as  # noqa: F401,E402 (fixtures)


def as_user(user: str, code: str, *args: str, timeout: float = 60) -> dict:
    """Runs python code as user (setpriv, with the user's groups); returns its last JSON line."""
    r = run_as(user, [sys.executable, "-c", textwrap.dedent(code), *args], timeout=timeout,
               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


# What a hostile user tries on the files: every file of the runtime dir, opened for writing,
# then read-only and mapped writable; and the daemon's fds through /proc.
_FILES = """
    import errno, json, mmap, os, sys
    rdir, daemon_pid, victim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    out = {}
    for name in sorted(os.listdir(rdir)):
        p = os.path.join(rdir, name)
        for how, flags in (("rw", os.O_RDWR), ("ro", os.O_RDONLY)):
            try:
                fd = os.open(p, flags)
            except OSError as e:
                out[f"{name}:{how}"] = errno.errorcode[e.errno]
                continue
            try:
                mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                out[f"{name}:{how}"] = "WRITABLE"
            except (OSError, ValueError) as e:
                out[f"{name}:{how}"] = "open, map refused"
            finally:
                os.close(fd)
    for pid in (daemon_pid, victim):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            out[f"proc{pid}"] = "LISTED"
        except OSError as e:
            out[f"proc{pid}"] = errno.errorcode[e.errno]
    print(json.dumps(out))
"""

_CONTROL = """
    import json, sys, time
    from pathlib import Path
    from flexnpu.forward.api import DaemonClient, DaemonError
    c = DaemonClient(0, Path(sys.argv[1]), timeout=5)
    out = {}
    for name, call in (("list", lambda: c.list()), ("set", lambda: c.set(pid=int(sys.argv[2]), gate="closed")),
                       ("defaults", lambda: c.defaults(gate="closed", apply=True)),
                       ("release", lambda: c.release(all=True))):
        t = time.monotonic()
        try:
            r = call()
            out[name] = {"ok": True, "n": len(r) if isinstance(r, list) else None}
        except DaemonError as e:
            out[name] = {"ok": False, "error": str(e)}
        out[name]["s"] = time.monotonic() - t
    c.close()
    print(json.dumps(out))
"""


def _rate(emu, pid: int, seconds: float = 1.0) -> float:
    b0, t0 = busy_ns(emu, pid), time.monotonic()
    time.sleep(seconds)
    return (busy_ns(emu, pid) - b0) / (time.monotonic() - t0) / 1e9


@pytest.fixture
def victim(emulator, daemons, gate_loop, open_rdir):
    """A root client dispatching 2 ms kernels all along, admitted by a daemon whose groups were
    resolved after flexnpu_group (if the test asked for it)."""
    emu = emulator()
    d = daemons(0, "--max-clients-per-user", "4")
    v = gate_loop(0, 2, 2, "--seconds", "120", "--wait-stdin", "--quiet", role="decode")
    ready(v)
    d.wait_admitted(v.pid)
    send(v)
    wait_for(lambda: busy_ns(emu, v.pid) > 0, 15, "the victim running")
    return emu, d, v


def _victim_intact(d, v, before: dict) -> None:
    e = d.entry(v.pid)
    assert e is not None
    for k in ("slot", "pid", "uid", "role", "gate", "priority", "max_hold_ms", "inflight", "owner"):
        assert e[k] == before[k], (k, e[k], before[k])
    assert e["mem_held"] == before["mem_held"]


def test_an_outsider_gets_nothing(victim, outsider, open_rdir):
    emu, d, v = victim
    before = d.entry(v.pid)
    rate0 = _rate(emu, v.pid)

    # every file: no write, no writable map, no way in through the daemon's or victim's fds
    files = as_user(outsider, _FILES, str(open_rdir), str(d.pid), str(v.pid))
    assert not any(x in ("WRITABLE",) for x in files.values()), files
    for name in ("gate-0.ctl", "gate-0.sock", "daemon-0.sock", "daemon-0.admin.sock"):
        assert files[f"{name}:rw"] in ("EACCES", "ENXIO"), files
    assert files[f"proc{d.pid}"] == "EACCES" and files[f"proc{v.pid}"] == "EACCES", files

    # admission: refused by the kernel at connect (the socket is not theirs); no slot taken
    p, answer = gate_client(open_rdir, 0, user=outsider)
    end_client(p)
    assert answer.get("errno") == 13, answer  # EACCES

    # the control API: refused at once with one line, never a timeout
    ctl = as_user(outsider, _CONTROL, str(open_rdir), str(v.pid))
    for name in ("list", "set", "defaults", "release"):
        assert ctl[name]["ok"] is False and ctl[name]["s"] < 1.0, ctl
        assert ctl[name]["error"].startswith("permission denied: ") and "\n" not in ctl[name]["error"], ctl
        assert " is for root" in ctl[name]["error"], ctl

    # `flexnpu run` says the rule in one line and runs nothing
    r = subprocess.run(["setpriv", f"--reuid={outsider}", f"--regid={outsider}", "--init-groups", FLEXNPU, "run",
                        "--", "true"], capture_output=True, text=True, timeout=60, cwd="/",
                       env={**os.environ, "FLEXNPU_RUNTIME_DIR": str(open_rdir)})
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flexnpu run: permission denied: gated programs on this node "
                                                   "are for root"), r.stderr

    assert [c["pid"] for c in d.list()] == [v.pid]  # nothing phantom
    _victim_intact(d, v, before)
    rate1 = _rate(emu, v.pid)
    assert rate1 >= 0.8 * rate0, (rate0, rate1)


_MEMBER = """
    import ctypes, json, mmap, os, struct, sys, time
    from pathlib import Path
    from flexnpu.forward.daemon.admission import request_admission
    from flexnpu.forward.daemon.gate import layout
    L = layout()
    rdir = Path(sys.argv[1])
    answer, fds, conn = request_admission(rdir / "gate-0.sock", 1)
    out = {"answer": answer, "pid": os.getpid()}
    ctl_fd, page_fd = fds
    # the table: read-only for good
    try:
        mmap.mmap(ctl_fd, L["ctl"]["size"], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        out["ctl_map_write"] = "ok"
    except OSError as e:
        out["ctl_map_write"] = e.errno
    # its own page: writable, but sealed against resizing (the daemon maps it too)
    try:
        os.ftruncate(page_fd, 0)
        out["truncate"] = "ok"
    except OSError as e:
        out["truncate"] = e.errno
    page = mmap.mmap(page_fd, L["page_size"], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    f = L["page"]["fields"]
    # forged figures: a huge memory, pending work all the time, a claim to be another slot
    struct.pack_into("<Q", page, f["mem_held"][0], 1 << 50)
    struct.pack_into("<I", page, f["pending"][0], 1)
    struct.pack_into("<I", page, f["slot"][0], 0)
    print(json.dumps(out), flush=True)
    sys.stdin.readline()
"""


def test_a_member_runs_gated_but_changes_nothing(member, victim, open_rdir):
    emu, d, v = victim
    before = d.entry(v.pid)
    rate0 = _rate(emu, v.pid)

    # reading the gates is allowed; changing them is not (one line, at once)
    ctl = as_user(member, _CONTROL, str(open_rdir), str(v.pid))
    assert ctl["list"]["ok"] is True and ctl["list"]["n"] == 1, ctl
    for name in ("set", "defaults", "release"):
        assert ctl[name]["ok"] is False and ctl[name]["s"] < 1.0, ctl
        assert ctl[name]["error"] == "permission denied: changing the gates of device 0 is for root", ctl

    # admitted as itself (uid and pid from the kernel), at the default priority 0
    p = subprocess.Popen(["setpriv", f"--reuid={member}", f"--regid={member}", "--init-groups", sys.executable,
                          "-c", textwrap.dedent(_MEMBER), str(open_rdir)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        line = p.stdout.readline()
        assert line, p.stderr.read()
        got = json.loads(line)
        assert got["answer"]["status"] == 0, got
        assert got["ctl_map_write"] == 13 and got["truncate"] == 1, got  # EACCES, EPERM (sealed)
        mine = wait_for(lambda: d.entry(got["pid"]), 10, "the member admitted")
        uid = int(subprocess.run(["id", "-u", member], capture_output=True, text=True).stdout)
        assert (mine["uid"], mine["role"], mine["gate"], mine["priority"]) == (uid, "prefill", "open", 0)
        # its forged figures are on its own row only; a pending claim at priority 0 holds
        # nobody (nothing is below 0), and the victim's record is untouched
        assert mine["mem_held"] == 1 << 50
        time.sleep(0.3)
        _victim_intact(d, v, before)
        rate1 = _rate(emu, v.pid)
        assert rate1 >= 0.8 * rate0, (rate0, rate1)

        # filling the slots: at most 4 (this daemon's --max-clients-per-user) for one user
        procs = [gate_client(open_rdir, 0, user=member) for _ in range(5)]
        try:
            statuses = sorted(a["status"] for _, a in procs)
            assert statuses == [-87, -87, 0, 0, 0], [a for _, a in procs]  # EUSERS after 4 (1 held above)
            assert all("the most one user may" in a["reason"] for _, a in procs if a["status"] != 0)
            p2, answer = gate_client(open_rdir, 0)  # root is not capped
            assert answer["status"] == 0
            end_client(p2)
        finally:
            for q, _ in procs:
                end_client(q)
    finally:
        p.stdin.close()
        p.wait(timeout=10)
    wait_for(lambda: [c["pid"] for c in d.list()] == [v.pid], 10, "nothing phantom left")
    _victim_intact(d, v, before)


def test_a_member_runs_a_real_gated_program(member, victim, open_rdir, acl_programs):
    """`flexnpu run` as a member of flexnpu: admitted under its own pid and uid."""
    emu, d, v = victim
    exe = open_rdir / "gate_loop"  # the test's build dir is root's alone
    exe.write_bytes(Path(acl_programs["gate_loop"]).read_bytes())
    exe.chmod(0o755)
    klib = str(paths.emulator_kernel_library())
    r = subprocess.Popen(["setpriv", f"--reuid={member}", f"--regid={member}", "--init-groups", FLEXNPU, "run",
                          "--", str(exe), klib, "0", "3", "1", "1", "--wait-stdin", "--wait-end"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
                         env={**os.environ, "FLEXNPU_RUNTIME_DIR": str(open_rdir)})
    try:
        line = r.stdout.readline()
        if not line:
            pytest.skip(f"the emulated device refused a second user: {r.stderr.read()[-300:]}")
        said = json.loads(line)
        if "pid" not in said:  # the emulator's device server is not the gate's to open to others
            pytest.skip(f"the emulated device refused a second user: {said}")
        pid = said["pid"]
        e = wait_for(lambda: d.entry(pid), 10, "the member's program admitted")
        uid = int(subprocess.run(["id", "-u", member], capture_output=True, text=True).stdout)
        assert e["uid"] == uid
        r.stdin.write("go\n")
        r.stdin.flush()
    finally:
        try:
            r.stdin.write("end\n")
            r.stdin.close()
        except OSError:
            pass
        r.wait(timeout=30)


def test_root_writing_the_table_is_noticed_and_undone(victim, open_rdir):
    """Root can write anything; the daemon notices its table differs from what it wrote,
    says so in its log and writes its own values back."""
    emu, d, v = victim
    slot = d.entry(v.pid)["slot"]
    L = layout()["ctl"]
    off = L["slots"] + slot * L["slot_size"] + L["slot_fields"]["gate"][0]
    with open(open_rdir / "gate-0.ctl", "r+b") as f, mmap.mmap(f.fileno(), L["size"]) as m:
        m[off:off + 4] = (1).to_bytes(4, "little")  # closed
    wait_for(lambda: "written behind the daemon's back" in d.log(), 5, "the drift logged")
    assert f"slot {slot}: gate 0 -> 1" in d.log()
    assert d.entry(v.pid)["gate"] == "open"
