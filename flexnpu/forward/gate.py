"""A device's gate segment, seen from the daemon (layout: flexnpu/forward/native/gate.h).

The layout is read from libflexnpu_gate.so (fx_layout), which describes the C structs
with offsetof, so this module keeps no second copy of it. Writes that clients race with
go through the library's atomic setters; reads are plain aligned loads.
"""

from __future__ import annotations

import ctypes
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
SLOT_FREE, SLOT_CLAIMED = 0, 1
OWNERS = {0: None, 1: "controller", 2: "manual"}  # enum fx_owner: who set a slot's settings
OWNER_IDS = {v: k for k, v in OWNERS.items()}
ROLES = {0: "auto", 1: "prefill", 2: "decode"}
ROLE_IDS = {v: k for k, v in ROLES.items()}
_FMT = {1: "B", 2: "H", 4: "I", 8: "Q"}


@cache
def gate_library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(paths.native_lib_dir() / "libflexnpu_gate.so"))
    vp, u32, u64, i32 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32
    lib.fx_layout.restype = ctypes.c_char_p
    lib.fx_now.restype = u64
    lib.fx_seg_init.argtypes = [vp, vp, u32, i32, ctypes.c_int]
    lib.fx_heartbeat.argtypes = [vp, ctypes.c_int]
    lib.fx_gate_set.argtypes = [vp, vp, ctypes.c_int, u32, u32, u64, u32, u32]
    lib.fx_slot_write.argtypes = [vp, ctypes.c_int, u32, u32, u64, u32, u32]
    lib.fx_wake.argtypes = [vp]
    lib.fx_defaults_set.argtypes = [vp, u32, u32, u64]
    lib.fx_slot_admit.argtypes = [vp, ctypes.c_int, i32, u32]
    lib.fx_grace_set.argtypes = [vp, vp, u64]
    lib.fx_slot_free.argtypes = [vp, vp, ctypes.c_int]
    lib.fx_open_all.argtypes = [vp, vp]
    lib.fx_wait_claim.argtypes = [vp, u32, ctypes.c_int64]
    return lib


@cache
def layout() -> dict:
    """The segment layout, from the C declaration."""
    return json.loads(gate_library().fx_layout())


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns, the clock the segment's timestamps use."""
    return gate_library().fx_now()


@dataclass
class SlotView:
    """One client slot: the client's counters and the daemon's gate settings for it."""

    slot: int
    state: int
    gen: int
    pid: int
    role: str
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


