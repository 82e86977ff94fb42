/* The emulated libnnopbase.so: the aclnn objects (aclTensor, aclScalar, arrays and lists)
 * and aclnnInit/aclnnFinalize, with CANN's signatures (aclnn/acl_meta.h, aclnn/aclnn_base.h).
 *
 * Objects live in host memory only; an aclTensor records the device address of its data and
 * libopapi.so checks that address against the device when an operator runs. Creation copies
 * every array it is given, so the caller's arrays may go at once, as on CANN.
 */
#include <stdlib.h>
#include <string.h>

#include "nn_objects.h"
#include "aclnn/aclnn_base.h"
#include "aclnn/opdev/op_errno.h"

#define NN_API __attribute__((visibility("default")))

/* ---------------------------------------------------------------- tensors */

/* Fills t from aclCreateTensor's arguments; false if they describe no tensor. */
static bool fill_tensor(struct aclTensor *t, const int64_t *viewDims, uint64_t viewDimsNum, aclDataType dataType,
                        const int64_t *stride, int64_t offset, aclFormat format, const int64_t *storageDims,
                        uint64_t storageDimsNum, void *tensorData)
{
    if ((viewDimsNum && !viewDims) || (storageDimsNum && !storageDims)) return false;
    if (viewDimsNum > NN_MAX_DIMS || storageDimsNum > NN_MAX_DIMS || offset < 0) return false;
    memset(t, 0, sizeof *t);
    t->dtype = dataType;
    t->format = format;
    t->ndim = (uint32_t)viewDimsNum;
    t->nstorage = (uint32_t)storageDimsNum;
    t->offset = offset;
    t->data = tensorData;
    for (uint64_t i = 0; i < viewDimsNum; i++) {
        if (viewDims[i] < 0 || (stride && stride[i] < 0)) return false;
        t->dims[i] = viewDims[i];
    }
    for (uint64_t i = 0; i < storageDimsNum; i++) {
        if (storageDims[i] < 0) return false;
        t->storage[i] = storageDims[i];
    }
    if (stride) {
        memcpy(t->strides, stride, viewDimsNum * sizeof *stride);
    } else { /* contiguous, as CANN's aclTensor computes without strides */
        int64_t s = 1;
        for (uint64_t i = viewDimsNum; i-- > 0;) {
            t->strides[i] = s;
            s *= viewDims[i] > 0 ? viewDims[i] : 1;
        }
    }
    t->magic = NN_TENSOR_MAGIC;
    return true;
}

NN_API aclTensor *aclCreateTensor(const int64_t *viewDims, uint64_t viewDimsNum, aclDataType dataType,
                                  const int64_t *stride, int64_t offset, aclFormat format, const int64_t *storageDims,
                                  uint64_t storageDimsNum, void *tensorData)
{
    struct aclTensor *t = malloc(sizeof *t);
    if (!t) return NULL;
    if (!fill_tensor(t, viewDims, viewDimsNum, dataType, stride, offset, format, storageDims, storageDimsNum,
                     tensorData)) {
        free(t);
        return NULL;
    }
    return t;
}

NN_API aclnnStatus aclInitTensor(aclTensor *tensor, const int64_t *viewDims, uint64_t viewDimsNum,
                                 aclDataType dataType, const int64_t *stride, int64_t offset, aclFormat format,
                                 const int64_t *storageDims, uint64_t storageDimsNum, void *tensorDataAddr)
{
    if (!tensor) return ACLNN_ERR_PARAM_NULLPTR;
    if (tensor->magic != NN_TENSOR_MAGIC) return ACLNN_ERR_PARAM_INVALID;
    struct aclTensor t;
    if (!fill_tensor(&t, viewDims, viewDimsNum, dataType, stride, offset, format, storageDims, storageDimsNum,
                     tensorDataAddr))
        return ACLNN_ERR_PARAM_INVALID;
    *tensor = t;
    return ACLNN_SUCCESS;
}

NN_API aclnnStatus aclDestroyTensor(const aclTensor *tensor)
{
    if (!tensor) return ACLNN_SUCCESS;
    struct aclTensor *t = (struct aclTensor *)tensor;
    if (t->magic != NN_TENSOR_MAGIC) return ACLNN_ERR_PARAM_INVALID;
    t->magic = 0;
    free(t);
    return ACLNN_SUCCESS;
}

#define CHECK_TENSOR(t)                                                 \
    do {                                                                \
        if (!(t)) return ACLNN_ERR_PARAM_NULLPTR;                       \
        if ((t)->magic != NN_TENSOR_MAGIC) return ACLNN_ERR_PARAM_INVALID; \
    } while (0)

static aclnnStatus copy_dims(const int64_t *src, uint32_t n, int64_t **out, uint64_t *num)
{
    int64_t *a = malloc((n ? n : 1) * sizeof *a); /* the caller frees it, even for 0 dims */
    if (!a) return ACLNN_ERR_INNER_NULLPTR;
    memcpy(a, src, n * sizeof *a);
    *out = a;
    *num = n;
    return ACLNN_SUCCESS;
}

