/* An engine-shaped AscendCL loop for the controller's tests and benchmarks: an ordinary
 * program that knows nothing of FlexNPU. Each step launches K kernels of MS milliseconds
 * of modelled device time on one stream, synchronises, then pauses GAP milliseconds (a
 * serving engine waiting for requests: a half-loaded decode instance has GAP ~ its step).
 *
 *   engine_loop KLIB DEV K MS --seconds S [--gap-ms G] [--tflops T] [--start-ms T0] [--kernel NAME]
 *               [--until-stdin] [--warm-ms W]
 *
 *   --start-ms T0  wait until T0 ms of CLOCK_MONOTONIC (so several loops start together)
 *   --kernel NAME  the kernel to launch (default "synthetic"): a kernel library that maps a
 *                  name such as prompt_flash_attention to the synthetic built-in gives the
 *                  loop a serving engine's kernel name at the same modelled cost
 *   --warm-ms W    the warm-up kernel's modelled time (default 0: no work). A warm-up as long as
 *                  the steps' kernels makes even the first interval an observer sees look like
 *                  the loop's work (a zero-work launch alone looks like a decode step)
 *   --until-stdin  also stop at the first step end that finds a line (or EOF) on stdin; after
 *                  the "done" line wait for one more line (or EOF) before exiting, so a test
 *                  can compare the device's counts with the steps while the process lives
 *
 * Prints JSON lines on stdout, flushed at once:
 *   {"ready":true,"pid":P,"first_ms":..}                after set-up (first_ms: CLOCK_MONOTONIC ms
 *                                                       of its first dispatch, the warm-up kernel)
 *   {"step":i,"t0_ms":..,"step_ms":..,"busy_ms":..}     per step (t0: CLOCK_MONOTONIC ms;
 *                                                       busy_ms: K * MS, the work it carried)
 *   {"done":true,"pid":P,"steps":N,"wall_ms":..}
 * Exits 0 unless an AscendCL call failed (then prints {"ok":false,...} and exits 1).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <poll.h>
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

static void sleep_until(uint64_t t)
{
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ULL), .tv_nsec = (long)(t % 1000000000ULL)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) != 0) {
    }
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s KLIB DEV K MS --seconds S [--gap-ms G] [--tflops T] [--start-ms T0] [--kernel NAME] [--until-stdin] [--warm-ms W]\n",
                argv[0]);
        return 2;
    }
    const char *klib = argv[1];
    int dev = atoi(argv[2]);
    int k = atoi(argv[3]);
    double ms = atof(argv[4]), seconds = 0, gap_ms = 0, tflops = 353.9, start_ms = 0, warm_ms = 0;
    const char *kernel = "synthetic";
    int until_stdin = 0;
    for (int i = 5; i < argc; i++) {
        if (!strcmp(argv[i], "--seconds") && i + 1 < argc) seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--gap-ms") && i + 1 < argc) gap_ms = atof(argv[++i]);
        else if (!strcmp(argv[i], "--tflops") && i + 1 < argc) tflops = atof(argv[++i]);
        else if (!strcmp(argv[i], "--start-ms") && i + 1 < argc) start_ms = atof(argv[++i]);
        else if (!strcmp(argv[i], "--kernel") && i + 1 < argc) kernel = argv[++i];
        else if (!strcmp(argv[i], "--until-stdin")) until_stdin = 1;
        else if (!strcmp(argv[i], "--warm-ms") && i + 1 < argc) warm_ms = atof(argv[++i]);
        else {
            fprintf(stderr, "%s: unknown argument %s\n", argv[0], argv[i]);
            return 2;
        }
    }
    if (k <= 0 || ms <= 0 || seconds <= 0 || gap_ms < 0 || warm_ms < 0) {
        fprintf(stderr, "%s: need K > 0, MS > 0, --seconds > 0, --gap-ms >= 0, --warm-ms >= 0\n", argv[0]);
        return 2;
    }
    CHECK(aclInit(NULL));
    CHECK(aclrtSetDevice(dev));
    aclrtBinHandle bin;
    aclrtFuncHandle f;
    CHECK(aclrtBinaryLoadFromFile(klib, NULL, &bin));
    CHECK(aclrtBinaryGetFunction(bin, kernel, &f));
    aclrtStream s;
    CHECK(aclrtCreateStream(&s));
    struct synthetic_args warm = {tflops * 1e12 * warm_ms / 1e3, 0};
    uint64_t first = now_ns();
    CHECK(aclrtLaunchKernel(f, FULL_BLOCK_DIM, &warm, sizeof warm, s));
    CHECK(aclrtSynchronizeStream(s));
    printf("{\"ready\":true,\"pid\":%d,\"first_ms\":%.3f}\n", getpid(), (double)first / 1e6);
    fflush(stdout);
    if (start_ms > 0) sleep_until((uint64_t)(start_ms * 1e6));

    struct synthetic_args a = {tflops * 1e12 * ms / 1e3, 0};
    uint64_t t0 = now_ns(), deadline = t0 + (uint64_t)(seconds * 1e9);
    long done = 0;
    while (now_ns() < deadline) {
        uint64_t s0 = now_ns();
        for (int j = 0; j < k; j++) CHECK(aclrtLaunchKernel(f, FULL_BLOCK_DIM, &a, sizeof a, s));
        CHECK(aclrtSynchronizeStream(s));
        uint64_t s1 = now_ns();
        done++;
        printf("{\"step\":%ld,\"t0_ms\":%.3f,\"step_ms\":%.3f,\"busy_ms\":%.3f}\n", done, (double)s0 / 1e6,
               (double)(s1 - s0) / 1e6, k * ms);
        fflush(stdout);
        if (until_stdin) {
            struct pollfd pfd = {.fd = 0, .events = POLLIN};
            if (poll(&pfd, 1, 0) > 0) break;
        }
        if (gap_ms > 0) sleep_until(s1 + (uint64_t)(gap_ms * 1e6));
    }
    printf("{\"done\":true,\"pid\":%d,\"steps\":%ld,\"wall_ms\":%.3f}\n", getpid(), done, (double)(now_ns() - t0) / 1e6);
    fflush(stdout);
    if (until_stdin) {
        char line[64];
        if (fgets(line, sizeof line, stdin)) (void)fgets(line, sizeof line, stdin); /* the stop line, then one more */
    }
    CHECK(aclrtDestroyStream(s));
    CHECK(aclrtBinaryUnLoad(bin));
    CHECK(aclrtResetDevice(dev));
    CHECK(aclFinalize());
    return 0;
}
