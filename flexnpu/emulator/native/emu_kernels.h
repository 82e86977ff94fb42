/* Built-in kernels of the emulated device: argument layouts, cost, and data effect.
 *
 * A kernel library file (see docs/emulator.md) binds kernel names to these built-ins.
 * Every layout is a packed little-endian struct passed as aclrtLaunchKernel's argsData.
 * Pointer fields are device pointers; a kernel whose pointers are all 0 is timing-only.
 */
#ifndef FLEXNPU_EMU_KERNELS_H_
#define FLEXNPU_EMU_KERNELS_H_

#include <stddef.h>
#include <stdint.h>

#include "emu_shared.h"

enum emu_builtin {
    EMU_K_GEMM = 0,
    EMU_K_ATTN_PREFILL = 1,
    EMU_K_ATTN_DECODE = 2,
    EMU_K_ELEMENTWISE = 3,
    EMU_K_COPY = 4,
    EMU_K_SYNTHETIC = 5,
    EMU_K_RMSNORM = 6,
    EMU_K_ROPE = 7,
    EMU_K_ATTN_EXTEND = 8,
    EMU_K_COUNT
};

#pragma pack(push, 1)
/* C[m,n] = A[m,k] x B[k,n], row-major */
struct emu_args_gemm {
    uint64_t a, b, c;
    uint32_t m, n, k;
    int32_t dtype; /* aclDataType: ACL_FLOAT, ACL_FLOAT16, ACL_BF16 */
};
/* causal self-attention; q,o: [batch][heads][seq][dim], k,v: [batch][kv_heads][seq][dim] */
struct emu_args_attn_prefill {
    uint64_t q, k, v, o;
    uint32_t batch, heads, kv_heads, seq_len, head_dim;
    int32_t dtype;
};
/* one new token per sequence; q,o: [batch][heads][dim], caches: [batch][kv_heads][ctx][dim] */
struct emu_args_attn_decode {
    uint64_t q, k_cache, v_cache, o;
    uint32_t batch, heads, kv_heads, context_len, head_dim;
    int32_t dtype;
};
/* out[i] = x[i] (op) y[i]; op 0 add, 1 mul, 2 relu (y unused), 3 silu_mul: silu(x[i]) * y[i] */
struct emu_args_elementwise {
    uint64_t x, y, out;
    uint64_t n;
    uint32_t op;
    int32_t dtype;
};
/* dst[0..bytes) = src[0..bytes) */
struct emu_args_copy {
    uint64_t src, dst;
    uint64_t bytes;
};
/* no data; a fixed amount of work, for benchmarks and tests */
struct emu_args_synthetic {
    double flops;
    double hbm_bytes;
};
/* out[r][:] = x[r][:] / rms(x[r][:]) * w[:]; x,out: [rows][dim], w: [dim] */
struct emu_args_rmsnorm {
    uint64_t x, w, out;
    uint32_t rows, dim;
    float eps;
    int32_t dtype;
};
/* rotary embedding (rotate-half form), in place allowed: x,out: [tokens][heads][head_dim];
 * token t is at position pos_offset + t */
struct emu_args_rope {
    uint64_t x, out;
    uint32_t tokens, heads, head_dim, pos_offset;
    float theta;
    int32_t dtype;
};
/* prefill of q_len new tokens after ctx_len - q_len cached ones (a chunked-prefill chunk):
 * q,o: [batch][heads][q_len][dim]; k,v: [batch][kv_heads][ctx_len][dim]; query i sits at
 * position ctx_len - q_len + i and attends causally to keys [0, that position] */
struct emu_args_attn_extend {
    uint64_t q, k, v, o;
    uint32_t batch, heads, kv_heads, q_len, ctx_len, head_dim;
    int32_t dtype;
};
#pragma pack(pop)

struct emu_cost {
    double flops;
    double hbm_bytes;
};

/* One device memory range a kernel touches, for validation before the data effect. */
struct emu_range {
    uint64_t ptr;
    uint64_t bytes;
};

/* Looks a built-in up by its name in a kernel library file; -1 if unknown. */
int emu_builtin_by_name(const char *name);
const char *emu_builtin_name(int builtin);

/* The cores a built-in runs on (enum emu_core_class): gemm cube; elementwise, rmsnorm, rope
 * and copy vector; the attention kernels and synthetic mix. A kernel library line may name
 * another ("cube", "vector" or "mix"): emu_core_class_by_name, -1 if unknown. */
int emu_builtin_core_class(int builtin);
int emu_core_class_by_name(const char *name);
const char *emu_core_class_name(int core_class);

/* Parses argsData. Returns 0 and fills cost and ranges (up to 4, count in *nranges;
 * ranges with ptr 0 are left out), or an aclError for malformed arguments. */
int emu_kernel_prepare(int builtin, const void *args, size_t size, struct emu_cost *cost,
                       struct emu_range *ranges, int *nranges);

/* Divides a kernel's work by the device's achieved fraction of peak for its built-in. */
void emu_kernel_derate(const struct emu_params *p, int builtin, struct emu_cost *cost);

/* Parses "name=compute/hbm,..." (e.g. "gemm=0.6/0.45,rmsnorm=1/0.5") into p's efficiency
 * tables; entries not named keep their value. 0, or -1 with a reason in err. */
int emu_parse_efficiency(const char *spec, struct emu_params *p, char *err, size_t errlen);

/* Applies the kernel's effect on device memory (ranges already validated). */
void emu_kernel_run(int builtin, const void *args);

#endif