NN_API aclnnStatus aclGetViewShape(const aclTensor *tensor, int64_t **viewDims, uint64_t *viewDimsNum)
{
    if (!viewDims || !viewDimsNum) return ACLNN_ERR_PARAM_NULLPTR;
    CHECK_TENSOR(tensor);
    return copy_dims(tensor->dims, tensor->ndim, viewDims, viewDimsNum);
}

NN_API aclnnStatus aclGetStorageShape(const aclTensor *tensor, int64_t **storageDims, uint64_t *storageDimsNum)
{
    if (!storageDims || !storageDimsNum) return ACLNN_ERR_PARAM_NULLPTR;
    CHECK_TENSOR(tensor);
    return copy_dims(tensor->storage, tensor->nstorage, storageDims, storageDimsNum);
}

NN_API aclnnStatus aclGetViewStrides(const aclTensor *tensor, int64_t **stridesValue, uint64_t *stridesNum)
{
    if (!stridesValue || !stridesNum) return ACLNN_ERR_PARAM_NULLPTR;
    CHECK_TENSOR(tensor);
    return copy_dims(tensor->strides, tensor->ndim, stridesValue, stridesNum);
}

NN_API aclnnStatus aclGetViewOffset(const aclTensor *tensor, int64_t *offset)
{
    if (!offset) return ACLNN_ERR_PARAM_NULLPTR;
    CHECK_TENSOR(tensor);
    *offset = tensor->offset;
    return ACLNN_SUCCESS;
}

NN_API aclnnStatus aclGetFormat(const aclTensor *tensor, aclFormat *format)
{
    if (!format) return ACLNN_ERR_PARAM_NULLPTR;
    CHECK_TENSOR(tensor);
    *format = (aclFormat)tensor->format;
    return ACLNN_SUCCESS;
}

NN_API aclnnStatus aclGetDataType(const aclTensor *tensor, aclDataType *dataType)
{
    if (!dataType) return ACLNN_ERR_PARAM_NULLPTR;
    CHECK_TENSOR(tensor);
    *dataType = (aclDataType)tensor->dtype;
    return ACLNN_SUCCESS;
}

NN_API aclnnStatus aclSetRawTensorAddr(aclTensor *tensor, void *addr)
{
    CHECK_TENSOR(tensor);
    tensor->data = addr;
    return ACLNN_SUCCESS;
}

NN_API aclnnStatus aclGetRawTensorAddr(const aclTensor *tensor, void **addr)
{
    if (!addr) return ACLNN_ERR_PARAM_NULLPTR;
    CHECK_TENSOR(tensor);
    *addr = tensor->data;
    return ACLNN_SUCCESS;
}

/* ---------------------------------------------------------------- scalars */

NN_API aclScalar *aclCreateScalar(void *value, aclDataType dataType)
{
    int size = nn_dtype_size(dataType);
    if (!value || size == 0) return NULL;
    struct aclScalar *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    memcpy(s->value, value, (size_t)size);
    s->dtype = dataType;
    s->magic = NN_SCALAR_MAGIC;
    return s;
}

NN_API aclnnStatus aclDestroyScalar(const aclScalar *scalar)
{
    if (!scalar) return ACLNN_SUCCESS;
    struct aclScalar *s = (struct aclScalar *)scalar;
    if (s->magic != NN_SCALAR_MAGIC) return ACLNN_ERR_PARAM_INVALID;
    s->magic = 0;
    free(s);
    return ACLNN_SUCCESS;
}

/* ---------------------------------------------------------------- arrays and lists */

/* One array type: a header and `size` copied elements. */
#define NN_ARRAY(Type, Elem, MAGIC, Create, Destroy, GetSize)                               \
    NN_API Type *Create(const Elem *value, uint64_t size)                                   \
    {                                                                                       \
        if ((size && !value) || size > (UINT64_MAX - sizeof(Type)) / sizeof(Elem)) return NULL; \
        Type *a = malloc(sizeof *a + size * sizeof(Elem));                                  \
        if (!a) return NULL;                                                                \
        a->size = size;                                                                     \
        if (size) memcpy(a->values, value, size * sizeof(Elem));                            \
        a->magic = MAGIC;                                                                   \
        return a;                                                                           \
    }                                                                                       \
    NN_API aclnnStatus Destroy(const Type *array)                                           \
    {                                                                                       \
        if (!array) return ACLNN_SUCCESS;                                                   \
        Type *a = (Type *)array;                                                            \
        if (a->magic != MAGIC) return ACLNN_ERR_PARAM_INVALID;                              \
        a->magic = 0;                                                                       \
        free(a);                                                                            \
        return ACLNN_SUCCESS;                                                               \
    }                                                                                       \
    NN_API aclnnStatus GetSize(const Type *array, uint64_t *size)                           \
    {                                                                                       \
        if (!array || !size) return ACLNN_ERR_PARAM_NULLPTR;                                \
        if (array->magic != MAGIC) return ACLNN_ERR_PARAM_INVALID;                          \
        *size = array->size;                                                                \
        return ACLNN_SUCCESS;                                                               \
    }

