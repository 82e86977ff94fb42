/* FlexNPU emulated Ascend device: rotary position embedding (rotate-half form) on query and key, in place.
 *
 * Signatures follow CANN (hicann/ops-transformer,
 * posembedding/apply_rotary_pos_emb/op_host/op_api/aclnn_apply_rotary_pos_emb.h);
 * behaviour and limits: docs/emulator.md, "The aclnn operator API".
 */
#ifndef FLEXNPU_ACLNNOP_APPLY_ROTARY_POS_EMB_H_
#define FLEXNPU_ACLNNOP_APPLY_ROTARY_POS_EMB_H_

#include "aclnn/aclnn_base.h"
#include "aclnn_util.h"

#ifdef __cplusplus
extern "C" {
#endif

/* layout: 1 BSND (the only one CANN supports for this version) */
ACLNN_API aclnnStatus aclnnApplyRotaryPosEmbGetWorkspaceSize(aclTensor *queryRef, aclTensor *keyRef,
                                                             const aclTensor *cos, const aclTensor *sin,
                                                             int64_t layout, uint64_t *workspaceSize,
                                                             aclOpExecutor **executor);
ACLNN_API aclnnStatus aclnnApplyRotaryPosEmb(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                             aclrtStream stream);

#ifdef __cplusplus
}
#endif

#endif /* FLEXNPU_ACLNNOP_APPLY_ROTARY_POS_EMB_H_ */
