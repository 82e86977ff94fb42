/* The attention operators serving engines call: aclnnPromptFlashAttentionV3 (prefill),
 * aclnnIncreFlashAttentionV4 (decode: one query token per sequence) and
 * aclnnFusedInferAttentionScoreV2/V3/V4 (either; a query S of 1 takes the decode branch), as
 * ops-transformer documents them (attention/{prompt_flash_attention,incre_flash_attention,
 * fused_infer_attention_score}/docs, docs/context/sparse_mode参数说明.md).
 *
 * Emulated: FLOAT16 and BFLOAT16; layouts BSH, BSND, BNSD, BNSD_BSND and TND; grouped-query
 * heads; actual sequence lengths; masks (a full mask, sparse modes 0-4 with preTokens and
 * nextTokens); a paged KV cache (blockTable, BnBsH or BnNBsD blocks); softmaxLse. Anything
 * else (quantisation, position shift, shared prefixes, padding sizes, rope inputs, sinks,
 * one-tensor-per-batch KV lists) is refused with ACLNN_ERR_PARAM_INVALID and a log line.
 *
 * Cost, per batch b with sq query rows and skv keys (actual lengths): 2*N*(D+Dv) FLOPs per
 * attended (query, key) pair and every q, k, v, out byte once: the attention built-ins'
 * formulas (a causal square block counts s^2/2 pairs, as attention_prefill does), and their
 * efficiencies: attention_decode for the decode branch, attention_prefill when every batch's
 * sq equals its skv, attention_extend otherwise. The structural mask (sparse mode, band)
 * counts; a mask's contents do not.
 */
#include <stdio.h>
#include <stdlib.h>

#include "aclnnop/aclnn_fused_infer_attention_score_v2.h"
#include "aclnnop/aclnn_fused_infer_attention_score_v3.h"
#include "aclnnop/aclnn_fused_infer_attention_score_v4.h"
#include "aclnnop/aclnn_incre_flash_attention_v4.h"
#include "aclnnop/aclnn_prompt_flash_attention_v3.h"
#include "opapi.h"

enum layout { L_BSH, L_BSND, L_BNSD, L_BNSD_BSND, L_TND };
#define COMPRESSED_MASK 2048 /* sparse modes 2-4 take this optimised lower-triangular mask */
#define TILE_S 128.0        /* query rows one core takes per head */
#define MAX_GROUP 64        /* numHeads / numKeyValueHeads, at most (CANN) */
#define TOKENS_MAX ((int64_t)1 << 40)

/* What one call passed, before checking. */
struct attn_call {
    const char *api;
    bool decode_op; /* IncreFlashAttention: every call is the decode branch */
    bool fused;     /* FusedInferAttentionScore: the query's S picks the branch */
    const aclTensor *query, *key, *value, *mask, *table, *out, *lse;
    const aclTensorList *key_list, *value_list;
    const aclIntArray *qlens, *kvlens;
    int64_t num_heads, num_kv_heads, pre, next, sparse, inner_precise, block_size;
    double scale;
    const char *layout;
    bool lse_flag;
    const char *unsupported; /* the first optional input given that the emulator does not take */
};

struct attn_args {
    int layout;
    bool decode; /* the decode branch: one query row; a mask is per key; no sparse mode */
    bool paged, kv_heads_major; /* paged cache blocks [n][Nkv][bs][D] (else [n][bs][Nkv*D]) */
    int sparse;
    int64_t pre, next;
    int64_t B, N, KVN, D, DV, Sq, Skv, T, block_size, max_blocks;
    double scale;
    int vq, vk, vv, vo, vmask, vtable, vlse; /* view indices; -1: absent */
    int mask_kind; /* dims of the mask: 2 (S1,S2) or (B,S2); 3; 4 */
    int64_t lens[]; /* qlen[B], kvlen[B], qstart[B], kvstart[B] */
};

#define QLEN(p, b) ((p)->lens[(b)])
#define KVLEN(p, b) ((p)->lens[(p)->B + (b)])
#define QSTART(p, b) ((p)->lens[2 * (p)->B + (b)])
#define KVSTART(p, b) ((p)->lens[3 * (p)->B + (b)])

/* ---------------------------------------------------------------- element positions */

/* Offset of the row (batch b, head n, position s; for TND s is the token) of a q/k/v/out view
 * in layout lay, whose heads are `width` elements wide. */
static int64_t row_at(const struct nn_view *v, int lay, int64_t b, int64_t n, int64_t s, int64_t width)
{
    int64_t idx[4];
    switch (lay) {
    case L_BSH: idx[0] = b, idx[1] = s, idx[2] = n * width; break;
    case L_BSND: idx[0] = b, idx[1] = s, idx[2] = n, idx[3] = 0; break;
    case L_TND: idx[0] = s, idx[1] = n, idx[2] = 0; break;
    default: idx[0] = b, idx[1] = n, idx[2] = s, idx[3] = 0; break; /* BNSD */
    }
    return nn_at(v, idx);
}

/* Offset of key/value position j of batch b, kv head h (after the block table's check). */
static int64_t kv_at(const struct attn_args *p, const struct nn_view *v, const struct nn_view *table, int64_t b,
                     int64_t h, int64_t j, int64_t width)
{
    if (!p->paged) {
        int lay = p->layout == L_BNSD_BSND ? L_BNSD : p->layout;
        return row_at(v, lay, b, h, p->layout == L_TND ? KVSTART(p, b) + j : j, width);
    }
    int64_t tidx[2] = {b, j / p->block_size};
    int64_t blk = nn_ldi(table, nn_at(table, tidx)), o = j % p->block_size;
    int64_t idx[4] = {blk, o, h * width, 0};
    if (p->kv_heads_major) idx[1] = h, idx[2] = o;
    return nn_at(v, idx);
}

