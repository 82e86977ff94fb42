/* A test workload for an Ascend device: an ordinary AscendCL program that knows nothing of
 * FlexNPU. Tests run it as real processes, one subcommand per scenario; every subcommand
 * prints JSON on stdout (one object per line) and exits 0 unless the scenario itself
 * could not run.
 *
 *   timing KLIB FLOPS HBM N       N "synthetic" kernels back to back on one stream, events
 *                                 around the batch; wall and event milliseconds per rep
 *   corun KLIB F1 H1 F2 H2 N      two streams, N kernels each, launched interleaved
 *   waitevent KLIB F1 F2          stream 2 waits (aclrtStreamWaitEvent) for stream 1's kernel
 *   copyback BYTES                host -> device -> device -> host byte pattern, verified
 *   oom                           allocations beyond capacity; aclrtGetMemInfo around them
 *   badargs KLIB                  the code each bad call returns
 *   setdevice DEV                 aclInit and aclrtSetDevice only
 *   hold BYTES SECONDS            allocate and fill, then obey stdin lines:
 *                                 meminfo | work N | check | quit (exits after SECONDS anyway)
 *   waitlong KLIB FLOPS           launch one long kernel, say so, then synchronize
 *   launchcost KLIB N             ns spent in each aclrtLaunchKernel call: percentiles
 *
 * Options: --device D, --kernel NAME (timing; corun uses --kernel and --kernel2),
 *          --block-dim B (every kernel's blockDim; default FULL_BLOCK_DIM, the whole device;
 *          corun's second stream uses --block-dim2 if given),
 *          --reps R (timing), --start-at NS (CLOCK_MONOTONIC; timing and corun wait for it).
 *
 * Build: cc acl_workload.c -I<acl include> -L<libascendcl dir> -lascendcl -lm -pthread
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
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
struct synthetic_args { double flops, hbm_bytes; };
struct copy_args { uint64_t src, dst, bytes; };
struct ew_args { uint64_t x, y, out, n; uint32_t op; int32_t dtype; };
#pragma pack(pop)

/* ------------------------------------------------------------------ helpers */

static int g_dev;
static const char *g_kernel = "synthetic", *g_kernel2 = NULL;
static int g_reps = 1;
static uint32_t g_block_dim = FULL_BLOCK_DIM, g_block_dim2; /* 0: g_block_dim */
static uint64_t g_start_at;

