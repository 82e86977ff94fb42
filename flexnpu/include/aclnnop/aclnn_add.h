/* FlexNPU emulated Ascend device: out = self + alpha * other, with broadcasting.
 *
 * Signatures follow CANN (hicann/ops-math,
 * math/add/op_api/aclnn_add.h);
 * behaviour and limits: docs/emulator.md, "The aclnn operator API".
 */
#ifndef FLEXNPU_ACLNNOP_ADD_H_
#define FLEXNPU_ACLNNOP_ADD_H_

#include "aclnn/aclnn_base.h"
#include "aclnn_util.h"

#ifdef __cplusplus
extern "C" {
#endif

ACLNN_API aclnnStatus aclnnAddGetWorkspaceSize(const aclTensor *self, const aclTensor *other, const aclScalar *alpha,
                                               aclTensor *out, uint64_t *workspaceSize, aclOpExecutor **executor);
ACLNN_API aclnnStatus aclnnAdd(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream);

ACLNN_API aclnnStatus aclnnInplaceAddGetWorkspaceSize(const aclTensor *selfRef, const aclTensor *other,
                                                      const aclScalar *alpha, uint64_t *workspaceSize,
                                                      aclOpExecutor **executor);
ACLNN_API aclnnStatus aclnnInplaceAdd(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                      aclrtStream stream);

#ifdef __cplusplus
}
#endif

#endif /* FLEXNPU_ACLNNOP_ADD_H_ */
