"""A device's gate seen from the daemon (layout: flexnpu/forward/native/gate.h).

Three things, all in libflexnpu_gate.so's hands for every write a client races with:
- `GateTable`: gate-<dev>.ctl, the daemon-written table (settings, identities, the priority
  summary, the wake word, the heartbeat). Clients get it read-only.
- `ClientPage`: one admitted client's own page, a sealed memfd the client maps read-write.
- `SummaryThread`: the C thread that recomputes the priority summary from the pages.

The layout is read from the library (fx_layout, built with offsetof), so Python keeps no
second copy of it.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import mmap
import os
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from flexnpu import paths
from flexnpu.runtimes import Direction, Op

GATE_OPEN, GATE_CLOSED = 0, 1
SLOT_FREE, SLOT_ADMITTED, SLOT_RESERVED = 0, 2, 3
OWNERS = {0: None, 1: "controller", 2: "manual"}  # enum fx_owner: who set a slot's settings
OWNER_IDS = {v: k for k, v in OWNERS.items()}
ROLES = {0: "auto", 1: "prefill", 2: "decode"}
ROLE_IDS = {v: k for k, v in ROLES.items()}
MODES = {0: "gated", 1: "forward"}  # enum fx_mode
_FMT = {1: "B", 2: "H", 4: "I", 8: "Q"}


@cache
def gate_library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(paths.native_lib_dir() / "libflexnpu_gate.so"))
    vp, u32, u64, i32, sz = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32, ctypes.c_size_t
    lib.fx_layout.restype = ctypes.c_char_p
    lib.fx_now.restype = u64
    lib.fx_table_init.argtypes = [vp, u32, i32, ctypes.c_int]
    lib.fx_heartbeat.argtypes = [vp, ctypes.c_int]
    lib.fx_slot_write.argtypes = [vp, ctypes.c_int, u32, u32, u64, u32, u32]
    lib.fx_wake.argtypes = [vp]
    lib.fx_slots_apply.argtypes = [vp, ctypes.c_int, ctypes.POINTER(i32), ctypes.POINTER(u32), ctypes.POINTER(u32),
                                   ctypes.POINTER(u64), ctypes.POINTER(u32), ctypes.POINTER(u32)]
    lib.fx_slots_apply.restype = ctypes.c_int
    lib.fx_defaults_set.argtypes = [vp, u32, u32, u64]
    lib.fx_grace_set.argtypes = [vp, u64]
    lib.fx_slot_admit.argtypes = [vp, ctypes.c_int, i32, u32, u32, u32, u64, u32]
    lib.fx_slot_free.argtypes = [vp, ctypes.c_int]
    lib.fx_open_all.argtypes = [vp]
    lib.fx_map.argtypes = [ctypes.c_int, sz, ctypes.c_int]
    lib.fx_map.restype = vp
    lib.fx_unmap.argtypes = [vp, sz]
    lib.fx_page_init.argtypes = [vp, u32]
    lib.fx_summary_start.argtypes = [vp]
    lib.fx_summary_start.restype = vp
    lib.fx_summary_kick.argtypes = [vp]
    lib.fx_summary_set.argtypes = [vp, ctypes.c_int, vp]
    lib.fx_summary_stop.argtypes = [vp]
    lib.fx_summary_levels.argtypes = [vp]
    lib.fx_summary_levels.restype = u64
    return lib


@cache
def layout() -> dict:
    """The table, page and message layout, from the C declaration."""
    return json.loads(gate_library().fx_layout())


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns, the clock the table's timestamps use."""
    return gate_library().fx_now()


def _get(buf, base: int, fields: dict, name: str) -> int:
    off, size = fields[name]
    return struct.unpack_from("<" + _FMT[size], buf, base + off)[0]


