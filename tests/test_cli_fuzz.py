"""Fuzzes every `flexnpu` subcommand's options and arguments with hypothesis: values drawn by
each parameter's type plus hostile strings (negative numbers, -0, NaN, inf, 1e-300, 1e300,
huge integers, empty, unicode) and odd files (missing, a directory, /etc/passwd, a FIFO, a
file that is not UTF-8, /proc files, device files). Whatever it is given, a command may exit
non-zero with a message, but never with an uncaught exception, never with an exit code
outside the documented ones (EXIT_CODES), and never waits (every example runs under a timer:
a FIFO opened for reading or writing would block forever).

A second test runs each command as a process with its stdout a full device (/dev/full):
it ends with one line on stderr, no traceback, an exit code from the same set.

The commands run in this process through typer's CliRunner, with FLEXNPU_RUNTIME_DIR a fresh
temporary directory where nothing runs, so every command that talks to a service fails fast.
Left out, because they would start a long-running service or a real program rather than
return: `daemon` (serves until SIGTERM), `emu start` (starts the device server), `demo` and
`bench` (run workloads for minutes), `service install|uninstall` (write unit files and call
systemctl on this machine), `controller` without --print-config (serves until SIGTERM),
`observe` without --count or with a large one, or with a BPF source (every snapshot would
wait or compile BPF: it gets --count 1 first and draws --count, --interval-ms and --source
from small valid values and invalid ones), `top`'s live mode (never reached: CliRunner's
stdout is no terminal) and `run` of a real program (its command is drawn from names that
cannot run; os.execve is replaced so one that could would fail the test instead of
replacing pytest).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, Callable

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from flexnpu.cli import app

ROOT = typer.main.get_command(app)
EXCLUDED = {"daemon", "emu start", "demo", "bench pd", "service install", "service uninstall"}
FEW = {"doctor": 4}  # a real uprobe check each: about a second
EXAMPLES = 25

# what the commands may exit with: 0, 1 (failed), 2 (bad usage), 3-7 (observe's, docs/observe.md),
# 126/127 (`run`: not executable / not found, as a shell says), 130 (interrupted)
EXIT_CODES = {0, 1, 2, 3, 4, 5, 6, 7, 126, 127, 130}
TIMEOUT_S = 20  # one example; a command waiting on a FIFO or a socket would pass it

_NUMBERS = ["-1", "-0", "-0.0", "0", "-1.5", "nan", "NaN", "-nan", "inf", "-inf", "1e999", "-1e999", "1e308",
            "1e300", "1e-300", "5e-324", "-1e-300",
            str(2**31), str(2**63), str(2**64 + 1), str(10**30), "-" + str(10**30), "0x10", "1_000", "٣"]
_STRINGS = ["", " ", "-", "--", "é✓💥", "ü" * 300, "a,b", ",", "1,1", "-1,2", "0,", "open ", "CLOSED"]


def _odd_files(tmp: Path) -> list[str]:
    """A FIFO and a file that is not UTF-8 in tmp (made once per tmp), and kernel files."""
    fifo, latin = tmp / "fifo", tmp / "latin1.toml"
    if tmp.is_dir() and not fifo.exists():
        os.mkfifo(fifo)
        latin.write_bytes(b"[controller]\npolicy = \"\xe9t\xe9\"\n\xff\xfe\n")
    return [str(fifo), str(latin), "/proc/self/status", "/proc/version", "/sys/kernel/notes", "/dev/zero",
            "/dev/full", "/dev/urandom"]


def _paths(tmp: Path) -> list[str]:
    return ["/nonexistent/dir/f.json", str(tmp), "/etc/passwd", "/", "/proc/1/maps", "", str(tmp / "new.json"),
            str(tmp / "é✓.toml"), "/dev/null", str(tmp / "nodir" / "x"), *_odd_files(tmp)]


HOSTILE = st.sampled_from(_NUMBERS + _STRINGS)
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)


def leaves(cmd: Any = ROOT, path: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """Every runnable command of the tree, by its space-separated name."""
    subs = getattr(cmd, "commands", None)
    if subs:
        return [leaf for name, sub in sorted(subs.items()) for leaf in leaves(sub, (*path, name))]
    return [(" ".join(path), cmd)]


def _base_type(param: Any) -> type:
    ann = param.type_descriptor.annotation
    while typing.get_origin(ann) in (typing.Union, list, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        ann = args[0]
    return ann


def value_strategy(param: Any, tmp: Path) -> st.SearchStrategy[str]:
    kind = _base_type(param)
    if kind is int:
        typed = st.one_of(st.integers(-70, 70), st.integers()).map(str)
    elif kind is float:
        typed = st.floats(allow_nan=True, allow_infinity=True).map(repr)
    elif kind is Path:
        typed = st.sampled_from(_paths(tmp))
    else:
        typed = TEXT
    # mostly well-typed, so that a command line often parses and reaches the command's own checks
    return st.one_of(typed, typed, typed, HOSTILE, st.sampled_from(_paths(tmp)))


# Overrides that keep a command from running long (see the module docstring); each still
# includes invalid values.
def _observe(tmp: Path) -> dict[str, st.SearchStrategy[str]]:
    return {
        "count": st.sampled_from(["1", "2", "0", "-1", str(-2**63), "nan", "1.5", "", "x", "-0"]),
        "interval_ms": st.sampled_from(["1", "5", "0", "-1", "nan", "inf", "-inf", "1e300", str(10**30), "x", ""]),
        "source": st.sampled_from(["shim", "", "BPF", "nope", "-1", "é✓"]),
        "pid": st.sampled_from(["0", str(os.getpid()), "999999", "-1", str(2**63), "nan", "x"]),
    }


def _attach(tmp: Path) -> dict[str, st.SearchStrategy[str]]:
    # a pid that maps no device runtime (this one), none at all, or not a pid: never one that
    # another test's program runs, which would attach probes for the whole interval
    return {"pid": st.sampled_from([str(os.getpid()), "999999", "0", "-1", str(2**31), str(2**63), "nan", "", "x"])}


def _run(tmp: Path) -> dict[str, st.SearchStrategy[str]]:
    names = st.one_of(st.sampled_from(["/etc/passwd", str(tmp), "/nonexistent/prog", "", ".", "..", "/"]),
                      TEXT.map(lambda s: "fx-no-such-" + s.replace("/", "")))
    return {"cmd": names}


OVERRIDES: dict[str, Callable[[Path], dict[str, st.SearchStrategy[str]]]] = {
    "observe": _observe, "attach": _attach, "run": _run}
FIRST = {"observe": ["--count", "1", "--source", "shim", "--interval-ms", "1"], "service probe": ["daemon"]}
LAST = {"controller": ["--print-config"]}


@st.composite
def command_line(draw: st.DrawFn, name: str, cmd: Any, tmp: Path) -> list[str]:
    over = OVERRIDES.get(name, lambda t: {})(tmp)
    opts: list[str] = []
    args: list[str] = []
    for p in cmd.params:
        values = over[p.name] if p.name in over else value_strategy(p, tmp)
        if p.param_type_name == "argument":
            if p.nargs == -1:
                args += draw(st.lists(values, min_size=0, max_size=3))
            elif draw(st.booleans()) or p.required:
                args.append(draw(values))
            continue
        if not draw(st.booleans()):
            continue
        flag = draw(st.sampled_from(p.opts))
        if getattr(p, "is_flag", False):
            opts.append(flag)
        else:
            for _ in range(draw(st.integers(1, 2)) if p.multiple else 1):
                opts += [flag, draw(values)]
    order = draw(st.sampled_from(["opts first", "args first"]))
    if name == "run":  # its program comes after --, as the help says
        line = [*opts, "--", *args] if args else opts
    else:
        line = [*opts, *args] if order == "opts first" else [*args, *opts]
    return [*name.split(), *FIRST.get(name, []), *line, *LAST.get(name, [])]


class WouldExec(Exception):
    pass


@pytest.fixture
def quiet_logs() -> Any:
    """Commands point the flexnpu logger at CliRunner's stream; put it back afterwards."""
    log = logging.getLogger("flexnpu")
    saved = log.handlers[:], log.level
    yield
    log.handlers[:], log.level = saved[0], saved[1]


