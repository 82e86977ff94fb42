/* FlexNPU emulated Ascend device: yOut = x / sqrt(mean(x^2) + epsilon) * gamma; rstdOut = 1 / sqrt(...).
 *
 * Signatures follow CANN (hicann/ops-nn,
 * norm/rms_norm/docs/aclnnRmsNorm.md);
 * behaviour and limits: docs/emulator.md, "The aclnn operator API".
 */
#ifndef FLEXNPU_ACLNNOP_RMS_NORM_H_
#define FLEXNPU_ACLNNOP_RMS_NORM_H_

#include "aclnn/aclnn_base.h"
#include "aclnn_util.h"

#ifdef __cplusplus
extern "C" {
#endif

ACLNN_API aclnnStatus aclnnRmsNormGetWorkspaceSize(const aclTensor *x, const aclTensor *gamma, double epsilon,
                                                   const aclTensor *yOut, const aclTensor *rstdOut,
                                                   uint64_t *workspaceSize, aclOpExecutor **executor);
ACLNN_API aclnnStatus aclnnRmsNorm(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                   aclrtStream stream);

#ifdef __cplusplus
}
#endif

#endif /* FLEXNPU_ACLNNOP_RMS_NORM_H_ */
