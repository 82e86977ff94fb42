/* The aclnn operators in the executor (fwd_aclnn.h has the records).
 *
 * The operator libraries are opened at the first operator a client sends: libopapi.so and
 * libnnopbase.so beside the libascendcl.so the executor runs on (the emulator's), else the
 * ones on the library path (CANN's). FWD_ACLNN_MAKE rebuilds the arguments with the real
 * object calls and makes the operator's executor with the real first call, kept under the
 * client's handle with the objects it was made from (freed with it). FWD_ACLNN_RUN checks
 * that every tensor with data lies in device memory this client may name (its allocations
 * and the imports it was allowed: the executor's one context holds every client's memory),
 * asks the scheduler, then runs the real second call on the client's stream.
 *
 * A record is untrusted input: every item is read within the bytes the record carries, every
 * count bounded, every handle looked up in this client's own table.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "aclnn/aclnn_base.h"
#include "aclnn/opdev/op_errno.h"
#include "executor.h"
#include "fwd_aclnn.h"

struct exn_obj { /* an object rebuilt from a record, destroyed with its executor */
    uint32_t tag;
    void *p;
};

struct exn_dec {
    struct ex_client *c;
    const uint8_t *p;
    size_t left;
    bool bad;
    char why[120];
    struct exn_obj *objs;
    int nobjs, capobjs;
    struct { uint64_t p, n; } *rng; /* tensors with data: checked at each run */
    int nrng, caprng;
};

static aclTensor *exn_get_tensor(struct exn_dec *d);
static aclTensorList *exn_get_tensor_list(struct exn_dec *d);
static aclScalar *exn_get_scalar(struct exn_dec *d);
static aclScalarList *exn_get_scalar_list(struct exn_dec *d) __attribute__((unused));
static aclIntArray *exn_get_int_array(struct exn_dec *d);
static aclFloatArray *exn_get_float_array(struct exn_dec *d) __attribute__((unused));
static aclBoolArray *exn_get_bool_array(struct exn_dec *d) __attribute__((unused));
static int64_t exn_get_int(struct exn_dec *d);
static double exn_get_double(struct exn_dec *d);
static char *exn_get_string(struct exn_dec *d);

#define FWN_GEN_EXEC
#include "fwd_aclnn_gen.h" /* the operators' callers, generated from the aclnnop headers */

struct exn_exec {
    aclOpExecutor *ex; /* NULL: free */
    int op;
    bool repeatable;
    struct exn_obj *objs;
    int nobjs;
    struct { uint64_t p, n; } *rng;
    int nrng;
};

struct ex_aclnn_state {
    struct exn_exec *ex; /* by handle index */
    int cap;
};

/* ---------------------------------------------------------------- the libraries */

static struct {
    void *gws[FWN_NUM_OPS], *run[FWN_NUM_OPS];
    aclTensor *(*create_tensor)(const int64_t *, uint64_t, aclDataType, const int64_t *, int64_t, aclFormat,
                                const int64_t *, uint64_t, void *);
    aclScalar *(*create_scalar)(void *, aclDataType);
    aclIntArray *(*create_int_array)(const int64_t *, uint64_t);
    aclFloatArray *(*create_float_array)(const float *, uint64_t);
    aclBoolArray *(*create_bool_array)(const bool *, uint64_t);
    aclTensorList *(*create_tensor_list)(const aclTensor *const *, uint64_t);
    aclScalarList *(*create_scalar_list)(const aclScalar *const *, uint64_t);
    aclnnStatus (*destroy[FWN_STRING + 1])(const void *);
    aclnnStatus (*repeatable)(aclOpExecutor *);
    aclnnStatus (*destroy_executor)(aclOpExecutor *);
    char why[300]; /* empty: loaded */
} L;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void *open_beside_runtime(const char *name)
{
    Dl_info info;
    char path[4096];
    if (dladdr((void *)aclInit, &info) && info.dli_fname) {
        const char *slash = strrchr(info.dli_fname, '/');
        if (slash) {
            snprintf(path, sizeof path, "%.*s/%s", (int)(slash - info.dli_fname), info.dli_fname, name);
            void *h = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
            if (h) return h;
        }
    }
    return dlopen(name, RTLD_NOW | RTLD_GLOBAL);
}

