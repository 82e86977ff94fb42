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

Every key has a default; an unknown section or key, a value of the wrong type or out of
range is refused with a `ConfigError` that names the key (`[policy.flexpd] tpot_slack`) and
says why. `to_toml` writes the effective configuration back in the same form, so
`flexnpu controller --print-config > f.toml; flexnpu controller --config f.toml` is a round
trip.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexnpu.control.policies import POLICIES
from flexnpu.control.policies.base import opt


class ConfigError(ValueError):
    """A configuration the controller refuses; the text names the key and the reason."""


@dataclass(frozen=True)
class ControllerOptions:
    policy: str = opt("flexpd", "passthrough, static-split or flexpd", choices=tuple(POLICIES))
    tick_ms: float = opt(5.0, "how often settings are recomputed and the difference applied", lo=0.5, hi=1000.0)
    lease_ms: float = opt(500.0, "a daemon reverts the controller's settings (gates open) this long "
                                 "after its last renewal", lo=50.0, hi=60000.0)
    renew_ms: float = opt(100.0, "the lease is renewed at least this often (at most lease_ms / 2)", lo=5.0,
                          hi=30000.0)
    stale_after_ms: float = opt(1000.0, "an observer silent this long counts as gone: every gate open",
                                lo=100.0, hi=60000.0)
    rescan_ms: float = opt(1000.0, "how often the runtime dir is scanned for daemons", lo=50.0, hi=60000.0)
    list_ms: float = opt(100.0, "how often each daemon's client list is read", lo=5.0, hi=60000.0)
    report_ms: float = opt(500.0, "a report is published at least this often", lo=10.0, hi=60000.0)


@dataclass(frozen=True)
class Config:
    controller: ControllerOptions
    policies: dict[str, Any]  # policy name -> its options dataclass

    @property
    def policy_options(self) -> Any:
        return self.policies[self.controller.policy]


def check_value(section: str, f: dataclasses.Field, value: Any) -> Any:
    """The value converted to the field's type, or ConfigError naming the key and the reason."""
    key = f"[{section}] {f.name}"
    md = f.metadata
    kind = type(f.default)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: must be a string")
        if md["choices"] and value not in md["choices"]:
            raise ConfigError(f"{key} = {value!r}: must be one of {', '.join(md['choices'])}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} = {value!r}: must be a number")
    if kind is int and not isinstance(value, int):
        if not float(value).is_integer():
            raise ConfigError(f"{key} = {value!r}: must be a whole number")
        value = int(value)
    if not math.isfinite(value):
        raise ConfigError(f"{key} = {value!r}: must be a finite number")
    lo, hi = md["lo"], md["hi"]
    if lo is not None and (value <= lo if md["lo_open"] else value < lo):
        raise ConfigError(f"{key} = {value!r}: must be {'>' if md['lo_open'] else '>='} {lo:g}"
                          + (f" and <= {hi:g}" if hi is not None else ""))
    if hi is not None and value > hi:
        raise ConfigError(f"{key} = {value!r}: must be <= {hi:g}" + (f" and >= {lo:g}" if lo is not None else ""))
    return kind(value)


def _build(cls: type, section: str, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in values:
        if k not in fields:
            raise ConfigError(f"[{section}] {k}: unknown key; known: {', '.join(fields) or 'none'}")
    obj = cls(**{k: check_value(section, fields[k], v) for k, v in values.items()})
    check = getattr(obj, "check", None)
    if check is not None:
        problem = check()  # cross-field checks: (key, reason) or None
        if problem:
            raise ConfigError(f"[{section}] {problem[0]}: {problem[1]}")
    return obj


def read_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


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
    for k in data:
        raise ConfigError(f"[{k}]: unknown section; known: [controller], "
                          + ", ".join(f"[policy.{p}]" for p in POLICIES))
    if not isinstance(pol, dict):
        raise ConfigError("[policy] must hold tables such as [policy.flexpd]")
    for k in pol:
        if k not in POLICIES:
            raise ConfigError(f"[policy.{k}]: unknown policy; known: {', '.join(POLICIES)}")
    controller = _build(ControllerOptions, "controller", ctl)
    if controller.renew_ms > controller.lease_ms / 2:
        raise ConfigError(f"[controller] renew_ms = {controller.renew_ms:g}: must be at most lease_ms / 2 "
                          f"({controller.lease_ms / 2:g}), or the lease runs out between renewals")
    policies = {name: _build(mod.Options, f"policy.{name}", pol.get(name, {})) for name, mod in POLICIES.items()}
    return Config(controller, policies)


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
    return "\n".join(out) + "\n"
