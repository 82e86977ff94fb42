/* The emulated libopapi.so, common part: kernels, executors, views, checks and the launch of
 * an operator's cost (see opapi.h for the flow). */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "emu_ext.h"
#include "emu_kernels.h"
#include "opapi.h"

/* The operators' kernels: name on the device and core class. The core class and the
 * blockDim each operator computes (nn_block_dim) place its kernel on the device's cores (the
 * contexts mode); the kernel library below binds every name to the `synthetic` built-in with
 * its class. */
const struct nn_kernel nn_kernels[NN_K_COUNT] = {
    [NN_K_ADD] = {"Add", NN_CORE_VECTOR},
    [NN_K_MUL] = {"Mul", NN_CORE_VECTOR},
    [NN_K_MATMUL] = {"MatMulV2", NN_CORE_CUBE},
    [NN_K_BATCH_MATMUL] = {"BatchMatMulV2", NN_CORE_CUBE},
    [NN_K_RMS_NORM] = {"RmsNorm", NN_CORE_VECTOR},
    [NN_K_SOFTMAX] = {"SoftmaxV2", NN_CORE_VECTOR},
    [NN_K_SILU] = {"Silu", NN_CORE_VECTOR},
    [NN_K_SWI_GLU] = {"SwiGlu", NN_CORE_VECTOR},
    [NN_K_ROPE] = {"ApplyRotaryPosEmb", NN_CORE_VECTOR},
    [NN_K_PFA] = {"PromptFlashAttention", NN_CORE_MIX},
    [NN_K_IFA] = {"IncreFlashAttention", NN_CORE_MIX},
};

uint32_t nn_block_dim(enum nn_core core, double units)
{
    double cap = core == NN_CORE_VECTOR ? NN_VECTOR_CORES : NN_CUBE_CORES; /* mix: counted in cube cores */
    if (!(units >= 1)) return 1;
    return (uint32_t)(units < cap ? ceil(units) : cap);
}

/* ---------------------------------------------------------------- errors */

int nn_fail(int code, const char *api, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(msg, sizeof msg, "%s: ", api);
    vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, ap);
    va_end(ap);
    fprintf(stderr, "libopapi (FlexNPU emulator): %s (%d)\n", msg, code);
    flexnpuEmuSetErrMsg(msg);
    return code;
}

/* ---------------------------------------------------------------- dtypes */

enum nn_kind nn_kind(int32_t dtype)
{
    switch (dtype) {
    case ACL_BOOL: return NN_KIND_BOOL;
    case ACL_INT8: case ACL_UINT8: case ACL_INT16: case ACL_INT32: case ACL_INT64: return NN_KIND_INT;
    case ACL_FLOAT: case ACL_FLOAT16: case ACL_BF16: case ACL_DOUBLE: return NN_KIND_FLOAT;
    default: return NN_KIND_NONE;
    }
}

bool nn_is_float16ish(int32_t dtype) { return dtype == ACL_FLOAT16 || dtype == ACL_BF16; }

const char *nn_dtype_name(int32_t dtype)
{
    switch (dtype) {
    case ACL_FLOAT: return "FLOAT";
    case ACL_FLOAT16: return "FLOAT16";
    case ACL_BF16: return "BFLOAT16";
    case ACL_DOUBLE: return "DOUBLE";
    case ACL_INT8: return "INT8";
    case ACL_UINT8: return "UINT8";
    case ACL_INT16: return "INT16";
    case ACL_UINT16: return "UINT16";
    case ACL_INT32: return "INT32";
    case ACL_UINT32: return "UINT32";
    case ACL_INT64: return "INT64";
    case ACL_UINT64: return "UINT64";
    case ACL_BOOL: return "BOOL";
    default: return "an unsupported dtype";
    }
}

/* Rank of a dtype in the promotion lattice bool < integers < floating types. */
static int int_rank(int32_t dt)
{
    switch (dt) {
    case ACL_INT8: case ACL_UINT8: return 1;
    case ACL_INT16: return 2;
    case ACL_INT32: return 3;
    case ACL_INT64: return 4;
    default: return 0;
    }
}