static void load(void)
{
    void *nn = open_beside_runtime("libnnopbase.so");
    void *op = nn ? open_beside_runtime("libopapi.so") : NULL;
    if (!op) {
        const char *e = dlerror();
        snprintf(L.why, sizeof L.why, "the executor cannot open libopapi.so and libnnopbase.so: %s", e ? e : "");
        return;
    }
#define SYM(h, field, name)                                                                      \
    do {                                                                                         \
        *(void **)&L.field = dlsym(h, name);                                                     \
        if (!L.field && !L.why[0]) snprintf(L.why, sizeof L.why, "%s is missing from the libraries", name); \
    } while (0)
    SYM(nn, create_tensor, "aclCreateTensor");
    SYM(nn, create_scalar, "aclCreateScalar");
    SYM(nn, create_int_array, "aclCreateIntArray");
    SYM(nn, create_float_array, "aclCreateFloatArray");
    SYM(nn, create_bool_array, "aclCreateBoolArray");
    SYM(nn, create_tensor_list, "aclCreateTensorList");
    SYM(nn, create_scalar_list, "aclCreateScalarList");
    SYM(nn, destroy[FWN_TENSOR], "aclDestroyTensor");
    SYM(nn, destroy[FWN_TENSOR_LIST], "aclDestroyTensorList");
    SYM(nn, destroy[FWN_SCALAR], "aclDestroyScalar");
    SYM(nn, destroy[FWN_SCALAR_LIST], "aclDestroyScalarList");
    SYM(nn, destroy[FWN_INT_ARRAY], "aclDestroyIntArray");
    SYM(nn, destroy[FWN_FLOAT_ARRAY], "aclDestroyFloatArray");
    SYM(nn, destroy[FWN_BOOL_ARRAY], "aclDestroyBoolArray");
    SYM(nn, repeatable, "aclSetAclOpExecutorRepeatable");
    SYM(nn, destroy_executor, "aclDestroyAclOpExecutor");
#undef SYM
    /* operators are looked up one by one: a library without one refuses that one only */
    for (int i = 0; i < FWN_NUM_OPS; i++) {
        L.gws[i] = dlsym(op, fwn_ops[i].gws);
        L.run[i] = dlsym(op, fwn_ops[i].run);
    }
}

/* ---------------------------------------------------------------- decoding */

static void dec_bad(struct exn_dec *d, const char *why)
{
    if (!d->bad) snprintf(d->why, sizeof d->why, "%s", why);
    d->bad = true;
}

static const void *dec_take(struct exn_dec *d, size_t n)
{
    size_t padded = (n + 7) & ~(size_t)7;
    if (d->bad || padded < n || padded > d->left) {
        dec_bad(d, "the record ends inside an argument");
        return NULL;
    }
    const void *p = d->p;
    d->p += padded;
    d->left -= padded;
    return p;
}

static bool dec_item(struct exn_dec *d, uint32_t *tag, uint32_t *n)
{
    const struct fwn_item *it = dec_take(d, sizeof *it);
    if (!it) return false;
    *tag = it->tag;
    *n = it->n;
    return true;
}

static void keep(struct exn_dec *d, uint32_t tag, void *p)
{
    if (d->nobjs == d->capobjs) {
        int cap = d->capobjs ? d->capobjs * 2 : 16;
        void *q = realloc(d->objs, (size_t)cap * sizeof *d->objs);
        if (!q) {
            if (tag == FWN_STRING) free(p);
            else L.destroy[tag](p);
            dec_bad(d, "out of memory");
            return;
        }
        d->objs = q;
        d->capobjs = cap;
    }
    d->objs[d->nobjs++] = (struct exn_obj){tag, p};
}

