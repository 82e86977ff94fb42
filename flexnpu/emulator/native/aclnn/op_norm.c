/* Row-wise operators: aclnnRmsNorm (ops-nn norm/rms_norm/docs/aclnnRmsNorm.md) and aclnnSoftmax
 * (ops-nn activation/softmax_v2). Arithmetic in fp32; cost and efficiency as the `rmsnorm` and
 * `elementwise` built-ins. */
#include <stdio.h>
#include <stdlib.h>

#include "aclnnop/aclnn_rms_norm.h"
#include "aclnnop/aclnn_softmax.h"
#include "opapi.h"

#define VECTOR_TILE 4096.0

/* The dimensions [first, first + count) of a view, starting at element 0 (for nn_walk). */
static struct nn_view part(const struct nn_view *v, uint32_t first, uint32_t count)
{
    struct nn_view p = *v;
    p.ndim = count;
    p.offset = 0;
    memmove(p.dims, v->dims + first, count * sizeof *p.dims);
    memmove(p.strides, v->strides + first, count * sizeof *p.strides);
    return p;
}

/* ---------------------------------------------------------------- rms norm */

struct rms_args {
    float eps;
    uint32_t lead; /* leading dimensions of x: one row each; the rest is normalised */
    int64_t cols;
};

static int run_rms_norm(struct aclOpExecutor *ex)
{
    const struct rms_args *p = ex->priv;
    const struct nn_view *x = &ex->views[0], *g = &ex->views[1], *y = &ex->views[2], *r = &ex->views[3];
    uint32_t tail = x->ndim - p->lead;
    struct nn_view xl = part(x, 0, p->lead), yl = part(y, 0, p->lead), rl = part(r, 0, p->lead);
    struct nn_view xt = part(x, p->lead, tail), yt = part(y, p->lead, tail);
    float *row = malloc(sizeof(float) * (size_t)(p->cols + 1));
    if (!row) return nn_fail(ACLNN_ERR_INNER, ex->api, "out of host memory");
    const struct nn_view *lv[3] = {&xl, &yl, &rl}, *tv[3] = {&xt, &yt, g};
    struct nn_walk rows, cols;
    for (nn_walk_init(&rows, x->dims, p->lead, 3, lv); !rows.done; nn_walk_next(&rows)) {
        int64_t xo = x->offset + rows.off[0], yo = y->offset + rows.off[1];
        float ss = 0.f;
        int64_t c = 0;
        for (nn_walk_init(&cols, x->dims + p->lead, tail, 3, tv); !cols.done; nn_walk_next(&cols), c++) {
            row[c] = nn_ldf(x, xo + cols.off[0]);
            ss += row[c] * row[c];
        }
        float rstd = 1.0f / sqrtf(ss / (float)p->cols + p->eps);
        c = 0;
        for (nn_walk_init(&cols, x->dims + p->lead, tail, 3, tv); !cols.done; nn_walk_next(&cols), c++)
            nn_st(y, yo + cols.off[1], row[c] * rstd * nn_ldf(g, cols.off[2]));
        nn_st(r, r->offset + rows.off[2], rstd);
    }
    free(row);
    return ACLNN_SUCCESS;
}

NN_API aclnnStatus aclnnRmsNormGetWorkspaceSize(const aclTensor *x, const aclTensor *gamma, double epsilon,
                                                const aclTensor *yOut, const aclTensor *rstdOut,
                                                uint64_t *workspaceSize, aclOpExecutor **executor)
{
    const char *api = "aclnnRmsNorm";
    struct aclOpExecutor *ex = nn_executor_new(api, NN_K_RMS_NORM, run_rms_norm, sizeof(struct rms_args));
    if (!ex) return nn_fail(ACLNN_ERR_INNER_CREATE_EXECUTOR, api, "out of host memory");
    struct rms_args *p = ex->priv;
    struct nn_view *vx, *vg, *vy, *vr;
    int rc = nn_take(ex, api, x, "x", &vx);
    if (!rc) rc = nn_take(ex, api, gamma, "gamma", &vg);
    if (!rc) rc = nn_take(ex, api, yOut, "yOut", &vy);
    if (!rc) rc = nn_take(ex, api, rstdOut, "rstdOut", &vr);
    if (rc) return nn_finish(ex, rc, workspaceSize, executor);
    /* CANN's table: x and yOut FLOAT16, BFLOAT16 or FLOAT; gamma x's dtype or FLOAT; rstd FLOAT */
    bool dt_ok = (vx->dtype == ACL_FLOAT || nn_is_float16ish(vx->dtype)) && vy->dtype == vx->dtype &&
                 (vg->dtype == vx->dtype || vg->dtype == ACL_FLOAT) && vr->dtype == ACL_FLOAT;
    if (!dt_ok)
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api,
                     "dtypes x %s, gamma %s, yOut %s, rstdOut %s are not a supported combination",
                     nn_dtype_name(vx->dtype), nn_dtype_name(vg->dtype), nn_dtype_name(vy->dtype),
                     nn_dtype_name(vr->dtype));
    if (!rc && !(epsilon >= 0) ) rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "epsilon %g is negative", epsilon);
    if (!rc && (vg->ndim < 1 || vg->ndim > vx->ndim))
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "gamma must have 1 to %u dimensions", vx->ndim);
    if (!rc) {
        p->lead = vx->ndim - vg->ndim;
        p->eps = (float)epsilon;
        p->cols = vg->numel;
        int64_t rdims[NN_MAX_DIMS];
        for (uint32_t i = 0; i < vx->ndim; i++) rdims[i] = i < p->lead ? vx->dims[i] : 1;
        if (!nn_same_shape(vg, vx->dims + p->lead, vg->ndim))
            rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "gamma's shape must be x's last %u dimensions", vg->ndim);
        else if (!nn_same_shape(vy, vx->dims, vx->ndim))
            rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "yOut's shape differs from x's");
        else if (!nn_same_shape(vr, rdims, vx->ndim)) {
            char s[96];
            nn_shape_str(rdims, vx->ndim, s, sizeof s);
            rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "rstdOut must have shape %s", s);
        }
    }
    if (!rc) {
        double n = (double)vx->numel;
        ex->flops = 4.0 * n; /* square, sum, scale, weight: as the rmsnorm built-in */
        ex->hbm_bytes = n * vx->esize + (double)vg->numel * vg->esize + n * vy->esize + (double)vr->numel * 4;
        ex->builtin = "rmsnorm";
        ex->block_dim = nn_block_dim(NN_CORE_VECTOR, (double)vr->numel);
    }
    return nn_finish(ex, rc, workspaceSize, executor);
}

