/* flexnpu-executor: the process that owns one device's context and runs the forwarded
 * clients' work in it (docs/architecture.md, "Forwarded execution").
 *
 * Started by `flexnpu daemon --device N`, which hands it two descriptors: the listening
 * socket exec-<dev>.sock (fd 3) and the gate table gate-<dev>.ctl opened read-only (fd 4).
 * A client that the daemon admitted in forward mode connects, and the executor:
 *   - learns who it is from the kernel (SO_PEERCRED) and finds the slot the daemon admitted
 *     that process into (pid, start time, forward mode); anyone else is refused;
 *   - maps the client's memfd (sealed against resizing, checked) and serves its ring with one
 *     worker thread, in order;
 *   - checks every field of every record: handles against the client's own tables, device
 *     pointers against the client's own allocations and the IPC imports it was allowed,
 *     host pointers against the client's own arena, lengths against the ring;
 *   - before each operation that puts work on the device, asks the scheduler (sched_admit):
 *     the client's gate, priority, in-flight budget and max hold, read from the daemon's
 *     table at that moment, decide, with no race between a check and a launch.
 * Everything runs in the executor's one context: streams of different clients share the
 * device's cores, and IPC memory handed between clients of this executor is the same memory.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "acl/acl.h"
#include "executor.h"
#include "fwd_proto.h"
#include "gate.h"

/* ---------------------------------------------------------------- small things */

static int g_device = -1;
static aclrtContext g_ctx; /* the device's one context: every thread of the executor works in it */
static const struct fx_ctl_seg *g_ctl;
static bool g_verbose;
static volatile sig_atomic_t g_stop;

void ex_log(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "flexnpu-executor[%d] device %d: ", getpid(), g_device);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

uint64_t ex_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void futex_wake(_Atomic uint32_t *w)
{
    syscall(SYS_futex, w, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
}

static void futex_wait(_Atomic uint32_t *w, uint32_t val, uint64_t ns)
{
    struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ULL), .tv_nsec = (long)(ns % 1000000000ULL)};
    syscall(SYS_futex, w, FUTEX_WAIT, val, &ts, NULL, 0);
}

int ex_fail(struct ex_client *c, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->msg, sizeof c->msg, fmt, ap);
    va_end(ap);
    return rc;
}

/* The runtime's own reason for its last failure, kept as the client's message. */
static int rt_fail(struct ex_client *c, int rc, const char *what)
{
    const char *why = aclGetRecentErrMsg();
    return ex_fail(c, rc, "%s: %s", what, why && *why ? why : "no reason given");
}

/* ---------------------------------------------------------------- the client's objects */

static struct ex_client *g_clients[FX_MAX_SLOTS * 2];
static pthread_mutex_t g_clients_lock = PTHREAD_MUTEX_INITIALIZER;

/* Memory of this executor that clients name: an allocation of one client, possibly shared
 * with others through IPC; freed on the device when nobody holds it any more. */
struct ex_mem {
    uint64_t base, size;
    int refs;            /* the owner's allocation (until freed) + imports */
    bool owner_freed;
    bool real_import;    /* imported from another process: closed, not freed */
    char key[EX_KEY_LEN];
    /* exported: who may import it (pids of this executor's clients; validated at import) */
    bool exported, no_pid_check;
    uint32_t exporter_uid;
    int npids;
    int32_t pids[64];
    uint64_t exporter_start;
    pid_t exporter_pid;
};

static pthread_mutex_t g_mem_lock = PTHREAD_MUTEX_INITIALIZER; /* every ex_mem and every client's ranges */

static void mem_put(struct ex_mem *m)
{
    if (--m->refs > 0) return;
    if (m->exported) aclrtIpcMemClose(m->key);
    if (m->real_import) aclrtIpcMemClose(m->key);
    else aclrtFree((void *)(uintptr_t)m->base);
    free(m);
}

/* The client's range table: sorted by base. Under g_mem_lock. */
static int range_find(struct ex_client *c, uint64_t p)
{
    int lo = 0, hi = c->nranges - 1, at = -1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (c->ranges[mid].base <= p) {
            at = mid;
            lo = mid + 1;
        } else hi = mid - 1;
    }
    return at;
}

static int range_add(struct ex_client *c, uint64_t base, uint64_t size, struct ex_mem *m, bool own)
{
    if (c->nranges == c->cap_ranges) {
        int n = c->cap_ranges ? c->cap_ranges * 2 : 64;
        if (n > FWD_MAX_ALLOCS) return -1;
        void *p = realloc(c->ranges, (size_t)n * sizeof *c->ranges);
        if (!p) return -1;
        c->ranges = p;
        c->cap_ranges = n;
    }
    int at = range_find(c, base) + 1;
    memmove(&c->ranges[at + 1], &c->ranges[at], (size_t)(c->nranges - at) * sizeof *c->ranges);
    c->ranges[at] = (struct ex_range){base, size, m, own};
    c->nranges++;
    return 0;
}

static void range_del(struct ex_client *c, int at)
{
    memmove(&c->ranges[at], &c->ranges[at + 1], (size_t)(c->nranges - at - 1) * sizeof *c->ranges);
    c->nranges--;
}

/* ACL_SUCCESS if [p, p+n) lies inside one range the client holds (its own memory or an
 * import it was allowed); n == 0 checks p alone. */
int ex_check_dev(struct ex_client *c, uint64_t p, uint64_t n, const char *what)
{
    pthread_mutex_lock(&g_mem_lock);
    int at = range_find(c, p);
    bool ok = at >= 0 && p - c->ranges[at].base < c->ranges[at].size &&
              n <= c->ranges[at].size - (p - c->ranges[at].base);
    pthread_mutex_unlock(&g_mem_lock);
    if (ok) return ACL_SUCCESS;
    return ex_fail(c, ACL_ERROR_INVALID_PARAM, "%s: %#llx (+%llu bytes) is not inside device memory of this process",
                   what, (unsigned long long)p, (unsigned long long)n);
}

/* The executor's address of the client's host range [p, p+n) if it is inside the client's
 * arena (zero-copy), else NULL. */
static void *host_at(struct ex_client *c, uint64_t p, uint64_t n)
{
    if (p < c->host_base || p - c->host_base > c->host_bytes || n > c->host_bytes - (p - c->host_base)) return NULL;
    return c->host + (p - c->host_base);
}

aclrtStream ex_stream(struct ex_client *c, uint64_t h, int *rc)
{
    if (h == 0) return c->default_stream;
    int64_t i = fwd_handle_index(h, FWD_H_STREAM);
    if (i < 0 || i >= FWD_MAX_STREAMS || !c->streams[i]) {
        *rc = ex_fail(c, ACL_ERROR_INVALID_PARAM, "%#llx is not a stream of this process", (unsigned long long)h);
        return NULL;
    }
    return c->streams[i];
}

static aclrtEvent ev_of(struct ex_client *c, uint64_t h, int *rc)
{
    int64_t i = fwd_handle_index(h, FWD_H_EVENT);
    if (i < 0 || i >= FWD_MAX_EVENTS || !c->events[i]) {
        *rc = ex_fail(c, ACL_ERROR_INVALID_PARAM, "%#llx is not an event of this process", (unsigned long long)h);
        return NULL;
    }
    return c->events[i];
}

/* ---------------------------------------------------------------- the scheduler */

/* One lock for every client's scheduling state: the decisions are a few loads each. */
static pthread_mutex_t g_sched = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_sched_cv;

static const struct fx_ctl_slot *slot_of(struct ex_client *c) { return &g_ctl->slots[c->slot]; }