/* Whether query row i of batch b may attend key j (j < skv, i < sq). */
static bool attends(const struct attn_args *p, const struct nn_view *mask, int64_t b, int64_t i, int64_t j)
{
    int64_t sq = QLEN(p, b), skv = KVLEN(p, b);
    bool use_mask = mask && (p->decode || p->sparse <= 1);
    if (use_mask) {
        int64_t idx[4] = {0, 0, 0, 0};
        int nd = (int)mask->ndim;
        if (p->decode) { /* (B,S2) (B,1,S2) (B,1,1,S2) */
            idx[0] = mask->dims[0] == 1 ? 0 : b;
            idx[nd - 1] = j;
        } else { /* (S1,S2) (B,S1,S2) (B,1,S1,S2) */
            if (nd >= 3) idx[0] = mask->dims[0] == 1 ? 0 : b;
            idx[nd - 2] = i;
            idx[nd - 1] = j;
        }
        if (nn_ldi(mask, nn_at(mask, idx))) return false;
    }
    if (p->decode) return true;
    switch (p->sparse) {
    case 0: return !mask || (j - i >= -p->pre && j - i <= p->next);
    case 1: return true;
    case 2: return j <= i;
    case 3: return j <= i + skv - sq;
    default: { int64_t d = j - (i + skv - sq); return d >= -p->pre && d <= p->next; }
    }
}

/* ---------------------------------------------------------------- the data */

/* An output row that attends nothing (or lies past its batch's length): zeros, and a
 * log-sum-exp of +inf. Each row is written once, right after its query row is read, so an
 * output in the query's own memory is still right. */
static void empty_row(const struct attn_args *p, const struct nn_view *o, const struct nn_view *lse, int64_t b,
                      int64_t n, int64_t row)
{
    int64_t ro = row_at(o, p->layout == L_BNSD_BSND ? L_BSND : p->layout, b, n, row, p->DV);
    for (int64_t x = 0; x < p->DV; x++) nn_st(o, ro + x * o->strides[o->ndim - 1], 0.0);
    if (lse) {
        int64_t li[4] = {b, n, row, 0}, lt[3] = {row, n, 0};
        nn_st(lse, nn_at(lse, p->layout == L_TND ? lt : li), INFINITY);
    }
}

static int run_attention(struct aclOpExecutor *ex)
{
    struct attn_args *p = ex->priv;
    const struct nn_view *q = &ex->views[p->vq], *k = &ex->views[p->vk], *v = &ex->views[p->vv],
                         *o = &ex->views[p->vo];
    const struct nn_view *mask = p->vmask >= 0 ? &ex->views[p->vmask] : NULL;
    const struct nn_view *table = p->vtable >= 0 ? &ex->views[p->vtable] : NULL;
    const struct nn_view *lse = p->vlse >= 0 ? &ex->views[p->vlse] : NULL;
    if (p->paged) { /* every block a batch reads must exist: CANN leaves this to the caller */
        int64_t nblocks = k->dims[0];
        for (int64_t b = 0; b < p->B; b++)
            for (int64_t t = 0; t * p->block_size < KVLEN(p, b); t++) {
                int64_t tidx[2] = {b, t}, blk = nn_ldi(table, nn_at(table, tidx));
                if (blk < 0 || blk >= nblocks)
                    return nn_fail(ACLNN_ERR_PARAM_INVALID, ex->api,
                                   "blockTable[%lld][%lld] = %lld is not a block of the cache (0..%lld)",
                                   (long long)b, (long long)t, (long long)blk, (long long)nblocks - 1);
            }
    }
    int lay_o = p->layout == L_BNSD_BSND ? L_BSND : p->layout;
    int64_t D = p->D, DV = p->DV, group = p->N / p->KVN, skv_max = 0;
    for (int64_t b = 0; b < p->B; b++) skv_max = KVLEN(p, b) > skv_max ? KVLEN(p, b) : skv_max;
    float *K = malloc(sizeof(float) * (size_t)(skv_max * D + 1));
    float *V = malloc(sizeof(float) * (size_t)(skv_max * DV + 1));
    float *s = malloc(sizeof(float) * (size_t)(skv_max + 1)), *qr = malloc(sizeof(float) * (size_t)(D + DV + 1));
    if (!K || !V || !s || !qr) {
        free(K), free(V), free(s), free(qr);
        return nn_fail(ACLNN_ERR_INNER, ex->api, "out of host memory");
    }
    float *acc = qr + D;
    int64_t ksx = k->strides[k->ndim - 1], vsx = v->strides[v->ndim - 1];
    int64_t qsx = q->strides[q->ndim - 1], osx = o->strides[o->ndim - 1];
    for (int64_t b = 0; b < p->B; b++) {
        int64_t sq = QLEN(p, b), skv = KVLEN(p, b);
        for (int64_t h = 0; h < p->KVN; h++) {
            for (int64_t j = 0; j < skv; j++) {
                int64_t ko = kv_at(p, k, table, b, h, j, D), vo = kv_at(p, v, table, b, h, j, DV);
                for (int64_t x = 0; x < D; x++) K[j * D + x] = nn_ldf(k, ko + x * ksx);
                for (int64_t x = 0; x < DV; x++) V[j * DV + x] = nn_ldf(v, vo + x * vsx);
            }
            for (int64_t n = h * group; n < (h + 1) * group; n++)
                for (int64_t i = 0; i < (p->layout == L_TND ? sq : p->Sq); i++) {
                    int64_t srow = p->layout == L_TND ? QSTART(p, b) + i : i;
                    if (i >= sq) { /* past the batch's actual length */
                        empty_row(p, o, lse, b, n, srow);
                        continue;
                    }
                    int64_t qo = row_at(q, p->layout, b, n, srow, D);
                    for (int64_t x = 0; x < D; x++) qr[x] = nn_ldf(q, qo + x * qsx);
                    float mx = -INFINITY, sum = 0.f;
                    for (int64_t j = 0; j < skv; j++) {
                        if (!attends(p, mask, b, i, j)) {
                            s[j] = -INFINITY;
                            continue;
                        }
                        float dot = 0.f;
                        for (int64_t x = 0; x < D; x++) dot += qr[x] * K[j * D + x];
                        s[j] = dot * (float)p->scale;
                        if (s[j] > mx) mx = s[j];
                    }
                    if (mx == -INFINITY) { /* nothing to attend */
                        empty_row(p, o, lse, b, n, srow);
                        continue;
                    }
                    for (int64_t x = 0; x < DV; x++) acc[x] = 0.f;
                    for (int64_t j = 0; j < skv; j++) {
                        if (s[j] == -INFINITY) continue;
                        float e = expf(s[j] - mx);
                        sum += e;
                        for (int64_t x = 0; x < DV; x++) acc[x] += e * V[j * DV + x];
                    }
                    int64_t oo = row_at(o, lay_o, b, n, srow, DV);
                    for (int64_t x = 0; x < DV; x++) nn_st(o, oo + x * osx, acc[x] / sum);
                    if (lse) {
                        int64_t li[4] = {b, n, i, 0}, lt[3] = {srow, n, 0};
                        nn_st(lse, nn_at(lse, p->layout == L_TND ? lt : li), mx + logf(sum));
                    }
                }
        }
    }
    /* TND tokens after the last batch's */
    for (int64_t r = p->B ? QSTART(p, p->B - 1) + QLEN(p, p->B - 1) : 0; p->layout == L_TND && r < p->T; r++)
        for (int64_t n = 0; n < p->N; n++) empty_row(p, o, lse, 0, n, r);
    free(K), free(V), free(s), free(qr);
    return ACLNN_SUCCESS;
}