class ClientPage:
    """One admitted client's page: a memfd sealed against shrinking and growing (so the client,
    which holds a writable fd, cannot truncate it under the daemon's map), mapped here too."""

    def __init__(self, device: int, slot: int):
        lib = gate_library()
        self.size = layout()["page_size"]
        self.fd = os.memfd_create(f"flexnpu-gate-{device}-slot-{slot}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self.addr = lib.fx_map(self.fd, self.size, 1)
            if not self.addr:
                raise OSError("could not map a client page")
        except BaseException:
            os.close(self.fd)
            raise
        lib.fx_page_init(self.addr, slot)

    def hand_out(self) -> int:
        """The fd to pass to the client; the daemon keeps only its map after close_fd()."""
        return self.fd

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self) -> dict:
        """The client's counters, as the client wrote them (its own figures, nobody else's)."""
        if not self.addr:
            return {}
        raw = ctypes.string_at(self.addr, layout()["page"]["size"])
        f = layout()["page"]["fields"]
        out = {n: _get(raw, 0, f, n) for n in f if n not in ("ops", "bytes", "magic", "version", "slot")}
        ops = struct.unpack_from(f"<{layout()['num_ops']}Q", raw, f["ops"][0])
        nb = struct.unpack_from(f"<{layout()['num_dirs']}Q", raw, f["bytes"][0])
        out["ops"] = {o.name.lower(): ops[o.value] for o in Op if o.value < len(ops)}
        out["bytes"] = {d.name.lower(): nb[d.value] for d in Direction if d.value < len(nb)}
        return out

    def close(self) -> None:
        self.close_fd()
        if self.addr:
            gate_library().fx_unmap(self.addr, self.size)
            self.addr = None


class SummaryThread:
    """The C thread that keeps the table's priority summary (pending_levels) from the pages."""

    def __init__(self, table: GateTable):
        self.lib = gate_library()
        self.handle = self.lib.fx_summary_start(table.ctl_addr)
        if not self.handle:
            raise OSError("could not start the priority summary thread")

    def set(self, slot: int, page: ClientPage | None) -> None:
        """The page of the client in slot (None: none). After None the thread no longer
        reads the old page."""
        if self.handle:
            self.lib.fx_summary_set(self.handle, slot, page.addr if page else None)

    def kick(self) -> None:
        """Recompute now (a priority or the grace changed)."""
        if self.handle:
            self.lib.fx_summary_kick(self.handle)

    def levels(self) -> int:
        """What the summary should say now, from the pages (the heartbeat compares it)."""
        return self.lib.fx_summary_levels(self.handle) if self.handle else 0

    def stop(self) -> None:
        if self.handle:
            self.lib.fx_summary_stop(self.handle)
            self.handle = None


@dataclass
class SlotView:
    """One client: the daemon's record of it (identity, settings) and its own counters."""

    slot: int
    state: int
    gen: int
    pid: int
    uid: int
    role: str
    mode: str
    pending: bool
    waiting: int
    released: bool
    ops: dict[str, int]
    bytes: dict[str, int]
    memset_bytes: int
    mem_held: int
    mem_peak: int
    iterations: int
    iter_ns_total: int
    iter_ns_last: int
    iter_start_ns: int  # CLOCK_MONOTONIC of its open iteration's first dispatch (valid while pending)
    gate_waits: int
    gate_wait_ns: int
    gate_expired: int
    last_release_lag_ns: int
    last_hold_lag_ns: int
    inflight_now: int
    inflight_waits: int
    inflight_wait_ns: int
    gate: str
    priority: int
    max_hold_ns: int
    inflight_max: int
    owner: str | None
    admitted_pid: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


_ZERO_COUNTERS = {"pending": 0, "waiting": 0, "released": 0, "memset_bytes": 0, "mem_held": 0, "mem_peak": 0,
                  "iterations": 0, "iter_ns_total": 0, "iter_ns_last": 0, "iter_start_ns": 0, "gate_waits": 0,
                  "gate_wait_ns": 0, "gate_expired": 0, "last_release_lag_ns": 0, "last_hold_lag_ns": 0,
                  "inflight_now": 0, "inflight_waits": 0, "inflight_wait_ns": 0}


