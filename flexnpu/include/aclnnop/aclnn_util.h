/* FlexNPU emulated Ascend device: the export macro of the operator headers, as CANN's
 * aclnnop/aclnn_util.h (hicann/opbase, include/aclnnop/aclnn_util.h) defines it. */
#ifndef FLEXNPU_ACLNNOP_ACLNN_UTIL_H_
#define FLEXNPU_ACLNNOP_ACLNN_UTIL_H_

#define ACLNN_API __attribute__((visibility("default")))

#endif /* FLEXNPU_ACLNNOP_ACLNN_UTIL_H_ */
