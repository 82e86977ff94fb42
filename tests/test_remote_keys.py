"""`flexnpu keys`: the files it makes and their modes, its refusals (one line each), and, as
real users, that a secret key is its owner's alone: the service's secret key, made by root
for the service user, cannot be read by a member of the clients' group, whose own client key
goes to ~/.config/flexnpu/keys by default."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import zmq

from flexnpu.remote import keys
from test_observe_fixtures import REPO, flexnpu_argv
from users_fixtures import flexnpu_group, member, outsider, run_as  # noqa: F401 (fixtures by name)


def fx(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(flexnpu_argv("keys", *args), capture_output=True, text=True, timeout=60, cwd=REPO,
                          stdin=subprocess.DEVNULL, env=env or os.environ)


def one_line_error(r: subprocess.CompletedProcess[str], code: int, want: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and want in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_new_show_authorize_trust_list_revoke(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    r = fx("new", "server", "--dir", str(d), "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["schema"] == 1 and made["name"] == "server"
    pub, sec = d / "server.key", d / "server.key_secret"
    assert made["public"] == str(pub) and made["secret"] == str(sec)
    assert mode(sec) == 0o600 and mode(pub) == 0o644
    # the files are ZeroMQ certificates: pyzmq's own reader agrees with what was printed
    from zmq.auth import load_certificate

    assert load_certificate(str(sec)) == (made["public_key"].encode(), keys.read_secret(sec).secret)
    assert load_certificate(str(pub))[0] == made["public_key"].encode()
    # and they are a working pair: the secret key's public half is the public key
    assert zmq.curve_public(keys.read_secret(sec).secret) == made["public_key"].encode()

    one_line_error(fx("new", "server", "--dir", str(d)), 1, "exists; not overwritten")
    assert load_certificate(str(pub))[0] == made["public_key"].encode()  # untouched
    r = fx("new", "server", "--dir", str(d), "--force", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["public_key"] != made["public_key"]
    assert mode(sec) == 0o600

    r = fx("show", "--dir", str(d))
    assert r.returncode == 0 and r.stdout.strip() == keys.read_public(pub).public.decode()

    assert fx("new", "alice", "--dir", str(tmp_path / "client")).returncode == 0
    alice = tmp_path / "client" / "alice.key"
    r = fx("authorize", "alice", str(alice), "--dir", str(d), "--json")
    assert r.returncode == 0, r.stderr
    assert keys.authorized_keys(d / "authorized") == {keys.read_public(alice).public: "alice"}
    one_line_error(fx("authorize", "alice", str(alice), "--dir", str(d)), 1, "exists")
    z85 = zmq.curve_keypair()[0].decode()
    assert fx("authorize", "bob", z85, "--dir", str(d)).returncode == 0  # the key itself, as text
    assert fx("trust", "n1", str(pub), "--dir", str(tmp_path / "client")).returncode == 0
    assert keys.read_public(tmp_path / "client" / "servers" / "n1.key").public == keys.read_public(pub).public

    r = fx("list", "--dir", str(d), "--json")
    assert r.returncode == 0, r.stdout
    listed = json.loads(r.stdout)
    assert [p["name"] for p in listed["pairs"]] == ["server"] and listed["problems"] == []
    assert sorted(a["name"] for a in listed["authorized"]) == ["alice", "bob"]
    r = fx("revoke", "bob", "--dir", str(d))
    assert r.returncode == 0 and not (d / "authorized" / "bob.key").exists()
    one_line_error(fx("revoke", "bob", "--dir", str(d)), 1, "bob is not authorized")


def test_refusals(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    assert fx("new", "server", "--dir", str(d)).returncode == 0
    sec = d / "server.key_secret"
    for m in (0o640, 0o604, 0o644):
        sec.chmod(m)
        one_line_error(fx("show", "server", "--dir", str(d)), 1, f"readable by others than its owner (mode {m:04o})")
        r = fx("list", "--dir", str(d))
        assert r.returncode == 1 and "problem:" in r.stdout and "chmod 600" in r.stdout
    sec.chmod(0o600)
    one_line_error(fx("new", "../up", "--dir", str(d)), 1, "key name '../up'")
    one_line_error(fx("new", ".hidden", "--dir", str(d)), 1, "key name")
    one_line_error(fx("authorize", "x", "not-a-key", "--dir", str(d)), 1, "no such key file")
    (tmp_path / "junk.key").write_text("hello\n")
    one_line_error(fx("authorize", "x", str(tmp_path / "junk.key"), "--dir", str(d)), 1, "no public-key line")
    (tmp_path / "short.key").write_text('public-key = "abc"\n')
    one_line_error(fx("trust", "n1", str(tmp_path / "short.key"), "--dir", str(d)), 1, "not a CURVE key")
    os.symlink(sec, tmp_path / "link.key")
    one_line_error(fx("show", str(tmp_path / "link.key")), 1, "a symbolic link")
    one_line_error(fx("new", "x", "--owner", "no-such-user-here", "--dir", str(d)), 1, "no user")
    (d / "authorized").mkdir()
    (d / "authorized").chmod(0o777)
    one_line_error(fx("authorize", "x", str(d / "server.key"), "--dir", str(d)), 1, "writable by others")
    r = fx("--help")
    assert r.returncode == 0 and "/etc/flexnpu/keys" in r.stdout and "~/.config/flexnpu/keys" in r.stdout
    for cmd in ("new", "show", "authorize", "revoke", "trust", "list"):
        r = fx(cmd, "--help")
        assert r.returncode == 0 and "Examples:" in r.stdout and "--json" in r.stdout, cmd


def test_default_dir_for_root_is_the_services(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("root's default keys dir is the services' (/etc/flexnpu/keys)")
    env = {k: v for k, v in os.environ.items() if k not in ("FLEXNPU_KEYS_DIR", "XDG_CONFIG_HOME")}
    r = fx("list", "--json", env=env)
    assert json.loads(r.stdout)["dir"] == "/etc/flexnpu/keys"


# ---------------------------------------------------------------- real users


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory others may enter (as /etc is), removed after."""
    d = Path(tempfile.mkdtemp(prefix="fxkeyusr-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _user_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FLEXNPU_KEYS_DIR", "XDG_CONFIG_HOME")}
    return {**env, "HOME": str(home), "PYTHONPATH": str(REPO)}


