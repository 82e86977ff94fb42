"""A serving step as CANN aclnn operator calls, through ctypes: what `--ops aclnn` runs.

Each kernel of a step (flexnpu/workload/model.py) becomes the operator a serving engine on
Ascend calls for it, with its shapes, from libopapi.so (operators) and libnnopbase.so
(aclTensor and friends), found on LD_LIBRARY_PATH beside libascendcl.so:

    input/post RMSNorm, final norm   aclnnRmsNorm          x [t, h], gamma [h] -> y, rstd [t, 1] fp32
    QKV, O, gate-up, down, LM head   aclnnMatmul           [m, k] x [k, n] -> [m, n]
    RoPE on q and k                  aclnnApplyRotaryPosEmb q [1, t, hq, d], k [1, t, hk, d] in place (BSND)
    attention, prefill               aclnnPromptFlashAttentionV3   (or FIA, below)
    attention, a prefill chunk       aclnnFusedInferAttentionScoreV2 (a query after cached keys)
    attention, decode                aclnnIncreFlashAttentionV4    (or FIA)
    SiLU(gate) * up                  aclnnSwiGlu           [t, 2i] -> [t, i]
    residual add                     aclnnAdd              alpha 1
    embedding gather                 the engine's own kernel, the built-in `copy` (no aclnn op here)

Attention "aclnn-fia" calls aclnnFusedInferAttentionScoreV2 for every phase, as vllm-ascend's
attention backend does (torch_npu.npu_fused_infer_attention_score for prefill, chunked
prefill and decode; vllm_ascend/attention/attention_v1.py). "aclnn" calls the per-phase
operators (PromptFlashAttention for prompts, IncreFlashAttention for decode), whose names tell
the observer the phase (flexnpu/runtimes/aclnn.py).

Every tensor is timing-only: its data pointer is NULL (an emulator extension: the operator
checks the shapes and launches its cost, touching no memory). Tensors are descriptors, so
each distinct one is created once and kept; an executor is used once, as CANN's are.
"""

from __future__ import annotations

import ctypes
import math
import struct

from flexnpu.workload import model as M

VP = ctypes.c_void_p
I64 = ctypes.c_int64
U64 = ctypes.c_uint64
PI64 = ctypes.POINTER(ctypes.c_int64)

# aclDataType and aclFormat (CANN acl/acl_base.h)
ACL_FLOAT, ACL_INT64, ACL_BOOL, ACL_BF16 = 0, 9, 12, 27
ACL_FORMAT_ND = 2
# aclnnMatmul cubeMathType: ALLOW_FP32_DOWN_PRECISION (what torch_npu passes by default)
CUBE_MATH_TYPE = 1
# flash attention: causal via sparse mode 3 (rightDownCausal) and CANN's compressed 2048 x 2048 mask
SPARSE_RIGHT_DOWN_CAUSAL = 3
MASK_DIM = 2048
PRE_TOKENS = 2147483647
INNER_PRECISE = 1  # high performance (ops-transformer PromptFlashAttention docs)

# how an instance expresses its step (instance --ops, bench pd --ops, demo --ops); aclnn by
# default: what a serving engine on CANN calls, with the kernel path's modelled time
OPS = ("kernels", "aclnn", "aclnn-fia")
DEFAULT_OPS = "aclnn"

# The kernel each operator launches, by the name the emulator counts it under (CANN's op
# types; docs/emulator.md, "The aclnn operator API"). FusedInferAttentionScore launches the
# prompt kernel for queries longer than one token, else the incremental one.
PFA_KERNEL, IFA_KERNEL = "PromptFlashAttention", "IncreFlashAttention"
KERNEL_OF = {"aclnnMatmul": "MatMulV2", "aclnnRmsNorm": "RmsNorm", "aclnnApplyRotaryPosEmb": "ApplyRotaryPosEmb",
             "aclnnSwiGlu": "SwiGlu", "aclnnAdd": "Add", "aclnnPromptFlashAttentionV3": PFA_KERNEL,
             "aclnnIncreFlashAttentionV4": IFA_KERNEL}