NN_ARRAY(aclIntArray, int64_t, NN_INT_ARRAY_MAGIC, aclCreateIntArray, aclDestroyIntArray, aclGetIntArraySize)
NN_ARRAY(aclFloatArray, float, NN_FLOAT_ARRAY_MAGIC, aclCreateFloatArray, aclDestroyFloatArray, aclGetFloatArraySize)
NN_ARRAY(aclBoolArray, bool, NN_BOOL_ARRAY_MAGIC, aclCreateBoolArray, aclDestroyBoolArray, aclGetBoolArraySize)

NN_API aclTensorList *aclCreateTensorList(const aclTensor *const *value, uint64_t size)
{
    if ((size && !value) || size > 65536) return NULL;
    for (uint64_t i = 0; i < size; i++)
        if (!value[i] || value[i]->magic != NN_TENSOR_MAGIC) return NULL;
    struct aclTensorList *l = malloc(sizeof *l + size * sizeof(aclTensor *));
    if (!l) return NULL;
    l->size = size;
    for (uint64_t i = 0; i < size; i++) l->items[i] = (aclTensor *)value[i];
    l->magic = NN_TENSOR_LIST_MAGIC;
    return l;
}

NN_API aclnnStatus aclDestroyTensorList(const aclTensorList *array)
{
    if (!array) return ACLNN_SUCCESS;
    struct aclTensorList *l = (struct aclTensorList *)array;
    if (l->magic != NN_TENSOR_LIST_MAGIC) return ACLNN_ERR_PARAM_INVALID;
    l->magic = 0;
    for (uint64_t i = 0; i < l->size; i++) aclDestroyTensor(l->items[i]);
    free(l);
    return ACLNN_SUCCESS;
}

NN_API aclnnStatus aclGetTensorListSize(const aclTensorList *tensorList, uint64_t *size)
{
    if (!tensorList || !size) return ACLNN_ERR_PARAM_NULLPTR;
    if (tensorList->magic != NN_TENSOR_LIST_MAGIC) return ACLNN_ERR_PARAM_INVALID;
    *size = tensorList->size;
    return ACLNN_SUCCESS;
}

NN_API aclScalarList *aclCreateScalarList(const aclScalar *const *value, uint64_t size)
{
    if ((size && !value) || size > 65536) return NULL;
    for (uint64_t i = 0; i < size; i++)
        if (!value[i] || value[i]->magic != NN_SCALAR_MAGIC) return NULL;
    struct aclScalarList *l = malloc(sizeof *l + size * sizeof(aclScalar *));
    if (!l) return NULL;
    l->size = size;
    for (uint64_t i = 0; i < size; i++) l->items[i] = (aclScalar *)value[i];
    l->magic = NN_SCALAR_LIST_MAGIC;
    return l;
}

NN_API aclnnStatus aclDestroyScalarList(const aclScalarList *array)
{
    if (!array) return ACLNN_SUCCESS;
    struct aclScalarList *l = (struct aclScalarList *)array;
    if (l->magic != NN_SCALAR_LIST_MAGIC) return ACLNN_ERR_PARAM_INVALID;
    l->magic = 0;
    for (uint64_t i = 0; i < l->size; i++) aclDestroyScalar(l->items[i]);
    free(l);
    return ACLNN_SUCCESS;
}

NN_API aclnnStatus aclGetScalarListSize(const aclScalarList *scalarList, uint64_t *size)
{
    if (!scalarList || !size) return ACLNN_ERR_PARAM_NULLPTR;
    if (scalarList->magic != NN_SCALAR_LIST_MAGIC) return ACLNN_ERR_PARAM_INVALID;
    *size = scalarList->size;
    return ACLNN_SUCCESS;
}

/* ---------------------------------------------------------------- executors */

/* Executors are made by libopapi.so's first calls; these two only need their common head. */
NN_API aclnnStatus aclSetAclOpExecutorRepeatable(aclOpExecutor *executor)
{
    if (!executor) return ACLNN_ERR_PARAM_NULLPTR;
    struct nn_executor_head *h = (struct nn_executor_head *)executor;
    if (h->magic != NN_EXECUTOR_MAGIC) return ACLNN_ERR_PARAM_INVALID;
    h->repeatable = true;
    return ACLNN_SUCCESS;
}

NN_API aclnnStatus aclDestroyAclOpExecutor(aclOpExecutor *executor)
{
    if (!executor) return ACLNN_ERR_PARAM_NULLPTR;
    struct nn_executor_head *h = (struct nn_executor_head *)executor;
    if (h->magic != NN_EXECUTOR_MAGIC) return ACLNN_ERR_PARAM_INVALID;
    h->destroy(executor);
    return ACLNN_SUCCESS;
}

/* ---------------------------------------------------------------- init */

/* The emulator keeps no aclnn state to set up: operators load their kernels on first use.
 * These exist so that programs calling them link and run, as on CANN. */
NN_API aclnnStatus aclnnInit(const char *configPath)
{
    (void)configPath;
    return ACLNN_SUCCESS;
}

NN_API aclnnStatus aclnnFinalize(void) { return ACLNN_SUCCESS; }
