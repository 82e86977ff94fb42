"""The aclnn operator API (libnnopbase.so, libopapi.so) on the emulator's real device server.

Operators run in real processes: tests/progs/aclnn/aclnn_run.py drives them through ctypes
(the numerics, cost, timing-only and error cases), aclnn_smoke.c from C, aclnn_sample.cpp
from C++. Results are checked against references written here in plain Python (float64,
inputs rounded to the operator's dtype first), for each dtype family, with strided views and
broadcasting. Cost is checked against the built-in kernel that does the same work: an aclnn
operator must keep the device as busy as its built-in twin.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from flexnpu import paths
from flexnpu.observe.phase import classify_name
from flexnpu.workload.acl import FULL_BLOCK_DIM
from forward_fixtures import run_program, shim_env  # noqa: F401  (fixtures are used by name)

PROGS = Path(__file__).resolve().parent / "progs" / "aclnn"
RUNNER = PROGS / "aclnn_run.py"
NULLPTR, INVALID, RUNTIME = 161001, 161002, 361001
TOL = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.6e-2}  # relative, for one rounding of the result
DT_CODE = {"f32": 0, "f16": 1, "bf16": 27}
LOG_PREFIX = "libopapi (FlexNPU emulator): "


# ---------------------------------------------------------------- values and tensors


def to_bf16(x: float) -> float:
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0]


def rnd(dtype: str, x: float) -> float:
    """x as the dtype stores it (round to nearest even; integers wrap)."""
    if dtype == "f32":
        return struct.unpack("<f", struct.pack("<f", x))[0]
    if dtype == "f16":
        return struct.unpack("<e", struct.pack("<e", x))[0]
    if dtype == "bf16":
        return to_bf16(x)
    if dtype == "f64":
        return float(x)
    if dtype == "bool":
        return bool(x)
    bits = {"i8": 8, "u8": 8, "i16": 16, "i32": 32, "i64": 64}[dtype]
    x = int(x) & ((1 << bits) - 1)
    return x - (1 << bits) if dtype != "u8" and x >= 1 << (bits - 1) else x


def values(dtype: str, n: int, seed: int, lo: float = -1.0, hi: float = 1.0) -> list:
    r = random.Random(seed)
    if dtype == "bool":
        return [r.random() < 0.5 for _ in range(n)]
    if dtype in ("i8", "u8", "i16", "i32", "i64"):
        return [r.randint(int(lo * 50), int(hi * 50)) if dtype != "u8" else r.randint(0, 100) for _ in range(n)]
    return [rnd(dtype, r.uniform(lo, hi)) for _ in range(n)]


def contiguous(shape: list[int]) -> list[int]:
    out, s = [], 1
    for d in reversed(shape):
        out.append(s)
        s *= max(d, 1)
    return out[::-1]


def index_list(shape: list[int]) -> list[tuple]:
    idx = [()]
    for d in shape:
        idx = [i + (j,) for i in idx for j in range(d)]
    return idx


class T:
    """A tensor spec for the runner, and its values by index."""

    def __init__(self, dtype: str, shape: list[int], data="random", strides=None, offset: int = 0, storage=None,
                 seed: int = 0, lo: float = -1.0, hi: float = 1.0, obj: str | None = None) -> None:
        self.dtype, self.shape, self.offset = dtype, list(shape), offset
        self.strides = list(strides) if strides is not None else contiguous(shape)
        span = offset + sum((d - 1) * s for d, s in zip(self.shape, self.strides)) + 1 if all(self.shape) else 0
        self.storage = list(storage) if storage is not None else ([span] if self.shape else [])
        n = math.prod(self.storage) if self.storage else 1
        if data == "random":
            data = values(dtype, n, seed, lo, hi)
        self.data = data  # the whole storage, or "zeros", "host", "short", or None (no data: timing only)
        self.obj = obj  # "bad": pass a pointer that is no aclTensor; "destroyed": one already destroyed

    def spec(self) -> dict:
        return {"dtype": self.dtype, "shape": self.shape, "strides": self.strides, "offset": self.offset,
                "storage": self.storage, "data": self.data, "object": self.obj}

    def pos(self, idx: tuple) -> int:
        return self.offset + sum(i * s for i, s in zip(idx, self.strides))

    def at(self, idx: tuple):
        return self.data[self.pos(idx)]

    def view(self, storage_values: list) -> dict:
        """The view's values by index, from the storage the runner read back."""
        return {i: storage_values[self.pos(i)] for i in index_list(self.shape)}


def t(name: str) -> dict:
    return {"t": name}


def close(got: float, want: float, dtype: str, atol: float = 0.0) -> bool:
    if isinstance(want, bool) or dtype.startswith(("i", "u", "bool")):
        return got == want
    return abs(got - want) <= atol + TOL[dtype] * max(abs(want), 1e-30) + 1e-7


def assert_view(tensor: T, storage_values: list, want: Callable[[tuple], float], atol: float = 0.0) -> None:
    got = tensor.view(storage_values)
    bad = [(i, got[i], want(i)) for i in got if not close(got[i], want(i), tensor.dtype, atol)]
    assert not bad, f"{len(bad)} of {len(got)} elements differ, e.g. (index, got, want) {bad[:4]}"


# ---------------------------------------------------------------- running


@pytest.fixture
def aclnn(emulator, acl_env) -> Callable[..., tuple[list[dict], int, str]]:
    """aclnn(cases, kernels=False) runs cases in one ctypes process on a fresh 910b emulator;
    returns (results, pid, stderr)."""
    emu = emulator()

    def run(cases: list[dict], kernels: bool = False) -> tuple[list[dict], int, str]:
        job = {"cases": cases, "kernels": str(paths.emulator_kernel_library()) if kernels else None}
        r = subprocess.run([sys.executable, str(RUNNER)], input=json.dumps(job), env=acl_env, capture_output=True,
                           text=True, timeout=240)
        assert r.returncode == 0, f"runner exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
        lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
        assert len(lines) == len(cases) + 1, r.stdout
        return lines[:-1], lines[-1]["pid"], r.stderr

    run.emu = emu  # type: ignore[attr-defined]
    return run


def op_case(call: str, tensors: dict[str, T], args: list[dict], read: list[str], **extra) -> dict:
    return {"call": call, "tensors": {n: x.spec() for n, x in tensors.items()}, "args": args, "read": read, **extra}


def ok(res: dict) -> dict:
    assert res["rc"] == 0 and res["rc_run"] == [0] * len(res["rc_run"]) and res["rc_run"], res
    return res["out"]


# ---------------------------------------------------------------- element-wise


def broadcast_get(x: T, idx: tuple):
    """x's value at the broadcast index idx (numpy rules)."""
    k = len(idx) - len(x.shape)
    return x.at(tuple(0 if x.shape[j] == 1 else idx[k + j] for j in range(len(x.shape))))


BINARY_DTYPES = ["f32", "f16", "bf16", "i32", "i64", "i8", "bool"]


def binary_ref(op: str, a, b, alpha, out_dtype: str):
    if isinstance(a, bool) and isinstance(b, bool):
        return (a or (alpha and b)) if op == "add" else (a and b)
    r = a + alpha * b if op == "add" else a * b
    return rnd(out_dtype, r)


