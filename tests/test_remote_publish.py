"""Publishing on TCP with CURVE: a real `flexnpu observe` and `flexnpu controller` on a
LocalNode publish on 127.0.0.1, and real zmq subscribers try them: the authorized client
gets snapshots and decisions; a client with an unknown key, a client with no CURVE at all and
a client expecting another server key get nothing in a window that gives the authorized one
dozens of messages. Then the refusals of the command line, each one line."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import zmq

from flexnpu.bench.node import LocalNode
from flexnpu.control.wire import ControllerReport
from flexnpu.remote import curve, keys
from flexnpu.snapshot import NodeSnapshot
from remote_fixtures import Keyring, free_port, keyring  # noqa: F401  (fixture by name)
from test_daemon_fixtures import wait_for
from test_observe_fixtures import REPO, flexnpu_argv

WINDOW_S = 3.0  # the observer publishes every 50 ms: ~60 messages for the authorized client


def _plain_sub(port: int) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def _drain(s: zmq.Socket) -> int:
    n = 0
    while s.poll(0):
        s.recv()
        n += 1
    return n


def test_only_the_authorized_key_gets_snapshots_and_decisions(keyring: Keyring) -> None:  # noqa: F811
    ring = keyring
    obs_port, ctl_port = free_port(), free_port()
    with LocalNode(observer="shim", policy="passthrough", observe_args=ring.publish_args(obs_port),
                   controller_args=ring.publish_args(ctl_port)) as node:
        assert f"127.0.0.1:{obs_port} (CURVE)" in node.log("observe")
        subs = {
            "authorized": curve.CurveSubscriber(f"127.0.0.1:{obs_port}", ring.client, ring.server.public),
            "stranger": curve.CurveSubscriber(f"127.0.0.1:{obs_port}", ring.stranger, ring.server.public),
            "impostor-expected": curve.CurveSubscriber(f"127.0.0.1:{obs_port}", ring.client, ring.impostor.public),
            "ctl-authorized": curve.CurveSubscriber(f"127.0.0.1:{ctl_port}", ring.client, ring.server.public),
            "ctl-stranger": curve.CurveSubscriber(f"127.0.0.1:{ctl_port}", ring.stranger, ring.server.public),
        }
        plain = {"plain": _plain_sub(obs_port), "ctl-plain": _plain_sub(ctl_port)}
        got: dict[str, list[bytes]] = {k: [] for k in [*subs, *plain]}
        try:
            end = time.monotonic() + WINDOW_S
            while time.monotonic() < end:
                for k, s in subs.items():
                    s.poll_events()
                    got[k] += s.recv_all()
                for k, p in plain.items():
                    got[k] += [b""] * _drain(p)
                time.sleep(0.02)
            states = {k: s.state for k, s in subs.items()}
        finally:
            for s in subs.values():
                s.close()
            for p in plain.values():
                p.close(0)
    assert len(got["authorized"]) >= 10, (len(got["authorized"]), states)
    snap = NodeSnapshot.from_json(got["authorized"][-1])
    assert snap.source == "shim"
    assert len(got["ctl-authorized"]) >= 2, states
    assert ControllerReport.from_json(got["ctl-authorized"][-1]).policy == "passthrough"
    for k in ("stranger", "impostor-expected", "plain", "ctl-stranger", "ctl-plain"):
        assert got[k] == [], f"{k} received {len(got[k])} messages"
    assert states["authorized"] == curve.LINK_UP and states["ctl-authorized"] == curve.LINK_UP
    assert states["stranger"] == states["ctl-stranger"] == curve.LINK_UNAUTHORIZED
    assert states["impostor-expected"] == curve.LINK_BAD_SERVER


def test_authorize_takes_effect_without_a_restart(keyring: Keyring) -> None:  # noqa: F811
    """`flexnpu keys authorize` while the observer runs: the stranger's next connection gets in."""
    ring = keyring
    port = free_port()
    with LocalNode(observer="shim", observe_args=ring.publish_args(port)):
        before = curve.CurveSubscriber(f"127.0.0.1:{port}", ring.stranger, ring.server.public)
        try:
            wait_for(lambda: (before.poll_events(), before.state == curve.LINK_UNAUTHORIZED)[1], 10,
                     "the stranger to be refused")
            assert before.recv_all() == []
        finally:
            before.close()
        r = subprocess.run(flexnpu_argv("keys", "authorize", "stranger", str(keys.public_path(ring.dir, "stranger")),
                                        "--dir", str(ring.dir)), capture_output=True, text=True, timeout=60, cwd=REPO)
        assert r.returncode == 0, r.stderr
        after = curve.CurveSubscriber(f"127.0.0.1:{port}", ring.stranger, ring.server.public)
        try:
            msgs = wait_for(lambda: after.recv_all(), 10, "snapshots for the newly authorized key")
        finally:
            after.close()
    assert NodeSnapshot.from_json(msgs[0]).schema == 1


