"""What `flexnpu bench pd` shows: rich tables from its report, and the plot (matplotlib).
Pure functions of the report; nothing here runs anything."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from flexnpu.bench.pd import CONFIGS


def _f(v: Any, nd: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "N/A"
    return f"{v:,.{nd}f}"


def _spread(c: dict, key: str, nd: int = 1) -> str:
    sp = (c.get("spread") or {}).get(key)
    if c.get("repeats", 1) < 2 or not sp:
        return ""
    return f" [dim]({_f(sp[0], nd)}–{_f(sp[1], nd)})[/]"


def results_table(point: dict) -> Table:
    t = Table(title=f"{point['mode']} mode, {point['rate']:g} req/s, trace {point['trace'].get('name')} "
                    f"({point['trace'].get('n')} requests); latencies in ms", title_justify="left")
    t.add_column("configuration")
    for h in ("TTFT p50", "p90", "p99", "TPOT p50", "p90", "p99", "ITL p99"):
        t.add_column(h, justify="right")
    for h in ("out tok/s", "req/s", "SLO", "checks", "phase"):
        t.add_column(h, justify="right")
    for name in CONFIGS:
        c = point["configs"].get(name)
        if c is None:
            continue
        tags = [c["variant"]] if c.get("variant") else []
        tags += [f"{c['nodes']} nodes"] if c.get("nodes", 1) > 1 else []
        label = name + (f" [dim]{', '.join(tags)}[/]" if tags else "")
        ph = c.get("phase") or {}
        acc = ph.get("accuracy")
        t.add_row(label,
                  _f(c["ttft_ms"]["p50"]) + _spread(c, "ttft_ms.p50"), _f(c["ttft_ms"]["p90"]),
                  _f(c["ttft_ms"]["p99"]) + _spread(c, "ttft_ms.p99"),
                  _f(c["tpot_ms"]["p50"], 2) + _spread(c, "tpot_ms.p50", 2), _f(c["tpot_ms"]["p90"], 2),
                  _f(c["tpot_ms"]["p99"], 2), _f(c["itl_ms"]["p99"], 2),
                  _f(c["output_tps"]) + _spread(c, "output_tps"), _f(c["request_ps"], 2),
                  f"{c['slo_attainment']:.0%}",
                  "[green]ok[/]" if not c["problems"] else f"[red]{len(c['problems'])} bad[/]",
                  "N/A" if acc is None else f"{acc:.1%} {ph.get('source') or ''}")
    return t


def sweep_table(point: dict) -> Table | None:
    if not point.get("static_sweep"):
        return None
    t = Table(title=f"static-colocation sweep ({point['mode']}, {point['rate']:g} req/s): "
                    f"chosen {point.get('static_choice')}", title_justify="left")
    for h in ("form", "prefill share", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "out tok/s", "goodput", "SLO",
              "serves"):
        t.add_column(h, justify="right" if h != "form" else "left")
    for s in point["static_sweep"]:
        st = s.get("serves")
        t.add_row("time split" if s["form"] == "time" else "vNPU partition", f"{s['prefill_share']:.2f}",
                  _f(s["ttft_p50_ms"]), _f(s["ttft_p99_ms"]), _f(s["tpot_p50_ms"], 2), _f(s["output_tps"]),
                  _f(s["goodput"], 2), f"{s['slo_attainment']:.0%}",
                  "N/A" if st is None else "yes" if st else "[red]no[/]")
    return t


def disagg_tables(point: dict) -> list[Table]:
    """Each disaggregated configuration's xPyD sweep, where it tried more than one ratio."""
    out = []
    for c, rows in (point.get("disagg_sweep") or {}).items():
        if len(rows) < 2:
            continue
        t = Table(title=f"{c} xPyD sweep ({point['mode']}, {point['rate']:g} req/s): chosen "
                        f"{(point.get('disagg_choice') or {}).get(c)}", title_justify="left")
        for h in ("ratio", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "out tok/s", "goodput", "SLO", "serves"):
            t.add_column(h, justify="right" if h != "ratio" else "left")
        for s in rows:
            st = s.get("serves")
            t.add_row(s["ratio"], _f(s["ttft_p50_ms"]), _f(s["ttft_p99_ms"]), _f(s["tpot_p50_ms"], 2),
                      _f(s["output_tps"]), _f(s["goodput"], 2), f"{s['slo_attainment']:.0%}",
                      "N/A" if st is None else "yes" if st else "[red]no[/]")
        out.append(t)
    return out


