"""The view half of `flexnpu top --nodes`: pure functions from a NodesFrame to rich renderables.

A table of the nodes (each one's endpoint, observer and controller, and why a node shows
nothing when it does not), a device panel per device of every node that answers, one process
table with a NODE column, and the controllers' decisions with the node they were made on.
Tests render hand-made or sampled NodesFrames to a fixed-size Console, as for one node.
"""

from __future__ import annotations

import time

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from flexnpu.tui.nodes import NodesFrame
from flexnpu.tui.view import (DECISION_LINES, SORT_KEYS, STATE_STYLE, Row, ViewState, device_panel, fmt_bytes,
                              fmt_gate, fmt_inflight, fmt_mbps, fmt_rate, fmt_setting, phase_text, rows)

NODE_STYLE = {**STATE_STYLE, "down": "red", "unauthorized": "red", "wrong server key": "red"}
PANEL_LINES = 7  # a device panel's height


def header(nf: NodesFrame, view: ViewState) -> Text:
    t = Text()
    t.append("flexnpu top", style="bold")
    up = sum(1 for n in nf.nodes if n.up)
    t.append(f"  nodes {len(nf.nodes)}, up {up}")
    t.append("  " + time.strftime("%H:%M:%S", time.localtime(nf.time)))
    if view.paused:
        t.append("  PAUSED", style="bold reverse")
    t.no_wrap, t.overflow = True, "ellipsis"
    return t


def node_table(nf: NodesFrame) -> Table:
    """One line per node: where it is, its observer and controller, and what is wrong."""
    t = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False, padding=(0, 1))
    for name, kw in (("NODE", {}), ("ENDPOINT", {}), ("OBSERVER", {}), ("CONTROLLER", {}), ("SOURCE", {}),
                     ("STATE", {"ratio": 1, "overflow": "fold"})):
        t.add_column(name, no_wrap=name != "STATE", **kw)
    for n in nf.nodes:
        f = n.frame
        ep = str(n.spec.endpoint) + (f"/{n.spec.controller.port}" if n.spec.controller else "")
        state = Text("up", style="green") if n.up else Text(f"{_short(f.observer)}: {n.error}",
                                                            style=NODE_STYLE.get(f.observer, "yellow"))
        t.add_row(n.name, ep, Text(f.observer, style=NODE_STYLE.get(f.observer, "")),
                  Text("-" if f.controller == "none" else f.controller, style=NODE_STYLE.get(f.controller, "")),
                  f.snapshot.source if f.snapshot else "N/A", state)
    return t


def _short(observer: str) -> str:
    return {"starting": "waiting", "absent": "down"}.get(observer, observer)


