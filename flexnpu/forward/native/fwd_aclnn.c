/* The aclnn operators in the forward build: not carried yet (their names return
 * ACL_ERROR_API_NOT_SUPPORT through dlsym). */
#define FWD_ACLNN_EXPORTS
