"""CANN's operator library (libopapi.so): the aclnn attention entry points the observer
probes to learn which phase a process's device work belongs to. Probe-only: nothing here
is wrapped by the shim or counted as a dispatch (the kernels an operator launches are
counted where they are launched, in libascendcl.so or libruntime.so).

Every aclnn operator is called in two steps (CANN's "two-stage interface"):
    aclnnXxxGetWorkspaceSize(inputs..., uint64_t *workspaceSize, aclOpExecutor **executor)
    aclnnXxx(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream)
The second call is where the work is launched, once per call, so it is the one probed.
Its name says what it computes; the class comes from the same name table as kernel names
(flexnpu/observe/phase.py, classify_name):

    prefill    aclnnPromptFlashAttention[V2,V3]   (full-prompt attention)
               aclnnFlashAttentionScore[V2], aclnnFlashAttentionVarLenScore[V2]
    decode     aclnnIncreFlashAttention[V2..V4]   (one query token per sequence)
    either     aclnnFusedInferAttentionScore[V2..V4]: one operator for both, the query's
               sequence length decides inside; its tensors are opaque to a probe (aclTensor),
               so a call counts as attention of unknown phase and the verdict falls to
               the kernel name or the iteration's shape.

Names checked against the ops-transformer operator docs (aclnnPromptFlashAttention.md,
IncreFlashAttentionV4.md, FlashAttentionVarLenScoreV2.md). Paged attention on Ascend is an
ATB operator in serving stacks (no aclnn entry we could confirm), so it is matched only
as a kernel name.
"""

from flexnpu.runtimes.base import Namer, RuntimeProfile

_EXEC = (("void *", "workspace"), ("uint64_t", "workspaceSize"), ("aclOpExecutor *", "executor"),
         ("aclrtStream", "stream"))

OPERATORS = (
    "aclnnPromptFlashAttention", "aclnnPromptFlashAttentionV2", "aclnnPromptFlashAttentionV3",
    "aclnnFlashAttentionScore", "aclnnFlashAttentionScoreV2",
    "aclnnFlashAttentionVarLenScore", "aclnnFlashAttentionVarLenScoreV2",
    "aclnnIncreFlashAttention", "aclnnIncreFlashAttentionV2", "aclnnIncreFlashAttentionV3",
    "aclnnIncreFlashAttentionV4",
    "aclnnFusedInferAttentionScore", "aclnnFusedInferAttentionScoreV2", "aclnnFusedInferAttentionScoreV3",
    "aclnnFusedInferAttentionScoreV4",
)

ACLNN = RuntimeProfile(
    name="aclnn",
    library="libopapi.so",
    headers=("aclnnop/aclnn_prompt_flash_attention_v3.h",),
    success="ACL_SUCCESS",
    symbols=(),
    namers=tuple(Namer(n, "aclnnStatus", _EXEC, kind="operator") for n in OPERATORS),
)
