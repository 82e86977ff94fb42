/* The observer's exactness workload: an ordinary AscendCL program that makes a PRIME
 * number of each call FlexNPU's probes count, from three threads, and prints what it did.
 *
 * Build (linked):  cc obs_workload.c -I<acl include> -L<lib dir> -lascendcl -lm -pthread
 * Build (dlopen):  cc -DOBS_DLOPEN obs_workload.c -I<acl include> -ldl -lm -pthread
 *                  (never linked with libascendcl; loads it with dlopen at run time)
 * Run:  obs_workload KERNEL_LIBRARY [--device D] [--wait] [--hold] [--device-first]
 *
 * It prints {"ready":true,"pid":P} once the runtime is loaded and initialised; with
 * --wait it then reads one line on stdin before it starts (so an observer can attach to a
 * running process first). When the work is done it prints the truth, one JSON line: the
 * calls by Op, the bytes copied by direction, memset bytes and the device memory it still
 * holds. With --hold it then waits for a line on stdin before it exits (so its memory can
 * be compared with the emulator's while it is alive). With --device-first the main thread
 * selects the device before it loads the kernels (one more aclrtSetDevice, in the truth):
 * forwarded execution loads a binary on the thread's device.
 *
 * Calls, in total over the three threads (every number prime):
 *   aclrtSetDevice 3, aclrtLaunchKernel 97,
 *   aclrtMemcpyAsync 23 (11 H2D, 7 D2D, 5 D2H), aclrtMemcpy 13 (5 H2D, 5 D2H, 3 D2D),
 *   aclrtMemsetAsync 7, aclrtRecordEvent 5, aclrtStreamWaitEvent 5,
 *   aclrtMalloc 19, aclrtFree 11,
 *   synchronisations 29 (23 aclrtSynchronizeStream, 3 aclrtSynchronizeDevice,
 *   3 aclrtSynchronizeEvent; the runtime calls its *WithTimeout variants inside them).
 * Device allocations are whole pages, so the emulator's page-rounded accounting and the
 * bytes asked for agree.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "acl/acl.h"

#define NTHREADS 3
#define BUF_BYTES (1u << 20)

/* Every runtime function used: linked directly, or looked up with dlsym. */
#define ACL_FUNCS(X)                                                                                    \
    X(aclInit, aclError, (const char *))                                                                \
    X(aclGetRecentErrMsg, const char *, (void))                                                         \
    X(aclrtSetDevice, aclError, (int32_t))                                                              \
    X(aclrtCreateStream, aclError, (aclrtStream *))                                                     \
    X(aclrtSynchronizeStream, aclError, (aclrtStream))                                                  \
    X(aclrtSynchronizeDevice, aclError, (void))                                                         \
    X(aclrtSynchronizeEvent, aclError, (aclrtEvent))                                                    \
    X(aclrtCreateEvent, aclError, (aclrtEvent *))                                                       \
    X(aclrtRecordEvent, aclError, (aclrtEvent, aclrtStream))                                            \
    X(aclrtStreamWaitEvent, aclError, (aclrtStream, aclrtEvent))                                        \
    X(aclrtMalloc, aclError, (void **, size_t, aclrtMemMallocPolicy))                                   \
    X(aclrtFree, aclError, (void *))                                                                    \
    X(aclrtMemcpy, aclError, (void *, size_t, const void *, size_t, aclrtMemcpyKind))                   \
    X(aclrtMemcpyAsync, aclError, (void *, size_t, const void *, size_t, aclrtMemcpyKind, aclrtStream)) \
    X(aclrtMemsetAsync, aclError, (void *, size_t, int32_t, size_t, aclrtStream))                       \
    X(aclrtBinaryLoadFromFile, aclError, (const char *, aclrtBinaryLoadOptions *, aclrtBinHandle *))    \
    X(aclrtBinaryGetFunction, aclError, (const aclrtBinHandle, const char *, aclrtFuncHandle *))        \
    X(aclrtLaunchKernel, aclError, (aclrtFuncHandle, uint32_t, const void *, size_t, aclrtStream))

#ifdef OBS_DLOPEN
#include <dlfcn.h>
#define DECLARE(name, ret, params) static ret(*p_##name) params;
ACL_FUNCS(DECLARE)
#define ACL(name) p_##name
static void load_runtime(void)
{
    void *lib = dlopen("libascendcl.so", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "obs_workload: dlopen(libascendcl.so): %s\n", dlerror());
        exit(1);
    }
