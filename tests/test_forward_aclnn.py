"""The aclnn operators through forwarded execution (libflexnpu_fwd.so in the program,
flexnpu-executor running the operators in the device's one context): every operator's
results, error codes and messages, and the kernels it launches are those of a direct run;
a tensor naming memory the process may not name is refused; the reference workload's aclnn
steps run forwarded.

Each test runs the same programs twice on one emulator: directly (the emulated runtime in
the process) and forwarded (a real `flexnpu daemon`, which starts the executor, and the
program under `flexnpu run --forward`'s environment)."""

from __future__ import annotations

import json
import math
import os
import random
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from flexnpu.forward import gen_aclnn
from flexnpu.forward.cli import run_env
from forward_fixtures import run_program
from test_aclnn_ops import (ERRORS, LOG_PREFIX, RUNNER, T, aclnn_programs, canon, fia_args,  # noqa: F401
                            ifa_args, lay_out, none, op_case, pfa_args, raw, t)
from test_daemon_fixtures import daemons  # noqa: F401  (a fixture, used by name)
from users_fixtures import flexnpu_group, member, open_rdir, run_as  # noqa: F401  (fixtures)

INCLUDE = Path(__file__).resolve().parents[1] / "flexnpu" / "include"
# errors found only by computing (the data names a block the cache does not have): on the
# device, a forwarded operator reports them at the next synchronisation, as a kernel's fault
DEFERRED = {"fia paged block out of range"}


