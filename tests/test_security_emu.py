"""The emulated device on a shared node (docs/security.md, "The emulated device"), tried by
real unprivileged users.

Users made for the test (useradd; userdel at teardown, whatever happened) play the hostile
local user: an outsider (not root, not in the flexnpu group) and a member of flexnpu (the
group is created for the test if the node lacks it, removed after). The victim is a root
client holding a secret string in device memory. The member may use the emulator, and is
the stronger thief: it gets device memory of its own, and tries to reach the victim's
through its own mapping, the server's socket, the runtime dir, /dev/shm and /proc.
"""

from __future__ import annotations

import json
import secrets
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from flexnpu import paths
from flexnpu.emulator import control
from test_emu_cli import flexnpu_cli

pytestmark = [
    pytest.mark.root_users,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and groups"),
]

PEEK = Path(__file__).resolve().parent / "progs" / "emu_peek.py"
REPO = Path(__file__).resolve().parents[1]
NO_PERMISSION = 207006  # ACL_ERROR_RT_NO_PERMISSION


from users_fixtures import GROUP, _gid, flexnpu_group, member, open_rdir, outsider, run_as  # noqa: F401,E402 (fixtures)


as_user = run_as


@pytest.fixture
def user_env(acl_env):
    return {**acl_env, "PYTHONPATH": str(REPO)}


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}: {text!r}"
    return lines[0]


@pytest.fixture
def victim(emulator, open_rdir, user_env):
    """A root client with a secret in device memory; the emulator it uses."""
    emu = emulator()
    text = "fx-secret-" + secrets.token_hex(8)
    p = subprocess.Popen([sys.executable, PEEK, "secret", text], env=user_env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(p.stdout.readline())
        assert info["set_device_rc"] == 0 and info["ptr"], info
        yield emu, text, info
    finally:
        p.kill()
        p.wait(timeout=10)
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()


def _steal(user: str, emu, text: str, info: dict, env: dict) -> dict:
    r = as_user(user, [sys.executable, PEEK, "thief", text, emu.rdir, info["pid"], emu.pid, info["offset"],
                       info["ptr"]], env)
    assert r.returncode == 0, r.stderr
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "stderr": r.stderr}


def test_emu_sock_is_0660_in_the_flexnpu_group(flexnpu_group, emulator, open_rdir):
    emulator()
    st = (open_rdir / "emu.sock").stat()
    assert stat.S_IMODE(st.st_mode) == paths.EMU_SOCKET_MODE == 0o660
    assert st.st_uid == 0 and st.st_gid == _gid(flexnpu_group)


def test_a_member_cannot_read_another_process_device_memory(flexnpu_group, victim, member, user_env):
    emu, text, info = victim
    out = _steal(member, emu, text, info, user_env)
    assert out["set_device_rc"] == 0, out  # the member may use the device: its own memory
    assert out["found"] == [], out
    tried = out["tried"]
    # its own mapping and the file the server gives it are its own memory: zeros there
    assert tried["own mapping at the victim's offset"] == "read"
    assert tried["socket memory file at the victim's offset"] == "read"
    assert int(tried["own mapping size"]) == emu.profile.capacity_gib << 30
    # the shared parts cannot be turned against the others
    assert tried["device segment writable"] == "EPERM", tried
    assert tried["memory file shrink"] == "EPERM" and tried["memory file grow"] == "EPERM", tried
    # /proc of the victim and of the server: nothing to open
    for pid in (info["pid"], emu.pid):
        for sub in ("mem", "map_files", "fd"):
            assert tried[f"/proc/{pid}/{sub}"] == "EACCES", (pid, sub, tried)
    # the victim still reads its secret, and the server counts both clients' memory
    assert emu.client(info["pid"])["memory_used"] == 1 << 20