static int float_rank(int32_t dt)
{
    switch (dt) {
    case ACL_FLOAT16: case ACL_BF16: return 1;
    case ACL_FLOAT: return 2;
    case ACL_DOUBLE: return 3;
    default: return 0;
    }
}

int32_t nn_promote(int32_t a, int32_t b)
{
    enum nn_kind ka = nn_kind(a), kb = nn_kind(b);
    if (ka == NN_KIND_NONE || kb == NN_KIND_NONE) return -1;
    if (a == b) return a;
    if (ka == NN_KIND_BOOL) return b;
    if (kb == NN_KIND_BOOL) return a;
    if (ka == NN_KIND_FLOAT && kb == NN_KIND_FLOAT) {
        int ra = float_rank(a), rb = float_rank(b);
        if (ra == rb) return ACL_FLOAT; /* float16 with bfloat16 */
        return ra > rb ? a : b;
    }
    if (ka == NN_KIND_FLOAT) return a;
    if (kb == NN_KIND_FLOAT) return b;
    /* two integers: int8 with uint8 meet in int16, otherwise the wider */
    int ra = int_rank(a), rb = int_rank(b);
    if (ra == rb) return ACL_INT16;
    return ra > rb ? a : b;
}

bool nn_can_cast(int32_t from, int32_t to)
{
    enum nn_kind kf = nn_kind(from), kt = nn_kind(to);
    if (kf == NN_KIND_NONE || kt == NN_KIND_NONE) return false;
    if (kf == NN_KIND_FLOAT && kt != NN_KIND_FLOAT) return false; /* no float to integer or bool */
    if (kf == NN_KIND_INT && kt == NN_KIND_BOOL) return false;
    return true;
}

/* ---------------------------------------------------------------- scalars */

bool nn_scalar_ok(const aclScalar *s) { return s && s->magic == NN_SCALAR_MAGIC; }

double nn_scalar_d(const struct aclScalar *s)
{
    struct nn_view v = {.dtype = s->dtype, .esize = nn_dtype_size(s->dtype), .data = (char *)s->value};
    return nn_ld(&v, 0);
}

int64_t nn_scalar_i(const struct aclScalar *s)
{
    struct nn_view v = {.dtype = s->dtype, .esize = nn_dtype_size(s->dtype), .data = (char *)s->value};
    return nn_kind(s->dtype) == NN_KIND_FLOAT ? (int64_t)nn_ld(&v, 0) : nn_ldi(&v, 0);
}

/* ---------------------------------------------------------------- shapes */

bool nn_broadcast(const int64_t *a, uint32_t na, const int64_t *b, uint32_t nb, int64_t *out, uint32_t *nout)
{
    uint32_t n = na > nb ? na : nb;
    for (uint32_t i = 0; i < n; i++) {
        int64_t da = i < na ? a[na - 1 - i] : 1, db = i < nb ? b[nb - 1 - i] : 1;
        if (da != db && da != 1 && db != 1) return false;
        out[n - 1 - i] = da == 1 ? db : da;
    }
    *nout = n;
    return true;
}

bool nn_same_shape(const struct nn_view *v, const int64_t *dims, uint32_t ndim)
{
    if (v->ndim != ndim) return false;
    for (uint32_t i = 0; i < ndim; i++)
        if (v->dims[i] != dims[i]) return false;
    return true;
}

void nn_shape_str(const int64_t *dims, uint32_t ndim, char *buf, size_t len)
{
    size_t n = (size_t)snprintf(buf, len, "[");
    for (uint32_t i = 0; i < ndim && n < len; i++)
        n += (size_t)snprintf(buf + n, len - n, i ? ",%lld" : "%lld", (long long)dims[i]);
    if (n < len) snprintf(buf + n, len - n, "]");
}

