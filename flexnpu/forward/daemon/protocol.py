"""The forwarding daemon's control API: JSON over zmq REQ/REP. Clients use
flexnpu/forward/api.py (typed); this module is the daemon's side.

Request:  {"schema": 1, "cmd": <name>, ...arguments}
Reply:    {"schema": 1, "ok": true, ...}  or  {"schema": 1, "ok": false, "error": "..."}
The schema number is flexnpu.SCHEMA, defined once.

Units: every duration on the wire is a JSON number of milliseconds and its key ends in
"_ms" (api.WIRE_UNIT). The daemon converts to the gate table's nanoseconds where it writes
the table (api.ms_to_ns) and back where it reads it. Counters the table keeps in ns are sent
in ms ("gate_wait_ms", "iter_total_ms", "iter_last_ms", "last_release_lag_ms",
"last_hold_lag_ms", "inflight_wait_ms"), and "iter_open_ms" is how long the client's open
iteration (work dispatched since its last sync) had run when the daemon read it (0: none);
their schema-1 nanosecond twins (LEGACY_NS_KEYS: "gate_wait_ns", "iter_ns_total", "iter_ns_last", "last_release_lag_ns",
"last_hold_lag_ns") are still sent, unchanged in meaning, for readers of schema 1.

Commands
  ping                                   -> device, pid, clients, executor ({pid, restarts, socket} of
                                            the device's executor; pid null while it is down; null
                                            without forwarded execution)
  list                                   -> clients: [slot view + settings], defaults, controller
  set       pid|slot, [settings], [owner], [lease_ms]  -> client
  set_many  owner, [lease_ms], settings: [{pid, [settings]}]
                                         -> applied: [pid], skipped: [{pid, reason}]
  release   pid | all: true              -> released: [pid]
  renew     owner, [lease_ms]            -> controller: {lease_left_ms}
  defaults  [settings], [pending_grace_ms], [apply]  -> defaults
[settings]: any of gate, priority, max_hold_ms, inflight, max_inflight_ms (api.SETTING_KEYS).
gate is "open" or "closed"; priority 0..7 (higher goes first); max_hold_ms in [0.01, 60000];
inflight 0..1000000 (launches a client may have dispatched and unfinished; 0 unlimited);
max_inflight_ms in [0, 60000] (device time a client may have in flight; 0 none: stored and
listed for the forward mode's executor; the gated shim does not enforce it, and the gate
table has no field for it, so a restarted daemon forgets it);
pending_grace_ms in [0, 1000] (device-wide: how long a client's work still counts as pending
for priority after its sync, so its next step keeps its turn). Limits and defaults are
api.py's.

Ownership: each client's settings belong to nobody (the device defaults), the "controller"
or "manual" (a person, `flexnpu gate set`). A manual set overrides anything and holds until
released (`release`: back to the defaults). A controller set/set_many never overwrites a
manual setting, and carries a lease (lease_ms in [10, 60000], default 500) that it and
`renew` extend; when the lease runs out every controller-owned setting reverts to the
device defaults.
Two sockets (docs/security.md): the read socket serves ping and list (READ_COMMANDS) and
refuses the rest; the admin socket serves every command. A `list` on the read socket from a
user other than root may be answered from a recent reply (ListCache).
A malformed, unknown, multipart or oversized (> MAX_MESSAGE) request gets an error reply;
a frame over MAX_FRAME gets none (zmq's MAXMSGSIZE drops that peer).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from flexnpu import SCHEMA
from flexnpu.forward import api
from flexnpu.forward.api import (  # noqa: F401 (the daemon's limits are the API's)
    ALL_COMMANDS, INFLIGHT_LIMIT, LEASE_DEFAULT_MS, LEASE_MAX_MS, LEASE_MIN_MS, MAX_GRACE_MS, MAX_HOLD_LIMIT_MS,
    MIN_HOLD_MS, OWNERS, READ_COMMANDS, SETTING_KEYS, ms_to_ns)
from flexnpu.forward.daemon.gate import GATE_CLOSED, GATE_OPEN

MAX_MESSAGE = 64 * 1024
MAX_FRAME = 1 << 20
GATES = {"open": GATE_OPEN, "closed": GATE_CLOSED}
MANUAL_HOLDS = "manual setting holds; `flexnpu gate release PID` returns it to the controller"
LEGACY_NS_KEYS = ("gate_wait_ns", "iter_ns_total", "iter_ns_last", "last_release_lag_ns", "last_hold_lag_ns")


class RequestError(ValueError):
    """A request the daemon refuses; its text goes back as the error."""


def check_settings(req: dict[str, Any]) -> None:
    try:
        api.check_changes(req)
    except api.ApiError as e:
        raise RequestError(str(e)) from None


def check_owner(req: dict[str, Any]) -> tuple[str, float | None]:
    """The request's owner and, for the controller, its lease in ms."""
    owner = req.get("owner", "manual")
    if not isinstance(owner, str) or owner not in OWNERS:
        raise RequestError(f"owner must be 'manual' or 'controller', not {owner!r}")
    lease = req.get("lease_ms")
    if owner != "controller":
        if lease is not None:
            raise RequestError("lease_ms goes with owner 'controller'; a manual setting holds until released")
        return owner, None
    if lease is None:
        return owner, LEASE_DEFAULT_MS
    try:
        return owner, api.check_lease(lease)
    except api.ApiError as e:
        raise RequestError(str(e)) from None


