"""`flexnpu emu`: start, stop and inspect the emulated Ascend device."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flexnpu import paths
from flexnpu.emulator import control
from flexnpu.emulator.profiles import PROFILES

app = typer.Typer(
    help="The emulated Ascend device (real AscendCL ABI, published-spec performance model).",
    no_args_is_help=True,
)
# soft_wrap: an error stays one line however narrow the terminal (or a pipe's 80 columns)
err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


@app.command()
def start(
    devices: Annotated[int, typer.Option(help="Number of emulated devices (1-16).")] = 8,
    profile: Annotated[str, typer.Option(help=f"Device profile: {', '.join(PROFILES)}.")] = "910b",
    mode: Annotated[
        str,
        typer.Option(help="contexts (as Ascend: processes take turns, streams of one share the cores), "
                     "serial (one op at a time) or shared (ideal fluid sharing, an upper bound like MPS); "
                     "a comma list gives one per device."),
    ] = control.DEFAULT_MODE,
    time_scale: Annotated[float, typer.Option(help="Multiply every modelled time by this.")] = 1.0,
    foreground: Annotated[bool, typer.Option(help="Run in the foreground (for systemd).")] = False,
    partition: Annotated[str | None, typer.Option(help="Split every device by role in fixed shares of compute "
                                                  "and bandwidth, like vNPU templates: prefill=S,decode=S.")] = None,
    context_switch_us: Annotated[float | None, typer.Option(
        help="contexts mode: device idle time when it changes process (default: the profile's).")] = None,
) -> None:
    """Start the device server.

    Examples:
      flexnpu emu start --devices 2
      flexnpu emu start --profile 910c --mode contexts,shared --devices 2
      flexnpu emu start --partition prefill=0.6,decode=0.4
    """
    try:
        pid = control.start(devices, profile, mode, time_scale, foreground=foreground, partition=partition,
                            context_switch_us=context_switch_us)
    except control.EmulatorError as e:
        err.print(f"flexnpu emu start: {e}")
        raise typer.Exit(1)
    typer.echo(f"emulator started: pid {pid}, {devices} x {PROFILES[profile].soc} ({mode}), "
               f"socket {paths.emulator_socket()}")


@app.command()
def stop() -> None:
    """Stop the device server (clients then get ACL_ERROR_RT_SOCKET_CLOSE)."""
    try:
        stopped = control.stop()
    except control.EmulatorError as e:
        err.print(f"flexnpu emu stop: {e}")
        raise typer.Exit(1)
    if stopped:
        typer.echo("emulator stopped")
    else:
        typer.echo(f"no emulator running under {paths.runtime_dir()}")


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f}"


def _held(mem: dict) -> str:
    """Memory its owner freed that IPC importers still map, where there is some."""
    held = mem.get("ipc_held", 0)
    return f" ({_mib(held)} MiB held by IPC imports)" if held else ""


@app.command()
def status(
    json_out: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Per device and client process: busy time, bytes copied by direction, memory in use.

    Exit code 1 if no emulator is running.
    """
    try:
        st = control.status()
    except control.EmulatorError as e:
        if json_out:
            typer.echo(json.dumps({"schema": 1, "running": False, "error": str(e)}))
        else:
            err.print(f"flexnpu emu status: {e}")
        raise typer.Exit(1)
    if json_out:
        typer.echo(json.dumps({**st, "running": True}))
        return
    con = Console()
    for d in st["devices"]:
        p = d["params"]
        con.print(
            f"[bold]device {d['index']}[/] {d['soc']} {d['mode']}  "
            f"{p['peak_tflops']:.0f} TFLOPS  {p['hbm_gbps']:.0f} GB/s HBM\n"
            f"  memory {_mib(d['memory']['used'])}/{_mib(d['memory']['total'])} MiB"
            f"{_held(d['memory'])}  "
            f"busy {d['busy_ns'] / 1e6:.1f} ms  pending ops {d['pending_ops']}\n"
            f"  cube busy {d['cube_busy_ns'] / 1e6:.1f} ms ({p['cube_cores']} AIC)  "
            f"vector busy {d['vector_busy_ns'] / 1e6:.1f} ms ({p['vector_cores']} AIV)  "
            f"context switches {d['context_switches']}"
        )
        if not d["clients"]:
            continue
        t = Table(box=None, pad_edge=False)
        for col in ("pid", "alive", "busy ms", "kernels", "H2D MiB", "D2H MiB", "D2D MiB", "mem MiB"):
            t.add_column(col, justify="left" if col == "alive" else "right")
        tops = []
        for c in d["clients"]:
            b = c["bytes_copied"]
            t.add_row(
                str(c["pid"]), "yes" if c["alive"] else "exited", f"{c['busy_ns'] / 1e6:.2f}",
                str(c["ops"]["kernel"]), _mib(b["h2d"]), _mib(b["d2h"]), _mib(b["d2d"] + b["inner_d2d"]),
                _mib(c["memory_used"]),
            )
            top = sorted(c["busy_by_name"].items(), key=lambda kv: -kv[1])[:4]
            if top:
                tops.append(f"  {c['pid']}: " + ", ".join(f"{k} {v / 1e6:.3f} ms" for k, v in top))
            ipc = c.get("ipc") or {}
            if ipc.get("exports") or ipc.get("imports"):
                tops.append(f"  {c['pid']}: IPC memory exported {ipc['exports']} ({_mib(ipc['export_bytes'])} MiB), "
                            f"imported {ipc['imports']} ({_mib(ipc['import_bytes'])} MiB)")
        con.print(t)
        for line in tops:  # busiest names, one line per client, under 80 columns
            con.print(line, soft_wrap=True, highlight=False)


@app.command()
def env() -> None:
    """Print shell exports that make programs load the emulated libascendcl.so.

    Example:  eval "$(flexnpu emu env)"
    """
    e = control.emulator_env()
    e["FLEXNPU_EMU_KERNELS"] = str(paths.emulator_kernel_library())
    e["FLEXNPU_ACL_INCLUDE"] = str(paths.acl_include_dir())
    for k, v in e.items():
        typer.echo(f"export {k}={v}")