@pytest.mark.root_users
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users")
def test_a_user_cannot_read_the_services_secret_key(shared_dir: Path, outsider: str, member: str) -> None:  # noqa: F811
    """`outsider` stands for the service user; `member` is in the clients' group."""
    d = shared_dir / "keys"
    r = fx("new", "server", "--dir", str(d), "--owner", outsider, "--json")
    assert r.returncode == 0, r.stderr
    public = json.loads(r.stdout)["public_key"]
    sec = d / "server.key_secret"
    st = os.stat(sec)
    assert st.st_uid == pwd.getpwnam(outsider).pw_uid and stat.S_IMODE(st.st_mode) == 0o600

    home = shared_dir / "home"
    home.mkdir()
    os.chown(home, pwd.getpwnam(member).pw_uid, -1)
    env = _user_env(home)
    cat = run_as(member, ["cat", str(sec)], env)
    assert cat.returncode != 0 and "Permission denied" in cat.stderr and "secret-key" not in cat.stdout
    r = run_as(member, flexnpu_argv("keys", "show", "server", "--dir", str(d)), env)
    one_line_error(r, 1, "permission denied")
    r = run_as(member, flexnpu_argv("keys", "show", str(d / "server.key")), env)
    assert r.returncode == 0 and r.stdout.strip() == public  # the public key is for anyone
    r = run_as(outsider, flexnpu_argv("keys", "show", "server", "--dir", str(d), "--json"), env)
    assert r.returncode == 0, r.stderr  # the service user reads its own
    assert json.loads(r.stdout)["secret"] == str(sec)

    # a user's own keys go to ~/.config/flexnpu/keys, theirs alone
    r = run_as(member, flexnpu_argv("keys", "new", "client", "--json"), env)
    assert r.returncode == 0, r.stderr
    mine = Path(json.loads(r.stdout)["secret"])
    assert mine == home / ".config" / "flexnpu" / "keys" / "client.key_secret"
    st = os.stat(mine)
    assert st.st_uid == pwd.getpwnam(member).pw_uid and stat.S_IMODE(st.st_mode) == 0o600
    cat = run_as(outsider, ["cat", str(mine)], env)
    assert cat.returncode != 0 and "secret-key" not in cat.stdout
    # only root gives a key pair to someone else
    r = run_as(member, flexnpu_argv("keys", "new", "other", "--owner", outsider), env)
    one_line_error(r, 1, "only root may make a key pair for another user")
    # root may use the service's key (to run the observer by hand, say)
    r = fx("show", "server", "--dir", str(d))
    assert r.returncode == 0 and r.stdout.strip() == public
