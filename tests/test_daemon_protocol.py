"""The forwarding daemon's control API.

First its handlers, called directly as gunicorn tests its ctl handlers: protocol.handle on
a ForwardDaemon whose segment is real (in this test's runtime dir) but which serves no
socket, with a real process registered in one slot. Then the real thing over zmq: a
`flexnpu daemon` process fuzzed with hypothesis (arbitrary JSON values, random bytes,
near-valid requests, multipart and oversized messages) must answer every request with a
well-formed reply and come out of it with its clients intact.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import threading
import time

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexnpu.forward.daemon import protocol
from flexnpu.forward.daemon.server import ForwardDaemon
from flexnpu.forward.daemon import access
from flexnpu.forward.daemon.gate import GateTable
from test_daemon_fixtures import daemons, end_client, gate_client, gate_loop, ready  # noqa: F401  (fixtures)

SLOT = 0  # the first free slot: where the first client is admitted


# ---------------------------------------------------------------- handlers, directly


def admit(d: ForwardDaemon, pid: int, role: int = 0):
    """Admits a live process directly (what the admission thread does once the kernel has
    said who a connecting process is); returns its registry record."""
    c = d.admission.admit(None, access.peer_of_pid(pid), role)
    assert c is not None
    return c


@pytest.fixture
def handler_daemon(runtime_dir):
    """A daemon object with its table open and one live process (a `sleep`) admitted in
    slot SLOT; nothing serves its sockets and no thread watches it."""
    d = ForwardDaemon(0, runtime_dir)
    d.open()
    child = subprocess.Popen(["sleep", "300"])
    try:
        admit(d, child.pid)
        assert [c.pid for c in d.registry.clients.values()] == [child.pid]
        yield d, child.pid
    finally:
        child.kill()
        child.wait(timeout=10)
        d.close()


def call(d, req) -> dict:
    raw = req if isinstance(req, bytes) else json.dumps(req).encode()
    reply = json.loads(protocol.handle(d, raw))
    assert reply["schema"] == 1 and isinstance(reply["ok"], bool), reply
    return reply


def ok(d, req) -> dict:
    reply = call(d, req)
    assert reply["ok"] is True and "error" not in reply, reply
    return reply


def test_ping(handler_daemon):
    d, _ = handler_daemon
    r = ok(d, {"schema": 1, "cmd": "ping"})
    assert (r["device"], r["pid"], r["clients"]) == (0, os.getpid(), 1)
    assert r["executor"] is None  # this daemon object started none (a served daemon's: its pid, restarts, socket)


def test_declared_roles_at_admission_can_be_turned_off(runtime_dir):
    """Forward mode: a declared role sets a new client's priority and budget (decode first),
    unless the daemon runs with --no-role-admission; gated clients get the defaults either way."""
    from flexnpu.forward import api

    for on in (True, False):
        d = ForwardDaemon(0, runtime_dir, role_admission=on)
        d.open()
        try:
            st = d.settings
            plain = st.new_client_defaults()
            dec, pre = st.new_client_defaults(role=2, mode=1), st.new_client_defaults(role=1, mode=1)
            assert st.new_client_defaults(role=2, mode=0) == plain
            if on:
                assert (dec["priority"], pre["priority"], pre["inflight"]) == \
                    (api.DECODE_PRIORITY, api.PREFILL_PRIORITY, api.PREFILL_ADMISSION_INFLIGHT)
            else:
                assert dec == pre == plain and plain["priority"] != api.DECODE_PRIORITY
        finally:
            d.close()


def test_list(handler_daemon):
    d, pid = handler_daemon
    r = ok(d, {"schema": 1, "cmd": "list"})
    assert r["device"] == 0
    assert r["defaults"] == {"gate": "open", "priority": 0, "max_hold_ms": 200.0, "pending_grace_ms": 1.0,
                           "inflight": 0, "max_inflight_ms": 0.0}
    [c] = r["clients"]
    assert (c["slot"], c["pid"], c["admitted_pid"]) == (SLOT, pid, pid)
    assert (c["gate"], c["priority"], c["max_hold_ms"]) == ("open", 0, 200.0)
    for key in ("ops", "bytes", "gate_waits", "gate_wait_ns", "gate_expired", "iterations", "role", "pending"):
        assert key in c


def test_a_cached_list_shows_every_change_made_on_the_admin_socket(handler_daemon):
    """The read socket's cached `list` (for users other than root) is cleared by every admin
    command that may change something, not by a read one; it follows the set of clients."""
    d, pid = handler_daemon
    cache = protocol.ListCache(fresh_s=60.0)  # nothing expires during the test
    read = lambda: json.loads(protocol.handle(d, b'{"schema": 1, "cmd": "list"}', admin=False, cache=cache))
    first = read()
    assert first["ok"] and [c["pid"] for c in first["clients"]] == [pid]
    assert protocol.handle(d, b'{"schema": 1, "cmd": "list"}', admin=False, cache=cache) is cache.reply  # cached
    protocol.handle(d, b'{"schema": 1, "cmd": "ping"}', admin=True, cache=cache)
    assert cache.key is not None  # a read command on the admin socket keeps it
    protocol.handle(d, json.dumps({"schema": 1, "cmd": "set", "pid": pid, "gate": "closed"}).encode(), admin=True,
                    cache=cache)
    assert read()["clients"][0]["gate"] == "closed"
    protocol.handle(d, b'{"schema": 1, "cmd": "defaults", "priority": 3}', admin=True, cache=cache)
    assert read()["defaults"]["priority"] == 3
    protocol.handle(d, b'{"schema": 1, "cmd": "set", "pid": 1}', admin=True, cache=cache)  # refused: still cleared
    assert cache.key is None
    d.registry.remove(SLOT, "gone")  # a client leaves: the next list is built afresh
    assert read()["clients"] == []


def test_set_by_pid_and_by_slot_writes_the_segment(handler_daemon):
    d, pid = handler_daemon
    c = ok(d, {"schema": 1, "cmd": "set", "pid": pid, "gate": "closed"})["client"]
    assert (c["pid"], c["gate"], c["priority"], c["max_hold_ms"]) == (pid, "closed", 0, 200.0)
    c = ok(d, {"schema": 1, "cmd": "set", "slot": SLOT, "priority": 7, "max_hold_ms": 12.5})["client"]
    assert (c["gate"], c["priority"], c["max_hold_ms"]) == ("closed", 7, 12.5)  # gate kept
    v = d.table.slot(SLOT)  # what the shim reads
    assert (v.gate, v.priority, v.max_hold_ns) == ("closed", 7, 12_500_000)


def test_defaults_and_apply(handler_daemon):
    d, pid = handler_daemon
    r = ok(d, {"schema": 1, "cmd": "defaults", "gate": "closed", "priority": 2, "max_hold_ms": 300})
    assert r["defaults"] == {"gate": "closed", "priority": 2, "max_hold_ms": 300, "pending_grace_ms": 1.0,
                             "inflight": 0, "max_inflight_ms": 0.0}
    assert d.table.default("default_gate") == 1 and d.table.default("default_priority") == 2
    assert d.table.slot(SLOT + 1).gate == "closed"  # a free slot: what a new client gets
    assert d.table.slot(SLOT).gate == "open"  # the client there now: unchanged without apply
    ok(d, {"schema": 1, "cmd": "defaults", "apply": True})
    v = d.table.slot(SLOT)
    assert (v.gate, v.priority, v.max_hold_ns) == ("closed", 2, 300_000_000)


def test_pending_grace_is_device_wide(handler_daemon):
    d, _ = handler_daemon
    assert d.table.default("pending_grace_ns") == 1_000_000  # the daemon's default, 1 ms
    r = ok(d, {"schema": 1, "cmd": "defaults", "pending_grace_ms": 0.25})
    assert r["defaults"]["pending_grace_ms"] == 0.25
    assert d.table.default("pending_grace_ns") == 250_000
    ok(d, {"schema": 1, "cmd": "defaults", "pending_grace_ms": 0})
    assert d.table.default("pending_grace_ns") == 0


BAD = [
    ({"schema": 1, "cmd": "defaults", "pending_grace_ms": -1}, "pending_grace_ms must be a number in [0, 1000]"),
    ({"schema": 1, "cmd": "defaults", "pending_grace_ms": 1000.5}, "pending_grace_ms must be"),
    ({"schema": 1, "cmd": "defaults", "pending_grace_ms": "1"}, "pending_grace_ms must be"),
    (b"not json", "not JSON"),
    (b"\xff\xfe\xfd", "not JSON"),
    (b"", "not JSON"),
    (b"[" * 50_000, "not JSON"),  # nested too deeply for the decoder
    (b'{"schema": 1, "cmd": "ping", "x": ' + b"7" * 5000 + b"}", "not JSON"),  # over int digits limit
    (b"[1, 2]", "a request is a JSON object"),
    (b'"ping"', "a request is a JSON object"),
    (b"null", "a request is a JSON object"),
    ({"cmd": "ping"}, "schema must be 1"),
    ({"schema": 2, "cmd": "ping"}, "schema must be 1"),
    ({"schema": "1", "cmd": "ping"}, "schema must be 1"),
    ({"schema": True, "cmd": "ping"}, "schema must be 1"),
    ({"schema": 1.0, "cmd": "ping"}, "schema must be 1"),
    ({"schema": 1}, "unknown cmd None"),
    ({"schema": 1, "cmd": "reboot"}, "unknown cmd 'reboot'"),
    ({"schema": 1, "cmd": ["ping"]}, "unknown cmd"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "priority": 8}, "priority must be an integer 0..7"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "priority": -1}, "priority must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "priority": 1.5}, "priority must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "priority": True}, "priority must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "priority": "3"}, "priority must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "max_hold_ms": 0}, "max_hold_ms must be a number in [0.01, 60000]"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "max_hold_ms": 1e-7}, "max_hold_ms must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "max_hold_ms": -5}, "max_hold_ms must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "max_hold_ms": math.nan}, "max_hold_ms must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "max_hold_ms": math.inf}, "max_hold_ms must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "max_hold_ms": 60_000.001}, "max_hold_ms must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "max_hold_ms": 10**400}, "max_hold_ms must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "max_hold_ms": True}, "max_hold_ms must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "max_hold_ms": "100"}, "max_hold_ms must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "gate": "ajar"}, "gate must be 'open' or 'closed'"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "gate": 1}, "gate must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "gate": ["open"]}, "gate must be"),
    ({"schema": 1, "cmd": "defaults", "gate": {"open": 1}}, "gate must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "pid": 1, "gate": "open"}, "exactly one of pid or slot"),
    ({"schema": 1, "cmd": "set", "gate": "open"}, "exactly one of pid or slot"),
    ({"schema": 1, "cmd": "set", "pid": "1", "gate": "open"}, "pid must be an integer"),
    ({"schema": 1, "cmd": "set", "slot": 2.0, "gate": "open"}, "slot must be an integer"),
    ({"schema": 1, "cmd": "set", "pid": 2**40, "gate": "closed"}, f"no client with pid {2**40}"),
    ({"schema": 1, "cmd": "set", "slot": SLOT + 1, "gate": "closed"}, f"no client with slot {SLOT + 1}"),
    ({"schema": 1, "cmd": "defaults", "priority": 9}, "priority must be"),
    ({"schema": 1, "cmd": "defaults", "apply": "yes"}, "apply must be true or false"),
    (b'{"schema": 1, "cmd": "ping", "pad": "' + b"x" * protocol.MAX_MESSAGE + b'"}', "over the 65536-byte limit"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "inflight": -1}, "inflight must be an integer 0..1000000"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "inflight": True}, "inflight must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "inflight": 1.0}, "inflight must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "inflight": "2"}, "inflight must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "inflight": 2**32}, "inflight must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "owner": "root"}, "owner must be 'manual' or 'controller'"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "owner": None}, "owner must be"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "lease_ms": 100}, "lease_ms goes with owner 'controller'"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "owner": "controller", "lease_ms": 5}, "lease_ms must be a number in [10, 60000]"),
    ({"schema": 1, "cmd": "set", "slot": SLOT, "owner": "controller", "lease_ms": True}, "lease_ms must be"),
    ({"schema": 1, "cmd": "set_many"}, "settings must be a list"),
    ({"schema": 1, "cmd": "set_many", "settings": {"pid": 1}}, "settings must be a list"),
    ({"schema": 1, "cmd": "set_many", "settings": [3]}, "settings[0] must be an object"),
    ({"schema": 1, "cmd": "set_many", "settings": [{"gate": "open"}]}, "settings[0]: pid must be an integer"),
    ({"schema": 1, "cmd": "set_many", "settings": [{"pid": True}]}, "settings[0]: pid must be"),
    ({"schema": 1, "cmd": "set_many", "settings": [{"pid": 1}, {"pid": 2, "inflight": -3}]},
     "settings[1]: inflight must be"),
    ({"schema": 1, "cmd": "set_many", "settings": [{"pid": 1, "slot": 3}]}, "settings[0]: unknown key 'slot'"),
    ({"schema": 1, "cmd": "set_many", "settings": [], "lease_ms": 70_000}, "lease_ms must be"),
    ({"schema": 1, "cmd": "release"}, "release needs a pid or"),
    ({"schema": 1, "cmd": "release", "pid": 1, "all": True}, "release needs a pid or"),
    ({"schema": 1, "cmd": "release", "all": "yes"}, "all must be true or false"),
    ({"schema": 1, "cmd": "release", "pid": 2**40}, f"no client with pid {2**40}"),
    ({"schema": 1, "cmd": "renew", "owner": "manual"}, "renew is for owner 'controller'"),
    ({"schema": 1, "cmd": "renew", "lease_ms": 0}, "lease_ms must be"),
]


@pytest.mark.parametrize("req,error", BAD, ids=[f"{i}-{e.split()[0]}" for i, (_, e) in enumerate(BAD)])
def test_bad_request_gets_an_error_and_changes_nothing(handler_daemon, req, error):
    d, _ = handler_daemon
    before = (ok(d, {"schema": 1, "cmd": "list"}), dict(d.defaults))
    reply = call(d, req)
    assert reply["ok"] is False and error in reply["error"], reply
    assert not reply["error"].startswith("internal error"), reply
    assert len(reply["error"].splitlines()) == 1
    after = (ok(d, {"schema": 1, "cmd": "list"}), dict(d.defaults))
    strip = [{k: v for k, v in c.items() if k != "gen"} for c in before[0]["clients"]]
    assert strip == [{k: v for k, v in c.items() if k != "gen"} for c in after[0]["clients"]]
    assert before[1] == after[1]


def test_a_request_of_exactly_the_limit_is_served(handler_daemon):
    d, _ = handler_daemon
    head = b'{"schema": 1, "cmd": "ping"}'
    raw = head + b" " * (protocol.MAX_MESSAGE - len(head))
    assert len(raw) == protocol.MAX_MESSAGE
    ok(d, raw)


def test_bad_settings_are_refused_before_any_write(handler_daemon):
    """A set with one good and one bad setting writes neither."""
    d, pid = handler_daemon
    r = call(d, {"schema": 1, "cmd": "set", "pid": pid, "gate": "closed", "priority": 8})
    assert r["ok"] is False
    assert d.table.slot(SLOT).gate == "open"


def _wake_seq(d) -> int:
    return d.table.wake_seq()


@pytest.fixture
def second_client(handler_daemon, runtime_dir):
    """A second live process admitted in slot SLOT + 1 of the handler daemon."""
    d, _ = handler_daemon
    child = subprocess.Popen(["sleep", "300"])
    try:
        admit(d, child.pid)
        yield child.pid
    finally:
        child.kill()
        child.wait(timeout=10)


def test_set_inflight_is_a_manual_setting(handler_daemon):
    d, pid = handler_daemon
    c = ok(d, {"schema": 1, "cmd": "set", "pid": pid, "inflight": 3})["client"]
    assert (c["inflight"], c["owner"], c["gate"]) == (3, "manual", "open")
    v = d.table.slot(SLOT)  # what the shim reads
    assert (v.inflight_max, v.owner) == (3, "manual")
    r = ok(d, {"schema": 1, "cmd": "list"})
    [c] = r["clients"]
    assert r["controller"] is None
    for key in ("owner", "inflight", "inflight_now", "inflight_waits", "inflight_wait_ms"):
        assert key in c, key
    assert (c["inflight"], c["inflight_now"], c["inflight_waits"], c["inflight_wait_ms"]) == (3, 0, 0, 0.0)


def test_set_many_applies_a_batch_with_one_wake_and_skips_strangers(handler_daemon, second_client):
    d, pid = handler_daemon
    seq = _wake_seq(d)
    r = ok(d, {"schema": 1, "cmd": "set_many", "owner": "controller", "lease_ms": 500, "settings": [
        {"pid": pid, "gate": "closed", "priority": 2, "inflight": 1},
        {"pid": 2**40, "gate": "open"},
        {"pid": second_client, "max_hold_ms": 7.5, "inflight": 4},
    ]})
    assert r["applied"] == [pid, second_client]
    assert r["skipped"] == [{"pid": 2**40, "reason": f"no client with pid {2**40} on device 0"}]
    assert _wake_seq(d) == seq + 1  # one wake for the batch, not one per client
    a, b = d.table.slot(SLOT), d.table.slot(SLOT + 1)
    assert (a.gate, a.priority, a.inflight_max, a.owner) == ("closed", 2, 1, "controller")
    assert (b.gate, b.max_hold_ns, b.inflight_max, b.owner) == ("open", 7_500_000, 4, "controller")
    lease = ok(d, {"schema": 1, "cmd": "list"})["controller"]
    assert 0 < lease["lease_left_ms"] <= 500
    # nothing to apply: no wake at all
    r = ok(d, {"schema": 1, "cmd": "set_many", "settings": [{"pid": 2**40}]})
    assert r["applied"] == [] and _wake_seq(d) == seq + 1


def test_set_many_naming_a_client_twice_applies_both_in_order_with_one_wake(handler_daemon, second_client):
    """The batch is written in one call into C (stores, then the wake); a client named twice
    gets the second setting over the first, and what only the first set stays."""
    d, pid = handler_daemon
    seq = _wake_seq(d)
    r = ok(d, {"schema": 1, "cmd": "set_many", "settings": [
        {"pid": pid, "gate": "closed", "inflight": 3},
        {"pid": second_client, "priority": 4},
        {"pid": pid, "priority": 5, "inflight": 6},
    ]})
    assert r["applied"] == [pid, second_client, pid]
    assert _wake_seq(d) == seq + 1
    a, b = d.table.slot(SLOT), d.table.slot(SLOT + 1)
    assert (a.gate, a.priority, a.inflight_max, a.owner) == ("closed", 5, 6, "controller")
    assert (b.gate, b.priority, b.owner) == ("open", 4, "controller")


def test_apply_slots_skips_slots_out_of_range_and_wakes_once(handler_daemon):
    d, _ = handler_daemon
    seq = _wake_seq(d)
    n = d.table.apply_slots([(-1, 1, 3, 1, 0, None), (d.table.max_slots, 1, 3, 1, 0, None),
                             (SLOT, 1, 6, 5_000_000, 2, "manual")])
    assert n == 1 and _wake_seq(d) == seq + 1
    v = d.table.slot(SLOT)
    assert (v.gate, v.priority, v.max_hold_ns, v.inflight_max, v.owner) == ("closed", 6, 5_000_000, 2, "manual")
    assert d.table.apply_slots([]) == 0 and _wake_seq(d) == seq + 2  # nothing written: a wake all the same


def test_manual_overrides_the_controller_until_released(handler_daemon, second_client):
    d, pid = handler_daemon
    ok(d, {"schema": 1, "cmd": "set_many", "settings": [{"pid": pid, "inflight": 1}]})
    c = ok(d, {"schema": 1, "cmd": "set", "pid": pid, "gate": "closed"})["client"]  # manual, over it
    assert (c["gate"], c["inflight"], c["owner"]) == ("closed", 1, "manual")
    r = ok(d, {"schema": 1, "cmd": "set_many", "owner": "controller", "settings": [
        {"pid": pid, "gate": "open", "inflight": 5}, {"pid": second_client, "inflight": 2}]})
    reason = f"manual setting holds; `flexnpu gate release {pid}` returns it to the controller"
    assert (r["applied"], r["skipped"]) == ([second_client], [{"pid": pid, "reason": reason}])
    v = d.table.slot(SLOT)
    assert (v.gate, v.inflight_max, v.owner) == ("closed", 1, "manual")
    e = call(d, {"schema": 1, "cmd": "set", "pid": pid, "owner": "controller", "gate": "open"})
    assert e["ok"] is False and "manual setting holds" in e["error"]
    # release: back to the device defaults, owner none; then the controller may set it again
    assert ok(d, {"schema": 1, "cmd": "release", "pid": pid})["released"] == [pid]
    v = d.table.slot(SLOT)
    assert (v.gate, v.priority, v.max_hold_ns, v.inflight_max, v.owner) == ("open", 0, 200_000_000, 0, None)
    assert ok(d, {"schema": 1, "cmd": "release", "pid": pid})["released"] == []  # nothing manual left
    r = ok(d, {"schema": 1, "cmd": "set_many", "settings": [{"pid": pid, "inflight": 5}]})
    assert r["applied"] == [pid] and d.table.slot(SLOT).owner == "controller"
    # release --all touches manual settings only
    ok(d, {"schema": 1, "cmd": "set", "pid": second_client, "inflight": 9})
    assert ok(d, {"schema": 1, "cmd": "release", "all": True})["released"] == [second_client]
    assert d.table.slot(SLOT).inflight_max == 5 and d.table.slot(SLOT + 1).inflight_max == 0


def test_lease_expiry_reverts_controller_settings_only(handler_daemon, second_client):
    d, pid = handler_daemon
    ok(d, {"schema": 1, "cmd": "set_many", "lease_ms": 10, "settings": [
        {"pid": pid, "gate": "closed", "inflight": 2}]})
    ok(d, {"schema": 1, "cmd": "set", "pid": second_client, "gate": "closed", "inflight": 3})  # manual
    renewed = ok(d, {"schema": 1, "cmd": "renew", "lease_ms": 60})["controller"]
    assert 0 < renewed["lease_left_ms"] <= 60
    d.settings.check_lease()  # what the watcher does each pass: not yet
    assert d.table.slot(SLOT).gate == "closed"
    time.sleep(0.08)
    seq = _wake_seq(d)
    d.settings.check_lease()
    a, b = d.table.slot(SLOT), d.table.slot(SLOT + 1)
    assert (a.gate, a.inflight_max, a.owner) == ("open", 0, None)
    assert (b.gate, b.inflight_max, b.owner) == ("closed", 3, "manual")
    assert _wake_seq(d) == seq + 1
    assert ok(d, {"schema": 1, "cmd": "list"})["controller"] is None


def test_daemon_process_reverts_a_dead_controllers_settings_in_time(daemons, runtime_dir):
    """Real daemon, its own watcher thread: a controller that stops renewing leaves every gate
    open within lease + 150 ms."""
    d = daemons(0)
    child, answer = gate_client(runtime_dir, 0)
    assert answer["status"] == 0 and answer["slot"] == SLOT, answer
    try:
        d.wait_admitted(child.pid)
        lease_ms = 300
        t0 = time.monotonic()
        r = d.client.set_many([{"pid": child.pid, "gate": "closed", "inflight": 1}], lease_ms=lease_ms)
        t_reply = time.monotonic()
        assert (r.applied, r.skipped) == ((child.pid,), {})
        seg = GateTable.open_readonly(0, runtime_dir)
        try:
            assert seg.slot(SLOT).gate == "closed"
            while seg.slot(SLOT).gate == "closed":
                assert time.monotonic() - t0 < 5, "the lease never ran out"
                time.sleep(0.002)
            t_open = time.monotonic()
            v = seg.slot(SLOT)
            assert (v.inflight_max, v.owner) == (0, None)
        finally:
            seg.close()
        assert t_open - t_reply >= lease_ms / 1e3 - 0.01
        assert t_open - t0 <= (lease_ms + 150) / 1e3, f"reverted {1e3 * (t_open - t0) - lease_ms:.0f} ms late"
        assert "lease ran out" in d.log()
    finally:
        end_client(child)


def test_readonly_segment_never_writes(handler_daemon, runtime_dir):
    d, pid = handler_daemon
    seg = GateTable.open_readonly(0, runtime_dir)
    try:
        assert seg.valid() and seg.slot(SLOT).pid == pid
        with pytest.raises(PermissionError):
            seg.write_slot(SLOT, 1, 0, 1000, 0, None)
        with pytest.raises(TypeError):
            seg.ctl[0] = 1  # mapped PROT_READ
    finally:
        seg.close()
    with pytest.raises(OSError):
        GateTable.open_readonly(7, runtime_dir)  # no such segment: nothing created
    assert not (runtime_dir / "gate-7.ctl").exists()


# ---------------------------------------------------------------- a real daemon, over zmq

_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)), max_leaves=20)
_ints = st.one_of(st.integers(min_value=-3, max_value=70), st.integers(min_value=-(2**70), max_value=2**70))
near_valid = st.fixed_dictionaries(
    {"schema": st.one_of(st.just(1), st.sampled_from([0, 2, "1", True, 1.0, None])),
     "cmd": st.one_of(st.sampled_from(["ping", "list", "set", "defaults", "pong", ""]), json_values)},
    optional={
        "pid": st.one_of(_ints, json_values),
        "slot": st.one_of(_ints, json_values),
        "gate": st.one_of(st.sampled_from(["open", "closed", "ajar", "OPEN"]), json_values),
        "priority": st.one_of(_ints, json_values),
        "max_hold_ms": st.one_of(st.floats(allow_nan=True, allow_infinity=True), _ints, json_values),
        "apply": st.one_of(st.booleans(), json_values),
    },
)
messages = st.one_of(
    json_values.map(lambda v: [json.dumps(v).encode()]),
    near_valid.map(lambda v: [json.dumps(v).encode()]),
    st.binary(max_size=4096).map(lambda b: [b]),
    st.integers(min_value=protocol.MAX_MESSAGE - 64, max_value=protocol.MAX_MESSAGE + 64).map(
        lambda n: [(b'{"schema": 1, "cmd": "ping"}' + b" " * n)[:n]]),
    st.lists(st.binary(max_size=64), min_size=2, max_size=4),  # multipart
)


def check_reply(raw: bytes) -> dict:
    reply = json.loads(raw)
    assert isinstance(reply, dict) and reply["schema"] == 1 and isinstance(reply["ok"], bool), reply
    if not reply["ok"]:
        assert isinstance(reply["error"], str) and reply["error"], reply
        assert not reply["error"].startswith("internal error"), reply  # a handler bug, not bad input
    return reply


@pytest.fixture
def zsocks():
    """REQ/DEALER sockets on a private context; all closed with linger 0 at teardown, and a
    context that will not terminate fails the test."""
    ctx = zmq.Context()
    made: list[zmq.Socket] = []

    def make(kind: int, path) -> zmq.Socket:
        s = ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 15_000)
        s.setsockopt(zmq.SNDTIMEO, 15_000)
        s.connect(f"ipc://{path}")
        made.append(s)
        return s

    yield make
    for s in made:
        s.close(0)
    done = []
    t = threading.Thread(target=lambda: (ctx.term(), done.append(1)), daemon=True)
    t.start()
    t.join(10)
    assert done, "zmq context did not terminate"


@pytest.fixture
def served(emulator, daemons, gate_loop):
    """A real daemon with one real, idle client under the shim."""
    emulator()
    d = daemons(0)
    a = gate_loop(1, 1, 1, "--wait-stdin")
    ready(a)
    d.wait_admitted(a.pid)
    return d, a


def _intact(d, pid: int) -> None:
    assert d.proc.poll() is None, d.log()
    r = d.client.ping()
    assert r["pid"] == d.pid and r["clients"] == 1
    assert [c["pid"] for c in d.list()] == [pid]


@pytest.mark.slow
def test_fuzz_real_daemon_answers_everything(served, zsocks):
    d, a = served
    sock = zsocks(zmq.REQ, d.socket)

    @settings(max_examples=1500, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(messages)
    def one(frames: list[bytes]) -> None:
        sock.send_multipart(frames)
        check_reply(sock.recv())

    one()
    _intact(d, a.pid)


def test_multipart_request_gets_an_error_reply(served, zsocks):
    d, a = served
    sock = zsocks(zmq.REQ, d.socket)
    sock.send_multipart([b'{"schema": 1, "cmd": "ping"}', b"more"])
    r = check_reply(sock.recv())
    assert r["ok"] is False and "one message frame" in r["error"]
    sock.send(b'{"schema": 1, "cmd": "ping"}')
    assert check_reply(sock.recv())["ok"] is True
    _intact(d, a.pid)


def test_garbage_peers_do_not_hurt_the_daemon(served, zsocks):
    d, a = served
    # a frame over zmq's MAXMSGSIZE: zmq drops that peer, so no reply comes
    big = zsocks(zmq.REQ, d.socket)
    big.setsockopt(zmq.RCVTIMEO, 1000)
    big.send(b"x" * (protocol.MAX_FRAME + 1))
    with pytest.raises(zmq.Again):
        big.recv()
    # a DEALER that leaves out the REQ envelope, then one that keeps it
    dealer = zsocks(zmq.DEALER, d.socket)
    dealer.send(b"no envelope")
    dealer.send_multipart([b"", b'{"schema": 1, "cmd": "ping"}'])
    empty, raw = dealer.recv_multipart()
    assert empty == b"" and check_reply(raw)["ok"] is True
    # not zmq at all: a plain unix stream writing junk, and one that closes at once
    for junk in (b"\x00" * 64, b"\xff" + b"\x00" * 8 + b"\x7f" + os.urandom(512), b"GET / HTTP/1.0\r\n\r\n", b""):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(d.socket))
            if junk:
                s.sendall(junk)
            time.sleep(0.05)
    _intact(d, a.pid)


def test_a_role_the_user_may_not_declare_gets_nothing_at_admission(runtime_dir, monkeypatch):
    """[roles] in flexnpu.toml applies at admission as it does for the controller: a decode
    declared by a user not listed gets the defaults, not decode's priority."""
    from flexnpu.forward import api

    cfg = runtime_dir / "flexnpu.toml"
    cfg.write_text('[roles]\ndecode = ["@fx-no-such-group"]\n')
    monkeypatch.setenv("FLEXNPU_CONFIG", str(cfg))
    d = ForwardDaemon(0, runtime_dir)
    d.open()
    try:
        st = d.settings
        plain = st.new_client_defaults()
        assert st.new_client_defaults(role=2, mode=1, uid=0) == plain  # root is not in the group
        assert st.new_client_defaults(role=1, mode=1, uid=0)["priority"] == api.PREFILL_PRIORITY  # prefill: anyone
    finally:
        d.close()
    cfg.write_text("[roles\n")  # unreadable: no role settings at admission at all
    d = ForwardDaemon(0, runtime_dir)
    d.open()
    try:
        assert d.settings.new_client_defaults(role=1, mode=1, uid=0) == d.settings.new_client_defaults()
    finally:
        d.close()
