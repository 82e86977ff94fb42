/* aclnn from C: Add (broadcast, alpha), Matmul and a decode step of FusedInferAttentionScoreV2
 * on small known inputs, plus the NULL-argument codes of the first calls. Prints one JSON
 * line: {"ok": true, ...} when every result matched, else {"ok": false, "why": ...}; the codes of
 * the NULL-argument and bad-stream calls are in the line.
 *
 * Usage: aclnn_smoke [device]   (built with -lopapi -lnnopbase -lascendcl)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "acl/acl.h"
#include "aclnn/opdev/op_errno.h"
#include "aclnnop/aclnn_add.h"
#include "aclnnop/aclnn_fused_infer_attention_score_v2.h"
#include "aclnnop/aclnn_matmul.h"

static aclrtStream g_stream;

#define FAIL(...)                                     \
    do {                                              \
        printf("{\"ok\": false, \"why\": \"");        \
        printf(__VA_ARGS__);                          \
        printf("\"}\n");                              \
        exit(1);                                      \
    } while (0)

/* A contiguous float tensor on the device holding `data` (n values; NULL: zeros). */
static aclTensor *make(const int64_t *shape, int nd, aclDataType dt, const float *data, void **dev)
{
    int64_t n = 1;
    for (int i = 0; i < nd; i++) n *= shape[i];
    size_t e = dt == ACL_FLOAT ? 4 : 2, bytes = (size_t)n * e;
    if (aclrtMalloc(dev, bytes, ACL_MEM_MALLOC_HUGE_FIRST)) FAIL("aclrtMalloc");
    unsigned char *host = calloc(1, bytes);
    for (int64_t i = 0; data && i < n; i++) {
        if (dt == ACL_FLOAT) memcpy(host + i * 4, &data[i], 4);
        else { _Float16 h = (_Float16)data[i]; memcpy(host + i * 2, &h, 2); }
    }
    if (aclrtMemcpy(*dev, bytes, host, bytes, ACL_MEMCPY_HOST_TO_DEVICE)) FAIL("aclrtMemcpy");
    free(host);
    return aclCreateTensor(shape, (uint64_t)nd, dt, NULL, 0, ACL_FORMAT_ND, shape, (uint64_t)nd, *dev);
}

static void fetch(void *dev, aclDataType dt, int64_t n, float *out)
{
    size_t e = dt == ACL_FLOAT ? 4 : 2;
    unsigned char *host = malloc((size_t)n * e);
    if (aclrtMemcpy(host, (size_t)n * e, dev, (size_t)n * e, ACL_MEMCPY_DEVICE_TO_HOST)) FAIL("aclrtMemcpy D2H");
    for (int64_t i = 0; i < n; i++) {
        if (dt == ACL_FLOAT) memcpy(&out[i], host + i * 4, 4);
        else { _Float16 h; memcpy(&h, host + i * 2, 2); out[i] = (float)h; }
    }
    free(host);
}

/* The second call of an operator whose first call returned rc1 and filled ws and ex. */
static void run(const char *what, aclnnStatus rc1, uint64_t ws, aclOpExecutor *ex,
                aclnnStatus (*second)(void *, uint64_t, aclOpExecutor *, aclrtStream))
{
    if (rc1 != ACLNN_SUCCESS) FAIL("%sGetWorkspaceSize returned %d", what, rc1);
    if (ws != 0) FAIL("%s asked for %llu workspace bytes", what, (unsigned long long)ws);
    aclnnStatus rc = second(NULL, ws, ex, g_stream);
    if (rc != ACLNN_SUCCESS) FAIL("%s returned %d", what, rc);
}

static aclnnStatus fia_run(void *w, uint64_t s, aclOpExecutor *e, aclrtStream st)
{
    return aclnnFusedInferAttentionScoreV2(w, s, e, st);
}

