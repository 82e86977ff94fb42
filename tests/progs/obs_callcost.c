/* What a probed AscendCL call costs the calling thread, for scripts/bench_observe.py.
 *
 *   obs_callcost KLIB N ROUNDS      N calls of each kind in a tight loop, ROUNDS times;
 *                                   prints one JSON line per kind with the median and
 *                                   minimum ns per call over the rounds
 *   obs_callcost KLIB --spin SECONDS [DELAY]
 *                                   after DELAY seconds, launches kernels (a stream sync
 *                                   every 256) for SECONDS: a sustained high call rate;
 *                                   prints the number of calls
 *
 * Kinds: launch (aclrtLaunchKernel of the zero-work synthetic kernel: an entry probe),
 * memcpy (aclrtMemcpyAsync H2D of 64 bytes: an entry probe that maps the copy kind),
 * sync (aclrtSynchronizeStream of an idle stream: entry and return probes, on it and on
 * aclrtSynchronizeStreamWithTimeout, which it calls), malloc_free (aclrtMalloc of 4 KiB and
 * aclrtFree: entry and return probes, and the pointer map).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "acl/acl.h"

/* blockDim of a kernel meant to fill the device: at least every core of its class (24 cube,
 * 48 vector on the emulated 910B and 910C), as a real launch asks (docs/emulator.md) */
#define FULL_BLOCK_DIM 48

#pragma pack(push, 1)
struct synthetic_args { double flops, hbm_bytes; };
#pragma pack(pop)

#define CHECK(call)                                                                              \
    do {                                                                                         \
        aclError e_ = (call);                                                                    \
        if (e_ != ACL_SUCCESS) {                                                                 \
            fprintf(stderr, "obs_callcost: %s failed: %d (%s)\n", #call, e_, aclGetRecentErrMsg()); \
            exit(1);                                                                             \
        }                                                                                        \
    } while (0)

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static aclrtStream s;
static aclrtFuncHandle fn;
static void *dev;
static char host[64];
static const struct synthetic_args zero = {0, 0};

static void one(int kind)
{
    void *p;
    switch (kind) {
    case 0: CHECK(aclrtLaunchKernel(fn, FULL_BLOCK_DIM, &zero, sizeof zero, s)); break;
    case 1: CHECK(aclrtMemcpyAsync(dev, 4096, host, sizeof host, ACL_MEMCPY_HOST_TO_DEVICE, s)); break;
    case 2: CHECK(aclrtSynchronizeStream(s)); break;
    case 3:
        CHECK(aclrtMalloc(&p, 4096, ACL_MEM_MALLOC_NORMAL_ONLY));
        CHECK(aclrtFree(p));
        break;
    }
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: obs_callcost KLIB N ROUNDS | obs_callcost KLIB --spin SECONDS [DELAY]\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    CHECK(aclInit(NULL));
    CHECK(aclrtSetDevice(0));
    CHECK(aclrtCreateStream(&s));
    aclrtBinHandle bin;
    CHECK(aclrtBinaryLoadFromFile(argv[1], NULL, &bin));
    CHECK(aclrtBinaryGetFunction(bin, "synthetic", &fn));
    CHECK(aclrtMalloc(&dev, 4096, ACL_MEM_MALLOC_NORMAL_ONLY));

    if (!strcmp(argv[2], "--spin")) {
        if (argc > 4) { /* a delay first, for an observer to attach to this process */
            double d = atof(argv[4]);
            struct timespec ts = {(time_t)d, (long)((d - (double)(time_t)d) * 1e9)};
            nanosleep(&ts, NULL);
        }
        uint64_t end = now_ns() + (uint64_t)(atof(argv[3]) * 1e9), n = 0;
        while (now_ns() < end) {
            for (int i = 0; i < 256; i++) one(0);
            one(2);
            n += 257;
        }
        printf("{\"calls\":%llu}\n", (unsigned long long)n);
        return 0;
    }
    long n = atol(argv[2]);
    int rounds = atoi(argv[3]);
    static const char *const names[] = {"launch", "memcpy", "sync", "malloc_free"};
    double *ns = calloc((size_t)rounds, sizeof *ns);
    for (int k = 0; k < 4; k++) {
        for (int r = 0; r < rounds; r++) {
            uint64_t t0 = now_ns();
            for (long i = 0; i < n; i++) one(k);
            ns[r] = (double)(now_ns() - t0) / (double)n;
            CHECK(aclrtSynchronizeStream(s)); /* not timed: the device keeps up */
        }
        qsort(ns, (size_t)rounds, sizeof *ns, cmp);
        printf("{\"call\":\"%s\",\"n\":%ld,\"rounds\":%d,\"median\":%.1f,\"min\":%.1f}\n", names[k], n, rounds,
               ns[rounds / 2], ns[0]);
    }
    return 0;
}
