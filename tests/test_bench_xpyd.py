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
