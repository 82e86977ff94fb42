"""The view half of `flexnpu top`: pure functions from a Frame to rich renderables.

Nothing here does I/O or keeps state; the same `render()` draws the live screen, `--once`
and non-TTY output, so tests render hand-made Frames to a fixed-size Console and read the
text. A missing value is NA and prints N/A through format(); no `None` checks for numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from flexnpu.control.wire import Decision
from flexnpu.snapshot import NA, DeviceSample, Num, ProcessSample
from flexnpu.tui.model import Frame, GateClient

SORTS = ("pid", "launches", "memory", "phase")
BAR_WIDTH = 20
SPARK = " ▁▂▃▄▅▆▇█"
PHASE_ORDER = {"prefill": 0, "mixed": 1, "decode": 2, "idle": 3}
PHASE_STYLE = {"prefill": "magenta", "decode": "cyan", "idle": "dim", "mixed": "yellow"}
DECISION_LINES = 5
STATE_STYLE = {"ok": "green", "stale": "yellow", "starting": "yellow", "absent": "red", "error": "red"}


@dataclass(frozen=True)
class ViewState:
    """What the keys change: the sort order and whether the frame is frozen."""

    sort: str = "pid"
    paused: bool = False

    def next_sort(self) -> ViewState:
        return ViewState(SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)], self.paused)

    def toggle_pause(self) -> ViewState:
        return ViewState(self.sort, not self.paused)


@dataclass(frozen=True)
class Row:
    """One line of the process table: an observed process, its gate client, or both."""

    device: int | None
    pid: int
    comm: str
    role: str | None
    phase: str  # "N/A" when the observer has no sample of it
    prefill_share: Num
    launches_per_s: Num
    h2d_Bps: Num
    d2h_Bps: Num
    mem_bytes: Num
    gate: GateClient | None


# ---------------------------------------------------------------- formatting


def fmt_bytes(n: Num) -> str:
    if n is NA:
        return "N/A"
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{int(n)}B"


def fmt_mbps(v: Num) -> str:
    return "N/A" if v is NA else f"{v / 1e6:.1f}"


def fmt_rate(v: Num) -> str:
    return "N/A" if v is NA else f"{v:.0f}"


def bar(share: Num, width: int = BAR_WIDTH) -> str:
    """A fixed-width bar and its percentage: 0.5 fills half of it."""
    if share is NA:
        return "░" * width + "  N/A"
    s = min(1.0, max(0.0, float(share)))
    n = round(s * width)
    return "█" * n + "░" * (width - n) + f" {s * 100:3.0f}%"


def sparkline(values: Sequence[Num], width: int) -> str:
    """The last `width` values (0..1) as block characters; a missing sample is a space."""
    out = []
    for v in list(values)[-width:] if width > 0 else []:
        out.append(" " if v is NA else SPARK[round(min(1.0, max(0.0, float(v))) * (len(SPARK) - 1))])
    return "".join(out)


def phase_text(phase: str, prefill_share: Num) -> Text:
    label = f"mixed {prefill_share * 100:.0f}%p" if phase == "mixed" and prefill_share is not NA else phase
    return Text(label, style=PHASE_STYLE.get(phase, ""))


def fmt_inflight(g: GateClient | None) -> str:
    if g is None or (g.inflight is NA and g.inflight_now is NA):
        return "N/A"
    budget = "∞" if g.inflight == 0 else format(g.inflight, "")
    return f"{format(g.inflight_now, '')}/{budget}"


def fmt_gate(g: GateClient | None) -> str:
    if g is None:
        return "N/A"
    owner = {"controller": " ctl", "manual": " man"}.get(g.owner or "", "")
    return f"{g.gate} p{format(g.priority, '')}{owner}"


def fmt_setting(d: Decision) -> str:
    s = d.setting
    budget = "∞" if s.inflight == 0 else str(s.inflight)
    return f"{s.gate} p{s.priority} hold {s.max_hold_ms:g}ms inflight {budget}"


# ---------------------------------------------------------------- rows


def rows(frame: Frame) -> list[Row]:
    """Observed processes joined with the daemons' clients by (device, pid); a client the
    observer has not seen (or no observer) still gets a row."""
    out: list[Row] = []
    seen: set[tuple[int | None, int]] = set()
    procs: tuple[ProcessSample, ...] = frame.snapshot.processes if frame.snapshot else ()
    for p in procs:
        d = frame.daemon(p.device) if p.device is not None else None
        g = d.client(p.pid) if d else None
        out.append(Row(p.device, p.pid, p.comm, p.role or (g.role if g else None), p.phase, p.phase_share,
                       p.launches_per_s, p.h2d_Bps, p.d2h_Bps,
                       p.mem_bytes if p.mem_bytes is not NA or g is None else g.mem_held, g))
        seen.add((p.device, p.pid))
    for d in frame.daemons:
        for g in d.clients:
            if (d.device, g.pid) not in seen:
                out.append(Row(d.device, g.pid, g.comm, g.role, "N/A", NA, NA, NA, NA, g.mem_held, g))
    return out


SORT_KEYS: dict[str, Callable[[Row], tuple]] = {
    "pid": lambda r: (r.pid, r.device if r.device is not None else -1),
    "launches": lambda r: (-(r.launches_per_s if r.launches_per_s is not NA else -1.0), r.pid),
    "memory": lambda r: (-(r.mem_bytes if r.mem_bytes is not NA else -1.0), r.pid),
    "phase": lambda r: (PHASE_ORDER.get(r.phase, 9), r.pid),
}


def sorted_rows(frame: Frame, sort: str) -> list[Row]:
    return sorted(rows(frame), key=SORT_KEYS.get(sort, SORT_KEYS["pid"]))


# ---------------------------------------------------------------- renderables


def header(frame: Frame, view: ViewState) -> Text:
    t = Text()
    t.append("flexnpu top", style="bold")
    t.append(f"  node {frame.node}")
    src = frame.snapshot.source if frame.snapshot else "N/A"
    t.append(f"  source {src}")
    t.append("  observer ")
    t.append(frame.observer, style=STATE_STYLE.get(frame.observer, ""))
    t.append("  controller ")
    t.append(frame.controller, style=STATE_STYLE.get(frame.controller, ""))
    t.append("  " + time.strftime("%H:%M:%S", time.localtime(frame.time)))
    if view.paused:
        t.append("  PAUSED", style="bold reverse")
    t.no_wrap, t.overflow = True, "ellipsis"
    return t


def notices(frame: Frame) -> list[Text]:
    """Lines that say what is missing and how to get it."""
    out = []
    if frame.observer == "absent":
        out.append(Text("No observer: start one with `flexnpu observe` (as root) to see phases and rates; "
                        "showing the daemons' clients only.", style="yellow"))
    elif frame.observer == "starting":
        out.append(Text("Waiting for the observer's first snapshot...", style="yellow"))
    elif frame.observer == "stale":
        out.append(Text("The observer has stopped publishing; showing its last snapshot.", style="yellow"))
    if frame.snapshot and frame.snapshot.note:
        out.append(Text(f"observer: {frame.snapshot.note}", style="dim"))
    return out


def device_panel(frame: Frame, dev: int, width: int, title: str | None = None, remote: bool = False) -> Panel:
    """One device's panel; remote: a node seen over TCP, whose gates are known only from its
    controller's reports (its daemons' sockets are its own)."""
    s: DeviceSample | None = frame.snapshot.device(dev) if frame.snapshot else None
    hist = frame.device_history(dev)
    spark_w = max(0, min(len(hist), width - 4 - 8 - BAR_WIDTH - 5 - 2))
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True, overflow="crop")
    for i, name in enumerate(("prefill", "decode", "idle")):
        share = getattr(s, name) if s else NA
        grid.add_row(Text(f"{name:<7}", style=PHASE_STYLE[name]), bar(share),
                     Text(sparkline([h[i] for h in hist], spark_w), style=PHASE_STYLE[name]))
    lines: list[RenderableType] = [grid]
    mem, launches = (s.mem_bytes, s.launches_per_s) if s else (NA, NA)
    daemon = frame.daemon(dev)
    if mem is NA and daemon and daemon.clients:
        mem = sum(c.mem_held for c in daemon.clients if c.mem_held is not NA)
    nproc = len(s.pids) if s else (len(daemon.clients) if daemon else 0)
    lines.append(Text(f"memory {fmt_bytes(mem)}  launches/s {fmt_rate(launches)}  "
                      f"H2D {fmt_mbps(s.h2d_Bps if s else NA)} MB/s  D2H {fmt_mbps(s.d2h_Bps if s else NA)} MB/s  "
                      f"processes {nproc}", no_wrap=True, overflow="ellipsis"))
    if remote:
        dline = (Text(f"gates: as the controller set them ({len(daemon.clients)} "
                           f"client{'' if len(daemon.clients) == 1 else 's'})") if daemon
                 else Text("gates: N/A (no controller subscribed for this node)", style="dim"))
    elif daemon is None:
        dline = Text("daemon: none (flexnpu daemon --device %d)" % dev, style="dim")
    elif daemon.state == "ok":
        dflt = dict(daemon.defaults)
        dline = Text(f"daemon ok  clients {len(daemon.clients)}  defaults {dflt.get('gate', 'N/A')} "
                     f"p{dflt.get('priority', 'N/A')}")
    else:
        dline = Text(f"daemon error: {daemon.error}", style="red")
    lines.append(dline)
    rep = next((d for d in frame.report.devices if d.device == dev), None) if frame.report else None
    if rep and rep.note:
        lines.append(Text(f"controller: {rep.note}", style="dim", overflow="ellipsis", no_wrap=True))
    return Panel(Group(*lines), title=title or f"NPU {dev}", title_align="left",
                 subtitle=f"policy: {frame.policy()}", subtitle_align="right", box=box.ROUNDED)


def devices(frame: Frame, width: int) -> RenderableType:
    ids = frame.device_ids()
    if not ids:
        return Text("No devices seen yet.", style="dim")
    per_row = 2 if len(ids) > 1 and width >= 140 else 1
    grid = Table.grid(expand=True)
    for _ in range(per_row):
        grid.add_column(ratio=1)
    panels = [device_panel(frame, d, width // per_row) for d in ids]
    for i in range(0, len(panels), per_row):
        grid.add_row(*panels[i:i + per_row])
    return grid


def process_table(frame: Frame, view: ViewState, max_rows: int | None = None) -> Table:
    """One row per process; the DEV column only when the node shows more than one device.
    Only COMMAND shrinks when the screen is narrow (it is the one wrappable column)."""
    multi = len(frame.device_ids()) > 1
    t = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, padding=(0, 0), show_edge=False,
              title=f"processes  sort {view.sort} (s)  pause (p)  quit (q)", title_justify="left",
              title_style="dim")
    cols = [("PID", "right"), ("DEV", "right"), ("COMMAND", "left"), ("ROLE", "left"), ("PHASE", "left"),
            ("LAUNCH/s", "right"), ("H2D/D2H MB/s", "right"), ("MEM", "right"), ("HELD ms/s", "right"),
            ("INFL", "right"), ("GATE", "left")]
    for name, just in cols:
        if name == "DEV" and not multi:
            continue
        t.add_column(name, justify=just, no_wrap=name != "COMMAND", overflow="ellipsis",
                     max_width=12 if name == "COMMAND" else None, ratio=1 if name == "COMMAND" else None)
    rs = sorted_rows(frame, view.sort)
    shown = rs if max_rows is None or len(rs) <= max_rows else rs[:max(0, max_rows - 1)]
    for r in shown:
        g = r.gate
        dev = ["N/A" if r.device is None else str(r.device)] if multi else []
        t.add_row(str(r.pid), *dev, Text(r.comm, overflow="ellipsis", no_wrap=True), r.role or "-",
                  phase_text(r.phase, r.prefill_share), fmt_rate(r.launches_per_s),
                  f"{fmt_mbps(r.h2d_Bps)}/{fmt_mbps(r.d2h_Bps)}", fmt_bytes(r.mem_bytes),
                  "N/A" if g is None or g.held_ms_per_s is NA else f"{g.held_ms_per_s:.1f}",
                  fmt_inflight(g), fmt_gate(g))
    if len(shown) < len(rs):
        t.caption = f"... {len(rs) - len(shown)} more"
    if not rs:
        t.caption = "no processes"
    return t


def decisions(frame: Frame, lines: int = DECISION_LINES) -> RenderableType:
    if frame.report is None:
        body: RenderableType = Text("No controller: observation only (start one with `flexnpu controller`).",
                                    style="dim")
    elif not frame.decisions:
        body = Text("No decisions yet.", style="dim")
    else:
        g = Table.grid(padding=(0, 1), expand=True)
        for _ in range(4):
            g.add_column(no_wrap=True)
        g.add_column(overflow="fold", ratio=1)  # the reason wraps rather than being cut
        for d in frame.decisions[:lines]:
            g.add_row(time.strftime("%H:%M:%S", time.localtime(d.time)), f"NPU {d.device}", f"pid {d.pid}",
                      fmt_setting(d), Text(d.reason, style="italic"))
        body = g
    title = f"controller decisions, newest first (policy {frame.policy()})" if frame.report else "controller"
    return Panel(body, title=title, title_align="left", box=box.ROUNDED)


def render(frame: Frame, view: ViewState = ViewState(), width: int = 100,
           height: int | None = None) -> RenderableType:
    """The whole screen for one frame. `height` (the live screen's) limits the process
    table so the decisions stay visible; None draws every row."""
    parts: list[RenderableType] = [header(frame, view), *notices(frame), devices(frame, width)]
    max_rows = None
    if height is not None:
        ndev = max(1, len(frame.device_ids()))
        per_row = 2 if ndev > 1 and width >= 140 else 1
        used = 1 + len(notices(frame)) + ((ndev + per_row - 1) // per_row) * 7 + 3 + (DECISION_LINES + 2)
        max_rows = max(1, height - used)
    parts += [process_table(frame, view, max_rows), decisions(frame)]
    return Group(*parts)
