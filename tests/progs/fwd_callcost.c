/* What one dispatching AscendCL call costs the calling thread, in ns: N calls in a tight
 * loop with clock_gettime around the loop, ROUNDS times, a stream synchronisation (not
 * timed) between rounds so the device keeps up. An ordinary AscendCL program; the FlexNPU
 * benchmark (scripts/bench_forward.py) runs it with and without the shim.
 *
 *   fwd_callcost KLIB N ROUNDS [--call kernel|event|both] [--device D]
 *   fwd_callcost KLIB --idle [--device D]
 *   fwd_callcost KLIB --steady GAP_NS [--device D]
 *
 * --call kernel  aclrtLaunchKernel of the zero-work "synthetic" kernel (no device memory)
 * --call event   aclrtRecordEvent
 * --call both    both, rounds interleaved (the default): tells which is cheaper
 * --idle         select the device, run one kernel, print {"ready":true}, then wait for
 *                stdin to close: a client that holds its place on the device without work
 * --steady       record an event about every GAP_NS (sleeping between calls, timer slack
 *                1 ns) until killed, synchronising every 10000 calls: a client that keeps
 *                dispatching without holding a CPU, for measuring how soon a gate change
 *                takes effect
 *
 * Prints one JSON line per measured call: {"call", "n", "rounds", "ns_per_call": [per
 * round], "median", "min"}.
 *
 * Build: cc fwd_callcost.c -I<acl include> -L<libascendcl dir> -lascendcl -o fwd_callcost
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>

#include "acl/acl.h"

/* blockDim of a kernel meant to fill the device: at least every core of its class (24 cube,
 * 48 vector on the emulated 910B and 910C), as a real launch asks (docs/emulator.md) */
#define FULL_BLOCK_DIM 48

#pragma pack(push, 1)
struct synthetic_args { double flops, hbm_bytes; };
#pragma pack(pop)

#define CHECK(call)                                                                          \
    do {                                                                                     \
        aclError e_ = (call);                                                                \
        if (e_ != ACL_SUCCESS) {                                                             \
            fprintf(stderr, "fwd_callcost: %s failed: %d (%s)\n", #call, e_, aclGetRecentErrMsg()); \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

static double now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static aclrtStream g_stream;
static aclrtFuncHandle g_synthetic;
static aclrtEvent g_event;
static const struct synthetic_args g_zero = {0.0, 0.0};

/* One timed round of n calls; returns ns per call. */
static double round_kernel(long n)
{
    double t0 = now_ns();
    for (long i = 0; i < n; i++)
        if (__builtin_expect(aclrtLaunchKernel(g_synthetic, FULL_BLOCK_DIM, &g_zero, sizeof g_zero, g_stream) != ACL_SUCCESS, 0))
            CHECK(aclrtLaunchKernel(g_synthetic, FULL_BLOCK_DIM, &g_zero, sizeof g_zero, g_stream));
    double t1 = now_ns();
    CHECK(aclrtSynchronizeStream(g_stream));
    return (t1 - t0) / (double)n;
}

static double round_event(long n)
{
    double t0 = now_ns();
    for (long i = 0; i < n; i++)
        if (__builtin_expect(aclrtRecordEvent(g_event, g_stream) != ACL_SUCCESS, 0))
            CHECK(aclrtRecordEvent(g_event, g_stream));
    double t1 = now_ns();
    CHECK(aclrtSynchronizeStream(g_stream));
    return (t1 - t0) / (double)n;
}

static void report(const char *call, long n, int rounds, double *v)
{
    printf("{\"call\":\"%s\",\"n\":%ld,\"rounds\":%d,\"ns_per_call\":[", call, n, rounds);
    for (int i = 0; i < rounds; i++) printf("%s%.2f", i ? "," : "", v[i]);
    qsort(v, (size_t)rounds, sizeof *v, cmp_double);
    double med = rounds % 2 ? v[rounds / 2] : (v[rounds / 2 - 1] + v[rounds / 2]) / 2;
    printf("],\"median\":%.2f,\"min\":%.2f}\n", med, v[0]);
}

int main(int argc, char **argv)
{
    const char *usage = "usage: %s KLIB N ROUNDS [--call kernel|event|both] [--device D]\n"
                        "       %s KLIB --idle [--device D]\n";
    if (argc < 3) {
        fprintf(stderr, usage, argv[0], argv[0]);
        return 2;
    }
    const char *call = "both";
    int dev = 0, idle = 0, npos = 0;
    long steady = -1;
    const char *pos[3] = {0};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--call") && i + 1 < argc) call = argv[++i];
        else if (!strcmp(argv[i], "--device") && i + 1 < argc) dev = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--idle")) idle = 1;
        else if (!strcmp(argv[i], "--steady") && i + 1 < argc) steady = atol(argv[++i]);
        else if (npos < 3) pos[npos++] = argv[i];
        else {
            fprintf(stderr, usage, argv[0], argv[0]);
            return 2;
        }
    }
    long n = npos > 1 ? atol(pos[1]) : 0;
    int rounds = npos > 2 ? atoi(pos[2]) : 0;
    int do_kernel = !strcmp(call, "kernel") || !strcmp(call, "both");
    int do_event = !strcmp(call, "event") || !strcmp(call, "both");
    if (!idle && steady < 0 && (n < 1 || rounds < 1 || (!do_kernel && !do_event))) {
        fprintf(stderr, usage, argv[0], argv[0]);
        return 2;
    }

    CHECK(aclInit(NULL));
    CHECK(aclrtSetDevice(dev));
    CHECK(aclrtCreateStream(&g_stream));
    CHECK(aclrtCreateEventWithFlag(&g_event, ACL_EVENT_SYNC));
    aclrtBinHandle bin;
    CHECK(aclrtBinaryLoadFromFile(pos[0], NULL, &bin));
    CHECK(aclrtBinaryGetFunction(bin, "synthetic", &g_synthetic));

    if (steady >= 0) {
        prctl(PR_SET_TIMERSLACK, 1UL);
        struct timespec gap = {.tv_sec = steady / 1000000000L, .tv_nsec = steady % 1000000000L};
        for (long i = 1;; i++) {
            CHECK(aclrtRecordEvent(g_event, g_stream));
            if (i % 10000 == 0) CHECK(aclrtSynchronizeStream(g_stream));
            nanosleep(&gap, NULL);
        }
    } else if (idle) {
        round_kernel(1);
        printf("{\"ready\":true}\n");
        fflush(stdout);
        char buf[64];
        while (fgets(buf, sizeof buf, stdin)) {
        }
    } else {
        double *vk = calloc((size_t)rounds, sizeof *vk), *ve = calloc((size_t)rounds, sizeof *ve);
        /* warm up: resolve symbols, register the kernel name, fault in the rings */
        if (do_kernel) round_kernel(n);
        if (do_event) round_event(n);
        for (int r = 0; r < rounds; r++) {
            if (do_kernel) vk[r] = round_kernel(n);
            if (do_event) ve[r] = round_event(n);
        }
        if (do_kernel) report("aclrtLaunchKernel", n, rounds, vk);
        if (do_event) report("aclrtRecordEvent", n, rounds, ve);
        free(vk);
        free(ve);
    }
    CHECK(aclrtBinaryUnLoad(bin));
    CHECK(aclrtDestroyEvent(g_event));
    CHECK(aclrtDestroyStream(g_stream));
    CHECK(aclrtResetDevice(dev));
    CHECK(aclFinalize());
    return 0;
}
