"""`flexnpu controller`: the I/O around a policy.

Each tick (default 5 ms) it takes the newest snapshot from the observer, the client lists of
every device's daemon (read every `list_ms`; devices are the daemon sockets in the runtime
dir, rescanned every `rescan_ms`), asks the policy for the settings it wants, and applies
what differs from what is in force with one `set_many` per device (one wake of the waiters).
The lease that `set_many` carries is renewed at least every `renew_ms`: if the controller
dies, each daemon reverts its settings to the defaults (gates open) when the lease runs out.

Each device's daemon I/O (its list, its set_many or renew) runs on an I/O thread of its own
link, one request at a time; a tick waits at most `tick_ms` for them and goes on without a
daemon that is slow to answer, so a daemon that hangs (stopped, or stuck) holds up nothing
but its own device: the others keep their tick.

Failure behaviour: a daemon that is gone or does not answer is marked absent (its shims fail
open by themselves) and tried again every `rescan_ms`; an observer silent for
`stale_after_ms` makes every policy open every gate; either coming back is picked up without
a restart. `stop()` (SIGTERM/SIGINT) opens every gate it set and shortens its lease to the
minimum, so the daemons hand the clients back to their defaults at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from flexnpu import paths, rundir
from flexnpu.control.config import Config
from flexnpu.control.policies import POLICIES
from flexnpu.control.policies.base import Client, Clients, PolicyOutput
from flexnpu.control.roles import RoleAccess
from flexnpu.control.wire import OPEN, RECENT_KEPT, ClientSetting, ControllerReport, Decision, DeviceReport, GateSetting
from flexnpu.forward.api import ApiError, DaemonClient, DaemonError
from flexnpu.snapshot import NodeSnapshot, SnapshotSubscriber

log = logging.getLogger("flexnpu.controller")

OWNER = "controller"
DAEMON_TIMEOUT_S = 0.25  # a daemon that has not answered by then is marked absent
IO_THREADS = 16  # daemon requests under way at once (one per device at most)
RELEASE_LEASE_MS = 10.0  # the shortest lease a daemon takes: what stop() leaves behind


def same(a: GateSetting, b: GateSetting) -> bool:
    """Equal settings, durations compared to the daemon's ns resolution."""
    return a.same(b)


def diff(wanted: dict[int, GateSetting], clients: tuple[Client, ...]) -> list[tuple[Client, GateSetting]]:
    """The clients whose wanted setting differs from the one in force. Manual settings are a
    person's and are left alone; pids the policy did not mention are left alone."""
    out = []
    for c in clients:
        s = wanted.get(c.pid)
        if s is not None and c.owner != "manual" and not same(s, c.setting):
            out.append((c, s))
    return out


def applied(clients: tuple[Client, ...], done: list[tuple[Client, GateSetting]]) -> tuple[Client, ...]:
    """The clients with the settings just applied in force, owned by the controller."""
    new = {c.pid: s for c, s in done}
    # built field by field: NamedTuple._replace costs several times more, and a static-split
    # flip changes every client of every device in one tick
    return tuple(Client(c.pid, c.device, c.role, OWNER, new[c.pid], c.uid, c.may_declare, c.who) if c.pid in new
                 else c for c in clients)


@dataclass
class DeviceLink:
    """The controller's view of one device's daemon."""

    device: int
    client: DaemonClient
    status: str = "absent"  # "ok" or "absent"
    error: str = "found; not answered yet"
    clients: tuple[Client, ...] = ()
    listed_ns: int = 0
    renewed_ns: int = 0
    retry_ns: int = 0  # when an absent daemon is tried again
    skipped: dict[int, str] = field(default_factory=dict)  # pid -> why the daemon refused our setting
    io: Future | None = None  # the request under way on the I/O pool (one per link at a time)
    lock: threading.Lock = field(default_factory=threading.Lock)  # status, error, clients change together

    def view(self) -> tuple[str, str, tuple[Client, ...]]:
        """status, error and clients as one consistent reading (the I/O thread writes them)."""
        with self.lock:
            return self.status, self.error, self.clients

    def set_clients(self, clients: tuple[Client, ...]) -> None:
        with self.lock:
            self.clients = clients

    @property
    def busy(self) -> bool:
        return self.io is not None and not self.io.done()

    def mark_absent(self, why: str, now_ns: int, retry_ms: float) -> None:
        if self.status != "absent" or why != self.error:
            log.warning("device %d: daemon unavailable (%s); its gates are left to the daemon's defaults "
                        "and the shims' fail-open", self.device, why)
        with self.lock:
            self.status, self.error, self.clients = "absent", why, ()
        self.retry_ns = now_ns + int(retry_ms * 1e6)
        self.client.close()



