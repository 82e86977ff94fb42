/* libflexnpu_shim.so: the data plane of FlexNPU, loaded with LD_PRELOAD into programs
 * that know nothing of it.
 *
 * Every dispatching runtime call passes the dispatch gate of the calling thread's device
 * (gate.h) before it goes on to the real runtime. With the gate open that costs a few
 * loads and two relaxed atomic adds; with no forwarding daemon for the device the shim
 * only counts. It also maps virtual device ids to physical ones (FLEXNPU_DEVICES), caps
 * device memory (FLEXNPU_MEM_QUOTA) and keeps per-process counters in its slot.
 *
 * Programs that dlopen the runtime and look functions up with dlsym get the wrappers
 * too: the shim interposes dlsym. Wrappers are generated from the runtime profile
 * (flexnpu/forward/gen_shim.py); the device and memory-view calls are written here.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "gate.h"
#include "shim_gen.h" /* the runtime profile's definitions */
#ifdef FX_FORWARD
#include "fwd_proto.h" /* the forward build: fwd_client.c, included at the end */
#include "emu_kernels.h" /* built-in kernels' arguments, checked at the call */
#include "executor.h"    /* EX_KEY_LEN, kernel libraries (exec_kernels.c) */
#define FX_CLIENT_MODE FX_MODE_FORWARD
#else
#define FX_CLIENT_MODE FX_MODE_GATED
#endif

#define FX_EXPORT __attribute__((visibility("default")))
#define FX_LIKELY(x) __builtin_expect(!!(x), 1)
#define FX_MAX_DEVICES 64

/* ---------------------------------------------------------------- state */

#define FX_RING 64 /* events per attached device; budget/stride + 1 are in use at most */

struct fx_inflight_ev { /* one position of the ring; its event is reused once popped */
    void *ev;           /* aclrtEvent, created lazily on the application's thread */
    void *ctx;          /* the context it was created in (NULL: the device's default context) */
    void *stream;       /* the stream it was last recorded on */
    uint64_t seq;       /* launches counted when it was recorded */
    bool done;          /* known complete (its stream was synchronised) */
};

struct fx_inflight { /* the in-flight budget's view of this process's work on one device */
    pthread_mutex_t lock;        /* the ring; taken only while a budget is set */
    _Atomic uint64_t seq;        /* budgeted launches dispatched */
    _Atomic uint64_t done_seq;   /* of them, known finished */
    _Atomic uint64_t rec_seq;    /* seq at the newest event recorded */
    _Atomic int active;          /* 1 once a launch was counted: syncs then reset the ring */
    void *last_stream;
    bool mixed;                  /* launches went to more than one stream since the ring was empty */
    uint32_t head, n;            /* entries head .. head+n-1 (mod FX_RING), oldest first */
    struct fx_inflight_ev e[FX_RING];
};

struct fx_att { /* this process's attachment to one physical device's gate */
    int dev;
    /* Switched to g_open when the daemon goes and to a new table when it comes back; old maps
     * are never unmapped, so a thread still reading through an old pointer is safe. */
    const struct fx_ctl_seg *_Atomic ctl;
    const struct fx_ctl_slot *_Atomic g;
    struct fx_page *_Atomic me;
    int sock;               /* the admission connection; its hang-up says the daemon is gone */
    _Atomic int gone;       /* the daemon went: every gate open until a reconnect */
    uint64_t last_probe_ns; /* last look at the connection from a sync (at most once a second) */
    uint64_t last_try_ns;   /* last reconnect attempt */
    struct fx_inflight inf;
};

static struct fx_att *_Atomic g_att[FX_MAX_DEVICES];
static struct fx_att *_Atomic g_last_att; /* for threads that never selected a device */
static __thread struct fx_att *t_att;
static __thread int t_depth; /* > 0 inside a wrapper: nested runtime calls pass straight on */
static __thread int t_vdev = -1;
static __thread void *t_ctx; /* the thread's current context as the shim saw it set; NULL: the default */

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static bool g_debug;
static uint32_t g_role = FX_ROLE_AUTO;
static int g_map[FX_MAX_DEVICES]; /* virtual -> physical */
static int g_nmap = -1;           /* -1: no map, ids pass through */
static uint64_t g_quota;          /* bytes per device; 0: none */
static _Atomic uint64_t g_held[FX_MAX_DEVICES];
static uint64_t g_last_attach_try_ns[FX_MAX_DEVICES];
static bool g_said_no_gate[FX_MAX_DEVICES]; /* "running without a gate" is said once per device */
static char g_rundir[256] = "/run/flexnpu";

static void fx_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fx_debug(const char *fmt, ...)
{
    if (!g_debug) return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "flexnpu shim[%d]: ", getpid());
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void fx_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fx_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "flexnpu shim: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static inline uint64_t fx_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static inline int fx_depth_enter(void) { return t_depth++ > 0 ? (t_depth--, 1) : 0; }
static inline void fx_depth_leave(void) { t_depth--; }

static inline struct fx_att *fx_current(void)
{
    struct fx_att *a = t_att;
    return FX_LIKELY(a != NULL) ? a : atomic_load_explicit(&g_last_att, memory_order_relaxed);
}

