/* The aclnn operators through forwarding: what the client (fwd_aclnn.c, in
 * libflexnpu_fwd.so) and the executor (exec_aclnn.c) share. docs/architecture.md,
 * "Forwarded execution", has the design.
 *
 * The client runs an operator's first call (aclnnXxxGetWorkspaceSize) in its own local
 * libopapi.so, which only reads host objects, and sends the executor every argument as it was
 * given: FWD_ACLNN_MAKE. The executor rebuilds the objects, makes its own executor with the
 * real first call and keeps it under the client's handle until it runs (FWD_ACLNN_RUN) or is
 * destroyed (FWD_ACLNN_DESTROY); FWD_ACLNN_REPEATABLE marks it repeatable.
 *
 * Records (fwd_proto.h's ops):
 *   FWD_ACLNN_MAKE        a0 executor handle (FWD_H_EXEC), a1 operator index (fwn_ops), a2 arguments;
 *                         payload: the arguments in the first call's order, each an item below
 *   FWD_ACLNN_RUN         a0 executor, a1 operator index, a2 stream, a3 workspace, a4 workspaceSize
 *   FWD_ACLNN_DESTROY     a0 executor
 *   FWD_ACLNN_REPEATABLE  a0 executor
 *
 * An item: struct fwn_item, then its body, padded to 8 bytes:
 *   FWN_NULL          (an optional object not given)
 *   FWN_TENSOR        struct fwn_tensor, then dims[ndim], strides[ndim], storage[nstorage] (int64)
 *   FWN_TENSOR_LIST   n tensors, each a FWN_TENSOR item
 *   FWN_SCALAR        struct fwn_scalar
 *   FWN_SCALAR_LIST   n FWN_SCALAR items
 *   FWN_INT_ARRAY     n int64;  FWN_FLOAT_ARRAY n float (padded);  FWN_BOOL_ARRAY n bytes (padded)
 *   FWN_INT           one int64;  FWN_DOUBLE one double
 *   FWN_STRING        n bytes without the terminating NUL (padded)
 * The executor reads every item as untrusted input: each count is bounded by the bytes left.
 */
#ifndef FLEXNPU_FWD_ACLNN_H_
#define FLEXNPU_FWD_ACLNN_H_

#include <stdint.h>

#define FWN_MAX_EXECS 65536   /* operator executors a client holds at once */
#define FWN_MAX_DIMS 32       /* dimensions of a tensor the records carry */
#define FWN_MAX_LIST 65536    /* tensors or scalars in one list */
#define FWN_MAX_STRING 4096

enum fwn_tag {
    FWN_NULL = 0,
    FWN_TENSOR = 1,
    FWN_TENSOR_LIST = 2,
    FWN_SCALAR = 3,
    FWN_SCALAR_LIST = 4,
    FWN_INT_ARRAY = 5,
    FWN_FLOAT_ARRAY = 6,
    FWN_BOOL_ARRAY = 7,
    FWN_INT = 8,
    FWN_DOUBLE = 9,
    FWN_STRING = 10,
};

struct fwn_item {
    uint32_t tag;
    uint32_t n; /* elements of an array or list, bytes of a string */
};

struct fwn_tensor {
    int32_t dtype;  /* aclDataType */
    int32_t format; /* aclFormat */
    uint32_t ndim, nstorage;
    int64_t offset;
    uint64_t data;  /* device address in the executor's context; 0: no data (timing only) */
};

struct fwn_scalar {
    int32_t dtype;
    uint32_t pad;
    unsigned char value[16];
};

struct fwn_op_info {
    const char *run; /* the second call, e.g. aclnnAdd */
    const char *gws; /* the first */
    int nargs;       /* arguments of the first call before workspaceSize and executor */
};

/* Bytes per element of an aclDataType (CANN's acl/acl_base.h numbering); 0: unknown. */
static inline int fwn_dtype_size(int32_t dtype)
{
    switch (dtype) {
    case 0: case 3: case 8: return 4;         /* FLOAT, INT32, UINT32 */
    case 1: case 6: case 7: case 27: return 2; /* FLOAT16, INT16, UINT16, BF16 */
    case 2: case 4: case 12: return 1;        /* INT8, UINT8, BOOL */
    case 9: case 10: case 11: case 16: return 8; /* INT64, UINT64, DOUBLE, COMPLEX64 */
    case 17: return 16;                       /* COMPLEX128 */
    default: return 0;
    }
}

/* The bytes from a tensor's data to one past the last element its view touches; 0 if the view
 * is empty; -1 if the description is impossible (negative sizes, overflow). */
static inline int64_t fwn_tensor_span(int32_t dtype, uint32_t ndim, const int64_t *dims, const int64_t *strides,
                                      int64_t offset)
{
    int64_t es = fwn_dtype_size(dtype);
    if (!es) es = 16; /* the widest: an unknown dtype claims no less than it may touch */
    if (offset < 0) return -1;
    int64_t last = offset;
    for (uint32_t i = 0; i < ndim; i++) {
        if (dims[i] < 0 || strides[i] < 0) return -1;
        if (dims[i] == 0) return 0;
    }
    for (uint32_t i = 0; i < ndim; i++) {
        if (dims[i] > 1 && strides[i] > (INT64_MAX / 32 - last) / (dims[i] - 1)) return -1;
        last += (dims[i] - 1) * strides[i];
    }
    if (last + 1 > INT64_MAX / 32) return -1;
    return (last + 1) * es;
}

#endif
