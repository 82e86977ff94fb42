"""`flexnpu demo`: a whole FlexNPU node in a temporary runtime dir (the emulator, a daemon per
device, the observer, the controller), the reference serving workload under it with the
`top` view live, then the comparison (`bench pd`, short) and its table and plot.

The live workload runs forwarded (its calls run in the device's executor, which schedules
them op by op: flexnpu-forward) where forwarding can run the instances' --ops, else gated
(the shim, flexnpu-gated); the demo says which and why. The comparison runs flexnpu-forward
beside flexnpu-gated where it can (forward-uncontrolled is `bench pd`'s, not the demo's).

Everything it starts is stopped on the way out: at the end, on an error, on Ctrl-C (SIGINT),
on SIGTERM and on SIGHUP (the terminal closed, the ssh session dropped); killed outright, its
nodes' guards stop them (flexnpu/bench/guard.py). The runtime dirs are temporary and removed.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from flexnpu.bench import pd
from flexnpu.cliargs import MAX_INTERVAL_S, check_output_dir, check_positive, say
from flexnpu.bench.node import LocalNode, stop_signals


class _Stop(Exception):
    """SIGTERM or SIGHUP: unwind like Ctrl-C so every with-block stops what it started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_term(signum: int, frame: object) -> None:
    raise _Stop(signum)


def demo_options(quick: bool, ops: str = pd.DEFAULT_OPS) -> pd.Options:
    """The comparison the demo runs: every configuration but forward-uncontrolled (the
    forwarded ones where they can run), one share per static form."""
    o = pd.runnable(pd.Options(observer=pd.default_observer(), shares=(0.5,), ops=ops,
                               configs=tuple(c for c in pd.CONFIGS if c != "forward-uncontrolled")))
    if quick:
        return pd.quick(replace(o, n=8))
    # four layers of Qwen2.5-7B keep each run to seconds; the full model is `flexnpu bench pd`
    return replace(o, model="qwen2.5-7b:4", n=40, rate=24.0, slo_ttft_s=0.1, slo_tpot_s=0.012)


def live_mode(o: pd.Options) -> tuple[bool, str]:
    """Whether the live workload runs forwarded, and the line that says so."""
    why = pd.forward_refusal(o.ops)
    if why is None:
        return True, "forwarded: the instances' calls run in the device's executor, scheduled op by op (flexnpu-forward)"
    return False, f"gated: the shim holds the instances' calls (flexnpu-gated); not forwarded because {why}"


def live_workload(console: Console, o: pd.Options, seconds: float) -> None:
    """The workload under FlexNPU (flexpd) with the top view live for `seconds`, forwarded
    where it can be (`live_mode`)."""
    from flexnpu.tui.model import Sampler
    from flexnpu.tui.view import ViewState, render

    forward, line = live_mode(o)
    console.print(f"mode: {line}", markup=False, highlight=False)
    # forwarded, the shim's counters: BPF's probes in libascendcl.so see the executor alone
    observer = "shim" if forward and o.observer else o.observer
    node = LocalNode(devices=1, mode=o.modes[0], profile=o.profile, observer=observer, policy="flexpd")
    # in the node's own dir, so that whatever removes the node (its stop, or its guard after a
    # kill -9 of this process) removes the configuration too
    toml = node.rdir / "flexpd.toml"
    toml.write_text(pd.FLEXPD_TOML)
    node.controller_args = ["--config", str(toml)]
    with node:
        reqs, _ = pd.make_trace(replace(o, n=10_000, devices=1), o.rate / 2)
        reqs = [r for r in reqs if r.arrival_s < seconds]
        from flexnpu.workload import driver

        setup = driver.Setup(model=o.model, profile=o.profile, slo=o.slo, ops=o.ops, forward=forward)
        result: dict = {}

        def work() -> None:
            try:
                result["res"] = driver.run(node, reqs, setup)
            except BaseException as e:
                result["err"] = e

        t = threading.Thread(target=work, name="flexnpu-demo-workload", daemon=True)
        t.start()
        sampler = Sampler(node.rdir, interval=0.5).start()
        try:
            end = time.monotonic() + seconds
            if console.is_terminal:
                from rich.live import Live

                with Live(console=console, auto_refresh=False, transient=False) as live:
                    while time.monotonic() < end and t.is_alive():
                        f = sampler.frame()
                        if f is not None:
                            live.update(render(f, ViewState(), width=console.width), refresh=True)
                        time.sleep(0.5)
            else:  # a pipe or a log: a frame every few seconds
                while time.monotonic() < end and t.is_alive():
                    time.sleep(min(3.0, max(0.1, end - time.monotonic())))
                    f = sampler.frame()
                    if f is not None:
                        console.print(render(f, ViewState(), width=console.width))
        finally:
            sampler.stop()
        while t.is_alive():
            t.join(0.2)
        if "err" in result:
            raise result["err"]
        m = result["res"].metrics
        console.print(f"workload under flexpd, {'forwarded' if forward else 'gated'}: {m.get('completed', 0)} "
                      f"requests, TTFT p50 "
                      f"{m['ttft_s']['p50'] * 1e3:.1f} ms, TPOT p50 {m['tpot_s']['p50'] * 1e3:.2f} ms, "
                      f"{m['output_throughput']:.0f} tok/s; emulator check: "
                      f"{'ok' if not result['res'].problems else result['res'].problems}")