/* ---------------------------------------------------------------- the cost */

/* Sum over integer i in [a, b) of max(0, s*i + c), s in {-1, 0, 1}. */
static double sum_positive(double a, double b, int s, double c)
{
    if (b <= a) return 0;
    if (s == 0) return c > 0 ? (b - a) * c : 0;
    /* where s*i + c > 0: i > -c (s = 1) or i < c (s = -1) */
    if (s > 0 && a < 1 - c) a = 1 - c;
    if (s < 0 && b > c) b = c;
    if (b <= a) return 0;
    return s * (a + b - 1) / 2 * (b - a) + c * (b - a); /* arithmetic series */
}

/* Query-key pairs batch b attends, by the structural mask: query row i attends keys
 * [max(0, i + off - pre), min(skv - 1, i + off + next)]. In closed form, so that a timing-only
 * call with a long sequence costs no time to price. */
static double pairs(const struct attn_args *p, bool has_mask, int64_t b)
{
    int64_t sq = QLEN(p, b), skv = KVLEN(p, b);
    if (p->decode) return (double)skv;
    int64_t off, pre, next;
    switch (p->sparse) {
    case 0:
        if (!has_mask) return (double)sq * (double)skv;
        off = 0, pre = p->pre, next = p->next;
        break;
    case 1: return (double)sq * (double)skv;
    case 2: off = 0, pre = TOKENS_MAX, next = 0; break;
    case 3: off = skv - sq, pre = TOKENS_MAX, next = 0; break;
    default: off = skv - sq, pre = p->pre, next = p->next; break;
    }
    if ((p->sparse == 2 || p->sparse == 3) && sq == skv)
        return (double)sq * (double)sq / 2.0; /* a causal square: as attention_prefill counts it */
    if (sq == 0 || skv == 0) return 0;
    /* keys of row i: min(A, i + c2) - max(0, i + c1) + 1, linear between the two corners */
    double A = (double)(skv - 1), c1 = (double)(off - pre), c2 = (double)(off + next);
    double p1 = A - c2 + 1, p2 = 1 - c1; /* i < p1: the upper end is i + c2; i < p2: the lower end is 0 */
    double cut[4] = {0, p1 < p2 ? p1 : p2, p1 < p2 ? p2 : p1, (double)sq}, n = 0;
    for (int k = 0; k < 3; k++) {
        double a = cut[k] < 0 ? 0 : cut[k] > sq ? (double)sq : cut[k];
        double e = cut[k + 1] < 0 ? 0 : cut[k + 1] > sq ? (double)sq : cut[k + 1];
        if (e <= a) continue;
        double mid = a; /* which case holds on [a, e): decided at its first point */
        bool upper_moves = mid < p1, lower_zero = mid < p2;
        int s = (upper_moves ? 1 : 0) - (lower_zero ? 0 : 1);
        double c = (upper_moves ? c2 : A) - (lower_zero ? 0 : c1) + 1;
        n += sum_positive(a, e, s, c);
    }
    return n;
}

static void attention_cost(struct aclOpExecutor *ex)
{
    struct attn_args *p = ex->priv;
    const struct nn_view *q = &ex->views[p->vq], *k = &ex->views[p->vk], *v = &ex->views[p->vv],
                         *o = &ex->views[p->vo];
    double flops = 0, bytes = 0, rows = 0;
    bool square = true;
    for (int64_t b = 0; b < p->B; b++) {
        double sq = (double)QLEN(p, b), skv = (double)KVLEN(p, b);
        flops += 2.0 * (double)p->N * (double)(p->D + p->DV) * pairs(p, p->vmask >= 0, b);
        bytes += (double)p->N * sq * ((double)p->D * q->esize + (double)p->DV * o->esize) +
                 (double)p->KVN * skv * ((double)p->D * k->esize + (double)p->DV * v->esize);
        if (p->vlse >= 0) bytes += (double)p->N * sq * 4.0;
        square = square && QLEN(p, b) == KVLEN(p, b);
        rows += ceil(sq / TILE_S);
    }
    ex->flops = flops;
    ex->hbm_bytes = bytes;
    if (p->decode) {
        ex->kernel = NN_K_IFA;
        ex->builtin = "attention_decode";
        ex->block_dim = nn_block_dim(NN_CORE_MIX, (double)(p->B * p->KVN));
    } else {
        ex->kernel = NN_K_PFA;
        ex->builtin = square ? "attention_prefill" : "attention_extend";
        ex->block_dim = nn_block_dim(NN_CORE_MIX, rows * (double)p->N);
    }
}

/* ---------------------------------------------------------------- checks */

static int parse_layout(const char *s, bool decode_op)
{
    if (strcmp(s, "BSH") == 0) return L_BSH;
    if (strcmp(s, "BSND") == 0) return L_BSND;
    if (strcmp(s, "BNSD") == 0) return L_BNSD;
    if (decode_op) return -1; /* IncreFlashAttention: BSH, BSND, BNSD */
    if (strcmp(s, "BNSD_BSND") == 0) return L_BNSD_BSND;
    if (strcmp(s, "TND") == 0) return L_TND;
    return -1;
}

/* Per-batch lengths from an actual-lengths array: NULL means `full` for every batch, one
 * value is every batch's, otherwise the first B values. TND arrays are cumulative ends. */
