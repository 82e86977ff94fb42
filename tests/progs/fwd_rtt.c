/* Costs a forwarded program sees, measured by an ordinary AscendCL program (the forwarding
 * benchmark, scripts/bench_forward.py, runs it with and without libflexnpu_fwd.so):
 *
 *   fwd_rtt KLIB sync N          N synchronisations of an idle stream, each timed: the round
 *                                trip of a synchronous call -> {"p50_us","p99_us","max_us"}
 *   fwd_rtt KLIB launch N R      R rounds of N zero-work launches, the loop timed, a stream
 *                                sync (not timed) between rounds -> {"median_ns","min_ns"} per launch
 *   fwd_rtt KLIB small N FLOPS   N kernels of FLOPS each back to back on one stream, then a sync:
 *                                -> {"wall_ms","kernels_per_s"}
 *   fwd_rtt KLIB rate R S        zero-work launches at R per second for S seconds (sleeping
 *                                between), a sync every 1000 -> {"launches","wall_s"}
 *   fwd_rtt - floor N            no device: N futex round trips between two processes (a
 *                                request and its answer, each a store and a FUTEX_WAKE to a
 *                                sleeper) -> {"p50_us","p99_us","max_us"}
 *
 * Build: cc fwd_rtt.c -I<acl include> -L<libascendcl dir> -lascendcl -o fwd_rtt
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "acl/acl.h"

#define FULL_BLOCK_DIM 48

#pragma pack(push, 1)
struct synthetic_args { double flops, hbm_bytes; };
#pragma pack(pop)

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void percentiles(uint64_t *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_u64);
    printf("{\"samples\":%d,\"p50_us\":%.2f,\"p99_us\":%.2f,\"max_us\":%.2f}\n", n, v[n / 2] / 1e3,
           v[(int)(0.99 * (n - 1))] / 1e3, v[n - 1] / 1e3);
}

static void check(aclError e, const char *what)
{
    if (e) {
        printf("{\"ok\":false,\"call\":\"%s\",\"code\":%d}\n", what, e);
        exit(1);
    }
}

/* ---- the floor: a futex ping-pong between two processes, both sleeping */
struct pp {
    _Atomic uint32_t req, ans;
};

static void floor_rtt(int n)
{
    struct pp *s = mmap(NULL, sizeof *s, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    pid_t child = fork();
    if (child == 0) {
        for (uint32_t i = 1; i <= (uint32_t)n; i++) {
            while (atomic_load(&s->req) < i) syscall(SYS_futex, &s->req, FUTEX_WAIT, i - 1, NULL, NULL, 0);
            atomic_store(&s->ans, i);
            syscall(SYS_futex, &s->ans, FUTEX_WAKE, 1, NULL, NULL, 0);
        }
        _exit(0);
    }
    uint64_t *v = malloc(sizeof(uint64_t) * (size_t)n);
    for (uint32_t i = 1; i <= (uint32_t)n; i++) {
        usleep(200); /* the other side is asleep, as an idle executor is */
        uint64_t t0 = now_ns();
        atomic_store(&s->req, i);
        syscall(SYS_futex, &s->req, FUTEX_WAKE, 1, NULL, NULL, 0);
        while (atomic_load(&s->ans) < i) syscall(SYS_futex, &s->ans, FUTEX_WAIT, i - 1, NULL, NULL, 0);
        v[i - 1] = now_ns() - t0;
    }
    waitpid(child, NULL, 0);
    percentiles(v, n);
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: fwd_rtt KLIB sync|launch|small|rate ... | fwd_rtt - floor N\n");
        return 2;
    }
    const char *mode = argv[2];
    if (!strcmp(mode, "floor")) {
        floor_rtt(atoi(argv[3]));
        return 0;
    }
    check(aclInit(NULL), "aclInit");
    check(aclrtSetDevice(0), "aclrtSetDevice");
    aclrtStream st;
    check(aclrtCreateStream(&st), "aclrtCreateStream");
    aclrtBinHandle bin;
    aclrtFuncHandle fn;
    check(aclrtBinaryLoadFromFile(argv[1], NULL, &bin), "aclrtBinaryLoadFromFile");
    check(aclrtBinaryGetFunction(bin, "synthetic", &fn), "aclrtBinaryGetFunction");
    struct synthetic_args zero = {0, 0};
    check(aclrtLaunchKernel(fn, FULL_BLOCK_DIM, &zero, sizeof zero, st), "warm-up");
    check(aclrtSynchronizeStream(st), "aclrtSynchronizeStream");
    if (!strcmp(mode, "sync")) {
        int n = atoi(argv[3]);
        uint64_t *v = malloc(sizeof(uint64_t) * (size_t)n);
        for (int i = 0; i < n; i++) {
            usleep(200); /* the executor has gone to sleep: the round trip includes its wake-up */
            uint64_t t0 = now_ns();
            check(aclrtSynchronizeStream(st), "aclrtSynchronizeStream");
            v[i] = now_ns() - t0;
        }
        percentiles(v, n);
    } else if (!strcmp(mode, "launch") && argc >= 5) {
        int n = atoi(argv[3]), r = atoi(argv[4]);
        uint64_t *v = malloc(sizeof(uint64_t) * (size_t)r);
        for (int k = 0; k < r; k++) {
            uint64_t t0 = now_ns();
            for (int i = 0; i < n; i++) aclrtLaunchKernel(fn, FULL_BLOCK_DIM, &zero, sizeof zero, st);
            v[k] = (now_ns() - t0) / (uint64_t)n;
            check(aclrtSynchronizeStream(st), "aclrtSynchronizeStream");
        }
        qsort(v, (size_t)r, sizeof *v, cmp_u64);
        printf("{\"median_ns\":%llu,\"min_ns\":%llu}\n", (unsigned long long)v[r / 2], (unsigned long long)v[0]);
    } else if (!strcmp(mode, "small") && argc >= 5) {
        int n = atoi(argv[3]);
        struct synthetic_args a = {atof(argv[4]), 0};
        uint64_t t0 = now_ns();
        for (int i = 0; i < n; i++) check(aclrtLaunchKernel(fn, FULL_BLOCK_DIM, &a, sizeof a, st), "launch");
        check(aclrtSynchronizeStream(st), "aclrtSynchronizeStream");
        double ms = (now_ns() - t0) / 1e6;
        printf("{\"wall_ms\":%.3f,\"kernels_per_s\":%.1f}\n", ms, n / (ms / 1e3));
    } else if (!strcmp(mode, "rate") && argc >= 5) {
        double rate = atof(argv[3]), secs = atof(argv[4]);
        uint64_t gap = (uint64_t)(1e9 / rate), t0 = now_ns(), next = t0;
        long n = 0;
        while (now_ns() - t0 < (uint64_t)(secs * 1e9)) {
            check(aclrtLaunchKernel(fn, FULL_BLOCK_DIM, &zero, sizeof zero, st), "launch");
            if (++n % 1000 == 0) check(aclrtSynchronizeStream(st), "aclrtSynchronizeStream");
            next += gap;
            uint64_t now = now_ns();
            if (next > now) {
                struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)(next - now)};
                nanosleep(&ts, NULL);
            }
        }
        check(aclrtSynchronizeStream(st), "aclrtSynchronizeStream");
        printf("{\"launches\":%ld,\"wall_s\":%.3f}\n", n, (now_ns() - t0) / 1e9);
    } else {
        fprintf(stderr, "fwd_rtt: bad arguments\n");
        return 2;
    }
    return 0;
}
