"""A thin client of a forwarding daemon's control API (used by the CLI and the controller).

It picks the socket per command: ping and list go to the read socket (root and the flexnpu
group), everything else to the admin socket (root, or the daemon's admin group). A socket
this process may not use is refused at once with a one-line reason, never a timeout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import zmq

from flexnpu import SCHEMA
from flexnpu import paths
from flexnpu.forward.access import socket_refusal
from flexnpu.forward.protocol import READ_COMMANDS


class DaemonError(RuntimeError):
    """The daemon refused a request, or did not answer."""


class DaemonClient:
    """Talks to `flexnpu daemon --device N`. Every call has a timeout; after one, the socket
    is rebuilt so the REQ/REP lockstep starts afresh."""

    def __init__(self, device: int, rdir: Path | None = None, timeout: float = 2.0):
        self.device = device
        self.path = paths.daemon_socket(device, rdir)
        self.admin_path = paths.daemon_admin_socket(device, rdir)
        self.timeout_ms = int(timeout * 1000)
        self._ctx = zmq.Context.instance()
        self._socks: dict[bool, zmq.Socket] = {}

    def _socket(self, admin: bool) -> zmq.Socket:
        s = self._socks.get(admin)
        if s is None:
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
        except zmq.Again:
            s.close(0)
            self._socks.pop(admin, None)
            raise DaemonError(f"daemon for device {self.device} did not answer within {self.timeout_ms} ms") from None
        if not reply.get("ok"):
            raise DaemonError(reply.get("error", "unknown error"))
        return reply

    def ping(self) -> dict:
        return self.request("ping")

    def list(self) -> list[dict]:
        return self.request("list")["clients"]

    def set(self, pid: int | None = None, slot: int | None = None, gate: str | None = None,
            priority: int | None = None, max_hold_ms: float | None = None, inflight: int | None = None,
            owner: str = "manual", lease_ms: float | None = None) -> dict:
        """One client's settings; returns its `list` record. owner "controller" renews the
        controller's lease (lease_ms, default 500) and is refused on a manual setting."""
        args = {k: v for k, v in dict(pid=pid, slot=slot, gate=gate, priority=priority, max_hold_ms=max_hold_ms,
                                      inflight=inflight, lease_ms=lease_ms).items() if v is not None}
        return self.request("set", owner=owner, **args)["client"]

    def set_many(self, settings: list[dict], owner: str = "controller", lease_ms: float = 500) -> dict:
        """Settings of many clients ({"pid", "gate"?, "priority"?, "max_hold_ms"?, "inflight"?}
        each), applied at once with one wake-up; renews the controller's lease. Returns
        {"applied": [pid, ...], "skipped": [{"pid", "reason"}, ...]}."""
        args: dict[str, Any] = {"settings": settings, "owner": owner}
        if owner == "controller":
            args["lease_ms"] = lease_ms
        reply = self.request("set_many", **args)
        return {"applied": reply["applied"], "skipped": reply["skipped"]}

    def release(self, pid: int | None = None, all: bool = False) -> list[int]:
        """Drops manual settings (of pid, or every client's with all=True) back to the device
        defaults; returns the pids released."""
        args: dict[str, Any] = {"all": True} if all else {"pid": pid}
        return self.request("release", **args)["released"]

    def renew(self, owner: str = "controller", lease_ms: float = 500) -> dict:
        """Renews the controller's lease without changing anything; returns {"lease_left_ms"}."""
        return self.request("renew", owner=owner, lease_ms=lease_ms)["controller"]

    def defaults(self, gate: str | None = None, priority: int | None = None, max_hold_ms: float | None = None,
                 apply: bool = False, pending_grace_ms: float | None = None, inflight: int | None = None) -> dict:
        args = {k: v for k, v in dict(gate=gate, priority=priority, max_hold_ms=max_hold_ms,
                                      pending_grace_ms=pending_grace_ms, inflight=inflight).items() if v is not None}
        return self.request("defaults", apply=apply, **args)["defaults"]