/* Whether client o's work counts against clients of lower priority at now: it has work on
 * the device since its last synchronisation, records waiting, or synced less than the
 * table's grace ago. *left: ns until its grace ends. Under g_sched. */
static bool counts(struct ex_client *o, uint64_t now, uint64_t grace, uint64_t *left)
{
    *left = 0;
    if (o->gone) return false;
    if (o->unsynced || o->wants) return true;
    if (!o->synced_ns || now - o->synced_ns >= grace) return false;
    *left = grace - (now - o->synced_ns);
    return true;
}

/* Before an operation that puts work on the device. Returns when the client may go: its
 * gate open and no client of higher priority counting, or its max hold spent (then it goes
 * until its next synchronisation, as a gated client does). The in-flight budget is applied
 * by the caller (budget_wait). */
void ex_sched_admit(struct ex_client *c)
{
    const struct fx_ctl_slot *s = slot_of(c);
    pthread_mutex_lock(&g_sched);
    uint64_t t0 = 0;
    c->wants = true;
    for (;;) {
        uint64_t now = ex_now();
        uint32_t gate = atomic_load(&s->gate), prio = atomic_load(&s->priority) & (FX_PRIO_LEVELS - 1);
        uint64_t max_hold = atomic_load(&s->max_hold_ns), grace = atomic_load(&g_ctl->pending_grace_ns);
        uint64_t wait_ns = 0;
        bool hold = gate != FX_GATE_OPEN;
        if (!hold && !c->released) {
            for (int i = 0; i < (int)(sizeof g_clients / sizeof *g_clients); i++) {
                struct ex_client *o = g_clients[i];
                if (!o || o == c) continue;
                uint32_t op = atomic_load(&g_ctl->slots[o->slot].priority) & (FX_PRIO_LEVELS - 1);
                uint64_t left;
                if (op > prio && counts(o, now, grace, &left)) {
                    hold = true;
                    if (left && (!wait_ns || left < wait_ns)) wait_ns = left;
                }
            }
        }
        if (!hold || c->released || c->gone || g_stop) break;
        if (!t0) {
            t0 = now;
            c->holds++;
        }
        if (now - t0 >= max_hold) {
            c->released = true;
            c->expired++;
            break;
        }
        uint64_t slice = max_hold - (now - t0);
        if (wait_ns && wait_ns < slice) slice = wait_ns;
        if (slice > EX_SETTINGS_POLL_NS) slice = EX_SETTINGS_POLL_NS; /* settings are re-read this often */
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        uint64_t end = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec + slice;
        ts.tv_sec = (time_t)(end / 1000000000ULL);
        ts.tv_nsec = (long)(end % 1000000000ULL);
        pthread_cond_timedwait(&g_sched_cv, &g_sched, &ts);
    }
    if (t0) c->hold_ns += ex_now() - t0;
    c->wants = false;
    c->unsynced = true;
    pthread_mutex_unlock(&g_sched);
}

/* After a synchronisation of the client returned: its work no longer holds others (after
 * the grace), and a client released by max hold is held again from its next operation. */
static void sched_synced(struct ex_client *c)
{
    pthread_mutex_lock(&g_sched);
    if (c->unsynced) c->synced_ns = ex_now();
    c->unsynced = false;
    c->released = false;
    pthread_cond_broadcast(&g_sched_cv);
    pthread_mutex_unlock(&g_sched);
}

/* Wakes held clients: settings may have changed, or a client went. */
static void sched_kick(void)
{
    pthread_mutex_lock(&g_sched);
    pthread_cond_broadcast(&g_sched_cv);
    pthread_mutex_unlock(&g_sched);
}

/* The in-flight budget: the client's launches on the device, dispatched and not finished,
 * at most the table's inflight_max (0: unlimited). Counted exactly with the executor's own
 * events, recorded on the client's stream after each budgeted operation. */
/* The client's in-flight budget now: its setting, or with none EX_FAIR_INFLIGHT: streams of
 * one context take cores in the order work arrived, so a client with a deep queue on the
 * device would hold a newcomer behind all of it; a bounded queue keeps the device busy and
 * bounds the wait. */
static uint32_t budget_of(struct ex_client *c)
{
    uint32_t max = atomic_load(&slot_of(c)->inflight_max);
    return max ? max : EX_FAIR_INFLIGHT;
}

/* Pops the events that have completed (oldest first): their launches are done. */
static void budget_pop(struct ex_client *c)
{
    while (c->inf_n > 0) {
        struct ex_inflight *e = &c->inf[c->inf_head];
        aclrtEventRecordedStatus st = ACL_EVENT_RECORDED_STATUS_NOT_READY;
        if (aclrtQueryEventStatus(e->ev, &st) != ACL_SUCCESS || st != ACL_EVENT_RECORDED_STATUS_COMPLETE) return;
        c->done_seq = e->seq;
        c->inf_head = (c->inf_head + 1) % EX_INFLIGHT;
        c->inf_n--;
    }
}

static bool budget_record(struct ex_client *c, aclrtStream st)
{
    if (c->inf_n >= EX_INFLIGHT) return false;
    struct ex_inflight *e = &c->inf[(c->inf_head + c->inf_n) % EX_INFLIGHT];
    if (!e->ev && aclrtCreateEventWithFlag(&e->ev, ACL_EVENT_SYNC) != ACL_SUCCESS) return false;
    if (aclrtRecordEvent(e->ev, st) != ACL_SUCCESS) return false;
    e->seq = c->issued;
    c->rec_seq = c->issued;
    c->inf_n++;
    return true;
}

/* Before a budgeted launch: waits while the client's launches on the device, dispatched and
 * not known finished, reach its budget. Counted with the executor's own events, one every
 * budget/2 launches (so the count is over by less than that, never under). */
static void budget_wait(struct ex_client *c, aclrtStream st)
{
    uint32_t max = budget_of(c);
    budget_pop(c);
    while (c->issued - c->done_seq >= max && !c->gone && !g_stop) {
        if (c->inf_n == 0 && !budget_record(c, st)) return; /* nothing to wait on: go */
        if (c->rec_seq < c->issued && c->inf_n < EX_INFLIGHT) budget_record(c, st);
        uint64_t t0 = ex_now();
        aclrtSynchronizeEventWithTimeout(c->inf[c->inf_head].ev, 10);
        c->budget_wait_ns += ex_now() - t0;
        budget_pop(c);
    }
}

void ex_budget_dispatched(struct ex_client *c, aclrtStream st)
{
    uint32_t max = budget_of(c), stride = max / 2 ? max / 2 : 1;
    c->issued++;
    if (c->issued - c->rec_seq >= stride) budget_record(c, st);
}

/* Before a launch: first the budget (waiting for the client's own work on the device to
 * finish), then the scheduler's decision, and nothing between that decision and the launch,
 * so a launch never goes on a decision taken before another client became busy. */
void ex_admit_budgeted(struct ex_client *c, aclrtStream st)
{
    budget_wait(c, st);
    ex_sched_admit(c);
}

/* ---------------------------------------------------------------- operations */

static int op_launch(struct ex_client *c, const struct fwd_rec *r, const uint8_t *pl)
{
    int rc = ACL_SUCCESS;
    int64_t fi = fwd_handle_index(r->a[0], FWD_H_FUNC);
    if (fi < 0 || fi >= FWD_MAX_FUNCS || !c->funcs[fi].fn)
        return ex_fail(c, ACL_ERROR_INVALID_PARAM, "aclrtLaunchKernel: %#llx is not a kernel of this process",
                       (unsigned long long)r->a[0]);
    aclrtStream st = ex_stream(c, r->a[2], &rc);
    if (!st) return rc;
    rc = ex_check_kernel_args(c, c->funcs[fi].builtin, pl, r->plen);
    if (rc) return rc;
    ex_admit_budgeted(c, st);
    rc = aclrtLaunchKernel(c->funcs[fi].fn, (uint32_t)r->a[1], r->plen ? pl : NULL, r->plen, st);
    if (rc) return rt_fail(c, rc, "aclrtLaunchKernel");
    ex_budget_dispatched(c, st);
    return ACL_SUCCESS;
}

