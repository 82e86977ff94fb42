"""Disaggregation as deployed: KV over the network with Mooncake's transfer engine
(flexnpu/workload/kvnet.py), the xPyD router (flexnpu/workload/driver.py) and `flexnpu bench
pd`'s ratio sweeps and two nodes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _kvnet(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flexnpu.workload.kvnet", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_kvnet_moves_bytes_between_processes_exactly():
    # an odd size, larger than one TCP send: the reader's checksum must be the server's
    n = 24 * 1024 * 1024 + 13
    server = _kvnet("serve", "--bytes", str(n), "--seed", "5", stdin=subprocess.PIPE)
    try:
        first = json.loads(server.stdout.readline())
        reader = _kvnet("read", "--segment", first["segment"], "--addr", str(first["addr"]), "--bytes", str(n))
        out, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, err
        got = json.loads(out)
        assert got["sha256"] == first["sha256"] and got["bytes"] == n
        assert "InitGoogleLogging" not in err and not err.strip(), err  # the engine's start-up lines are silenced
        # another seed gives other bytes: the checksum is of what moved, not of a constant
        other = _kvnet("serve", "--bytes", str(n), "--seed", "6", stdin=subprocess.PIPE)
        try:
            assert json.loads(other.stdout.readline())["sha256"] != first["sha256"]
        finally:
            other.communicate("", timeout=30)
    finally:
        server.communicate("", timeout=30)
    assert server.returncode == 0


def test_kvnet_bad_peer_is_one_line():
    r = _kvnet("read", "--segment", "127.0.0.1:1", "--addr", "4096", "--bytes", "16")
    out, err = r.communicate(timeout=60)
    assert r.returncode == 1 and out == ""
    # the engine's own ERROR line may precede it; the reason is one line of ours, last
    last = err.strip().splitlines()[-1]
    assert last.startswith("flexnpu.workload.kvnet: reading 16 bytes") and "Traceback" not in err, err


# ---------------------------------------------------------------- the router and xPyD runs

from flexnpu.bench import pd  # noqa: E402
from flexnpu.bench.node import LocalNode  # noqa: E402
from flexnpu.workload import driver, trace as T  # noqa: E402
from flexnpu.workload.model import model_by_name  # noqa: E402

MODEL = "qwen2.5-7b:2"


def _trace(n: int = 16, rate: float = 40.0) -> list[T.Request]:
    return T.generate(T.TraceSpec(n=n, rate=rate, seed=3, prompt=T.LengthDist(170, 1.0, 4, 2048),
                                  output=T.LengthDist(20, 0.9, 2, 64)))


def test_router_deals_by_outstanding_prompt_tokens_and_sequences():
    r = driver.Router(["p0", "p1"], ["d0", "d1", "d2"])
    big, small = T.Request(0, 0, 1000, 10), T.Request(1, 0, 10, 10)
    assert r.prefill_for(big) == "p0"
    assert r.prefill_for(small) == "p1"  # p0 has 1000 prompt tokens outstanding
    assert r.prefill_for(small) == "p1"  # 10 + 10 < 1000
    r.prefilled("p0", big)
    assert r.prefill_for(small) == "p0"  # p0's prompt is done: 0 < 20
    assert [r.decode_for(x) for x in (big, small, small)] == ["d0", "d1", "d2"]  # one sequence each
    r.finished("d0", big)
    r.finished("d1", small)
    # d0 and d1 hold none now; the tie is broken by the KV in hand (both 0), then the order
    assert r.decode_for(small) == "d0"
    r.finished("d2", small)
    assert r.decode_for(big) == "d1"  # d1 and d2 hold no sequence: the first listed
    assert r.decode_for(small) == "d2"  # the only one without a sequence
    assert r.seqs == {"d0": 1, "d1": 1, "d2": 1}
    # one sequence each: the fewest KV tokens in hand decides (d0 20, d1 1010, d2 20)
    assert r.decode_for(small) == "d0"
    r2 = driver.Router(["p"], ["d0", "d1"])
    assert [r2.decode_for(x) for x in (big, small, small)] == ["d0", "d1", "d1"]


def test_xpyd_run_on_four_devices_passes_the_checks():
    """1P3D on one node: every request finishes, the three decode instances all get work,
    the emulator's counts, bytes (the KV pulled over the device link from the one imported
    pool) and busy time agree with what each instance says."""
    reqs = _trace()
    setup = driver.Setup(model=MODEL, placements=driver.xpyd(1, 3), shim=False)
    with LocalNode(devices=4, observer=None, daemons=False) as node:
        res = driver.run(node, reqs, setup)
    assert res.problems == []
    assert res.metrics["completed"] == len(reqs)
    assert set(res.placements) == {"prefill", "decode-0", "decode-1", "decode-2"}
    assert {d for _, d in res.routes.values()} == {"decode-0", "decode-1", "decode-2"}
    kvb = model_by_name(MODEL).kv_bytes_per_token
    pulled = sum(res.stats[n]["copied_bytes"] for n in res.placements if n.startswith("decode"))
    assert pulled == sum(r.prompt_tokens for r in reqs if r.output_tokens > 1) * kvb
    # each decode instance imported the prefill's pool (peer access): one import each
    assert all(res.handoff[f"decode-{i}"]["imports"] == 1 for i in range(3))
    # the check sees a wrong count: one kernel less than the instance launched
    stats = json.loads(json.dumps(res.stats))
    k = next(iter(stats["decode-1"]["kernels"]))
    stats["decode-1"]["kernels"][k] += 1
    timing = {t.id: t for t in res.requests}
    assert any(p.startswith("decode-1: emulator counted") for p in
               driver.check(stats, res.status, timing, setup, handoff=res.handoff))


def test_two_prefills_share_their_pools_with_every_decode_on_one_node():
    """2P2D: each decode instance imports both prefill pools, and each request's KV is
    pulled from the pool of the prefill instance that ran it."""
    reqs = _trace(n=24, rate=200.0)
    setup = driver.Setup(model=MODEL, placements=driver.xpyd(2, 2), shim=False)
    with LocalNode(devices=4, observer=None, daemons=False) as node:
        res = driver.run(node, reqs, setup)
    assert res.problems == []
    assert res.metrics["completed"] == len(reqs)
    assert {p for p, _ in res.routes.values()} == {"prefill-0", "prefill-1"}  # both prefill instances got work
    for d in ("decode-0", "decode-1"):
        h = res.handoff[d]
        assert h["imports"] == 2 and h["import_bytes"] == res.handoff["prefill-0"]["export_bytes"] * 2


def test_kv_across_nodes_goes_over_the_transfer_engine():
    """Prefill on one node, decode on another (two device servers; the nodes' address here
    127.0.0.1): every prompt's KV is copied device->host, read over TCP and copied
    host->device, and the bytes are the model's prompt_tokens x kv_bytes_per_token; the
    content too: prefill fills each prompt's KV with a byte of the request's own, and every
    decode instance finds it in its pool (a range reused by another request, or never
    written, would hold another byte)."""
    reqs = _trace()
    setup = driver.Setup(model=MODEL, placements=driver.xpyd(1, 2, nodes=2), shim=False, kv_check=True)
    with LocalNode(devices=1, observer=None, daemons=False) as a, LocalNode(devices=2, observer=None,
                                                                            daemons=False) as b:
        res = driver.run([a, b], reqs, setup)
    assert res.problems == []
    assert res.metrics["completed"] == len(reqs)
    kvb = model_by_name(MODEL).kv_bytes_per_token
    want = sum(r.prompt_tokens for r in reqs if r.output_tokens > 1) * kvb
    crossed = sum(r.output_tokens > 1 for r in reqs)
    assert res.kv_net == {"requests": crossed, "bytes": want, "reported": want, "d2h": want, "checked": crossed,
                          "bad": 0}
    pre = res.stats["prefill"]
    assert pre["d2h_bytes"] == want and pre["segment"].startswith("127.0.0.1:")
    assert sum(res.stats[d]["h2d_bytes"] for d in ("decode-0", "decode-1")) == want
    read_back = sum(res.stats[d]["d2h_bytes"] for d in ("decode-0", "decode-1"))  # the check's reads
    assert 0 < read_back <= crossed * 2 * 4096
    # the emulator saw the copies: device->host on node 0's device, host->device on node 1's
    by_node = {}
    for dev in res.status["devices"]:
        for c in dev["clients"]:
            for kind in ("d2h", "h2d"):
                by_node[(dev["node"], kind)] = by_node.get((dev["node"], kind), 0) + c["bytes_copied"][kind]
    assert by_node == {(0, "d2h"): want, (0, "h2d"): 0, (1, "d2h"): read_back, (1, "h2d"): want}
    # a reported count that is not the model's is a problem
    timing = {t.id: t for t in res.requests}
    bad = dict(res.kv_net, reported=want - kvb)
    assert any("KV across nodes" in p for p in driver.check(res.stats, res.status, timing, setup, kv_net=bad))
    wrong = dict(res.kv_net, bad=1)
    assert any("other bytes than prefill wrote" in p
               for p in driver.check(res.stats, res.status, timing, setup, kv_net=wrong))


# ---------------------------------------------------------------- bench pd

import os  # noqa: E402

def flexnpu(*args: str, timeout: float = 900, user: int | None = None) -> subprocess.CompletedProcess:
    pre = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    return subprocess.run([*pre, sys.executable, "-m", "flexnpu.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _key(row: dict) -> tuple:
    return (row["serves"], row["stable"])


def test_ratio_sweep_lists_the_ratios_and_picks_the_best():
    rep = pd.run(pd.quick(pd.Options(devices=4, configs=("static-disagg",))))
    (point,) = rep["results"]
    rows = point["disagg_sweep"]["static-disagg"]
    assert [r["ratio"] for r in rows] == ["1P3D", "2P2D", "3P1D"]
    choice = point["disagg_choice"]["static-disagg"]
    c = point["configs"]["static-disagg"]
    assert c["variant"] == choice and c["problems"] == [] and c["completed"] == rep["options"]["n"]
    best = next(r for r in rows if r["ratio"] == choice)
    # _better's order: serves, then stable, then goodput (then TTFT p99)
    for r in rows:
        assert _key(best) >= _key(r)
        if _key(best) == _key(r):
            assert best["goodput"] >= r["goodput"] - 1e-3, (best, r)
    # with one device a node the default list leaves static-disagg out, and says why
    o = pd.runnable(pd.Options(nodes=2, devices=2, ops="kernels"))
    assert "static-disagg" not in o.configs and "static-disagg-xnode" in o.configs
    assert "static-disagg left out: it needs 2 or more devices a node" in o.left_out
    # two devices allow one ratio
    assert [v.ratio for v in pd.disagg_variants("static-disagg", pd.Options(devices=2))] == ["1P1D"]
    assert [v.ratio for v in pd.disagg_variants("static-disagg", pd.Options(devices=4, nodes=2))] == ["1P1D"]
    assert [v.ratio for v in pd.disagg_variants("static-disagg-xnode", pd.Options(devices=4, nodes=2))] == [
        "1P3D", "2P2D", "3P1D"]


@pytest.mark.parametrize("args, says", [
    (["--configs", "static-disagg-xnode"], "static-disagg-xnode needs --nodes 2"),
    (["--nodes", "3"], "--nodes takes 1 or 2"),
    (["--nodes", "2", "--devices", "3"], "must be a multiple of 2"),
    (["--nodes", "2", "--devices", "2", "--configs", "static-disagg"], "static-disagg needs 2 or more devices a node"),
    (["--nodes", "2", "--devices", "4", "--link-gbit", "0"], "--link-gbit must be a number above 0"),
    (["--nodes", "2", "--devices", "4", "--link-delay-us", "-1"], "--link-delay-us must be a number from 0"),
])
def test_bad_combinations_are_one_line(args, says):
    r = flexnpu("bench", "pd", "--quick", *args, timeout=60)
    assert r.returncode == 2, r.stdout[-2000:]
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.root_net
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the bench as an unprivileged user (setpriv)")
def test_two_nodes_need_root():
    r = flexnpu("bench", "pd", "--quick", "--nodes", "2", "--devices", "2", timeout=60, user=65534)
    assert r.returncode == 2
    assert "--nodes 2" in r.stderr and "root" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.root_net
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_NET_ADMIN) for network namespaces")
def test_xnode_kv_crosses_the_shaped_link(tmp_path):
    """static-disagg-xnode across two network namespaces: every request's KV crosses the
    link, and the prefill node's bytes sent on it are the KV's (the model's prompt_tokens x
    kv_bytes_per_token summed over the trace) plus no more than the headers' band."""
    out = tmp_path / "x.json"
    r = flexnpu("bench", "pd", "--quick", "--nodes", "2", "--devices", "2", "--configs", "static-disagg-xnode",
                "--link-gbit", "10", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["network"]["nodes"] == 2 and rep["network"]["link"]["rate_gbit"] == 10
    (point,) = rep["results"]
    c = point["configs"]["static-disagg-xnode"]
    assert c["problems"] == [] and c["nodes"] == 2 and c["variant"] == "1P1D"
    o = pd.quick(pd.Options())
    reqs, _ = pd.make_trace(o, rep["options"]["rate"])
    kvb = model_by_name(rep["options"]["model"]).kv_bytes_per_token
    want = sum(q.prompt_tokens for q in reqs if q.output_tokens > 1) * kvb
    kv = c["kv_net"]
    assert kv["ok"] and kv["bytes"] == kv["reported"] == kv["d2h"] == want > 0
    assert kv["checked"] == kv["requests"] and kv["bad"] == 0  # every prompt's bytes found on node 1
    assert want <= kv["link_tx_bytes"] <= want * (1 + pd.LINK_OVERHEAD) + pd.LINK_SLACK
    assert kv["link_rx_bytes"] >= want  # what node 1 received on its side of the link
    assert "node 0 sent" in r.stdout


@pytest.mark.slow
@pytest.mark.root_net
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_NET_ADMIN) for network namespaces")
def test_two_nodes_four_devices_every_configuration(tmp_path):
    out = tmp_path / "all.json"
    r = flexnpu("bench", "pd", "--quick", "--nodes", "2", "--devices", "4", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    (point,) = rep["results"]
    want = set(pd.CONFIGS) - (set(pd.FORWARDED) if pd.forward_refusal(pd.DEFAULT_OPS) else set())
    assert set(point["configs"]) == want
    for name, c in point["configs"].items():
        assert c["nodes"] == 2 and c["completed"] == rep["options"]["n"], name
        assert c["problems"] == [] and c["busy_check"]["ok"], (name, c["problems"])
        assert len(c["busy_check"]["device_busy_share"]) == 4, name  # both nodes' devices
    # the co-located configurations ran a pair on each device of both nodes: each node's
    # devices were busy
    assert all(b > 0 for b in point["configs"]["no-shim"]["busy_check"]["device_busy_share"])
    assert point["configs"]["flexnpu-gated"]["phase"]["nodes"] == 2
    assert [r["ratio"] for r in point["disagg_sweep"]["static-disagg-xnode"]] == ["1P3D", "2P2D", "3P1D"]
    assert point["configs"]["static-disagg-xnode"]["kv_net"]["ok"]
