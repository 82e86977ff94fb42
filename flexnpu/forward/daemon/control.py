"""The control server of one device's daemon: two zmq REP sockets over ipc.

- daemon-<dev>.sock (read): ping and list. Mode 0660 root:flexnpu (0600 without the group).
- daemon-<dev>.admin.sock (admin): every command. Mode 0600 root, or 0660 root:<admin group>.

The file modes are the boundary: the kernel checks them at connect. Requests go to
protocol.handle, which refuses admin commands that arrive on the read socket. (Each request
does carry its sender's uid, read by libzmq at accept; it only picks who gets a cached
`list`, never what anyone may do.)

Those allowed to connect may still not take the daemon away from the others:
- ConnectionGuard counts each socket's connections by the peer's uid (SO_PEERCRED of the fd
  zmq accepted, learnt from a socket monitor) and cuts those beyond a user's cap or the cap
  of all users together; root and the daemon's own user are not capped. libzmq aborts the
  process when accept() fails with EMFILE, so the caps keep the descriptors in use far
  under the limit (and the daemon raises its soft limit to the hard one at start).
- A connection that never speaks ZMTP is dropped after HANDSHAKE_MS.
- The admin socket has its own zmq context (its own I/O thread, which a flood on the read
  socket does not occupy) and is served first: between any two read requests.
- `list` on the read socket is answered, for users other than root and the daemon's own,
  from a recent reply (protocol.ListCache); the peer's uid comes with each request.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import zmq

from flexnpu import paths
from flexnpu.forward.daemon import protocol
from flexnpu.forward.daemon.access import AccessPolicy

log = logging.getLogger("flexnpu.daemon")

HANDSHAKE_MS = 2000  # a connection that has not completed the ZMTP greeting by then is dropped
CONNECTIONS_PER_UID = 32  # per socket, for one non-root user: a tool (gate list, top) holds one
CONNECTIONS_TOTAL = 512  # per socket, of all non-root users together
# Connections zmq may accept before the guard has seen them: the monitor's pipe holds about
# 1000 + MONITOR_RCVHWM events, and zmq's I/O thread waits while it is full.
MONITOR_RCVHWM = 100
# Descriptors the caps leave free: the connections zmq accepts before the guard has seen them
# (about 1100), the admission socket's clients and pending connections (64 x 3 + 256), the
# daemon's own (about 30).
FD_HEADROOM = 2048
RECONCILE_S = 1.0
WARN_EVERY_S = 60.0

_EVENT = struct.Struct("=HI")  # a v1 monitor event's first frame: event, value (the fd)


def raise_fd_limit() -> int:
    """Raises this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit now.
    A connection flood must meet the guard's caps, never the limit: libzmq aborts there."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # RLIM_INFINITY above nr_open: keep what we have
            pass
    return soft


