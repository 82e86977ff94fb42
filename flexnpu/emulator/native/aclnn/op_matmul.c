/* aclnnMatmul: self @ mat2 with torch.matmul's rules (1 to 6 dimensions; a 1-D operand is a
 * vector; batch dimensions broadcast), as CANN documents it (ops-nn
 * matmul/mat_mul_v3/docs/aclnnMatmul.md). Accumulates in fp32, as the cube unit does; cost and
 * efficiency as the `gemm` built-in: 2*batch*m*n*k FLOPs and every operand's bytes once. */
#include <stdio.h>
#include <stdlib.h>

#include "aclnnop/aclnn_matmul.h"
#include "opapi.h"

#define MATMUL_MAX_DIMS 6
/* output tile of one cube core (rows x columns): a 16-bit matmul's base block in CANN's
 * MatMulV3 tiling; more tiles than cores take the whole device */
#define TILE_M 128.0
#define TILE_N 256.0

enum { KEEP_DTYPE, ALLOW_FP32_DOWN_PRECISION, USE_FP16, USE_HF32, USE_FP32_ADD };

struct matmul_args {
    bool to_fp16; /* USE_FP16 with fp32 inputs: the cube multiplies fp16 values */
    bool a_vec, b_vec;
    uint32_t nbatch;
    int64_t batch[NN_MAX_DIMS];
    int64_t m, k, n;
};

/* The batch part (all but the last two, or no, dimensions) of a view, for nn_walk. */
static struct nn_view batch_view(const struct nn_view *v, uint32_t nmat)
{
    struct nn_view b = *v;
    b.ndim = v->ndim > nmat ? v->ndim - nmat : 0;
    return b;
}

static int run_matmul(struct aclOpExecutor *ex)
{
    const struct matmul_args *p = ex->priv;
    const struct nn_view *a = &ex->views[0], *b = &ex->views[1], *o = &ex->views[2];
    int64_t m = p->m, k = p->k, n = p->n;
    /* element strides of the matrix parts; a vector operand has one dimension */
    int64_t sam = p->a_vec ? 0 : a->strides[a->ndim - 2], sak = a->strides[a->ndim - 1];
    int64_t sbk = p->b_vec ? b->strides[0] : b->strides[b->ndim - 2], sbn = p->b_vec ? 0 : b->strides[b->ndim - 1];
    uint32_t omat = (p->a_vec ? 0 : 1) + (p->b_vec ? 0 : 1);
    int64_t som = 0, son = 0;
    if (!p->a_vec) som = o->strides[o->ndim - omat];
    if (!p->b_vec) son = o->strides[o->ndim - 1];
    float *fa = malloc(sizeof(float) * (size_t)(m * k + 1)), *fb = malloc(sizeof(float) * (size_t)(k * n + 1));
    float *acc = malloc(sizeof(float) * (size_t)(m * n + 1));
    if (!fa || !fb || !acc) {
        free(fa), free(fb), free(acc);
        return nn_fail(ACLNN_ERR_INNER, ex->api, "out of host memory for a %lldx%lldx%lld matmul", (long long)m,
                       (long long)k, (long long)n);
    }
    struct nn_view ba = batch_view(a, p->a_vec ? 1 : 2), bb = batch_view(b, p->b_vec ? 1 : 2),
                   bo = batch_view(o, omat);
    const struct nn_view *vs[3] = {&bo, &ba, &bb};
    struct nn_walk w;
    nn_walk_init(&w, p->batch, p->nbatch, 3, vs);
    if (m * n == 0) w.done = true;
    for (; !w.done; nn_walk_next(&w)) {
        for (int64_t i = 0; i < m; i++)
            for (int64_t q = 0; q < k; q++) {
                float x = nn_ldf(a, w.off[1] + i * sam + q * sak);
                fa[i * k + q] = p->to_fp16 ? (float)(_Float16)x : x;
            }
        for (int64_t q = 0; q < k; q++)
            for (int64_t j = 0; j < n; j++) {
                float x = nn_ldf(b, w.off[2] + q * sbk + j * sbn);
                fb[q * n + j] = p->to_fp16 ? (float)(_Float16)x : x;
            }
        memset(acc, 0, sizeof(float) * (size_t)(m * n));
        for (int64_t i = 0; i < m; i++)
            for (int64_t q = 0; q < k; q++) {
                float x = fa[i * k + q];
                for (int64_t j = 0; j < n; j++) acc[i * n + j] += x * fb[q * n + j];
            }
        /* stored after the whole product: out may alias an operand */
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) nn_st(o, w.off[0] + i * som + j * son, acc[i * n + j]);
    }
    free(fa), free(fb), free(acc);
    return ACLNN_SUCCESS;
}

