"""The snapshot contract: what the observer publishes each interval, typed.

The observer (flexnpu/observe/snapshot.py builds it) publishes one JSON object per interval
on zmq PUB at ipc://$RUNTIME_DIR/observe.sock. Everything that consumes it (the controller,
`flexnpu top`, the benchmarks) decodes it here, into frozen dataclasses, through
`NodeSnapshot.from_json`. A value the source cannot give is `NA`, one sentinel that prints
"N/A", compares unequal to every number and is falsy, so views never special-case None.

Wire format, schema 1 (keys not listed here may appear and are ignored by the decoder):

    {"schema": 1, "source": "bpf"|"shim", "note": str|null, "seq": int, "time": unix s,
     "mono_ns": CLOCK_MONOTONIC ns, "interval_s": float,
     "devices": [{"device": int, "pids": [int], "launches_per_s": float,
                  "h2d_Bps", "d2h_Bps", "d2d_Bps": float, "mem_bytes": int|null,
                  "phase_occupancy": {"prefill": float, "decode": float, "idle": float}}],
     "processes": [{"pid": int, "device": int|null, "comm": str, "role": str|null,
                    "phase": "prefill"|"decode"|"idle"|"mixed",
                    "phase_source": "role"|"aclnn"|"kernel"|"shape"|"idle"|...,
                    "phase_share": float (prefill share of its busy time), "phase_reason": str,
                    "observed_phase", "observed_source": str (only where phase_source is "role":
                                   what the work itself showed, the declared role aside),
                    "counters": {"launches": int, "mem_bytes": int|null, ...},
                    "rates": {"launches_per_s", "h2d_Bps", "d2h_Bps", "d2d_Bps",
                              "iterations_per_s", "sync_wait", "busy": float|null},
                    "iteration": {"count": int, "mean_ms", "last_ms", "open_ms",
                                  "launches_per_iter": float|null}}]}

A change that removes or retypes a key bumps "schema"; adding a key does not.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union

from flexnpu import SCHEMA, paths

PHASES = ("prefill", "decode", "idle", "mixed")


class _NotAvailable:
    """The one missing-value sentinel. Prints N/A, is falsy, equals only itself."""

    _instance: _NotAvailable | None = None

    def __new__(cls) -> _NotAvailable:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NA"

    def __str__(self) -> str:
        return "N/A"

    def __format__(self, spec: str) -> str:
        # a numeric spec ("6.1f") keeps its width and alignment, so columns line up
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        align = ">" if not spec or spec[0] not in "<^>" else spec[0]
        return format("N/A", f"{align}{width}" if width else "")

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "NA"


NA = _NotAvailable()
Num = Union[float, _NotAvailable]


def num(v: Any) -> Num:
    """A number from the wire, or NA for null, missing, NaN or a non-number."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        return NA
    return v


def or_zero(v: Num) -> float:
    """For arithmetic where a missing value counts as nothing."""
    return 0.0 if v is NA else float(v)


class SnapshotError(ValueError):
    """A message that is not a snapshot this decoder understands."""


@dataclass(frozen=True)
class ProcessSample:
    """One process on one device during one interval."""

    pid: int
    device: int | None  # None: calls before it selected a device
    comm: str
    role: str | None  # prefill/decode given to the shim (FLEXNPU_ROLE); None: inferred
    phase: str
    phase_source: str
    phase_share: Num  # prefill share of its busy time, 0..1
    phase_reason: str
    launches: Num  # cumulative kernel launches
    launches_per_s: Num
    h2d_Bps: Num
    d2h_Bps: Num
    d2d_Bps: Num
    iterations_per_s: Num
    busy: Num  # share of the interval it had work on the device, 0..1
    sync_wait: Num  # share of the interval it spent blocked in syncs
    mem_bytes: Num
    iter_mean_ms: Num
    iter_last_ms: Num
    iter_open_ms: Num
    launches_per_iter: Num
    # the phase the work showed, a declared role aside (so that a declaration can be checked
    # against it); None where the role decided and the observer did not say
    observed_phase: str | None = None
    observed_source: str = "N/A"

    @classmethod
    def from_dict(cls, e: dict[str, Any]) -> ProcessSample:
        rates, it, ctr = e.get("rates") or {}, e.get("iteration") or {}, e.get("counters") or {}
        dev = e.get("device")
        share = num(e.get("phase_share"))
        phase = e.get("phase") if e.get("phase") in PHASES else "idle"
        if share is NA:  # an older observer: derive it from the phase
            share = {"prefill": 1.0, "decode": 0.0, "idle": 0.0}.get(phase, NA)
        source = str(e.get("phase_source") or "N/A")
        if source != "role":
            observed, observed_source = phase, source
        else:
            observed = e.get("observed_phase") if e.get("observed_phase") in PHASES else None
            observed_source = str(e.get("observed_source") or "N/A")
        return cls(
            pid=int(e["pid"]),
            device=dev if isinstance(dev, int) and not isinstance(dev, bool) else None,
            comm=str(e.get("comm") or "?"),
            role=e.get("role") if e.get("role") in ("prefill", "decode") else None,
            phase=phase,
            phase_source=source,
            phase_share=share,
            phase_reason=str(e.get("phase_reason") or ""),
            launches=num(ctr.get("launches")),
            launches_per_s=num(rates.get("launches_per_s")),
            h2d_Bps=num(rates.get("h2d_Bps")),
            d2h_Bps=num(rates.get("d2h_Bps")),
            d2d_Bps=num(rates.get("d2d_Bps")),
            iterations_per_s=num(rates.get("iterations_per_s")),
            busy=num(rates.get("busy")),
            sync_wait=num(rates.get("sync_wait")),
            mem_bytes=num(ctr.get("mem_bytes")),
            iter_mean_ms=num(it.get("mean_ms")),
            iter_last_ms=num(it.get("last_ms")),
            iter_open_ms=num(it.get("open_ms")),
            launches_per_iter=num(it.get("launches_per_iter")),
            observed_phase=observed,
            observed_source=observed_source,
        )


