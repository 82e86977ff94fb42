/* Element-wise operators: aclnnAdd, aclnnInplaceAdd, aclnnMul, aclnnInplaceMul, aclnnSilu,
 * aclnnSwiGlu. Arguments, dtypes and errors as CANN documents them (ops-math math/add,
 * math/mul; ops-nn activation/swish, activation/swi_glu); cost and efficiency as the
 * `elementwise` built-in (docs/emulator.md). */
#include <stdio.h>
#include <stdlib.h>

#include "aclnnop/aclnn_add.h"
#include "aclnnop/aclnn_mul.h"
#include "aclnnop/aclnn_silu.h"
#include "aclnnop/aclnn_swi_glu.h"
#include "opapi.h"

/* Elements one vector core takes per tile: an operator with more spreads over more cores. */
#define VECTOR_TILE 4096.0

/* Cost of an element-wise operator over its views: reads and writes every element once. */
static void elementwise_cost(struct aclOpExecutor *ex, double flops_per_out, int64_t out_numel)
{
    double bytes = 0;
    for (int i = 0; i < ex->nviews; i++) bytes += (double)ex->views[i].numel * ex->views[i].esize;
    ex->flops = flops_per_out * (double)out_numel;
    ex->hbm_bytes = bytes;
    ex->builtin = "elementwise";
    ex->block_dim = nn_block_dim(NN_CORE_VECTOR, (double)out_numel / VECTOR_TILE);
}

/* ---------------------------------------------------------------- add and mul */

enum { OP_ADD, OP_MUL };

struct binary_args {
    int op;
    int32_t ctype; /* the dtype self and other promote to: the arithmetic's */
    double alpha_d;
    int64_t alpha_i;
    uint32_t ndim;
    int64_t shape[NN_MAX_DIMS];
};

static int run_binary(struct aclOpExecutor *ex)
{
    const struct binary_args *p = ex->priv;
    const struct nn_view *a = &ex->views[0], *b = &ex->views[1], *o = &ex->views[ex->nviews - 1];
    const struct nn_view *vs[3] = {o, a, b};
    struct nn_walk w;
    nn_walk_init(&w, p->shape, p->ndim, 3, vs);
    enum nn_kind kind = nn_kind(p->ctype);
    bool add = p->op == OP_ADD;
    for (; !w.done; nn_walk_next(&w)) {
        if (kind == NN_KIND_FLOAT && p->ctype != ACL_DOUBLE) {
            float x = nn_ldf(a, w.off[1]), y = nn_ldf(b, w.off[2]);
            nn_st(o, w.off[0], nn_round(p->ctype, add ? x + (float)p->alpha_d * y : x * y));
        } else if (kind == NN_KIND_FLOAT) {
            double x = nn_ld(a, w.off[1]), y = nn_ld(b, w.off[2]);
            nn_st(o, w.off[0], add ? x + p->alpha_d * y : x * y);
        } else if (kind == NN_KIND_INT) { /* two's complement wrap, as the device's integers */
            uint64_t x = (uint64_t)nn_ldi(a, w.off[1]), y = (uint64_t)nn_ldi(b, w.off[2]);
            nn_sti(o, w.off[0], (int64_t)(add ? x + (uint64_t)p->alpha_i * y : x * y));
        } else {
            int64_t x = nn_ldi(a, w.off[1]), y = nn_ldi(b, w.off[2]);
            nn_sti(o, w.off[0], add ? (x || (p->alpha_i && y)) : (x && y));
        }
    }
    return ACLNN_SUCCESS;
}