static bool matmul_dtype(int32_t dt) { return dt == ACL_FLOAT || nn_is_float16ish(dt); }

NN_API aclnnStatus aclnnMatmulGetWorkspaceSize(const aclTensor *self, const aclTensor *mat2, aclTensor *out,
                                               int8_t cubeMathType, uint64_t *workspaceSize,
                                               aclOpExecutor **executor)
{
    const char *api = "aclnnMatmul";
    struct aclOpExecutor *ex = nn_executor_new(api, NN_K_MATMUL, run_matmul, sizeof(struct matmul_args));
    if (!ex) return nn_fail(ACLNN_ERR_INNER_CREATE_EXECUTOR, api, "out of host memory");
    struct matmul_args *p = ex->priv;
    struct nn_view *a, *b, *o;
    int rc = nn_take(ex, api, self, "self", &a);
    if (!rc) rc = nn_take(ex, api, mat2, "mat2", &b);
    if (!rc) rc = nn_take(ex, api, out, "out", &o);
    if (rc) return nn_finish(ex, rc, workspaceSize, executor);
    if (!matmul_dtype(a->dtype) || !matmul_dtype(b->dtype) || !matmul_dtype(o->dtype))
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "self, mat2 and out must be FLOAT, FLOAT16 or BFLOAT16 (%s, %s, %s)",
                     nn_dtype_name(a->dtype), nn_dtype_name(b->dtype), nn_dtype_name(o->dtype));
    int32_t ct = rc ? 0 : nn_promote(a->dtype, b->dtype);
    if (!rc && (cubeMathType < KEEP_DTYPE || cubeMathType > USE_FP32_ADD))
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "cubeMathType %d is not one of 0..4", cubeMathType);
    if (!rc && cubeMathType == USE_FP16 && ct == ACL_BF16)
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "cubeMathType USE_FP16 does not take BFLOAT16 inputs");
    if (!rc && cubeMathType == USE_HF32 && ct != ACL_FLOAT)
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "cubeMathType USE_HF32 takes only FLOAT inputs");
    if (!rc && (a->ndim < 1 || a->ndim > MATMUL_MAX_DIMS || b->ndim < 1 || b->ndim > MATMUL_MAX_DIMS))
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "self and mat2 must have 1 to 6 dimensions (%u, %u)", a->ndim,
                     b->ndim);
    if (rc) return nn_finish(ex, rc, workspaceSize, executor);
    p->to_fp16 = cubeMathType == USE_FP16 && ct == ACL_FLOAT;
    p->a_vec = a->ndim == 1;
    p->b_vec = b->ndim == 1;
    p->m = p->a_vec ? 1 : a->dims[a->ndim - 2];
    p->k = a->dims[a->ndim - 1];
    int64_t kb = p->b_vec ? b->dims[0] : b->dims[b->ndim - 2];
    p->n = p->b_vec ? 1 : b->dims[b->ndim - 1];
    if (kb != p->k)
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "self's last dimension (%lld) differs from mat2's reduce dimension (%lld)",
                     (long long)p->k, (long long)kb);
    uint32_t na = p->a_vec ? 0 : a->ndim - 2, nb = p->b_vec ? 0 : b->ndim - 2;
    if (!rc && !nn_broadcast(a->dims, na, b->dims, nb, p->batch, &p->nbatch))
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "the batch dimensions of self and mat2 do not broadcast");
    if (!rc) {
        int64_t want[NN_MAX_DIMS];
        uint32_t nw = p->nbatch;
        memcpy(want, p->batch, nw * sizeof *want);
        if (!p->a_vec) want[nw++] = p->m;
        if (!p->b_vec) want[nw++] = p->n;
        if (!nn_same_shape(o, want, nw)) {
            char s1[96], s2[96];
            nn_shape_str(o->dims, o->ndim, s1, sizeof s1);
            nn_shape_str(want, nw, s2, sizeof s2);
            rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "out has shape %s, self @ mat2 has %s", s1, s2);
        }
    }
    if (!rc) {
        double batch = (double)nn_numel(p->batch, p->nbatch), m = (double)p->m, n = (double)p->n;
        if (batch > 1) ex->kernel = NN_K_BATCH_MATMUL;
        ex->flops = 2.0 * batch * m * n * (double)p->k;
        ex->hbm_bytes = (double)a->numel * a->esize + (double)b->numel * b->esize + (double)o->numel * o->esize;
        ex->builtin = "gemm";
        ex->block_dim = nn_block_dim(NN_CORE_CUBE, batch * ceil(m / TILE_M) * ceil(n / TILE_N));
    }
    return nn_finish(ex, rc, workspaceSize, executor);
}

NN_API aclnnStatus aclnnMatmul(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream)
{
    return nn_execute("aclnnMatmul", workspace, workspaceSize, executor, stream);
}
