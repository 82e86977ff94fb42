/* An AscendCL program that loads the runtime at run time, as Python bindings and plugin
 * hosts do: dlopen("libascendcl.so") and dlsym for every function it calls. It is never
 * linked with -lascendcl and knows nothing of FlexNPU.
 *
 * Build: cc fwd_dlopen.c -I<acl include> -ldl -lm -o fwd_dlopen   (headers for the types only)
 * Run:   LD_LIBRARY_PATH=<dir of libascendcl.so> ./fwd_dlopen KERNEL_LIBRARY [DEVICE] [ITERATIONS]
 *
 * On two streams, ITERATIONS (default 5) times: uploads inputs, runs GEMM on stream 0 and
 * elementwise add + copy on stream 1 (stream 1 waits on an event recorded on stream 0 for
 * the GEMM's input), clears a buffer with a memset, downloads the results and checks them
 * against the host. Before the loop x goes up in 3 pieces and a relu and a copy kernel run
 * once, so with the default 5 iterations every count is a prime: kernels 3*5+2 = 17, H2D
 * copies 4*5+3 = 23, D2H 2*5+1 = 11, syncs 2*5+3 = 13, memsets, event records and waits 5,
 * allocations and frees 7. Prints one JSON line: the results' checksum, the count of each
 * call by kind, and the bytes copied by direction.
 * Exit code 0 when every result matches.
 */
#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "acl/acl.h"

#pragma pack(push, 1)
struct gemm_args { uint64_t a, b, c; uint32_t m, n, k; int32_t dtype; };
struct ew_args { uint64_t x, y, out; uint64_t n; uint32_t op; int32_t dtype; };
struct copy_args { uint64_t src, dst; uint64_t bytes; };
#pragma pack(pop)

/* Every runtime function this program uses, looked up by name. */
#define ACL_FUNCS(X)                                                                                     \
    X(aclInit, aclError, (const char *))                                                                 \
    X(aclFinalize, aclError, (void))                                                                     \
    X(aclGetRecentErrMsg, const char *, (void))                                                          \
    X(aclrtSetDevice, aclError, (int32_t))                                                               \
    X(aclrtGetDevice, aclError, (int32_t *))                                                             \
    X(aclrtResetDevice, aclError, (int32_t))                                                             \
    X(aclrtCreateStream, aclError, (aclrtStream *))                                                      \
    X(aclrtDestroyStream, aclError, (aclrtStream))                                                       \
    X(aclrtSynchronizeStream, aclError, (aclrtStream))                                                   \
    X(aclrtSynchronizeDevice, aclError, (void))                                                          \
    X(aclrtCreateEvent, aclError, (aclrtEvent *))                                                        \
    X(aclrtDestroyEvent, aclError, (aclrtEvent))                                                         \
    X(aclrtRecordEvent, aclError, (aclrtEvent, aclrtStream))                                             \
    X(aclrtStreamWaitEvent, aclError, (aclrtStream, aclrtEvent))                                         \
    X(aclrtMalloc, aclError, (void **, size_t, aclrtMemMallocPolicy))                                    \
    X(aclrtFree, aclError, (void *))                                                                     \
    X(aclrtMemcpy, aclError, (void *, size_t, const void *, size_t, aclrtMemcpyKind))                    \
    X(aclrtMemcpyAsync, aclError, (void *, size_t, const void *, size_t, aclrtMemcpyKind, aclrtStream))  \
    X(aclrtMemsetAsync, aclError, (void *, size_t, int32_t, size_t, aclrtStream))                        \
    X(aclrtBinaryLoadFromFile, aclError, (const char *, aclrtBinaryLoadOptions *, aclrtBinHandle *))     \
    X(aclrtBinaryGetFunction, aclError, (const aclrtBinHandle, const char *, aclrtFuncHandle *))         \
    X(aclrtBinaryUnLoad, aclError, (aclrtBinHandle))                                                     \
    X(aclrtLaunchKernel, aclError, (aclrtFuncHandle, uint32_t, const void *, size_t, aclrtStream))

#define DECLARE(name, ret, params) static ret(*p_##name) params;
ACL_FUNCS(DECLARE)

static int g_nsyms;

static void load_runtime(void)
{
    void *lib = dlopen("libascendcl.so", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "fwd_dlopen: dlopen(libascendcl.so): %s\n", dlerror());
        exit(1);
    }
