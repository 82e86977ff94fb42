"""The systemd units of FlexNPU's services, rendered from one description each.

Four services, all `Type=notify` (each process sends READY=1 through flexnpu/systemd.py, or
the emulator's own sd_notify, once it serves), all as one unprivileged user in the
`flexnpu` group, all sharing /run/flexnpu:

- flexnpu-emu.service         the emulated device server, only where no CANN install is found;
- flexnpu-daemon@<dev>.service the forwarding daemon of one device (a template);
- flexnpu-observe.service     the eBPF observer: the one unit with a capability;
- flexnpu-controller.service  the policy loop.

Why each privilege and sandboxing option is there (or not) is in docs/service.md; the
numbers behind the observer's capability set were measured (tests/test_service_privileges.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flexnpu import paths

EMU = "flexnpu-emu.service"
DAEMON_TEMPLATE = "flexnpu-daemon@.service"
OBSERVE = "flexnpu-observe.service"
CONTROLLER = "flexnpu-controller.service"


def daemon_instance(device: int) -> str:
    return f"flexnpu-daemon@{device}.service"


# The observer's capabilities, measured on Linux 6.18 (docs/service.md): bcc attaches uprobes
# with perf_event_open() on the uprobe PMU, which answers EACCES without CAP_SYS_ADMIN even to a
# process holding CAP_BPF and CAP_PERFMON; CAP_SYS_ADMIN alone passes every check CAP_BPF and
# CAP_PERFMON would (bpf_capable() and perfmon_capable() accept it), so adding them grants nothing.
OBSERVER_CAPS = ("CAP_SYS_ADMIN",)

# Every unit: the same user and group (so RuntimeDirectory= ownership never flips between them),
# no capabilities, a read-only system, no home, no devices, no kernel knobs, UNIX sockets only.
_COMMON_SANDBOX = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RemoveIPC": "yes",
    "PrivateMounts": "yes",
    # every socket is a file in the runtime dir (zmq ipc://, unix sockets): no network at all
    "PrivateNetwork": "yes",
    "RestrictAddressFamilies": "AF_UNIX",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
    "SystemCallErrorNumber": "EPERM",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
}


@dataclass(frozen=True)
class ServiceConfig:
    """What the units are rendered from: found at install time."""

    binary: Path  # the installed `flexnpu` entry point
    devices: tuple[int, ...]  # one daemon per device
    emulator: bool  # no CANN install: run (and order after) the emulated device server
    emu_devices: int = 8  # devices the emulator serves
    user: str = paths.SERVICE_USER
    group: str = paths.SERVICE_GROUP
    config_file: Path = Path(paths.DEFAULT_CONFIG)
    # the configuration asks the observer to serve metrics or publish on TCP ([observe] metrics,
    # [publish] observe_tcp), the controller to publish on TCP ([publish] controller_tcp): their
    # units get IP sockets; every other unit stays without a network
    observe_network: bool = False
    controller_network: bool = False


# What a unit that serves on TCP gets instead of PrivateNetwork=yes and AF_UNIX alone.
_NETWORK = {"PrivateNetwork": "no", "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6"}


def _config_env(cfg: ServiceConfig) -> tuple[str, ...]:
    return () if str(cfg.config_file) == paths.DEFAULT_CONFIG else (f"FLEXNPU_CONFIG={cfg.config_file}",)


@dataclass
class Unit:
    """One unit file: its name and its sections as ordered (key, value) lists; a key "#"
    is a comment line (the reason for the setting after it)."""

    name: str
    unit: list[tuple[str, str]] = field(default_factory=list)
    service: list[tuple[str, str]] = field(default_factory=list)
    install: list[tuple[str, str]] = field(default_factory=lambda: [("WantedBy", "multi-user.target")])

    def text(self) -> str:
        out = ["# Written by `flexnpu service install`; `flexnpu service uninstall` removes it.",
               "# The privileges of each unit, and why: docs/service.md in the FlexNPU sources."]
        for title, items in (("Unit", self.unit), ("Service", self.service), ("Install", self.install)):
            out += ["", f"[{title}]"] + [f"# {v}" if k == "#" else f"{k}={v}" for k, v in items]
        return "\n".join(out) + "\n"


def _service(cfg: ServiceConfig, exec_start: str, sandbox: dict[str, str], status_timeout_s: int = 30,
             extra_env: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    items = [
        ("Type", "notify"),
        ("ExecStart", exec_start),
        ("User", cfg.user),
        ("Group", cfg.group),
        # sockets the services make are 0660/0770 flexnpu:flexnpu unless the code sets its own mode
        ("UMask", "0007"),
        # One directory for every unit. Preserve=yes: when one unit stops or restarts, systemd must
        # not remove the directory that holds the others' sockets and the gate segments the
        # applications map (a restarted daemon adopts its segment from here). It goes at reboot.
        ("RuntimeDirectory", "flexnpu"),
        ("RuntimeDirectoryMode", f"{paths.RUNTIME_DIR_MODE:04o}"),
        ("RuntimeDirectoryPreserve", "yes"),
        ("Environment", f"FLEXNPU_RUNTIME_DIR={paths.DEFAULT_RUNTIME_DIR}"),
        *(("Environment", e) for e in extra_env),
        ("Restart", "on-failure"),
        ("RestartSec", "1s"),
        ("TimeoutStartSec", f"{status_timeout_s}s"),
    ]
    return items + list(sandbox.items())


@dataclass(frozen=True)
class Limits:
    """What one service may hold, each with the reason for its number (a comment above it in
    the unit). A service past MemoryHigh= is slowed and reclaimed from; past MemoryMax= it is
    killed, and Restart=on-failure starts it afresh."""

    nofile: int
    nofile_why: str
    memory_high: str
    memory_max: str
    memory_why: str
    tasks: int
    tasks_why: str

    def items(self) -> list[tuple[str, str]]:
        return [("#", self.nofile_why), ("LimitNOFILE", str(self.nofile)),
                ("#", self.memory_why), ("MemoryHigh", self.memory_high), ("MemoryMax", self.memory_max),
                ("#", self.tasks_why), ("TasksMax", str(self.tasks))]


# Measured on the development VM (Linux 6.18, Python 3.11): the daemon 42 MiB resident and 9
# threads when it serves; the controller's imports 32 MiB; the observer's imports 81 MiB
# before bcc compiles its program with LLVM.
EMU_LIMITS = Limits(
    16384, "descriptors: up to 256 clients, each a connection and a memory file per device (16 at most), "
           "and two files per device; the server raises its soft limit to this",
    "512M", "1G", "memory: the server's own queues and client records; the emulated device memory is "
                  "charged to the applications that touch it",
    64, "tasks: a thread per device (16 at most) and the main one")
DAEMON_LIMITS = Limits(
    65536, "descriptors: libzmq aborts the process when accept() fails with EMFILE, so the limit must stay far "
           "above what the daemon can be made to hold: control connections capped per user and to 512 per socket, "
           "about 1100 accepted before they are counted, 64 clients x 3 and 256 pending admissions; "
           "the daemon raises its soft limit to this",
    "256M", "512M", "memory: 42 MiB resident when serving, plus a 4 KiB page per client and the zmq queues "
                    "of capped connections",
    32, "tasks: 9 threads when serving (main, heartbeat, admission, connection guard, the priority summary, "
        "two zmq contexts of two threads each)")
OBSERVE_LIMITS = Limits(
    65536, "descriptors: a perf event per uprobe per library found and a perf buffer per CPU; libzmq aborts at "
           "EMFILE",
    "1G", "2G", "memory: LLVM compiles the BPF program at start (bcc), hundreds of MiB for a moment",
    128, "tasks: Python's, bcc's polling and LLVM's threads")
CONTROLLER_LIMITS = Limits(
    4096, "descriptors: a zmq connection to each daemon and to the observer, the published socket and its "
          "subscribers; libzmq aborts at EMFILE, so far over that",
    "256M", "512M", "memory: 32 MiB of imports, plus the last snapshots and reports it keeps",
    32, "tasks: the policy loop and its zmq contexts' threads")


def _start_limits() -> list[tuple[str, str]]:
    # five failed starts in a minute: stop retrying and leave the unit failed, for a person to see
    return [("StartLimitIntervalSec", "60s"), ("StartLimitBurst", "5")]


# Appended SystemCallFilter= lines: after the @system-service allow list, a ~list removes calls
# and a later plain list adds some back (systemd's merge order).
_NO_PRIVILEGED = ("SystemCallFilter", "~@privileged @resources")
# libzmq's I/O threads set their policy (SCHED_OTHER) at start, seen by strace; a real-time one
# stays refused by RestrictRealtime=
_ZMQ_THREADS = ("SystemCallFilter", "sched_setscheduler")
# Gives a socket it bound to the client group (rundir.give_group: lchown, in @privileged), as
# its owner and a member of the group, so no capability is needed.
_CHOWN = ("SystemCallFilter", "chown fchown fchownat lchown")
# Processes that never look at other processes: /proc shows them only their own (and no
# kernel files).
_OWN_PROC = {"ProtectProc": "invisible", "ProcSubset": "pid"}


def emu_unit(cfg: ServiceConfig) -> Unit:
    # The server admits clients by their groups, read from /proc/<pid>/status (so /proc shows
    # every process, but no kernel files), and gives emu.sock to the client group (chown).
    return Unit(
        EMU,
        unit=[("Description", "FlexNPU emulated Ascend device server"),
              *_start_limits()],
        service=_service(cfg, f"{cfg.binary} emu start --foreground --devices {cfg.emu_devices}",
                         {**_COMMON_SANDBOX, "ProcSubset": "pid"})
        + [_NO_PRIVILEGED, _CHOWN] + EMU_LIMITS.items(),
    )


def daemon_unit(cfg: ServiceConfig) -> Unit:
    after = EMU if cfg.emulator else ""
    unit = [("Description", "FlexNPU forwarding daemon of device %i"),
]
    if after:
        unit.append(("After", after))
    # pidfd_open (client deaths) and futex (waking held calls) are in @system-service. It reads
    # its clients' /proc/<pid>/status (their groups), so /proc stays whole; and it gives its
    # sockets and gate table to the client group (chown, in @privileged) as their owner.
    return Unit(DAEMON_TEMPLATE, unit=unit + _start_limits(),
                service=_service(cfg, f"{cfg.binary} daemon --device %i", _COMMON_SANDBOX)
                + [_NO_PRIVILEGED, _CHOWN, _ZMQ_THREADS]
                + DAEMON_LIMITS.items())


def observe_unit(cfg: ServiceConfig) -> Unit:
    caps = " ".join(OBSERVER_CAPS)
    sandbox = dict(_COMMON_SANDBOX)
    sandbox.update({
        "CapabilityBoundingSet": caps,
        "AmbientCapabilities": caps,
        # bcc compiles against the kernel headers under /lib/modules/$(uname -r)/build, which
        # ProtectKernelModules= would hide; module loading stays impossible (no CAP_SYS_MODULE).
        "ProtectKernelModules": "no",
        # LLVM inside bcc maps memory writable and executable
        "MemoryDenyWriteExecute": "no",
        # applications may run from a home directory: the uprobe names their library's file
        "ProtectHome": "read-only",
        "SystemCallFilter": "@system-service bpf perf_event_open",
        # metrics and TCP publishing, only where the configuration asks for them
        **(_NETWORK if cfg.observe_network else {}),
    })
    items = _service(cfg, f"{cfg.binary} observe --source bpf", sandbox, status_timeout_s=120,
                     extra_env=_config_env(cfg))
    # CAP_SYS_ADMIN would allow these; nothing in the observer calls them
    # (not @resources: bcc's LLVM threads call sched_setscheduler, seen by strace)
    items.append(("SystemCallFilter", "~@module @mount @reboot @swap @raw-io @clock @cpu-emulation @obsolete"))
    items += OBSERVE_LIMITS.items()
    return Unit(OBSERVE, unit=[("Description", "FlexNPU observer (eBPF uprobes on the device runtime)"),
                               *_start_limits()],
                service=items)


def controller_unit(cfg: ServiceConfig) -> Unit:
    after = ([EMU] if cfg.emulator else []) + [daemon_instance(d) for d in cfg.devices]
    env = _config_env(cfg)
    sandbox = {**_COMMON_SANDBOX, **_OWN_PROC, **(_NETWORK if cfg.controller_network else {})}
    return Unit(CONTROLLER,
                unit=[("Description", "FlexNPU controller (gate settings from the observer's snapshots)"),
                      ("After", " ".join(after)),
                      *_start_limits()],
                service=_service(cfg, f"{cfg.binary} controller", sandbox, extra_env=env)
                # it gives controller.sock to the client group, as the observer does observe.sock
                + [_NO_PRIVILEGED, _CHOWN, _ZMQ_THREADS] + CONTROLLER_LIMITS.items())


def render(cfg: ServiceConfig) -> dict[str, str]:
    """Every unit file of this configuration: file name -> text, in start order."""
    units = ([emu_unit(cfg)] if cfg.emulator else []) + [daemon_unit(cfg), observe_unit(cfg), controller_unit(cfg)]
    return {u.name: u.text() for u in units}


def enabled_units(cfg: ServiceConfig) -> list[str]:
    """The units `systemctl enable --now` takes: the template by its instances."""
    return ([EMU] if cfg.emulator else []) + [daemon_instance(d) for d in cfg.devices] + [OBSERVE, CONTROLLER]
