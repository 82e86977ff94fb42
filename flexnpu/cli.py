"""The `flexnpu` command line: one Typer app per command group, composed here."""

from __future__ import annotations

import os
import signal
import sys

import typer

from flexnpu.cliargs import NumberArgs, OutputError, drop_stdout, guard_stdout, say
from flexnpu.emulator.cli import app as emu_app
from flexnpu.forward import cli as forward_cli

app = typer.Typer(
    name="flexnpu",
    help="Share AI accelerators between LLM serving processes: observe, gate and interleave "
    "prefill and decode on one device.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(emu_app, name="emu")
app.add_typer(forward_cli.gate_app, name="gate")
app.command("daemon")(forward_cli.daemon_command)
app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
    forward_cli.run_command
)


def _register_optional() -> None:
    """Command groups added by other parts of the package register themselves here."""
    from flexnpu import doctor
    from flexnpu.observe import cli as observe_cli

    app.command("doctor")(doctor.doctor_command)
    app.command("attach", cls=NumberArgs)(observe_cli.attach_command)
    app.command("observe")(observe_cli.observe_command)
    app.command("controller")(__import__("flexnpu.control.cli", fromlist=["controller_command"]).controller_command)
    app.command("top")(__import__("flexnpu.tui.cli", fromlist=["top_command"]).top_command)
    app.add_typer(__import__("flexnpu.service.cli", fromlist=["app"]).app, name="service")
    app.add_typer(__import__("flexnpu.bench.cli", fromlist=["app"]).app, name="bench")
    app.add_typer(__import__("flexnpu.remote.cli", fromlist=["app"]).app, name="keys")
    app.command("demo")(__import__("flexnpu.bench.demo", fromlist=["demo_command"]).demo_command)


_register_optional()


def _command_path(argv: list[str]) -> str:
    """`flexnpu gate list` from argv: the command words before the first option or argument."""
    cmd, words = typer.main.get_command(app), ["flexnpu"]
    for a in argv:
        sub = getattr(cmd, "commands", {}).get(a)
        if sub is None:
            break
        cmd = sub
        words.append(a)
    return " ".join(words)


def hangup_stops() -> None:
    """SIGHUP (the terminal closed, the ssh session dropped) stops every command the way its
    SIGTERM does: the daemon opens its gates, the observer and controller remove their sockets,
    `top` restores the terminal, a node owner stops what it started. A command with no SIGTERM
    handler dies of the SIGHUP as before; a SIGHUP ignored on the way in (nohup) stays ignored.
    Handlers end at exec, so `flexnpu run` and `emu start --foreground` hand the program the
    default."""
    if signal.getsignal(signal.SIGHUP) != signal.SIG_DFL:
        return

    def on_hangup(signum: int, frame: object) -> None:
        term = signal.getsignal(signal.SIGTERM)
        if callable(term):
            term(signum, frame)
            return
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGHUP)

    signal.signal(signal.SIGHUP, on_hangup)


def main() -> None:
    """The `flexnpu` entry point. Click's usage errors (a value of the wrong type, an unknown
    option, a missing argument) come out as one line, `flexnpu CMD: what is wrong; see
    `flexnpu CMD --help``, exit 2, instead of a usage block and a boxed message. Output that
    cannot be written (stdout a full device, a closed pipe or closed) ends the command with
    `flexnpu CMD: cannot write to standard output: WHY` and exit 1, whatever wrote it."""
    from typer._click import exceptions as click_errors  # the click typer ships and raises

    out = guard_stdout()
    hangup_stops()
    try:
        code = _run(click_errors)
        sys.stdout.flush()  # inside the guard: a failure here still gets its one line
    except OutputError:
        code = 0  # reported below
    if out.failed is not None and code == 0:  # a command that reported it itself exited non-zero
        drop_stdout()
        say(f"{_command_path(sys.argv[1:])}: {out.failed}")
        code = 1
    sys.exit(code)


def _run(click_errors) -> int:  # type: ignore[no-untyped-def]
    try:
        rv = app(standalone_mode=False, prog_name="flexnpu")
    except click_errors.NoArgsIsHelpError as e:
        e.show()
        return e.exit_code
    except click_errors.UsageError as e:
        where = e.ctx.command_path if e.ctx is not None else "flexnpu"
        say(f"{where}: {' '.join(e.format_message().split()).rstrip('.')}; see `{where} --help`")
        return e.exit_code
    except click_errors.ClickException as e:
        say(f"flexnpu: {' '.join(e.format_message().split()).rstrip('.')}")
        return e.exit_code
    except typer.Abort:
        say("flexnpu: aborted")
        return 1
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    main()