/* The first call of Add/Mul and their in-place forms (out NULL: self is the output). */
static int binary_prepare(const char *api, int op, const aclTensor *self, const aclTensor *other,
                          const aclScalar *alpha, aclTensor *out, uint64_t *workspaceSize, aclOpExecutor **executor)
{
    struct aclOpExecutor *ex = nn_executor_new(api, op == OP_ADD ? NN_K_ADD : NN_K_MUL, run_binary,
                                               sizeof(struct binary_args));
    if (!ex) return nn_fail(ACLNN_ERR_INNER_CREATE_EXECUTOR, api, "out of host memory");
    struct binary_args *p = ex->priv;
    p->op = op;
    struct nn_view *a, *b, *o;
    bool inplace = out == NULL;
    const char *oname = inplace ? "selfRef" : "out";
    int rc = nn_take(ex, api, self, inplace ? "selfRef" : "self", &a);
    if (!rc) rc = nn_take(ex, api, other, "other", &b);
    if (!rc && op == OP_ADD && !alpha) rc = nn_fail(ACLNN_ERR_PARAM_NULLPTR, api, "alpha is NULL");
    if (!rc && op == OP_ADD && !nn_scalar_ok(alpha)) rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "alpha is not an aclScalar");
    if (!rc && inplace) { /* selfRef is also the output: read and written, as its traffic is */
        o = &ex->views[ex->nviews++];
        *o = *a;
    } else if (!rc) {
        rc = nn_take(ex, api, out, "out", &o);
    }
    if (rc) return nn_finish(ex, rc, workspaceSize, executor);
    if ((p->ctype = nn_promote(a->dtype, b->dtype)) < 0)
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "self (%s) and other (%s) have no common dtype",
                     nn_dtype_name(a->dtype), nn_dtype_name(b->dtype));
    if (!rc && !nn_can_cast(p->ctype, o->dtype))
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "the result (%s) cannot be written to %s (%s)",
                     nn_dtype_name(p->ctype), oname, nn_dtype_name(o->dtype));
    if (!rc && op == OP_ADD) {
        if (!nn_can_cast(alpha->dtype, p->ctype))
            rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "alpha (%s) cannot be converted to %s",
                         nn_dtype_name(alpha->dtype), nn_dtype_name(p->ctype));
        p->alpha_d = nn_scalar_d(alpha);
        p->alpha_i = nn_scalar_i(alpha);
    }
    if (!rc && !nn_broadcast(a->dims, a->ndim, b->dims, b->ndim, p->shape, &p->ndim)) {
        char s1[96], s2[96];
        nn_shape_str(a->dims, a->ndim, s1, sizeof s1);
        nn_shape_str(b->dims, b->ndim, s2, sizeof s2);
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "shapes %s and %s do not broadcast", s1, s2);
    }
    if (!rc && !nn_same_shape(o, p->shape, p->ndim)) {
        char s1[96], s2[96];
        nn_shape_str(o->dims, o->ndim, s1, sizeof s1);
        nn_shape_str(p->shape, p->ndim, s2, sizeof s2);
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "%s has shape %s, the broadcast shape is %s", oname, s1, s2);
    }
    if (!rc) elementwise_cost(ex, 1.0, nn_numel(p->shape, p->ndim));
    return nn_finish(ex, rc, workspaceSize, executor);
}

NN_API aclnnStatus aclnnAddGetWorkspaceSize(const aclTensor *self, const aclTensor *other, const aclScalar *alpha,
                                            aclTensor *out, uint64_t *workspaceSize, aclOpExecutor **executor)
{
    if (!out) return nn_fail(ACLNN_ERR_PARAM_NULLPTR, "aclnnAdd", "out is NULL");
    return binary_prepare("aclnnAdd", OP_ADD, self, other, alpha, out, workspaceSize, executor);
}

NN_API aclnnStatus aclnnAdd(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream)
{
    return nn_execute("aclnnAdd", workspace, workspaceSize, executor, stream);
}

NN_API aclnnStatus aclnnInplaceAddGetWorkspaceSize(const aclTensor *selfRef, const aclTensor *other,
                                                   const aclScalar *alpha, uint64_t *workspaceSize,
                                                   aclOpExecutor **executor)
{
    return binary_prepare("aclnnInplaceAdd", OP_ADD, selfRef, other, alpha, NULL, workspaceSize, executor);
}

NN_API aclnnStatus aclnnInplaceAdd(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                   aclrtStream stream)
{
    return nn_execute("aclnnInplaceAdd", workspace, workspaceSize, executor, stream);
}

NN_API aclnnStatus aclnnMulGetWorkspaceSize(const aclTensor *self, const aclTensor *other, aclTensor *out,
                                            uint64_t *workspaceSize, aclOpExecutor **executor)
{
    if (!out) return nn_fail(ACLNN_ERR_PARAM_NULLPTR, "aclnnMul", "out is NULL");
    return binary_prepare("aclnnMul", OP_MUL, self, other, NULL, out, workspaceSize, executor);
}

NN_API aclnnStatus aclnnMul(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream)
{
    return nn_execute("aclnnMul", workspace, workspaceSize, executor, stream);
}

NN_API aclnnStatus aclnnInplaceMulGetWorkspaceSize(aclTensor *selfRef, const aclTensor *other,
                                                   uint64_t *workspaceSize, aclOpExecutor **executor)
{
    return binary_prepare("aclnnInplaceMul", OP_MUL, selfRef, other, NULL, NULL, workspaceSize, executor);
}

NN_API aclnnStatus aclnnInplaceMul(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                   aclrtStream stream)
{
    return nn_execute("aclnnInplaceMul", workspace, workspaceSize, executor, stream);
}

/* ---------------------------------------------------------------- silu and swiglu */

static int check_float_dtype(const char *api, const struct nn_view *v, const char *what, bool allow_double)
{
    if (v->dtype == ACL_FLOAT || nn_is_float16ish(v->dtype) || (allow_double && v->dtype == ACL_DOUBLE))
        return ACLNN_SUCCESS;
    return nn_fail(ACLNN_ERR_PARAM_INVALID, api, "%s has dtype %s (FLOAT, FLOAT16 or BFLOAT16 expected)", what,
                   nn_dtype_name(v->dtype));
}

