"""Every name that crosses components: where FlexNPU keeps its runtime files and sockets,
where it finds its native parts and its configuration.

Change a name here only: the shim (C) reads the runtime dir from $FLEXNPU_RUNTIME_DIR and
builds the admission socket's name with the same pattern (flexnpu/forward/native/shim/shim.c).
"""

from __future__ import annotations

import os
import re
import sysconfig
from functools import cache
from pathlib import Path

DEFAULT_RUNTIME_DIR = "/run/flexnpu"
DEFAULT_CONFIG = "/etc/flexnpu/flexnpu.toml"
SERVICE_KEYS_DIR = "/etc/flexnpu/keys"  # CURVE keys of the services (flexnpu/remote/keys.py)
USER_KEYS_DIR = "~/.config/flexnpu/keys"  # a user's own (under $XDG_CONFIG_HOME when set)

# The trust boundary on a node: who may use FlexNPU's sockets and files (docs/service.md).
# The services run as SERVICE_USER, whose group is CLIENT_GROUP (the forward layer's group of
# users who may run gated programs); the admin sockets are the service user's own. The modes
# below are what each component sets when it creates the file, and what `flexnpu doctor`
# expects: change a mode here and in the component at once. "_GROUPLESS": the mode when the
# node has no CLIENT_GROUP (the forward layer then keeps the file to its owner).
SERVICE_USER = "flexnpu"
SERVICE_GROUP = "flexnpu"  # == CLIENT_GROUP below: the services' group is the clients' group
RUNTIME_DIR_MODE = 0o755  # RuntimeDirectoryMode= of every unit: clients of any user reach the sockets
EMU_SOCKET_MODE = 0o660  # emu.sock (flexnpu-emu-server's umask 0117)
CLIENT_SOCKET_MODE = 0o660  # daemon-<dev>.sock (read API), gate-<dev>.sock (admission): CLIENT_GROUP
ADMIN_SOCKET_MODES = (0o600, 0o660)  # daemon-<dev>.admin.sock: the daemon's user (0660: --admin-group)
PUBLISH_SOCKET_MODE = 0o660  # observe.sock, controller.sock (zmq PUB): CLIENT_GROUP reads snapshots, decisions
LOCK_FILE_MODE = 0o600  # observe.lock, controller.lock: an flock is for whoever may run the service alone
GATE_TABLE_MODE = 0o640  # gate-<dev>.ctl: written by the daemon, read (mapped read-only) by CLIENT_GROUP
GROUPLESS_MODE = 0o600  # any of the above but emu.sock when there is no CLIENT_GROUP


def service_user() -> str:
    """The services' user: $FLEXNPU_SERVICE_USER (tests), else SERVICE_USER."""
    return os.environ.get("FLEXNPU_SERVICE_USER") or SERVICE_USER


def service_group() -> str:
    """The services' group: $FLEXNPU_SERVICE_GROUP (tests), else SERVICE_GROUP (CLIENT_GROUP)."""
    return os.environ.get("FLEXNPU_SERVICE_GROUP") or SERVICE_GROUP


@cache
def _native() -> Path:
    """flexnpu/_native beside this module when installed; when the package is imported from
    a source checkout (python -m from the repo root), the interpreter's installed copy."""
    here = Path(__file__).resolve().parent / "_native"
    if here.is_dir() or os.environ.get("FLEXNPU_NATIVE_DIR"):
        return Path(os.environ.get("FLEXNPU_NATIVE_DIR") or here)
    for key in ("platlib", "purelib"):
        cand = Path(sysconfig.get_paths()[key]) / "flexnpu" / "_native"
        if cand.is_dir():
            return cand
    return here


def runtime_dir() -> Path:
    """The runtime directory: $FLEXNPU_RUNTIME_DIR, else /run/flexnpu."""
    return Path(os.environ.get("FLEXNPU_RUNTIME_DIR") or DEFAULT_RUNTIME_DIR)


def native_dir() -> Path:
    """The installed native parts (lib/, bin/, include/, share/)."""
    return _native()


def native_lib_dir() -> Path:
    return _native() / "lib"


def emulator_library() -> Path:
    """The emulated libascendcl.so."""
    return native_lib_dir() / "libascendcl.so"


