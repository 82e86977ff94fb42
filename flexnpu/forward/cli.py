"""`flexnpu daemon`, `flexnpu gate ...` and `flexnpu run`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from flexnpu import SCHEMA, logs, paths
from flexnpu.forward import api
from flexnpu.cliargs import NumberArgs, check_device, check_pid, check_range, size_bytes

err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
gate_app = typer.Typer(help="Inspect and set the dispatch gates of a device's clients.", no_args_is_help=True)


def daemon_command(
    device: Annotated[int, typer.Option(help="Physical device this daemon forwards.")] = 0,
    max_hold_ms: Annotated[float, typer.Option(help="Default longest hold of a client's call.")] = api.DEFAULT_MAX_HOLD_MS,
    priority: Annotated[int, typer.Option(help="Default priority of new clients (0-7).")] = 0,
    gate: Annotated[str, typer.Option(help="Default gate of new clients: open or closed.")] = "open",
    pending_grace_ms: Annotated[float, typer.Option(
        help="How long a client's work still counts as pending for priority after its sync "
             "(its next step keeps its turn).")] = api.DEFAULT_PENDING_GRACE_MS,
    admin_group: Annotated[Optional[str], typer.Option(
        help="A group whose members may change gates, budgets and defaults besides root "
             "(the admin socket becomes 0660 root:GROUP).")] = None,
    max_clients_per_user: Annotated[int, typer.Option(
        help="Gate slots one non-root user may hold on this device.")] = 16,
    role_admission: Annotated[bool, typer.Option(
        "--role-admission/--no-role-admission",
        help="In forward mode, a client's declared role sets its priority and budget at admission "
             "(decode first); without it every client starts with the defaults.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
) -> None:
    """Run the forwarding daemon of one device in the foreground (SIGTERM stops it, gates open).

    Examples:
      flexnpu daemon --device 0
      flexnpu daemon --device 1 --max-hold-ms 50
    """
    from flexnpu.forward.daemon import protocol
    from flexnpu.forward.daemon import server as daemon

    _check_times("daemon", max_hold_ms, pending_grace_ms)
    logs.setup(verbose)
    count, where = device_count() if device >= 0 else (None, "")
    if count is None:
        check_device("daemon", device)
        logging.getLogger("flexnpu.forward").warning(
            "device %d not checked: %s; start the emulator first (`flexnpu emu start`) to have it checked",
            device, where)
    elif device >= count:
        err.print(f"flexnpu daemon: no device {device}: {where} has {count} device{'s' if count != 1 else ''} "
                  f"(0-{count - 1}); give --device one of them")
        raise typer.Exit(2)
    try:
        daemon.run(device, max_hold_ms=max_hold_ms, priority=priority, gate=gate, pending_grace_ms=pending_grace_ms,
                   admin_group=admin_group, per_uid_cap=max_clients_per_user, role_admission=role_admission)
    except (protocol.RequestError, ValueError, RuntimeError, OSError) as e:
        err.print(f"flexnpu daemon: {e}")
        raise typer.Exit(1)


def device_count() -> tuple[int | None, str]:
    """How many devices this node has and who says so: CANN's device nodes (/dev/davinciN)
    where CANN is installed, else the running emulator; (None, why not) with neither."""
    if _real_cann_present():
        nodes = [p for p in Path("/dev").glob("davinci*") if p.name[len("davinci"):].isdigit()]
        if nodes:
            return len(nodes), "this node (CANN, /dev/davinci*)"
    from flexnpu.emulator import control

    try:
        return len(control.status(timeout=1.0)["devices"]), "the emulator"
    except control.EmulatorNotRunning:
        return None, "no CANN devices (/dev/davinciN) and no emulator running"
    except (control.EmulatorError, KeyError, TypeError) as e:
        return None, f"cannot ask the emulator ({e})"


def _check_times(cmd: str, max_hold_ms: float | None, pending_grace_ms: float | None) -> None:
    """The daemon's own limits (protocol.py), checked before any socket is touched: a bad
    value is a usage error (exit 2), not a refusal from the daemon."""
    check_range(cmd, "--max-hold-ms", max_hold_ms, api.MIN_HOLD_MS, api.MAX_HOLD_LIMIT_MS, " ms")
    check_range(cmd, "--pending-grace-ms", pending_grace_ms, 0.0, api.MAX_GRACE_MS, " ms")


def _client(device: int, cmd: str):
    check_device(f"gate {cmd}", device)
    return api.DaemonClient(device)


def _fail(what: str, e: Exception) -> None:
    err.print(f"flexnpu gate {what}: {e}")
    raise typer.Exit(1)


@gate_app.command("list")
def gate_list(
    device: Annotated[int, typer.Option(help="Physical device.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List a device's clients with their gates, budgets, owners and counters.

    owner: who set the client's settings: - (the device defaults), ctl (the controller) or
    man (manual, `flexnpu gate set`; `flexnpu gate release PID` returns it). budget: its
    in-flight budget (launches; - unlimited) and, after the slash, the launches it has
    outstanding now.

    Example:  flexnpu gate list --device 0
    """
    try:
        with _client(device, "list") as c:
            listed = c.list_all()
    except (api.DaemonError, api.ApiError) as e:
        _fail("list", e)
    if json_out:
        typer.echo(json.dumps(dict(listed.raw)))
        return
    t = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0))  # under 80 columns; the rest: --json
    for col in ("pid", "role", "mode", "gate", "prio", "owner", "budget", "kernels", "mem MiB", "iters", "held ms"):
        t.add_column(col, justify="left" if col in ("role", "mode", "gate", "owner") else "right", no_wrap=True)
    short = {None: "-", "controller": "ctl", "manual": "man"}
    for v in listed.clients:
        budget = f"{v.inflight or '-'}/{v.inflight_now or 0}"
        held = (v.gate_wait_ms or 0.0) + (v.inflight_wait_ms or 0.0)
        t.add_row(str(v.pid), v.role, "fwd" if v.mode == "forward" else "gated", v.gate or "?", str(v.priority),
                  short.get(v.owner, "?"), budget, str(v.ops.get("kernel", 0)), f"{(v.mem_held or 0) / 2**20:.1f}",
                  str(v.iterations), f"{held:.1f}")
    Console(width=80).print(t)
    if listed.lease_left_ms is not None:
        typer.echo(f"controller lease: {listed.lease_left_ms:.0f} ms left")


