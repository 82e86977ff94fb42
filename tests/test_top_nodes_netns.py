"""`flexnpu top --nodes` across network namespaces: two LocalNodes, each in its own
namespace of a flexnpu.bench.netns.Topology, each observer publishing (CURVE) on its node's
own address on the shared link, and `top --nodes --once --json` run in a third namespace,
so every snapshot it shows crossed the link. The topology and the nodes are removed after,
also on failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from flexnpu import paths
from flexnpu.bench.node import LocalNode
from flexnpu.remote import keys
from remote_fixtures import make_keyring
from test_daemon_fixtures import wait_for
from test_observe_fixtures import REPO, flexnpu_argv

pytestmark = [
    pytest.mark.root_net,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make network namespaces"),
]

PORT = 7781


def test_top_nodes_across_namespaces(acl_programs: dict[str, Path]) -> None:
    from flexnpu.bench.netns import Topology

    d = Path(tempfile.mkdtemp(prefix="fxkeys-"))
    try:
        ring = make_keyring(d)
        for n in ("n0", "n1"):
            keys.add_public(keys.server_key_path(d, n), ring.server.public)
        exe, klib = str(acl_programs["engine_loop"]), str(paths.emulator_kernel_library())
        with Topology(nodes=3) as topo:
            args = [["--publish-tcp", f"{topo.addr(i)}:{PORT}", "--key", str(ring.server_secret),
                     "--authorized", str(ring.authorized)] for i in range(2)]
            with LocalNode(netns=topo.names[0], observer="shim", observe_args=args[0]) as a, \
                    LocalNode(netns=topo.names[1], observer="shim", observe_args=args[1]) as b:
                assert (a.host, b.host) == (topo.addr(0), topo.addr(1))
                pa = a.spawn([exe, klib, "0", "2", "1.0", "--seconds", "120", "--gap-ms", "2"], role="decode")
                pb = b.spawn([exe, klib, "0", "8", "1.0", "--seconds", "120", "--gap-ms", "5"], role="prefill")
                spec = f"n0={topo.addr(0)}:{PORT},n1={topo.addr(1)}:{PORT}"
                env = {**os.environ, "FLEXNPU_KEYS_DIR": str(d)}

                def shown() -> dict | None:
                    r = subprocess.run(topo.argv(2, flexnpu_argv("top", "--nodes", spec, "--once", "--json")),
                                       capture_output=True, text=True, timeout=60, cwd=REPO,
                                       stdin=subprocess.DEVNULL, env=env)
                    assert r.returncode == 0, r.stderr
                    data = json.loads(r.stdout)
                    pids = [{p["pid"] for p in n["processes"]} for n in data["nodes"]]
                    return data if pa.pid in pids[0] and pb.pid in pids[1] else None

                data = wait_for(shown, 60, "both nodes' programs, seen from a third namespace", interval=0.5)
                # the host's own namespace has no route to the link: the endpoints are the nodes' own
                r = subprocess.run(flexnpu_argv("top", "--nodes", spec, "--once", "--json"), capture_output=True,
                                   text=True, timeout=60, cwd=REPO, stdin=subprocess.DEVNULL, env=env)
        n0, n1 = data["nodes"]
        assert n0["up"] and n1["up"] and n0["endpoint"] == f"{topo.addr(0)}:{PORT}"
        assert [p["pid"] for p in n0["processes"]] == [pa.pid] and [p["pid"] for p in n1["processes"]] == [pb.pid]
        assert r.returncode == 0 and [n["up"] for n in json.loads(r.stdout)["nodes"]] == [False, False]
    finally:
        shutil.rmtree(d, ignore_errors=True)