def device_panels(nf: NodesFrame, width: int) -> RenderableType | None:
    shown = [(n, d) for n in nf.nodes if n.frame.snapshot is not None for d in n.frame.device_ids()]
    quiet = [n.name for n in nf.nodes if n.frame.snapshot is not None and not n.frame.device_ids()]
    if not shown:
        return Text(f"{', '.join(quiet)}: no device work seen yet", style="dim") if quiet else None
    per_row = 2 if len(shown) > 1 and width >= 140 else 1
    grid = Table.grid(expand=True)
    for _ in range(per_row):
        grid.add_column(ratio=1)
    panels = [device_panel(n.frame, d, width // per_row, title=f"{n.name} · NPU {d}", remote=True)
              for n, d in shown]
    for i in range(0, len(panels), per_row):
        grid.add_row(*panels[i:i + per_row])
    if quiet:
        return Group(grid, Text(f"{', '.join(quiet)}: no device work seen yet", style="dim"))
    return grid


def node_rows(nf: NodesFrame, sort: str) -> list[tuple[str, Row]]:
    """Every node's rows; sorted by node then pid, or by the chosen column then node."""
    out = [(n.name, r) for n in nf.nodes for r in rows(n.frame)]
    key = SORT_KEYS.get(sort, SORT_KEYS["pid"])
    if sort == "pid":
        return sorted(out, key=lambda nr: (nr[0], key(nr[1])))
    return sorted(out, key=lambda nr: (key(nr[1]), nr[0]))


def process_table(nf: NodesFrame, view: ViewState, max_rows: int | None = None) -> Table:
    t = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, padding=(0, 0), show_edge=False,
              title=f"processes  sort {view.sort} (s)  pause (p)  quit (q)", title_justify="left",
              title_style="dim")
    cols = [("NODE", "left"), ("PID", "right"), ("DEV", "right"), ("COMMAND", "left"), ("ROLE", "left"),
            ("PHASE", "left"), ("LAUNCH/s", "right"), ("H2D/D2H MB/s", "right"), ("MEM", "right"),
            ("INFL", "right"), ("GATE", "left")]
    for name, just in cols:
        t.add_column(name, justify=just, no_wrap=name != "COMMAND", overflow="ellipsis",
                     max_width=12 if name in ("COMMAND", "NODE") else None, ratio=1 if name == "COMMAND" else None)
    rs = node_rows(nf, view.sort)
    shown = rs if max_rows is None or len(rs) <= max_rows else rs[:max(0, max_rows - 1)]
    for node, r in shown:
        g = r.gate
        t.add_row(node, str(r.pid), "N/A" if r.device is None else str(r.device),
                  Text(r.comm, overflow="ellipsis", no_wrap=True), r.role or "-",
                  phase_text(r.phase, r.prefill_share), fmt_rate(r.launches_per_s),
                  f"{fmt_mbps(r.h2d_Bps)}/{fmt_mbps(r.d2h_Bps)}", fmt_bytes(r.mem_bytes), fmt_inflight(g),
                  fmt_gate(g))
    if len(shown) < len(rs):
        t.caption = f"... {len(rs) - len(shown)} more"
    if not rs:
        t.caption = "no processes"
    return t


def decisions(nf: NodesFrame, lines: int = DECISION_LINES) -> RenderableType:
    merged = sorted(((n.name, d) for n in nf.nodes for d in n.frame.decisions), key=lambda nd: -nd[1].time)
    if not any(n.frame.report is not None for n in nf.nodes):
        body: RenderableType = Text("No controller: give a node's controller port as NAME=HOST:PORT/CTRLPORT.",
                                    style="dim")
    elif not merged:
        body = Text("No decisions yet.", style="dim")
    else:
        g = Table.grid(padding=(0, 1), expand=True)
        for _ in range(5):
            g.add_column(no_wrap=True)
        g.add_column(overflow="fold", ratio=1)
        for node, d in merged[:lines]:
            g.add_row(time.strftime("%H:%M:%S", time.localtime(d.time)), node, f"NPU {d.device}", f"pid {d.pid}",
                      fmt_setting(d), Text(d.reason, style="italic"))
        body = g
    return Panel(body, title="controller decisions, newest first", title_align="left", box=box.ROUNDED)


def render(nf: NodesFrame, view: ViewState = ViewState(), width: int = 100,
           height: int | None = None) -> RenderableType:
    """The whole screen; `height` limits the process table so the decisions stay visible."""
    panels = device_panels(nf, width)
    parts: list[RenderableType] = [header(nf, view), node_table(nf)]
    if panels is not None:
        parts.append(panels)
    max_rows = None
    if height is not None:
        ndev = sum(len(n.frame.device_ids()) for n in nf.nodes if n.frame.snapshot is not None)
        per_row = 2 if ndev > 1 and width >= 140 else 1
        used = 1 + len(nf.nodes) + 2 + ((ndev + per_row - 1) // per_row) * PANEL_LINES + 3 + (DECISION_LINES + 2)
        max_rows = max(1, height - used)
    parts += [process_table(nf, view, max_rows), decisions(nf)]
    return Group(*parts)
