"""`flexnpu doctor`: check that this machine can run FlexNPU, and say how to fix what is missing.

Each check is a plain function returning a `Check`, so tests and other commands can call
them one by one; `run_checks()` runs them all in order. The checks follow what FlexNPU needs
at run time: privileges and a working bpf() syscall for the uprobes, tracefs, bcc and its
ability to compile a uprobe program for the running kernel, a libascendcl.so (CANN's, or the
emulated one), and, when it is the emulated one, its device server; then the service side:
the `flexnpu` group, the modes of the runtime dir's files (flexnpu/paths.py), the units.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from flexnpu import paths, rundir
from flexnpu.cann import ASCEND_ROOT, cann_library_candidates, find_cann_library  # noqa: F401 (re-exported)

SCHEMA = 1

# Capability bit numbers (linux/capability.h).
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

# bpf() syscall numbers; the libc has no wrapper for it.
_NR_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_MAP_CREATE = 0
_BPF_MAP_TYPE_ARRAY = 2

UPROBE_CALLS = 7  # prime, so a stray or doubled event cannot pass as the right count
UPROBE_TIMEOUT_S = 60.0  # bcc's clang compile takes seconds on a slow machine

TRACEFS = "/sys/kernel/tracing"
_SETUP = "sudo bash scripts/setup.sh"


@dataclass(frozen=True)
class Check:
    """The result of one check. `fix` is a one-line remedy, None when the check passed."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None


def _ok(name: str, detail: str) -> Check:
    return Check(name, True, detail, None)


def _fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, False, detail, fix)


# --- privileges and the kernel ----------------------------------------------------------


