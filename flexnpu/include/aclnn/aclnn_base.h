/* FlexNPU emulated Ascend device: aclnn initialisation (libnnopbase.so).
 *
 * Follows CANN's public header aclnn/aclnn_base.h (hicann/opbase,
 * include/nnopbase/aclnn/aclnn_base.h), which every aclnnop/aclnn_<op>.h includes.
 */
#ifndef FLEXNPU_ACLNN_ACLNN_BASE_H_
#define FLEXNPU_ACLNN_ACLNN_BASE_H_

#include <stdint.h>
#include <stdlib.h>
#include "aclnn/acl_meta.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Optional: aclInit alone is enough, as on CANN. configPath may be NULL. */
ACL_FUNC_VISIBILITY aclnnStatus aclnnInit(const char *configPath);
ACL_FUNC_VISIBILITY aclnnStatus aclnnFinalize(void);

#ifdef __cplusplus
}
#endif

#endif /* FLEXNPU_ACLNN_ACLNN_BASE_H_ */
