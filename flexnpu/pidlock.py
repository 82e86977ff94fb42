"""One instance per node: an flock on $RUNTIME_DIR/<name>.lock, a file holding the holder's pid.

`flexnpu observe` and `flexnpu controller` bind a fixed socket name; a second one would take
the name over (zmq's ipc bind replaces the file) and leave the first running unreachable.
The kernel drops an flock when its holder exits, however it exits, so a stale file never
blocks a new start, and two starts at the same moment cannot both win, which a check of the
socket or of the pid in the file could not promise.

An flock can be taken by anyone who can open the file, even read-only, so the lock file is
its owner's alone (0600) in a runtime dir nobody else may write (flexnpu.rundir): a user
who may not run the service cannot hold the lock to keep it from starting. A lock file left
by an older version with a wider mode, or owned by someone else, is replaced by a fresh one
(rename over it), and a lock is only believed once the file locked is still the one the
name points at, so two starters racing through a replacement cannot both win.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from flexnpu import paths, rundir

LOCK_MODE = paths.LOCK_FILE_MODE


class AlreadyRunning(Exception):
    """Another process holds the lock; pid is the one it wrote (None if unreadable)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path} is held by pid {pid}")
        self.path = path
        self.pid = pid


def holder(path: Path) -> int | None:
    """The pid written in a lock file, or None (unreadable, not a regular file, a link)."""
    text = (rundir.read_small(None, str(path), 64) or b"").decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


class PidLock:
    """Held from acquire() until release() or the process's exit. Raises AlreadyRunning
    when another live process holds it, rundir.RuntimeDirError when the runtime dir may not
    be trusted, OSError (PermissionError included) when this process cannot create or write
    the file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self) -> PidLock:
        name = self.path.name
        try:
            dirfd = rundir.open_dir(self.path.parent, create=True)
        except PermissionError:
            # someone else's runtime dir (a root observer's): say who holds it if anyone does
            self._refuse_if_held()
            raise
        try:
            for _ in range(8):  # a replacement racing ours: look again
                fd = self._open(dirfd, name)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise AlreadyRunning(self.path, holder(self.path)) from None
                except BaseException:
                    os.close(fd)
                    raise
                if self._still_named(dirfd, name, fd):
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                    self.fd = fd
                    return self
                os.close(fd)
            raise OSError(f"{self.path} keeps being replaced while it is locked")
        finally:
            os.close(dirfd)

    @staticmethod
    def _open(dirfd: int, name: str) -> int:
        """The lock file, ours and 0600; a file that is not (another owner, a wider mode, a
        link, not a regular file) is replaced by a new one first."""
        try:
            fd = rundir.open_file(dirfd, name, os.O_RDWR | os.O_CREAT, LOCK_MODE)
        except OSError:
            fd = -1
        if fd >= 0:
            st = os.fstat(fd)
            if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == LOCK_MODE:
                return fd
            os.close(fd)
        # a fresh file under the name; whoever had the old one open locks an orphan
        return rundir.new_file(dirfd, name, LOCK_MODE)

    @staticmethod
    def _still_named(dirfd: int, name: str, fd: int) -> bool:
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def _refuse_if_held(self) -> None:
        try:
            fd = rundir.open_file(None, str(self.path), os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(self.path, holder(self.path)) from None
        except OSError:
            return
        finally:
            os.close(fd)

    def release(self) -> None:
        # the file stays: were it unlinked, a process that had opened the old file could lock
        # it while another creates and locks a new one (the name check above is what makes a
        # replacement safe, and only the starter does it)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> PidLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

