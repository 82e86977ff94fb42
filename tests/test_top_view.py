"""`flexnpu top`'s view: hand-made Frames rendered at a fixed size (100x32, no colour) and
read back as text, one test per situation the screen must handle (rich's habit: pure
renderables, compared as text)."""

from __future__ import annotations

import io
import json

from rich.console import Console

from flexnpu.control.wire import ControllerReport
from flexnpu.snapshot import NA, NodeSnapshot
from flexnpu.tui.model import DaemonState, Frame, GateClient
from flexnpu.tui.view import BAR_WIDTH, ViewState, bar, render, sparkline

T0 = 1_700_000_000.0
REASON = "decode step pending on NPU 0: hold prefill pid 101 for 12 ms"


def proc(pid: int, phase: str = "decode", share: float | None = None, comm: str = "srv", role: str | None = None,
         launches: float | None = 100.0, h2d: float | None = 2e6, d2h: float | None = 1e6,
         mem: int | None = 1 << 30, device: int = 0) -> dict:
    return {"pid": pid, "device": device, "comm": comm, "role": role, "phase": phase, "phase_share": share,
            "phase_source": "kernel", "phase_reason": "", "counters": {"launches": 7, "mem_bytes": mem},
            "rates": {"launches_per_s": launches, "h2d_Bps": h2d, "d2h_Bps": d2h}}


def snapshot(*procs: dict, occupancy: dict | None = None, devices: tuple[int, ...] = (0,),
             source: str = "shim", note: str | None = None) -> NodeSnapshot:
    occ = occupancy if occupancy is not None else {"prefill": 0.5, "decode": 0.25, "idle": 0.25}
    return NodeSnapshot.from_json({
        "schema": 1, "source": source, "note": note, "seq": 9, "time": T0, "mono_ns": 1, "interval_s": 0.1,
        "devices": [{"device": d, "pids": [p["pid"] for p in procs if p["device"] == d], "launches_per_s": 1234.0,
                     "h2d_Bps": 5e6, "d2h_Bps": 1e6, "d2d_Bps": 0.0, "mem_bytes": 3 << 30,
                     "phase_occupancy": occ} for d in devices],
        "processes": list(procs)})


def report(*decisions: tuple[int, str, str], policy: str = "phase-interleave") -> ControllerReport:
    return ControllerReport.from_json({
        "schema": 1, "kind": "controller", "seq": 4, "time": T0, "mono_ns": 1, "pid": 77, "policy": policy,
        "tick_ms": 50.0, "observer": "ok",
        "devices": [{"device": 0, "daemon": "ok", "note": "decode step 12.0 ms", "clients": []}],
        "decisions": [{"time": T0 + i, "device": 0, "pid": pid,
                       "setting": {"gate": gate, "priority": 0, "max_hold_ms": 50.0, "inflight": 4},
                       "reason": reason} for i, (pid, gate, reason) in enumerate(decisions)]})


def client(pid: int, comm: str = "srv", gate: str = "open", priority: int = 0, held: float | None = None,
           mem: int = 4096, **extra) -> GateClient:
    raw = {"pid": pid, "role": "decode", "gate": gate, "priority": priority, "max_hold_ms": 200.0,
           "gate_wait_ns": 0, "mem_held": mem, **extra}
    return GateClient.from_dict(0, raw, comm, NA if held is None else held)


def daemon(*clients: GateClient, device: int = 0) -> DaemonState:
    return DaemonState(device, "ok", "", clients, (("gate", "open"), ("priority", 0)))


def frame(snap: NodeSnapshot | None = None, rep: ControllerReport | None = None, daemons: tuple = (),
          history: tuple = ()) -> Frame:
    return Frame(time=T0, node="node7", observer="ok" if snap else "absent", snapshot=snap,
                 controller="ok" if rep else "absent", report=rep,
                 decisions=tuple(reversed(rep.decisions)) if rep else (), daemons=daemons, history=history)


