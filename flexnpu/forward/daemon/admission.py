"""Client admission and the registry of a device's live clients.

A shim connects to gate-<dev>.sock (unix SOCK_SEQPACKET) when its program first uses the
device and keeps the connection for the program's life. The daemon:

1. learns who it is from the kernel (access.peer_of: peer credentials, a pidfd, groups from
   /proc while the pidfd holds the process), never from anything the client wrote;
2. refuses, with a one-line reason, a process that is not root nor in the flexnpu group, a
   uid already holding `per_uid_cap` slots, a process already admitted, a full table;
3. else takes a slot (the one a restarted daemon kept for this very process, if any, with
   its settings), makes the client's page (a sealed memfd), records the identity in the
   table, and answers with two fds: the table O_RDONLY and the page.

A client leaves when its connection hangs up or its pidfd says it exited: its slot is freed
and its page dropped from the priority summary at once, so it holds nobody. A process that
exits between connect and admission is refused (access.PeerGone) and leaves nothing.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from flexnpu import paths
from flexnpu.forward.daemon import access
from flexnpu.forward.daemon.gate import SLOT_ADMITTED, SLOT_FREE, SLOT_RESERVED, ClientPage, GateTable, SummaryThread, \
    layout

log = logging.getLogger("flexnpu.daemon")

HELLO_WAIT_S = 2.0  # a connection that says nothing for this long is dropped
RESERVE_S = 10.0  # how long a restarted daemon keeps a live client's slot for its reconnect
MAX_PENDING = 256  # connections not yet identified
PER_UID_CAP = 16  # slots one (non-root) user may hold on a device


@dataclass
class Client:
    slot: int
    pid: int
    uid: int
    role: int
    start_time: int
    pidfd: int
    conn: socket.socket | None
    page: ClientPage | None
    mode: int = 0  # enum fx_mode, as declared
    since: float = field(default_factory=time.monotonic)


@dataclass
class Reserved:
    """A slot a restarted daemon adopted: its process was alive; its settings stay in the table."""

    slot: int
    pid: int
    start_time: int
    until: float


class Registry:
    """The live clients of one device, by slot. Every change goes through here, under its lock."""

    def __init__(self, device: int, table: GateTable, summary: SummaryThread):
        self.device = device
        self.table = table
        self.summary = summary
        self.lock = threading.RLock()
        self.clients: dict[int, Client] = {}
        self.reserved: dict[int, Reserved] = {}
        # after the daemon writes a slot (the drift check's record) / when the set of clients changed
        self.on_write: Callable[[int], None] = lambda slot: None
        self.on_change: Callable[[], None] = lambda: None
        self.on_forward: Callable[[], None] = lambda: None  # a client was admitted in forward mode

    def snapshot(self) -> list[Client]:
        with self.lock:
            return sorted(self.clients.values(), key=lambda c: c.slot)

    def find(self, pid: int | None = None, slot: int | None = None) -> Client | None:
        with self.lock:
            for c in self.clients.values():
                if (pid is not None and c.pid == pid) or (slot is not None and c.slot == slot):
                    return c
        return None

    def count_uid(self, uid: int) -> int:
        with self.lock:
            return sum(1 for c in self.clients.values() if c.uid == uid)

    def take_slot(self, peer: access.Peer) -> tuple[int, bool] | None:
        """A slot for peer: (slot, True) if a restarted daemon kept it for this process."""
        for r in list(self.reserved.values()):
            if r.pid == peer.pid and r.start_time == peer.start_time:
                del self.reserved[r.slot]
                return r.slot, True
        busy = set(self.clients) | set(self.reserved)
        free = [i for i in range(self.table.max_slots) if i not in busy]
        return (free[0], False) if free else None

    def add(self, c: Client, kept: bool, defaults: dict) -> None:
        with self.lock:
            self.clients[c.slot] = c
            self.table.admit(c.slot, c.pid, c.uid, c.role, c.start_time, SLOT_ADMITTED, c.mode)
            if not kept:
                self.table.write_slot(c.slot, defaults["gate"], defaults["priority"], defaults["max_hold_ns"],
                                      defaults.get("inflight", 0), None)
            self.summary.set(c.slot, c.page)
            self.on_write(c.slot)
            self.on_change()
            if c.mode == 1:
                self.on_forward()

    def remove(self, slot: int, why: str) -> Client | None:
        with self.lock:
            c = self.clients.pop(slot, None)
            if c is None:
                return None
            self.summary.set(slot, None)  # the thread no longer reads the page after this
            self.table.free(slot)
            self.on_write(slot)
            self.on_change()
        if c.conn is not None:
            c.conn.close()
        os.close(c.pidfd)
        if c.page is not None:
            c.page.close()
        self.table.wake()  # a hold it had on others is gone
        log.info("device %d: client pid %d %s; slot %d freed", self.device, c.pid, why, slot)
        return c

    def expire_reserved(self, now: float) -> None:
        with self.lock:
            for r in list(self.reserved.values()):
                if now >= r.until or access.start_time_of(r.pid) != r.start_time:
                    del self.reserved[r.slot]
                    self.table.free(r.slot)
                    self.on_write(r.slot)
                    log.info("device %d: pid %d did not come back; slot %d freed", self.device, r.pid, r.slot)

    def close_all(self) -> None:
        with self.lock:
            for slot in list(self.clients):
                c = self.clients.pop(slot)
                self.summary.set(slot, None)
                if c.conn is not None:
                    c.conn.close()
                os.close(c.pidfd)
                if c.page is not None:
                    c.page.close()


class Admission:
    """The admission socket of one device and the thread that serves it and reaps clients."""

    def __init__(self, device: int, rdir: Path, registry: Registry, policy: access.AccessPolicy,
                 defaults: Callable[[int, int, int], dict], per_uid_cap: int = PER_UID_CAP):
        self.device = device
        self.path = paths.gate_socket(device, rdir)
        self.registry = registry
        self.table = registry.table
        self.policy = policy
        self.defaults = defaults
        self.per_uid_cap = per_uid_cap
        self.sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: dict[int, tuple[socket.socket, float]] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    # -- the socket
    def listen(self) -> None:
        self.path.unlink(missing_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        with self.policy.binding(self.path):
            s.bind(str(self.path))
        s.listen(128)
        self.sock = s

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name=f"gate-admit-{self.device}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        os.write(self._wake_w, b"x")
        if self._thread:
            self._thread.join(timeout=2)
        for conn, _ in self._pending.values():
            conn.close()
        self._pending.clear()
        if self.sock is not None:
            self.sock.close()
            self.path.unlink(missing_ok=True)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def changed(self) -> None:
        """The set of clients changed outside this thread (re-read the fds to watch)."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    # -- admission
    def _reply(self, conn: socket.socket, status: int, slot: int = 0, reason: str = "", fds: list[int] = ()) -> bool:
        L = layout()
        msg = struct.pack("<IIiI", L["welcome_magic"], L["version"], status, slot)
        msg += reason.encode()[: L["welcome_size"] - L["reason_offset"] - 1].ljust(
            L["welcome_size"] - L["reason_offset"], b"\0")
        try:
            if fds:
                socket.send_fds(conn, [msg], list(fds))
            else:
                conn.send(msg)
            return True
        except OSError:
            return False

    def _refuse(self, conn: socket.socket, status: int, reason: str, peer: access.Peer | None) -> None:
        who = f"pid {peer.pid} (uid {peer.uid})" if peer else "a peer"
        log.warning("device %d: refused %s: %s", self.device, who, reason)
        self._reply(conn, -status, reason=reason)
        conn.close()

    def admit(self, conn: socket.socket | None, peer: access.Peer, role: int, mode: int = 0) -> Client | None:
        """Admits an identified peer (conn None: a test's direct admission). On refusal the
        peer's pidfd is closed and nothing is left behind."""
        import errno

        def refuse(status: int, reason: str) -> None:
            os.close(peer.pidfd)
            if conn is not None:
                self._refuse(conn, status, reason, peer)

        if not self.policy.may_run(peer):
            refuse(errno.EACCES, self.policy.refusal(self.device))
            return None
        if role not in (0, 1, 2):
            role = 0
        reg = self.registry
        with reg.lock:
            mine = [c for c in reg.clients.values() if c.pid == peer.pid and c.start_time == peer.start_time]
            if mine:
                refuse(errno.EEXIST, f"device {self.device}: pid {peer.pid} already holds gate slot {mine[0].slot}")
                return None
            if peer.uid != 0 and reg.count_uid(peer.uid) >= self.per_uid_cap:
                refuse(errno.EUSERS, f"device {self.device}: uid {peer.uid} already holds {self.per_uid_cap} gate "
                                     f"slots, the most one user may")
                return None
            got = reg.take_slot(peer)
            if got is None:
                refuse(errno.ENOSPC, f"device {self.device}: all {self.table.max_slots} gate slots are taken")
                return None
            slot, kept = got
            try:
                page = ClientPage(self.device, slot)
            except OSError as e:
                if kept:
                    self.table.free(slot)
                refuse(errno.ENOMEM, f"device {self.device}: no page for a client: {e}")
                return None
            c = Client(slot, peer.pid, peer.uid, role, peer.start_time, peer.pidfd, conn, page, mode if mode in (0, 1) else 0)
            d = self.defaults(c.role, c.mode, c.uid)
            reg.add(c, kept, d)
        if conn is not None:
            try:
                ctl_fd = self.table.readonly_fd()
            except OSError:
                ctl_fd = -1
            ok = ctl_fd >= 0 and self._reply(conn, 0, slot, fds=[ctl_fd, page.hand_out()])
            if ctl_fd >= 0:
                os.close(ctl_fd)
            page.close_fd()
            if not ok:
                reg.remove(slot, "left during admission")
                return None
        else:
            page.close_fd()
        log.info("device %d: %s pid %d (uid %d) in slot %d", self.device, "re-admitted" if kept else "admitted",
                 peer.pid, peer.uid, slot)
        return c

    def _hello(self, conn: socket.socket) -> None:
        """The first message of a connection: identify, then admit or refuse."""
        L = layout()
        try:
            data = conn.recv(64)
        except BlockingIOError:
            self._pending[conn.fileno()] = (conn, time.monotonic())
            return
        except OSError:
            conn.close()
            return
        if len(data) < L["hello_size"]:
            conn.close()  # hung up, or not a shim
            return
        magic, version, role, mode = struct.unpack_from("<IIII", data)
        if magic != L["hello_magic"] or version != L["version"]:
            self._refuse(conn, 71, f"device {self.device}: the gate speaks version {L['version']}; "
                                   f"this shim speaks {version}", None)
            return
        try:
            peer = access.peer_of(conn)
        except (access.PeerGone, OSError) as e:
            log.info("device %d: %s; nothing admitted", self.device, e)
            conn.close()
            return
        conn.setblocking(True)
        conn.settimeout(1.0)  # a full socket buffer must not stall admission of others
        self.admit(conn, peer, role, mode)

    def _serve(self) -> None:
        poller = select.poll()
        watched: dict[int, tuple[str, object]] = {}

        def rewatch() -> None:
            want: dict[int, tuple[str, object]] = {self.sock.fileno(): ("listen", None), self._wake_r: ("wake", None)}
            for fd, (conn, _) in self._pending.items():
                want[fd] = ("hello", conn)
            for c in self.registry.snapshot():
                want[c.pidfd] = ("pidfd", c.slot)
                if c.conn is not None:
                    want[c.conn.fileno()] = ("conn", c.slot)
            for fd in set(watched) - set(want):
                poller.unregister(fd)
            for fd, what in want.items():
                if fd not in watched:
                    poller.register(fd, select.POLLIN | select.POLLHUP if what[0] != "conn"
                                    else select.POLLIN | select.POLLRDHUP)
            watched.clear()
            watched.update(want)

        rewatch()
        while not self._stop.is_set():
            events = poller.poll(100)
            dirty = False
            for fd, _ev in events:
                kind, what = watched.get(fd, (None, None))
                if kind == "listen":
                    for _ in range(64):
                        try:
                            conn, _ = self.sock.accept()
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError as e:  # EMFILE: drop the oldest pending ones
                            log.warning("device %d: accept failed: %s", self.device, e)
                            break
                        conn.setblocking(False)
                        self._hello(conn)
                        dirty = True
                elif kind == "hello":
                    conn = self._pending.pop(fd)[0]
                    self._hello(conn)
                    dirty = True
                elif kind in ("pidfd", "conn"):
                    c = self.registry.clients.get(what)
                    if c is not None and (fd == c.pidfd or (c.conn is not None and fd == c.conn.fileno())):
                        self.registry.remove(what, "exited" if kind == "pidfd" else "hung up")
                        dirty = True
                elif kind == "wake":
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    dirty = True
            now = time.monotonic()
            for fd, (conn, t) in list(self._pending.items()):
                if now - t > HELLO_WAIT_S or len(self._pending) > MAX_PENDING:
                    del self._pending[fd]
                    conn.close()
                    dirty = True
            if dirty:
                rewatch()


def request_admission(path: Path, role: int = 0, timeout: float = 5.0, mode: int = 0) -> tuple[dict, list[int], socket.socket]:
    """What a shim does at attach, from Python (tests, diagnostics): connect, say hello, read
    the answer. Returns (answer, fds, connection); the connection must stay open for the
    admission to stand."""
    L = layout()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    s.connect(str(path))
    s.send(struct.pack("<IIII", L["hello_magic"], L["version"], role, mode))
    msg, fds, _, _ = socket.recv_fds(s, L["welcome_size"], 4)
    magic, version, status, slot = struct.unpack_from("<IIiI", msg)
    reason = msg[L["reason_offset"]:].split(b"\0", 1)[0].decode(errors="replace")
    return {"magic_ok": magic == L["welcome_magic"], "version": version, "status": status, "slot": slot,
            "reason": reason}, fds, s
