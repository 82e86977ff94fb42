"""Nodes joined by a shaped network (flexnpu.bench.netns): the topology comes up, its nodes
reach each other only over the link, the configured delay and rate show in what TCP
measures, the kernel's counters count a known transfer, and everything it made is removed
on close, on an exception, on SIGTERM, and when its owner is killed outright (by the guard,
or by the next run, which says so), but never while its owner lives. LocalNode(netns=...)
runs a whole node inside one namespace, two at once.

Every test makes real namespaces, veths, a bridge and qdiscs: root (CAP_NET_ADMIN) only.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from flexnpu.bench import netprobe
from flexnpu.bench.guard import start_time
from flexnpu.bench.netns import (NETNS_DIR, STATE_DIR, LinkSpec, NetnsError, Topology, cleanup_leftovers,
                                 list_topologies, remove_namespaces)
from flexnpu.bench.node import LocalNode

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.root_net,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_NET_ADMIN) for network namespaces"),
]


def _prefix() -> str:
    return f"fxt-{secrets.token_hex(3)}-"


def _present(names: list[str]) -> list[str]:
    return [n for n in names if (NETNS_DIR / n).exists()]


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _in_node(topo: Topology, i: int, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(topo.argv(i, [sys.executable, "-c", code]), capture_output=True, text=True, timeout=30)


@pytest.fixture
def prefix() -> Iterator[str]:
    """A prefix of this test's own; whatever a failing test left under it is removed."""
    p = _prefix()
    yield p
    left = sorted(x.name for x in NETNS_DIR.glob(f"{p}*")) if NETNS_DIR.exists() else []
    remove_namespaces(left)
    for f in STATE_DIR.glob(f"{p}*"):
        f.unlink(missing_ok=True)
    assert not left, f"namespaces left behind: {left}"


# ---------------------------------------------------------------- the link


def test_linkspec_rejects_bad_figures() -> None:
    for bad in ({"rate_gbit": 0, "delay_us": 1}, {"rate_gbit": 1, "delay_us": -1}, {"rate_gbit": 1, "delay_us": 0,
                                                                                     "mtu": 100}):
        with pytest.raises(NetnsError):
            LinkSpec(**bad)


def test_not_root_is_one_line() -> None:
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                        sys.executable, "-m", "flexnpu.cli", "bench", "net", "clean"],
                       capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "need root" in r.stderr, r.stderr


def test_topology_up_nodes_reach_each_other_only_over_the_link() -> None:
    before = _root_links()
    with Topology(nodes=3, link=LinkSpec(1.0, 0)) as t:
        assert [t.addr(i) for i in range(3)] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
        assert all(n.startswith("fxn-") for n in t.names) and _present([*t.names, t.switch]) == [*t.names, t.switch]
        assert _root_links() == before  # nothing in the machine's own namespace
        r = _in_node(t, 0, "import socket; print(sorted(n for _, n in socket.if_nameindex()))")
        assert r.stdout.strip() == "['eth0', 'lo']", r.stderr
        # TCP over the link: 0 -> 2, and 2 -> 0
        assert netprobe.rtt(t, 0, 2, count=20)["count"] == 20
        assert netprobe.rtt(t, 2, 0, count=20)["count"] == 20
        # nothing but the link: no route off it (the machine's networks are unreachable)
        r = _in_node(t, 1, "import socket, errno\n"
                           "try:\n socket.create_connection(('192.0.2.1', 80), timeout=2)\n"
                           "except OSError as e: print(errno.errorcode.get(e.errno))")
        assert r.stdout.strip() == "ENETUNREACH", (r.stdout, r.stderr)
        names = [*t.names, t.switch]
    assert _present(names) == []


def test_delay_shows_in_rtt(prefix: str) -> None:
    with Topology(nodes=2, link=LinkSpec(1.0, 2000), prefix=prefix) as t:
        assert t.delay in ("netem", "relay")
        got = netprobe.rtt(t, 0, 1, count=30)
    # each direction is delayed once, by its sender's egress: 2 x 2 ms
    assert 4000 <= got["median_us"] < 12_000, got
    with Topology(nodes=2, link=LinkSpec(1.0, 0), prefix=_prefix()) as t:
        assert t.delay == "none"
        fast = netprobe.rtt(t, 0, 1, count=30)
    assert fast["median_us"] < 2000, fast


def test_rate_limits_throughput(prefix: str) -> None:
    with Topology(nodes=2, link=LinkSpec(0.2, 0), prefix=prefix) as t:
        slow = netprobe.throughput(t, 0, 1, seconds=1.5)
    assert 0.15 <= slow["gbit"] <= 0.21, slow
    with Topology(nodes=2, link=LinkSpec(2.0, 0), prefix=_prefix()) as t:
        fast = netprobe.throughput(t, 1, 0, seconds=1.0)
    assert fast["gbit"] > 2 * slow["gbit"], (slow, fast)