static int take_lengths(const char *api, const char *what, const aclIntArray *a, int64_t B, int64_t full,
                        bool cumulative, int64_t *len, int64_t *start)
{
    if (a && a->magic != NN_INT_ARRAY_MAGIC) return nn_fail(ACLNN_ERR_PARAM_INVALID, api, "%s is not an aclIntArray", what);
    if (a && a->size != 1 && (int64_t)a->size < B)
        return nn_fail(ACLNN_ERR_PARAM_INVALID, api, "%s has %llu values for %lld batches", what,
                       (unsigned long long)a->size, (long long)B);
    int64_t prev = 0;
    for (int64_t b = 0; b < B; b++) {
        int64_t x = !a ? full : a->values[a->size == 1 ? 0 : b];
        if (cumulative) {
            if (x < prev || x > full)
                return nn_fail(ACLNN_ERR_PARAM_INVALID, api, "%s must rise from 0 to at most %lld (TND: cumulative)",
                               what, (long long)full);
            start[b] = prev;
            len[b] = x - prev;
            prev = x;
        } else {
            if (x < 0 || x > full)
                return nn_fail(ACLNN_ERR_PARAM_INVALID, api, "%s[%lld] = %lld is outside 0..%lld", what, (long long)b,
                               (long long)x, (long long)full);
            start[b] = 0;
            len[b] = x;
        }
    }
    return ACLNN_SUCCESS;
}

static int single_tensor(const char *api, const aclTensorList *l, const aclTensor *t, const char *what,
                         const aclTensor **out)
{
    if (t) {
        *out = t;
        return ACLNN_SUCCESS;
    }
    if (!l) return nn_fail(ACLNN_ERR_PARAM_NULLPTR, api, "%s is NULL", what);
    if (l->magic != NN_TENSOR_LIST_MAGIC) return nn_fail(ACLNN_ERR_PARAM_INVALID, api, "%s is not an aclTensorList", what);
    if (l->size != 1)
        return nn_fail(ACLNN_ERR_PARAM_INVALID, api,
                       "%s holds %llu tensors; the emulator takes one (one tensor per batch is not emulated)", what,
                       (unsigned long long)l->size);
    *out = l->items[0];
    return ACLNN_SUCCESS;
}

#define BAD(...) (rc = nn_fail(ACLNN_ERR_PARAM_INVALID, api, __VA_ARGS__))

/* The query's dims per layout: B, S, N, D (TND: T, N, D; BSH: H = N*D). */
static int query_shape(const char *api, struct attn_args *p, const struct nn_view *q, int64_t num_heads)
{
    int rc = ACLNN_SUCCESS;
    int want = p->layout == L_BSH || p->layout == L_TND ? 3 : 4;
    if ((int)q->ndim != want) return BAD("query must have %d dimensions in this layout, not %u", want, q->ndim);
    switch (p->layout) {
    case L_BSH:
        p->B = q->dims[0], p->Sq = q->dims[1];
        if (q->dims[2] % num_heads) return BAD("query's H (%lld) is not a multiple of numHeads", (long long)q->dims[2]);
        p->D = q->dims[2] / num_heads;
        break;
    case L_BSND: p->B = q->dims[0], p->Sq = q->dims[1], p->D = q->dims[3]; break;
    case L_TND: p->T = q->dims[0], p->D = q->dims[2]; break;
    default: p->B = q->dims[0], p->Sq = q->dims[2], p->D = q->dims[3]; break;
    }
    int64_t n = p->layout == L_BSND ? q->dims[2] : p->layout == L_BSH ? num_heads : q->dims[1];
    if (n != num_heads) return BAD("query has %lld heads, numHeads is %lld", (long long)n, (long long)num_heads);
    if (p->D <= 0) return BAD("query's head dimension is 0");
    return rc;
}

/* Key and value shapes (non-paged or paged) give KV S and the value head dimension. */
static int kv_shape(const char *api, struct attn_args *p, const struct nn_view *k, const struct nn_view *v,
                    const struct nn_view *table)
{
    int rc = ACLNN_SUCCESS;
    if (k->ndim != v->ndim) return BAD("key and value have different ranks");
    if (p->paged) {
        if (table->ndim != 2 || table->dtype != ACL_INT32 || table->dims[0] != p->B)
            return BAD("blockTable must be INT32 of shape [B=%lld, maxBlockNumPerSeq]", (long long)p->B);
        if (p->block_size <= 0) return BAD("blockSize must be positive with a blockTable");
        p->max_blocks = table->dims[1];
        p->Skv = p->max_blocks * p->block_size;
        if (k->ndim == 3) { /* BnBsH */
            p->kv_heads_major = false;
            if (k->dims[1] != p->block_size || v->dims[1] != p->block_size || k->dims[0] != v->dims[0] ||
                k->dims[2] != p->KVN * p->D || v->dims[2] % p->KVN)
                return BAD("paged key/value must be [blockNum, blockSize=%lld, numKeyValueHeads*D]", (long long)p->block_size);
            p->DV = v->dims[2] / p->KVN;
        } else if (k->ndim == 4) { /* BnNBsD */
            p->kv_heads_major = true;
            if (k->dims[1] != p->KVN || v->dims[1] != p->KVN || k->dims[2] != p->block_size ||
                v->dims[2] != p->block_size || k->dims[3] != p->D || k->dims[0] != v->dims[0])
                return BAD("paged key/value must be [blockNum, numKeyValueHeads, blockSize=%lld, D]", (long long)p->block_size);
            p->DV = v->dims[3];
        } else {
            return BAD("paged key/value must have 3 or 4 dimensions");
        }
        return rc;
    }
    int want = p->layout == L_BSH || p->layout == L_TND ? 3 : 4;
    if ((int)k->ndim != want) return BAD("key and value must have %d dimensions in this layout", want);
    int64_t kb, kn, kd, vd, ks = 0, vs = 0;
    switch (p->layout) {
    case L_BSH:
        kb = k->dims[0], ks = k->dims[1], kn = p->KVN;
        if (k->dims[2] != p->KVN * p->D || v->dims[2] % p->KVN) return BAD("key's H must be numKeyValueHeads * D");
        kd = p->D, vd = v->dims[2] / p->KVN, vs = v->dims[1];
        if (v->dims[0] != kb) return BAD("key and value batches differ");
        break;
    case L_BSND:
        kb = k->dims[0], ks = k->dims[1], kn = k->dims[2], kd = k->dims[3], vd = v->dims[3], vs = v->dims[1];
        if (v->dims[0] != kb || v->dims[2] != kn) return BAD("key and value shapes differ");
        break;
    case L_TND:
        kb = p->B, ks = k->dims[0], kn = k->dims[1], kd = k->dims[2], vd = v->dims[2], vs = v->dims[0];
        if (v->dims[1] != kn) return BAD("key and value shapes differ");
        break;
    default:
        kb = k->dims[0], kn = k->dims[1], ks = k->dims[2], kd = k->dims[3], vd = v->dims[3], vs = v->dims[2];
        if (v->dims[0] != kb || v->dims[1] != kn) return BAD("key and value shapes differ");
        break;
    }
    if (kb != p->B) return BAD("key's batch (%lld) differs from query's (%lld)", (long long)kb, (long long)p->B);
    if (kn != p->KVN) return BAD("key has %lld heads, numKeyValueHeads is %lld", (long long)kn, (long long)p->KVN);
    if (kd != p->D) return BAD("key's head dimension (%lld) differs from query's (%lld)", (long long)kd, (long long)p->D);
    if (vs != ks) return BAD("key and value sequence lengths differ");
    p->Skv = ks;
    p->DV = vd;
    if (p->DV <= 0) return BAD("value's head dimension is 0");
    return rc;
}

