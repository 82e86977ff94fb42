"""Gate settings of a device's clients: owners, the controller's lease, the defaults, and the
record of what the daemon last wrote (so the heartbeat notices a table written behind its
back, which only root can do; docs/security.md).

Every client's settings have an owner: none (the device defaults), the controller, or manual.
A manual setting overrides anything and holds until released. The controller holds a lease;
when it runs out every controller-owned setting reverts to the defaults.
"""

from __future__ import annotations

import logging
import threading

from flexnpu.forward import api
from flexnpu.forward.daemon import protocol
from flexnpu.forward.daemon.admission import Client, Registry
from flexnpu.forward.daemon.gate import GATE_OPEN, SLOT_FREE, GateTable, SummaryThread, now_ns

log = logging.getLogger("flexnpu.daemon")

DRIFT_KEYS = ("gate", "priority", "max_hold_ns", "inflight_max", "owner", "pid", "uid", "role", "mode", "state")


class GateSettings:
    def __init__(self, device: int, table: GateTable, summary: SummaryThread, registry: Registry, defaults: dict):
        self.device = device
        self.table = table
        self.summary = summary
        self.registry = registry
        self.defaults = defaults
        self.lock = threading.RLock()  # settings writes (control API, lease expiry) one at a time
        self.lease_deadline_ns: int | None = None  # CLOCK_MONOTONIC end of the controller's lease
        self.written: dict[int, dict] = {}  # slot -> what the daemon last wrote there
        self.defaults_written: dict = {}
        # slot -> (pid, max_inflight_ms): kept here, the gate table has no field for it
        self.inflight_budget_ms: dict[int, tuple[int, float]] = {}
        self.role_admission = True  # a declared role's settings at admission in forward mode (daemon option)
        self.role_access = None  # who may declare which role ([roles] of the node's flexnpu.toml); None: nobody

    # -- the record the drift check compares against
    def record(self, slot: int) -> None:
        t = self.table.settings(slot)
        self.written[slot] = {k: t[k] for k in DRIFT_KEYS}

    def record_all(self) -> None:
        for i in range(self.table.max_slots):
            self.record(i)
        self.defaults_written = {k: self.table.default(k) for k in
                                 ("default_gate", "default_priority", "default_max_hold_ns", "pending_grace_ns")}

    def drift(self) -> list[str]:
        """What differs in the table from what the daemon wrote: someone with root wrote it.
        The daemon's values are written back, so the gate holds what the daemon decided."""
        out = []
        with self.lock, self.registry.lock:
            for i, mine in self.written.items():
                t = self.table.settings(i)
                now = {k: t[k] for k in DRIFT_KEYS}
                if now != mine:
                    diff = ", ".join(f"{k} {mine[k]} -> {now[k]}" for k in DRIFT_KEYS if now[k] != mine[k])
                    out.append(f"slot {i}: {diff}")
                    self.table.admit(i, mine["pid"], mine["uid"], mine["role"], t["start_time"], mine["state"], mine["mode"])
                    self.table.write_slot(i, mine["gate"], mine["priority"], mine["max_hold_ns"],
                                          mine["inflight_max"], protocol_owner(mine["owner"]))
                    self.record(i)
            d = {k: self.table.default(k) for k in self.defaults_written}
            if self.defaults_written and d != self.defaults_written:
                out.append("defaults: " + ", ".join(f"{k} {self.defaults_written[k]} -> {d[k]}"
                                                    for k in d if d[k] != self.defaults_written[k]))
                w = self.defaults_written
                self.table.set_defaults(w["default_gate"], w["default_priority"], w["default_max_hold_ns"])
                self.table.set_grace(w["pending_grace_ns"])
        if out:
            self.table.wake()
            self.summary.kick()
        return out

    # -- reads
    def find(self, pid: int | None, slot: int | None) -> Client:
        c = self.registry.find(pid, slot)
        if c is None:
            raise protocol.RequestError(
                f"no client with {'pid ' + str(pid) if pid is not None else 'slot ' + str(slot)}")
        return c

    def max_inflight_ms(self, c: Client) -> float:
        """c's in-flight budget in device time: as last set, else the device default."""
        pid, ms = self.inflight_budget_ms.get(c.slot, (None, 0.0))
        return ms if pid == c.pid else float(self.defaults.get("max_inflight_ms", 0.0))

    def client_info(self, c: Client) -> dict:
        """c's record on the wire: durations in ms (api.WIRE_UNIT), with the schema-1
        nanosecond counters kept beside them (protocol.LEGACY_NS_KEYS)."""
        v = self.table.slot(c.slot, c.page).as_dict()
        v["max_hold_ms"] = api.ns_to_ms(v.pop("max_hold_ns"))
        v["inflight"] = v.pop("inflight_max")
        v["max_inflight_ms"] = self.max_inflight_ms(c)
        v["inflight_wait_ms"] = api.ns_to_ms(v.pop("inflight_wait_ns"))
        v["gate_wait_ms"] = api.ns_to_ms(v["gate_wait_ns"])
        v["iter_total_ms"] = api.ns_to_ms(v["iter_ns_total"])
        v["iter_last_ms"] = api.ns_to_ms(v["iter_ns_last"])
        # the iteration open now (work dispatched since its last sync): how long it has run
        start = v.pop("iter_start_ns")
        now = now_ns()
        v["iter_open_ms"] = api.ns_to_ms(now - start) if v["pending"] and 0 < start <= now else 0.0
        v["last_release_lag_ms"] = api.ns_to_ms(v["last_release_lag_ns"])
        v["last_hold_lag_ms"] = api.ns_to_ms(v["last_hold_lag_ns"])
        return v

    def list_clients(self) -> list[dict]:
        with self.registry.lock:
            return [self.client_info(c) for c in self.registry.snapshot()]

    def controller_info(self) -> dict | None:
        deadline = self.lease_deadline_ns
        if deadline is None:
            return None
        return {"lease_left_ms": max(0.0, api.ns_to_ms(deadline - now_ns()))}

    # -- writes
    def _plan_client(self, c: Client, gate: str | None, priority: int | None, max_hold_ms: float | None,
                     inflight: int | None, owner: str | None, current: dict | None = None,
                     max_inflight_ms: float | None = None) -> tuple[dict, tuple]:
        """c's new settings (those not given keep their values, from current if given, else from
        the table): what the request answers, and the write for _apply."""
        info = dict(current) if current is not None else self.client_info(c)
        g = protocol.GATES[gate if gate is not None else info["gate"]]
        p = priority if priority is not None else info["priority"]
        h = api.ms_to_ns(max_hold_ms if max_hold_ms is not None else info["max_hold_ms"])
        n = inflight if inflight is not None else info["inflight"]
        budget = float(max_inflight_ms) if max_inflight_ms is not None else info["max_inflight_ms"]
        log.info("device %d: pid %d gate=%s priority=%d max_hold=%.1fms inflight=%d (%s)", self.device, c.pid,
                 "open" if g == GATE_OPEN else "closed", p, api.ns_to_ms(h), n, owner or "defaults")
        info.update(gate="open" if g == GATE_OPEN else "closed", priority=p, max_hold_ms=api.ns_to_ms(h), inflight=n,
                    max_inflight_ms=budget, owner=owner)
        return info, (c, (c.slot, g, p, h, n, owner), budget)

    def _apply(self, planned: list[tuple]) -> None:
        """Writes the planned settings (at most one per client) and wakes the waiters, in one
        call into C: a client that a gate releases goes without waiting for any more of the
        daemon's Python. Then, if a priority changed, the summary is recomputed (its thread
        wakes the waiters again if the summary changed)."""
        with self.registry.lock:
            live = [(c, w, b) for c, w, b in planned if self.registry.clients.get(c.slot) is c]  # not freed meanwhile
            if not live:
                return
            prio_changed = any(w[2] != self.table.settings(c.slot)["priority"] for c, w, _ in live)
            self.table.apply_slots([w for _, w, _ in live])
            for c, _, b in live:
                self.inflight_budget_ms[c.slot] = (c.pid, b)
                self.record(c.slot)
        if prio_changed:
            self.summary.kick()

    def _write_client(self, c: Client, gate: str | None, priority: int | None, max_hold_ms: float | None,
                      inflight: int | None, owner: str | None, max_inflight_ms: float | None = None) -> dict:
        """Writes c's settings (those not given keep their values) and wakes the waiters."""
        info, write = self._plan_client(c, gate, priority, max_hold_ms, inflight, owner,
                                        max_inflight_ms=max_inflight_ms)
        self._apply([write])
        return info

    def _wake(self) -> None:
        # the summary first (the grace may have changed), then the waiters
        self.summary.kick()
        self.table.wake()

    def _manual_holds(self, c: Client, owner: str) -> bool:
        return owner == "controller" and self.table.slot(c.slot).owner == "manual"

    def set_client(self, c: Client, gate: str | None, priority: int | None, max_hold_ms: float | None,
                   inflight: int | None = None, owner: str | None = "manual",
                   max_inflight_ms: float | None = None) -> dict:
        with self.lock:
            if self._manual_holds(c, owner):
                raise protocol.RequestError(f"pid {c.pid}: {protocol.MANUAL_HOLDS.replace('PID', str(c.pid))}")
            return self._write_client(c, gate, priority, max_hold_ms, inflight, owner, max_inflight_ms)

    def set_many(self, settings: list[dict], owner: str) -> dict:
        """Applies every setting it can, then wakes waiters once for the whole batch."""
        applied: list[int] = []
        skipped: list[dict] = []
        planned: dict[int, tuple[dict, tuple]] = {}  # by slot: a client named twice gets both, in order
        with self.lock:
            for one in settings:
                pid = one["pid"]
                c = self.registry.find(pid)
                if c is None:
                    skipped.append({"pid": pid, "reason": f"no client with pid {pid} on device {self.device}"})
                    continue
                if self._manual_holds(c, owner):
                    skipped.append({"pid": pid, "reason": protocol.MANUAL_HOLDS.replace("PID", str(pid))})
                    continue
                before = planned.get(c.slot)
                planned[c.slot] = self._plan_client(c, one.get("gate"), one.get("priority"), one.get("max_hold_ms"),
                                                    one.get("inflight"), owner, before[0] if before else None,
                                                    one.get("max_inflight_ms"))
                applied.append(pid)
            if planned:
                self._apply([w for _, w in planned.values()])
        return {"applied": applied, "skipped": skipped}

    def _revert(self, owner: str | None) -> list[int]:
        """Puts every client whose settings `owner` holds back to the device defaults, waking
        waiters once. Caller holds the lock."""
        d = self.defaults
        done = []
        planned = []
        for c in self.registry.snapshot():
            if self.table.slot(c.slot).owner == owner:
                planned.append(self._plan_client(c, d["gate"], d["priority"], d["max_hold_ms"], d.get("inflight", 0),
                                                 None, max_inflight_ms=d.get("max_inflight_ms", 0.0))[1])
                done.append(c.pid)
        if planned:
            self._apply(planned)
        return done

    def release(self, pid: int | None) -> list[int]:
        """Drops manual settings (of pid, or of every client) back to the device defaults."""
        with self.lock:
            if pid is None:
                return self._revert("manual")
            c = self.find(pid, None)
            if self.table.slot(c.slot).owner != "manual":
                return []
            d = self.defaults
            self._write_client(c, d["gate"], d["priority"], d["max_hold_ms"], d.get("inflight", 0), None,
                               d.get("max_inflight_ms", 0.0))
            return [pid]

    def renew(self, lease_ms: float) -> None:
        """Extends the controller's lease to lease_ms from now."""
        with self.lock:
            self.lease_deadline_ns = now_ns() + api.ms_to_ns(lease_ms)

    def check_lease(self) -> None:
        """From the heartbeat: a lease that ran out reverts every controller-owned setting."""
        deadline = self.lease_deadline_ns
        if deadline is None or now_ns() < deadline:
            return
        with self.lock:
            if self.lease_deadline_ns is None or now_ns() < self.lease_deadline_ns:
                return  # renewed meanwhile
            late_ms = api.ns_to_ms(now_ns() - self.lease_deadline_ns)
            self.lease_deadline_ns = None
            pids = self._revert("controller")
        log.warning("device %d: the controller's lease ran out (%.0f ms ago); %d controller settings back "
                    "to the defaults%s", self.device, late_ms, len(pids), f" (pids {pids})" if pids else "")

    def write_defaults(self) -> None:
        d = self.defaults
        with self.lock:
            self.table.set_defaults(protocol.GATES[d["gate"]], d["priority"], api.ms_to_ns(d["max_hold_ms"]))
            self.table.set_grace(api.ms_to_ns(d["pending_grace_ms"]))
            self.defaults_written = {k: self.table.default(k) for k in
                                     ("default_gate", "default_priority", "default_max_hold_ns", "pending_grace_ns")}
        self.summary.kick()

    def set_defaults(self, gate: str | None, priority: int | None, max_hold_ms: float | None, apply: bool,
                     pending_grace_ms: float | None = None, inflight: int | None = None,
                     max_inflight_ms: float | None = None) -> dict:
        d = self.defaults
        with self.lock:
            if max_inflight_ms is not None:
                d["max_inflight_ms"] = float(max_inflight_ms)
            if inflight is not None:
                d["inflight"] = inflight
            if pending_grace_ms is not None:
                d["pending_grace_ms"] = pending_grace_ms
            if gate is not None:
                d["gate"] = gate
            if priority is not None:
                d["priority"] = priority
            if max_hold_ms is not None:
                d["max_hold_ms"] = max_hold_ms
            self.write_defaults()
            with self.registry.lock:
                busy = set(self.registry.clients) | set(self.registry.reserved)
                for i in range(self.table.max_slots):
                    if i not in busy and self.table.settings(i)["state"] == SLOT_FREE:
                        self.table.free(i)  # what a new client gets
                        self.record(i)
            if apply:  # to the clients on the defaults: manual and controller settings stay theirs
                planned = [self._plan_client(c, d["gate"], d["priority"], d["max_hold_ms"], d.get("inflight", 0),
                                             None, max_inflight_ms=d.get("max_inflight_ms", 0.0))[1]
                           for c in self.registry.snapshot() if self.table.slot(c.slot).owner is None]
                if planned:
                    self._apply(planned)
            if pending_grace_ms is not None:
                self._wake()
        return dict(d)

    def new_client_defaults(self, role: int = 0, mode: int = 0, uid: int | None = None) -> dict:
        """A new client's settings: the daemon's defaults; in forward mode, a declared role's
        (decode first, prefill one launch in flight), so the executor interleaves a co-located
        pair from its first operation, before a controller has seen it. A controller's or an
        operator's settings replace them as for anyone. A daemon started with
        --no-role-admission gives every client the defaults, and a role the client's user may
        not declare ([roles] in flexnpu.toml, the uid the kernel gave) gets nothing."""
        d = self.defaults
        out = {"gate": protocol.GATES[d["gate"]], "priority": d["priority"],
               "max_hold_ns": api.ms_to_ns(d["max_hold_ms"]), "inflight": d.get("inflight", 0)}
        if not self.role_admission or mode != 1 or role not in (1, 2):
            return out
        if self.role_access is None or ("decode" if role == 2 else "prefill") not in self.role_access.of(uid)[0]:
            return out
        if role == 2:  # enum fx_role: decode
            out.update(priority=api.DECODE_PRIORITY, inflight=0)
        else:  # prefill
            out.update(priority=api.PREFILL_PRIORITY, inflight=api.PREFILL_ADMISSION_INFLIGHT)
        return out


def protocol_owner(owner_id: int) -> str | None:
    from flexnpu.forward.daemon.gate import OWNERS

    return OWNERS.get(owner_id)