def _observe(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(flexnpu_argv("observe", "--source", "shim", "--count", "1", *args), capture_output=True,
                          text=True, timeout=60, cwd=REPO, stdin=subprocess.DEVNULL, env=env or os.environ)


def test_refusals_are_one_line(keyring: Keyring, runtime_dir, tmp_path) -> None:  # noqa: F811
    ring = keyring
    port = free_port()
    cases = [
        (["--publish-tcp", "localhost"], "expected HOST:PORT"),
        (["--publish-tcp", "127.0.0.1:70000"], "port must be a number from 1 to 65535"),
        (["--key", str(ring.server_secret)], "--key and --authorized go with --publish-tcp"),
        (["--publish-tcp", f"127.0.0.1:{port}", "--key", str(tmp_path / "none.key_secret"),
          "--authorized", str(ring.authorized)], "no such key file"),
        (["--publish-tcp", f"127.0.0.1:{port}", "--key", str(ring.server_secret),
          "--authorized", str(tmp_path / "nodir")], "does not exist"),
    ]
    for args, want in cases:
        r = _observe(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("flexnpu observe: ") and want in lines[0], (args, r.stderr)

    ring.server_secret.chmod(0o644)  # a secret key others may read is refused, never used
    r = _observe(*ring.publish_args(port))
    assert r.returncode == 2 and "readable by others than its owner (mode 0644)" in r.stderr
    assert f"chmod 600 {ring.server_secret}" in r.stderr and len(r.stderr.splitlines()) == 1
    ring.server_secret.chmod(0o600)

    ring.authorized.chmod(0o777)  # an authorized dir others may write lets anyone in: refused
    r = _observe(*ring.publish_args(port))
    assert r.returncode == 2 and "writable by others" in r.stderr, r.stderr
    ring.authorized.chmod(0o755)

    cfg = tmp_path / "flexnpu.toml"
    cfg.write_text('[publish]\nobserve_tcp = "nowhere"\n')
    r = _observe(env={**os.environ, "FLEXNPU_CONFIG": str(cfg)})
    assert r.returncode == 2 and r.stderr.startswith("flexnpu observe: [publish] observe_tcp: 'nowhere'"), r.stderr
    r = subprocess.run(flexnpu_argv("controller", "--config", str(cfg)), capture_output=True, text=True, timeout=60,
                       cwd=REPO, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "[publish] observe_tcp" in r.stderr and len(r.stderr.splitlines()) == 1


def test_configuration_puts_the_observer_on_tcp(keyring: Keyring, tmp_path, monkeypatch) -> None:  # noqa: F811
    """[publish] in flexnpu.toml alone (no option) publishes on TCP, with CURVE."""
    ring = keyring
    port = free_port()
    cfg = tmp_path / "flexnpu.toml"
    cfg.write_text(f'[publish]\nobserve_tcp = "127.0.0.1:{port}"\nsecret_key = "{ring.server_secret}"\n'
                   f'authorized_dir = "{ring.authorized}"\n')
    monkeypatch.setenv("FLEXNPU_CONFIG", str(cfg))
    with LocalNode(observer="shim"):
        sub = curve.CurveSubscriber(f"127.0.0.1:{port}", ring.client, ring.server.public)
        plain = _plain_sub(port)
        try:
            msgs = wait_for(lambda: sub.recv_all(), 15, "snapshots over TCP")
            time.sleep(0.5)
            assert _drain(plain) == 0
        finally:
            sub.close()
            plain.close(0)
    assert NodeSnapshot.from_json(msgs[0]).source == "shim"


def test_ipv6_endpoint(keyring: Keyring) -> None:  # noqa: F811
    """[::1]:PORT: the publisher and the subscriber turn zmq's IPv6 on; CURVE holds as on IPv4."""
    import socket

    ring = keyring
    with socket.socket(socket.AF_INET6) as s:
        try:
            s.bind(("::1", 0))
        except OSError as e:
            pytest.skip(f"no IPv6 loopback here: {e}")
        port = s.getsockname()[1]
    ctx = zmq.Context()
    pub = curve.CurvePublisher(f"[::1]:{port}", ring.server_secret, ring.authorized, ctx=ctx)
    ok = curve.CurveSubscriber(f"[::1]:{port}", ring.client, ring.server.public, ctx=ctx)
    bad = curve.CurveSubscriber(f"[::1]:{port}", ring.stranger, ring.server.public, ctx=ctx)
    try:
        got: list[bytes] = []
        end = time.monotonic() + WINDOW_S
        while time.monotonic() < end and (len(got) < 20 or bad.state != curve.LINK_UNAUTHORIZED):
            pub.send(b'{"x": 1}')
            got += ok.recv_all()
            bad.poll_events()
            assert bad.recv_all() == []
            time.sleep(0.02)
        assert len(got) >= 20
        assert bad.state == curve.LINK_UNAUTHORIZED
    finally:
        ok.close()
        bad.close()
        pub.close()
        ctx.term()
