/* The aclnn operators in the executor: not carried yet. */
#include "executor.h"

int ex_aclnn(struct ex_client *c, const struct fwd_rec *r, const uint8_t *pl)
{
    (void)r;
    (void)pl;
    return ex_fail(c, ACL_ERROR_API_NOT_SUPPORT, "aclnn operators are not forwarded yet");
}

void ex_aclnn_forget(struct ex_client *c) { (void)c; }