def check_setting_list(req: dict[str, Any]) -> list[dict[str, Any]]:
    """set_many's settings: a list of objects, each with an integer pid; all validated before
    any is applied."""
    settings = req.get("settings")
    if not isinstance(settings, list):
        raise RequestError("settings must be a list of {pid, " + ", ".join(k + "?" for k in SETTING_KEYS) + "}")
    for i, one in enumerate(settings):
        if not isinstance(one, dict):
            raise RequestError(f"settings[{i}] must be an object")
        extra = sorted(k for k in one if k != "pid" and k not in SETTING_KEYS)
        if extra:
            raise RequestError(f"settings[{i}]: unknown key {extra[0]!r}; expected pid, {', '.join(SETTING_KEYS)}")
        pid = one.get("pid")
        if isinstance(pid, bool) or not isinstance(pid, int):
            raise RequestError(f"settings[{i}]: pid must be an integer, not {pid!r}")
        try:
            check_settings(one)
        except RequestError as e:
            raise RequestError(f"settings[{i}]: {e}") from None
    return settings


def check_grace(req: dict[str, Any]) -> None:
    try:
        api.check_grace(req)
    except api.ApiError as e:
        raise RequestError(str(e)) from None


def _int_or_none(req: dict, key: str) -> int | None:
    v = req.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise RequestError(f"{key} must be an integer")
    return v


def _dispatch(daemon, req: dict[str, Any], admin: bool) -> dict[str, Any]:
    """daemon: anything with device, registry (admission.Registry) and settings
    (settings.GateSettings); the handlers are tested directly on such an object."""
    cmd = req.get("cmd")
    st = daemon.settings
    if not admin and cmd not in READ_COMMANDS and isinstance(cmd, str) and cmd in ALL_COMMANDS:
        raise RequestError(f"permission denied: {cmd} changes the gates of device {daemon.device}; it is served on "
                           f"daemon-{daemon.device}.admin.sock, which is for root")
    if cmd == "ping":
        ex = getattr(daemon, "executor", None)
        return {"device": daemon.device, "pid": os.getpid(), "clients": len(daemon.registry.clients),
                "executor": ex.info() if ex is not None else None}
    if cmd == "list":
        return {"device": daemon.device, "clients": st.list_clients(), "defaults": dict(st.defaults),
                "controller": st.controller_info()}
    if cmd == "set":
        pid, slot = _int_or_none(req, "pid"), _int_or_none(req, "slot")
        if (pid is None) == (slot is None):
            raise RequestError("set needs exactly one of pid or slot")
        check_settings(req)
        owner, lease = check_owner(req)
        c = st.find(pid, slot)
        if lease is not None:
            st.renew(lease)
        return {"client": st.set_client(c, req.get("gate"), req.get("priority"), req.get("max_hold_ms"),
                                        inflight=req.get("inflight"), owner=owner,
                                        max_inflight_ms=req.get("max_inflight_ms"))}
    if cmd == "set_many":
        owner, lease = check_owner({**req, "owner": req.get("owner", "controller")})
        settings = check_setting_list(req)
        if lease is not None:
            st.renew(lease)
        return st.set_many(settings, owner)
    if cmd == "release":
        pid, everyone = _int_or_none(req, "pid"), req.get("all", False)
        if not isinstance(everyone, bool):
            raise RequestError("all must be true or false")
        if (pid is None) == (not everyone):
            raise RequestError("release needs a pid or \"all\": true")
        return {"released": st.release(pid)}
    if cmd == "renew":
        owner, lease = check_owner({**req, "owner": req.get("owner", "controller")})
        if owner != "controller":
            raise RequestError("renew is for owner 'controller'")
        st.renew(lease)
        return {"controller": st.controller_info()}
    if cmd == "defaults":
        check_settings(req)
        check_grace(req)
        apply = req.get("apply", False)
        if not isinstance(apply, bool):
            raise RequestError("apply must be true or false")
        return {"defaults": st.set_defaults(req.get("gate"), req.get("priority"), req.get("max_hold_ms"), apply,
                                            req.get("pending_grace_ms"), req.get("inflight"),
                                            req.get("max_inflight_ms"))}
    raise RequestError(f"unknown cmd {cmd!r}; expected ping, list, set, set_many, release, renew or defaults")