def kv_net_text(point: dict) -> list[Text]:
    """The KV that crossed nodes against the link's byte counter."""
    out = []
    for name, c in point["configs"].items():
        kv = c.get("kv_net")
        if kv:
            out.append(Text(f"{name}: {kv['note']} ({'ok' if kv['ok'] else 'OUT OF BAND'})",
                            style="" if kv["ok"] else "red"))
    return out


def targets_table(rep: dict) -> Table:
    t = Table(title="targets (ratios measured in this run)", title_justify="left")
    for h in ("mode", "target", "ratio", "want", "result"):
        t.add_column(h, justify="right" if h in ("ratio",) else "left")
    for x in rep["targets"]:
        st = {"PASS": "[green]PASS[/]", "MISS": "[red]MISS[/]"}.get(x["status"], "[dim]N/A[/]")
        t.add_row(x["mode"], x["name"], _f(x["ratio"], 3), x["want"], st)
    return t


def load_table(mode: str, sw: dict) -> Table:
    t = Table(title=f"load sweep ({mode}): TTFT p99 ms / goodput req/s; SLO TTFT {sw['slo']['ttft_ms']:.0f} ms, "
                    f"TPOT {sw['slo']['tpot_ms']:.1f} ms ({sw['slo']['from']})", title_justify="left")
    t.add_column("configuration")
    rates = [p["rate"] for p in next(iter(sw["curves"].values()))]
    for r in rates:
        t.add_column(f"{r:g}/s", justify="right")
    t.add_column("max rate", justify="right")
    for c, pts in sw["curves"].items():
        t.add_row(c, *[f"{_f(p['ttft_p99_ms'], 0)} / {_f(p['goodput'], 2)}" for p in pts], _f(sw["max_rate"].get(c), 2))
    return t


def operating_table(op: dict) -> Table:
    t = Table(title=f"operating point ({op['mode']}): {op['rate']:g} req/s, {op['note']}", title_justify="left")
    for h in ("req/s", "static split", "TTFT p50 ms first/last third", "TPOT p50 ms first/last third",
              "TTFT p50", "TTFT p99", "TPOT p50", "out tok/s", "busy", "SLO", "serves"):
        t.add_column(h, justify="left" if h == "static split" else "right")
    for r in op["sweep"]:
        busy = [b for b in r.get("device_busy_share") or [] if b is not None]
        t.add_row(f"{r['rate']:g}", f"{'time' if r['form'] == 'time' else 'vNPU'} {r['prefill_share']:.2f}",
                  f"{_f(r['ttft_first_ms'])} / {_f(r['ttft_last_ms'])}",
                  f"{_f(r['tpot_first_ms'])} / {_f(r['tpot_last_ms'])}",
                  _f(r["ttft_p50_ms"]), _f(r["ttft_p99_ms"]), _f(r["tpot_p50_ms"], 2), _f(r["output_tps"]),
                  "/".join(f"{b:.0%}" for b in busy) or "N/A", f"{r['slo_attainment']:.0%}",
                  "[green]yes[/]" if r["serves"] else "[red]no[/] (" + ("stable" if r["stable"] else "growing") + ")")
    return t