def test_link_bytes_counts_a_known_transfer(prefix: str) -> None:
    n = 5_000_011  # prime
    with Topology(nodes=2, link=LinkSpec(10.0, 0), prefix=prefix) as t:
        a0, b0 = t.link_bytes(0), t.link_bytes(1)
        got = netprobe.throughput(t, 0, 1, nbytes=n)
        a1, b1 = t.link_bytes(0), t.link_bytes(1)
    assert got["bytes"] == n
    sent, received = a1["tx_bytes"] - a0["tx_bytes"], b1["rx_bytes"] - b0["rx_bytes"]
    # the payload plus TCP/IP/Ethernet headers (a few %), and no more
    assert n < sent < n * 1.05 and n < received < n * 1.05, (sent, received)
    assert a1["tx_packets"] > a0["tx_packets"] and b1["rx_packets"] > b0["rx_packets"]


# ---------------------------------------------------------------- cleanup


def test_close_removes_everything(prefix: str) -> None:
    before = _root_links()
    t = Topology(nodes=2, link=LinkSpec(1.0, 0), prefix=prefix)
    names, guard, state = [*t.names, t.switch], t.guard_pid, STATE_DIR / f"{prefix}.json"
    assert _present(names) == names and state.exists() and start_time(guard) is not None
    t.close()
    t.close()  # idempotent
    assert _present(names) == [] and not state.exists() and _root_links() == before
    assert start_time(guard) is None


def test_exception_in_block_removes_everything(prefix: str) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with Topology(nodes=2, link=LinkSpec(1.0, 0), prefix=prefix) as t:
            names = [*t.names, t.switch]
            raise RuntimeError("boom")
    assert _present(names) == []


OWNER = """
import json, signal, sys
from flexnpu.bench.netns import LinkSpec, Topology
from flexnpu.bench.node import stop_signals
def on_term(sig, frame):
    raise SystemExit(143)
with stop_signals(on_term), Topology(2, LinkSpec(1.0, float(sys.argv[2])), prefix=sys.argv[1]) as t:
    print(json.dumps({"names": [*t.names, t.switch], "guard": t.guard_pid, "relay": t.relay_pid}), flush=True)
    sys.stdin.read()  # until the test closes it (or kills this process)
"""


