/* A stand-in for CANN's libopapi.so, so the observer's aclnn probes are tested on a real
 * library where CANN is absent. It exports the attention operators' two-stage entry points;
 * the operator call itself has CANN's exact signature (the one the probes read):
 *
 *     aclnnStatus aclnnXxx(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
 *                          aclrtStream stream)
 *
 * The GetWorkspaceSize half takes a test-only shape description instead of CANN's opaque
 * aclTensor arguments (it is never probed):
 *
 *     aclnnXxxGetWorkspaceSize(const struct opapi_attn *shape, uint64_t *workspaceSize,
 *                              aclOpExecutor **executor)
 *
 * Each operator launches the emulator's built-in attention kernels (attention_prefill or
 * attention_decode, timing-only: null pointers) through aclrtLaunchKernel, with handles
 * from the kernel library named by FLEXNPU_EMU_KERNELS. The fused operator
 * (FusedInferAttentionScore) launches the prefill kernel for query_len > 1, else the decode
 * one, as CANN's decides by the query's length.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>

#include "acl/acl.h"

/* blockDim of a kernel meant to fill the device: at least every core of its class (24 cube,
 * 48 vector on the emulated 910B and 910C), as a real launch asks (docs/emulator.md) */
#define FULL_BLOCK_DIM 48

typedef int aclnnStatus;
typedef struct opapi_executor aclOpExecutor;

struct opapi_attn {
    uint32_t batch, heads, kv_heads, seq_len, head_dim; /* seq_len: prompt (prefill) or context (decode) */
    uint32_t query_len; /* the fused operator's choice: > 1 prefill, 1 decode */
};

#pragma pack(push, 1)
struct attn_args { /* emu_args_attn_prefill and emu_args_attn_decode share this layout */
    uint64_t q, k, v, o;
    uint32_t batch, heads, kv_heads, len, head_dim;
    int32_t dtype;
};
#pragma pack(pop)

struct opapi_executor {
    int prefill;
    struct opapi_attn shape;
};

static pthread_once_t once = PTHREAD_ONCE_INIT;
static aclrtFuncHandle f_prefill, f_decode;
static int load_rc;

static void load(void)
{
    const char *lib = getenv("FLEXNPU_EMU_KERNELS");
    aclrtBinHandle bin;
    load_rc = lib ? aclrtBinaryLoadFromFile(lib, NULL, &bin) : ACL_ERROR_INVALID_PARAM;
    if (!load_rc) load_rc = aclrtBinaryGetFunction(bin, "attention_prefill", &f_prefill);
    if (!load_rc) load_rc = aclrtBinaryGetFunction(bin, "attention_decode", &f_decode);
}

static aclnnStatus workspace(const struct opapi_attn *shape, int prefill, uint64_t *ws, aclOpExecutor **ex)
{
    if (!shape || !ws || !ex) return ACL_ERROR_INVALID_PARAM;
    pthread_once(&once, load);
    if (load_rc) return load_rc;
    aclOpExecutor *e = malloc(sizeof *e);
    if (!e) return ACL_ERROR_BAD_ALLOC;
    e->prefill = prefill;
    e->shape = *shape;
    *ws = 0;
    *ex = e;
    return ACL_SUCCESS;
}

static aclnnStatus run(aclOpExecutor *e, aclrtStream stream)
{
    if (!e) return ACL_ERROR_INVALID_PARAM;
    int prefill = e->prefill < 0 ? e->shape.query_len > 1 : e->prefill;
    struct attn_args a = {0, 0, 0, 0, e->shape.batch, e->shape.heads, e->shape.kv_heads, e->shape.seq_len,
                          e->shape.head_dim, ACL_FLOAT16};
    aclError rc = aclrtLaunchKernel(prefill ? f_prefill : f_decode, FULL_BLOCK_DIM, &a, sizeof a, stream);
    free(e); /* an executor runs once, as CANN's */
    return rc;
}

#define OPERATOR(name, prefill)                                                                   \
    aclnnStatus name##GetWorkspaceSize(const struct opapi_attn *shape, uint64_t *workspaceSize,   \
                                       aclOpExecutor **executor)                                  \
    {                                                                                             \
        return workspace(shape, prefill, workspaceSize, executor);                                \
    }                                                                                             \
    aclnnStatus name(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,            \
                     aclrtStream stream)                                                          \
    {                                                                                             \
        (void)workspace;                                                                          \
        (void)workspaceSize;                                                                      \
        return run(executor, stream);                                                             \
    }

OPERATOR(aclnnPromptFlashAttentionV3, 1)
OPERATOR(aclnnIncreFlashAttentionV4, 0)

/* fused: one operator for both phases; the query length (here: seq_len of a prefill
 * shape, 1 for decode) decides which kernel runs */
aclnnStatus aclnnFusedInferAttentionScoreV2GetWorkspaceSize(const struct opapi_attn *shape, uint64_t *workspaceSize,
                                                           aclOpExecutor **executor)
{
    aclnnStatus rc = workspace(shape, -1, workspaceSize, executor);
    return rc;
}

aclnnStatus aclnnFusedInferAttentionScoreV2(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                            aclrtStream stream)
{
    (void)workspace;
    (void)workspaceSize;
    return run(executor, stream);
}
