"""What the controller publishes: its gate settings and the reason for each change.

`flexnpu controller` publishes one JSON message per tick that changed something, and at
least every `REPORT_EVERY_S` otherwise, on zmq PUB at ipc://$RUNTIME_DIR/controller.sock.
`flexnpu top` and logs read it through `ControllerReport.from_json`.

Wire format, schema 1:

    {"schema": 1, "kind": "controller", "seq": int, "time": unix s, "mono_ns": int,
     "pid": int, "policy": str, "tick_ms": float,
     "observer": "ok" | "stale" | "absent",
     "devices": [{"device": int, "daemon": "ok" | "absent", "note": str,
                  "clients": [{"pid": int, "gate": "open"|"closed", "priority": int,
                               "max_hold_ms": float, "inflight": int, "max_inflight_ms": float,
                               "owner": str|null}]}],
     "decisions": [{"time": unix s, "device": int, "pid": int,
                    "setting": {"gate", "priority", "max_hold_ms", "inflight", "max_inflight_ms"},
                    "reason": str}],
     "recent": [the same, up to RECENT_KEPT],
     "decided": int}

"decisions" holds the changes applied since the previous message (the newest last);
"recent" the last RECENT_KEPT decisions, the newest last, so that a subscriber that joins
late (a `flexnpu top` started after the gates were set) still sees why they are as they
are; "decided" how many decisions this controller (this pid) has made since it started, so
"recent" holds those numbered decided - len(recent) + 1 .. decided: a subscriber that counts
decisions (the observer's metrics) counts each once, also those made before it joined or in
a message it lost (absent from older controllers' reports: None); "clients" the settings in
force as the controller last applied or read them. A setting is
flexnpu.forward.api.GateSetting (durations in ms, as on the daemon's API).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from flexnpu import SCHEMA
from flexnpu.forward.api import DEFAULT_MAX_HOLD_MS, GateSetting  # noqa: F401 (the daemon API's own)

REPORT_EVERY_S = 0.5
RECENT_KEPT = 16


class WireError(ValueError):
    """A message that is not a controller report of this schema."""


OPEN = GateSetting()


@dataclass(frozen=True)
class Decision:
    """One change the controller applied, with why."""

    time: float
    device: int
    pid: int
    setting: GateSetting
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"time": self.time, "device": self.device, "pid": self.pid, "setting": self.setting.as_dict(),
                "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        return cls(time=float(d["time"]), device=int(d["device"]), pid=int(d["pid"]),
                   setting=GateSetting.from_dict(d.get("setting") or {}), reason=str(d.get("reason", "")))


@dataclass(frozen=True)
class ClientSetting:
    pid: int
    setting: GateSetting
    owner: str | None  # None: the device defaults; "controller"; "manual"


@dataclass(frozen=True)
class DeviceReport:
    device: int
    daemon: str  # "ok" or "absent"
    note: str  # the policy's summary of the device, e.g. its learned decode step time
    clients: tuple[ClientSetting, ...] = ()


@dataclass(frozen=True)
class ControllerReport:
    seq: int
    time: float
    mono_ns: int
    pid: int
    policy: str
    tick_ms: float
    observer: str  # "ok", "stale" or "absent"
    devices: tuple[DeviceReport, ...]
    decisions: tuple[Decision, ...] = field(default=())
    recent: tuple[Decision, ...] = field(default=())
    decided: int | None = None

    def new_decisions(self, counted: int | None) -> tuple[tuple[Decision, ...], int]:
        """The decisions of this report not yet counted by a subscriber that has counted
        this controller's decisions up to number `counted` (None: none of them yet), and how
        many fell between the two that no report it holds carries any more. Without
        `decided` (an older controller): this report's own decisions."""
        if self.decided is None:
            return self.decisions, 0
        first = self.decided - len(self.recent) + 1
        after = 0 if counted is None or counted > self.decided else counted
        new = tuple(d for i, d in enumerate(self.recent) if first + i > after)
        return new, max(0, first - 1 - after)

    def to_json(self) -> bytes:
        return json.dumps({
            "schema": SCHEMA, "kind": "controller", "seq": self.seq, "time": self.time, "mono_ns": self.mono_ns,
            "pid": self.pid, "policy": self.policy, "tick_ms": self.tick_ms, "observer": self.observer,
            "devices": [{"device": d.device, "daemon": d.daemon, "note": d.note,
                         "clients": [{"pid": c.pid, **c.setting.as_dict(), "owner": c.owner} for c in d.clients]}
                        for d in self.devices],
            "decisions": [x.as_dict() for x in self.decisions],
            "recent": [x.as_dict() for x in self.recent],
            **({} if self.decided is None else {"decided": self.decided}),
        }).encode()

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> ControllerReport:
        try:
            d = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
            if not isinstance(d, dict) or d.get("kind") != "controller":
                raise WireError("not a controller report")
            if isinstance(d.get("schema"), bool) or d.get("schema") != SCHEMA:
                raise WireError(f"controller report schema {d.get('schema')!r}; this FlexNPU reads {SCHEMA}")
            rep = cls(
                seq=int(d["seq"]), time=float(d["time"]), mono_ns=int(d["mono_ns"]), pid=int(d["pid"]),
                policy=str(d["policy"]), tick_ms=float(d["tick_ms"]), observer=str(d["observer"]),
                devices=tuple(DeviceReport(
                    device=int(x["device"]), daemon=str(x["daemon"]), note=str(x.get("note", "")),
                    clients=tuple(ClientSetting(int(c["pid"]), GateSetting.from_dict(c), c.get("owner"))
                                  for c in x.get("clients") or ()))
                    for x in d.get("devices") or ()),
                decisions=tuple(Decision.from_dict(x) for x in d.get("decisions") or ()),
                recent=tuple(Decision.from_dict(x) for x in d.get("recent") or ()),
                decided=_count(d.get("decided")),
            )
            if rep.decided is not None and rep.decided < len(rep.recent):
                raise WireError(f"decided {rep.decided} but {len(rep.recent)} recent decisions")
            return rep
        except WireError:
            raise
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise WireError(f"malformed controller report: {type(e).__name__}: {e}") from None


def _count(v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise WireError(f"decided {v!r}: a count is an integer >= 0")
    return v