NN_API aclnnStatus aclnnRmsNorm(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream)
{
    return nn_execute("aclnnRmsNorm", workspace, workspaceSize, executor, stream);
}

/* ---------------------------------------------------------------- softmax */

struct softmax_args {
    uint32_t dim;
};

static int run_softmax(struct aclOpExecutor *ex)
{
    const struct softmax_args *p = ex->priv;
    const struct nn_view *x = &ex->views[0], *o = &ex->views[1];
    if (x->ndim == 0) { /* one element: softmax is 1 */
        nn_st(o, o->offset, 1.0);
        return ACLNN_SUCCESS;
    }
    int64_t len = x->dims[p->dim], sx = x->strides[p->dim], so = o->strides[p->dim];
    float *row = malloc(sizeof(float) * (size_t)(len + 1));
    if (!row) return nn_fail(ACLNN_ERR_INNER, ex->api, "out of host memory");
    /* every index with the softmax dimension held at 0 starts one row */
    int64_t outer[NN_MAX_DIMS];
    memcpy(outer, x->dims, x->ndim * sizeof *outer);
    outer[p->dim] = 1;
    const struct nn_view *vs[2] = {x, o};
    struct nn_walk w;
    for (nn_walk_init(&w, outer, x->ndim, 2, vs); !w.done; nn_walk_next(&w)) {
        float mx = -INFINITY, sum = 0.f;
        for (int64_t i = 0; i < len; i++) {
            row[i] = nn_ldf(x, w.off[0] + i * sx);
            if (row[i] > mx) mx = row[i];
        }
        for (int64_t i = 0; i < len; i++) sum += (row[i] = expf(row[i] - mx));
        for (int64_t i = 0; i < len; i++) nn_st(o, w.off[1] + i * so, row[i] / sum);
    }
    free(row);
    return ACLNN_SUCCESS;
}

NN_API aclnnStatus aclnnSoftmaxGetWorkspaceSize(const aclTensor *self, int64_t dim, aclTensor *out,
                                                uint64_t *workspaceSize, aclOpExecutor **executor)
{
    const char *api = "aclnnSoftmax";
    struct aclOpExecutor *ex = nn_executor_new(api, NN_K_SOFTMAX, run_softmax, sizeof(struct softmax_args));
    if (!ex) return nn_fail(ACLNN_ERR_INNER_CREATE_EXECUTOR, api, "out of host memory");
    struct softmax_args *p = ex->priv;
    struct nn_view *x, *o;
    int rc = nn_take(ex, api, self, "self", &x);
    if (!rc) rc = nn_take(ex, api, out, "out", &o);
    if (rc) return nn_finish(ex, rc, workspaceSize, executor);
    if (!(x->dtype == ACL_FLOAT || nn_is_float16ish(x->dtype)) || !(o->dtype == ACL_FLOAT || nn_is_float16ish(o->dtype)))
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "self (%s) and out (%s) must be FLOAT, FLOAT16 or BFLOAT16",
                     nn_dtype_name(x->dtype), nn_dtype_name(o->dtype));
    int64_t nd = x->ndim ? (int64_t)x->ndim : 1;
    if (!rc && (dim < -nd || dim >= nd))
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "dim %lld is outside self's %u dimensions", (long long)dim, x->ndim);
    if (!rc && !nn_same_shape(o, x->dims, x->ndim))
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "out's shape differs from self's");
    if (!rc) {
        p->dim = (uint32_t)(dim < 0 ? dim + nd : dim);
        double n = (double)x->numel;
        ex->flops = 4.0 * n; /* max, exp, sum, divide */
        ex->hbm_bytes = n * x->esize + n * o->esize;
        ex->builtin = "elementwise";
        ex->block_dim = nn_block_dim(NN_CORE_VECTOR, n / VECTOR_TILE);
    }
    return nn_finish(ex, rc, workspaceSize, executor);
}

NN_API aclnnStatus aclnnSoftmax(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream)
{
    return nn_execute("aclnnSoftmax", workspace, workspaceSize, executor, stream);
}
