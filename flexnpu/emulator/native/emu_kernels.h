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

enum emu_builtin {
    EMU_K_GEMM = 0,
    EMU_K_ATTN_PREFILL = 1,
    EMU_K_ATTN_DECODE = 2,
    EMU_K_ELEMENTWISE = 3,
    EMU_K_COPY = 4,
    EMU_K_SYNTHETIC = 5,
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
/* out[i] = x[i] (op) y[i]; op 0 add, 1 mul, 2 relu (y unused) */
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

/* Parses argsData. Returns 0 and fills cost and ranges (up to 4, count in *nranges;
 * ranges with ptr 0 are left out), or an aclError for malformed arguments. */
int emu_kernel_prepare(int builtin, const void *args, size_t size, struct emu_cost *cost,
                       struct emu_range *ranges, int *nranges);

/* Applies the kernel's effect on device memory (ranges already validated). */
void emu_kernel_run(int builtin, const void *args);

#endif
