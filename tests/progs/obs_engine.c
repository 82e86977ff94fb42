/* A serving-engine-shaped loop for phase inference, unlike the loops the classifier was
 * built beside (obs_phases.c): a fixed model depth for both phases, one synchronisation a
 * step, prompts that send only token ids. Knows nothing of FlexNPU.
 *
 * Run: obs_engine KERNEL_LIBRARY [options] STEP...
 *   STEP  p:N   N prefill passes: per layer --mlp kernels "k_mlp_p" (--p-ms each) and one
 *               prefill attention; no host-to-device copy at all (ids already resident)
 *         d:N   N decode passes: per layer --mlp "k_mlp_d" (--d-ms each) and one decode
 *               attention; 512 B of token ids up, 512 B of logits' argmax down
 *         c:N   N chunked-prefill steps: per layer the prefill chunk's and the decode
 *               batch's kernels and attentions in one pass, then --chunk-decodes decode passes
 *         g:N   N decode passes whose batch grows: the kernels' time rises linearly from
 *               --d-ms to --grow-to times it over the N passes
 *         i:MS  idle for MS milliseconds
 *   --layers L (26)  --mlp K (2)  --p-ms MS (1.15)  --d-ms MS (0.05)  --chunk-decodes N (3)
 *   --grow-to X (4)  --ms-flops F: FLOPs of a 1 ms compute-bound kernel on this device
 *   --attn kernel|anon|aclnn:
 *         kernel  attention kernels named PromptFlashAttention_bf16 / IncreFlashAttention_bf16
 *         anon    named k_attn_p / k_attn_d (nothing says their phase)
 *         aclnn   through --opapi LIB's aclnnPromptFlashAttentionV3 / aclnnIncreFlashAttentionV4
 *                 (or, with --fused, aclnnFusedInferAttentionScoreV2 for both)
 * The kernel library must bind k_mlp_p, k_mlp_d and the attention names (to synthetic).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
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
        int e_ = (call);                                                                     \
        if (e_ != 0) {                                                                       \
            const char *m_ = aclGetRecentErrMsg();                                           \
            fprintf(stderr, "obs_engine: %s failed: %d %s\n", #call, e_, m_ ? m_ : "");      \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

#pragma pack(push, 1)
struct synthetic_args { double flops, hbm_bytes; };
#pragma pack(pop)
struct opapi_attn { uint32_t batch, heads, kv_heads, seq_len, head_dim, query_len; };
typedef int (*ws_fn)(const struct opapi_attn *, uint64_t *, void **);
typedef int (*op_fn)(void *, uint64_t, void *, aclrtStream);

static int layers = 26, mlp = 2, chunk_decodes = 3, fused;
static double p_ms = 1.15, d_ms = 0.05, grow_to = 4, ms_flops = 3.2e11;
static const char *attn = "kernel", *opapi;
static aclrtStream s;
static aclrtFuncHandle f_mlp_p, f_mlp_d, f_attn_p, f_attn_d;
static ws_fn ws_p, ws_d;
static op_fn op_p, op_d;
static void *dev_io;
static char host[4096];

static void kernel(aclrtFuncHandle f, double ms)
{
    struct synthetic_args a = {ms * ms_flops, 0};
    CHECK(aclrtLaunchKernel(f, FULL_BLOCK_DIM, &a, sizeof a, s));
}

static void attention(int prefill, double ms)
{
    if (strcmp(attn, "aclnn")) {
        kernel(prefill ? f_attn_p : f_attn_d, ms);
        return;
    }
    /* the emulator's attention kernels: a prompt of 2k tokens, or a decode batch of 8 */
    struct opapi_attn sh = prefill ? (struct opapi_attn){1, 32, 8, 2048, 128, 2048}
                                   : (struct opapi_attn){8, 32, 8, 2048, 128, 1};
    uint64_t ws;
    void *ex;
    CHECK((prefill ? ws_p : ws_d)(&sh, &ws, &ex));
    CHECK((prefill ? op_p : op_d)(NULL, ws, ex, s));
}

static void prefill_layer(void)
{
    for (int k = 0; k < mlp; k++) kernel(f_mlp_p, p_ms);
    attention(1, p_ms);
}

static void decode_layer(double ms)
{
    for (int k = 0; k < mlp; k++) kernel(f_mlp_d, ms);
    attention(0, ms);
}

static void sync_step(int copies)
{
    if (copies) CHECK(aclrtMemcpyAsync(host, sizeof host, dev_io, 512, ACL_MEMCPY_DEVICE_TO_HOST, s));
    CHECK(aclrtSynchronizeStream(s));
}

static void decode(double ms)
{
    CHECK(aclrtMemcpyAsync(dev_io, 4096, host, 512, ACL_MEMCPY_HOST_TO_DEVICE, s));
    for (int l = 0; l < layers; l++) decode_layer(ms);
    sync_step(1);
}

