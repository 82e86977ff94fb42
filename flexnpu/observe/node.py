"""`flexnpu observe`: watches every process on the node that maps a runtime library and
publishes a snapshot per interval on zmq PUB at ipc://$RUNTIME_DIR/observe.sock.

Libraries are found in /proc/<pid>/maps: new processes are looked at every interval and
all of them every `rescan_s` (a process may dlopen the runtime late). Probes attach to a
library file once; since uprobes attach to the file's inode, every process that maps it,
now or later, is counted from its first call. Known install paths (the emulator's library,
CANN's usual places, --library) are attached at start, so programs started later are
counted even before a scan finds them.

Forwarded execution (`flexnpu run --forward`): a client's calls are probed in the forward
build of the shim (libflexnpu_fwd.so, in the client), and the device's executor, which makes
the runtime calls for every client, is never counted: each scan that meets an executor (its
executable, see procs.is_executor) puts it in the program's skip map and drops what was
counted for it, before the interval's maps are read.

Where BPF cannot be loaded (no bcc, no privileges, no kernel support), the observer falls
back to the shim's counters in the gate segments, and every snapshot says so.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from flexnpu import cann, paths, rundir, systemd
from flexnpu.pidlock import AlreadyRunning, PidLock
from flexnpu.observe import procs
from flexnpu.observe.errors import BccMissing, BpfUnavailable, NoPrivileges, ObserveError
from flexnpu.observe.probegen import SONAMES, ProbeConfig
from flexnpu.observe.shimsource import ShimSource
from flexnpu.observe.snapshot import ProcessInfo, SnapshotBuilder

log = logging.getLogger("flexnpu.observe")




class NodeObserver:
    """Samples every observed process; source is "bpf" or "shim"."""

    def __init__(self, source: str = "auto", libraries: tuple[str, ...] = (), rescan_s: float = 1.0,
                 rdir: Path | None = None, pid: int = 0) -> None:
        self.rdir = Path(rdir or paths.runtime_dir())
        self.pid = pid  # 0: every process
        self.rescan_s = rescan_s
        self.shim = ShimSource(self.rdir)
        self.session: Any = None
        self.note: str | None = None
        self._known_pids: set[int] = set()
        self._last_full = 0.0
        self._info: dict[int, ProcessInfo] = {}
        self.skipped: set[int] = set()  # executors: their runtime calls are their clients' work
        self._counted: set[int] = set()  # processes with counts, known not to be executors
        self._dying: set[int] = set()  # found exited after the last read: dropped after this one
        self.libraries: dict[tuple[int, int], str] = {}
        if source not in ("auto", "bpf", "shim"):
            raise ValueError(f"source must be auto, bpf or shim, not {source!r}")
        if source != "shim":
            try:
                from flexnpu.observe.bpf import ProbeSession

                self.session = ProbeSession(ProbeConfig(tgid=pid))
            except (BccMissing, NoPrivileges, BpfUnavailable) as e:
                if source == "bpf":
                    raise
                self.note = f"BPF unavailable ({e}); counting from the shim's gate segments, " \
                            "which cover only processes run under the shim"
        else:
            self.note = "counting from the shim's gate segments (--source shim)"
        self.source = "bpf" if self.session else "shim"
        if self.session:
            failed: list[str] = []
            for path in self._candidates(libraries):
                so = next((s for s in SONAMES if procs.matches(Path(path).name, s)), None)
                if so:
                    err = self._attach(path, so)
                    if err:
                        failed.append(err)
                else:
                    log.warning("%s is not one of %s; not attached", path, ", ".join(SONAMES))
            if failed and not self.libraries:
                # the program loaded but not one probe attached (e.g. CAP_BPF and CAP_PERFMON
                # without CAP_SYS_ADMIN): counting nothing while saying "bpf" would mislead
                why = f"no uprobe could be attached ({failed[0]}); uprobes need root or CAP_SYS_ADMIN"
                self.session.close()
                self.session = None
                if source == "bpf":
                    raise BpfUnavailable(why)
                self.note = f"BPF unavailable: {why}; counting from the shim's gate segments, " \
                            "which cover only processes run under the shim"
                self.source = "shim"
        self.builder = SnapshotBuilder(self.source, note=self.note)

    # -- discovery
    @staticmethod
    def _candidates(extra: tuple[str, ...]) -> list[str]:
        for p in extra:
            if not Path(p).exists():
                log.warning("--library %s does not exist; not attached", p)
        out = [str(paths.emulator_library()), str(paths.forward_shim_library()), *extra]
        for d in cann.library_dirs():
            out += [f"{d}/{so}" for so in SONAMES]
        return [p for p in out if Path(p).exists()]

    def _attach(self, path: str, soname: str) -> str | None:
        """Attaches the probes of one library; what went wrong, or None."""
        try:
            n = self.session.attach(path, soname)
        except (OSError, ObserveError) as e:
            log.warning("cannot attach to %s: %s", path, e)
            return f"{path}: {e}"
        if n:
            st = Path(path).stat()
            self.libraries[(st.st_dev, st.st_ino)] = path
            log.info("attached %d probes to %s", n, path)
        return None

    def discover(self) -> None:
        """Attaches to runtime libraries that processes map and that are not attached yet."""
        if not self.session:
            return
        now = time.monotonic()
        full = now - self._last_full >= self.rescan_s
        pids = {self.pid} if self.pid else set(procs.pids())
        todo = pids if full else pids - self._known_pids
        executor = paths.executor_binary()
        if full:
            self._last_full = now
            # an executor that exited: its pid may come back as a process to count
            ended = {pid for pid in self.skipped if pid not in pids or not procs.is_executor(pid, executor)}
            if ended:
                self.skipped -= ended
                self.session.unskip(ended)
        self._known_pids = pids
        for pid in todo:
            if pid in self.skipped:
                continue
            if not self.pid and procs.is_executor(pid, executor):
                self.skipped.add(pid)
                self.session.skip({pid})
                continue
            try:
                libs = procs.mapped_libraries(pid, SONAMES)
            except (ProcessLookupError, PermissionError, OSError):
                continue
            for so, lib in libs.items():
                if not self.session.is_attached(lib.key):
                    self._attach(procs.attach_path(pid, lib), so)

    # -- sampling
    def info(self, pid: int) -> ProcessInfo:
        pi = self._info.get(pid)
        if pi is None:
            pi = self._info[pid] = ProcessInfo(procs.comm(pid), procs.env_role(pid))
        if pi.role is None and pid in self.shim.roles:
            return ProcessInfo(pi.comm, self.shim.roles[pid])
        return pi

    def read(self) -> dict[tuple[int, int], dict[str, Any]]:
        if self.session:
            reads = self.session.read()
            if self.shim.devices():
                self.shim.read()  # roles given to the shim
        else:
            reads = self.shim.read()
        if self.pid:
            return {k: v for k, v in reads.items() if k[0] == self.pid}
        if self.session:
            # a process is looked at once it has counts, before it is in any snapshot: an
            # executor the scans missed (one that was still its daemon's child, not yet
            # exec'ed, when a scan saw its pid) is found here
            new = {pid for pid, _ in reads} - self._counted - self.skipped
            executor = paths.executor_binary()
            found = {pid for pid in new if procs.is_executor(pid, executor)}
            if found:
                self.skipped |= found
                self.session.skip(found)
            self._counted |= new - found
        if self.skipped:
            reads = {k: v for k, v in reads.items() if k[0] not in self.skipped}
        return reads

    def sample(self) -> dict[str, Any]:
        self.discover()
        reads = self.read()
        snap = self.builder.build(reads, info=self.info)
        # A process found gone after this read may have made calls between the read and its
        # exit: it is dropped after the next read, when its counts are final for certain.
        gone = {pid for pid, _ in reads if not procs.exists(pid)}
        final, self._dying = self._dying, gone - self._dying
        if final and self.session:
            self.session.forget(final)  # reported once more above, now dropped
        for pid in final:
            self._info.pop(pid, None)
        self._counted -= final
        return snap

    def close(self) -> None:
        if self.session:
            self.session.close()
        self.shim.close()


class _Stop(Exception):
    pass


def node_lock(rdir: Path | None = None) -> PidLock:
    """The one-observer-per-node lock ($RUNTIME_DIR/observe.lock), held; ObserveError if
    another observer holds it or the runtime dir is not ours to write."""
    rdir = Path(rdir or paths.runtime_dir())
    hint = "run it as root (sudo), or set FLEXNPU_RUNTIME_DIR to a directory you own"
    try:
        return PidLock(rdir / "observe.lock").acquire()
    except AlreadyRunning as e:
        who = f"pid {e.pid}" if e.pid else f"the process holding {e.path}"
        raise ObserveError(f"an observer is already running on this node ({who}); one per node: "
                           f"stop it first (kill {e.pid or '<pid>'}) or read its snapshots on "
                           f"{paths.observe_socket(rdir)}") from None
    except rundir.RuntimeDirError as e:
        raise ObserveError(str(e)) from None
    except PermissionError:
        raise NoPrivileges(f"permission denied: cannot write in {rdir}; {hint}") from None
    except OSError as e:
        raise ObserveError(f"cannot use the runtime dir {rdir}: {e.strerror}; {hint}") from None


class MetricsFeed:
    """The observer's side of `--metrics`: the HTTP endpoint, the controller's reports (zmq
    SUB on controller.sock, read without waiting once per interval, in the loop's thread)
    and what is known of each device, handed to the metrics' state with each snapshot."""

    CHIPS_EVERY_S = 10.0

    def __init__(self, ctx: Any, rdir: Path, host: str, port: int) -> None:
        import zmq

        from flexnpu.observe.metrics import MetricsServer, MetricsState

        self.rdir = rdir
        self.state = MetricsState()
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 1000)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        # zmq connects once the controller binds, and again after it restarts
        self.sub.connect(f"ipc://{paths.controller_socket(rdir)}")
        self._chips_at = 0.0
        try:
            self.server = MetricsServer(host, port, self.state)
        except BaseException:
            self.sub.close(0)
            raise
        log.info("serving metrics on %s", self.server.url)

    def feed(self, snap: dict[str, Any], obs: NodeObserver) -> None:
        import zmq

        from flexnpu.control.wire import ControllerReport, WireError

        while True:
            try:
                raw = self.sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                self.state.controller_report(ControllerReport.from_json(raw))
            except WireError as e:
                log.debug("not a controller report: %s", e)
        now = time.monotonic()
        if now - self._chips_at >= self.CHIPS_EVERY_S:
            self._chips_at = now
            self.state.set_chips(chip_info(self.rdir))
        # the shim's views are read only while daemons run: none left, no clients
        self.state.update(snap, obs.shim.views if obs.shim.devices() else {})

    def close(self) -> None:
        self.server.close()
        self.sub.close(0)


