"""Who may do what with a device's gates (docs/security.md).

- Root and members of the `flexnpu` group (paths.CLIENT_GROUP) may run gated programs and
  read the gates (`ping`, `list`). Without that group on the node, only root may.
- Only root, or members of an admin group named with `flexnpu daemon --admin-group`, may
  change gates, budgets and defaults.

Identity always comes from the kernel: the peer credentials of the admission connection, a
pidfd of the peer, and its groups from /proc/<pid>/status read while that pidfd proves the
pid still names the same process. The control sockets (zmq over ipc, which carries no peer
credentials) are guarded by their file modes; `socket_refusal` turns a missing permission
into the one-line refusal a user sees instead of a timeout.
"""

from __future__ import annotations

import contextlib
import grp
import os
import select
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from flexnpu import paths, rundir

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5


def group_gid(name: str | None) -> int | None:
    """The gid of a group, or None if there is no such group on this node."""
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


@dataclass
class Peer:
    """A process as the kernel describes it."""

    pid: int
    uid: int  # effective, at connect
    gid: int
    groups: frozenset[int]
    start_time: int  # /proc/<pid>/stat starttime (clock ticks since boot)
    pidfd: int


class PeerGone(OSError):
    """The peer exited before it could be identified; nothing is admitted for it."""


def _alive(pidfd: int) -> bool:
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return not p.poll(0)  # a pidfd is readable once its process has exited


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat from field 3 (state) on: [0] the state, [19] the start
    time (field 22, clock ticks after boot). Raises OSError when pid runs nothing."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and ')'


def _proc_facts(pid: int) -> tuple[frozenset[int], int]:
    """Supplementary groups and start time of pid, from /proc."""
    groups: frozenset[int] = frozenset()
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Groups:"):
                groups = frozenset(int(g) for g in line.split()[1:])
    return groups, int(proc_stat(pid)[19])


def peer_of(conn: socket.socket) -> Peer:
    """The process at the other end of a unix socket connection, from the kernel. Raises
    PeerGone if it exited before that could be told for certain (its pid may be reused)."""
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    try:
        pidfd = struct.unpack("i", conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
    except OSError:  # before Linux 6.5: a pidfd of the pid, proved right by the connection standing
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            raise PeerGone(f"pid {pid} exited before it was admitted") from None
        p = select.poll()
        p.register(conn.fileno(), select.POLLHUP | select.POLLRDHUP)
        if any(ev & (select.POLLHUP | select.POLLRDHUP) for _, ev in p.poll(0)):
            os.close(pidfd)
            raise PeerGone(f"pid {pid} hung up before it was admitted") from None
    return peer_of_pidfd(pid, uid, gid, pidfd)


def peer_of_pidfd(pid: int, uid: int, gid: int, pidfd: int) -> Peer:
    """Completes a Peer from /proc, checking afterwards that pidfd's process is still there,
    so what was read is its (a pid is not reused while its process lives)."""
    try:
        groups, start_time = _proc_facts(pid)
    except (OSError, ValueError, IndexError):
        os.close(pidfd)
        raise PeerGone(f"pid {pid} exited before it was admitted") from None
    if not _alive(pidfd):
        os.close(pidfd)
        raise PeerGone(f"pid {pid} exited before it was admitted")
    return Peer(pid, uid, gid, groups, start_time, pidfd)


def peer_of_pid(pid: int) -> Peer:
    """A Peer for a process this daemon knows by pid (tests, adoption): credentials from /proc."""
    pidfd = os.pidfd_open(pid)
    try:
        with open(f"/proc/{pid}/status") as f:
            ids = {ln.split(":")[0]: ln.split()[1:] for ln in f if ln.startswith(("Uid:", "Gid:"))}
        uid, gid = int(ids["Uid"][1]), int(ids["Gid"][1])
    except (OSError, KeyError, IndexError, ValueError):
        os.close(pidfd)
        raise PeerGone(f"pid {pid} is gone") from None
    return peer_of_pidfd(pid, uid, gid, pidfd)


def start_time_of(pid: int) -> int | None:
    try:
        return _proc_facts(pid)[1]
    except (OSError, ValueError, IndexError):
        return None


class AccessPolicy:
    """The node's rule, with the groups resolved once when the daemon starts."""

    def __init__(self, client_group: str = paths.CLIENT_GROUP, admin_group: str | None = None):
        self.client_group = client_group
        self.admin_group = admin_group
        self.client_gid = group_gid(client_group)
        self.admin_gid = group_gid(admin_group)
        if admin_group and self.admin_gid is None:
            raise ValueError(f"admin group {admin_group!r} does not exist; create it or leave --admin-group out")
        self.daemon_uid = os.geteuid()

    def may_run(self, peer: Peer) -> bool:
        """May this process be admitted to a gate?"""
        if peer.uid in (0, self.daemon_uid):
            return True
        g = self.client_gid
        return g is not None and (peer.gid == g or g in peer.groups)

    def who_may_run(self) -> str:
        if self.client_gid is None:
            return f"root only (there is no {self.client_group} group on this node)"
        return f"root and the {self.client_group} group"

    def refusal(self, device: int) -> str:
        return f"permission denied: the gate of device {device} is for {self.who_may_run()}"

    def socket_mode(self, admin: bool = False) -> int:
        """The mode of a socket the daemon binds: 0660 with the group that may use it, 0600
        when there is none."""
        gid = self.admin_gid if admin else self.client_gid
        return paths.CLIENT_SOCKET_MODE if gid is not None else paths.GROUPLESS_MODE  # 0660 == ADMIN_SOCKET_MODES[1]

    @contextlib.contextmanager
    def binding(self, path: Path, admin: bool = False) -> Iterator[None]:
        """Around the bind of a socket at path: the umask makes the file its final mode as it
        is created, and its group is given after without following a link (lchown). Nothing
        is changed by path in a way that follows a link: a link swapped in at the path after
        the bind only has its own group changed, never its target's mode or owner."""
        with rundir.socket_mode(self.socket_mode(admin)):
            yield
        rundir.give_group(path, self.admin_gid if admin else self.client_gid)


def socket_refusal(path: Path, device: int, admin: bool) -> str | None:
    """The one-line refusal for a control socket this process may not connect to (None: it
    may). Read from the socket file's mode and group, which is what the kernel checks."""
    if os.access(path, os.W_OK, effective_ids=True):
        return None
    what = f"{'changing' if admin else 'reading'} the gates of device {device}"
    try:
        st = path.stat()
        group = grp.getgrgid(st.st_gid).gr_name if st.st_mode & 0o020 else None
    except (OSError, KeyError):
        group = None
    return f"permission denied: {what} is for root" + \
        (f" and the {group} group" if group else "")
