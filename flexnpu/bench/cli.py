"""`flexnpu bench pd`: the prefill/decode sharing comparison on the emulator (flexnpu.bench.pd)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from flexnpu.bench import pd
from flexnpu.bench.node import stop_signals
from flexnpu.cliargs import check_output_file, say

app = typer.Typer(help="Benchmarks on the emulated device.", no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]})
err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


def console() -> Console:
    """Wide enough for the tables when not on a terminal (a pipe or a log file)."""
    c = Console()
    return c if c.is_terminal else Console(width=150)


def _floats(s: str | None, what: str) -> tuple[float, ...]:
    if not s:
        return ()
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise pd.BenchError(f"{what} takes a comma list of numbers, got {s!r}") from None


def options_from(trace: str, n: int | None, rate: str | float | None, rates: str | None, devices: int, mode: str,
                 repeat: int, configs: str | None, shares: str | None, model: str | None, seed: int,
                 slo_ttft_ms: float | None, slo_tpot_ms: float | None, quick: bool,
                 ops: str = pd.DEFAULT_OPS, nodes: int = 1, link_gbit: float | None = None,
                 link_delay_us: float | None = None) -> pd.Options:
    o = pd.Options(trace=trace, devices=devices, repeat=repeat, seed=seed,
                   modes=pd.MODES if mode == "all" else tuple(mode.split(",")), observer=pd.default_observer(),
                   ops=ops, nodes=nodes)
    if link_gbit is not None:
        o.link_gbit = link_gbit
    if link_delay_us is not None:
        o.link_delay_us = link_delay_us
    if n is not None:
        o.n = n
    auto = rate is None or str(rate).strip().lower() == "auto"
    if not auto:
        try:
            o.rate = float(rate)  # type: ignore[arg-type]
        except ValueError:
            raise pd.BenchError(f"--rate takes a number of requests/s or auto, got {rate!r}") from None
    if model:
        o.model = model
    if shares:
        o.shares = _floats(shares, "--shares")
    if slo_ttft_ms is not None:
        o.slo_ttft_s = slo_ttft_ms / 1e3
    if slo_tpot_ms is not None:
        o.slo_tpot_s = slo_tpot_ms / 1e3
    if configs:
        o.configs = tuple(c.strip() for c in configs.split(",") if c.strip())
    else:  # the default list: the forwarded configurations where they can run (why not, printed)
        o = pd.runnable(o)
    o.rates = _floats(rates, "--rates")
    if quick:
        o = pd.quick(o)
        if rate is not None and auto:  # --quick runs at a fixed rate unless auto is asked for
            o.rate = None
    o.check()
    return o


def execute(o: pd.Options, console: Console, json_path: Path | None, plot_path: Path | None) -> dict:
    """Runs the benchmark with a progress bar, prints the tables, writes the files."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flexnpu.bench import pd_view

    plan = pd.plan(o)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("requests"),
                  TimeElapsedColumn(), console=console, transient=True) as prog:
        task = prog.add_task("starting", total=plan.total_requests)
        rep = pd.run(o, progress=lambda d, k: prog.update(task, description=d, advance=k),
                     log=lambda s: prog.console.print(s, markup=False, highlight=False))
    console.print(pd_view.render(rep))
    if json_path:
        json_path.write_text(json.dumps(pd.json_ready(rep), indent=1) + "\n")
        console.print(f"results: {json_path}")
    if plot_path:
        pd_view.plot(rep, plot_path)
        console.print(f"plot: {plot_path}")
    return rep


