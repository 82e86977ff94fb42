"""The `flexnpu top` command: the live screen, `--once` and `--json`.

The live screen reads keys from stdin in cbreak mode in a thread and redraws from the
sampler's newest Frame each interval or at once on a key; the terminal is restored on
every way out (q, Ctrl-C, SIGTERM, an exception).
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer

from flexnpu import paths
from flexnpu.cliargs import MAX_INTERVAL_S, check_positive, fail
from flexnpu.tui.model import Sampler, anything_running, refused_sources
from flexnpu.tui.view import ViewState, render

ONCE_WAIT_S = 2.0


class KeyReader:
    """Puts each key pressed on a terminal stdin into `keys`, with the terminal in cbreak
    mode (no echo, no line buffering; Ctrl-C still interrupts) until `close()`."""

    def __init__(self, fd: int) -> None:
        import termios
        import tty

        self.fd = fd
        self.keys: queue.Queue[str] = queue.Queue()
        self._saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flexnpu-top-keys", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.1)
                if not ready:
                    continue
                data = os.read(self.fd, 32)
            except OSError:
                return
            if not data:
                return
            for ch in data.decode(errors="ignore"):
                self.keys.put(ch)

    def close(self) -> None:
        import termios

        self._stop.set()
        self._thread.join(timeout=1)
        termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)


class _Terminated(Exception):
    """SIGTERM arrived: unwind so every finally restores the terminal."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def _keys_from(reader: KeyReader | None, timeout: float) -> Iterator[str]:
    """Keys pressed within timeout (at least one wait), then any already queued."""
    if reader is None:
        threading.Event().wait(timeout)
        return
    try:
        yield reader.keys.get(timeout=timeout)
    except queue.Empty:
        return
    while True:
        try:
            yield reader.keys.get_nowait()
        except queue.Empty:
            return


def _follow_terminal_size(console: object) -> None:
    """Size the console from the terminal itself: COLUMNS/LINES inherited from a parent
    (which rich prefers) are stale after a resize, or were another terminal's to begin with."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        return
    console.size = (size.columns, size.lines)  # type: ignore[attr-defined]


def run_live(sampler: Any, interval: float, draw: Callable[..., Any] = render) -> None:
    """The live screen of a Sampler (or a NodesSampler, with its own draw)."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console()
    view = ViewState()
    frozen = None
    reader = KeyReader(sys.stdin.fileno()) if sys.stdin.isatty() else None
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with Live(console=console, screen=True, auto_refresh=False, transient=True) as live:
            while True:
                _follow_terminal_size(console)
                frame = frozen if view.paused else sampler.frame()
                if frame is None:
                    shown = Text("flexnpu top: sampling...")
                else:
                    shown = draw(frame, view, width=console.width, height=console.height)
                live.update(shown, refresh=True)
                quit_now = False
                for key in _keys_from(reader, interval):
                    if key in ("q", "Q"):
                        quit_now = True
                    elif key in ("s", "S"):
                        view = view.next_sort()
                    elif key in ("p", "P", " "):
                        view = view.toggle_pause()
                        frozen = sampler.frame() if view.paused else None
                if quit_now:
                    return
                if sampler.error is not None:
                    raise RuntimeError(f"sampler failed: {sampler.error!r}")
    except (KeyboardInterrupt, _Terminated):
        return
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if reader is not None:
            reader.close()


