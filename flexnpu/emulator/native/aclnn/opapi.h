/* Internals of the emulated libopapi.so: executors, tensor views, element access, checks and
 * the launch of an operator's cost on the emulated device.
 *
 * An operator's first call (aclnnXxxGetWorkspaceSize) checks its arguments, snapshots every
 * tensor into a view and computes the operator's cost; the second (aclnnXxx) checks that each
 * view's bytes lie inside one device allocation on the stream's device, computes the result
 * in the caller's thread on that memory (the emulator's "eager data" rule) and launches one
 * kernel with the cost on the stream, through libascendcl's public aclrtLaunchKernel, so the
 * FlexNPU shim gates it and the observer counts it. An operator whose tensors all have no
 * data (NULL) is timing only: same cost, no data touched.
 */
#ifndef FLEXNPU_OPAPI_H_
#define FLEXNPU_OPAPI_H_

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include "acl/acl.h"
#include "aclnn/opdev/op_errno.h"
#include "nn_objects.h"

#define NN_API __attribute__((visibility("default")))
#define NN_OP_MAX_DIMS 8 /* the most dimensions an operator takes (CANN's limit for most) */
#define NN_MAX_VIEWS 16  /* tensors one executor holds */

/* ---------------------------------------------------------------- kernels and cores */

/* The core class an operator's kernel runs on (the Ascend AI Core's cube unit, its vector
 * units, or both: a "mix" kernel). */
enum nn_core { NN_CORE_VECTOR, NN_CORE_CUBE, NN_CORE_MIX };

enum nn_kernel_id {
    NN_K_ADD, NN_K_MUL, NN_K_MATMUL, NN_K_BATCH_MATMUL, NN_K_RMS_NORM, NN_K_SOFTMAX, NN_K_SILU,
    NN_K_SWI_GLU, NN_K_ROPE, NN_K_PFA, NN_K_IFA, NN_K_COUNT
};

struct nn_kernel {
    const char *name;  /* the kernel's name on the device (status busy_by_name, the observer) */
    enum nn_core core; /* which cores it occupies */
};

extern const struct nn_kernel nn_kernels[NN_K_COUNT];

/* Cores of one device as CANN's platform config gives them (Ascend910B2.ini and
 * Ascend910_9392.ini: 24 AI Cores, each one cube and two vector units): what an operator's
 * tiling spreads its work over, so large shapes take the whole device. */
#define NN_CUBE_CORES 24
#define NN_VECTOR_CORES 48

/* blockDim of a kernel with `units` independent pieces of work on cores of a class. */
uint32_t nn_block_dim(enum nn_core core, double units);

/* ---------------------------------------------------------------- views */

/* A tensor as an operator sees it: snapshotted by the first call, so the program may
 * destroy its aclTensor before the second. */
struct nn_view {
    int32_t dtype;
    int esize;
    uint32_t ndim;
    int64_t dims[NN_MAX_DIMS];
    int64_t strides[NN_MAX_DIMS];
    int64_t offset;
    char *data;    /* device address of the storage; NULL: no data */
    int64_t numel; /* elements of the view */
    int64_t span;  /* elements from the storage's start to one past the view's last */
};

static inline int64_t nn_numel(const int64_t *dims, uint32_t ndim)
{
    int64_t n = 1;
    for (uint32_t i = 0; i < ndim; i++) n *= dims[i];
    return n;
}

/* Element offset (in elements, from data) of the view's element at idx[0..ndim). */
static inline int64_t nn_at(const struct nn_view *v, const int64_t *idx)
{
    int64_t o = v->offset;
    for (uint32_t i = 0; i < v->ndim; i++) o += idx[i] * v->strides[i];
    return o;
}

/* ---------------------------------------------------------------- element access */