@gate_app.command("set", cls=NumberArgs)
def gate_set(
    pid: Annotated[int, typer.Argument(help="Client process id.")],
    device: Annotated[int, typer.Option(help="Physical device.")] = 0,
    gate: Annotated[Optional[str], typer.Option(help="open or closed.")] = None,
    priority: Annotated[Optional[int], typer.Option(help="0-7; higher goes first.")] = None,
    max_hold_ms: Annotated[Optional[float], typer.Option(help="Longest hold of one call.")] = None,
    inflight: Annotated[Optional[int], typer.Option(
        help="In-flight budget: launches it may have dispatched and unfinished on the device; 0 unlimited.")] = None,
    max_inflight_ms: Annotated[Optional[float], typer.Option(
        help="In-flight budget in device time (ms; 0 none), for clients in forward mode.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Set one client's gate, priority, max_hold or in-flight budget (a manual setting).

    A manual setting overrides the controller's and holds until `flexnpu gate release PID`.

    Examples:
      flexnpu gate set 4242 --gate closed
      flexnpu gate set 4242 --priority 5 --max-hold-ms 20
      flexnpu gate set 4242 --inflight 2
    """
    check_pid("gate set", "PID", pid)
    _check_times("gate set", max_hold_ms, None)
    check_range("gate set", "--max-inflight-ms", max_inflight_ms, 0.0, api.MAX_INFLIGHT_LIMIT_MS, " ms")
    try:
        with _client(device, "set") as c:
            v = c.set(pid, gate=gate, priority=priority, max_hold_ms=max_hold_ms, inflight=inflight,
                      max_inflight_ms=max_inflight_ms)
    except (api.DaemonError, api.ApiError) as e:
        _fail("set", e)
    s = v.setting
    budget = s.inflight or "unlimited"
    device_time = f", {s.max_inflight_ms:g} ms of device time in flight" if s.max_inflight_ms else ""
    typer.echo(json.dumps({"schema": SCHEMA, "client": dict(v.raw)}) if json_out else
               f"pid {pid}: gate {s.gate}, priority {s.priority}, max_hold {s.max_hold_ms:g} ms, "
               f"in-flight budget {budget}{device_time} (manual until `flexnpu gate release {pid}`)")


@gate_app.command("release", cls=NumberArgs)
def gate_release(
    pid: Annotated[Optional[int], typer.Argument(help="Client process id.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Release every client's manual settings.")] = False,
    device: Annotated[int, typer.Option(help="Physical device.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Drop manual settings back to the device defaults (the controller may then set them).

    Examples:
      flexnpu gate release 4242
      flexnpu gate release --all --device 1
    """
    if (pid is None) == (not all_):
        err.print("flexnpu gate release: give a PID or --all")
        raise typer.Exit(2)
    check_pid("gate release", "PID", pid)
    try:
        with _client(device, "release") as c:
            pids = c.release(pid=pid, all=all_)
    except api.DaemonError as e:
        _fail("release", e)
    if json_out:
        typer.echo(json.dumps({"schema": SCHEMA, "released": pids}))
    elif pids:
        typer.echo(f"released {', '.join(map(str, pids))}: back to the device defaults")
    else:
        typer.echo("nothing to release: no manual settings" + (f" on pid {pid}" if pid is not None else ""))


@gate_app.command("defaults")
def gate_defaults(
    device: Annotated[int, typer.Option(help="Physical device.")] = 0,
    gate: Annotated[Optional[str], typer.Option(help="open or closed.")] = None,
    priority: Annotated[Optional[int], typer.Option(help="0-7.")] = None,
    max_hold_ms: Annotated[Optional[float], typer.Option(help="Longest hold of one call.")] = None,
    pending_grace_ms: Annotated[Optional[float], typer.Option(help="Priority grace after a sync (device-wide).")] = None,
    max_inflight_ms: Annotated[Optional[float], typer.Option(
        help="In-flight budget in device time (ms; 0 none), for clients in forward mode.")] = None,
    apply: Annotated[bool, typer.Option(help="Also apply to the clients there now.")] = False,
) -> None:
    """Set the device-wide defaults new clients start with.

    Example:  flexnpu gate defaults --device 0 --max-hold-ms 100 --apply
    """
    _check_times("gate defaults", max_hold_ms, pending_grace_ms)
    check_range("gate defaults", "--max-inflight-ms", max_inflight_ms, 0.0, api.MAX_INFLIGHT_LIMIT_MS, " ms")
    try:
        with _client(device, "defaults") as c:
            d = c.defaults(gate=gate, priority=priority, max_hold_ms=max_hold_ms, apply=apply,
                           pending_grace_ms=pending_grace_ms, max_inflight_ms=max_inflight_ms)
    except (api.DaemonError, api.ApiError) as e:
        _fail("defaults", e)
    typer.echo(json.dumps({"schema": SCHEMA, "defaults": dict(d.raw)}))


def shim_library() -> str:
    return str(paths.native_lib_dir() / "libflexnpu_shim.so")


def run_env(devices: Optional[str], role: str, mem_quota: Optional[str], debug: bool,
            base: dict[str, str], forward: bool = False) -> dict[str, str]:
    """The environment `flexnpu run` gives a program; ValueError for bad input."""
    env = dict(base)
    if role not in ("prefill", "decode", "auto"):
        raise ValueError(f"--role must be prefill, decode or auto, not {role!r}")
    if devices is not None:
        ids = devices.split(",")
        if not devices or not all(i.isdigit() and int(i) < 64 for i in ids):
            raise ValueError(f"--device takes a comma list of physical device ids (0-63), not {devices!r}")
        twice = sorted({int(i) for i in ids if [int(j) for j in ids].count(int(i)) > 1})
        if twice:
            raise ValueError(f"--device lists device {', '.join(map(str, twice))} twice in {devices!r}; "
                             "each physical device once (e.g. 2,3)")
        env["FLEXNPU_DEVICES"] = devices
    if mem_quota is not None:
        size_bytes("--mem-quota", mem_quota)
        env["FLEXNPU_MEM_QUOTA"] = mem_quota.strip()
    env["FLEXNPU_ROLE"] = role
    if debug:
        env["FLEXNPU_DEBUG"] = "1"
    lib = str(paths.forward_shim_library()) if forward else shim_library()
    env["LD_PRELOAD"] = lib + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    env.setdefault("FLEXNPU_RUNTIME_DIR", str(paths.runtime_dir()))
    if not _real_cann_present():
        # no CANN on this node: programs get the emulated device, as `flexnpu emu env` sets up
        lib = str(paths.native_lib_dir())
        old = env.get("LD_LIBRARY_PATH", "")
        if lib not in old.split(":"):
            env["LD_LIBRARY_PATH"] = old + ":" + lib if old else lib
    return env


def _real_cann_present() -> bool:
    try:
        from flexnpu.doctor import find_cann_library
    except ImportError:
        return False
    return find_cann_library() is not None


def gate_refusal() -> str | None:
    """Why this user may not run gated programs here (None: it may, or no daemon runs). The
    admission socket's mode is what the kernel checks when the shim connects."""
    rdir = paths.runtime_dir()
    try:
        socks = sorted(p for p in rdir.iterdir() if paths.GATE_SOCKET.match(p.name))
    except OSError:
        return None
    for p in socks:
        if not os.access(p, os.W_OK, effective_ids=True):
            group = paths.CLIENT_GROUP
            try:
                import grp

                grp.getgrnam(group)
                who = f"root and the {group} group"
            except KeyError:
                who = f"root only (there is no {group} group on this node)"
            return f"permission denied: gated programs on this node are for {who}"
    return None


def forward_refusal(devices: Optional[str], exe: str) -> str | None:
    """Why the program cannot run forwarded here (None: it can): a device it is given has no
    executor, or the program itself imports an AscendCL call the forwarder does not carry."""
    rdir = paths.runtime_dir()
    wanted = [int(d) for d in devices.split(",")] if devices else None
    if wanted is None:
        wanted = paths.daemon_devices(rdir)
        if not wanted:
            return f"no forwarding daemon runs in {rdir} (start one: flexnpu daemon --device N)"
    for d in wanted:
        if not paths.executor_socket(d, rdir).exists():
            return f"device {d} has no executor (is `flexnpu daemon --device {d}` running, with forwarding?)"
    missing = sorted(set(_acl_imports(exe)) - set(carried_calls()))
    if missing:
        return f"{exe} calls {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}, which forwarding does not carry"
    return None


def carried_calls() -> list[str]:
    """The AscendCL and aclnn calls the forward build exports (docs/compatibility.md)."""
    out = subprocess.run(["nm", "-D", "--defined-only", str(paths.forward_shim_library())], capture_output=True,
                         text=True, check=False).stdout
    return [ln.split()[-1] for ln in out.splitlines() if ln.split() and ln.split()[-1].startswith("acl")]


def _acl_imports(exe: str) -> list[str]:
    """AscendCL calls an ELF program imports by name (a script's interpreter imports none)."""
    try:
        with open(exe, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return []
    except OSError:
        return []
    out = subprocess.run(["nm", "-D", "--undefined-only", exe], capture_output=True, text=True, check=False).stdout
    names = [ln.split()[-1].split("@")[0] for ln in out.splitlines() if ln.split()]
    return [n for n in names if n.startswith("acl") and not n.startswith(("aclCreate", "aclDestroy", "aclGet",
                                                                          "aclSet", "aclInitTensor"))
            or n.startswith("aclGetRecentErrMsg")]


def _not_runnable(name: str, path: str | None) -> tuple[str, int]:
    """Why `name` cannot be run, and the shell's exit code for it (127 not found, 126 found
    but not executable)."""
    if not name:
        return "the program's name is empty; give it after --, e.g. flexnpu run -- ./my_acl_program", 127
    if "/" in name:
        cands = [name]
    else:
        cands = [os.path.join(d or ".", name) for d in (path or os.defpath).split(os.pathsep)]
    for c in cands:
        if os.path.isdir(c):
            return "is a directory, not a program", 126
        if os.path.exists(c):
            return ("is not executable; make it so (chmod +x) or run it through its interpreter "
                    "(e.g. flexnpu run -- python script.py)"), 126
    if "/" in name:
        return "no such file", 127
    return "command not found (not in PATH)", 127


def run_command(
    cmd: Annotated[list[str], typer.Argument(help="The program and its arguments, after --.")],
    device: Annotated[Optional[str], typer.Option("--device", help="Physical devices the program sees, "
                                                  "in order: '2,3' makes its device 0 physical 2.")] = None,
    role: Annotated[str, typer.Option(help="prefill, decode or auto.")] = "auto",
    mem_quota: Annotated[Optional[str], typer.Option(help="Cap on device memory per device, e.g. 8G.")] = None,
    debug: Annotated[bool, typer.Option(help="The shim reports what it does on stderr.")] = False,
    forward: Annotated[Optional[bool], typer.Option("--forward/--gated", help="Forwarded execution (every AscendCL "
                                                    "call runs in the device's executor, which schedules it op by op), "
                                                    "or gated; default: [run.<role>] mode in flexnpu.toml, else gated.",
                                                    show_default=False)] = None,
    fallback: Annotated[Optional[str], typer.Option(help="With --forward, where forwarding cannot run this program: "
                                                    "'gated' runs it gated from the start, 'none' refuses; default: "
                                                    "[run.<role>] fallback, else none.", show_default=False)] = None,
) -> None:
    """Run a program under the FlexNPU shim; its exit code passes through.

    Gated (the default), the program keeps its own device context and the shim decides when
    its calls go out. Forwarded (--forward), its calls run in the context of the device's
    executor, beside every other forwarded program's: docs/architecture.md.

    Examples:
      flexnpu run --role prefill -- python serve.py --port 8000
      flexnpu run --device 2,3 --mem-quota 24G -- ./my_acl_program
      flexnpu run --forward --role decode -- python serve.py --port 8001
      flexnpu run --forward --fallback gated -- ./my_acl_program
    """
    if fallback is not None and fallback not in ("gated", "none"):
        err.print(f"flexnpu run: --fallback takes gated or none, not {fallback!r}")
        raise typer.Exit(2)
    if forward is None or fallback is None:  # the node's configuration for this role
        from flexnpu.control import config as cfgmod

        try:
            run_cfg = cfgmod.load(paths.config_file(), required=False).run.get(role)
        except cfgmod.ConfigError as e:
            err.print(f"flexnpu run: {e}")
            raise typer.Exit(2)
        if forward is None:
            forward = run_cfg is not None and run_cfg.mode == "forward"
        if fallback is None:
            fallback = run_cfg.fallback if run_cfg is not None else "none"
    try:
        env = run_env(device, role, mem_quota, debug, dict(os.environ), forward=forward)
    except ValueError as e:
        err.print(f"flexnpu run: {e}")
        raise typer.Exit(2)
    if not os.path.exists(shim_library()):
        err.print(f"flexnpu run: {shim_library()} is missing; reinstall FlexNPU (pip install .)")
        raise typer.Exit(1)
    refusal = gate_refusal()
    if refusal:
        err.print(f"flexnpu run: {refusal}")
        raise typer.Exit(1)
    exe = shutil.which(cmd[0], path=env.get("PATH"))
    if exe is None:
        problem, code = _not_runnable(cmd[0], env.get("PATH"))
        err.print(f"flexnpu run: {cmd[0]}: {problem}" if cmd[0] else f"flexnpu run: {problem}")
        raise typer.Exit(code)
    if forward:
        why = forward_refusal(device, exe)
        if why and fallback == "gated":
            err.print(f"flexnpu run: not forwarded ({why}); running gated")
            env = run_env(device, role, mem_quota, debug, dict(os.environ), forward=False)
        elif why:
            err.print(f"flexnpu run: cannot forward: {why}; run it gated (without --forward) or with --fallback gated")
            raise typer.Exit(1)
    os.execve(exe, cmd, env)
