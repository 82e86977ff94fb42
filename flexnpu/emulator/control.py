"""Start, stop and query the emulator's device server.

The server is a native process (flexnpu-emu-server) listening on
$RUNTIME_DIR/emu.sock. Its pid is kept in $RUNTIME_DIR/emu.pid and its log in
$RUNTIME_DIR/emu.log. Status is asked over the same socket the client library uses.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

from flexnpu import paths
from flexnpu.emulator.profiles import PROFILES

# struct emu_req in emu_shared.h: uint32 type, int32 device, uint64 a, uint64 b, char name[48]
_REQ = struct.Struct("<IiQQ48s")
_REQ_STATUS = 6
MODES = ("serial", "shared")


class EmulatorError(RuntimeError):
    """The emulator could not do what was asked; the message says what to do."""


class EmulatorNotRunning(EmulatorError):
    pass


def _pidfile(rdir: Path) -> Path:
    return rdir / "emu.pid"


def _read_pid(rdir: Path) -> int | None:
    try:
        pid = int(_pidfile(rdir).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


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
    path = paths.emulator_socket(rdir)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise EmulatorNotRunning(
                f"no emulator running at {path} ({e.strerror}); start it with `flexnpu emu start`"
            ) from None
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
    return json.loads(b"".join(chunks))


def start(
    devices: int = 8,
    profile: str = "910b",
    mode: str = "serial",
    time_scale: float = 1.0,
    rdir: Path | None = None,
    foreground: bool = False,
    timeout: float = 10.0,
) -> int:
    """Starts the device server; returns its pid. `mode` is one mode for all devices or a
    comma list with one per device. With foreground=True, runs it in this process's place."""
    rdir = rdir or paths.runtime_dir()
    if profile not in PROFILES:
        raise EmulatorError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    modes = mode.split(",")
    if any(m not in MODES for m in modes) or len(modes) not in (1, devices):
        raise EmulatorError(
            f"--mode takes serial or shared, or a comma list with one per device ({devices}); got {mode!r}"
        )
    if not 1 <= devices <= 16:
        raise EmulatorError(f"--devices must be between 1 and 16, got {devices}")
    if not time_scale > 0:
        raise EmulatorError(f"--time-scale must be positive, got {time_scale}")
    binary = paths.emulator_server_binary()
    if not binary.exists():
        raise EmulatorError(f"{binary} is missing; reinstall FlexNPU (pip install .)")
    rdir.mkdir(parents=True, exist_ok=True)
    if is_running(rdir):
        raise EmulatorError(f"an emulator is already running at {paths.emulator_socket(rdir)}; "
                            "stop it with `flexnpu emu stop`")
    argv = [
        str(binary),
        "--socket", str(paths.emulator_socket(rdir)),
        "--devices", str(devices),
        "--mode", mode,
        "--time-scale", repr(time_scale),
        *PROFILES[profile].server_args(),
    ]
    if foreground:
        _pidfile(rdir).write_text(f"{os.getpid()}\n")
        os.execv(argv[0], argv)
    log = open(rdir / "emu.log", "ab")
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
    )
    log.close()
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline()  # "ready" once it listens; EOF if it died
    proc.stdout.close()
    if line.strip() != b"ready":
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        tail = (rdir / "emu.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise EmulatorError(f"the emulator failed to start: {tail[0]}")
    _pidfile(rdir).write_text(f"{proc.pid}\n")
    return proc.pid


def stop(rdir: Path | None = None, timeout: float = 5.0) -> bool:
    """Stops the server (SIGTERM, then SIGKILL after `timeout`). False if none was running."""
    rdir = rdir or paths.runtime_dir()
    pid = _read_pid(rdir)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
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
    _pidfile(rdir).unlink(missing_ok=True)
    paths.emulator_socket(rdir).unlink(missing_ok=True)
    return True


def emulator_env(rdir: Path | None = None) -> dict[str, str]:
    """Environment that makes a program load the emulated libascendcl.so, as CANN's
    set_env.sh does for the real one."""
    env = {"FLEXNPU_RUNTIME_DIR": str(rdir or paths.runtime_dir())}
    lib = str(paths.native_lib_dir())
    old = os.environ.get("LD_LIBRARY_PATH", "")
    env["LD_LIBRARY_PATH"] = lib + (":" + old if old else "")
    return env
