"""The runtime dir as a place the services may trust, and the files they make in it.

Root's services write in $FLEXNPU_RUNTIME_DIR (locks, pid file, log, sockets). A directory
someone else made, or may write in, lets that someone plant a symlink under a name root is
about to open (`emu.pid -> /etc/shadow`) or swap a freshly bound socket for a link before
root sets its mode. So a component that writes there first opens the directory once and
checks what it opened:

- it is owned by root, by this process's user or by the service user, and nobody else may
  write in it (no group or other write bit, sticky or not: a sticky 1777 dir still lets
  anyone take a name first);
- every directory above it is owned by root or by one of those users, and is not writable
  by others unless sticky (as /tmp is): nobody else can rename the runtime dir away and put
  their own in its place;

and then makes its files relative to that directory's descriptor with O_NOFOLLOW, so a name
that is a link (or a FIFO) is refused instead of followed. Sockets get their mode from the
umask at bind and their group with lchown: nothing follows a path after bind.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import stat
from pathlib import Path
from typing import Iterator

from flexnpu import paths


class RuntimeDirError(RuntimeError):
    """The runtime dir is not one this process may trust; the message says why and what to do."""


def trusted_uids() -> set[int]:
    """Owners a runtime dir may have: root, this process's user, the service user."""
    out = {0, os.geteuid()}
    with contextlib.suppress(KeyError):
        out.add(pwd.getpwnam(paths.service_user()).pw_uid)
    return out


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _fix_hint(rdir: Path) -> str:
    return (f"use a directory owned by root (or by the user that runs FlexNPU) that only its owner can "
            f"write (chown root {rdir} && chmod 0755 {rdir}), or set FLEXNPU_RUNTIME_DIR to one")


def problem_with(st: os.stat_result, rdir: Path) -> str | None:
    """Why a runtime dir with this stat may not be trusted, or None."""
    if not stat.S_ISDIR(st.st_mode):
        return f"the runtime dir {rdir} is not a directory"
    if st.st_uid not in trusted_uids():
        return (f"the runtime dir {rdir} belongs to {_owner_name(st.st_uid)}: its owner could plant links "
                f"under the names FlexNPU writes; {_fix_hint(rdir)}")
    if st.st_mode & 0o022:
        return (f"the runtime dir {rdir} is writable by others than its owner (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): anyone who may write there can plant links or replace "
                f"sockets; {_fix_hint(rdir)}")
    return None


def _ancestor_problem(rdir: Path) -> str | None:
    ok = trusted_uids()
    for parent in Path(os.path.realpath(rdir)).parents:
        try:
            st = os.stat(parent)
        except OSError as e:
            return f"cannot check {parent} above the runtime dir {rdir}: {e.strerror}"
        if st.st_uid not in ok:
            return (f"{parent}, above the runtime dir {rdir}, belongs to {_owner_name(st.st_uid)}, who could "
                    f"swap the runtime dir for their own; {_fix_hint(rdir)}")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return (f"{parent}, above the runtime dir {rdir}, is writable by others (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}) without the sticky bit: they could swap the runtime "
                    f"dir for their own; {_fix_hint(rdir)}")
    return None


def problem(rdir: Path) -> str | None:
    """Why an existing runtime dir may not be trusted (open_dir's checks), or None."""
    return problem_with(os.stat(rdir), rdir) or _ancestor_problem(rdir)


def open_dir(rdir: Path | None = None, create: bool = True) -> int:
    """An O_DIRECTORY descriptor of the runtime dir, checked (module docstring); made with
    paths.RUNTIME_DIR_MODE when missing and `create`. Raises RuntimeDirError when it may not
    be trusted, OSError (PermissionError included) when it cannot be made or opened."""
    rdir = Path(rdir or paths.runtime_dir())
    if create:
        try:
            os.mkdir(rdir, paths.RUNTIME_DIR_MODE)
            made = True
        except FileExistsError:
            made = False
        except FileNotFoundError:
            rdir.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(rdir, paths.RUNTIME_DIR_MODE)
            made = True
    else:
        made = False
    fd = os.open(rdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if made:
            os.fchmod(fd, paths.RUNTIME_DIR_MODE)  # not the umask's idea of it
        why = problem_with(os.fstat(fd), rdir) or _ancestor_problem(rdir)
        if why:
            raise RuntimeDirError(why)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check(rdir: Path | None = None, create: bool = True) -> None:
    """open_dir's checks alone (for a component that hands the path to another process)."""
    os.close(open_dir(rdir, create))


@contextlib.contextmanager
def opened(rdir: Path | None = None, create: bool = True) -> Iterator[int]:
    fd = open_dir(rdir, create)
    try:
        yield fd
    finally:
        os.close(fd)


def open_file(dirfd: int | None, name: str, flags: int, mode: int = 0o600) -> int:
    """A regular file `name` in the directory dirfd (None: name is a path), never through a
    link (ELOOP) and never a FIFO or device (opened non-blocking, checked, then made blocking
    again)."""
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY, mode, dir_fd=dirfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{name} in the runtime dir is not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def new_file(dirfd: int, name: str, mode: int, data: bytes = b"") -> int:
    """A fresh file under `name`, holding data, open read-write: made under a temporary name
    and renamed over the old one, so a link (or anyone's file) planted under the name is
    replaced, never followed, and a reader never sees it half-written."""
    tmp = f".{name}.{os.getpid()}.new"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dirfd)  # left by a process of this pid that died here
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)  # not the umask's idea of it
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dirfd)
        raise
    return fd


def write_file(dirfd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """Replaces `name` with data, atomically (new_file)."""
    os.close(new_file(dirfd, name, mode, data))


def read_small(dirfd: int | None, name: str, limit: int = 4096) -> bytes | None:
    """The first `limit` bytes of a regular file in the dir (None: name is a path), or None
    (missing, a link, not regular)."""
    try:
        fd = open_file(dirfd, name, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def client_gid(group: str | None = None) -> int | None:
    """The clients' group id, or None when the node has no such group."""
    try:
        return grp.getgrnam(group or paths.CLIENT_GROUP).gr_gid
    except KeyError:
        return None


@contextlib.contextmanager
def socket_mode(mode: int) -> Iterator[None]:
    """The umask that makes a socket file `mode` at bind: set for the bind only, so there is
    never a moment at which the file is wider than meant, and no chmod by path after it."""
    old = os.umask(0o777 & ~mode)
    try:
        yield
    finally:
        os.umask(old)


def give_group(path: Path, gid: int | None) -> None:
    """Gives a just-bound socket file to gid without following a link (lchown): if the name
    was swapped for a link since the bind, only the link changes."""
    if gid is not None:
        os.chown(path, -1, gid, follow_symlinks=False)


def bind_published(zsock, path: Path) -> None:
    """Binds a zmq socket on ipc://path as a publishing socket (observe.sock,
    controller.sock): paths.PUBLISH_SOCKET_MODE in the clients' group, the owner's alone
    (GROUPLESS_MODE) on a node without the group."""
    gid = client_gid()
    with socket_mode(paths.PUBLISH_SOCKET_MODE if gid is not None else paths.GROUPLESS_MODE):
        zsock.bind(f"ipc://{path}")
    give_group(path, gid)