def run_cases(env: dict[str, str], cases: list[dict]) -> tuple[list[dict], int, str]:
    job = {"cases": cases, "kernels": None}
    r = subprocess.run([sys.executable, str(RUNNER)], input=json.dumps(job), env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, f"runner exited {r.returncode}\nstdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}"
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == len(cases) + 1, r.stdout + r.stderr
    return lines[:-1], lines[-1]["pid"], r.stderr


class Both:
    """One emulator and one daemon (with its executor) on device 0; runs cases both ways."""

    def __init__(self, emu, acl_env: dict[str, str], daemon) -> None:
        self.emu, self.daemon = emu, daemon
        self.direct_env = {k: v for k, v in acl_env.items() if k not in ("LD_PRELOAD", "FLEXNPU_ROLE")}
        self.fwd_env = run_env(None, "auto", None, False, self.direct_env, forward=True)

    def direct(self, cases: list[dict]) -> tuple[list[dict], int, str]:
        return run_cases(self.direct_env, cases)

    def forwarded(self, cases: list[dict]) -> tuple[list[dict], int, str]:
        return run_cases(self.fwd_env, cases)

    def executor_record(self) -> dict:
        """The executor's client record on the device (the forwarded work is its)."""
        st = self.emu.status()
        recs = [c for c in st["devices"][0]["clients"] if c["alive"] and c["pid"] != 0]
        execs = [c for c in recs if Path(f"/proc/{c['pid']}/exe").resolve().name == "flexnpu-executor"]
        assert len(execs) == 1, recs
        return execs[0]


@pytest.fixture
def both(emulator, acl_env, daemons) -> Both:  # noqa: F811
    emu = emulator()
    d = daemons(0, env=acl_env)
    return Both(emu, acl_env, d)


# ---------------------------------------------------------------- every operator


def every_operator() -> list[dict]:
    """One case per operator of the headers, with data, reading every output back."""
    f16 = "f16"
    cases = []
    a, b = T("f32", [2, 3], seed=1), T("f32", [3], seed=2)
    cases.append(op_case("aclnnAdd", {"a": a, "b": b, "o": T("f32", [2, 3], data="zeros")},
                         [t("a"), t("b"), {"scalar": 0.5, "dtype": "f32"}, t("o")], ["o"]))
    cases.append(op_case("aclnnInplaceAdd", {"a": T("bf16", [4, 3], seed=3), "b": T("bf16", [3], seed=4)},
                         [t("a"), t("b"), {"scalar": 2, "dtype": "i32"}], ["a"]))
    cases.append(op_case("aclnnMul", {"a": T("i32", [3, 2], seed=5), "b": T("i32", [3, 1], seed=6),
                                      "o": T("i64", [3, 2], data="zeros")}, [t("a"), t("b"), t("o")], ["o"]))
    cases.append(op_case("aclnnInplaceMul", {"a": T(f16, [2, 5], seed=7), "b": T(f16, [5], seed=8)},
                         [t("a"), t("b")], ["a"]))
    cases.append(op_case("aclnnSilu", {"x": T(f16, [3, 4], seed=9), "o": T(f16, [3, 4], data="zeros")},
                         [t("x"), t("o")], ["o"]))
    cases.append(op_case("aclnnSwiGlu", {"x": T("f32", [2, 8], seed=10), "o": T("f32", [2, 4], data="zeros")},
                         [t("x"), {"i64": -1}, t("o")], ["o"]))
    cases.append(op_case("aclnnSoftmax", {"x": T("f32", [3, 5], seed=11), "o": T("f32", [3, 5], data="zeros")},
                         [t("x"), {"i64": 1}, t("o")], ["o"]))
    cases.append(op_case("aclnnRmsNorm", {"x": T(f16, [2, 8], seed=12), "g": T(f16, [8], seed=13),
                                          "y": T(f16, [2, 8], data="zeros"), "r": T("f32", [2, 1], data="zeros")},
                         [t("x"), t("g"), {"f64": 1e-6}, t("y"), t("r")], ["y", "r"]))
    # a transposed view of mat2 (strides), as a program that skips the copy passes it
    cases.append(op_case("aclnnMatmul", {"a": T(f16, [3, 4], seed=14), "b": T(f16, [4, 2], strides=[1, 4], seed=15),
                                         "o": T(f16, [3, 2], data="zeros")}, [t("a"), t("b"), t("o"), {"i8": 1}],
                         ["o"]))
    for call, extra, seed in (("aclnnApplyRotaryPosEmb", [], 16), ("aclnnApplyRotaryPosEmbV2", [{"str": "half"}], 20)):
        ts = {n: T(f16, [1, 2, 2, 128], seed=seed + i) for i, n in enumerate("qk")}
        ts.update({n: T(f16, [1, 2, 1, 128], seed=seed + 2 + i) for i, n in enumerate("cs")})
        cases.append(op_case(call, ts, [t("q"), t("k"), t("c"), t("s"), {"i64": 1}] + extra, ["q", "k"]))
    B, N, S, D = 1, 2, 4, 16
    q, k, v = canon(f16, B, N, S, D, 30), canon(f16, B, N, S, D, 31), canon(f16, B, N, S, D, 32)
    (fq, sq), (fk, sk), (fv, sv) = lay_out(q, "BSH"), lay_out(k, "BSH"), lay_out(v, "BSH")

    def attn() -> dict:
        return {"q": raw(f16, fq, sq), "k": raw(f16, fk, sk), "v": raw(f16, fv, sv), "o": T(f16, sq, data="zeros")}

    cases.append(op_case("aclnnPromptFlashAttentionV3", attn(),
                         pfa_args("q", "k", "v", "o", heads=N, scale=0.25, layout="BSH", qlens=[3], kvlens=[4]),
                         ["o"]))
    ifa = attn()
    ifa["q"] = T(f16, [1, 1, N * D], seed=33)
    ifa["o"] = T(f16, [1, 1, N * D], data="zeros")
    cases.append(op_case("aclnnIncreFlashAttentionV4", ifa,
                         ifa_args("q", "k", "v", "o", heads=N, scale=0.25, layout="BSH", lens=[3]), ["o"]))
    fia = fia_args("q", "k", "v", "o", heads=N, scale=0.25, layout="BSH", sparse=0, lse="l")
    ts = attn()
    ts["l"] = T("f32", [B, N, S, 1], data="zeros")
    cases.append(op_case("aclnnFusedInferAttentionScoreV2", ts, fia, ["o", "l"]))
    # V3: V2's arguments with 3 more optional tensors (the rope inputs) after the shared-prefix
    # lengths; V4: 5, and queryQuantMode after valueAntiquantMode
    plain = fia_args("q", "k", "v", "o", heads=N, scale=0.25, layout="BSH", sparse=0)
    cases.append(op_case("aclnnFusedInferAttentionScoreV3", attn(), plain[:24] + none(3) + plain[24:], ["o"]))
    cases.append(op_case("aclnnFusedInferAttentionScoreV4", attn(),
                         plain[:24] + none(5) + plain[24:37] + [{"i64": 0}] + plain[37:], ["o"]))
    return cases


def test_every_operator_of_the_headers_is_covered() -> None:
    ops = {o.run for o in gen_aclnn.parse(INCLUDE)}
    assert {c["call"] for c in every_operator()} == ops


def test_every_operator_forwarded_gives_the_direct_results(both) -> None:
    cases = every_operator()
    direct, _, _ = both.direct(cases)
    fwd, pid, stderr = both.forwarded(cases)
    for c, d, f in zip(cases, direct, fwd):
        assert d["rc"] == 0 and d["rc_run"] == [0], (c["call"], d)
        # the same library computes on the same inputs: bit for bit the same values
        assert f == d, (c["call"], json.dumps(f)[:2000], json.dumps(d)[:2000])
    # the operators ran in the executor: its record counts their kernels, the program's none
    kernels = {k: v for k, v in both.executor_record()["count_by_name"].items() if not k.startswith("memcpy")}
    assert kernels["PromptFlashAttention"] == 4 and kernels["IncreFlashAttention"] == 1, kernels
    assert not [c for c in both.emu.status()["devices"][0]["clients"] if c["pid"] == pid]


# ---------------------------------------------------------------- errors, repeatable executors, kernels

ADDR = re.compile(r"0x[0-9a-f]+")


def test_bad_input_gets_the_direct_codes_and_reasons(both) -> None:
    names = list(ERRORS)
    cases = [{**ERRORS[n][0], "sync_may_fail": n in DEFERRED} for n in names]
    direct, _, d_err = both.direct(cases)
    fwd, _, f_err = both.forwarded(cases)
    for name, d, f in zip(names, direct, fwd):
        words = ERRORS[name][3]
        if name in DEFERRED:
            # found by the operator's computation in the executor: the run call returned, the
            # next synchronisation reports it with the operator's own code and reason
            assert d["rc_run"] == [ERRORS[name][2]] and f["rc_run"] == [0], (name, d, f)
            assert f["rc_sync"] == d["rc_run"][0] and words in f["err_sync"], (name, f)
            continue
        assert (f["rc"], f["rc_run"]) == (d["rc"], d["rc_run"]), (name, d, f)
        # the reason word for word (addresses differ: the direct run's memory is its own)
        assert ADDR.sub("ADDR", f.get("err") or "") == ADDR.sub("ADDR", d.get("err") or ""), (name, d, f)
        assert words in f["err"], (name, f)
    # one line on stderr per failure, as the library writes it
    d_lines = [x for x in d_err.splitlines() if x.startswith(LOG_PREFIX)]
    f_lines = [x for x in f_err.splitlines() if x.startswith(LOG_PREFIX)]
    assert len(f_lines) == len(d_lines) - len(DEFERRED), "\n".join(f_lines)
    # the executor took all of it and still serves
    res, _, _ = both.forwarded(every_operator()[:1])
    assert res[0]["rc"] == 0 and res[0]["rc_run"] == [0]


def test_a_repeatable_executor_runs_until_destroyed(both) -> None:
    a, b = T("f32", [4], data=[1, 2, 3, 4]), T("f32", [4], data=[1, 1, 1, 1])
    case = op_case("aclnnInplaceAdd", {"a": a, "b": b}, [t("a"), t("b"), {"scalar": 1.0, "dtype": "f32"}], ["a"],
                   repeatable=True, runs=3)
    res, _, _ = both.forwarded([case, {**case, "repeatable": False, "runs": 2}])
    assert res[0]["rc_run"] == [0, 0, 0] and res[0]["out"]["a"] == [4, 5, 6, 7]
    # a one-shot executor is gone after its run, here as directly
    assert res[1]["rc_run"] == [0, 161002] and "not a live aclOpExecutor" in res[1]["err"]
    assert both.executor_record()["count_by_name"]["Add"] == 4


def timing_only(dtype: str, shape: list[int]) -> T:
    return T(dtype, shape, data=None)


def test_timing_only_operators_launch_the_direct_kernels(both) -> None:
    B, N, D, S = 2, 8, 128, 512
    cases = [
        op_case("aclnnMatmul", {"a": timing_only("bf16", [2048, 4096]), "b": timing_only("bf16", [4096, 4096]),
                                "o": timing_only("bf16", [2048, 4096])}, [t("a"), t("b"), t("o"), {"i8": 0}], []),
        op_case("aclnnPromptFlashAttentionV3",
                {n: timing_only("f16", [B, S, N * D]) for n in "qkvo"},
                pfa_args("q", "k", "v", "o", heads=N, scale=0.1, layout="BSH"), []),
        op_case("aclnnIncreFlashAttentionV4",
                {"q": timing_only("f16", [B, 1, N * D]), "k": timing_only("f16", [B, S, N * D]),
                 "v": timing_only("f16", [B, S, N * D]), "o": timing_only("f16", [B, 1, N * D])},
                ifa_args("q", "k", "v", "o", heads=N, scale=0.1, layout="BSH"), []),
        op_case("aclnnRmsNorm", {"x": timing_only("bf16", [64, 4096]), "g": timing_only("bf16", [4096]),
                                 "y": timing_only("bf16", [64, 4096]), "r": timing_only("f32", [64, 1])},
                [t("x"), t("g"), {"f64": 1e-6}, t("y"), t("r")], []),
    ]
    direct, pid, _ = both.direct(cases)
    fwd, _, _ = both.forwarded(cases)
    assert all(r["rc"] == 0 and r["rc_run"] == [0] for r in direct + fwd), (direct, fwd)
    d = both.emu.client(pid)
    e = both.executor_record()
    assert e["count_by_name"] == d["count_by_name"]
    # the same cost: the executor's device time for them is the direct client's
    for name, busy in d["busy_by_name"].items():
        assert e["busy_by_name"][name] == pytest.approx(busy, rel=1e-6, abs=2), name
    assert e["allocs"] == 0


def test_c_and_cpp_programs_linked_against_the_libraries(both, aclnn_programs) -> None:
    """Programs that call the operators through the dynamic linker (no dlsym): the forward
    library's exports bind first."""
    for name in ("aclnn_smoke", "aclnn_sample"):
        d = run_program([aclnn_programs[name]], both.direct_env).ok().json()
        f = run_program([aclnn_programs[name]], both.fwd_env).ok().json()
        assert f == d, name


# ---------------------------------------------------------------- memory of others

# Holds 16 bytes of device memory with known values, says where, and reads them again once
# told to: what another process's operators did to them.
HOLDER = r"""
import ctypes as C, json, sys
acl = C.CDLL("libascendcl.so", mode=C.RTLD_GLOBAL)
P = C.c_void_p
acl.aclrtMalloc.argtypes = [C.POINTER(P), C.c_size_t, C.c_int]
acl.aclrtMemcpy.argtypes = [P, C.c_size_t, P, C.c_size_t, C.c_int]
assert acl.aclInit(None) == 0 and acl.aclrtSetDevice(0) == 0
p = P()
assert acl.aclrtMalloc(C.byref(p), 16, 0) == 0
src = (C.c_float * 4)(1, 2, 3, 4)
assert acl.aclrtMemcpy(p, 16, src, 16, 1) == 0
print(json.dumps({"ptr": p.value}), flush=True)
sys.stdin.readline()
dst = (C.c_float * 4)()
assert acl.aclrtMemcpy(dst, 16, p, 16, 2) == 0
print(json.dumps({"values": list(dst)}), flush=True)
"""

# Names memory at an address it was given in an operator's tensors: argv[1] the address,
# argv[2] the device whose memory it is in this process ("other": another process's).
INTRUDER = r"""
import ctypes as C, json, sys
acl = C.CDLL("libascendcl.so", mode=C.RTLD_GLOBAL)
nn = C.CDLL("libnnopbase.so", mode=C.RTLD_GLOBAL)
op = C.CDLL("libopapi.so", mode=C.RTLD_GLOBAL)
P = C.c_void_p
acl.aclrtMalloc.argtypes = [C.POINTER(P), C.c_size_t, C.c_int]
acl.aclrtCreateStream.argtypes = [C.POINTER(P)]
acl.aclrtSynchronizeStream.argtypes = [P]
acl.aclGetRecentErrMsg.restype = C.c_char_p
nn.aclCreateTensor.restype = P
nn.aclCreateTensor.argtypes = [C.POINTER(C.c_int64), C.c_uint64, C.c_int, C.POINTER(C.c_int64), C.c_int64, C.c_int,
                               C.POINTER(C.c_int64), C.c_uint64, P]
nn.aclCreateScalar.restype = P
nn.aclCreateScalar.argtypes = [P, C.c_int]
op.aclnnInplaceAddGetWorkspaceSize.argtypes = [P, P, P, C.POINTER(C.c_uint64), C.POINTER(P)]
op.aclnnInplaceAdd.argtypes = [P, C.c_uint64, P, P]
assert acl.aclInit(None) == 0
addr = int(sys.argv[1])
if sys.argv[2] != "other":  # memory of this process on another device
    assert acl.aclrtSetDevice(int(sys.argv[2])) == 0
    p = P()
    assert acl.aclrtMalloc(C.byref(p), 16, 0) == 0
    addr = p.value
assert acl.aclrtSetDevice(0) == 0
s, own = P(), P()
assert acl.aclrtCreateStream(C.byref(s)) == 0 and acl.aclrtMalloc(C.byref(own), 16, 0) == 0
dims = (C.c_int64 * 1)(4)
tensor = lambda data: nn.aclCreateTensor(dims, 1, 0, None, 0, 2, dims, 1, data)
one = C.c_float(100.0)
ws, ex = C.c_uint64(), P()
rc = op.aclnnInplaceAddGetWorkspaceSize(tensor(addr), tensor(own.value), nn.aclCreateScalar(C.byref(one), 0),
                                        C.byref(ws), C.byref(ex))
rc_run = op.aclnnInplaceAdd(None, ws.value, ex, s) if rc == 0 else None
err = acl.aclGetRecentErrMsg()
rc_sync = acl.aclrtSynchronizeStream(s)
err_sync = acl.aclGetRecentErrMsg() if rc_sync else None
print(json.dumps({"rc": rc, "rc_run": rc_run, "err": err and err.decode(), "rc_sync": rc_sync,
                  "err_sync": err_sync and err_sync.decode()}), flush=True)
"""


def test_a_tensor_naming_another_processs_memory_is_refused(both) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], env=both.fwd_env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ptr = json.loads(holder.stdout.readline())["ptr"]
        r = run_program([sys.executable, "-c", INTRUDER, ptr, "other"], both.fwd_env).ok().json()
        # refused at the run call, as the runtime refuses memory the process does not hold
        assert r["rc"] == 0 and r["rc_run"] == 161002, r
        assert "not inside one device allocation" in r["err"] and r["rc_sync"] == 0, r
        holder.stdin.write("go\n")
        holder.stdin.flush()
        out, err = holder.communicate(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate()
    assert json.loads(out.splitlines()[-1])["values"] == [1, 2, 3, 4], err


@pytest.fixture
def two_devices(emulator, acl_env, daemons) -> Both:  # noqa: F811
    emu = emulator(devices=2)
    d = daemons(0, env=acl_env)
    daemons(1, env=acl_env)
    return Both(emu, acl_env, d)


def test_the_executor_refuses_memory_its_client_does_not_hold_on_its_device(two_devices) -> None:
    """The memory of the process on device 1 named by an operator on device 0: the program's
    own library lets it through (the address is the process's), the executor of device 0,
    which holds none of it for this process, refuses it: reported at the synchronisation."""
    r = run_program([sys.executable, "-c", INTRUDER, 0, 1], two_devices.fwd_env).ok().json()
    assert r["rc"] == 0 and r["rc_run"] == 0, r
    assert r["rc_sync"] == 100000 and "not inside device memory of this process" in r["err_sync"], r
    assert "Add" not in two_devices.executor_record()["count_by_name"]


# ---------------------------------------------------------------- the generator


def header(tmp_path: Path, text: str) -> Path:
    (tmp_path / "aclnnop").mkdir(exist_ok=True)
    (tmp_path / "aclnnop" / "aclnn_x.h").write_text(text)
    return tmp_path


RUN_DECL = "ACLNN_API aclnnStatus aclnnX(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream);\n"


def test_the_generator_refuses_a_type_it_cannot_carry(tmp_path: Path) -> None:
    inc = header(tmp_path, "ACLNN_API aclnnStatus aclnnXGetWorkspaceSize(const aclTensor *self, const aclFoo *foo,\n"
                           "    uint64_t *workspaceSize, aclOpExecutor **executor);\n" + RUN_DECL)
    with pytest.raises(gen_aclnn.GenError, match=r"foo has type 'const aclFoo \*'"):
        gen_aclnn.parse(inc)
    r = subprocess.run([sys.executable, "-m", "flexnpu.forward.gen_aclnn", str(inc), str(tmp_path / "out.h")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "aclFoo" in r.stderr and not (tmp_path / "out.h").exists()


def test_the_generator_refuses_an_operator_without_its_second_call(tmp_path: Path) -> None:
    inc = header(tmp_path, "ACLNN_API aclnnStatus aclnnXGetWorkspaceSize(const aclTensor *self,\n"
                           "    uint64_t *workspaceSize, aclOpExecutor **executor);\n")
    with pytest.raises(gen_aclnn.GenError, match="no second call aclnnX"):
        gen_aclnn.parse(inc)


def test_the_generator_carries_every_argument_of_our_headers() -> None:
    ops = gen_aclnn.parse(INCLUDE)
    text = gen_aclnn.generate(ops)
    for op in ops:
        # the client serialises and the executor decodes each argument, in order
        assert text.count(f"FX_EXPORT aclnnStatus {op.gws}(") == 1 and text.count(f"FX_EXPORT aclnnStatus {op.run}(") == 1
    fia = next(o for o in ops if o.run == "aclnnFusedInferAttentionScoreV4")
    assert len(fia.params) == 45 and {gen_aclnn.ARG_KINDS[p.ctype] for p in fia.params} == {
        "tensor", "tensor_list", "int_array", "int", "double", "string"}


# ---------------------------------------------------------------- the reference workload

WL_MODEL = "qwen2.5-7b:2"


@pytest.mark.parametrize("ops", ["aclnn", "aclnn-fia"])
def test_the_reference_workload_runs_forwarded_on_aclnn(ops) -> None:
    """driver.Setup(forward=True): both instances under the forward library, their operators
    run by the device's executor. The same launches, tokens and modelled time as direct."""
    from flexnpu.bench.node import LocalNode
    from flexnpu.workload import driver
    from flexnpu.workload.model import model_by_name
    from flexnpu.workload.trace import Request

    reqs = [Request(0, 0.0, 300, 12), Request(1, 0.02, 120, 20), Request(2, 0.04, 700, 6)]
    with LocalNode(devices=1, observer=None, daemons=True) as node:
        direct = driver.run(node, reqs, driver.Setup(model=WL_MODEL, shim=False, ops=ops))
        before = node.emulator_status()
        fwd = driver.run(node, reqs, driver.Setup(model=WL_MODEL, forward=True, ops=ops))
    assert direct.problems == [] and fwd.problems == []
    # prefill: the same calls per prompt; decode: the same calls per step (how many steps
    # depends on when requests arrive between them)
    assert fwd.stats["prefill"]["operators"] == direct.stats["prefill"]["operators"]
    assert fwd.stats["prefill"]["kernels"] == direct.stats["prefill"]["kernels"]
    per_step = [{k: v / st["steps"] for k, v in st["operators"].items()} for st in (fwd.stats["decode"],
                                                                                   direct.stats["decode"])]
    assert per_step[0] == per_step[1]
    layers = model_by_name(WL_MODEL).layers
    assert fwd.stats["decode"]["operators"]["aclnnMatmul"] == (4 * layers + 1) * fwd.stats["decode"]["steps"]
    assert fwd.metrics["output_tokens"] == direct.metrics["output_tokens"] == sum(r.output_tokens for r in reqs)
    # the executor's device time for the run is the instances' modelled time
    pids = {st["pid"] for st in fwd.stats.values()} | {st["pid"] for st in direct.stats.values()}

    def busy(status: dict) -> float:
        return sum(v for c in status["devices"][0]["clients"] if c["pid"] not in pids
                   for k, v in c["busy_by_name"].items() if not k.startswith(driver.COPY_NAMES))

    modelled = sum(st["modelled_s"] for st in fwd.stats.values()) * 1e9
    assert busy(fwd.status) - busy(before) == pytest.approx(modelled, rel=0.02)


# ---------------------------------------------------------------- as real users

@pytest.mark.root_users
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and groups")
def test_a_member_naming_roots_memory_in_a_tensor_is_refused(emulator, acl_env, daemons, member,  # noqa: F811
                                                             open_rdir) -> None:
    """A member of flexnpu, forwarded, names the device memory of root's forwarded process in
    an operator's tensors: refused, and root's memory is untouched."""
    emulator()
    daemons(0, env=acl_env)
    both = Both(None, acl_env, None)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], env=both.fwd_env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ptr = json.loads(holder.stdout.readline())["ptr"]
        r = run_as(member, [sys.executable, "-c", INTRUDER, ptr, "other"], both.fwd_env)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout.splitlines()[-1])
        assert got["rc"] == 0 and got["rc_run"] == 161002 and got["rc_sync"] == 0, got
        holder.stdin.write("go\n")
        holder.stdin.flush()
        out, err = holder.communicate(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate()
    assert json.loads(out.splitlines()[-1])["values"] == [1, 2, 3, 4], err


# ---------------------------------------------------------------- hostile records

def item(tag: int, n: int = 0) -> bytes:
    return struct.pack("<II", tag, n)


def pad8(b: bytes) -> bytes:
    return b + bytes(-len(b) % 8)


def tensor_item(dtype: int, shape: list[int], data: int) -> bytes:
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    return item(1) + struct.pack("<iiIIqQ", dtype, 2, len(shape), len(shape), 0, data) + \
        struct.pack(f"<{3 * len(shape)}q", *shape, *strides, *shape)


def encode(args: list[dict], shapes: dict[str, tuple[int, list[int]]]) -> bytes:
    """A FWD_ACLNN_MAKE payload for the runner's argument specs (test_aclnn_ops' helpers);
    every tensor's data in the harness's device memory."""
    out, base = b"", 0x100000
    addr = {n: base + 0x4000 * i for i, n in enumerate(shapes)}
    for a in args:
        (kind, v), = ((k, v) for k, v in a.items() if k != "dtype")
        if v is None and kind in ("t", "tl", "ia", "str"):
            out += item(0)
        elif kind == "t":
            out += tensor_item(*shapes[v], addr[v])
        elif kind == "tl":
            out += item(2, len(v)) + b"".join(tensor_item(*shapes[n], addr[n]) for n in v)
        elif kind == "scalar":
            out += item(3) + struct.pack("<iI16s", 0, 0, struct.pack("<f", v))
        elif kind == "ia":
            out += item(5, len(v)) + struct.pack(f"<{len(v)}q", *v)
        elif kind in ("i64", "i8", "bool"):
            out += item(8) + struct.pack("<q", int(v))
        elif kind == "f64":
            out += item(9) + struct.pack("<d", v)
        elif kind == "str":
            out += item(10, len(v)) + pad8(v.encode())
    return out


def record(plen_payload: bytes, handle: int, op: int, nargs: int) -> bytes:
    return struct.pack("<IQQQ", len(plen_payload), handle, op, nargs) + plen_payload


@pytest.fixture(scope="module")
def records_harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/progs/aclnn/fwd_aclnn_records.c with exec_aclnn.c and its generated callers, with the
    address and undefined-behaviour sanitizers when gcc has them."""
    import shutil

    from flexnpu import paths

    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the record harness", pytrace=False)
    out = tmp_path_factory.mktemp("fwd-records")
    gen = out / "fwd_aclnn_gen.h"
    gen.write_text(gen_aclnn.generate(gen_aclnn.parse(INCLUDE)))
    native = Path(__file__).resolve().parents[1] / "flexnpu" / "forward" / "native"
    exe = out / "fwd_aclnn_records"
    base = ["gcc", "-O1", "-g", "-Wall", str(Path(__file__).parent / "progs" / "aclnn" / "fwd_aclnn_records.c"),
            str(native / "executor" / "exec_aclnn.c"), "-o", str(exe), "-I", str(out), "-I", str(native), "-I", str(native / "executor"), "-I", str(INCLUDE),
            "-L", str(paths.native_lib_dir()), f"-Wl,-rpath,{paths.native_lib_dir()}", "-lascendcl", "-ldl",
            "-lpthread"]
    for extra in (["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"], []):
        r = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            return exe
    pytest.fail(f"building the record harness failed:\n{r.stderr}", pytrace=False)


def test_hostile_records_are_refused_without_harm(records_harness: Path) -> None:
    """Valid MAKE records, then every truncation of them, random byte flips, and wrong
    operators, counts and handles: the valid ones make an executor, the rest are refused or
    make one that is freed, and nothing crashes, overruns or leaks (the sanitizers watch)."""
    ops = [o.run for o in gen_aclnn.parse(INCLUDE)]
    add = encode([t("a"), t("b"), {"scalar": 1.0, "dtype": "f32"}, t("o")],
                 {"a": (0, [2, 3]), "b": (0, [3]), "o": (0, [2, 3])})
    fia = encode(fia_args("q", "k", "v", "o", heads=2, scale=0.25, layout="BSH", qlens=[4], kvlens=[4]),
                 {n: (1, [1, 4, 32]) for n in "qkvo"})
    valid = [(add, ops.index("aclnnAdd"), 4), (fia, ops.index("aclnnFusedInferAttentionScoreV2"), 39)]
    rng = random.Random(7)
    stream = b"".join(record(p, 0x0f06000000000001, op, n) for p, op, n in valid)
    for p, op, n in valid:
        for cut in range(0, len(p), 4):
            stream += record(p[:cut], 0x0f06000000000002, op, n)
        for _ in range(300):
            b = bytearray(p)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            stream += record(bytes(b), 0x0f06000000000003, op, n)
        stream += record(p, 0x0f06000000000004, op, n + 1)           # a count that is not the operator's
        stream += record(p, 0x0f06000000000005, len(ops), n)          # no such operator
        stream += record(p, 0x0f06000000010000, op, n)                # a handle past the table
        stream += record(p, 0x0f05000000000006, op, n)                # a handle of another kind
    r = subprocess.run([str(records_harness)], input=stream, capture_output=True, timeout=300,
                       env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1"})
    out = r.stdout.decode().splitlines()
    assert r.returncode == 0 and out and out[-1] == "done", r.stderr.decode()[-3000:]
    assert out[0] == "0 0" and out[1] == "0 0", out[:2]  # the valid records made executors, destroyed
    codes = [int(x.split()[0]) for x in out[2:-1]]
    refused = sum(1 for c in codes if c)
    assert refused > len(codes) // 2, out[:20]
