/* Built-in kernels of the emulated device: cost from shapes, and the real data effect. */
#include "emu_kernels.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "acl/acl_base.h"

static const char *const builtin_names[EMU_K_COUNT] = {
    "gemm", "attention_prefill", "attention_decode", "elementwise", "copy", "synthetic",
    "rmsnorm", "rope", "attention_extend",
};
_Static_assert(EMU_K_COUNT <= EMU_EFF_SLOTS, "efficiency table too small");

int emu_builtin_by_name(const char *name)
{
    for (int i = 0; i < EMU_K_COUNT; i++)
        if (strcmp(name, builtin_names[i]) == 0) return i;
    return -1;
}

const char *emu_builtin_name(int builtin)
{
    return (builtin >= 0 && builtin < EMU_K_COUNT) ? builtin_names[builtin] : "?";
}

int emu_builtin_core_class(int builtin)
{
    switch (builtin) {
    case EMU_K_GEMM: return EMU_CORE_CUBE;
    case EMU_K_ELEMENTWISE:
    case EMU_K_RMSNORM:
    case EMU_K_ROPE:
    case EMU_K_COPY: return EMU_CORE_VECTOR;
    default: return EMU_CORE_MIX; /* attention (cube matmuls, vector softmax) and synthetic */
    }
}

static const char *const core_class_names[] = {"none", "cube", "vector", "mix"};

int emu_core_class_by_name(const char *name)
{
    for (int i = EMU_CORE_CUBE; i <= EMU_CORE_MIX; i++)
        if (strcmp(name, core_class_names[i]) == 0) return i;
    return -1;
}

const char *emu_core_class_name(int core_class)
{
    return (core_class >= EMU_CORE_NONE && core_class <= EMU_CORE_MIX) ? core_class_names[core_class] : "?";
}

static int dtype_size(int32_t dt)
{
    switch (dt) {
    case ACL_FLOAT: return 4;
    case ACL_FLOAT16: return 2;
    case ACL_BF16: return 2;
    default: return 0;
    }
}

