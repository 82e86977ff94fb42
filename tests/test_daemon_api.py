"""The forwarding daemon's typed client API (flexnpu/forward/api.py) against a real
`flexnpu daemon`: typed list/set round trips (max_inflight_ms included), the one unit on the
wire, the defaults defined once (and mirrored by gate.h), one decoder for the controller,
`flexnpu top` and the observer, and bad input refused with a clear error."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from flexnpu import paths
from flexnpu.control.policies.base import Client
from flexnpu.forward import api
from flexnpu.forward.api import ApiError, ClientView, DaemonError, GateSetting, decode_list
from flexnpu.forward.daemon.gate import GateTable
from flexnpu.observe.shimsource import ShimSource
from flexnpu.tui.model import Sampler, daemon_devices
from test_daemon_fixtures import FLEXNPU, daemons, end_client, gate_client  # noqa: F401  (fixtures)

GATE_H = Path(__file__).resolve().parents[1] / "flexnpu" / "forward" / "native" / "gate.h"
SET = GateSetting(gate="closed", priority=5, max_hold_ms=12.5, inflight=3, max_inflight_ms=0.75)


@pytest.fixture
def two_clients(daemons, runtime_dir):
    """A daemon with two admitted clients: a gated one (role prefill) and one in forward mode."""
    d = daemons(0)
    gated, a = gate_client(runtime_dir, 0, "--role", "1")
    fwd, b = gate_client(runtime_dir, 0, "--mode", "1")
    try:
        assert a["status"] == 0 and b["status"] == 0, (a, b)
        d.wait_admitted(gated.pid)
        d.wait_admitted(fwd.pid)
        yield d, gated.pid, fwd.pid
    finally:
        end_client(gated)
        end_client(fwd)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FLEXNPU, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_typed_list_and_set_round_trip(two_clients, runtime_dir):
    d, gated, fwd = two_clients
    views = {v.pid: v for v in d.client.list()}
    assert set(views) == {gated, fwd}
    g, f = views[gated], views[fwd]
    assert isinstance(g, ClientView) and isinstance(g.slot, int) and g.slot != f.slot
    assert (g.role, g.mode, f.role, f.mode) == ("prefill", "gated", "auto", "forward")
    assert g.uid == f.uid == 0  # the kernel's word (SO_PEERCRED): this test runs as root
    assert g.owner is None and g.setting == GateSetting()  # the device defaults
    assert g.max_inflight_ms == 0.0 and g.iterations == 0 and g.gate_wait_ms == 0.0

    v = d.client.set(fwd, SET)
    assert v.pid == fwd and v.owner == "manual" and v.setting == SET
    listed = d.client.list_all()
    assert listed.device == 0 and listed.client(fwd).setting == SET
    assert listed.client(gated).setting == GateSetting()  # the other one untouched
    # a change of one knob keeps the rest, max_inflight_ms included
    assert d.client.set(fwd, gate="open").setting == GateSetting("open", 5, 12.5, 3, 0.75)
    # the CLI shows it and sets it, its JSON the wire's record
    r = cli("gate", "set", str(fwd), "--max-inflight-ms", "2.5", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["client"]["max_inflight_ms"] == 2.5
    r = cli("gate", "list", "--json")
    assert r.returncode == 0, r.stderr
    assert {c["pid"]: c["max_inflight_ms"] for c in json.loads(r.stdout)["clients"]} == {gated: 0.0, fwd: 2.5}
    # release: back to the device defaults, the budget in device time too
    assert d.client.release(fwd) == [fwd]
    assert d.client.list_all().client(fwd).setting == GateSetting()


def test_set_many_and_defaults_typed(two_clients):
    d, gated, fwd = two_clients
    r = d.client.set_many({gated: GateSetting(priority=2, max_inflight_ms=1.5), 999_999_999: GateSetting()},
                          lease_ms=400)
    assert r.applied == (gated,) and 999_999_999 in r.skipped
    listed = d.client.list_all()
    c = listed.client(gated)
    assert c.owner == "controller" and c.setting == GateSetting(priority=2, max_inflight_ms=1.5)
    assert listed.lease_left_ms is not None and 0 < listed.lease_left_ms <= 400
    assert 0 < d.client.renew(lease_ms=300) <= 300

    got = d.client.defaults(max_inflight_ms=4.0, priority=1, apply=True)
    assert got.setting == GateSetting(priority=1, max_inflight_ms=4.0)
    assert got.pending_grace_ms == api.DEFAULT_PENDING_GRACE_MS
    listed = d.client.list_all()
    assert listed.defaults == got
    assert listed.client(fwd).setting == GateSetting(priority=1, max_inflight_ms=4.0)  # on the defaults: applied
    assert listed.client(gated).setting.max_inflight_ms == 1.5  # the controller's: kept
    r = cli("gate", "defaults", "--max-inflight-ms", "0.5")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["defaults"]["max_inflight_ms"] == 0.5
    assert d.client.list_all().defaults.setting.max_inflight_ms == 0.5


def test_durations_on_the_wire_are_ms(two_clients, runtime_dir):
    """Every duration the API sends and lists is in ms; the daemon converts once, where it
    writes the table (ns)."""
    d, gated, _ = two_clients
    d.client.set(gated, max_hold_ms=12.5)
    table = GateTable.open_readonly(0, runtime_dir)
    try:
        slot = d.client.list_all().client(gated).slot
        assert table.settings(slot)["max_hold_ns"] == 12_500_000
    finally:
        table.close()
    raw = d.client.request("list")
    rec = next(c for c in raw["clients"] if c["pid"] == gated)
    durations = {k for k in rec if re.search(r"(_ms|_ns|ns_\w+)$", k)}
    assert {k for k in durations if k.endswith("_ms")} >= {
        "max_hold_ms", "max_inflight_ms", "gate_wait_ms", "iter_total_ms", "iter_last_ms", "last_release_lag_ms",
        "last_hold_lag_ms", "inflight_wait_ms"}
    # the only nanosecond keys are schema 1's counters, each beside its ms twin, equal
    from flexnpu.forward.daemon.protocol import LEGACY_NS_KEYS

    assert {k for k in durations if not k.endswith("_ms")} == set(LEGACY_NS_KEYS)
    assert rec["gate_wait_ms"] == rec["gate_wait_ns"] / 1e6
    assert set(raw["defaults"]) >= {"max_hold_ms", "pending_grace_ms", "max_inflight_ms"}
    assert raw["defaults"]["max_hold_ms"] == api.DEFAULT_MAX_HOLD_MS
    assert raw["schema"] == api.SCHEMA == 1


def test_defaults_defined_once_match_gate_h():
    """gate.h's defaults (for a table no daemon has written) are the API's."""
    text = GATE_H.read_text()

    def define(name: str) -> int:
        m = re.search(rf"#define {name} (\d+)ULL", text)
        assert m, f"{name} not in {GATE_H}"
        return int(m.group(1))

    assert define("FX_DEFAULT_MAX_HOLD_NS") == api.ms_to_ns(api.DEFAULT_MAX_HOLD_MS)
    assert define("FX_DEFAULT_PENDING_GRACE_NS") == api.ms_to_ns(api.DEFAULT_PENDING_GRACE_MS)
    from flexnpu.control.config import ControllerOptions
    from flexnpu.control.wire import DEFAULT_MAX_HOLD_MS, OPEN

    assert ControllerOptions().lease_ms == api.LEASE_DEFAULT_MS
    assert DEFAULT_MAX_HOLD_MS == OPEN.max_hold_ms == api.DEFAULT_MAX_HOLD_MS


def test_one_decoder_for_controller_top_and_observer(two_clients, runtime_dir):
    """The controller, `top` and the observer find the daemons by paths.daemon_devices and
    read them through the API's decoder: they agree with it and with each other."""
    d, gated, fwd = two_clients
    d.client.set(gated, SET)
    view = d.client.list_all().client(gated)
    assert paths.daemon_devices(runtime_dir) == daemon_devices(runtime_dir) == [0]
    # the controller
    c = Client.from_view(0, view)
    assert (c.pid, c.setting, c.owner, c.role, c.uid) == (gated, SET, "manual", "prefill", 0)
    # top
    sampler = Sampler(runtime_dir)
    socks: dict = {}
    try:
        [state] = sampler._poll_daemons(socks)
    finally:
        for s in socks.values():
            s.close()
    assert state.state == "ok", state.error
    g = state.client(gated)
    assert (g.gate, g.priority, g.max_hold_ms, g.inflight, g.owner, g.role) == ("closed", 5, 12.5, 3, "manual",
                                                                             "prefill")
    # the observer
    src = ShimSource(runtime_dir)
    try:
        assert src.devices() == [0]
        got = src.read()
    finally:
        src.close()
    assert set(got) == {(gated, 0), (fwd, 0)} and src.roles == {gated: "prefill"}
    assert got[(gated, 0)]["iterations"] == view.iterations and got[(gated, 0)]["iter_ns"] == 0
    # and none of the three decodes the reply or matches the socket's name on its own
    root = Path(__file__).resolve().parents[1] / "flexnpu"
    for mod in ("control/controller.py", "tui/model.py", "observe/shimsource.py", "forward/cli.py"):
        src_text = (root / mod).read_text()
        assert 'request("list")' not in src_text and "daemon-(" not in src_text, mod


