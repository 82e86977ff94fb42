/* Feeds FWD_ACLNN_MAKE records to the executor's aclnn part (exec_aclnn.c, built in with
 * this file) as a client's ring would, without the rest of the executor: what a hostile
 * client can put in a record must be refused, never crash or leak.
 *
 * stdin: records, each `u32 plen, u64 a0, u64 a1, u64 a2` then plen payload bytes (a0 is
 * the executor handle, a1 the operator index, a2 the argument count). For each, one line:
 * the MAKE's code, then (when it made an executor) the code of its FWD_ACLNN_DESTROY.
 * Device memory the client "holds" (ex_check_dev): [0x100000, 0x200000). Built by
 * tests/test_forward_aclnn.py, with the sanitizers when the compiler has them. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "executor.h"
#include "fwd_aclnn.h"

void ex_log(const char *fmt, ...) { (void)fmt; }
uint64_t ex_now(void) { return 0; }
void ex_sched_admit(struct ex_client *c) { (void)c; }
void ex_admit_budgeted(struct ex_client *c, aclrtStream st) { (void)c; (void)st; }
void ex_budget_dispatched(struct ex_client *c, aclrtStream st) { (void)c; (void)st; }

int ex_fail(struct ex_client *c, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->msg, sizeof c->msg, fmt, ap);
    va_end(ap);
    return rc;
}

int ex_check_dev(struct ex_client *c, uint64_t p, uint64_t n, const char *what)
{
    if (p >= 0x100000 && p < 0x200000 && n <= 0x200000 - p) return ACL_SUCCESS;
    return ex_fail(c, ACL_ERROR_INVALID_PARAM, "%s: not the client's", what);
}

aclrtStream ex_stream(struct ex_client *c, uint64_t h, int *rc)
{
    *rc = ex_fail(c, ACL_ERROR_INVALID_PARAM, "no streams here (%llu)", (unsigned long long)h);
    return NULL;
}

int main(void)
{
    struct ex_client c;
    memset(&c, 0, sizeof c);
    for (;;) {
        uint32_t plen;
        uint64_t a[3];
        if (fread(&plen, sizeof plen, 1, stdin) != 1 || fread(a, sizeof a, 1, stdin) != 1) break;
        uint8_t *pl = malloc(plen ? plen : 1);
        if (!pl || fread(pl, 1, plen, stdin) != plen) return 2;
        struct fwd_rec r = {.len = 64, .op = FWD_ACLNN_MAKE, .plen = plen};
        memcpy(r.a, a, sizeof a);
        int rc = ex_aclnn(&c, &r, pl);
        free(pl);
        if (rc) {
            printf("%d %s\n", rc, c.msg);
            continue;
        }
        struct fwd_rec d = {.len = 64, .op = FWD_ACLNN_DESTROY};
        d.a[0] = a[0];
        printf("0 %d\n", ex_aclnn(&c, &d, NULL));
    }
    ex_aclnn_forget(&c);
    printf("done\n");
    return 0;
}