class Controller:
    """One controller: a subscriber, a daemon link per device, a policy and a report socket.
    Create and run it in one thread (its zmq sockets are that thread's); `stop_flag` may be
    set from any other thread, `request_stop()` from a signal handler. Daemon requests run on
    the I/O pool; a link's status, error and clients change together under its lock."""

    def __init__(self, cfg: Config, rdir: Path | None = None, on_report: Callable[[ControllerReport], Any] | None
                 = None, publish: bool = True, tcp: Any = None) -> None:
        import zmq

        self.cfg = cfg
        self.opts = cfg.controller
        self.rdir = Path(rdir or paths.runtime_dir())
        self.policy = POLICIES[self.opts.policy]
        self.options = cfg.policy_options
        self.access = RoleAccess(cfg.roles)  # who may declare which role, from the uid the daemon lists
        self.state = self.policy.initial_state()
        self.links: dict[int, DeviceLink] = {}
        self.snapshot: NodeSnapshot | None = None
        self.sub = SnapshotSubscriber(self.rdir)
        self.on_report = on_report
        self.seq = 0
        self.pending: list[Decision] = []
        self.pending_lock = threading.Lock()  # decisions come from the links' I/O threads
        self.io = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="daemon-io")
        self.recent: deque[Decision] = deque(maxlen=RECENT_KEPT)
        self.decided = 0  # decisions made since start: the number of the newest in recent
        self.reported_ns = 0
        self.scanned_ns = 0
        self.stop_flag = threading.Event()
        self._stop_requested = False  # set by request_stop(), from a signal handler
        self.pub = None
        self.tcp_pub = None  # flexnpu.remote.curve.CurvePublisher when tcp (a PublishTarget) is given
        if publish:
            self.pub = zmq.Context.instance().socket(zmq.PUB)
            self.pub.setsockopt(zmq.LINGER, 0)
            self.pub.setsockopt(zmq.SNDHWM, 64)
            sock = paths.controller_socket(self.rdir)
            sock.unlink(missing_ok=True)  # a dead controller's file; a live one would not be replaced silently
            rundir.bind_published(self.pub, sock)
            if tcp is not None:
                from flexnpu.remote.curve import CurvePublisher

                self.tcp_pub = CurvePublisher(tcp.endpoint, tcp.secret_key, tcp.authorized,
                                              ctx=zmq.Context.instance(), hwm=64)

    # ------------------------------------------------------------------ devices

    def scan(self, now_ns: int) -> None:
        """Adds a link per daemon socket in the runtime dir; drops links whose socket is gone."""
        self.scanned_ns = now_ns
        found = set(paths.daemon_devices(self.rdir))
        for dev in sorted(found - set(self.links)):
            log.info("device %d: daemon socket found", dev)
            self.links[dev] = DeviceLink(dev, DaemonClient(dev, self.rdir, timeout=DAEMON_TIMEOUT_S))
        for dev in sorted(set(self.links) - found):
            log.warning("device %d: daemon socket gone", dev)
            link = self.links.pop(dev)
            if link.busy:  # its socket belongs to the I/O thread until the request ends
                link.io.add_done_callback(lambda _f, c=link.client: c.close())
            else:
                link.client.close()

    def refresh(self, link: DeviceLink, now_ns: int) -> None:
        """Reads the daemon's client list (settings in force, owners, roles)."""
        try:
            listed = link.client.list_all()
        except (DaemonError, ApiError) as e:
            link.mark_absent(str(e), now_ns, self.opts.rescan_ms)
            return
        if link.status != "ok":
            log.info("device %d: daemon answers; %d clients", link.device, len(listed.clients))
            link.renewed_ns = 0  # a daemon back from a restart gets our lease at once
        clients = tuple(self.vetted(Client.from_view(link.device, v)) for v in listed.clients)
        with link.lock:
            link.status, link.error, link.clients = "ok", "", clients
        link.listed_ns = now_ns
        link.skipped = {}  # the list says who holds a manual setting now; diff() leaves those alone

    def vetted(self, c: Client) -> Client:
        """The client with the roles its user may declare ([roles]), for the policy to check
        its declaration against: the uid is the daemon's, which the kernel gave it."""
        roles, who = self.access.of(c.uid)
        return c._replace(may_declare=roles, who=who)

    # ------------------------------------------------------------------ tick

    def observer_status(self, now_ns: int) -> str:
        if self.snapshot is None:
            return "absent"
        return "stale" if (now_ns - self.snapshot.mono_ns) / 1e6 > self.opts.stale_after_ms else "ok"

    def decide(self, now_ns: int) -> PolicyOutput:
        views = {dev: link.view() for dev, link in self.links.items()}
        clients: Clients = {dev: cs for dev, (status, _, cs) in views.items() if status == "ok"}
        out = self.policy.decide(self.snapshot, clients, self.state, self.options, now_ns,
                                 stale_after_ms=self.opts.stale_after_ms, roles=self.cfg.roles)
        self.state = out.state
        return out

    def changes(self, link: DeviceLink, out: PolicyOutput) -> list[tuple[Client, GateSetting]]:
        """What the policy wants on the link's device that is not in force (and not refused)."""
        return [(c, s) for c, s in diff(out.settings.get(link.device, {}), link.clients) if c.pid not in link.skipped]

    def apply(self, link: DeviceLink, changes: list[tuple[Client, GateSetting]], out: PolicyOutput, now_ns: int,
              wall: float) -> None:
        """Sends the changes (one set_many) or, if there are none, renews the lease."""
        try:
            if changes:
                result = link.client.set_many({c.pid: s for c, s in changes}, owner=OWNER,
                                              lease_ms=self.opts.lease_ms)
                link.renewed_ns = now_ns
                ok = set(result.applied)
                for pid, why in result.skipped.items():
                    link.skipped[pid] = why
                    log.info("device %d: pid %s left as set: %s", link.device, pid, why)
                done = [(c, s) for c, s in changes if c.pid in ok]
                link.set_clients(applied(link.clients, done))
                for c, s in done:
                    reason = out.reasons.get((link.device, c.pid)) or "policy setting"
                    with self.pending_lock:
                        self.pending.append(Decision(wall, link.device, c.pid, s, reason))
                    log.log(logging.DEBUG if reason.startswith("turn: ") else logging.INFO,
                            "device %d pid %d -> %s, priority %d, max hold %g ms, in-flight %d: %s",
                            link.device, c.pid, s.gate, s.priority, s.max_hold_ms, s.inflight, reason)
            else:  # tick() sends nothing else: the lease is due
                link.client.renew(OWNER, self.opts.lease_ms)
                link.renewed_ns = now_ns
        except (DaemonError, ApiError) as e:
            link.mark_absent(str(e), now_ns, self.opts.rescan_ms)

    def tick(self, now_ns: int | None = None) -> ControllerReport | None:
        """One round: snapshot, lists, decide, apply, report. Returns the report if one went out."""
        now_ns = now_ns if now_ns is not None else time.monotonic_ns()
        wall = time.time()
        snap = self.sub.latest()
        if snap is not None:
            self.snapshot = snap
        if now_ns - self.scanned_ns >= self.opts.rescan_ms * 1e6:
            self.scan(now_ns)
        self.run_io([(link, self.refresh, (link, now_ns)) for link in self.links.values()
                     if now_ns - link.listed_ns >= self.opts.list_ms * 1e6
                     and not (link.status == "absent" and now_ns < link.retry_ns)])
        out = self.decide(now_ns)
        renew_ns = self.opts.renew_ms * 1e6
        jobs = []
        for link in self.links.values():
            if link.status != "ok":
                continue
            if link.busy:  # a busy link's clients are its I/O thread's until it ends
                self.note(link, out, set(), wall)
                continue
            changes = self.changes(link, out)
            self.note(link, out, {c.pid for c, _ in changes}, wall)
            if changes or now_ns - link.renewed_ns >= renew_ns:
                jobs.append((link, self.apply, (link, changes, out, now_ns, wall)))
        self.run_io(jobs)
        if self.pending or now_ns - self.reported_ns >= self.opts.report_ms * 1e6:
            return self.report(now_ns, wall)
        return None

    def note(self, link: DeviceLink, out: PolicyOutput, changing: set[int], wall: float) -> None:
        """Publishes what the policy says once of a client whose setting stays (a declared
        role refused, set aside, or believed again), with the setting in force: a change's
        own reason already says it."""
        for (dev, pid), why in out.notes.items():
            if dev != link.device or pid in changing:
                continue
            c = next((c for c in link.view()[2] if c.pid == pid), None)
            if c is None:
                continue
            with self.pending_lock:
                self.pending.append(Decision(wall, dev, pid, c.setting, why))
            log.info("device %d pid %d: %s", dev, pid, why)

    def run_io(self, jobs: list[tuple[DeviceLink, Callable[..., None], tuple]]) -> None:
        """Runs each link's daemon request on the I/O pool (a link whose last request is still
        under way is left out) and waits at most one tick for them; a slow one finishes on its
        own and its link takes part again once it has."""
        started = []
        for link, fn, args in jobs:
            if link.io is not None and link.io.done():
                link.io.result()  # a request that ended after its tick: raise what it raised
                link.io = None
            if link.io is None:
                link.io = self.io.submit(fn, *args)
                started.append(link.io)
        if started:
            wait(started, timeout=self.opts.tick_ms / 1e3)
            for f in started:
                if f.done():
                    f.result()

    def report(self, now_ns: int, wall: float) -> ControllerReport:
        self.seq += 1
        self.reported_ns = now_ns
        views = [(dev, *link.view()) for dev, link in sorted(self.links.items())]
        devices = tuple(
            DeviceReport(dev, status, self.policy.describe(self.state, dev) if status == "ok" else error,
                         tuple(ClientSetting(c.pid, c.setting, c.owner) for c in clients))
            for dev, status, error, clients in views)
        with self.pending_lock:
            pending, self.pending = self.pending, []
        rep = ControllerReport(self.seq, wall, now_ns, os.getpid(), self.opts.policy, self.opts.tick_ms,
                               self.observer_status(now_ns), devices, tuple(pending))
        self.recent.extend(pending)
        self.decided += len(pending)
        rep = replace(rep, recent=tuple(self.recent), decided=self.decided)
        if self.pub is not None:
            data = rep.to_json()
            try:
                self.pub.send(data, flags=self._noblock)
            except Exception as e:  # zmq.Again: a full queue; reports are advisory, the next one comes
                log.debug("report %d not sent: %s", rep.seq, e)
            if self.tcp_pub is not None:
                self.tcp_pub.send(data)
        if self.on_report is not None:
            self.on_report(rep)
        return rep

    @property
    def _noblock(self) -> int:
        import zmq

        return zmq.NOBLOCK

    # ------------------------------------------------------------------ life

    def request_stop(self) -> None:
        """Stops the run loop within a tick; safe in a signal handler. (stop_flag.set() is not:
        Event.set takes a lock that the interrupted thread may hold, inside its own wait.)"""
        self._stop_requested = True

    @property
    def stopping(self) -> bool:
        return self._stop_requested or self.stop_flag.is_set()

    def run(self, ready: Callable[[], Any] | None = None) -> None:
        """Ticks every tick_ms until stop_flag is set or request_stop(), then releases its settings."""
        period = int(self.opts.tick_ms * 1e6)
        next_ns = time.monotonic_ns()
        first = True
        try:
            while not self.stopping:
                self.tick()
                if first and ready is not None:
                    ready()
                    first = False
                next_ns += period
                left = next_ns - time.monotonic_ns()
                if left < 0:  # an overrun (a slow daemon) skips ticks rather than bunching them
                    next_ns = time.monotonic_ns()
                    continue
                self.stop_flag.wait(left / 1e9)
        finally:
            self.release()

    def release(self) -> None:
        """Opens every gate this controller set and shortens its lease, on every device (but one
        whose daemon has not answered its last request within the timeout: its lease reverts
        them)."""
        if busy := [link.io for link in self.links.values() if link.busy]:
            wait(busy, timeout=DAEMON_TIMEOUT_S + 0.1)
        for link in self.links.values():
            if link.busy:
                continue
            mine = [c for c in link.clients if c.owner == OWNER]
            try:
                if mine:
                    link.client.set_many({c.pid: OPEN for c in mine}, owner=OWNER, lease_ms=RELEASE_LEASE_MS)
                else:
                    link.client.renew(OWNER, RELEASE_LEASE_MS)
                log.info("device %d: released %d settings (gates open)", link.device, len(mine))
            except DaemonError as e:
                log.warning("device %d: could not release (%s); the lease reverts them within %g ms",
                            link.device, e, self.opts.lease_ms)

    def close(self) -> None:
        self.io.shutdown(wait=True)
        for link in self.links.values():
            link.client.close()
        self.sub.close()
        if self.tcp_pub is not None:
            self.tcp_pub.close()
            self.tcp_pub = None
        if self.pub is not None:
            self.pub.close(0)
            self.pub = None
            paths.controller_socket(self.rdir).unlink(missing_ok=True)  # as the observer does with its own
