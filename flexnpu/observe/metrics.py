"""Prometheus metrics of the observer (`flexnpu observe --metrics HOST:PORT`).

The observer's loop hands each snapshot it publishes (and the daemons' client lists it read,
and the controller's reports it received) to a `MetricsState`; a collector turns the state's
latest copy into metric families at each scrape, so a scrape never waits on a socket and
never sees half an update. Names follow Prometheus's conventions (prefix `flexnpu_`, base
units, `_total` counters) and the labels of Ascend's npu-exporter (`id`, `model_name`) where
a metric is about a device; docs/metrics.md lists every metric.

Cardinality is bounded by what is alive: a process's series come from the latest snapshot
only, so an exited process's series are gone one interval after its last report. Device
counters (launches, bytes, busy seconds) are kept per device by adding each process's
increase since the previous snapshot, so they keep counting what exited processes did.
Controller decisions are counted by policy, device and the kind of reason (`reason_kind`),
never by the free text, which names pids and times. Each decision is counted once, by its
number in the controller's reports (wire.ControllerReport.decided): the recent ones a
controller made before the observer subscribed, or in a report the observer lost, come
with the next report.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

log = logging.getLogger("flexnpu.observe")

DIRECTIONS = ("h2d", "d2h", "d2d")
PHASES = ("prefill", "decode")  # the busy phases of a device's occupancy (idle is the rest)
DEFAULT_HOST = "127.0.0.1"
CONTROLLER_UP_S = 5.0  # a controller that published nothing this long counts as down

# (kind, pattern): the first whose pattern the reason's own part matches names its kind.
# The texts are the policies' (flexnpu/control/policies/); a new text falls under "other".
REASON_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((k, re.compile(p)) for k, p in (
    ("observer_quiet", r"^(no snapshot from the observer|observer silent)"),
    ("passthrough", r"^passthrough:"),
    ("steps_aside", r"steps aside"),
    ("no_phase", r"shows no phase yet"),
    ("turn", r"^turn: "),
    ("decode_first", r": decode first$|^decode pid \d+ step .*: decode first"),
    ("prefill_first", r"prefill first"),
    ("budget", r"in-flight \d+ -> \d+|^decode pid \d+ step .*(<|>|within)"),
    ("decode_priority", r"^decode pid \d+ shares device"),
    ("prefill_priority", r"^prefill pid \d+ shares device"),
))


def reason_kind(reason: str) -> str:
    """The kind of a controller's reason, a bounded label value. A declared role's note
    (before "; ") is left aside: the decision itself is what follows it."""
    text = reason.rsplit("; ", 1)[-1].strip()
    for kind, pat in REASON_KINDS:
        if pat.search(text):
            return kind
    return "other"


class AddressError(ValueError):
    """A --metrics address that cannot be used; the text says why, in one line."""


def parse_address(text: str) -> tuple[str, int]:
    """(host, port) from HOST:PORT, [V6]:PORT, :PORT or PORT (host 127.0.0.1: metrics name
    the node's processes, so they are served beyond it only when asked). HOST is an IP
    address or localhost, never looked up. Port 0: any free."""
    s = text.strip()
    if not s:
        raise AddressError("an empty address; give HOST:PORT, e.g. 127.0.0.1:9400")
    if s.startswith("["):
        host, sep, port = s[1:].partition("]")
        if not sep or (port and not port.startswith(":")):
            raise AddressError(f"{text!r}: an IPv6 address is written [ADDR]:PORT")
        port = port[1:]
    elif s.count(":") > 1:
        raise AddressError(f"{text!r}: write an IPv6 address as [ADDR]:PORT")
    elif ":" in s:
        host, _, port = s.partition(":")
    else:
        host, port = "", s
    host = host or DEFAULT_HOST
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise AddressError(f"{text!r}: the port must be a number from 0 to 65535 (0: any free port)")
    if host == "localhost":  # the one name taken: a bind address needs no name service
        host = DEFAULT_HOST
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise AddressError(f"{text!r}: the host must be an IP address of this machine (127.0.0.1, "
                           "0.0.0.0 for every interface, [::1]) or localhost") from None
    return host, int(port)


@dataclass
class _DeviceTotals:
    launches: float = 0.0
    bytes: dict[str, float] = field(default_factory=lambda: {d: 0.0 for d in DIRECTIONS})
    busy_s: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})


@dataclass(frozen=True)
class _View:
    """The state at one moment, as a scrape reads it (never changed once made)."""

    snapshot: dict[str, Any] | None
    snapshots: int
    clients: dict[tuple[int, int], Any]  # (pid, device) -> api.ClientView
    totals: dict[int, _DeviceTotals]
    chips: dict[int, dict[str, Any]]  # device -> {"model_name", "total_bytes"}
    decisions: dict[tuple[str, int, str], int]
    controller_reports: int
    controller_policy: str | None
    controller_seen: float  # monotonic s of its last report, 0: never


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


class MetricsState:
    """What the metrics say, updated by the observer's loop and read by scrapes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] | None = None
        self._snapshots = 0
        self._clients: dict[tuple[int, int], Any] = {}
        self._totals: dict[int, _DeviceTotals] = {}
        self._prev: dict[tuple[int, int], tuple[float, dict[str, float]]] = {}
        self._chips: dict[int, dict[str, Any]] = {}
        self._decisions: Counter[tuple[str, int, str]] = Counter()
        self._reports = 0
        self._policy: str | None = None
        self._controller_seen = 0.0
        self._counted: tuple[int, int] | None = None  # (controller pid, decisions counted up to)

    def update(self, snap: dict[str, Any], clients: dict[tuple[int, int], Any] | None = None) -> None:
        """Takes one published snapshot (and the daemons' clients read with it)."""
        with self._lock:
            seen: set[tuple[int, int]] = set()
            for e in snap.get("processes") or ():
                dev = e.get("device")
                if not isinstance(dev, int):
                    continue
                key = (int(e["pid"]), dev)
                seen.add(key)
                ctr = e.get("counters") or {}
                launches = _num(ctr.get("launches")) or 0.0
                nbytes = {d: _num((ctr.get("bytes") or {}).get(d)) or 0.0 for d in DIRECTIONS}
                before = self._prev.get(key)
                t = self._totals.setdefault(dev, _DeviceTotals())
                if before is None or launches < before[0] or any(nbytes[d] < before[1][d] for d in DIRECTIONS):
                    before = (0.0, {d: 0.0 for d in DIRECTIONS})  # new, or a reused pid
                t.launches += launches - before[0]
                for d in DIRECTIONS:
                    t.bytes[d] += nbytes[d] - before[1][d]
                self._prev[key] = (launches, nbytes)
            self._prev = {k: v for k, v in self._prev.items() if k in seen}
            dt = _num(snap.get("interval_s")) or 0.0
            for d in snap.get("devices") or ():
                t = self._totals.setdefault(int(d["device"]), _DeviceTotals())
                occ = d.get("phase_occupancy") or {}
                for p in PHASES:
                    t.busy_s[p] += (_num(occ.get(p)) or 0.0) * dt
            self._snapshot = snap
            self._snapshots += 1
            self._clients = dict(clients or {})

    def set_chips(self, chips: dict[int, dict[str, Any]]) -> None:
        """What is known of each device itself: model name, memory capacity."""
        with self._lock:
            self._chips = dict(chips)

    def controller_report(self, report: Any) -> None:
        """Counts one controller report's decisions (a flexnpu.control.wire.ControllerReport)."""
        with self._lock:
            self._reports += 1
            self._policy = report.policy
            self._controller_seen = time.monotonic()
            # each decision once, by its number: those made before this observer joined
            # (or in a report it lost) come with the next report's recent ones
            counted = self._counted[1] if self._counted and self._counted[0] == report.pid else None
            new, missed = report.new_decisions(counted)
            if missed and counted is not None:  # the first report's older ones predate this observer
                log.warning("%d controller decisions were made and dropped before they could be counted", missed)
            for d in new:
                self._decisions[(report.policy, d.device, reason_kind(d.reason))] += 1
            if report.decided is not None:
                self._counted = (report.pid, report.decided)

    def view(self) -> _View:
        with self._lock:
            return _View(self._snapshot, self._snapshots, self._clients,
                         {k: _DeviceTotals(v.launches, dict(v.bytes), dict(v.busy_s)) for k, v in self._totals.items()},
                         dict(self._chips), dict(self._decisions), self._reports, self._policy,
                         self._controller_seen)


PROC_LABELS = ["pid", "comm", "role", "id"]
DEV_LABELS = ["id", "model_name"]


class SnapshotCollector(Collector):
    """Yields every flexnpu_* family from the state's latest view."""

    def __init__(self, state: MetricsState) -> None:
        self.state = state

    def describe(self) -> Iterable[Metric]:
        return []  # families depend on what is observed; the registry must not probe collect()

    def collect(self) -> Iterator[Metric]:
        v = self.state.view()
        snap = v.snapshot or {}
        yield from self._observer(v, snap)
        yield from self._devices(v, snap)
        yield from self._processes(v, snap)
        yield from self._gates(v, snap)
        yield from self._controller(v)

    @staticmethod
    def _observer(v: _View, snap: dict[str, Any]) -> Iterator[Metric]:
        n = CounterMetricFamily("flexnpu_observer_snapshots", "Snapshots the observer has taken.")
        n.add_metric([], v.snapshots)
        yield n
        info = GaugeMetricFamily("flexnpu_observer_info", "Where the observer's counts come from "
                                 "(source: bpf or shim); always 1.", labels=["source"])
        if snap:
            info.add_metric([str(snap.get("source") or "")], 1)
        yield info
        iv = GaugeMetricFamily("flexnpu_observer_interval_seconds", "Length of the last snapshot's interval.")
        if snap:
            iv.add_metric([], _num(snap.get("interval_s")) or 0.0)
        yield iv

    @staticmethod
    def _devices(v: _View, snap: dict[str, Any]) -> Iterator[Metric]:
        devs = {int(d["device"]): d for d in snap.get("devices") or ()}
        ids = sorted(set(devs) | set(v.totals) | set(v.chips))

        def lab(dev: int) -> list[str]:
            return [str(dev), str((v.chips.get(dev) or {}).get("model_name") or "")]

        busy = GaugeMetricFamily("flexnpu_npu_chip_info_busy_ratio", "Share of the last interval the "
                                 "device's work was in a phase (prefill, decode; idle is the rest).",
                                 labels=DEV_LABELS + ["phase"])
        busy_s = CounterMetricFamily("flexnpu_npu_chip_info_busy_seconds", "Seconds the device's work "
                                     "was in a phase, since the observer started.", labels=DEV_LABELS + ["phase"])
        used = GaugeMetricFamily("flexnpu_npu_chip_info_hbm_used_memory_bytes", "Device memory held by "
                                 "the observed processes.", labels=DEV_LABELS)
        total = GaugeMetricFamily("flexnpu_npu_chip_info_hbm_total_memory_bytes", "Device memory "
                                  "capacity (where the device says it).", labels=DEV_LABELS)
        launches = CounterMetricFamily("flexnpu_npu_chip_info_launches", "Kernel launches on the "
                                       "device, exited processes included.", labels=DEV_LABELS)
        nbytes = CounterMetricFamily("flexnpu_npu_chip_info_transfer_bytes", "Bytes copied, by "
                                     "direction (h2d, d2h, d2d), exited processes included.",
                                     labels=DEV_LABELS + ["direction"])
        procs = GaugeMetricFamily("flexnpu_npu_chip_info_processes", "Processes observed on the device "
                                  "in the last interval.", labels=DEV_LABELS)
        for dev in ids:
            d, t, lb = devs.get(dev), v.totals.get(dev), lab(dev)
            if d is not None:
                occ = d.get("phase_occupancy") or {}
                for p in PHASES:
                    busy.add_metric(lb + [p], _num(occ.get(p)) or 0.0)
                mem = _num(d.get("mem_bytes"))
                if mem is not None:
                    used.add_metric(lb, mem)
                procs.add_metric(lb, len(d.get("pids") or ()))
            elif snap:  # no observed process on it: nothing held, nothing busy
                for p in PHASES:
                    busy.add_metric(lb + [p], 0.0)
                used.add_metric(lb, 0.0)
                procs.add_metric(lb, 0)
            if t is not None:
                for p in PHASES:
                    busy_s.add_metric(lb + [p], t.busy_s[p])
                launches.add_metric(lb, t.launches)
                for dr in DIRECTIONS:
                    nbytes.add_metric(lb + [dr], t.bytes[dr])
            cap = _num((v.chips.get(dev) or {}).get("total_bytes"))
            if cap is not None:
                total.add_metric(lb, cap)
        yield from (busy, busy_s, used, total, launches, nbytes, procs)

    @staticmethod
    def _processes(v: _View, snap: dict[str, Any]) -> Iterator[Metric]:
        launches = CounterMetricFamily("flexnpu_process_launches", "Kernel launches the process made "
                                       "on the device.", labels=PROC_LABELS)
        nbytes = CounterMetricFamily("flexnpu_process_transfer_bytes", "Bytes the process copied, by "
                                     "direction.", labels=PROC_LABELS + ["direction"])
        mem = GaugeMetricFamily("flexnpu_process_memory_used_bytes", "Device memory the process holds.",
                                labels=PROC_LABELS)
        busy = GaugeMetricFamily("flexnpu_process_busy_ratio", "Share of the last interval the "
                                 "process had work on the device.", labels=PROC_LABELS)
        sync = GaugeMetricFamily("flexnpu_process_sync_wait_ratio", "Share of the last interval the "
                                 "process was blocked in synchronisations (BPF source only).",
                                 labels=PROC_LABELS)
        phase = GaugeMetricFamily("flexnpu_process_phase", "The process's phase in the last interval "
                                  "(1 for the phase it is in), and which signal decided it.",
                                  labels=PROC_LABELS + ["phase", "phase_source"])
        gate = CounterMetricFamily("flexnpu_process_gate_wait_seconds", "Seconds the process's calls "
                                   "waited at its gate (processes under the shim).", labels=PROC_LABELS)
        infl = CounterMetricFamily("flexnpu_process_inflight_wait_seconds", "Seconds the process's "
                                   "launches waited for its in-flight budget (processes under the shim).",
                                   labels=PROC_LABELS)
        for e in snap.get("processes") or ():
            dev = e.get("device")
            if not isinstance(dev, int):
                continue  # calls before a device was chosen: counted once one is
            pid = int(e["pid"])
            lb = [str(pid), str(e.get("comm") or ""), str(e.get("role") or "auto"), str(dev)]
            ctr, rates = e.get("counters") or {}, e.get("rates") or {}
            launches.add_metric(lb, _num(ctr.get("launches")) or 0.0)
            for dr in DIRECTIONS:
                nbytes.add_metric(lb + [dr], _num((ctr.get("bytes") or {}).get(dr)) or 0.0)
            for fam, val in ((mem, ctr.get("mem_bytes")), (busy, rates.get("busy")), (sync, rates.get("sync_wait"))):
                if _num(val) is not None:
                    fam.add_metric(lb, _num(val))
            phase.add_metric(lb + [str(e.get("phase") or "idle"), str(e.get("phase_source") or "")], 1)
            c = v.clients.get((pid, dev))
            if c is not None:
                if c.gate_wait_ms is not None:
                    gate.add_metric(lb, c.gate_wait_ms / 1e3)
                if c.inflight_wait_ms is not None:
                    infl.add_metric(lb, c.inflight_wait_ms / 1e3)
        yield from (launches, nbytes, mem, busy, sync, phase, gate, infl)

    @staticmethod
    def _gates(v: _View, snap: dict[str, Any]) -> Iterator[Metric]:
        """Each live client's settings, as its daemon lists them (the truth, whoever set them)."""
        labels = ["pid", "id", "owner"]
        g_open = GaugeMetricFamily("flexnpu_gate_open", "1 while the client's gate is open.", labels=labels)
        prio = GaugeMetricFamily("flexnpu_gate_priority", "The client's priority (0..7, higher goes first).",
                                 labels=labels)
        hold = GaugeMetricFamily("flexnpu_gate_max_hold_seconds", "The longest one call of the client "
                                 "is held.", labels=labels)
        budget = GaugeMetricFamily("flexnpu_gate_inflight_limit", "The client's in-flight budget in "
                                   "launches (0: none).", labels=labels)
        for (pid, dev), c in sorted(v.clients.items()):
            lb = [str(pid), str(dev), str(c.owner or "default")]
            if c.gate is not None:
                g_open.add_metric(lb, 1 if c.gate == "open" else 0)
            if c.priority is not None:
                prio.add_metric(lb, c.priority)
            if c.max_hold_ms is not None:
                hold.add_metric(lb, c.max_hold_ms / 1e3)
            if c.inflight is not None:
                budget.add_metric(lb, c.inflight)
        yield from (g_open, prio, hold, budget)

    @staticmethod
    def _controller(v: _View) -> Iterator[Metric]:
        dec = CounterMetricFamily("flexnpu_controller_decisions", "Settings the controller changed, by "
                                  "policy, device and kind of reason.", labels=["policy", "id", "reason"])
        for (policy, dev, kind), n in sorted(v.decisions.items()):
            dec.add_metric([policy, str(dev), kind], n)
        reports = CounterMetricFamily("flexnpu_controller_reports", "Reports received from the controller.")
        reports.add_metric([], v.controller_reports)
        up = GaugeMetricFamily("flexnpu_controller_up", f"1 while the controller has reported within "
                               f"{CONTROLLER_UP_S:g} s.", labels=["policy"])
        alive = v.controller_seen and time.monotonic() - v.controller_seen <= CONTROLLER_UP_S
        up.add_metric([v.controller_policy or ""], 1 if alive else 0)
        yield from (dec, reports, up)


def registry(state: MetricsState) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(state))
    return reg


class MetricsServer:
    """The HTTP endpoint (/metrics) on a thread of its own."""

    def __init__(self, host: str, port: int, state: MetricsState) -> None:
        from prometheus_client import start_http_server

        self.state = state
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry(state))
        except OSError as e:
            why = {errno.EADDRINUSE: "the port is in use (another exporter?); pick another",
                   errno.EADDRNOTAVAIL: "not an address of this machine",
                   errno.EAFNOSUPPORT: "no network here (a unit with PrivateNetwork=, docs/metrics.md)",
                   errno.EACCES: "permission denied (ports below 1024 need root)"}.get(e.errno, e.strerror or str(e))
            raise AddressError(f"cannot serve metrics on {host}:{port}: {why}") from None
        self.host, self.port = self._server.server_address[:2]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
