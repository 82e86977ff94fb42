"""The observer's fallback source: the counters the shim keeps for itself in its page of each
device's gate, for processes that run under the shim (`flexnpu run`, LD_PRELOAD).

Used when BPF cannot be loaded. It sees only processes under the shim, counts successful
calls rather than calls made, and has no time blocked in synchronisations and no span
histogram (an iteration still open is seen: the daemon says how long it has run);
snapshots built from it say "source": "shim". The pages are the daemon's (each client's is
a sealed memfd, docs/security.md), so they are read through each daemon's read-only
control socket (`list`: root and the flexnpu group); pids and roles there are the daemon's,
from the kernel.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from flexnpu import paths
from flexnpu.runtimes import Direction, Op

class ShimSource:
    def __init__(self, rdir: Path | None = None) -> None:
        self.rdir = Path(rdir or paths.runtime_dir())
        self._clients: dict[int, Any] = {}
        self.roles: dict[int, str] = {}  # pid -> prefill/decode, from the daemons
        self.views: dict[tuple[int, int], Any] = {}  # (pid, device) -> api.ClientView of the last read

    def devices(self) -> list[int]:
        return paths.daemon_devices(self.rdir)

    def _client(self, dev: int) -> Any:
        if dev not in self._clients:
            from flexnpu.forward.api import DaemonClient

            self._clients[dev] = DaemonClient(dev, self.rdir, timeout=0.5)
        return self._clients[dev]

    def read(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Counters by (pid, device) in the observer's field names; unknown ones None."""
        from flexnpu.forward.api import ApiError, DaemonError, ms_to_ns

        out: dict[tuple[int, int], dict[str, Any]] = {}
        roles: dict[int, str] = {}
        views: dict[tuple[int, int], Any] = {}
        for dev in self.devices():
            try:
                clients = self._client(dev).list()
            except (DaemonError, ApiError):
                continue
            read_ns = time.monotonic_ns()  # the daemon read the pages just before (CLOCK_MONOTONIC)
            for v in clients:
                if v.pid <= 0:
                    continue
                if v.role in ("prefill", "decode"):
                    roles[v.pid] = v.role
                views[(v.pid, dev)] = v
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
                    # the observer's fields are in ns (observe/snapshot.py); the API's in ms
                    "iter_ns": None if v.iter_total_ms is None else ms_to_ns(v.iter_total_ms),
                    "iter_ns_last": None if v.iter_last_ms is None else ms_to_ns(v.iter_last_ms),
                    # an iteration still open (work dispatched, no sync yet): where it began,
                    # so that a process blocked in a long sync is not idle (daemons that do
                    # not say: None, as before)
                    "iter_start_ns": None if v.iter_open_ms is None else
                    (read_ns - ms_to_ns(v.iter_open_ms) if v.iter_open_ms > 0 else 0),
                    "class_iters": None, "class_ns": None,
                }
        self.roles = roles
        self.views = views
        return out

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()