def test_an_outsider_is_refused_with_one_line(flexnpu_group, victim, outsider, user_env, acl_programs):
    emu, text, info = victim
    r = as_user(outsider, [acl_programs["acl_workload"], "setdevice", 0], user_env)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["set_device_rc"] == NO_PERMISSION and out["device_count_rc"] == NO_PERMISSION, out
    line = one_line(r.stderr)
    assert "permission denied" in line and f"root and the {flexnpu_group} group" in line, line
    assert str(emu.rdir / "emu.sock") in line
    stolen = _steal(outsider, emu, text, info, user_env)
    assert stolen["set_device_rc"] == NO_PERMISSION and stolen["found"] == [], stolen
    assert stolen["tried"]["socket"] == "EACCES", stolen


def test_the_server_checks_peer_credentials_itself(flexnpu_group, victim, outsider, user_env, acl_programs):
    """Even with the socket's mode opened to everyone, the server refuses by SO_PEERCRED."""
    emu, text, info = victim
    os.chmod(emu.rdir / "emu.sock", 0o666)
    r = as_user(outsider, [acl_programs["acl_workload"], "setdevice", 0], user_env)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["set_device_rc"] == NO_PERMISSION, out
    line = one_line(r.stderr)
    assert "permission denied" in line and f"root and the {flexnpu_group} group" in line, line
    stolen = _steal(outsider, emu, text, info, user_env)
    assert stolen["found"] == [] and stolen["tried"]["socket hello"] == f"err {NO_PERMISSION}, 0 fds", stolen
    st = as_user(outsider, [flexnpu_cli(), "emu", "status"], user_env)
    assert st.returncode == 1 and "permission denied" in one_line(st.stderr), st.stderr
    assert "refused pid" in (emu.rdir / "emu.log").read_text()


def test_a_member_can_use_the_emulator(flexnpu_group, emulator, open_rdir, member, user_env, acl_programs):
    emu = emulator()
    r = as_user(member, [acl_programs["acl_workload"], "copyback", 12345], user_env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["ok"], out
    assert emu.client(out["pid"])["bytes_copied"]["h2d"] == 12345
    st = as_user(member, [flexnpu_cli(), "emu", "status", "--json"], user_env)
    assert st.returncode == 0 and json.loads(st.stdout)["running"] is True, st.stderr


def test_without_the_group_only_root_may(emulator, open_rdir, outsider, user_env, acl_programs):
    if _gid(GROUP) is not None:
        pytest.skip(f"the node has a {GROUP} group; this case needs a node without it")
    emulator()
    st = (open_rdir / "emu.sock").stat()
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 0
    r = as_user(outsider, [acl_programs["acl_workload"], "setdevice", 0], user_env)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["set_device_rc"] == NO_PERMISSION, out
    line = one_line(r.stderr)
    assert "permission denied" in line and "root only" in line and f"groupadd {GROUP}" in line, line


@pytest.mark.parametrize("cmd", ["start", "stop", "status"])
def test_unprivileged_cli_gets_one_line(flexnpu_group, emulator, open_rdir, outsider, user_env, cmd):
    emu = emulator()
    r = as_user(outsider, [flexnpu_cli(), "emu", cmd], user_env)
    assert r.returncode == 1, (r.stdout, r.stderr)
    line = one_line(r.stderr)
    assert line.startswith(f"flexnpu emu {cmd}: permission denied"), line
    assert "Traceback" not in r.stderr
    if cmd == "stop":
        assert f"pid {emu.pid}" in line and "runs as root" in line and "sudo flexnpu emu stop" in line, line
    else:
        assert f"root and the {flexnpu_group} group" in line or "cannot write" in line, line
    assert control.is_running(open_rdir)  # nothing was stopped or replaced


def test_unprivileged_start_in_a_root_dir_gets_one_line(outsider, user_env, runtime_dir):
    runtime_dir.chmod(0o755)
    for rdir in (runtime_dir, runtime_dir / "sub"):
        r = as_user(outsider, [flexnpu_cli(), "emu", "start"], {**user_env, "FLEXNPU_RUNTIME_DIR": str(rdir)})
        assert r.returncode == 1, r.stderr
        line = one_line(r.stderr)
        assert line.startswith("flexnpu emu start: permission denied") and "FLEXNPU_RUNTIME_DIR" in line, line
    assert not (runtime_dir / "emu.sock").exists()
