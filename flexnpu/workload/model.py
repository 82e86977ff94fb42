"""Model configs and the kernels one serving step launches, with their cost.

Pure: nothing here touches a device. A step is a list of `Kernel`s, each a kernel name (what
a serving engine would call it, e.g. "qkv_proj", "attention_decode"), the emulator built-in
it binds to, its packed arguments (timing-only: every pointer 0) and its FLOPs and HBM bytes
by the same formulas as the emulator's built-ins (docs/emulator.md, "Built-in kernels").

Per layer (Qwen2 / Llama architecture): input RMSNorm, fused QKV projection, RoPE on q and k,
attention, output projection, residual add, post-attention RMSNorm, fused gate/up
projection, SiLU(gate) * up, down projection, residual add. Before the layers an embedding
gather; after them a final RMSNorm and the LM head over the rows that need logits (the
last token of a prompt that finishes its prefill, and every decode token), as vLLM does.
QKV bias and sampling are left out (under 0.1 % of a step's work).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, replace
from functools import lru_cache

ACL_BF16 = 27
ELEM = 2  # bytes per bf16 element


@dataclass(frozen=True)
class ModelConfig:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float = 1e6
    rms_eps: float = 1e-6
    max_context: int = 32768  # max_position_embeddings: prompt + output tokens of one request

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, bf16."""
        return 2 * self.layers * self.kv_heads * self.head_dim * ELEM

    @property
    def params(self) -> int:
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        return self.layers * per_layer + 2 * self.vocab * h + h  # embedding and LM head are not tied

    @property
    def weight_bytes(self) -> int:
        return self.params * ELEM

    def with_layers(self, layers: int) -> ModelConfig:
        return replace(self, name=f"{self.name}/{layers}l", layers=layers)


# Shapes from each model's config.json on Hugging Face (Qwen/Qwen2.5-*-Instruct).
MODELS: dict[str, ModelConfig] = {
    "qwen2.5-7b": ModelConfig("qwen2.5-7b", layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128,
                              intermediate=18944, vocab=152064),
    "qwen2.5-32b": ModelConfig("qwen2.5-32b", layers=64, hidden=5120, heads=40, kv_heads=8, head_dim=128,
                               intermediate=27648, vocab=152064),
    "qwen2.5-72b": ModelConfig("qwen2.5-72b", layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128,
                               intermediate=29568, vocab=152064),
}


def model_by_name(name: str) -> ModelConfig:
    """'qwen2.5-7b', or 'qwen2.5-7b:2' for the same shapes with 2 layers (fast tests)."""
    base, _, layers = name.partition(":")
    if base not in MODELS:
        raise ValueError(f"unknown model {base!r}; known: {', '.join(MODELS)}")
    cfg = MODELS[base]
    return cfg.with_layers(int(layers)) if layers else cfg


# kernel name -> emulator built-in; the kernel library file binds them (KERNEL_LIBRARY)
KERNEL_BUILTINS: dict[str, str] = {
    "embedding": "copy",
    "input_rmsnorm": "rmsnorm",
    "qkv_proj": "gemm",
    "rope": "rope",
    "attention_prefill": "attention_prefill",
    "attention_prefill_chunk": "attention_extend",
    "attention_decode": "attention_decode",
    "o_proj": "gemm",
    "residual_add": "elementwise",
    "post_attention_rmsnorm": "rmsnorm",
    "gate_up_proj": "gemm",
    "silu_mul": "elementwise",
    "down_proj": "gemm",
    "final_rmsnorm": "rmsnorm",
    "lm_head": "gemm",
}


def kernel_library_text() -> str:
    lines = ["flexnpu-kernels 1", "# the reference serving workload's kernels (flexnpu/workload/model.py)"]
    lines += [f"kernel {n:<24} {b}" for n, b in KERNEL_BUILTINS.items()]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Kernel:
    name: str
    builtin: str
    args: bytes
    flops: float
    hbm_bytes: float


# --- the built-ins' argument layouts and cost (docs/emulator.md, emu_kernels.c)

@lru_cache(maxsize=4096)
def gemm(name: str, m: int, n: int, k: int) -> Kernel:
    return Kernel(name, "gemm", struct.pack("<QQQIIIi", 0, 0, 0, m, n, k, ACL_BF16),
                  2.0 * m * n * k, float(m * k + k * n + m * n) * ELEM)


@lru_cache(maxsize=4096)
def rmsnorm(name: str, rows: int, dim: int, eps: float) -> Kernel:
    n = rows * dim
    return Kernel(name, "rmsnorm", struct.pack("<QQQIIfi", 0, 0, 0, rows, dim, eps, ACL_BF16),
                  4.0 * n, float(2 * n + dim) * ELEM)


@lru_cache(maxsize=4096)
def rope(tokens: int, heads: int, head_dim: int, theta: float) -> Kernel:
    n = tokens * heads * head_dim
    return Kernel("rope", "rope", struct.pack("<QQIIIIfi", 0, 0, tokens, heads, head_dim, 0, theta, ACL_BF16),
                  3.0 * n, 2.0 * n * ELEM)


EW_ADD, EW_SILU_MUL = 0, 3


@lru_cache(maxsize=4096)
def elementwise(name: str, n: int, op: int) -> Kernel:
    return Kernel(name, "elementwise", struct.pack("<QQQQIi", 0, 0, 0, n, op, ACL_BF16),
                  (4.0 if op == EW_SILU_MUL else 1.0) * n, 3.0 * n * ELEM)


