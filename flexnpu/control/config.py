"""The controller's configuration: one TOML file, the same keys as the command's options.

    [controller]
    policy = "flexpd"          # passthrough | static-split | flexpd
    tick_ms = 5.0              # how often settings are recomputed
    lease_ms = 500.0           # a daemon reverts controller settings this long after the last renewal
    ...
    [policy.flexpd]
    tpot_slack = 0.1
    ...
    [policy.static-split]
    prefill_share = 0.5
    quantum_ms = 20.0
    [roles]
    decode = ["@inference", "alice"]   # who may declare each role (flexnpu run --role); absent: anyone
    distrust_after_ms = 2000.0         # a declared role the observed operators contradict this long is set aside
    [run.decode]                       # how `flexnpu run --role decode` runs a program (also prefill, auto)
    mode = "forward"                   # gated | forward (`--forward` / `--gated` override it)
    fallback = "gated"                 # with forward: gated (run gated where forwarding cannot) | none
    [observe]
    metrics = "127.0.0.1:9400"         # `flexnpu observe` serves Prometheus metrics there ("": none)
    [publish]                          # also publish on TCP, CURVE only (docs/multinode.md); "" = off
    observe_tcp = "10.0.0.1:7781"      # `flexnpu observe`'s snapshots (--publish-tcp overrides it)
    controller_tcp = "10.0.0.1:7782"   # `flexnpu controller`'s decisions
    secret_key = ""                    # the server's secret key file ("": <keys dir>/server.key_secret)
    authorized_dir = ""                # the clients' public keys ("": <keys dir>/authorized)

Every key has a default; an unknown section or key, a value of the wrong type or out of
range is refused with a `ConfigError` that names the key (`[policy.flexpd] tpot_slack`) and
says why. The file itself must be a regular file of UTF-8 TOML, at most MAX_BYTES: anything
else (a FIFO, a device, a directory, other bytes) is refused in one line too, never waited
on. `to_toml` writes the effective configuration back in the same form, so
`flexnpu controller --print-config > f.toml; flexnpu controller --config f.toml` is a round
trip.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexnpu.control import roles
from flexnpu.control.policies import POLICIES
from flexnpu.control.policies.base import opt
from flexnpu.forward.api import LEASE_DEFAULT_MS

MAX_BYTES = 1 << 20  # a controller's configuration is a few KB; more is a wrong file


class ConfigError(ValueError):
    """A configuration the controller refuses; the text names the key and the reason."""


@dataclass(frozen=True)
class ControllerOptions:
    policy: str = opt("flexpd", "passthrough, static-split or flexpd", choices=tuple(POLICIES))
    tick_ms: float = opt(5.0, "how often settings are recomputed and the difference applied", lo=0.5, hi=1000.0)
    lease_ms: float = opt(LEASE_DEFAULT_MS, "a daemon reverts the controller's settings (gates open) this long "
                                 "after its last renewal", lo=50.0, hi=60000.0)
    renew_ms: float = opt(100.0, "the lease is renewed at least this often (at most lease_ms / 2)", lo=5.0,
                          hi=30000.0)
    stale_after_ms: float = opt(1000.0, "an observer silent this long counts as gone: every gate open",
                                lo=100.0, hi=60000.0)
    rescan_ms: float = opt(1000.0, "how often the runtime dir is scanned for daemons", lo=50.0, hi=60000.0)
    list_ms: float = opt(100.0, "how often each daemon's client list is read", lo=5.0, hi=60000.0)
    report_ms: float = opt(500.0, "a report is published at least this often", lo=10.0, hi=60000.0)


RUN_ROLES = ("prefill", "decode", "auto")


@dataclass(frozen=True)
class PublishOptions:
    observe_tcp: str = opt("", "HOST:PORT where `flexnpu observe` also publishes its snapshots, CURVE only "
                           "(\"\": IPC only)")
    controller_tcp: str = opt("", "HOST:PORT where `flexnpu controller` also publishes its decisions, CURVE "
                              "only (\"\": IPC only)")
    secret_key: str = opt("", "the server's secret key file (\"\": <keys dir>/server.key_secret)")
    authorized_dir: str = opt("", "the public keys of the clients that may subscribe (\"\": <keys "
                              "dir>/authorized)")

    def check(self) -> tuple[str, str] | None:
        from flexnpu.remote.curve import parse_endpoint

        for name in ("observe_tcp", "controller_tcp"):
            value = getattr(self, name)
            if value:
                try:
                    parse_endpoint(value)
                except ValueError as e:
                    return name, str(e)
        if self.observe_tcp and self.observe_tcp == self.controller_tcp:
            return "controller_tcp", f"{self.controller_tcp!r} is observe_tcp's too; give each its own port"
        return None


@dataclass(frozen=True)
class RunOptions:
    mode: str = opt("gated", "how `flexnpu run` runs a program of this role: gated or forward",
                    choices=("gated", "forward"))
    fallback: str = opt("none", "with forward, where forwarding cannot run the program: gated, or none "
                        "(refuse)", choices=("none", "gated"))


@dataclass(frozen=True)
class ObserveOptions:
    metrics: str = opt("", "HOST:PORT where `flexnpu observe` serves Prometheus metrics (\"\": none; "
                       "`--metrics` overrides it)")

    def check(self) -> tuple[str, str] | None:
        if not self.metrics:
            return None
        from flexnpu.observe.metrics import AddressError, parse_address

        try:
            parse_address(self.metrics)
        except AddressError as e:
            return "metrics", str(e)
        return None


@dataclass(frozen=True)
class Config:
    controller: ControllerOptions
    policies: dict[str, Any]  # policy name -> its options dataclass
    roles: roles.RoleRules = roles.RoleRules()
    run: dict[str, RunOptions] = dataclasses.field(default_factory=lambda: {r: RunOptions() for r in RUN_ROLES})
    observe: ObserveOptions = ObserveOptions()
    publish: PublishOptions = PublishOptions()

    @property
    def policy_options(self) -> Any:
        return self.policies[self.controller.policy]


def check_value(section: str, f: dataclasses.Field, value: Any) -> Any:
    """The value converted to the field's type, or ConfigError naming the key and the reason."""
    key = f"[{section}] {f.name}"
    md = f.metadata
    kind = type(f.default)
    shown = _show(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {shown}: must be a string")
        if md["choices"] and value not in md["choices"]:
            raise ConfigError(f"{key} = {shown}: must be one of {', '.join(md['choices'])}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} = {shown}: must be a number")
    # TOML integers have no bound in the parser: one past a float's range is infinite too
    if isinstance(value, float) and not math.isfinite(value) or (
            isinstance(value, int) and abs(value) > 2 ** 1023):
        raise ConfigError(f"{key} = {shown}: must be a finite number")
    if kind is int and not isinstance(value, int):
        if not float(value).is_integer():
            raise ConfigError(f"{key} = {shown}: must be a whole number")
        value = int(value)
    lo, hi = md["lo"], md["hi"]
    if lo is not None and (value <= lo if md["lo_open"] else value < lo):
        raise ConfigError(f"{key} = {shown}: must be {'>' if md['lo_open'] else '>='} {lo:g}"
                          + (f" and <= {hi:g}" if hi is not None else ""))
    if hi is not None and value > hi:
        raise ConfigError(f"{key} = {shown}: must be <= {hi:g}" + (f" and >= {lo:g}" if lo is not None else ""))
    return kind(value)


def _show(value: Any) -> str:
    """A value as a refusal quotes it: one line, short (a file may hold a megabyte string)."""
    s = repr(value)
    return s if len(s) <= 60 else s[:57] + "..."


def _key(k: str) -> str:
    """A key as a refusal names it: TOML's quoted keys may hold newlines or anything else."""
    return k if k.replace("-", "_").isidentifier() else _show(k)


def _build(cls: type, section: str, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in values:
        if k not in fields:
            raise ConfigError(f"[{section}] {_key(k)}: unknown key; known: {', '.join(fields) or 'none'}")
    obj = cls(**{k: check_value(section, fields[k], v) for k, v in values.items()})
    check = getattr(obj, "check", None)
    if check is not None:
        problem = check()  # cross-field checks: (key, reason) or None
        if problem:
            raise ConfigError(f"[{section}] {problem[0]}: {problem[1]}")
    return obj


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def read_file(path: Path) -> dict[str, Any]:
    """The parsed TOML of a regular file, or ConfigError in one line. Opened without blocking
    (O_NONBLOCK: a FIFO's open would wait for a writer) and checked on the open fd, so what
    is read is what was checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{_shown_path(path)}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{_shown_path(path)}: {e.strerror or errno.errorcode.get(e.errno, e)}") from None
    except ValueError:  # a NUL in the name (a caller's Path; argv and the environment hold none)
        raise ConfigError(f"{_shown_path(path)}: not a file name") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((what for test, what in _KINDS if test(st.st_mode)), "not a file")
            raise ConfigError(f"{_shown_path(path)}: {kind}, not a regular file")
        if st.st_size > MAX_BYTES:
            raise ConfigError(f"{_shown_path(path)}: {st.st_size} bytes, more than a configuration "
                              f"({MAX_BYTES} at most)")
        chunks, size = [], 0
        while size <= MAX_BYTES:  # a file that grows while read is bounded too
            b = os.read(fd, MAX_BYTES + 1 - size)
            if not b:
                break
            chunks.append(b)
            size += len(b)
        data = b"".join(chunks)
    except OSError as e:
        raise ConfigError(f"{_shown_path(path)}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{_shown_path(path)}: more than a configuration ({MAX_BYTES} bytes at most)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{_shown_path(path)}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{_shown_path(path)}: not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{_shown_path(path)}: not valid TOML: nested too deeply") from None


def _shown_path(path: Path) -> str:
    """A file name as a refusal shows it: printable, and short enough for one line."""
    s = str(path)
    s = s if s.isprintable() else repr(s)
    return s if len(s) <= 200 else s[:100] + "..." + s[-97:]


def build(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    """The configuration from a parsed TOML document, with `overrides` (controller keys given as
    options) over it. ConfigError names the first bad key."""
    data = dict(data)
    ctl = data.pop("controller", {})
    if not isinstance(ctl, dict):
        raise ConfigError("[controller] must be a table")
    ctl = dict(ctl)
    ctl.update({k: v for k, v in (overrides or {}).items() if v is not None})
    pol = data.pop("policy", {}) or {}
    try:
        role_rules = roles.parse(data.pop("roles", {}))
    except roles.RoleRulesError as e:
        raise ConfigError(str(e)) from None
    run = data.pop("run", {}) or {}
    if not isinstance(run, dict):
        raise ConfigError("[run] must hold tables such as [run.decode]")
    for k in run:
        if k not in RUN_ROLES:
            raise ConfigError(f"[run.{_key(k)}]: unknown role; known: {', '.join(RUN_ROLES)}")
    run_opts = {r: _build(RunOptions, f"run.{r}", run.get(r, {})) for r in RUN_ROLES}
    observe = _build(ObserveOptions, "observe", data.pop("observe", {}))
    publish = _build(PublishOptions, "publish", data.pop("publish", {}))
    for k in data:
        raise ConfigError(f"[{_key(k)}]: unknown section; known: [controller], [roles], [observe], [publish], "
                          + ", ".join(f"[policy.{p}]" for p in POLICIES) + ", "
                          + ", ".join(f"[run.{r}]" for r in RUN_ROLES))
    if not isinstance(pol, dict):
        raise ConfigError("[policy] must hold tables such as [policy.flexpd]")
    for k in pol:
        if k not in POLICIES:
            raise ConfigError(f"[policy.{_key(k)}]: unknown policy; known: {', '.join(POLICIES)}")
    controller = _build(ControllerOptions, "controller", ctl)
    if controller.renew_ms > controller.lease_ms / 2:
        raise ConfigError(f"[controller] renew_ms = {controller.renew_ms:g}: must be at most lease_ms / 2 "
                          f"({controller.lease_ms / 2:g}), or the lease runs out between renewals")
    policies = {name: _build(mod.Options, f"policy.{name}", pol.get(name, {})) for name, mod in POLICIES.items()}
    return Config(controller, policies, role_rules, run_opts, observe, publish)


def load(path: Path | None, required: bool, overrides: dict[str, Any] | None = None) -> Config:
    """The configuration from `path` (absent and not required: the defaults), options over it."""
    data: dict[str, Any] = {}
    if path is not None and (required or path.exists()):
        data = read_file(path)
    return build(data, overrides)


def _toml_value(v: Any) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _section(name: str, obj: Any) -> list[str]:
    lines = [f"[{name}]"]
    for f in dataclasses.fields(obj):
        lines.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}  # {f.metadata['help']}")
    return lines


def to_toml(cfg: Config) -> str:
    """The effective configuration as TOML that `load` reads back to the same Config."""
    out = _section("controller", cfg.controller)
    for name, opts in cfg.policies.items():
        out += [""] + _section(f"policy.{name}", opts)  # a bare TOML key may hold '-'
    out += [""] + roles.to_toml(cfg.roles)
    for r, opts in cfg.run.items():
        out += [""] + _section(f"run.{r}", opts)
    out += [""] + _section("observe", cfg.observe)
    out += [""] + _section("publish", cfg.publish)
    return "\n".join(out) + "\n"