static void die_acl(const char *what, aclError e)
{
    const char *m = aclGetRecentErrMsg();
    printf("{\"ok\":false,\"call\":\"%s\",\"code\":%d,\"msg\":\"%s\"}\n", what, e, m ? m : "");
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

static void wait_until(uint64_t t)
{
    if (!t) return;
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ULL), .tv_nsec = (long)(t % 1000000000ULL)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

static uint64_t P(void *p) { return (uint64_t)(uintptr_t)p; }

static void setup(void)
{
    CHECK(aclInit(NULL));
    CHECK(aclrtSetDevice(g_dev));
}

static void teardown(void)
{
    CHECK(aclrtResetDevice(g_dev));
    CHECK(aclFinalize());
}

static aclrtFuncHandle kernel(const char *klib, const char *name, aclrtBinHandle *bin)
{
    aclrtFuncHandle f;
    CHECK(aclrtBinaryLoadFromFile(klib, NULL, bin));
    CHECK(aclrtBinaryGetFunction(*bin, name, &f));
    return f;
}

static void launch_synthetic_bd(aclrtFuncHandle f, uint32_t block_dim, double flops, double hbm, aclrtStream s)
{
    struct synthetic_args a = {flops, hbm};
    CHECK(aclrtLaunchKernel(f, block_dim, &a, sizeof a, s));
}

static void launch_synthetic(aclrtFuncHandle f, double flops, double hbm, aclrtStream s)
{
    launch_synthetic_bd(f, g_block_dim, flops, hbm, s);
}

static void print_list(const char *key, const double *v, int n)
{
    printf("\"%s\":[", key);
    for (int i = 0; i < n; i++) printf("%s%.6f", i ? "," : "", v[i]);
    printf("]");
}

/* ------------------------------------------------------------------ timing */

static int cmd_timing(const char *klib, double flops, double hbm, int n)
{
    setup();
    aclrtBinHandle bin;
    aclrtFuncHandle f = kernel(klib, g_kernel, &bin);
    aclrtStream s;
    aclrtEvent e0, e1;
    CHECK(aclrtCreateStream(&s));
    CHECK(aclrtCreateEventWithFlag(&e0, ACL_EVENT_TIME_LINE));
    CHECK(aclrtCreateEventWithFlag(&e1, ACL_EVENT_TIME_LINE));
    /* The first launch of a kernel registers its name; keep that out of the timed batch. */
    launch_synthetic(f, 0, 0, s);
    CHECK(aclrtSynchronizeStream(s));
    wait_until(g_start_at);
    double *wall = calloc(g_reps, sizeof *wall), *ev = calloc(g_reps, sizeof *ev);
    uint64_t t_start = now_ns(), t_end = 0;
    for (int r = 0; r < g_reps; r++) {
        uint64_t t0 = now_ns();
        CHECK(aclrtRecordEvent(e0, s));
        for (int i = 0; i < n; i++) launch_synthetic(f, flops, hbm, s);
        CHECK(aclrtRecordEvent(e1, s));
        CHECK(aclrtSynchronizeStream(s));
        t_end = now_ns();
        float ms = 0;
        CHECK(aclrtEventElapsedTime(&ms, e0, e1));
        wall[r] = (double)(t_end - t0) / 1e6;
        ev[r] = ms;
    }
    printf("{\"ok\":true,\"pid\":%d,\"kernel\":\"%s\",\"n\":%d,\"reps\":%d,\"warmup\":1,", getpid(), g_kernel, n,
           g_reps);
    print_list("wall_ms", wall, g_reps);
    printf(",");
    print_list("event_ms", ev, g_reps);
    printf(",\"t_start_ns\":%llu,\"t_end_ns\":%llu}\n", (unsigned long long)t_start, (unsigned long long)t_end);
    CHECK(aclrtDestroyEvent(e0));
    CHECK(aclrtDestroyEvent(e1));
    CHECK(aclrtDestroyStream(s));
    CHECK(aclrtBinaryUnLoad(bin));
    teardown();
    return 0;
}

/* Two streams in one process, N kernels each, launched alternately. */
static int cmd_corun(const char *klib, double f1, double h1, double f2, double h2, int n)
{
    setup();
    aclrtBinHandle bin;
    CHECK(aclrtBinaryLoadFromFile(klib, NULL, &bin));
    aclrtFuncHandle k1, k2;
    CHECK(aclrtBinaryGetFunction(bin, g_kernel, &k1));
    CHECK(aclrtBinaryGetFunction(bin, g_kernel2 ? g_kernel2 : g_kernel, &k2));
    aclrtStream s[2];
    aclrtEvent b[2], e[2];
    for (int i = 0; i < 2; i++) {
        CHECK(aclrtCreateStream(&s[i]));
        CHECK(aclrtCreateEvent(&b[i]));
        CHECK(aclrtCreateEvent(&e[i]));
    }
    launch_synthetic(k1, 0, 0, s[0]);
    uint32_t bd2 = g_block_dim2 ? g_block_dim2 : g_block_dim;
    launch_synthetic_bd(k2, bd2, 0, 0, s[1]);
    CHECK(aclrtSynchronizeStream(s[0]));
    CHECK(aclrtSynchronizeStream(s[1]));
    wait_until(g_start_at);
    uint64_t t0 = now_ns();
    CHECK(aclrtRecordEvent(b[0], s[0]));
    CHECK(aclrtRecordEvent(b[1], s[1]));
    for (int i = 0; i < n; i++) {
        launch_synthetic(k1, f1, h1, s[0]);
        launch_synthetic_bd(k2, bd2, f2, h2, s[1]);
    }
    CHECK(aclrtRecordEvent(e[0], s[0]));
    CHECK(aclrtRecordEvent(e[1], s[1]));
    CHECK(aclrtSynchronizeStream(s[0]));
    CHECK(aclrtSynchronizeStream(s[1]));
    uint64_t t1 = now_ns();
    float ms[2];
    for (int i = 0; i < 2; i++) CHECK(aclrtEventElapsedTime(&ms[i], b[i], e[i]));
    printf("{\"ok\":true,\"pid\":%d,\"n\":%d,\"wall_ms\":%.6f,\"event_ms\":[%.6f,%.6f]}\n", getpid(), n,
           (double)(t1 - t0) / 1e6, ms[0], ms[1]);
    for (int i = 0; i < 2; i++) {
        CHECK(aclrtDestroyEvent(b[i]));
        CHECK(aclrtDestroyEvent(e[i]));
        CHECK(aclrtDestroyStream(s[i]));
    }
    CHECK(aclrtBinaryUnLoad(bin));
    teardown();
    return 0;
}

/* Stream 1 runs a kernel of F1 FLOPs and records an event; stream 2 waits for that event,
 * then runs F2. Both are launched before either starts, so only the wait orders them. */
static int cmd_waitevent(const char *klib, double f1, double f2)
{
    setup();
    aclrtBinHandle bin;
    aclrtFuncHandle f = kernel(klib, "synthetic", &bin);
    aclrtStream s1, s2;
    aclrtEvent b1, done1, b2, e2;
    CHECK(aclrtCreateStream(&s1));
    CHECK(aclrtCreateStream(&s2));
    CHECK(aclrtCreateEvent(&b1));
    CHECK(aclrtCreateEvent(&done1));
    CHECK(aclrtCreateEvent(&b2));
    CHECK(aclrtCreateEvent(&e2));
    launch_synthetic(f, 0, 0, s1);
    CHECK(aclrtSynchronizeStream(s1));
    CHECK(aclrtRecordEvent(b1, s1));
    launch_synthetic(f, f1, 0, s1);
    CHECK(aclrtRecordEvent(done1, s1));
    CHECK(aclrtRecordEvent(b2, s2));
    CHECK(aclrtStreamWaitEvent(s2, done1));
    launch_synthetic(f, f2, 0, s2);
    CHECK(aclrtRecordEvent(e2, s2));
    CHECK(aclrtSynchronizeStream(s2));
    aclrtEventRecordedStatus st1;
    CHECK(aclrtQueryEventStatus(done1, &st1)); /* stream 2 finished, so stream 1 had */
    float ms1, ms2, gap;
    CHECK(aclrtEventElapsedTime(&ms1, b1, done1));
    CHECK(aclrtEventElapsedTime(&ms2, b2, e2));
    CHECK(aclrtEventElapsedTime(&gap, done1, e2));
    printf("{\"ok\":true,\"pid\":%d,\"stream1_ms\":%.6f,\"stream2_ms\":%.6f,\"after_event_ms\":%.6f,"
           "\"stream1_done_when_stream2_done\":%s}\n",
           getpid(), ms1, ms2, gap, st1 == ACL_EVENT_RECORDED_STATUS_COMPLETE ? "true" : "false");
    CHECK(aclrtSynchronizeStream(s1));
    aclrtEvent evs[] = {b1, done1, b2, e2};
    for (int i = 0; i < 4; i++) CHECK(aclrtDestroyEvent(evs[i]));
    CHECK(aclrtDestroyStream(s1));
    CHECK(aclrtDestroyStream(s2));
    CHECK(aclrtBinaryUnLoad(bin));
    teardown();
    return 0;
}

/* ------------------------------------------------------------------ data */

static uint8_t pattern(size_t i) { return (uint8_t)((i * 131u + 7u) ^ (i >> 9)); }

static long first_mismatch(const uint8_t *got, size_t n, int fill)
{
    for (size_t i = 0; i < n; i++)
        if (got[i] != (fill >= 0 ? (uint8_t)fill : pattern(i))) return (long)i;
    return -1;
}

/* H2D (sync, pageable) -> D2D (async) -> D2H (async, pinned), a memset, and the DEFAULT kind. */
static int cmd_copyback(size_t bytes)
{
    setup();
    uint8_t *src = malloc(bytes), *dst;
    CHECK(aclrtMallocHost((void **)&dst, bytes));
    for (size_t i = 0; i < bytes; i++) src[i] = pattern(i);
    void *d1, *d2;
    CHECK(aclrtMalloc(&d1, bytes, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&d2, bytes, ACL_MEM_MALLOC_NORMAL_ONLY));
    aclrtStream s;
    CHECK(aclrtCreateStream(&s));

    CHECK(aclrtMemcpy(d1, bytes, src, bytes, ACL_MEMCPY_HOST_TO_DEVICE));
    CHECK(aclrtMemcpyAsync(d2, bytes, d1, bytes, ACL_MEMCPY_DEVICE_TO_DEVICE, s));
    memset(dst, 0, bytes);
    CHECK(aclrtMemcpyAsync(dst, bytes, d2, bytes, ACL_MEMCPY_DEVICE_TO_HOST, s));
    CHECK(aclrtSynchronizeStream(s));
    long roundtrip = first_mismatch(dst, bytes, -1);

    CHECK(aclrtMemset(d1, bytes, 0xA5, bytes));
    memset(dst, 0, bytes);
    CHECK(aclrtMemcpy(dst, bytes, d1, bytes, ACL_MEMCPY_DEFAULT));
    long memset_ok = first_mismatch(dst, bytes, 0xA5);

    /* d2 still holds the pattern: the memset of d1 must not have touched it */
    memset(dst, 0, bytes);
    CHECK(aclrtMemcpy(dst, bytes, d2, bytes, ACL_MEMCPY_DEVICE_TO_HOST));
    long untouched = first_mismatch(dst, bytes, -1);

    printf("{\"ok\":%s,\"pid\":%d,\"bytes\":%zu,\"roundtrip_mismatch\":%ld,\"memset_mismatch\":%ld,"
           "\"neighbour_mismatch\":%ld}\n",
           roundtrip < 0 && memset_ok < 0 && untouched < 0 ? "true" : "false", getpid(), bytes, roundtrip,
           memset_ok, untouched);
    CHECK(aclrtDestroyStream(s));
    CHECK(aclrtFree(d1));
    CHECK(aclrtFree(d2));
    CHECK(aclrtFreeHost(dst));
    free(src);
    teardown();
    return 0;
}

/* ------------------------------------------------------------------ memory */

static int cmd_oom(void)
{
    setup();
    size_t free0, total, free1, free2, free3, free4;
    CHECK(aclrtGetMemInfo(ACL_HBM_MEM, &free0, &total));
    void *big = NULL, *x = NULL, *rest = NULL, *one = NULL;
    aclError over = aclrtMalloc(&big, total + 1, ACL_MEM_MALLOC_HUGE_FIRST);
    const size_t xs = (10u << 20) + 123;
    CHECK(aclrtMalloc(&x, xs, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtGetMemInfo(ACL_HBM_MEM, &free1, &total));
    aclError too_much = aclrtMalloc(&big, free1 + 1, ACL_MEM_MALLOC_HUGE_FIRST);
    aclError rest_rc = aclrtMalloc(&rest, free1, ACL_MEM_MALLOC_HUGE_FIRST);
    CHECK(aclrtGetMemInfo(ACL_HBM_MEM, &free2, &total));
    aclError one_rc = aclrtMalloc(&one, 1, ACL_MEM_MALLOC_HUGE_FIRST);
    if (rest_rc == ACL_SUCCESS) CHECK(aclrtFree(rest));
    CHECK(aclrtGetMemInfo(ACL_HBM_MEM, &free3, &total));
    CHECK(aclrtFree(x));
    CHECK(aclrtGetMemInfo(ACL_HBM_MEM, &free4, &total));
    printf("{\"ok\":true,\"pid\":%d,\"total\":%zu,\"free_before\":%zu,\"over_capacity_rc\":%d,\"x_bytes\":%zu,"
           "\"free_after_x\":%zu,\"over_free_rc\":%d,\"rest_rc\":%d,\"free_when_full\":%zu,\"one_more_rc\":%d,"
           "\"free_after_rest_freed\":%zu,\"free_after_all_freed\":%zu}\n",
           getpid(), total, free0, over, xs, free1, too_much, rest_rc, free2, one_rc, free3, free4);
    teardown();
    return 0;
}

/* ------------------------------------------------------------------ errors */

#define CODE(name, call)                                             \
    do {                                                             \
        printf("%s\"%s\":%d", first ? "" : ",", name, (int)(call)); \
        first = 0;                                                   \
    } while (0)

static int cmd_badargs(const char *klib)
{
    int first = 1;
    void *p = NULL;
    int32_t dev = -1;
    size_t fr, tot;
    printf("{");
    CODE("set_device_before_init", aclrtSetDevice(g_dev));
    CODE("malloc_before_init", aclrtMalloc(&p, 4096, ACL_MEM_MALLOC_HUGE_FIRST));
    CODE("finalize_before_init", aclFinalize());
    CODE("init_missing_config", aclInit("/nonexistent/acl.json"));
    CODE("init", aclInit(NULL));
    CODE("init_again", aclInit(NULL));
    CODE("malloc_without_device", aclrtMalloc(&p, 4096, ACL_MEM_MALLOC_HUGE_FIRST));
    CODE("get_device_without_device", aclrtGetDevice(&dev));
    CODE("set_device_invalid", aclrtSetDevice(99));
    CODE("set_device_negative", aclrtSetDevice(-1));
    CODE("reset_device_not_set", aclrtResetDevice(5));
    CODE("set_device", aclrtSetDevice(g_dev));
    CODE("get_device_count_null", aclrtGetDeviceCount(NULL));

    CODE("malloc_null_ptr", aclrtMalloc(NULL, 4096, ACL_MEM_MALLOC_HUGE_FIRST));
    CODE("malloc_zero", aclrtMalloc(&p, 0, ACL_MEM_MALLOC_HUGE_FIRST));
    CODE("malloc_bad_policy", aclrtMalloc(&p, 4096, (aclrtMemMallocPolicy)99));
    CODE("get_mem_info_null", aclrtGetMemInfo(ACL_HBM_MEM, NULL, &tot));
    CODE("get_mem_info_bad_attr", aclrtGetMemInfo((aclrtMemAttr)77, &fr, &tot));

    void *d = NULL, *d2 = NULL;
    CODE("malloc", aclrtMalloc(&d, 8192, ACL_MEM_MALLOC_HUGE_FIRST));
    CODE("malloc2", aclrtMalloc(&d2, 8192, ACL_MEM_MALLOC_HUGE_FIRST));
    char host[8192];
    memset(host, 1, sizeof host);
    CODE("memcpy_null_dst", aclrtMemcpy(NULL, 16, host, 16, ACL_MEMCPY_HOST_TO_DEVICE));
    CODE("memcpy_null_src", aclrtMemcpy(d, 16, NULL, 16, ACL_MEMCPY_HOST_TO_DEVICE));
    CODE("memcpy_count_over_destmax", aclrtMemcpy(d, 16, host, 17, ACL_MEMCPY_HOST_TO_DEVICE));
    CODE("memcpy_wrong_kind", aclrtMemcpy(host, sizeof host, d, 16, ACL_MEMCPY_HOST_TO_DEVICE));
    CODE("memcpy_d2h_from_host", aclrtMemcpy(host, sizeof host, host + 16, 16, ACL_MEMCPY_DEVICE_TO_HOST));
    CODE("memcpy_unknown_kind", aclrtMemcpy(d, 16, host, 16, (aclrtMemcpyKind)42));
    CODE("memcpy_past_allocation", aclrtMemcpy((char *)d + 8000, 8192, host, 8192, ACL_MEMCPY_HOST_TO_DEVICE));
    CODE("memcpy_ok", aclrtMemcpy(d, 8192, host, 8192, ACL_MEMCPY_HOST_TO_DEVICE));
    CODE("memset_count_over_max", aclrtMemset(d, 16, 0, 17));
    CODE("memset_host_ptr", aclrtMemset(host, sizeof host, 0, 16));
    CODE("memset_null", aclrtMemset(NULL, 16, 0, 16));

    CODE("free_null", aclrtFree(NULL));
    CODE("free_host_ptr", aclrtFree(host));
    CODE("free_interior_ptr", aclrtFree((char *)d + 16));
    CODE("free_ok", aclrtFree(d2));
    CODE("free_twice", aclrtFree(d2));
    CODE("malloc_host_null", aclrtMallocHost(NULL, 16));
    CODE("free_host_null", aclrtFreeHost(NULL));

    aclrtStream s = NULL;
    uint64_t not_a_handle[4] = {0, 0, 0, 0};
    CODE("create_stream_null", aclrtCreateStream(NULL));
    CODE("create_stream_bad_priority", aclrtCreateStreamWithConfig(&s, 8, 0));
    CODE("create_stream", aclrtCreateStream(&s));
    CODE("memcpy_async_bad_stream", aclrtMemcpyAsync(d, 16, host, 16, ACL_MEMCPY_HOST_TO_DEVICE, not_a_handle));
    CODE("sync_stream_bad_timeout", aclrtSynchronizeStreamWithTimeout(s, -2));
    CODE("destroy_stream_null", aclrtDestroyStream(NULL));

    aclrtBinHandle bin = NULL, bin2 = NULL;
    aclrtFuncHandle f = NULL, g = NULL;
    static const char garbage[] = "this is not a kernel library\n";
    static const char badline[] = "flexnpu-kernels 1\nkernel foo no_such_builtin\n";
    CODE("load_missing_file", aclrtBinaryLoadFromFile("/nonexistent/kernels.fxk", NULL, &bin2));
    CODE("load_null_path", aclrtBinaryLoadFromFile(NULL, NULL, &bin2));
    CODE("load_garbage", aclrtBinaryLoadFromData(garbage, sizeof garbage - 1, NULL, &bin2));
    CODE("load_unknown_builtin", aclrtBinaryLoadFromData(badline, sizeof badline - 1, NULL, &bin2));
    CODE("load", aclrtBinaryLoadFromFile(klib, NULL, &bin));
    CODE("get_function_unknown", aclrtBinaryGetFunction(bin, "no_such_kernel", &g));
    CODE("get_function_null_name", aclrtBinaryGetFunction(bin, NULL, &g));
    CODE("get_function", aclrtBinaryGetFunction(bin, "synthetic", &f));
    aclrtFuncHandle fcopy = NULL;
    CODE("get_function_copy", aclrtBinaryGetFunction(bin, "copy", &fcopy));

    struct synthetic_args sa = {1e6, 0};
    CODE("launch_null_func", aclrtLaunchKernel(NULL, 1, &sa, sizeof sa, s));
    CODE("launch_block_dim_0", aclrtLaunchKernel(f, 0, &sa, sizeof sa, s));
    CODE("launch_bad_args_size", aclrtLaunchKernel(f, 1, &sa, sizeof sa - 1, s));
    CODE("launch_null_args", aclrtLaunchKernel(f, 1, NULL, sizeof sa, s));
    struct synthetic_args neg = {-1.0, 0};
    CODE("launch_negative_work", aclrtLaunchKernel(f, 1, &neg, sizeof neg, s));
    struct copy_args ca = {P(d), P(host), 64};
    CODE("launch_host_pointer_arg", aclrtLaunchKernel(fcopy, 1, &ca, sizeof ca, s));
    struct copy_args cb = {P(d), P((char *)d + 4096), 8192};
    CODE("launch_range_past_allocation", aclrtLaunchKernel(fcopy, 1, &cb, sizeof cb, s));
    CODE("launch_bad_stream", aclrtLaunchKernel(f, 1, &sa, sizeof sa, not_a_handle));

    /* A busy stream: one 50 ms kernel (at the 910b profile's peak) and events around it. */
    aclrtEvent e0 = NULL, e1 = NULL, never = NULL;
    CODE("create_event_null", aclrtCreateEvent(NULL));
    CODE("create_event", aclrtCreateEvent(&e0));
    CODE("create_event2", aclrtCreateEvent(&e1));
    CODE("create_event3", aclrtCreateEvent(&never));
    struct synthetic_args busy = {353.9e12 * 0.05, 0};
    CODE("record_start", aclrtRecordEvent(e0, s));
    CODE("launch_busy", aclrtLaunchKernel(f, FULL_BLOCK_DIM, &busy, sizeof busy, s));
    CODE("record_end", aclrtRecordEvent(e1, s));
    CODE("sync_stream_timeout_0", aclrtSynchronizeStreamWithTimeout(s, 0));
    CODE("sync_event_timeout_0", aclrtSynchronizeEventWithTimeout(e1, 0));
    aclrtStreamStatus sst = ACL_STREAM_STATUS_RESERVED;
    aclrtEventRecordedStatus est = ACL_EVENT_RECORDED_STATUS_COMPLETE;
    CODE("stream_query", aclrtStreamQuery(s, &sst));
    CODE("stream_query_status", sst);
    CODE("event_query_status", aclrtQueryEventStatus(e1, &est));
    CODE("event_query_status_value", est);
    float ms = -1;
    CODE("elapsed_not_complete", aclrtEventElapsedTime(&ms, e0, e1));
    CODE("elapsed_never_recorded", aclrtEventElapsedTime(&ms, e0, never));
    CODE("elapsed_null", aclrtEventElapsedTime(NULL, e0, e1));
    CODE("sync_stream", aclrtSynchronizeStream(s));
    CODE("elapsed", aclrtEventElapsedTime(&ms, e0, e1));
    printf(",\"elapsed_ms\":%.3f", ms);
    CODE("stream_query_after", aclrtStreamQuery(s, &sst));
    CODE("stream_query_status_after", sst);
    CODE("event_query_status_after", aclrtQueryEventStatus(e1, &est));
    CODE("event_query_status_value_after", est);
    CODE("sync_event_bad_handle", aclrtSynchronizeEvent(not_a_handle));
    CODE("stream_wait_event_bad_handle", aclrtStreamWaitEvent(s, not_a_handle));

    CODE("destroy_event", aclrtDestroyEvent(e0));
    CODE("destroy_event2", aclrtDestroyEvent(e1));
    CODE("destroy_event3", aclrtDestroyEvent(never));
    CODE("destroy_stream", aclrtDestroyStream(s));
    CODE("unload", aclrtBinaryUnLoad(bin));
    CODE("unload_null", aclrtBinaryUnLoad(NULL));
    CODE("free", aclrtFree(d));
    CODE("reset_device", aclrtResetDevice(g_dev));
    CODE("finalize", aclFinalize());
    CODE("finalize_again", aclFinalize());
    printf("}\n");
    return 0;
}

static int cmd_setdevice(int dev)
{
    aclError init = aclInit(NULL);
    aclError set = aclrtSetDevice(dev);
    uint32_t count = 0;
    aclError cnt = aclrtGetDeviceCount(&count);
    const char *m = aclGetRecentErrMsg();
    printf("{\"init_rc\":%d,\"set_device_rc\":%d,\"device_count_rc\":%d,\"count\":%u,\"has_msg\":%s}\n", init, set,
           cnt, count, m ? "true" : "false");
    if (set == ACL_SUCCESS) CHECK(aclrtResetDevice(dev));
    CHECK(aclFinalize());
    return 0;
}

/* ------------------------------------------------------------------ processes */

static int cmd_hold(size_t bytes, int seconds)
{
    alarm((unsigned)seconds); /* never outlive a test that forgot this process */
    setup();
    void *d;
    CHECK(aclrtMalloc(&d, bytes, ACL_MEM_MALLOC_HUGE_FIRST));
    int fill = (int)(getpid() % 251) + 1;
    CHECK(aclrtMemset(d, bytes, fill, bytes));
    aclrtBinHandle bin = NULL;
    aclrtFuncHandle f = NULL;
    const char *klib = getenv("FLEXNPU_EMU_KERNELS");
    if (klib) f = kernel(klib, "synthetic", &bin);
    aclrtStream s;
    CHECK(aclrtCreateStream(&s));
    size_t fr, tot;
    CHECK(aclrtGetMemInfo(ACL_HBM_MEM, &fr, &tot));
    printf("{\"ready\":true,\"pid\":%d,\"bytes\":%zu,\"free\":%zu,\"total\":%zu}\n", getpid(), bytes, fr, tot);
    fflush(stdout);
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        int n = 0;
        if (strncmp(line, "meminfo", 7) == 0) {
            CHECK(aclrtGetMemInfo(ACL_HBM_MEM, &fr, &tot));
            printf("{\"free\":%zu,\"total\":%zu}\n", fr, tot);
        } else if (sscanf(line, "work %d", &n) == 1) {
            if (!f) die_acl("work needs FLEXNPU_EMU_KERNELS", ACL_ERROR_INVALID_PARAM);
            uint64_t t0 = now_ns();
            for (int i = 0; i < n; i++) launch_synthetic(f, 353.9e12 * 1e-4, 0, s); /* 100 us each */
            aclError rc = aclrtSynchronizeStream(s);
            printf("{\"work\":%d,\"rc\":%d,\"wall_ms\":%.3f}\n", n, rc, (double)(now_ns() - t0) / 1e6);
        } else if (strncmp(line, "check", 5) == 0) {
            uint8_t *h = malloc(bytes);
            CHECK(aclrtMemcpy(h, bytes, d, bytes, ACL_MEMCPY_DEVICE_TO_HOST));
            long bad = first_mismatch(h, bytes, fill);
            free(h);
            printf("{\"intact\":%s,\"mismatch\":%ld}\n", bad < 0 ? "true" : "false", bad);
        } else if (strncmp(line, "quit", 4) == 0) {
            break;
        } else {
            printf("{\"error\":\"unknown command\"}\n");
        }
        fflush(stdout);
    }
    CHECK(aclrtDestroyStream(s));
    if (bin) CHECK(aclrtBinaryUnLoad(bin));
    CHECK(aclrtFree(d));
    teardown();
    printf("{\"bye\":true}\n");
    return 0;
}

static int cmd_waitlong(const char *klib, double flops)
{
    setup();
    aclrtBinHandle bin;
    aclrtFuncHandle f = kernel(klib, "synthetic", &bin);
    aclrtStream s;
    CHECK(aclrtCreateStream(&s));
    launch_synthetic(f, flops, 0, s);
    printf("{\"launched\":true,\"pid\":%d}\n", getpid());
    fflush(stdout);
    uint64_t t0 = now_ns();
    aclError rc = aclrtSynchronizeStream(s);
    uint64_t t1 = now_ns();
    void *p = NULL;
    aclError malloc_rc = aclrtMalloc(&p, 4096, ACL_MEM_MALLOC_HUGE_FIRST);
    struct synthetic_args a = {1, 0};
    aclError launch_rc = aclrtLaunchKernel(f, FULL_BLOCK_DIM, &a, sizeof a, s);
    aclError sync_again = aclrtSynchronizeStream(s);
    printf("{\"sync_rc\":%d,\"waited_ms\":%.3f,\"sync_done_ns\":%llu,\"malloc_rc\":%d,\"launch_rc\":%d,"
           "\"sync_again_rc\":%d}\n",
           rc, (double)(t1 - t0) / 1e6, (unsigned long long)t1, malloc_rc, launch_rc, sync_again);
    fflush(stdout);
    aclFinalize();
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int cmd_launchcost(const char *klib, int n)
{
    setup();
    aclrtBinHandle bin;
    aclrtFuncHandle f = kernel(klib, "synthetic", &bin);
    aclrtStream s;
    CHECK(aclrtCreateStream(&s));
    struct synthetic_args a = {1e3, 0}; /* a tiny kernel: picoseconds of modelled work */
    uint64_t *ns = malloc(sizeof *ns * (size_t)n);
    CHECK(aclrtLaunchKernel(f, FULL_BLOCK_DIM, &a, sizeof a, s)); /* registers the kernel name */
    CHECK(aclrtSynchronizeStream(s));
    double sum = 0;
    for (int i = 0; i < n; i++) {
        if (i % 1024 == 1023) CHECK(aclrtSynchronizeStream(s)); /* keep the ring from filling */
        uint64_t t0 = now_ns();
        aclError rc = aclrtLaunchKernel(f, FULL_BLOCK_DIM, &a, sizeof a, s);
        uint64_t t1 = now_ns();
        if (rc) die_acl("aclrtLaunchKernel", rc);
        ns[i] = t1 - t0;
        sum += (double)ns[i];
    }
    CHECK(aclrtSynchronizeStream(s));
    qsort(ns, (size_t)n, sizeof *ns, cmp_u64);
#define PCT(q) ns[(size_t)((double)(n - 1) * (q))]
    printf("{\"ok\":true,\"n\":%d,\"p50_ns\":%llu,\"p90_ns\":%llu,\"p99_ns\":%llu,\"max_ns\":%llu,\"mean_ns\":%.1f}\n",
           n, (unsigned long long)PCT(0.50), (unsigned long long)PCT(0.90), (unsigned long long)PCT(0.99),
           (unsigned long long)ns[n - 1], sum / n);
    free(ns);
    CHECK(aclrtDestroyStream(s));
    CHECK(aclrtBinaryUnLoad(bin));
    teardown();
    return 0;
}

/* ------------------------------------------------------------------ main */

static int usage(void)
{
    fprintf(stderr,
            "usage: acl_workload timing KLIB FLOPS HBM N | corun KLIB F1 H1 F2 H2 N | waitevent KLIB F1 F2 |\n"
            "       copyback BYTES | oom |\n"
            "       badargs KLIB | setdevice DEV | hold BYTES SECONDS | waitlong KLIB FLOPS |\n"
            "       launchcost KLIB N   [--device D] [--kernel NAME] [--kernel2 NAME] [--reps R]\n"
            "       [--block-dim B] [--block-dim2 B] [--start-at MONOTONIC_NS]\n");
    return 2;
}

int main(int argc, char **argv)
{
    const char *pos[16];
    int npos = 0;
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "--", 2) == 0) {
            if (i + 1 >= argc) return usage();
            const char *k = argv[i], *v = argv[++i];
            if (!strcmp(k, "--device")) g_dev = atoi(v);
            else if (!strcmp(k, "--kernel")) g_kernel = v;
            else if (!strcmp(k, "--kernel2")) g_kernel2 = v;
            else if (!strcmp(k, "--reps")) g_reps = atoi(v) > 0 ? atoi(v) : 1;
            else if (!strcmp(k, "--block-dim")) g_block_dim = (uint32_t)strtoul(v, NULL, 10);
            else if (!strcmp(k, "--block-dim2")) g_block_dim2 = (uint32_t)strtoul(v, NULL, 10);
            else if (!strcmp(k, "--start-at")) g_start_at = strtoull(v, NULL, 10);
            else return usage();
        } else if (npos < 16) {
            pos[npos++] = argv[i];
        }
    }
    if (npos < 1) return usage();
    const char *cmd = pos[0];
