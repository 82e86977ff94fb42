"""`flexnpu controller`.

Exit codes: 0 stopped by SIGTERM/SIGINT (settings released), 2 a bad configuration or
option (one line naming the key), 1 anything else that stops it from starting.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from flexnpu import logs, paths, rundir, systemd
from flexnpu.pidlock import AlreadyRunning, PidLock
from flexnpu.remote.cliopts import Authorized, PublishTcp, ServerKey


def _node_lock() -> PidLock:
    """One controller per node ($RUNTIME_DIR/controller.lock): a second would take over
    controller.sock and fight the first over every gate."""
    rdir = paths.runtime_dir()
    try:
        return PidLock(rdir / "controller.lock").acquire()
    except AlreadyRunning as e:
        who = f"pid {e.pid}" if e.pid else f"the process holding {e.path}"
        print(f"flexnpu controller: a controller is already running on this node ({who}); one per node: "
              "stop it first, or follow its decisions with `flexnpu top`", file=sys.stderr)
    except rundir.RuntimeDirError as e:
        print(f"flexnpu controller: {e}", file=sys.stderr)
    except OSError as e:
        print(f"flexnpu controller: cannot write in the runtime dir {rdir}: {e.strerror}; run it as root "
              "(sudo) or as the flexnpu service user, or set FLEXNPU_RUNTIME_DIR to a directory you own",
              file=sys.stderr)
    raise typer.Exit(1)


def controller_command(
    config: Annotated[Optional[Path], typer.Option(
        "--config", help=f"TOML configuration (default {paths.DEFAULT_CONFIG}, or $FLEXNPU_CONFIG; a missing "
                         "default file is fine, a missing --config file is an error; a regular file of "
                         "UTF-8 TOML, at most 1 MiB).", metavar="FILE")] = None,
    policy: Annotated[Optional[str], typer.Option(help="passthrough, static-split or flexpd "
                                                       "(key controller.policy).")] = None,
    tick_ms: Annotated[Optional[float], typer.Option(help="Milliseconds between decisions "
                                                          "(key controller.tick_ms).")] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="Print the effective configuration "
                                                                      "(TOML) and exit.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print each report as a JSON line.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
    publish_tcp: PublishTcp = None,
    key: ServerKey = None,
    authorized: Authorized = None,
) -> None:
    """Decide when each process may dispatch: read the observer's snapshots, set every
    device's gates through its daemon with a policy, and publish each decision and its reason
    on ipc://$FLEXNPU_RUNTIME_DIR/controller.sock. SIGTERM/SIGINT open every gate it set.

    A role declared with `flexnpu run --role` counts only if the
    configuration's roles table lets its user declare it (no list: anyone
    may), and while the observed operators do not contradict it for longer
    than its distrust_after_ms (2 s); --print-config shows the table.

    Examples:
      flexnpu controller
      flexnpu controller --policy static-split --json
      flexnpu controller --config my.toml --print-config > effective.toml
      flexnpu controller --publish-tcp 10.0.0.1:7782   # CURVE; see flexnpu keys --help
    """
    from flexnpu.control import config as cfgmod

    try:
        required = config is not None
        cfg = cfgmod.load(config if required else paths.config_file(), required,
                          {"policy": policy, "tick_ms": tick_ms})
    except cfgmod.ConfigError as e:
        print(f"flexnpu controller: {e}", file=sys.stderr)
        raise typer.Exit(2)
    if print_config:
        sys.stdout.write(cfgmod.to_toml(cfg))
        return
    from flexnpu.remote.cliopts import resolve

    p = cfg.publish
    tcp = resolve("controller", publish_tcp, key, authorized, p.controller_tcp, p.secret_key, p.authorized_dir)

    from flexnpu.control.controller import Controller

    logs.setup(verbose)
    on_report = None
    if json_out:
        def on_report(rep) -> None:
            sys.stdout.write(rep.to_json().decode() + "\n")
            sys.stdout.flush()
    lock = _node_lock()
    try:
        ctl = Controller(cfg, on_report=on_report, tcp=tcp)
    except Exception as e:  # zmq.ZMQError (the socket), OSError: say it in one line
        lock.release()
        print(f"flexnpu controller: cannot start: {e}", file=sys.stderr)
        raise typer.Exit(1)

    def stop(signum: int, _frame: object) -> None:
        ctl.request_stop()  # not stop_flag.set(): its lock may be held by the wait this interrupts

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    c = cfg.controller

    def ready() -> None:
        systemd.notify("READY=1", f"STATUS=policy {c.policy}, tick {c.tick_ms:g} ms, "
                                  f"{len(ctl.links)} devices")

    import logging

    logging.getLogger("flexnpu.controller").info("policy %s, tick %g ms, lease %g ms, runtime dir %s",
                                                 c.policy, c.tick_ms, c.lease_ms, ctl.rdir)
    try:
        ctl.run(ready)
    finally:
        systemd.notify("STOPPING=1")
        ctl.close()
        lock.release()
