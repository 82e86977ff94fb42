"""`flexnpu service`: install, remove and inspect the systemd units."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from flexnpu.cliargs import EXIT_USAGE
from flexnpu.service import install as inst

app = typer.Typer(help="FlexNPU's systemd services: install, uninstall, status.", no_args_is_help=True)
err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


def _echo(line: str) -> None:
    typer.echo(line)


def _fail(what: str, e: Exception) -> None:
    err.print(f"flexnpu service {what}: {e}")
    raise typer.Exit(EXIT_USAGE if isinstance(e, inst.PrefixError) else 1)


PrefixOpt = Annotated[Path, typer.Option(help="Directory the unit files go to.")]


@app.command()
def install(
    devices: Annotated[str, typer.Option(help="Devices to run a forwarding daemon for: 'all' or a "
                                              "comma list (0,1).")] = "all",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the files it would write (full "
                                                           "text); change nothing.")] = False,
    prefix: PrefixOpt = inst.DEFAULT_PREFIX,
) -> None:
    """Write the units, make the `flexnpu` user and group, write the default configuration
    (when missing), and enable and start the services when systemd is PID 1.

    Examples:
      sudo flexnpu service install
      flexnpu service install --devices 0,1 --dry-run
    """
    try:
        p = inst.plan(devices, prefix)
        inst.install(p, _echo, dry_run)
    except (inst.ServiceError, OSError) as e:
        _fail("install", e)


@app.command()
def uninstall(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what it would remove; change nothing.")] = False,
    prefix: PrefixOpt = inst.DEFAULT_PREFIX,
) -> None:
    """Stop and remove what install wrote. The configuration stays if it was changed since;
    the group stays if install did not create it or other users are in it."""
    try:
        inst.uninstall(inst.check_prefix(prefix), _echo, dry_run)
    except (inst.ServiceError, OSError) as e:
        _fail("uninstall", e)


@app.command()
def status(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON (\"schema\": 1).")] = False,
    prefix: PrefixOpt = inst.DEFAULT_PREFIX,
) -> None:
    """Per unit: installed, enabled, active; and the sockets in the runtime dir."""
    try:
        st = inst.status(inst.check_prefix(prefix))
    except (inst.ServiceError, OSError) as e:
        _fail("status", e)
    if json_out:
        typer.echo(json.dumps(st))
        return
    if not st["systemd"]:
        typer.echo(f"systemd is not running (PID 1 is {st['pid1']})")
    for r in st["units"]:
        typer.echo(f"{r['unit']:<32} {'installed' if r['installed'] else 'not installed':<14} "
                   f"enabled: {r['enabled']:<8} active: {r['active']}")
    rd = st["runtime_dir"]
    if not rd["exists"]:
        typer.echo(f"runtime dir {rd['path']}: missing")
        return
    typer.echo(f"runtime dir {rd['path']} {rd['mode']} {rd['owner']}:{rd['group']}")
    for s in st["sockets"]:
        typer.echo(f"  {Path(s['path']).name:<20} {s['mode']} {s['owner']}:{s['group']}")
    if not st["sockets"]:
        typer.echo("  no sockets")


@app.command()
def probe(
    service: Annotated[str, typer.Argument(help="daemon, observer or controller.")],
    device: Annotated[int, typer.Option(help="With daemon: the device whose daemon to ask.")] = 0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 3.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON (\"schema\": 1).")] = False,
) -> None:
    """Ask one service whether it serves now: exit 0 when it answered, 1 with one line when
    not. The daemon must answer a ping, the observer publish a snapshot, the controller a
    report. Containers' readiness and liveness probes run it (docs/kubernetes.md).

    Examples:
      flexnpu service probe daemon --device 0
      flexnpu service probe observer --timeout 5
      flexnpu service probe controller --json
    """
    from flexnpu.service import probe as pr

    from flexnpu.cliargs import check_at_least, check_positive, fail

    check_positive("service probe", "--timeout", timeout, most=600, unit=" s")
    check_at_least("service probe", "--device", device, 0, 63)
    if service not in pr.SERVICES:
        fail("service probe", f"the service is one of {', '.join(pr.SERVICES)}, not {service!r}")
    try:
        if service == "daemon":
            r = pr.daemon(device, timeout_s=timeout)
        elif service == "observer":
            r = pr.observer(timeout_s=timeout)
        else:
            r = pr.controller(timeout_s=timeout)
    except pr.ProbeFailed as e:
        if json_out:
            typer.echo(json.dumps({"schema": 1, "service": service, "ok": False, "error": str(e)}))
        err.print(f"flexnpu service probe {service}: {e}")
        raise typer.Exit(1)
    typer.echo(json.dumps(r.to_json()) if json_out else f"{service}: ok ({r.detail})")
