"""The phase classifier against the emulator's ground truth (flexnpu/observe/accuracy.py):
prefill-like (long passes, many launches, large H2D), decode-like (short, frequent
passes), both in turn, mixed rounds, and a prefill and a decode process sharing a device.
The figures are printed (pytest -s) and recorded as test properties; docs/observe.md
quotes them from scripts/bench_observe.py --accuracy."""

from __future__ import annotations

import json

import pytest

from flexnpu.observe import accuracy
from test_observe_fixtures import NEEDS_BPF, obs_programs, probes  # noqa: F401

pytestmark = [*NEEDS_BPF, pytest.mark.slow]
MIN_ACCURACY = 0.9


def test_classifier_accuracy(emulator, probes, obs_programs, acl_env, runtime_dir, record_property) -> None:
    emulator()
    session = probes()
    klib = accuracy.kernel_library(runtime_dir)
    results = [accuracy.run(s, obs_programs["phases"], klib, acl_env, runtime_dir, session)
               for s in accuracy.SCENARIOS]
    rows = [(p, t, v) for r in results for p, t, v in r.rows]
    overall = sum(t == v for _, t, v in rows) / len(rows)
    for r in results:
        print(json.dumps(r.as_dict()))
        record_property(r.scenario, r.as_dict())
    print(f"overall accuracy {overall:.3f} over {len(rows)} intervals of 100 ms")
    record_property("accuracy", overall)
    for r in results:
        assert r.accuracy >= 0.8, r.as_dict()
    assert overall >= MIN_ACCURACY
    # every phase occurred and was recognised at least once
    assert {t for _, t, v in rows if t == v} == {"prefill", "decode", "idle", "mixed"}
