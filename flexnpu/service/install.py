"""Install, remove and inspect FlexNPU's systemd services.

Install writes the unit files, makes the service user and group, writes the controller's
default configuration when none exists, and records what it did in a manifest beside the
configuration file, so that uninstall removes exactly that (and a configuration edited since
stays). systemctl runs only when systemd is PID 1; elsewhere the files are written and the
output says so. Every step is one `Action` line, printed as it happens.
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from flexnpu import cann, paths
from flexnpu.service import units

SCHEMA = 1
DEFAULT_PREFIX = Path("/etc/systemd/system")
# unit directories systemd reads: enabling a unit written anywhere else would fail
SYSTEMD_UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/lib/systemd/system",
                     "/lib/systemd/system", "/usr/local/lib/systemd/system")
MANIFEST_NAME = "service-install.json"
EMU_DEFAULT_DEVICES = 8  # `flexnpu emu start`'s default


class ServiceError(RuntimeError):
    """Bad input or a step that failed; the message is one line that says what to do."""


class PrefixError(ServiceError):
    """--prefix names no directory unit files can be written under (a usage error)."""


Echo = Callable[[str], None]

# File systems the kernel makes up (their files are its state, not storage): nothing can be
# installed under them, and a dry run that "would write" there promises what cannot be done.
PSEUDO_FS = frozenset({"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "configfs",
                       "pstore", "bpf", "efivarfs", "fusectl", "binfmt_misc", "devpts", "mqueue", "hugetlbfs",
                       "autofs", "nsfs", "rpc_pipefs"})


def _fs_type(path: Path) -> str | None:
    """The type of the file system path is on, from the mount of its device in mountinfo."""
    try:
        dev = os.stat(path).st_dev
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    want = f"{os.major(dev)}:{os.minor(dev)}"
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and fields[2] == want and " - " in line:
            return line.split(" - ", 1)[1].split()[0]
    return None


def check_prefix(prefix: Path) -> Path:
    """The unit directory as an absolute path, or PrefixError: it must be a directory or a
    path that can become one (its nearest existing ancestor a directory), on a real file
    system. Relative prefixes are made absolute: the manifest must name the same place from
    any working directory."""
    if str(prefix).strip() == "":
        raise PrefixError(f"--prefix is empty; give the directory the unit files go to (default {DEFAULT_PREFIX})")
    prefix = Path(os.path.abspath(prefix))
    existing = prefix
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == prefix else f": {existing} is not a directory"
        raise PrefixError(f"--prefix {prefix}{where or ' is not a directory'}; give the directory the unit files "
                          f"go to (default {DEFAULT_PREFIX})")
    fs = _fs_type(existing)
    if fs in PSEUDO_FS:
        raise PrefixError(f"--prefix {prefix} is on {fs}, a file system the kernel makes up; give a directory "
                          f"on disk (default {DEFAULT_PREFIX})")
    return prefix


def systemd_running() -> bool:
    """sd_booted(): systemd is PID 1 when /run/systemd/system exists."""
    return Path("/run/systemd/system").is_dir()


def pid1_name() -> str:
    try:
        return Path("/proc/1/comm").read_text().strip()
    except OSError:
        return "?"


def installed_binary() -> Path:
    """The `flexnpu` entry point installed beside this interpreter (the venv's bin/)."""
    cand = Path(sys.executable).parent / "flexnpu"
    if cand.is_file() and os.access(cand, os.X_OK):
        return cand.absolute()
    found = shutil.which("flexnpu")
    if found:
        return Path(found).absolute()
    raise ServiceError(f"no installed `flexnpu` entry point beside {sys.executable} or on PATH; "
                       "install FlexNPU first (bash scripts/setup.sh)")


def physical_devices(dev: Path = Path("/dev")) -> list[int]:
    """Ascend devices the driver exposes: /dev/davinci<N>."""
    return sorted(int(m.group(1)) for p in dev.glob("davinci*") if (m := re.fullmatch(r"davinci(\d+)", p.name)))


def parse_devices(spec: str, emulator: bool, present: list[int] | None = None) -> tuple[int, ...]:
    """'0,1' or 'all' -> device numbers. 'all' is the emulator's devices without CANN, else the
    driver's /dev/davinci<N>."""
    spec = spec.strip()
    if spec == "all":
        if emulator:
            return tuple(range(EMU_DEFAULT_DEVICES))
        found = physical_devices() if present is None else present
        if not found:
            raise ServiceError("--devices all: CANN is installed but no /dev/davinci<N> device exists; "
                               "give the devices, e.g. --devices 0,1")
        return tuple(found)
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) > 15:
            raise ServiceError(f"--devices takes 'all' or a comma list of device numbers 0-15 "
                               f"(e.g. 0,1), not {spec!r}")
        if int(part) in out:
            raise ServiceError(f"--devices names device {part} twice: {spec!r}")
        out.append(int(part))
    return tuple(sorted(out))


