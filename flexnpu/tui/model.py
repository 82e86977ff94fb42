"""The library half of `flexnpu top`: what there is to draw, sampled in one thread.

`Sampler` runs a thread that owns every socket (the observer's SnapshotSubscriber, a zmq SUB
on the controller's socket, one DaemonClient per device, each created in that thread) and
after each tick publishes an immutable `Frame` under a lock. The view reads `frame()`, a
reference swap, so drawing never waits on a socket. Frames can also be built by hand
(`Frame(...)`), which is how the view is tested.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexnpu import SCHEMA, paths
from flexnpu.control.wire import ControllerReport, Decision, WireError
from flexnpu.forward.api import ApiError, ClientView, ms_to_ns, ns_to_ms
from flexnpu.snapshot import NA, NodeSnapshot, Num, SnapshotSubscriber, num

HISTORY = 60  # occupancy samples kept per device (the sparkline)
DECISIONS_KEPT = 32
OBSERVER_STALE_S = 1.0  # the observer publishes every 100 ms
CONTROLLER_STALE_S = 3.0  # the controller reports at least every 0.5 s
DAEMON_TIMEOUT_S = 0.3

@dataclass(frozen=True)
class GateClient:
    """One client of a forwarding daemon, as its `list` reply gives it. Fields the daemon
    does not send (yet) are NA."""

    device: int
    pid: int
    comm: str
    role: str | None
    gate: str
    priority: Num
    max_hold_ms: Num
    gate_wait_ns: Num
    held_ms_per_s: Num  # gate_wait_ns over the last two lists, as ms held per second
    mem_held: Num
    owner: str | None
    inflight: Num  # budget of dispatched-but-unfinished launches; 0 = unlimited
    inflight_now: Num

    @classmethod
    def from_view(cls, device: int, v: ClientView, comm: str = "?", held_ms_per_s: Num = NA) -> GateClient:
        gate_wait_ms = num(v.gate_wait_ms)
        return cls(device=device, pid=v.pid, comm=comm,
                   role=v.role if v.role in ("prefill", "decode") else None,
                   gate=v.gate or "N/A", priority=num(v.priority),
                   max_hold_ms=num(v.max_hold_ms),
                   gate_wait_ns=NA if gate_wait_ms is NA else ms_to_ns(gate_wait_ms),
                   held_ms_per_s=held_ms_per_s, mem_held=num(v.mem_held), owner=v.owner,
                   inflight=num(v.inflight), inflight_now=num(v.inflight_now))

    @classmethod
    def from_dict(cls, device: int, c: dict[str, Any], comm: str = "?",
                  held_ms_per_s: Num = NA) -> GateClient:
        """From a raw `list` record (decoded by the API's ClientView.from_wire)."""
        return cls.from_view(device, ClientView.from_wire(c), comm, held_ms_per_s)


@dataclass(frozen=True)
class DaemonState:
    """One device's forwarding daemon: "ok" with its clients, or "error" saying why."""

    device: int
    state: str  # "ok" or "error"
    error: str = ""
    clients: tuple[GateClient, ...] = ()
    defaults: tuple[tuple[str, Any], ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def client(self, pid: int) -> GateClient | None:
        return next((c for c in self.clients if c.pid == pid), None)


@dataclass(frozen=True)
class Frame:
    """Everything one screen shows, as of `time`. Immutable: the sampler builds a new one
    each tick and the view only reads it."""

    time: float
    node: str
    observer: str  # "ok", "stale", "starting" (socket there, nothing yet) or "absent"
    snapshot: NodeSnapshot | None = None
    controller: str = "absent"  # "ok", "stale", "starting" or "absent"
    report: ControllerReport | None = None
    decisions: tuple[Decision, ...] = ()  # newest first, across reports
    daemons: tuple[DaemonState, ...] = ()
    history: tuple[tuple[int, tuple[tuple[Num, Num, Num], ...]], ...] = ()  # device -> (prefill, decode, idle)
    observer_note: str = ""  # e.g. why a message from the observer was not understood

    def daemon(self, device: int) -> DaemonState | None:
        return next((d for d in self.daemons if d.device == device), None)

    def device_history(self, device: int) -> tuple[tuple[Num, Num, Num], ...]:
        return next((h for d, h in self.history if d == device), ())

    def device_ids(self) -> list[int]:
        ids = set(self.snapshot.device_ids()) if self.snapshot else set()
        ids |= {d.device for d in self.daemons}
        if self.report:
            ids |= {d.device for d in self.report.devices}
        return sorted(ids)

    def policy(self) -> str:
        return self.report.policy if self.report else "none (no controller)"

    def to_json(self) -> dict[str, Any]:
        """What `--json` prints: the inputs this frame was drawn from."""
        return {
            "schema": SCHEMA, "time": self.time, "node": self.node,
            "observer": self.observer,
            "snapshot": self.snapshot.raw if self.snapshot else None,
            "controller": self.controller,
            "controller_report": _report_json(self.report),
            "decisions": [d.as_dict() for d in self.decisions],
            "daemons": [{"device": d.device, "state": d.state, "error": d.error or None,
                         "clients": [{**_client_raw(d, c), "comm": c.comm,
                                      "held_ms_per_s": c.held_ms_per_s if c.held_ms_per_s is not NA else None}
                                     for c in d.clients],
                         "defaults": dict(d.defaults)} for d in self.daemons],
        }


def _report_json(r: ControllerReport | None) -> dict[str, Any] | None:
    import json

    return json.loads(r.to_json()) if r else None


def _client_raw(d: DaemonState, c: GateClient) -> dict[str, Any]:
    for raw in d.raw.get("clients") or ():
        if raw.get("pid") == c.pid:
            return dict(raw)
    return {"pid": c.pid}


def daemon_devices(rdir: Path) -> list[int]:
    """Devices whose daemon socket exists in the runtime dir."""
    return paths.daemon_devices(rdir)


def anything_running(rdir: Path) -> bool:
    """Whether there is anything to show: an observer's or a daemon's socket."""
    return paths.observe_socket(rdir).exists() or bool(daemon_devices(rdir))


def refused_sources(rdir: Path) -> list[Path]:
    """The sockets in the runtime dir this user may not connect to (a unix socket needs write
    permission): zmq would retry such a connect silently forever, so `top` says so instead."""
    socks = [paths.observe_socket(rdir), paths.controller_socket(rdir),
             *(paths.daemon_socket(d, rdir) for d in daemon_devices(rdir))]
    return [s for s in socks if s.exists() and not os.access(s, os.W_OK)]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or "?"
    except OSError:
        return "?"


def take_report(raw: bytes, prev: ControllerReport | None, decisions: deque) -> ControllerReport | None:
    """A controller's report off the wire, its new decisions added to `decisions`; None (and
    nothing added) when raw is no report."""
    try:
        r = ControllerReport.from_json(raw)
    except WireError:
        return None
    # a restarted controller starts its seq again; the same one never repeats a seq
    if prev is None or r.pid != prev.pid or r.seq > prev.seq:
        # the first report seen carries the controller's recent history; later ones, what is new
        seen = set(decisions)
        decisions.extend(d for d in (r.recent or r.decisions) if d not in seen)
    return r


class SamplerThread:
    """The view's side of a sampler: `start()` launches `_run` in a daemon thread; `frame()`
    is the newest frame it published (None before the first); `wait_ready(timeout)` waits
    until the thread says it is ready (for `--once`); `stop()` ends it; `error` is what ended
    it, if anything did. The thread publishes with `_publish`."""

    THREAD_NAME = "flexnpu-top-sampler"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frame: Any = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.THREAD_NAME, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        raise NotImplementedError

    def _publish(self, frame: Any) -> None:
        with self._lock:
            self._frame = frame

    def start(self) -> Any:
        self._thread.start()
        return self

    def frame(self) -> Any:
        with self._lock:
            return self._frame

    def wait_ready(self, timeout: float) -> Any:
        self._ready.wait(timeout)
        return self.frame()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


class Sampler(SamplerThread):
    """Samples the observer, the controller and the daemons in its own thread.

    `start()` launches it; `frame()` is the newest Frame (None before the first tick);
    `wait_ready(timeout)` waits until each source that exists has answered once (for
    `--once`); `stop()` ends the thread, which closes every socket it made.
    """

    def __init__(self, rdir: Path | None = None, interval: float = 0.5) -> None:
        super().__init__()
        self.rdir = Path(rdir or paths.runtime_dir())
        self.interval = interval
        self.node = os.uname().nodename
        # state below is touched by the sampler thread only
        self._history: dict[int, deque] = {}
        self._decisions: deque[Decision] = deque(maxlen=DECISIONS_KEPT)
        self._report: ControllerReport | None = None
        self._report_at = 0.0
        self._snap: NodeSnapshot | None = None
        self._snap_at = 0.0
        self._waits: dict[tuple[int, int], tuple[int, float]] = {}  # (dev, pid) -> (gate_wait_ns, mono s)
        self._lists: dict[int, int] = {}  # device -> lists done

    # -- the sampler thread

    def _run(self) -> None:
        import zmq

        sub = SnapshotSubscriber(self.rdir)
        ctl = zmq.Context.instance().socket(zmq.SUB)
        ctl.setsockopt(zmq.LINGER, 0)
        ctl.setsockopt(zmq.RCVHWM, 64)
        ctl.setsockopt(zmq.SUBSCRIBE, b"")
        ctl.connect(f"ipc://{paths.controller_socket(self.rdir)}")
        clients: dict[int, Any] = {}
        start = time.monotonic()
        try:
            while not self._stop.is_set():
                self._tick(sub, ctl, clients)
                if not self._ready.is_set() and (self._sources_answered() or time.monotonic() - start > 2.0):
                    self._ready.set()
                self._stop.wait(self.interval if self._ready.is_set() else 0.05)
        except BaseException as e:  # noqa: BLE001  the view reports it; the thread must not die silently
            self.error = e
            self._ready.set()
        finally:
            sub.close()
            ctl.close(0)
            for c in clients.values():
                c.close()

    def _sources_answered(self) -> bool:
        if paths.observe_socket(self.rdir).exists() and self._snap is None:
            return False
        if paths.controller_socket(self.rdir).exists() and self._report is None:
            return False
        # two lists each, so the time held at the gate has a rate
        return all(self._lists.get(d, 0) >= 2 for d in daemon_devices(self.rdir))

    def _tick(self, sub: SnapshotSubscriber, ctl: Any, clients: dict[int, Any]) -> None:
        now = time.monotonic()
        for _ in range(64):  # every queued snapshot feeds the history; the newest is shown
            snap = sub.recv(0)
            if snap is None:
                break
            self._snap, self._snap_at = snap, now
            for d in snap.devices:
                self._history.setdefault(d.device, deque(maxlen=HISTORY)).append((d.prefill, d.decode, d.idle))
        for _ in range(64):
            if not ctl.poll(0):
                break
            self._take_report(ctl.recv())
        daemons = self._poll_daemons(clients)
        observer = _state(paths.observe_socket(self.rdir).exists(), self._snap is not None,
                          now - self._snap_at, OBSERVER_STALE_S)
        controller = _state(paths.controller_socket(self.rdir).exists(), self._report is not None,
                            now - self._report_at, CONTROLLER_STALE_S)
        frame = Frame(
            time=time.time(), node=self.node, observer=observer,
            snapshot=self._snap if observer != "absent" else None,
            controller=controller, report=self._report if controller != "absent" else None,
            decisions=tuple(reversed(self._decisions)), daemons=daemons,
            history=tuple((d, tuple(h)) for d, h in sorted(self._history.items())),
            observer_note=sub.last_error or "",
        )
        self._publish(frame)

    def _take_report(self, raw: bytes) -> None:
        r = take_report(raw, self._report, self._decisions)
        if r is not None:
            self._report, self._report_at = r, time.monotonic()

    def _poll_daemons(self, clients: dict[int, Any]) -> tuple[DaemonState, ...]:
        from flexnpu.forward.api import DaemonClient, DaemonError

        devices = daemon_devices(self.rdir)
        for dev in [d for d in clients if d not in devices]:
            clients.pop(dev).close()
            self._lists.pop(dev, None)
        out = []
        for dev in devices:
            c = clients.get(dev) or clients.setdefault(dev, DaemonClient(dev, self.rdir, timeout=DAEMON_TIMEOUT_S))
            try:
                listed = c.list_all()
            except (DaemonError, ApiError, ValueError, OSError) as e:
                out.append(DaemonState(dev, "error", str(e)))
                self._lists[dev] = self._lists.get(dev, 0) + 1
                continue
            now = time.monotonic()
            rows = tuple(GateClient.from_view(dev, v, _comm(v.pid), self._held_rate(dev, v.pid, v.gate_wait_ms, now))
                         for v in listed.clients)
            defaults = dict(listed.defaults.raw) if listed.defaults else {}
            out.append(DaemonState(dev, "ok", "", rows, tuple(sorted(defaults.items())), raw=dict(listed.raw)))
            self._lists[dev] = self._lists.get(dev, 0) + 1
        live = {(c.device, c.pid) for d in out for c in d.clients}
        for k in [k for k in self._waits if k not in live]:
            del self._waits[k]
        return tuple(out)

    def _held_rate(self, dev: int, pid: int, gate_wait_ms: float | None, now: float) -> Num:
        if gate_wait_ms is None:
            return NA
        wait = ms_to_ns(gate_wait_ms)
        prev = self._waits.get((dev, pid))
        self._waits[(dev, pid)] = (int(wait), now)
        if prev is None or now <= prev[1] or wait < prev[0]:
            return NA
        return ns_to_ms(wait - prev[0]) / (now - prev[1])


def _state(sock_exists: bool, have: bool, age_s: float, stale_s: float) -> str:
    if have and age_s <= stale_s:
        return "ok"
    if not sock_exists:
        return "absent"
    return "stale" if have else "starting"