COMMANDS = [(n, c) for n, c in leaves() if n not in EXCLUDED]


def test_the_tree_is_walked() -> None:
    names = {n for n, _ in leaves()}
    assert {"attach", "observe", "gate set", "run", "top", "emu status"} <= names
    assert EXCLUDED <= names, EXCLUDED - names  # an excluded command renamed: say so here


@pytest.mark.parametrize("name,cmd", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_no_traceback(name: str, cmd: Any, runtime_dir: Path, tmp_path: Path, quiet_logs: Any,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    def no_exec(*a: Any, **k: Any) -> None:
        raise WouldExec(f"`flexnpu run` would have run {a[0]!r}")

    monkeypatch.setattr(os, "execve", no_exec)
    log = logging.getLogger("flexnpu")
    runner = CliRunner()
    env = {"FLEXNPU_RUNTIME_DIR": str(runtime_dir), "COLUMNS": "80"}

    def too_long(signum: int, frame: Any) -> None:
        raise Hung(f"no answer in {TIMEOUT_S} s")

    @settings(max_examples=FEW.get(name, EXAMPLES), deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(argv=command_line(name, cmd, tmp_path))
    def check(argv: list[str]) -> None:
        log.handlers[:] = []  # a command's logs.setup() left it on the last run's closed stream
        old = signal.signal(signal.SIGALRM, too_long)
        signal.alarm(TIMEOUT_S)
        try:
            r = runner.invoke(app, argv, env=env)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise AssertionError(f"flexnpu {' '.join(map(repr, argv))} raised {r.exception!r}:\n{r.output}") \
                from r.exception
        assert "Traceback" not in r.output, (argv, r.output)
        assert r.exit_code in EXIT_CODES, (argv, r.exit_code, r.output)

    check()


class Hung(Exception):
    pass


FULL_EXAMPLES = 3  # a process each: about half a second


@pytest.mark.parametrize("name,cmd", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_stdout_on_a_full_device(name: str, cmd: Any, runtime_dir: Path, tmp_path: Path) -> None:
    """The command as a process, with stdout /dev/full: whatever it was about to print (a
    table, JSON, its help, an error) it ends without a traceback, with at most one line of
    its own on stderr about it, and an exit code from the documented set."""
    env = {**os.environ, "FLEXNPU_RUNTIME_DIR": str(runtime_dir), "COLUMNS": "80",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

    @settings(max_examples=FULL_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(argv=st.one_of(st.just([*name.split(), "--help"]), command_line(name, cmd, tmp_path)))
    def check(argv: list[str]) -> None:
        with open("/dev/full", "w") as full:
            r = subprocess.run([sys.executable, "-m", "flexnpu.cli", *argv], stdout=full, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True, env=env, timeout=TIMEOUT_S * 2)
        assert "Traceback" not in r.stderr, (argv, r.stderr)
        assert r.returncode in EXIT_CODES, (argv, r.returncode, r.stderr)
        said = [line for line in r.stderr.splitlines() if "standard output" in line]
        assert len(said) <= 1, (argv, r.stderr)
        if argv[-1] == "--help":
            assert r.returncode == 1 and said, (argv, r.returncode, r.stderr)

    check()


def _options(kind: type, commands: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    return [(n, p.opts[0]) for n, c in commands for p in c.params
            if p.param_type_name == "option" and _base_type(p) is kind]


ALL = leaves()
FLOAT_OPTIONS = _options(float, ALL)
PATH_OPTIONS = _options(Path, COMMANDS)


def _invoke(argv: list[str], runtime_dir: Path) -> Any:
    logging.getLogger("flexnpu").handlers[:] = []

    def too_long(signum: int, frame: Any) -> None:
        raise Hung(f"flexnpu {' '.join(argv)}: no answer in {TIMEOUT_S} s")

    old = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(TIMEOUT_S)
    try:
        r = CliRunner().invoke(app, argv, env={"FLEXNPU_RUNTIME_DIR": str(runtime_dir), "COLUMNS": "80"})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"flexnpu {' '.join(argv)} raised {r.exception!r}:\n{r.output}") from r.exception
    assert "Traceback" not in r.output and r.exit_code in EXIT_CODES, (argv, r.exit_code, r.output)
    return r


USAGE_EXIT = {"emu start": 1}  # its bad options exit 1 (tests/test_emu_cli.py, the emulator's checks)


def test_float_options_are_found() -> None:
    assert {("top", "--interval"), ("daemon", "--max-hold-ms"), ("demo", "--seconds")} <= set(FLOAT_OPTIONS)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
@pytest.mark.parametrize("name,opt", FLOAT_OPTIONS, ids=[f"{n} {o}" for n, o in FLOAT_OPTIONS])
def test_every_float_option_refuses_non_finite(name: str, opt: str, value: str, runtime_dir: Path,
                                               quiet_logs: Any) -> None:
    """Every command, the long-running ones too: NaN and infinity are a usage error before
    anything starts (NaN passes `<= 0` checks, infinity overflows sleeps and timestamps)."""
    argv = [*name.split(), *FIRST.get(name, []), opt, value, *LAST.get(name, [])]
    if name in ("gate set",):
        argv.append("4242")
    r = _invoke(argv, runtime_dir)
    assert r.exit_code == USAGE_EXIT.get(name, 2) and "must be" in r.output, (argv, r.output)


@pytest.mark.parametrize("value", ["-0", "0", "1e-300", "5e-324", "1e300", "-1e-300"])
@pytest.mark.parametrize("name,opt", [(n, o) for n, o in FLOAT_OPTIONS if n not in EXCLUDED],
                         ids=[f"{n} {o}" for n, o in FLOAT_OPTIONS if n not in EXCLUDED])
def test_every_float_option_with_absurd_numbers(name: str, opt: str, value: str, runtime_dir: Path,
                                                quiet_logs: Any) -> None:
    argv = [*name.split(), *FIRST.get(name, []), opt, value, *LAST.get(name, [])]
    if name in ("gate set",):
        argv.append("4242")
    _invoke(argv, runtime_dir)


@pytest.mark.parametrize("which", range(len(_odd_files(Path("/nonexistent")))))
@pytest.mark.parametrize("name,opt", PATH_OPTIONS, ids=[f"{n} {o}" for n, o in PATH_OPTIONS])
def test_every_path_option_with_odd_files(name: str, opt: str, which: int, runtime_dir: Path, tmp_path: Path,
                                          quiet_logs: Any) -> None:
    """A FIFO, a file that is not UTF-8, /proc and /sys files, device files: refused or used,
    never a wait or a traceback."""
    path = _odd_files(tmp_path)[which]
    argv = [*name.split(), *FIRST.get(name, []), opt, path, *LAST.get(name, [])]
    if name == "attach":
        argv.insert(1, str(os.getpid()))
    _invoke(argv, runtime_dir)
