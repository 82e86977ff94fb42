/* An ordinary AscendCL program: it knows nothing of FlexNPU.
 *
 * Build: cc sample_acl.c -I<acl include dir> -L<dir of libascendcl.so> -lascendcl -o sample_acl
 * Run:   ./sample_acl KERNEL_LIBRARY [DEVICE] [ITERATIONS]
 *
 * On two streams it uploads inputs, runs elementwise add, GEMM and a copy kernel, and
 * attention (prefill then decode), downloads the results and checks them against the
 * host. Exit code 0 when every result matches.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "acl/acl.h"

/* blockDim: how many cores a kernel runs on. On a 910B (Ascend910B2) or a 910C die there are
 * 24 cube cores (AIC) and 48 vector cores (AIV); a kernel that asks for fewer than its class
 * has gets that share of the device's compute, as on real hardware (docs/emulator.md). A
 * cube kernel (GEMM) counts AIC, a vector kernel AIV, a mix kernel (attention) AIC+2 AIV groups. */
#define AIC_CORES 24
#define AIV_CORES 48

#define CHECK(call)                                                                        \
    do {                                                                                   \
        aclError e_ = (call);                                                              \
        if (e_ != ACL_SUCCESS) {                                                           \
            const char *m_ = aclGetRecentErrMsg();                                         \
            fprintf(stderr, "%s:%d: %s failed: %d (%s)\n", __FILE__, __LINE__, #call, e_, \
                    m_ ? m_ : "");                                                         \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

#pragma pack(push, 1)
struct gemm_args { uint64_t a, b, c; uint32_t m, n, k; int32_t dtype; };
struct ew_args { uint64_t x, y, out; uint64_t n; uint32_t op; int32_t dtype; };
struct copy_args { uint64_t src, dst; uint64_t bytes; };
struct attn_args { uint64_t q, k, v, o; uint32_t batch, heads, kv_heads, len, head_dim; int32_t dtype; };
#pragma pack(pop)

static uint64_t P(void *p) { return (uint64_t)(uintptr_t)p; }

static int close_enough(const float *got, const float *want, size_t n, const char *what)
{
    for (size_t i = 0; i < n; i++)
        if (fabsf(got[i] - want[i]) > 1e-3f * (1.0f + fabsf(want[i]))) {
            fprintf(stderr, "%s: element %zu is %f, expected %f\n", what, i, got[i], want[i]);
            return 0;
        }
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s KERNEL_LIBRARY [DEVICE] [ITERATIONS]\n", argv[0]);
        return 2;
    }
    int dev = argc > 2 ? atoi(argv[2]) : 0, iters = argc > 3 ? atoi(argv[3]) : 3;
    enum { M = 32, K = 48, N = 24, EW = 4096, H = 4, S = 16, D = 32 };

    CHECK(aclInit(NULL));
    CHECK(aclrtSetDevice(dev));
    aclrtStream s0, s1;
    CHECK(aclrtCreateStream(&s0));
    CHECK(aclrtCreateStream(&s1));
    aclrtBinHandle bin;
    CHECK(aclrtBinaryLoadFromFile(argv[1], NULL, &bin));
    aclrtFuncHandle f_gemm, f_ew, f_copy, f_pre, f_dec;
    CHECK(aclrtBinaryGetFunction(bin, "gemm", &f_gemm));
    CHECK(aclrtBinaryGetFunction(bin, "elementwise", &f_ew));
    CHECK(aclrtBinaryGetFunction(bin, "copy", &f_copy));
    CHECK(aclrtBinaryGetFunction(bin, "attention_prefill", &f_pre));
    CHECK(aclrtBinaryGetFunction(bin, "attention_decode", &f_dec));

    /* host inputs and expected results */
    float *a, *b, *x, *y, *q, *kv;
    CHECK(aclrtMallocHost((void **)&a, sizeof(float) * M * K));
    CHECK(aclrtMallocHost((void **)&b, sizeof(float) * K * N));
    CHECK(aclrtMallocHost((void **)&x, sizeof(float) * EW));
    CHECK(aclrtMallocHost((void **)&y, sizeof(float) * EW));
    CHECK(aclrtMallocHost((void **)&q, sizeof(float) * H * S * D));
    CHECK(aclrtMallocHost((void **)&kv, sizeof(float) * H * S * D));
    for (int i = 0; i < M * K; i++) a[i] = (float)((i * 7) % 13) / 13.0f - 0.5f;
    for (int i = 0; i < K * N; i++) b[i] = (float)((i * 5) % 11) / 11.0f - 0.5f;
    for (int i = 0; i < EW; i++) x[i] = (float)i, y[i] = (float)(2 * i + 1);
    for (int i = 0; i < H * S * D; i++) q[i] = (float)((i * 3) % 17) / 17.0f, kv[i] = (float)((i * 11) % 19) / 19.0f;
    float *want_c = calloc(M * N, sizeof(float)), *want_z = malloc(sizeof(float) * EW);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++)
            for (int p = 0; p < K; p++) want_c[i * N + j] += a[i * K + p] * b[p * N + j];
    for (int i = 0; i < EW; i++) want_z[i] = x[i] + y[i];
    /* attention: the last query row of prefill equals decode over the full context */

    void *da, *db, *dc, *dx, *dy, *dz, *dz2, *dq, *dk, *dv, *dop, *dod;
    size_t qkv = sizeof(float) * H * S * D;
    CHECK(aclrtMalloc(&da, sizeof(float) * M * K, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&db, sizeof(float) * K * N, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&dc, sizeof(float) * M * N, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&dx, sizeof(float) * EW, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&dy, sizeof(float) * EW, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&dz, sizeof(float) * EW, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&dz2, sizeof(float) * EW, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&dq, qkv, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&dk, qkv, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&dv, qkv, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&dop, qkv, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&dod, sizeof(float) * H * D, ACL_MEM_MALLOC_HUGE_FIRST));

    float *c = malloc(sizeof(float) * M * N), *z = malloc(sizeof(float) * EW), *op = malloc(qkv),
          *od = malloc(sizeof(float) * H * D);
    int ok = 1;
    for (int it = 0; it < iters && ok; it++) {
        CHECK(aclrtMemcpyAsync(da, sizeof(float) * M * K, a, sizeof(float) * M * K, ACL_MEMCPY_HOST_TO_DEVICE, s0));
        CHECK(aclrtMemcpyAsync(db, sizeof(float) * K * N, b, sizeof(float) * K * N, ACL_MEMCPY_HOST_TO_DEVICE, s0));
        struct gemm_args g = {P(da), P(db), P(dc), M, N, K, ACL_FLOAT};
        CHECK(aclrtLaunchKernel(f_gemm, AIC_CORES, &g, sizeof g, s0));
        CHECK(aclrtMemcpyAsync(c, sizeof(float) * M * N, dc, sizeof(float) * M * N, ACL_MEMCPY_DEVICE_TO_HOST, s0));

        CHECK(aclrtMemcpyAsync(dx, sizeof(float) * EW, x, sizeof(float) * EW, ACL_MEMCPY_HOST_TO_DEVICE, s1));
        CHECK(aclrtMemcpyAsync(dy, sizeof(float) * EW, y, sizeof(float) * EW, ACL_MEMCPY_HOST_TO_DEVICE, s1));
        struct ew_args w = {P(dx), P(dy), P(dz), EW, 0, ACL_FLOAT};
        CHECK(aclrtLaunchKernel(f_ew, AIV_CORES, &w, sizeof w, s1));
        struct copy_args cp = {P(dz), P(dz2), sizeof(float) * EW};
        CHECK(aclrtLaunchKernel(f_copy, AIV_CORES, &cp, sizeof cp, s1));
        CHECK(aclrtMemcpyAsync(z, sizeof(float) * EW, dz2, sizeof(float) * EW, ACL_MEMCPY_DEVICE_TO_HOST, s1));

        CHECK(aclrtMemcpy(dq, qkv, q, qkv, ACL_MEMCPY_HOST_TO_DEVICE));
        CHECK(aclrtMemcpy(dk, qkv, kv, qkv, ACL_MEMCPY_HOST_TO_DEVICE));
        CHECK(aclrtMemcpy(dv, qkv, q, qkv, ACL_MEMCPY_HOST_TO_DEVICE));
        struct attn_args pre = {P(dq), P(dk), P(dv), P(dop), 1, H, H, S, D, ACL_FLOAT};
        CHECK(aclrtLaunchKernel(f_pre, AIC_CORES, &pre, sizeof pre, s0));
        /* decode for the last position: its query is the last row of q per head */
        for (int h = 0; h < H; h++)
            CHECK(aclrtMemcpyAsync((char *)dq + sizeof(float) * h * D, sizeof(float) * D, q + (h * S + S - 1) * D,
                                   sizeof(float) * D, ACL_MEMCPY_HOST_TO_DEVICE, s0));
        struct attn_args dec = {P(dq), P(dk), P(dv), P(dod), 1, H, H, S, D, ACL_FLOAT};
        CHECK(aclrtLaunchKernel(f_dec, AIC_CORES, &dec, sizeof dec, s0));
        CHECK(aclrtMemcpyAsync(op, qkv, dop, qkv, ACL_MEMCPY_DEVICE_TO_HOST, s0));
        CHECK(aclrtMemcpyAsync(od, sizeof(float) * H * D, dod, sizeof(float) * H * D, ACL_MEMCPY_DEVICE_TO_HOST, s0));

        CHECK(aclrtSynchronizeStream(s0));
        CHECK(aclrtSynchronizeStream(s1));
        ok &= close_enough(c, want_c, M * N, "gemm");
        ok &= close_enough(z, want_z, EW, "elementwise+copy");
        for (int h = 0; h < H && ok; h++)
            ok &= close_enough(od + h * D, op + (h * S + S - 1) * D, D, "decode vs prefill last row");
    }
    size_t free_b, total_b;
    CHECK(aclrtGetMemInfo(ACL_HBM_MEM, &free_b, &total_b));
    printf("sample_acl: device %d, %d iterations, %s; HBM %zu MiB free of %zu MiB\n", dev, iters,
           ok ? "all results correct" : "WRONG RESULTS", free_b >> 20, total_b >> 20);

    void *all[] = {da, db, dc, dx, dy, dz, dz2, dq, dk, dv, dop, dod};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) CHECK(aclrtFree(all[i]));
    void *hall[] = {a, b, x, y, q, kv};
    for (size_t i = 0; i < sizeof hall / sizeof *hall; i++) CHECK(aclrtFreeHost(hall[i]));
    CHECK(aclrtBinaryUnLoad(bin));
    CHECK(aclrtDestroyStream(s0));
    CHECK(aclrtDestroyStream(s1));
    CHECK(aclrtResetDevice(dev));
    CHECK(aclFinalize());
    return ok ? 0 : 1;
}