/* The executor's addresses of a copy's two sides. Device sides are checked against the
 * client's ranges; host sides must be in its arena, or in `staged` (bytes the record
 * carried, or the staging area). */
static int copy_sides(struct ex_client *c, const char *api, uint64_t dst, uint64_t dmax, uint64_t src, uint64_t n,
                      int kind, void *staged, void **d, void **s)
{
    int rc;
    if (n > dmax) return ex_fail(c, ACL_ERROR_INVALID_PARAM, "%s: count %llu > destMax %llu", api,
                                 (unsigned long long)n, (unsigned long long)dmax);
    switch (kind) {
    case ACL_MEMCPY_HOST_TO_DEVICE:
        if ((rc = ex_check_dev(c, dst, n, api))) return rc;
        *d = (void *)(uintptr_t)dst;
        *s = staged ? staged : host_at(c, src, n);
        break;
    case ACL_MEMCPY_DEVICE_TO_HOST:
        if ((rc = ex_check_dev(c, src, n, api))) return rc;
        *s = (void *)(uintptr_t)src;
        *d = staged ? staged : host_at(c, dst, n);
        break;
    case ACL_MEMCPY_DEVICE_TO_DEVICE:
        if ((rc = ex_check_dev(c, dst, n, api)) || (rc = ex_check_dev(c, src, n, api))) return rc;
        *d = (void *)(uintptr_t)dst;
        *s = (void *)(uintptr_t)src;
        break;
    default:
        return ex_fail(c, ACL_ERROR_INVALID_PARAM, "%s: copy kind %d is not forwarded", api, kind);
    }
    if (!*d || !*s) return ex_fail(c, ACL_ERROR_INVALID_PARAM, "%s: the host side is not in this process's host memory", api);
    return ACL_SUCCESS;
}

static int op_copy_async(struct ex_client *c, const struct fwd_rec *r, uint8_t *pl)
{
    int rc = ACL_SUCCESS;
    aclrtStream st = ex_stream(c, r->a[5], &rc);
    if (!st) return rc;
    void *d, *s;
    uint64_t n = r->a[3];
    void *staged = NULL;
    if (r->plen) {
        if (r->a[4] != ACL_MEMCPY_HOST_TO_DEVICE || r->plen != n)
            return ex_fail(c, ACL_ERROR_INVALID_PARAM, "aclrtMemcpyAsync: a malformed staged copy");
        staged = pl;
    }
    if ((rc = copy_sides(c, "aclrtMemcpyAsync", r->a[0], r->a[1], r->a[2], n, (int)r->a[4], staged, &d, &s))) return rc;
    ex_admit_budgeted(c, st);
    rc = aclrtMemcpyAsync(d, n, s, n, (aclrtMemcpyKind)r->a[4], st);
    if (rc) return rt_fail(c, rc, "aclrtMemcpyAsync");
    ex_budget_dispatched(c, st);
    return ACL_SUCCESS;
}

static int op_copy(struct ex_client *c, const struct fwd_rec *r)
{
    void *d, *s;
    uint64_t n = r->a[3];
    void *staged = NULL;
    if (r->a[5]) { /* the pageable side is in the staging area */
        if (n > FWD_STAGE_BYTES) return ex_fail(c, ACL_ERROR_INVALID_PARAM, "aclrtMemcpy: staged chunk too large");
        staged = c->stage;
    }
    int rc = copy_sides(c, "aclrtMemcpy", r->a[0], r->a[1], r->a[2], n, (int)r->a[4], staged, &d, &s);
    if (rc) return rc;
    ex_sched_admit(c);
    rc = aclrtMemcpy(d, n, s, n, (aclrtMemcpyKind)r->a[4]);
    return rc ? rt_fail(c, rc, "aclrtMemcpy") : ACL_SUCCESS;
}

static int op_memset(struct ex_client *c, const struct fwd_rec *r, bool async)
{
    int rc = ACL_SUCCESS;
    const char *api = async ? "aclrtMemsetAsync" : "aclrtMemset";
    if (r->a[3] > r->a[1]) return ex_fail(c, ACL_ERROR_INVALID_PARAM, "%s: count > maxCount", api);
    if ((rc = ex_check_dev(c, r->a[0], r->a[3], api))) return rc;
    aclrtStream st = NULL;
    if (async && !(st = ex_stream(c, r->a[4], &rc))) return rc;
    if (async) {
        ex_admit_budgeted(c, st);
        rc = aclrtMemsetAsync((void *)(uintptr_t)r->a[0], r->a[3], (int32_t)r->a[2], r->a[3], st);
        if (!rc) ex_budget_dispatched(c, st);
    } else {
        ex_sched_admit(c);
        rc = aclrtMemset((void *)(uintptr_t)r->a[0], r->a[3], (int32_t)r->a[2], r->a[3]);
    }
    return rc ? rt_fail(c, rc, api) : ACL_SUCCESS;
}