/* One tensor item's body (the tag read); NULL on failure. The caller keeps it. */
static aclTensor *dec_tensor_body(struct exn_dec *d)
{
    const struct fwn_tensor *h = dec_take(d, sizeof *h);
    if (!h) return NULL;
    struct fwn_tensor t = *h;
    if (t.ndim > FWN_MAX_DIMS || t.nstorage > FWN_MAX_DIMS) {
        dec_bad(d, "a tensor has too many dimensions");
        return NULL;
    }
    const int64_t *v = dec_take(d, (2 * (size_t)t.ndim + t.nstorage) * sizeof(int64_t));
    if (!v) return NULL;
    int64_t dims[FWN_MAX_DIMS], strides[FWN_MAX_DIMS], storage[FWN_MAX_DIMS];
    memcpy(dims, v, t.ndim * sizeof *dims);
    memcpy(strides, v + t.ndim, t.ndim * sizeof *strides);
    memcpy(storage, v + 2 * t.ndim, t.nstorage * sizeof *storage);
    int64_t span = fwn_tensor_span(t.dtype, t.ndim, dims, strides, t.offset);
    if (span < 0) {
        dec_bad(d, "a tensor's shape, strides or offset are impossible");
        return NULL;
    }
    if (t.data && span > 0) {
        if (d->nrng == d->caprng) {
            int cap = d->caprng ? d->caprng * 2 : 8;
            void *q = realloc(d->rng, (size_t)cap * sizeof *d->rng);
            if (!q) {
                dec_bad(d, "out of memory");
                return NULL;
            }
            d->rng = q;
            d->caprng = cap;
        }
        d->rng[d->nrng].p = t.data;
        d->rng[d->nrng].n = (uint64_t)span;
        d->nrng++;
    }
    aclTensor *x = L.create_tensor(dims, t.ndim, (aclDataType)t.dtype, strides, t.offset, (aclFormat)t.format,
                                   storage, t.nstorage, (void *)(uintptr_t)t.data);
    if (!x) dec_bad(d, "aclCreateTensor refused a tensor the client described");
    return x;
}

static aclTensor *exn_get_tensor(struct exn_dec *d)
{
    uint32_t tag, n;
    if (!dec_item(d, &tag, &n) || tag == FWN_NULL) return NULL;
    if (tag != FWN_TENSOR) {
        dec_bad(d, "an argument is not the tensor the operator takes");
        return NULL;
    }
    aclTensor *x = dec_tensor_body(d);
    if (x) keep(d, FWN_TENSOR, x);
    return x;
}

static aclScalar *dec_scalar_body(struct exn_dec *d)
{
    const struct fwn_scalar *s = dec_take(d, sizeof *s);
    if (!s) return NULL;
    struct fwn_scalar v = *s;
    aclScalar *x = L.create_scalar(v.value, (aclDataType)v.dtype);
    if (!x) dec_bad(d, "aclCreateScalar refused a scalar the client described");
    return x;
}

static aclScalar *exn_get_scalar(struct exn_dec *d)
{
    uint32_t tag, n;
    if (!dec_item(d, &tag, &n) || tag == FWN_NULL) return NULL;
    if (tag != FWN_SCALAR) {
        dec_bad(d, "an argument is not the scalar the operator takes");
        return NULL;
    }
    aclScalar *x = dec_scalar_body(d);
    if (x) keep(d, FWN_SCALAR, x);
    return x;
}

/* A list argument (tensors or scalars): its items decoded with body, then the list made with
 * create; a list owns its items, so only the items of a list that was not made are destroyed. */
static void *dec_list(struct exn_dec *d, uint32_t list_tag, uint32_t item_tag, void *(*body)(struct exn_dec *),
                      void *(*create)(const void *const *, uint64_t), const char *what)
{
    uint32_t tag, n;
    if (!dec_item(d, &tag, &n) || tag == FWN_NULL) return NULL;
    if (tag != list_tag || n > FWN_MAX_LIST || (size_t)n * 8 > d->left) {
        dec_bad(d, list_tag == FWN_TENSOR_LIST ? "an argument is not the tensor list the operator takes"
                                               : "an argument is not the scalar list the operator takes");
        return NULL;
    }
    void **items = calloc(n ? n : 1, sizeof *items);
    if (!items) {
        dec_bad(d, "out of memory");
        return NULL;
    }
    uint32_t made = 0;
    for (; made < n && !d->bad; made++) {
        uint32_t t2, n2;
        if (!dec_item(d, &t2, &n2)) break;
        if (t2 != item_tag) {
            dec_bad(d, item_tag == FWN_TENSOR ? "a tensor list holds something else than tensors"
                                              : "a scalar list holds something else than scalars");
            break;
        }
        if (!(items[made] = body(d))) break;
    }
    void *l = NULL;
    if (!d->bad) {
        l = create((const void *const *)items, n);
        if (!l) dec_bad(d, what);
    }
    if (l) keep(d, list_tag, l);
    else
        for (uint32_t i = 0; i < made; i++)
            if (items[i]) L.destroy[item_tag](items[i]);
    free(items);
    return l;
}

static void *tensor_body(struct exn_dec *d) { return dec_tensor_body(d); }