def render(rep: dict) -> RenderableType:
    parts: list[RenderableType] = []
    op = rep.get("operating_point") or {}
    if op.get("sweep"):
        parts.append(operating_table(op))
    for p in rep["results"]:
        parts.append(results_table(p))
        s = sweep_table(p)
        if s is not None:
            parts.append(s)
        parts += disagg_tables(p)
        parts += kv_net_text(p)
    for mode, sw in rep["load_sweep"].items():
        if sw:
            parts.append(load_table(mode, sw))
    parts.append(targets_table(rep))
    for p in rep["results"]:
        fl, st = p.get("ttft_floor_ms"), (p["configs"].get("static-colocation") or {}).get("ttft_ms")
        if fl and st and st.get("p50") and st.get("p99"):
            parts.append(Text(f"TTFT floor ({p['mode']}, {p['rate']:g} req/s), each prompt's own prefill alone on a "
                              f"device: p50 {fl['p50']:.1f} ms, p99 {fl['p99']:.1f} ms; no configuration goes under "
                              f"it, so TTFT can be at most {1 - fl['p50'] / st['p50']:.0%} (p50) and "
                              f"{1 - fl['p99'] / st['p99']:.0%} (p99) lower than static-colocation's here"))
    if rep["options"].get("left_out"):
        parts.append(Text(rep["options"]["left_out"], style="yellow"))
    m = rep["machine"]
    parts.append(Text(f"machine: {m['cpu']}, {m['cpus']} CPUs, Linux {m['kernel']}, load {m['load1']}; "
                      f"observer: {rep['observer']}; {rep['wall_s']:.0f} s", style="dim"))
    return Group(*parts)


def plot(rep: dict, path: Path) -> None:
    """CDFs of TTFT and TPOT per configuration, throughput, and with a load sweep TTFT p99
    and goodput against rate; one row per sharing mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (NullFormatter below)

    points = rep["_points"]
    modes = list(dict.fromkeys(p["mode"] for p in points))
    sweep = any(rep["load_sweep"].get(m) for m in modes)
    cols = 5 if sweep else 3
    fig, axes = plt.subplots(len(modes), cols, figsize=(4.2 * cols, 3.6 * len(modes)), squeeze=False)
    base = rep["options"]["rate"]
    for i, mode in enumerate(modes):
        pt = next(p for p in points if p["mode"] == mode and p["rate"] == base)
        ax_ttft, ax_tpot, ax_tp = axes[i][0], axes[i][1], axes[i][2]
        names, tps = [], []
        for c in CONFIGS:
            runs = pt["_raw"].get(c)
            if not runs:
                continue
            ttft = sorted(t.ttft * 1e3 for r in runs for t in r.timings if t.token_times)
            tpot = sorted(t.tpot * 1e3 for r in runs for t in r.timings if t.tpot is not None)
            for ax, xs in ((ax_ttft, ttft), (ax_tpot, tpot)):
                if xs:
                    ax.plot(xs, [(k + 1) / len(xs) for k in range(len(xs))], label=c)
            names.append(c)
            tps.append(pt["configs"][c]["output_tps"])
        ax_ttft.set_xscale("log")
        ax_ttft.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
        fl = pt.get("ttft_floor_ms") or {}
        if fl.get("p50"):
            ax_ttft.axvline(fl["p50"], ls=":", color="gray", label="floor p50 (prefill alone)")
        ax_ttft.set(title=f"TTFT CDF ({mode}, {base:g} req/s)", xlabel="ms", ylabel="share of requests")
        ax_tpot.set(title=f"TPOT CDF ({mode})", xlabel="ms")
        ax_ttft.legend(fontsize=7)
        ax_tp.bar(range(len(names)), tps, color=[f"C{k}" for k in range(len(names))])
        ax_tp.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax_tp.set(title="output tokens/s", ylabel="tok/s")
        sw = rep["load_sweep"].get(mode)
        if sweep and sw:
            for c, pts in sw["curves"].items():
                axes[i][3].plot([p["rate"] for p in pts], [p["ttft_p99_ms"] for p in pts], marker="o", label=c)
                axes[i][4].plot([p["rate"] for p in pts], [p["goodput"] for p in pts], marker="o", label=c)
            axes[i][3].set(title=f"TTFT p99 vs rate ({mode})", xlabel="req/s", ylabel="ms", yscale="log")
            axes[i][4].set(title="goodput vs rate", xlabel="req/s", ylabel="req/s within SLO")
            axes[i][4].legend(fontsize=7)
    fig.suptitle(f"flexnpu bench pd: trace {rep['options']['trace']}, model {rep['options']['model']}, "
                 f"{rep['options']['devices']} devices")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