def make_config(devices: str, binary: Path | None = None) -> units.ServiceConfig:
    emulator = cann.find_cann_library() is None
    devs = parse_devices(devices, emulator)
    observe_net, controller_net = network_wanted(paths.config_file())
    return units.ServiceConfig(
        binary=binary or installed_binary(), devices=devs, emulator=emulator,
        emu_devices=max(max(devs) + 1, 1) if emulator else 0,
        user=paths.service_user(), group=paths.service_group(), config_file=paths.config_file(),
        observe_network=observe_net, controller_network=controller_net)


def network_wanted(config_file: Path) -> tuple[bool, bool]:
    """Whether the observer's and the controller's units need IP sockets: the node's
    configuration (read at install; absent: no) serves metrics or publishes on TCP. A bad
    file is refused here, before any unit is written."""
    from flexnpu.control import config as cfgmod

    try:
        c = cfgmod.load(config_file, required=False)
    except cfgmod.ConfigError as e:
        raise ServiceError(f"{config_file}: {e}") from None
    except OSError:  # not this user's to read (a dry run as a user); root, who installs, reads it
        return False, False
    return bool(c.observe.metrics or c.publish.observe_tcp), bool(c.publish.controller_tcp)


_CONFIG_HEAD = "# FlexNPU's node configuration; `flexnpu controller --print-config` shows the effective one.\n"


def default_config_text(binary: Path | None = None) -> str:
    """The controller's defaults as TOML: what the installed controller (the one the unit runs)
    prints with --print-config and no configuration file; this package's own when there is no
    such binary."""
    if binary is not None:
        env = {**os.environ, "FLEXNPU_CONFIG": "/nonexistent/flexnpu.toml"}  # its defaults, not a file's
        proc = subprocess.run([str(binary), "controller", "--print-config"], capture_output=True, text=True,
                              env=env, stdin=subprocess.DEVNULL, timeout=60)
        if proc.returncode != 0 or "[controller]" not in proc.stdout:
            msg = " ".join(proc.stderr.split())[:200]
            raise ServiceError(f"{binary} controller --print-config failed ({proc.returncode}): {msg}")
        return _CONFIG_HEAD + proc.stdout
    from flexnpu.control import config as cfgmod

    return _CONFIG_HEAD + cfgmod.to_toml(cfgmod.build({}))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_path() -> Path:
    return paths.config_file().parent / MANIFEST_NAME


def _run(argv: list[str], echo: Echo) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        msg = " ".join((proc.stderr or proc.stdout).split())[:300]
        raise ServiceError(f"{' '.join(argv)} failed ({proc.returncode}): {msg}")
    echo(f"ran: {' '.join(argv)}")


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def group_members(name: str) -> list[str]:
    """Users in the group, as a supplementary or a primary group."""
    g = grp.getgrnam(name)
    return sorted(set(g.gr_mem) | {p.pw_name for p in pwd.getpwall() if p.pw_gid == g.gr_gid})


def _nologin() -> str:
    return next((s for s in ("/usr/sbin/nologin", "/sbin/nologin") if Path(s).exists()), "/bin/false")


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ServiceError(f"{what} changes the system and needs root: sudo flexnpu service {what} "
                           "(or --dry-run to see what it would do)")


@dataclass
class Plan:
    cfg: units.ServiceConfig
    prefix: Path
    files: dict[str, str]


def plan(devices: str, prefix: Path, binary: Path | None = None) -> Plan:
    prefix = check_prefix(prefix)
    cfg = make_config(devices, binary)
    return Plan(cfg, prefix, units.render(cfg))