static aclTensorList *exn_get_tensor_list(struct exn_dec *d)
{
    return dec_list(d, FWN_TENSOR_LIST, FWN_TENSOR, tensor_body,
                    (void *(*)(const void *const *, uint64_t))L.create_tensor_list,
                    "aclCreateTensorList refused a list the client described");
}

static void *scalar_body(struct exn_dec *d) { return dec_scalar_body(d); }

static aclScalarList *exn_get_scalar_list(struct exn_dec *d)
{
    return dec_list(d, FWN_SCALAR_LIST, FWN_SCALAR, scalar_body,
                    (void *(*)(const void *const *, uint64_t))L.create_scalar_list,
                    "aclCreateScalarList refused a list the client described");
}

static const void *dec_array(struct exn_dec *d, uint32_t want, size_t esize, uint32_t *n)
{
    uint32_t tag;
    if (!dec_item(d, &tag, n) || tag == FWN_NULL) return NULL;
    if (tag != want) {
        dec_bad(d, "an argument is not the array the operator takes");
        return NULL;
    }
    if ((size_t)*n * esize > d->left) {
        dec_bad(d, "the record ends inside an array");
        return NULL;
    }
    const void *p = dec_take(d, (size_t)*n * esize);
    return p ? p : (d->bad ? NULL : "");
}

static aclIntArray *exn_get_int_array(struct exn_dec *d)
{
    uint32_t n = 0;
    const void *p = dec_array(d, FWN_INT_ARRAY, sizeof(int64_t), &n);
    if (!p) return NULL;
    int64_t *copy = malloc(((size_t)n + 1) * sizeof *copy); /* aligned for the library's reads */
    if (!copy) {
        dec_bad(d, "out of memory");
        return NULL;
    }
    memcpy(copy, p, (size_t)n * sizeof *copy);
    aclIntArray *a = L.create_int_array(copy, n);
    free(copy);
    if (a) keep(d, FWN_INT_ARRAY, a);
    else dec_bad(d, "aclCreateIntArray refused an array the client described");
    return a;
}

static aclFloatArray *exn_get_float_array(struct exn_dec *d)
{
    uint32_t n = 0;
    const void *p = dec_array(d, FWN_FLOAT_ARRAY, sizeof(float), &n);
    if (!p) return NULL;
    float *copy = malloc(((size_t)n + 1) * sizeof *copy);
    if (!copy) {
        dec_bad(d, "out of memory");
        return NULL;
    }
    memcpy(copy, p, (size_t)n * sizeof *copy);
    aclFloatArray *a = L.create_float_array(copy, n);
    free(copy);
    if (a) keep(d, FWN_FLOAT_ARRAY, a);
    else dec_bad(d, "aclCreateFloatArray refused an array the client described");
    return a;
}

static aclBoolArray *exn_get_bool_array(struct exn_dec *d)
{
    uint32_t n = 0;
    const void *p = dec_array(d, FWN_BOOL_ARRAY, 1, &n);
    if (!p) return NULL;
    bool *copy = malloc((size_t)n + 1);
    if (!copy) {
        dec_bad(d, "out of memory");
        return NULL;
    }
    for (uint32_t i = 0; i < n; i++) copy[i] = ((const uint8_t *)p)[i] != 0;
    aclBoolArray *a = L.create_bool_array(copy, n);
    free(copy);
    if (a) keep(d, FWN_BOOL_ARRAY, a);
    else dec_bad(d, "aclCreateBoolArray refused an array the client described");
    return a;
}

static int64_t exn_get_int(struct exn_dec *d)
{
    uint32_t tag, n;
    if (!dec_item(d, &tag, &n)) return 0;
    if (tag != FWN_INT) {
        dec_bad(d, "an argument is not the integer the operator takes");
        return 0;
    }
    const int64_t *p = dec_take(d, sizeof *p);
    int64_t v = 0;
    if (p) memcpy(&v, p, sizeof v);
    return v;
}

static double exn_get_double(struct exn_dec *d)
{
    uint32_t tag, n;
    if (!dec_item(d, &tag, &n)) return 0;
    if (tag != FWN_DOUBLE) {
        dec_bad(d, "an argument is not the floating value the operator takes");
        return 0;
    }
    const double *p = dec_take(d, sizeof *p);
    double v = 0;
    if (p) memcpy(&v, p, sizeof v);
    return v;
}

