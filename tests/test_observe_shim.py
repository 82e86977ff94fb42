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


def test_a_process_blocked_in_a_long_sync_is_not_idle(emulator, daemons, spawn, shim_env, acl_env,
                                                      acl_programs, flexnpu_proc) -> None:
    """One 400 ms kernel a pass, then its synchronisation: most 100 ms intervals hold no call
    and no ended iteration, while the device runs the pass. The daemon says how long the open
    iteration has run, so those intervals are busy (the role's phase, the time open), not idle
    as the counters alone would make them."""
    emulator()
    daemons(0)
    obs = flexnpu_proc("observe", "--source", "shim", "--interval-ms", "100", "--json", env=acl_env)
    assert obs.read(timeout=60)["source"] == "shim"
    loop = spawn([acl_programs["engine_loop"], KLIB, "0", "1", "400", "--seconds", "1.5"],
                 env={**shim_env, "FLEXNPU_ROLE": "prefill"})
    pid = loop.read(timeout=30)["pid"]
    quiet: list[dict] = []  # entries of intervals with no call and no ended iteration
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and loop.proc.poll() is None:
        snap = obs.read(timeout=10)
        e = next((e for e in snap["processes"] if e["pid"] == pid), None)
        if e is not None and e["rates"]["launches_per_s"] == 0 and e["iteration"]["count"] == 0:
            quiet.append(e)
    assert len(quiet) >= 3, f"{len(quiet)} intervals inside a pass"
    for e in quiet:
        assert (e["phase"], e["phase_source"]) == ("prefill", "role"), e
        assert e["iteration"]["open_ms"] >= 50, e["iteration"]
    assert any(e["rates"]["busy"] >= 0.9 for e in quiet), [e["rates"] for e in quiet]