/* The physical device the calling thread selected; -1 if none. */
static int fx_current_phys(void)
{
    if (t_vdev < 0) return -1;
    return g_nmap > 0 ? g_map[t_vdev] : t_vdev;
}

/* ---------------------------------------------------------------- attach */

static const struct fx_ctl_seg g_open; /* what a client of a gone daemon reads: all open, nothing pending */

/* Connects to device dev's admission socket and asks to be admitted. On success: the gate
 * table mapped read-only, this process's page mapped read-write, the connection kept. The
 * daemon learns who we are from the kernel; what we send is only our role. */
static int fx_connect(int dev, const struct fx_ctl_seg **ctl_out, struct fx_page **page_out, int *sock_out,
                      uint32_t *slot_out)
{
    char path[320];
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    int n = snprintf(sa.sun_path, sizeof sa.sun_path, "%s/gate-%d.sock", g_rundir, dev);
    snprintf(path, sizeof path, "%s/gate-%d.sock", g_rundir, dev);
    if (n < 0 || (size_t)n >= sizeof sa.sun_path) {
        if (!g_said_no_gate[dev]) fx_error("device %d: %s is too long a path; running without a gate", dev, path);
        g_said_no_gate[dev] = true;
        return -1;
    }
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) != 0) {
        int e = errno;
        close(s);
        if (e == EACCES || e == EPERM) {
            if (!g_said_no_gate[dev])
                fx_error("permission denied: the gate of device %d is for root and the flexnpu group; "
                         "running without a gate", dev);
        } else if (!g_said_no_gate[dev]) {
            /* retried at most once a second (a daemon may start later); said only the first time */
            fx_debug("no forwarding daemon for device %d (%s: %s); running without a gate", dev, path, strerror(e));
        }
        g_said_no_gate[dev] = true;
        return -1;
    }
    struct timeval tv = {.tv_sec = 2}; /* a daemon that does not answer must not hang the program */
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    struct fx_hello hello = {.magic = FX_HELLO_MAGIC, .version = FX_GATE_VERSION, .role = g_role, .mode = FX_CLIENT_MODE};
    struct fx_welcome w;
    memset(&w, 0, sizeof w);
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(2 * sizeof(int))];
    } cm;
    struct iovec iov = {.iov_base = &w, .iov_len = sizeof w};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof cm.buf};
    ssize_t got = -1;
    if (send(s, &hello, sizeof hello, MSG_NOSIGNAL) == (ssize_t)sizeof hello)
        got = recvmsg(s, &mh, MSG_CMSG_CLOEXEC);
    int fds[2] = {-1, -1};
    struct cmsghdr *c = got > 0 ? CMSG_FIRSTHDR(&mh) : NULL;
    if (c && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
        size_t nfd = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        memcpy(fds, CMSG_DATA(c), (nfd < 2 ? nfd : 2) * sizeof(int));
        for (size_t k = 2; k < nfd; k++) close(((int *)CMSG_DATA(c))[k]);
    }
    const struct fx_ctl_seg *ctl = MAP_FAILED;
    struct fx_page *page = MAP_FAILED;
    bool ok = got >= (ssize_t)sizeof w - (ssize_t)sizeof w.reason && w.magic == FX_WELCOME_MAGIC;
    if (ok && w.status != 0) {
        w.reason[sizeof w.reason - 1] = 0;
        if (!g_said_no_gate[dev]) fx_error("%s; running without a gate", w.reason);
        g_said_no_gate[dev] = true;
        ok = false;
    } else if (!ok) {
        if (!g_said_no_gate[dev])
            fx_error("device %d: no answer from the forwarding daemon at %s (%s); running without a gate", dev, path,
                     got < 0 ? strerror(errno) : "bad reply");
        g_said_no_gate[dev] = true;
    } else if (fds[0] < 0 || fds[1] < 0 || w.version != FX_GATE_VERSION) {
        if (!g_said_no_gate[dev])
            fx_debug("device %d: gate of another version; running without a gate", dev);
        g_said_no_gate[dev] = true;
        ok = false;
    }
    struct stat cst, pst;
    if (ok && (fstat(fds[0], &cst) != 0 || fstat(fds[1], &pst) != 0 ||
               cst.st_size < (off_t)sizeof(struct fx_ctl_seg) || pst.st_size < FX_PAGE_SIZE))
        ok = false;
    if (ok) ctl = mmap(NULL, sizeof *ctl, PROT_READ, MAP_SHARED, fds[0], 0);
    if (ok) page = mmap(NULL, FX_PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fds[1], 0);
    for (int k = 0; k < 2; k++)
        if (fds[k] >= 0) close(fds[k]);
    if (ok && (ctl == MAP_FAILED || page == MAP_FAILED || ctl->magic != FX_GATE_MAGIC_CTL ||
               ctl->version != FX_GATE_VERSION || page->magic != FX_PAGE_MAGIC || w.slot >= FX_MAX_SLOTS ||
               page->slot != w.slot))
        ok = false;
    if (!ok) {
        if (ctl != MAP_FAILED) munmap((void *)ctl, sizeof *ctl);
        if (page != MAP_FAILED) munmap(page, FX_PAGE_SIZE);
        close(s);
        return -1;
    }
    *ctl_out = ctl;
    *page_out = page;
    *sock_out = s;
    *slot_out = w.slot;
    return 0;
}