static char *exn_get_string(struct exn_dec *d)
{
    uint32_t tag, n;
    if (!dec_item(d, &tag, &n) || tag == FWN_NULL) return NULL;
    if (tag != FWN_STRING || n > FWN_MAX_STRING) {
        dec_bad(d, "an argument is not the string the operator takes");
        return NULL;
    }
    const char *p = dec_take(d, n);
    if (!p) return NULL;
    char *s = malloc((size_t)n + 1);
    if (!s) {
        dec_bad(d, "out of memory");
        return NULL;
    }
    memcpy(s, p, n);
    s[n] = 0;
    keep(d, FWN_STRING, s); /* freed with the executor: the library may keep the pointer */
    return d->bad ? NULL : s;
}

/* ---------------------------------------------------------------- executors */

static void free_objs(struct exn_obj *objs, int n)
{
    for (int i = n; i-- > 0;) {
        if (objs[i].tag == FWN_STRING) free(objs[i].p);
        else L.destroy[objs[i].tag](objs[i].p);
    }
    free(objs);
}

/* The executor entry of handle h; NULL with the client's message set. */
static struct exn_exec *entry_of(struct ex_client *c, uint64_t h, bool want_live, const char *api)
{
    int64_t i = fwd_handle_index(h, FWD_H_EXEC);
    if (i < 0 || i >= FWN_MAX_EXECS) {
        ex_fail(c, ACLNN_ERR_PARAM_INVALID, "%s: %#llx is not an operator executor handle", api, (unsigned long long)h);
        return NULL;
    }
    struct ex_aclnn_state *s = c->nn;
    if (!s && !(s = c->nn = calloc(1, sizeof *s))) {
        ex_fail(c, ACLNN_ERR_INNER, "%s: out of memory", api);
        return NULL;
    }
    if (i >= s->cap) {
        if (want_live) {
            ex_fail(c, ACLNN_ERR_PARAM_INVALID, "%s: %#llx is not an executor of this process", api,
                    (unsigned long long)h);
            return NULL;
        }
        int cap = s->cap ? s->cap : 64;
        while (cap <= i) cap *= 2;
        if (cap > FWN_MAX_EXECS) cap = FWN_MAX_EXECS;
        void *p = realloc(s->ex, (size_t)cap * sizeof *s->ex);
        if (!p) {
            ex_fail(c, ACLNN_ERR_INNER, "%s: out of memory", api);
            return NULL;
        }
        s->ex = p;
        memset(&s->ex[s->cap], 0, (size_t)(cap - s->cap) * sizeof *s->ex);
        s->cap = cap;
    }
    struct exn_exec *e = &s->ex[i];
    if (want_live != (e->ex != NULL)) {
        ex_fail(c, ACLNN_ERR_PARAM_INVALID, "%s: %#llx %s", api, (unsigned long long)h,
                want_live ? "is not an executor of this process" : "is already an executor of this process");
        return NULL;
    }
    return e;
}

static void entry_free(struct exn_exec *e, bool destroy_executor)
{
    if (destroy_executor && e->ex) L.destroy_executor(e->ex);
    free_objs(e->objs, e->nobjs);
    free(e->rng);
    memset(e, 0, sizeof *e);
}

/* The library's own reason for its last failure, as the client's message. */
static int lib_fail(struct ex_client *c, int rc, const char *api)
{
    const char *why = aclGetRecentErrMsg();
    return ex_fail(c, rc, "%s (in the executor): %s", api, why && *why ? why : "no reason given");
}

static int op_make(struct ex_client *c, const struct fwd_rec *r, const uint8_t *pl)
{
    if (r->a[1] >= FWN_NUM_OPS) return ex_fail(c, ACLNN_ERR_PARAM_INVALID, "aclnn record: operator %llu is unknown",
                                               (unsigned long long)r->a[1]);
    int op = (int)r->a[1];
    const char *api = fwn_ops[op].gws;
    if (r->a[2] != (uint64_t)fwn_ops[op].nargs)
        return ex_fail(c, ACLNN_ERR_PARAM_INVALID, "%s: the record carries %llu arguments, not %d", api,
                       (unsigned long long)r->a[2], fwn_ops[op].nargs);
    if (!L.gws[op] || !L.run[op])
        return ex_fail(c, ACLNN_ERR_INNER_NULLPTR, "%s: the executor's libopapi.so does not have this operator", api);
    struct exn_exec *e = entry_of(c, r->a[0], false, api);
    if (!e) return ACLNN_ERR_PARAM_INVALID;
    struct exn_dec d = {.c = c, .p = pl, .left = r->plen};
    uint64_t ws = 0;
    aclOpExecutor *ex = NULL;
    int rc = exn_callers[op](&d, L.gws[op], &ws, &ex);
    if (!d.bad && d.left) dec_bad(&d, "the record carries more than the operator's arguments");
    if (d.bad) {
        if (ex) L.destroy_executor(ex);
        free_objs(d.objs, d.nobjs);
        free(d.rng);
        return ex_fail(c, ACLNN_ERR_PARAM_INVALID, "%s: a malformed record: %s", api, d.why);
    }
    if (rc != ACLNN_SUCCESS || !ex) {
        if (!rc) rc = ACLNN_ERR_INNER_NULLPTR;
        lib_fail(c, rc, api);
        free_objs(d.objs, d.nobjs);
        free(d.rng);
        return rc;
    }
    *e = (struct exn_exec){.ex = ex, .op = op, .objs = d.objs, .nobjs = d.nobjs, .rng = (void *)d.rng, .nrng = d.nrng};
    return ACLNN_SUCCESS;
}

