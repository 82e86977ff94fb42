"""The four services together, each started from its unit under its own user, group and
capabilities, in the units' order (emulator, daemon, observer, controller), on one runtime
dir: an unmodified AscendCL loop under the shim is admitted by the daemon, seen by the
observer through its uprobes, and listed by the controller, which reaches the daemon's admin
socket as the service user. What a privilege too few would break shows here first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import zmq

from flexnpu import paths
from flexnpu.service import install as inst
from flexnpu.service import units
from test_service_fixtures import NotifySocket, account, needs_root, runner, service_config, service_rdir  # noqa: F401

SAMPLE = paths.native_dir().parent / "samples" / "sample_loop.py"


def _sub(ctx: zmq.Context, path) -> zmq.Socket:
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(f"ipc://{path}")
    return s


def _until(sock: zmq.Socket, pred, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if sock.poll(200):
            last = json.loads(sock.recv())
            if pred(last):
                return last
    raise AssertionError(f"not seen within {timeout} s; last: {json.dumps(last)[:600]}")


@needs_root
@pytest.mark.root_bpf
def test_units_work_together_under_their_privileges(runner, account):
    conf = runner.rdir.parent / "flexnpu.toml"
    conf.write_text(inst.default_config_text(inst.installed_binary()))
    u = units.render(service_config(account, conf))
    n = NotifySocket(None)
    ctx = zmq.Context()
    app = None
    try:
        for name, key, kw, t in (("emu", units.EMU, {}, 30), ("daemon", units.DAEMON_TEMPLATE, {"instance": "0"}, 30),
                                 ("observe", units.OBSERVE, {}, 120), ("controller", units.CONTROLLER, {}, 30)):
            n.messages.clear()
            svc = runner.start(name, u[key], n, **kw)
            n.receive("READY=1", t, svc)
        obs = _sub(ctx, paths.observe_socket(runner.rdir))
        ctl = _sub(ctx, paths.controller_socket(runner.rdir))
        env = {**os.environ, "FLEXNPU_RUNTIME_DIR": str(runner.rdir)}
        app = subprocess.Popen([str(inst.installed_binary()), "run", "--role", "decode", "--device", "0", "--",
                                sys.executable, str(SAMPLE), str(paths.emulator_kernel_library()),
                                "--seconds", "20", "--kernel-ms", "1"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

        def in_report(r: dict) -> bool:
            return (r.get("observer") == "ok" and any(
                d["device"] == 0 and d["daemon"] == "ok" and any(c["pid"] == app.pid for c in d["clients"])
                for d in r.get("devices", [])))

        _until(ctl, in_report, 20)
        snap = _until(obs, lambda s: any(p.get("pid") == app.pid for p in _procs(s)), 20)
        assert snap["source"] == "bpf"
        assert app.poll() is None, app.stdout.read().decode() if app.stdout else ""
    finally:
        if app is not None and app.poll() is None:
            app.terminate()
            try:
                app.wait(10)
            except subprocess.TimeoutExpired:
                app.kill()
                app.wait(5)
        n.close()
        ctx.destroy(0)


def _procs(snap: dict) -> list[dict]:
    """Process entries of an observer snapshot, wherever the schema keeps them."""
    out = list(snap.get("processes", []))
    for d in snap.get("devices", []):
        out += d.get("processes", [])
    return out
