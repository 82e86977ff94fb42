"""Start, stop and query the emulator's device server.

The server is a native process (flexnpu-emu-server) listening on
$RUNTIME_DIR/emu.sock. Its pid is kept in $RUNTIME_DIR/emu.pid and its log in
$RUNTIME_DIR/emu.log. Status is asked over the same socket the client library uses.

Who may use it: root, the server's own user and the members of paths.CLIENT_GROUP (the
server checks every connection's peer credentials; emu.sock is 0660 in that group). Every
failure here is an EmulatorError whose message is one line that says what to do.
"""

from __future__ import annotations

import grp
import json
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Sequence

from flexnpu import paths, rundir
from flexnpu.emulator.profiles import PROFILES

# struct emu_req in emu_shared.h: uint32 type, int32 device, uint64 a, uint64 b, char name[48]
_REQ = struct.Struct("<IiQQ48s")
_REQ_STATUS = 6
# struct emu_rep: int32 err, uint32 pad, uint64 a, uint64 b (a refusal: err 207006, a = gid)
_REP = struct.Struct("<iIQQ")
_NO_PERMISSION = 207006  # ACL_ERROR_RT_NO_PERMISSION
_NO_GROUP = (1 << 64) - 1
# contexts: as an Ascend device shares itself (the default); serial: one op at a time;
# shared: ideal fluid sharing, an upper bound like MPS, not Ascend (docs/emulator.md)
MODES = ("contexts", "serial", "shared")
DEFAULT_MODE = "contexts"


class EmulatorError(RuntimeError):
    """The emulator could not do what was asked; the message says what to do."""


class EmulatorNotRunning(EmulatorError):
    pass


class EmulatorPermissionError(EmulatorError):
    """This user may not do that with the emulator (not root, not in the client group)."""


def _group_name(gid: int | None) -> str | None:
    if gid is None or gid == 0:
        return None
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _who_may_use(group: str | None) -> str:
    if group:
        return f"root and the {group} group; ask an administrator to add you to it (usermod -aG {group} USER)"
    return (f"root only (this node has no {paths.CLIENT_GROUP} group); ask an administrator to create it "
            f"(groupadd {paths.CLIENT_GROUP}) and restart the emulator")


def _socket_refusal(path: Path) -> EmulatorPermissionError:
    """What a user told EACCES by the socket's mode reads: who it is for, from its group."""
    try:
        st = path.stat()
        group = _group_name(st.st_gid) if st.st_mode & 0o020 else None
    except OSError:
        group = None
    return EmulatorPermissionError(f"permission denied: the emulator at {path} is for {_who_may_use(group)}")


def _runtime_dir_problem(rdir: Path) -> str | None:
    """Why rdir cannot be the runtime dir, or None."""
    try:
        if rdir.is_dir():
            return None
        os.stat(rdir)
    except FileNotFoundError:
        return None  # start makes it
    except NotADirectoryError:
        pass  # a file on the way to it
    except OSError as e:
        return f"cannot use {rdir} as the runtime dir: {e.strerror}"
    return (f"FLEXNPU_RUNTIME_DIR={rdir} is not a directory; set it to a directory "
            f"(default {paths.DEFAULT_RUNTIME_DIR})")


_PIDFILE = "emu.pid"
_LOGFILE = "emu.log"