def install(p: Plan, echo: Echo, dry_run: bool = False) -> None:
    cfg = p.cfg
    conf = cfg.config_file
    if dry_run:
        echo(f"dry run: nothing is changed. systemd is {'PID 1' if systemd_running() else 'not running'}; "
             f"binary {cfg.binary}; devices {','.join(map(str, cfg.devices))}; "
             f"{'emulated devices (no CANN found)' if cfg.emulator else 'CANN found: no emulator unit'}")
        for name, text in p.files.items():
            echo(f"would write {p.prefix / name}:")
            echo(text.rstrip("\n"))
            echo("")
        if not conf.exists():
            echo(f"would write {conf}:")
            echo(default_config_text(cfg.binary).rstrip("\n"))
            echo("")
        if not group_exists(cfg.group):
            echo(f"would create system group {cfg.group}")
        if not user_exists(cfg.user):
            echo(f"would create system user {cfg.user} (group {cfg.group}, no home, no login)")
        if systemd_running():
            echo(f"would run: systemctl daemon-reload; systemctl enable --now {' '.join(units.enabled_units(cfg))}")
        return
    require_root("install")
    # a second install keeps what the first one made as its own (uninstall still removes it)
    prev = read_manifest() or {}
    manifest = {"schema": SCHEMA, "prefix": str(p.prefix), "units": list(p.files), "enabled": [],
                "config": prev.get("config"), "group_created": bool(prev.get("group_created")),
                "user_created": bool(prev.get("user_created"))}
    if not group_exists(cfg.group):
        _run(["groupadd", "--system", cfg.group], echo)
        manifest["group_created"] = True
        echo(f"created system group {cfg.group}")
    else:
        echo(f"system group {cfg.group} exists")
    if not user_exists(cfg.user):
        _run(["useradd", "--system", "--gid", cfg.group, "--no-create-home", "--home-dir", "/nonexistent",
              "--shell", _nologin(), "--comment", "FlexNPU services", cfg.user], echo)
        manifest["user_created"] = True
        echo(f"created system user {cfg.user}")
    else:
        echo(f"system user {cfg.user} exists")
    p.prefix.mkdir(parents=True, exist_ok=True)
    for name, text in p.files.items():
        path = p.prefix / name
        path.write_text(text)
        path.chmod(0o644)
        echo(f"wrote {path}")
    if conf.exists():
        echo(f"kept {conf} (exists)")
    else:
        conf.parent.mkdir(parents=True, exist_ok=True)
        text = default_config_text(cfg.binary)
        conf.write_text(text)
        conf.chmod(0o644)
        manifest["config"] = {"path": str(conf), "sha256": _sha(text)}
        echo(f"wrote {conf} (the controller's defaults)")
    mpath = manifest_path()
    mpath.parent.mkdir(parents=True, exist_ok=True)
    _write_manifest(mpath, manifest)
    if not systemd_running():
        echo(f"systemd is not PID 1 here (PID 1 is {pid1_name()}): wrote the files only; nothing was "
             "started or enabled")
    elif str(p.prefix) not in SYSTEMD_UNIT_DIRS:
        echo(f"{p.prefix} is not a directory systemd reads units from: not enabled or started")
    else:
        _run(["systemctl", "daemon-reload"], echo)
        enable = units.enabled_units(cfg)
        _run(["systemctl", "enable", "--now", *enable], echo)
        manifest["enabled"] = enable
        _write_manifest(mpath, manifest)
    echo(f"wrote {mpath} (what uninstall removes)")


