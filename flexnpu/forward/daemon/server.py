"""The forwarding daemon of one physical device (`flexnpu daemon --device N`).

It owns the device's gate (flexnpu/forward/native/gate.h) and is cut along its seams:
- admission.py: the admission socket gate-<dev>.sock and the registry of live clients
  (identity from the kernel; a page per client; reaping through pidfds and hang-ups);
- gate.py: the table gate-<dev>.ctl, the client pages, the C thread that keeps the priority
  summary;
- settings.py: owners, the controller's lease, the defaults, the drift record;
- control.py + protocol.py: the control API, a read socket and an admin socket;
- here: start-up (creating or adopting the table), the heartbeat, shutdown.

Who may do what is in access.py and docs/security.md. SIGTERM opens every gate and exits.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from flexnpu import paths, rundir, systemd
from flexnpu.forward import api
from flexnpu.forward.daemon import access, protocol
from flexnpu.forward.daemon.admission import PER_UID_CAP, RESERVE_S, Admission, Registry, Reserved
from flexnpu.forward.daemon.control import FD_HEADROOM, ControlServer, raise_fd_limit
from flexnpu.forward.daemon.executor import ExecutorSupervisor
from flexnpu.forward.daemon.gate import SLOT_ADMITTED, SLOT_FREE, SLOT_RESERVED, GateTable, SummaryThread, now_ns
from flexnpu.forward.daemon.settings import GateSettings

log = logging.getLogger("flexnpu.daemon")

HEARTBEAT_S = 0.1
DRIFT_EVERY = 5  # heartbeats between checks of the table against what the daemon wrote
# below this, the control sockets' caps (control.total_cap) and FD_HEADROOM no longer fit
MIN_FD_LIMIT = 2 * FD_HEADROOM
SWITCH_INTERVAL_S = 0.0005


class ForwardDaemon:
    """One device's daemon. `open()` makes the table and the admission socket; `serve()`
    blocks until `stop()` or SIGTERM."""

    def __init__(self, device: int, rdir: Path | None = None, max_hold_ms: float = api.DEFAULT_MAX_HOLD_MS,
                 priority: int = api.DEFAULT_PRIORITY, gate: str = api.DEFAULT_GATE,
                 pending_grace_ms: float = api.DEFAULT_PENDING_GRACE_MS,
                 admin_group: str | None = None, client_group: str = paths.CLIENT_GROUP,
                 per_uid_cap: int = PER_UID_CAP, forward: bool = True, role_admission: bool = True):
        if device < 0:
            raise ValueError("device must be >= 0")
        if per_uid_cap < 1:
            raise ValueError("max clients per user must be >= 1")
        protocol.check_settings({"max_hold_ms": max_hold_ms, "priority": priority, "gate": gate})
        protocol.check_grace({"pending_grace_ms": pending_grace_ms})
        self.device = device
        self.rdir = Path(rdir or paths.runtime_dir())
        self.defaults = {"gate": gate, "priority": priority, "max_hold_ms": max_hold_ms,
                         "pending_grace_ms": pending_grace_ms, "inflight": 0,
                         "max_inflight_ms": 0.0}
        self.policy = access.AccessPolicy(client_group, admin_group)
        self.per_uid_cap = per_uid_cap
        self._stop = threading.Event()
        self.table: GateTable | None = None
        self.summary: SummaryThread | None = None
        self.registry: Registry | None = None
        self.settings: GateSettings | None = None
        self.admission: Admission | None = None
        self.adopted = 0
        self.forward = forward
        self.role_admission = role_admission
        self.executor: ExecutorSupervisor | None = None

    # -- start-up
    def open(self) -> None:
        """Creates the table (or adopts a previous daemon's), starts the summary thread and
        listens for clients. Clients are admitted once start_admission() runs."""
        self._prepare_rdir()
        self.table = GateTable(self.device, self.rdir, gid=self.policy.client_gid)
        adopt = self.table.valid()
        if adopt:
            self._refuse_if_served()
        kept = self._adoptable() if adopt else {}
        self.table.init(os.getpid(), adopt)
        self.summary = SummaryThread(self.table)
        self.registry = Registry(self.device, self.table, self.summary)
        self.settings = GateSettings(self.device, self.table, self.summary, self.registry, self.defaults)
        self.settings.role_admission = self.role_admission
        self.settings.role_access = self._role_access()
        self.settings.write_defaults()
        until = time.monotonic() + RESERVE_S
        for i in range(self.table.max_slots):
            if i in kept:
                pid, start = kept[i]
                t = self.table.settings(i)
                self.table.admit(i, pid, t["uid"], t["role"], start, SLOT_RESERVED, t["mode"])
                self.registry.reserved[i] = Reserved(i, pid, start, until)
            else:
                self.table.free(i)
        self.adopted = len(kept)
        self.settings.record_all()
        self.registry.on_write = self.settings.record
        log.info("device %d: %s gate table %s; %d live clients kept for their reconnect; clients: %s",
                 self.device, "adopted the" if adopt else "created a", self.table.path, self.adopted,
                 self.policy.who_may_run())
        if any(self.table.slot(i).owner == "controller" for i in kept):
            # adopted controller settings: kept while a live controller renews, reverted otherwise
            self.settings.renew(protocol.LEASE_DEFAULT_MS)
        self.admission = Admission(self.device, self.rdir, self.registry, self.policy,
                                   self.settings.new_client_defaults, self.per_uid_cap)
        self.registry.on_change = self.admission.changed
        self.admission.listen()

    def _role_access(self):
        """Who may declare which role, from the node's flexnpu.toml ([roles]); with no file,
        anyone (as the controller reads it). A file the daemon cannot read gives no role
        settings at admission (the controller, which refuses such a file, decides then)."""
        from flexnpu.control import config, roles

        try:
            return roles.RoleAccess(config.load(paths.config_file(), required=False).roles)
        except config.ConfigError as e:
            log.warning("device %d: %s; declared roles get no settings at admission", self.device, e)
            return None

    def _prepare_rdir(self) -> None:
        """Refuses a runtime dir someone else could write in (flexnpu.rundir): they could replace
        the daemon's sockets, or plant a link where it creates its table."""
        rundir.check(self.rdir, create=True)

    def _adoptable(self) -> dict[int, tuple[int, int]]:
        """Slots of the previous daemon whose process still runs (same pid and start time)."""
        out = {}
        for i in range(self.table.max_slots):
            t = self.table.settings(i)
            if t["state"] in (SLOT_ADMITTED, SLOT_RESERVED) and t["pid"] > 0:
                if access.start_time_of(t["pid"]) == t["start_time"]:
                    out[i] = (t["pid"], t["start_time"])
        return out

    def _refuse_if_served(self) -> None:
        """Two daemons on one device would fight over its gates: refuse while the table's
        daemon is alive and beating."""
        other = self.table.default("daemon_pid")
        beat = self.table.default("heartbeat_ns")
        if other and other != os.getpid() and beat and now_ns() - beat < 1_000_000_000:
            try:
                os.kill(other, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            self.table.close()
            raise RuntimeError(f"device {self.device} is already served by the daemon with pid {other} "
                               f"(gate table in {self.rdir}); stop it first")

    # -- the heartbeat
    def beat(self, n: int) -> None:
        """One heartbeat: the table's stamp, the controller's lease, expired reservations, and
        every DRIFT_EVERY beats the table against what the daemon wrote."""
        self.table.heartbeat(True)
        self.settings.check_lease()
        self.registry.expire_reserved(time.monotonic())
        if n % DRIFT_EVERY == 0:
            for line in self.settings.drift():
                log.warning("device %d: the gate table was written behind the daemon's back (only root can): "
                            "%s; the daemon's values are back", self.device, line)

    def _heartbeat(self) -> None:
        n = 0
        while not self._stop.wait(HEARTBEAT_S):
            n += 1
            try:
                self.beat(n)
            except Exception:  # the heartbeat must go on
                log.exception("device %d: heartbeat failed", self.device)

    # -- process
    def serve(self, ready: threading.Event | None = None) -> None:
        fd_limit = raise_fd_limit()
        if fd_limit < MIN_FD_LIMIT:
            log.warning("device %d: %d file descriptors at most (the hard limit): a flood of connections may reach "
                        "it before they are cut, and libzmq aborts there; allow %d or more (LimitNOFILE=)",
                        self.device, fd_limit, MIN_FD_LIMIT)
        self.open()
        control = ControlServer(self, self.rdir, self.policy, fd_limit=fd_limit)
        control.bind()
        if self.forward and ExecutorSupervisor.available():
            # the socket now; the executor itself at the first client admitted in forward mode
            self.executor = ExecutorSupervisor(self.device, self.rdir, self.policy,
                                               verbose=log.isEnabledFor(logging.DEBUG))
            try:
                self.executor.start()
                self.registry.on_forward = self.executor.wanted
            except OSError as e:  # gated clients are served all the same
                log.error("device %d: no forwarded execution: %s", self.device, e)
                self.executor.stop()
                self.executor = None
        self.admission.start()
        beat = threading.Thread(target=self._heartbeat, name=f"gate-beat-{self.device}", daemon=True)
        beat.start()
        systemd.notify("READY=1", f"STATUS=forwarding device {self.device}")
        if ready:
            ready.set()
        try:
            control.serve(self._stop)
        finally:
            systemd.notify("STOPPING=1")
            self._stop.set()
            beat.join(timeout=2)
            self.close(control)
            log.info("device %d: stopped; gates left open", self.device)

    def close(self, control: ControlServer | None = None) -> None:
        if self.admission is not None:
            self.admission.stop()
        if self.executor is not None:
            self.executor.stop()
        self.table.open_all()  # nobody stays held by a daemon that is gone
        self.table.heartbeat(False)
        if control is not None:
            control.close()
        self.registry.close_all()  # their connections hang up: shims fail open at once
        self.summary.stop()  # after the registry: it no longer reads any page
        self.table.open_all()  # the summary thread may have counted someone meanwhile
        self.table.close()

    def stop(self) -> None:
        self._stop.set()


def run(device: int, rdir: Path | None = None, **options) -> None:
    """Runs a daemon in this process until SIGTERM or SIGINT."""
    d = ForwardDaemon(device, rdir, **options)
    # A thread that holds the GIL between short system calls (the connection guard under a
    # flood of connections) keeps it from a waiting one for up to the switch interval
    # (5 ms by default): the control server's next admin request would wait as long.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: d.stop())
    d.serve()