def test_bad_input_refused_with_a_clear_error(two_clients):
    d, gated, _ = two_clients
    before = d.client.list_all().client(gated).setting
    with pytest.raises(ApiError, match=r"priority must be an integer 0\.\.7, not 9"):
        GateSetting(priority=9)
    with pytest.raises(ApiError, match=r"max_inflight_ms must be a number in \[0, 60000\]"):
        d.client.set(gated, max_inflight_ms=-1.0)
    with pytest.raises(ApiError, match=r"unknown setting 'max_hold_ns'"):
        d.client.set(gated, {"max_hold_ns": 5})
    with pytest.raises(ApiError, match="exactly one of pid or slot"):
        d.client.set(None, gate="open")
    with pytest.raises(ApiError, match=r"gate must be 'open' or 'closed'"):
        d.client.set_many({gated: {"gate": "ajar"}})
    # the daemon refuses what skips the client's checks, with the same words
    with pytest.raises(DaemonError, match=r"max_inflight_ms must be a number in \[0, 60000\].*'x'"):
        d.client.request("set", pid=gated, max_inflight_ms="x")
    with pytest.raises(DaemonError, match=r"settings\[0\]: max_inflight_ms must be a number"):
        d.client.request("set_many", owner="controller", settings=[{"pid": gated, "max_inflight_ms": float("inf")}])
    with pytest.raises(DaemonError, match="unknown key 'max_hold_ns'"):
        d.client.request("set_many", owner="controller", settings=[{"pid": gated, "max_hold_ns": 1}])
    assert d.client.list_all().client(gated).setting == before  # nothing applied
    # replies that are not what the API reads
    with pytest.raises(ApiError, match="clients are a list"):
        decode_list({"clients": "many"})
    with pytest.raises(ApiError, match="integer pid"):
        ClientView.from_wire({"pid": "12"})
    assert decode_list({"clients": [{"pid": 3}, {"nope": 1}, 7]}).clients == (ClientView.from_wire({"pid": 3}),)
    # the CLI: a usage error before any socket
    r = cli("gate", "set", str(gated), "--max-inflight-ms", "-1")
    assert r.returncode == 2 and "--max-inflight-ms must be a number from 0 to 60000 ms" in r.stderr, r
