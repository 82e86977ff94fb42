/* aclnnApplyRotaryPosEmb and aclnnApplyRotaryPosEmbV2 (ops-transformer
 * posembedding/apply_rotary_pos_emb/docs): rotary position embedding applied in place to query
 * and key, out = x * cos + rotate(x) * sin, with cos and sin given per (batch, position) and
 * shared by every head. Arithmetic in fp32; cost and efficiency as the `rope` built-in, plus
 * the reads of cos and sin. */
#include <stdio.h>
#include <stdlib.h>

#include "aclnnop/aclnn_apply_rotary_pos_emb.h"
#include "aclnnop/aclnn_apply_rotary_pos_emb_v2.h"
#include "opapi.h"

#define VECTOR_TILE 4096.0
#define ROPE_HEAD_DIM 128 /* CANN: the last dimension (D) must be 128 */

enum { MODE_HALF, MODE_INTERLEAVE, MODE_QUARTER };
enum { LAYOUT_BSND = 1, LAYOUT_SBND = 2, LAYOUT_BNSD = 3 };

struct rope_args {
    int mode;
    uint32_t ndim_n; /* which dimension is N (heads): 2 for BSND and SBND, 1 for BNSD */
};

/* rotate(x)[i] for the mode: "half" (-x2, x1), "quarter" (-x2, x1, -x4, x3) on quarters,
 * "interleave" (-x[2i+1], x[2i]) on pairs. */
static void rotate(int mode, const float *x, float *r, int64_t d)
{
    if (mode == MODE_INTERLEAVE) {
        for (int64_t i = 0; i + 1 < d; i += 2) {
            r[i] = -x[i + 1];
            r[i + 1] = x[i];
        }
        return;
    }
    int64_t part = mode == MODE_HALF ? d / 2 : d / 4;
    for (int64_t base = 0; base < d; base += 2 * part)
        for (int64_t i = 0; i < part; i++) {
            r[base + i] = -x[base + part + i];
            r[base + part + i] = x[base + i];
        }
}

static void rope_one(const struct rope_args *p, const struct nn_view *x, const struct nn_view *cs,
                     const struct nn_view *sn, float *buf)
{
    int64_t d = x->dims[3];
    float *v = buf, *r = buf + d;
    int64_t idx[4], cidx[4];
    for (idx[0] = 0; idx[0] < x->dims[0]; idx[0]++)
        for (idx[1] = 0; idx[1] < x->dims[1]; idx[1]++)
            for (idx[2] = 0; idx[2] < x->dims[2]; idx[2]++) {
                memcpy(cidx, idx, sizeof cidx);
                cidx[p->ndim_n] = 0; /* cos and sin are shared by the heads */
                idx[3] = cidx[3] = 0;
                int64_t xo = nn_at(x, idx), co = nn_at(cs, cidx), so = nn_at(sn, cidx);
                for (int64_t i = 0; i < d; i++) v[i] = nn_ldf(x, xo + i * x->strides[3]);
                rotate(p->mode, v, r, d);
                for (int64_t i = 0; i < d; i++)
                    nn_st(x, xo + i * x->strides[3],
                          v[i] * nn_ldf(cs, co + i * cs->strides[3]) + r[i] * nn_ldf(sn, so + i * sn->strides[3]));
            }
}

static int run_rope(struct aclOpExecutor *ex)
{
    const struct rope_args *p = ex->priv;
    const struct nn_view *q = &ex->views[0], *k = &ex->views[1], *cs = &ex->views[2], *sn = &ex->views[3];
    float buf[2 * ROPE_HEAD_DIM];
    rope_one(p, q, cs, sn, buf);
    rope_one(p, k, cs, sn, buf);
    return ACLNN_SUCCESS;
}

