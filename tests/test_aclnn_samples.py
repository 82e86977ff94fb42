"""aclnn programs written as CANN's operator docs show them, built with g++ against the
emulator's headers (`$FLEXNPU_ACL_INCLUDE`) and linked -lascendcl -lopapi -lnnopbase, run
against the emulator's real server, directly and under `flexnpu run` (the shim), their
outputs checked against values computed here from the inputs given to them.

The program (tests/progs/aclnn_ops.cpp) takes its inputs' bytes from a file and writes its
outputs' bytes to another; each case below makes random inputs, and computes the expected
outputs with numpy in float64 from the same inputs (rounded to the dtype as they are).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from flexnpu import paths
from test_daemon_fixtures import daemons  # noqa: F401  (a fixture, used by name)

PROGS = Path(__file__).resolve().parent / "progs"
FLEXNPU = str(Path(sys.executable).with_name("flexnpu"))
DTYPES = {"fp32": np.float32, "fp16": np.float16}
# elementwise ops are exact up to one rounding to the dtype; reductions accumulate in fp32
TOL = {"fp32": 2e-5, "fp16": 2e-3}


@pytest.fixture(scope="module")
def aclnn_ops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("g++") is None:
        pytest.fail("g++ is needed to build the aclnn programs (apt-get install g++)", pytrace=False)
    exe = tmp_path_factory.mktemp("aclnn-progs") / "aclnn_ops"
    cmd = ["g++", "-O1", "-Wall", "-std=c++14", str(PROGS / "aclnn_ops.cpp"), "-o", str(exe),
           "-I", str(paths.acl_include_dir()), "-L", str(paths.native_lib_dir()),
           "-lascendcl", "-lopapi", "-lnnopbase"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"building aclnn_ops.cpp failed:\n{r.stderr}"
    return exe


@dataclass
class Case:
    op: str
    args: list[str]
    inputs: list[np.ndarray]  # in the dtype the program gets them
    expect: Callable[..., list[np.ndarray]]  # float64 inputs -> float64 outputs
    out_dtypes: list[type] | None = None  # per output; default: the inputs' dtype
    tol: float | None = None  # default: TOL of the dtype


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool, kv_lens: list[int] | None = None):
    """q [B, S, N, D], k v [B, KV, NKV, D] (BSND); grouped heads; causal aligned to the last key."""
    b, s, n, d = q.shape
    kvl, nkv = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        length = kv_lens[bi] if kv_lens else kvl
        for h in range(n):
            kh = h // (n // nkv)
            scores = q[bi, :, h, :] @ k[bi, :length, kh, :].T / math.sqrt(d)  # [S, L]
            if causal:  # query i sees keys up to length - s + i
                i = np.arange(s)[:, None]
                j = np.arange(length)[None, :]
                scores = np.where(j <= length - s + i, scores, -np.inf)
            out[bi, :, h, :] = _softmax(scores) @ v[bi, :length, kh, :]
    return out


def cases(dt: str, rng: np.random.Generator) -> list[Case]:
    t = DTYPES[dt]

    def r(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(t)

    ifa_lens = [5, 3, 7]
    basic = [
        Case("add", ["4x2", "1.2"], [r(4, 2), r(4, 2)], lambda x, y: [x + 1.2 * y]),
        Case("mul", ["3x5"], [r(3, 5), r(3, 5)], lambda x, y: [x * y]),
        Case("matmul", ["3", "16", "5"], [r(3, 16), r(16, 5)], lambda a, b: [a @ b]),
        Case("rms_norm", ["4", "32", "1e-6"], [r(4, 32), r(32)],
             lambda x, g: [x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * g,
                           1 / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)],
             [t, np.float32]),
        Case("softmax", ["3", "10"], [r(3, 10)], lambda x: [_softmax(x)]),
        Case("silu", ["13"], [r(13)], lambda x: [_silu(x)]),
        Case("swi_glu", ["3", "8"], [r(3, 8)], lambda x: [_silu(x[:, :4]) * x[:, 4:]]),
        # CANN's ApplyRotaryPosEmb takes a head dimension of 128 only
        Case("rope", ["4", "2", "1", "128"], [r(1, 4, 2, 128), r(1, 4, 1, 128), r(1, 4, 1, 128), r(1, 4, 1, 128)],
             lambda q, k, c, s: [q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s]),
    ]
    if dt == "fp32":  # CANN's attention operators take FLOAT16 and BFLOAT16 only
        return basic
    return basic + [
        Case("pfa", ["6", "6", "4", "2", "16", "1"], [r(1, 6, 4, 16), r(1, 6, 2, 16), r(1, 6, 2, 16)],
             lambda q, k, v: [_attention(q, k, v, True)], tol=5e-3),
        Case("pfa", ["3", "5", "2", "2", "8", "0"], [r(1, 3, 2, 8), r(1, 5, 2, 8), r(1, 5, 2, 8)],
             lambda q, k, v: [_attention(q, k, v, False)], tol=5e-3),
        Case("fia", ["3", "7", "4", "1", "8", "1"], [r(1, 3, 4, 8), r(1, 7, 1, 8), r(1, 7, 1, 8)],
             lambda q, k, v: [_attention(q, k, v, True)], tol=5e-3),
        Case("ifa", ["3", "4", "2", "8", ",".join(map(str, ifa_lens))],
             [r(3, 1, 4, 8), r(3, 7, 2, 8), r(3, 7, 2, 8)],
             lambda q, k, v: [_attention(q, k, v, False, ifa_lens)], tol=5e-3),
    ]


def run_case(exe: Path, dt: str, c: Case, tmp: Path, env: dict[str, str], under_shim: bool) -> list[np.ndarray]:
    inp, out = tmp / f"{c.op}.in", tmp / f"{c.op}.out"
    inp.write_bytes(b"".join(x.tobytes() for x in c.inputs))
    argv = [str(exe), c.op, dt, *c.args, str(inp), str(out)]
    if under_shim:
        argv = [FLEXNPU, "run", "--role", "auto", "--", *argv]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{c.op} {dt} exited {r.returncode}: {r.stderr}"
    assert f"aclnn_ops {c.op}: ok" in r.stdout
    want = c.expect(*[x.astype(np.float64) for x in c.inputs])
    dtypes = c.out_dtypes or [c.inputs[0].dtype.type] * len(want)
    raw, got, at = out.read_bytes(), [], 0
    for w, d in zip(want, dtypes):
        n = w.size * np.dtype(d).itemsize
        got.append(np.frombuffer(raw[at:at + n], dtype=d).reshape(w.shape))
        at += n
    assert at == len(raw), f"{c.op}: {len(raw)} bytes of output, expected {at}"
    for g, w in zip(got, want):
        tol = c.tol or TOL[dt]
        np.testing.assert_allclose(g.astype(np.float64), w, rtol=tol, atol=tol, err_msg=f"{c.op} {dt} {c.args}")
    return got


@pytest.mark.parametrize("dt", DTYPES)
def test_aclnn_programs_compute_right(emulator, acl_env, aclnn_ops, tmp_path, dt) -> None:
    emu = emulator()
    rng = np.random.default_rng(7)
    for c in cases(dt, rng):
        run_case(aclnn_ops, dt, c, tmp_path, acl_env, under_shim=False)
    # every op launched its work on the device as kernels, and every program let its memory go
    clients = emu.status()["devices"][0]["clients"]
    assert len(clients) == len(cases(dt, rng))
    for c in clients:
        assert c["ops"]["kernel"] >= 1 and not c["alive"]


def test_aclnn_programs_under_flexnpu_run(emulator, daemons, acl_env, aclnn_ops, tmp_path) -> None:
    """The same programs under the shim, with a daemon owning the device's gates."""
    emu = emulator()
    daemons(0)
    rng = np.random.default_rng(11)
    for c in cases("fp16", rng):
        run_case(aclnn_ops, "fp16", c, tmp_path, acl_env, under_shim=True)
    clients = emu.status()["devices"][0]["clients"]
    assert len(clients) == len(cases("fp16", rng)) and all(c["ops"]["kernel"] >= 1 for c in clients)



def test_operator_launches_go_through_the_shim(emulator, acl_env, aclnn_ops, tmp_path) -> None:
    """libopapi.so launches its kernels with aclrtLaunchKernel through its PLT, so under the
    shim they bind to the shim's wrapper (the dispatch gate), as the application's own do."""
    emulator()
    c = cases("fp32", np.random.default_rng(3))[0]
    inp = tmp_path / "in"
    inp.write_bytes(b"".join(x.tobytes() for x in c.inputs))
    env = {**acl_env, "LD_PRELOAD": str(paths.native_lib_dir() / "libflexnpu_shim.so"), "LD_DEBUG": "bindings"}
    r = subprocess.run([str(aclnn_ops), c.op, "fp32", *c.args, str(inp), str(tmp_path / "out")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    binds = [ln for ln in r.stderr.splitlines() if "libopapi.so" in ln and "`aclrtLaunchKernel'" in ln]
    assert binds and all("libflexnpu_shim.so" in ln for ln in binds), binds