def chip_info(rdir: Path) -> dict[int, dict[str, Any]]:
    """Model name and memory capacity by device, where the device says them: the emulator's
    device server does; real devices are not asked (empty)."""
    from flexnpu.emulator import control

    if not paths.emulator_socket(rdir).exists():
        return {}
    try:
        st = control.status(rdir, timeout=0.5)
    except control.EmulatorError:
        return {}
    return {int(d["index"]): {"model_name": d.get("soc"), "total_bytes": (d.get("memory") or {}).get("total")}
            for d in st.get("devices") or () if isinstance(d, dict) and isinstance(d.get("index"), int)}


def serve(interval_s: float = 0.1, source: str = "auto", libraries: tuple[str, ...] = (),
          count: int | None = None, print_json: bool = False, out: TextIO | None = None, pid: int = 0,
          metrics: tuple[str, int] | None = None, tcp: Any = None) -> int:
    """Runs the observer until SIGINT/SIGTERM (or count snapshots); 0 on a clean stop.
    metrics: (host, port) to serve Prometheus metrics on, or None; tcp: a
    flexnpu.remote.curve.PublishTarget to publish on as well (CURVE), or None."""
    import zmq

    out = out or sys.stdout  # looked up now: the stdout of the moment, not of the import

    lock = node_lock()
    try:
        obs = NodeObserver(source, libraries, pid=pid)
    except BaseException:
        lock.release()
        raise
    sock_path = paths.observe_socket(obs.rdir)
    ctx = pub = tcp_pub = None
    feed: MetricsFeed | None = None

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop()

    old = signal.signal(signal.SIGTERM, stop)
    n = 0
    bound = False
    try:  # from here on, however it ends (a signal may come at any point), the socket goes
        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, 100)
        try:
            rundir.bind_published(pub, sock_path)
        except zmq.ZMQError as e:
            raise ObserveError(f"cannot publish on {sock_path}: {e.strerror}") from None
        bound = True
        if metrics is not None:
            from flexnpu.observe.metrics import AddressError

            try:
                feed = MetricsFeed(ctx, obs.rdir, *metrics)
            except AddressError as e:
                raise ObserveError(str(e)) from None
        if tcp is not None:
            from flexnpu.remote.curve import CurvePublisher, PublishError

            try:
                tcp_pub = CurvePublisher(tcp.endpoint, tcp.secret_key, tcp.authorized, ctx=ctx)
            except PublishError as e:
                raise ObserveError(str(e)) from None
        msg = f"observing through {obs.source}" + (f": {obs.note}" if obs.note else "") + \
              f"; publishing on ipc://{sock_path}" + (f" and {tcp.endpoint.zmq()} (CURVE)" if tcp else "") + \
              f" every {interval_s * 1000:.0f} ms"
        (log.warning if obs.source != "bpf" else log.info)(msg)
        systemd.notify("READY=1", f"STATUS=source {obs.source}")
        deadline = time.monotonic() + interval_s
        while count is None or n < count:
            left = deadline - time.monotonic()
            if left > 0:
                time.sleep(left)
            deadline = max(deadline + interval_s, time.monotonic())
            snap = obs.sample()
            data = json.dumps(snap)
            if feed is not None:
                feed.feed(snap, obs)
            try:
                pub.send(data.encode(), zmq.NOBLOCK)
            except zmq.Again:
                pass
            if tcp_pub is not None:
                tcp_pub.send(data.encode())
            if print_json:
                print(data, file=out, flush=True)
            n += 1
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        # a second Ctrl-C must not cut the clean-up short
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if feed is not None:
                feed.close()
            if pub is not None:
                pub.close(0)
            if tcp_pub is not None:
                tcp_pub.close()
            if ctx is not None:
                ctx.term()
            if bound:
                sock_path.unlink(missing_ok=True)
            obs.close()
            lock.release()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old)
    return 0
