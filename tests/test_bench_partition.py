"""The emulator's partition mode (`--partition prefill=S,decode=S`, vNPU-like): two programs
that keep the device busy, one with FLEXNPU_ROLE=prefill and one decode, each get their
share of the device; the emulator's busy time says so, and each one's steps take 1/share of
their modelled time."""

import json
import subprocess
import sys

import pytest

from flexnpu import paths
from flexnpu.bench.node import LocalNode
from flexnpu.emulator import control

SAMPLE = paths.native_dir().parent / "samples" / "sample_loop.py"
SECONDS = 2.0


def _loop(node: LocalNode, role: str) -> subprocess.Popen:
    return node.spawn([sys.executable, str(SAMPLE), str(paths.emulator_kernel_library()), "--seconds", str(SECONDS),
                       "--kernel-ms", "2", "--kernels", "4"], shim=False, extra_env={"FLEXNPU_ROLE": role})


@pytest.mark.slow
def test_partition_shares_match_busy_time():
    with LocalNode(devices=1, observer=None, daemons=False, partition="prefill=0.7,decode=0.3") as node:
        pre, dec = _loop(node, "prefill"), _loop(node, "decode")
        out = {}
        for name, p in (("prefill", pre), ("decode", dec)):
            o, e = p.communicate(timeout=30)
            assert p.returncode == 0, e
            out[name] = json.loads(o.strip().splitlines()[-1])
        st = node.emulator_status()
    dev = st["devices"][0]
    busy = {c["pid"]: c["busy_ns"] for c in dev["clients"]}
    b_pre, b_dec = busy[pre.pid], busy[dec.pid]
    # each ran for about SECONDS with the device's share of its partition all the time
    share_pre = b_pre / (b_pre + b_dec)
    assert share_pre == pytest.approx(0.7, abs=0.03)
    # a 4 x 2 ms step runs at 0.7 (0.3) of full speed: 11.4 ms (26.7 ms)
    assert out["prefill"]["step_ms_p50"] == pytest.approx(8 / 0.7, rel=0.08)
    assert out["decode"]["step_ms_p50"] == pytest.approx(8 / 0.3, rel=0.08)
    # the device's busy time is the share of it in use: at most the wall time
    assert dev["busy_ns"] <= st["uptime_s"] * 1e9


def test_partition_bad_spec_is_one_line():
    for spec in ("prefill=0.8,decode=0.4", "prefill=0.5", "gpu=0.5,decode=0.5", "prefill=x,decode=0.5"):
        with pytest.raises(control.EmulatorError) as e:
            control.parse_partition(spec)
        assert "\n" not in str(e.value) and "--partition" in str(e.value)
    assert control.parse_partition("prefill=0.6,decode=0.4") == {"prefill": 0.6, "decode": 0.4}
