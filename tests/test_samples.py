"""The sample programs the README and the demo run, on the real emulator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from flexnpu import paths

SAMPLES = Path(__file__).resolve().parent.parent / "flexnpu" / "samples"


def test_sample_loop_steps_take_their_modelled_time(emulator, acl_env) -> None:
    emu = emulator()
    r = subprocess.run([sys.executable, str(SAMPLES / "sample_loop.py"), str(paths.emulator_kernel_library()),
                        "--seconds", "0.5", "--kernel-ms", "2", "--kernels", "2", "--h2d-bytes", "4096"],
                       env=acl_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    # a step is two 2 ms kernels back to back, plus a tiny copy and the host's own time
    assert doc["steps"] >= 40
    assert 4.0 <= doc["step_ms_p50"] <= 6.0, doc
    [client] = emu.status()["devices"][0]["clients"]
    assert client["ops"]["kernel"] == 2 * doc["steps"]
    assert client["bytes_copied"]["h2d"] == 4096 * doc["steps"]


def test_sample_loop_refuses_a_missing_device(emulator, acl_env) -> None:
    emulator(devices=1)
    r = subprocess.run([sys.executable, str(SAMPLES / "sample_loop.py"), str(paths.emulator_kernel_library()),
                        "--device", "3", "--seconds", "0.1"], env=acl_env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "aclrtSetDevice failed: 107001" in r.stderr
