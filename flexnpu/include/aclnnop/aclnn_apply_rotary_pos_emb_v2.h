/* FlexNPU emulated Ascend device: rotary position embedding on query and key, in place, with a rotary mode.
 *
 * Signatures follow CANN (hicann/ops-transformer,
 * posembedding/apply_rotary_pos_emb/op_host/op_api/aclnn_apply_rotary_pos_emb_v2.h);
 * behaviour and limits: docs/emulator.md, "The aclnn operator API".
 */
#ifndef FLEXNPU_ACLNNOP_APPLY_ROTARY_POS_EMB_V2_H_
#define FLEXNPU_ACLNNOP_APPLY_ROTARY_POS_EMB_V2_H_

#include "aclnn/aclnn_base.h"
#include "aclnn_util.h"

#ifdef __cplusplus
extern "C" {
#endif

/* layout: 1 BSND, 2 SBND, 3 BNSD; rotaryMode: "half", "interleave" or "quarter" */
ACLNN_API aclnnStatus aclnnApplyRotaryPosEmbV2GetWorkspaceSize(aclTensor *queryRef, aclTensor *keyRef,
                                                               const aclTensor *cos, const aclTensor *sin,
                                                               int64_t layout, char *rotaryMode,
                                                               uint64_t *workspaceSize, aclOpExecutor **executor);
ACLNN_API aclnnStatus aclnnApplyRotaryPosEmbV2(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                               aclrtStream stream);

#ifdef __cplusplus
}
#endif

#endif /* FLEXNPU_ACLNNOP_APPLY_ROTARY_POS_EMB_V2_H_ */
