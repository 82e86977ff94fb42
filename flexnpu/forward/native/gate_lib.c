/* libflexnpu_gate.so: the daemon's hands on a device's gate (gate.h), used from Python through
 * ctypes. Writes that clients race with are atomic stores here; the layout is described from
 * the C declaration itself (fx_layout), so Python keeps no copy of it; and the priority
 * summary is computed here, by a thread that sleeps on every client's change word at once
 * (futex_waitv), so a client's transition reaches the other clients' fast path in
 * microseconds without the daemon's Python on the way.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "gate.h"

#define EXPORT __attribute__((visibility("default")))

#ifndef SYS_futex_waitv
#define SYS_futex_waitv 449
#endif
#ifndef FUTEX2_SIZE_U32
#define FUTEX2_SIZE_U32 0x02
#endif
#ifndef FUTEX2_PRIVATE
#define FUTEX2_PRIVATE 128
#endif
struct fx_waitv { /* struct futex_waitv (linux/futex.h, 5.16) */
    uint64_t val;
    uint64_t uaddr;
    uint32_t flags;
    uint32_t reserved;
};

EXPORT uint64_t fx_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

#define FX_STEP_ASIDE_NS 5000 /* how long the daemon's thread leaves the CPU after a release */

/* Off the CPU for a moment, so a client just woken onto this CPU runs now. A sched_yield need
 * not do it: under EEVDF (Linux 6.6 on) the yielding thread keeps the CPU while the woken
 * client is not eligible yet (it ran more than its share before it was held); measured on
 * Linux 6.18, a client woken there waited for the rest of the daemon's request (some 45 us
 * of Python) in spite of the yield. The
 * thread's timer slack is 1 ns for this sleep only (the default, 50 us, would make it last
 * that long). */
static void step_aside(void)
{
    int slack = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    struct timespec ts = {.tv_sec = 0, .tv_nsec = FX_STEP_ASIDE_NS};
    nanosleep(&ts, NULL);
    if (slack > 0) prctl(PR_SET_TIMERSLACK, (unsigned long)slack, 0, 0, 0);
}

