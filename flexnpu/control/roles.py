"""Declared roles: who may declare which role, and when a declaration stops being believed.

A process declares its role with `flexnpu run --role prefill|decode` (FLEXNPU_ROLE). Under
flexpd a decode client goes first, so a declaration is a claim on the device that anyone who
may run a gated program can make. Two checks keep it honest:

- **Who may declare** (`[roles] prefill`, `[roles] decode`, set by the administrator): a
  list of users and `@groups` per role, resolved from the uid the daemon learned from the
  kernel (SO_PEERCRED) when the process connected. A role with no list may be declared by
  anyone (the default, as before these lists). A declaration the list does not allow is
  treated as no declaration: the observed phase decides.
- **Whether the work agrees** (`distrust_after_ms`): a declared role that the observed
  operators contradict (the observer's aclnn and kernel-name signals by default:
  `contradicted_by`) for longer than the bound is set aside, and the observed phase used,
  until observation has agreed with it again for `trust_after_ms`. Short contradictions
  (a warm-up pass, one odd interval) do not count; brief agreement does not wipe out a long
  contradiction either, so a process cannot keep its claim by agreeing now and then.

`RoleRules` is the parsed `[roles]` table; `judge()` is the pure step of the second check,
run once per snapshot by the policies (their state carries `Trust`); `RoleAccess` resolves
users and groups (the only part that reads the user database, in the controller's I/O).
"""

from __future__ import annotations

import grp
import os
import pwd
import threading
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

ROLES = ("prefill", "decode")
SIGNALS = ("aclnn", "kernel", "shape")  # the observer's phase signals, strongest first (docs/observe.md)
ANYONE = "*"


class RoleRulesError(ValueError):
    """A `[roles]` value the controller refuses; the text names the key and the reason."""


@dataclass(frozen=True)
class RoleRules:
    """The `[roles]` table."""

    prefill: tuple[str, ...] | None = None  # who may declare prefill; None: anyone
    decode: tuple[str, ...] | None = None  # who may declare decode; None: anyone
    distrust_after_ms: float = 2000.0
    trust_after_ms: float = 1000.0
    contradicted_by: tuple[str, ...] = ("aclnn", "kernel")

    def allowed(self, role: str) -> tuple[str, ...] | None:
        return self.prefill if role == "prefill" else self.decode


HELP = {
    "prefill": 'who may declare prefill: user names, "@group", numeric uids, "@gid", "*" (anyone); '
               "absent: anyone",
    "decode": "who may declare decode (the same form); absent: anyone",
    "distrust_after_ms": "a declared role that the observed operators contradict this long is set aside "
                         "(the observed phase is used)",
    "trust_after_ms": "a role set aside is believed again after observation agrees with it this long",
    "contradicted_by": f"which observer signals may contradict a declared role ({', '.join(SIGNALS)}); "
                       "shape is the weakest (docs/observe.md)",
}
DURATIONS = {"distrust_after_ms": (10.0, 3_600_000.0), "trust_after_ms": (10.0, 3_600_000.0)}