/* Maps device dev's gate: admission by its daemon. Caller holds g_lock. */
static struct fx_att *fx_attach_locked(int dev)
{
    struct fx_att *a = atomic_load(&g_att[dev]);
    if (a) return a;
    uint64_t now = fx_now();
    if (g_last_attach_try_ns[dev] && now - g_last_attach_try_ns[dev] < 1000000000ULL) return NULL;
    g_last_attach_try_ns[dev] = now;
    const struct fx_ctl_seg *ctl;
    struct fx_page *page;
    int sock;
    uint32_t slot;
    if (fx_connect(dev, &ctl, &page, &sock, &slot) != 0) return NULL;
    a = calloc(1, sizeof *a);
    if (!a) return NULL;
    pthread_mutex_init(&a->inf.lock, NULL);
    a->dev = dev;
    a->sock = sock;
    a->last_probe_ns = now;
    atomic_store(&a->ctl, ctl);
    atomic_store(&a->g, &ctl->slots[slot]);
    atomic_store(&a->me, page);
    atomic_store(&g_att[dev], a);
    fx_debug("device %d: admitted into gate slot %u (role %u)", dev, slot, g_role);
    return a;
}

static inline const struct fx_ctl_slot *fx_g(const struct fx_att *a)
{
    return atomic_load_explicit(&a->g, memory_order_relaxed);
}
static inline const struct fx_ctl_seg *fx_ctl(const struct fx_att *a)
{
    return atomic_load_explicit(&a->ctl, memory_order_relaxed);
}
static inline struct fx_page *fx_me(const struct fx_att *a)
{
    return atomic_load_explicit(&a->me, memory_order_relaxed);
}

/* Tells the daemon's summary thread that this client's pending/idle state changed. At most
 * twice an iteration (first dispatch, the sync that ends it), never per call. */
static void fx_notify(struct fx_page *me)
{
    atomic_fetch_add_explicit(&me->change_seq, 1, memory_order_seq_cst);
    syscall(SYS_futex, &me->change_seq, FUTEX_WAKE, 1, NULL, NULL, 0);
}

/* The daemon is gone (its connection hung up): every gate of this device opens now. */
static void fx_daemon_gone(struct fx_att *a)
{
    pthread_mutex_lock(&g_lock);
    if (!atomic_load(&a->gone)) {
        atomic_store(&a->g, &g_open.slots[0]);
        atomic_store(&a->ctl, &g_open);
        if (a->sock >= 0) close(a->sock);
        a->sock = -1;
        a->last_try_ns = fx_now();
        atomic_store(&a->gone, 1);
        fx_debug("device %d: the forwarding daemon is gone; running without a gate until it is back", a->dev);
    }
    pthread_mutex_unlock(&g_lock);
}

/* Whether the daemon's connection still stands (a poll, no wait). */
static bool fx_probe(struct fx_att *a)
{
    if (atomic_load_explicit(&a->gone, memory_order_relaxed)) return false;
    struct pollfd p = {.fd = a->sock, .events = POLLIN};
    if (poll(&p, 1, 0) == 0) return true;
    fx_daemon_gone(a); /* it never writes after the welcome: anything readable is its hang-up */
    return false;
}

/* A gone daemon may be back (restarted): ask to be admitted again, at most once a second.
 * The new page gets this client's counters so far. */
static void fx_reattach(struct fx_att *a, uint64_t now)
{
    pthread_mutex_lock(&g_lock);
    if (atomic_load(&a->gone) && now - a->last_try_ns >= 1000000000ULL) {
        a->last_try_ns = now;
        const struct fx_ctl_seg *ctl;
        struct fx_page *page;
        int sock;
        uint32_t slot;
        g_said_no_gate[a->dev] = true; /* a restart's refusals go to the debug log only */
        if (fx_connect(a->dev, &ctl, &page, &sock, &slot) == 0) {
            struct fx_page *old = fx_me(a);
            size_t from = offsetof(struct fx_page, ops);
            memcpy((char *)page + from, (char *)old + from, sizeof *page - from);
            atomic_store(&page->iter_start_ns, 0);
            a->sock = sock;
            a->last_probe_ns = now;
            atomic_store(&a->me, page);
            atomic_store(&a->ctl, ctl);
            atomic_store(&a->g, &ctl->slots[slot]);
            atomic_store(&a->gone, 0);
            fx_debug("device %d: admitted again into gate slot %u", a->dev, slot);
        }
    }
    pthread_mutex_unlock(&g_lock);
}

static void fx_select_device(int phys)
{
    if (phys < 0 || phys >= FX_MAX_DEVICES) return;
    struct fx_att *a = atomic_load(&g_att[phys]);
    if (!a) {
        pthread_mutex_lock(&g_lock);
        a = fx_attach_locked(phys);
        pthread_mutex_unlock(&g_lock);
    }
    t_att = a;
    if (a) atomic_store(&g_last_att, a);
}