def demo_command(
    quick: Annotated[bool, typer.Option(help="CI size: a few seconds of workload, then `bench pd --quick`.")] = False,
    seconds: Annotated[Optional[float], typer.Option(help="How long the live view runs (s).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Directory for pd.json and pd.png (default: a new one "
                                                "under /tmp).")] = None,
    ops: Annotated[str, typer.Option(help=f"How the instances run a step: {', '.join(pd.OPS)} (see "
                                     "`flexnpu bench pd --help`).")] = pd.DEFAULT_OPS,
) -> None:
    """Run FlexNPU end to end on emulated devices, then compare it.

    Starts the emulator, a forwarding daemon per device, the observer and
    the controller (flexpd) in a temporary runtime dir; runs the reference
    serving workload (a prefill and a decode instance sharing a device)
    under them, forwarded where forwarding can run it, else gated (it
    prints which), with the `flexnpu top` view live; then runs `flexnpu bench
    pd` (short) and prints its table and where the plot is. Everything it
    starts is stopped at the end, on Ctrl-C and on failure.

    Examples:
      flexnpu demo
      flexnpu demo --quick
      flexnpu demo --seconds 60 --out results/
    """
    check_positive("demo", "--seconds", seconds, most=MAX_INTERVAL_S, unit=" s")
    check_output_dir("demo", "--out", out)
    from flexnpu.bench.cli import console as make_console, execute

    console = make_console()
    if ops not in pd.OPS:
        say(f"flexnpu demo: --ops takes {', '.join(pd.OPS)}, got {ops!r}")
        raise typer.Exit(2)
    o = demo_options(quick, ops)
    secs = seconds if seconds is not None else (4.0 if quick else 20.0)
    try:
        with stop_signals(_on_term):
            console.rule("FlexNPU demo: a prefill and a decode instance share an emulated 910B under flexpd, "
                         + ("forwarded" if live_mode(o)[0] else "gated"))
            live_workload(console, o, secs)
            console.rule("the comparison: flexnpu bench pd" + (" --quick" if quick else " (short)"))
            where = out or Path(tempfile.mkdtemp(prefix="flexnpu-demo-results-"))
            execute(o, console, where / "pd.json", where / "pd.png")
            console.print(f"the full benchmark: flexnpu bench pd --json pd.json --plot pd.png (docs/bench.md)")
    except _Stop as e:
        if e.signum == signal.SIGHUP:
            say("flexnpu demo: hung up (SIGHUP); everything it started is stopped")
            raise typer.Exit(128 + signal.SIGHUP)
        say("flexnpu demo: interrupted; everything it started is stopped")
        raise typer.Exit(130)
    except KeyboardInterrupt:
        say("flexnpu demo: interrupted; everything it started is stopped")
        raise typer.Exit(130)
    except Exception as e:
        say(f"flexnpu demo: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise typer.Exit(1)
