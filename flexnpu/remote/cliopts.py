"""The options that put `flexnpu observe` and `flexnpu controller` on TCP, shared by both
commands, and how they combine with the configuration's [publish] section."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flexnpu.cliargs import fail
from flexnpu.remote import curve

PublishTcp = Annotated[Optional[str], typer.Option(
    "--publish-tcp", metavar="HOST:PORT",
    help="Also publish on TCP, CURVE only: subscribers need a key in the authorized dir and this "
         "node's public key (docs/multinode.md). Off by default.")]
ServerKey = Annotated[Optional[Path], typer.Option(
    "--key", metavar="FILE", help="This server's secret key file (default: <keys dir>/server.key_secret).")]
Authorized = Annotated[Optional[Path], typer.Option(
    "--authorized", metavar="DIR",
    help="Public keys of the clients that may subscribe over TCP (default: <keys dir>/authorized).")]


def resolve(cmd: str, tcp: str | None, key: Path | None, authorized: Path | None, cfg_tcp: str = "",
            cfg_key: str = "", cfg_authorized: str = "") -> curve.PublishTarget | None:
    """The TCP target (options over the configuration), checked; one line and exit 2 if it
    cannot be served. --key or --authorized without an endpoint is a mistake, said so."""
    endpoint = tcp if tcp is not None else cfg_tcp
    if not endpoint:
        if key is not None or authorized is not None:
            fail(cmd, "--key and --authorized go with --publish-tcp HOST:PORT (or [publish] in the configuration)")
        return None
    try:
        t = curve.target(endpoint, key or cfg_key or None, authorized or cfg_authorized or None)
    except ValueError as e:
        fail(cmd, f"--publish-tcp {e}")
    assert t is not None
    why = t.problem()
    if why:
        fail(cmd, f"cannot publish on {t.endpoint}: {why}")
    return t
