"""The control server of one device's daemon: two zmq REP sockets over ipc.

- daemon-<dev>.sock (read): ping and list. Mode 0660 root:flexnpu (0600 without the group).
- daemon-<dev>.admin.sock (admin): every command. Mode 0600 root, or 0660 root:<admin group>.

zmq over ipc carries no peer credentials, so the file modes are the boundary: the kernel
checks them at connect. Requests go to protocol.handle, which refuses admin commands that
arrive on the read socket.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import zmq

from flexnpu import paths
from flexnpu.forward import protocol
from flexnpu.forward.access import AccessPolicy

log = logging.getLogger("flexnpu.daemon")


class ControlServer:
    def __init__(self, daemon, rdir: Path, policy: AccessPolicy):
        self.daemon = daemon
        self.device = daemon.device
        self.policy = policy
        self.paths = {False: paths.daemon_socket(self.device, rdir), True: paths.daemon_admin_socket(self.device, rdir)}
        self.ctx: zmq.Context | None = None
        self.socks: dict[zmq.Socket, bool] = {}  # socket -> admin

    def bind(self) -> None:
        """Binds both sockets (socket files 0600 at first, then owner and mode per policy)."""
        self.ctx = zmq.Context()
        for admin, path in self.paths.items():
            sock = self.ctx.socket(zmq.REP)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME)  # beyond this zmq drops the peer
            path.unlink(missing_ok=True)
            old = os.umask(0o177)
            try:
                sock.bind(f"ipc://{path}")
            finally:
                os.umask(old)
            self.policy.place(path, admin=admin)
            self.socks[sock] = admin
        log.info("device %d: control API at ipc://%s (read) and ipc://%s (admin)", self.device,
                 self.paths[False], self.paths[True])

    def serve(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        for s in self.socks:
            poller.register(s, zmq.POLLIN)
        while not stop.is_set():
            for sock, _ in poller.poll(100):
                try:
                    # every frame, so the REP socket is ready to send: a reply after reading only the
                    # first frame of a multipart request fails (EFSM)
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                except zmq.ZMQError as e:  # e.g. a message over MAXMSGSIZE dropped the peer
                    log.warning("device %d: receive failed: %s", self.device, e)
                    continue
                admin = self.socks[sock]
                sock.send(protocol.handle(self.daemon, frames[0], admin=admin) if len(frames) == 1 else
                          protocol.error_reply(f"a request is one message frame, not {len(frames)}"))

    def close(self) -> None:
        for s in self.socks:
            s.close(0)
        self.socks.clear()
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
        for path in self.paths.values():
            path.unlink(missing_ok=True)
