"""What /proc says about processes: which runtime libraries a process maps (from
/proc/<pid>/maps, so a CANN install at any path, or the emulator, is found), its name, and
the role the shim was given (FLEXNPU_ROLE in its environment)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class MappedLibrary:
    """A runtime library file as one process maps it."""

    soname: str  # the profile's library name it matched (libascendcl.so)
    path: str  # as the process sees it
    dev: int  # st_dev of the file, from the maps line
    inode: int

    @property
    def key(self) -> tuple[int, int]:
        """The file's identity: uprobes attach to an inode, whatever the path."""
        return (self.dev, self.inode)


def matches(name: str, soname: str) -> bool:
    """libascendcl.so, or a versioned libascendcl.so.1.2."""
    return name == soname or (name.startswith(soname + ".") and name[len(soname) + 1:][:1].isdigit())


def mapped_libraries(pid: int, sonames: tuple[str, ...]) -> dict[str, MappedLibrary]:
    """The runtime libraries (by soname) pid maps; empty if none. Raises
    ProcessLookupError if pid does not exist, PermissionError if its maps are not ours to read."""
    try:
        text = (PROC / str(pid) / "maps").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    found: dict[str, MappedLibrary] = {}
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        path = parts[5]
        if path.endswith(" (deleted)"):
            continue
        name = path.rsplit("/", 1)[-1]
        for so in sonames:
            if so not in found and matches(name, so):
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                found[so] = MappedLibrary(so, path, os.makedev(major, minor), int(parts[4]))
    return found


def attach_path(pid: int, lib: MappedLibrary) -> str:
    """A path to the same file from this mount namespace: the process's own path if it is
    the same inode here, else through /proc/<pid>/root (a container's filesystem)."""
    for cand in (lib.path, f"/proc/{pid}/root{lib.path}"):
        try:
            st = os.stat(cand)
        except OSError:
            continue
        if st.st_ino == lib.inode:
            return cand
    return lib.path


def exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie has exited: it makes no more calls
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


EXECUTOR_NAME = "flexnpu-executor"


def is_executor(pid: int, known: Path | None = None) -> bool:
    """Whether pid runs a device's executor (forwarded execution): its executable, which the
    process cannot rename, is the executor of this install (`known`, same file), or a file
    named flexnpu-executor that belongs to root and that nobody else may write (another
    install's, started by its daemon). A copy of some program named so by a user is not."""
    try:
        exe = os.readlink(PROC / str(pid) / "exe")
        st = os.stat(PROC / str(pid) / "exe")
    except OSError:
        return False
    if exe.endswith(" (deleted)"):
        exe = exe[:-len(" (deleted)")]
    if known is not None:
        try:
            k = os.stat(known)
            if (k.st_dev, k.st_ino) == (st.st_dev, st.st_ino):
                return True
        except OSError:
            pass
    return exe.rsplit("/", 1)[-1] == EXECUTOR_NAME and st.st_uid == 0 and not st.st_mode & 0o022


def comm(pid: int) -> str:
    try:
        return (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return "?"


def env_role(pid: int) -> str | None:
    """FLEXNPU_ROLE from the process's environment at exec (prefill or decode), else None."""
    try:
        env = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    m = re.search(rb"(?:^|\0)FLEXNPU_ROLE=([^\0]*)", env)
    role = m.group(1).decode(errors="replace").strip() if m else ""
    return role if role in ROLES else None


def pids() -> list[int]:
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]
