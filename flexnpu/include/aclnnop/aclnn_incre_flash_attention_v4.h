/* FlexNPU emulated Ascend device: incremental (decode) attention, one query token per sequence.
 *
 * Signatures follow CANN (hicann/ops-transformer,
 * attention/incre_flash_attention/op_host/op_api/aclnn_incre_flash_attention_v4.h);
 * behaviour and limits: docs/emulator.md, "The aclnn operator API".
 */
#ifndef FLEXNPU_ACLNNOP_INCRE_FLASH_ATTENTION_V4_H_
#define FLEXNPU_ACLNNOP_INCRE_FLASH_ATTENTION_V4_H_

#include "aclnn/aclnn_base.h"
#include "aclnn_util.h"

#ifdef __cplusplus
extern "C" {
#endif

ACLNN_API aclnnStatus aclnnIncreFlashAttentionV4GetWorkspaceSize(
    const aclTensor *query, const aclTensorList *key, const aclTensorList *value, const aclTensor *pseShift,
    const aclTensor *attenMask, const aclIntArray *actualSeqLengths, const aclTensor *dequantScale1,
    const aclTensor *quantScale1, const aclTensor *dequantScale2, const aclTensor *quantScale2,
    const aclTensor *quantOffset2, const aclTensor *antiquantScale, const aclTensor *antiquantOffset,
    const aclTensor *blocktable, const aclTensor *kvPaddingSize, int64_t numHeads, double scaleValue,
    char *inputLayout, int64_t numKeyValueHeads, int64_t blockSize, int64_t innerPrecise,
    const aclTensor *attentionOut, uint64_t *workspaceSize, aclOpExecutor **executor);
ACLNN_API aclnnStatus aclnnIncreFlashAttentionV4(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor,
                                                 const aclrtStream stream);

#ifdef __cplusplus
}
#endif

#endif /* FLEXNPU_ACLNNOP_INCRE_FLASH_ATTENTION_V4_H_ */
