"""`flexnpu attach <pid>`: probes one running process and prints what it does on its
devices, one line (or one JSON object) per interval."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TextIO

from flexnpu.observe import procs, render
from flexnpu.observe.errors import NoPrivileges, NoRuntimeLibrary, NoSuchProcess
from flexnpu.observe.probegen import DEFAULT_LIBRARIES, FORWARD_SONAME, SONAMES, ProbeConfig, build
from flexnpu.observe.snapshot import ProcessInfo, SnapshotBuilder, process_view

PRIMARY = DEFAULT_LIBRARIES[0].soname
# a process makes device calls through one of these: the runtime, or the forward build of the
# shim (flexnpu run --forward), whose calls never reach the runtime in its process
ENTRY = (PRIMARY, FORWARD_SONAME)


class _Stop(Exception):
    pass


def ebpf_text(pid: int, trace: bool) -> str:
    return build(ProbeConfig(trace=trace, tgid=pid)).final()


CAP_NAMES = ("chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid",
             "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw",
             "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
             "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time", "sys_tty_config", "mknod",
             "lease", "audit_write", "audit_control", "setfcap", "mac_override", "mac_admin", "syslog",
             "wake_alarm", "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore")


def _caps(pid: int | str, field: str) -> int | None:
    try:
        for line in (procs.PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return None


def maps_refusal(pid: int) -> str:
    """Why /proc/<pid>/maps was refused, in one line: another user's process (run as root),
    or, for root, what the kernel holds against it (a process with capabilities this one
    lacks, as an init process in a sandbox or VM has, or a security module)."""
    what = f"cannot read /proc/{pid}/maps of pid {pid} ({procs.comm(pid)})"
    if os.geteuid() != 0:
        return f"{what}: it is another user's process; run it as root (sudo)"
    theirs, ours = _caps(pid, "CapPrm"), _caps("self", "CapEff")
    missing = theirs & ~ours if theirs is not None and ours is not None else 0
    if missing:
        lacked = [f"cap_{CAP_NAMES[i]}" if i < len(CAP_NAMES) else f"capability {i}"
                  for i in range(64) if missing >> i & 1]
        return (f"{what}: the kernel refuses it even to root, as that process holds capabilities this one "
                f"lacks ({', '.join(lacked)}); attach to a process started here, or run flexnpu where they "
                "are held (the host, not a container)")
    return (f"{what}: the kernel refuses it even to root here (a security module, or the process is in "
            "another user namespace or not dumpable); attach to a process started in this environment")


def find_runtime(pid: int) -> dict[str, procs.MappedLibrary]:
    """The runtime libraries pid maps; errors for a missing process or none mapped."""
    if pid <= 0 or not procs.exists(pid):
        raise NoSuchProcess(f"no process with pid {pid}")
    try:
        libs = procs.mapped_libraries(pid, SONAMES)
    except ProcessLookupError:
        raise NoSuchProcess(f"no process with pid {pid}") from None
    except PermissionError:
        raise NoPrivileges(maps_refusal(pid)) from None
    if not any(so in libs for so in ENTRY):
        raise NoRuntimeLibrary(f"pid {pid} ({procs.comm(pid)}) maps no {PRIMARY} (nor {FORWARD_SONAME}); "
                               "attach to a process that has loaded the device runtime")
    return libs


def run(pid: int, interval: float = 1.0, count: int | None = None, as_json: bool = False,
        trace: Path | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Attaches, prints until count intervals, the process's exit or SIGINT/SIGTERM."""
    out, err = out or sys.stdout, err or sys.stderr  # the streams of the moment, not of the import
    from flexnpu.observe.bpf import ProbeSession
    from flexnpu.observe.trace import TraceWriter

    libs = find_runtime(pid)
    session = ProbeSession(ProbeConfig(trace=trace is not None, tgid=pid))
    writer = None
    try:
        for so, lib in libs.items():
            session.attach(procs.attach_path(pid, lib), so)
        comm = procs.comm(pid)
        info = ProcessInfo(comm, procs.env_role(pid))
        if trace is not None:
            writer = TraceWriter(trace, session.program.symbols)
            writer.process(pid, comm)
            session.open_events(writer.add)
        where = ", ".join(lib.path for lib in libs.values())
        print(f"Tracing pid {pid} ({comm}) through {where}; device memory counts what it "
              "allocates from now on... Hit Ctrl-C to end.", file=err, flush=True)
        if not as_json:
            print(render.HEADER, file=out, flush=True)
        builder = SnapshotBuilder("bpf")

        def stop(signum: int, frame: FrameType | None) -> None:
            raise _Stop()

        old = signal.signal(signal.SIGTERM, stop)
        n = 0
        try:
            deadline = time.monotonic() + interval
            while count is None or n < count:
                gone = False
                while (left := deadline - time.monotonic()) > 0:
                    if writer is not None:
                        session.poll_events(int(min(left, 0.05) * 1000) or 1)
                    else:
                        time.sleep(min(left, 0.25))
                    if not procs.exists(pid):
                        gone = True
                        break
                deadline += interval
                _emit(builder, session.read(), pid, info, as_json, out)
                n += 1
                if gone:
                    print(f"pid {pid} exited", file=err, flush=True)
                    break
        except (KeyboardInterrupt, _Stop):
            pass
        finally:
            signal.signal(signal.SIGTERM, old)
        if writer is not None:
            session.poll_events(0)
    finally:
        if writer is not None:
            writer.close()
            print(f"wrote {writer.events} events to {writer.path} (open it at ui.perfetto.dev)", file=err)
        session.close()
    return 0


def _emit(builder: SnapshotBuilder, reads: dict, pid: int, info: ProcessInfo, as_json: bool,
          out: TextIO) -> None:
    snap = builder.build(reads, info=lambda p: info)
    view = process_view(snap, pid)
    if as_json:
        doc = {"schema": snap["schema"], "source": snap["source"], "seq": snap["seq"], "time": snap["time"],
               "interval_s": snap["interval_s"], "pid": pid, "comm": info.comm, "role": info.role}
        if view is None:
            doc.update(phase="idle", devices=[], processes=[])
        else:
            doc.update({k: v for k, v in view.items() if k != "entries"})
            doc["processes"] = view["entries"]
        print(json.dumps(doc), file=out, flush=True)
    else:
        line = render.process_line(view, snap["time"]) if view else render.idle_line(snap["time"])
        print(line, file=out, flush=True)