def draw(f: Frame, view: ViewState = ViewState(), height: int | None = 32) -> str:
    console = Console(width=100, height=32, record=True, color_system=None, file=io.StringIO())
    console.print(render(f, view, width=100, height=height))
    return console.export_text()


def table_pids(text: str) -> list[int]:
    """The PID column of the process table, top to bottom."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("PID "))
    out = []
    for line in lines[start + 2:]:
        first = line.split()[0] if line.split() else ""
        if not first.isdigit():
            break
        out.append(int(first))
    return out


def line_with(text: str, needle: str) -> str:
    return next(line for line in text.splitlines() if needle in line)


# ---------------------------------------------------------------- situations


def test_observer_and_controller() -> None:
    f = frame(snapshot(proc(101, "prefill", comm="prefill_srv", role="prefill"), proc(202, "decode")),
              report((101, "open", "first look"), (101, "closed", REASON)),
              daemons=(daemon(client(101, "prefill_srv", gate="closed", held=123.4, owner="controller",
                                     inflight=4, inflight_now=2), client(202)),))
    text = draw(f)
    head = text.splitlines()[0]
    assert "node node7" in head and "source shim" in head and "observer ok" in head and "controller ok" in head
    assert "PAUSED" not in head
    assert "NPU 0" in text and "policy: phase-interleave" in text
    # 50% prefill is half the bar, 25% decode a quarter
    assert "prefill " + "█" * 10 + "░" * 10 + "  50%" in text
    assert "decode  " + "█" * 5 + "░" * 15 + "  25%" in text
    assert "controller: decode step 12.0 ms" in text
    row = line_with(text, "prefill_srv ")
    assert "123.4" in row and "2/4" in row and "closed p0 ctl" in row and "2.0/1.0" in row and "1.0G" in row
    # newest decision first, with its reason
    lines = [line for line in text.splitlines() if "pid 101 " in line and "hold 50ms" in line]
    assert len(lines) == 2 and "first look" in lines[1]
    # a long reason wraps inside its column instead of being cut
    all_lines = text.splitlines()
    at = all_lines.index(lines[0])
    assert "decode step pending on NPU 0: hold prefill" in lines[0] and "pid 101 for 12 ms" in all_lines[at + 1]
    assert "closed p0 hold 50ms inflight 4" in lines[0]


def test_observer_only_has_no_policy() -> None:
    text = draw(frame(snapshot(proc(202, "decode", comm="decode_srv"))))
    assert "policy: none (no controller)" in text
    assert "controller absent" in text.splitlines()[0]
    assert "No controller: observation only" in text
    assert "decode_srv" in text and "No observer" not in text
    assert "daemon: none (flexnpu daemon --device 0)" in text


def test_daemons_only_says_how_to_start_the_observer() -> None:
    f = frame(daemons=(daemon(client(4242, "llm_decode", held=3.25), client(4343, "llm_prefill", gate="closed",
                                                                              priority=3)),))
    text = draw(f)
    assert "No observer: start one with `flexnpu observe` (as root)" in text
    assert "observer absent" in text.splitlines()[0] and "source N/A" in text.splitlines()[0]
    # the clients are listed without an observer; what only it knows is N/A
    row = line_with(text, "4242")
    assert "llm_decode" in row and "3.2" in row and "N/A/N/A" in row and "open p0" in row
    assert "closed p3" in line_with(text, "4343")
    # no occupancy without an observer: empty bars that say N/A
    assert "prefill " + "░" * BAR_WIDTH + "  N/A" in text
    assert "daemon ok  clients 2  defaults open p0" in text


def test_mixed_phase_shows_its_prefill_share() -> None:
    text = draw(frame(snapshot(proc(303, "mixed", share=0.62, comm="mixed_srv"))))
    assert "mixed 62%p" in line_with(text, "mixed_srv")


def test_missing_values_print_na() -> None:
    f = frame(snapshot(proc(505, "idle", comm="quiet", launches=None, h2d=None, d2h=None, mem=None)),
              daemons=(daemon(client(505, "quiet", mem=8192)),))
    row = line_with(draw(f), "quiet")
    cells = row.split()
    assert cells[0] == "505"
    assert cells[4] == "N/A"  # launches/s
    assert "N/A/N/A" in row
    assert "8.0K" in row  # the observer has no memory figure: the daemon's is shown
    assert row.count("N/A") >= 4  # launches/s, H2D/D2H, held (no second list yet), in-flight


def test_paused_is_said_in_the_header() -> None:
    f = frame(snapshot(proc(1, "decode")))
    assert "PAUSED" in draw(f, ViewState(paused=True)).splitlines()[0]
    assert "PAUSED" not in draw(f, ViewState()).splitlines()[0]


def test_sort_orders() -> None:
    f = frame(snapshot(proc(30, "decode", launches=500.0, mem=1 << 20),
                       proc(10, "idle", launches=1.0, mem=3 << 30),
                       proc(20, "prefill", launches=50.0, mem=2 << 30),
                       proc(40, "mixed", share=0.5, launches=None, mem=None)))
    assert table_pids(draw(f, ViewState("pid"))) == [10, 20, 30, 40]
    assert table_pids(draw(f, ViewState("launches"))) == [30, 20, 10, 40]
    assert table_pids(draw(f, ViewState("memory"))) == [10, 20, 30, 40]
    assert table_pids(draw(f, ViewState("phase"))) == [20, 40, 30, 10]
    assert "processes  sort launches (s)" in draw(f, ViewState("launches"))
    v = ViewState()
    seen = [v.sort]
    for _ in range(4):
        v = v.next_sort()
        seen.append(v.sort)
    assert seen == ["pid", "launches", "memory", "phase", "pid"]


def test_history_sparkline_and_two_devices() -> None:
    hist = tuple((i / 8, 1 - i / 8, 0.0) for i in range(9))
    f = frame(snapshot(proc(1, device=0), proc(2, device=1), devices=(0, 1)), history=((0, hist),))
    text = draw(f)
    assert "NPU 0" in text and "NPU 1" in text
    assert " ▁▂▃▄▅▆▇█" in line_with(text, "prefill ████")  # the prefill history, oldest first
    assert "█▇▆▅▄▃▂▁ " in text
    assert "DEV" in line_with(text, "PID ")


def test_long_table_is_cut_to_the_screen() -> None:
    f = frame(snapshot(*(proc(1000 + i) for i in range(30))))
    text = draw(f, height=32)
    assert "more" in text and len(table_pids(text)) < 30
    assert "No controller" in text  # the decisions panel stays on screen
    assert len(table_pids(draw(f, height=None))) == 30


def test_bar_and_sparkline_units() -> None:
    assert bar(0.5) == "█" * 10 + "░" * 10 + "  50%"
    assert bar(1.0) == "█" * 20 + " 100%"
    assert bar(NA) == "░" * 20 + "  N/A"
    assert bar(1.7) == bar(1.0)
    assert sparkline([0.0, 0.5, 1.0, NA], 10) == " ▄█ "
    assert sparkline([0.0, 0.5, 1.0], 2) == "▄█"


def test_frame_json_is_schema_1_and_plain() -> None:
    snap = snapshot(proc(101, "prefill"))
    f = frame(snap, report((101, "closed", REASON)), daemons=(daemon(client(101, held=1.5)),))
    data = json.loads(json.dumps(f.to_json()))
    assert data["schema"] == 1 and data["observer"] == "ok" and data["controller"] == "ok"
    assert data["snapshot"]["processes"][0]["pid"] == 101
    assert data["controller_report"]["policy"] == "phase-interleave"
    assert data["decisions"][0]["reason"] == REASON
    assert data["daemons"][0]["clients"][0]["held_ms_per_s"] == 1.5
    assert json.loads(json.dumps(frame(daemons=(daemon(client(5)),)).to_json()))["daemons"][0]["clients"][0][
        "held_ms_per_s"] is None
