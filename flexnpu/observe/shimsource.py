"""The observer's fallback source: the counters the shim keeps for itself in each device's
gate segment, for processes that run under the shim (`flexnpu run`, LD_PRELOAD).

Used when BPF cannot be loaded. It sees only processes under the shim, counts successful
calls rather than calls made, and has no time blocked in synchronisations and no span
histogram; snapshots built from it say "source": "shim". Segments are opened only when
both files exist with the size this version expects, and only read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from flexnpu import paths
from flexnpu.runtimes import Direction, Op

_GATE_FILE = re.compile(r"gate-(\d+)\.cli$")


class ShimSource:
    def __init__(self, rdir: Path | None = None) -> None:
        self.rdir = Path(rdir or paths.runtime_dir())
        self._segments: dict[int, Any] = {}
        self.roles: dict[int, str] = {}  # pid -> prefill/decode, from the slots

    def devices(self) -> list[int]:
        try:
            names = os.listdir(self.rdir)
        except OSError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _GATE_FILE.match(n)))

    def _segment(self, dev: int) -> Any | None:
        if dev in self._segments:
            return self._segments[dev]
        from flexnpu.forward.gate import GateSegment, layout  # needs the native gate library

        L = layout()
        for suffix, part in (("cli", "cli"), ("ctl", "ctl")):
            try:
                if os.stat(self.rdir / f"gate-{dev}.{suffix}").st_size != L[part]["size"]:
                    return None  # another version's segment: never resize it
            except OSError:
                return None
        try:
            seg = GateSegment.open_readonly(dev, self.rdir)  # the observer never holds a writable map
        except OSError:
            return None
        if not seg.valid():
            seg.close()
            return None
        self._segments[dev] = seg
        return seg

    def read(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Counters by (pid, device) in the observer's field names; unknown ones None."""
        out: dict[tuple[int, int], dict[str, Any]] = {}
        roles: dict[int, str] = {}
        for dev in self.devices():
            seg = self._segment(dev)
            if seg is None:
                continue
            for i in range(seg.max_slots):
                v = seg.slot(i)
                if v.state == 0 or v.pid <= 0:
                    continue
                if v.role in ("prefill", "decode"):
                    roles[v.pid] = v.role
                out[(v.pid, dev)] = {
                    "ops": [v.ops.get(o.name.lower(), 0) for o in Op],
                    "bytes": [v.bytes.get(d.name.lower(), 0) for d in Direction],
                    "memset_bytes": v.memset_bytes,
                    "rt_launches": 0,
                    "allocs": None, "alloc_failures": None, "alloc_bytes": None,
                    "frees_known": None, "freed_bytes": None,
                    "mem_bytes": v.mem_held,
                    "sync_ns": None,
                    "iterations": v.iterations,
                    "iter_ns": v.iter_ns_total,
                    "iter_ns_last": v.iter_ns_last,
                    "iter_start_ns": None,
                    "class_iters": None, "class_ns": None,
                }
        self.roles = roles
        return out

    def close(self) -> None:
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()