static int mask_shape(const char *api, struct attn_args *p, const struct nn_view *m)
{
    int rc = ACLNN_SUCCESS;
    if (m->dtype != ACL_BOOL && m->dtype != ACL_INT8 && m->dtype != ACL_UINT8)
        return BAD("attenMask must be BOOL, INT8 or UINT8, not %s", nn_dtype_name(m->dtype));
    int nd = (int)m->ndim;
    if (nd < 2 || nd > 4) return BAD("attenMask must have 2 to 4 dimensions");
    for (int i = 0; i < nd - 2; i++)
        if (m->dims[i] != 1 && !(i == 0 && m->dims[0] == p->B)) return BAD("attenMask's leading dimensions must be B or 1");
    if (p->decode) { /* (B,S2) (B,1,S2) (B,1,1,S2): one row per batch */
        if (m->dims[0] != p->B && m->dims[0] != 1) return BAD("attenMask's first dimension must be B");
        if (nd >= 3 && m->dims[nd - 2] != 1) return BAD("attenMask must be (B, KV_S), (B,1,KV_S) or (B,1,1,KV_S)");
        if (m->dims[nd - 1] < p->Skv) return BAD("attenMask's last dimension is shorter than KV S (%lld)", (long long)p->Skv);
        return rc;
    }
    if (p->sparse >= 2) {
        if (m->dims[nd - 1] != COMPRESSED_MASK || m->dims[nd - 2] != COMPRESSED_MASK || (nd >= 3 && m->dims[0] != 1))
            return BAD("sparseMode %d takes the optimised (2048, 2048) mask", p->sparse);
        return rc;
    }
    if (p->layout == L_TND) return BAD("TND takes sparseMode 0 without a mask, or 2-4 with the optimised mask");
    if (m->dims[nd - 2] < p->Sq || m->dims[nd - 1] < p->Skv)
        return BAD("attenMask must cover (Q_S=%lld, KV_S=%lld)", (long long)p->Sq, (long long)p->Skv);
    return rc;
}