static int op_malloc(struct ex_client *c, const struct fwd_rec *r, uint64_t *o)
{
    uint64_t size = r->a[0];
    if (!size) return ex_fail(c, ACL_ERROR_INVALID_PARAM, "aclrtMalloc: size 0");
    if (c->quota && (c->held > c->quota || size > c->quota - c->held))
        return ex_fail(c, ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtMalloc: %llu bytes would pass this process's quota",
                       (unsigned long long)size);
    void *p = NULL;
    int rc = aclrtMalloc(&p, size, (aclrtMemMallocPolicy)r->a[1]);
    if (rc) return rt_fail(c, rc, "aclrtMalloc");
    struct ex_mem *m = calloc(1, sizeof *m);
    pthread_mutex_lock(&g_mem_lock);
    if (!m || range_add(c, (uint64_t)(uintptr_t)p, size, m, true) != 0) {
        pthread_mutex_unlock(&g_mem_lock);
        free(m);
        aclrtFree(p);
        return ex_fail(c, ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtMalloc: too many allocations");
    }
    m->base = (uint64_t)(uintptr_t)p;
    m->size = size;
    m->refs = 1;
    c->held += size;
    pthread_mutex_unlock(&g_mem_lock);
    o[0] = (uint64_t)(uintptr_t)p;
    return ACL_SUCCESS;
}

static int op_free(struct ex_client *c, uint64_t p)
{
    pthread_mutex_lock(&g_mem_lock);
    int at = range_find(c, p);
    if (at < 0 || c->ranges[at].base != p || !c->ranges[at].own) {
        pthread_mutex_unlock(&g_mem_lock);
        return ex_fail(c, ACL_ERROR_INVALID_PARAM, "aclrtFree: %#llx is not an allocation of this process",
                       (unsigned long long)p);
    }
    struct ex_mem *m = c->ranges[at].mem;
    c->held -= c->ranges[at].size;
    range_del(c, at);
    m->owner_freed = true;
    pthread_mutex_unlock(&g_mem_lock);
    /* the client's work on it must be done before the memory can go (aclrtFree's contract) */
    aclrtSynchronizeDevice();
    pthread_mutex_lock(&g_mem_lock);
    mem_put(m);
    pthread_mutex_unlock(&g_mem_lock);
    return ACL_SUCCESS;
}

/* ---- IPC: between clients of this executor the import is the exporter's memory itself */

static struct ex_mem *find_export(const char *key)
{
    for (int i = 0; i < (int)(sizeof g_clients / sizeof *g_clients); i++) {
        struct ex_client *o = g_clients[i];
        if (!o) continue;
        for (int k = 0; k < o->nranges; k++) {
            struct ex_mem *m = o->ranges[k].mem;
            if (o->ranges[k].own && m->exported && !strncmp(m->key, key, EX_KEY_LEN)) return m;
        }
    }
    return NULL;
}

static int op_ipc_export(struct ex_client *c, const struct fwd_rec *r, char *key_out)
{
    uint64_t p = r->a[0], size = r->a[1];
    pthread_mutex_lock(&g_mem_lock);
    int at = range_find(c, p);
    struct ex_mem *m = at >= 0 && c->ranges[at].own && c->ranges[at].base == p ? c->ranges[at].mem : NULL;
    pthread_mutex_unlock(&g_mem_lock);
    if (!m || !size || size > m->size)
        return ex_fail(c, ACL_ERROR_INVALID_PARAM, "aclrtIpcMemGetExportKey: %#llx (+%llu) is not the start of an "
                       "allocation of this process", (unsigned long long)p, (unsigned long long)size);
    if (m->exported) {
        snprintf(key_out, EX_KEY_LEN, "%s", m->key);
        return ACL_SUCCESS;
    }
    char key[EX_KEY_LEN] = {0};
    int rc = aclrtIpcMemGetExportKey((void *)(uintptr_t)p, size, key, sizeof key, r->a[2]);
    if (rc) return rt_fail(c, rc, "aclrtIpcMemGetExportKey");
    pthread_mutex_lock(&g_mem_lock);
    memcpy(m->key, key, sizeof key);
    m->exported = true;
    m->no_pid_check = r->a[2] & ACL_RT_IPC_MEM_EXPORT_FLAG_DISABLE_PID_VALIDATION;
    m->exporter_uid = c->uid;
    m->exporter_pid = c->pid;
    pthread_mutex_unlock(&g_mem_lock);
    snprintf(key_out, EX_KEY_LEN, "%s", key);
    return ACL_SUCCESS;
}

static int op_ipc_set_pid(struct ex_client *c, const struct fwd_rec *r, const uint8_t *pl)
{
    size_t n = r->a[1];
    if (r->plen < EX_KEY_LEN || n == 0 || n > 64 || r->plen != EX_KEY_LEN + n * sizeof(int32_t))
        return ex_fail(c, ACL_ERROR_INVALID_PARAM, "aclrtIpcMemSetImportPid: malformed (1-64 pids)");
    char key[EX_KEY_LEN];
    memcpy(key, pl, EX_KEY_LEN);
    key[EX_KEY_LEN - 1] = 0;
    int32_t pids[64];
    memcpy(pids, pl + EX_KEY_LEN, n * sizeof(int32_t));
    pthread_mutex_lock(&g_mem_lock);
    struct ex_mem *m = find_export(key);
    bool mine = m && m->exporter_pid == c->pid;
    if (mine) {
        for (size_t i = 0; i < n && m->npids < 64; i++) m->pids[m->npids++] = pids[i];
    }
    pthread_mutex_unlock(&g_mem_lock);
    if (!mine) return ex_fail(c, ACL_ERROR_RT_DRV_INTERNAL_ERROR, "aclrtIpcMemSetImportPid: no export of this process has that key");
    /* processes outside this executor import through the runtime, which needs them listed too */
    aclrtIpcMemSetImportPid(key, pids, n);
    return ACL_SUCCESS;
}

static int op_ipc_import(struct ex_client *c, const struct fwd_rec *r, const uint8_t *pl, uint64_t *o)
{
    if (r->plen < EX_KEY_LEN) return ex_fail(c, ACL_ERROR_INVALID_PARAM, "aclrtIpcMemImportByKey: no key");
    char key[EX_KEY_LEN];
    memcpy(key, pl, EX_KEY_LEN);
    key[EX_KEY_LEN - 1] = 0;
    pthread_mutex_lock(&g_mem_lock);
    struct ex_mem *m = find_export(key);
    if (m) {
        bool ok = m->exporter_pid == c->pid;
        for (int i = 0; !ok && i < m->npids; i++) ok = m->pids[i] == c->pid;
        if (!ok && m->no_pid_check) ok = c->uid == m->exporter_uid || c->uid == 0;
        int rc = ACL_SUCCESS;
        if (!ok) rc = ACL_ERROR_RT_DRV_INTERNAL_ERROR; /* as an unknown key: nothing is learnt by asking */
        else if (range_add(c, m->base, m->size, m, false) != 0) rc = ACL_ERROR_RT_OVER_LIMIT;
        else {
            m->refs++;
            o[0] = m->base;
            o[1] = m->size;
        }
        pthread_mutex_unlock(&g_mem_lock);
        if (rc == ACL_ERROR_RT_DRV_INTERNAL_ERROR)
            return ex_fail(c, rc, "aclrtIpcMemImportByKey: no export with this key may be imported by this process");
        return rc ? ex_fail(c, rc, "aclrtIpcMemImportByKey: too many ranges") : ACL_SUCCESS;
    }
    pthread_mutex_unlock(&g_mem_lock);
    void *p = NULL;
    int rc = aclrtIpcMemImportByKey(&p, key, r->a[0]);
    if (rc) return rt_fail(c, rc, "aclrtIpcMemImportByKey");
    struct ex_mem *nm = calloc(1, sizeof *nm);
    if (!nm) {
        aclrtIpcMemClose(key);
        return ex_fail(c, ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtIpcMemImportByKey: out of memory");
    }
    /* the runtime does not say how large an import is: the range is checked by the runtime */
    nm->base = (uint64_t)(uintptr_t)p;
    nm->size = UINT64_MAX - nm->base;
    nm->refs = 1;
    nm->real_import = true;
    memcpy(nm->key, key, EX_KEY_LEN);
    pthread_mutex_lock(&g_mem_lock);
    if (range_add(c, nm->base, 1, nm, false) != 0) {
        pthread_mutex_unlock(&g_mem_lock);
        aclrtIpcMemClose(key);
        free(nm);
        return ex_fail(c, ACL_ERROR_RT_OVER_LIMIT, "aclrtIpcMemImportByKey: too many ranges");
    }
    pthread_mutex_unlock(&g_mem_lock);
    o[0] = nm->base;
    return ACL_SUCCESS;
}

static int op_ipc_close(struct ex_client *c, const struct fwd_rec *r, const uint8_t *pl)
{
    if (r->plen < EX_KEY_LEN) return ex_fail(c, ACL_ERROR_INVALID_PARAM, "aclrtIpcMemClose: no key");
    char key[EX_KEY_LEN];
    memcpy(key, pl, EX_KEY_LEN);
    key[EX_KEY_LEN - 1] = 0;
    pthread_mutex_lock(&g_mem_lock);
    for (int k = 0; k < c->nranges; k++) {
        struct ex_mem *m = c->ranges[k].mem;
        if (strncmp(m->key, key, EX_KEY_LEN) != 0) continue;
        if (c->ranges[k].own) { /* the exporter closes its export: no new imports */
            m->exported = false;
            pthread_mutex_unlock(&g_mem_lock);
            return aclrtIpcMemClose(key) ? rt_fail(c, ACL_ERROR_RT_DRV_INTERNAL_ERROR, "aclrtIpcMemClose") : 0;
        }
        range_del(c, k);
        mem_put(m);
        pthread_mutex_unlock(&g_mem_lock);
        return ACL_SUCCESS;
    }
    pthread_mutex_unlock(&g_mem_lock);
    return ex_fail(c, ACL_ERROR_RT_DRV_INTERNAL_ERROR, "aclrtIpcMemClose: this process holds no memory with that key");
}

/* ---- streams, events, binaries */

static int op_stream_create(struct ex_client *c, const struct fwd_rec *r)
{
    int64_t i = fwd_handle_index(r->a[0], FWD_H_STREAM);
    if (i < 0 || i >= FWD_MAX_STREAMS || c->streams[i])
        return ex_fail(c, ACL_ERROR_INVALID_PARAM, "aclrtCreateStream: bad handle");
    int rc = aclrtCreateStreamWithConfig(&c->streams[i], (uint32_t)r->a[1], (uint32_t)r->a[2]);
    return rc ? rt_fail(c, rc, "aclrtCreateStream") : ACL_SUCCESS;
}

static int op_stream_destroy(struct ex_client *c, const struct fwd_rec *r)
{
    int rc = ACL_SUCCESS;
    aclrtStream st = ex_stream(c, r->a[0], &rc);
    if (!st || st == c->default_stream) return rc ? rc : ex_fail(c, ACL_ERROR_INVALID_PARAM, "aclrtDestroyStream: NULL");
    for (int k = 0; k < c->inf_n; k++) { /* budget events on it first */
        struct ex_inflight *e = &c->inf[(c->inf_head + k) % EX_INFLIGHT];
        aclrtSynchronizeEvent(e->ev);
    }
    c->inf_head = (c->inf_head + c->inf_n) % EX_INFLIGHT;
    c->inf_n = 0;
    c->done_seq = c->rec_seq = c->issued;
    rc = aclrtDestroyStream(st);
    if (!rc) c->streams[fwd_handle_index(r->a[0], FWD_H_STREAM)] = NULL;
    return rc ? rt_fail(c, rc, "aclrtDestroyStream") : ACL_SUCCESS;
}

static int op_sync(struct ex_client *c, const struct fwd_rec *r, uint64_t *o)
{
    int rc = ACL_SUCCESS;
    int32_t timeout = (int32_t)r->a[1];
    switch (r->op) {
    case FWD_STREAM_SYNC: {
        aclrtStream st = ex_stream(c, r->a[0], &rc);
        if (!st) return rc;
        rc = timeout < 0 ? aclrtSynchronizeStream(st) : aclrtSynchronizeStreamWithTimeout(st, timeout);
        if (!rc) budget_pop(c);
        break;
    }
    case FWD_DEVICE_SYNC: { /* this client's streams only: others' work is not its to wait for */
        timeout = (int32_t)r->a[0];
        rc = aclrtSynchronizeStream(c->default_stream);
        for (int i = 0; !rc && i < FWD_MAX_STREAMS; i++)
            if (c->streams[i]) rc = timeout < 0 ? aclrtSynchronizeStream(c->streams[i])
                                                : aclrtSynchronizeStreamWithTimeout(c->streams[i], timeout);
        if (!rc) { /* every launch of the client is done */
            c->inf_head = (c->inf_head + c->inf_n) % EX_INFLIGHT;
            c->inf_n = 0;
            c->done_seq = c->rec_seq = c->issued;
        }
        break;
    }
    case FWD_EVENT_SYNC: {
        aclrtEvent ev = ev_of(c, r->a[0], &rc);
        if (!ev) return rc;
        rc = timeout < 0 ? aclrtSynchronizeEvent(ev) : aclrtSynchronizeEventWithTimeout(ev, timeout);
        break;
    }
    case FWD_STREAM_QUERY: {
        aclrtStream st = ex_stream(c, r->a[0], &rc);
        if (!st) return rc;
        aclrtStreamStatus s;
        rc = aclrtStreamQuery(st, &s);
        o[0] = (uint64_t)s;
        return rc ? rt_fail(c, rc, "aclrtStreamQuery") : ACL_SUCCESS;
    }
    default:
        return ACL_ERROR_INVALID_PARAM;
    }
    if (rc) return rt_fail(c, rc, "synchronize");
    sched_synced(c);
    return ACL_SUCCESS;
}

static int op_event(struct ex_client *c, const struct fwd_rec *r, uint64_t *o)
{
    int rc = ACL_SUCCESS;
    switch (r->op) {
    case FWD_EVENT_CREATE: {
        int64_t i = fwd_handle_index(r->a[0], FWD_H_EVENT);
        if (i < 0 || i >= FWD_MAX_EVENTS || c->events[i])
            return ex_fail(c, ACL_ERROR_INVALID_PARAM, "aclrtCreateEvent: bad handle");
        rc = aclrtCreateEventWithFlag(&c->events[i], (uint32_t)r->a[1]);
        return rc ? rt_fail(c, rc, "aclrtCreateEvent") : ACL_SUCCESS;
    }
    case FWD_EVENT_DESTROY: {
        aclrtEvent ev = ev_of(c, r->a[0], &rc);
        if (!ev) return rc;
        rc = aclrtDestroyEvent(ev);
        if (!rc) c->events[fwd_handle_index(r->a[0], FWD_H_EVENT)] = NULL;
        return rc ? rt_fail(c, rc, "aclrtDestroyEvent") : ACL_SUCCESS;
    }
    case FWD_RECORD: {
        aclrtEvent ev = ev_of(c, r->a[0], &rc);
        aclrtStream st = ev ? ex_stream(c, r->a[1], &rc) : NULL;
        if (!st) return rc;
        rc = aclrtRecordEvent(ev, st);
        return rc ? rt_fail(c, rc, "aclrtRecordEvent") : ACL_SUCCESS;
    }
    case FWD_WAIT_EVENT: {
        aclrtStream st = ex_stream(c, r->a[0], &rc);
        aclrtEvent ev = st ? ev_of(c, r->a[1], &rc) : NULL;
        if (!ev) return rc;
        rc = aclrtStreamWaitEvent(st, ev);
        return rc ? rt_fail(c, rc, "aclrtStreamWaitEvent") : ACL_SUCCESS;
    }
    case FWD_EVENT_QUERY: {
        aclrtEvent ev = ev_of(c, r->a[0], &rc);
        if (!ev) return rc;
        aclrtEventStatus s;
        rc = aclrtQueryEvent(ev, &s);
        o[0] = (uint64_t)s;
        return rc ? rt_fail(c, rc, "aclrtQueryEvent") : ACL_SUCCESS;
    }
    case FWD_EVENT_STATUS: {
        aclrtEvent ev = ev_of(c, r->a[0], &rc);
        if (!ev) return rc;
        aclrtEventRecordedStatus s;
        rc = aclrtQueryEventStatus(ev, &s);
        o[0] = (uint64_t)s;
        return rc ? rt_fail(c, rc, "aclrtQueryEventStatus") : ACL_SUCCESS;
    }
    case FWD_EVENT_ELAPSED: {
        aclrtEvent a = ev_of(c, r->a[0], &rc);
        aclrtEvent b = a ? ev_of(c, r->a[1], &rc) : NULL;
        if (!b) return rc;
        float ms = 0;
        rc = aclrtEventElapsedTime(&ms, a, b);
        memcpy(&o[0], &ms, sizeof ms);
        return rc ? rt_fail(c, rc, "aclrtEventElapsedTime") : ACL_SUCCESS;
    }
    }
    return ACL_ERROR_INVALID_PARAM;
}

static int op_bin(struct ex_client *c, const struct fwd_rec *r, const uint8_t *pl)
{
    int rc;
    if (r->op == FWD_BIN_LOAD) {
        int64_t i = fwd_handle_index(r->a[0], FWD_H_BIN);
        if (i < 0 || i >= FWD_MAX_BINS || c->bins[i].bin)
            return ex_fail(c, ACL_ERROR_INVALID_PARAM, "aclrtBinaryLoad: bad handle");
        rc = aclrtBinaryLoadFromData(pl, r->plen, NULL, &c->bins[i].bin);
        if (rc) return rt_fail(c, rc, "aclrtBinaryLoadFromData");
        ex_kernel_library_parse(&c->bins[i], pl, r->plen);
        return ACL_SUCCESS;
    }
    int64_t i = fwd_handle_index(r->a[0], FWD_H_BIN);
    if (i < 0 || i >= FWD_MAX_BINS || !c->bins[i].bin)
        return ex_fail(c, ACL_ERROR_INVALID_PARAM, "%#llx is not a binary of this process", (unsigned long long)r->a[0]);
    if (r->op == FWD_BIN_UNLOAD) {
        rc = aclrtBinaryUnLoad(c->bins[i].bin);
        if (rc) return rt_fail(c, rc, "aclrtBinaryUnLoad");
        for (int f = 0; f < FWD_MAX_FUNCS; f++)
            if (c->funcs[f].bin == (int)i) c->funcs[f] = (struct ex_func){0};
        free(c->bins[i].names);
        c->bins[i] = (struct ex_bin){0};
        return ACL_SUCCESS;
    }
    int64_t f = fwd_handle_index(r->a[1], FWD_H_FUNC);
    if (f < 0 || f >= FWD_MAX_FUNCS || c->funcs[f].fn)
        return ex_fail(c, ACL_ERROR_INVALID_PARAM, "aclrtBinaryGetFunction: bad handle");
    char name[FWD_NAME_LEN];
    size_t n = r->plen < sizeof name - 1 ? r->plen : sizeof name - 1;
    memcpy(name, pl, n);
    name[n] = 0;
    rc = aclrtBinaryGetFunction(c->bins[i].bin, name, &c->funcs[f].fn);
    if (rc) return rt_fail(c, rc, "aclrtBinaryGetFunction");
    c->funcs[f].bin = (int)i;
    c->funcs[f].builtin = ex_kernel_builtin_of(&c->bins[i], name);
    return ACL_SUCCESS;
}

/* ---------------------------------------------------------------- the worker */

static void complete(struct ex_client *c, uint32_t slot, int rc, const uint64_t *o, const char *msg)
{
    if (slot >= FWD_NCOMPL) return;
    struct fwd_compl *k = &c->compl[slot];
    k->rc = rc;
    for (int i = 0; i < 4; i++) k->o[i] = o[i];
    snprintf(k->msg, sizeof k->msg, "%s", msg ? msg : "");
    atomic_store_explicit(&k->state, FWD_C_DONE, memory_order_release);
    if (atomic_load(&k->waiting)) futex_wake(&k->state);
}

static bool client_hung_up(struct ex_client *c)
{
    struct pollfd p = {.fd = c->sock, .events = POLLIN};
    if (poll(&p, 1, 0) <= 0) return false;
    if (p.revents & (POLLHUP | POLLERR)) return true;
    char b;
    return recv(c->sock, &b, 1, MSG_DONTWAIT) == 0;
}

/* The next record, copied out of the ring (the client may write the ring at any moment).
 * 1: got one; 0: none now; -1: the ring is corrupt (the client is cut off). */
static int next_record(struct ex_client *c, struct fwd_rec *r, uint8_t **pl)
{
    uint64_t tail = atomic_load_explicit(&c->hdr->tail, memory_order_acquire);
    uint64_t head = c->head;
    if (tail == head) return 0;
    if (tail - head > FWD_RING_BYTES || tail % FWD_REC_ALIGN) return -1;
    uint64_t off = head % FWD_RING_BYTES;
    memcpy(r, c->ring + off, sizeof *r);
    if (r->len < sizeof *r || r->len % FWD_REC_ALIGN || r->len > tail - head || off + r->len > FWD_RING_BYTES ||
        r->plen > r->len - sizeof *r)
        return -1;
    if (r->plen > c->buf_cap) {
        void *p = realloc(c->buf, r->plen);
        if (!p) return -1;
        c->buf = p;
        c->buf_cap = r->plen;
    }
    memcpy(c->buf, c->ring + off + sizeof *r, r->plen);
    *pl = c->buf;
    c->head = head + r->len;
    atomic_store_explicit(&c->hdr->head, c->head, memory_order_release);
    if (atomic_load(&c->hdr->client_waiting)) {
        atomic_fetch_add(&c->hdr->room, 1);
        futex_wake(&c->hdr->room);
    }
    return 1;
}

static int run_record(struct ex_client *c, const struct fwd_rec *r, uint8_t *pl, uint64_t *o, char *text)
{
    c->msg[0] = 0;
    switch (r->op) {
    case FWD_NOP:
    case FWD_PAD: return ACL_SUCCESS;
    case FWD_LAUNCH: return op_launch(c, r, pl);
    case FWD_COPY_ASYNC: return op_copy_async(c, r, pl);
    case FWD_MEMSET_ASYNC: return op_memset(c, r, true);
    case FWD_MEMSET: return op_memset(c, r, false);
    case FWD_RECORD:
    case FWD_WAIT_EVENT:
    case FWD_EVENT_CREATE:
    case FWD_EVENT_DESTROY:
    case FWD_EVENT_QUERY:
    case FWD_EVENT_STATUS:
    case FWD_EVENT_ELAPSED: return op_event(c, r, o);
    case FWD_MALLOC: return op_malloc(c, r, o);
    case FWD_FREE: return op_free(c, r->a[0]);
    case FWD_COPY: return op_copy(c, r);
    case FWD_STREAM_CREATE: return op_stream_create(c, r);
    case FWD_STREAM_DESTROY: return op_stream_destroy(c, r);
    case FWD_STREAM_SYNC:
    case FWD_DEVICE_SYNC:
    case FWD_EVENT_SYNC:
    case FWD_STREAM_QUERY: return op_sync(c, r, o);
    case FWD_BIN_LOAD:
    case FWD_BIN_UNLOAD:
    case FWD_BIN_FUNC: return op_bin(c, r, pl);
    case FWD_MEM_INFO: {
        size_t fr = 0, tot = 0;
        int rc = aclrtGetMemInfo((aclrtMemAttr)r->a[0], &fr, &tot);
        if (rc) return rt_fail(c, rc, "aclrtGetMemInfo");
        o[0] = fr;
        o[1] = tot;
        return ACL_SUCCESS;
    }
    case FWD_IPC_EXPORT: return op_ipc_export(c, r, text);
    case FWD_IPC_SET_PID: return op_ipc_set_pid(c, r, pl);
    case FWD_IPC_IMPORT: return op_ipc_import(c, r, pl, o);
    case FWD_IPC_CLOSE: return op_ipc_close(c, r, pl);
    case FWD_SOC_NAME: {
        const char *n = aclrtGetSocName();
        snprintf(text, FWD_MSG_LEN, "%s", n ? n : "");
        return ACL_SUCCESS;
    }
    case FWD_ACLNN_MAKE:
    case FWD_ACLNN_RUN:
    case FWD_ACLNN_DESTROY:
    case FWD_ACLNN_REPEATABLE: return ex_aclnn(c, r, pl);
    default: return ex_fail(c, ACL_ERROR_INVALID_PARAM, "record op %u is not one the executor runs", r->op);
    }
}

static void serve(struct ex_client *c)
{
    struct fwd_rec r;
    uint8_t *pl = NULL;
    uint64_t idle_since = 0;
    while (!g_stop && !c->gone) {
        int got = next_record(c, &r, &pl);
        if (got < 0) {
            ex_log("pid %d: a malformed record in its ring; the client is cut off", c->pid);
            break;
        }
        if (got == 0) {
            uint64_t now = ex_now();
            if (!idle_since) idle_since = now;
            if (now - idle_since < EX_SPIN_NS) {
                sched_yield(); /* the client and the device share the CPUs */
                continue;
            }
            uint32_t bell = atomic_load(&c->hdr->bell);
            atomic_store(&c->hdr->exec_sleeping, 1);
            if (atomic_load_explicit(&c->hdr->tail, memory_order_seq_cst) == c->head)
                futex_wait(&c->hdr->bell, bell, EX_IDLE_SLICE_NS);
            atomic_store(&c->hdr->exec_sleeping, 0);
            if (atomic_load(&c->hdr->tail) == c->head && client_hung_up(c)) break;
            continue;
        }
        idle_since = 0;
        uint64_t o[4] = {0};
        char text[FWD_MSG_LEN] = {0};
        int rc = run_record(c, &r, pl, o, text);
        c->records++;
        atomic_store_explicit(&c->hdr->done_records, c->records, memory_order_relaxed);
        if (r.op > FWD_ASYNC_LAST) {
            if (!rc && c->async_rc && (r.op == FWD_STREAM_SYNC || r.op == FWD_DEVICE_SYNC || r.op == FWD_EVENT_SYNC)) {
                rc = c->async_rc; /* an asynchronous failure is reported by the next synchronisation */
                snprintf(c->msg, sizeof c->msg, "%s", c->async_msg);
                c->async_rc = 0;
            }
            complete(c, r.compl, rc, o, rc ? c->msg : text);
        } else if (rc && !c->async_rc) {
            c->async_rc = rc;
            snprintf(c->async_msg, sizeof c->async_msg, "%s", c->msg);
        }
        if (rc && g_verbose) ex_log("pid %d: op %u failed %d: %s", c->pid, r.op, rc, c->msg);
    }
}

/* Frees everything the client held, whatever state it left it in. */
static void cleanup(struct ex_client *c)
{
    for (int i = 0; i < FWD_MAX_STREAMS; i++)
        if (c->streams[i]) aclrtSynchronizeStream(c->streams[i]);
    aclrtSynchronizeStream(c->default_stream);
    ex_aclnn_forget(c);
    for (int i = 0; i < EX_INFLIGHT; i++)
        if (c->inf[i].ev) aclrtDestroyEvent(c->inf[i].ev);
    for (int i = 0; i < FWD_MAX_EVENTS; i++)
        if (c->events[i]) aclrtDestroyEvent(c->events[i]);
    for (int i = 0; i < FWD_MAX_STREAMS; i++)
        if (c->streams[i]) aclrtDestroyStream(c->streams[i]);
    aclrtDestroyStream(c->default_stream);
    for (int i = 0; i < FWD_MAX_BINS; i++)
        if (c->bins[i].bin) {
            aclrtBinaryUnLoad(c->bins[i].bin);
            free(c->bins[i].names);
        }
    pthread_mutex_lock(&g_mem_lock);
    while (c->nranges > 0) {
        struct ex_mem *m = c->ranges[c->nranges - 1].mem;
        if (c->ranges[c->nranges - 1].own) m->owner_freed = true, m->exported = false;
        c->nranges--;
        mem_put(m);
    }
    free(c->ranges);
    pthread_mutex_unlock(&g_mem_lock);
}

static void *worker(void *arg)
{
    struct ex_client *c = arg;
    aclrtSetCurrentContext(g_ctx);
    serve(c);
    pthread_mutex_lock(&g_sched);
    c->gone = true;
    pthread_cond_broadcast(&g_sched_cv);
    pthread_mutex_unlock(&g_sched);
    cleanup(c);
    pthread_mutex_lock(&g_clients_lock);
    pthread_mutex_lock(&g_mem_lock); /* find_export walks g_clients under it */
    pthread_mutex_lock(&g_sched);    /* and the scheduler under this one */
    for (int i = 0; i < (int)(sizeof g_clients / sizeof *g_clients); i++)
        if (g_clients[i] == c) g_clients[i] = NULL;
    pthread_mutex_unlock(&g_sched);
    pthread_mutex_unlock(&g_mem_lock);
    pthread_mutex_unlock(&g_clients_lock);
    if (g_verbose) ex_log("pid %d: gone after %llu records", c->pid, (unsigned long long)c->records);
    munmap(c->mem, c->mem_bytes);
    close(c->sock);
    free(c->streams);
    free(c->events);
    free(c->bins);
    free(c->funcs);
    free(c->buf);
    free(c);
    return NULL;
}

/* ---------------------------------------------------------------- admission */

static uint64_t start_time_of(pid_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return 0;
    /* fields after the comm: state is field 3; starttime is field 22 */
    int field = 2;
    for (; *p && field < 22; p++)
        if (*p == ' ') field++;
    return strtoull(p, NULL, 10);
}

static void refuse(int s, int status, const char *fmt, ...)
{
    struct fwd_welcome w = {.magic = FWD_HELLO_MAGIC, .version = FWD_VERSION, .status = status};
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(w.reason, sizeof w.reason, fmt, ap);
    va_end(ap);
    send(s, &w, sizeof w, MSG_NOSIGNAL);
    close(s);
}

static void admit(int s)
{
    struct ucred cr;
    socklen_t cl = sizeof cr;
    if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, &cr, &cl) != 0) {
        close(s);
        return;
    }
    struct timeval tv = {.tv_sec = 2};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct fwd_hello h;
    int fd = -1;
    union {
        struct cmsghdr hd;
        char buf[CMSG_SPACE(sizeof(int))];
    } cm;
    struct iovec iov = {.iov_base = &h, .iov_len = sizeof h};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof cm.buf};
    ssize_t got = recvmsg(s, &mh, MSG_CMSG_CLOEXEC);
    struct cmsghdr *cmh = got > 0 ? CMSG_FIRSTHDR(&mh) : NULL;
    if (cmh && cmh->cmsg_level == SOL_SOCKET && cmh->cmsg_type == SCM_RIGHTS && cmh->cmsg_len == CMSG_LEN(sizeof(int)))
        memcpy(&fd, CMSG_DATA(cmh), sizeof fd);
    if (got != (ssize_t)sizeof h || h.magic != FWD_HELLO_MAGIC || h.version != FWD_VERSION || fd < 0) {
        if (fd >= 0) close(fd);
        refuse(s, -EPROTO, "device %d: not a forwarding client of this version (%d)", g_device, FWD_VERSION);
        return;
    }
    /* the daemon must have admitted this very process in forward mode */
    uint64_t st = start_time_of(cr.pid);
    int slot = -1;
    for (int i = 0; i < FX_MAX_SLOTS; i++) {
        const struct fx_ctl_slot *sl = &g_ctl->slots[i];
        if (atomic_load(&sl->state) == FX_SLOT_ADMITTED && atomic_load(&sl->pid) == cr.pid &&
            atomic_load(&sl->start_time) == st && atomic_load(&sl->mode) == FX_MODE_FORWARD)
            slot = i;
    }
    if (slot < 0) {
        close(fd);
        refuse(s, -EACCES, "device %d: pid %d was not admitted in forward mode by the device's daemon", g_device, cr.pid);
        return;
    }
    int seals = fcntl(fd, F_GET_SEALS);
    struct stat sb;
    uint64_t need = h.host_bytes <= FWD_HOST_MAX ? fwd_total(h.host_bytes) : 0;
    if (seals < 0 || !(seals & F_SEAL_SHRINK) || fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode) || !need ||
        (uint64_t)sb.st_size != need || h.host_bytes % 4096) {
        close(fd);
        refuse(s, -EINVAL, "device %d: the ring memory must be a memfd of %llu bytes sealed against shrinking",
               g_device, (unsigned long long)need);
        return;
    }
    void *mem = mmap(NULL, need, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (mem == MAP_FAILED) {
        refuse(s, -ENOMEM, "device %d: cannot map the ring memory", g_device);
        return;
    }
    struct ex_client *c = calloc(1, sizeof *c);
    if (c) {
        c->streams = calloc(FWD_MAX_STREAMS, sizeof *c->streams);
        c->events = calloc(FWD_MAX_EVENTS, sizeof *c->events);
        c->bins = calloc(FWD_MAX_BINS, sizeof *c->bins);
        c->funcs = calloc(FWD_MAX_FUNCS, sizeof *c->funcs);
    }
    if (!c || !c->streams || !c->events || !c->bins || !c->funcs ||
        aclrtCreateStream(&c->default_stream) != ACL_SUCCESS) {
        if (c) {
            free(c->streams);
            free(c->events);
            free(c->bins);
            free(c->funcs);
        }
        free(c);
        munmap(mem, need);
        refuse(s, -ENOMEM, "device %d: out of memory or streams", g_device);
        return;
    }
    c->sock = s;
    c->pid = cr.pid;
    c->uid = cr.uid;
    c->slot = slot;
    c->mem = mem;
    c->mem_bytes = need;
    c->hdr = mem;
    c->compl = (struct fwd_compl *)((uint8_t *)mem + FWD_HDR_BYTES);
    c->ring = (uint8_t *)mem + fwd_ring_off();
    c->stage = (uint8_t *)mem + fwd_stage_off();
    c->host = (uint8_t *)mem + fwd_host_off();
    c->host_bytes = h.host_bytes;
    c->host_base = h.host_base;
    c->quota = h.quota;
    c->head = 0;
    /* the executor owns these words from here: the client's values mean nothing */
    atomic_store(&c->hdr->head, 0);
    pthread_mutex_lock(&g_clients_lock);
    int at = -1;
    for (int i = 0; i < (int)(sizeof g_clients / sizeof *g_clients) && at < 0; i++)
        if (!g_clients[i]) at = i;
    if (at >= 0) {
        pthread_mutex_lock(&g_mem_lock);
        pthread_mutex_lock(&g_sched);
        g_clients[at] = c;
        pthread_mutex_unlock(&g_sched);
        pthread_mutex_unlock(&g_mem_lock);
    }
    pthread_mutex_unlock(&g_clients_lock);
    struct fwd_welcome w = {.magic = FWD_HELLO_MAGIC, .version = FWD_VERSION, .status = at < 0 ? -ENOSPC : 0};
    if (at < 0) snprintf(w.reason, sizeof w.reason, "device %d: the executor serves its most clients", g_device);
    send(s, &w, sizeof w, MSG_NOSIGNAL);
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (at < 0 || pthread_create(&t, &attr, worker, c) != 0) {
        if (at >= 0) {
            pthread_mutex_lock(&g_clients_lock);
            pthread_mutex_lock(&g_mem_lock);
            pthread_mutex_lock(&g_sched);
            g_clients[at] = NULL;
            pthread_mutex_unlock(&g_sched);
            pthread_mutex_unlock(&g_mem_lock);
            pthread_mutex_unlock(&g_clients_lock);
        }
        aclrtDestroyStream(c->default_stream);
        munmap(mem, need);
        close(s);
        free(c->streams);
        free(c->events);
        free(c->bins);
        free(c->funcs);
        free(c);
    } else if (g_verbose) {
        ex_log("pid %d (uid %u) served in slot %d", cr.pid, cr.uid, slot);
    }
    pthread_attr_destroy(&attr);
}

