// An aclnn program written the way CANN's operator docs show ("调用示例"): aclInit, a device and
// a stream, tensors from aclrtMalloc'd memory with aclCreateTensor (contiguous strides, ND),
// the two-stage call (aclnnXxxGetWorkspaceSize, a workspace if asked for, aclnnXxx), a stream
// synchronisation, the result copied back, every handle destroyed. It includes only CANN's
// headers and links -lascendcl -lopapi -lnnopbase, so it builds against CANN or the emulator.
//
//     aclnn_ops OP DTYPE ARGS... IN OUT
//
// IN holds the op's input tensors' bytes back to back (in the order below), OUT gets its
// outputs' bytes; the caller makes the inputs and checks the outputs. DTYPE: fp32, fp16, bf16.
//
//     add        SHAPE ALPHA            self, other              -> out            (SHAPE: 4x2, ...)
//     mul        SHAPE                  self, other              -> out
//     matmul     M K N                  self [M,K], mat2 [K,N]   -> out [M,N]
//     rms_norm   ROWS DIM EPS           x [ROWS,DIM], gamma [DIM] -> y, rstd [ROWS,1] (fp32)
//     softmax    ROWS COLS              self                     -> out (dim -1)
//     silu       N                      self [N]                 -> out
//     swi_glu    ROWS COLS              x [ROWS,COLS]            -> out [ROWS,COLS/2] (dim -1)
//     rope       S NQ NK D              q [1,S,NQ,D], k [1,S,NK,D], cos, sin [1,S,1,D] -> q, k (BSND)
//     pfa        S KV N NKV D CAUSAL    q [1,S,N,D], k, v [1,KV,NKV,D] -> out (BSND; V3)
//     ifa        B N NKV D L1,L2,..     q [B,1,N,D], k, v [B,max L,NKV,D] -> out (BSND; V4)
//     fia        S KV N NKV D CAUSAL    as pfa, through FusedInferAttentionScoreV2
//
// CAUSAL 1 is sparse mode 3 (the causal mask aligned to the last key) with CANN's compressed
// 2048 x 2048 mask; 0 attends to every key. Exit status: 0, or the first failing call's code.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "acl/acl.h"
#include "aclnnop/aclnn_add.h"
#include "aclnnop/aclnn_apply_rotary_pos_emb.h"
#include "aclnnop/aclnn_fused_infer_attention_score_v2.h"
#include "aclnnop/aclnn_incre_flash_attention_v4.h"
#include "aclnnop/aclnn_matmul.h"
#include "aclnnop/aclnn_mul.h"
#include "aclnnop/aclnn_prompt_flash_attention_v3.h"
#include "aclnnop/aclnn_rms_norm.h"
#include "aclnnop/aclnn_silu.h"
#include "aclnnop/aclnn_softmax.h"
#include "aclnnop/aclnn_swi_glu.h"

#define CHECK(expr)                                                                 \
    do {                                                                            \
        auto rc_ = (expr);                                                          \
        if (rc_ != 0) {                                                             \
            const char *m_ = aclGetRecentErrMsg();                                  \
            fprintf(stderr, "aclnn_ops: %s failed: %d (%s)\n", #expr, (int)rc_,     \
                    m_ ? m_ : "");                                                  \
            exit((int)rc_ & 0xff ? (int)rc_ & 0xff : 1);                            \
        }                                                                           \
    } while (0)

