"""Loads the observer's BPF program with bcc, attaches it to runtime libraries and reads
its maps.

bcc is imported only here and only when a program is loaded, so everything else in
FlexNPU (and `--ebpf`) works where bcc is not installed. Map keys, values and trace events
are decoded through the ctypes types bcc builds from their C declarations in
probes/observe.h; this module only knows the field names.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from flexnpu.observe.errors import BccMissing, BpfUnavailable, NoPrivileges
from flexnpu.observe.phase import classify_name
from flexnpu.observe.probegen import ProbeConfig, ProbedLibrary, ProbeProgram, DEFAULT_LIBRARIES, build

# Debian's python3-bpfcc installs bcc here; a virtual environment does not see it unless
# scripts/setup.sh added its .pth. Appended, not prepended: nothing else in dist-packages
# may shadow the environment's own packages.
_DEBIAN_BCC = "/usr/lib/python3/dist-packages"
_CAP_SYS_ADMIN, _CAP_PERFMON, _CAP_BPF = 21, 38, 39


def load_bcc() -> Any:
    """The bcc module, or BccMissing."""
    try:
        import bcc  # noqa: PLC0415
        return bcc
    except ImportError:
        pass
    if Path(_DEBIAN_BCC, "bcc", "__init__.py").exists() and _DEBIAN_BCC not in sys.path:
        sys.path.append(_DEBIAN_BCC)
        try:
            import bcc  # noqa: PLC0415
            return bcc
        except ImportError:
            pass
    raise BccMissing("bcc is not installed for this Python (apt-get install python3-bpfcc); "
                     "run `flexnpu doctor`")


def _effective_caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def check_privileges() -> None:
    """Loading BPF needs root, CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON. Attaching uprobes
    through the kernel's uprobe PMU needed CAP_SYS_ADMIN on the kernels measured
    (docs/service.md): with CAP_BPF and CAP_PERFMON alone the program loads but no probe
    attaches, which NodeObserver reports when it happens."""
    if os.geteuid() == 0:
        return
    caps = _effective_caps()
    if caps >> _CAP_SYS_ADMIN & 1 or (caps >> _CAP_BPF & 1 and caps >> _CAP_PERFMON & 1):
        return
    raise NoPrivileges("loading BPF uprobes needs root (or CAP_SYS_ADMIN); run it with sudo")


def check_kernel() -> None:
    """Uprobes need the kernel's uprobe PMU or tracefs, and bcc needs kernel headers."""
    if not (Path("/sys/bus/event_source/devices/uprobe").exists()
            or Path("/sys/kernel/tracing/uprobe_events").exists()
            or Path("/sys/kernel/debug/tracing/uprobe_events").exists()):
        raise BpfUnavailable("this kernel has no uprobe support (CONFIG_UPROBE_EVENTS); run `flexnpu doctor`")
    build_dir = Path("/lib/modules") / os.uname().release / "build"
    if not build_dir.exists() and not Path("/sys/kernel/kheaders.tar.xz").exists():
        raise BpfUnavailable(f"kernel headers are missing ({build_dir}); run `flexnpu doctor`")


def _fields(obj: Any) -> dict[str, Any]:
    """A ctypes struct bcc built from a C declaration, as a dict (arrays as lists)."""
    out = {}
    for name, *_ in obj._fields_:
        v = getattr(obj, name)
        out[name] = list(v) if hasattr(v, "_length_") else v
    return out


