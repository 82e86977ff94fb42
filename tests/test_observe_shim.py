"""The observer's fallback source: without BPF, `flexnpu observe` reads the counters the
shim keeps in the gate segment, for processes run under the shim, and says so."""

from __future__ import annotations

import time

from flexnpu import paths
from forward_fixtures import shim_env  # noqa: F401  (fixtures are used by name)
from test_daemon_fixtures import daemons  # noqa: F401
from test_observe_fixtures import (  # noqa: F401
    PRIME_OPS, flexnpu_proc, obs_programs, observed_from_entries, truth_of)

KLIB = paths.emulator_kernel_library()
SHIM_OPS = [k for k in PRIME_OPS if k != "device_set"]  # the shim counts work, not device selection


def test_shim_source_counts_equal_the_truth(emulator, daemons, spawn, shim_env, acl_env, obs_programs,
                                            flexnpu_proc) -> None:
    emu = emulator()
    daemons(0)
    obs = flexnpu_proc("observe", "--source", "shim", "--interval-ms", "100", "--json", env=acl_env)
    first = obs.read(timeout=60)
    assert first["source"] == "shim" and "shim" in first["note"]
    wl = spawn([obs_programs["linked"], KLIB, "--hold"], env={**shim_env, "FLEXNPU_ROLE": "decode"})
    pid = wl.read(timeout=30)["pid"]
    truth = truth_of(wl.read(timeout=60))
    want = {**truth, "ops": {k: truth["ops"][k] for k in SHIM_OPS}}
    deadline = time.monotonic() + 15
    seen: dict = {}
    snap: dict = {}
    while time.monotonic() < deadline:
        snap = obs.read(timeout=10)
        seen = observed_from_entries(snap["processes"], pid)
        seen["ops"] = {k: seen["ops"][k] for k in SHIM_OPS}
        if seen == want:
            break
    assert seen == want
    assert emu.client(pid)["memory_used"] == truth["live_bytes"]
    entry = next(e for e in snap["processes"] if e["pid"] == pid)
    assert entry["role"] == "decode" and entry["counters"]["sync_ns"] is None  # the shim has no sync times
