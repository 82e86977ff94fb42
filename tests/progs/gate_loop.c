/* A looping AscendCL workload for the dispatch-gate tests: an ordinary program that knows
 * nothing of FlexNPU. Each iteration launches K "synthetic" kernels, each modelled at MS
 * milliseconds of device time, on one stream and synchronizes that stream.
 *
 *   gate_loop KLIB DEV ITERS MS K [--seconds S] [--wait-stdin] [--wait-end] [--tflops T] [--quiet]
 *             [--ms-max HI]
 *
 *   ITERS         iterations to run; 0 with --seconds S: run until S seconds have passed
 *   --wait-stdin  after set-up (device selected, kernel loaded, one warm-up kernel synced)
 *                 print the "ready" line and wait for a line on stdin before looping, so a
 *                 test can set gates before any timed work is dispatched
 *   --wait-end    after the "done" line wait for a line on stdin before exiting, so a
 *                 test can read the client's gate counters while it is still registered
 *   --tflops T    the device's peak (default 353.9, a 910b) to turn MS into flops
 *   --quiet       no per-iteration lines
 *   --ms-max HI   kernels of mixed length: kernel j of an iteration is modelled at one of
 *                 MS, MS+(HI-MS)/4, ..., HI ms, in a fixed cycle (a prefill-like mix)
 *
 * Prints JSON lines on stdout, flushed at once:
 *   {"ready":true,"pid":P}                                          after set-up
 *   {"iter":i,"t_ms":..,"iter_ms":..,"call_ms":..}                  per iteration (call_ms:
 *                                                                   longest launch call in it)
 *   {"done":true,"pid":P,"iters":N,"wall_ms":..,"max_call_ms":..,"max_iter_ms":..}
 * Exits 0 unless an AscendCL call failed (then prints {"ok":false,...} and exits 1).
 *
 * Build: cc gate_loop.c -I<acl include> -L<libascendcl dir> -lascendcl
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "acl/acl.h"

/* blockDim of a kernel meant to fill the device: at least every core of its class (24 cube,
 * 48 vector on the emulated 910B and 910C), as a real launch asks (docs/emulator.md) */
#define FULL_BLOCK_DIM 48

#pragma pack(push, 1)
struct synthetic_args {
    double flops, hbm_bytes;
};
#pragma pack(pop)

static void die_acl(const char *what, aclError e)
{
    printf("{\"ok\":false,\"call\":\"%s\",\"code\":%d}\n", what, e);
    fflush(stdout);
    exit(1);
}

#define CHECK(call)                                \
    do {                                           \
        aclError e_ = (call);                      \
        if (e_ != ACL_SUCCESS) die_acl(#call, e_); \
    } while (0)

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 6) {
        fprintf(stderr,
                "usage: %s KLIB DEV ITERS MS K [--seconds S] [--wait-stdin] [--wait-end] [--tflops T] [--quiet] [--ms-max HI]\n",
                argv[0]);
        return 2;
    }
    const char *klib = argv[1];
    int dev = atoi(argv[2]);
    long iters = atol(argv[3]);
    double ms = atof(argv[4]);
    int k = atoi(argv[5]);
    double seconds = 0, tflops = 353.9, ms_max = 0;
    int wait_stdin = 0, wait_end = 0, quiet = 0;
    for (int i = 6; i < argc; i++) {
        if (!strcmp(argv[i], "--seconds") && i + 1 < argc) seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--tflops") && i + 1 < argc) tflops = atof(argv[++i]);
        else if (!strcmp(argv[i], "--ms-max") && i + 1 < argc) ms_max = atof(argv[++i]);
        else if (!strcmp(argv[i], "--wait-stdin")) wait_stdin = 1;
        else if (!strcmp(argv[i], "--wait-end")) wait_end = 1;
        else if (!strcmp(argv[i], "--quiet")) quiet = 1;
        else {
            fprintf(stderr, "%s: unknown argument %s\n", argv[0], argv[i]);
            return 2;
        }
    }
    if (iters <= 0 && seconds <= 0) {
        fprintf(stderr, "%s: give ITERS > 0 or --seconds S\n", argv[0]);
        return 2;
    }

    CHECK(aclInit(NULL));
    CHECK(aclrtSetDevice(dev));
    aclrtBinHandle bin;
    aclrtFuncHandle f;
    CHECK(aclrtBinaryLoadFromFile(klib, NULL, &bin));
    CHECK(aclrtBinaryGetFunction(bin, "synthetic", &f));
    aclrtStream s;
    CHECK(aclrtCreateStream(&s));
    struct synthetic_args warm = {0, 0};
    CHECK(aclrtLaunchKernel(f, FULL_BLOCK_DIM, &warm, sizeof warm, s));
    CHECK(aclrtSynchronizeStream(s));
    printf("{\"ready\":true,\"pid\":%d}\n", getpid());
    fflush(stdout);
    char line[64];
    if (wait_stdin && !fgets(line, sizeof line, stdin)) return 3;

    struct synthetic_args mix[5];
    for (int m = 0; m < 5; m++) {
        double kms = ms_max > ms ? ms + (ms_max - ms) * m / 4.0 : ms;
        mix[m] = (struct synthetic_args){tflops * 1e12 * kms / 1e3, 0};
    }
    uint64_t t0 = now_ns(), deadline = seconds > 0 ? t0 + (uint64_t)(seconds * 1e9) : UINT64_MAX;
    double max_call = 0, max_iter = 0;
    long done = 0;
    while ((iters <= 0 || done < iters) && now_ns() < deadline) {
        uint64_t it0 = now_ns();
        double call_max = 0;
        for (int j = 0; j < k; j++) {
            uint64_t c0 = now_ns();
            const struct synthetic_args *a = &mix[(j * 3) % 5]; /* all one length without --ms-max */
            CHECK(aclrtLaunchKernel(f, FULL_BLOCK_DIM, a, sizeof *a, s));
            double c = (double)(now_ns() - c0) / 1e6;
            if (c > call_max) call_max = c;
        }
        CHECK(aclrtSynchronizeStream(s));
        uint64_t it1 = now_ns();
        double iter_ms = (double)(it1 - it0) / 1e6;
        if (call_max > max_call) max_call = call_max;
        if (iter_ms > max_iter) max_iter = iter_ms;
        done++;
        if (!quiet) {
            printf("{\"iter\":%ld,\"t_ms\":%.3f,\"iter_ms\":%.3f,\"call_ms\":%.3f}\n", done,
                   (double)(it1 - t0) / 1e6, iter_ms, call_max);
            fflush(stdout);
        }
    }
    printf("{\"done\":true,\"pid\":%d,\"iters\":%ld,\"wall_ms\":%.3f,\"max_call_ms\":%.3f,\"max_iter_ms\":%.3f}\n",
           getpid(), done, (double)(now_ns() - t0) / 1e6, max_call, max_iter);
    fflush(stdout);
    if (wait_end && !fgets(line, sizeof line, stdin)) return 3;
    CHECK(aclrtDestroyStream(s));
    CHECK(aclrtBinaryUnLoad(bin));
    CHECK(aclrtResetDevice(dev));
    CHECK(aclFinalize());
    return 0;
}
