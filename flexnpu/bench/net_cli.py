"""`flexnpu bench net`: the network namespaces that benchmarks' topologies make
(flexnpu.bench.netns): list them, and remove those their owner left behind."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from flexnpu.bench import netns
from flexnpu.cliargs import fail

app = typer.Typer(help="Network namespaces of benchmark topologies (nodes joined by a shaped link).",
                  no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})

PrefixOpt = Annotated[str, typer.Option(help="Only names that start with this.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")]


def _check_prefix(cmd: str, prefix: str) -> None:
    if not prefix or "/" in prefix or len(prefix) > 64:
        fail(f"bench net {cmd}", f"--prefix must be a short name without '/', got {prefix!r}")


@app.command("clean")
def clean(prefix: PrefixOpt = netns.PREFIX, as_json: JsonOpt = False) -> None:
    """Remove what topologies left behind when their owner died (kill -9, a crash).

    Namespaces, their links, bridge and qdiscs, and delay-line processes go;
    those of a topology whose owner is still running are left alone. Needs root.

    Examples:
      sudo flexnpu bench net clean
      sudo flexnpu bench net clean --json
      sudo flexnpu bench net clean --prefix mytest-
    """
    _check_prefix("clean", prefix)
    try:
        removed = netns.cleanup_leftovers(prefix)
    except (netns.NetnsError, OSError) as e:  # no root, most often: not a usage error
        fail("bench net clean", str(e), code=1)
    if as_json:
        print(json.dumps({"schema": 1, "removed": removed}))
    elif removed:
        print(f"removed {len(removed)} network namespaces: {' '.join(removed)}")
    else:
        print("nothing to clean")


@app.command("list")
def list_command(prefix: PrefixOpt = netns.PREFIX, as_json: JsonOpt = False) -> None:
    """List benchmark topologies: owner pid (alive or dead), namespaces, link, delay.

    Examples:
      flexnpu bench net list
      flexnpu bench net list --json
    """
    _check_prefix("list", prefix)
    tops = netns.list_topologies(prefix)
    if as_json:
        print(json.dumps({"schema": 1, "topologies": tops}))
        return
    if not tops:
        print("no topologies")
    for t in tops:
        state = "alive" if t["alive"] else "dead"
        owner = "no owner recorded" if t["owner"] is None else f"owner {t['owner']} ({state})"
        link = t["link"] or {}
        shaped = f"{link.get('rate_gbit', '?')} Gbit/s, {link.get('delay_us', '?')} us ({t['delay']})" if link else ""
        print(f"{t['prefix'] or '-'}  {owner}  {' '.join(t['names']) or '(gone)'}  {shaped}".rstrip())