@dataclass(frozen=True)
class DeviceSample:
    """One device during one interval: totals over its processes and its phase occupancy."""

    device: int
    pids: tuple[int, ...]
    launches_per_s: Num
    h2d_Bps: Num
    d2h_Bps: Num
    d2d_Bps: Num
    mem_bytes: Num
    prefill: Num  # share of the interval the device's work was prefill
    decode: Num
    idle: Num

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceSample:
        occ = d.get("phase_occupancy") or {}
        return cls(
            device=int(d["device"]),
            pids=tuple(int(p) for p in d.get("pids") or ()),
            launches_per_s=num(d.get("launches_per_s")),
            h2d_Bps=num(d.get("h2d_Bps")),
            d2h_Bps=num(d.get("d2h_Bps")),
            d2d_Bps=num(d.get("d2d_Bps")),
            mem_bytes=num(d.get("mem_bytes")),
            prefill=num(occ.get("prefill")),
            decode=num(occ.get("decode")),
            idle=num(occ.get("idle")),
        )


@dataclass(frozen=True)
class NodeSnapshot:
    """Every observed process on every device of the node, for one interval."""

    schema: int
    source: str  # "bpf" or "shim"
    note: str | None
    seq: int
    time: float  # wall clock, unix seconds
    mono_ns: int  # CLOCK_MONOTONIC when it was taken
    interval_s: float
    devices: tuple[DeviceSample, ...]
    processes: tuple[ProcessSample, ...]
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, data: bytes | str | dict[str, Any]) -> NodeSnapshot:
        """Decodes one published snapshot; SnapshotError if it is not one of this schema."""
        if isinstance(data, (bytes, str)):
            try:
                data = json.loads(data)
            except (ValueError, RecursionError) as e:
                raise SnapshotError(f"not JSON: {e}") from None
        if not isinstance(data, dict):
            raise SnapshotError("a snapshot is a JSON object")
        schema = data.get("schema")
        if isinstance(schema, bool) or schema != SCHEMA:
            raise SnapshotError(f"snapshot schema {schema!r}; this FlexNPU reads schema {SCHEMA}")
        try:
            return cls(
                schema=SCHEMA,
                source=str(data.get("source") or "?"),
                note=data.get("note") if isinstance(data.get("note"), str) else None,
                seq=int(data.get("seq") or 0),
                time=float(data.get("time") or 0.0),
                mono_ns=int(data.get("mono_ns") or 0),
                interval_s=float(data.get("interval_s") or 0.0),
                devices=tuple(DeviceSample.from_dict(d) for d in data.get("devices") or ()),
                processes=tuple(ProcessSample.from_dict(p) for p in data.get("processes") or ()),
                raw=data,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotError(f"malformed snapshot: {type(e).__name__}: {e}") from None

    def device(self, dev: int) -> DeviceSample | None:
        return next((d for d in self.devices if d.device == dev), None)

    def on_device(self, dev: int) -> tuple[ProcessSample, ...]:
        return tuple(p for p in self.processes if p.device == dev)

    def device_ids(self) -> list[int]:
        ids = {d.device for d in self.devices} | {p.device for p in self.processes if p.device is not None}
        return sorted(ids)

    def age_s(self, now_mono_ns: int | None = None) -> float:
        """Seconds since it was taken (same host, CLOCK_MONOTONIC)."""
        now = now_mono_ns if now_mono_ns is not None else time.monotonic_ns()
        return max(0.0, (now - self.mono_ns) / 1e9)


class SnapshotSubscriber:
    """Receives snapshots from `flexnpu observe` (zmq SUB on observe.sock).

    Every receive has a timeout; zmq reconnects by itself when the observer restarts (the
    socket file comes back). Undecodable messages are counted in `errors`, never raised.
    Create and use it in one thread (zmq sockets are not thread-safe).
    """

    def __init__(self, rdir: Path | None = None, path: Path | None = None) -> None:
        import zmq

        self.path = path or paths.observe_socket(rdir)
        self._zmq = zmq
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 16)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(f"ipc://{self.path}")
        self.errors = 0
        self.last_error: str | None = None
        self.received = 0
        self.last: NodeSnapshot | None = None

    def recv(self, timeout_s: float) -> NodeSnapshot | None:
        """The next snapshot, or None when none comes within timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self._sock.poll(left_ms):
                return None
            snap = self._decode(self._sock.recv())
            if snap is not None:
                return snap
            if time.monotonic() >= deadline:
                return None

    def latest(self, timeout_s: float = 0.0) -> NodeSnapshot | None:
        """The newest snapshot waiting (older ones are dropped); waits up to timeout_s for
        one when none is queued. None if none came."""
        newest = None
        while self._sock.poll(0):
            newest = self._decode(self._sock.recv()) or newest
        if newest is None and timeout_s > 0:
            newest = self.recv(timeout_s)
        return newest

    def _decode(self, raw: bytes) -> NodeSnapshot | None:
        try:
            snap = NodeSnapshot.from_json(raw)
        except SnapshotError as e:
            self.errors += 1
            self.last_error = str(e)
            return None
        self.received += 1
        self.last = snap
        return snap

    def observer_present(self) -> bool:
        """Whether an observer's socket file exists (it may still be starting)."""
        return self.path.exists()

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> SnapshotSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[NodeSnapshot]:
        while True:
            snap = self.recv(1.0)
            if snap is not None:
                yield snap