void nn_walk_init(struct nn_walk *w, const int64_t *shape, uint32_t ndim, int n, const struct nn_view *const *views)
{
    memset(w, 0, sizeof *w);
    w->ndim = ndim;
    w->n = n;
    memcpy(w->shape, shape, ndim * sizeof *shape);
    w->done = nn_numel(shape, ndim) == 0;
    for (int k = 0; k < n; k++) {
        const struct nn_view *v = views[k];
        w->off[k] = v->offset;
        for (uint32_t i = 0; i < ndim; i++) {
            int64_t j = (int64_t)i - (int64_t)(ndim - v->ndim); /* the view's dimension aligned with i */
            w->step[k][i] = (j >= 0 && v->dims[j] != 1) ? v->strides[j] : 0;
        }
    }
}

void nn_walk_next(struct nn_walk *w)
{
    for (uint32_t i = w->ndim; i-- > 0;) {
        for (int k = 0; k < w->n; k++) w->off[k] += w->step[k][i];
        if (++w->idx[i] < w->shape[i]) return;
        for (int k = 0; k < w->n; k++) w->off[k] -= w->step[k][i] * w->shape[i];
        w->idx[i] = 0;
    }
    w->done = true;
}

/* ---------------------------------------------------------------- executors */

struct aclOpExecutor *nn_executor_new(const char *api, enum nn_kernel_id kernel,
                                      int (*run)(struct aclOpExecutor *), size_t priv_size)
{
    struct aclOpExecutor *ex = calloc(1, sizeof *ex);
    if (!ex) return NULL;
    if (priv_size && !(ex->priv = calloc(1, priv_size))) {
        free(ex);
        return NULL;
    }
    ex->api = api;
    ex->kernel = kernel;
    ex->run = run;
    ex->block_dim = 1;
    ex->head.destroy = nn_executor_free;
    ex->head.magic = NN_EXECUTOR_MAGIC;
    return ex;
}

/* Executors freed lately, kept (dead, their magic cleared) before their memory goes back to
 * malloc: a program that runs a one-shot executor twice, or destroys one after its run, then
 * gets ACLNN_ERR_PARAM_INVALID instead of a double free, for the next NN_EXECUTOR_QUARANTINE
 * executors it makes. */
#define NN_EXECUTOR_QUARANTINE 256
static struct aclOpExecutor *g_dead[NN_EXECUTOR_QUARANTINE];
static unsigned g_dead_next;
static pthread_mutex_t g_dead_lock = PTHREAD_MUTEX_INITIALIZER;

void nn_executor_free(struct aclOpExecutor *ex)
{
    if (!ex) return;
    ex->head.magic = 0;
    free(ex->priv);
    ex->priv = NULL;
    pthread_mutex_lock(&g_dead_lock);
    struct aclOpExecutor *old = g_dead[g_dead_next];
    g_dead[g_dead_next] = ex;
    g_dead_next = (g_dead_next + 1) % NN_EXECUTOR_QUARANTINE;
    pthread_mutex_unlock(&g_dead_lock);
    free(old);
}

