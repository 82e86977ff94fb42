"""The daemon's files and the gate table's protection, and how it admits clients.

The gate table (gate-N.ctl) is written by the daemon alone: the file is 0640 root:flexnpu
(0600 without that group), a client maps it PROT_READ from the O_RDONLY descriptor the
daemon passed it, and so no client can make it writable; a client's own page is a memfd
sealed against resizing. Socket modes do not depend on the daemon's umask.
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

from flexnpu import paths
from flexnpu.forward.daemon import access
from flexnpu.forward.daemon.server import ForwardDaemon
from test_daemon_fixtures import daemons, end_client, gate_client, gate_loop, ready, wait_for  # noqa: F401


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_file_modes_do_not_depend_on_the_umask(daemons, runtime_dir, umask):
    d = daemons(0, umask=umask)
    group = access.group_gid(paths.CLIENT_GROUP) is not None  # without it: root only
    for sock in (d.socket, runtime_dir / "gate-0.sock"):
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert _mode(sock) == (0o660 if group else 0o600)
    assert _mode(runtime_dir / "daemon-0.admin.sock") == 0o600
    assert _mode(runtime_dir / "gate-0.ctl") == (0o640 if group else 0o600)
    assert not (runtime_dir / "gate-0.cli").exists()


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
        if len(parts) >= 6 and (Path(parts[5]).name == "gate-0.ctl" or "flexnpu-gate-0-slot" in parts[5]):
            name = "ctl" if parts[5].endswith("gate-0.ctl") else "page"
            perms.setdefault(name, set()).add(parts[1])
    assert perms == {"ctl": {"r--s"}, "page": {"rw-s"}}, maps


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
    try:
        fd = os.open(ctl, os.O_RDONLY)
    except OSError as e:
        out["open_rdonly"] = errno.errorcode[e.errno]
        print(json.dumps(out))
        sys.exit(0)
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
    if access.group_gid(paths.CLIENT_GROUP) is None:  # 0600: nobody may not even read it
        assert got == {"uid": got["uid"], "open_rdwr": "EACCES", "open_rdonly": "EACCES"}
    else:
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


def test_a_process_that_exits_before_admission_leaves_nothing(runtime_dir):
    """A client connects, says hello and exits before the daemon looks at it: the kernel's
    pidfd says so, nothing is admitted, no slot is taken."""
    d = ForwardDaemon(0, runtime_dir)
    d.open()  # listening; no admission thread: this test plays it
    try:
        code = (f"from flexnpu.forward.daemon.admission import request_admission\n"
                f"import socket, struct\n"
                f"from flexnpu.forward.daemon.gate import layout\n"
                f"L = layout()\n"
                f"s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
                f"s.connect({str(runtime_dir / 'gate-0.sock')!r})\n"
                f"s.send(struct.pack('<IIII', L['hello_magic'], L['version'], 1, 0))\n")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        conn, _ = d.admission.sock.accept()
        conn.setblocking(False)
        d.admission._hello(conn)
        assert d.registry.clients == {}
        assert all(d.table.settings(i)["state"] == 0 for i in range(d.table.max_slots))
    finally:
        d.close()


def test_64_slots_then_a_one_line_refusal_and_nothing_left(daemons, runtime_dir):
    """66 processes (root) ask: 64 are admitted, two get the 'all taken' line; when they go,
    every slot is free again."""
    d = daemons(0)
    procs = []
    try:
        for _ in range(66):
            procs.append(gate_client(runtime_dir, 0))
        answers = [a for _, a in procs]
        assert sorted(a["slot"] for a in answers if a["status"] == 0) == list(range(64))
        refused = [a for a in answers if a["status"] != 0]
        assert len(refused) == 2 and all(a["reason"] == "device 0: all 64 gate slots are taken" for a in refused)
        assert len(d.list()) == 64
    finally:
        for p, _ in procs:
            end_client(p)
    wait_for(lambda: d.list() == [], 10, "every slot freed")
