"""The daemon speaks systemd's sd_notify protocol (Type=notify units): READY=1 once its
control socket serves, STOPPING=1 when SIGTERM stops it. The test is systemd's side: a
datagram socket bound where NOTIFY_SOCKET points."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from test_daemon_fixtures import START_TIMEOUT, daemons  # noqa: F401  (fixtures)


def _receive(s: socket.socket, want: str, timeout: float) -> list[str]:
    """Datagrams until one carries the line `want`; fails after timeout seconds."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            msg = s.recv(4096).decode()
        except socket.timeout:
            raise AssertionError(f"no {want} within {timeout} s; got {got}") from None
        got.append(msg)
        if want in msg.split("\n"):
            return got


@pytest.mark.parametrize("namespace", ["path", "abstract"])
def test_ready_and_stopping_are_notified(daemons, runtime_dir, namespace):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if namespace == "path":
            addr = str(runtime_dir / "notify.sock")
            s.bind(addr)
        else:
            name = f"flexnpu-test-notify-{os.getpid()}-{time.monotonic_ns()}"
            s.bind("\0" + name)
            addr = "@" + name
        d = daemons(0, env={**os.environ, "NOTIFY_SOCKET": addr}, ready=False)
        got = _receive(s, "READY=1", START_TIMEOUT)
        assert any(line.startswith("STATUS=") for m in got for line in m.split("\n")), got
        # READY means ready: the control API answers at once
        assert d.client.ping()["pid"] == d.pid
        d.proc.send_signal(signal.SIGTERM)
        _receive(s, "STOPPING=1", 15)
        assert d.wait_exit(15) == 0, d.log()
        assert not d.socket.exists()
    finally:
        s.close()
