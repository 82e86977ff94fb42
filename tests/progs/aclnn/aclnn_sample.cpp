// aclnn from C++, written the way CANN's published operator samples are (std::vector
// buffers, CHECK_RET, aclDataType::/aclFormat:: qualified enumerators, nullptr): Matmul of a
// [2,3] and a transposed view [3,2] (strides, no copy), then Softmax of the product along
// the last dimension. Prints the two results as one JSON line.
#include <cstdio>
#include <vector>

#include "acl/acl.h"
#include "aclnnop/aclnn_matmul.h"
#include "aclnnop/aclnn_softmax.h"

#define CHECK_RET(cond, return_expr) \
    do {                             \
        if (!(cond)) {               \
            return_expr;             \
        }                            \
    } while (0)

static int CreateTensor(const std::vector<float> &host, const std::vector<int64_t> &shape,
                        const std::vector<int64_t> &strides, const std::vector<int64_t> &storage, void **dev,
                        aclTensor **tensor)
{
    size_t bytes = host.size() * sizeof(float);
    auto ret = aclrtMalloc(dev, bytes, ACL_MEM_MALLOC_HUGE_FIRST);
    CHECK_RET(ret == ACL_SUCCESS, return ret);
    ret = aclrtMemcpy(*dev, bytes, host.data(), bytes, ACL_MEMCPY_HOST_TO_DEVICE);
    CHECK_RET(ret == ACL_SUCCESS, return ret);
    *tensor = aclCreateTensor(shape.data(), shape.size(), aclDataType::ACL_FLOAT, strides.data(), 0,
                              aclFormat::ACL_FORMAT_ND, storage.data(), storage.size(), *dev);
    return *tensor == nullptr;
}

int main()
{
    aclrtStream stream = nullptr;
    auto ret = aclInit(nullptr);
    CHECK_RET(ret == ACL_SUCCESS, std::printf("aclInit failed %d\n", ret); return 1);
    ret = aclrtSetDevice(0);
    CHECK_RET(ret == ACL_SUCCESS, std::printf("aclrtSetDevice failed %d\n", ret); return 1);
    ret = aclrtCreateStream(&stream);
    CHECK_RET(ret == ACL_SUCCESS, return 1);

    void *da = nullptr, *db = nullptr, *dc = nullptr, *dd = nullptr;
    aclTensor *a = nullptr, *bt = nullptr, *c = nullptr, *d = nullptr;
    // b is stored as [2,3] = {{1,2,3},{4,5,6}}; bt views it transposed as [3,2]
    CHECK_RET(CreateTensor({1, 0, 1, 0, 1, 1}, {2, 3}, {3, 1}, {2, 3}, &da, &a) == 0, return 1);
    CHECK_RET(CreateTensor({1, 2, 3, 4, 5, 6}, {3, 2}, {1, 3}, {2, 3}, &db, &bt) == 0, return 1);
    CHECK_RET(CreateTensor(std::vector<float>(4, 0.f), {2, 2}, {2, 1}, {2, 2}, &dc, &c) == 0, return 1);
    CHECK_RET(CreateTensor(std::vector<float>(4, 0.f), {2, 2}, {2, 1}, {2, 2}, &dd, &d) == 0, return 1);

    uint64_t workspaceSize = 0;
    aclOpExecutor *executor = nullptr;
    ret = aclnnMatmulGetWorkspaceSize(a, bt, c, 1, &workspaceSize, &executor);
    CHECK_RET(ret == ACL_SUCCESS, std::printf("aclnnMatmulGetWorkspaceSize failed %d\n", ret); return 1);
    ret = aclnnMatmul(nullptr, workspaceSize, executor, stream);
    CHECK_RET(ret == ACL_SUCCESS, std::printf("aclnnMatmul failed %d\n", ret); return 1);
    ret = aclnnSoftmaxGetWorkspaceSize(c, -1, d, &workspaceSize, &executor);
    CHECK_RET(ret == ACL_SUCCESS, std::printf("aclnnSoftmaxGetWorkspaceSize failed %d\n", ret); return 1);
    ret = aclnnSoftmax(nullptr, workspaceSize, executor, stream);
    CHECK_RET(ret == ACL_SUCCESS, std::printf("aclnnSoftmax failed %d\n", ret); return 1);
    ret = aclrtSynchronizeStream(stream);
    CHECK_RET(ret == ACL_SUCCESS, return 1);

    std::vector<float> mm(4), sm(4);
    aclrtMemcpy(mm.data(), 16, dc, 16, ACL_MEMCPY_DEVICE_TO_HOST);
    aclrtMemcpy(sm.data(), 16, dd, 16, ACL_MEMCPY_DEVICE_TO_HOST);
    std::printf("{\"matmul\": [%g, %g, %g, %g], \"softmax\": [%.6f, %.6f, %.6f, %.6f]}\n", mm[0], mm[1], mm[2],
                mm[3], sm[0], sm[1], sm[2], sm[3]);

    aclDestroyTensor(a);
    aclDestroyTensor(bt);
    aclDestroyTensor(c);
    aclDestroyTensor(d);
    aclrtFree(da);
    aclrtFree(db);
    aclrtFree(dc);
    aclrtFree(dd);
    aclrtDestroyStream(stream);
    aclrtResetDevice(0);
    aclFinalize();
    return 0;
}