@pytest.mark.parametrize("dtype", BINARY_DTYPES)
def test_add_and_mul_broadcast_strided_views(dtype: str, aclnn) -> None:
    # self: a [4,3] view of a [3,6] storage, transposed and every other column; other: [3] row
    self_ = T(dtype, [4, 3], strides=[1, 6], offset=1, storage=[3, 6], seed=1)
    other = T(dtype, [3], seed=2)
    col = T(dtype, [4, 1], seed=3)
    alpha, adt = (True, "bool") if dtype == "bool" else ((3, "i32") if dtype[0] == "i" else (0.5, "f32"))
    out = {n: T(dtype, [4, 3], data="zeros") for n in ("add", "mul", "addc")}
    cases = [
        op_case("aclnnAdd", {"s": self_, "o": other, "out": out["add"]},
                [t("s"), t("o"), {"scalar": alpha, "dtype": adt}, t("out")], ["out"]),
        op_case("aclnnMul", {"s": self_, "o": other, "out": out["mul"]}, [t("s"), t("o"), t("out")], ["out"]),
        op_case("aclnnAdd", {"s": self_, "o": col, "out": out["addc"]},
                [t("s"), t("o"), {"scalar": alpha, "dtype": adt}, t("out")], ["out"]),
    ]
    res, _, _ = aclnn(cases)
    for r, (name, op, rhs, scale) in zip(res, (("add", "add", other, alpha), ("mul", "mul", other, 1),
                                                ("addc", "add", col, alpha))):
        assert_view(out[name], ok(r)["out"],
                    lambda i: binary_ref(op, self_.at(i), broadcast_get(rhs, i), scale, dtype))


def test_inplace_add_mul_and_type_promotion(aclnn) -> None:
    base = T("f32", [2, 3], seed=4)
    other = T("f16", [3], seed=5)
    ints = T("i32", [2, 3], seed=6)
    halves = T("f16", [2, 3], seed=7)
    promo = T("f32", [2, 3], data="zeros")
    cases = [
        op_case("aclnnInplaceAdd", {"s": base, "o": other}, [t("s"), t("o"), {"scalar": 2.0, "dtype": "f32"}], ["s"]),
        op_case("aclnnInplaceMul", {"s": base, "o": other}, [t("s"), t("o")], ["s"]),
        # int32 with float16 promotes to float16, written to a float32 out
        op_case("aclnnMul", {"a": ints, "b": halves, "out": promo}, [t("a"), t("b"), t("out")], ["out"]),
    ]
    res, _, _ = aclnn(cases)
    assert_view(base, ok(res[0])["s"], lambda i: rnd("f32", base.at(i) + 2 * other.at(i[1:])))
    assert_view(base, ok(res[1])["s"], lambda i: rnd("f32", base.at(i) * other.at(i[1:])))
    assert_view(promo, ok(res[2])["out"], lambda i: rnd("f16", ints.at(i) * halves.at(i)), atol=0)


def silu(x: float) -> float:
    return x / (1 + math.exp(-x))


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_silu_swiglu_softmax(dtype: str, aclnn) -> None:
    x = T(dtype, [3, 4], strides=[1, 3], storage=[4, 3], seed=8, lo=-4, hi=4)  # a transposed view
    silu_out = T(dtype, [3, 4], data="zeros")
    g = T(dtype, [2, 6], seed=9, lo=-3, hi=3)
    glu_last, glu_first = T(dtype, [2, 3], data="zeros"), T(dtype, [1, 6], data="zeros")
    sm_last, sm_first = T(dtype, [3, 4], data="zeros"), T(dtype, [3, 4], data="zeros")
    cases = [
        op_case("aclnnSilu", {"x": x, "o": silu_out}, [t("x"), t("o")], ["o"]),
        op_case("aclnnSwiGlu", {"x": g, "o": glu_last}, [t("x"), {"i64": -1}, t("o")], ["o"]),
        op_case("aclnnSwiGlu", {"x": g, "o": glu_first}, [t("x"), {"i64": 0}, t("o")], ["o"]),
        op_case("aclnnSoftmax", {"x": x, "o": sm_last}, [t("x"), {"i64": -1}, t("o")], ["o"]),
        op_case("aclnnSoftmax", {"x": x, "o": sm_first}, [t("x"), {"i64": 0}, t("o")], ["o"]),
    ]
    res, _, _ = aclnn(cases)
    assert_view(silu_out, ok(res[0])["o"], lambda i: rnd(dtype, silu(x.at(i))))
    assert_view(glu_last, ok(res[1])["o"], lambda i: rnd(dtype, silu(g.at(i)) * g.at((i[0], i[1] + 3))))
    assert_view(glu_first, ok(res[2])["o"], lambda i: rnd(dtype, silu(g.at((0, i[1]))) * g.at((1, i[1]))))

    def softmax(i: tuple, dim: int) -> float:
        row = [x.at(i[:dim] + (j,) + i[dim + 1:]) for j in range(x.shape[dim])]
        m = max(row)
        return math.exp(x.at(i) - m) / sum(math.exp(v - m) for v in row)

    assert_view(sm_last, ok(res[3])["o"], lambda i: rnd(dtype, softmax(i, 1)), atol=1e-6)
    assert_view(sm_first, ok(res[4])["o"], lambda i: rnd(dtype, softmax(i, 0)), atol=1e-6)


@pytest.mark.parametrize("dtype,gdtype", [("f32", "f32"), ("f16", "f32"), ("bf16", "bf16"), ("f16", "f16")])
def test_rms_norm(dtype: str, gdtype: str, aclnn) -> None:
    x = T(dtype, [2, 3, 8], seed=10, lo=-2, hi=2)
    g1, g2 = T(gdtype, [8], seed=11), T(gdtype, [3, 8], seed=12)
    y1, y2 = T(dtype, [2, 3, 8], data="zeros"), T(dtype, [2, 3, 8], data="zeros")
    r1, r2 = T("f32", [2, 3, 1], data="zeros"), T("f32", [2, 1, 1], data="zeros")
    eps = 1e-6
    cases = [
        op_case("aclnnRmsNorm", {"x": x, "g": g1, "y": y1, "r": r1}, [t("x"), t("g"), {"f64": eps}, t("y"), t("r")],
                ["y", "r"]),
        op_case("aclnnRmsNorm", {"x": x, "g": g2, "y": y2, "r": r2}, [t("x"), t("g"), {"f64": eps}, t("y"), t("r")],
                ["y", "r"]),
    ]
    res, _, _ = aclnn(cases)

    def rstd(lead: tuple) -> float:
        row = [x.at(i) for i in index_list(x.shape) if i[:len(lead)] == lead]
        return 1 / math.sqrt(sum(v * v for v in row) / len(row) + eps)

    out = ok(res[0])
    assert_view(r1, out["r"], lambda i: rnd("f32", rstd(i[:2])))
    assert_view(y1, out["y"], lambda i: rnd(dtype, x.at(i) * rstd(i[:2]) * g1.at(i[2:])))
    out = ok(res[1])
    assert_view(r2, out["r"], lambda i: rnd("f32", rstd(i[:1])))
    assert_view(y2, out["y"], lambda i: rnd(dtype, x.at(i) * rstd(i[:1]) * g2.at(i[1:])))


# ---------------------------------------------------------------- matmul


def matmul_ref(a: T, b: T, idx: tuple, m_of: Callable, n_of: Callable, conv: Callable = lambda v: v) -> float:
    return sum(conv(m_of(a, idx, p)) * conv(n_of(b, idx, p)) for p in range(a.shape[-1]))


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_matmul_2d_batched_vectors_and_transposed_views(dtype: str, aclnn) -> None:
    a = T(dtype, [5, 7], seed=20)
    bt = T(dtype, [7, 6], strides=[1, 7], storage=[6, 7], seed=21)  # a transposed view
    o2 = T(dtype, [5, 6], data="zeros")
    ab = T(dtype, [2, 1, 3, 4], seed=22)
    bb = T(dtype, [3, 4, 2], seed=23)
    ob = T(dtype, [2, 3, 3, 2], data="zeros")  # batch [2,1] with [3] broadcasts to [2,3]
    v = T(dtype, [7], seed=24)
    ov = T(dtype, [5], data="zeros")
    cases = [
        op_case("aclnnMatmul", {"a": a, "b": bt, "o": o2}, [t("a"), t("b"), t("o"), {"i8": 0}], ["o"]),
        op_case("aclnnMatmul", {"a": ab, "b": bb, "o": ob}, [t("a"), t("b"), t("o"), {"i8": 1}], ["o"]),
        op_case("aclnnMatmul", {"a": a, "b": v, "o": ov}, [t("a"), t("b"), t("o"), {"i8": 0}], ["o"]),
    ]
    res, pid, _ = aclnn(cases)
    atol = 4e-3 if dtype == "bf16" else 1e-3
    assert_view(o2, ok(res[0])["o"], lambda i: rnd(dtype, sum(a.at((i[0], p)) * bt.at((p, i[1])) for p in range(7))),
                atol=atol)
    assert_view(ob, ok(res[1])["o"], lambda i: rnd(dtype, sum(
        ab.at((i[0], 0, i[2], p)) * bb.at((i[1], p, i[3])) for p in range(4))), atol=atol)
    assert_view(ov, ok(res[2])["o"], lambda i: rnd(dtype, sum(a.at((i[0], p)) * v.at((p,)) for p in range(7))),
                atol=atol)
    # a 2-D product is MatMulV2 on the device, a batched one BatchMatMulV2
    counts = aclnn.emu.client(pid)["count_by_name"]
    assert counts.get("MatMulV2") == 2 and counts.get("BatchMatMulV2") == 1, counts