def _read_pid(rdir: Path, dirfd: int) -> int | None:
    """The pid in emu.pid (in dirfd, the runtime dir rdir) if it is this runtime dir's device
    server: a stale file whose pid now names another process must not get that process
    signalled."""
    try:
        pid = int((rundir.read_small(dirfd, _PIDFILE) or b"").strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    sock = os.fsencode(paths.emulator_socket(rdir))
    if not argv[0].endswith(b"flexnpu-emu-server") or sock not in argv:
        return None
    return pid


def _owner(pid: int) -> str:
    try:
        import pwd  # noqa: PLC0415

        return pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name
    except (OSError, KeyError):
        return "another user"


def is_running(rdir: Path | None = None) -> bool:
    """True if a device server answers on the runtime dir's socket."""
    try:
        status(rdir, timeout=1.0)
        return True
    except EmulatorError:
        return False


def status(rdir: Path | None = None, timeout: float = 5.0) -> dict:
    """The server's ground truth: per device and per client process, busy time (total and by
    kernel name), bytes copied by direction, device memory in use."""
    rdir = Path(rdir or paths.runtime_dir())
    problem = _runtime_dir_problem(rdir)
    if problem:
        raise EmulatorNotRunning(problem)
    path = paths.emulator_socket(rdir)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
            raise EmulatorNotRunning(
                f"no emulator running at {path} ({e.strerror}); start it with `flexnpu emu start`"
            ) from None
        except PermissionError:
            raise _socket_refusal(path) from None
        s.sendall(_REQ.pack(_REQ_STATUS, 0, 0, 0, b""))
        chunks = []
        while True:
            part = s.recv(1 << 16)
            if not part:
                break
            chunks.append(part)
    except OSError as e:
        raise EmulatorError(f"emulator at {path} did not answer: {e}") from None
    finally:
        s.close()
    data = b"".join(chunks)
    if len(data) == _REP.size and not data.startswith(b"{"):
        err, _, gid, _ = _REP.unpack(data)
        if err == _NO_PERMISSION:  # the server's own check (the socket's mode let us in)
            raise EmulatorPermissionError(f"permission denied: the emulator at {path} is for "
                                          f"{_who_may_use(None if gid == _NO_GROUP else _group_name(gid))}")
    try:
        return json.loads(data)
    except ValueError:
        raise EmulatorError(f"the emulator at {path} sent a malformed status ({len(data)} bytes); "
                            "see emu.log beside it") from None


def start(
    devices: int = 8,
    profile: str = "910b",
    mode: str = DEFAULT_MODE,
    time_scale: float = 1.0,
    rdir: Path | None = None,
    foreground: bool = False,
    timeout: float = 10.0,
    partition: str | None = None,
    context_switch_us: float | None = None,
    wrap: Sequence[str] = (),
) -> int:
    """Starts the device server; returns its pid. `mode` is one mode for all devices or a
    comma list with one per device. With foreground=True, runs it in this process's place.
    `partition` ("prefill=0.6,decode=0.4"): every device split by role in fixed shares of its
    compute and bandwidth, like Ascend's vNPU templates (docs/emulator.md).
    `context_switch_us`: the contexts mode's switch cost, instead of the profile's.
    `wrap`: a command that execs the server (e.g. nsenter into a network namespace), so the
    pid returned is still the server's."""
    rdir = Path(rdir or paths.runtime_dir())
    if profile not in PROFILES:
        raise EmulatorError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    modes = mode.split(",")
    if any(m not in MODES for m in modes) or len(modes) not in (1, devices):
        raise EmulatorError(
            f"--mode takes {', '.join(MODES)}, or a comma list with one per device ({devices}); got {mode!r}"
        )
    if context_switch_us is not None and not 0 <= context_switch_us < float("inf"):
        raise EmulatorError(f"--context-switch-us must be >= 0 and finite, got {context_switch_us}")
    if not 1 <= devices <= 16:
        raise EmulatorError(f"--devices must be between 1 and 16, got {devices}")
    if not 0 < time_scale < float("inf"):
        raise EmulatorError(f"--time-scale must be positive and finite, got {time_scale}")
    if partition is not None:
        parse_partition(partition)
    binary = paths.emulator_server_binary()
    if not binary.exists():
        raise EmulatorError(f"{binary} is missing; reinstall FlexNPU (pip install .)")
    argv = [
        str(binary),
        "--socket", str(paths.emulator_socket(rdir)),
        "--devices", str(devices),
        "--mode", mode,
        "--time-scale", repr(time_scale),
        *PROFILES[profile].server_args(),
        *(["--context-switch-us", repr(context_switch_us)] if context_switch_us is not None else []),
        *(["--partition", partition] if partition else []),
        "--client-group", paths.CLIENT_GROUP,
    ]
    if wrap and not foreground:
        argv = [*wrap, *argv]
    dirfd = _prepare_runtime_dir(rdir)
    try:
        return _launch(argv, rdir, dirfd, foreground, timeout)
    finally:
        os.close(dirfd)


def _launch(argv: list[str], rdir: Path, dirfd: int, foreground: bool, timeout: float) -> int:
    try:
        status(rdir, timeout=1.0)
        running = True
    except EmulatorPermissionError:
        raise
    except EmulatorError:
        running = False
    if running:
        raise EmulatorError(f"an emulator is already running at {paths.emulator_socket(rdir)}; "
                            "stop it with `flexnpu emu stop`")
    try:
        if foreground:
            rundir.write_file(dirfd, _PIDFILE, f"{os.getpid()}\n".encode())
            os.execv(argv[0], argv)
        logfd = rundir.open_file(dirfd, _LOGFILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=logfd, stdin=subprocess.DEVNULL, start_new_session=True
            )
        finally:
            os.close(logfd)
    except OSError as e:
        raise EmulatorError(f"cannot start {argv[0]}: {e.strerror or e} ({e.filename or rdir})") from None
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()  # "ready" once it listens; EOF if it died
    proc.stdout.close()
    if line.strip() != b"ready":
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        tail = _log_tail(dirfd).splitlines()[-1:] or [""]
        raise EmulatorError(f"the emulator failed to start: {tail[0]}")
    rundir.write_file(dirfd, _PIDFILE, f"{proc.pid}\n".encode())
    return proc.pid


def _log_tail(dirfd: int, size: int = 4096) -> str:
    try:
        fd = rundir.open_file(dirfd, _LOGFILE, os.O_RDONLY)
    except OSError:
        return ""
    try:
        end = os.fstat(fd).st_size
        return os.pread(fd, size, max(0, end - size)).decode(errors="replace").strip()
    finally:
        os.close(fd)


def _prepare_runtime_dir(rdir: Path) -> int:
    """Makes the runtime dir (0755: the sockets' own modes decide who may use them) or checks
    that it may be trusted (flexnpu.rundir) and that this user can create the emulator's files
    in it; its descriptor, for the files to be made relative to it."""
    problem = _runtime_dir_problem(rdir)
    if problem:
        raise EmulatorError(problem)
    hint = ("start the emulator as root (sudo flexnpu emu start) or set FLEXNPU_RUNTIME_DIR to a "
            "directory you own")
    try:
        dirfd = rundir.open_dir(rdir, create=True)
    except rundir.RuntimeDirError as e:
        raise EmulatorError(str(e)) from None
    except PermissionError:
        raise EmulatorPermissionError(f"permission denied: cannot create {rdir}; {hint}") from None
    except OSError as e:
        raise EmulatorError(f"cannot create the runtime dir {rdir}: {e.strerror}") from None
    if not os.access(rdir, os.W_OK | os.X_OK):
        os.close(dirfd)
        raise EmulatorPermissionError(f"permission denied: cannot write in {rdir}; {hint}")
    return dirfd


def parse_partition(spec: str) -> dict[str, float]:
    """{"prefill": s, "decode": s} from "prefill=S,decode=S" (the server checks the same)."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        role, eq, val = part.partition("=")
        try:
            x = float(val) if eq else float("nan")
        except ValueError:
            x = float("nan")
        if role not in ("prefill", "decode") or not 0 < x <= 1:
            raise EmulatorError(f"--partition takes prefill=S,decode=S with shares in (0, 1], got {spec!r}")
        out[role] = x
    if len(out) != 2 or sum(out.values()) > 1 + 1e-9:
        raise EmulatorError(f"--partition needs both prefill and decode shares adding up to at most 1, got {spec!r}")
    return out


def stop(rdir: Path | None = None, timeout: float = 5.0) -> bool:
    """Stops the server (SIGTERM, then SIGKILL after `timeout`). False if none was running."""
    rdir = Path(rdir or paths.runtime_dir())
    problem = _runtime_dir_problem(rdir)
    if problem:
        raise EmulatorError(problem)
    try:
        with rundir.opened(rdir, create=False) as dirfd:  # a pid file in someone else's dir names whatever they like
            pid = _read_pid(rdir, dirfd)
    except FileNotFoundError:
        return False
    except rundir.RuntimeDirError as e:
        raise EmulatorError(str(e)) from None
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    except PermissionError:
        raise EmulatorPermissionError(f"permission denied: the emulator at {rdir} (pid {pid}) runs as "
                                      f"{_owner(pid)}; stop it as that user or root (sudo flexnpu emu stop)") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
    for f in (rdir / _PIDFILE, paths.emulator_socket(rdir)):  # unlink never follows a link
        try:
            f.unlink(missing_ok=True)
        except OSError:
            pass  # the server removes its socket itself; a stale pid file is ignored (_read_pid)
    return True


def emulator_env(rdir: Path | None = None) -> dict[str, str]:
    """Environment that makes a program load the emulated libascendcl.so, as CANN's
    set_env.sh does for the real one."""
    env = {"FLEXNPU_RUNTIME_DIR": str(rdir or paths.runtime_dir())}
    lib = str(paths.native_lib_dir())
    old = os.environ.get("LD_LIBRARY_PATH", "")
    env["LD_LIBRARY_PATH"] = lib + (":" + old if old else "")
    return env