def emulator_server_binary() -> Path:
    return _native() / "bin" / "flexnpu-emu-server"


def acl_include_dir() -> Path:
    """The AscendCL headers (acl/acl.h) programs and the shim compile against."""
    return _native() / "include"


def emulator_kernel_library() -> Path:
    """The emulator's default kernel library file (kernels.fxk)."""
    return _native() / "share" / "kernels.fxk"


def emulator_socket(rdir: Path | None = None) -> Path:
    return (rdir or runtime_dir()) / "emu.sock"


def observe_socket(rdir: Path | None = None) -> Path:
    """`flexnpu observe` publishes snapshots here (zmq PUB)."""
    return Path(rdir or runtime_dir()) / "observe.sock"


def controller_socket(rdir: Path | None = None) -> Path:
    """`flexnpu controller` publishes its decisions here (zmq PUB)."""
    return Path(rdir or runtime_dir()) / "controller.sock"


CLIENT_GROUP = "flexnpu"  # may run gated programs and read gates; see docs/security.md


def daemon_socket(device: int, rdir: Path | None = None) -> Path:
    """The forwarding daemon's read-only control API (ping, list; zmq REP, 0660 root:flexnpu)."""
    return Path(rdir or runtime_dir()) / f"daemon-{device}.sock"


DAEMON_SOCKET = re.compile(r"^daemon-(\d+)\.sock$")  # daemon_socket's name; group 1: the device
GATE_SOCKET = re.compile(r"^gate-(\d+)\.sock$")  # gate_socket's name; group 1: the device


def daemon_devices(rdir: Path | None = None) -> list[int]:
    """The devices whose forwarding daemon's read socket is in the runtime dir, in order
    (none when the directory cannot be read)."""
    try:
        names = os.listdir(rdir or runtime_dir())
    except OSError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := DAEMON_SOCKET.match(n)))


def daemon_admin_socket(device: int, rdir: Path | None = None) -> Path:
    """The forwarding daemon's admin control API (every command; zmq REP, 0600 root, or 0660
    root:<admin group> with `flexnpu daemon --admin-group`)."""
    return Path(rdir or runtime_dir()) / f"daemon-{device}.admin.sock"


def gate_socket(device: int, rdir: Path | None = None) -> Path:
    """A device's admission socket: the shim connects here to be admitted (unix SOCK_SEQPACKET)."""
    return Path(rdir or runtime_dir()) / f"gate-{device}.sock"


def executor_socket(device: int, rdir: Path | None = None) -> Path:
    """A device's executor: forwarded clients connect here once admitted (unix SOCK_SEQPACKET,
    made and held by the daemon, so it outlives an executor's restart)."""
    return Path(rdir or runtime_dir()) / f"exec-{device}.sock"


def executor_binary() -> Path:
    """The executor of one device (started by its daemon)."""
    return _native() / "bin" / "flexnpu-executor"


def forward_shim_library() -> Path:
    """The shim's forward build: every AscendCL call goes to the device's executor."""
    return native_lib_dir() / "libflexnpu_fwd.so"


def gate_table(device: int, rdir: Path | None = None) -> Path:
    """A device's gate table, gate-N.ctl (daemon-written; clients map it read-only)."""
    return Path(rdir or runtime_dir()) / f"gate-{device}.ctl"


def config_file() -> Path:
    """The node's configuration: $FLEXNPU_CONFIG, else /etc/flexnpu/flexnpu.toml."""
    return Path(os.environ.get("FLEXNPU_CONFIG") or DEFAULT_CONFIG)


def keys_dir() -> Path:
    """Where CURVE key pairs, authorized clients and known servers live: $FLEXNPU_KEYS_DIR;
    else SERVICE_KEYS_DIR for root and the service user; else the user's own
    ($XDG_CONFIG_HOME/flexnpu/keys, ~/.config/flexnpu/keys)."""
    if os.environ.get("FLEXNPU_KEYS_DIR"):
        return Path(os.environ["FLEXNPU_KEYS_DIR"])
    import pwd

    try:
        me = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        me = ""
    if os.geteuid() == 0 or me == service_user():
        return Path(SERVICE_KEYS_DIR)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return Path(xdg) / "flexnpu" / "keys" if xdg else Path(USER_KEYS_DIR).expanduser()