static int rope_prepare(const char *api, bool v1, aclTensor *queryRef, aclTensor *keyRef, const aclTensor *cos,
                        const aclTensor *sin, int64_t layout, const char *rotaryMode, uint64_t *workspaceSize,
                        aclOpExecutor **executor)
{
    struct aclOpExecutor *ex = nn_executor_new(api, NN_K_ROPE, run_rope, sizeof(struct rope_args));
    if (!ex) return nn_fail(ACLNN_ERR_INNER_CREATE_EXECUTOR, api, "out of host memory");
    struct rope_args *p = ex->priv;
    struct nn_view *q, *k, *c, *s;
    int rc = nn_take(ex, api, queryRef, "queryRef", &q);
    if (!rc) rc = nn_take(ex, api, keyRef, "keyRef", &k);
    if (!rc) rc = nn_take(ex, api, cos, "cos", &c);
    if (!rc) rc = nn_take(ex, api, sin, "sin", &s);
    if (!rc && !rotaryMode) rc = nn_fail(ACLNN_ERR_PARAM_NULLPTR, api, "rotaryMode is NULL");
    if (rc) return nn_finish(ex, rc, workspaceSize, executor);
    if (strcmp(rotaryMode, "half") == 0) p->mode = MODE_HALF;
    else if (strcmp(rotaryMode, "interleave") == 0) p->mode = MODE_INTERLEAVE;
    else if (strcmp(rotaryMode, "quarter") == 0) p->mode = MODE_QUARTER;
    else rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "rotaryMode '%.16s' is not half, interleave or quarter", rotaryMode);
    if (!rc && v1 && layout != LAYOUT_BSND) /* the first version takes BSND only (CANN's limit) */
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "layout %lld is not 1 (BSND)", (long long)layout);
    if (!rc && layout != LAYOUT_BSND && layout != LAYOUT_SBND && layout != LAYOUT_BNSD)
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "layout %lld is not 1 (BSND), 2 (SBND) or 3 (BNSD)", (long long)layout);
    if (!rc && (q->dtype != k->dtype || q->dtype != c->dtype || q->dtype != s->dtype ||
                !(q->dtype == ACL_FLOAT || nn_is_float16ish(q->dtype))))
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "queryRef, keyRef, cos and sin must share one of FLOAT, FLOAT16, BFLOAT16");
    if (!rc && (q->ndim != 4 || k->ndim != 4 || c->ndim != 4 || s->ndim != 4))
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "queryRef, keyRef, cos and sin must have 4 dimensions");
    if (rc) return nn_finish(ex, rc, workspaceSize, executor);
    p->ndim_n = layout == LAYOUT_BNSD ? 1 : 2;
    for (uint32_t i = 0; i < 4 && !rc; i++) {
        int64_t want_cs = i == p->ndim_n ? 1 : q->dims[i];
        if ((i != p->ndim_n && k->dims[i] != q->dims[i]) || c->dims[i] != want_cs || s->dims[i] != want_cs)
            rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api,
                         "shapes do not match: keyRef must be queryRef's but for N, cos and sin queryRef's with N = 1");
    }
    if (!rc && q->dims[3] != ROPE_HEAD_DIM)
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "the last dimension is %lld; CANN supports %d", (long long)q->dims[3],
                     ROPE_HEAD_DIM);
    if (!rc) {
        double n = (double)(q->numel + k->numel);
        ex->flops = 3.0 * n; /* two multiplies and an add per element: as the rope built-in */
        ex->hbm_bytes = 2.0 * n * q->esize + (double)(c->numel + s->numel) * c->esize;
        ex->builtin = "rope";
        ex->block_dim = nn_block_dim(NN_CORE_VECTOR, n / VECTOR_TILE);
    }
    return nn_finish(ex, rc, workspaceSize, executor);
}

NN_API aclnnStatus aclnnApplyRotaryPosEmbGetWorkspaceSize(aclTensor *queryRef, aclTensor *keyRef, const aclTensor *cos,
                                                          const aclTensor *sin, int64_t layout, uint64_t *workspaceSize,
                                                          aclOpExecutor **executor)
{
    return rope_prepare("aclnnApplyRotaryPosEmb", true, queryRef, keyRef, cos, sin, layout, "half", workspaceSize, executor);
}

NN_API aclnnStatus aclnnApplyRotaryPosEmb(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                          aclrtStream stream)
{
    return nn_execute("aclnnApplyRotaryPosEmb", workspace, workspaceSize, executor, stream);
}

NN_API aclnnStatus aclnnApplyRotaryPosEmbV2GetWorkspaceSize(aclTensor *queryRef, aclTensor *keyRef,
                                                            const aclTensor *cos, const aclTensor *sin, int64_t layout,
                                                            char *rotaryMode, uint64_t *workspaceSize,
                                                            aclOpExecutor **executor)
{
    return rope_prepare("aclnnApplyRotaryPosEmbV2", false, queryRef, keyRef, cos, sin, layout, rotaryMode, workspaceSize,
                        executor);
}

NN_API aclnnStatus aclnnApplyRotaryPosEmbV2(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                            aclrtStream stream)
{
    return nn_execute("aclnnApplyRotaryPosEmbV2", workspace, workspaceSize, executor, stream);
}