# attention kernels by phase, under either way of running a step (what a step's tokens are counted by)
PREFILL_ATTENTION = ("attention_prefill", PFA_KERNEL)
DECODE_ATTENTION = ("attention_decode", IFA_KERNEL)

_T = VP  # aclTensor *, aclTensorList *, aclIntArray *, aclScalar *, aclOpExecutor *
_WS = (ctypes.POINTER(U64), ctypes.POINTER(VP))  # uint64_t *workspaceSize, aclOpExecutor **executor
_RUN = [VP, U64, VP, VP]  # workspace, workspaceSize, executor, stream

# Operator signatures, CANN's (ops-nn / ops-math / ops-transformer op_api headers).
_OPERATORS: dict[str, list] = {
    "aclnnRmsNorm": [_T, _T, ctypes.c_double, _T, _T],
    "aclnnMatmul": [_T, _T, _T, ctypes.c_int8],
    "aclnnApplyRotaryPosEmb": [_T, _T, _T, _T, I64],
    "aclnnSwiGlu": [_T, I64, _T],
    "aclnnAdd": [_T, _T, _T, _T],
    # query key value pseShift attenMask actualSeqLengths actualSeqLengthsKv deqScale1 quantScale1
    # deqScale2 quantScale2 quantOffset2 numHeads scaleValue preTokens nextTokens inputLayout
    # numKeyValueHeads sparseMode innerPrecise attentionOut
    "aclnnPromptFlashAttentionV3": [_T, _T, _T, _T, _T, _T, _T, _T, _T, _T, _T, _T, I64, ctypes.c_double, I64, I64,
                                    ctypes.c_char_p, I64, I64, I64, _T],
    # query key(list) value(list) pseShift attenMask actualSeqLengths dequantScale1 quantScale1
    # dequantScale2 quantScale2 quantOffset2 antiquantScale antiquantOffset blocktable kvPaddingSize
    # numHeads scaleValue inputLayout numKeyValueHeads blockSize innerPrecise attentionOut
    "aclnnIncreFlashAttentionV4": [_T, _T, _T, _T, _T, _T, _T, _T, _T, _T, _T, _T, _T, _T, _T, I64, ctypes.c_double,
                                   ctypes.c_char_p, I64, I64, I64, _T],
    # query key(list) value(list) pseShift attenMask actualSeqLengths actualSeqLengthsKv deqScale1
    # quantScale1 deqScale2 quantScale2 quantOffset2 antiquantScale antiquantOffset blockTable
    # queryPaddingSize kvPaddingSize keyAntiquantScale keyAntiquantOffset valueAntiquantScale
    # valueAntiquantOffset keySharedPrefix valueSharedPrefix actualSharedPrefixLen (24 pointers),
    # numHeads scaleValue preTokens nextTokens inputLayout numKeyValueHeads sparseMode innerPrecise
    # blockSize antiquantMode softmaxLseFlag keyAntiquantMode valueAntiquantMode attentionOut softmaxLse
    "aclnnFusedInferAttentionScoreV2": [_T] * 24 + [I64, ctypes.c_double, I64, I64, ctypes.c_char_p, I64, I64, I64,
                                                    I64, I64, ctypes.c_bool, I64, I64, _T, _T],
}


class AclnnError(RuntimeError):
    pass