def error_reply(error: str) -> bytes:
    return json.dumps({"schema": SCHEMA, "ok": False, "error": error}).encode()


LIST_FRESH_S = 0.005  # the least time a cached `list` reply is sent again
LIST_BUILD_SHARE = 50  # and it is kept this many times as long as it took to build


class ListCache:
    """The last `list` reply for users other than root and the daemon's own (those get a
    fresh one each time: the controller, the observer, root's CLI), sent again while the
    clients are the same processes and it is younger than LIST_FRESH_S or LIST_BUILD_SHARE
    times what it cost to build (gathering every client's page takes about 0.15 ms per
    client). However fast they ask, building replies for them takes at most about a
    fiftieth of the serving thread, and the admin socket, served between any two read
    requests, rarely waits for a build. The control server clears it after every admin
    request, so a change is seen at once; only counters may be older (0.25 s with 32
    clients)."""

    def __init__(self, fresh_s: float = LIST_FRESH_S, share: float = LIST_BUILD_SHARE):
        self.fresh_s = fresh_s
        self.share = share
        self.key: tuple | None = None
        self.at = 0.0
        self.cost = 0.0
        self.reply = b""

    def clear(self) -> None:
        self.key = None

    def get(self, daemon) -> bytes:
        with daemon.registry.lock:
            key = tuple((slot, c.pid) for slot, c in daemon.registry.clients.items())
        t = time.monotonic()
        if key != self.key or t - self.at > max(self.fresh_s, self.share * self.cost):
            self.reply = json.dumps({"schema": SCHEMA, "ok": True, **_dispatch(daemon, {"cmd": "list"}, False)}).encode()
            self.key, self.at = key, time.monotonic()
            self.cost = self.at - t
        return self.reply


def handle(daemon, raw: bytes, admin: bool = True, cache: ListCache | None = None) -> bytes:
    """One request in, one reply out; never raises. admin: it came on the admin socket.
    cache: where a read socket's `list` may be answered from; a command that may change
    something (on the admin socket) clears it."""
    writes = False
    try:
        if len(raw) > MAX_MESSAGE:
            raise RequestError(f"message of {len(raw)} bytes is over the {MAX_MESSAGE}-byte limit")
        try:
            req = json.loads(raw)
        except (ValueError, RecursionError) as e:  # also: nested too deeply, integers of > 4300 digits
            raise RequestError(f"not JSON: {e}") from None
        if not isinstance(req, dict):
            raise RequestError("a request is a JSON object")
        schema = req.get("schema")
        if isinstance(schema, bool) or not isinstance(schema, int) or schema != SCHEMA:  # true == 1, 1.0 == 1
            raise RequestError(f"schema must be {SCHEMA}")
        cmd = req.get("cmd")
        if cache is not None and not admin and cmd == "list":
            return cache.get(daemon)
        writes = admin and cmd not in READ_COMMANDS
        reply = {"schema": SCHEMA, "ok": True, **_dispatch(daemon, req, admin)}
    except RequestError as e:
        return error_reply(str(e))
    except Exception as e:  # a bug must not take the daemon down; say it and carry on
        return error_reply(f"internal error: {type(e).__name__}: {e}")
    finally:
        if writes and cache is not None:
            cache.clear()  # what it changed shows in the next list
    return json.dumps(reply).encode()