def test_matmul_use_fp16_rounds_fp32_inputs(aclnn) -> None:
    a = T("f32", [1, 3], data=[1 / 3, 2 / 3, 1 / 7])
    b = T("f32", [3, 1], data=[3.0, 1 / 9, 1 / 11])
    o_keep, o_fp16 = T("f32", [1, 1], data="zeros"), T("f32", [1, 1], data="zeros")
    cases = [op_case("aclnnMatmul", {"a": a, "b": b, "o": o}, [t("a"), t("b"), t("o"), {"i8": mode}], ["o"])
             for o, mode in ((o_keep, 0), (o_fp16, 2))]
    res, _, _ = aclnn(cases)
    exact = sum(x * y for x, y in zip(a.data, b.data))
    halves = sum(rnd("f16", x) * rnd("f16", y) for x, y in zip(a.data, b.data))
    assert ok(res[0])["o"][0] == pytest.approx(exact, rel=1e-6)
    assert ok(res[1])["o"][0] == pytest.approx(halves, rel=1e-6)
    assert abs(halves - exact) > 1e-5  # the two modes are told apart


# ---------------------------------------------------------------- rotary embedding


def rotate(mode: str, row: list[float]) -> list[float]:
    d = len(row)
    if mode == "interleave":
        out = [0.0] * d
        for i in range(0, d, 2):
            out[i], out[i + 1] = -row[i + 1], row[i]
        return out
    part = d // 2 if mode == "half" else d // 4
    out = []
    for base in range(0, d, 2 * part):
        out += [-v for v in row[base + part:base + 2 * part]] + row[base:base + part]
    return out


@pytest.mark.parametrize("dtype,layout,mode", [
    ("f32", 1, "half"), ("f16", 1, "half"), ("bf16", 3, "interleave"), ("f16", 2, "quarter"), ("f32", 3, "half"),
])
def test_apply_rotary_pos_emb(dtype: str, layout: int, mode: str, aclnn) -> None:
    D = 128
    # shapes by layout: BSND (B,S,N,D), SBND (S,B,N,D), BNSD (B,N,S,D); cos and sin have N = 1
    nq, nk, b, s = 2, 1, 2, 3
    shape = {1: lambda n: [b, s, n, D], 2: lambda n: [s, b, n, D], 3: lambda n: [b, n, s, D]}[layout]
    ndim = 1 if layout == 3 else 2
    q, k = T(dtype, shape(nq), seed=30), T(dtype, shape(nk), seed=31)
    cos, sin = T(dtype, shape(1), seed=32), T(dtype, shape(1), seed=33)
    q0, k0 = list(q.data), list(k.data)
    call = "aclnnApplyRotaryPosEmb" if mode == "half" and layout == 1 and dtype != "f32" else "aclnnApplyRotaryPosEmbV2"
    args = [t("q"), t("k"), t("c"), t("s"), {"i64": layout}] + ([{"str": mode}] if call.endswith("V2") else [])
    res, _, _ = aclnn([op_case(call, {"q": q, "k": k, "c": cos, "s": sin}, args, ["q", "k"])])
    out = ok(res[0])

    def want(x: T, orig: list, i: tuple) -> float:
        row_idx = i[:3]
        row = [orig[x.pos(row_idx + (e,))] for e in range(D)]
        cidx = tuple(0 if j == ndim else i[j] for j in range(3))
        rot = rotate(mode, row)
        return rnd(dtype, row[i[3]] * cos.at(cidx + (i[3],)) + rot[i[3]] * sin.at(cidx + (i[3],)))

    assert_view(q, out["q"], lambda i: want(q, q0, i), atol=1e-3)
    assert_view(k, out["k"], lambda i: want(k, k0, i), atol=1e-3)


# ---------------------------------------------------------------- attention


def canon(dtype: str, B: int, N: int, S: int, D: int, seed: int) -> list:
    r = random.Random(seed)
    return [[[[rnd(dtype, r.uniform(-1, 1)) for _ in range(D)] for _ in range(S)] for _ in range(N)]
            for _ in range(B)]


def lay_out(x: list, layout: str) -> tuple[list, list[int]]:
    """Canonical [B][N][S][D] values as the storage of a tensor in a layout."""
    B, N, S, D = len(x), len(x[0]), len(x[0][0]), len(x[0][0][0])
    if layout in ("BNSD", "BNSD_BSND"):
        return [x[b][n][s][d] for b in range(B) for n in range(N) for s in range(S) for d in range(D)], [B, N, S, D]
    flat = [x[b][n][s][d] for b in range(B) for s in range(S) for n in range(N) for d in range(D)]
    return flat, ([B, S, N * D] if layout == "BSH" else [B, S, N, D])


def read_back(flat: list, layout: str, B: int, N: int, S: int, D: int) -> list:
    if layout == "BNSD":
        return [[[flat[((b * N + n) * S + s) * D:((b * N + n) * S + s) * D + D] for s in range(S)] for n in range(N)]
                for b in range(B)]
    return [[[flat[((b * S + s) * N + n) * D:((b * S + s) * N + n) * D + D] for s in range(S)] for n in range(N)]
            for b in range(B)]


