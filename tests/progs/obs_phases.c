/* A serving-engine-shaped workload for the phase classifier: forward passes of two kinds,
 * one synchronisation each, run to a schedule. Knows nothing of FlexNPU.
 *
 * Run: obs_phases KERNEL_LIBRARY [options] STEP...
 *   STEP  p:N   N prefill passes: H2D of the prompt (--prompt-bytes, 4 MiB), --prefill-layers
 *               (160) launches of kernel "prefill_layer" (--prefill-flops each), a small D2H
 *         d:N   N decode passes: H2D of one token's inputs (--token-bytes, 8 KiB),
 *               --decode-layers (40) launches of "decode_layer" (--decode-flops each), D2H
 *         m:N   N rounds of one prefill pass and --mix-decodes (6) decode passes
 *         i:MS  idle for MS milliseconds
 *   --device D
 * The kernel library must bind prefill_layer and decode_layer (to the synthetic built-in),
 * so the emulator's busy time by kernel name tells which phase its device time went to.
 * Prints {"ready":true,"pid":P} at start and {"done":true,...} at the end.
 */
#define _GNU_SOURCE
#include <errno.h>
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

#define CHECK(call)                                                                          \
    do {                                                                                     \
        aclError e_ = (call);                                                                \
        if (e_ != ACL_SUCCESS) {                                                             \
            const char *m_ = aclGetRecentErrMsg();                                           \
            fprintf(stderr, "obs_phases: %s failed: %d %s\n", #call, e_, m_ ? m_ : "");      \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

#pragma pack(push, 1)
struct synthetic_args { double flops, hbm_bytes; };
#pragma pack(pop)

static size_t prompt_bytes = 4u << 20, token_bytes = 8192;
static int prefill_layers = 160, decode_layers = 40, mix_decodes = 6;
static double prefill_flops = 1.4e11, decode_flops = 2.8e10;
static aclrtStream s;
static aclrtFuncHandle f_prefill, f_decode;
static void *dev_in, *dev_out;
static char *host;
static unsigned long n_prefill, n_decode;

static void pass(aclrtFuncHandle f, int layers, double flops, size_t in_bytes, size_t out_bytes)
{
    struct synthetic_args a = {flops, 0};
    CHECK(aclrtMemcpyAsync(dev_in, prompt_bytes, host, in_bytes, ACL_MEMCPY_HOST_TO_DEVICE, s));
    for (int i = 0; i < layers; i++) CHECK(aclrtLaunchKernel(f, FULL_BLOCK_DIM, &a, sizeof a, s));
    CHECK(aclrtMemcpyAsync(host, prompt_bytes, dev_out, out_bytes, ACL_MEMCPY_DEVICE_TO_HOST, s));
    CHECK(aclrtSynchronizeStream(s));
}

static void prefill(void)
{
    pass(f_prefill, prefill_layers, prefill_flops, prompt_bytes, 4096);
    n_prefill++;
}

static void decode(void)
{
    pass(f_decode, decode_layers, decode_flops, token_bytes, 512);
    n_decode++;
}

static void idle_ms(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: obs_phases KERNEL_LIBRARY [options] STEP...\n");
        return 2;
    }
    int dev = 0, first_step = argc;
    for (int i = 2; i < argc; i++) {
        const char *k = argv[i];
        if (k[0] != '-') {
            first_step = i;
            break;
        }
        if (i + 1 >= argc) break;
        const char *v = argv[++i];
        if (!strcmp(k, "--device")) dev = atoi(v);
        else if (!strcmp(k, "--prompt-bytes")) prompt_bytes = strtoull(v, NULL, 10);
        else if (!strcmp(k, "--token-bytes")) token_bytes = strtoull(v, NULL, 10);
        else if (!strcmp(k, "--prefill-layers")) prefill_layers = atoi(v);
        else if (!strcmp(k, "--decode-layers")) decode_layers = atoi(v);
        else if (!strcmp(k, "--prefill-flops")) prefill_flops = atof(v);
        else if (!strcmp(k, "--decode-flops")) decode_flops = atof(v);
        else if (!strcmp(k, "--mix-decodes")) mix_decodes = atoi(v);
        else {
            fprintf(stderr, "obs_phases: unknown option %s\n", k);
            return 2;
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    CHECK(aclInit(NULL));
    CHECK(aclrtSetDevice(dev));
    CHECK(aclrtCreateStream(&s));
    aclrtBinHandle bin;
    CHECK(aclrtBinaryLoadFromFile(argv[1], NULL, &bin));
    CHECK(aclrtBinaryGetFunction(bin, "prefill_layer", &f_prefill));
    CHECK(aclrtBinaryGetFunction(bin, "decode_layer", &f_decode));
    size_t buf = prompt_bytes > token_bytes ? prompt_bytes : token_bytes;
    CHECK(aclrtMalloc(&dev_in, buf, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(aclrtMalloc(&dev_out, 1 << 20, ACL_MEM_MALLOC_HUGE_FIRST));
    host = calloc(1, buf);
    printf("{\"ready\":true,\"pid\":%d}\n", (int)getpid());

    for (int i = first_step; i < argc; i++) {
        char kind = argv[i][0];
        long n = argv[i][1] == ':' ? atol(argv[i] + 2) : 0;
        if (kind == 'p') for (long j = 0; j < n; j++) prefill();
        else if (kind == 'd') for (long j = 0; j < n; j++) decode();
        else if (kind == 'm') for (long j = 0; j < n; j++) {
            prefill();
            for (int k = 0; k < mix_decodes; k++) decode();
        }
        else if (kind == 'i') idle_ms(n);
        else {
            fprintf(stderr, "obs_phases: bad step %s\n", argv[i]);
            return 2;
        }
    }
    printf("{\"done\":true,\"prefill_passes\":%lu,\"decode_passes\":%lu}\n", n_prefill, n_decode);
    return 0;
}
