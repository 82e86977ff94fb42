"""`flexnpu top --nodes`: two real nodes (two LocalNodes, each with its own emulator, daemon
and observer publishing on its own TCP port with CURVE; the first with a controller
publishing too) and a program under the shim on each. The sampled frame is rendered at a
fixed size and read as text; `--once --json` as a script reads it, with a node that is down
and one whose server key is not the trusted one; the live screen in tmux. And the refusals
of the command line."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from rich.console import Console

from flexnpu import paths
from flexnpu.bench.node import LocalNode
from flexnpu.remote import curve, keys
from flexnpu.tui import nodes_view
from flexnpu.tui.nodes import NodesFrame, NodesSampler, parse_nodes
from flexnpu.tui.view import ViewState
from remote_fixtures import Keyring, free_port, make_keyring
from test_daemon_fixtures import wait_for
from test_observe_fixtures import REPO, flexnpu_argv
from test_top_live import Tmux, tmux  # noqa: F401  (fixture by name)

TIMEOUT_S = 60


@dataclass
class TwoNodes:
    ring: Keyring
    a: LocalNode
    b: LocalNode
    a_port: int
    a_ctl_port: int
    b_port: int
    a_pid: int
    b_pid: int

    @property
    def spec(self) -> str:
        return f"n1=127.0.0.1:{self.a_port}/{self.a_ctl_port},n2=127.0.0.1:{self.b_port}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "FLEXNPU_KEYS_DIR": str(self.ring.dir), "COLUMNS": "120"}


@pytest.fixture(scope="module")
def two_nodes(acl_programs: dict[str, Path]) -> Iterator[TwoNodes]:
    d = Path(tempfile.mkdtemp(prefix="fxkeys-"))
    ring = make_keyring(d)
    for n in ("n1", "n2"):  # the client trusts both nodes' server key (one key pair serves both here)
        keys.add_public(keys.server_key_path(d, n), ring.server.public)
    keys.add_public(keys.server_key_path(d, "n3"), ring.impostor.public)  # a node we expect another key of
    exe, klib = str(acl_programs["engine_loop"]), str(paths.emulator_kernel_library())
    a_port, a_ctl, b_port = free_port(), free_port(), free_port()
    try:
        with LocalNode(observer="shim", policy="passthrough", observe_args=ring.publish_args(a_port),
                       controller_args=ring.publish_args(a_ctl)) as a, \
                LocalNode(observer="shim", observe_args=ring.publish_args(b_port)) as b:
            pa = a.spawn([exe, klib, "0", "2", "1.0", "--seconds", "120", "--gap-ms", "2"], role="decode")
            pb = b.spawn([exe, klib, "0", "8", "1.0", "--seconds", "120", "--gap-ms", "5"], role="prefill")
            yield TwoNodes(ring, a, b, a_port, a_ctl, b_port, pa.pid, pb.pid)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def sampled(t: TwoNodes, spec: str | None = None, client: keys.KeyPair | None = None) -> Any:
    specs = parse_nodes(spec or t.spec)
    servers = {s.name: keys.read_public(keys.server_key_path(t.ring.dir, s.name)).public for s in specs}
    return NodesSampler(specs, client or t.ring.client, servers, interval=0.1).start()


def draw(nf: NodesFrame, width: int = 120, height: int | None = 48) -> str:
    console = Console(width=width, height=48, record=True, color_system=None, file=io.StringIO())
    console.print(nodes_view.render(nf, ViewState(), width=width, height=height))
    return console.export_text()


def row(text: str, node: str, pid: int) -> str | None:
    return next((line for line in text.splitlines() if line.split()[:2] == [node, str(pid)]), None)


def test_two_nodes_rendered(two_nodes: TwoNodes) -> None:
    t = two_nodes
    s = sampled(t)
    try:
        def both() -> NodesFrame | None:
            nf = s.frame()
            if nf is None:
                return None
            procs = {n.name: {p.pid for p in n.frame.snapshot.processes} if n.frame.snapshot else set()
                     for n in nf.nodes}
            ok = t.a_pid in procs["n1"] and t.b_pid in procs["n2"] and nf.nodes[0].frame.report is not None
            return nf if ok else None

        nf = wait_for(both, 30, "both nodes' programs, and n1's controller report")
    finally:
        s.stop()
    text = draw(nf)
    lines = text.splitlines()
    assert lines[0].startswith("flexnpu top  nodes 2, up 2")
    n1 = next(line for line in lines if line.split()[:1] == ["n1"])
    n2 = next(line for line in lines if line.split()[:1] == ["n2"])
    assert f"127.0.0.1:{t.a_port}/{t.a_ctl_port}" in n1 and "ok" in n1.split() and "up" in n1.split()
    assert f"127.0.0.1:{t.b_port}" in n2 and n2.split()[3] == "-"  # n2: no controller asked for
    assert "n1 · NPU 0" in text and "n2 · NPU 0" in text
    assert "policy: passthrough" in text and "gates: as the controller set them" in text
    assert "gates: N/A (no controller subscribed for this node)" in text  # n2's panel
    head = next(line for line in lines if line.lstrip().startswith("NODE") and "PID" in line)
    assert head.split()[:3] == ["NODE", "PID", "DEV"]
    ra, rb = row(text, "n1", t.a_pid), row(text, "n2", t.b_pid)
    assert ra is not None and "engine_loop" in ra and "decode" in ra and "open p0" in ra, text
    assert rb is not None and "engine_loop" in rb and "prefill" in rb and rb.rstrip().endswith("N/A"), text
    assert row(text, "n2", t.a_pid) is None and row(text, "n1", t.b_pid) is None  # each where it runs
    assert max(len(line) for line in lines) <= 120


def _top(t: TwoNodes, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(flexnpu_argv("top", *args), capture_output=True, text=True, timeout=TIMEOUT_S, cwd=REPO,
                          stdin=subprocess.DEVNULL, env=t.env())


def test_once_json_with_a_node_down_and_an_impostor(two_nodes: TwoNodes) -> None:
    t = two_nodes
    down = free_port()
    spec = f"{t.spec},gone=127.0.0.1:{down},n3=127.0.0.1:{t.b_port}"
    keys.add_public(keys.server_key_path(t.ring.dir, "gone"), t.ring.server.public, force=True)

    def shown() -> dict | None:
        r = _top(t, "--nodes", spec, "--once", "--json")
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        by = {n["name"]: n for n in data["nodes"]}
        ok = any(p["pid"] == t.a_pid for p in by["n1"]["processes"]) and \
            any(p["pid"] == t.b_pid for p in by["n2"]["processes"])
        return data if ok else None

    data = wait_for(shown, 30, "both programs in --once --json", interval=0.2)
    assert data["schema"] == 1 and [n["name"] for n in data["nodes"]] == ["n1", "n2", "gone", "n3"]
    n1, n2, gone, n3 = data["nodes"]
    for n in (n1, n2):
        assert n["up"] is True and n["error"] is None and n["source"] == "shim"
        assert [d["device"] for d in n["devices"]] == [0]
    assert n1["endpoint"] == f"127.0.0.1:{t.a_port}" and n1["controller_endpoint"] == f"127.0.0.1:{t.a_ctl_port}"
    assert n1["controller"] == "ok" and n1["controller_report"]["policy"] == "passthrough"
    assert n2["controller"] == "none" and n2["controller_endpoint"] is None
    assert [p["pid"] for p in n2["processes"]] == [t.b_pid]
    assert gone["up"] is False and gone["observer"] == "down" and "nothing answers" in gone["error"]
    assert gone["devices"] == [] and gone["processes"] == []
    assert n3["up"] is False and n3["observer"] == curve.LINK_BAD_SERVER and n3["processes"] == []

    # a client whose key the nodes do not know: every node says so, and shows nothing
    r = _top(t, "--nodes", t.spec, "--json", "--key", str(keys.secret_path(t.ring.dir, "stranger")))
    assert r.returncode == 0, r.stderr
    for n in json.loads(r.stdout)["nodes"]:
        assert n["up"] is False and n["observer"] == "unauthorized" and n["processes"] == []
        assert "refused this client's key" in n["error"]
    # the same as text: the node table says why, nothing crashes
    r = _top(t, "--nodes", f"n1=127.0.0.1:{t.a_port},gone=127.0.0.1:{down}", "--once")
    assert r.returncode == 0, r.stderr
    assert "down: nothing answers at 127.0.0.1:" in r.stdout and "nodes 2, up 1" in r.stdout


def test_refusals_are_one_line(two_nodes: TwoNodes, tmp_path: Path) -> None:
    t = two_nodes
    cases = [
        (["--nodes", "n1"], "write each node as NAME=HOST:PORT"),
        (["--nodes", "n1=127.0.0.1"], "expected HOST:PORT"),
        (["--nodes", "n1=127.0.0.1:1/0"], "controller's port after '/'"),
        (["--nodes", "n1=127.0.0.1:1,n1=127.0.0.1:2"], "named twice"),
        (["--nodes", "../x=127.0.0.1:1"], "node name"),
        (["--nodes", "nobody=127.0.0.1:1"], "flexnpu keys trust nobody"),
        (["--nodes", "n1=127.0.0.1:1", "--key", str(tmp_path / "none")], "no such key file"),
        (["--key", str(keys.secret_path(t.ring.dir, "client"))], "--key and --server-key go with --nodes"),
    ]
    for args, want in cases:
        r = _top(t, *args, "--once")
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("flexnpu top: ") and want in lines[0], (args, r.stderr)
    env = {**t.env(), "FLEXNPU_KEYS_DIR": str(tmp_path / "empty")}
    r = subprocess.run(flexnpu_argv("top", "--nodes", "n1=127.0.0.1:1", "--once"), capture_output=True, text=True,
                       timeout=TIMEOUT_S, cwd=REPO, stdin=subprocess.DEVNULL, env=env)
    assert r.returncode == 2 and "make one: flexnpu keys new client" in r.stderr


def test_parse_nodes() -> None:
    (a, b, c) = parse_nodes("n1=10.0.0.1:7781/7782, n2=host-b:7781,v6=[::1]:7781/9")
    assert (a.name, str(a.endpoint), a.controller.port, a.controller.host) == ("n1", "10.0.0.1:7781", 7782, "10.0.0.1")
    assert b.controller is None and b.endpoint.host == "host-b"
    assert c.endpoint.zmq() == "tcp://[::1]:7781" and c.controller.zmq() == "tcp://[::1]:9"
    with pytest.raises(ValueError, match="no node given"):
        parse_nodes(" , ")


def test_live_screen_in_a_terminal(two_nodes: TwoNodes, tmux: Tmux, tmp_path: Path) -> None:  # noqa: F811
    t = two_nodes
    out = tmp_path / "top-exit"
    argv = " ".join(shlex.quote(a) for a in flexnpu_argv("top", "--nodes", t.spec, "--interval", "0.2"))
    tmux.start(f"cd {shlex.quote(str(REPO))} && env FLEXNPU_KEYS_DIR={shlex.quote(str(t.ring.dir))} {argv}; "
               f"echo rc=$? > {out}.tmp; stty -a >> {out}.tmp; mv {out}.tmp {out}")
    screen = wait_for(lambda: (s := tmux.screen()) and "n2 · NPU 0" in s and str(t.b_pid) in s and s, 30,
                      "the live screen showing both nodes")
    assert "nodes 2, up 2" in screen and "n1 · NPU 0" in screen
    assert max(len(line) for line in screen.splitlines()) == 120
    tmux.keys("s")
    wait_for(lambda: "sort launches (s)" in tmux.screen(), 10, "the sort to change")
    tmux.keys("q")
    wait_for(lambda: out.exists(), 15, "top to exit on q")
    result = out.read_text()
    assert result.startswith("rc=0")
    modes = result.split()
    assert "icanon" in modes and "echo" in modes, result