#define LOOKUP(name, ret, params)                                                       \
    *(void **)&p_##name = dlsym(lib, #name);                                            \
    if (!p_##name) {                                                                    \
        fprintf(stderr, "fwd_dlopen: dlsym(%s): %s\n", #name, dlerror());               \
        exit(1);                                                                        \
    }                                                                                   \
    g_nsyms++;
    ACL_FUNCS(LOOKUP)
}

/* calls made, by kind */
static unsigned long n_kernel, n_h2d, n_d2h, n_memset, n_record, n_wait, n_sync, n_malloc, n_free;
static unsigned long long b_h2d, b_d2h, b_memset;

#define CHECK(call)                                                                        \
    do {                                                                                   \
        aclError e_ = (call);                                                              \
        if (e_ != ACL_SUCCESS) {                                                           \
            const char *m_ = p_aclGetRecentErrMsg();                                       \
            fprintf(stderr, "%s:%d: %s failed: %d (%s)\n", __FILE__, __LINE__, #call, e_, \
                    m_ ? m_ : "");                                                         \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

static uint64_t P(void *p) { return (uint64_t)(uintptr_t)p; }

static void *dev_alloc(size_t bytes)
{
    void *p;
    CHECK(p_aclrtMalloc(&p, bytes, ACL_MEM_MALLOC_HUGE_FIRST));
    n_malloc++;
    return p;
}

static void h2d(void *dst, const void *src, size_t bytes, aclrtStream s)
{
    CHECK(p_aclrtMemcpyAsync(dst, bytes, src, bytes, ACL_MEMCPY_HOST_TO_DEVICE, s));
    n_h2d++, b_h2d += bytes;
}

static void d2h(void *dst, const void *src, size_t bytes, aclrtStream s)
{
    CHECK(p_aclrtMemcpyAsync(dst, bytes, src, bytes, ACL_MEMCPY_DEVICE_TO_HOST, s));
    n_d2h++, b_d2h += bytes;
}

static void launch(aclrtFuncHandle f, const void *args, size_t size, aclrtStream s)
{
    CHECK(p_aclrtLaunchKernel(f, 8, args, size, s));
    n_kernel++;
}

static uint64_t fnv1a(uint64_t h, const void *data, size_t n)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

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
    int dev = argc > 2 ? atoi(argv[2]) : 0, iters = argc > 3 ? atoi(argv[3]) : 5;
    enum { M = 24, K = 40, N = 16, EW = 2048 };
    load_runtime();

    CHECK(p_aclInit(NULL));
    CHECK(p_aclrtSetDevice(dev));
    int32_t got_dev = -1;
    CHECK(p_aclrtGetDevice(&got_dev));
    aclrtStream s0, s1;
    CHECK(p_aclrtCreateStream(&s0));
    CHECK(p_aclrtCreateStream(&s1));
    aclrtEvent ev;
    CHECK(p_aclrtCreateEvent(&ev));
    aclrtBinHandle bin;
    CHECK(p_aclrtBinaryLoadFromFile(argv[1], NULL, &bin));
    aclrtFuncHandle f_gemm, f_ew, f_copy;
    CHECK(p_aclrtBinaryGetFunction(bin, "gemm", &f_gemm));
    CHECK(p_aclrtBinaryGetFunction(bin, "elementwise", &f_ew));
    CHECK(p_aclrtBinaryGetFunction(bin, "copy", &f_copy));

    static float a[M * K], b[K * N], x[EW], y[EW], c[M * N], z[EW], r[EW], want_c[M * N], want_z[EW], want_r[EW];
    const size_t ab = sizeof a, bb = sizeof b, cb = sizeof c, eb = sizeof x;
    void *da = dev_alloc(ab), *db = dev_alloc(bb), *dc = dev_alloc(cb), *dx = dev_alloc(eb), *dy = dev_alloc(eb),
         *dz = dev_alloc(eb), *dz2 = dev_alloc(eb);

    for (int i = 0; i < EW; i++) x[i] = (float)(i % 97) - 48.0f, want_r[i] = x[i] > 0 ? x[i] : 0;
    /* before the loop: x up in 3 pieces, relu(x) on stream 1 copied aside by a copy kernel,
     * downloaded synchronously */
    const size_t piece = eb / 4;
    h2d(dx, x, piece, s1);
    h2d((char *)dx + piece, (char *)x + piece, piece, s1);
    h2d((char *)dx + 2 * piece, (char *)x + 2 * piece, eb - 2 * piece, s1);
    struct ew_args relu = {P(dx), 0, P(dz), EW, 2, ACL_FLOAT};
    launch(f_ew, &relu, sizeof relu, s1);
    struct copy_args cp0 = {P(dz), P(dz2), eb};
    launch(f_copy, &cp0, sizeof cp0, s1);
    CHECK(p_aclrtSynchronizeStream(s1));
    CHECK(p_aclrtSynchronizeStream(s0));
    n_sync += 2;
    CHECK(p_aclrtMemcpy(r, eb, dz2, eb, ACL_MEMCPY_DEVICE_TO_HOST));
    n_d2h++, b_d2h += eb;
    int ok = close_enough(r, want_r, EW, "relu+copy");
    uint64_t sum = fnv1a(0xcbf29ce484222325ULL, r, eb);

    for (int it = 0; it < iters && ok; it++) {
        for (int i = 0; i < M * K; i++) a[i] = (float)((i * 7 + it) % 13) / 13.0f - 0.5f;
        for (int i = 0; i < K * N; i++) b[i] = (float)((i * 5 + 3 * it) % 11) / 11.0f - 0.5f;
        for (int i = 0; i < EW; i++) x[i] = (float)(i + it), y[i] = (float)(2 * i + 1 - it);
        memset(want_c, 0, sizeof want_c);
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++)
                for (int p = 0; p < K; p++) want_c[i * N + j] += a[i * K + p] * b[p * N + j];
        for (int i = 0; i < EW; i++) want_z[i] = x[i] + y[i];

        /* stream 0: GEMM */
        h2d(da, a, ab, s0);
        h2d(db, b, bb, s0);
        CHECK(p_aclrtRecordEvent(ev, s0));
        n_record++;
        struct gemm_args g = {P(da), P(db), P(dc), M, N, K, ACL_FLOAT};
        launch(f_gemm, &g, sizeof g, s0);
        d2h(c, dc, cb, s0);

        /* stream 1: waits for stream 0's uploads, then elementwise add and a copy */
        CHECK(p_aclrtStreamWaitEvent(s1, ev));
        n_wait++;
        CHECK(p_aclrtMemsetAsync(dz2, eb, 0, eb, s1));
        n_memset++, b_memset += eb;
        h2d(dx, x, eb, s1);
        h2d(dy, y, eb, s1);
        struct ew_args w = {P(dx), P(dy), P(dz), EW, 0, ACL_FLOAT};
        launch(f_ew, &w, sizeof w, s1);
        struct copy_args cp = {P(dz), P(dz2), eb};
        launch(f_copy, &cp, sizeof cp, s1);
        d2h(z, dz2, eb, s1);

        CHECK(p_aclrtSynchronizeStream(s0));
        CHECK(p_aclrtSynchronizeStream(s1));
        n_sync += 2;
        ok &= close_enough(c, want_c, M * N, "gemm");
        ok &= close_enough(z, want_z, EW, "elementwise+copy");
        sum = fnv1a(sum, c, cb);
        sum = fnv1a(sum, z, eb);
    }
    CHECK(p_aclrtSynchronizeDevice());
    n_sync++;

    void *all[] = {da, db, dc, dx, dy, dz, dz2};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) {
        CHECK(p_aclrtFree(all[i]));
        n_free++;
    }
    CHECK(p_aclrtBinaryUnLoad(bin));
    CHECK(p_aclrtDestroyEvent(ev));
    CHECK(p_aclrtDestroyStream(s0));
    CHECK(p_aclrtDestroyStream(s1));
    CHECK(p_aclrtResetDevice(dev));
    CHECK(p_aclFinalize());

    printf("{\"program\":\"fwd_dlopen\",\"ok\":%s,\"device\":%d,\"iterations\":%d,\"symbols\":%d,"
           "\"checksum\":\"%016llx\",\"counts\":{\"kernel\":%lu,\"memcpy_h2d\":%lu,\"memcpy_d2h\":%lu,"
           "\"memset\":%lu,\"event_record\":%lu,\"event_wait\":%lu,\"sync\":%lu,\"malloc\":%lu,\"free\":%lu},"
           "\"bytes\":{\"h2d\":%llu,\"d2h\":%llu,\"memset\":%llu}}\n",
           ok ? "true" : "false", got_dev, iters, g_nsyms, (unsigned long long)sum, n_kernel, n_h2d, n_d2h, n_memset,
           n_record, n_wait, n_sync, n_malloc, n_free, b_h2d, b_d2h, b_memset);
    return ok ? 0 : 1;
}