def top_command(
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit (the default when stdout "
                                                        "is not a terminal).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print what one frame is drawn from (snapshot, "
                                           "controller report, daemon lists) as one JSON object.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between screen refreshes.")] = 0.5,
    nodes: Annotated[Optional[str], typer.Option(
        "--nodes", metavar="NODES",
        help="Watch these nodes instead of this one, NAME=HOST:PORT[/CTRLPORT],...: each node's observer at HOST:PORT (its --publish-tcp) "
             "and, after '/', its controller's port on the same host; over TCP with CURVE.")] = None,
    key: Annotated[Optional[Path], typer.Option(
        "--key", metavar="FILE", help="With --nodes: your secret key file (default: <keys dir>/client.key_secret; "
                                      "flexnpu keys new client).")] = None,
    server_key: Annotated[Optional[str], typer.Option(
        "--server-key", metavar="FILE|KEY",
        help="With --nodes: the public key every node must hold (default: each node's own, "
             "<keys dir>/servers/NAME.key, saved by `flexnpu keys trust NAME`).")] = None,
) -> None:
    """Watch every device, process, dispatch gate and controller decision.

    One panel per device: policy, prefill/decode/idle occupancy and its
    history, memory. A process table: phase, launches/s, H2D/D2H MB/s,
    device memory, time held at the gate, in-flight budget. The
    controller's latest decisions and their reasons.

    Keys: q quit, s cycle the sort (pid, launches/s, memory, phase),
    p pause. Without a controller it shows observation alone; without an
    observer, the daemons' clients.

    Examples:
      flexnpu top
      flexnpu top --interval 1
      flexnpu top --once
      flexnpu top --json | jq .snapshot.devices
      flexnpu top --nodes n1=10.0.0.1:7781/7782,n2=10.0.0.2:7781
      flexnpu top --nodes n1=10.0.0.1:7781 --once --json | jq '.nodes[].up'
    """
    check_positive("top", "--interval", interval, most=MAX_INTERVAL_S, unit=" s")
    if nodes is not None:
        _top_nodes(nodes, key, server_key, once, json_out, interval)
        return
    if key is not None or server_key is not None:
        fail("top", "--key and --server-key go with --nodes")
    rdir: Path = paths.runtime_dir()
    if not anything_running(rdir):
        print(f"flexnpu top: nothing to show: no observer ({paths.observe_socket(rdir)}) and no daemon "
              f"sockets in {rdir}; start `flexnpu observe` (as root) or `flexnpu daemon --device N`",
              file=sys.stderr)
        raise typer.Exit(1)
    refused = refused_sources(rdir)
    if refused:
        print(f"flexnpu top: permission denied: {', '.join(s.name for s in refused)} in {rdir} "
              f"{'is' if len(refused) == 1 else 'are'} for root and the {paths.CLIENT_GROUP} group; "
              f"ask an administrator to add you to it (usermod -aG {paths.CLIENT_GROUP} $USER)", file=sys.stderr)
        raise typer.Exit(1)
    show(Sampler(rdir, interval=interval), once, json_out, interval, render, ONCE_WAIT_S + 1.0)


def show(sampler: Any, once: bool, json_out: bool, interval: float, draw: Callable[..., Any],
         wait_s: float) -> None:
    """Starts the sampler and shows its frames: the live screen, or one frame (--once, --json,
    or stdout not a terminal) after at most wait_s; stops the sampler whatever happens."""
    sampler.start()
    try:
        if json_out or once or not sys.stdout.isatty():
            frame = sampler.wait_ready(wait_s)
            if frame is None or sampler.error is not None:
                print(f"flexnpu top: no frame: {sampler.error!r}", file=sys.stderr)
                raise typer.Exit(1)
            if json_out:
                print(json.dumps(frame.to_json()))
            else:
                from rich.console import Console

                console = Console()
                console.print(draw(frame, ViewState(), width=console.width))
            return
        run_live(sampler, interval, draw)
    finally:
        sampler.stop()


def _top_nodes(text: str, key: Path | None, server_key: str | None, once: bool, json_out: bool,
               interval: float) -> None:
    """`top --nodes`: every key checked before anything connects; one line and exit 2 if not."""
    from flexnpu.remote import keys
    from flexnpu.tui import nodes_view
    from flexnpu.tui.nodes import NodesSampler, parse_nodes, server_key_for

    try:
        specs = parse_nodes(text)
    except ValueError as e:
        fail("top", f"--nodes {e}")
    kdir = paths.keys_dir()
    try:
        client = keys.read_secret(key or keys.secret_path(kdir, keys.CLIENT_NAME))
        servers = {s.name: server_key_for(s.name, server_key, kdir) for s in specs}
    except keys.KeysError as e:
        hint = " (make one: flexnpu keys new client)" if key is None and "no such key file" in str(e) else ""
        fail("top", f"{e}{hint}")
    show(NodesSampler(specs, client, servers, interval=interval), once, json_out, interval, nodes_view.render,
         ONCE_WAIT_S + 2.0)
