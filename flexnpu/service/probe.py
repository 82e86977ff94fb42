"""Whether one of the node's services answers now: the check behind `flexnpu service probe`.

A container's readiness and liveness probes (deploy/kubernetes) run it, and so may a person.
Each probe asks the service itself over the socket it serves, so a process that is alive but
stuck fails, and a socket file left behind by a dead one does not pass:

- a forwarding daemon answers `ping` on daemon-<dev>.sock;
- the observer publishes a snapshot on observe.sock (every --interval-ms, 100 ms by default);
- the controller publishes a report on controller.sock (at least every report_ms, 500 ms).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flexnpu import paths

SERVICES = ("daemon", "observer", "controller")
DEFAULT_TIMEOUT_S = 3.0


class ProbeFailed(RuntimeError):
    """The service did not answer; the message is one line that says what was seen."""


@dataclass(frozen=True)
class ProbeResult:
    service: str
    pid: int | None  # the answering process (as the service reports it), when it says
    detail: str  # one line: what answered

    def to_json(self) -> dict:
        return {"schema": 1, "service": self.service, "ok": True, "pid": self.pid, "detail": self.detail}


def _published(path: Path, timeout_s: float) -> bytes:
    """One message from a zmq PUB socket at path, or ProbeFailed."""
    import zmq

    if not path.exists():
        raise ProbeFailed(f"no {path.name} in {path.parent}: the service is not serving")
    if not os.access(path, os.W_OK):  # zmq would retry a refused connect silently until the timeout
        raise ProbeFailed(f"permission denied on {path}: probe as the service's user or a member of its group")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.SUB)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(f"ipc://{path}")
        if not sock.poll(int(timeout_s * 1000)):
            raise ProbeFailed(f"nothing published on {path} within {timeout_s:g} s")
        return sock.recv()
    finally:
        sock.close(0)


def daemon(device: int, rdir: Path | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> ProbeResult:
    from flexnpu.forward.api import DaemonClient, DaemonError

    try:
        with DaemonClient(device, rdir, timeout=timeout_s) as c:
            reply = c.ping()
    except DaemonError as e:
        raise ProbeFailed(str(e)) from None
    return ProbeResult("daemon", reply.get("pid"), f"device {device}: {reply.get('clients', 0)} clients")


def observer(rdir: Path | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> ProbeResult:
    from flexnpu.snapshot import NodeSnapshot

    raw = _published(paths.observe_socket(rdir), timeout_s)
    try:
        snap = NodeSnapshot.from_json(raw)
    except (ValueError, KeyError, TypeError) as e:
        raise ProbeFailed(f"observe.sock published something that is not a snapshot: {e}") from None
    return ProbeResult("observer", snap.raw.get("pid"),
                       f"snapshot {snap.seq}, source {snap.source}, {len(snap.processes)} processes")


def controller(rdir: Path | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> ProbeResult:
    from flexnpu.control.wire import ControllerReport, WireError

    raw = _published(paths.controller_socket(rdir), timeout_s)
    try:
        report = ControllerReport.from_json(raw)
    except (WireError, ValueError, KeyError, TypeError) as e:
        raise ProbeFailed(f"controller.sock published something that is not a report: {e}") from None
    return ProbeResult("controller", report.pid,
                       f"report {report.seq}, policy {report.policy}, observer {report.observer}")