def attention_ref(q, k, v, qlen, kvlen, group: int, scale: float, allow: Callable) -> tuple[list, list]:
    """Output [B][N][S][D] (zeros where nothing is attended) and the log-sum-exp [B][N][S]."""
    out, lse = [], []
    for b in range(len(q)):
        ob, lb = [], []
        for n in range(len(q[0])):
            on, ln = [], []
            for i in range(len(q[0][0])):
                keys = [j for j in range(kvlen[b]) if i < qlen[b] and allow(b, i, j)]
                if not keys:
                    on.append([0.0] * len(v[0][0][0]))
                    ln.append(math.inf)
                    continue
                kv = k[b][n // group]
                sc = {j: scale * sum(x * y for x, y in zip(q[b][n][i], kv[j])) for j in keys}
                m = max(sc.values())
                w = {j: math.exp(s - m) for j, s in sc.items()}
                tot = sum(w.values())
                vv = v[b][n // group]
                on.append([sum(w[j] * vv[j][d] for j in keys) / tot for d in range(len(vv[0]))])
                ln.append(m + math.log(tot))
            ob.append(on)
            lb.append(ln)
        out.append(ob)
        lse.append(lb)
    return out, lse


def assert_close_nested(got: list, want: list, atol: float) -> None:
    flat_g, flat_w = [], []

    def walk(g, w):
        if isinstance(w, list):
            assert len(g) == len(w)
            for a, b in zip(g, w):
                walk(a, b)
        else:
            flat_g.append(g)
            flat_w.append(w)

    walk(got, want)
    bad = [(i, a, b) for i, (a, b) in enumerate(zip(flat_g, flat_w))
           if not (a == b or abs(a - b) <= atol)]
    assert not bad, f"{len(bad)} of {len(flat_w)} values differ, e.g. (position, got, want) {bad[:4]}"


def none(n: int) -> list[dict]:
    return [{"t": None}] * n


def fia_args(q: str, k: str, v: str, out: str, *, mask=None, qlens=None, kvlens=None, table=None, heads: int,
             scale: float, pre: int = 2147483647, nxt: int = 2147483647, layout: str, kv_heads: int = 0,
             sparse: int = 0, block: int = 0, lse: str | None = None) -> list[dict]:
    """aclnnFusedInferAttentionScoreV2's arguments."""
    return ([t(q), {"tl": [k]}, {"tl": [v]}, {"t": None}, {"t": mask}, {"ia": qlens}, {"ia": kvlens}] + none(7) +
            [{"t": table}] + none(8) + [{"ia": None}, {"i64": heads}, {"f64": scale}, {"i64": pre}, {"i64": nxt},
                                       {"str": layout}, {"i64": kv_heads}, {"i64": sparse}, {"i64": 0},
                                       {"i64": block}, {"i64": 0}, {"bool": lse is not None}, {"i64": 0},
                                       {"i64": 0}, t(out), {"t": lse}])


def pfa_args(q: str, k: str, v: str, out: str, *, mask=None, qlens=None, kvlens=None, heads: int, scale: float,
             pre: int = 2147483647, nxt: int = 2147483647, layout: str, kv_heads: int = 0, sparse: int = 0) -> list:
    return ([t(q), t(k), t(v), {"t": None}, {"t": mask}, {"ia": qlens}, {"ia": kvlens}] + none(5) +
            [{"i64": heads}, {"f64": scale}, {"i64": pre}, {"i64": nxt}, {"str": layout}, {"i64": kv_heads},
             {"i64": sparse}, {"i64": 1}, t(out)])


def ifa_args(q: str, k: str, v: str, out: str, *, mask=None, lens=None, table=None, heads: int, scale: float,
             layout: str, kv_heads: int = 0, block: int = 0) -> list:
    return ([t(q), {"tl": [k]}, {"tl": [v]}, {"t": None}, {"t": mask}, {"ia": lens}] + none(7) +
            [{"t": table}, {"t": None}, {"i64": heads}, {"f64": scale}, {"str": layout}, {"i64": kv_heads},
             {"i64": block}, {"i64": 1}, t(out)])


def raw(dtype: str, flat: list, shape: list[int]) -> T:
    return T(dtype, shape, data=flat)


COMPRESSED = T("bool", [2048, 2048], data="zeros")  # sparse modes 2-4: content is not read


@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD", "BNSD_BSND"])
def test_prompt_flash_attention_causal_gqa_layouts(layout: str, aclnn) -> None:
    B, N, KVN, S, D, dtype = 2, 4, 2, 5, 8, "f16"
    q, k, v = canon(dtype, B, N, S, D, 40), canon(dtype, B, KVN, S, D, 41), canon(dtype, B, KVN, S, D, 42)
    lay_in = "BNSD" if layout == "BNSD_BSND" else layout
    (fq, sq), (fk, sk), (fv, sv) = lay_out(q, lay_in), lay_out(k, lay_in), lay_out(v, lay_in)
    out_shape = [B, S, N, D] if layout == "BNSD_BSND" else sq
    o = T(dtype, out_shape, data="zeros")
    scale = 1 / math.sqrt(D)
    tensors = {"q": raw(dtype, fq, sq), "k": raw(dtype, fk, sk), "v": raw(dtype, fv, sv), "o": o, "m": COMPRESSED}
    res, pid, _ = aclnn([op_case("aclnnPromptFlashAttentionV3", tensors,
                                 pfa_args("q", "k", "v", "o", mask="m", heads=N, kv_heads=KVN, scale=scale,
                                          layout=layout, sparse=3), ["o"])])
    got = read_back(ok(res[0])["o"], "BSND" if layout == "BNSD_BSND" else lay_in, B, N, S, D)
    want, _ = attention_ref(q, k, v, [S] * B, [S] * B, N // KVN, scale, lambda b, i, j: j <= i)
    assert_close_nested(got, want, 4e-3)
    assert aclnn.emu.client(pid)["count_by_name"].get("PromptFlashAttention") == 1


def test_prompt_flash_attention_masks_bands_and_lengths(aclnn) -> None:
    B, N, Sq, Skv, D, dtype = 2, 2, 4, 6, 8, "bf16"
    q, k, v = canon(dtype, B, N, Sq, D, 50), canon(dtype, B, N, Skv, D, 51), canon(dtype, B, N, Skv, D, 52)
    (fq, sq), (fk, sk), (fv, sv) = lay_out(q, "BNSD"), lay_out(k, "BNSD"), lay_out(v, "BNSD")
    r = random.Random(53)
    mask = [[[r.random() < 0.3 for _ in range(Skv)] for _ in range(Sq)] for _ in range(B)]
    mt = T("bool", [B, 1, Sq, Skv], data=[x for b in mask for row in b for x in row])
    scale, qlens, kvlens = 0.3, [3, 4], [5, 6]
    outs = {name: T(dtype, sq, data="zeros") for name in ("full", "band", "causal", "lens")}
    base = {"q": raw(dtype, fq, sq), "k": raw(dtype, fk, sk), "v": raw(dtype, fv, sv)}
    cases = [
        # sparse 0 with a full mask and a band of preTokens 1, nextTokens 2 (top-left origin)
        op_case("aclnnPromptFlashAttentionV3", {**base, "o": outs["band"], "m": mt},
                pfa_args("q", "k", "v", "o", mask="m", heads=N, scale=scale, pre=1, nxt=2, layout="BNSD"), ["o"]),
        # sparse 1: the mask alone
        op_case("aclnnPromptFlashAttentionV3", {**base, "o": outs["full"], "m": mt},
                pfa_args("q", "k", "v", "o", mask="m", heads=N, scale=scale, layout="BNSD", sparse=1), ["o"]),
        # sparse 4: a band of preTokens 2, nextTokens 0 from the bottom-right corner
        op_case("aclnnPromptFlashAttentionV3", {**base, "o": outs["causal"], "m": COMPRESSED},
                pfa_args("q", "k", "v", "o", mask="m", heads=N, scale=scale, pre=2, nxt=0, layout="BNSD",
                         sparse=4), ["o"]),
        # sparse 3 with actual lengths: rows past a batch's query length stay zero
        op_case("aclnnPromptFlashAttentionV3", {**base, "o": outs["lens"], "m": COMPRESSED},
                pfa_args("q", "k", "v", "o", mask="m", qlens=qlens, kvlens=kvlens, heads=N, scale=scale,
                         layout="BNSD", sparse=3), ["o"]),
    ]
    res, _, _ = aclnn(cases)
    full = [Sq] * B, [Skv] * B
    checks = [
        (full, lambda b, i, j: not mask[b][i][j] and -1 <= j - i <= 2),
        (full, lambda b, i, j: not mask[b][i][j]),
        (full, lambda b, i, j: -2 <= j - (i + Skv - Sq) <= 0),
        ((qlens, kvlens), lambda b, i, j: j <= i + kvlens[b] - qlens[b]),
    ]
    for r_, ((ql, kl), allow) in zip(res, checks):
        want, _ = attention_ref(q, k, v, ql, kl, 1, scale, allow)
        assert_close_nested(read_back(ok(r_)["o"], "BNSD", B, N, Sq, D), want, 2.5e-2)


def paged_cache(kv: list, block: int, kvlens: list[int], heads_major: bool, dtype: str, seed: int):
    """A paged cache holding each batch's keys in shuffled blocks, and its block table."""
    B, KVN, S, D = len(kv), len(kv[0]), len(kv[0][0]), len(kv[0][0][0])
    per = -(-S // block)
    ids = list(range(B * per + 1))  # one spare block nobody reads
    random.Random(seed).shuffle(ids)
    table = [ids[b * per:(b + 1) * per] for b in range(B)]
    nblocks = len(ids)
    cache = {}
    for b in range(B):
        for j in range(kvlens[b]):
            for h in range(KVN):
                for d in range(D):
                    blk, o = table[b][j // block], j % block
                    if heads_major:
                        pos = ((blk * KVN + h) * block + o) * D + d
                    else:
                        pos = (blk * block + o) * KVN * D + h * D + d
                    cache[pos] = kv[b][h][j][d]
    size = nblocks * block * KVN * D
    flat = [cache.get(i, rnd(dtype, 9.0)) for i in range(size)]  # unread slots hold a value that would show
    shape = [nblocks, KVN, block, D] if heads_major else [nblocks, block, KVN * D]
    return T(dtype, shape, data=flat), T("i32", [B, per], data=[x for row in table for x in row])


@pytest.mark.parametrize("heads_major", [False, True])
def test_incre_flash_attention_paged_gqa_mask(heads_major: bool, aclnn) -> None:
    B, N, KVN, S, D, block, dtype = 3, 4, 2, 10, 8, 4, "f16"
    q, k, v = canon(dtype, B, N, 1, D, 60), canon(dtype, B, KVN, S, D, 61), canon(dtype, B, KVN, S, D, 62)
    kvlens = [10, 3, 7]
    kc, table = paged_cache(k, block, kvlens, heads_major, dtype, 63)
    vc, _ = paged_cache(v, block, kvlens, heads_major, dtype, 63)
    fq, sq = lay_out(q, "BNSD" if heads_major else "BSH")
    r = random.Random(64)
    masked = [[r.random() < 0.25 and j > 0 for j in range(12)] for _ in range(B)]  # never the first key
    mt = T("bool", [B, 1, 1, 12], data=[x for row in masked for x in row])
    o, plain_o = T(dtype, sq, data="zeros"), T(dtype, sq, data="zeros")
    layout = "BNSD" if heads_major else "BSH"
    scale = 1 / math.sqrt(D)
    tensors = {"q": raw(dtype, fq, sq), "k": kc, "v": vc, "t": table, "o": o, "m": mt}
    cases = [
        op_case("aclnnIncreFlashAttentionV4", tensors,
                ifa_args("q", "k", "v", "o", mask="m", lens=kvlens, table="t", heads=N, kv_heads=KVN, scale=scale,
                         layout=layout, block=block), ["o"]),
        op_case("aclnnFusedInferAttentionScoreV2", {**tensors, "o": plain_o},
                fia_args("q", "k", "v", "o", kvlens=kvlens, table="t", heads=N, kv_heads=KVN, scale=scale,
                         layout=layout, block=block), ["o"]),
    ]
    res, pid, _ = aclnn(cases)
    want, _ = attention_ref(q, k, v, [1] * B, kvlens, N // KVN, scale, lambda b, i, j: not masked[b][j])
    assert_close_nested(read_back(ok(res[0])["o"], layout, B, N, 1, D), want, 4e-3)
    want, _ = attention_ref(q, k, v, [1] * B, kvlens, N // KVN, scale, lambda b, i, j: True)
    assert_close_nested(read_back(ok(res[1])["o"], layout, B, N, 1, D), want, 4e-3)
    # both took the decode branch: the IncreFlashAttention kernel
    assert aclnn.emu.client(pid)["count_by_name"].get("IncreFlashAttention") == 2


def test_fused_infer_attention_tnd_and_softmax_lse(aclnn) -> None:
    N, KVN, D, dtype = 2, 1, 8, "bf16"
    qlens, kvlens = [3, 1, 4], [5, 2, 4]  # per batch; TND takes them cumulative
    B, Smax = 3, 5
    q, k, v = canon(dtype, B, N, Smax, D, 70), canon(dtype, B, KVN, Smax, D, 71), canon(dtype, B, KVN, Smax, D, 72)
    tq = [q[b][n][s][d] for b in range(B) for s in range(qlens[b]) for n in range(N) for d in range(D)]
    tk = [k[b][h][s][d] for b in range(B) for s in range(kvlens[b]) for h in range(KVN) for d in range(D)]
    tv = [v[b][h][s][d] for b in range(B) for s in range(kvlens[b]) for h in range(KVN) for d in range(D)]
    Tq, Tk = sum(qlens), sum(kvlens)
    o = T(dtype, [Tq, N, D], data="zeros")
    lse = T("f32", [Tq, N, 1], data="zeros")
    cum = lambda xs: [sum(xs[:i + 1]) for i in range(len(xs))]  # noqa: E731
    tensors = {"q": raw(dtype, tq, [Tq, N, D]), "k": raw(dtype, tk, [Tk, KVN, D]), "v": raw(dtype, tv, [Tk, KVN, D]),
               "o": o, "m": COMPRESSED, "l": lse}
    scale = 0.5
    res, _, _ = aclnn([op_case("aclnnFusedInferAttentionScoreV2", tensors,
                               fia_args("q", "k", "v", "o", mask="m", qlens=cum(qlens), kvlens=cum(kvlens), heads=N,
                                        kv_heads=KVN, scale=scale, layout="TND", sparse=3, lse="l"), ["o", "l"])])
    out = ok(res[0])
    want, wlse = attention_ref(q, k, v, qlens, kvlens, N, scale, lambda b, i, j: j <= i + kvlens[b] - qlens[b])
    got, glse, tok = [], [], 0
    for b in range(B):
        for s in range(qlens[b]):
            for n in range(N):
                got.append(out["o"][(tok * N + n) * D:(tok * N + n) * D + D])
                glse.append(out["l"][tok * N + n])
            tok += 1
    want_rows = [want[b][n][s] for b in range(B) for s in range(qlens[b]) for n in range(N)]
    want_lse = [wlse[b][n][s] for b in range(B) for s in range(qlens[b]) for n in range(N)]
    assert_close_nested(got, want_rows, 2.5e-2)
    assert_close_nested(glse, want_lse, 1e-3)


# ---------------------------------------------------------------- cost, timing only, phases


def timing_only(dtype: str, shape: list[int]) -> T:
    return T(dtype, shape, data=None)


def busy_pair(aclnn, op: dict, builtin: str, fmt: str, vals: list,
              block_dim: int = FULL_BLOCK_DIM) -> tuple[dict, dict]:
    """Runs the operator and the built-in in one process; returns its busy and count by name."""
    res, pid, _ = aclnn([op, {"builtin": builtin, "fmt": fmt, "values": vals, "block_dim": block_dim}], kernels=True)
    ok(res[0])
    assert res[1]["rc"] == 0, res
    c = aclnn.emu.client(pid)
    return c["busy_by_name"], c["count_by_name"]


def assert_same_busy(busy: dict, a: str, b: str) -> None:
    assert busy[a] > 0 and abs(busy[a] - busy[b]) <= 2 + 1e-6 * busy[b], busy


def test_matmul_costs_what_gemm_costs(aclnn) -> None:
    m, n, k = 1024, 2048, 512
    op = op_case("aclnnMatmul", {"a": timing_only("f16", [m, k]), "b": timing_only("f16", [k, n]),
                                 "o": timing_only("f16", [m, n])}, [t("a"), t("b"), t("o"), {"i8": 0}], [])
    busy, _ = busy_pair(aclnn, op, "gemm", "<QQQIIIi", [0, 0, 0, m, n, k, 1])
    assert_same_busy(busy, "MatMulV2", "gemm")
    # and that is the 910b model's roofline: 2mnk FLOPs at 60 % of 353.9 TFLOPS, every operand's
    # bytes once at 40 % of 1.6 TB/s (this shape is memory-bound)
    flops_ns, bytes_ns = 2 * m * n * k / (353.9e12 * 0.6) * 1e9, 2 * (m * k + k * n + m * n) / (1.6e12 * 0.4) * 1e9
    assert bytes_ns > flops_ns
    assert busy["gemm"] == pytest.approx(bytes_ns, abs=1.5)


@pytest.mark.parametrize("case", ["prefill", "extend", "decode"])
def test_fused_attention_costs_what_the_attention_builtins_cost(case: str, aclnn) -> None:
    B, N, KVN, D = 2, 8, 2, 128
    # shapes whose tiling fills the device (PromptFlashAttention's blockDim B·N·⌈Sq/128⌉ >= 24
    # cores), as the built-in it is compared with does: a smaller one runs on fewer cores
    sq, skv = {"prefill": (512, 512), "extend": (320, 512), "decode": (1, 1000)}[case]
    q, o = timing_only("f16", [B, N, sq, D]), timing_only("f16", [B, N, sq, D])
    kv = {"k": timing_only("f16", [B, KVN, skv, D]), "v": timing_only("f16", [B, KVN, skv, D])}
    mask = {} if case == "decode" else {"m": T("bool", [2048, 2048], data=None)}
    op = op_case("aclnnFusedInferAttentionScoreV2", {"q": q, "o": o, **kv, **mask},
                 fia_args("q", "k", "v", "o", mask=None if case == "decode" else "m", heads=N, kv_heads=KVN,
                          scale=0.1, layout="BNSD", sparse=0 if case == "decode" else 3), [])
    if case == "prefill":
        busy, counts = busy_pair(aclnn, op, "attention_prefill", "<QQQQIIIIIi", [0, 0, 0, 0, B, N, KVN, sq, D, 1])
        assert_same_busy(busy, "PromptFlashAttention", "attention_prefill")
    elif case == "extend":
        busy, counts = busy_pair(aclnn, op, "attention_extend", "<QQQQIIIIIIi",
                                 [0, 0, 0, 0, B, N, KVN, sq, skv, D, 1])
        assert_same_busy(busy, "PromptFlashAttention", "attention_extend")
    else:
        busy, counts = busy_pair(aclnn, op, "attention_decode", "<QQQQIIIIIi", [0, 0, 0, 0, B, N, KVN, skv, D, 1])
        assert_same_busy(busy, "IncreFlashAttention", "attention_decode")


def test_a_small_tiling_runs_on_fewer_cores(aclnn) -> None:
    """A 64-token chunk tiles PromptFlashAttention over B·N·⌈64/128⌉ = 16 of the 24 cube cores
    (its blockDim; mix kernels count cube cores): it costs what the built-in costs on 16 cores,
    and more than on the whole device (the contexts mode's compute scales with cores held)."""
    B, N, KVN, D, sq, skv = 2, 8, 2, 128, 64, 512
    q, o = timing_only("f16", [B, N, sq, D]), timing_only("f16", [B, N, sq, D])
    kv = {"k": timing_only("f16", [B, KVN, skv, D]), "v": timing_only("f16", [B, KVN, skv, D])}
    op = op_case("aclnnFusedInferAttentionScoreV2", {"q": q, "o": o, **kv, "m": T("bool", [2048, 2048], data=None)},
                 fia_args("q", "k", "v", "o", mask="m", heads=N, kv_heads=KVN, scale=0.1, layout="BNSD", sparse=3), [])
    vals = [0, 0, 0, 0, B, N, KVN, sq, skv, D, 1]
    ext = {"builtin": "attention_extend", "fmt": "<QQQQIIIIIIi", "values": vals}
    busy, _ = busy_pair(aclnn, op, "attention_extend", ext["fmt"], vals, block_dim=16)
    assert_same_busy(busy, "PromptFlashAttention", "attention_extend")
    res, pid, _ = aclnn([ext], kernels=True)  # the built-in on the whole device, alone
    assert res[0]["rc"] == 0, res
    full = aclnn.emu.client(pid)["busy_by_name"]["attention_extend"]
    assert busy["PromptFlashAttention"] > 1.3 * full, (busy, full)


def test_band_cost_is_counted_exactly_for_long_sequences(aclnn) -> None:
    # sparse mode 4, preTokens 1000, nextTokens 0 over a million tokens: row i attends
    # min(i, 1000) + 1 keys; compute-bound, so the busy time is the FLOPs' time
    S, N, D, pre = 1 << 20, 1, 128, 1000
    x = {n: timing_only("f16", [1, N, S, D]) for n in "qkvo"}
    op = op_case("aclnnPromptFlashAttentionV3", {**x, "m": T("bool", [2048, 2048], data=None)},
                 pfa_args("q", "k", "v", "o", mask="m", heads=N, scale=0.1, pre=pre, nxt=0, layout="BNSD",
                          sparse=4), [])
    res, pid, _ = aclnn([op])
    ok(res[0])
    pairs = (pre + 1) * S - pre * (pre + 1) // 2
    flops_ns = 4 * N * D * pairs / (353.9e12 * 0.45) * 1e9  # attention_prefill's efficiency: sq = skv
    assert aclnn.emu.client(pid)["busy_by_name"]["PromptFlashAttention"] == pytest.approx(flops_ns, abs=1.5)


def test_timing_only_costs_and_touches_nothing(aclnn) -> None:
    m = n = k = 4096
    op = op_case("aclnnMatmul", {"a": timing_only("bf16", [m, k]), "b": timing_only("bf16", [k, n]),
                                 "o": timing_only("bf16", [m, n])}, [t("a"), t("b"), t("o"), {"i8": 0}], [])
    big_add = op_case("aclnnAdd", {"a": timing_only("f32", [1 << 20]), "b": timing_only("f32", [1 << 20]),
                                   "o": timing_only("f32", [1 << 20])},
                      [t("a"), t("b"), {"scalar": 1.0, "dtype": "f32"}, t("o")], [])
    res, pid, _ = aclnn([op, big_add])
    ok(res[0]), ok(res[1])
    c = aclnn.emu.client(pid)
    assert c["count_by_name"]["MatMulV2"] == 1 and c["count_by_name"]["Add"] == 1
    assert c["allocs"] == 0  # no tensor had device memory
    # busy times are whole ns
    assert c["busy_by_name"]["MatMulV2"] == pytest.approx(2 * m * n * k / (353.9e12 * 0.6) * 1e9, abs=1.5)
    # an element-wise add is memory-bound: 12 bytes per element at 50 % of 1.6 TB/s
    assert c["busy_by_name"]["Add"] == pytest.approx(12 * (1 << 20) / (1.6e12 * 0.5) * 1e9, abs=1.5)


def test_attention_kernel_names_tell_the_phase_classifier_the_phase(aclnn) -> None:
    B, N, D = 1, 2, 16
    prefill = op_case("aclnnPromptFlashAttentionV3",
                      {"q": timing_only("f16", [B, 8, N * D]), "k": timing_only("f16", [B, 8, N * D]),
                       "v": timing_only("f16", [B, 8, N * D]), "o": timing_only("f16", [B, 8, N * D])},
                      pfa_args("q", "k", "v", "o", heads=N, scale=0.25, layout="BSH"), [])
    decode = op_case("aclnnIncreFlashAttentionV4",
                     {"q": timing_only("f16", [B, 1, N * D]), "k": timing_only("f16", [B, 8, N * D]),
                      "v": timing_only("f16", [B, 8, N * D]), "o": timing_only("f16", [B, 1, N * D])},
                     ifa_args("q", "k", "v", "o", heads=N, scale=0.25, layout="BSH"), [])
    res, pid, _ = aclnn([prefill, decode])
    ok(res[0]), ok(res[1])
    names = aclnn.emu.client(pid)["count_by_name"]
    assert {classify_name(n) for n in names} == {"prefill", "decode"}, names


# ---------------------------------------------------------------- errors


def add_case(**over) -> dict:
    tensors = {"a": T("f32", [2, 3], data="zeros"), "b": T("f32", [3], data="zeros"),
               "o": T("f32", [2, 3], data="zeros")}
    tensors.update({k: v for k, v in over.items() if isinstance(v, T)})
    args = over.get("args", [t("a"), t("b"), {"scalar": 1.0, "dtype": "f32"}, t("o")])
    return op_case("aclnnAdd", tensors, args, [], **{k: v for k, v in over.items() if k in ("run_as", "runs")})


def attn_case(**over) -> dict:
    tensors = {"q": T("f16", [1, 4, 16], data="zeros"), "k": T("f16", [1, 4, 16], data="zeros"),
               "v": T("f16", [1, 4, 16], data="zeros"), "o": T("f16", [1, 4, 16], data="zeros")}
    tensors.update({k: v for k, v in over.items() if isinstance(v, T)})
    kw = {k: v for k, v in over.items() if not isinstance(v, T) and k != "extra"}
    args = fia_args("q", "k", "v", "o", **{"heads": 2, "scale": 0.25, "layout": "BSH", **kw})
    for pos, arg in over.get("extra", []):
        args[pos] = arg
    return op_case("aclnnFusedInferAttentionScoreV2", tensors, args, [])


def matmul_case(a: T, b: T, o: T, mode: int = 0) -> dict:
    return op_case("aclnnMatmul", {"a": a, "b": b, "o": o}, [t("a"), t("b"), t("o"), {"i8": mode}], [])


Z = "zeros"
ERRORS = {  # name: (case, code of the first call, code of the run call or None, words of the reason)
    "add self NULL": (add_case(args=[{"t": None}, t("b"), {"scalar": 1.0, "dtype": "f32"}, t("o")]), NULLPTR, None,
                      "self is NULL"),
    "add alpha NULL": (add_case(args=[t("a"), t("b"), {"t": None}, t("o")]), NULLPTR, None, "alpha is NULL"),
    "add shapes do not broadcast": (add_case(b=T("f32", [4], data=Z)), INVALID, None, "do not broadcast"),
    "add out of the wrong shape": (add_case(o=T("f32", [3, 2], data=Z)), INVALID, None, "broadcast shape"),
    "add float result into int32": (add_case(o=T("i32", [2, 3], data=Z)), INVALID, None, "cannot be written"),
    "add complex64 (not emulated)": (add_case(a=T("c64", [2, 3], data=None), b=T("c64", [3], data=None)), INVALID,
                                     None, "does not support"),
    "add a handle that is not a tensor": (add_case(a=T("f32", [2, 3], data=Z, obj="bad")), INVALID, None,
                                          "not an aclTensor"),
    "add a destroyed tensor": (add_case(a=T("f32", [2, 3], data=Z, obj="destroyed")), INVALID, None,
                               "not an aclTensor"),
    "add some tensors without data": (add_case(b=T("f32", [3], data=None)), INVALID, None, "timing only"),
    "add too many elements": (add_case(a=T("f32", [1 << 40, 1 << 40], data=None, strides=[0, 0]),
                                       b=T("f32", [1], data=None), o=T("f32", [1 << 40, 1 << 40], data=None,
                                                                       strides=[0, 0])),
                              INVALID, None, "too many elements"),
    "add a view past its storage": (add_case(a=T("f32", [2, 3], data=Z, storage=[5])), INVALID, None,
                                    "storage"),
    "add a host pointer": (add_case(a=T("f32", [2, 3], data="host")), 0, INVALID, "not inside one device allocation"),
    "add memory one element short": (add_case(a=T("f32", [2, 3], data="short")), 0, INVALID,
                                      "not inside one device allocation"),
    "add run as mul": (add_case(run_as="aclnnMul"), 0, INVALID, "made by aclnnAdd"),
    "add run twice": (add_case(runs=2), 0, INVALID, "not a live aclOpExecutor"),
    "matmul reduce dims differ": (matmul_case(T("f16", [2, 3], data=Z), T("f16", [4, 2], data=Z),
                                              T("f16", [2, 2], data=Z)), INVALID, None, "reduce dimension"),
    "matmul cubeMathType 9": (matmul_case(T("f16", [2, 3], data=Z), T("f16", [3, 2], data=Z),
                                          T("f16", [2, 2], data=Z), 9), INVALID, None, "cubeMathType 9"),
    "matmul USE_HF32 with float16": (matmul_case(T("f16", [2, 3], data=Z), T("f16", [3, 2], data=Z),
                                                 T("f16", [2, 2], data=Z), 3), INVALID, None, "USE_HF32"),
    "matmul int32": (matmul_case(T("i32", [2, 3], data=Z), T("i32", [3, 2], data=Z), T("i32", [2, 2], data=Z)),
                     INVALID, None, "FLOAT, FLOAT16 or BFLOAT16"),
    "matmul 7 dimensions": (matmul_case(T("f16", [1] * 5 + [2, 3], data=Z), T("f16", [3, 2], data=Z),
                                        T("f16", [1] * 5 + [2, 2], data=Z)), INVALID, None, "1 to 6 dimensions"),
    "rms norm rstd not float": (op_case("aclnnRmsNorm", {"x": T("f16", [2, 4], data=Z), "g": T("f16", [4], data=Z),
                                                         "y": T("f16", [2, 4], data=Z), "r": T("f16", [2, 1], data=Z)},
                                        [t("x"), t("g"), {"f64": 1e-6}, t("y"), t("r")], []), INVALID, None,
                                "not a supported combination"),
    "swiglu odd dimension": (op_case("aclnnSwiGlu", {"x": T("f16", [2, 5], data=Z), "o": T("f16", [2, 2], data=Z)},
                                     [t("x"), {"i64": -1}, t("o")], []), INVALID, None, "is odd"),
    "softmax dim out of range": (op_case("aclnnSoftmax", {"x": T("f32", [2, 5], data=Z),
                                                          "o": T("f32", [2, 5], data=Z)},
                                         [t("x"), {"i64": 2}, t("o")], []), INVALID, None, "outside"),
    "rope head dim 64": (op_case("aclnnApplyRotaryPosEmb", {n: T("f16", [1, 2, 1, 64], data=Z) for n in "qkcs"},
                                 [t("q"), t("k"), t("c"), t("s"), {"i64": 1}], []), INVALID, None, "supports 128"),
    "rope v2 unknown mode": (op_case("aclnnApplyRotaryPosEmbV2", {n: T("f16", [1, 2, 1, 128], data=Z) for n in "qkcs"},
                                     [t("q"), t("k"), t("c"), t("s"), {"i64": 1}, {"str": "spiral"}], []), INVALID,
                             None, "spiral"),
    "rope v2 mode NULL": (op_case("aclnnApplyRotaryPosEmbV2", {n: T("f16", [1, 2, 1, 128], data=Z) for n in "qkcs"},
                                  [t("q"), t("k"), t("c"), t("s"), {"i64": 1}, {"str": None}], []), NULLPTR, None,
                          "rotaryMode is NULL"),
    "fia pseShift (not emulated)": (attn_case(p=T("f16", [1, 2, 4, 4], data=Z), extra=[(3, t("p"))]), INVALID,
                                    None, "pseShiftOptional is not emulated"),
    "fia unknown layout": (attn_case(layout="XYZ"), INVALID, None, "inputLayout 'XYZ'"),
    "fia layout NULL": (attn_case(layout=None), NULLPTR, None, "inputLayout is NULL"),
    "fia heads not a multiple": (attn_case(heads=2, kv_heads=3), INVALID, None, "multiple of numKeyValueHeads"),
    "fia sparse mode 5": (attn_case(sparse=5), INVALID, None, "sparseMode 5"),
    "fia sparse 3 without a mask": (attn_case(sparse=3), INVALID, None, "needs attenMask"),
    "fia a small optimised mask": (attn_case(sparse=3, mask="m", m=T("bool", [4, 4], data=Z)), INVALID, None,
                                   "(2048, 2048)"),
    "fia float32 query": (attn_case(q=T("f32", [1, 4, 16], data=Z)), INVALID, None, "FLOAT16 or BFLOAT16"),
    "fia two tensors in the key list": (attn_case(extra=[(1, {"tl": ["k", "k"]})]), INVALID, None,
                                        "one tensor per batch"),
    "fia key list NULL": (attn_case(extra=[(1, {"tl": None})]), NULLPTR, None, "key is NULL"),
    "fia wrong output shape": (attn_case(o=T("f16", [1, 4, 8], data=Z)), INVALID, None, "attentionOut must"),
    "fia paged without kv lengths": (attn_case(k=T("f16", [2, 4, 16], data=Z), v=T("f16", [2, 4, 16], data=Z),
                                               tb=T("i32", [1, 1], data=[0]), table="tb", block=4), INVALID, None,
                                     "actual KV lengths"),
    "fia paged block out of range": (attn_case(k=T("f16", [2, 4, 16], data=Z), v=T("f16", [2, 4, 16], data=Z),
                                               tb=T("i32", [1, 1], data=[7]), table="tb", block=4, kvlens=[4]), 0,
                                     INVALID, "is not a block of the cache"),
    "ifa TND layout": (op_case("aclnnIncreFlashAttentionV4",
                               {n: T("f16", [1, 2, 16], data=Z) for n in "qkvo"},
                               ifa_args("q", "k", "v", "o", heads=2, scale=0.25, layout="TND"), []), INVALID, None,
                       "inputLayout 'TND'"),
}


def test_bad_input_gets_cann_codes_and_one_line_each(aclnn) -> None:
    names = list(ERRORS)
    res, pid, stderr = aclnn([ERRORS[n][0] for n in names])
    lines = [x for x in stderr.splitlines() if x.startswith(LOG_PREFIX)]
    for name, r in zip(names, res):
        _, first, run, words = ERRORS[name]
        assert r["rc"] == first, (name, r)
        if run is not None:
            assert r["rc_run"][-1] == run, (name, r)
        assert words in (r.get("err") or ""), (name, r)
        assert any(words in x for x in lines), (name, lines)
    failures = sum(1 for n in names if ERRORS[n][1] or ERRORS[n][2])
    assert len(lines) == failures, "\n".join(lines)
    # the device server took all of it and still answers
    status = aclnn.emu.status()
    assert status["devices"][0]["clients"] and aclnn.emu.client(pid)["alive"] is False


def test_repeatable_executor_runs_until_destroyed(aclnn) -> None:
    a, b = T("f32", [4], data=[1, 2, 3, 4]), T("f32", [4], data=[1, 1, 1, 1])
    case = op_case("aclnnInplaceAdd", {"a": a, "b": b}, [t("a"), t("b"), {"scalar": 1.0, "dtype": "f32"}], ["a"],
                   repeatable=True, runs=3)
    res, pid, _ = aclnn([case])
    assert res[0]["rc_run"] == [0, 0, 0]
    assert res[0]["out"]["a"] == [4, 5, 6, 7]
    assert aclnn.emu.client(pid)["count_by_name"]["Add"] == 3


# ---------------------------------------------------------------- libraries


def exported(lib: Path) -> set[str]:
    r = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True)
    return {line.split()[-1] for line in r.stdout.splitlines() if line.split()[1] in "TWDBR"}


def test_libraries_export_cann_names_only() -> None:
    if shutil.which("nm") is None:
        pytest.fail("nm (binutils) is needed to read the libraries' exports", pytrace=False)
    lib = paths.native_lib_dir()
    nnop, opapi = exported(lib / "libnnopbase.so"), exported(lib / "libopapi.so")
    assert {"aclCreateTensor", "aclDestroyTensor", "aclCreateScalar", "aclCreateIntArray", "aclCreateTensorList",
            "aclnnInit", "aclnnFinalize", "aclSetAclOpExecutorRepeatable", "aclDestroyAclOpExecutor"} <= nnop
    assert all(n.startswith("acl") for n in nnop), sorted(nnop)
    ops = {"Add", "InplaceAdd", "Mul", "InplaceMul", "Silu", "SwiGlu", "Matmul", "RmsNorm", "Softmax",
           "ApplyRotaryPosEmb", "ApplyRotaryPosEmbV2", "PromptFlashAttentionV3", "IncreFlashAttentionV4",
           "FusedInferAttentionScoreV2", "FusedInferAttentionScoreV3", "FusedInferAttentionScoreV4"}
    assert opapi == {f"aclnn{o}{s}" for o in ops for s in ("", "GetWorkspaceSize")}
    # as CANN's, libopapi.so needs the runtime and the object library: loading it loads both
    r = subprocess.run(["readelf", "-d", str(lib / "libopapi.so")], capture_output=True, text=True, check=True)
    assert "[libascendcl.so]" in r.stdout and "[libnnopbase.so]" in r.stdout


# ---------------------------------------------------------------- C and C++ programs, the shim


@pytest.fixture(scope="module")
def aclnn_programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """aclnn_smoke (C) and aclnn_sample (C++), built against the installed headers and libraries."""
    out = tmp_path_factory.mktemp("aclnn-programs")
    inc, lib = str(paths.acl_include_dir()), str(paths.native_lib_dir())
    built = {}
    for src, cc, std in ((PROGS / "aclnn_smoke.c", "gcc", "-std=c11"),
                         (PROGS / "aclnn_sample.cpp", "g++", "-std=c++11")):
        if shutil.which(cc) is None:
            pytest.fail(f"{cc} is needed to build {src.name}", pytrace=False)
        exe = out / src.stem
        r = subprocess.run([cc, std, "-O2", "-Wall", "-Wextra", "-Werror", str(src), "-o", str(exe), "-I", inc,
                            "-L", lib, "-lopapi", "-lnnopbase", "-lascendcl", "-lm"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"building {src.name} failed:\n{r.stderr}"
        built[src.stem] = exe
    return built


def test_c_program(emulator, acl_env, aclnn_programs) -> None:
    emulator()
    r = run_program([aclnn_programs["aclnn_smoke"]], acl_env).ok().json()
    assert r["ok"] is True, r
    assert (r["null_self"], r["null_ws"], r["null_executor"]) == (NULLPTR, NULLPTR, NULLPTR)
    assert r["bad_stream"] == RUNTIME


def test_cpp_program_in_the_style_of_the_cann_samples(emulator, acl_env, aclnn_programs) -> None:
    emulator()
    r = run_program([aclnn_programs["aclnn_sample"]], acl_env).ok().json()
    assert r["matmul"] == [4, 10, 5, 11]  # [[1,0,1],[0,1,1]] @ the transposed view of [[1,2,3],[4,5,6]]
    e = math.exp(-6)
    assert r["softmax"] == pytest.approx([e / (1 + e), 1 / (1 + e)] * 2, abs=1e-6)


def test_under_the_shim_launches_bind_to_it_and_the_device_map_holds(emulator, aclnn_programs, shim_env) -> None:
    emu = emulator(devices=2)
    # the dynamic linker binds libopapi's aclrtLaunchKernel to the shim's wrapper
    env = {**shim_env, "LD_DEBUG": "bindings"}
    run = run_program([aclnn_programs["aclnn_smoke"]], env)
    assert run.rc == 0 and json.loads(run.stdout.splitlines()[-1])["ok"] is True, run.stdout + run.stderr
    binds = [x for x in run.stderr.splitlines() if "libopapi.so" in x and "`aclrtLaunchKernel'" in x]
    assert binds and all("libflexnpu_shim.so" in x for x in binds), binds or run.stderr[-2000:]
    # with the program's device 0 mapped to physical device 1, its operators run there
    mapped = run_program([aclnn_programs["aclnn_smoke"]], {**shim_env, "FLEXNPU_DEVICES": "1"}).ok()
    assert mapped.json()["ok"] is True
    rec = emu.client(mapped.pid, 1)
    kernels = {k: v for k, v in rec["count_by_name"].items() if not k.startswith("memcpy")}
    assert kernels == {"Add": 1, "MatMulV2": 1, "IncreFlashAttention": 1}, rec["count_by_name"]
