"""`flexnpu attach` and `flexnpu observe`.

Exit codes: 0 done (also after Ctrl-C), 2 bad usage, 3 no such process, 4 no runtime
library mapped, 5 missing privileges, 6 BPF unavailable, 7 bcc missing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from flexnpu import logs
from flexnpu.cliargs import (MAX_INTERVAL_S, check_at_least, check_pid, check_positive, fail,
                             output_file_problem)
from flexnpu.observe.errors import ObserveError
from flexnpu.remote.cliopts import Authorized, PublishTcp, ServerKey

if TYPE_CHECKING:
    from flexnpu.remote.curve import PublishTarget




def _tcp_target(publish_tcp: str | None, key: Path | None, authorized: Path | None,
                config: Path | None) -> "PublishTarget | None":
    """Where to publish on TCP as well: the options over the configuration's [publish]."""
    from flexnpu import paths
    from flexnpu.control import config as cfgmod
    from flexnpu.remote.cliopts import resolve

    try:
        cfg = cfgmod.load(config if config is not None else paths.config_file(), config is not None)
    except cfgmod.ConfigError as e:
        fail("observe", str(e))
    p = cfg.publish
    return resolve("observe", publish_tcp, key, authorized, p.observe_tcp, p.secret_key, p.authorized_dir)


def _fail(cmd: str, e: ObserveError) -> None:
    print(f"flexnpu {cmd}: {e}", file=sys.stderr)
    raise typer.Exit(e.exit_code)


def trace_problem(path: Path) -> str | None:
    """Why a trace file cannot be written at path (None: it can), checked before any probe
    is loaded so a typo costs nothing."""
    return output_file_problem(path)


def metrics_address(option: str | None, config: Path | None = None) -> tuple[str, int] | None:
    """Where to serve metrics: --metrics, else [observe] metrics of --config or the node's
    configuration (absent default file: none); a bad address or file exits 2 with one line."""
    from flexnpu import paths
    from flexnpu.control import config as cfgmod
    from flexnpu.observe.metrics import AddressError, parse_address

    text = option
    if text is None:
        try:
            text = cfgmod.load(config if config is not None else paths.config_file(),
                               required=config is not None).observe.metrics
        except cfgmod.ConfigError as e:
            fail("observe", str(e))
        where = f"[observe] metrics in {config if config is not None else paths.config_file()}"
    else:
        where = "--metrics"
    if not text:
        return None
    try:
        return parse_address(text)
    except AddressError as e:
        fail("observe", f"{where}: {e}")
    return None


def attach_command(
    pid: Annotated[int, typer.Argument(help="Process to observe.")],
    interval: Annotated[float, typer.Argument(help="Seconds between lines.")] = 1.0,
    count: Annotated[Optional[int], typer.Argument(help="Number of lines, then exit.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per interval.")] = False,
    trace: Annotated[Optional[Path], typer.Option(
        help="Also write a timeline of every call to FILE (Chrome trace-event JSON; open it at "
             "ui.perfetto.dev).", metavar="FILE")] = None,
    ebpf: Annotated[bool, typer.Option("--ebpf", hidden=True, help="Print the BPF program and exit.")] = False,
) -> None:
    """Probe a running process's device runtime and print what it does, one line per interval:
    launches/s, H2D/D2H/D2D MB/s, device memory, time blocked in syncs, phase.

    Examples:
      flexnpu attach 1234            # a line a second until Ctrl-C
      flexnpu attach 1234 0.5 10     # ten lines, half a second apart
      flexnpu attach 1234 --json --trace run.json
    """
    from flexnpu.observe import attach

    check_pid("attach", "PID", pid)
    if ebpf:
        print(attach.ebpf_text(pid, trace is not None))
        return
    check_positive("attach", "interval", interval, most=MAX_INTERVAL_S, unit=" s")
    check_at_least("attach", "count", count, 1)
    if trace is not None:
        problem = trace_problem(trace)
        if problem:
            fail("attach", f"--trace {trace}: {problem}")
    try:
        attach.run(pid, interval, count, json_out, trace)
    except ObserveError as e:
        _fail("attach", e)
    except OSError as e:  # the trace file, made unwritable since the check above
        fail("attach", f"{e.filename or 'I/O'}: {e.strerror or e}", 1)
    except KeyboardInterrupt:
        pass


def observe_command(
    interval_ms: Annotated[float, typer.Option(help="Milliseconds between snapshots.")] = 100.0,
    source: Annotated[str, typer.Option(
        help="auto (BPF, else the shim's counters), bpf (fail without BPF) or shim.")] = "auto",
    library: Annotated[Optional[list[str]], typer.Option(
        help="Also attach to this runtime library file at start (repeatable).")] = None,
    count: Annotated[Optional[int], typer.Option(help="Stop after this many snapshots.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Also print each snapshot on stdout.")] = False,
    pid: Annotated[int, typer.Option("-p", "--pid", help="Observe only this process.")] = 0,
    metrics: Annotated[Optional[str], typer.Option(
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to 127.0.0.1; "
             "0.0.0.0 for every interface). Default: \\[observe] metrics in flexnpu.toml, else none.",
        metavar="HOST:PORT")] = None,
    ebpf: Annotated[bool, typer.Option("--ebpf", hidden=True, help="Print the BPF program and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
    publish_tcp: PublishTcp = None,
    key: ServerKey = None,
    authorized: Authorized = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", metavar="FILE", help="TOML configuration, for its [observe] and [publish] sections (default "
                                         "/etc/flexnpu/flexnpu.toml or $FLEXNPU_CONFIG).")] = None,
) -> None:
    """Watch every process on this node that uses a device runtime, and publish a snapshot per
    interval on ipc://$FLEXNPU_RUNTIME_DIR/observe.sock (zmq PUB, JSON with "schema": 1),
    and with --publish-tcp (or [publish] observe_tcp) on TCP too, CURVE only.

    Examples:
      flexnpu observe
      flexnpu observe --interval-ms 500 --json
      flexnpu observe -p 1234 --json
      flexnpu observe --metrics 127.0.0.1:9400   # then: curl -s 127.0.0.1:9400/metrics
      flexnpu observe --publish-tcp 10.0.0.1:7781   # keys: flexnpu keys --help
    """
    from flexnpu.observe.probegen import ProbeConfig, build

    if pid:
        check_pid("observe", "-p", pid)
    if ebpf:
        print(build(ProbeConfig(tgid=pid)).final())
        return
    check_positive("observe", "--interval-ms", interval_ms, most=MAX_INTERVAL_S * 1000, unit=" ms")
    check_at_least("observe", "--count", count, 1)
    if source not in ("auto", "bpf", "shim"):
        fail("observe", f"--source takes auto, bpf or shim, not {source!r}")
    address = metrics_address(metrics, config)
    from flexnpu.observe import node, procs

    if pid and not procs.exists(pid):
        fail("observe", f"no process with pid {pid}; give -p the pid of a running process", 3)
    tcp = _tcp_target(publish_tcp, key, authorized, config)
    logs.setup(verbose)

    try:
        node.serve(interval_ms / 1000, source, tuple(library or ()), count, json_out, pid=pid,
                   metrics=address, tcp=tcp)
    except ObserveError as e:
        _fail("observe", e)
    except KeyboardInterrupt:
        pass
