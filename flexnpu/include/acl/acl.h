/* FlexNPU emulated Ascend device: umbrella header, as acl/acl.h in CANN. */
#ifndef FLEXNPU_EMU_ACL_H_
#define FLEXNPU_EMU_ACL_H_
#include "acl_base.h"
#include "acl_rt.h"
#endif
