"""The forwarding daemon's control API: JSON over zmq REQ/REP.

Request:  {"schema": 1, "cmd": <name>, ...arguments}
Reply:    {"schema": 1, "ok": true, ...}  or  {"schema": 1, "ok": false, "error": "..."}

Commands
  ping                                   -> device, pid, clients
  list                                   -> clients: [slot view + gate settings], defaults
  set       pid|slot, [gate], [priority], [max_hold_ms]    -> client
  defaults  [gate], [priority], [max_hold_ms], [pending_grace_ms], [apply]  -> defaults
gate is "open" or "closed"; priority 0..7 (higher goes first); max_hold_ms in [0.01, 60000];
pending_grace_ms in [0, 1000] (device-wide: how long a client's work still counts as pending
for priority after its sync, so its next step keeps its turn).
A malformed, unknown, multipart or oversized (> MAX_MESSAGE) request gets an error reply;
a frame over MAX_FRAME gets none (zmq's MAXMSGSIZE drops that peer).
"""

from __future__ import annotations

import json
import os
import math
from typing import Any

from flexnpu import SCHEMA
from flexnpu.forward.gate import GATE_CLOSED, GATE_OPEN

MAX_MESSAGE = 64 * 1024
MAX_FRAME = 1 << 20
GATES = {"open": GATE_OPEN, "closed": GATE_CLOSED}
MAX_HOLD_LIMIT_MS = 60_000.0
MIN_HOLD_MS = 0.01  # 10 us; anything shorter is not a hold a futex wait can honour


class RequestError(ValueError):
    """A request the daemon refuses; its text goes back as the error."""


def ms_to_ns(ms: float) -> int:
    return int(round(ms * 1e6))


def check_settings(req: dict[str, Any]) -> None:
    gate, prio, hold = req.get("gate"), req.get("priority"), req.get("max_hold_ms")
    if gate is not None and (not isinstance(gate, str) or gate not in GATES):  # a list is unhashable
        raise RequestError(f"gate must be 'open' or 'closed', not {gate!r}")
    if prio is not None and (isinstance(prio, bool) or not isinstance(prio, int) or not 0 <= prio <= 7):
        raise RequestError(f"priority must be an integer 0..7, not {prio!r}")
    # the range test comes first: it rejects NaN and inf, and math.isfinite would raise
    # OverflowError on an integer too large for a float
    if hold is not None and (
        isinstance(hold, bool) or not isinstance(hold, (int, float)) or not MIN_HOLD_MS <= hold <= MAX_HOLD_LIMIT_MS
        or not math.isfinite(hold)
    ):
        raise RequestError(f"max_hold_ms must be a number in [{MIN_HOLD_MS:g}, {MAX_HOLD_LIMIT_MS:g}], not {hold!r}")


MAX_GRACE_MS = 1000.0


def check_grace(req: dict[str, Any]) -> None:
    g = req.get("pending_grace_ms")
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= MAX_GRACE_MS
                          or not math.isfinite(g)):
        raise RequestError(f"pending_grace_ms must be a number in [0, {MAX_GRACE_MS:g}], not {g!r}")


def _int_or_none(req: dict, key: str) -> int | None:
    v = req.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise RequestError(f"{key} must be an integer")
    return v


def _dispatch(daemon, req: dict[str, Any]) -> dict[str, Any]:
    cmd = req.get("cmd")
    if cmd == "ping":
        return {"device": daemon.device, "pid": os.getpid(), "clients": len(daemon.clients)}
    if cmd == "list":
        return {"device": daemon.device, "clients": daemon.list_clients(), "defaults": dict(daemon.defaults)}
    if cmd == "set":
        pid, slot = _int_or_none(req, "pid"), _int_or_none(req, "slot")
        if (pid is None) == (slot is None):
            raise RequestError("set needs exactly one of pid or slot")
        check_settings(req)
        c = daemon.find(pid, slot)
        return {"client": daemon.set_client(c, req.get("gate"), req.get("priority"), req.get("max_hold_ms"))}
    if cmd == "defaults":
        check_settings(req)
        check_grace(req)
        apply = req.get("apply", False)
        if not isinstance(apply, bool):
            raise RequestError("apply must be true or false")
        return {"defaults": daemon.set_defaults(req.get("gate"), req.get("priority"), req.get("max_hold_ms"), apply,
                                                req.get("pending_grace_ms"))}
    raise RequestError(f"unknown cmd {cmd!r}; expected ping, list, set or defaults")


def error_reply(error: str) -> bytes:
    return json.dumps({"schema": SCHEMA, "ok": False, "error": error}).encode()


def handle(daemon, raw: bytes) -> bytes:
    """One request in, one reply out; never raises."""
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
        reply = {"schema": SCHEMA, "ok": True, **_dispatch(daemon, req)}
    except RequestError as e:
        return error_reply(str(e))
    except Exception as e:  # a bug must not take the daemon down; say it and carry on
        return error_reply(f"internal error: {type(e).__name__}: {e}")
    return json.dumps(reply).encode()
