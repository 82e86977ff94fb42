"""Checks of command-line values shared by the `flexnpu` commands, each failing with one line
that names the value, what it must be and what was given (DESIGN: bad input gets a one-line
error that says what to do and a non-zero exit).

Also the guard of the command's standard output (a full device, a closed pipe or a closed
descriptor ends the command with one line instead of a traceback), and NumberArgs, the command class for commands with numeric positional arguments: click
reads a negative number such as `-1` as an option and says "No such option: -1", which
hides the real mistake; with it, `-1` reaches the command's own check ("count must be at
least 1, not -1").
"""

from __future__ import annotations

import errno
import io
import math
import os
import re
import stat
import sys
from pathlib import Path
from typing import NoReturn

import typer
from typer.core import TyperCommand

NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(nan|inf|infinity)$", re.IGNORECASE)
EXIT_USAGE = 2
MAX_INTERVAL_S = 86400.0  # a day: longer is a typo, and time.sleep overflows on huge values


def say(line: str) -> None:
    """One line on stderr, unless stderr itself is gone (a terminal that hung up, a closed
    descriptor): the exit code still tells."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def fail(cmd: str, message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Prints `flexnpu CMD: MESSAGE` on stderr and exits with code."""
    print(f"flexnpu {cmd}: {message}", file=sys.stderr)
    raise typer.Exit(code)


def check_positive(cmd: str, name: str, value: float | None, most: float | None = None,
                   unit: str = "", least: float | None = None) -> None:
    """value (unless None) must be finite, above 0 (at least `least` when given) and at most
    `most`. Every float option goes through this or check_range: NaN passes every comparison
    but `!=`, so an unchecked one slips past `value <= 0` and fails later, far from its cause."""
    if value is None:
        return
    if (not math.isfinite(value) or value <= 0 or (most is not None and value > most)
            or (least is not None and value < least)):
        low = f"at least {least:g}{unit}" if least is not None else "a number above 0"
        limit = f" and at most {most:.12g}{unit}" if most is not None else ""
        fail(cmd, f"{name} must be {low}{limit}, not {value:g}")


def check_range(cmd: str, name: str, value: float | None, least: float, most: float, unit: str = "") -> None:
    """value (unless None) must be finite and in [least, most] (for options where 0 means none)."""
    if value is None:
        return
    if not (math.isfinite(value) and least <= value <= most):
        fail(cmd, f"{name} must be a number from {least:g} to {most:.12g}{unit}, not {value:g}")


_SIZE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])i?)?b?$", re.IGNORECASE)
_UNITS = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MAX_SIZE = 1.8e19  # what the shim's 64-bit counters hold (fx_parse_size)