@app.command("pd")
def pd_command(
    trace: Annotated[str, typer.Option(help="balanced, prefill-heavy, or an Azure LLM trace CSV.")] = "balanced",
    n: Annotated[Optional[int], typer.Option("-n", help="Requests in the trace.")] = None,
    rate: Annotated[Optional[str], typer.Option(
        help="Request rate the targets are judged at (req/s), or auto (the default; --quick: 40): the highest "
             "rate at which the best static co-location is still stable, found by a sweep.")] = None,
    rates: Annotated[Optional[str], typer.Option(help="Load sweep: a comma list of rates (req/s).")] = None,
    devices: Annotated[int, typer.Option(help="Emulated devices in all, over all nodes (co-located: one pair "
                                         "each; static-disagg: the xPyD ratios they allow).")] = 2,
    nodes: Annotated[int, typer.Option(help="1, or 2: two nodes in network namespaces joined by a shaped link "
                                       "(root), --devices split between them; adds static-disagg-xnode.")] = 1,
    link_gbit: Annotated[Optional[float], typer.Option(help="--nodes 2: the link's rate per direction, Gbit/s "
                                                       "(default: a 100 GbE RoCE link's).")] = None,
    link_delay_us: Annotated[Optional[float], typer.Option(help="--nodes 2: the link's one-way delay, us.")] = None,
    mode: Annotated[str, typer.Option(help="The emulator's sharing mode: contexts (Ascend-like, the default), "
                                      "serial, shared, or all.")] = pd.DEFAULT_MODE,
    repeat: Annotated[int, typer.Option(help="Run everything this many times; medians and spread.")] = 1,
    configs: Annotated[Optional[str], typer.Option(help=f"A comma list of: {', '.join(pd.CONFIGS)}.")] = None,
    shares: Annotated[Optional[str], typer.Option(help="Prefill shares the static-colocation sweep tries.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model config (qwen2.5-7b; NAME:LAYERS for fewer layers).")] = None,
    seed: Annotated[int, typer.Option(help="Trace seed.")] = 0,
    slo_ttft_ms: Annotated[Optional[float], typer.Option(help="TTFT SLO for goodput (ms).")] = None,
    slo_tpot_ms: Annotated[Optional[float], typer.Option(help="TPOT SLO for goodput (ms).")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the results here (\"schema\": 1).")] = None,
    plot_path: Annotated[Optional[Path], typer.Option("--plot", help="Write the plot here (PNG).")] = None,
    quick: Annotated[bool, typer.Option(help="CI size: 2 layers, 16 requests, one share per form.")] = False,
    ops: Annotated[str, typer.Option(help=f"How the instances run a step: {', '.join(pd.OPS)} (kernels: the "
                                     "built-in kernels; aclnn: CANN aclnn operators, attention by phase; "
                                     "aclnn-fia: FusedInferAttentionScore for every phase, as vllm-ascend).")
                   ] = pd.DEFAULT_OPS,
) -> None:
    """Compare ways of sharing devices between a prefill and a decode instance.

    Runs one trace under no-shim, uncontrolled (passthrough), static-colocation
    (the best time or vNPU split of a sweep), static-disagg (separate devices,
    the best xPyD ratio of a sweep), static-disagg-xnode (--nodes 2: prefill on
    one node, decode on the other, the KV over the link with Mooncake's engine),
    flexnpu-gated (flexpd, the shim; `flexnpu` is its old name), and forwarded
    (the device's executor runs the instances' calls) forward-uncontrolled and
    flexnpu-forward (flexpd), one after another on the emulator, and prints
    latency, throughput, SLO attainment, the emulator's checks, the observer's
    phase accuracy and each target as PASS/MISS.

    Examples:
      flexnpu bench pd --quick
      flexnpu bench pd --json pd.json --plot pd.png
      flexnpu bench pd --rate 16 --configs static-colocation,flexnpu-gated
      flexnpu bench pd --quick --ops kernels --configs flexnpu-gated,flexnpu-forward
      flexnpu bench pd --trace prefill-heavy --repeat 3
      flexnpu bench pd --rates 2,4,6,8 --plot load.png
      flexnpu bench pd --mode all --configs static-colocation,flexnpu-gated
      flexnpu bench pd --quick --ops aclnn-fia
      flexnpu bench pd --quick --devices 4 --configs static-disagg
      sudo flexnpu bench pd --quick --nodes 2 --devices 4
      sudo flexnpu bench pd --nodes 2 --devices 4 --link-gbit 25 --link-delay-us 10
    """
    check_output_file("bench pd", "--json", json_path)
    check_output_file("bench pd", "--plot", plot_path)
    try:
        if mode not in (*pd.MODES, "all"):
            raise pd.BenchError(f"--mode takes {', '.join(pd.MODES)} or all, got {mode!r}")
        o = options_from(trace, n, rate, rates, devices, mode, repeat, configs, shares, model, seed,
                         slo_ttft_ms, slo_tpot_ms, quick, ops, nodes, link_gbit, link_delay_us)
    except pd.BenchError as e:
        err.print(f"flexnpu bench pd: {e}")
        raise typer.Exit(2)
    hung_up = []

    def on_term(signum: int, frame: object) -> None:  # stop like Ctrl-C: every node it started goes too
        hung_up.append(signum == signal.SIGHUP)
        raise KeyboardInterrupt

    try:
        with stop_signals(on_term):
            execute(o, console(), json_path, plot_path)
    except KeyboardInterrupt:
        if hung_up and hung_up[0]:
            say("flexnpu bench pd: hung up (SIGHUP); everything it started is stopped")
            raise typer.Exit(128 + signal.SIGHUP)
        say("flexnpu bench pd: interrupted; everything it started is stopped")
        raise typer.Exit(130)
    except Exception as e:  # one line, not a traceback: the node's log names the part that failed
        say(f"flexnpu bench pd: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise typer.Exit(1)


app.add_typer(__import__("flexnpu.bench.net_cli", fromlist=["app"]).app, name="net")