static float load_elem(const void *base, size_t i, int32_t dt)
{
    switch (dt) {
    case ACL_FLOAT: return ((const float *)base)[i];
    case ACL_FLOAT16: return (float)((const _Float16 *)base)[i];
    default: { /* bf16: the high half of a float */
        uint32_t bits = (uint32_t)((const uint16_t *)base)[i] << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    }
}

static void store_elem(void *base, size_t i, int32_t dt, float v)
{
    switch (dt) {
    case ACL_FLOAT: ((float *)base)[i] = v; break;
    case ACL_FLOAT16: ((_Float16 *)base)[i] = (_Float16)v; break;
    default: {
        uint32_t bits;
        memcpy(&bits, &v, 4);
        bits += 0x7fff + ((bits >> 16) & 1); /* round to nearest even */
        ((uint16_t *)base)[i] = (uint16_t)(bits >> 16);
    }
    }
}

#define ADD_RANGE(p, n)                                                                  \
    do {                                                                                 \
        if ((p) != 0) { ranges[*nranges].ptr = (p); ranges[*nranges].bytes = (n); (*nranges)++; } \
    } while (0)

int emu_kernel_prepare(int builtin, const void *args, size_t size, struct emu_cost *cost,
                       struct emu_range *ranges, int *nranges)
{
    *nranges = 0;
    if (args == NULL) return ACL_ERROR_INVALID_PARAM;
    switch (builtin) {
    case EMU_K_GEMM: {
        struct emu_args_gemm g;
        if (size != sizeof g) return ACL_ERROR_INVALID_PARAM;
        memcpy(&g, args, sizeof g);
        int e = dtype_size(g.dtype);
        if (!e || !g.m || !g.n || !g.k) return ACL_ERROR_INVALID_PARAM;
        double m = g.m, n = g.n, k = g.k;
        cost->flops = 2.0 * m * n * k;
        cost->hbm_bytes = (m * k + k * n + m * n) * e;
        ADD_RANGE(g.a, (uint64_t)g.m * g.k * e);
        ADD_RANGE(g.b, (uint64_t)g.k * g.n * e);
        ADD_RANGE(g.c, (uint64_t)g.m * g.n * e);
        return (*nranges == 0 || *nranges == 3) ? 0 : ACL_ERROR_INVALID_PARAM;
    }
    case EMU_K_ATTN_PREFILL: {
        struct emu_args_attn_prefill a;
        if (size != sizeof a) return ACL_ERROR_INVALID_PARAM;
        memcpy(&a, args, sizeof a);
        int e = dtype_size(a.dtype);
        if (!e || !a.batch || !a.heads || !a.kv_heads || !a.seq_len || !a.head_dim ||
            a.heads % a.kv_heads)
            return ACL_ERROR_INVALID_PARAM;
        double b = a.batch, h = a.heads, kvh = a.kv_heads, s = a.seq_len, d = a.head_dim;
        /* QK^T and PV, 2*s*s*d each, halved by the causal mask */
        cost->flops = 2.0 * b * h * s * s * d;
        cost->hbm_bytes = (2.0 * b * h * s * d + 2.0 * b * kvh * s * d) * e;
        uint64_t qo = (uint64_t)a.batch * a.heads * a.seq_len * a.head_dim * e;
        uint64_t kv = (uint64_t)a.batch * a.kv_heads * a.seq_len * a.head_dim * e;
        ADD_RANGE(a.q, qo); ADD_RANGE(a.k, kv); ADD_RANGE(a.v, kv); ADD_RANGE(a.o, qo);
        return (*nranges == 0 || *nranges == 4) ? 0 : ACL_ERROR_INVALID_PARAM;
    }
    case EMU_K_ATTN_DECODE: {
        struct emu_args_attn_decode a;
        if (size != sizeof a) return ACL_ERROR_INVALID_PARAM;
        memcpy(&a, args, sizeof a);
        int e = dtype_size(a.dtype);
        if (!e || !a.batch || !a.heads || !a.kv_heads || !a.context_len || !a.head_dim ||
            a.heads % a.kv_heads)
            return ACL_ERROR_INVALID_PARAM;
        double b = a.batch, h = a.heads, kvh = a.kv_heads, c = a.context_len, d = a.head_dim;
        cost->flops = 4.0 * b * h * c * d;
        cost->hbm_bytes = (2.0 * b * kvh * c * d + 2.0 * b * h * d) * e;
        uint64_t qo = (uint64_t)a.batch * a.heads * a.head_dim * e;
        uint64_t kv = (uint64_t)a.batch * a.kv_heads * a.context_len * a.head_dim * e;
        ADD_RANGE(a.q, qo); ADD_RANGE(a.k_cache, kv); ADD_RANGE(a.v_cache, kv); ADD_RANGE(a.o, qo);
        return (*nranges == 0 || *nranges == 4) ? 0 : ACL_ERROR_INVALID_PARAM;
    }
    case EMU_K_ELEMENTWISE: {
        struct emu_args_elementwise w;
        if (size != sizeof w) return ACL_ERROR_INVALID_PARAM;
        memcpy(&w, args, sizeof w);
        int e = dtype_size(w.dtype);
        if (!e || !w.n || w.op > 3) return ACL_ERROR_INVALID_PARAM;
        int unary = w.op == 2;
        cost->flops = (w.op == 3 ? 4.0 : 1.0) * (double)w.n; /* silu: exp, add, div; then mul */
        cost->hbm_bytes = (unary ? 2.0 : 3.0) * (double)w.n * e;
        uint64_t nb = w.n * (uint64_t)e;
        ADD_RANGE(w.x, nb);
        if (!unary) ADD_RANGE(w.y, nb);
        ADD_RANGE(w.out, nb);
        int want = unary ? 2 : 3;
        return (*nranges == 0 || *nranges == want) ? 0 : ACL_ERROR_INVALID_PARAM;
    }
    case EMU_K_COPY: {
        struct emu_args_copy c;
        if (size != sizeof c) return ACL_ERROR_INVALID_PARAM;
        memcpy(&c, args, sizeof c);
        if (!c.bytes) return ACL_ERROR_INVALID_PARAM;
        cost->flops = 0;
        cost->hbm_bytes = 2.0 * (double)c.bytes;
        ADD_RANGE(c.src, c.bytes);
        ADD_RANGE(c.dst, c.bytes);
        return (*nranges == 0 || *nranges == 2) ? 0 : ACL_ERROR_INVALID_PARAM;
    }
    case EMU_K_SYNTHETIC: {
        struct emu_args_synthetic s;
        if (size != sizeof s) return ACL_ERROR_INVALID_PARAM;
        memcpy(&s, args, sizeof s);
        if (!(s.flops >= 0) || !(s.hbm_bytes >= 0) || !isfinite(s.flops) || !isfinite(s.hbm_bytes))
            return ACL_ERROR_INVALID_PARAM;
        cost->flops = s.flops;
        cost->hbm_bytes = s.hbm_bytes;
        return 0;
    }
    case EMU_K_RMSNORM: {
        struct emu_args_rmsnorm r;
        if (size != sizeof r) return ACL_ERROR_INVALID_PARAM;
        memcpy(&r, args, sizeof r);
        int e = dtype_size(r.dtype);
        if (!e || !r.rows || !r.dim || !(r.eps >= 0)) return ACL_ERROR_INVALID_PARAM;
        double n = (double)r.rows * r.dim;
        cost->flops = 4.0 * n; /* square, sum, scale, weight */
        cost->hbm_bytes = (2.0 * n + r.dim) * e;
        uint64_t nb = (uint64_t)r.rows * r.dim * e;
        ADD_RANGE(r.x, nb); ADD_RANGE(r.w, (uint64_t)r.dim * e); ADD_RANGE(r.out, nb);
        return (*nranges == 0 || *nranges == 3) ? 0 : ACL_ERROR_INVALID_PARAM;
    }
    case EMU_K_ROPE: {
        struct emu_args_rope r;
        if (size != sizeof r) return ACL_ERROR_INVALID_PARAM;
        memcpy(&r, args, sizeof r);
        int e = dtype_size(r.dtype);
        if (!e || !r.tokens || !r.heads || !r.head_dim || r.head_dim % 2 || !(r.theta > 0))
            return ACL_ERROR_INVALID_PARAM;
        double n = (double)r.tokens * r.heads * r.head_dim;
        cost->flops = 3.0 * n; /* two multiplies and an add per element */
        cost->hbm_bytes = 2.0 * n * e;
        uint64_t nb = (uint64_t)r.tokens * r.heads * r.head_dim * e;
        ADD_RANGE(r.x, nb); ADD_RANGE(r.out, nb);
        return (*nranges == 0 || *nranges == 2) ? 0 : ACL_ERROR_INVALID_PARAM;
    }
    case EMU_K_ATTN_EXTEND: {
        struct emu_args_attn_extend a;
        if (size != sizeof a) return ACL_ERROR_INVALID_PARAM;
        memcpy(&a, args, sizeof a);
        int e = dtype_size(a.dtype);
        if (!e || !a.batch || !a.heads || !a.kv_heads || !a.q_len || !a.head_dim || a.q_len > a.ctx_len ||
            a.heads % a.kv_heads)
            return ACL_ERROR_INVALID_PARAM;
        double b = a.batch, h = a.heads, kvh = a.kv_heads, q = a.q_len, c = a.ctx_len, d = a.head_dim;
        /* query i sees c - q + i + 1 keys: QK^T and PV, 2*d each per key */
        double keys = q * (c - q) + q * (q + 1) / 2.0;
        cost->flops = 4.0 * b * h * d * keys;
        cost->hbm_bytes = (2.0 * b * h * q * d + 2.0 * b * kvh * c * d) * e;
        uint64_t qo = (uint64_t)a.batch * a.heads * a.q_len * a.head_dim * e;
        uint64_t kv = (uint64_t)a.batch * a.kv_heads * a.ctx_len * a.head_dim * e;
        ADD_RANGE(a.q, qo); ADD_RANGE(a.k, kv); ADD_RANGE(a.v, kv); ADD_RANGE(a.o, qo);
        return (*nranges == 0 || *nranges == 4) ? 0 : ACL_ERROR_INVALID_PARAM;
    }
    }
    return ACL_ERROR_INVALID_PARAM;
}

static void run_gemm(const struct emu_args_gemm *g)
{
    const void *A = (const void *)(uintptr_t)g->a, *B = (const void *)(uintptr_t)g->b;
    void *C = (void *)(uintptr_t)g->c;
    float *row = malloc(sizeof(float) * g->n);
    if (!row) return;
    for (uint32_t i = 0; i < g->m; i++) {
        for (uint32_t j = 0; j < g->n; j++) row[j] = 0.f;
        for (uint32_t p = 0; p < g->k; p++) {
            float a = load_elem(A, (size_t)i * g->k + p, g->dtype);
            for (uint32_t j = 0; j < g->n; j++) row[j] += a * load_elem(B, (size_t)p * g->n + j, g->dtype);
        }
        for (uint32_t j = 0; j < g->n; j++) store_elem(C, (size_t)i * g->n + j, g->dtype, row[j]);
    }
    free(row);
}

/* softmax(q . K^T / sqrt(d)) . V over keys [0, nkeys) for one query row */
static void attend(const void *q, size_t qoff, const void *K, const void *V, size_t kvoff, uint32_t nkeys,
                   uint32_t d, int32_t dt, void *o, size_t ooff, float *scores)
{
    float scale = 1.0f / sqrtf((float)d), mx = -INFINITY, sum = 0.f;
    for (uint32_t t = 0; t < nkeys; t++) {
        float s = 0.f;
        for (uint32_t x = 0; x < d; x++)
            s += load_elem(q, qoff + x, dt) * load_elem(K, kvoff + (size_t)t * d + x, dt);
        scores[t] = s * scale;
        if (scores[t] > mx) mx = scores[t];
    }
    for (uint32_t t = 0; t < nkeys; t++) { scores[t] = expf(scores[t] - mx); sum += scores[t]; }
    for (uint32_t x = 0; x < d; x++) {
        float acc = 0.f;
        for (uint32_t t = 0; t < nkeys; t++) acc += scores[t] * load_elem(V, kvoff + (size_t)t * d + x, dt);
        store_elem(o, ooff + x, dt, acc / sum);
    }
}

void emu_kernel_run(int builtin, const void *args)
{
    switch (builtin) {
    case EMU_K_GEMM: {
        struct emu_args_gemm g;
        memcpy(&g, args, sizeof g);
        if (g.a) run_gemm(&g);
        break;
    }
    case EMU_K_ATTN_PREFILL: {
        struct emu_args_attn_prefill a;
        memcpy(&a, args, sizeof a);
        if (!a.q) break;
        float *scores = malloc(sizeof(float) * a.seq_len);
        if (!scores) break;
        uint32_t group = a.heads / a.kv_heads, d = a.head_dim;
        for (uint32_t b = 0; b < a.batch; b++)
            for (uint32_t h = 0; h < a.heads; h++)
                for (uint32_t s = 0; s < a.seq_len; s++) {
                    size_t qoff = (((size_t)b * a.heads + h) * a.seq_len + s) * d;
                    size_t kvoff = ((size_t)b * a.kv_heads + h / group) * a.seq_len * d;
                    attend((void *)(uintptr_t)a.q, qoff, (void *)(uintptr_t)a.k, (void *)(uintptr_t)a.v,
                           kvoff, s + 1, d, a.dtype, (void *)(uintptr_t)a.o, qoff, scores);
                }
        free(scores);
        break;
    }
    case EMU_K_ATTN_DECODE: {
        struct emu_args_attn_decode a;
        memcpy(&a, args, sizeof a);
        if (!a.q) break;
        float *scores = malloc(sizeof(float) * a.context_len);
        if (!scores) break;
        uint32_t group = a.heads / a.kv_heads, d = a.head_dim;
        for (uint32_t b = 0; b < a.batch; b++)
            for (uint32_t h = 0; h < a.heads; h++) {
                size_t qoff = ((size_t)b * a.heads + h) * d;
                size_t kvoff = ((size_t)b * a.kv_heads + h / group) * a.context_len * d;
                attend((void *)(uintptr_t)a.q, qoff, (void *)(uintptr_t)a.k_cache,
                       (void *)(uintptr_t)a.v_cache, kvoff, a.context_len, d, a.dtype,
                       (void *)(uintptr_t)a.o, qoff, scores);
            }
        free(scores);
        break;
    }
    case EMU_K_ELEMENTWISE: {
        struct emu_args_elementwise w;
        memcpy(&w, args, sizeof w);
        if (!w.x) break;
        const void *x = (const void *)(uintptr_t)w.x, *y = (const void *)(uintptr_t)w.y;
        void *out = (void *)(uintptr_t)w.out;
        for (uint64_t i = 0; i < w.n; i++) {
            float a = load_elem(x, i, w.dtype), r;
            if (w.op == 0) r = a + load_elem(y, i, w.dtype);
            else if (w.op == 1) r = a * load_elem(y, i, w.dtype);
            else if (w.op == 3) r = a / (1.f + expf(-a)) * load_elem(y, i, w.dtype);
            else r = a > 0.f ? a : 0.f;
            store_elem(out, i, w.dtype, r);
        }
        break;
    }
    case EMU_K_COPY: {
        struct emu_args_copy c;
        memcpy(&c, args, sizeof c);
        if (c.src) memmove((void *)(uintptr_t)c.dst, (const void *)(uintptr_t)c.src, c.bytes);
        break;
    }
    case EMU_K_RMSNORM: {
        struct emu_args_rmsnorm r;
        memcpy(&r, args, sizeof r);
        if (!r.x) break;
        const void *x = (const void *)(uintptr_t)r.x, *w = (const void *)(uintptr_t)r.w;
        void *out = (void *)(uintptr_t)r.out;
        for (uint32_t row = 0; row < r.rows; row++) {
            size_t base = (size_t)row * r.dim;
            float ss = 0.f;
            for (uint32_t j = 0; j < r.dim; j++) { float v = load_elem(x, base + j, r.dtype); ss += v * v; }
            float inv = 1.0f / sqrtf(ss / (float)r.dim + r.eps);
            for (uint32_t j = 0; j < r.dim; j++)
                store_elem(out, base + j, r.dtype, load_elem(x, base + j, r.dtype) * inv * load_elem(w, j, r.dtype));
        }
        break;
    }
    case EMU_K_ROPE: {
        struct emu_args_rope r;
        memcpy(&r, args, sizeof r);
        if (!r.x) break;
        const void *x = (const void *)(uintptr_t)r.x;
        void *out = (void *)(uintptr_t)r.out;
        uint32_t half = r.head_dim / 2;
        for (uint32_t t = 0; t < r.tokens; t++)
            for (uint32_t h = 0; h < r.heads; h++) {
                size_t base = ((size_t)t * r.heads + h) * r.head_dim;
                for (uint32_t i = 0; i < half; i++) {
                    double ang = (double)(r.pos_offset + t) * pow((double)r.theta, -2.0 * i / r.head_dim);
                    float c = (float)cos(ang), sn = (float)sin(ang);
                    float a = load_elem(x, base + i, r.dtype), b2 = load_elem(x, base + half + i, r.dtype);
                    store_elem(out, base + i, r.dtype, a * c - b2 * sn);
                    store_elem(out, base + half + i, r.dtype, b2 * c + a * sn);
                }
            }
        break;
    }
    case EMU_K_ATTN_EXTEND: {
        struct emu_args_attn_extend a;
        memcpy(&a, args, sizeof a);
        if (!a.q) break;
        float *scores = malloc(sizeof(float) * a.ctx_len);
        if (!scores) break;
        uint32_t group = a.heads / a.kv_heads, d = a.head_dim, first = a.ctx_len - a.q_len;
        for (uint32_t b = 0; b < a.batch; b++)
            for (uint32_t h = 0; h < a.heads; h++)
                for (uint32_t s = 0; s < a.q_len; s++) {
                    size_t qoff = (((size_t)b * a.heads + h) * a.q_len + s) * d;
                    size_t kvoff = ((size_t)b * a.kv_heads + h / group) * a.ctx_len * d;
                    attend((void *)(uintptr_t)a.q, qoff, (void *)(uintptr_t)a.k, (void *)(uintptr_t)a.v,
                           kvoff, first + s + 1, d, a.dtype, (void *)(uintptr_t)a.o, qoff, scores);
                }
        free(scores);
        break;
    }
    default: break;
    }
}

void emu_kernel_derate(const struct emu_params *p, int builtin, struct emu_cost *cost)
{
    if (builtin < 0 || builtin >= EMU_K_COUNT) return;
    double ef = p->eff_flops[builtin], eh = p->eff_hbm[builtin];
    if (ef > 0 && ef < 1) cost->flops /= ef;
    if (eh > 0 && eh < 1) cost->hbm_bytes /= eh;
}

int emu_parse_efficiency(const char *spec, struct emu_params *p, char *err, size_t errlen)
{
    char buf[1024];
    if (strlen(spec) >= sizeof buf) { snprintf(err, errlen, "efficiency spec too long"); return -1; }
    strcpy(buf, spec);
    char *save = NULL;
    for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '='), *slash = eq ? strchr(eq, '/') : NULL;
        if (!eq || !slash) { snprintf(err, errlen, "'%s' is not name=compute/hbm", tok); return -1; }
        *eq = *slash = 0;
        int b = emu_builtin_by_name(tok);
        char *e1, *e2;
        double ef = strtod(eq + 1, &e1), eh = strtod(slash + 1, &e2);
        if (b < 0) { snprintf(err, errlen, "unknown built-in kernel '%s'", tok); return -1; }
        if (*e1 || *e2 || !(ef > 0 && ef <= 1) || !(eh > 0 && eh <= 1)) {
            snprintf(err, errlen, "efficiency of '%s' must be two numbers in (0, 1]", tok);
            return -1;
        }
        p->eff_flops[b] = ef;
        p->eff_hbm[b] = eh;
    }
    return 0;
}
