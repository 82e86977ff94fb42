"""The guard of a LocalNode: a small process that stops what the node started, and removes its
temporary runtime dir, when the node's owner dies without stopping them (kill -9, a crash, an
interpreter that could not unwind).

The owner writes one line per thing to clean up on the guard's stdin, as it starts it:

    pid PID START     a process (START: its start time in /proc/PID/stat, so a pid the
                      kernel has given to another process since is never signalled)
    dir PATH          a directory to remove
    netns NAME        a network namespace to remove, with the links in it (a Topology's)
    file PATH         a file to remove (a Topology's state file)
    done              the owner stopped everything itself: exit without doing anything

End of file without `done` means the owner is gone: the kernel closes its end of the pipe
however it died, which is why this is a pipe and not a parent-death signal (PR_SET_PDEATHSIG
fires when the *thread* that started a child exits, and benchmarks start programs from worker
threads; the device server is started in its own session, by code the node does not own).
The processes get SIGTERM, newest first, then SIGKILL after STOP_S; processes that carry the
runtime dir in their environment or command line (children of children, or one started just
as the owner died) are swept the same way; then the directories are removed, and the network
namespaces (their links first, so that a veth goes even while a straggler keeps its node's
namespace alive) and the files.

The guard runs in its own session and ignores SIGINT and SIGHUP: a closed terminal or Ctrl-C
is the owner's to handle, and the guard must outlive it.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

from flexnpu.forward.daemon.access import proc_stat

STOP_S = 5.0  # SIGTERM to SIGKILL, as LocalNode.stop gives each service


def start_time(pid: int) -> int | None:
    """The start time of pid (clock ticks after boot); None if pid runs nothing (or a zombie)."""
    try:
        fields = proc_stat(pid)
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _alive(pid: int, start: int) -> bool:
    return start_time(pid) == start


def _strays(dirs: list[str], uid: int) -> list[tuple[int, int]]:
    """Processes of this user that name one of dirs in their environment or command line."""
    keys = [os.fsencode(d) for d in dirs]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            text = (entry / "environ").read_bytes() + b"\0" + (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if any(k + b"/" in text or k + b"\0" in text or text.endswith(k) for k in keys):
            start = start_time(int(entry.name))
            if start is not None:
                found.append((int(entry.name), start))
    return found


def stop_all(procs: list[tuple[int, int]], timeout: float = STOP_S) -> None:
    """SIGTERM to each (newest first), then SIGKILL to those still there after timeout."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        live = [(p, s) for p, s in reversed(procs) if _alive(p, s)]
        for pid, _ in live:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while live and time.monotonic() < deadline:
            time.sleep(0.02)
            live = [(p, s) for p, s in live if _alive(p, s)]
        if not live:
            return


def dismiss(g: "subprocess.Popen | None") -> None:
    """The owner's side at a clean end: says `done` (the guard then does nothing) and reaps it."""
    import subprocess

    if g is None:
        return
    try:
        g.stdin.write(b"done\n")
        g.stdin.close()
    except OSError:  # the guard is gone (someone killed it)
        pass
    try:
        g.wait(5)
    except subprocess.TimeoutExpired:
        g.kill()
        g.wait()


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    procs: list[tuple[int, int]] = []
    dirs: list[str] = []
    namespaces: list[str] = []
    files: list[str] = []
    for raw in sys.stdin.buffer:
        word, _, rest = raw.rstrip(b"\n").partition(b" ")
        if word == b"done":
            return 0
        if word == b"pid":
            pid, start = rest.split()
            procs.append((int(pid), int(start)))
        elif word == b"dir":
            dirs.append(os.fsdecode(rest))
        elif word == b"netns":
            namespaces.append(os.fsdecode(rest))
        elif word == b"file":
            files.append(os.fsdecode(rest))
    stop_all(procs)
    if dirs:
        stop_all(_strays(dirs, os.getuid()))
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    if namespaces:
        from flexnpu.bench.netns import remove_namespaces

        remove_namespaces(namespaces)
    for f in files:
        try:
            os.unlink(f)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