#define NARGS(k) if (npos != (k) + 1) return usage()
    if (!strcmp(cmd, "timing")) {
        NARGS(4);
        return cmd_timing(pos[1], atof(pos[2]), atof(pos[3]), atoi(pos[4]));
    }
    if (!strcmp(cmd, "corun")) {
        NARGS(6);
        return cmd_corun(pos[1], atof(pos[2]), atof(pos[3]), atof(pos[4]), atof(pos[5]), atoi(pos[6]));
    }
    if (!strcmp(cmd, "waitevent")) {
        NARGS(3);
        return cmd_waitevent(pos[1], atof(pos[2]), atof(pos[3]));
    }
    if (!strcmp(cmd, "copyback")) {
        NARGS(1);
        return cmd_copyback(strtoull(pos[1], NULL, 10));
    }
    if (!strcmp(cmd, "oom")) {
        NARGS(0);
        return cmd_oom();
    }
    if (!strcmp(cmd, "badargs")) {
        NARGS(1);
        return cmd_badargs(pos[1]);
    }
    if (!strcmp(cmd, "setdevice")) {
        NARGS(1);
        return cmd_setdevice(atoi(pos[1]));
    }
    if (!strcmp(cmd, "hold")) {
        NARGS(2);
        return cmd_hold(strtoull(pos[1], NULL, 10), atoi(pos[2]));
    }
    if (!strcmp(cmd, "waitlong")) {
        NARGS(2);
        return cmd_waitlong(pos[1], atof(pos[2]));
    }
    if (!strcmp(cmd, "launchcost")) {
        NARGS(2);
        return cmd_launchcost(pos[1], atoi(pos[2]) > 0 ? atoi(pos[2]) : 1);
    }
    return usage();
}