static int attn_prepare(struct attn_call *c, uint64_t *workspaceSize, aclOpExecutor **executor)
{
    const char *api = c->api;
    struct aclOpExecutor *ex = nn_executor_new(api, NN_K_PFA, run_attention, sizeof(struct attn_args));
    if (!ex) return nn_fail(ACLNN_ERR_INNER_CREATE_EXECUTOR, api, "out of host memory");
    const aclTensor *key = NULL, *value = NULL;
    struct nn_view *q, *k, *v, *o, *m = NULL, *t = NULL, *l = NULL;
    int rc = nn_take(ex, api, c->query, "query", &q);
    if (!rc) rc = single_tensor(api, c->key_list, c->key, "key", &key);
    if (!rc) rc = single_tensor(api, c->value_list, c->value, "value", &value);
    if (!rc) rc = nn_take(ex, api, key, "key", &k);
    if (!rc) rc = nn_take(ex, api, value, "value", &v);
    if (!rc) rc = nn_take(ex, api, c->out, "attentionOut", &o);
    if (!rc && !c->layout) rc = nn_fail(ACLNN_ERR_PARAM_NULLPTR, api, "inputLayout is NULL");
    if (!rc && c->mask) rc = nn_take(ex, api, c->mask, "attenMask", &m);
    if (!rc && c->table) rc = nn_take(ex, api, c->table, "blockTable", &t);
    if (!rc && c->lse_flag) rc = nn_take(ex, api, c->lse, "softmaxLse", &l);
    if (rc) return nn_finish(ex, rc, workspaceSize, executor);
    struct attn_args *p = ex->priv;
    p->vq = 0, p->vk = 1, p->vv = 2, p->vo = 3;
    p->vmask = m ? (int)(m - ex->views) : -1;
    p->vtable = t ? (int)(t - ex->views) : -1;
    p->vlse = l ? (int)(l - ex->views) : -1;
    if (c->unsupported) BAD("%s is not emulated (pass NULL)", c->unsupported);
    if (!rc && (p->layout = parse_layout(c->layout, c->decode_op)) < 0)
        BAD("inputLayout '%.16s' is not one of %s", c->layout,
            c->decode_op ? "BSH, BSND, BNSD" : "BSH, BSND, BNSD, BNSD_BSND, TND");
    if (!rc && !nn_is_float16ish(q->dtype))
        BAD("query is %s; the emulator takes FLOAT16 or BFLOAT16", nn_dtype_name(q->dtype));
    if (!rc && (k->dtype != q->dtype || v->dtype != q->dtype || o->dtype != q->dtype))
        BAD("key, value and attentionOut must have query's dtype (quantised forms are not emulated)");
    if (!rc && c->num_heads <= 0) BAD("numHeads is %lld", (long long)c->num_heads);
    int64_t kvh = c->num_kv_heads ? c->num_kv_heads : c->num_heads;
    if (!rc && (kvh <= 0 || c->num_heads % kvh || c->num_heads / kvh > MAX_GROUP))
        BAD("numHeads (%lld) must be a multiple of numKeyValueHeads (%lld), at most 64 times it", (long long)c->num_heads,
            (long long)kvh);
    if (!rc && (c->inner_precise < 0 || c->inner_precise > (c->decode_op ? 1 : 3)))
        BAD("innerPrecise %lld is out of range", (long long)c->inner_precise);
    if (!rc && !c->decode_op && (c->sparse < 0 || c->sparse > 4))
        BAD("sparseMode %lld is not emulated (0-4 are)", (long long)c->sparse);
    if (!rc && !(c->scale == c->scale)) BAD("scaleValue is NaN");
    if (rc) return nn_finish(ex, rc, workspaceSize, executor);
    p->N = c->num_heads, p->KVN = kvh, p->scale = c->scale, p->sparse = (int)c->sparse;
    /* preTokens/nextTokens: defaults are INT32_MAX or more; clamped so that sums cannot overflow */
    p->pre = c->pre < -TOKENS_MAX ? -TOKENS_MAX : c->pre > TOKENS_MAX ? TOKENS_MAX : c->pre;
    p->next = c->next < -TOKENS_MAX ? -TOKENS_MAX : c->next > TOKENS_MAX ? TOKENS_MAX : c->next;
    p->paged = t != NULL, p->block_size = c->block_size;
    rc = query_shape(api, p, q, c->num_heads);
    if (!rc && p->layout == L_TND) { /* B comes from the lengths */
        if (!c->qlens || !c->kvlens) BAD("TND needs actualSeqLengths and actualSeqLengthsKv");
        else if (c->qlens->magic != NN_INT_ARRAY_MAGIC) BAD("actualSeqLengths is not an aclIntArray");
        else p->B = (int64_t)c->qlens->size;
        if (!rc && p->B < 1) BAD("actualSeqLengths is empty");
    }
    if (!rc && (p->B < 1 || p->B > 65536)) BAD("batch %lld is outside 1..65536", (long long)p->B);
    if (rc) return nn_finish(ex, rc, workspaceSize, executor);
    /* room for the per-batch lengths */
    struct attn_args *grown = realloc(ex->priv, sizeof *p + 4 * (size_t)p->B * sizeof(int64_t));
    if (!grown) return nn_finish(ex, nn_fail(ACLNN_ERR_INNER, api, "out of host memory"), workspaceSize, executor);
    ex->priv = p = grown;
    p->decode = c->decode_op || (c->fused && p->layout != L_TND && p->Sq == 1);
    if (p->decode && p->Sq != 1) BAD("query's S must be 1 (it is %lld)", (long long)p->Sq);
    if (!rc) rc = kv_shape(api, p, k, v, t);
    if (rc) return nn_finish(ex, rc, workspaceSize, executor);
    /* output: query's shape with D = value's; BNSD_BSND writes BSND */
    int64_t want[4];
    uint32_t nw = q->ndim;
    memcpy(want, q->dims, nw * sizeof *want);
    if (p->layout == L_BSH) want[2] = p->N * p->DV;
    else want[nw - 1] = p->DV;
    if (p->layout == L_BNSD_BSND) want[1] = p->Sq, want[2] = p->N;
    if (!nn_same_shape(o, want, nw)) {
        char s[96];
        nn_shape_str(want, nw, s, sizeof s);
        BAD("attentionOut must have shape %s", s);
    }
    if (!rc && l) {
        int64_t lw[4] = {p->B, p->N, p->Sq, 1}, lt[3] = {p->T, p->N, 1};
        bool tnd = p->layout == L_TND;
        if (l->dtype != ACL_FLOAT || !nn_same_shape(l, tnd ? lt : lw, tnd ? 3 : 4))
            BAD("softmaxLse must be FLOAT of shape %s", tnd ? "[T, N, 1]" : "[B, N, Q_S, 1]");
    }
    /* lengths: IFA's actualSeqLengths are the KV lengths; the decode branch ignores query lengths */
    const aclIntArray *kvlens = c->decode_op ? c->qlens : c->kvlens;
    if (!rc && p->paged && !kvlens) BAD("a paged KV cache needs the actual KV lengths");
    bool tnd = p->layout == L_TND;
    if (!rc)
        rc = take_lengths(api, "actualSeqLengths", p->decode ? NULL : c->qlens, p->B, tnd ? p->T : p->Sq, tnd,
                          &QLEN(p, 0), &QSTART(p, 0));
    if (!rc)
        rc = take_lengths(api, c->decode_op ? "actualSeqLengths" : "actualSeqLengthsKv", kvlens, p->B,
                          tnd && !p->paged ? k->dims[0] : p->Skv, tnd && !p->paged, &KVLEN(p, 0), &KVSTART(p, 0));
    if (!rc && p->decode)
        for (int64_t b = 0; b < p->B; b++) QLEN(p, b) = 1;
    if (!rc && m && p->decode && c->fused && p->sparse >= 2)
        p->vmask = -1; /* the decode branch ignores sparseMode, and its optimised causal mask hides nothing */
    else if (!rc && m)
        rc = mask_shape(api, p, m);
    if (!rc && !m && !p->decode && p->sparse >= 1) BAD("sparseMode %d needs attenMask", p->sparse);
    if (!rc) attention_cost(ex);
    return nn_finish(ex, rc, workspaceSize, executor);
}

