"""The forwarding daemon's typed client API: the one way any FlexNPU component talks to
`flexnpu daemon --device N` (the controller, `flexnpu top`, the observer's shim source and
`flexnpu gate ...` all use it).

- `GateSetting`: one client's settings (gate, priority, max hold, in-flight budgets).
- `ClientView`: one client as the daemon lists it, decoded once by `decode_list`.
- `DaemonList`: a whole `list` reply (clients, device defaults, the controller's lease).
- `DaemonClient`: typed calls (ping, list, set, set_many, release, renew, defaults).

The wire itself (JSON over zmq REQ/REP, two sockets) is specified in
flexnpu/forward/daemon/protocol.py. Every duration on the wire is a JSON number of
milliseconds and its key ends in `_ms` (WIRE_UNIT); conversions to the gate table's
nanoseconds happen in the daemon, where it writes the table, and nowhere else.

The limits and defaults below are the daemon's; it checks every request with
`check_changes`, the same function a client may call before sending.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from flexnpu import SCHEMA, paths

WIRE_UNIT = "ms"  # every duration on the wire: a JSON number of milliseconds, key "<name>_ms"
NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000

# device defaults: what a new client gets unless the daemon is started or set otherwise.
# FX_DEFAULT_MAX_HOLD_NS and FX_DEFAULT_PENDING_GRACE_NS in native/gate.h mirror the first
# two for a table no daemon has written yet (tests/test_daemon_api.py holds them equal).
DEFAULT_MAX_HOLD_MS = 200.0
DEFAULT_PENDING_GRACE_MS = 1.0
DEFAULT_GATE = "open"
DEFAULT_PRIORITY = 0

# limits the daemon enforces
GATE_STATES = ("open", "closed")
PRIORITY_MAX = 7  # 0..7, higher goes first
MIN_HOLD_MS = 0.01  # 10 us; anything shorter is not a hold a futex wait can honour
MAX_HOLD_LIMIT_MS = 60_000.0
INFLIGHT_LIMIT = 1_000_000  # launches; the table holds a u32
MAX_INFLIGHT_LIMIT_MS = 60_000.0  # in-flight budget in device time
MAX_GRACE_MS = 1000.0
LEASE_MIN_MS, LEASE_MAX_MS, LEASE_DEFAULT_MS = 10.0, 60_000.0, 500.0
# What a declared role gets at admission in forward mode, before any controller speaks (so a
# co-located pair is interleaved from its first operation): flexpd's own settings for a decode
# beside a prefill (flexnpu/control/policies/flexpd.py reads them from here).
DECODE_PRIORITY = 7
PREFILL_PRIORITY = 0
PREFILL_ADMISSION_INFLIGHT = 1

OWNERS = ("manual", "controller")
ROLES = ("auto", "prefill", "decode")
MODES = ("gated", "forward")

READ_COMMANDS = ("ping", "list")  # served on the read socket; everything else is admin
ALL_COMMANDS = ("ping", "list", "set", "set_many", "release", "renew", "defaults")
SETTING_KEYS = ("gate", "priority", "max_hold_ms", "inflight", "max_inflight_ms")


def ms_to_ns(ms: float) -> int:
    return int(round(ms * NS_PER_MS))


def ns_to_ms(ns: int) -> float:
    return ns / NS_PER_MS


class ApiError(ValueError):
    """A setting or a reply that is not what the API allows; the text says which and why."""


class DaemonError(RuntimeError):
    """The daemon refused a request, or did not answer."""


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


def _integer(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int)


def check_changes(d: Mapping[str, Any]) -> None:
    """Raises ApiError unless every setting key present in d holds an allowed value (absent
    and None keys are not checked: they are the values left as they are)."""
    gate, prio, hold = d.get("gate"), d.get("priority"), d.get("max_hold_ms")
    if gate is not None and (not isinstance(gate, str) or gate not in GATE_STATES):  # a list is unhashable
        raise ApiError(f"gate must be 'open' or 'closed', not {gate!r}")
    if prio is not None and (not _integer(prio) or not 0 <= prio <= PRIORITY_MAX):
        raise ApiError(f"priority must be an integer 0..{PRIORITY_MAX}, not {prio!r}")
    # the range test comes first: it rejects NaN and inf, and math.isfinite would raise
    # OverflowError on an integer too large for a float
    if hold is not None and (not _number(hold) or not MIN_HOLD_MS <= hold <= MAX_HOLD_LIMIT_MS
                             or not math.isfinite(hold)):
        raise ApiError(f"max_hold_ms must be a number in [{MIN_HOLD_MS:g}, {MAX_HOLD_LIMIT_MS:g}], not {hold!r}")
    inflight = d.get("inflight")
    if inflight is not None and (not _integer(inflight) or not 0 <= inflight <= INFLIGHT_LIMIT):
        raise ApiError(f"inflight must be an integer 0..{INFLIGHT_LIMIT} (launches; 0: unlimited), "
                       f"not {inflight!r}")
    budget = d.get("max_inflight_ms")
    if budget is not None and (not _number(budget) or not 0 <= budget <= MAX_INFLIGHT_LIMIT_MS
                               or not math.isfinite(budget)):
        raise ApiError(f"max_inflight_ms must be a number in [0, {MAX_INFLIGHT_LIMIT_MS:g}] "
                       f"(device time in flight; 0: none), not {budget!r}")


def check_grace(d: Mapping[str, Any]) -> None:
    g = d.get("pending_grace_ms")
    if g is not None and (not _number(g) or not 0 <= g <= MAX_GRACE_MS or not math.isfinite(g)):
        raise ApiError(f"pending_grace_ms must be a number in [0, {MAX_GRACE_MS:g}], not {g!r}")


def check_lease(lease: Any) -> float:
    if not _number(lease) or not LEASE_MIN_MS <= lease <= LEASE_MAX_MS or not math.isfinite(lease):
        raise ApiError(f"lease_ms must be a number in [{LEASE_MIN_MS:g}, {LEASE_MAX_MS:g}], not {lease!r}")
    return float(lease)


@dataclass(frozen=True)
class GateSetting:
    """One client's settings: the daemon's knobs.

    gate: "open" or "closed"; priority: 0..7, higher goes first; max_hold_ms: the longest one
    call is held at a closed gate or behind a higher priority; inflight: launches it may have
    dispatched and unfinished (0: unlimited); max_inflight_ms: device time it may have in
    flight (0: none). The gated shim enforces the first four; max_inflight_ms is stored and
    listed for the forward mode's executor."""

    gate: str = DEFAULT_GATE
    priority: int = DEFAULT_PRIORITY
    max_hold_ms: float = DEFAULT_MAX_HOLD_MS
    inflight: int = 0
    max_inflight_ms: float = 0.0

    def __post_init__(self) -> None:
        check_changes(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def same(self, other: GateSetting) -> bool:
        """Equal settings, durations compared to the table's nanosecond resolution."""
        return self is other or (self.gate == other.gate and self.priority == other.priority
                                 and self.inflight == other.inflight
                                 and abs(self.max_hold_ms - other.max_hold_ms) < 1e-5
                                 and abs(self.max_inflight_ms - other.max_inflight_ms) < 1e-5)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateSetting:
        """From a wire record; absent keys take the defaults. ApiError for bad values."""
        try:
            return cls(gate=str(d.get("gate") or DEFAULT_GATE), priority=int(d.get("priority") or 0),
                       max_hold_ms=round(float(d.get("max_hold_ms", DEFAULT_MAX_HOLD_MS)), 6),
                       inflight=int(d.get("inflight") or 0),
                       max_inflight_ms=round(float(d.get("max_inflight_ms") or 0.0), 6))
        except (TypeError, ValueError) as e:
            raise ApiError(f"not a gate setting: {e}") from None


def changes(setting: GateSetting | Mapping[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """The setting keys to send: those of `setting` (a GateSetting, or a mapping holding some
    of SETTING_KEYS), overridden by keyword arguments; None values left out. Checked."""
    out: dict[str, Any] = {}
    if isinstance(setting, GateSetting):
        out.update(setting.as_dict())
    elif setting is not None:
        extra = sorted(k for k in setting if k not in SETTING_KEYS)
        if extra:
            raise ApiError(f"unknown setting {extra[0]!r}; expected {', '.join(SETTING_KEYS)}")
        out.update(setting)
    out.update({k: v for k, v in kw.items() if v is not None})
    out = {k: v for k, v in out.items() if v is not None}
    check_changes(out)
    return out


def _opt_int(d: Mapping[str, Any], key: str) -> int | None:
    v = d.get(key)
    return v if _integer(v) else None


def _opt_num(d: Mapping[str, Any], key: str) -> float | None:
    v = d.get(key)
    return v if _number(v) and v == v else None


@dataclass(frozen=True)
class ClientView:
    """One client as the daemon lists it. pid, slot, uid and role are the daemon's, from the
    kernel; mode is how it reaches the device ("gated": its own process calls the runtime
    behind the gate, "forward": the daemon's executor calls it). Counters are the client's
    own (its page). A field the daemon did not send (an older daemon) is None; `raw` is the
    record as it came, for JSON output."""

    pid: int
    slot: int | None
    uid: int | None
    role: str
    mode: str
    owner: str | None  # None: the device defaults; "controller"; "manual"
    gate: str | None
    priority: int | None
    max_hold_ms: float | None
    inflight: int | None
    max_inflight_ms: float | None
    state: int | None = None
    pending: bool | None = None
    waiting: int | None = None
    memset_bytes: int | None = None
    mem_held: int | None = None
    mem_peak: int | None = None
    iterations: int | None = None
    iter_total_ms: float | None = None
    iter_last_ms: float | None = None
    iter_open_ms: float | None = None  # its open iteration's age at the read (0: none)
    gate_waits: int | None = None
    gate_wait_ms: float | None = None
    gate_expired: int | None = None
    last_release_lag_ms: float | None = None
    last_hold_lag_ms: float | None = None
    inflight_now: int | None = None
    inflight_waits: int | None = None
    inflight_wait_ms: float | None = None
    ops: Mapping[str, int] = field(default_factory=dict)
    bytes: Mapping[str, int] = field(default_factory=dict)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def setting(self) -> GateSetting:
        """The settings in force (absent ones: the defaults)."""
        return GateSetting.from_dict(self.raw)

    @classmethod
    def from_wire(cls, d: Any) -> ClientView:
        """One record of a `list` reply (or a `set` reply's client). ApiError if it is not
        an object with an integer pid."""
        if not isinstance(d, Mapping):
            raise ApiError(f"a client record is a JSON object, not {type(d).__name__}")
        pid = d.get("pid")
        if not _integer(pid):
            raise ApiError(f"a client record needs an integer pid, not {pid!r}")
        role, mode, owner, gate = d.get("role"), d.get("mode"), d.get("owner"), d.get("gate")
        ops, nbytes = d.get("ops"), d.get("bytes")
        pending = d.get("pending")

        def ms(key: str, legacy_ns: str | None = None) -> float | None:
            v = _opt_num(d, key)
            if v is None and legacy_ns is not None and _number(d.get(legacy_ns)):
                v = ns_to_ms(d[legacy_ns])  # a daemon that sent only the nanosecond counter
            return v

        return cls(
            pid=pid, slot=_opt_int(d, "slot"), uid=_opt_int(d, "uid"),
            role=role if role in ROLES else "auto", mode=mode if mode in MODES else "gated",
            owner=owner if owner in OWNERS else None, gate=gate if gate in GATE_STATES else None,
            priority=_opt_int(d, "priority"), max_hold_ms=ms("max_hold_ms"), inflight=_opt_int(d, "inflight"),
            max_inflight_ms=ms("max_inflight_ms"), state=_opt_int(d, "state"),
            pending=pending if isinstance(pending, bool) else None, waiting=_opt_int(d, "waiting"),
            memset_bytes=_opt_int(d, "memset_bytes"), mem_held=_opt_int(d, "mem_held"),
            mem_peak=_opt_int(d, "mem_peak"), iterations=_opt_int(d, "iterations"),
            iter_total_ms=ms("iter_total_ms", "iter_ns_total"), iter_last_ms=ms("iter_last_ms", "iter_ns_last"),
            iter_open_ms=ms("iter_open_ms"), gate_waits=_opt_int(d, "gate_waits"),
            gate_wait_ms=ms("gate_wait_ms", "gate_wait_ns"),
            gate_expired=_opt_int(d, "gate_expired"),
            last_release_lag_ms=ms("last_release_lag_ms", "last_release_lag_ns"),
            last_hold_lag_ms=ms("last_hold_lag_ms", "last_hold_lag_ns"),
            inflight_now=_opt_int(d, "inflight_now"), inflight_waits=_opt_int(d, "inflight_waits"),
            inflight_wait_ms=ms("inflight_wait_ms"),
            ops={k: v for k, v in ops.items() if _integer(v)} if isinstance(ops, Mapping) else {},
            bytes={k: v for k, v in nbytes.items() if _integer(v)} if isinstance(nbytes, Mapping) else {},
            raw=d,
        )


@dataclass(frozen=True)
class Defaults:
    """A device's defaults: the settings a client on no owner's settings has."""

    setting: GateSetting
    pending_grace_ms: float  # device-wide: how long a synced client's work still counts as pending
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_wire(cls, d: Any) -> Defaults:
        if not isinstance(d, Mapping):
            raise ApiError("defaults are a JSON object")
        g = d.get("pending_grace_ms", DEFAULT_PENDING_GRACE_MS)
        if not _number(g):
            raise ApiError(f"pending_grace_ms must be a number, not {g!r}")
        return cls(GateSetting.from_dict(d), float(g), raw=d)


@dataclass(frozen=True)
class DaemonList:
    """A `list` reply, decoded."""

    device: int
    clients: tuple[ClientView, ...]
    defaults: Defaults | None
    lease_left_ms: float | None  # the controller's lease; None: no controller holds one
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def client(self, pid: int) -> ClientView | None:
        return next((c for c in self.clients if c.pid == pid), None)


def decode_list(reply: Any, device: int | None = None) -> DaemonList:
    """The one decoder of a `list` reply. Records that are not a client (no integer pid)
    are left out; a reply that is not a list reply raises ApiError."""
    if not isinstance(reply, Mapping) or not isinstance(reply.get("clients", []), list):
        raise ApiError("a list reply is a JSON object whose clients are a list")
    clients = []
    for one in reply.get("clients") or ():
        try:
            clients.append(ClientView.from_wire(one))
        except ApiError:
            continue
    dev = reply.get("device")
    dev = dev if _integer(dev) else device if device is not None else -1
    try:
        defaults = Defaults.from_wire(reply["defaults"]) if isinstance(reply.get("defaults"), Mapping) else None
    except ApiError:
        defaults = None
    ctl = reply.get("controller")
    left = _opt_num(ctl, "lease_left_ms") if isinstance(ctl, Mapping) else None
    return DaemonList(dev, tuple(clients), defaults, left, raw=reply)


@dataclass(frozen=True)
class SetManyResult:
    applied: tuple[int, ...]
    skipped: Mapping[int, str]  # pid -> why the daemon left it as it was


class DaemonClient:
    """Talks to `flexnpu daemon --device N`. ping and list go to the read socket (root and
    the flexnpu group), everything else to the admin socket (root, or the daemon's admin
    group). A socket this process may not use is refused at once with a one-line reason,
    never a timeout. Every call has a timeout; after one, the socket is rebuilt so the
    REQ/REP lockstep starts afresh."""

    def __init__(self, device: int, rdir: Path | None = None, timeout: float = 2.0):
        import zmq

        self.device = device
        self.path = paths.daemon_socket(device, rdir)
        self.admin_path = paths.daemon_admin_socket(device, rdir)
        self.timeout_ms = int(timeout * 1000)
        self._zmq = zmq
        self._ctx = zmq.Context.instance()
        self._socks: dict[bool, Any] = {}

    def _socket(self, admin: bool):
        s = self._socks.get(admin)
        if s is None:
            zmq = self._zmq
            s = self._ctx.socket(zmq.REQ)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
            s.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
            s.connect(f"ipc://{self.admin_path if admin else self.path}")
            self._socks[admin] = s
        return s

    def close(self) -> None:
        for s in self._socks.values():
            s.close(0)
        self._socks.clear()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, cmd: str, **args: Any) -> dict:
        """One request as given; the reply as a dict (DaemonError if refused)."""
        from flexnpu.forward.daemon.access import socket_refusal

        admin = cmd not in READ_COMMANDS
        path = self.admin_path if admin else self.path
        if not self.path.exists():
            raise DaemonError(f"no daemon for device {self.device} at {self.path}; "
                              f"start one with `flexnpu daemon --device {self.device}`")
        refusal = socket_refusal(path, self.device, admin) if path.exists() else None
        if refusal:
            raise DaemonError(refusal)  # zmq would retry the refused connect until the timeout
        s = self._socket(admin)
        try:
            s.send(json.dumps({"schema": SCHEMA, "cmd": cmd, **args}).encode())
            reply = json.loads(s.recv())
        except self._zmq.Again:
            s.close(0)
            self._socks.pop(admin, None)
            raise DaemonError(f"daemon for device {self.device} did not answer within {self.timeout_ms} ms") from None
        if not isinstance(reply, dict) or not reply.get("ok"):
            raise DaemonError(reply.get("error", "unknown error") if isinstance(reply, dict) else "malformed reply")
        return reply

    def ping(self) -> dict:
        """{"device", "pid" (the daemon's), "clients" (how many), "executor" ({"pid", "restarts",
        "socket"} of the device's executor, its pid None while it is down; None without one)}."""
        return self.request("ping")

    def list_all(self) -> DaemonList:
        """The whole `list` reply, decoded."""
        return decode_list(self.request("list"), self.device)

    def list(self) -> list[ClientView]:
        return list(self.list_all().clients)

    def set(self, pid: int | None = None, setting: GateSetting | Mapping[str, Any] | None = None, *,
            slot: int | None = None, gate: str | None = None, priority: int | None = None,
            max_hold_ms: float | None = None, inflight: int | None = None, max_inflight_ms: float | None = None,
            owner: str = "manual", lease_ms: float | None = None) -> ClientView:
        """One client's settings (by pid, or slot): those of `setting` and the keywords given;
        the rest keep their values. Returns the client as now listed. owner "controller"
        renews the controller's lease (lease_ms, default LEASE_DEFAULT_MS) and is refused on
        a manual setting. ApiError for a bad value, before anything is sent."""
        args = changes(setting, gate=gate, priority=priority, max_hold_ms=max_hold_ms, inflight=inflight,
                       max_inflight_ms=max_inflight_ms)
        if (pid is None) == (slot is None):
            raise ApiError("set needs exactly one of pid or slot")
        args.update({k: v for k, v in dict(pid=pid, slot=slot, lease_ms=lease_ms).items() if v is not None})
        return ClientView.from_wire(self.request("set", owner=owner, **args)["client"])

    def set_many(self, settings: Mapping[int, GateSetting | Mapping[str, Any]] | Iterable[Mapping[str, Any]],
                 owner: str = "controller", lease_ms: float = LEASE_DEFAULT_MS) -> SetManyResult:
        """Settings of many clients ({pid: setting}, or records {"pid", setting keys...}),
        applied at once with one wake-up; renews the controller's lease."""
        if isinstance(settings, Mapping):
            records = [{"pid": pid, **changes(s)} for pid, s in settings.items()]
        else:
            records = [{"pid": r.get("pid"), **changes({k: v for k, v in r.items() if k != "pid"})} for r in settings]
        args: dict[str, Any] = {"settings": records, "owner": owner}
        if owner == "controller":
            args["lease_ms"] = lease_ms
        reply = self.request("set_many", **args)
        return SetManyResult(tuple(reply["applied"]),
                             {int(s["pid"]): str(s.get("reason", "")) for s in reply["skipped"]})

    def release(self, pid: int | None = None, all: bool = False) -> list[int]:
        """Drops manual settings (of pid, or every client's with all=True) back to the device
        defaults; returns the pids released."""
        args: dict[str, Any] = {"all": True} if all else {"pid": pid}
        return self.request("release", **args)["released"]

    def renew(self, owner: str = "controller", lease_ms: float = LEASE_DEFAULT_MS) -> float:
        """Renews the controller's lease without changing anything; returns the ms left."""
        return float(self.request("renew", owner=owner, lease_ms=lease_ms)["controller"]["lease_left_ms"])

    def defaults(self, setting: GateSetting | Mapping[str, Any] | None = None, *, gate: str | None = None,
                 priority: int | None = None, max_hold_ms: float | None = None, inflight: int | None = None,
                 max_inflight_ms: float | None = None, pending_grace_ms: float | None = None,
                 apply: bool = False) -> Defaults:
        """Sets the device defaults given (apply: also to the clients on the defaults now)."""
        args = changes(setting, gate=gate, priority=priority, max_hold_ms=max_hold_ms, inflight=inflight,
                       max_inflight_ms=max_inflight_ms)
        if pending_grace_ms is not None:
            check_grace({"pending_grace_ms": pending_grace_ms})
            args["pending_grace_ms"] = pending_grace_ms
        return Defaults.from_wire(self.request("defaults", apply=apply, **args)["defaults"])
