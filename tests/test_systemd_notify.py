"""sd_notify, tested from systemd's side: a real AF_UNIX datagram socket where NOTIFY_SOCKET
points (a path, and an abstract name). Each service, started from its unit's ExecStart under
the unit's user, group and capabilities, sends READY=1 and STATUS= only once it serves, and the
test then uses what it serves; nothing is sent without NOTIFY_SOCKET."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import zmq

from flexnpu import paths, systemd
from flexnpu.emulator import control
from flexnpu.service import install as inst
from flexnpu.service import units
from test_service_fixtures import (NotifySocket, account, needs_root, notify_socket, runner,  # noqa: F401
                                   service_config, service_rdir)

START_S = 30.0


# ------------------------------------------------------------------ the protocol itself


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_sends_each_field_as_a_line(tmp_path, monkeypatch, kind):
    s = NotifySocket(tmp_path / "n.sock" if kind == "path" else None)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", s.addr)
        assert systemd.notify("READY=1", "STATUS=serving 3 devices") is True
        s.receive("READY=1", 2)
        assert s.messages == ["READY=1\nSTATUS=serving 3 devices"]
    finally:
        s.close()


def test_nothing_is_sent_without_notify_socket(tmp_path, monkeypatch):
    s = NotifySocket(tmp_path / "n.sock")
    try:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        assert systemd.notify("READY=1") is False
        monkeypatch.setenv("NOTIFY_SOCKET", "")
        assert systemd.notify("READY=1") is False
        s.sock.settimeout(0.2)
        with pytest.raises(OSError):  # socket.timeout
            s.sock.recv(4096)
    finally:
        s.close()


def test_a_socket_nobody_listens_on_is_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert systemd.notify("READY=1") is False


# ------------------------------------------------------------------ each service, as its unit runs it


def _units(account, runner) -> dict[str, str]:
    """The units, with the configuration beside the temp runtime dir (readable by the user)."""
    conf = runner.rdir.parent / "flexnpu.toml"
    conf.write_text(inst.default_config_text(inst.installed_binary()))
    return units.render(service_config(account, conf))


def _status(n: NotifySocket) -> list[str]:
    return [ln for ln in n.lines() if ln.startswith("STATUS=")]


@needs_root
def test_emulator_is_ready_when_it_serves(runner, notify_socket, account, tmp_path):
    u = _units(account, runner)
    svc = runner.start("emu", u[units.EMU], notify_socket)
    notify_socket.receive("READY=1", START_S, svc)
    assert any("serving" in s for s in _status(notify_socket)), notify_socket.messages
    st = control.status(runner.rdir)  # READY means it answers now
    assert [d["index"] for d in st["devices"]] == [0]
    sock = paths.emulator_socket(runner.rdir)
    assert sock.stat().st_mode & 0o777 == paths.EMU_SOCKET_MODE
    assert sock.stat().st_gid == os.stat(runner.rdir).st_gid  # the unit's group
    assert svc.stop() == 0, svc.output()


@needs_root
def test_daemon_is_ready_when_it_serves(runner, notify_socket, account, tmp_path):
    u = _units(account, runner)
    svc = runner.start("daemon", u[units.DAEMON_TEMPLATE], notify_socket, instance="0")
    notify_socket.receive("READY=1", START_S, svc)
    assert "STATUS=forwarding device 0" in notify_socket.lines()
    # the control API answers at once (raw zmq: the test needs nothing from the forward package)
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    try:
        req.connect(f"ipc://{paths.daemon_socket(0, runner.rdir)}")
        req.send(json.dumps({"schema": 1, "cmd": "ping"}).encode())
        assert req.poll(5000), svc.output()
        reply = json.loads(req.recv())
        assert reply.get("ok", True) and reply.get("pid") == svc.proc.pid, reply
    finally:
        req.close(0)
        ctx.term()
    # the socket's mode and group are the forward layer's (0660 with the client group, 0600
    # without); what the unit decides is its owner: the service user, not root
    st = paths.daemon_socket(0, runner.rdir).stat()
    assert st.st_uid == os.stat(runner.rdir).st_uid and st.st_mode & 0o007 == 0
    svc.proc.send_signal(signal.SIGTERM)
    notify_socket.receive("STOPPING=1", 15)
    assert svc.wait_exit(15) == 0, svc.output()


@needs_root
def test_controller_is_ready_and_publishes(runner, notify_socket, account, tmp_path):
    u = _units(account, runner)
    daemon = runner.start("daemon", u[units.DAEMON_TEMPLATE], None, instance="0")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        svc = runner.start("controller", u[units.CONTROLLER], notify_socket)
        notify_socket.receive("READY=1", START_S, svc)
        assert any(s.startswith("STATUS=policy ") for s in _status(notify_socket)), notify_socket.messages
        sub.connect(f"ipc://{paths.controller_socket(runner.rdir)}")
        assert sub.poll(10_000), f"no report on controller.sock within 10 s: {svc.output()}"
        report = json.loads(sub.recv())
        assert report["schema"] == 1
        svc.proc.send_signal(signal.SIGTERM)
        notify_socket.receive("STOPPING=1", 15)
        assert svc.wait_exit(15) == 0, svc.output()
        assert daemon.proc.poll() is None, daemon.output()
    finally:
        sub.close(0)
        ctx.term()


@needs_root
@pytest.mark.root_bpf
@pytest.mark.parametrize("notify_socket", ["path"], indirect=True)
def test_observer_is_ready_with_its_probes_loaded(runner, notify_socket, account, tmp_path):
    u = _units(account, runner)
    svc = runner.start("observe", u[units.OBSERVE], notify_socket)
    notify_socket.receive("READY=1", 120, svc)
    assert "STATUS=source bpf" in notify_socket.lines(), notify_socket.messages
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        sub.connect(f"ipc://{paths.observe_socket(runner.rdir)}")
        assert sub.poll(10_000), svc.output()
        assert json.loads(sub.recv())["source"] == "bpf"
    finally:
        sub.close(0)
        ctx.term()
    assert svc.stop() == 0, svc.output()


@needs_root
def test_no_service_sends_without_notify_socket(runner, account, tmp_path):
    """Started without NOTIFY_SOCKET, the emulator and the daemon serve and a socket bound
    nearby hears nothing."""
    u = _units(account, runner)
    listen = NotifySocket(runner.rdir.parent / "unused.sock")
    try:
        runner.start("emu", u[units.EMU], None)
        runner.start("daemon", u[units.DAEMON_TEMPLATE], None, instance="0")
        deadline = time.monotonic() + START_S
        while not (control.is_running(runner.rdir) and paths.daemon_socket(0, runner.rdir).exists()):
            assert time.monotonic() < deadline, [s.output() for s in runner.started]
            time.sleep(0.05)
        listen.sock.settimeout(0.3)
        with pytest.raises(OSError):
            listen.sock.recv(4096)
    finally:
        listen.close()