def _owner(prefix: str, delay_us: float = 0) -> tuple[subprocess.Popen, dict]:
    p = subprocess.Popen([sys.executable, "-c", OWNER, prefix, str(delay_us)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ready, _, _ = select.select([p.stdout], [], [], 60)
    if not ready:  # a hung owner fails the test instead of hanging it (its guard cleans up)
        p.kill()
        p.wait(10)
        pytest.fail("the topology's owner did not come up in 60 s")
    line = p.stdout.readline()
    assert line, f"the owner exited {p.wait(5)}: {p.stderr.read()}"
    return p, json.loads(line)


def _wait_gone(names: list[str], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while _present(names) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _present(names)


def _reap(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(10)
    for f in (p.stdin, p.stdout, p.stderr):
        f.close()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 143), (signal.SIGINT, -signal.SIGINT)])
def test_signal_to_owner_unwinds(prefix: str, sig: int, code: int) -> None:
    p, info = _owner(prefix)
    try:
        os.kill(p.pid, sig)
        assert p.wait(15) == code
        assert _present(info["names"]) == []  # gone before the owner exited
    finally:
        _reap(p)


def test_owner_killed_guard_removes_topology(prefix: str) -> None:
    p, info = _owner(prefix, delay_us=1000)  # a delay line too, where the kernel has no netem
    try:
        assert _present(info["names"]) == info["names"]
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        assert _wait_gone(info["names"], 15) == []
        assert not (STATE_DIR / f"{prefix}.json").exists()
        if info["relay"]:
            assert start_time(info["relay"]) is None
    finally:
        _reap(p)


def test_owner_and_guard_killed_next_run_cleans_and_says_so(prefix: str, capfd: pytest.CaptureFixture) -> None:
    p, info = _owner(prefix)
    try:
        os.kill(info["guard"], signal.SIGKILL)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        time.sleep(0.3)
        assert _present(info["names"]) == info["names"]  # nobody removed them
        dead = [t for t in list_topologies(prefix) if t["prefix"] == prefix]
        assert len(dead) == 1 and dead[0]["alive"] is False and dead[0]["owner"] == p.pid
        capfd.readouterr()
        with Topology(nodes=2, link=LinkSpec(1.0, 0), prefix=prefix) as t:
            assert sorted(t.cleaned) == sorted(info["names"])
            assert _present([*t.names, t.switch]) == [*t.names, t.switch]  # the same names, made anew
        err = capfd.readouterr().err
        assert "left by a dead run" in err and info["names"][0] in err
    finally:
        _reap(p)


def test_cli_clean_removes_dead_leftovers(prefix: str) -> None:
    p, info = _owner(prefix)
    try:
        os.kill(info["guard"], signal.SIGKILL)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        r = subprocess.run([sys.executable, "-m", "flexnpu.cli", "bench", "net", "clean", "--prefix", prefix,
                            "--json"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert sorted(json.loads(r.stdout)["removed"]) == sorted(info["names"])
        assert _present(info["names"]) == []
        r = subprocess.run([sys.executable, "-m", "flexnpu.cli", "bench", "net", "clean", "--prefix", prefix],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "nothing to clean", (r.stdout, r.stderr)
    finally:
        _reap(p)


def test_live_owner_is_left_alone(prefix: str) -> None:
    p, info = _owner(prefix)
    try:
        assert cleanup_leftovers(prefix) == []
        assert _present(info["names"]) == info["names"]
        live = [t for t in list_topologies(prefix) if t["prefix"] == prefix]
        assert live and live[0]["alive"] is True and live[0]["owner"] == p.pid
        r = subprocess.run([sys.executable, "-m", "flexnpu.cli", "bench", "net", "list", "--prefix", prefix,
                            "--json"], capture_output=True, text=True, timeout=60)
        listed = json.loads(r.stdout)["topologies"]
        assert [(t["owner"], t["alive"], sorted(t["names"])) for t in listed] == [(p.pid, True, sorted(info["names"]))]
        p.stdin.close()  # the owner leaves its with-block
        assert p.wait(15) == 0
        assert _present(info["names"]) == []
    finally:
        _reap(p)


def test_unclaimed_namespaces_only_automatic_dead_ones_go(prefix: str) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = f"fxn-{dead.pid}-{secrets.token_hex(3)}-n0"  # a run whose state file went missing
    foreign = f"{prefix}n0"  # not a name this module makes without a state file: maybe someone else's
    for n in (orphan, foreign):
        subprocess.run(["ip", "netns", "add", n], check=True)
    try:
        assert cleanup_leftovers(orphan[:-2]) == [orphan]
        assert cleanup_leftovers(prefix) == [] and _present([foreign]) == [foreign]
    finally:
        remove_namespaces([orphan, foreign])


# ---------------------------------------------------------------- LocalNode in a namespace


def _netns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def test_localnode_runs_inside_namespace_two_at_once(prefix: str) -> None:
    with Topology(nodes=2, link=LinkSpec(1.0, 0), prefix=prefix) as t:
        inode = [f"net:[{os.stat(NETNS_DIR / n).st_ino}]" for n in t.names]
        with LocalNode(devices=1, observer=None, netns=t.names[0]) as a, \
                LocalNode(devices=1, observer=None, netns=t.names[1]) as b:
            assert (a.host, b.host) == (t.addr(0), t.addr(1)) and a.rdir != b.rdir
            for node, ns in ((a, inode[0]), (b, inode[1])):
                assert _netns_of(node.emu_pid) == ns
                assert _netns_of(node.services["daemon-0"].pid) == ns
                assert node.emulator_status()["devices"][0]["index"] == 0
            assert _netns_of(os.getpid()) not in inode
            server = b.spawn([sys.executable, "-c",
                              "import socket; s = socket.create_server(('0.0.0.0', 7000)); print('up', flush=True); "
                              "c, a = s.accept(); c.sendall(a[0].encode())"], shim=False)
            assert server.stdout.readline().strip() == "up"
            assert _netns_of(server.pid) == inode[1]
            client = a.spawn([sys.executable, "-c",
                              f"import socket; print(socket.create_connection(('{b.host}', 7000)).recv(64).decode())"],
                             shim=False)
            out, _ = client.communicate(timeout=20)
            assert out.strip() == a.host  # b saw a's address: the connection crossed the link
    assert _present(t.names) == []


def test_localnode_without_netns_is_unchanged() -> None:
    node = LocalNode(devices=1, observer=None, daemons=False)
    try:
        assert node.host == "127.0.0.1" and node.wrap(["true"]) == ["true"]
    finally:
        node.stop()
    assert not node.rdir.exists()


def test_localnode_unknown_netns_is_an_error() -> None:
    before = set(Path("/tmp").glob("flexnpu-node-*"))
    with pytest.raises(NetnsError, match="no network namespace"):
        LocalNode(netns="fxt-no-such-namespace")
    assert set(Path("/tmp").glob("flexnpu-node-*")) == before  # nothing made before the check

