/* Calls the emulated libascendcl.so exports for the emulator's own libopapi.so: not AscendCL
 * API (no acl* names), and absent from CANN's library. Implemented in acl_client.c. */
#ifndef FLEXNPU_EMU_EXT_H_
#define FLEXNPU_EMU_EXT_H_

#include <stddef.h>

#include "acl/acl_base.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ACL_SUCCESS if `stream` is usable (NULL: the thread's current device's default stream) and
 * [ptr, ptr + size) lies inside one allocation of this process on the stream's device;
 * size 0 checks only the stream. ACL_ERROR_INVALID_PARAM (or the stream's error) otherwise,
 * with the reason in aclGetRecentErrMsg(). */
ACL_FUNC_VISIBILITY aclError flexnpuEmuCheckRange(aclrtStream stream, const void *ptr, size_t size);

/* The stream's device's achieved fraction of peak (compute, HBM) for a built-in kernel
 * ("gemm", "attention_prefill", ...), 1.0 where the profile gives none. */
ACL_FUNC_VISIBILITY aclError flexnpuEmuKernelEfficiency(aclrtStream stream, const char *builtin,
                                                        double *computeEff, double *hbmEff);

/* Sets the calling thread's aclGetRecentErrMsg() text. */
ACL_FUNC_VISIBILITY void flexnpuEmuSetErrMsg(const char *msg);

#ifdef __cplusplus
}
#endif

#endif /* FLEXNPU_EMU_EXT_H_ */