#define LOOKUP(name, ret, params)                                              \
    if (!(*(void **)&p_##name = dlsym(lib, #name))) {                          \
        fprintf(stderr, "obs_workload: dlsym(%s): %s\n", #name, dlerror());    \
        exit(1);                                                               \
    }
    ACL_FUNCS(LOOKUP)
}
#else
#define ACL(name) name
static void load_runtime(void) {}
#endif

#define CHECK(call)                                                                              \
    do {                                                                                         \
        aclError e_ = (call);                                                                    \
        if (e_ != ACL_SUCCESS) {                                                                 \
            const char *m_ = ACL(aclGetRecentErrMsg)();                                          \
            fprintf(stderr, "obs_workload: %s failed: %d %s\n", #call, e_, m_ ? m_ : "");        \
            exit(1);                                                                             \
        }                                                                                        \
    } while (0)

#pragma pack(push, 1)
struct synthetic_args { double flops, hbm_bytes; };
#pragma pack(pop)

/* totals, split over the threads: thread t does share(total, t) */
enum { N_SETDEV = 3, N_LAUNCH = 97, N_H2D_ASYNC = 11, N_D2D_ASYNC = 7, N_D2H_ASYNC = 5, N_H2D_SYNC = 5,
       N_D2H_SYNC = 5, N_D2D_SYNC = 3, N_MEMSET = 7, N_RECORD = 5, N_WAIT = 5, N_MALLOC = 19, N_FREE = 11,
       N_SYNC_STREAM = 23, N_SYNC_DEVICE = 3, N_SYNC_EVENT = 3 };

static int share(int total, int t) { return total / NTHREADS + (t < total % NTHREADS); }

static int g_dev;
static aclrtFuncHandle g_fn;
static _Atomic uint64_t n_launch, n_memcpy_async, n_memcpy, n_memset, n_record, n_wait, n_malloc, n_free,
    n_sync, n_setdev, b_h2d, b_d2h, b_d2d, b_memset, live_bytes;

/* copy sizes differ per call so that a miscounted call shows in the bytes */
static size_t copy_size(int t, int i) { return 4096 + 64 * (size_t)(7 * t + i) + (size_t)i; }

static void *worker(void *arg)
{
    int t = (int)(intptr_t)arg;
    CHECK(ACL(aclrtSetDevice)(g_dev));
    n_setdev++;
    aclrtStream s;
    aclrtEvent ev;
    CHECK(ACL(aclrtCreateStream)(&s));
    CHECK(ACL(aclrtCreateEvent)(&ev));
    void *a, *b, *extra[8];
    CHECK(ACL(aclrtMalloc)(&a, BUF_BYTES, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(ACL(aclrtMalloc)(&b, BUF_BYTES, ACL_MEM_MALLOC_HUGE_FIRST));
    n_malloc += 2;
    live_bytes += 2 * BUF_BYTES;
    char *host = malloc(BUF_BYTES);
    memset(host, t + 1, BUF_BYTES);

    int n_extra = share(N_MALLOC - 2 * NTHREADS, t), n_freed = share(N_FREE, t);
    for (int i = 0; i < n_extra; i++) {
        size_t sz = 4096 * (size_t)(1 + 3 * t + i);
        CHECK(ACL(aclrtMalloc)(&extra[i], sz, ACL_MEM_MALLOC_NORMAL_ONLY));
        n_malloc++;
        live_bytes += sz;
    }
    for (int i = 0; i < n_freed; i++) {
        CHECK(ACL(aclrtFree)(extra[i]));
        n_free++;
        live_bytes -= 4096 * (size_t)(1 + 3 * t + i);
    }

    struct synthetic_args k = {2e6, 4096};
    int nk = share(N_LAUNCH, t), nsync = share(N_SYNC_STREAM, t), i;
    for (i = 0; i < nk; i++) {
        CHECK(ACL(aclrtLaunchKernel)(g_fn, 1, &k, sizeof k, s));
        n_launch++;
        if (i % 4 == 3 && nsync > 1) { /* keep the last stream sync for the end */
            CHECK(ACL(aclrtSynchronizeStream)(s));
            n_sync++;
            nsync--;
        }
    }
#define ASYNC(n, dst, src, kind, counter)                                                    \
    for (i = 0; i < share(n, t); i++) {                                                      \
        size_t sz = copy_size(t, i);                                                         \
        CHECK(ACL(aclrtMemcpyAsync)(dst, BUF_BYTES, src, sz, kind, s));                      \
        n_memcpy_async++;                                                                    \
        counter += sz;                                                                       \
    }
#define SYNC_COPY(n, dst, src, kind, counter)                                                \
    for (i = 0; i < share(n, t); i++) {                                                      \
        size_t sz = copy_size(t, i + 3);                                                     \
        CHECK(ACL(aclrtMemcpy)(dst, BUF_BYTES, src, sz, kind));                              \
        n_memcpy++;                                                                          \
        counter += sz;                                                                       \
    }
    ASYNC(N_H2D_ASYNC, a, host, ACL_MEMCPY_HOST_TO_DEVICE, b_h2d)
    ASYNC(N_D2D_ASYNC, b, a, ACL_MEMCPY_DEVICE_TO_DEVICE, b_d2d)
    for (i = 0; i < share(N_RECORD, t); i++) {
        CHECK(ACL(aclrtRecordEvent)(ev, s));
        n_record++;
    }
    for (i = 0; i < share(N_WAIT, t); i++) {
        CHECK(ACL(aclrtStreamWaitEvent)(s, ev));
        n_wait++;
    }
    for (i = 0; i < share(N_SYNC_EVENT, t); i++) {
        CHECK(ACL(aclrtSynchronizeEvent)(ev));
        n_sync++;
    }
    ASYNC(N_D2H_ASYNC, host, b, ACL_MEMCPY_DEVICE_TO_HOST, b_d2h)
    for (i = 0; i < share(N_MEMSET, t); i++) {
        size_t sz = 8192 + 512 * (size_t)i;
        CHECK(ACL(aclrtMemsetAsync)(b, BUF_BYTES, 0, sz, s));
        n_memset++;
        b_memset += sz;
    }
    for (i = 0; i < nsync; i++) {
        CHECK(ACL(aclrtSynchronizeStream)(s));
        n_sync++;
    }
    SYNC_COPY(N_H2D_SYNC, a, host, ACL_MEMCPY_HOST_TO_DEVICE, b_h2d)
    SYNC_COPY(N_D2H_SYNC, host, a, ACL_MEMCPY_DEVICE_TO_HOST, b_d2h)
    SYNC_COPY(N_D2D_SYNC, b, a, ACL_MEMCPY_DEVICE_TO_DEVICE, b_d2d)
    for (i = 0; i < share(N_SYNC_DEVICE, t); i++) {
        CHECK(ACL(aclrtSynchronizeDevice)());
        n_sync++;
    }
    free(host);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: obs_workload KERNEL_LIBRARY [--device D] [--wait] [--hold] [--device-first]\n");
        return 2;
    }
    int wait = 0, hold = 0, device_first = 0;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--wait")) wait = 1;
        else if (!strcmp(argv[i], "--hold")) hold = 1;
        else if (!strcmp(argv[i], "--device-first")) device_first = 1;
        else if (!strcmp(argv[i], "--device") && i + 1 < argc) g_dev = atoi(argv[++i]);
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    load_runtime();
    CHECK(ACL(aclInit)(NULL));
    if (device_first) {
        CHECK(ACL(aclrtSetDevice)(g_dev));
        n_setdev++;
    }
    aclrtBinHandle bin;
    CHECK(ACL(aclrtBinaryLoadFromFile)(argv[1], NULL, &bin));
    CHECK(ACL(aclrtBinaryGetFunction)(bin, "synthetic", &g_fn));
    printf("{\"ready\":true,\"pid\":%d}\n", (int)getpid());
    char line[64];
    if (wait && !fgets(line, sizeof line, stdin)) return 0;

    pthread_t th[NTHREADS];
    for (int t = 0; t < NTHREADS; t++) pthread_create(&th[t], NULL, worker, (void *)(intptr_t)t);
    for (int t = 0; t < NTHREADS; t++) pthread_join(th[t], NULL);

    printf("{\"pid\":%d,\"threads\":%d,\"ops\":{\"kernel\":%llu,\"memcpy_async\":%llu,\"memcpy\":%llu,"
           "\"memset_async\":%llu,\"event_record\":%llu,\"stream_wait\":%llu,\"alloc\":%llu,\"free\":%llu,"
           "\"sync\":%llu,\"device_set\":%llu},\"bytes\":{\"h2d\":%llu,\"d2h\":%llu,\"d2d\":%llu},"
           "\"memset_bytes\":%llu,\"live_bytes\":%llu}\n",
           (int)getpid(), NTHREADS, (unsigned long long)n_launch, (unsigned long long)n_memcpy_async,
           (unsigned long long)n_memcpy, (unsigned long long)n_memset, (unsigned long long)n_record,
           (unsigned long long)n_wait, (unsigned long long)n_malloc, (unsigned long long)n_free,
           (unsigned long long)n_sync, (unsigned long long)n_setdev, (unsigned long long)b_h2d,
           (unsigned long long)b_d2h, (unsigned long long)b_d2d, (unsigned long long)b_memset,
           (unsigned long long)live_bytes);
    if (hold && !fgets(line, sizeof line, stdin)) return 0;
    return 0;
}