def total_cap(fd_limit: int) -> int:
    """The cap of all non-root connections to one socket under this descriptor limit: two
    sockets' worth stay clear of FD_HEADROOM, so the limit is out of reach."""
    return max(16, min(CONNECTIONS_TOTAL, (fd_limit - FD_HEADROOM) // 2))


def peer_uid(frame: zmq.Frame) -> int | None:
    """The uid of the process that sent frame over ipc: libzmq reads the connection's
    SO_PEERCRED at accept and gives it as the Peer-Address property, "host:uid:gid:pid"."""
    try:
        return int(frame.get("Peer-Address").rsplit(":", 3)[1])
    except (zmq.ZMQError, AttributeError, ValueError, IndexError):
        return None


@dataclass
class _Conn:
    uid: int
    ino: int  # the socket's inode: the same fd number may name another connection later
    counted: bool


class ConnectionGuard:
    """Counts the connections of the control sockets by peer uid and cuts, with shutdown(2)
    on a dup of the fd zmq accepted, those beyond the caps. zmq sees the end of the stream,
    closes its fd and reports the disconnect; the peer sees its connection closed."""

    def __init__(self, device: int, exempt: set[int], per_uid: int = CONNECTIONS_PER_UID,
                 total: int = CONNECTIONS_TOTAL):
        self.device = device
        self.exempt = exempt
        self.per_uid = per_uid
        self.total = total
        self.monitors: list[tuple[zmq.Socket, str]] = []  # monitor socket, the watched socket's path
        self.conns: dict[tuple[int, int], _Conn] = {}  # (monitor index, fd)
        self.by_uid: list[Counter] = []
        self.cut = 0  # connections cut since start
        self._warned: dict[tuple[int, int], float] = {}
        self._thread: threading.Thread | None = None

    def watch(self, ctx: zmq.Context, sock: zmq.Socket, path: Path) -> None:
        """Starts monitoring sock (in the thread that made it, before it serves)."""
        addr = f"inproc://flexnpu-guard-{self.device}-{len(self.monitors)}"
        sock.monitor(addr, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        mon = ctx.socket(zmq.PAIR)
        mon.setsockopt(zmq.LINGER, 0)
        mon.setsockopt(zmq.RCVHWM, MONITOR_RCVHWM)
        mon.connect(addr)
        self.monitors.append((mon, str(path)))
        self.by_uid.append(Counter())

    def start(self, stop: threading.Event) -> None:
        self._thread = threading.Thread(target=self._run, args=(stop,), name=f"gate-guard-{self.device}",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=2)
        for mon, _ in self.monitors:
            mon.close(0)
        self.monitors.clear()

    # -- the thread
    def _run(self, stop: threading.Event) -> None:
        poller = zmq.Poller()
        for mon, _ in self.monitors:
            poller.register(mon, zmq.POLLIN)
        last = time.monotonic()
        while not stop.is_set():
            try:
                for mon, _ in poller.poll(200):
                    i = next(k for k, (m, _) in enumerate(self.monitors) if m is mon)
                    for _ in range(256):  # then the other socket's turn
                        try:
                            frames = mon.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        event, fd = _EVENT.unpack_from(frames[0])
                        if event == zmq.EVENT_ACCEPTED:
                            self.accepted(i, fd)
                        elif event == zmq.EVENT_DISCONNECTED:
                            self.disconnected(i, fd)
                if time.monotonic() - last >= RECONCILE_S:
                    last = time.monotonic()
                    self.reconcile()
            except zmq.ZMQError as e:  # the context is going away
                if stop.is_set():
                    return
                log.warning("device %d: connection guard: %s", self.device, e)
            except Exception:  # the guard must go on
                log.exception("device %d: connection guard failed", self.device)

    def accepted(self, i: int, fd: int) -> None:
        """A connection zmq accepted on socket i as fd: count it, or cut it."""
        self.disconnected(i, fd)  # an entry still there is one whose disconnect was never seen
        try:
            s = socket.socket(fileno=os.dup(fd))  # a dup: closing ours never closes zmq's
        except OSError:  # gone already (its disconnect follows), or not a socket any more
            return
        with s:
            try:
                if s.family != socket.AF_UNIX or os.fsdecode(s.getsockname()) != self.monitors[i][1]:
                    return  # the fd was closed and reused for something else meanwhile
                _pid, uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                ino = os.fstat(s.fileno()).st_ino
            except OSError:
                return
            if uid in self.exempt:
                self.conns[(i, fd)] = _Conn(uid, ino, False)
                return
            counts = self.by_uid[i]
            if counts[uid] >= self.per_uid or sum(counts.values()) >= self.total:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self.cut += 1
                self._warn(i, uid, counts[uid] >= self.per_uid)
                return
            counts[uid] += 1
            self.conns[(i, fd)] = _Conn(uid, ino, True)

    def disconnected(self, i: int, fd: int) -> None:
        c = self.conns.pop((i, fd), None)
        if c is not None and c.counted:
            self.by_uid[i][c.uid] -= 1
            if self.by_uid[i][c.uid] <= 0:
                del self.by_uid[i][c.uid]

    def reconcile(self) -> None:
        """Forgets connections whose fd no longer names them (a disconnect not seen)."""
        for key, c in list(self.conns.items()):
            try:
                same = os.fstat(key[1]).st_ino == c.ino
            except OSError:
                same = False
            if not same:
                self.disconnected(*key)

    def _warn(self, i: int, uid: int, own_cap: bool) -> None:
        now = time.monotonic()
        if now - self._warned.get((i, uid), -WARN_EVERY_S) < WARN_EVERY_S:
            return
        self._warned[(i, uid)] = now
        path = self.monitors[i][1]
        if own_cap:
            log.warning("device %d: uid %d holds %d connections to %s, the most one user may; its further "
                        "connections are closed (%d so far)", self.device, uid, self.per_uid, path, self.cut)
        else:
            log.warning("device %d: users hold %d connections to %s, the most there may be; further ones "
                        "(uid %d) are closed (%d so far)", self.device, self.total, path, uid, self.cut)


class ControlServer:
    def __init__(self, daemon, rdir: Path, policy: AccessPolicy, per_uid: int = CONNECTIONS_PER_UID,
                 fd_limit: int | None = None):
        self.daemon = daemon
        self.device = daemon.device
        self.policy = policy
        self.paths = {False: paths.daemon_socket(self.device, rdir), True: paths.daemon_admin_socket(self.device, rdir)}
        limit = fd_limit if fd_limit is not None else resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.guard = ConnectionGuard(self.device, {0, policy.daemon_uid}, per_uid, total_cap(limit))
        self.ctxs: dict[bool, zmq.Context] = {}
        self.socks: dict[bool, zmq.Socket] = {}  # admin -> socket
        self.cache = protocol.ListCache()
        self._stop: threading.Event | None = None

    def bind(self) -> None:
        """Binds both sockets, each at its final mode (umask) and given its group without
        following a link, and starts watching their connections."""
        for admin, path in self.paths.items():
            ctx = self.ctxs[admin] = zmq.Context()  # one I/O thread each: a flood of one is not the other's
            sock = ctx.socket(zmq.REP)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME)  # beyond this zmq drops the peer
            sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
            path.unlink(missing_ok=True)
            with self.policy.binding(path, admin=admin):
                sock.bind(f"ipc://{path}")
            self.socks[admin] = sock
            self.guard.watch(ctx, sock, path)
        log.info("device %d: control API at ipc://%s (read) and ipc://%s (admin); at most %d connections per "
                 "user and %d in all on each", self.device, self.paths[False], self.paths[True], self.guard.per_uid,
                 self.guard.total)

    def _serve_one(self, sock: zmq.Socket, admin: bool) -> None:
        try:
            # every frame, so the REP socket is ready to send: a reply after reading only the
            # first frame of a multipart request fails (EFSM)
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        except zmq.ZMQError as e:  # e.g. a message over MAXMSGSIZE dropped the peer
            log.warning("device %d: receive failed: %s", self.device, e)
            return
        if len(frames) != 1:
            reply = protocol.error_reply(f"a request is one message frame, not {len(frames)}")
        elif admin:
            reply = protocol.handle(self.daemon, frames[0].bytes, admin=True, cache=self.cache)
        else:
            trusted = peer_uid(frames[0]) in self.guard.exempt
            reply = protocol.handle(self.daemon, frames[0].bytes, admin=False, cache=None if trusted else self.cache)
        sock.send(reply)  # never waits: REP drops a reply whose peer went or does not read

    def serve(self, stop: threading.Event) -> None:
        self.guard.start(stop)
        admin, read = self.socks[True], self.socks[False]
        poller = zmq.Poller()
        poller.register(admin, zmq.POLLIN)
        poller.register(read, zmq.POLLIN)
        while not stop.is_set():
            ready = dict(poller.poll(100))
            # the admin socket first, so a request there waits for one read request at most
            if ready.get(admin):
                self._serve_one(admin, True)
            if ready.get(read):
                self._serve_one(read, False)

    def close(self) -> None:
        for s in self.socks.values():
            s.close(0)
        self.socks.clear()
        self.guard.close()
        for ctx in self.ctxs.values():
            ctx.term()
        self.ctxs.clear()
        for path in self.paths.values():
            path.unlink(missing_ok=True)