#define UNSUPPORTED(c, arg) \
    do { if ((arg) && !(c).unsupported) (c).unsupported = #arg; } while (0)

/* ---------------------------------------------------------------- PromptFlashAttentionV3 */

NN_API aclnnStatus aclnnPromptFlashAttentionV3GetWorkspaceSize(
    const aclTensor *query, const aclTensor *key, const aclTensor *value, const aclTensor *pseShift,
    const aclTensor *attenMask, const aclIntArray *actualSeqLengths, const aclIntArray *actualSeqLengthsKv,
    const aclTensor *deqScale1, const aclTensor *quantScale1, const aclTensor *deqScale2, const aclTensor *quantScale2,
    const aclTensor *quantOffset2, int64_t numHeads, double scaleValue, int64_t preTokens, int64_t nextTokens,
    char *inputLayout, int64_t numKeyValueHeads, int64_t sparseMode, int64_t innerPrecise,
    const aclTensor *attentionOut, uint64_t *workspaceSize, aclOpExecutor **executor)
{
    struct attn_call c = {
        .api = "aclnnPromptFlashAttentionV3", .query = query, .key = key, .value = value, .mask = attenMask,
        .out = attentionOut, .qlens = actualSeqLengths, .kvlens = actualSeqLengthsKv, .num_heads = numHeads,
        .num_kv_heads = numKeyValueHeads, .pre = preTokens, .next = nextTokens, .sparse = sparseMode,
        .inner_precise = innerPrecise, .scale = scaleValue, .layout = inputLayout,
    };
    if (!key) return nn_fail(ACLNN_ERR_PARAM_NULLPTR, c.api, "key is NULL");
    if (!value) return nn_fail(ACLNN_ERR_PARAM_NULLPTR, c.api, "value is NULL");
    UNSUPPORTED(c, pseShift);
    UNSUPPORTED(c, deqScale1);
    UNSUPPORTED(c, quantScale1);
    UNSUPPORTED(c, deqScale2);
    UNSUPPORTED(c, quantScale2);
    UNSUPPORTED(c, quantOffset2);
    return attn_prepare(&c, workspaceSize, executor);
}

NN_API aclnnStatus aclnnPromptFlashAttentionV3(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                               const aclrtStream stream)
{
    return nn_execute("aclnnPromptFlashAttentionV3", workspace, workspaceSize, executor, stream);
}

/* ---------------------------------------------------------------- IncreFlashAttentionV4 */

NN_API aclnnStatus aclnnIncreFlashAttentionV4GetWorkspaceSize(
    const aclTensor *query, const aclTensorList *key, const aclTensorList *value, const aclTensor *pseShift,
    const aclTensor *attenMask, const aclIntArray *actualSeqLengths, const aclTensor *dequantScale1,
    const aclTensor *quantScale1, const aclTensor *dequantScale2, const aclTensor *quantScale2,
    const aclTensor *quantOffset2, const aclTensor *antiquantScale, const aclTensor *antiquantOffset,
    const aclTensor *blocktable, const aclTensor *kvPaddingSize, int64_t numHeads, double scaleValue,
    char *inputLayout, int64_t numKeyValueHeads, int64_t blockSize, int64_t innerPrecise,
    const aclTensor *attentionOut, uint64_t *workspaceSize, aclOpExecutor **executor)
{
    struct attn_call c = {
        .api = "aclnnIncreFlashAttentionV4", .decode_op = true, .query = query, .key_list = key,
        .value_list = value, .mask = attenMask, .table = blocktable, .out = attentionOut, .qlens = actualSeqLengths,
        .num_heads = numHeads, .num_kv_heads = numKeyValueHeads, .inner_precise = innerPrecise,
        .block_size = blockSize, .scale = scaleValue, .layout = inputLayout,
    };
    UNSUPPORTED(c, pseShift);
    UNSUPPORTED(c, dequantScale1);
    UNSUPPORTED(c, quantScale1);
    UNSUPPORTED(c, dequantScale2);
    UNSUPPORTED(c, quantScale2);
    UNSUPPORTED(c, quantOffset2);
    UNSUPPORTED(c, antiquantScale);
    UNSUPPORTED(c, antiquantOffset);
    UNSUPPORTED(c, kvPaddingSize);
    return attn_prepare(&c, workspaceSize, executor);
}

NN_API aclnnStatus aclnnIncreFlashAttentionV4(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                              const aclrtStream stream)
{
    return nn_execute("aclnnIncreFlashAttentionV4", workspace, workspaceSize, executor, stream);
}

/* ---------------------------------------------------------------- FusedInferAttentionScoreV2-V4 */

/* The arguments V2, V3 and V4 share; V3 and V4 add inputs the emulator does not take. */
#define FIA_CALL(name)                                                                                        \
    struct attn_call c = {                                                                                    \
        .api = name, .fused = true, .query = query, .key_list = key, .value_list = value,                     \
        .mask = attenMaskOptional, .table = blockTableOptional, .out = attentionOut, .lse = softmaxLse,       \
        .qlens = actualSeqLengthsOptional, .kvlens = actualSeqLengthsKvOptional, .num_heads = numHeads,       \
        .num_kv_heads = numKeyValueHeads, .pre = preTokens, .next = nextTokens, .sparse = sparseMode,         \
        .inner_precise = innerPrecise, .block_size = blockSize, .scale = scaleValue, .layout = inputLayout,   \
        .lse_flag = softmaxLseFlag,                                                                           \
    };                                                                                                        \
    (void)antiquantMode, (void)keyAntiquantMode, (void)valueAntiquantMode;                                    \
    UNSUPPORTED(c, pseShiftOptional);                                                                         \
    UNSUPPORTED(c, deqScale1Optional);                                                                        \
    UNSUPPORTED(c, quantScale1Optional);                                                                      \
    UNSUPPORTED(c, deqScale2Optional);                                                                        \
    UNSUPPORTED(c, quantScale2Optional);                                                                      \
    UNSUPPORTED(c, quantOffset2Optional);                                                                     \
    UNSUPPORTED(c, antiquantScaleOptional);                                                                   \
    UNSUPPORTED(c, antiquantOffsetOptional);                                                                  \
    UNSUPPORTED(c, queryPaddingSizeOptional);                                                                 \
    UNSUPPORTED(c, kvPaddingSizeOptional);                                                                    \
    UNSUPPORTED(c, keyAntiquantScaleOptional);                                                                \
    UNSUPPORTED(c, keyAntiquantOffsetOptional);                                                               \
    UNSUPPORTED(c, valueAntiquantScaleOptional);                                                              \
    UNSUPPORTED(c, valueAntiquantOffsetOptional);                                                             \
    UNSUPPORTED(c, keySharedPrefixOptional);                                                                  \
    UNSUPPORTED(c, valueSharedPrefixOptional);                                                                \
    UNSUPPORTED(c, actualSharedPrefixLenOptional)

NN_API aclnnStatus aclnnFusedInferAttentionScoreV2GetWorkspaceSize(
    const aclTensor *query, const aclTensorList *key, const aclTensorList *value, const aclTensor *pseShiftOptional,
    const aclTensor *attenMaskOptional, const aclIntArray *actualSeqLengthsOptional,
    const aclIntArray *actualSeqLengthsKvOptional, const aclTensor *deqScale1Optional,
    const aclTensor *quantScale1Optional, const aclTensor *deqScale2Optional, const aclTensor *quantScale2Optional,
    const aclTensor *quantOffset2Optional, const aclTensor *antiquantScaleOptional,
    const aclTensor *antiquantOffsetOptional, const aclTensor *blockTableOptional,
    const aclTensor *queryPaddingSizeOptional, const aclTensor *kvPaddingSizeOptional,
    const aclTensor *keyAntiquantScaleOptional, const aclTensor *keyAntiquantOffsetOptional,
    const aclTensor *valueAntiquantScaleOptional, const aclTensor *valueAntiquantOffsetOptional,
    const aclTensor *keySharedPrefixOptional, const aclTensor *valueSharedPrefixOptional,
    const aclIntArray *actualSharedPrefixLenOptional, int64_t numHeads, double scaleValue, int64_t preTokens,
    int64_t nextTokens, char *inputLayout, int64_t numKeyValueHeads, int64_t sparseMode, int64_t innerPrecise,
    int64_t blockSize, int64_t antiquantMode, bool softmaxLseFlag, int64_t keyAntiquantMode,
    int64_t valueAntiquantMode, const aclTensor *attentionOut, const aclTensor *softmaxLse, uint64_t *workspaceSize,
    aclOpExecutor **executor)
{
    FIA_CALL("aclnnFusedInferAttentionScoreV2");
    return attn_prepare(&c, workspaceSize, executor);
}

NN_API aclnnStatus aclnnFusedInferAttentionScoreV2(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                                   const aclrtStream stream)
{
    return nn_execute("aclnnFusedInferAttentionScoreV2", workspace, workspaceSize, executor, stream);
}

NN_API aclnnStatus aclnnFusedInferAttentionScoreV3GetWorkspaceSize(
    const aclTensor *query, const aclTensorList *key, const aclTensorList *value, const aclTensor *pseShiftOptional,
    const aclTensor *attenMaskOptional, const aclIntArray *actualSeqLengthsOptional,
    const aclIntArray *actualSeqLengthsKvOptional, const aclTensor *deqScale1Optional,
    const aclTensor *quantScale1Optional, const aclTensor *deqScale2Optional, const aclTensor *quantScale2Optional,
    const aclTensor *quantOffset2Optional, const aclTensor *antiquantScaleOptional,
    const aclTensor *antiquantOffsetOptional, const aclTensor *blockTableOptional,
    const aclTensor *queryPaddingSizeOptional, const aclTensor *kvPaddingSizeOptional,
    const aclTensor *keyAntiquantScaleOptional, const aclTensor *keyAntiquantOffsetOptional,
    const aclTensor *valueAntiquantScaleOptional, const aclTensor *valueAntiquantOffsetOptional,
    const aclTensor *keySharedPrefixOptional, const aclTensor *valueSharedPrefixOptional,
    const aclIntArray *actualSharedPrefixLenOptional, const aclTensor *queryRopeOptional,
    const aclTensor *keyRopeOptional, const aclTensor *keyRopeAntiquantScaleOptional, int64_t numHeads,
    double scaleValue, int64_t preTokens, int64_t nextTokens, char *inputLayout, int64_t numKeyValueHeads,
    int64_t sparseMode, int64_t innerPrecise, int64_t blockSize, int64_t antiquantMode, bool softmaxLseFlag,
    int64_t keyAntiquantMode, int64_t valueAntiquantMode, const aclTensor *attentionOut, const aclTensor *softmaxLse,
    uint64_t *workspaceSize, aclOpExecutor **executor)
{
    FIA_CALL("aclnnFusedInferAttentionScoreV3");
    UNSUPPORTED(c, queryRopeOptional);
    UNSUPPORTED(c, keyRopeOptional);
    UNSUPPORTED(c, keyRopeAntiquantScaleOptional);
    return attn_prepare(&c, workspaceSize, executor);
}

NN_API aclnnStatus aclnnFusedInferAttentionScoreV3(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                                   const aclrtStream stream)
{
    return nn_execute("aclnnFusedInferAttentionScoreV3", workspace, workspaceSize, executor, stream);
}

NN_API aclnnStatus aclnnFusedInferAttentionScoreV4GetWorkspaceSize(
    const aclTensor *query, const aclTensorList *key, const aclTensorList *value, const aclTensor *pseShiftOptional,
    const aclTensor *attenMaskOptional, const aclIntArray *actualSeqLengthsOptional,
    const aclIntArray *actualSeqLengthsKvOptional, const aclTensor *deqScale1Optional,
    const aclTensor *quantScale1Optional, const aclTensor *deqScale2Optional, const aclTensor *quantScale2Optional,
    const aclTensor *quantOffset2Optional, const aclTensor *antiquantScaleOptional,
    const aclTensor *antiquantOffsetOptional, const aclTensor *blockTableOptional,
    const aclTensor *queryPaddingSizeOptional, const aclTensor *kvPaddingSizeOptional,
    const aclTensor *keyAntiquantScaleOptional, const aclTensor *keyAntiquantOffsetOptional,
    const aclTensor *valueAntiquantScaleOptional, const aclTensor *valueAntiquantOffsetOptional,
    const aclTensor *keySharedPrefixOptional, const aclTensor *valueSharedPrefixOptional,
    const aclIntArray *actualSharedPrefixLenOptional, const aclTensor *queryRopeOptional,
    const aclTensor *keyRopeOptional, const aclTensor *keyRopeAntiquantScaleOptional,
    const aclTensor *dequantScaleQueryOptional, const aclTensor *learnableSinkOptional, int64_t numHeads,
    double scaleValue, int64_t preTokens, int64_t nextTokens, char *inputLayout, int64_t numKeyValueHeads,
    int64_t sparseMode, int64_t innerPrecise, int64_t blockSize, int64_t antiquantMode, bool softmaxLseFlag,
    int64_t keyAntiquantMode, int64_t valueAntiquantMode, int64_t queryQuantMode, const aclTensor *attentionOut,
    const aclTensor *softmaxLse, uint64_t *workspaceSize, aclOpExecutor **executor)
{
    FIA_CALL("aclnnFusedInferAttentionScoreV4");
    UNSUPPORTED(c, queryRopeOptional);
    UNSUPPORTED(c, keyRopeOptional);
    UNSUPPORTED(c, keyRopeAntiquantScaleOptional);
    UNSUPPORTED(c, dequantScaleQueryOptional);
    UNSUPPORTED(c, learnableSinkOptional);
    if (queryQuantMode && !c.unsupported) c.unsupported = "queryQuantMode (non-zero)";
    return attn_prepare(&c, workspaceSize, executor);
}

NN_API aclnnStatus aclnnFusedInferAttentionScoreV4(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                                   const aclrtStream stream)
{
    return nn_execute("aclnnFusedInferAttentionScoreV4", workspace, workspaceSize, executor, stream);
}