static float silu(float x) { return x / (1.0f + expf(-x)); }

static int run_silu(struct aclOpExecutor *ex)
{
    const struct nn_view *x = &ex->views[0], *o = &ex->views[1];
    const struct nn_view *vs[2] = {o, x};
    struct nn_walk w;
    nn_walk_init(&w, x->dims, x->ndim, 2, vs);
    for (; !w.done; nn_walk_next(&w)) nn_st(o, w.off[0], silu(nn_ldf(x, w.off[1])));
    return ACLNN_SUCCESS;
}

NN_API aclnnStatus aclnnSiluGetWorkspaceSize(const aclTensor *self, aclTensor *out, uint64_t *workspaceSize,
                                             aclOpExecutor **executor)
{
    const char *api = "aclnnSilu";
    struct aclOpExecutor *ex = nn_executor_new(api, NN_K_SILU, run_silu, 0);
    if (!ex) return nn_fail(ACLNN_ERR_INNER_CREATE_EXECUTOR, api, "out of host memory");
    struct nn_view *x, *o;
    int rc = nn_take(ex, api, self, "self", &x);
    if (!rc) rc = nn_take(ex, api, out, "out", &o);
    if (!rc) rc = check_float_dtype(api, x, "self", false);
    if (!rc) rc = check_float_dtype(api, o, "out", false);
    if (!rc && !nn_same_shape(o, x->dims, x->ndim))
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "out's shape differs from self's");
    if (!rc) elementwise_cost(ex, 3.0, x->numel); /* exp, add, divide */
    return nn_finish(ex, rc, workspaceSize, executor);
}

NN_API aclnnStatus aclnnSilu(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream)
{
    return nn_execute("aclnnSilu", workspace, workspaceSize, executor, stream);
}

struct swiglu_args {
    uint32_t dim;
};

static int run_swiglu(struct aclOpExecutor *ex)
{
    const struct swiglu_args *p = ex->priv;
    const struct nn_view *x = &ex->views[0], *o = &ex->views[1];
    /* walk the output; the gate A sits at the same index of x, the value B half a dim on */
    const struct nn_view *vs[2] = {o, x};
    struct nn_walk w;
    nn_walk_init(&w, o->dims, o->ndim, 2, vs);
    int64_t half = o->dims[p->dim] * x->strides[p->dim];
    for (; !w.done; nn_walk_next(&w))
        nn_st(o, w.off[0], silu(nn_ldf(x, w.off[1])) * nn_ldf(x, w.off[1] + half));
    return ACLNN_SUCCESS;
}

NN_API aclnnStatus aclnnSwiGluGetWorkspaceSize(const aclTensor *x, int64_t dim, const aclTensor *out,
                                               uint64_t *workspaceSize, aclOpExecutor **executor)
{
    const char *api = "aclnnSwiGlu";
    struct aclOpExecutor *ex = nn_executor_new(api, NN_K_SWI_GLU, run_swiglu, sizeof(struct swiglu_args));
    if (!ex) return nn_fail(ACLNN_ERR_INNER_CREATE_EXECUTOR, api, "out of host memory");
    struct swiglu_args *p = ex->priv;
    struct nn_view *vx, *o;
    int rc = nn_take(ex, api, x, "x", &vx);
    if (!rc) rc = nn_take(ex, api, out, "out", &o);
    if (!rc) rc = check_float_dtype(api, vx, "x", false);
    if (!rc && o->dtype != vx->dtype)
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "out (%s) must have x's dtype (%s)", nn_dtype_name(o->dtype),
                     nn_dtype_name(vx->dtype));
    int64_t nd = rc ? 0 : (int64_t)vx->ndim;
    if (!rc && (nd == 0 || dim < -nd || dim >= nd))
        rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "dim %lld is outside x's %lld dimensions", (long long)dim,
                     (long long)nd);
    if (!rc) {
        p->dim = (uint32_t)(dim < 0 ? dim + nd : dim);
        int64_t want[NN_MAX_DIMS];
        memcpy(want, vx->dims, vx->ndim * sizeof *want);
        if (vx->dims[p->dim] % 2)
            rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "x's dimension %u (%lld) is odd", p->dim,
                         (long long)vx->dims[p->dim]);
        want[p->dim] /= 2;
        if (!rc && !nn_same_shape(o, want, vx->ndim)) {
            char s[96];
            nn_shape_str(want, vx->ndim, s, sizeof s);
            rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, "out must have shape %s", s);
        }
    }
    if (!rc) elementwise_cost(ex, 4.0, o->numel); /* silu, then the product: as silu_mul */
    return nn_finish(ex, rc, workspaceSize, executor);
}

NN_API aclnnStatus aclnnSwiGlu(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream)
{
    return nn_execute("aclnnSwiGlu", workspace, workspaceSize, executor, stream);
}