int nn_take(struct aclOpExecutor *ex, const char *api, const aclTensor *t, const char *what, struct nn_view **out)
{
    if (!t) return nn_fail(ACLNN_ERR_PARAM_NULLPTR, api, "%s is NULL", what);
    if (t->magic != NN_TENSOR_MAGIC) return nn_fail(ACLNN_ERR_PARAM_INVALID, api, "%s is not an aclTensor", what);
    if (t->ndim > NN_OP_MAX_DIMS)
        return nn_fail(ACLNN_ERR_PARAM_INVALID, api, "%s has %u dimensions (at most %d)", what, t->ndim, NN_OP_MAX_DIMS);
    int e = nn_dtype_size(t->dtype);
    if (!e || nn_kind(t->dtype) == NN_KIND_NONE)
        return nn_fail(ACLNN_ERR_PARAM_INVALID, api, "%s has dtype %d, which the emulator does not support", what,
                       t->dtype);
    if (ex->nviews == NN_MAX_VIEWS) return nn_fail(ACLNN_ERR_INNER, api, "too many tensors");
    struct nn_view *v = &ex->views[ex->nviews];
    memset(v, 0, sizeof *v);
    v->dtype = t->dtype;
    v->esize = e;
    v->ndim = t->ndim;
    memcpy(v->dims, t->dims, t->ndim * sizeof *t->dims);
    memcpy(v->strides, t->strides, t->ndim * sizeof *t->strides);
    v->offset = t->offset;
    v->data = t->data;
    int64_t numel = 1; /* sizes are kept far from int64 overflow */
    for (uint32_t i = 0; i < t->ndim; i++) {
        if (t->dims[i] && numel > (INT64_MAX / 16) / t->dims[i])
            return nn_fail(ACLNN_ERR_PARAM_INVALID, api, "%s has too many elements", what);
        numel *= t->dims[i];
    }
    v->numel = numel;
    if (v->numel > 0) {
        /* the last element a view touches; strides are non-negative (aclCreateTensor) */
        int64_t last = t->offset;
        for (uint32_t i = 0; i < t->ndim; i++) {
            if (t->dims[i] > 1 && t->strides[i] > (INT64_MAX / 4 - last) / (t->dims[i] - 1))
                return nn_fail(ACLNN_ERR_PARAM_INVALID, api, "%s's strides overflow", what);
            last += (t->dims[i] - 1) * t->strides[i];
        }
        v->span = last + 1;
        int64_t storage = 1; /* saturated: the view only needs to fit in it */
        for (uint32_t i = 0; i < t->nstorage; i++)
            storage = t->storage[i] && storage > (INT64_MAX / 16) / t->storage[i] ? INT64_MAX / 16
                                                                                : storage * t->storage[i];
        if (v->span > storage)
            return nn_fail(ACLNN_ERR_PARAM_INVALID, api,
                           "%s's view reaches element %lld of a storage of %lld elements", what,
                           (long long)last, (long long)storage);
        if (v->span > INT64_MAX / 16)
            return nn_fail(ACLNN_ERR_PARAM_INVALID, api, "%s is too large", what);
    }
    ex->nviews++;
    *out = v;
    return ACLNN_SUCCESS;
}

int nn_finish(struct aclOpExecutor *ex, int rc, uint64_t *workspaceSize, aclOpExecutor **executor)
{
    if (!rc && (!workspaceSize || !executor))
        rc = nn_fail(ACLNN_ERR_PARAM_NULLPTR, ex->api, "workspaceSize or executor is NULL");
    if (!rc) {
        int with = 0, without = 0;
        for (int i = 0; i < ex->nviews; i++) {
            if (ex->views[i].numel == 0) continue; /* an empty tensor touches nothing */
            if (ex->views[i].data) with++;
            else without++;
        }
        if (with && without)
            rc = nn_fail(ACLNN_ERR_PARAM_INVALID, ex->api,
                         "%d tensors have data and %d have none (NULL data everywhere: timing only)", with,
                         without);
        ex->timing_only = with == 0;
    }
    if (rc) {
        nn_executor_free(ex);
        return rc;
    }
    *workspaceSize = 0; /* the emulated operators need no device scratch memory */
    *executor = ex;
    return ACLNN_SUCCESS;
}

/* ---------------------------------------------------------------- the launch */

static pthread_mutex_t g_lib_lock = PTHREAD_MUTEX_INITIALIZER;
static aclrtFuncHandle g_funcs[NN_K_COUNT];
static bool g_loaded;

/* The kernel library's core word per class (docs/emulator.md, "Kernel library files"). */
static const char *const core_word[] = {[NN_CORE_VECTOR] = "vector", [NN_CORE_CUBE] = "cube", [NN_CORE_MIX] = "mix"};

