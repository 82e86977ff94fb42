"""The library half of `flexnpu top --nodes`: several nodes' observers (and controllers),
subscribed over TCP with CURVE, sampled in one thread.

`--nodes n1=HOST:PORT[/CTRLPORT],...` names each node, its observer's endpoint and,
optionally, its controller's port on the same host. `NodesSampler` owns one CurveSubscriber
per endpoint (made in its thread) and after each tick publishes an immutable `NodesFrame`:
one `NodeView` per node holding a `Frame` (the same type the one-node screen draws) and why
the node shows nothing when it does not (nothing answers, our key is refused, the server is
not the one we trust, it stopped publishing). A node's gate settings come from its
controller's reports (the daemons' own sockets are IPC only), so a remote client's GATE
column is what the controller last applied.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexnpu import SCHEMA, paths
from flexnpu.control.wire import ControllerReport
from flexnpu.remote import curve, keys
from flexnpu.snapshot import NA, NodeSnapshot, SnapshotError
from flexnpu.tui.model import (CONTROLLER_STALE_S, DECISIONS_KEPT, HISTORY, OBSERVER_STALE_S, DaemonState, Frame,
                               GateClient, SamplerThread, _report_json, take_report)

READY_WAIT_S = 3.0  # --once waits this long at most for every node to answer or fail


@dataclass(frozen=True)
class NodeSpec:
    """One node of --nodes: its name and where its observer (and controller) publish."""

    name: str
    endpoint: curve.Endpoint
    controller: curve.Endpoint | None = None


def parse_nodes(text: str) -> list[NodeSpec]:
    """`n1=HOST:PORT[/CTRLPORT],n2=...`; ValueError in one line naming the bad entry."""
    out: list[NodeSpec] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, sep, where = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r}: write each node as NAME=HOST:PORT[/CONTROLLER_PORT]")
        try:
            keys.check_name(name, "node name")
        except keys.KeysError as e:
            raise ValueError(str(e)) from None
        obs, slash, ctl_port = where.partition("/")
        ep = curve.parse_endpoint(obs)
        ctl = None
        if slash:
            if not ctl_port.isdigit() or not 1 <= int(ctl_port) <= 65535:
                raise ValueError(f"{item!r}: the controller's port after '/' must be a number from 1 to 65535")
            ctl = curve.Endpoint(ep.host, int(ctl_port))
        if any(n.name == name for n in out):
            raise ValueError(f"node {name!r} is named twice")
        out.append(NodeSpec(name, ep, ctl))
    if not out:
        raise ValueError("no node given; e.g. --nodes n1=10.0.0.1:7781/7782,n2=10.0.0.2:7781")
    return out


def server_key_for(node: str, server_key: str | None, kdir: Path | None = None) -> bytes:
    """The public key node must hold: --server-key (a file or the key) for every node, else
    <keys dir>/servers/NODE.key. KeysError saying how to get it."""
    if server_key:
        return keys.public_key_arg(server_key)
    p = keys.server_key_path(kdir or paths.keys_dir(), node)
    if not p.exists():
        raise keys.KeysError(f"no server key for node {node}: {p} does not exist; get the node's public key "
                             f"(`flexnpu keys show` there) and run `flexnpu keys trust {node} KEY`, or give "
                             f"--server-key")
    return keys.read_public(p).public


@dataclass(frozen=True)
class NodeView:
    """One node as the screen shows it."""

    spec: NodeSpec
    server_key: str
    up: bool  # snapshots arrive
    error: str  # why not, when not up ("" when up)
    frame: Frame

    @property
    def name(self) -> str:
        return self.spec.name

    def to_json(self) -> dict[str, Any]:
        f = self.frame
        raw = f.snapshot.raw if f.snapshot else {}
        return {"name": self.name, "endpoint": str(self.spec.endpoint),
                "controller_endpoint": str(self.spec.controller) if self.spec.controller else None,
                "server_key": self.server_key, "up": self.up, "error": self.error or None,
                "observer": f.observer, "controller": f.controller,
                "source": raw.get("source"), "devices": raw.get("devices", []),
                "processes": raw.get("processes", []),
                "controller_report": _report_json(f.report), "decisions": [d.as_dict() for d in f.decisions]}


@dataclass(frozen=True)
class NodesFrame:
    time: float
    nodes: tuple[NodeView, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "time": self.time, "nodes": [n.to_json() for n in self.nodes]}


def daemons_from_report(r: ControllerReport | None) -> tuple[DaemonState, ...]:
    """Each device's clients as the controller last applied their settings."""
    if r is None:
        return ()
    out = []
    for d in r.devices:
        clients = tuple(GateClient(device=d.device, pid=c.pid, comm="?", role=None, gate=c.setting.gate,
                                   priority=c.setting.priority, max_hold_ms=c.setting.max_hold_ms, gate_wait_ns=NA,
                                   held_ms_per_s=NA, mem_held=NA, owner=c.owner, inflight=c.setting.inflight,
                                   inflight_now=NA) for c in d.clients)
        out.append(DaemonState(d.device, "ok" if d.daemon == "ok" else "error",
                               "" if d.daemon == "ok" else f"the controller sees no daemon ({d.note})", clients))
    return tuple(out)


