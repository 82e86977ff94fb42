"""`flexnpu top`'s sampler against stand-in publishers: zmq PUB sockets on observe.sock and
controller.sock in a test runtime dir, sending hand-made messages. Checks what reaches the
Frame: every snapshot feeds the history, decisions pile up newest first and are not
repeated, each source's state. Every socket is closed with linger 0; every wait is bounded."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import zmq

from flexnpu import paths
from flexnpu.tui.model import Frame, Sampler
from test_daemon_fixtures import wait_for

T0 = 1_700_000_000.0


def snap_msg(seq: int, prefill: float) -> bytes:
    return json.dumps({
        "schema": 1, "source": "bpf", "note": None, "seq": seq, "time": T0 + seq, "mono_ns": time.monotonic_ns(),
        "interval_s": 0.1,
        "devices": [{"device": 0, "pids": [7], "launches_per_s": 10.0, "h2d_Bps": 0.0, "d2h_Bps": 0.0,
                     "d2d_Bps": 0.0, "mem_bytes": 1024,
                     "phase_occupancy": {"prefill": prefill, "decode": 1 - prefill, "idle": 0.0}}],
        "processes": [{"pid": 7, "device": 0, "comm": "srv", "phase": "mixed", "phase_share": prefill}]}).encode()


def report_msg(seq: int, reasons: list[str], pid: int = 99) -> bytes:
    return json.dumps({
        "schema": 1, "kind": "controller", "seq": seq, "time": T0, "mono_ns": 1, "pid": pid, "policy": "interleave",
        "tick_ms": 50.0, "observer": "ok", "devices": [],
        "decisions": [{"time": T0 + i, "device": 0, "pid": 7, "setting": {"gate": "closed"}, "reason": r}
                      for i, r in enumerate(reasons)]}).encode()


@pytest.fixture
def publisher(runtime_dir: Path) -> Iterator[Callable[[Path], Any]]:
    """publisher(path) binds a zmq PUB there; all are closed at teardown."""
    ctx = zmq.Context.instance()
    socks: list[zmq.Socket] = []

    def bind(path: Path) -> zmq.Socket:
        s = ctx.socket(zmq.PUB)
        s.setsockopt(zmq.LINGER, 0)
        s.bind(f"ipc://{path}")
        socks.append(s)
        return s

    yield bind
    for s in socks:
        s.close(0)


@pytest.fixture
def sampler(runtime_dir: Path) -> Iterator[Callable[..., Sampler]]:
    started: list[Sampler] = []

    def start(interval: float = 0.05) -> Sampler:
        s = Sampler(runtime_dir, interval=interval).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
        assert not s._thread.is_alive(), "the sampler thread did not stop"


def frame_where(s: Sampler, pred: Callable[[Frame], bool], what: str, timeout: float = 10.0) -> Frame:
    return wait_for(lambda: (f := s.frame()) is not None and pred(f) and f, timeout, what)


def test_every_snapshot_feeds_the_history(runtime_dir: Path, publisher, sampler) -> None:
    pub = publisher(paths.observe_socket(runtime_dir))
    s = sampler(interval=0.5)  # slower than the publisher: snapshots queue between ticks
    assert frame_where(s, lambda f: f.observer == "starting", "observer state starting").snapshot is None
    # the subscriber may join late (zmq's slow joiner): publish until one gets through
    wait_for(lambda: pub.send(snap_msg(0, 0.0)) or (s.frame() and s.frame().snapshot), 10, "a first snapshot",
             interval=0.1)
    for i in range(1, 8):
        pub.send(snap_msg(i, i / 8))
    f = frame_where(s, lambda f: f.snapshot is not None and f.snapshot.seq == 7, "snapshot 7")
    hist = f.device_history(0)
    # all seven, in order, not only the newest; the first ones sent before them are there too
    assert [h[0] for h in hist[-8:]] == [0.0] + [i / 8 for i in range(1, 8)]
    assert f.observer == "ok" and f.snapshot.processes[0].phase == "mixed"


def test_decisions_pile_up_newest_first_once_each(runtime_dir: Path, publisher, sampler) -> None:
    pub = publisher(paths.controller_socket(runtime_dir))
    s = sampler()
    wait_for(lambda: pub.send(report_msg(1, ["a"])) or (s.frame() and s.frame().report), 10, "a first report",
             interval=0.1)
    pub.send(report_msg(1, ["a"]))  # the same seq again: not repeated
    pub.send(report_msg(2, ["b", "c"]))
    f = frame_where(s, lambda f: f.report is not None and f.report.seq == 2, "report 2")
    assert [d.reason for d in f.decisions] == ["c", "b", "a"]
    assert f.controller == "ok" and f.policy() == "interleave"
    pub.send(report_msg(1, ["d"], pid=100))  # a restarted controller counts from 1 again
    f = frame_where(s, lambda f: f.report.pid == 100, "the new controller's report")
    assert [d.reason for d in f.decisions] == ["d", "c", "b", "a"]


def test_sources_that_go_away(runtime_dir: Path, publisher, sampler) -> None:
    pub = publisher(paths.observe_socket(runtime_dir))
    s = sampler()
    wait_for(lambda: pub.send(snap_msg(0, 0.5)) or (s.frame() and s.frame().observer == "ok"), 10,
             "observer ok", interval=0.1)
    f = s.frame()
    assert f.controller == "absent" and f.report is None and f.policy() == "none (no controller)"
    assert f.daemons == ()
    frame_where(s, lambda f: f.observer == "stale", "observer stale after a silent second", timeout=5)
    paths.observe_socket(runtime_dir).unlink()
    f = frame_where(s, lambda f: f.observer == "absent", "observer absent once its socket is gone")
    assert f.snapshot is None
