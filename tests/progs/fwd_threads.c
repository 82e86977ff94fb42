/* A multi-threaded AscendCL program that knows nothing of FlexNPU: the shape of a serving
 * engine with one host thread per stream.
 *
 * Build: cc fwd_threads.c -I<acl include> -L<libascendcl dir> -lascendcl -pthread -o fwd_threads
 * Run:   ./fwd_threads KERNEL_LIBRARY [DEVICE] [THREADS] [ITERATIONS] [KERNELS]
 *
 * THREADS (default 3) threads each select the device (even threads with aclrtSetDevice, odd
 * ones with aclrtSetCurrentContext on a context the main thread created), create their own
 * stream and do ITERATIONS (default 7) iterations of
 *     H2D x; y = x + x; KERNELS-1 times y = y + x; D2H y; synchronize the stream
 * and check y == (KERNELS + 1) * x, where x differs per thread and iteration and every
 * value is exact in float. KERNELS defaults to 5. Before the threads start, the main
 * thread does 2 such iterations with 2 kernels each, so with the defaults the counts are
 * primes: kernels 3*7*5 + 2*2 = 109, H2D copies = D2H copies = syncs 3*7 + 2 = 23.
 *
 * Prints one JSON line: a checksum of every result (combined in thread order, so it does
 * not depend on scheduling) and the exact count of each call made, by kind, with bytes.
 * Exit code 0 when every result matches.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "acl/acl.h"

#pragma pack(push, 1)
struct ew_args { uint64_t x, y, out; uint64_t n; uint32_t op; int32_t dtype; };
#pragma pack(pop)

enum { EW = 1024, MAIN_ITERS = 2, MAIN_KERNELS = 2, MAX_THREADS = 64 };

static int g_dev, g_iters, g_kernels;
static aclrtFuncHandle g_ew;
static aclrtContext g_ctx;

static atomic_ulong n_kernel, n_h2d, n_d2h, n_sync, n_malloc, n_free, n_stream, n_set_device, n_set_context;
static atomic_ullong b_h2d, b_d2h;

struct worker {
    int id;
    pthread_t thread;
    int ok;
    uint64_t checksum;
    char err[200];
};

#define CHECK(w, call)                                                                             \
    do {                                                                                           \
        aclError e_ = (call);                                                                      \
        if (e_ != ACL_SUCCESS) {                                                                   \
            const char *m_ = aclGetRecentErrMsg();                                                 \
            snprintf((w)->err, sizeof (w)->err, "line %d: %s failed: %d (%s)", __LINE__, #call, e_, \
                     m_ ? m_ : "");                                                                \
            (w)->ok = 0;                                                                           \
            return;                                                                                \
        }                                                                                          \
    } while (0)

static uint64_t fnv1a(uint64_t h, const void *data, size_t n)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}

/* `iters` iterations of H2D, `kernels` launches, D2H, sync on one fresh stream. */
static void run_iterations(struct worker *w, int iters, int kernels)
{
    aclrtStream s;
    CHECK(w, aclrtCreateStream(&s));
    atomic_fetch_add(&n_stream, 1);
    void *dx, *dy;
    const size_t bytes = sizeof(float) * EW;
    CHECK(w, aclrtMalloc(&dx, bytes, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(w, aclrtMalloc(&dy, bytes, ACL_MEM_MALLOC_HUGE_FIRST));
    atomic_fetch_add(&n_malloc, 2);
    float *x = malloc(bytes), *y = malloc(bytes);
    w->checksum = 0xcbf29ce484222325ULL;
    for (int it = 0; it < iters && w->ok; it++) {
        /* small integers over 4: every sum below is exact */
        for (int i = 0; i < EW; i++) x[i] = (float)((w->id * 131 + it * 17 + i) % 1000) / 4.0f;
        memset(y, 0, bytes);
        CHECK(w, aclrtMemcpyAsync(dx, bytes, x, bytes, ACL_MEMCPY_HOST_TO_DEVICE, s));
        atomic_fetch_add(&n_h2d, 1);
        atomic_fetch_add(&b_h2d, bytes);
        struct ew_args first = {(uint64_t)(uintptr_t)dx, (uint64_t)(uintptr_t)dx, (uint64_t)(uintptr_t)dy, EW, 0,
                                ACL_FLOAT};
        CHECK(w, aclrtLaunchKernel(g_ew, 4, &first, sizeof first, s));
        atomic_fetch_add(&n_kernel, 1);
        for (int k = 1; k < kernels; k++) {
            struct ew_args more = {(uint64_t)(uintptr_t)dy, (uint64_t)(uintptr_t)dx, (uint64_t)(uintptr_t)dy, EW, 0,
                                   ACL_FLOAT};
            CHECK(w, aclrtLaunchKernel(g_ew, 4, &more, sizeof more, s));
            atomic_fetch_add(&n_kernel, 1);
        }
        CHECK(w, aclrtMemcpyAsync(y, bytes, dy, bytes, ACL_MEMCPY_DEVICE_TO_HOST, s));
        atomic_fetch_add(&n_d2h, 1);
        atomic_fetch_add(&b_d2h, bytes);
        CHECK(w, aclrtSynchronizeStream(s));
        atomic_fetch_add(&n_sync, 1);
        for (int i = 0; i < EW; i++)
            if (y[i] != (float)(kernels + 1) * x[i]) {
                snprintf(w->err, sizeof w->err, "iteration %d: y[%d] is %g, expected %g", it, i, y[i],
                         (kernels + 1) * x[i]);
                w->ok = 0;
                break;
            }
        w->checksum = fnv1a(w->checksum, y, bytes);
    }
    free(x);
    free(y);
    CHECK(w, aclrtFree(dx));
    CHECK(w, aclrtFree(dy));
    atomic_fetch_add(&n_free, 2);
    CHECK(w, aclrtDestroyStream(s));
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    if (w->id % 2 == 0) {
        aclError e = aclrtSetDevice(g_dev);
        if (e != ACL_SUCCESS) {
            snprintf(w->err, sizeof w->err, "aclrtSetDevice(%d) failed: %d", g_dev, e);
            w->ok = 0;
            return NULL;
        }
        atomic_fetch_add(&n_set_device, 1);
    } else {
        aclError e = aclrtSetCurrentContext(g_ctx);
        if (e != ACL_SUCCESS) {
            snprintf(w->err, sizeof w->err, "aclrtSetCurrentContext failed: %d", e);
            w->ok = 0;
            return NULL;
        }
        atomic_fetch_add(&n_set_context, 1);
    }
    run_iterations(w, g_iters, g_kernels);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s KERNEL_LIBRARY [DEVICE] [THREADS] [ITERATIONS] [KERNELS]\n", argv[0]);
        return 2;
    }
    g_dev = argc > 2 ? atoi(argv[2]) : 0;
    int nthreads = argc > 3 ? atoi(argv[3]) : 3;
    g_iters = argc > 4 ? atoi(argv[4]) : 7;
    g_kernels = argc > 5 ? atoi(argv[5]) : 5;
    if (nthreads < 1 || nthreads > MAX_THREADS || g_iters < 1 || g_kernels < 1) {
        fprintf(stderr, "fwd_threads: THREADS must be 1..%d, ITERATIONS and KERNELS at least 1\n", MAX_THREADS);
        return 2;
    }

    struct worker mainw = {.id = 1000, .ok = 1};
#define MAIN_CHECK(call)                                                                          \
    do {                                                                                          \
        aclError e_ = (call);                                                                     \
        if (e_ != ACL_SUCCESS) {                                                                  \
            fprintf(stderr, "fwd_threads: %s failed: %d (%s)\n", #call, e_, aclGetRecentErrMsg()); \
            return 1;                                                                             \
        }                                                                                         \
    } while (0)
    MAIN_CHECK(aclInit(NULL));
    MAIN_CHECK(aclrtSetDevice(g_dev));
    atomic_fetch_add(&n_set_device, 1);
    MAIN_CHECK(aclrtCreateContext(&g_ctx, g_dev));
    aclrtBinHandle bin;
    MAIN_CHECK(aclrtBinaryLoadFromFile(argv[1], NULL, &bin));
    MAIN_CHECK(aclrtBinaryGetFunction(bin, "elementwise", &g_ew));
    /* the context made current above is g_ctx; the main thread keeps using it */
    run_iterations(&mainw, MAIN_ITERS, MAIN_KERNELS);
    if (!mainw.ok) {
        fprintf(stderr, "fwd_threads: main thread: %s\n", mainw.err);
        return 1;
    }

    struct worker *ws = calloc((size_t)nthreads, sizeof *ws);
    for (int i = 0; i < nthreads; i++) {
        ws[i].id = i;
        ws[i].ok = 1;
        if (pthread_create(&ws[i].thread, NULL, worker_main, &ws[i]) != 0) {
            fprintf(stderr, "fwd_threads: pthread_create failed\n");
            return 1;
        }
    }
    int ok = 1;
    uint64_t sum = mainw.checksum;
    for (int i = 0; i < nthreads; i++) {
        pthread_join(ws[i].thread, NULL);
        if (!ws[i].ok) {
            fprintf(stderr, "fwd_threads: thread %d: %s\n", i, ws[i].err);
            ok = 0;
        }
        sum = fnv1a(sum, &ws[i].checksum, sizeof ws[i].checksum);
    }
    MAIN_CHECK(aclrtBinaryUnLoad(bin));
    MAIN_CHECK(aclrtDestroyContext(g_ctx));
    MAIN_CHECK(aclrtResetDevice(g_dev));
    MAIN_CHECK(aclFinalize());

    printf("{\"program\":\"fwd_threads\",\"ok\":%s,\"threads\":%d,\"iterations\":%d,\"kernels_per_iteration\":%d,"
           "\"checksum\":\"%016llx\",\"counts\":{\"kernel\":%lu,\"memcpy_h2d\":%lu,\"memcpy_d2h\":%lu,\"sync\":%lu,"
           "\"malloc\":%lu,\"free\":%lu,\"stream\":%lu,\"set_device\":%lu,\"set_context\":%lu},"
           "\"bytes\":{\"h2d\":%llu,\"d2h\":%llu}}\n",
           ok ? "true" : "false", nthreads, g_iters, g_kernels, (unsigned long long)sum, atomic_load(&n_kernel),
           atomic_load(&n_h2d), atomic_load(&n_d2h), atomic_load(&n_sync), atomic_load(&n_malloc),
           atomic_load(&n_free), atomic_load(&n_stream), atomic_load(&n_set_device), atomic_load(&n_set_context),
           atomic_load(&b_h2d), atomic_load(&b_d2h));
    free(ws);
    return ok ? 0 : 1;
}