@dataclass
class _Node:
    """The sampler thread's state for one node."""

    spec: NodeSpec
    server_key: bytes
    obs: curve.CurveSubscriber | None = None
    ctl: curve.CurveSubscriber | None = None
    snap: NodeSnapshot | None = None
    snap_at: float = 0.0
    report: ControllerReport | None = None
    report_at: float = 0.0
    note: str = ""
    history: dict[int, deque] = field(default_factory=dict)
    decisions: deque = field(default_factory=lambda: deque(maxlen=DECISIONS_KEPT))

    def take_report(self, raw: bytes) -> None:
        r = take_report(raw, self.report, self.decisions)
        if r is not None:
            self.report, self.report_at = r, time.monotonic()

    def settled(self) -> bool:
        """Whether --once may print this node: it answered, or why it will not is known."""
        failed = self.obs is not None and self.obs.state in (curve.LINK_DOWN, curve.LINK_UNAUTHORIZED,
                                                             curve.LINK_BAD_SERVER)
        if failed:
            return True
        if self.snap is None:
            return False
        return self.ctl is None or self.report is not None or self.ctl.state != curve.LINK_UP


def _link_state(sub: curve.CurveSubscriber | None, have: bool, age_s: float, stale_s: float) -> str:
    if sub is None:
        return "none"  # not asked for (a node given without its controller's port)
    if have and age_s <= stale_s:
        return "ok"
    if have:
        return "stale"
    return "starting" if sub.state in (curve.LINK_UP, curve.LINK_CONNECTING) else sub.state


class NodesSampler(SamplerThread):
    """Samples every node's publishers in its own thread; the same face as model.Sampler
    (SamplerThread: start, frame, wait_ready, stop, error), so one live loop draws either."""

    THREAD_NAME = "flexnpu-top-nodes"

    def __init__(self, specs: list[NodeSpec], client: keys.KeyPair, server_keys: dict[str, bytes],
                 interval: float = 0.5) -> None:
        super().__init__()
        self.specs = specs
        self.client = client
        self.server_keys = server_keys
        self.interval = interval

    def _run(self) -> None:
        import zmq

        ctx = zmq.Context.instance()
        nodes = [_Node(s, self.server_keys[s.name]) for s in self.specs]
        start = time.monotonic()
        try:
            for n in nodes:
                n.obs = curve.CurveSubscriber(n.spec.endpoint, self.client, n.server_key, ctx=ctx)
                if n.spec.controller is not None:
                    n.ctl = curve.CurveSubscriber(n.spec.controller, self.client, n.server_key, ctx=ctx, hwm=64)
            while not self._stop.is_set():
                self._tick(nodes)
                if not self._ready.is_set() and (all(n.settled() for n in nodes)
                                                 or time.monotonic() - start > READY_WAIT_S):
                    self._ready.set()
                self._stop.wait(self.interval if self._ready.is_set() else 0.05)
        except BaseException as e:  # noqa: BLE001  the view reports it; the thread must not die silently
            self.error = e
            self._ready.set()
        finally:
            for n in nodes:
                for s in (n.obs, n.ctl):
                    if s is not None:
                        s.close()

    def _tick(self, nodes: list[_Node]) -> None:
        now = time.monotonic()
        views = []
        for n in nodes:
            assert n.obs is not None
            n.obs.poll_events()
            for raw in n.obs.recv_all():
                try:
                    snap = NodeSnapshot.from_json(raw)
                except SnapshotError as e:
                    n.note = str(e)
                    continue
                n.snap, n.snap_at = snap, now
                for d in snap.devices:
                    n.history.setdefault(d.device, deque(maxlen=HISTORY)).append((d.prefill, d.decode, d.idle))
            if n.ctl is not None:
                n.ctl.poll_events()
                for raw in n.ctl.recv_all():
                    n.take_report(raw)
            observer = _link_state(n.obs, n.snap is not None, now - n.snap_at, OBSERVER_STALE_S)
            controller = _link_state(n.ctl, n.report is not None, now - n.report_at, CONTROLLER_STALE_S)
            report = n.report if controller in ("ok", "stale") else None
            frame = Frame(time=time.time(), node=n.spec.name, observer=observer,
                          snapshot=n.snap, controller=controller, report=report,
                          decisions=tuple(reversed(n.decisions)), daemons=daemons_from_report(report),
                          history=tuple((d, tuple(h)) for d, h in sorted(n.history.items())),
                          observer_note=n.note)
            views.append(NodeView(n.spec, n.server_key.decode(), observer == "ok", self._why(n, observer, now),
                                  frame))
        self._publish(NodesFrame(time.time(), tuple(views)))

    @staticmethod
    def _why(n: _Node, observer: str, now: float) -> str:
        if observer == "ok":
            return ""
        assert n.obs is not None
        if observer == "stale":
            return f"no snapshot from {n.spec.endpoint} for {now - n.snap_at:.0f} s" + (
                f" ({n.obs.error})" if n.obs.state != curve.LINK_UP and n.obs.error else "")
        if n.obs.state == curve.LINK_UP:
            return f"connected to {n.spec.endpoint}; waiting for the first snapshot"
        if n.obs.state == curve.LINK_CONNECTING:
            return f"connecting to {n.spec.endpoint}"
        return n.obs.error