/* Loads the operators' kernel library (text, built from nn_kernels) once per process. */
static int load_kernels(const char *api)
{
    pthread_mutex_lock(&g_lib_lock);
    int rc = ACL_SUCCESS;
    if (!g_loaded) {
        char text[4096];
        size_t n = (size_t)snprintf(text, sizeof text, "flexnpu-kernels 1\n# libopapi.so's operators\n");
        for (int k = 0; k < NN_K_COUNT; k++)
            n += (size_t)snprintf(text + n, sizeof text - n, "kernel %s synthetic %s\n", nn_kernels[k].name,
                                  core_word[nn_kernels[k].core]);
        aclrtBinHandle bin = NULL;
        rc = aclrtBinaryLoadFromData(text, n, NULL, &bin);
        for (int k = 0; !rc && k < NN_K_COUNT; k++) rc = aclrtBinaryGetFunction(bin, nn_kernels[k].name, &g_funcs[k]);
        if (!rc) g_loaded = true;
        else if (bin) aclrtBinaryUnLoad(bin);
    }
    pthread_mutex_unlock(&g_lib_lock);
    if (rc) {
        const char *why = aclGetRecentErrMsg();
        return nn_fail(ACLNN_ERR_RUNTIME_ERROR, api, "cannot load the operators' kernels: AscendCL error %d (%s)", rc,
                       why ? why : "no reason given");
    }
    return ACLNN_SUCCESS;
}

static int runtime_fail(const char *api, const char *what, aclError rc)
{
    const char *why = aclGetRecentErrMsg();
    char copy[200];
    snprintf(copy, sizeof copy, "%s", why ? why : "no reason given");
    return nn_fail(ACLNN_ERR_RUNTIME_ERROR, api, "%s: AscendCL error %d (%s)", what, rc, copy);
}

/* Launches the executor's cost as its kernel on the stream: a `synthetic` kernel whose work
 * is scaled so that the device's efficiency for the equivalent built-in applies to it. */
static int launch(struct aclOpExecutor *ex, aclrtStream stream)
{
    if (ex->flops <= 0 && ex->hbm_bytes <= 0) return ACLNN_SUCCESS; /* empty tensors: no kernel, as on CANN */
    int rc = load_kernels(ex->api);
    if (rc) return rc;
    double fb = 1, hb = 1, fs = 1, hs = 1;
    aclError e = flexnpuEmuKernelEfficiency(stream, ex->builtin, &fb, &hb);
    if (!e) e = flexnpuEmuKernelEfficiency(stream, "synthetic", &fs, &hs);
    if (e) return runtime_fail(ex->api, "the device's efficiency table", e);
    struct emu_args_synthetic args = {.flops = ex->flops / fb * fs, .hbm_bytes = ex->hbm_bytes / hb * hs};
    e = aclrtLaunchKernel(g_funcs[ex->kernel], ex->block_dim, &args, sizeof args, stream);
    if (e) return runtime_fail(ex->api, "launching its kernel", e);
    return ACLNN_SUCCESS;
}

int nn_execute(const char *api, void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
               aclrtStream stream)
{
    (void)workspace;
    (void)workspaceSize; /* every operator asked for 0 bytes */
    struct aclOpExecutor *ex = executor;
    if (!ex) return nn_fail(ACLNN_ERR_PARAM_NULLPTR, api, "executor is NULL");
    if (ex->head.magic != NN_EXECUTOR_MAGIC)
        return nn_fail(ACLNN_ERR_PARAM_INVALID, api, "executor is not a live aclOpExecutor (already run?)");
    if (strcmp(ex->api, api) != 0)
        return nn_fail(ACLNN_ERR_PARAM_INVALID, api, "executor was made by %sGetWorkspaceSize", ex->api);
    aclError e = flexnpuEmuCheckRange(stream, NULL, 0);
    int rc = ACLNN_SUCCESS;
    if (e) rc = runtime_fail(api, "the stream", e);
    for (int i = 0; !rc && !ex->timing_only && i < ex->nviews; i++) {
        const struct nn_view *v = &ex->views[i];
        if (v->numel == 0) continue;
        e = flexnpuEmuCheckRange(stream, v->data, (size_t)(v->span * v->esize));
        if (e)
            rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api,
                         "tensor %d (%p, %lld bytes) is not inside one device allocation on the stream's device",
                         i, (void *)v->data, (long long)(v->span * v->esize));
    }
    if (!rc && !ex->timing_only) rc = ex->run(ex);
    if (!rc) rc = launch(ex, stream);
    if (!ex->head.repeatable) nn_executor_free(ex);
    return rc;
}
