"""Phase from what the work is, through real probes on real libraries: kernel names learned
at aclrtBinaryGetFunction (the emulator's libascendcl.so), aclnn attention operators in the
emulator's libopapi.so, and a chunked-prefill engine classed
mixed with its prefill share. The workload is tests/progs/obs_engine.c; counts are exact
(prime numbers of passes, 26 layers each)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from flexnpu import paths
from flexnpu.bench import accuracy
from flexnpu.observe.snapshot import SnapshotBuilder
from test_observe_fixtures import NEEDS_BPF, build, PROGS, probes  # noqa: F401

pytestmark = NEEDS_BPF
LAYERS = 26
PREFILLS, DECODES = 7, 11  # prime


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("engine")
    return {"engine": build(PROGS / "obs_engine.c", out / "obs_engine"), "opapi": accuracy.opapi_library(),
            "klib": accuracy.kernel_library(out)}


def run_sampled(session: Any, argv: list[str], env: dict, every_s: float = 0.05,
                builder: SnapshotBuilder | None = None) -> tuple[int, list[dict]]:
    """Runs argv to its end, reading the maps (and building snapshots) every `every_s`."""
    p = subprocess.Popen([str(a) for a in argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    snaps = []
    try:
        while p.poll() is None:
            time.sleep(every_s)
            reads = session.read()
            if builder is not None:
                snaps.append(builder.build(reads))
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
    assert p.returncode == 0, p.stderr.read()
    p.stderr.close()
    return p.pid, snaps


def _engine_argv(engine: dict, emu: Any, attn: str, *steps: str) -> list[str]:
    extra = ["--opapi", str(engine["opapi"])] if attn == "aclnn" else []
    return [engine["engine"], engine["klib"], "--ms-flops", repr(emu.flops_for_ms(1.0) / 10), "--attn", attn,
            *extra, "i:300", *steps]


def test_launches_are_classed_by_the_kernel_name(emulator, probes, acl_env, engine) -> None:
    emu = emulator()
    session = probes()
    pid, _ = run_sampled(session, _engine_argv(engine, emu, "kernel", f"p:{PREFILLS}", f"d:{DECODES}"),
                         acl_env)
    c = session.read()[(pid, 0)]
    # [kernel prefill, kernel decode, kernel either, operator ...]
    assert c["named"][:3] == [PREFILLS * LAYERS, DECODES * LAYERS, 0]
    assert c["sig_iters"][:4] == [0, PREFILLS, DECODES, 0]  # held: none, P only, D only, both
    names = {n for (p, _), n in session.kernel_names.items() if p == pid}
    assert names == {"PromptFlashAttention_bf16", "IncreFlashAttention_bf16"}  # k_mlp_* are not attention


def test_anonymous_kernels_name_nothing(emulator, probes, acl_env, engine) -> None:
    emu = emulator()
    session = probes()
    pid, _ = run_sampled(session, _engine_argv(engine, emu, "anon", f"p:{PREFILLS}"), acl_env)
    c = session.read()[(pid, 0)]
    assert c["named"] == [0] * 6 and c["sig_iters"][0] == PREFILLS


@pytest.mark.parametrize("fused", [False, True])
def test_aclnn_operators_on_a_real_libopapi(emulator, probes, acl_env, engine, fused) -> None:
    """aclnnPromptFlashAttentionV3 / aclnnIncreFlashAttentionV4 are classed by their name;
    aclnnFusedInferAttentionScoreV2 (both phases) is attention of either phase."""
    emu = emulator()
    session = probes()
    eng = engine
    assert session.attach(str(eng["opapi"]), "libopapi.so") > 0
    argv = _engine_argv(eng, emu, "aclnn", f"p:{PREFILLS}", f"d:{DECODES}")
    if fused:
        argv.insert(-3, "--fused")
    b = SnapshotBuilder("bpf")
    # read every 10 ms: a prefill pass takes about that, and launches of a handle go unnamed
    # until the read after the library made it (below)
    pid, snaps = run_sampled(session, argv, acl_env, every_s=0.01, builder=b)
    c = session.read()[(pid, 0)]
    ops = c["named"][3:]
    if fused:
        assert ops == [0, 0, (PREFILLS + DECODES) * LAYERS]
        busy = [e for s in snaps for e in s["processes"] if e["pid"] == pid and e["phase"] != "idle"]
        assert busy and all(e["phase_source"] != "aclnn" for e in busy)
    else:
        assert ops == [PREFILLS * LAYERS, DECODES * LAYERS, 0]
        assert c["sig_iters"][4:] == [0, PREFILLS, DECODES, 0]
    # the operators launch the emulator's PromptFlashAttention / IncreFlashAttention kernels
    # (FusedInferAttentionScore: one or the other by the query's length), whose names the
    # kernel signal classes too, except in the first pass: the library makes its handles at
    # its first call, and launches go unnamed until the observer's next read has classed the
    # names (docs/observe.md, Limits)
    assert (PREFILLS - 1) * LAYERS <= c["named"][0] <= PREFILLS * LAYERS
    assert c["named"][1] == DECODES * LAYERS


def test_chunked_prefill_is_mixed_with_its_share(emulator, probes, acl_env, engine) -> None:
    """Steps that carry a prefill chunk and the decode batch, then three decode steps: the
    observer says mixed, from the kernel names, with the prefill share of the busy time
    near the emulator's own (device time by kernel name)."""
    emu = emulator()
    session = probes()
    eng = engine
    b = SnapshotBuilder("bpf")
    argv = [eng["engine"], eng["klib"], "--ms-flops", repr(emu.flops_for_ms(1.0)), "--attn", "kernel",
            "--p-ms", "0.3", "i:300", "c:23"]
    pid, snaps = run_sampled(session, argv, acl_env, every_s=0.1, builder=b)
    es = [e for s in snaps for e in s["processes"] if e["pid"] == pid and e["rates"]["busy"] > 0.5]
    assert len(es) >= 5
    assert all(e["phase_source"] == "kernel" for e in es)
    mixed = [e for e in es if e["phase"] == "mixed"]
    assert len(mixed) >= 0.8 * len(es), [(e["phase"], e["phase_reason"]) for e in es]
    share = sum(e["phase_share"] for e in mixed) / len(mixed)
    # truth: per chunked step 26 x (3 x 0.3 ms prefill + 3 x 0.05 ms decode), then 3 decode
    # steps of 26 x 3 x 0.05 ms: 23.4 / (23.4 + 3.9 + 11.7) = 0.6
    assert 0.45 <= share <= 0.75, share
