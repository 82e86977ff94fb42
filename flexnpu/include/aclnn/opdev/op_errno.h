/* FlexNPU emulated Ascend device: aclnn status codes.
 *
 * Values of CANN's aclnn/opdev/op_errno.h (hicann/opbase, include/nnopbase/opdev/op_errno.h)
 * and of the "aclnn返回码" page of the CANN API reference. CANN installs this header beside
 * aclnn_base.h; its public headers do not include it, so neither do these.
 */
#ifndef FLEXNPU_ACLNN_OP_ERRNO_H_
#define FLEXNPU_ACLNN_OP_ERRNO_H_

#define ACLNN_SUCCESS 0
#define ACLNN_ERR_PARAM_NULLPTR 161001
#define ACLNN_ERR_PARAM_INVALID 161002
#define ACLNN_ERR_RUNTIME_ERROR 361001
#define ACLNN_ERR_INNER 561000
#define ACLNN_ERR_INNER_INFERSHAPE_ERROR 561001
#define ACLNN_ERR_INNER_TILING_ERROR 561002
#define ACLNN_ERR_INNER_FIND_KERNEL_ERROR 561003
#define ACLNN_ERR_INNER_CREATE_EXECUTOR 561101
#define ACLNN_ERR_INNER_NOT_TRANS_EXECUTOR 561102
#define ACLNN_ERR_INNER_NULLPTR 561103

#endif /* FLEXNPU_ACLNN_OP_ERRNO_H_ */