static int op_run(struct ex_client *c, const struct fwd_rec *r)
{
    if (r->a[1] >= FWN_NUM_OPS) return ex_fail(c, ACLNN_ERR_PARAM_INVALID, "aclnn record: operator %llu is unknown",
                                               (unsigned long long)r->a[1]);
    int op = (int)r->a[1];
    const char *api = fwn_ops[op].run;
    struct exn_exec *e = entry_of(c, r->a[0], true, api);
    if (!e) return ACLNN_ERR_PARAM_INVALID;
    if (e->op != op)
        return ex_fail(c, ACLNN_ERR_PARAM_INVALID, "%s: executor was made by %sGetWorkspaceSize", api,
                       fwn_ops[e->op].run);
    int rc = ACL_SUCCESS;
    aclrtStream st = ex_stream(c, r->a[2], &rc);
    if (st && r->a[4]) rc = ex_check_dev(c, r->a[3], r->a[4], api); /* the workspace */
    for (int k = 0; st && !rc && k < e->nrng; k++) rc = ex_check_dev(c, e->rng[k].p, e->rng[k].n, api);
    if (!st || rc) {
        if (!e->repeatable) entry_free(e, true);
        return rc ? rc : ACLNN_ERR_PARAM_INVALID;
    }
    ex_admit_budgeted(c, st); /* an operator launches its kernel: it counts against the budget */
    rc = ((aclnnStatus(*)(void *, uint64_t, aclOpExecutor *, aclrtStream))L.run[op])(
        (void *)(uintptr_t)r->a[3], r->a[4], e->ex, st);
    if (rc) lib_fail(c, rc, api);
    else ex_budget_dispatched(c, st);
    if (!e->repeatable) entry_free(e, false); /* the run freed the library's executor */
    return rc;
}

int ex_aclnn(struct ex_client *c, const struct fwd_rec *r, const uint8_t *pl)
{
    pthread_once(&g_once, load);
    if (L.why[0]) return ex_fail(c, ACLNN_ERR_INNER_NULLPTR, "%s", L.why);
    struct exn_exec *e;
    switch (r->op) {
    case FWD_ACLNN_MAKE: return op_make(c, r, pl);
    case FWD_ACLNN_RUN: return op_run(c, r);
    case FWD_ACLNN_DESTROY:
        if (!(e = entry_of(c, r->a[0], true, "aclDestroyAclOpExecutor"))) return ACLNN_ERR_PARAM_INVALID;
        entry_free(e, true);
        return ACLNN_SUCCESS;
    case FWD_ACLNN_REPEATABLE: {
        if (!(e = entry_of(c, r->a[0], true, "aclSetAclOpExecutorRepeatable"))) return ACLNN_ERR_PARAM_INVALID;
        int rc = L.repeatable(e->ex);
        if (rc) return lib_fail(c, rc, "aclSetAclOpExecutorRepeatable");
        e->repeatable = true;
        return ACLNN_SUCCESS;
    }
    default: return ex_fail(c, ACL_ERROR_INVALID_PARAM, "record op %u is not an aclnn record", r->op);
    }
}

void ex_aclnn_forget(struct ex_client *c)
{
    struct ex_aclnn_state *s = c->nn;
    if (!s) return;
    for (int i = 0; i < s->cap; i++)
        if (s->ex[i].ex) entry_free(&s->ex[i], true);
    free(s->ex);
    free(s);
    c->nn = NULL;
}
