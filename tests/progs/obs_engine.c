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
 *         aclnn   through libopapi.so's aclnnPromptFlashAttentionV3 / aclnnIncreFlashAttentionV4
 *                 (or, with --fused, aclnnFusedInferAttentionScoreV2 for both), loaded with
 *                 dlopen as frameworks do (--opapi PATH: another libopapi.so; the aclTensor
 *                 calls come from libnnopbase.so on the library path), on timing-only
 *                 tensors (NULL data): a prompt of 2k tokens, a decode batch of 8 at 2k
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
#include "aclnnop/aclnn_fused_infer_attention_score_v2.h"
#include "aclnnop/aclnn_incre_flash_attention_v4.h"
#include "aclnnop/aclnn_prompt_flash_attention_v3.h"

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
typedef aclnnStatus (*op_fn)(void *, uint64_t, aclOpExecutor *, aclrtStream);

static int layers = 26, mlp = 2, chunk_decodes = 3, fused;
static double p_ms = 1.15, d_ms = 0.05, grow_to = 4, ms_flops = 3.2e11;
static const char *attn = "kernel", *opapi;
static aclrtStream s;
static aclrtFuncHandle f_mlp_p, f_mlp_d, f_attn_p, f_attn_d;
/* the aclnn calls, found with dlsym (libopapi.so, and libnnopbase.so beneath it) */
static __typeof__(&aclCreateTensor) create_tensor;
static __typeof__(&aclCreateTensorList) create_list;
static __typeof__(&aclCreateIntArray) create_ints;
static __typeof__(&aclnnPromptFlashAttentionV3GetWorkspaceSize) pfa_ws;
static __typeof__(&aclnnIncreFlashAttentionV4GetWorkspaceSize) ifa_ws;
static __typeof__(&aclnnFusedInferAttentionScoreV2GetWorkspaceSize) fia_ws;
static op_fn op_p, op_d;
/* a prompt of 2k tokens and a decode batch of 8 at 2k, 32 query and 8 kv heads of 128, BSND */
static aclTensor *q_p, *kv_p, *q_d, *mask, *o_p, *o_d, *lse;
static aclTensorList *kl_p, *vl_p, *kl_d, *vl_d;
static aclIntArray *len_p, *len_d, *one_d;
static void *dev_io;
static char host[4096];

static void kernel(aclrtFuncHandle f, double ms)
{
    struct synthetic_args a = {ms * ms_flops, 0};
    CHECK(aclrtLaunchKernel(f, FULL_BLOCK_DIM, &a, sizeof a, s));
}

static aclTensor *tensor(int64_t a, int64_t b, int64_t c, int64_t d, aclDataType dt)
{
    int64_t dims[4] = {a, b, c, d}, strides[4] = {b * c * d, c * d, d, 1};
    int n = c ? 4 : 2;
    if (!c) strides[0] = b, strides[1] = 1;
    aclTensor *t = create_tensor(dims, n, dt, strides, 0, ACL_FORMAT_ND, dims, n, NULL);
    if (!t) {
        fprintf(stderr, "obs_engine: aclCreateTensor failed\n");
        exit(1);
    }
    return t;
}

static void make_tensors(void)
{
    q_p = tensor(1, 2048, 32, 128, ACL_BF16), o_p = tensor(1, 2048, 32, 128, ACL_BF16);
    kv_p = tensor(1, 2048, 8, 128, ACL_BF16);
    q_d = tensor(8, 1, 32, 128, ACL_BF16), o_d = tensor(8, 1, 32, 128, ACL_BF16);
    mask = tensor(2048, 2048, 0, 0, ACL_BOOL);
    lse = tensor(1, 1, 0, 0, ACL_FLOAT);
    const aclTensor *k[1];
    k[0] = tensor(1, 2048, 8, 128, ACL_BF16), kl_p = create_list(k, 1);
    k[0] = tensor(1, 2048, 8, 128, ACL_BF16), vl_p = create_list(k, 1);
    k[0] = tensor(8, 2048, 8, 128, ACL_BF16), kl_d = create_list(k, 1);
    k[0] = tensor(8, 2048, 8, 128, ACL_BF16), vl_d = create_list(k, 1);
    int64_t lp[1] = {2048}, ld[8] = {2048, 2048, 2048, 2048, 2048, 2048, 2048, 2048}, ones[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    len_p = create_ints(lp, 1), len_d = create_ints(ld, 8), one_d = create_ints(ones, 8);
    if (!kl_p || !vl_p || !kl_d || !vl_d || !len_p || !len_d || !one_d) {
        fprintf(stderr, "obs_engine: creating the aclnn arguments failed\n");
        exit(1);
    }
}

static void attention(int prefill, double ms)
{
    if (strcmp(attn, "aclnn")) {
        kernel(prefill ? f_attn_p : f_attn_d, ms);
        return;
    }
    uint64_t ws;
    aclOpExecutor *ex;
    char layout[] = "BSND";
    double scale = 0.08838834764831845; /* 1 / sqrt(128) */
    if (fused)
        CHECK(fia_ws(prefill ? q_p : q_d, prefill ? kl_p : kl_d, prefill ? vl_p : vl_d, NULL, prefill ? mask : NULL,
                     prefill ? len_p : one_d, prefill ? len_p : len_d, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                     NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 32, scale, 2147483647, 0, layout, 8,
                     prefill ? 3 : 0, 1, 0, 0, false, 0, 0, prefill ? o_p : o_d, lse, &ws, &ex));
    else if (prefill)
        CHECK(pfa_ws(q_p, kv_p, kv_p, NULL, mask, len_p, len_p, NULL, NULL, NULL, NULL, NULL, 32, scale, 2147483647, 0,
                     layout, 8, 3, 1, o_p, &ws, &ex));
    else
        CHECK(ifa_ws(q_d, kl_d, vl_d, NULL, NULL, len_d, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 32,
                     scale, layout, 8, 0, 1, o_d, &ws, &ex));
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
        fprintf(stderr, "obs_engine: no %s (%s)\n", name, dlerror());
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
        void *base = dlopen("libnnopbase.so", RTLD_NOW | RTLD_GLOBAL); /* aclTensor and friends */
        if (!base) {
            fprintf(stderr, "obs_engine: %s\n", dlerror());
            return 1;
        }
        create_tensor = (__typeof__(create_tensor))sym(base, "aclCreateTensor");
        create_list = (__typeof__(create_list))sym(base, "aclCreateTensorList");
        create_ints = (__typeof__(create_ints))sym(base, "aclCreateIntArray");
        if (fused) {
            fia_ws = (__typeof__(fia_ws))sym(lib, "aclnnFusedInferAttentionScoreV2GetWorkspaceSize");
            op_p = op_d = (op_fn)sym(lib, "aclnnFusedInferAttentionScoreV2");
        } else {
            pfa_ws = (__typeof__(pfa_ws))sym(lib, "aclnnPromptFlashAttentionV3GetWorkspaceSize");
            ifa_ws = (__typeof__(ifa_ws))sym(lib, "aclnnIncreFlashAttentionV4GetWorkspaceSize");
            op_p = (op_fn)sym(lib, "aclnnPromptFlashAttentionV3");
            op_d = (op_fn)sym(lib, "aclnnIncreFlashAttentionV4");
        }
        make_tensors();
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
