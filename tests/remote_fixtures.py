"""Keys and ports for the tests of publishing on TCP (tests/test_remote_*.py, test_top_nodes.py):
a keys dir made with the real `flexnpu keys` library, removed after the test."""

from __future__ import annotations

import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from flexnpu.remote import keys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Keyring:
    """One keys dir: the server's pair, an authorized client, a stranger's pair (never
    authorized) and an impostor server pair (a server key nobody trusts)."""

    dir: Path
    server: keys.KeyPair
    client: keys.KeyPair
    stranger: keys.KeyPair
    impostor: keys.KeyPair

    @property
    def server_secret(self) -> Path:
        return keys.secret_path(self.dir, "server")

    @property
    def authorized(self) -> Path:
        return keys.authorized_dir(self.dir)

    def publish_args(self, port: int) -> list[str]:
        return ["--publish-tcp", f"127.0.0.1:{port}", "--key", str(self.server_secret),
                "--authorized", str(self.authorized)]


def make_keyring(d: Path) -> Keyring:
    ring = Keyring(d, keys.new_pair(d, "server"), keys.new_pair(d, "client"), keys.new_pair(d, "stranger"),
                   keys.new_pair(d, "impostor"))
    keys.add_public(keys.public_path(ring.authorized, "client"), ring.client.public)
    return ring


@pytest.fixture
def keyring() -> Iterator[Keyring]:
    d = Path(tempfile.mkdtemp(prefix="fxkeys-"))
    try:
        yield make_keyring(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