static void on_signal(int sig) { g_stop = 1; }

/* A connection is admitted on a thread of its own: one that sends nothing (it has 2 s) must
 * not keep others waiting. At most EX_ADMITTING at once; past that, refused at once. */
static _Atomic int g_admitting;

static void *admit_thread(void *arg)
{
    aclrtSetCurrentContext(g_ctx); /* the client's default stream is made here */
    admit((int)(intptr_t)arg);
    atomic_fetch_sub(&g_admitting, 1);
    return NULL;
}

static void admit_async(int s)
{
    if (atomic_fetch_add(&g_admitting, 1) >= EX_ADMITTING) {
        atomic_fetch_sub(&g_admitting, 1);
        close(s);
        return;
    }
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &attr, admit_thread, (void *)(intptr_t)s) != 0) {
        atomic_fetch_sub(&g_admitting, 1);
        close(s);
    }
    pthread_attr_destroy(&attr);
}

/* The daemon bumps the table's wake_seq whenever it writes settings: held clients look again
 * at once (a FUTEX_WAIT on the read-only table only reads the word). */
static void *settings_watcher(void *arg)
{
    (void)arg;
    uint32_t seen = atomic_load(&g_ctl->wake_seq);
    while (!g_stop) {
        futex_wait((_Atomic uint32_t *)&g_ctl->wake_seq, seen, 100000000ULL);
        uint32_t w = atomic_load(&g_ctl->wake_seq);
        if (w != seen) {
            seen = w;
            sched_kick();
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int listen_fd = 3, ctl_fd = 4;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--device") && i + 1 < argc) g_device = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--listen-fd") && i + 1 < argc) listen_fd = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--ctl-fd") && i + 1 < argc) ctl_fd = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--verbose")) g_verbose = true;
        else {
            fprintf(stderr, "usage: flexnpu-executor --device N [--listen-fd 3] [--ctl-fd 4] [--verbose]\n"
                            "Started by `flexnpu daemon --device N`, which passes the descriptors.\n");
            return 2;
        }
    }
    if (g_device < 0) {
        fprintf(stderr, "flexnpu-executor: --device N is required\n");
        return 2;
    }
    /* it lives and dies with its daemon: clients of a gone daemon get errors at once, and a
     * restarted daemon starts an executor of its own */
    pid_t parent = getppid();
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) return 1;
    struct stat sb;
    if (fstat(ctl_fd, &sb) != 0 || (size_t)sb.st_size < sizeof(struct fx_ctl_seg)) {
        ex_log("fd %d is not the device's gate table", ctl_fd);
        return 1;
    }
    g_ctl = mmap(NULL, sizeof(struct fx_ctl_seg), PROT_READ, MAP_SHARED, ctl_fd, 0);
    if (g_ctl == MAP_FAILED || g_ctl->magic != FX_GATE_MAGIC_CTL || g_ctl->version != FX_GATE_VERSION) {
        ex_log("fd %d is not a gate table of version %d", ctl_fd, FX_GATE_VERSION);
        return 1;
    }
    close(ctl_fd);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&g_sched_cv, &ca);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    int rc = aclInit(NULL);
    if (rc == ACL_SUCCESS) rc = aclrtSetDevice(g_device);
    if (rc == ACL_SUCCESS) rc = aclrtCreateContext(&g_ctx, g_device);
    if (rc != ACL_SUCCESS) {
        const char *why = aclGetRecentErrMsg();
        ex_log("cannot open the device: AscendCL error %d (%s)", rc, why ? why : "");
        return 1;
    }
    pthread_t watcher;
    pthread_create(&watcher, NULL, settings_watcher, NULL);
    /* ready: the daemon waits for this line before it serves forward-mode clients */
    printf("ready\n");
    fflush(stdout);
    while (!g_stop) {
        struct pollfd p = {.fd = listen_fd, .events = POLLIN};
        if (poll(&p, 1, 100) <= 0) continue;
        int s = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (s >= 0) admit_async(s);
    }
    /* clients' work is left to the runtime to end: the process exits, the device frees it */
    return 0;
}