namespace {

struct Tensor {
    std::vector<int64_t> shape;
    aclDataType dtype;
    void *dev = nullptr;
    aclTensor *t = nullptr;
    bool listed = false;  // in an aclTensorList, which destroys it (CANN: aclDestroyTensorList)
    size_t bytes() const {
        size_t n = dtype == ACL_FLOAT ? 4 : 2;
        for (auto d : shape) n *= (size_t)d;
        return n;
    }
};

std::vector<char> g_in;
size_t g_in_at = 0;
std::vector<Tensor *> g_tensors;
aclrtStream g_stream;

aclDataType parse_dtype(const char *s) {
    if (!strcmp(s, "fp32")) return ACL_FLOAT;
    if (!strcmp(s, "fp16")) return ACL_FLOAT16;
    if (!strcmp(s, "bf16")) return ACL_BF16;
    fprintf(stderr, "aclnn_ops: unknown dtype %s\n", s);
    exit(2);
}

std::vector<int64_t> parse_shape(const std::string &s, char sep) {
    std::vector<int64_t> out;
    size_t at = 0;
    while (at <= s.size()) {
        size_t next = s.find(sep, at);
        if (next == std::string::npos) next = s.size();
        out.push_back(atoll(s.substr(at, next - at).c_str()));
        at = next + 1;
    }
    return out;
}

// a tensor on the device; input: filled with its next bytes of IN
Tensor *tensor(std::vector<int64_t> shape, aclDataType dtype, bool input) {
    Tensor *x = new Tensor{shape, dtype};
    size_t n = x->bytes();
    CHECK(aclrtMalloc(&x->dev, n, ACL_MEM_MALLOC_HUGE_FIRST));
    if (input) {
        if (g_in_at + n > g_in.size()) {
            fprintf(stderr, "aclnn_ops: the input file is short\n");
            exit(2);
        }
        CHECK(aclrtMemcpy(x->dev, n, g_in.data() + g_in_at, n, ACL_MEMCPY_HOST_TO_DEVICE));
        g_in_at += n;
    } else {
        CHECK(aclrtMemset(x->dev, n, 0, n));
    }
    std::vector<int64_t> strides(shape.size(), 1);
    for (int64_t i = (int64_t)shape.size() - 2; i >= 0; i--) strides[i] = shape[i + 1] * strides[i + 1];
    x->t = aclCreateTensor(shape.data(), shape.size(), dtype, strides.data(), 0, ACL_FORMAT_ND, shape.data(),
                           shape.size(), x->dev);
    if (!x->t) {
        fprintf(stderr, "aclnn_ops: aclCreateTensor failed\n");
        exit(1);
    }
    g_tensors.push_back(x);
    return x;
}

// the second stage, with a workspace of the size the first asked for
void run(aclnnStatus (*op)(void *, uint64_t, aclOpExecutor *, aclrtStream), uint64_t ws, aclOpExecutor *ex) {
    void *w = nullptr;
    if (ws > 0) CHECK(aclrtMalloc(&w, ws, ACL_MEM_MALLOC_HUGE_FIRST));
    CHECK(op(w, ws, ex, g_stream));
    CHECK(aclrtSynchronizeStream(g_stream));
    if (w) CHECK(aclrtFree(w));
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: aclnn_ops OP DTYPE ARGS... IN OUT\n");
        return 2;
    }
    std::string op = argv[1];
    aclDataType dt = parse_dtype(argv[2]);
    const char *in_path = argv[argc - 2], *out_path = argv[argc - 1];
    std::vector<std::string> a(argv + 3, argv + argc - 2);
    FILE *f = fopen(in_path, "rb");
    if (!f) {
        perror(in_path);
        return 2;
    }
    char buf[65536];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) g_in.insert(g_in.end(), buf, buf + got);
    fclose(f);

    CHECK(aclInit(nullptr));
    CHECK(aclrtSetDevice(0));
    CHECK(aclrtCreateStream(&g_stream));

    uint64_t ws = 0;
    aclOpExecutor *ex = nullptr;
    std::vector<Tensor *> outs;
    std::vector<aclTensorList *> lists;
    std::vector<aclIntArray *> arrays;
    aclScalar *scalar = nullptr;

    if (op == "add" || op == "mul") {
        auto shape = parse_shape(a.at(0), 'x');
        Tensor *x = tensor(shape, dt, true), *y = tensor(shape, dt, true), *o = tensor(shape, dt, false);
        if (op == "add") {
            float alpha = (float)atof(a.at(1).c_str());
            scalar = aclCreateScalar(&alpha, ACL_FLOAT);
            CHECK(aclnnAddGetWorkspaceSize(x->t, y->t, scalar, o->t, &ws, &ex));
            run(aclnnAdd, ws, ex);
        } else {
            CHECK(aclnnMulGetWorkspaceSize(x->t, y->t, o->t, &ws, &ex));
            run(aclnnMul, ws, ex);
        }
        outs = {o};
    } else if (op == "matmul") {
        int64_t m = atoll(a.at(0).c_str()), k = atoll(a.at(1).c_str()), n = atoll(a.at(2).c_str());
        Tensor *x = tensor({m, k}, dt, true), *w = tensor({k, n}, dt, true), *o = tensor({m, n}, dt, false);
        CHECK(aclnnMatmulGetWorkspaceSize(x->t, w->t, o->t, 1, &ws, &ex));
        run(aclnnMatmul, ws, ex);
        outs = {o};
    } else if (op == "rms_norm") {
        int64_t rows = atoll(a.at(0).c_str()), dim = atoll(a.at(1).c_str());
        double eps = atof(a.at(2).c_str());
        Tensor *x = tensor({rows, dim}, dt, true), *g = tensor({dim}, dt, true);
        Tensor *y = tensor({rows, dim}, dt, false), *r = tensor({rows, 1}, ACL_FLOAT, false);
        CHECK(aclnnRmsNormGetWorkspaceSize(x->t, g->t, eps, y->t, r->t, &ws, &ex));
        run(aclnnRmsNorm, ws, ex);
        outs = {y, r};
    } else if (op == "softmax") {
        int64_t rows = atoll(a.at(0).c_str()), cols = atoll(a.at(1).c_str());
        Tensor *x = tensor({rows, cols}, dt, true), *o = tensor({rows, cols}, dt, false);
        CHECK(aclnnSoftmaxGetWorkspaceSize(x->t, -1, o->t, &ws, &ex));
        run(aclnnSoftmax, ws, ex);
        outs = {o};
    } else if (op == "silu") {
        int64_t n = atoll(a.at(0).c_str());
        Tensor *x = tensor({n}, dt, true), *o = tensor({n}, dt, false);
        CHECK(aclnnSiluGetWorkspaceSize(x->t, o->t, &ws, &ex));
        run(aclnnSilu, ws, ex);
        outs = {o};
    } else if (op == "swi_glu") {
        int64_t rows = atoll(a.at(0).c_str()), cols = atoll(a.at(1).c_str());
        Tensor *x = tensor({rows, cols}, dt, true), *o = tensor({rows, cols / 2}, dt, false);
        CHECK(aclnnSwiGluGetWorkspaceSize(x->t, -1, o->t, &ws, &ex));
        run(aclnnSwiGlu, ws, ex);
        outs = {o};
    } else if (op == "rope") {
        int64_t s = atoll(a.at(0).c_str()), nq = atoll(a.at(1).c_str()), nk = atoll(a.at(2).c_str()),
                d = atoll(a.at(3).c_str());
        Tensor *q = tensor({1, s, nq, d}, dt, true), *k = tensor({1, s, nk, d}, dt, true);
        Tensor *c = tensor({1, s, 1, d}, dt, true), *sn = tensor({1, s, 1, d}, dt, true);
        CHECK(aclnnApplyRotaryPosEmbGetWorkspaceSize(q->t, k->t, c->t, sn->t, 1, &ws, &ex));
        run(aclnnApplyRotaryPosEmb, ws, ex);
        outs = {q, k};
    } else if (op == "pfa" || op == "fia") {
        int64_t s = atoll(a.at(0).c_str()), kvl = atoll(a.at(1).c_str()), n = atoll(a.at(2).c_str()),
                nkv = atoll(a.at(3).c_str()), d = atoll(a.at(4).c_str());
        bool causal = atoi(a.at(5).c_str()) != 0;
        Tensor *q = tensor({1, s, n, d}, dt, true), *k = tensor({1, kvl, nkv, d}, dt, true),
               *v = tensor({1, kvl, nkv, d}, dt, true), *o = tensor({1, s, n, d}, dt, false);
        Tensor *mask = nullptr;
        if (causal) {  // CANN's compressed causal mask: 1 above the diagonal (masked out)
            mask = new Tensor{{2048, 2048}, ACL_BOOL};
            size_t nb = 2048 * 2048;
            std::vector<uint8_t> host(nb);
            for (size_t i = 0; i < 2048; i++)
                for (size_t j = 0; j < 2048; j++) host[i * 2048 + j] = j > i;
            CHECK(aclrtMalloc(&mask->dev, nb, ACL_MEM_MALLOC_HUGE_FIRST));
            CHECK(aclrtMemcpy(mask->dev, nb, host.data(), nb, ACL_MEMCPY_HOST_TO_DEVICE));
            int64_t shape[2] = {2048, 2048}, strides[2] = {2048, 1};
            mask->t = aclCreateTensor(shape, 2, ACL_BOOL, strides, 0, ACL_FORMAT_ND, shape, 2, mask->dev);
            g_tensors.push_back(mask);
        }
        int64_t ql[1] = {s}, kl[1] = {kvl};
        aclIntArray *qlens = aclCreateIntArray(ql, 1), *kvlens = aclCreateIntArray(kl, 1);
        arrays = {qlens, kvlens};
        char layout[] = "BSND";
        double scale = 1.0 / std::sqrt((double)d);
        int64_t sparse = causal ? 3 : 0;
        if (op == "pfa") {
            CHECK(aclnnPromptFlashAttentionV3GetWorkspaceSize(
                q->t, k->t, v->t, nullptr, mask ? mask->t : nullptr, qlens, kvlens, nullptr, nullptr, nullptr,
                nullptr, nullptr, n, scale, 2147483647, causal ? 0 : 2147483647, layout, nkv, sparse, 1, o->t, &ws,
                &ex));
            run(aclnnPromptFlashAttentionV3, ws, ex);
        } else {
            aclTensor *kt[1] = {k->t}, *vt[1] = {v->t};
            k->listed = v->listed = true;
            aclTensorList *kl_ = aclCreateTensorList(kt, 1), *vl_ = aclCreateTensorList(vt, 1);
            lists = {kl_, vl_};
            Tensor *lse = tensor({1}, ACL_FLOAT, false);
            CHECK(aclnnFusedInferAttentionScoreV2GetWorkspaceSize(
                q->t, kl_, vl_, nullptr, mask ? mask->t : nullptr, qlens, kvlens, nullptr, nullptr, nullptr, nullptr,
                nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                nullptr, nullptr, n, scale, 2147483647, causal ? 0 : 2147483647, layout, nkv, sparse, 1, 0, 0, false,
                0, 0, o->t, lse->t, &ws, &ex));
            run(aclnnFusedInferAttentionScoreV2, ws, ex);
        }
        outs = {o};
    } else if (op == "ifa") {
        int64_t b = atoll(a.at(0).c_str()), n = atoll(a.at(1).c_str()), nkv = atoll(a.at(2).c_str()),
                d = atoll(a.at(3).c_str());
        std::vector<int64_t> lens = parse_shape(a.at(4), ',');
        if ((int64_t)lens.size() != b) {
            fprintf(stderr, "aclnn_ops: ifa needs one length per batch entry\n");
            return 2;
        }
        int64_t maxl = 0;
        for (auto l : lens) maxl = l > maxl ? l : maxl;
        Tensor *q = tensor({b, 1, n, d}, dt, true), *k = tensor({b, maxl, nkv, d}, dt, true),
               *v = tensor({b, maxl, nkv, d}, dt, true), *o = tensor({b, 1, n, d}, dt, false);
        aclTensor *kt[1] = {k->t}, *vt[1] = {v->t};
        k->listed = v->listed = true;
        aclTensorList *kl_ = aclCreateTensorList(kt, 1), *vl_ = aclCreateTensorList(vt, 1);
        lists = {kl_, vl_};
        aclIntArray *seq = aclCreateIntArray(lens.data(), lens.size());
        arrays = {seq};
        char layout[] = "BSND";
        CHECK(aclnnIncreFlashAttentionV4GetWorkspaceSize(
            q->t, kl_, vl_, nullptr, nullptr, seq, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
            nullptr, nullptr, n, 1.0 / std::sqrt((double)d), layout, nkv, 0, 1, o->t, &ws, &ex));
        run(aclnnIncreFlashAttentionV4, ws, ex);
        outs = {o};
    } else {
        fprintf(stderr, "aclnn_ops: unknown op %s\n", op.c_str());
        return 2;
    }
    if (g_in_at != g_in.size()) {
        fprintf(stderr, "aclnn_ops: %zu bytes of input left over\n", g_in.size() - g_in_at);
        return 2;
    }

    FILE *of = fopen(out_path, "wb");
    if (!of) {
        perror(out_path);
        return 2;
    }
    for (Tensor *o : outs) {
        std::vector<char> host(o->bytes());
        CHECK(aclrtMemcpy(host.data(), host.size(), o->dev, host.size(), ACL_MEMCPY_DEVICE_TO_HOST));
        fwrite(host.data(), 1, host.size(), of);
    }
    fclose(of);

    for (auto *l : lists) CHECK(aclDestroyTensorList(l));
    for (auto *x : arrays) CHECK(aclDestroyIntArray(x));
    if (scalar) CHECK(aclDestroyScalar(scalar));
    for (Tensor *x : g_tensors) {
        if (!x->listed) CHECK(aclDestroyTensor(x->t));
        CHECK(aclrtFree(x->dev));
        delete x;
    }
    CHECK(aclrtDestroyStream(g_stream));
    CHECK(aclrtResetDevice(0));
    CHECK(aclFinalize());
    printf("aclnn_ops %s: ok\n", op.c_str());
    return 0;
}
