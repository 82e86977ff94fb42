/* FlexNPU emulated Ascend device: out = self @ mat2 (1 to 6 dimensions, batch broadcasting).
 *
 * Signatures follow CANN (hicann/ops-nn,
 * matmul/mat_mul_v3/op_host/op_api/aclnn_matmul.h);
 * behaviour and limits: docs/emulator.md, "The aclnn operator API".
 */
#ifndef FLEXNPU_ACLNNOP_MATMUL_H_
#define FLEXNPU_ACLNNOP_MATMUL_H_

#include "aclnn/aclnn_base.h"
#include "aclnn_util.h"

#ifdef __cplusplus
extern "C" {
#endif

/* cubeMathType: 0 KEEP_DTYPE, 1 ALLOW_FP32_DOWN_PRECISION, 2 USE_FP16, 3 USE_HF32, 4 USE_FP32_ADD */
ACLNN_API aclnnStatus aclnnMatmulGetWorkspaceSize(const aclTensor *self, const aclTensor *mat2, aclTensor *out,
                                                  int8_t cubeMathType, uint64_t *workspaceSize,
                                                  aclOpExecutor **executor);
ACLNN_API aclnnStatus aclnnMatmul(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                  aclrtStream stream);

#ifdef __cplusplus
}
#endif

#endif /* FLEXNPU_ACLNNOP_MATMUL_H_ */
