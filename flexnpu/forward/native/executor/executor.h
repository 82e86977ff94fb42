/* The executor's view of one forwarded client, shared by its parts: executor.c (admission,
 * the ring, runtime calls, the scheduler), exec_kernels.c (what a kernel's arguments name),
 * exec_aclnn.c (the aclnn operators). */
#ifndef FLEXNPU_EXECUTOR_H_
#define FLEXNPU_EXECUTOR_H_

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "acl/acl.h"
#include "fwd_proto.h"

#define EX_KEY_LEN 65                   /* an IPC key, as CANN's (ascendcl-facts.md) */
#define EX_INFLIGHT 256                 /* budget events per client */
#define EX_FAIR_INFLIGHT 32             /* launches a client with no budget may have queued on the device */
#define EX_SPIN_NS 20000ULL     /* an idle worker watches its ring this long (yielding) before it sleeps */
#define EX_IDLE_SLICE_NS 10000000ULL    /* a sleeping worker looks at its client's connection this often */
#define EX_ADMITTING 16                 /* connections being admitted at once */
#define EX_SETTINGS_POLL_NS 10000000ULL /* a held client re-reads its settings at least this often */

struct ex_mem;

struct ex_range { /* memory the client may name: its own allocation, or an import */
    uint64_t base, size;
    struct ex_mem *mem;
    bool own;
};

struct ex_bin {
    aclrtBinHandle bin;
    /* for a FlexNPU kernel library: "name\0builtin\0..." pairs, to check launches' arguments */
    char *names;
    int nnames;
};

struct ex_func {
    aclrtFuncHandle fn;
    int bin;
    int builtin; /* -1: the arguments are opaque to the executor */
};

struct ex_inflight {
    aclrtEvent ev;
    uint64_t seq; /* the client's launches dispatched when it was recorded */
};

struct ex_aclnn_state;

struct ex_client {
    int sock;
    pid_t pid;
    uint32_t uid;
    int slot;
    uint8_t *mem;
    size_t mem_bytes;
    struct fwd_hdr *hdr;
    struct fwd_compl *compl;
    uint8_t *ring, *stage, *host;
    uint64_t host_bytes, host_base;
    uint64_t head;       /* the executor's own copy: the shared one is only published */
    uint8_t *buf;        /* the current record's payload, copied out */
    size_t buf_cap;
    uint64_t quota, held;
    aclrtStream default_stream;
    aclrtStream *streams;
    aclrtEvent *events;
    struct ex_bin *bins;
    struct ex_func *funcs;
    struct ex_range *ranges; /* sorted by base; under g_mem_lock */
    int nranges, cap_ranges;
    struct ex_aclnn_state *nn;
    /* the scheduler's state: under g_sched */
    bool wants, unsynced, released, gone;
    uint64_t synced_ns;
    uint64_t holds, expired, hold_ns;
    /* the in-flight budget: events on the device, oldest first (the worker's alone) */
    struct ex_inflight inf[EX_INFLIGHT];
    int inf_head, inf_n;
    uint64_t issued, done_seq, rec_seq; /* launches dispatched; of them known done; at the newest event */
    uint64_t budget_wait_ns;
    /* errors */
    int async_rc;
    char async_msg[FWD_MSG_LEN];
    char msg[FWD_MSG_LEN];
    uint64_t records;
};

void ex_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
uint64_t ex_now(void);
/* Sets the client's message; returns rc. */
int ex_fail(struct ex_client *c, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* ACL_SUCCESS if [p, p+n) lies in memory the client may name. */
int ex_check_dev(struct ex_client *c, uint64_t p, uint64_t n, const char *what);
/* The runtime stream of a client's stream handle (0: its default stream); NULL with *rc set. */
aclrtStream ex_stream(struct ex_client *c, uint64_t h, int *rc);
/* Before an operation that puts work on the device: the scheduler's decision. */
void ex_sched_admit(struct ex_client *c);
/* Before a launch on stream st: the client's in-flight budget, then the scheduler's decision;
 * after it, ex_budget_dispatched counts it. */
void ex_admit_budgeted(struct ex_client *c, aclrtStream st);
void ex_budget_dispatched(struct ex_client *c, aclrtStream st);

/* exec_kernels.c: kernel libraries and launch arguments */
void ex_kernel_library_parse(struct ex_bin *b, const void *data, size_t len);
int ex_kernel_builtin_of(const struct ex_bin *b, const char *name);
int ex_check_kernel_args(struct ex_client *c, int builtin, const void *args, size_t len);

/* exec_aclnn.c: the aclnn operators */
int ex_aclnn(struct ex_client *c, const struct fwd_rec *r, const uint8_t *pl);
void ex_aclnn_forget(struct ex_client *c);

#endif