def _write_manifest(path: Path, manifest: dict) -> None:
    path.write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest() -> dict | None:
    try:
        return json.loads(manifest_path().read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ServiceError(f"{manifest_path()} is not valid JSON ({e}); remove the units by hand") from None


def _unit_names_in(prefix: Path) -> list[str]:
    names = [units.EMU, units.DAEMON_TEMPLATE, units.OBSERVE, units.CONTROLLER]
    return [n for n in names if (prefix / n).exists()]


def uninstall(prefix: Path, echo: Echo, dry_run: bool = False) -> None:
    """Removes what install wrote: the units (stopped and disabled first under systemd), the
    configuration if unchanged since, the user and group if install made them and nobody else is
    in the group; the manifest last."""
    m = read_manifest()
    if m is not None:
        prefix = Path(m["prefix"])
        names = [n for n in m["units"] if (prefix / n).exists()]
    else:
        names = _unit_names_in(prefix)
        if not names:
            raise ServiceError(f"nothing to uninstall: no FlexNPU units in {prefix} and no {manifest_path()}")
    verb = "would remove" if dry_run else "removed"
    if not dry_run:
        require_root("uninstall")
    if systemd_running() and str(prefix) in SYSTEMD_UNIT_DIRS:
        enabled = (m or {}).get("enabled") or [n for n in names if "@." not in n]
        if dry_run:
            echo(f"would run: systemctl disable --now {' '.join(enabled)}")
        else:
            # a unit already gone or stopped is fine: uninstall must finish
            subprocess.run(["systemctl", "disable", "--now", *enabled], capture_output=True)
            echo(f"ran: systemctl disable --now {' '.join(enabled)}")
    for n in names:
        if not dry_run:
            (prefix / n).unlink(missing_ok=True)
        echo(f"{verb} {prefix / n}")
    conf = (m or {}).get("config")
    if conf:
        cp = Path(conf["path"])
        if not cp.exists():
            echo(f"{cp} is already gone")
        elif _sha(cp.read_text()) != conf["sha256"]:
            echo(f"kept {cp}: changed since install")
        else:
            if not dry_run:
                cp.unlink()
            echo(f"{verb} {cp}")
    g = paths.service_group()
    had_group = group_exists(g)
    if m and m.get("user_created") and user_exists(paths.service_user()):
        if not dry_run:
            _run(["userdel", paths.service_user()], echo)
        echo(f"{verb} system user {paths.service_user()}")
    if m and m.get("group_created") and had_group:
        others = [u for u in (group_members(g) if group_exists(g) else [])
                  if not (dry_run and u == paths.service_user() and m.get("user_created"))]
        if others:
            echo(f"kept system group {g}: it has members ({', '.join(others)})")
        else:
            if not dry_run and group_exists(g):  # userdel may have removed it with its last user
                _run(["groupdel", g], echo)
            echo(f"{verb} system group {g}")
    elif had_group:
        echo(f"kept system group {g}: install did not create it")
    if m is not None:
        if not dry_run:
            manifest_path().unlink(missing_ok=True)
        echo(f"{verb} {manifest_path()}")
    if systemd_running() and str(prefix) in SYSTEMD_UNIT_DIRS and not dry_run:
        _run(["systemctl", "daemon-reload"], echo)


# --- status -----------------------------------------------------------------------------------


def _systemctl(verb: str, unit: str) -> str:
    proc = subprocess.run(["systemctl", verb, unit], capture_output=True, text=True)
    return (proc.stdout.strip().splitlines() or ["unknown"])[0]


def _file_entry(p: Path) -> dict:
    st = p.lstat()
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return {"path": str(p), "mode": f"{st.st_mode & 0o7777:04o}", "owner": owner, "group": group}


def status(prefix: Path) -> dict:
    """Per unit: installed, enabled, active (systemctl, when systemd runs); the runtime dir's
    sockets."""
    m = read_manifest()
    if m is not None:
        prefix = Path(m["prefix"])
        names: Iterable[str] = m.get("enabled") or [n for n in m["units"]]
        files = set(m["units"])
    else:
        names = [units.EMU, units.DAEMON_TEMPLATE, units.OBSERVE, units.CONTROLLER]
        files = set(names)
    running = systemd_running()
    rows = []
    for n in names:
        fname = re.sub(r"@\d+\.service$", "@.service", n)
        row = {"unit": n, "installed": (prefix / fname).exists() and fname in files}
        if running:
            row["enabled"] = _systemctl("is-enabled", n)
            row["active"] = _systemctl("is-active", n)
        else:
            row["enabled"] = row["active"] = "systemd not running"
        rows.append(row)
    rdir = paths.runtime_dir()
    sockets = [_file_entry(p) for p in sorted(rdir.glob("*.sock"))] if rdir.is_dir() else []
    return {"schema": SCHEMA, "systemd": running, "pid1": pid1_name(), "prefix": str(prefix),
            "manifest": str(manifest_path()) if m is not None else None, "units": rows,
            "runtime_dir": {**(_file_entry(rdir) if rdir.exists() else {"path": str(rdir)}),
                            "exists": rdir.exists()},
            "sockets": sockets}