/* The calling thread now works on virtual device vdev, physical phys. */
static void fx_use_device(int vdev, int phys, void *ctx)
{
    t_vdev = vdev;
    t_ctx = ctx;
    fx_select_device(phys);
}

/* ---------------------------------------------------------------- gate */

static inline bool fx_gate_open(const struct fx_att *a)
{
    const struct fx_ctl_slot *g = fx_g(a);
    uint32_t gate = atomic_load_explicit(&g->gate, memory_order_acquire);
    uint32_t prio = atomic_load_explicit(&g->priority, memory_order_relaxed);
    uint64_t levels = atomic_load_explicit(&fx_ctl(a)->pending_levels, memory_order_relaxed);
    return gate == FX_GATE_OPEN && !fx_levels_hold(levels, prio);
}

/* Whether the daemon is there: its connection stands and its heartbeat is fresh. */
static bool fx_daemon_alive(struct fx_att *a, uint64_t now)
{
    uint64_t hb = atomic_load_explicit(&fx_ctl(a)->heartbeat_ns, memory_order_relaxed);
    return hb != 0 && now - hb < (uint64_t)FX_HEARTBEAT_STALE_NS && fx_probe(a);
}

static void fx_gate_wait(struct fx_att *a)
{
    struct fx_page *me = fx_me(a);
    if (atomic_load_explicit(&me->released, memory_order_relaxed)) return; /* max_hold let it go */
    uint64_t t0 = fx_now();
    if (!fx_daemon_alive(a, t0)) return; /* fail open */
    if (fx_gate_open(a)) return;
    const struct fx_ctl_slot *g = fx_g(a);
    const struct fx_ctl_seg *ctl = fx_ctl(a);
    bool was_closed = atomic_load(&g->gate) != FX_GATE_OPEN;
    if (was_closed) {
        uint64_t changed = atomic_load(&g->changed_ns);
        if (changed && t0 > changed) atomic_store(&me->last_hold_lag_ns, t0 - changed);
    }
    atomic_fetch_add(&me->waiting, 1);
    atomic_fetch_add(&me->gate_waits, 1);
    for (;;) {
        uint32_t seq = atomic_load_explicit(&ctl->wake_seq, memory_order_seq_cst);
        uint64_t now = fx_now(), held = now - t0;
        /* read on every wake-up: a max_hold lowered while this call is held bounds it too */
        uint64_t max_hold = atomic_load(&g->max_hold_ns);
        if (fx_gate_open(a)) break;
        if (held >= max_hold) {
            atomic_store(&me->released, 1);
            atomic_fetch_add(&me->gate_expired, 1);
            break;
        }
        if (!fx_daemon_alive(a, now)) break;
        uint64_t slice = max_hold - held;
        if (slice > FX_WAIT_SLICE_NS) slice = FX_WAIT_SLICE_NS; /* look for the daemon again then */
        struct timespec ts = {.tv_sec = (time_t)(slice / 1000000000ULL), .tv_nsec = (long)(slice % 1000000000ULL)};
        /* the table is mapped read-only: a FUTEX_WAIT only reads the word */
        if (atomic_load_explicit(&ctl->wake_seq, memory_order_seq_cst) == seq && !fx_gate_open(a))
            syscall(SYS_futex, &ctl->wake_seq, FUTEX_WAIT, seq, &ts, NULL, 0);
    }
    uint64_t t1 = fx_now();
    atomic_fetch_add(&me->gate_wait_ns, t1 - t0);
    if (was_closed && atomic_load(&g->gate) == FX_GATE_OPEN) {
        uint64_t changed = atomic_load(&g->changed_ns);
        if (changed > t0 && t1 > changed) atomic_store(&me->last_release_lag_ns, t1 - changed);
    }
    atomic_fetch_sub(&me->waiting, 1);
}

/* Before every dispatching call, with the calling thread's attachment (NULL: none). */
static inline void fx_gate_at(struct fx_att *a)
{
    if (!a) return;
#ifdef FX_FORWARD /* forwarded work is scheduled by the executor, op by op */
    (void)fx_gate_wait;
#else
    if (__builtin_expect(!fx_gate_open(a), 0)) fx_gate_wait(a);
#endif
    struct fx_page *me = fx_me(a);
    if (__builtin_expect(!atomic_load_explicit(&me->pending, memory_order_relaxed), 0)) {
        /* first work since the last sync: the daemon counts it at the priority it set */
        if (!atomic_exchange(&me->pending, 1)) {
            atomic_store_explicit(&me->iter_start_ns, fx_now(), memory_order_relaxed);
            fx_notify(me);
        }
    }
}

static inline void fx_gate(void) { fx_gate_at(fx_current()); }

#include "shim_inflight.h" /* the in-flight budget: fx_budget, fx_inflight_dispatched, fx_inflight_synced */

