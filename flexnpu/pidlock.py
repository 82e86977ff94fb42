"""One instance per node: an flock on $RUNTIME_DIR/<name>.lock, a file holding the holder's pid.

`flexnpu observe` and `flexnpu controller` bind a fixed socket name; a second one would take
the name over (zmq's ipc bind replaces the file) and leave the first running unreachable.
The kernel drops an flock when its holder exits, however it exits, so a stale file never
blocks a new start, and two starts at the same moment cannot both win, which a check of the
socket or of the pid in the file could not promise.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class AlreadyRunning(Exception):
    """Another process holds the lock; pid is the one it wrote (None if unreadable)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path} is held by pid {pid}")
        self.path = path
        self.pid = pid


def holder(path: Path) -> int | None:
    """The pid written in a lock file, or None."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class PidLock:
    """Held from acquire() until release() or the process's exit. Raises AlreadyRunning
    when another live process holds it, OSError (PermissionError included) when this
    process cannot create or write the file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self) -> PidLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError:
            # someone else's file (a root observer's): say who holds it if anyone does
            self._refuse_if_held()
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(self.path, holder(self.path)) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def _refuse_if_held(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(self.path, holder(self.path)) from None
        finally:
            os.close(fd)

    def release(self) -> None:
        # the file stays: were it unlinked, a process that had opened the old file could lock
        # it while another creates and locks a new one, and both would run
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> PidLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