def _entry(key: str, v: Any) -> str:
    if not isinstance(v, str) or not v or len(v) > 256 or not v.isprintable() or v.strip() != v:
        raise RoleRulesError(f"{key}: {_show(v)}: each entry must be a user name, \"@group\", a uid, "
                             "\"@gid\" or \"*\"")
    if v == ANYONE:
        return v
    name = v[1:] if v.startswith("@") else v
    if not name:
        raise RoleRulesError(f"{key}: \"@\" names no group")
    try:
        if v.startswith("@"):
            grp.getgrgid(int(name)) if name.isdigit() else grp.getgrnam(name)
        elif not name.isdigit():  # a numeric uid needs no entry in the user database
            pwd.getpwnam(name)
    except KeyError:
        raise RoleRulesError(f"{key}: {_show(v)}: no such {'group' if v.startswith('@') else 'user'} on this "
                             "node") from None
    except (OverflowError, ValueError):
        raise RoleRulesError(f"{key}: {_show(v)}: not a valid id") from None
    return v


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _number(key: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RoleRulesError(f"{key} = {_show(v)}: must be a number")
    try:
        f = float(v)
    except OverflowError:
        f = float("inf")
    if not f == f or f in (float("inf"), float("-inf")):
        raise RoleRulesError(f"{key} = {_show(v)}: must be a finite number")
    if not lo <= f <= hi:
        raise RoleRulesError(f"{key} = {_show(v)}: must be >= {lo:g} and <= {hi:g}")
    return f


def parse(table: Any) -> RoleRules:
    """The `[roles]` table; RoleRulesError names the first bad key. User and group names must
    exist on this node: a misspelt one would otherwise take a role away from its owners
    without a word."""
    if not isinstance(table, dict):
        raise RoleRulesError("[roles] must be a table")
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"[roles] {k if k.isidentifier() else _show(k)}"
        if k in ROLES:
            if not isinstance(v, list):
                raise RoleRulesError(f"{key} = {_show(v)}: must be a list, e.g. [\"@inference\", \"alice\"]")
            if len(v) > 4096:
                raise RoleRulesError(f"{key}: at most 4096 entries")
            out[k] = tuple(dict.fromkeys(_entry(key, e) for e in v))
        elif k in DURATIONS:
            out[k] = _number(key, v, *DURATIONS[k])
        elif k == "contradicted_by":
            if not isinstance(v, list) or any(s not in SIGNALS for s in v):
                raise RoleRulesError(f"{key} = {_show(v)}: must be a list of {', '.join(SIGNALS)}")
            out[k] = tuple(s for s in SIGNALS if s in v)
        else:
            raise RoleRulesError(f"{key}: unknown key; known: {', '.join(HELP)}")
    return RoleRules(**out)


def to_toml(rules: RoleRules) -> list[str]:
    """The `[roles]` table as TOML lines that `parse` reads back to the same rules."""
    def strs(xs: tuple[str, ...]) -> str:
        return "[" + ", ".join('"' + x.replace("\\", "\\\\").replace('"', '\\"') + '"' for x in xs) + "]"

    lines = ["[roles]"]
    for role in ROLES:
        who = rules.allowed(role)
        if who is None:  # absent and "anyone" differ only in how they read: keep it absent
            lines.append(f'# {role} = ["@group", "user"]  # {HELP[role]}')
        else:
            lines.append(f"{role} = {strs(who)}  # {HELP[role]}")
    for k in DURATIONS:
        lines.append(f"{k} = {getattr(rules, k)!r}  # {HELP[k]}")
    lines.append(f"contradicted_by = {strs(rules.contradicted_by)}  # {HELP['contradicted_by']}")
    return lines


# ---------------------------------------------------------------- who may declare


class RoleAccess:
    """Which roles a uid may declare under `rules`, from the user database (its name, its
    primary group, the groups that list it). Answers are kept for `ttl_s`, so the
    controller's client lists (every 100 ms) do not query the database each time, while a
    change of group membership is seen within that time. Thread-safe: the daemon links'
    I/O threads ask it."""

    def __init__(self, rules: RoleRules, ttl_s: float = 30.0) -> None:
        self.rules = rules
        self.ttl_s = ttl_s
        self._cache: dict[int, tuple[float, frozenset[str], str]] = {}
        self._lock = threading.Lock()
        self.open = rules.prefill is None and rules.decode is None

    def of(self, uid: int | None) -> tuple[frozenset[str], str]:
        """The roles uid may declare, and how it reads in a sentence ("uid 1001 (bob)")."""
        if self.open:
            return frozenset(ROLES), "" if uid is None else f"uid {uid}"
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(uid if uid is not None else -1)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1], hit[2]
        roles, who = self._resolve(uid)
        with self._lock:
            self._cache[uid if uid is not None else -1] = (now, roles, who)
        return roles, who

    def _resolve(self, uid: int | None) -> tuple[frozenset[str], str]:
        if uid is None:  # a daemon that does not say: only a role open to anyone
            return frozenset(r for r in ROLES if self.rules.allowed(r) is None
                             or ANYONE in (self.rules.allowed(r) or ())), "an unknown user"
        name, gids = None, set()
        try:
            pw = pwd.getpwuid(uid)
            name = pw.pw_name
            gids = {pw.pw_gid, *os.getgrouplist(pw.pw_name, pw.pw_gid)}
        except (KeyError, OSError):
            pass  # a uid with no entry: only its number can name it
        roles = set()
        for role in ROLES:
            who = self.rules.allowed(role)
            if who is None or ANYONE in who or _matches(who, uid, name, gids):
                roles.add(role)
        return frozenset(roles), f"uid {uid}" + (f" ({name})" if name else "")


def _matches(who: tuple[str, ...], uid: int, name: str | None, gids: set[int]) -> bool:
    for e in who:
        if e.startswith("@"):
            g = e[1:]
            try:
                gid = int(g) if g.isdigit() else grp.getgrnam(g).gr_gid
            except KeyError:
                continue
            if gid in gids:
                return True
        elif (e.isdigit() and int(e) == uid) or (name is not None and e == name):
            return True
    return False


# ---------------------------------------------------------------- whether the work agrees


class Trust(NamedTuple):
    """What the policy remembers of one client's declared role between snapshots."""

    declared: str  # the role it declared
    contra_ns: int = 0  # when observation began to contradict it (snapshot clock); 0: it does not
    agree_ns: int = 0  # when observation began to agree again; 0: it does not (or nothing seen)
    seen: str = ""  # the contradicting phase last observed
    source: str = ""  # the signal that showed it
    distrusted: bool = False


def judge(t: Trust, seen: tuple[str, str] | None, mono_ns: int, interval_ns: int, rules: RoleRules) -> Trust:
    """The trust after one snapshot whose work showed `seen`: (phase, signal), given only
    where the phase is prefill or decode and the signal one of `contradicted_by` (idle or
    mixed work, or a weaker signal, is no evidence either way: both clocks go on). The same
    snapshot judged twice gives the same trust; an unchanged trust is returned as it is
    (judged for every declared client of every snapshot: no allocation when nothing moves)."""
    if seen is None:  # nothing to judge by: both clocks go on
        return t
    start = mono_ns - interval_ns
    phase, source = seen
    if phase != t.declared:
        contra = t.contra_ns or start
        distrusted = t.distrusted or mono_ns - contra >= rules.distrust_after_ms * 1e6
        if (contra, distrusted, phase, source, 0) == (t.contra_ns, t.distrusted, t.seen, t.source, t.agree_ns):
            return t
        return t._replace(contra_ns=contra, agree_ns=0, seen=phase, source=source, distrusted=distrusted)
    if not t.contra_ns:
        return t if t.agree_ns else t._replace(agree_ns=start)
    agree = t.agree_ns or start
    if mono_ns - agree >= rules.trust_after_ms * 1e6:
        return Trust(t.declared, agree_ns=agree)
    return t if agree == t.agree_ns else t._replace(agree_ns=agree)


def distrust_note(pid: int, t: Trust, mono_ns: int) -> str:
    what = f"{t.seen}-shaped work" if t.source == "shape" else f"{t.seen} operators"
    return (f"pid {pid} declared {t.declared} but runs {what} for {(mono_ns - t.contra_ns) / 1e9:.1f} s: "
            f"treated as {t.seen}")