/* After a successful dispatching call. */
static inline void fx_count(int op, uint64_t bytes, int dir)
{
    struct fx_att *a = fx_current();
    if (!a) return;
    struct fx_page *me = fx_me(a);
    atomic_fetch_add_explicit(&me->ops[op], 1, memory_order_relaxed);
    if (bytes) {
        if (op == FX_OP_MEMSET || op == FX_OP_MEMSET_ASYNC)
            atomic_fetch_add_explicit(&me->memset_bytes, bytes, memory_order_relaxed);
        else if (dir >= 0)
            atomic_fetch_add_explicit(&me->bytes[dir], bytes, memory_order_relaxed);
    }
}

/* After every synchronisation: the end of an iteration if work was pending. kind: what was
 * synchronised (enum fx_sync_kind), stream: which, ok: whether it succeeded. */
static void fx_sync_done(int kind, void *stream, bool ok)
{
    struct fx_att *a = fx_current();
    if (!a) {
        /* a daemon may have started since: try again (fx_attach_locked: at most once a second) */
        int phys = fx_current_phys();
        if (phys >= 0) fx_select_device(phys);
        return;
    }
    struct fx_page *me = fx_me(a);
    atomic_fetch_add_explicit(&me->ops[FX_OP_SYNC], 1, memory_order_relaxed);
    atomic_store_explicit(&me->released, 0, memory_order_relaxed);
    if (ok && atomic_load_explicit(&a->inf.active, memory_order_relaxed)) fx_inflight_synced(a, kind, stream);
    uint64_t now = fx_now();
    if (atomic_load(&me->pending)) {
        /* the idle stamp before the flag: the daemon never sees idle work without its grace */
        atomic_store(&me->idle_since_ns, now);
        if (atomic_exchange(&me->pending, 0)) {
            uint64_t start = atomic_load(&me->iter_start_ns);
            atomic_fetch_add(&me->iterations, 1);
            if (start && now > start) {
                atomic_fetch_add(&me->iter_ns_total, now - start);
                atomic_store(&me->iter_ns_last, now - start);
            }
            fx_notify(me); /* its level stays counted for the grace; the daemon drops it after */
        }
    }
    /* is the daemon still there (a restart is seen here if no call was ever held)? */
    if (atomic_load_explicit(&a->gone, memory_order_relaxed)) fx_reattach(a, now);
    else if (now - a->last_probe_ns >= 1000000000ULL) {
        a->last_probe_ns = now;
        fx_probe(a);
    }
}

/* ---------------------------------------------------------------- memory */

struct fx_alloc {
    uintptr_t ptr;
    uint64_t size;
    int dev;
};
static struct fx_alloc *g_allocs; /* open addressing, ptr 0 = empty, 1 = deleted */
static size_t g_allocs_cap, g_allocs_n;
static pthread_mutex_t g_alloc_lock = PTHREAD_MUTEX_INITIALIZER;

static size_t fx_hash(uintptr_t p) { return (size_t)((p >> 4) * 0x9E3779B97F4A7C15ULL); }

static void fx_allocs_put(uintptr_t p, uint64_t size, int dev)
{
    if ((g_allocs_n + 1) * 2 > g_allocs_cap) {
        size_t nc = g_allocs_cap ? g_allocs_cap * 2 : 1024;
        struct fx_alloc *na = calloc(nc, sizeof *na);
        if (!na) return;
        for (size_t i = 0; i < g_allocs_cap; i++)
            if (g_allocs[i].ptr > 1) {
                size_t j = fx_hash(g_allocs[i].ptr) & (nc - 1);
                while (na[j].ptr) j = (j + 1) & (nc - 1);
                na[j] = g_allocs[i];
            }
        free(g_allocs);
        g_allocs = na;
        g_allocs_cap = nc;
    }
    size_t j = fx_hash(p) & (g_allocs_cap - 1);
    while (g_allocs[j].ptr > 1) j = (j + 1) & (g_allocs_cap - 1);
    g_allocs[j] = (struct fx_alloc){p, size, dev};
    g_allocs_n++;
}

static bool fx_allocs_take(uintptr_t p, struct fx_alloc *out)
{
    if (!g_allocs_cap) return false;
    size_t j = fx_hash(p) & (g_allocs_cap - 1);
    for (size_t k = 0; k < g_allocs_cap && g_allocs[j].ptr; k++, j = (j + 1) & (g_allocs_cap - 1))
        if (g_allocs[j].ptr == p) {
            *out = g_allocs[j];
            g_allocs[j].ptr = 1;
            g_allocs_n--;
            return true;
        }
    return false;
}


/* Reserves size bytes of the calling thread's device against the quota before the real
 * allocation, so threads allocating at once cannot pass the quota together. */
static int fx_alloc_reserve(uint64_t size, int *dev_out)
{
    int dev = fx_current_phys();
    if (dev < 0) dev = 0;
    *dev_out = dev;
    uint64_t held = atomic_fetch_add(&g_held[dev], size) + size;
    if (g_quota && held > g_quota) {
        atomic_fetch_sub(&g_held[dev], size);
        fx_debug("device %d: allocation of %llu bytes refused: quota %llu, %llu held", dev,
                 (unsigned long long)size, (unsigned long long)g_quota, (unsigned long long)(held - size));
        return FX_ERR_OUT_OF_MEMORY;
    }
    return FX_SUCCESS;
}