int main(int argc, char **argv)
{
    int device = argc > 1 ? atoi(argv[1]) : 0;
    if (aclInit(NULL) || aclrtSetDevice(device) || aclrtCreateStream(&g_stream)) FAIL("device setup");
    if (aclnnInit(NULL) != ACLNN_SUCCESS) FAIL("aclnnInit");
    uint64_t ws = 0;
    aclOpExecutor *ex = NULL;
    void *d[12];

    /* Add: [2,3] + 0.5 * [3] */
    const int64_t s23[] = {2, 3}, s3[] = {3};
    const float a[] = {1, 2, 3, 4, 5, 6}, b[] = {10, 20, 30};
    aclTensor *ta = make(s23, 2, ACL_FLOAT, a, &d[0]), *tb = make(s3, 1, ACL_FLOAT, b, &d[1]);
    aclTensor *to = make(s23, 2, ACL_FLOAT, NULL, &d[2]);
    float half = 0.5f;
    aclScalar *alpha = aclCreateScalar(&half, ACL_FLOAT);
    aclnnStatus rc = aclnnAddGetWorkspaceSize(ta, tb, alpha, to, &ws, &ex);
    run("aclnnAdd", rc, ws, ex, aclnnAdd);
    /* the NULL-argument codes */
    int null_self = aclnnAddGetWorkspaceSize(NULL, tb, alpha, to, &ws, &ex);
    int null_ws = aclnnAddGetWorkspaceSize(ta, tb, alpha, to, NULL, &ex);
    int null_exec = aclnnAdd(NULL, 0, NULL, g_stream);
    /* a stream handle that is no stream: the runtime refuses it */
    int not_a_stream = 0, bad_stream = -1;
    if (aclnnAddGetWorkspaceSize(ta, tb, alpha, to, &ws, &ex) == ACLNN_SUCCESS)
        bad_stream = aclnnAdd(NULL, ws, ex, (aclrtStream)&not_a_stream);

    /* Matmul: [2,3] @ [3,2], fp16 */
    const int64_t s32[] = {3, 2}, s22[] = {2, 2};
    const float m2[] = {1, 0, 0, 1, 1, 1};
    aclTensor *ma = make(s23, 2, ACL_FLOAT16, a, &d[3]), *mb = make(s32, 2, ACL_FLOAT16, m2, &d[4]);
    aclTensor *mo = make(s22, 2, ACL_FLOAT16, NULL, &d[5]);
    rc = aclnnMatmulGetWorkspaceSize(ma, mb, mo, 0, &ws, &ex);
    run("aclnnMatmul", rc, ws, ex, aclnnMatmul);

    /* FIA decode: B=1, one query head over two keys of dimension 2, BSH */
    const int64_t sq[] = {1, 1, 2}, skv[] = {1, 2, 2};
    const float q[] = {1, 0}, k[] = {1, 0, 0, 1}, v[] = {2, 0, 0, 4};
    aclTensor *tq = make(sq, 3, ACL_FLOAT16, q, &d[6]), *tk = make(skv, 3, ACL_FLOAT16, k, &d[7]);
    aclTensor *tv = make(skv, 3, ACL_FLOAT16, v, &d[8]), *tao = make(sq, 3, ACL_FLOAT16, NULL, &d[9]);
    aclTensorList *kl = aclCreateTensorList((const aclTensor *const *)&tk, 1);
    aclTensorList *vl = aclCreateTensorList((const aclTensor *const *)&tv, 1);
    char layout[] = "BSH";
    rc = aclnnFusedInferAttentionScoreV2GetWorkspaceSize(
        tq, kl, vl, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
        NULL, NULL, NULL, NULL, NULL, 1, 1.0, 2147483647, 2147483647, layout, 1, 0, 0, 0, 0, false, 0, 0, tao, NULL,
        &ws, &ex);
    run("aclnnFusedInferAttentionScoreV2", rc, ws, ex, fia_run);
    if (aclrtSynchronizeStream(g_stream)) FAIL("aclrtSynchronizeStream");

    float out[6], mout[4], aout[2];
    fetch(d[2], ACL_FLOAT, 6, out);
    fetch(d[5], ACL_FLOAT16, 4, mout);
    fetch(d[9], ACL_FLOAT16, 2, aout);
    for (int i = 0; i < 6; i++)
        if (out[i] != a[i] + 0.5f * b[i % 3]) FAIL("Add[%d] = %g", i, out[i]);
    const float mwant[] = {4, 5, 10, 11};
    for (int i = 0; i < 4; i++)
        if (mout[i] != mwant[i]) FAIL("Matmul[%d] = %g", i, mout[i]);
    /* scores 1 and 0: weights e/(1+e) and 1/(1+e) */
    float w0 = expf(1) / (1 + expf(1)), w1 = 1 / (1 + expf(1));
    if (fabsf(aout[0] - 2 * w0) > 1e-2f || fabsf(aout[1] - 4 * w1) > 1e-2f) FAIL("FIA = %g %g", aout[0], aout[1]);

    aclDestroyTensor(ta), aclDestroyTensor(tb), aclDestroyTensor(to), aclDestroyScalar(alpha);
    aclDestroyTensor(ma), aclDestroyTensor(mb), aclDestroyTensor(mo);
    aclDestroyTensorList(kl), aclDestroyTensorList(vl); /* they destroy tk and tv, as CANN's do */
    aclDestroyTensor(tq), aclDestroyTensor(tao);
    for (int i = 0; i < 10; i++) aclrtFree(d[i]);
    aclrtDestroyStream(g_stream);
    aclrtResetDevice(device);
    aclnnFinalize();
    aclFinalize();
    printf("{\"ok\": true, \"add\": [%g, %g], \"matmul\": [%g, %g, %g, %g], \"fia\": [%g, %g], "
           "\"null_self\": %d, \"null_ws\": %d, \"null_executor\": %d, \"bad_stream\": %d}\n",
           out[0], out[5], mout[0], mout[1], mout[2], mout[3], aout[0], aout[1], null_self, null_ws, null_exec,
           bad_stream);
    return 0;
}