def _load(name: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise AclnnError(f"cannot load {name} ({e}); set LD_LIBRARY_PATH (flexnpu emu env)") from None


class AclnnOps:
    """Runs a step's kernels as aclnn operators on one stream.

    launch_kernel(kernel) launches a kernel that has no operator here (the embedding gather)
    the way the kernel path does. The executor of each distinct kernel is made once and kept
    (aclSetAclOpExecutorRepeatable, CANN's way to skip the first stage of a call it repeats):
    a step repeats each layer's calls, and steps repeat shapes, so a call is one ctypes call.
    Past MAX_CACHED executors every executor and descriptor is dropped between two steps."""

    MAX_CACHED = 4096

    def __init__(self, cfg: M.ModelConfig, acl, launch_kernel, fia: bool = False) -> None:
        self.cfg, self.fia = cfg, fia
        self.acl, self.launch_kernel = acl, launch_kernel
        self.base = _load("libnnopbase.so")
        self.opapi = _load("libopapi.so")
        b = self.base
        b.aclCreateTensor.argtypes = [PI64, U64, ctypes.c_int, PI64, I64, ctypes.c_int, PI64, U64, VP]
        b.aclCreateTensor.restype = VP
        b.aclCreateIntArray.argtypes = [PI64, U64]
        b.aclCreateIntArray.restype = VP
        b.aclCreateTensorList.argtypes = [ctypes.POINTER(VP), U64]
        b.aclCreateTensorList.restype = VP
        b.aclCreateScalar.argtypes = [VP, ctypes.c_int]
        b.aclCreateScalar.restype = VP
        for fn in ("aclDestroyTensor", "aclDestroyIntArray", "aclDestroyTensorList", "aclDestroyScalar",
                   "aclSetAclOpExecutorRepeatable", "aclDestroyAclOpExecutor"):
            getattr(b, fn).argtypes = [VP]
            getattr(b, fn).restype = ctypes.c_int
        self.ws_fn, self.run_fn = {}, {}
        for op, args in _OPERATORS.items():
            ws = getattr(self.opapi, op + "GetWorkspaceSize")
            ws.argtypes = [*args, *_WS]
            ws.restype = ctypes.c_int
            run = getattr(self.opapi, op)
            run.argtypes = _RUN
            run.restype = ctypes.c_int
            self.ws_fn[op], self.run_fn[op] = ws, run
        self._tensors: dict[tuple, VP] = {}
        self._lists: dict[tuple, VP] = {}
        self._arrays: dict[tuple, VP] = {}
        self._owned: list[tuple[str, VP]] = []
        # kernel -> (operator, executor, workspace bytes, the kernel it launches)
        self._executors: dict[M.Kernel, tuple[str, VP, int, str]] = {}
        one = ctypes.c_float(1.0)
        self.alpha_one = VP(b.aclCreateScalar(ctypes.byref(one), ACL_FLOAT))
        if not self.alpha_one:
            raise AclnnError("aclCreateScalar failed")
        self.ws_size = ctypes.c_uint64()
        self.executor = VP()
        self.workspace = VP()
        self.workspace_bytes = 0
        self.calls: dict[str, int] = {}  # operator -> calls

    # -- descriptors, made once each
    def _new_tensor(self, role: str, dims: tuple[int, ...], dtype: int) -> VP:
        n = len(dims)
        shape = (ctypes.c_int64 * n)(*dims)
        strides = (ctypes.c_int64 * n)(*[math.prod(dims[i + 1:]) for i in range(n)])
        t = VP(self.base.aclCreateTensor(shape, n, dtype, strides, 0, ACL_FORMAT_ND, shape, n, None))
        if not t:
            raise AclnnError(f"aclCreateTensor failed for {role} {list(dims)}")
        return t

    def tensor(self, role: str, dims: tuple[int, ...], dtype: int = ACL_BF16) -> VP:
        key = (role, dims, dtype)
        t = self._tensors.get(key)
        if t is None:
            t = self._tensors[key] = self._new_tensor(role, dims, dtype)
            self._owned.append(("aclDestroyTensor", t))
        return t

    def tensor_list(self, role: str, dims: tuple[int, ...]) -> VP:
        """A list of one tensor; the list owns it (aclDestroyTensorList destroys its tensors)."""
        key = (role, dims)
        tl = self._lists.get(key)
        if tl is None:
            arr = (VP * 1)(self._new_tensor(role, dims, ACL_BF16))
            tl = VP(self.base.aclCreateTensorList(arr, 1))
            if not tl:
                raise AclnnError(f"aclCreateTensorList failed for {role} {list(dims)}")
            self._lists[key] = tl
            self._owned.append(("aclDestroyTensorList", tl))
        return tl

    def int_array(self, values: tuple[int, ...]) -> VP:
        a = self._arrays.get(values)
        if a is None:
            a = VP(self.base.aclCreateIntArray((ctypes.c_int64 * len(values))(*values), len(values)))
            if not a:
                raise AclnnError(f"aclCreateIntArray failed for {len(values)} values")
            self._arrays[values] = a
            self._owned.append(("aclDestroyIntArray", a))
        return a

    def flush(self) -> None:
        """Destroys every kept executor and descriptor (the next calls make them anew)."""
        for _, ex, _, _ in self._executors.values():
            self.base.aclDestroyAclOpExecutor(ex)
        self._executors.clear()
        for fn, h in reversed(self._owned):
            getattr(self.base, fn)(h)
        self._owned.clear()
        self._tensors.clear()
        self._lists.clear()
        self._arrays.clear()

    def close(self) -> None:
        self.flush()
        self.base.aclDestroyScalar(self.alpha_one)
        if self.workspace_bytes:
            self.acl.call("aclrtFree", self.workspace)
            self.workspace_bytes = 0

    def begin_step(self) -> None:
        if len(self._executors) > self.MAX_CACHED:
            self.flush()

    # -- one operator, two stages
    def prepare(self, op: str, *args) -> tuple[VP, int]:
        """The first stage: a repeatable executor and the workspace it needs."""
        rc = self.ws_fn[op](*args, ctypes.byref(self.ws_size), ctypes.byref(self.executor))
        if rc != 0:
            raise AclnnError(f"{op}GetWorkspaceSize failed: {rc}")
        ex = VP(self.executor.value)
        rc = self.base.aclSetAclOpExecutorRepeatable(ex)
        if rc != 0:
            raise AclnnError(f"aclSetAclOpExecutorRepeatable failed for {op}: {rc}")
        need = self.ws_size.value
        if need > self.workspace_bytes:  # one workspace for the stream, grown as needed
            if self.workspace_bytes:
                self.acl.call("aclrtFree", self.workspace)
            self.workspace = self.acl.malloc(need)
            self.workspace_bytes = need
        return ex, need

    def execute(self, op: str, ex: VP, need: int, stream: VP) -> None:
        rc = self.run_fn[op](self.workspace if need else None, need, ex, stream)
        if rc != 0:
            raise AclnnError(f"{op} failed: {rc}")
        self.calls[op] = self.calls.get(op, 0) + 1

    # -- a step's kernel as its operator
    def run(self, k: M.Kernel, stream: VP) -> str:
        """Launches kernel k as its operator (or as itself, where no operator stands for it);
        returns the name of the kernel that ran, as the emulator counts it."""
        hit = self._executors.get(k)
        if hit is None:
            made = self.operator(k)
            if made is None:
                self.launch_kernel(k)
                return k.name
            hit = self._executors[k] = made
        op, ex, need, kernel = hit
        self.execute(op, ex, need, stream)
        return kernel

    def operator(self, k: M.Kernel) -> tuple[str, VP, int, str] | None:
        """The operator that computes kernel k, prepared: (name, executor, workspace bytes,
        the kernel it launches);
        None where no operator stands for it (the engine's own kernel)."""
        b, c, t = k.builtin, self.cfg, self.tensor
        if b == "gemm":
            m, n, kk = struct.unpack_from("<III", k.args, 24)
            return self._prep("aclnnMatmul", t("a", (m, kk)), t("b", (kk, n)), t("c", (m, n)), CUBE_MATH_TYPE)
        if b == "rmsnorm":
            rows, dim = struct.unpack_from("<II", k.args, 24)
            return self._prep("aclnnRmsNorm", t("x", (rows, dim)), t("gamma", (dim,)), float(c.rms_eps),
                              t("y", (rows, dim)), t("rstd", (rows, 1), ACL_FLOAT))
        if b == "rope":
            tokens, _, d = struct.unpack_from("<III", k.args, 16)
            return self._prep("aclnnApplyRotaryPosEmb", t("q", (1, tokens, c.heads, d)),
                              t("k", (1, tokens, c.kv_heads, d)), t("cos", (1, tokens, 1, d)),
                              t("sin", (1, tokens, 1, d)), 1)  # layout 1: BSND
        if b == "elementwise":
            n, op = struct.unpack_from("<QI", k.args, 24)
            if op == M.EW_SILU_MUL:
                rows = n // c.intermediate
                return self._prep("aclnnSwiGlu", t("x", (rows, 2 * c.intermediate)), -1,
                                  t("out", (rows, c.intermediate)))
            dims = (n // c.hidden, c.hidden) if n % c.hidden == 0 else (n,)
            return self._prep("aclnnAdd", t("x", dims), t("y", dims), self.alpha_one, t("out", dims))
        if b == "attention_prefill":
            _, heads, kvh, s, d = struct.unpack_from("<IIIII", k.args, 32)
            return self.attention(heads, kvh, d, batch=1, q_len=s, kv_len=s)
        if b == "attention_extend":
            _, heads, kvh, q, ctx, d = struct.unpack_from("<IIIIII", k.args, 32)
            return self.attention(heads, kvh, d, batch=1, q_len=q, kv_len=ctx)
        if b == "attention_decode":
            batch, heads, kvh, ctx, d = struct.unpack_from("<IIIII", k.args, 32)
            return self.attention(heads, kvh, d, batch=batch, q_len=1, kv_len=ctx)
        return None

    def _prep(self, op: str, *args, kernel: str | None = None) -> tuple[str, VP, int, str]:
        ex, need = self.prepare(op, *args)
        return op, ex, need, kernel or KERNEL_OF[op]

    def attention(self, heads: int, kvh: int, d: int, batch: int, q_len: int,
                  kv_len: int) -> tuple[str, VP, int, str]:
        """Attention of batch sequences, q_len new queries each after kv_len - q_len cached keys
        (causal), in the BSND layout."""
        scale = 1.0 / math.sqrt(d)
        q = self.tensor("q", (batch, q_len, heads, d))
        out = self.tensor("attn_out", (batch, q_len, heads, d))
        kv = (batch, kv_len, kvh, d)
        causal = q_len > 1
        mask = self.tensor("mask", (MASK_DIM, MASK_DIM), ACL_BOOL) if causal else None
        sparse = SPARSE_RIGHT_DOWN_CAUSAL if causal else 0
        qlens, kvlens = self.int_array((q_len,) * batch), self.int_array((kv_len,) * batch)
        if self.fia or (causal and q_len != kv_len):
            return self._prep("aclnnFusedInferAttentionScoreV2", q, self.tensor_list("k", kv),
                              self.tensor_list("v", kv), None, mask, qlens, kvlens, *([None] * 17),
                              heads, scale, PRE_TOKENS, 0, b"BSND", kvh, sparse, INNER_PRECISE, 0, 0, False, 0, 0,
                              out, self.tensor("lse", (1,), ACL_FLOAT), kernel=PFA_KERNEL if causal else IFA_KERNEL)
        if causal:
            return self._prep("aclnnPromptFlashAttentionV3", q, self.tensor("k", kv), self.tensor("v", kv), None,
                              mask, qlens, kvlens, None, None, None, None, None, heads, scale, PRE_TOKENS, 0,
                              b"BSND", kvh, sparse, INNER_PRECISE, out)
        return self._prep("aclnnIncreFlashAttentionV4", q, self.tensor_list("k", kv), self.tensor_list("v", kv),
                          None, None, kvlens, *([None] * 9), heads, scale, b"BSND", kvh, 0, INNER_PRECISE, out)
