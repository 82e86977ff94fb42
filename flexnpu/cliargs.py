"""Checks of command-line values shared by the `flexnpu` commands, each failing with one line
that names the value, what it must be and what was given (DESIGN: bad input gets a one-line
error that says what to do and a non-zero exit).

Also NumberArgs, the command class for commands with numeric positional arguments: click
reads a negative number such as `-1` as an option and says "No such option: -1", which
hides the real mistake; with it, `-1` reaches the command's own check ("count must be at
least 1, not -1").
"""

from __future__ import annotations

import math
import re
import sys
from typing import NoReturn

import typer
from typer.core import TyperCommand

NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(nan|inf|infinity)$", re.IGNORECASE)
EXIT_USAGE = 2


def fail(cmd: str, message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Prints `flexnpu CMD: MESSAGE` on stderr and exits with code."""
    print(f"flexnpu {cmd}: {message}", file=sys.stderr)
    raise typer.Exit(code)


def check_positive(cmd: str, name: str, value: float | None, most: float | None = None,
                   unit: str = "") -> None:
    """value (unless None) must be finite, above 0 and at most `most`."""
    if value is None:
        return
    if not math.isfinite(value) or value <= 0 or (most is not None and value > most):
        limit = f" and at most {most:.12g}{unit}" if most is not None else ""
        fail(cmd, f"{name} must be a number above 0{limit}, not {value:g}")


def check_at_least(cmd: str, name: str, value: int | None, least: int, most: int | None = None) -> None:
    """value (unless None) must be an integer in [least, most]."""
    if value is None:
        return
    if value < least:
        fail(cmd, f"{name} must be at least {least}, not {value}")
    if most is not None and value > most:
        fail(cmd, f"{name} must be at most {most}, not {value}")


def check_pid(cmd: str, name: str, value: int | None) -> None:
    """A process id: 1 up to what pid_t holds (a pid that runs no process is the command's to refuse)."""
    if value is not None and not 0 < value < 2**31:
        fail(cmd, f"{name} takes a process id (a number from 1 to {2**31 - 1}), not {value}")


def check_device(cmd: str, value: int) -> None:
    """A physical device id (0-63, as `flexnpu run --device` takes)."""
    if not 0 <= value < 64:
        fail(cmd, f"--device takes a physical device id from 0 to 63, not {value}")


class NumberArgs(TyperCommand):
    """A command whose positional arguments may be negative numbers: a `-1` that is no option
    of the command is passed on as an argument, so the command's own check can name it. Any
    other unknown option is still refused by click."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
        known = {o for p in self.get_params(ctx) for o in (*p.opts, *p.secondary_opts)}
        unknown = []
        for a in args:
            if a == "--":
                break
            if a.startswith("-") and len(a) > 1 and a.split("=", 1)[0] not in known:
                unknown.append(a)
        if unknown and all(NUMBER.match(a) for a in unknown):
            ctx.ignore_unknown_options = True
        return super().parse_args(ctx, args)