def effective_caps(status_text: str) -> int:
    """The CapEff bit mask from the text of /proc/<pid>/status (0 if absent)."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges(status_text: str | None = None, euid: int | None = None) -> Check:
    """Loading BPF programs and attaching uprobes needs CAP_BPF and CAP_PERFMON, or
    CAP_SYS_ADMIN, which kernels before 5.8 require instead and which implies both."""
    name = "privileges"
    if status_text is None:
        status_text = Path("/proc/self/status").read_text()
    euid = os.geteuid() if euid is None else euid
    caps = effective_caps(status_text)
    have = [n for n, bit in (("CAP_SYS_ADMIN", CAP_SYS_ADMIN), ("CAP_BPF", CAP_BPF),
                             ("CAP_PERFMON", CAP_PERFMON)) if caps >> bit & 1]
    who = "root" if euid == 0 else f"uid {euid}"
    if "CAP_SYS_ADMIN" in have:
        return _ok(name, f"{who} with {', '.join(have)}")
    if {"CAP_BPF", "CAP_PERFMON"} <= set(have):
        # enough to load the program; attaching a uprobe through the uprobe PMU also needs
        # CAP_SYS_ADMIN on kernels such as 6.18 (measured, docs/service.md): bcc_uprobe tells
        return _ok(name, f"{who} with {', '.join(have)}; uprobes may also need CAP_SYS_ADMIN "
                         "(see the bcc_uprobe check)")
    detail = f"{who} without CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN"
    if euid == 0:
        # Root without the capabilities: a container that dropped them.
        return _fail(name, detail, "run the container with --cap-add BPF --cap-add PERFMON "
                                   "(or --privileged)")
    return _fail(name, detail, "run as root: sudo flexnpu ...")


def check_bpf_syscall(machine: str | None = None) -> Check:
    """Creates (and closes) a one-entry BPF array map: the cheapest call that proves bpf()
    exists and this process may use it."""
    name = "bpf_syscall"
    machine = machine or platform.machine()
    nr = _NR_BPF.get(machine)
    if nr is None:
        return _fail(name, f"no bpf() syscall number known for {machine}",
                     "run on x86_64 or aarch64")
    # union bpf_attr, map-create part: map_type, key_size, value_size, max_entries; the
    # rest (flags, names, ...) must be zero.
    attr = (ctypes.c_uint32 * 18)(_BPF_MAP_TYPE_ARRAY, 4, 8, 1)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(ctypes.c_long(nr), ctypes.c_int(_BPF_MAP_CREATE), ctypes.byref(attr),
                      ctypes.c_uint(ctypes.sizeof(attr)))
    if fd >= 0:
        os.close(fd)
        return _ok(name, "bpf(BPF_MAP_CREATE) works")
    err = ctypes.get_errno()
    detail = f"bpf(BPF_MAP_CREATE) failed: {errno.errorcode.get(err, err)} ({os.strerror(err)})"
    if err == errno.ENOSYS:
        return _fail(name, detail, "boot a kernel built with CONFIG_BPF_SYSCALL=y")
    if err == errno.EPERM:
        return _fail(name, detail, "run as root; in a container also allow bpf() in seccomp "
                                   "(--cap-add BPF --cap-add PERFMON or --privileged)")
    if err == errno.ENOMEM:
        return _fail(name, detail, "raise the locked-memory limit: ulimit -l unlimited")
    return _fail(name, detail, "check dmesg; the kernel refused a plain array map")


def check_tracefs(mounts_text: str | None = None) -> Check:
    name = "tracefs"
    if mounts_text is None:
        mounts_text = Path("/proc/mounts").read_text()
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == TRACEFS and fields[2] == "tracefs":
            return _ok(name, f"mounted at {TRACEFS}")
    return _fail(name, f"not mounted at {TRACEFS}", f"mount -t tracefs nodev {TRACEFS}")


# --- bcc ----------------------------------------------------------------------------------

_BCC_FIX = f"apt-get install python3-bpfcc libbpfcc, then rerun {_SETUP}"


def check_bcc_import() -> Check:
    """bcc is Debian's, exposed to the venv by scripts/setup.sh; imported only here because
    loading libbcc (with its LLVM) costs time every other command should not pay."""
    name = "bcc_import"
    try:
        import bcc  # noqa: PLC0415
    except Exception as e:  # ImportError, or OSError when libbcc.so.0 is missing
        return _fail(name, f"cannot import bcc: {e}", _BCC_FIX)
    version = getattr(getattr(bcc, "version", None), "__version__", "unknown version")
    return _ok(name, f"bcc {version} from {Path(bcc.__file__).parent}")


def _mapped_libc() -> str | None:
    """The libc this process runs on, from /proc/self/maps (what a uprobe must name)."""
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split(maxsplit=5)[-1]
            if path.startswith("/") and Path(path).name.startswith(("libc.so", "libc-")):
                return path
    except OSError:
        pass
    return ctypes.util.find_library("c")


# The uprobe self-test's BPF program (`flexnpu doctor --ebpf` prints it).
SELFTEST_PROGRAM = r"""
BPF_ARRAY(hits, u64, 1);
int on_getpid(struct pt_regs *ctx) {
    int key = 0;
    u64 *n = hits.lookup(&key);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
"""


def uprobe_selftest() -> int:
    """Run in a child process by check_bcc_uprobe: compile a counting uprobe program, attach
    it to libc's getpid for this process only, call getpid a prime number of times, compare.
    Prints one JSON line {"ok", "detail"}; returns the exit code."""
    try:
        from bcc import BPF  # noqa: PLC0415

        libc_path = _mapped_libc()
        if not libc_path:
            raise RuntimeError("cannot find this process's libc")
        prog = BPF(text=SELFTEST_PROGRAM)
        pid = os.getpid()
        try:
            prog.attach_uprobe(name=libc_path, sym="getpid", fn_name="on_getpid", pid=pid)
            libc = ctypes.CDLL(libc_path)
            for _ in range(UPROBE_CALLS):
                libc.getpid()
            hits = prog["hits"][0].value
            prog.detach_uprobe(name=libc_path, sym="getpid", pid=pid)
        finally:
            prog.cleanup()
        ok = hits == UPROBE_CALLS
        detail = f"uprobe on {libc_path}:getpid counted {hits} of {UPROBE_CALLS} calls"
    except Exception as e:  # the parent reports whatever went wrong as the check's detail
        ok, detail = False, " ".join(str(e).split())[:200] or type(e).__name__
    print(json.dumps({"ok": ok, "detail": detail}), flush=True)
    return 0 if ok else 1


def _first_error_line(stderr: str) -> str:
    """The compiler's first error (bcc prints clang diagnostics on stderr)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() or "unable" in ln.lower():
            return ln[:200]
    return lines[-1][:200] if lines else ""


def check_bcc_uprobe(timeout: float = UPROBE_TIMEOUT_S, bcc_ok: bool | None = None) -> Check:
    """Compiles and attaches a real uprobe program, in a child process so that a crash or
    hang in bcc/LLVM cannot take doctor with it."""
    name = "bcc_uprobe"
    rel = platform.release()
    fix = (f"kernel headers must be at /lib/modules/{rel}/build ({_SETUP} links Debian's "
           "linux-headers there); run as root")
    if bcc_ok is None:
        bcc_ok = check_bcc_import().ok
    if not bcc_ok:
        return _fail(name, "not tried: bcc is not importable", _BCC_FIX)
    # -P: run this installed module even when the current directory holds a source tree.
    argv = [sys.executable, "-P", "-c",
            "import sys, flexnpu.doctor as d; sys.exit(d.uprobe_selftest())"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return _fail(name, f"compiling and attaching took more than {timeout:.0f} s", fix)
    if proc.returncode < 0:
        return _fail(name, f"the bcc self-test crashed with signal {-proc.returncode}", fix)
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        result = {"ok": False, "detail": f"the bcc self-test exited {proc.returncode}"}
    if result.get("ok"):
        return _ok(name, result["detail"])
    detail = result.get("detail", "")
    compiler = _first_error_line(proc.stderr)
    if compiler and compiler not in detail:
        detail = f"{detail}: {compiler}" if detail else compiler
    return _fail(name, detail, fix)


# --- libascendcl and the emulator ---------------------------------------------------------


def check_libascendcl(env: Mapping[str, str] | None = None,
                      ascend_root: Path = ASCEND_ROOT) -> Check:
    name = "libascendcl"
    cann = find_cann_library(env, ascend_root)
    if cann is not None:
        return _ok(name, f"CANN: {cann}")
    emu = paths.emulator_library()
    if emu.is_file():
        return _ok(name, f"emulator: {emu} (no CANN installation found)")
    return _fail(name, f"no CANN installation found and the emulator's {emu} is missing",
                 f"rebuild FlexNPU: {_SETUP}")


def check_emulator(cann: Path | None = None, rdir: Path | None = None) -> Check:
    """The emulated device's server must answer unless real CANN (real devices) is in use."""
    from flexnpu.emulator import control  # noqa: PLC0415

    name = "emulator"
    sock = paths.emulator_socket(rdir)
    try:
        st = control.status(rdir, timeout=1.0)
    except control.EmulatorError:
        if cann is not None:
            return _ok(name, f"not needed with CANN ({cann.parent}); not running")
        rd = rdir or paths.runtime_dir()
        prefix = "" if str(rd) == paths.DEFAULT_RUNTIME_DIR else f"FLEXNPU_RUNTIME_DIR={rd} "
        return _fail(name, f"no device server answers at {sock}", f"{prefix}flexnpu emu start")
    devices = st.get("devices", [])
    socs = sorted({d.get("soc", "?") for d in devices})
    return _ok(name, f"running at {sock}: {len(devices)} x {'/'.join(socs)}, pid {st.get('pid')}")


# --- services, the group and the runtime dir ------------------------------------------------


def _services_installed() -> list[str]:
    from flexnpu.service import install as inst  # noqa: PLC0415

    try:
        m = inst.read_manifest()
    except inst.ServiceError:
        m = None
    prefix = Path(m["prefix"]) if m else inst.DEFAULT_PREFIX
    return [n for n in (m["units"] if m else inst._unit_names_in(prefix)) if (prefix / n).exists()]


def check_group(name: str | None = None, services: list[str] | None = None) -> Check:
    """The group of the trust boundary: its members may use FlexNPU's sockets. Missing is a
    failure once the services are installed (they run in it), a note before."""
    import grp  # noqa: PLC0415

    check = "service_group"
    name = name or paths.service_group()
    try:
        g = grp.getgrnam(name)
    except KeyError:
        services = _services_installed() if services is None else services
        if services:
            return _fail(check, f"group {name} is missing but the services are installed",
                         "sudo flexnpu service install (it creates the group)")
        return _ok(check, f"no group {name} yet (services not installed): only root and the "
                          "sockets' owner can use them; `sudo flexnpu service install` creates it")
    members = ", ".join(g.gr_mem) or "no supplementary members"
    return _ok(check, f"group {name} (gid {g.gr_gid}): {members}")


def expected_modes(name: str, group_exists: bool = True) -> tuple[int, ...] | None:
    """The modes a runtime-dir file may have (flexnpu/paths.py), None for files without one."""
    import fnmatch  # noqa: PLC0415

    table = (("emu.sock", (paths.EMU_SOCKET_MODE,)),
             ("daemon-*.admin.sock", paths.ADMIN_SOCKET_MODES),
             ("daemon-*.sock", (paths.CLIENT_SOCKET_MODE,)),
             ("gate-*.sock", (paths.CLIENT_SOCKET_MODE,)),
             ("gate-*.ctl", (paths.GATE_TABLE_MODE,)),
             ("observe.sock", (paths.PUBLISH_SOCKET_MODE,)),
             ("controller.sock", (paths.PUBLISH_SOCKET_MODE,)),
             ("*.lock", (paths.LOCK_FILE_MODE,)))
    for pattern, modes in table:
        if fnmatch.fnmatch(name, pattern):
            if not group_exists and pattern not in ("emu.sock", "*.lock"):
                return (paths.GROUPLESS_MODE,)
            return modes
    return None


def check_runtime_modes(rdir: Path | None = None) -> Check:
    """The runtime dir and the files in it have the modes their owners set (paths.*_MODE)."""
    check = "runtime_modes"
    rdir = Path(rdir or paths.runtime_dir())
    if not rdir.is_dir():
        return _ok(check, f"{rdir} does not exist yet (created by the first service or `flexnpu emu start`)")
    bad = []
    mode = rdir.stat().st_mode & 0o7777
    untrusted = rundir.problem(rdir)  # the services refuse to start in it: say why first
    if untrusted:
        bad.append(untrusted)
    elif mode != paths.RUNTIME_DIR_MODE:
        bad.append(f"{rdir} is {mode:04o}, not {paths.RUNTIME_DIR_MODE:04o}")
    seen = 0
    import grp  # noqa: PLC0415

    try:
        grp.getgrnam(paths.CLIENT_GROUP)
        has_group = True
    except KeyError:
        has_group = False
    for p in sorted(rdir.iterdir()):
        want = expected_modes(p.name, has_group)
        if want is None:
            continue
        seen += 1
        have = p.lstat().st_mode & 0o7777
        if have not in want:
            bad.append(f"{p.name} is {have:04o}, not {' or '.join(f'{m:04o}' for m in want)}")
    if bad:
        return _fail(check, "; ".join(bad), "restart the service that owns the file (or remove a stale "
                                            "one); the expected modes are in flexnpu/paths.py")
    return _ok(check, f"{rdir} {mode:04o} and {seen} socket, gate and lock files as expected")


def check_services(services: list[str] | None = None) -> Check:
    """Installed units and, when systemd runs them, whether they are active. Not installed is a
    note, not a failure."""
    from flexnpu.service import install as inst  # noqa: PLC0415

    check = "services"
    services = _services_installed() if services is None else services
    if not services:
        return _ok(check, "not installed (note: `sudo flexnpu service install` runs FlexNPU as services)")
    if not inst.systemd_running():
        return _ok(check, f"installed ({', '.join(services)}); systemd is not running here")
    try:
        st = inst.status(inst.DEFAULT_PREFIX)
    except inst.ServiceError as e:
        return _fail(check, str(e), "sudo flexnpu service uninstall; sudo flexnpu service install")
    down = [f"{r['unit']} {r['active']}" for r in st["units"] if r["active"] != "active"
            and "@." not in r["unit"]]
    if down:
        return _fail(check, "not active: " + ", ".join(down),
                     "systemctl status " + " ".join(d.split()[0] for d in down))
    return _ok(check, f"{len(st['units'])} units active")


CHECK_NAMES = ("privileges", "bpf_syscall", "tracefs", "bcc_import", "bcc_uprobe",
               "libascendcl", "emulator", "service_group", "runtime_modes", "services")


def run_checks() -> list[Check]:
    """Every check, in CHECK_NAMES order: the order in which a user should fix them."""
    bcc = check_bcc_import()
    return [
        check_privileges(),
        check_bpf_syscall(),
        check_tracefs(),
        bcc,
        check_bcc_uprobe(bcc_ok=bcc.ok),
        check_libascendcl(),
        check_emulator(cann=find_cann_library()),
        check_group(),
        check_runtime_modes(),
        check_services(),
    ]


# --- output -------------------------------------------------------------------------------


def report(checks: list[Check]) -> dict:
    """The --json document (schema 1)."""
    return {"schema": SCHEMA, "ready": all(c.ok for c in checks),
            "checks": [asdict(c) for c in checks]}


def render(checks: list[Check]) -> Table:
    """One row per check: name, ok/FAIL, and the detail, followed by the fix when it failed."""
    table = Table(box=None, pad_edge=False, show_header=False)
    table.add_column("check", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for c in checks:
        detail = Text(c.detail)
        if c.fix:
            detail.append(f"\nfix: {c.fix}", style="bold")
        table.add_row(c.name, Text("ok", style="green") if c.ok else Text("FAIL", style="bold red"),
                      detail)
    return table


def doctor_command(
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON "
                                           '({"schema": 1, "ready": ..., "checks": [...]}).')] = False,
    ebpf: Annotated[bool, typer.Option("--ebpf", hidden=True,
                                       help="Print the self-test's BPF program and exit.")] = False,
) -> None:
    """Check that this machine can run FlexNPU, and print the fix for what is missing.

    Checks: privileges, the bpf() syscall, tracefs, bcc import, a bcc uprobe on libc,
    libascendcl.so (CANN's or the emulator's), the emulator's device server, the `flexnpu`
    group, the modes of the runtime dir's sockets and gate files, the systemd services.
    Exit code 0 when every check passes, 1 otherwise.

    Examples:
      sudo flexnpu doctor
      sudo flexnpu doctor --json
    """
    if ebpf:
        typer.echo(SELFTEST_PROGRAM.strip())
        return
    checks = run_checks()
    doc = report(checks)
    if json_out:
        typer.echo(json.dumps(doc))
    else:
        con = Console()
        con.print(render(checks))
        failed = sum(not c.ok for c in checks)
        con.print("ready" if doc["ready"] else f"not ready: {failed} of {len(checks)} checks failed")
    if not doc["ready"]:
        raise typer.Exit(1)
