"""Real local users for the security tests (tests/test_security_*.py), as pyroute2's
fixtures make kernel objects: made for the test, always removed after, whatever happened.

- `flexnpu_group`: the clients' group (paths.CLIENT_GROUP), created when the node has none;
- `outsider`: a user that is neither root nor in that group;
- `member`: a user in that group;
- `open_rdir`: the test's runtime dir opened to others as /run/flexnpu is (0755: they
  reach the sockets, whose own modes decide the rest);
- `run_as(user, argv)`: a process of that user (setpriv, its groups from /etc/group).

The modules that use them mark themselves `root_users` and skip without root.
"""

from __future__ import annotations

import grp
import secrets
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from flexnpu import paths

GROUP = paths.CLIENT_GROUP


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def _gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _new_user(groups: str | None = None) -> str:
    name = "fxusr" + secrets.token_hex(3)
    _sh("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", *(["-G", groups] if groups else []), name)
    return name


@pytest.fixture
def flexnpu_group() -> Iterator[str]:
    """The flexnpu group, created for the test when the node has none (removed after)."""
    made = _gid(GROUP) is None
    if made:
        _sh("groupadd", GROUP)
    try:
        yield GROUP
    finally:
        if made:
            subprocess.run(["groupdel", GROUP], capture_output=True, timeout=60)


@pytest.fixture
def outsider() -> Iterator[str]:
    """A local user that is neither root nor in the flexnpu group."""
    name = _new_user()
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)


@pytest.fixture
def member(flexnpu_group: str) -> Iterator[str]:
    """A local user in the flexnpu group."""
    name = _new_user(flexnpu_group)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)


@pytest.fixture
def open_rdir(runtime_dir: Path) -> Path:
    runtime_dir.chmod(0o755)  # as /run/flexnpu: others reach the sockets; their modes decide the rest
    return runtime_dir


def run_as(user: str, argv: list, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs argv as user (setpriv, with the user's groups from /etc/group), from /."""
    return subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout, cwd="/", env=env,
                          stdin=subprocess.DEVNULL)