static void wake_all(struct fx_ctl_seg *ctl, int yield)
{
    atomic_fetch_add(&ctl->wake_seq, 1);
    long woken = syscall(SYS_futex, &ctl->wake_seq, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
    /* The scheduler may queue a woken client on the waker's CPU (when the client's own CPU is
     * busy), behind the rest of the daemon's request: step aside so a released call goes now,
     * not when the daemon's thread next sleeps. */
    if (woken > 0 && yield) step_aside();
}

/* JSON: {"ctl": {"size": N, "slots": offset, "slot_size": N, "fields": {name: [offset, size]},
 * "slot_fields": {...}}, "page": {"size": N, "fields": {...}}, ...} */
#define F(T, f) "\"" #f "\":[%zu,%zu]", offsetof(T, f), sizeof(((T *)0)->f)
EXPORT const char *fx_layout(void)
{
    static char buf[8192];
    if (buf[0]) return buf;
    int n = 0;
#define P(...) n += snprintf(buf + n, sizeof buf - n, __VA_ARGS__)
    P("{\"magic_ctl\":%llu,\"magic_page\":%llu,\"hello_magic\":%u,\"welcome_magic\":%u,",
      (unsigned long long)FX_GATE_MAGIC_CTL, (unsigned long long)FX_PAGE_MAGIC, FX_HELLO_MAGIC, FX_WELCOME_MAGIC);
    P("\"version\":%d,\"max_slots\":%d,\"num_ops\":%d,\"num_dirs\":%d,\"prio_levels\":%d,\"page_size\":%d,",
      FX_GATE_VERSION, FX_MAX_SLOTS, FX_NUM_OPS, FX_NUM_DIRS, FX_PRIO_LEVELS, FX_PAGE_SIZE);
    P("\"hello_size\":%zu,\"welcome_size\":%zu,\"reason_offset\":%zu,", sizeof(struct fx_hello),
      sizeof(struct fx_welcome), offsetof(struct fx_welcome, reason));
    P("\"ctl\":{\"size\":%zu,\"slots\":%zu,\"slot_size\":%zu,\"fields\":{", sizeof(struct fx_ctl_seg),
      offsetof(struct fx_ctl_seg, slots), sizeof(struct fx_ctl_slot));
    P(F(struct fx_ctl_seg, daemon_pid)); P(","); P(F(struct fx_ctl_seg, heartbeat_ns)); P(",");
    P(F(struct fx_ctl_seg, default_gate)); P(","); P(F(struct fx_ctl_seg, default_priority)); P(",");
    P(F(struct fx_ctl_seg, default_max_hold_ns)); P(","); P(F(struct fx_ctl_seg, pending_grace_ns)); P(",");
    P(F(struct fx_ctl_seg, pending_levels)); P(","); P(F(struct fx_ctl_seg, wake_seq)); P(",");
    P(F(struct fx_ctl_seg, summaries));
    P("},\"slot_fields\":{");
    P(F(struct fx_ctl_slot, gate)); P(","); P(F(struct fx_ctl_slot, priority)); P(",");
    P(F(struct fx_ctl_slot, max_hold_ns)); P(","); P(F(struct fx_ctl_slot, pid)); P(",");
    P(F(struct fx_ctl_slot, gen)); P(","); P(F(struct fx_ctl_slot, changed_ns)); P(",");
    P(F(struct fx_ctl_slot, inflight_max)); P(","); P(F(struct fx_ctl_slot, owner)); P(",");
    P(F(struct fx_ctl_slot, state)); P(","); P(F(struct fx_ctl_slot, uid)); P(",");
    P(F(struct fx_ctl_slot, role)); P(","); P(F(struct fx_ctl_slot, mode)); P(",");
    P(F(struct fx_ctl_slot, start_time));
    P("}},\"page\":{\"size\":%zu,\"fields\":{", sizeof(struct fx_page));
    P(F(struct fx_page, magic)); P(","); P(F(struct fx_page, version)); P(","); P(F(struct fx_page, slot)); P(",");
    P(F(struct fx_page, change_seq)); P(","); P(F(struct fx_page, pending)); P(",");
    P(F(struct fx_page, idle_since_ns)); P(","); P(F(struct fx_page, waiting)); P(",");
    P(F(struct fx_page, released)); P(","); P(F(struct fx_page, ops)); P(",");
    P(F(struct fx_page, bytes)); P(","); P(F(struct fx_page, memset_bytes)); P(",");
    P(F(struct fx_page, mem_held)); P(","); P(F(struct fx_page, mem_peak)); P(",");
    P(F(struct fx_page, iterations)); P(","); P(F(struct fx_page, iter_ns_total)); P(",");
    P(F(struct fx_page, iter_ns_last)); P(","); P(F(struct fx_page, iter_start_ns)); P(",");
    P(F(struct fx_page, gate_waits)); P(","); P(F(struct fx_page, gate_wait_ns)); P(",");
    P(F(struct fx_page, gate_expired)); P(","); P(F(struct fx_page, last_release_lag_ns)); P(",");
    P(F(struct fx_page, last_hold_lag_ns)); P(",");
    P(F(struct fx_page, inflight_now)); P(","); P(F(struct fx_page, inflight_waits)); P(",");
    P(F(struct fx_page, inflight_wait_ns));
    P("}}}");
#undef P
    return buf;
}

/* A new table, or one adopted after a restart (valid magic): headers valid either way. */
EXPORT void fx_table_init(struct fx_ctl_seg *ctl, uint32_t device, int32_t daemon_pid, int adopt)
{
    if (!adopt || ctl->magic != FX_GATE_MAGIC_CTL || ctl->version != FX_GATE_VERSION) {
        memset(ctl, 0, sizeof *ctl);
        ctl->magic = FX_GATE_MAGIC_CTL;
        ctl->version = FX_GATE_VERSION;
        ctl->device = device;
        atomic_store(&ctl->default_max_hold_ns, FX_DEFAULT_MAX_HOLD_NS);
        atomic_store(&ctl->pending_grace_ns, FX_DEFAULT_PENDING_GRACE_NS);
        for (int i = 0; i < FX_MAX_SLOTS; i++) atomic_store(&ctl->slots[i].max_hold_ns, FX_DEFAULT_MAX_HOLD_NS);
    }
    atomic_store(&ctl->pending_levels, 0); /* recomputed from the clients the new daemon admits */
    atomic_store(&ctl->daemon_pid, daemon_pid);
    atomic_store(&ctl->heartbeat_ns, fx_now());
}

EXPORT void fx_heartbeat(struct fx_ctl_seg *ctl, int alive)
{
    atomic_store(&ctl->heartbeat_ns, alive ? fx_now() : 0);
}

/* Writes one slot's settings without waking anyone (a batch wakes once, fx_wake). The gate
 * is written last: a client it releases then competes with less of this request's work. */
EXPORT void fx_slot_write(struct fx_ctl_seg *ctl, int slot, uint32_t gate, uint32_t priority, uint64_t max_hold_ns,
                          uint32_t inflight_max, uint32_t owner)
{
    struct fx_ctl_slot *s = &ctl->slots[slot];
    atomic_store(&s->changed_ns, fx_now());
    atomic_store(&s->owner, owner);
    atomic_store(&s->priority, priority & (FX_PRIO_LEVELS - 1));
    atomic_store(&s->max_hold_ns, max_hold_ns);
    atomic_store(&s->inflight_max, inflight_max);
    atomic_store(&s->gate, gate);
}

/* Wakes every waiter so each re-evaluates its gate and budget. */
EXPORT void fx_wake(struct fx_ctl_seg *ctl) { wake_all(ctl, 1); }

/* Writes the settings of n slots (each as fx_slot_write; slots out of range are skipped), then
 * wakes every waiter once. The stores and the wake are one call: a held client that a store
 * releases is woken microseconds after its gate opened, never after the rest of the caller's
 * work (the daemon's Python, its other threads). Returns how many slots were written. */
EXPORT int fx_slots_apply(struct fx_ctl_seg *ctl, int n, const int32_t *slot, const uint32_t *gate,
                          const uint32_t *priority, const uint64_t *max_hold_ns, const uint32_t *inflight_max,
                          const uint32_t *owner)
{
    int done = 0;
    for (int k = 0; k < n; k++) {
        if (slot[k] < 0 || slot[k] >= FX_MAX_SLOTS) continue;
        fx_slot_write(ctl, slot[k], gate[k], priority[k], max_hold_ns[k], inflight_max[k], owner[k]);
        done++;
    }
    wake_all(ctl, 1);
    return done;
}

EXPORT void fx_defaults_set(struct fx_ctl_seg *ctl, uint32_t gate, uint32_t priority, uint64_t max_hold_ns)
{
    atomic_store(&ctl->default_gate, gate);
    atomic_store(&ctl->default_priority, priority & (FX_PRIO_LEVELS - 1));
    atomic_store(&ctl->default_max_hold_ns, max_hold_ns);
}

EXPORT void fx_grace_set(struct fx_ctl_seg *ctl, uint64_t grace_ns) { atomic_store(&ctl->pending_grace_ns, grace_ns); }

/* Records who the daemon admitted into a slot (pid, uid from the kernel; role and mode as
 * declared). */
EXPORT void fx_slot_admit(struct fx_ctl_seg *ctl, int slot, int32_t pid, uint32_t uid, uint32_t role,
                          uint32_t mode, uint64_t start_time, uint32_t state)
{
    struct fx_ctl_slot *s = &ctl->slots[slot];
    atomic_fetch_add(&s->gen, 1);
    atomic_store(&s->uid, uid);
    atomic_store(&s->role, role);
    atomic_store(&s->mode, mode);
    atomic_store(&s->start_time, start_time);
    atomic_store(&s->pid, pid);
    atomic_store(&s->state, state);
}

/* Frees a slot whose client is gone: its gate back to the defaults, no identity. */
EXPORT void fx_slot_free(struct fx_ctl_seg *ctl, int slot)
{
    struct fx_ctl_slot *s = &ctl->slots[slot];
    atomic_store(&s->state, FX_SLOT_FREE);
    atomic_store(&s->pid, 0);
    atomic_store(&s->uid, 0);
    atomic_store(&s->role, 0);
    atomic_store(&s->mode, 0);
    atomic_store(&s->start_time, 0);
    atomic_store(&s->gate, atomic_load(&ctl->default_gate));
    atomic_store(&s->priority, atomic_load(&ctl->default_priority));
    atomic_store(&s->max_hold_ns, atomic_load(&ctl->default_max_hold_ns));
    atomic_store(&s->inflight_max, 0);
    atomic_store(&s->owner, FX_OWNER_NONE);
}

/* Opens every gate and drops every budget and priority hold (daemon shutdown): nobody is held
 * by a daemon that is going away. */
EXPORT void fx_open_all(struct fx_ctl_seg *ctl)
{
    for (int i = 0; i < FX_MAX_SLOTS; i++) {
        atomic_store(&ctl->slots[i].changed_ns, fx_now());
        atomic_store(&ctl->slots[i].inflight_max, 0);
        atomic_store(&ctl->slots[i].gate, FX_GATE_OPEN);
    }
    atomic_store(&ctl->pending_levels, 0);
    wake_all(ctl, 0);
}

/* ---- client pages */

EXPORT void *fx_map(int fd, size_t size, int writable)
{
    void *p = mmap(NULL, size, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

EXPORT void fx_unmap(void *p, size_t size)
{
    if (p) munmap(p, size);
}

EXPORT void fx_page_init(struct fx_page *p, uint32_t slot)
{
    memset(p, 0, FX_PAGE_SIZE);
    p->magic = FX_PAGE_MAGIC;
    p->version = FX_GATE_VERSION;
    p->slot = slot;
}

/* ---- the priority summary thread */

struct fx_summary {
    struct fx_ctl_seg *ctl;
    pthread_mutex_t lock;             /* pages[] */
    struct fx_page *pages[FX_MAX_SLOTS];
    _Atomic uint32_t kick;            /* process-private futex word: the set of pages or a priority changed */
    _Atomic int stop;
    pthread_t thread;
};

/* Recomputes pending_levels from the clients' pages and the priorities the daemon set; wakes
 * waiters when it changed. Fills w with the change words to sleep on. Returns how many, and
 * in *next_ns the soonest a grace ends (0: none). */
static int summary_pass(struct fx_summary *s, struct fx_waitv *w, uint64_t *next_ns)
{
    struct fx_ctl_seg *ctl = s->ctl;
    uint64_t now = fx_now(), grace = atomic_load(&ctl->pending_grace_ns), levels = 0, next = 0;
    int n = 0;
    pthread_mutex_lock(&s->lock);
    for (int i = 0; i < FX_MAX_SLOTS; i++) {
        struct fx_page *p = s->pages[i];
        if (!p) continue;
        /* the word first: a transition after this read ends the coming wait at once */
        uint32_t seq = atomic_load(&p->change_seq);
        w[n++] = (struct fx_waitv){.val = seq, .uaddr = (uint64_t)(uintptr_t)&p->change_seq, .flags = FUTEX2_SIZE_U32};
        uint64_t left;
        if (fx_page_counts(atomic_load(&p->pending), atomic_load(&p->idle_since_ns), now, grace, &left)) {
            levels += fx_level_one(atomic_load(&ctl->slots[i].priority));
            if (left && (!next || left < next)) next = left;
        }
    }
    pthread_mutex_unlock(&s->lock);
    atomic_fetch_add_explicit(&ctl->summaries, 1, memory_order_relaxed);
    if (atomic_exchange(&ctl->pending_levels, levels) != levels) wake_all(ctl, 0);
    *next_ns = next;
    return n;
}

static void *summary_main(void *arg)
{
    struct fx_summary *s = arg;
    struct fx_waitv w[FX_MAX_SLOTS + 1];
    while (!atomic_load(&s->stop)) {
        uint32_t kick = atomic_load(&s->kick);
        uint64_t next;
        int n = summary_pass(s, w, &next);
        w[n++] = (struct fx_waitv){.val = kick, .uaddr = (uint64_t)(uintptr_t)&s->kick,
                                   .flags = FUTEX2_SIZE_U32 | FUTEX2_PRIVATE};
        uint64_t until = fx_now() + (next ? next : 100000000ULL); /* at least every 100 ms */
        struct timespec ts = {.tv_sec = (time_t)(until / 1000000000ULL), .tv_nsec = (long)(until % 1000000000ULL)};
        syscall(SYS_futex_waitv, w, n, 0, &ts, CLOCK_MONOTONIC);
    }
    return NULL;
}

EXPORT struct fx_summary *fx_summary_start(struct fx_ctl_seg *ctl)
{
    struct fx_summary *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->ctl = ctl;
    pthread_mutex_init(&s->lock, NULL);
    if (pthread_create(&s->thread, NULL, summary_main, s) != 0) {
        free(s);
        return NULL;
    }
    return s;
}

/* Re-reads everything now: a page came or went, a priority or the grace changed. */
EXPORT void fx_summary_kick(struct fx_summary *s)
{
    atomic_fetch_add(&s->kick, 1);
    syscall(SYS_futex, &s->kick, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* A client's page (NULL: none) for a slot. After it returns with NULL the thread no longer
 * reads the old page, so the caller may unmap it. */
EXPORT void fx_summary_set(struct fx_summary *s, int slot, struct fx_page *page)
{
    pthread_mutex_lock(&s->lock);
    s->pages[slot] = page;
    pthread_mutex_unlock(&s->lock);
    fx_summary_kick(s);
}

EXPORT void fx_summary_stop(struct fx_summary *s)
{
    if (!s) return;
    atomic_store(&s->stop, 1);
    fx_summary_kick(s);
    pthread_join(s->thread, NULL);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

/* Has the summary thread counted what the pages say now? (tests; the daemon's heartbeat) */
EXPORT uint64_t fx_summary_levels(struct fx_summary *s)
{
    uint64_t levels = 0, now = fx_now(), grace = atomic_load(&s->ctl->pending_grace_ns);
    pthread_mutex_lock(&s->lock);
    for (int i = 0; i < FX_MAX_SLOTS; i++) {
        struct fx_page *p = s->pages[i];
        uint64_t left;
        if (p && fx_page_counts(atomic_load(&p->pending), atomic_load(&p->idle_since_ns), now, grace, &left))
            levels += fx_level_one(atomic_load(&s->ctl->slots[i].priority));
    }
    pthread_mutex_unlock(&s->lock);
    return levels;
}
