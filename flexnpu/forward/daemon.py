"""The forwarding daemon of one physical device (`flexnpu daemon --device N`).

It owns the device's gate segment: creates it, or adopts it after a restart together with
the clients still alive; admits clients that claim slots; notices dead ones through pidfds
and frees their slots and any hold they had on others; keeps a heartbeat the shims use to
fail open when the daemon is gone. A zmq REP socket at ipc://$RUNTIME_DIR/daemon-<dev>.sock
serves the control API (flexnpu/forward/protocol.py). SIGTERM opens every gate and exits.

Every client's settings have an owner (protocol.py): none (the device defaults), the
controller, or manual. The controller holds a lease; the watcher reverts every
controller-owned setting to the defaults within a heartbeat of the lease running out, so a
dead controller leaves every gate open and every budget unlimited.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from flexnpu import paths, systemd
from flexnpu.forward import protocol
from flexnpu.forward.gate import GATE_CLOSED, GATE_OPEN, SLOT_FREE, GateSegment, now_ns

log = logging.getLogger("flexnpu.daemon")

HEARTBEAT_S = 0.1
SCAN_S = 0.05  # claims are seen at once (futex); deaths within this plus the poll


def daemon_socket(device: int, rdir: Path | None = None) -> Path:
    return Path(rdir or paths.runtime_dir()) / f"daemon-{device}.sock"


@dataclass
class Client:
    slot: int
    pid: int
    gen: int
    pidfd: int


class ForwardDaemon:
    """One device's daemon. `serve()` blocks until `stop()` or SIGTERM."""

    def __init__(self, device: int, rdir: Path | None = None, max_hold_ms: float = 200.0,
                 priority: int = 0, gate: str = "open", pending_grace_ms: float = 1.0):
        if device < 0:
            raise ValueError("device must be >= 0")
        protocol.check_settings({"max_hold_ms": max_hold_ms, "priority": priority, "gate": gate})
        protocol.check_grace({"pending_grace_ms": pending_grace_ms})
        self.device = device
        self.rdir = Path(rdir or paths.runtime_dir())
        self.defaults = {"gate": gate, "priority": priority, "max_hold_ms": max_hold_ms,
                         "pending_grace_ms": pending_grace_ms}
        self.clients: dict[int, Client] = {}  # by slot
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.seg: GateSegment | None = None
        self.adopted = 0
        # settings writes (control API thread, lease expiry in the watcher) are one at a time
        self.settings_lock = threading.RLock()
        self.lease_deadline_ns: int | None = None  # CLOCK_MONOTONIC end of the controller's lease

    # -- segment and clients
    def _open_segment(self) -> None:
        self.rdir.mkdir(parents=True, exist_ok=True)
        self.seg = GateSegment(self.device, self.rdir)
        adopt = self.seg.valid()
        if adopt:
            self._refuse_if_served()
        self.seg.init(os.getpid(), adopt)
        d = self.defaults
        self.seg.set_defaults(protocol.GATES[d["gate"]], d["priority"], protocol.ms_to_ns(d["max_hold_ms"]))
        self.seg.set_grace(protocol.ms_to_ns(d["pending_grace_ms"]))
        for i in range(self.seg.max_slots):
            v = self.seg.slot(i)
            if v.state == SLOT_FREE:
                self.seg.free(i)  # its gate back to the defaults
            elif adopt and self._register(i, v.pid, v.gen, adopting=True):
                self.adopted += 1
            else:
                self.seg.free(i)
        log.info("device %d: %s segment in %s, %d live clients adopted",
                 self.device, "adopted the" if adopt else "created a", self.rdir, self.adopted)
        if any(self.seg.slot(c.slot).owner == "controller" for c in self.clients.values()):
            # adopted controller settings: kept while a live controller renews, reverted otherwise
            self.renew(protocol.LEASE_DEFAULT_MS)

    def _refuse_if_served(self) -> None:
        """Two daemons on one device would fight over its gates: refuse while the segment's
        daemon is alive and beating."""
        other = self.seg.default("daemon_pid")
        beat = self.seg.default("heartbeat_ns")
        if other and other != os.getpid() and beat and now_ns() - beat < 1_000_000_000:
            try:
                os.kill(other, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                pass
            self.seg.close()
            raise RuntimeError(f"device {self.device} is already served by the daemon with pid {other} "
                               f"(segment in {self.rdir}); stop it first")

    def _register(self, slot: int, pid: int, gen: int, adopting: bool = False) -> bool:
        try:
            pidfd = os.pidfd_open(pid)
        except (ProcessLookupError, OSError):
            return False
        with self.lock:
            self.clients[slot] = Client(slot, pid, gen, pidfd)
        self.seg.admit(slot, pid, gen)
        log.info("device %d: %s client pid %d in slot %d", self.device, "adopted" if adopting else "admitted", pid, slot)
        return True

    def _reap(self, slot: int) -> None:
        with self.lock:
            c = self.clients.pop(slot, None)
        if c is None:
            return
        os.close(c.pidfd)
        self.seg.free(slot)
        log.info("device %d: client pid %d left; slot %d freed", self.device, c.pid, slot)

    def _scan(self) -> None:
        """Admits new claims and notices re-claims of a slot."""
        for i, (state, pid, gen) in enumerate(self.seg.claims()):
            known = self.clients.get(i)
            # pid 0: a claim in progress (the shim stores its pid after the CAS); registering it
            # would fail and free the slot under the claiming client
            if state == SLOT_FREE or pid == 0:
                continue
            if known and known.pid == pid:
                if known.gen != gen:  # read mid-claim (the shim bumps gen after its pid): same client
                    known.gen = gen
                    self.seg.admit(i, pid, gen)
                continue
            if known:  # claimed again by another process after its owner died unseen
                self._reap(i)
            if not self._register(i, pid, gen):
                self.seg.free(i)  # it died before we saw it

    def _watch(self) -> None:
        """Heartbeat, admissions and deaths, until stopped."""
        poller = select.poll()
        watched: set[int] = set()
        last_beat = 0.0
        while not self._stop.is_set():
            seq = self.seg.claim_seq()
            self._scan()
            with self.lock:
                fds = {c.pidfd: c.slot for c in self.clients.values()}
            for fd in set(fds) - watched:
                poller.register(fd, select.POLLIN)
            for fd in watched - set(fds):
                try:
                    poller.unregister(fd)
                except KeyError:
                    pass
            watched = set(fds)
            for fd, _ in poller.poll(0):
                if fd in fds:
                    poller.unregister(fd)
                    watched.discard(fd)
                    self._reap(fds[fd])
            now = time.monotonic()
            if now - last_beat >= HEARTBEAT_S:
                self.seg.heartbeat(True)
                last_beat = now
            self._check_lease()
            self.seg.wait_claim(seq, int(SCAN_S * 1e9))

    # -- control API handlers (called from the server thread)
    def find(self, pid: int | None, slot: int | None) -> Client:
        with self.lock:
            for c in self.clients.values():
                if (pid is not None and c.pid == pid) or (slot is not None and c.slot == slot):
                    return c
        raise protocol.RequestError(f"no client with {'pid ' + str(pid) if pid is not None else 'slot ' + str(slot)}")

    def client_info(self, c: Client) -> dict:
        v = self.seg.slot(c.slot).as_dict()
        v["max_hold_ms"] = v.pop("max_hold_ns") / 1e6
        v["inflight"] = v.pop("inflight_max")
        v["inflight_wait_ms"] = v.pop("inflight_wait_ns") / 1e6
        return v

    def list_clients(self) -> list[dict]:
        with self.lock:
            cs = sorted(self.clients.values(), key=lambda c: c.slot)
        return [self.client_info(c) for c in cs]

    def _write_client(self, c: Client, gate: str | None, priority: int | None, max_hold_ms: float | None,
                      inflight: int | None, owner: str | None) -> dict:
        """Writes c's settings (those not given keep their values) without waking anyone."""
        info = self.client_info(c)
        g = protocol.GATES[gate if gate is not None else info["gate"]]
        p = priority if priority is not None else info["priority"]
        h = protocol.ms_to_ns(max_hold_ms) if max_hold_ms is not None else int(round(info["max_hold_ms"] * 1e6))
        n = inflight if inflight is not None else info["inflight"]
        log.info("device %d: pid %d gate=%s priority=%d max_hold=%.1fms inflight=%d (%s)", self.device, c.pid,
                 "open" if g == GATE_OPEN else "closed", p, h / 1e6, n, owner or "defaults")
        info.update(gate="open" if g == GATE_OPEN else "closed", priority=p, max_hold_ms=h / 1e6, inflight=n,
                    owner=owner)
        self.seg.write_slot(c.slot, g, p, h, n, owner)
        return info

    def _manual_holds(self, c: Client, owner: str) -> bool:
        return owner == "controller" and self.seg.slot(c.slot).owner == "manual"

    def set_client(self, c: Client, gate: str | None, priority: int | None, max_hold_ms: float | None,
                   inflight: int | None = None, owner: str | None = "manual") -> dict:
        with self.settings_lock:
            if self._manual_holds(c, owner):
                raise protocol.RequestError(f"pid {c.pid}: {protocol.MANUAL_HOLDS.replace('PID', str(c.pid))}")
            info = self._write_client(c, gate, priority, max_hold_ms, inflight, owner)
            # the wake comes last: a client it releases then competes with less of this request's work
            self.seg.wake()
        return info

    def set_many(self, settings: list[dict], owner: str) -> dict:
        """Applies every setting it can, then wakes waiters once for the whole batch."""
        applied: list[int] = []
        skipped: list[dict] = []
        with self.settings_lock:
            for one in settings:
                pid = one["pid"]
                try:
                    c = self.find(pid, None)
                except protocol.RequestError:
                    skipped.append({"pid": pid, "reason": f"no client with pid {pid} on device {self.device}"})
                    continue
                if self._manual_holds(c, owner):
                    skipped.append({"pid": pid, "reason": protocol.MANUAL_HOLDS.replace("PID", str(pid))})
                    continue
                self._write_client(c, one.get("gate"), one.get("priority"), one.get("max_hold_ms"),
                                   one.get("inflight"), owner)
                applied.append(pid)
            if applied:
                self.seg.wake()
        return {"applied": applied, "skipped": skipped}

    def _revert(self, owner: str | None) -> list[int]:
        """Puts every client whose settings `owner` holds (None: any) back to the device
        defaults, waking waiters once. Caller holds settings_lock."""
        d = self.defaults
        with self.lock:
            cs = sorted(self.clients.values(), key=lambda c: c.slot)
        done = []
        for c in cs:
            if self.seg.slot(c.slot).owner == owner:
                self._write_client(c, d["gate"], d["priority"], d["max_hold_ms"], 0, None)
                done.append(c.pid)
        if done:
            self.seg.wake()
        return done

    def release(self, pid: int | None) -> list[int]:
        """Drops manual settings (of pid, or of every client) back to the device defaults."""
        with self.settings_lock:
            if pid is None:
                return self._revert("manual")
            c = self.find(pid, None)
            if self.seg.slot(c.slot).owner != "manual":
                return []
            d = self.defaults
            self._write_client(c, d["gate"], d["priority"], d["max_hold_ms"], 0, None)
            self.seg.wake()
            return [pid]

    def renew(self, lease_ms: float) -> None:
        """Extends the controller's lease to lease_ms from now."""
        with self.settings_lock:
            self.lease_deadline_ns = now_ns() + protocol.ms_to_ns(lease_ms)

    def controller_info(self) -> dict | None:
        deadline = self.lease_deadline_ns
        if deadline is None:
            return None
        return {"lease_left_ms": max(0.0, (deadline - now_ns()) / 1e6)}

    def _check_lease(self) -> None:
        """In the watcher: a lease that ran out reverts every controller-owned setting."""
        deadline = self.lease_deadline_ns
        if deadline is None or now_ns() < deadline:
            return
        with self.settings_lock:
            if self.lease_deadline_ns is None or now_ns() < self.lease_deadline_ns:
                return  # renewed meanwhile
            late_ms = (now_ns() - self.lease_deadline_ns) / 1e6
            self.lease_deadline_ns = None
            pids = self._revert("controller")
        log.warning("device %d: the controller's lease ran out (%.0f ms ago); %d controller settings back "
                    "to the defaults%s", self.device, late_ms, len(pids), f" (pids {pids})" if pids else "")

    def set_defaults(self, gate: str | None, priority: int | None, max_hold_ms: float | None, apply: bool,
                     pending_grace_ms: float | None = None) -> dict:
        d = self.defaults
        if pending_grace_ms is not None:
            d["pending_grace_ms"] = pending_grace_ms
            self.seg.set_grace(protocol.ms_to_ns(pending_grace_ms))
        if gate is not None:
            d["gate"] = gate
        if priority is not None:
            d["priority"] = priority
        if max_hold_ms is not None:
            d["max_hold_ms"] = max_hold_ms
        self.seg.set_defaults(protocol.GATES[d["gate"]], d["priority"], protocol.ms_to_ns(d["max_hold_ms"]))
        for i, (state, _, _) in enumerate(self.seg.claims()):
            if state == SLOT_FREE:
                self.seg.free(i)
        if apply:  # to the clients on the defaults: manual and controller settings stay theirs
            with self.settings_lock:
                with self.lock:
                    cs = list(self.clients.values())
                touched = [self._write_client(c, d["gate"], d["priority"], d["max_hold_ms"], None, None)
                           for c in cs if self.seg.slot(c.slot).owner is None]
                if touched:
                    self.seg.wake()
        return dict(d)

    # -- process
    def serve(self, ready: threading.Event | None = None) -> None:
        self._open_segment()
        ctx = zmq.Context()
        sock = ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME)  # beyond this zmq drops the peer
        path = daemon_socket(self.device, self.rdir)
        path.unlink(missing_ok=True)
        old = os.umask(0o117)  # socket file mode 0660
        try:
            sock.bind(f"ipc://{path}")
        finally:
            os.umask(old)
        watcher = threading.Thread(target=self._watch, name=f"gate-watch-{self.device}", daemon=True)
        watcher.start()
        log.info("device %d: serving the control API at ipc://%s", self.device, path)
        systemd.notify("READY=1", f"STATUS=forwarding device {self.device}")
        if ready:
            ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                try:
                    # every frame, so the REP socket is ready to send: a reply after reading only the
                    # first frame of a multipart request fails (EFSM) and took the daemon down
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                except zmq.ZMQError as e:  # e.g. a message over MAXMSGSIZE dropped the peer
                    log.warning("device %d: receive failed: %s", self.device, e)
                    continue
                sock.send(protocol.handle(self, frames[0]) if len(frames) == 1 else protocol.error_reply(
                    f"a request is one message frame, not {len(frames)}"))
        finally:
            systemd.notify("STOPPING=1")
            self._stop.set()
            watcher.join(timeout=2)
            self.seg.open_all()  # nobody stays held by a daemon that is gone
            self.seg.heartbeat(False)
            sock.close(0)
            ctx.term()
            path.unlink(missing_ok=True)
            with self.lock:
                for c in self.clients.values():
                    os.close(c.pidfd)
                self.clients.clear()
            self.seg.close()
            log.info("device %d: stopped; gates left open", self.device)

    def stop(self) -> None:
        self._stop.set()


def run(device: int, rdir: Path | None = None, **defaults) -> None:
    """Runs a daemon in this process until SIGTERM or SIGINT."""
    d = ForwardDaemon(device, rdir, **defaults)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: d.stop())
    d.serve()
