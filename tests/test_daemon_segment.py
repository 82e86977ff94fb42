"""The daemon's files and the gate segment's protection, and how it admits claims.

Gate parameters (gate-N.ctl) are written by the daemon alone: the file is 0644, a client
maps it PROT_READ from an O_RDONLY descriptor, and so no client can make it writable; the
control socket is 0660 whatever umask the daemon was started with.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flexnpu.forward.gate import GateSegment
from test_daemon_fixtures import daemons, gate_loop, ready, wait_for, write_claim  # noqa: F401  (fixtures)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_file_modes_do_not_depend_on_the_umask(daemons, runtime_dir, umask):
    d = daemons(0, umask=umask)
    assert stat.S_ISSOCK(d.socket.stat().st_mode)
    assert _mode(d.socket) == 0o660
    assert _mode(runtime_dir / "gate-0.ctl") == 0o644
    assert _mode(runtime_dir / "gate-0.cli") == 0o666


def test_client_maps_the_gate_parameters_read_only(emulator, daemons, gate_loop, runtime_dir):
    emulator()
    d = daemons(0)
    a = gate_loop(1, 1, 1, "--wait-stdin")
    ready(a)
    d.wait_admitted(a.pid)
    maps = Path(f"/proc/{a.pid}/maps").read_text().splitlines()
    perms = {}
    for line in maps:
        parts = line.split()
        if len(parts) >= 6 and Path(parts[5]).name in ("gate-0.ctl", "gate-0.cli"):
            perms.setdefault(Path(parts[5]).name, set()).add(parts[1])
    assert perms == {"gate-0.ctl": {"r--s"}, "gate-0.cli": {"rw-s"}}, maps


# Run as an ordinary user: what a client process could try on gate-0.ctl. Only os, mmap
# and ctypes, so any python3 can run it.
_PROBE = textwrap.dedent("""
    import ctypes, errno, json, mmap, os, sys
    ctl = sys.argv[1]
    out = {"uid": os.geteuid()}
    try:
        os.close(os.open(ctl, os.O_RDWR))
        out["open_rdwr"] = "ok"
    except OSError as e:
        out["open_rdwr"] = errno.errorcode[e.errno]
    fd = os.open(ctl, os.O_RDONLY)
    size = os.fstat(fd).st_size
    try:
        mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        out["map_write"] = "ok"
    except OSError as e:
        out["map_write"] = errno.errorcode[e.errno]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    rc = libc.mprotect(addr, size, mmap.PROT_READ | mmap.PROT_WRITE)
    out["mprotect_write"] = "ok" if rc == 0 else errno.errorcode[ctypes.get_errno()]
    print(json.dumps(out))
""")


def test_a_client_cannot_write_its_gate_parameters(daemons, runtime_dir):
    daemons(0)
    ctl = runtime_dir / "gate-0.ctl"
    if os.geteuid() == 0:
        # as root the file mode alone would not stop an O_RDWR open; probe as nobody
        python = "/usr/bin/python3"
        if not os.access(python, os.X_OK):
            pytest.skip("no /usr/bin/python3 to run the probe as an ordinary user")
        runtime_dir.chmod(0o755)  # this test's own dir: let nobody reach the files
        argv, user = [python, "-c", _PROBE, str(ctl)], 65534
    else:
        argv, user = [sys.executable, "-c", _PROBE, str(ctl)], None
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, user=user, cwd="/")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["uid"] != 0
    assert got == {"uid": got["uid"], "open_rdwr": "EACCES", "map_write": "EACCES", "mprotect_write": "EACCES"}


def test_even_root_cannot_make_a_read_only_mapping_writable(daemons, runtime_dir):
    """The shim's mapping comes from an O_RDONLY descriptor: mprotect to write fails for
    any user, so a client cannot turn its PROT_READ view into a writable one."""
    daemons(0)
    r = subprocess.run([sys.executable, "-c", _PROBE, str(runtime_dir / "gate-0.ctl")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["map_write"] == "EACCES" and got["mprotect_write"] == "EACCES", got


def _state(rdir: Path, slot: int) -> tuple[int, int]:
    seg = GateSegment(0, rdir)
    try:
        v = seg.slot(slot)
        return v.state, v.admitted_pid
    finally:
        seg.close()


def test_daemon_admits_a_claim_only_once_complete(daemons, runtime_dir):
    """The shim claims a slot by CAS, then stores its pid, then bumps gen. A daemon that
    reads the slot between those stores must neither free the slot under the claimer nor
    take the gen bump that follows for a new client."""
    d = daemons(0)
    slot = 10
    child = subprocess.Popen(["sleep", "300"])
    try:
        write_claim(runtime_dir, 0, slot, state=1, pid=0, gen=0)  # claimed, pid not yet stored
        _sleep_scans()
        assert _state(runtime_dir, slot) == (1, 0), "the daemon freed a slot whose claim was in progress"
        assert d.list() == []

        write_claim(runtime_dir, 0, slot, pid=child.pid)  # pid stored, gen not yet bumped
        v = wait_for(lambda: (e := d.entry(child.pid)) and e["admitted_pid"] == child.pid and e, 5, "admission")
        assert (v["slot"], v["gen"]) == (slot, 0)
        d.set(child.pid, priority=4)

        write_claim(runtime_dir, 0, slot, gen=1)  # the claim completes
        wait_for(lambda: d.entry(child.pid)["gen"] == 1, 5, "gen 1 seen")
        _sleep_scans()
        assert _state(runtime_dir, slot) == (1, child.pid), "the daemon freed the slot of a live client"
        v = d.entry(child.pid)
        assert (v["slot"], v["priority"]) == (slot, 4)  # kept: not re-admitted as a new client
        assert "freed" not in d.log()

        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        wait_for(lambda: d.entry(child.pid) is None, 2, "the dead client's slot freed")
        assert _state(runtime_dir, slot) == (0, 0)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)


def _sleep_scans() -> None:
    """Long enough for several of the daemon's scans (every 50 ms) on a loaded machine."""
    time.sleep(0.5)