static void fx_alloc_cancel(uint64_t size, int dev) { atomic_fetch_sub(&g_held[dev], size); }

static void fx_alloc_done(void *ptr, uint64_t size, int dev)
{
    pthread_mutex_lock(&g_alloc_lock);
    fx_allocs_put((uintptr_t)ptr, size, dev);
    pthread_mutex_unlock(&g_alloc_lock);
    uint64_t held = atomic_load(&g_held[dev]);
    struct fx_att *a = atomic_load(&g_att[dev]);
    if (a) {
        struct fx_page *me = fx_me(a);
        atomic_fetch_add(&me->ops[FX_OP_ALLOC], 1);
        atomic_store(&me->mem_held, held);
        if (held > atomic_load(&me->mem_peak)) atomic_store(&me->mem_peak, held);
    }
}

static void fx_free_done(void *ptr)
{
    struct fx_alloc al;
    pthread_mutex_lock(&g_alloc_lock);
    bool found = fx_allocs_take((uintptr_t)ptr, &al);
    pthread_mutex_unlock(&g_alloc_lock);
    if (!found) return;
    uint64_t held = atomic_fetch_sub(&g_held[al.dev], al.size) - al.size;
    struct fx_att *a = atomic_load(&g_att[al.dev]);
    if (a) {
        atomic_fetch_add(&fx_me(a)->ops[FX_OP_FREE], 1);
        atomic_store(&fx_me(a)->mem_held, held);
    }
}

/* ---------------------------------------------------------------- real functions */

static void *(*g_real_dlsym)(void *, const char *);
static void *_Atomic g_runtime_handle; /* a handle the program dlopened the runtime with */

static void *fx_lookup_real(const char *name)
{
    void *p = g_real_dlsym ? g_real_dlsym(RTLD_NEXT, name) : NULL;
    void *h = atomic_load(&g_runtime_handle);
    if (!p && h) p = g_real_dlsym(h, name);
    if (!p) {
        void *lib = dlopen(FX_RUNTIME_LIBRARY, RTLD_LAZY | RTLD_NOLOAD);
        if (!lib) lib = dlopen(FX_RUNTIME_LIBRARY, RTLD_LAZY | RTLD_GLOBAL);
        if (lib) p = g_real_dlsym(lib, name);
    }
    return p;
}