class ProbeSession:
    """One loaded program and the libraries it is attached to."""

    def __init__(self, config: ProbeConfig = ProbeConfig(),
                 libraries: tuple[ProbedLibrary, ...] = DEFAULT_LIBRARIES) -> None:
        self.config = config
        self.program: ProbeProgram = build(config, libraries)
        check_privileges()
        bcc = load_bcc()
        check_kernel()
        try:
            self.bpf = bcc.BPF(text=self.program.text.encode(), cflags=self.program.cflags)
        except Exception as e:  # bcc raises bare Exceptions for compile and load errors
            raise BpfUnavailable(f"the BPF program did not load ({str(e).splitlines()[0]}); "
                                 "run `flexnpu doctor`") from None
        self.attached: dict[tuple[int, int], str] = {}  # (st_dev, inode) -> path
        self.missing: list[str] = []  # symbols a library did not have
        self._stats = self.bpf[b"stats"]
        self._funcs = self.bpf[b"funcs"]
        self._shapes = self.bpf[b"shapes"]
        self._events_open = False
        self.kernel_names: dict[tuple[int, int], str] = {}  # (pid, handle) -> name, classed ones
        names = self.bpf[b"names"]
        names.open_ring_buffer(lambda ctx, data, size: self._on_name(names.event(data)))

    # -- kernel names
    _CLS = {"prefill": 1, "decode": 2, "either": 3}

    def _on_name(self, e: Any) -> None:
        """A kernel function handle was made: class its name and tell the launch probe."""
        name = bytes(e.name).split(b"\0", 1)[0].decode(errors="replace")
        cls = classify_name(name)
        if cls is None:
            return
        key = self._funcs.Key(e.tgid, 0, e.handle)
        self._funcs[key] = self._funcs.Leaf(self._CLS[cls])
        self.kernel_names[(e.tgid, e.handle)] = name

    def poll_names(self) -> None:
        """Classes the kernel names of handles made since the last call (and hands trace
        events to their callback). Launches of a handle made since are unnamed until then."""
        self.bpf.ring_buffer_poll(0)

    # -- attaching
    def attach(self, path: str, soname: str) -> int:
        """Attaches every probe of library `soname` to the file at `path`, once per file
        (uprobes attach to the inode, so every process mapping it is covered, including
        ones that start later). Returns the number of probes attached now."""
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in self.attached:
            return 0
        n = 0
        for p in self.program.probes:
            if p.library != soname:
                continue
            try:
                # the return probe first: an entry seen without its return would leave a
                # thread's nesting depth raised for good
                name, sym = path.encode(), p.symbol.encode()
                if p.return_fn:
                    self.bpf.attach_uretprobe(name=name, sym=sym, fn_name=p.return_fn.encode())
                    n += 1
                self.bpf.attach_uprobe(name=name, sym=sym, fn_name=p.entry_fn.encode())
                n += 1
            except Exception as e:
                if p.required and "could not determine address" not in str(e):
                    raise BpfUnavailable(f"cannot attach to {p.symbol} in {path}: {e}") from None
                self.missing.append(p.symbol)
        self.attached[key] = path
        return n

    def is_attached(self, key: tuple[int, int]) -> bool:
        return key in self.attached

    # -- reading
    def read(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Counters by (pid, device), as named in struct fx_stats, and under "shapes" the
        iteration histogram: {(span bucket, launch bucket, contended): [iters, ns, launches]}.
        The histogram of calls made before a device was selected joins the process's only
        device here (snapshot.resolve_devices merges the counters the same way)."""
        self.poll_names()
        out = {(k.tgid, k.dev): _fields(v) for k, v in self._stats.items()}
        hists: dict[tuple[int, int], dict[tuple[int, int, int], list[int]]] = {}
        for k, v in self._shapes.items():
            h = hists.setdefault((k.tgid, k.dev), {})
            h[(k.span_b, k.launch_b, k.contended)] = [v.iters, v.ns, v.launches]
        devs: dict[int, list[int]] = {}
        for pid, dev in out:
            if dev >= 0:
                devs.setdefault(pid, []).append(dev)
        for (pid, dev), h in list(hists.items()):
            if dev < 0 and len(devs.get(pid, ())) == 1 and (pid, devs[pid][0]) in out:
                into = hists.setdefault((pid, devs[pid][0]), {})
                for b, v in h.items():
                    into[b] = [x + y for x, y in zip(into.get(b, [0, 0, 0]), v)]
        for key, c in out.items():
            dev_only = key[1] < 0 and len(devs.get(key[0], ())) == 1
            c["shapes"] = None if dev_only else hists.get(key, {})
        return out

    def forget(self, pids: set[int]) -> None:
        """Drops what the maps hold for processes that have exited."""
        if not pids:
            return
        for name, pid_of in (("stats", lambda k: k.tgid), ("allocs", lambda k: k.tgid),
                             ("funcs", lambda k: k.tgid), ("shapes", lambda k: k.tgid),
                             ("threads", lambda k: k.value >> 32), ("proc_dev", lambda k: k.value)):
            table = self.bpf[name.encode()]
            for k in [k for k in table.keys() if pid_of(k) in pids]:
                try:
                    del table[k]
                except KeyError:
                    pass

    # -- processes never counted
    def skip(self, pids: set[int]) -> None:
        """Never counts these processes again and drops what was counted for them: the
        executors of forwarded execution, whose runtime calls are their clients' work (counted
        in the clients, at the forward library). A one-process session counts its own only."""
        if not pids or self.config.tgid:
            return
        table = self.bpf[b"skip"]
        for pid in pids:
            table[table.Key(pid)] = table.Leaf(1)
        self.forget(pids)

    def unskip(self, pids: set[int]) -> None:
        """Forgets skipped processes that exited (their pids may come back as others)."""
        if not pids or self.config.tgid:
            return
        table = self.bpf[b"skip"]
        for pid in pids:
            try:
                del table[table.Key(pid)]
            except KeyError:
                pass

    # -- events (ProbeConfig.trace)
    def open_events(self, callback: Callable[[dict[str, Any]], None]) -> None:
        table = self.bpf[b"events"]

        def on_event(ctx: Any, data: Any, size: int) -> None:
            callback(_fields(table.event(data)))

        table.open_ring_buffer(on_event)
        self._events_open = True

    def poll_events(self, timeout_ms: int = 0) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)  # trace events and kernel names

    def close(self) -> None:
        """Detaches every probe. A Ctrl-C in the middle would leave bcc's own exit handler
        a half-detached set to trip over, so SIGINT waits until it is done."""
        old = None
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.bpf.cleanup()
        except Exception:
            pass
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