def size_bytes(name: str, text: str) -> int:
    """Bytes in a size such as 8G, 512MiB, 1.5g or 4096 (binary units, as the shim reads
    FLEXNPU_MEM_QUOTA); ValueError naming `name` unless it is at least one byte: the shim
    reads a size that rounds down to 0 as no limit at all."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"{name} takes a size such as 8G or 512MiB, not {text!r}")
    size = float(m.group(1)) * _UNITS[m.group(2) and m.group(2).lower()]
    if not 1 <= size < MAX_SIZE:
        raise ValueError(f"{name} must be at least 1 byte and below 16 EiB, not {text.strip()!r}")
    return int(size)


def parse_size(cmd: str, name: str, text: str) -> int:
    """size_bytes, failing the command (exit 2) with its message."""
    try:
        return size_bytes(name, text)
    except ValueError as e:
        fail(cmd, str(e))


_KINDS = {stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
          stat.S_ISBLK: "a block device"}


def output_file_problem(path: Path) -> str | None:
    """Why a command could not write its results at path (None: it can), checked before any
    work so a typo costs nothing: it must be a regular file, or a new name in a directory this
    user may write. A FIFO would block the command until someone reads it; a device, a socket
    or a kernel file (/proc, /sys) is no place for results."""
    if str(path) == "":
        return "is empty; give a file name"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        return f"{e.strerror}; give another path"
    if st is not None and stat.S_ISDIR(st.st_mode):
        return "is a directory; give a file name"
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _KINDS.items() if test(st.st_mode)), "not a regular file")
        return f"is {kind}, not a regular file; give a file name"
    if _kernel_path(path):
        return "is a kernel file (/proc, /sys), not one for results; give another path"
    parent = path.parent
    if not parent.is_dir():
        return f"{parent} is not a directory; create it first or give another path"
    if not os.access(parent, os.W_OK | os.X_OK) or (st is not None and not os.access(path, os.W_OK)):
        return "permission denied; give a path you can write"
    return None


def output_dir_problem(path: Path) -> str | None:
    """Why a command could not write its result files into the directory path (None: it can)."""
    if not path.is_dir():
        return "is not a directory"
    if _kernel_path(path):
        return "is a kernel directory (/proc, /sys), not one for results; give another"
    if not os.access(path, os.W_OK | os.X_OK):
        return "permission denied; give a directory you can write"
    return None


def _kernel_path(path: Path) -> bool:
    real = os.path.realpath(path)
    return any(real == top or real.startswith(top + "/") for top in ("/proc", "/sys"))


def check_output_file(cmd: str, name: str, path: Path | None) -> None:
    """output_file_problem, failing the command (exit 2) with `NAME PATH: problem`."""
    problem = None if path is None else output_file_problem(path)
    if problem:
        fail(cmd, f"{name} {path}: {problem}")


def check_output_dir(cmd: str, name: str, path: Path | None) -> None:
    """output_dir_problem, failing the command (exit 2) with `NAME PATH: problem`."""
    problem = None if path is None else output_dir_problem(path)
    if problem:
        fail(cmd, f"{name} {path}: {problem}")


class OutputError(OSError):
    """Standard output cannot be written (a full device, a closed pipe, a closed descriptor).
    Not a BrokenPipeError on purpose: rich swallows that one and exits 1 without a word."""

    def __str__(self) -> str:
        return self.strerror or "cannot write to standard output"


class _GuardedStdout(io.RawIOBase):
    """fd 1 for the TextIOWrapper that becomes sys.stdout. The first failed write raises
    OutputError and is kept in `failed`; later writes are dropped, so a command that reported
    the failure itself is not made to report it again by every print after it."""

    def __init__(self, fd: int | None) -> None:
        super().__init__()
        self.fd = fd  # None: fd 1 was closed
        self.failed: OutputError | None = None

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return 1

    def isatty(self) -> bool:
        return self.fd is not None and os.isatty(self.fd)

    def write(self, b) -> int:  # type: ignore[no-untyped-def, override]
        if self.failed is not None or not len(b):
            return len(b)
        try:
            if self.fd is None:
                raise OSError(errno.EBADF, "it is closed")
            return os.write(self.fd, b)
        except InterruptedError:
            return 0  # BufferedWriter tries again
        except OSError as e:
            self.failed = OutputError(e.errno, f"cannot write to standard output: {e.strerror}")
            raise self.failed from None


def guard_stdout() -> _GuardedStdout:
    """Makes every write to stdout (print, typer.echo, rich) raise OutputError on failure, so
    one handler at the top turns it into one line on stderr. A closed fd 1 gets /dev/null in
    its place, so that no socket or file opened later takes fd 1 and receives the output."""
    old = sys.stdout
    try:
        os.fstat(1)
        raw = _GuardedStdout(1)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
        if fd != 1:
            os.dup2(fd, 1)
            os.close(fd)
        raw = _GuardedStdout(None)
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(raw), encoding=getattr(old, "encoding", None) or "utf-8",
                                  errors=getattr(old, "errors", None) or "strict", line_buffering=raw.isatty())
    return raw


def drop_stdout() -> None:
    """After OutputError: what is still buffered can never be written; drop it, so the flush
    at interpreter exit does not fail again."""
    sys.stdout = open(os.devnull, "w")


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