static inline float nn_bf16_to_f(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t nn_f_to_bf16(float v)
{
    uint32_t bits;
    memcpy(&bits, &v, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* quiet NaN */
    bits += 0x7fff + ((bits >> 16) & 1); /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

/* v as a 16-bit floating dtype stores it (other dtypes: v): a result computed in fp32 for
 * that dtype, before it is written to an output of another dtype. */
static inline float nn_round(int32_t dtype, float v)
{
    if (dtype == ACL_FLOAT16) return (float)(_Float16)v;
    if (dtype == ACL_BF16) return nn_bf16_to_f(nn_f_to_bf16(v));
    return v;
}

/* The element at offset i as a double, whatever the dtype (int64 beyond 2^53 rounds). */
static inline double nn_ld(const struct nn_view *v, int64_t i)
{
    const char *p = v->data + i * v->esize;
    switch (v->dtype) {
    case ACL_FLOAT: { float x; memcpy(&x, p, 4); return x; }
    case ACL_FLOAT16: { _Float16 x; memcpy(&x, p, 2); return (double)x; }
    case ACL_BF16: { uint16_t x; memcpy(&x, p, 2); return nn_bf16_to_f(x); }
    case ACL_DOUBLE: { double x; memcpy(&x, p, 8); return x; }
    case ACL_INT8: return *(const int8_t *)p;
    case ACL_UINT8: return *(const uint8_t *)p;
    case ACL_BOOL: return *(const uint8_t *)p != 0;
    case ACL_INT16: { int16_t x; memcpy(&x, p, 2); return x; }
    case ACL_UINT16: { uint16_t x; memcpy(&x, p, 2); return x; }
    case ACL_INT32: { int32_t x; memcpy(&x, p, 4); return x; }
    case ACL_UINT32: { uint32_t x; memcpy(&x, p, 4); return x; }
    case ACL_INT64: { int64_t x; memcpy(&x, p, 8); return (double)x; }
    case ACL_UINT64: { uint64_t x; memcpy(&x, p, 8); return (double)x; }
    default: return 0.0;
    }
}

static inline float nn_ldf(const struct nn_view *v, int64_t i)
{
    const char *p = v->data + i * v->esize;
    switch (v->dtype) {
    case ACL_FLOAT: { float x; memcpy(&x, p, 4); return x; }
    case ACL_FLOAT16: { _Float16 x; memcpy(&x, p, 2); return (float)x; }
    case ACL_BF16: { uint16_t x; memcpy(&x, p, 2); return nn_bf16_to_f(x); }
    default: return (float)nn_ld(v, i);
    }
}

/* The element at offset i as an integer (integer and bool dtypes). */
static inline int64_t nn_ldi(const struct nn_view *v, int64_t i)
{
    const char *p = v->data + i * v->esize;
    switch (v->dtype) {
    case ACL_INT64: { int64_t x; memcpy(&x, p, 8); return x; }
    case ACL_UINT64: { uint64_t x; memcpy(&x, p, 8); return (int64_t)x; }
    case ACL_INT32: { int32_t x; memcpy(&x, p, 4); return x; }
    case ACL_UINT32: { uint32_t x; memcpy(&x, p, 4); return x; }
    case ACL_INT16: { int16_t x; memcpy(&x, p, 2); return x; }
    case ACL_UINT16: { uint16_t x; memcpy(&x, p, 2); return x; }
    case ACL_INT8: return *(const int8_t *)p;
    case ACL_UINT8: return *(const uint8_t *)p;
    case ACL_BOOL: return *(const uint8_t *)p != 0;
    default: return (int64_t)nn_ld(v, i);
    }
}

/* Stores a floating value into the element at offset i (floating dtypes; bool: v != 0). */
static inline void nn_st(const struct nn_view *v, int64_t i, double x)
{
    char *p = v->data + i * v->esize;
    switch (v->dtype) {
    case ACL_FLOAT: { float f = (float)x; memcpy(p, &f, 4); break; }
    case ACL_FLOAT16: { _Float16 h = (_Float16)(float)x; memcpy(p, &h, 2); break; }
    case ACL_BF16: { uint16_t h = nn_f_to_bf16((float)x); memcpy(p, &h, 2); break; }
    case ACL_DOUBLE: memcpy(p, &x, 8); break;
    case ACL_BOOL: *(uint8_t *)p = x != 0; break;
    default: break; /* operators never store a floating value into an integer dtype */
    }
}

/* Stores an integer into the element at offset i, wrapping to the dtype's width. */
static inline void nn_sti(const struct nn_view *v, int64_t i, int64_t x)
{
    char *p = v->data + i * v->esize;
    switch (v->dtype) {
    case ACL_INT64: case ACL_UINT64: memcpy(p, &x, 8); break;
    case ACL_INT32: case ACL_UINT32: { uint32_t y = (uint32_t)x; memcpy(p, &y, 4); break; }
    case ACL_INT16: case ACL_UINT16: { uint16_t y = (uint16_t)x; memcpy(p, &y, 2); break; }
    case ACL_INT8: case ACL_UINT8: *(uint8_t *)p = (uint8_t)x; break;
    case ACL_BOOL: *(uint8_t *)p = x != 0; break;
    default: nn_st(v, i, (double)x); break;
    }
}

/* ---------------------------------------------------------------- dtypes */

enum nn_kind { NN_KIND_NONE, NN_KIND_BOOL, NN_KIND_INT, NN_KIND_FLOAT };

enum nn_kind nn_kind(int32_t dtype);
bool nn_is_float16ish(int32_t dtype); /* ACL_FLOAT16 or ACL_BF16 */
const char *nn_dtype_name(int32_t dtype);
/* The dtype two operands promote to (CANN's type promotion, as torch's); -1 if none. */
int32_t nn_promote(int32_t a, int32_t b);
/* Whether a value of dtype `from` may be written to a tensor of dtype `to`. */
bool nn_can_cast(int32_t from, int32_t to);

/* ---------------------------------------------------------------- executors */

struct aclOpExecutor {
    struct nn_executor_head head; /* magic, repeatable (aclSetAclOpExecutorRepeatable), destroy */
    const char *api; /* the second call that runs it, e.g. "aclnnAdd" */
    bool timing_only;
    struct nn_view views[NN_MAX_VIEWS]; /* every tensor the operator touches */
    int nviews;
    int (*run)(struct aclOpExecutor *ex);  /* computes the result; ACLNN_SUCCESS or an error */
    void *priv;                            /* the operator's own arguments */
    /* cost: launched as one kernel */
    enum nn_kernel_id kernel;
    const char *builtin; /* the built-in kernel whose efficiency applies */
    double flops, hbm_bytes;
    uint32_t block_dim;
};

/* A new executor for `api` (its run call's name); NULL on out of memory. */
struct aclOpExecutor *nn_executor_new(const char *api, enum nn_kernel_id kernel,
                                      int (*run)(struct aclOpExecutor *), size_t priv_size);
void nn_executor_free(struct aclOpExecutor *ex);

/* Snapshots tensor `t` (the operator's argument `what`) into the executor. NULL `t`:
 * ACLNN_ERR_PARAM_NULLPTR; a foreign or destroyed handle, more than 8 dimensions, an unknown
 * dtype or a view outside its storage: ACLNN_ERR_PARAM_INVALID. Logs the failure. */
int nn_take(struct aclOpExecutor *ex, const char *api, const aclTensor *t, const char *what, struct nn_view **out);

/* The end of a first call: decides whether the operator is timing only (every tensor without
 * data; some with and some without is an error), hands the executor out and frees it on
 * failure. rc is what the operator's checks returned. */
int nn_finish(struct aclOpExecutor *ex, int rc, uint64_t *workspaceSize, aclOpExecutor **executor);

/* The second call: checks, computes, launches, frees (unless repeatable). */
int nn_execute(const char *api, void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
               aclrtStream stream);

/* Logs one line on stderr, sets aclGetRecentErrMsg(), returns code. */
int nn_fail(int code, const char *api, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* ---------------------------------------------------------------- shapes */

/* out = broadcast of a and b (numpy rules, aligned at the right); false if they do not. */
bool nn_broadcast(const int64_t *a, uint32_t na, const int64_t *b, uint32_t nb, int64_t *out, uint32_t *nout);
bool nn_same_shape(const struct nn_view *v, const int64_t *dims, uint32_t ndim);
void nn_shape_str(const int64_t *dims, uint32_t ndim, char *buf, size_t len);

/* Walks every index of an ndim-dimensional shape in row-major order, keeping the element
 * offsets of up to 3 views (each aligned at the right and broadcast: size-1 dimensions and
 * missing leading ones do not move). */
struct nn_walk {
    uint32_t ndim;
    int n;
    int64_t shape[NN_MAX_DIMS];
    int64_t idx[NN_MAX_DIMS];
    int64_t step[3][NN_MAX_DIMS];
    int64_t off[3];
    bool done;
};
void nn_walk_init(struct nn_walk *w, const int64_t *shape, uint32_t ndim, int n, const struct nn_view *const *views);
void nn_walk_next(struct nn_walk *w);

/* Scalars: the value of an aclScalar as a double and as an integer. */
double nn_scalar_d(const struct aclScalar *s);
int64_t nn_scalar_i(const struct aclScalar *s);
bool nn_scalar_ok(const aclScalar *s);

#endif /* FLEXNPU_OPAPI_H_ */