static void idle_ms(long ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
        ;
}

static void *sym(void *lib, const char *name)
{
    void *f = dlsym(lib, name);
    if (!f) {
        fprintf(stderr, "obs_engine: %s has no %s\n", opapi, name);
        exit(1);
    }
    return f;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: obs_engine KERNEL_LIBRARY [options] STEP...\n");
        return 2;
    }
    int first = argc;
    for (int i = 2; i < argc; i++) {
        const char *k = argv[i];
        if (k[0] != '-') {
            first = i;
            break;
        }
        if (!strcmp(k, "--fused")) {
            fused = 1;
            continue;
        }
        if (i + 1 >= argc) break;
        const char *v = argv[++i];
        if (!strcmp(k, "--layers")) layers = atoi(v);
        else if (!strcmp(k, "--mlp")) mlp = atoi(v);
        else if (!strcmp(k, "--p-ms")) p_ms = atof(v);
        else if (!strcmp(k, "--d-ms")) d_ms = atof(v);
        else if (!strcmp(k, "--chunk-decodes")) chunk_decodes = atoi(v);
        else if (!strcmp(k, "--grow-to")) grow_to = atof(v);
        else if (!strcmp(k, "--ms-flops")) ms_flops = atof(v);
        else if (!strcmp(k, "--attn")) attn = v;
        else if (!strcmp(k, "--opapi")) opapi = v;
        else {
            fprintf(stderr, "obs_engine: unknown option %s\n", k);
            return 2;
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    CHECK(aclInit(NULL));
    CHECK(aclrtSetDevice(0));
    CHECK(aclrtCreateStream(&s));
    aclrtBinHandle bin;
    CHECK(aclrtBinaryLoadFromFile(argv[1], NULL, &bin));
    CHECK(aclrtBinaryGetFunction(bin, "k_mlp_p", &f_mlp_p));
    CHECK(aclrtBinaryGetFunction(bin, "k_mlp_d", &f_mlp_d));
    int named = !strcmp(attn, "kernel");
    if (!strcmp(attn, "aclnn")) {
        void *lib = dlopen(opapi ? opapi : "libopapi.so", RTLD_NOW);
        if (!lib) {
            fprintf(stderr, "obs_engine: %s\n", dlerror());
            return 1;
        }
        const char *pn = fused ? "aclnnFusedInferAttentionScoreV2" : "aclnnPromptFlashAttentionV3";
        const char *dn = fused ? "aclnnFusedInferAttentionScoreV2" : "aclnnIncreFlashAttentionV4";
        char buf[128];
        op_p = (op_fn)sym(lib, pn);
        op_d = (op_fn)sym(lib, dn);
        snprintf(buf, sizeof buf, "%sGetWorkspaceSize", pn);
        ws_p = (ws_fn)sym(lib, buf);
        snprintf(buf, sizeof buf, "%sGetWorkspaceSize", dn);
        ws_d = (ws_fn)sym(lib, buf);
    } else {
        CHECK(aclrtBinaryGetFunction(bin, named ? "PromptFlashAttention_bf16" : "k_attn_p", &f_attn_p));
        CHECK(aclrtBinaryGetFunction(bin, named ? "IncreFlashAttention_bf16" : "k_attn_d", &f_attn_d));
    }
    CHECK(aclrtMalloc(&dev_io, 4096, ACL_MEM_MALLOC_HUGE_FIRST));
    printf("{\"ready\":true,\"pid\":%d}\n", (int)getpid());
    unsigned long np = 0, nd = 0, nc = 0;
    for (int i = first; i < argc; i++) {
        char kind = argv[i][0];
        long n = argv[i][1] == ':' ? atol(argv[i] + 2) : 0;
        for (long j = 0; kind != 'i' && j < n; j++) {
            if (kind == 'p') {
                for (int l = 0; l < layers; l++) prefill_layer();
                sync_step(1);
                np++;
            } else if (kind == 'd') {
                decode(d_ms);
                nd++;
            } else if (kind == 'g') {
                decode(d_ms * (1 + (grow_to - 1) * j / (n > 1 ? n - 1 : 1)));
                nd++;
            } else if (kind == 'c') {
                for (int l = 0; l < layers; l++) {
                    prefill_layer();
                    decode_layer(d_ms);
                }
                sync_step(1);
                nc++;
                for (int k = 0; k < chunk_decodes; k++, nd++) decode(d_ms);
            } else {
                fprintf(stderr, "obs_engine: bad step %s\n", argv[i]);
                return 2;
            }
        }
        if (kind == 'i') idle_ms(n);
    }
    printf("{\"done\":true,\"prefill\":%lu,\"decode\":%lu,\"chunked\":%lu}\n", np, nd, nc);
    return 0;
}