@lru_cache(maxsize=4096)
def copy(name: str, nbytes: int) -> Kernel:
    return Kernel(name, "copy", struct.pack("<QQQ", 0, 0, nbytes), 0.0, 2.0 * nbytes)


@lru_cache(maxsize=4096)
def attention_prefill(batch: int, heads: int, kv_heads: int, seq: int, head_dim: int) -> Kernel:
    b, h, s, d = batch, heads, seq, head_dim
    return Kernel("attention_prefill", "attention_prefill",
                  struct.pack("<QQQQIIIIIi", 0, 0, 0, 0, batch, heads, kv_heads, seq, head_dim, ACL_BF16),
                  2.0 * b * h * s * s * d, float(2 * b * h * s * d + 2 * b * kv_heads * s * d) * ELEM)


@lru_cache(maxsize=4096)
def attention_extend(heads: int, kv_heads: int, q_len: int, ctx: int, head_dim: int) -> Kernel:
    keys = q_len * (ctx - q_len) + q_len * (q_len + 1) / 2.0
    return Kernel("attention_prefill_chunk", "attention_extend",
                  struct.pack("<QQQQIIIIIIi", 0, 0, 0, 0, 1, heads, kv_heads, q_len, ctx, head_dim, ACL_BF16),
                  4.0 * heads * head_dim * keys, float(2 * heads * q_len * head_dim + 2 * kv_heads * ctx * head_dim) * ELEM)


@lru_cache(maxsize=4096)
def attention_decode(batch: int, heads: int, kv_heads: int, ctx: int, head_dim: int) -> Kernel:
    b, h, c, d = batch, heads, ctx, head_dim
    return Kernel("attention_decode", "attention_decode",
                  struct.pack("<QQQQIIIIIi", 0, 0, 0, 0, batch, heads, kv_heads, ctx, head_dim, ACL_BF16),
                  4.0 * b * h * c * d, float(2 * b * kv_heads * c * d + 2 * b * h * d) * ELEM)


# --- a step

@dataclass(frozen=True)
class Chunk:
    """Prefill work of one request in a step: q_len new tokens, ctx_len tokens in all after
    them (ctx_len == q_len: the whole prompt at once); last: the prompt ends here."""
    q_len: int
    ctx_len: int
    last: bool = True


def step_kernels(cfg: ModelConfig, chunks: tuple[Chunk, ...] = (), decode_ctx: tuple[int, ...] = ()) -> list[Kernel]:
    """Every kernel one engine step launches, in order.

    chunks: prefill work (one per request); decode_ctx: each decoding request's context
    length including its new token. Decode attention is one launch for the batch at the mean
    context (rounded up): its cost is linear in the sum of contexts, as a paged kernel's is.
    """
    t = sum(c.q_len for c in chunks) + len(decode_ctx)
    if t == 0:
        return []
    h, d = cfg.hidden, cfg.head_dim
    qd, kvd = cfg.heads * d, cfg.kv_heads * d
    rows_out = sum(1 for c in chunks if c.last) + len(decode_ctx)
    attn: list[Kernel] = []
    for c in chunks:
        if c.ctx_len == c.q_len:
            attn.append(attention_prefill(1, cfg.heads, cfg.kv_heads, c.q_len, d))
        else:
            attn.append(attention_extend(cfg.heads, cfg.kv_heads, c.q_len, c.ctx_len, d))
    if decode_ctx:
        attn.append(attention_decode(len(decode_ctx), cfg.heads, cfg.kv_heads,
                                     math.ceil(sum(decode_ctx) / len(decode_ctx)), d))
    layer = [
        rmsnorm("input_rmsnorm", t, h, cfg.rms_eps),
        gemm("qkv_proj", t, qd + 2 * kvd, h),
        rope(t, cfg.heads + cfg.kv_heads, d, cfg.rope_theta),
        *attn,
        gemm("o_proj", t, h, qd),
        elementwise("residual_add", t * h, EW_ADD),
        rmsnorm("post_attention_rmsnorm", t, h, cfg.rms_eps),
        gemm("gate_up_proj", t, 2 * cfg.intermediate, h),
        elementwise("silu_mul", t * cfg.intermediate, EW_SILU_MUL),
        gemm("down_proj", t, h, cfg.intermediate),
        elementwise("residual_add", t * h, EW_ADD),
    ]
    out = [copy("embedding", t * h * ELEM)]
    out += layer * cfg.layers
    if rows_out:
        out += [rmsnorm("final_rmsnorm", rows_out, h, cfg.rms_eps), gemm("lm_head", rows_out, cfg.vocab, h)]
    return out


def kernel_seconds(k: Kernel, peak_flops: float, hbm_bw: float, efficiency: dict[str, tuple[float, float]]) -> float:
    """Alone on the device: the roofline at the profile's achieved fraction of peak."""
    ec, eh = efficiency.get(k.builtin, (1.0, 1.0))
    return max(k.flops / (peak_flops * ec), k.hbm_bytes / (hbm_bw * eh))


def step_seconds(kernels: list[Kernel], peak_flops: float, hbm_bw: float,
                 efficiency: dict[str, tuple[float, float]]) -> float:
    return sum(kernel_seconds(k, peak_flops, hbm_bw, efficiency) for k in kernels)