#ifdef FX_FORWARD
/* The forward build: the "real" function is the forwarder's (fwd_client.c). */
#define FX_REAL(name)                                                                          \
    do {                                                                                       \
        if (__builtin_expect(real_##name == NULL, 0)) real_##name = fxf_##name;                \
    } while (0)
#else
/* Resolves the real function once; a missing runtime is reported like a missing device. */
#define FX_REAL(name)                                                                          \
    do {                                                                                       \
        if (__builtin_expect(real_##name == NULL, 0)) {                                        \
            real_##name = fx_lookup_real(#name);                                               \
            if (!real_##name) {                                                                \
                fx_error("%s not found: is " FX_RUNTIME_LIBRARY " installed?", #name);         \
                return 500003; /* ACL_ERROR_RT_FAILURE */                                      \
            }                                                                                  \
        }                                                                                      \
    } while (0)
#endif

#define FX_GEN_WRAPPERS
#include "shim_gen.h" /* the generated wrappers */

/* ---------------------------------------------------------------- device map */

static int fx_phys_of(int32_t vdev, int32_t *phys)
{
    if (g_nmap < 0) {
        *phys = vdev;
        return FX_SUCCESS;
    }
    if (vdev < 0 || vdev >= g_nmap) return FX_ERR_INVALID_DEVICE;
    *phys = g_map[vdev];
    return FX_SUCCESS;
}

FX_EXPORT aclError aclrtSetDevice(int32_t deviceId)
{
    FX_REAL(aclrtSetDevice);
    if (fx_depth_enter()) return real_aclrtSetDevice(deviceId);
    int32_t phys;
    aclError rc = fx_phys_of(deviceId, &phys);
    if (rc == FX_SUCCESS) rc = real_aclrtSetDevice(phys);
    if (rc == FX_SUCCESS) fx_use_device(deviceId, phys, NULL);
    fx_depth_leave();
    return rc;
}

FX_EXPORT aclError aclrtResetDevice(int32_t deviceId)
{
    FX_REAL(aclrtResetDevice);
    if (fx_depth_enter()) return real_aclrtResetDevice(deviceId);
    int32_t phys;
    aclError rc = fx_phys_of(deviceId, &phys);
    if (rc == FX_SUCCESS) fx_inflight_forget(phys, NULL); /* its default context goes */
    if (rc == FX_SUCCESS) rc = real_aclrtResetDevice(phys);
    fx_depth_leave();
    return rc;
}

FX_EXPORT aclError aclrtGetDevice(int32_t *deviceId)
{
    FX_REAL(aclrtGetDevice);
    if (fx_depth_enter()) return real_aclrtGetDevice(deviceId);
    aclError rc = real_aclrtGetDevice(deviceId);
    if (rc == FX_SUCCESS && deviceId && g_nmap >= 0) {
        int v = -1;
        for (int i = 0; i < g_nmap; i++)
            if (g_map[i] == *deviceId) v = i;
        if (v >= 0) *deviceId = v;
    }
    fx_depth_leave();
    return rc;
}

FX_EXPORT aclError aclrtGetDeviceCount(uint32_t *count)
{
    FX_REAL(aclrtGetDeviceCount);
    if (fx_depth_enter()) return real_aclrtGetDeviceCount(count);
    aclError rc = real_aclrtGetDeviceCount(count);
    if (rc == FX_SUCCESS && count && g_nmap >= 0) *count = (uint32_t)g_nmap; /* the devices it was given */
    fx_depth_leave();
    return rc;
}

struct fx_ctx { /* contexts the program created, with the virtual device of each */
    aclrtContext ctx;
    int vdev;
};
static struct fx_ctx g_ctx[256];

FX_EXPORT aclError aclrtCreateContext(aclrtContext *context, int32_t deviceId)
{
    FX_REAL(aclrtCreateContext);
    if (fx_depth_enter()) return real_aclrtCreateContext(context, deviceId);
    int32_t phys;
    aclError rc = fx_phys_of(deviceId, &phys);
    if (rc == FX_SUCCESS) rc = real_aclrtCreateContext(context, phys);
    if (rc == FX_SUCCESS && context) {
        pthread_mutex_lock(&g_lock);
        for (int i = 0; i < 256; i++)
            if (!g_ctx[i].ctx) {
                g_ctx[i] = (struct fx_ctx){*context, deviceId};
                break;
            }
        pthread_mutex_unlock(&g_lock);
        fx_use_device(deviceId, phys, *context);
    }
    fx_depth_leave();
    return rc;
}

FX_EXPORT aclError aclrtDestroyContext(aclrtContext context)
{
    FX_REAL(aclrtDestroyContext);
    if (fx_depth_enter()) return real_aclrtDestroyContext(context);
    fx_inflight_forget(-1, context);
    aclError rc = real_aclrtDestroyContext(context);
    if (rc == FX_SUCCESS) {
        pthread_mutex_lock(&g_lock);
        for (int i = 0; i < 256; i++)
            if (g_ctx[i].ctx == context) g_ctx[i].ctx = NULL;
        pthread_mutex_unlock(&g_lock);
    }
    fx_depth_leave();
    return rc;
}

FX_EXPORT aclError aclrtSetCurrentContext(aclrtContext context)
{
    FX_REAL(aclrtSetCurrentContext);
    if (fx_depth_enter()) return real_aclrtSetCurrentContext(context);
    aclError rc = real_aclrtSetCurrentContext(context);
    if (rc == FX_SUCCESS) {
        int v = -1;
        pthread_mutex_lock(&g_lock);
        for (int i = 0; i < 256; i++)
            if (g_ctx[i].ctx == context) v = g_ctx[i].vdev;
        pthread_mutex_unlock(&g_lock);
        int32_t phys;
        if (v >= 0 && fx_phys_of(v, &phys) == FX_SUCCESS) fx_use_device(v, phys, context);
    }
    fx_depth_leave();
    return rc;
}

FX_EXPORT aclError aclrtGetMemInfo(aclrtMemAttr attr, size_t *free_, size_t *total)
{
    FX_REAL(aclrtGetMemInfo);
    if (fx_depth_enter()) return real_aclrtGetMemInfo(attr, free_, total);
    aclError rc = real_aclrtGetMemInfo(attr, free_, total);
    int dev = fx_current_phys();
    bool hbm = attr == ACL_HBM_MEM || attr == ACL_HBM_MEM_HUGE || attr == ACL_HBM_MEM_NORMAL ||
               attr == ACL_HBM_MEM_P2P_HUGE || attr == ACL_HBM_MEM_P2P_NORMAL;
    if (rc == FX_SUCCESS && g_quota && hbm && dev >= 0 && free_ && total) {
        uint64_t held = atomic_load(&g_held[dev]), left = held < g_quota ? g_quota - held : 0;
        if (*total > g_quota) *total = g_quota;
        if (*free_ > left) *free_ = left;
    }
    fx_depth_leave();
    return rc;
}

/* ---------------------------------------------------------------- dlsym */

#ifdef FX_FORWARD
static void *fw_dlsym(const char *name);
#endif

FX_EXPORT void *dlsym(void *handle, const char *name)
{
    if (!g_real_dlsym) return NULL; /* before the constructor: cannot happen in practice */
#ifdef FX_FORWARD
    /* every AscendCL and aclnn name the program looks up is this library's, found or not in
     * the runtime it opened: nothing reaches the local runtime's device calls */
    if (handle != RTLD_NEXT && !strncmp(name, "acl", 3)) {
        for (int i = 0; i < FX_NUM_WRAPPERS; i++)
            if (!strcmp(fx_wrappers[i].name, name)) return fx_wrappers[i].wrapper;
        void *f = fw_dlsym(name);
        if (f) return f;
    }
#endif
    void *real = g_real_dlsym(handle, name);
    if (!real || strncmp(name, "acl", 3) != 0 || handle == RTLD_NEXT) return real;
    for (int i = 0; i < FX_NUM_WRAPPERS; i++) {
        const struct fx_wrapper *w = &fx_wrappers[i];
        if (strcmp(w->name, name) != 0) continue;
        if (real == w->wrapper) return real; /* looked up through the global scope: already us */
        void *expected = NULL;
        atomic_compare_exchange_strong(w->real, &expected, real);
        if (handle != RTLD_DEFAULT) atomic_store(&g_runtime_handle, handle);
        return w->wrapper;
    }
    return real;
}

/* ---------------------------------------------------------------- set-up */

static uint64_t fx_parse_size(const char *s, bool *ok)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    while (*end == ' ') end++;
    uint64_t mul = 1;
    char u = (char)toupper((unsigned char)*end);
    if (u == 'K') mul = 1ULL << 10;
    else if (u == 'M') mul = 1ULL << 20;
    else if (u == 'G') mul = 1ULL << 30;
    else if (u == 'T') mul = 1ULL << 40;
    if (mul > 1) {
        end++;
        if (*end == 'i' || *end == 'I') end++;
        if (*end == 'b' || *end == 'B') end++;
    } else if (u == 'B') end++;
    *ok = errno == 0 && end != s && *end == 0 && v > 0 && v * (double)mul < 1.8e19;
    return *ok ? (uint64_t)(v * (double)mul) : 0;
}

static void fx_after_fork_child(void)
{
    /* the child is another client: it is admitted afresh if it uses a device; the parent's
     * connection is not its to keep (the daemon would take its hang-up for the parent's) */
    for (int i = 0; i < FX_MAX_DEVICES; i++) {
        struct fx_att *a = atomic_load(&g_att[i]);
        if (a && a->sock >= 0) close(a->sock);
        atomic_store(&g_att[i], NULL);
        g_last_attach_try_ns[i] = 0;
        g_said_no_gate[i] = false;
    }
    atomic_store(&g_last_att, NULL);
    t_att = NULL;
}

__attribute__((constructor)) static void fx_init(void)
{
    g_real_dlsym = (void *(*)(void *, const char *))dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
    if (!g_real_dlsym) g_real_dlsym = (void *(*)(void *, const char *))dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
    const char *v = getenv("FLEXNPU_DEBUG");
    g_debug = v && *v && strcmp(v, "0") != 0;
    if ((v = getenv("FLEXNPU_RUNTIME_DIR")) && *v) snprintf(g_rundir, sizeof g_rundir, "%s", v);
    if ((v = getenv("FLEXNPU_ROLE")) && *v) {
        if (!strcmp(v, "prefill")) g_role = FX_ROLE_PREFILL;
        else if (!strcmp(v, "decode")) g_role = FX_ROLE_DECODE;
        else if (!strcmp(v, "auto")) g_role = FX_ROLE_AUTO;
        else fx_error("FLEXNPU_ROLE=%s is not prefill, decode or auto; using auto", v);
    }
    if ((v = getenv("FLEXNPU_DEVICES")) && *v) {
        int n = 0;
        bool ok = true;
        const char *p = v;
        while (*p && ok) {
            char *end;
            long d = strtol(p, &end, 10);
            if (end == p || d < 0 || d >= FX_MAX_DEVICES || n >= FX_MAX_DEVICES) ok = false;
            else g_map[n++] = (int)d;
            p = end;
            if (*p == ',') p++;
            else if (*p) ok = false;
        }
        if (ok) g_nmap = n;
        else fx_error("FLEXNPU_DEVICES=%s is not a comma list of device ids (0-%d); ignoring it", v, FX_MAX_DEVICES - 1);
    }
    if ((v = getenv("FLEXNPU_MEM_QUOTA")) && *v) {
        bool ok;
        g_quota = fx_parse_size(v, &ok);
        if (!ok) fx_error("FLEXNPU_MEM_QUOTA=%s is not a size such as 8G or 512MiB; ignoring it", v);
    }
    pthread_atfork(NULL, NULL, fx_after_fork_child);
    fx_debug("loaded: runtime %s, role %u, %d mapped devices, quota %llu", FX_RUNTIME_NAME, g_role, g_nmap,
             (unsigned long long)g_quota);
}

__attribute__((destructor)) static void fx_fini(void)
{
    /* leaving with work pending must not hold lower-priority clients until the daemon reaps us */
    for (int i = 0; i < FX_MAX_DEVICES; i++) {
        struct fx_att *a = atomic_load(&g_att[i]);
        if (!a) continue;
        struct fx_page *me = fx_me(a);
        atomic_store(&me->idle_since_ns, 0);
        if (atomic_exchange(&me->pending, 0)) fx_notify(me);
    }
}

#ifdef FX_FORWARD
#include "fwd_client.c"
#endif
