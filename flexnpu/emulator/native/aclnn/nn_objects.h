/* The aclnn objects (aclTensor, aclScalar, the arrays and lists) as libnnopbase.so lays them
 * out. Internal to the emulator: libnnopbase.so creates them and libopapi.so reads them;
 * programs see only opaque pointers (aclnn/acl_meta.h).
 *
 * Every object starts with a magic word that its destroy call clears, so a NULL, foreign or
 * destroyed handle is refused with an aclnn error instead of being used.
 */
#ifndef FLEXNPU_NN_OBJECTS_H_
#define FLEXNPU_NN_OBJECTS_H_

#include <stdbool.h>
#include <stdint.h>

#include "aclnn/acl_meta.h"

#define NN_MAX_DIMS 16 /* aclCreateTensor refuses more; the operators take at most 8 */

#define NN_TENSOR_MAGIC 0x4e4e5453U      /* "NNTS" */
#define NN_SCALAR_MAGIC 0x4e4e5343U      /* "NNSC" */
#define NN_INT_ARRAY_MAGIC 0x4e4e4941U   /* "NNIA" */
#define NN_FLOAT_ARRAY_MAGIC 0x4e4e4641U /* "NNFA" */
#define NN_BOOL_ARRAY_MAGIC 0x4e4e4241U  /* "NNBA" */
#define NN_TENSOR_LIST_MAGIC 0x4e4e544cU /* "NNTL" */
#define NN_SCALAR_LIST_MAGIC 0x4e4e534cU /* "NNSL" */
#define NN_EXECUTOR_MAGIC 0x4e4e4558U    /* "NNEX" */

struct aclTensor {
    uint32_t magic;
    int32_t dtype;  /* aclDataType */
    int32_t format; /* aclFormat */
    uint32_t ndim;  /* view dimensions (0: a scalar tensor of one element) */
    uint32_t nstorage;
    int64_t dims[NN_MAX_DIMS];    /* view shape */
    int64_t strides[NN_MAX_DIMS]; /* in elements */
    int64_t storage[NN_MAX_DIMS]; /* storage shape */
    int64_t offset;               /* of the view's first element in the storage, in elements */
    void *data;                   /* device address of the storage; NULL: no data (timing only) */
};

struct aclScalar {
    uint32_t magic;
    int32_t dtype;
    unsigned char value[16]; /* the value's bytes, as aclCreateScalar received them */
};

struct aclIntArray {
    uint32_t magic;
    uint64_t size;
    int64_t values[]; /* size of them */
};

struct aclFloatArray {
    uint32_t magic;
    uint64_t size;
    float values[];
};

struct aclBoolArray {
    uint32_t magic;
    uint64_t size;
    bool values[];
};

struct aclTensorList {
    uint32_t magic;
    uint64_t size;
    aclTensor *items[]; /* owned: aclDestroyTensorList destroys them, as CANN's does */
};

struct aclScalarList {
    uint32_t magic;
    uint64_t size;
    aclScalar *items[];
};

/* The start of every aclOpExecutor (libopapi.so defines the rest, opapi.h): what
 * libnnopbase.so's executor calls need. */
struct nn_executor_head {
    uint32_t magic;
    bool repeatable;
    void (*destroy)(aclOpExecutor *executor);
};

/* Bytes per element of a dtype; 0 for a dtype the emulator does not know. */
static inline int nn_dtype_size(int32_t dtype)
{
    switch (dtype) {
    case ACL_FLOAT: case ACL_INT32: case ACL_UINT32: return 4;
    case ACL_FLOAT16: case ACL_BF16: case ACL_INT16: case ACL_UINT16: return 2;
    case ACL_INT8: case ACL_UINT8: case ACL_BOOL: return 1;
    case ACL_INT64: case ACL_UINT64: case ACL_DOUBLE: return 8;
    case 16: return 8;  /* ACL_COMPLEX64 */
    case 17: return 16; /* ACL_COMPLEX128 */
    default: return 0;
    }
}

#endif /* FLEXNPU_NN_OBJECTS_H_ */