class GateSegment:
    """The two files of device `device`'s gate: gate-<dev>.ctl (daemon-written, mode 0644)
    and gate-<dev>.cli (client slots, mode 0666).

    readonly=True (or `open_readonly`) is the view of a reader such as the observer: both
    files are opened O_RDONLY and mapped PROT_READ, never created nor resized (a missing or
    short file raises OSError), and every write method raises PermissionError."""

    def __init__(self, device: int, rdir: Path | None = None, readonly: bool = False):
        self.device = device
        self.rdir = Path(rdir or paths.runtime_dir())
        self.readonly = readonly
        self.lib = gate_library()
        L = layout()
        self._ctl_l, self._cli_l = L["ctl"], L["cli"]
        self.max_slots = L["max_slots"]
        self._ctl_file = self.rdir / f"gate-{device}.ctl"
        self._cli_file = self.rdir / f"gate-{device}.cli"
        if readonly:
            self.ctl = self._map_readonly(self._ctl_file, self._ctl_l["size"])
            try:
                self.cli = self._map_readonly(self._cli_file, self._cli_l["size"])
            except OSError:
                self.ctl.close()
                raise
            self.ctl_addr = self.cli_addr = 0  # no pointers into a read-only map: nothing writes
            return
        self.ctl = self._map(self._ctl_file, self._ctl_l["size"], 0o644)
        self.cli = self._map(self._cli_file, self._cli_l["size"], 0o666)
        self.ctl_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.ctl))
        self.cli_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.cli))

    @classmethod
    def open_readonly(cls, device: int, rdir: Path | None = None) -> GateSegment:
        """A read-only view of an existing segment (OSError if it is missing or short)."""
        return cls(device, rdir, readonly=True)

    @staticmethod
    def _map_readonly(path: Path, size: int) -> mmap.mmap:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            have = os.fstat(fd).st_size
            if have < size:
                raise OSError(f"{path} holds {have} bytes, not a segment of {size}")
            return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)

    def _writable(self) -> None:
        if self.readonly:
            raise PermissionError(f"gate segment of device {self.device} is open read-only")

    @staticmethod
    def _map(path: Path, size: int, mode: int) -> mmap.mmap:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # the umask must not make the client side unwritable
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def init(self, daemon_pid: int, adopt: bool) -> None:
        self._writable()
        self.lib.fx_seg_init(self.ctl_addr, self.cli_addr, self.device, daemon_pid, 1 if adopt else 0)

    def valid(self) -> bool:
        """True if both files hold a segment of this version (a previous daemon's, to adopt)."""
        magic_ctl, ver_ctl = struct.unpack_from("<QI", self.ctl, 0)
        magic_cli, ver_cli = struct.unpack_from("<QI", self.cli, 0)
        L = layout()
        return (magic_ctl, ver_ctl, magic_cli, ver_cli) == (L["magic_ctl"], L["version"], L["magic_cli"], L["version"])

    # -- reads
    def _get(self, buf: mmap.mmap, base: int, fields: dict, name: str) -> int:
        off, size = fields[name]
        return struct.unpack_from("<" + _FMT[size], buf, base + off)[0]

    def _array(self, buf: mmap.mmap, base: int, fields: dict, name: str, n: int) -> list[int]:
        off, _ = fields[name]
        return list(struct.unpack_from(f"<{n}Q", buf, base + off))

    def claim_seq(self) -> int:
        return self._get(self.cli, 0, self._cli_l["fields"], "claim_seq")

    def pending_levels(self) -> int:
        return self._get(self.cli, 0, self._cli_l["fields"], "pending_levels")

    def default(self, name: str) -> int:
        return self._get(self.ctl, 0, self._ctl_l["fields"], name)

    def claims(self) -> list[tuple[int, int, int]]:
        """(state, pid, gen) of every slot: what the daemon's watcher needs, read cheaply."""
        cl = self._cli_l
        f = cl["slot_fields"]
        out = []
        for i in range(self.max_slots):
            base = cl["slots"] + i * cl["slot_size"]
            out.append((self._get(self.cli, base, f, "state"), self._get(self.cli, base, f, "pid"),
                        self._get(self.cli, base, f, "gen")))
        return out

    def slot(self, i: int) -> SlotView:
        cl, ct = self._cli_l, self._ctl_l
        cb, tb = cl["slots"] + i * cl["slot_size"], ct["slots"] + i * ct["slot_size"]
        cf, tf = cl["slot_fields"], ct["slot_fields"]

        def c(n: str) -> int:
            return self._get(self.cli, cb, cf, n)

        def t(n: str) -> int:
            return self._get(self.ctl, tb, tf, n)

        ops = self._array(self.cli, cb, cf, "ops", layout()["num_ops"])
        nbytes = self._array(self.cli, cb, cf, "bytes", layout()["num_dirs"])
        return SlotView(
            slot=i, state=c("state"), gen=c("gen"), pid=c("pid"), role=ROLES.get(c("role"), "auto"),
            pending=bool(c("pending")), waiting=c("waiting"), released=bool(c("released")),
            ops={o.name.lower(): ops[o.value] for o in Op if o.value < len(ops)},
            bytes={d.name.lower(): nbytes[d.value] for d in Direction if d.value < len(nbytes)},
            memset_bytes=c("memset_bytes"), mem_held=c("mem_held"), mem_peak=c("mem_peak"),
            iterations=c("iterations"), iter_ns_total=c("iter_ns_total"), iter_ns_last=c("iter_ns_last"),
            gate_waits=c("gate_waits"), gate_wait_ns=c("gate_wait_ns"), gate_expired=c("gate_expired"),
            last_release_lag_ns=c("last_release_lag_ns"), last_hold_lag_ns=c("last_hold_lag_ns"),
            inflight_now=c("inflight_now"), inflight_waits=c("inflight_waits"),
            inflight_wait_ns=c("inflight_wait_ns"),
            gate="open" if t("gate") == GATE_OPEN else "closed", priority=t("priority"),
            max_hold_ns=t("max_hold_ns"), inflight_max=t("inflight_max"), owner=OWNERS.get(t("owner")),
            admitted_pid=t("pid"),
        )

    # -- writes (atomic, in C)
    def set_gate(self, i: int, gate: int, priority: int, max_hold_ns: int, inflight_max: int = 0,
                 owner: str | None = None) -> None:
        """Writes one slot's settings and wakes every waiter."""
        self._writable()
        self.lib.fx_gate_set(self.ctl_addr, self.cli_addr, i, gate, priority, max_hold_ns, inflight_max,
                             OWNER_IDS[owner])

    def write_slot(self, i: int, gate: int, priority: int, max_hold_ns: int, inflight_max: int,
                   owner: str | None) -> None:
        """Writes one slot's settings without waking anyone: a batch ends with one wake()."""
        self._writable()
        self.lib.fx_slot_write(self.ctl_addr, i, gate, priority, max_hold_ns, inflight_max, OWNER_IDS[owner])

    def wake(self) -> None:
        """One wake_seq bump and one futex wake: every waiter re-evaluates."""
        self._writable()
        self.lib.fx_wake(self.cli_addr)

    def set_defaults(self, gate: int, priority: int, max_hold_ns: int) -> None:
        self._writable()
        self.lib.fx_defaults_set(self.ctl_addr, gate, priority, max_hold_ns)

    def set_grace(self, grace_ns: int) -> None:
        """How long a synced client's pending work still counts for priority."""
        self._writable()
        self.lib.fx_grace_set(self.ctl_addr, self.cli_addr, grace_ns)

    def admit(self, i: int, pid: int, gen: int) -> None:
        self._writable()
        self.lib.fx_slot_admit(self.ctl_addr, i, pid, gen)

    def free(self, i: int) -> None:
        self._writable()
        self.lib.fx_slot_free(self.ctl_addr, self.cli_addr, i)

    def heartbeat(self, alive: bool = True) -> None:
        self._writable()
        self.lib.fx_heartbeat(self.ctl_addr, 1 if alive else 0)

    def open_all(self) -> None:
        self._writable()
        self.lib.fx_open_all(self.ctl_addr, self.cli_addr)

    def wait_claim(self, seq: int, timeout_ns: int) -> None:
        """Sleeps (without the GIL) until a client claims a slot or the timeout passes."""
        self.lib.fx_wait_claim(self.cli_addr, seq, timeout_ns)

    def close(self) -> None:
        # ctypes views keep exported pointers into the maps; drop ours first
        self.ctl_addr = self.cli_addr = 0
        for m in (self.ctl, self.cli):
            try:
                m.close()
            except BufferError:
                pass  # a from_buffer view is still alive; the map goes with the process