class GateTable:
    """gate-<dev>.ctl: written by the daemon alone (mode 0640, root:flexnpu when that group
    exists, else 0600). Clients map it from an O_RDONLY fd the daemon passes them.

    readonly=True (or `open_readonly`) is the view of a reader: opened O_RDONLY, mapped
    PROT_READ, never created nor resized (a missing or short file raises OSError), and
    every write method raises PermissionError."""

    def __init__(self, device: int, rdir: Path | None = None, readonly: bool = False, gid: int | None = None):
        self.device = device
        self.rdir = Path(rdir or paths.runtime_dir())
        self.readonly = readonly
        self.lib = gate_library()
        L = layout()
        self._l = L["ctl"]
        self.max_slots = L["max_slots"]
        self.path = paths.gate_table(device, self.rdir)
        if readonly:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                have = os.fstat(fd).st_size
                if have < self._l["size"]:
                    raise OSError(f"{self.path} holds {have} bytes, not a gate table of {self._l['size']}")
                self.ctl = mmap.mmap(fd, self._l["size"], mmap.MAP_SHARED, mmap.PROT_READ)
            finally:
                os.close(fd)
            self.ctl_addr = 0  # no pointer into a read-only map: nothing writes
            return
        # O_NOFOLLOW: a link planted in the runtime dir must not make the daemon write elsewhere
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            if gid is not None:
                os.fchown(fd, os.geteuid(), gid)
            os.fchmod(fd, paths.GATE_TABLE_MODE if gid is not None else paths.GROUPLESS_MODE)  # not the umask
            if os.fstat(fd).st_size != self._l["size"]:
                os.ftruncate(fd, self._l["size"])
            self.ctl = mmap.mmap(fd, self._l["size"], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.ctl_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.ctl))

    @classmethod
    def open_readonly(cls, device: int, rdir: Path | None = None) -> GateTable:
        return cls(device, rdir, readonly=True)

    def _writable(self) -> None:
        if self.readonly:
            raise PermissionError(f"gate table of device {self.device} is open read-only")

    def readonly_fd(self) -> int:
        """A fresh O_RDONLY fd of the table, to pass to a client (it cannot be made writable)."""
        return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)

    def init(self, daemon_pid: int, adopt: bool) -> None:
        self._writable()
        self.lib.fx_table_init(self.ctl_addr, self.device, daemon_pid, 1 if adopt else 0)

    def valid(self) -> bool:
        """True if the file holds a table of this version (a previous daemon's, to adopt)."""
        magic, ver = struct.unpack_from("<QI", self.ctl, 0)
        L = layout()
        return (magic, ver) == (L["magic_ctl"], L["version"])

    # -- reads
    def default(self, name: str) -> int:
        return _get(self.ctl, 0, self._l["fields"], name)

    def pending_levels(self) -> int:
        return self.default("pending_levels")

    def wake_seq(self) -> int:
        return self.default("wake_seq")

    def settings(self, i: int) -> dict:
        """The daemon's record of slot i: identity and gate settings."""
        base = self._l["slots"] + i * self._l["slot_size"]
        f = self._l["slot_fields"]
        return {n: _get(self.ctl, base, f, n) for n in f}

    def slot(self, i: int, page: ClientPage | None = None) -> SlotView:
        t = self.settings(i)
        c = {**_ZERO_COUNTERS, "ops": {o.name.lower(): 0 for o in Op},
             "bytes": {d.name.lower(): 0 for d in Direction}}
        if page is not None:
            c.update(page.read())
        return SlotView(
            slot=i, state=t["state"], gen=t["gen"], pid=t["pid"], uid=t["uid"], role=ROLES.get(t["role"], "auto"),
            mode=MODES.get(t["mode"], "gated"),
            pending=bool(c["pending"]), waiting=c["waiting"], released=bool(c["released"]),
            ops=c["ops"], bytes=c["bytes"], memset_bytes=c["memset_bytes"], mem_held=c["mem_held"],
            mem_peak=c["mem_peak"], iterations=c["iterations"], iter_ns_total=c["iter_ns_total"],
            iter_ns_last=c["iter_ns_last"], iter_start_ns=c["iter_start_ns"], gate_waits=c["gate_waits"],
            gate_wait_ns=c["gate_wait_ns"],
            gate_expired=c["gate_expired"], last_release_lag_ns=c["last_release_lag_ns"],
            last_hold_lag_ns=c["last_hold_lag_ns"], inflight_now=c["inflight_now"],
            inflight_waits=c["inflight_waits"], inflight_wait_ns=c["inflight_wait_ns"],
            gate="open" if t["gate"] == GATE_OPEN else "closed", priority=t["priority"],
            max_hold_ns=t["max_hold_ns"], inflight_max=t["inflight_max"], owner=OWNERS.get(t["owner"]),
            admitted_pid=t["pid"],
        )

    # -- writes (atomic, in C)
    def write_slot(self, i: int, gate: int, priority: int, max_hold_ns: int, inflight_max: int,
                   owner: str | None) -> None:
        """Writes one slot's settings without waking anyone: a batch ends with one wake()."""
        self._writable()
        self.lib.fx_slot_write(self.ctl_addr, i, gate, priority, max_hold_ns, inflight_max, OWNER_IDS[owner])

    def wake(self) -> None:
        """One wake_seq bump and one futex wake: every waiter re-evaluates."""
        self._writable()
        self.lib.fx_wake(self.ctl_addr)

    def apply_slots(self, writes: list[tuple[int, int, int, int, int, str | None]]) -> int:
        """Writes each (slot, gate, priority, max_hold_ns, inflight_max, owner), then wakes every
        waiter once, all in one call into C: nothing of the daemon's runs between a gate's
        store and the wake of the client it releases. Returns how many slots were written."""
        self._writable()
        n = len(writes)
        cols = list(zip(*writes)) if writes else [()] * 6
        return self.lib.fx_slots_apply(
            self.ctl_addr, n, (ctypes.c_int32 * n)(*cols[0]), (ctypes.c_uint32 * n)(*cols[1]),
            (ctypes.c_uint32 * n)(*cols[2]), (ctypes.c_uint64 * n)(*cols[3]), (ctypes.c_uint32 * n)(*cols[4]),
            (ctypes.c_uint32 * n)(*(OWNER_IDS[o] for o in cols[5])))

    def set_defaults(self, gate: int, priority: int, max_hold_ns: int) -> None:
        self._writable()
        self.lib.fx_defaults_set(self.ctl_addr, gate, priority, max_hold_ns)

    def set_grace(self, grace_ns: int) -> None:
        """How long a synced client's pending work still counts for priority."""
        self._writable()
        self.lib.fx_grace_set(self.ctl_addr, grace_ns)

    def admit(self, i: int, pid: int, uid: int, role: int, start_time: int, state: int = SLOT_ADMITTED,
              mode: int = 0) -> None:
        self._writable()
        self.lib.fx_slot_admit(self.ctl_addr, i, pid, uid, role, mode, start_time, state)

    def free(self, i: int) -> None:
        self._writable()
        self.lib.fx_slot_free(self.ctl_addr, i)

    def heartbeat(self, alive: bool = True) -> None:
        self._writable()
        self.lib.fx_heartbeat(self.ctl_addr, 1 if alive else 0)

    def open_all(self) -> None:
        self._writable()
        self.lib.fx_open_all(self.ctl_addr)

    def close(self) -> None:
        # ctypes views keep exported pointers into the map; drop ours first
        self.ctl_addr = 0
        try:
            self.ctl.close()
        except BufferError:
            pass  # a from_buffer view is still alive; the map goes with the process
