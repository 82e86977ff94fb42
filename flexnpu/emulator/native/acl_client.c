/* The emulated libascendcl.so: the AscendCL C ABI on top of the FlexNPU device server.
 *
 * Data effects (copies, memsets, kernels) happen in the caller's thread at call time, on
 * the process's mapping of the device memory file. Calls reach the library in program
 * order, which is a legal order of the stream graph for any race-free program, so results
 * are those of a real device. Timing is the server's: each device operation becomes an op
 * in this process's ring, and synchronisation waits until the server's performance model
 * says the op has completed.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <grp.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>

#include "emu_ext.h"
#include "emu_kernels.h"
#include "emu_shared.h"
#include "emu_util.h"
#include "acl/acl.h"

#define STREAM_MAGIC 0x5354524dU
#define EVENT_MAGIC 0x45564e54U
#define CTX_MAGIC 0x43545854U
#define BIN_MAGIC 0x42494e48U
#define FUNC_MAGIC 0x46554e43U

struct alloc {
    uintptr_t base;
    size_t size;
    size_t exported; /* its first bytes are mapped from an IPC export's memfd (page-rounded), or 0 */
};

struct import { /* IPC memory of another process (or of this one), mapped at an address of its own */
    uintptr_t base;
    size_t size;      /* bytes exported: the device range it is */
    size_t map_bytes; /* page-rounded: the mapping */
    int home;         /* the exporter's device */
    uint64_t seq;     /* import order */
    char key[EMU_IPC_KEY_LEN];
};

struct device {
    bool open;
    int refs;
    struct emu_dev_seg *seg; /* read-only */
    struct emu_bell *bell;
    char *mem;               /* this process's own device memory of this device */
    int mem_fd;              /* its file: exported pages are mapped back from it when freed */
    uint64_t cap;
    pthread_mutex_t ring_lock;
    pthread_mutex_t alloc_lock;
    struct alloc *allocs; /* sorted by base */
    size_t nallocs, cap_allocs;
    struct import *imports; /* in import order; under alloc_lock */
    size_t nimports, cap_imports;
};

struct stream {
    uint32_t magic;
    uint32_t idx;
    int dev;
};

struct event {
    uint32_t magic;
    uint32_t idx;
    uint32_t flags;
    _Atomic uint32_t gen; /* records issued */
};

struct context {
    uint32_t magic;
    int dev;
};

struct func {
    uint32_t magic;
    int builtin;
    int core_class; /* enum emu_core_class: the built-in's, or the library line's */
    _Atomic int name_id; /* server name id, registered on first launch; -1 until then */
    char name[EMU_NAME_LEN];
};

struct binary {
    uint32_t magic;
    int nfuncs;
    struct func funcs[];
};

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER; /* connection, tables */
static bool g_inited, g_finalized;
static int g_sock = -1;
static int g_ndev;
static struct emu_client_seg *g_seg;
static struct device g_dev[EMU_MAX_DEVICES];
static _Atomic uint64_t g_stream_seq[EMU_MAX_STREAMS]; /* ops issued per stream */
static uint8_t g_stream_used[EMU_MAX_STREAMS];
static uint8_t g_event_used[EMU_MAX_EVENTS];
static _Atomic bool g_server_lost;
static char g_sock_path[108];
/* The watcher: a thread that sleeps in poll() on the server's socket and, when the server
 * hangs up, marks it lost and wakes every thread waiting on a completion, so no call waits
 * for a server that is gone. */
static pthread_t g_watcher;
static bool g_watching;
static _Atomic bool g_closing; /* aclFinalize closes the socket: the hang-up is ours */

static __thread int t_dev = -1;
static __thread char t_errmsg[256];

static int fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t_errmsg, sizeof t_errmsg, fmt, ap);
    va_end(ap);
    return code;
}

static void warn_once(_Atomic bool *flag, const char *msg)
{
    if (!atomic_exchange(flag, true)) fprintf(stderr, "libascendcl (FlexNPU emulator): %s\n", msg);
}

/* ---------------------------------------------------------------- connection */

static void mark_lost(const char *why);

static int rpc(struct emu_req *req, struct emu_rep *rep, int *fds, int *nfds)
{
    if (g_sock < 0) return ACL_ERROR_RT_SOCKET_CLOSE;
    if (emu_send_fds(g_sock, req, sizeof *req, NULL, 0) == 0 &&
        emu_recv_fds(g_sock, rep, sizeof *rep, fds, nfds) == (ssize_t)sizeof *rep)
        return 0;
    mark_lost("lost the connection to the device server; device calls now fail with "
              "ACL_ERROR_RT_SOCKET_CLOSE (507901)");
    return ACL_ERROR_RT_SOCKET_CLOSE;
}

static void mark_lost(const char *why)
{
    atomic_store(&g_server_lost, true);
    static _Atomic bool said;
    warn_once(&said, why);
}

/* Wakes every thread waiting on a completion word of this process (they then see the
 * server lost). Waiters count themselves in `waiters` before they sleep and check
 * g_server_lost after: with the store above, one of the two sides always sees the other. */
static void wake_all_waiters(void)
{
    if (!g_seg) return;
    for (int i = 0; i < EMU_MAX_STREAMS; i++)
        if (atomic_load(&g_seg->streams[i].waiters)) emu_futex_wake(&g_seg->streams[i].completed, INT32_MAX);
    for (int i = 0; i < EMU_MAX_EVENTS; i++)
        if (atomic_load(&g_seg->events[i].waiters)) emu_futex_wake(&g_seg->events[i].completed_gen, INT32_MAX);
    for (int i = 0; i < EMU_MAX_DEVICES; i++)
        if (atomic_load(&g_seg->rings[i].room_waiters)) emu_futex_wake(&g_seg->rings[i].room_gen, INT32_MAX);
}

/* A child of fork() has no watcher thread (threads do not survive fork). */
static void forget_watcher_in_child(void) { g_watching = false; }
static void register_atfork(void) { pthread_atfork(NULL, NULL, forget_watcher_in_child); }

static void *watch_server(void *arg)
{
    (void)arg;
    for (;;) {
        struct pollfd p = {.fd = g_sock, .events = POLLRDHUP}; /* never POLLIN: replies are the callers' */
        int r = poll(&p, 1, -1);
        if (r < 0 && errno == EINTR) continue;
        if (atomic_load(&g_closing)) return NULL;
        if (r < 0 || (p.revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL))) break;
    }
    mark_lost("the device server went away; device calls now fail with ACL_ERROR_RT_SOCKET_CLOSE (507901)");
    wake_all_waiters();
    return NULL;
}

static bool server_alive(void)
{
    if (atomic_load(&g_server_lost) || g_sock < 0) return false;
    struct pollfd p = {.fd = g_sock, .events = POLLRDHUP};
    if (poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLRDHUP | POLLERR))) {
        mark_lost("the device server went away; device calls now fail with ACL_ERROR_RT_SOCKET_CLOSE (507901)");
        return false;
    }
    return true;
}

/* One line on stderr, once per process, when the emulator is not for this user: who it is
 * for (group_gid: the group named by the server, or the socket's group; EMU_NO_GROUP: root
 * only) and what to do. */
static int refused(uint64_t group_gid)
{
    static _Atomic bool said;
    struct group *gr = group_gid == EMU_NO_GROUP ? NULL : getgrgid((gid_t)group_gid);
    char who[96];
    if (gr) snprintf(who, sizeof who, "root and the %s group", gr->gr_name);
    else snprintf(who, sizeof who, "root only (this node has no %s group)", EMU_CLIENT_GROUP);
    if (!atomic_exchange(&said, true))
        fprintf(stderr,
                "libascendcl (FlexNPU emulator): permission denied: the emulated device at %s is for %s; "
                "%s\n",
                g_sock_path, who,
                gr ? "ask an administrator to add you to it (usermod -aG GROUP USER) and log in again"
                   : "ask an administrator to create the group (groupadd " EMU_CLIENT_GROUP
                     ") and restart the emulator");
    return fail(ACL_ERROR_RT_NO_PERMISSION, "permission denied: the emulated device is for %s", who);
}

/* Connects to the device server and registers this process. Caller holds g_lock. */
static int connect_locked(void)
{
    if (g_sock >= 0) return atomic_load(&g_server_lost) ? ACL_ERROR_RT_SOCKET_CLOSE : 0;
    if (emu_socket_path(g_sock_path, sizeof g_sock_path) < 0)
        return fail(ACL_ERROR_RT_NO_DEVICE, "FLEXNPU_RUNTIME_DIR is too long for a socket path");
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    memcpy(sa.sun_path, g_sock_path, strlen(g_sock_path) + 1);
    if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int e = errno;
        if (s >= 0) close(s);
        if (e == EACCES || e == EPERM) { /* the socket's mode: 0660, in the client group */
            struct stat st;
            bool grp_ok = stat(g_sock_path, &st) == 0 && (st.st_mode & S_IWGRP) && st.st_gid != 0;
            return refused(grp_ok ? (uint64_t)st.st_gid : EMU_NO_GROUP);
        }
        static _Atomic bool said;
        if (!atomic_exchange(&said, true))
            fprintf(stderr,
                    "libascendcl (FlexNPU emulator): no device server at %s (%s); "
                    "start one with `flexnpu emu start`\n",
                    g_sock_path, strerror(e));
        return fail(ACL_ERROR_RT_NO_DEVICE, "no emulated device server at %s", g_sock_path);
    }
    /* the server admits us (or not) and makes our segment; we map what it gives */
    struct emu_req req = {.type = EMU_REQ_HELLO, .a = EMU_PROTO_VERSION};
    struct emu_rep rep;
    int fds[EMU_FDS_MAX], nfds = 0;
    if (emu_send_fds(s, &req, sizeof req, NULL, 0) < 0 ||
        emu_recv_fds(s, &rep, sizeof rep, fds, &nfds) != (ssize_t)sizeof rep) {
        for (int i = 0; i < nfds; i++) close(fds[i]);
        close(s);
        return fail(ACL_ERROR_RT_NO_DEVICE, "the device server at %s closed the connection", g_sock_path);
    }
    if (rep.err || nfds != 1) {
        for (int i = 0; i < nfds; i++) close(fds[i]);
        close(s);
        if (rep.err == ACL_ERROR_RT_NO_PERMISSION) return refused(rep.a);
        if (rep.err == ACL_ERROR_RT_OVER_LIMIT) {
            fprintf(stderr, "libascendcl (FlexNPU emulator): this user already runs %llu processes on the "
                    "emulated devices, the most one user may; end one of them first\n", (unsigned long long)rep.a);
            return fail(ACL_ERROR_RT_OVER_LIMIT, "too many processes of this user at %s", g_sock_path);
        }
        return fail(ACL_ERROR_RT_NO_DEVICE, "the device server at %s refused this process (%d)", g_sock_path,
                    rep.err);
    }
    struct emu_client_seg *seg = mmap(NULL, sizeof *seg, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
    close(fds[0]);
    if (seg == MAP_FAILED || seg->magic != EMU_MAGIC_CLIENT) {
        if (seg != MAP_FAILED) munmap(seg, sizeof *seg);
        close(s);
        return fail(ACL_ERROR_RT_RESOURCE_ALLOC_FAIL, "cannot map the client segment");
    }
    g_sock = s;
    g_seg = seg;
    g_ndev = (int)rep.a;
    atomic_store(&g_server_lost, false);
    static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
    pthread_once(&atfork_once, register_atfork);
    sigset_t all, old; /* the watcher takes no signal meant for the application's threads */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    g_watching = pthread_create(&g_watcher, NULL, watch_server, NULL) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return 0;
}

static int open_device_locked(int dev)
{
    struct device *d = &g_dev[dev];
    if (d->open) return 0;
    struct emu_req req = {.type = EMU_REQ_OPEN_DEVICE, .device = dev};
    struct emu_rep rep;
    int fds[EMU_FDS_MAX], nfds = 0;
    int rc = rpc(&req, &rep, fds, &nfds);
    if (rc) return rc;
    if (rep.err || nfds != 3) {
        for (int i = 0; i < nfds; i++) close(fds[i]);
        return rep.err ? rep.err : ACL_ERROR_RT_DEV_SETUP_ERROR;
    }
    /* device segment (sealed: read-only is all we may map), doorbell, our device memory */
    d->seg = mmap(NULL, sizeof(struct emu_dev_seg), PROT_READ, MAP_SHARED, fds[0], 0);
    d->bell = mmap(NULL, sizeof(struct emu_bell), PROT_READ | PROT_WRITE, MAP_SHARED, fds[1], 0);
    d->cap = rep.a;
    d->mem = mmap(NULL, d->cap, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fds[2], 0);
    for (int i = 0; i < 2; i++) close(fds[i]);
    d->mem_fd = fds[2];
    if (d->seg == MAP_FAILED || d->bell == MAP_FAILED || d->mem == MAP_FAILED) {
        if (d->seg != MAP_FAILED) munmap(d->seg, sizeof(struct emu_dev_seg));
        if (d->bell != MAP_FAILED) munmap(d->bell, sizeof(struct emu_bell));
        if (d->mem != MAP_FAILED) munmap(d->mem, d->cap);
        close(d->mem_fd);
        d->seg = NULL, d->bell = NULL, d->mem = NULL, d->mem_fd = -1;
        return fail(ACL_ERROR_RT_DEV_SETUP_ERROR, "cannot map the memory of device %d", dev);
    }
    pthread_mutex_init(&d->ring_lock, NULL);
    pthread_mutex_init(&d->alloc_lock, NULL);
    d->open = true;
    /* The default and synchronous-copy streams of this device. */
    atomic_store(&g_seg->streams[EMU_STREAM_DEFAULT(dev)].device, (uint32_t)dev + 1);
    atomic_store(&g_seg->streams[EMU_STREAM_SYNCCOPY(dev)].device, (uint32_t)dev + 1);
    return 0;
}

/* ---------------------------------------------------------------- checks */

#define REQUIRE_INIT()                                                                         \
    do {                                                                                       \
        if (!g_inited) return fail(ACL_ERROR_UNINITIALIZE, "aclInit has not been called");     \
    } while (0)

static int current_device(int *dev)
{
    if (t_dev < 0 || !g_dev[t_dev].open)
        return fail(ACL_ERROR_RT_CONTEXT_NULL, "no device set in this thread; call aclrtSetDevice first");
    *dev = t_dev;
    return 0;
}

static int resolve_stream(aclrtStream stream, int *dev, uint32_t *idx)
{
    if (stream == NULL) {
        int rc = current_device(dev);
        if (rc) return rc;
        *idx = EMU_STREAM_DEFAULT(*dev);
        return 0;
    }
    struct stream *s = stream;
    if (s->magic != STREAM_MAGIC) return fail(ACL_ERROR_INVALID_PARAM, "not a stream handle");
    *dev = s->dev;
    *idx = s->idx;
    return 0;
}

/* The device a range [p, p+n) of device memory lies in, whole, inside one allocation or one
 * import; -1 if the range is host memory; -2 if it is device memory but not inside one
 * allocation or import. *home (if given): the device its bytes are on (an import's
 * exporter's), else the same. */
static int classify_home(const void *p, size_t n, int *home)
{
    uintptr_t a = (uintptr_t)p;
    if (home) *home = -1;
    for (int dev = 0; dev < EMU_MAX_DEVICES; dev++) {
        struct device *d = &g_dev[dev];
        if (!d->open || !d->nimports) continue;
        int found = -3;
        pthread_mutex_lock(&d->alloc_lock);
        for (size_t k = 0; k < d->nimports && found == -3; k++) {
            struct import *im = &d->imports[k];
            if (a < im->base || a >= im->base + im->map_bytes) continue;
            found = a + n >= a && a + n <= im->base + im->size ? dev : -2;
            if (found >= 0 && home) *home = im->home;
        }
        pthread_mutex_unlock(&d->alloc_lock);
        if (found != -3) return found;
    }
    for (int dev = 0; dev < EMU_MAX_DEVICES; dev++) {
        struct device *d = &g_dev[dev];
        if (!d->open) continue;
        uintptr_t lo = (uintptr_t)d->mem, hi = lo + d->cap;
        if (a < lo || a >= hi) continue;
        int found = -2;
        if (home) *home = dev;
        pthread_mutex_lock(&d->alloc_lock);
        size_t l = 0, r = d->nallocs;
        while (l < r) { /* last allocation with base <= a */
            size_t m = (l + r) / 2;
            if (d->allocs[m].base <= a) l = m + 1;
            else r = m;
        }
        if (l > 0) {
            struct alloc *al = &d->allocs[l - 1];
            if (a + n >= a && a + n <= al->base + al->size) found = dev;
        }
        pthread_mutex_unlock(&d->alloc_lock);
        return found;
    }
    return -1;
}

static int classify(const void *p, size_t n) { return classify_home(p, n, NULL); }

/* ---------------------------------------------------------------- ops */

static bool stream_done(uint32_t idx, uint64_t target)
{
    uint32_t c = atomic_load_explicit(&g_seg->streams[idx].completed, memory_order_acquire);
    return (int32_t)(c - (uint32_t)target) >= 0;
}

/* Waits until *word reaches target (wrapping compare), for at most timeout_ms (-1: forever).
 * Returns 0, 1 on timeout, or -1 if the server is gone. */
static int wait_word(_Atomic uint32_t *word, _Atomic uint32_t *waiters, uint32_t target, int64_t timeout_ms)
{
    uint64_t start = emu_now_ns();
    for (;;) {
        uint32_t c = atomic_load_explicit(word, memory_order_acquire);
        if ((int32_t)(c - target) >= 0) return 0;
        int64_t slice = 100000000; /* recheck the server's liveness every 100 ms */
        if (timeout_ms >= 0) {
            int64_t left = timeout_ms * 1000000LL - (int64_t)(emu_now_ns() - start);
            if (left <= 0) return 1;
            if (left < slice) slice = left;
        }
        atomic_fetch_add(waiters, 1);
        c = atomic_load_explicit(word, memory_order_seq_cst);
        /* the watcher wakes counted waiters when the server goes; one that counted itself
         * too late for that sees g_server_lost here */
        if ((int32_t)(c - target) < 0 && !atomic_load(&g_server_lost)) emu_futex_wait(word, c, slice);
        atomic_fetch_sub(waiters, 1);
        c = atomic_load_explicit(word, memory_order_acquire);
        if ((int32_t)(c - target) >= 0) return 0;
        if (!server_alive()) return -1;
    }
}

static int wait_stream(uint32_t idx, uint64_t target, int64_t timeout_ms)
{
    struct emu_stream_state *s = &g_seg->streams[idx];
    int r = wait_word(&s->completed, &s->waiters, (uint32_t)target, timeout_ms);
    if (r == 1) return fail(ACL_ERROR_RT_STREAM_SYNC_TIMEOUT, "stream synchronize timed out");
    if (r < 0) return fail(ACL_ERROR_RT_SOCKET_CLOSE, "the device server went away");
    return 0;
}

/* Queues one op on a stream of device dev. *seq gets its position on the stream. */
static int submit(int dev, uint32_t sidx, struct emu_op *op, uint64_t *seq)
{
    struct device *d = &g_dev[dev];
    struct emu_ring *r = &g_seg->rings[dev];
    if (atomic_load_explicit(&g_server_lost, memory_order_relaxed))
        return fail(ACL_ERROR_RT_SOCKET_CLOSE, "the device server went away");
    op->stream = sidx;
    pthread_mutex_lock(&d->ring_lock);
    uint64_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    while (tail - atomic_load_explicit(&r->head, memory_order_acquire) >= EMU_RING_SLOTS) {
        /* Full: the device has as much of our work queued as a process may have, as a real
         * stream's task queue does. Sleep until the server has taken an eighth of the ring
         * (rechecking every 100 ms that it is still there), as a real launch blocks. */
        pthread_mutex_unlock(&d->ring_lock);
        atomic_fetch_add_explicit(&r->room_waiters, 1, memory_order_seq_cst);
        uint32_t gen = atomic_load_explicit(&r->room_gen, memory_order_seq_cst);
        if (tail - atomic_load_explicit(&r->head, memory_order_seq_cst) >= EMU_RING_SLOTS &&
            !atomic_load(&g_server_lost)) {
            /* the server may sleep past our work (we ring only for earlier completions) */
            atomic_fetch_add(&d->bell->doorbell, 1);
            emu_futex_wake(&d->bell->doorbell, 1);
            emu_futex_wait(&r->room_gen, gen, 100000000);
        }
        atomic_fetch_sub_explicit(&r->room_waiters, 1, memory_order_seq_cst);
        if (!server_alive()) return fail(ACL_ERROR_RT_SOCKET_CLOSE, "the device server went away");
        pthread_mutex_lock(&d->ring_lock);
        tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    }
    uint64_t s = atomic_load_explicit(&g_stream_seq[sidx], memory_order_relaxed) + 1;
    atomic_store_explicit(&g_stream_seq[sidx], s, memory_order_relaxed);
    op->stream_seq = s;
    op->t_submit_ns = emu_now_ns();
    r->ops[tail & (EMU_RING_SLOTS - 1)] = *op;
    atomic_store_explicit(&r->tail, tail + 1, memory_order_seq_cst);
    pthread_mutex_unlock(&d->ring_lock);
    if (seq) *seq = s;
    /* Ring the doorbell only if the server would sleep past this op's earliest completion. */
    const struct emu_params *p = &d->seg->params;
    double end = (double)op->t_submit_ns + p->launch_ns * p->time_scale +
                 emu_solo_ns(p, op->flops, op->hbm_bytes, op->link_bytes);
    if (end < (double)atomic_load_explicit(&d->seg->deadline_ns, memory_order_seq_cst)) {
        atomic_fetch_add(&d->bell->doorbell, 1);
        emu_futex_wake(&d->bell->doorbell, 1);
    }
    return 0;
}

/* ---------------------------------------------------------------- init */

ACL_FUNC_VISIBILITY aclError aclInit(const char *configPath)
{
    pthread_mutex_lock(&g_lock);
    int rc = 0;
    if (g_inited) rc = fail(ACL_ERROR_REPEAT_INITIALIZE, "aclInit was already called");
    else if (configPath && *configPath && access(configPath, R_OK) != 0)
        rc = fail(ACL_ERROR_INVALID_FILE, "cannot read config file %s", configPath);
    else {
        g_inited = true;
        g_finalized = false;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

ACL_FUNC_VISIBILITY aclError aclFinalize(void)
{
    pthread_mutex_lock(&g_lock);
    if (!g_inited) {
        int rc = g_finalized ? fail(ACL_ERROR_REPEAT_FINALIZE, "aclFinalize was already called")
                             : fail(ACL_ERROR_UNINITIALIZE, "aclInit has not been called");
        pthread_mutex_unlock(&g_lock);
        return rc;
    }
    if (g_sock >= 0) {
        if (g_watching) { /* wake the watcher with our own hang-up, and let it go */
            atomic_store(&g_closing, true);
            shutdown(g_sock, SHUT_RDWR);
            pthread_join(g_watcher, NULL);
            g_watching = false;
            atomic_store(&g_closing, false);
        }
        close(g_sock); /* the server frees what this process still holds */
        g_sock = -1;
    }
    for (int i = 0; i < EMU_MAX_DEVICES; i++) {
        struct device *d = &g_dev[i];
        if (!d->open) continue;
        munmap(d->mem, d->cap);
        munmap(d->bell, sizeof *d->bell);
        munmap(d->seg, sizeof *d->seg);
        close(d->mem_fd);
        for (size_t k = 0; k < d->nimports; k++) munmap((void *)d->imports[k].base, d->imports[k].map_bytes);
        free(d->allocs);
        free(d->imports);
        memset(d, 0, sizeof *d);
    }
    if (g_seg) munmap(g_seg, sizeof *g_seg);
    g_seg = NULL;
    memset(g_stream_used, 0, sizeof g_stream_used);
    memset(g_event_used, 0, sizeof g_event_used);
    for (int i = 0; i < EMU_MAX_STREAMS; i++) atomic_store(&g_stream_seq[i], 0);
    g_inited = false;
    g_finalized = true;
    t_dev = -1;
    pthread_mutex_unlock(&g_lock);
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY const char *aclGetRecentErrMsg(void) { return t_errmsg[0] ? t_errmsg : NULL; }

ACL_FUNC_VISIBILITY const char *aclrtGetSocName(void)
{
    for (int i = 0; i < EMU_MAX_DEVICES; i++)
        if (g_dev[i].open) return g_dev[i].seg->params.soc_name;
    return NULL;
}

ACL_FUNC_VISIBILITY aclError aclrtGetRunMode(aclrtRunMode *runMode)
{
    REQUIRE_INIT();
    if (!runMode) return fail(ACL_ERROR_INVALID_PARAM, "runMode is NULL");
    *runMode = ACL_HOST;
    return ACL_SUCCESS;
}

/* ---------------------------------------------------------------- devices */

ACL_FUNC_VISIBILITY aclError aclrtGetDeviceCount(uint32_t *count)
{
    REQUIRE_INIT();
    if (!count) return fail(ACL_ERROR_INVALID_PARAM, "count is NULL");
    pthread_mutex_lock(&g_lock);
    int rc = connect_locked();
    if (!rc) *count = (uint32_t)g_ndev;
    pthread_mutex_unlock(&g_lock);
    return rc;
}

ACL_FUNC_VISIBILITY aclError aclrtSetDevice(int32_t deviceId)
{
    REQUIRE_INIT();
    pthread_mutex_lock(&g_lock);
    int rc = connect_locked();
    if (!rc && (deviceId < 0 || deviceId >= g_ndev))
        rc = fail(ACL_ERROR_RT_INVALID_DEVICEID, "device %d does not exist (%d devices)", deviceId, g_ndev);
    if (!rc) rc = open_device_locked(deviceId);
    if (!rc) {
        g_dev[deviceId].refs++;
        t_dev = deviceId;
    }
    pthread_mutex_unlock(&g_lock);
    return rc;
}

static aclError sync_device(int dev, int64_t timeout_ms)
{
    for (uint32_t i = 0; i < EMU_MAX_STREAMS; i++) {
        if (atomic_load(&g_seg->streams[i].device) != (uint32_t)dev + 1) continue;
        uint64_t target = atomic_load(&g_stream_seq[i]);
        if (target == 0) continue;
        int rc = wait_stream(i, target, timeout_ms);
        if (rc) return rc;
    }
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtResetDevice(int32_t deviceId)
{
    REQUIRE_INIT();
    if (deviceId < 0 || deviceId >= g_ndev || !g_dev[deviceId].open)
        return fail(ACL_ERROR_RT_INVALID_DEVICEID, "device %d was not set", deviceId);
    int rc = sync_device(deviceId, -1);
    pthread_mutex_lock(&g_lock);
    if (g_dev[deviceId].refs > 0) g_dev[deviceId].refs--;
    if (t_dev == deviceId) t_dev = -1;
    pthread_mutex_unlock(&g_lock);
    return rc;
}

ACL_FUNC_VISIBILITY aclError aclrtGetDevice(int32_t *deviceId)
{
    REQUIRE_INIT();
    if (!deviceId) return fail(ACL_ERROR_INVALID_PARAM, "deviceId is NULL");
    int dev = -1, rc = current_device(&dev);
    if (!rc) *deviceId = dev;
    return rc;
}

ACL_FUNC_VISIBILITY aclError aclrtSynchronizeDeviceWithTimeout(int32_t timeout)
{
    REQUIRE_INIT();
    int dev = -1, rc = current_device(&dev);
    if (rc) return rc;
    if (timeout < -1) return fail(ACL_ERROR_INVALID_PARAM, "timeout must be -1 or >= 0 ms");
    return sync_device(dev, timeout);
}

ACL_FUNC_VISIBILITY aclError aclrtSynchronizeDevice(void) { return aclrtSynchronizeDeviceWithTimeout(-1); }

ACL_FUNC_VISIBILITY aclError aclrtCreateContext(aclrtContext *context, int32_t deviceId)
{
    if (!context) {
        REQUIRE_INIT();
        return fail(ACL_ERROR_INVALID_PARAM, "context is NULL");
    }
    int rc = aclrtSetDevice(deviceId);
    if (rc) return rc;
    struct context *c = malloc(sizeof *c);
    if (!c) return fail(ACL_ERROR_BAD_ALLOC, "out of host memory");
    c->magic = CTX_MAGIC;
    c->dev = deviceId;
    *context = c;
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtDestroyContext(aclrtContext context)
{
    REQUIRE_INIT();
    struct context *c = context;
    if (!c || c->magic != CTX_MAGIC) return fail(ACL_ERROR_INVALID_PARAM, "not a context handle");
    c->magic = 0;
    free(c);
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtSetCurrentContext(aclrtContext context)
{
    REQUIRE_INIT();
    struct context *c = context;
    if (!c || c->magic != CTX_MAGIC) return fail(ACL_ERROR_INVALID_PARAM, "not a context handle");
    t_dev = c->dev;
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtGetCurrentContext(aclrtContext *context)
{
    REQUIRE_INIT();
    if (!context) return fail(ACL_ERROR_INVALID_PARAM, "context is NULL");
    return fail(ACL_ERROR_API_NOT_SUPPORT, "aclrtGetCurrentContext is not emulated");
}

/* ---------------------------------------------------------------- streams */

ACL_FUNC_VISIBILITY aclError aclrtCreateStreamWithConfig(aclrtStream *stream, uint32_t priority, uint32_t flag)
{
    REQUIRE_INIT();
    (void)flag;
    if (!stream) return fail(ACL_ERROR_INVALID_PARAM, "stream is NULL");
    if (priority > 7) return fail(ACL_ERROR_INVALID_PARAM, "priority must be 0..7");
    int dev = -1, rc = current_device(&dev);
    if (rc) return rc;
    struct stream *s = malloc(sizeof *s);
    if (!s) return fail(ACL_ERROR_BAD_ALLOC, "out of host memory");
    pthread_mutex_lock(&g_lock);
    int idx = -1;
    for (int i = EMU_STREAM_FIRST_USER; i < EMU_MAX_STREAMS; i++)
        if (!g_stream_used[i]) {
            idx = i;
            break;
        }
    if (idx >= 0) {
        g_stream_used[idx] = 1;
        atomic_store(&g_stream_seq[idx], 0);
        atomic_store(&g_seg->streams[idx].completed, 0);
        atomic_store(&g_seg->streams[idx].device, (uint32_t)dev + 1);
    }
    pthread_mutex_unlock(&g_lock);
    if (idx < 0) {
        free(s);
        return fail(ACL_ERROR_RT_NO_STREAM_RESOURCE, "too many streams (%d)", EMU_MAX_STREAMS);
    }
    s->magic = STREAM_MAGIC;
    s->idx = (uint32_t)idx;
    s->dev = dev;
    *stream = s;
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtCreateStream(aclrtStream *stream)
{
    return aclrtCreateStreamWithConfig(stream, 0, 0);
}

ACL_FUNC_VISIBILITY aclError aclrtSynchronizeStreamWithTimeout(aclrtStream stream, int32_t timeout)
{
    REQUIRE_INIT();
    if (timeout < -1) return fail(ACL_ERROR_INVALID_PARAM, "timeout must be -1 or >= 0 ms");
    int dev = -1;
    uint32_t idx = 0;
    int rc = resolve_stream(stream, &dev, &idx);
    if (rc) return rc;
    return wait_stream(idx, atomic_load(&g_stream_seq[idx]), timeout);
}

ACL_FUNC_VISIBILITY aclError aclrtSynchronizeStream(aclrtStream stream)
{
    return aclrtSynchronizeStreamWithTimeout(stream, -1);
}

ACL_FUNC_VISIBILITY aclError aclrtStreamQuery(aclrtStream stream, aclrtStreamStatus *status)
{
    REQUIRE_INIT();
    if (!status) return fail(ACL_ERROR_INVALID_PARAM, "status is NULL");
    int dev = -1;
    uint32_t idx = 0;
    int rc = resolve_stream(stream, &dev, &idx);
    if (rc) return rc;
    *status = stream_done(idx, atomic_load(&g_stream_seq[idx])) ? ACL_STREAM_STATUS_COMPLETE
                                                                : ACL_STREAM_STATUS_NOT_READY;
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtDestroyStream(aclrtStream stream)
{
    REQUIRE_INIT();
    struct stream *s = stream;
    if (!s || s->magic != STREAM_MAGIC) return fail(ACL_ERROR_INVALID_PARAM, "not a stream handle");
    /* Drain first: the index is reused, and the server must not complete old ops into it. */
    int rc = wait_stream(s->idx, atomic_load(&g_stream_seq[s->idx]), -1);
    pthread_mutex_lock(&g_lock);
    g_stream_used[s->idx] = 0;
    if (g_seg) atomic_store(&g_seg->streams[s->idx].device, 0);
    pthread_mutex_unlock(&g_lock);
    s->magic = 0;
    free(s);
    return rc == ACL_ERROR_RT_SOCKET_CLOSE ? ACL_SUCCESS : rc;
}

/* ---------------------------------------------------------------- memory */

ACL_FUNC_VISIBILITY aclError aclrtMalloc(void **devPtr, size_t size, aclrtMemMallocPolicy policy)
{
    REQUIRE_INIT();
    if (!devPtr) return fail(ACL_ERROR_INVALID_PARAM, "devPtr is NULL");
    if (size == 0) return fail(ACL_ERROR_INVALID_PARAM, "size is 0");
    unsigned pol = (unsigned)policy & ~(unsigned)(ACL_MEM_TYPE_LOW_BAND_WIDTH | ACL_MEM_TYPE_HIGH_BAND_WIDTH);
    if (pol > ACL_MEM_MALLOC_HUGE1G_ONLY_P2P) return fail(ACL_ERROR_INVALID_PARAM, "unknown malloc policy %d", policy);
    int dev = -1, rc = current_device(&dev);
    if (rc) return rc;
    struct device *d = &g_dev[dev];
    struct emu_req req = {.type = EMU_REQ_ALLOC, .device = dev, .a = size};
    struct emu_rep rep;
    pthread_mutex_lock(&g_lock);
    rc = rpc(&req, &rep, NULL, NULL);
    pthread_mutex_unlock(&g_lock);
    if (rc) return rc;
    if (rep.err)
        return fail(rep.err, "device %d out of memory: %zu bytes asked, %llu of %llu in use", dev, size,
                    (unsigned long long)atomic_load(&d->seg->mem_used), (unsigned long long)d->cap);
    uintptr_t base = (uintptr_t)d->mem + rep.a;
    pthread_mutex_lock(&d->alloc_lock);
    if (d->nallocs == d->cap_allocs) {
        size_t nc = d->cap_allocs ? 2 * d->cap_allocs : 64;
        struct alloc *na = realloc(d->allocs, nc * sizeof *na);
        if (!na) {
            pthread_mutex_unlock(&d->alloc_lock);
            return fail(ACL_ERROR_BAD_ALLOC, "out of host memory");
        }
        d->allocs = na;
        d->cap_allocs = nc;
    }
    size_t i = d->nallocs;
    while (i > 0 && d->allocs[i - 1].base > base) {
        d->allocs[i] = d->allocs[i - 1];
        i--;
    }
    d->allocs[i] = (struct alloc){.base = base, .size = size};
    d->nallocs++;
    pthread_mutex_unlock(&d->alloc_lock);
    *devPtr = (void *)base;
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtFree(void *devPtr)
{
    REQUIRE_INIT();
    if (!devPtr) return fail(ACL_ERROR_INVALID_PARAM, "devPtr is NULL");
    uintptr_t a = (uintptr_t)devPtr;
    for (int dev = 0; dev < EMU_MAX_DEVICES; dev++) {
        struct device *d = &g_dev[dev];
        if (!d->open || a < (uintptr_t)d->mem || a >= (uintptr_t)d->mem + d->cap) continue;
        pthread_mutex_lock(&d->alloc_lock);
        size_t i;
        for (i = 0; i < d->nallocs && d->allocs[i].base != a; i++)
            ;
        if (i == d->nallocs) {
            pthread_mutex_unlock(&d->alloc_lock);
            return fail(ACL_ERROR_INVALID_PARAM, "%p is not the start of a device allocation", devPtr);
        }
        /* exported pages: the addresses show this process's own file again (a hole there), so
         * a later allocation at them is this process's alone; importers keep their mapping */
        if (d->allocs[i].exported && mmap(devPtr, d->allocs[i].exported, PROT_READ | PROT_WRITE,
                                          MAP_SHARED | MAP_FIXED, d->mem_fd, (off_t)(a - (uintptr_t)d->mem)) == MAP_FAILED) {
            pthread_mutex_unlock(&d->alloc_lock);
            return fail(ACL_ERROR_RT_MEMORY_FREE, "cannot unmap the exported memory at %p: %s", devPtr, strerror(errno));
        }
        memmove(&d->allocs[i], &d->allocs[i + 1], (d->nallocs - i - 1) * sizeof *d->allocs);
        d->nallocs--;
        pthread_mutex_unlock(&d->alloc_lock);
        struct emu_req req = {.type = EMU_REQ_FREE, .device = dev, .a = a - (uintptr_t)d->mem};
        struct emu_rep rep;
        pthread_mutex_lock(&g_lock);
        int rc = rpc(&req, &rep, NULL, NULL);
        pthread_mutex_unlock(&g_lock);
        return rc ? rc : rep.err;
    }
    return fail(ACL_ERROR_INVALID_PARAM, "%p is not device memory", devPtr);
}

ACL_FUNC_VISIBILITY aclError aclrtMallocHost(void **hostPtr, size_t size)
{
    REQUIRE_INIT();
    if (!hostPtr || size == 0) return fail(ACL_ERROR_INVALID_PARAM, "hostPtr is NULL or size is 0");
    void *p = NULL;
    if (posix_memalign(&p, 64, size) != 0) return fail(ACL_ERROR_BAD_ALLOC, "out of host memory");
    *hostPtr = p;
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtFreeHost(void *hostPtr)
{
    REQUIRE_INIT();
    if (!hostPtr) return fail(ACL_ERROR_INVALID_PARAM, "hostPtr is NULL");
    free(hostPtr);
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtGetMemInfo(aclrtMemAttr attr, size_t *free_, size_t *total)
{
    REQUIRE_INIT();
    if (!free_ || !total) return fail(ACL_ERROR_INVALID_PARAM, "free or total is NULL");
    int dev = -1, rc = current_device(&dev);
    if (rc) return rc;
    struct device *d = &g_dev[dev];
    switch (attr) {
    case ACL_HBM_MEM:
    case ACL_HBM_MEM_HUGE:
    case ACL_HBM_MEM_NORMAL:
    case ACL_HBM_MEM_P2P_HUGE:
    case ACL_HBM_MEM_P2P_NORMAL: {
        uint64_t used = atomic_load(&d->seg->mem_used);
        *total = d->cap;
        *free_ = used > d->cap ? 0 : d->cap - used;
        return ACL_SUCCESS;
    }
    case ACL_DDR_MEM:
    case ACL_DDR_MEM_HUGE:
    case ACL_DDR_MEM_NORMAL:
    case ACL_DDR_MEM_P2P_HUGE:
    case ACL_DDR_MEM_P2P_NORMAL: {
        struct sysinfo si;
        sysinfo(&si);
        *total = (size_t)si.totalram * si.mem_unit;
        *free_ = (size_t)si.freeram * si.mem_unit;
        return ACL_SUCCESS;
    }
    }
    return fail(ACL_ERROR_INVALID_PARAM, "unknown memory attribute %d", attr);
}

static aclError memset_common(void *devPtr, size_t maxCount, int32_t value, size_t count, int dev, uint32_t sidx,
                              bool wait)
{
    if (!devPtr) return fail(ACL_ERROR_INVALID_PARAM, "devPtr is NULL");
    if (count > maxCount) return fail(ACL_ERROR_INVALID_PARAM, "count %zu exceeds maxCount %zu", count, maxCount);
    if (count == 0) return ACL_SUCCESS;
    if (classify(devPtr, count) != dev)
        return fail(ACL_ERROR_INVALID_PARAM, "[%p, +%zu) is not inside a device allocation", devPtr, count);
    memset(devPtr, value, count);
    struct emu_op op = {.kind = EMU_OP_MEMSET, .name_id = EMU_NAME_MEMSET, .hbm_bytes = (double)count,
                        .copy_bytes = count};
    uint64_t seq;
    int rc = submit(dev, sidx, &op, &seq);
    if (rc || !wait) return rc;
    return wait_stream(sidx, seq, -1);
}

ACL_FUNC_VISIBILITY aclError aclrtMemset(void *devPtr, size_t maxCount, int32_t value, size_t count)
{
    REQUIRE_INIT();
    int dev = -1, rc = current_device(&dev);
    if (rc) return rc;
    return memset_common(devPtr, maxCount, value, count, dev, EMU_STREAM_SYNCCOPY(dev), true);
}

ACL_FUNC_VISIBILITY aclError aclrtMemsetAsync(void *devPtr, size_t maxCount, int32_t value, size_t count,
                                              aclrtStream stream)
{
    REQUIRE_INIT();
    int dev = -1;
    uint32_t idx = 0;
    int rc = resolve_stream(stream, &dev, &idx);
    if (rc) return rc;
    return memset_common(devPtr, maxCount, value, count, dev, idx, false);
}

/* Checks a copy against its kind; fills the op's work and the device it runs on. sync: a
 * synchronous copy (aclrtMemcpy). */
static aclError plan_copy(void *dst, size_t destMax, const void *src, size_t count, aclrtMemcpyKind kind,
                          struct emu_op *op, int *dev, bool sync)
{
    if (!dst || !src) return fail(ACL_ERROR_INVALID_PARAM, "dst or src is NULL");
    if (count > destMax) return fail(ACL_ERROR_INVALID_PARAM, "count %zu exceeds destMax %zu", count, destMax);
    if ((unsigned)kind > ACL_MEMCPY_INTER_DEVICE_TO_DEVICE)
        return fail(ACL_ERROR_INVALID_PARAM, "unknown aclrtMemcpyKind %d", kind);
    int hs, hd, ds = classify_home(src, count, &hs), dd = classify_home(dst, count, &hd);
    if (ds == -2 || dd == -2)
        return fail(ACL_ERROR_INVALID_PARAM, "a device range of the copy is not inside one allocation");
    /* IPC memory of another device (CANN, aclrtIpcMemGetExportKey): no direction inferred, no
     * host<->device copy, no synchronous copy; asynchronous copies between devices only */
    bool peer = (ds >= 0 && hs != ds) || (dd >= 0 && hd != dd);
    if (peer && (sync || kind == ACL_MEMCPY_DEFAULT || ds < 0 || dd < 0))
        return fail(ACL_ERROR_RT_FEATURE_NOT_SUPPORT, "IPC memory imported from another device takes only "
                    "aclrtMemcpyAsync between device pointers with an explicit kind");
    if (kind == ACL_MEMCPY_DEFAULT)
        kind = ds < 0 ? (dd < 0 ? ACL_MEMCPY_HOST_TO_HOST : ACL_MEMCPY_HOST_TO_DEVICE)
                      : (dd < 0 ? ACL_MEMCPY_DEVICE_TO_HOST : ACL_MEMCPY_DEVICE_TO_DEVICE);
    bool ok;
    switch (kind) {
    case ACL_MEMCPY_HOST_TO_HOST: ok = ds < 0 && dd < 0; *dev = -1; break;
    case ACL_MEMCPY_HOST_TO_DEVICE:
    case ACL_MEMCPY_HOST_TO_BUF_TO_DEVICE: ok = ds < 0 && dd >= 0; *dev = dd; break;
    case ACL_MEMCPY_DEVICE_TO_HOST: ok = ds >= 0 && dd < 0; *dev = ds; break;
    case ACL_MEMCPY_DEVICE_TO_DEVICE:
    case ACL_MEMCPY_INNER_DEVICE_TO_DEVICE: ok = ds >= 0 && ds == dd; *dev = ds; break;
    default: ok = ds >= 0 && dd >= 0; *dev = ds; break; /* inter-device */
    }
    if (!ok) return fail(ACL_ERROR_INVALID_PARAM, "the pointers do not match aclrtMemcpyKind %d", kind);
    op->kind = EMU_OP_COPY;
    op->name_id = (uint16_t)(EMU_NAME_COPY_BASE + kind);
    op->copy_bytes = count;
    if (hs >= 0 && hd >= 0 && hs != hd) {
        /* between devices: the device link (HCCS-class), expressed as host-link work so the
         * model's link resource times it at p2p_bw */
        const struct emu_params *p = &g_dev[ds].seg->params;
        op->link_bytes = (double)count * (p->p2p_bw > 0 ? p->link_bw / p->p2p_bw : 1.0);
    } else if (kind == ACL_MEMCPY_DEVICE_TO_DEVICE || kind == ACL_MEMCPY_INNER_DEVICE_TO_DEVICE)
        op->hbm_bytes = 2.0 * (double)count;
    else
        op->link_bytes = (double)count;
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtMemcpy(void *dst, size_t destMax, const void *src, size_t count,
                                         aclrtMemcpyKind kind)
{
    REQUIRE_INIT();
    struct emu_op op = {0};
    int dev = -1, rc = plan_copy(dst, destMax, src, count, kind, &op, &dev, true);
    if (rc) return rc;
    if (count) memmove(dst, src, count);
    if (dev < 0 || count == 0) return ACL_SUCCESS;
    uint64_t seq;
    rc = submit(dev, EMU_STREAM_SYNCCOPY(dev), &op, &seq);
    return rc ? rc : wait_stream(EMU_STREAM_SYNCCOPY(dev), seq, -1);
}

ACL_FUNC_VISIBILITY aclError aclrtMemcpyAsync(void *dst, size_t destMax, const void *src, size_t count,
                                              aclrtMemcpyKind kind, aclrtStream stream)
{
    REQUIRE_INIT();
    int sdev = -1;
    uint32_t idx = 0;
    int rc = resolve_stream(stream, &sdev, &idx);
    if (rc) return rc;
    struct emu_op op = {0};
    int dev = -1;
    rc = plan_copy(dst, destMax, src, count, kind, &op, &dev, false);
    if (rc) return rc;
    if (count) memmove(dst, src, count);
    if (dev < 0 || count == 0) return ACL_SUCCESS;
    return submit(sdev, idx, &op, NULL);
}

/* ---------------------------------------------------------------- events */

ACL_FUNC_VISIBILITY aclError aclrtCreateEventWithFlag(aclrtEvent *event, uint32_t flag)
{
    REQUIRE_INIT();
    if (!event) return fail(ACL_ERROR_INVALID_PARAM, "event is NULL");
    pthread_mutex_lock(&g_lock);
    int rc = connect_locked(), idx = -1;
    if (!rc)
        for (int i = 0; i < EMU_MAX_EVENTS; i++)
            if (!g_event_used[i]) {
                idx = i;
                g_event_used[i] = 1;
                atomic_store(&g_seg->events[i].completed_gen, 0);
                atomic_store(&g_seg->events[i].t_ns, 0);
                break;
            }
    pthread_mutex_unlock(&g_lock);
    if (rc) return rc;
    if (idx < 0) return fail(ACL_ERROR_RT_NO_EVENT_RESOURCE, "too many events (%d)", EMU_MAX_EVENTS);
    struct event *e = malloc(sizeof *e);
    if (!e) return fail(ACL_ERROR_BAD_ALLOC, "out of host memory");
    e->magic = EVENT_MAGIC;
    e->idx = (uint32_t)idx;
    e->flags = flag;
    atomic_store(&e->gen, 0);
    *event = e;
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtCreateEvent(aclrtEvent *event)
{
    return aclrtCreateEventWithFlag(event, ACL_EVENT_SYNC | ACL_EVENT_TIME_LINE);
}

static int check_event(aclrtEvent event, struct event **out)
{
    struct event *e = event;
    if (!e || e->magic != EVENT_MAGIC) return fail(ACL_ERROR_INVALID_PARAM, "not an event handle");
    *out = e;
    return 0;
}

ACL_FUNC_VISIBILITY aclError aclrtRecordEvent(aclrtEvent event, aclrtStream stream)
{
    REQUIRE_INIT();
    struct event *e = NULL;
    int dev = -1, rc = check_event(event, &e);
    uint32_t idx = 0;
    if (rc || (rc = resolve_stream(stream, &dev, &idx))) return rc;
    struct emu_op op = {.kind = EMU_OP_EVENT_RECORD, .event = e->idx};
    op.event_gen = atomic_fetch_add(&e->gen, 1) + 1;
    return submit(dev, idx, &op, NULL);
}

static bool event_done(struct event *e)
{
    uint32_t g = atomic_load(&e->gen);
    uint32_t c = atomic_load_explicit(&g_seg->events[e->idx].completed_gen, memory_order_acquire);
    return (int32_t)(c - g) >= 0;
}

ACL_FUNC_VISIBILITY aclError aclrtQueryEvent(aclrtEvent event, aclrtEventStatus *status)
{
    REQUIRE_INIT();
    struct event *e = NULL;
    int rc = check_event(event, &e);
    if (rc) return rc;
    if (!status) return fail(ACL_ERROR_INVALID_PARAM, "status is NULL");
    *status = event_done(e) ? ACL_EVENT_STATUS_COMPLETE : ACL_EVENT_STATUS_NOT_READY;
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtQueryEventStatus(aclrtEvent event, aclrtEventRecordedStatus *status)
{
    REQUIRE_INIT();
    struct event *e = NULL;
    int rc = check_event(event, &e);
    if (rc) return rc;
    if (!status) return fail(ACL_ERROR_INVALID_PARAM, "status is NULL");
    *status = event_done(e) ? ACL_EVENT_RECORDED_STATUS_COMPLETE : ACL_EVENT_RECORDED_STATUS_NOT_READY;
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtSynchronizeEventWithTimeout(aclrtEvent event, int32_t timeout)
{
    REQUIRE_INIT();
    struct event *e = NULL;
    int rc = check_event(event, &e);
    if (rc) return rc;
    if (timeout < -1) return fail(ACL_ERROR_INVALID_PARAM, "timeout must be -1 or >= 0 ms");
    struct emu_event_state *st = &g_seg->events[e->idx];
    int r = wait_word(&st->completed_gen, &st->waiters, atomic_load(&e->gen), timeout);
    if (r == 1) return fail(ACL_ERROR_RT_EVENT_SYNC_TIMEOUT, "event synchronize timed out");
    if (r < 0) return fail(ACL_ERROR_RT_SOCKET_CLOSE, "the device server went away");
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtSynchronizeEvent(aclrtEvent event)
{
    return aclrtSynchronizeEventWithTimeout(event, -1);
}

ACL_FUNC_VISIBILITY aclError aclrtStreamWaitEvent(aclrtStream stream, aclrtEvent event)
{
    REQUIRE_INIT();
    struct event *e = NULL;
    int dev = -1, rc = check_event(event, &e);
    uint32_t idx = 0;
    if (rc || (rc = resolve_stream(stream, &dev, &idx))) return rc;
    uint32_t g = atomic_load(&e->gen);
    if (g == 0) return ACL_SUCCESS; /* never recorded: nothing to wait for */
    struct emu_op op = {.kind = EMU_OP_EVENT_WAIT, .event = e->idx, .event_gen = g};
    return submit(dev, idx, &op, NULL);
}

ACL_FUNC_VISIBILITY aclError aclrtEventElapsedTime(float *ms, aclrtEvent startEvent, aclrtEvent endEvent)
{
    REQUIRE_INIT();
    struct event *a = NULL, *b = NULL;
    int rc = check_event(startEvent, &a);
    if (rc || (rc = check_event(endEvent, &b))) return rc;
    if (!ms) return fail(ACL_ERROR_INVALID_PARAM, "ms is NULL");
    if (atomic_load(&a->gen) == 0 || atomic_load(&b->gen) == 0)
        return fail(ACL_ERROR_RT_INTERNAL_ERROR, "an event was never recorded");
    if (!event_done(a) || !event_done(b))
        return fail(ACL_ERROR_RT_EVENT_TIMESTAMP_INVALID, "an event has not completed yet");
    int64_t ta = atomic_load(&g_seg->events[a->idx].t_ns), tb = atomic_load(&g_seg->events[b->idx].t_ns);
    *ms = (float)((double)(tb - ta) / 1e6);
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtDestroyEvent(aclrtEvent event)
{
    REQUIRE_INIT();
    struct event *e = NULL;
    int rc = check_event(event, &e);
    if (rc) return rc;
    /* The slot is reused: let its last record complete first. */
    struct emu_event_state *st = &g_seg->events[e->idx];
    wait_word(&st->completed_gen, &st->waiters, atomic_load(&e->gen), -1);
    pthread_mutex_lock(&g_lock);
    g_event_used[e->idx] = 0;
    pthread_mutex_unlock(&g_lock);
    e->magic = 0;
    free(e);
    return ACL_SUCCESS;
}

/* ---------------------------------------------------------------- kernels */

/* Kernel library text: a "flexnpu-kernels 1" line, then "kernel <name> <builtin> [cube|vector|mix]"
 * lines (the last word, optional, names the cores the kernel runs on); '#' starts a comment.
 * See docs/emulator.md. */
static aclError parse_library(const char *text, size_t len, aclrtBinHandle *binHandle)
{
    char *buf = malloc(len + 1);
    if (!buf) return fail(ACL_ERROR_BAD_ALLOC, "out of host memory");
    memcpy(buf, text, len);
    buf[len] = 0;
    int cap = 16, n = 0, header = 0, lineno = 0;
    struct binary *bin = malloc(sizeof *bin + cap * sizeof(struct func));
    aclError rc = ACL_SUCCESS;
    char *save = NULL;
    for (char *line = strtok_r(buf, "\n", &save); line && !rc; line = strtok_r(NULL, "\n", &save)) {
        lineno++;
        char *hash = strchr(line, '#');
        if (hash) *hash = 0;
        char w0[32], w1[EMU_NAME_LEN + 1], w2[32], w3[32], extra[2];
        int k = sscanf(line, "%31s %48s %31s %31s %1s", w0, w1, w2, w3, extra);
        if (k <= 0) continue;
        if (!header) {
            if (k == 2 && strcmp(w0, "flexnpu-kernels") == 0 && strcmp(w1, "1") == 0) header = 1;
            else rc = fail(ACL_ERROR_PARSE_FILE, "not a FlexNPU kernel library (line %d)", lineno);
            continue;
        }
        int b = k == 3 || k == 4 ? emu_builtin_by_name(w2) : -1;
        int cls = k == 4 ? emu_core_class_by_name(w3) : b >= 0 ? emu_builtin_core_class(b) : -1;
        if ((k != 3 && k != 4) || strcmp(w0, "kernel") != 0 || strlen(w1) >= EMU_NAME_LEN || b < 0 || cls < 0) {
            rc = fail(ACL_ERROR_PARSE_FILE,
                      "kernel library line %d: expected 'kernel <name> <builtin> [cube|vector|mix]'", lineno);
            break;
        }
        if (n == cap) {
            cap *= 2;
            struct binary *nb = realloc(bin, sizeof *bin + cap * sizeof(struct func));
            if (!nb) {
                rc = fail(ACL_ERROR_BAD_ALLOC, "out of host memory");
                break;
            }
            bin = nb;
        }
        struct func *f = &bin->funcs[n++];
        f->magic = FUNC_MAGIC;
        f->builtin = b;
        f->core_class = cls;
        atomic_store(&f->name_id, -1);
        snprintf(f->name, sizeof f->name, "%s", w1);
    }
    if (!rc && !header) rc = fail(ACL_ERROR_PARSE_FILE, "empty kernel library");
    free(buf);
    if (rc) {
        free(bin);
        return rc;
    }
    bin->magic = BIN_MAGIC;
    bin->nfuncs = n;
    *binHandle = bin;
    return ACL_SUCCESS;
}

static aclError check_options(const aclrtBinaryLoadOptions *o)
{
    if (!o) return ACL_SUCCESS;
    if (o->numOpt && !o->options) return fail(ACL_ERROR_INVALID_PARAM, "options is NULL with numOpt > 0");
    for (size_t i = 0; i < o->numOpt; i++)
        if (o->options[i].type < ACL_RT_BINARY_LOAD_OPT_LAZY_LOAD ||
            o->options[i].type > ACL_RT_BINARY_LOAD_OPT_CPU_KERNEL_MODE)
            return fail(ACL_ERROR_INVALID_PARAM, "unknown binary load option %d", o->options[i].type);
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtBinaryLoadFromFile(const char *binPath, aclrtBinaryLoadOptions *options,
                                                     aclrtBinHandle *binHandle)
{
    REQUIRE_INIT();
    if (!binPath || !binHandle) return fail(ACL_ERROR_INVALID_PARAM, "binPath or binHandle is NULL");
    int rc = check_options(options);
    if (rc) return rc;
    FILE *f = fopen(binPath, "rb");
    if (!f) return fail(ACL_ERROR_INVALID_FILE, "cannot open kernel library %s: %s", binPath, strerror(errno));
    char *text = NULL;
    size_t len = 0, cap = 0, r;
    char chunk[4096];
    while ((r = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (len + r > (1u << 20)) {
            free(text);
            fclose(f);
            return fail(ACL_ERROR_INVALID_FILE_SIZE, "kernel library %s is larger than 1 MiB", binPath);
        }
        if (len + r > cap) {
            cap = (len + r) * 2;
            char *nt = realloc(text, cap);
            if (!nt) {
                free(text);
                fclose(f);
                return fail(ACL_ERROR_BAD_ALLOC, "out of host memory");
            }
            text = nt;
        }
        memcpy(text + len, chunk, r);
        len += r;
    }
    fclose(f);
    rc = parse_library(text ? text : "", len, binHandle);
    free(text);
    return rc;
}

ACL_FUNC_VISIBILITY aclError aclrtBinaryLoadFromData(const void *data, size_t length,
                                                     const aclrtBinaryLoadOptions *options,
                                                     aclrtBinHandle *binHandle)
{
    REQUIRE_INIT();
    if (!data || !length || !binHandle) return fail(ACL_ERROR_INVALID_PARAM, "data, length or binHandle is empty");
    int rc = check_options(options);
    return rc ? rc : parse_library(data, length, binHandle);
}

ACL_FUNC_VISIBILITY aclError aclrtBinaryUnLoad(aclrtBinHandle binHandle)
{
    REQUIRE_INIT();
    struct binary *b = binHandle;
    if (!b || b->magic != BIN_MAGIC) return fail(ACL_ERROR_INVALID_PARAM, "not a binary handle");
    b->magic = 0;
    for (int i = 0; i < b->nfuncs; i++) b->funcs[i].magic = 0;
    free(b);
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtBinaryGetFunction(const aclrtBinHandle binHandle, const char *kernelName,
                                                    aclrtFuncHandle *funcHandle)
{
    REQUIRE_INIT();
    struct binary *b = binHandle;
    if (!b || b->magic != BIN_MAGIC) return fail(ACL_ERROR_INVALID_PARAM, "not a binary handle");
    if (!kernelName || !funcHandle) return fail(ACL_ERROR_INVALID_PARAM, "kernelName or funcHandle is NULL");
    for (int i = 0; i < b->nfuncs; i++)
        if (strcmp(b->funcs[i].name, kernelName) == 0) {
            *funcHandle = &b->funcs[i];
            return ACL_SUCCESS;
        }
    return fail(ACL_ERROR_KERNEL_NOT_FOUND, "no kernel named %s in this library", kernelName);
}

static int kernel_name_id(struct func *f)
{
    int id = atomic_load(&f->name_id);
    if (id >= 0) return id;
    struct emu_req req = {.type = EMU_REQ_NAME};
    snprintf(req.name, sizeof req.name, "%s", f->name);
    struct emu_rep rep;
    pthread_mutex_lock(&g_lock);
    int rc = rpc(&req, &rep, NULL, NULL);
    pthread_mutex_unlock(&g_lock);
    if (rc) return -rc;
    if (rep.err) return -rep.err;
    atomic_store(&f->name_id, (int)rep.a);
    return (int)rep.a;
}

ACL_FUNC_VISIBILITY aclError aclrtLaunchKernel(aclrtFuncHandle funcHandle, uint32_t blockDim, const void *argsData,
                                               size_t argsSize, aclrtStream stream)
{
    REQUIRE_INIT();
    struct func *f = funcHandle;
    if (!f || f->magic != FUNC_MAGIC) return fail(ACL_ERROR_INVALID_PARAM, "not a function handle");
    if (blockDim == 0) return fail(ACL_ERROR_INVALID_PARAM, "blockDim is 0");
    int dev = -1;
    uint32_t idx = 0;
    int rc = resolve_stream(stream, &dev, &idx);
    if (rc) return rc;
    struct emu_cost cost;
    struct emu_range ranges[4];
    int nranges;
    rc = emu_kernel_prepare(f->builtin, argsData, argsSize, &cost, ranges, &nranges);
    if (rc) return fail(rc, "bad arguments for kernel %s (%s)", f->name, emu_builtin_name(f->builtin));
    for (int i = 0; i < nranges; i++)
        if (classify((const void *)(uintptr_t)ranges[i].ptr, ranges[i].bytes) != dev)
            return fail(ACL_ERROR_INVALID_PARAM, "kernel %s: argument %d is not inside a device allocation",
                        f->name, i);
    int id = kernel_name_id(f);
    if (id < 0) return -id;
    if (nranges) emu_kernel_run(f->builtin, argsData);
    emu_kernel_derate(&g_dev[dev].seg->params, f->builtin, &cost);
    struct emu_op op = {.kind = EMU_OP_KERNEL, .name_id = (uint16_t)id, .flops = cost.flops,
                        .hbm_bytes = cost.hbm_bytes, .block_dim = blockDim, .core_class = (uint32_t)f->core_class};
    return submit(dev, idx, &op, NULL);
}

/* ---------------------------------------------------------------- IPC memory
 *
 * docs/emulator.md, "IPC memory". The server moves an exported allocation's pages into a memfd
 * of their own; the exporter maps it over the allocation's addresses, an importer at an
 * address of its own, so a write by either is seen by the other and nothing is copied. */

#define IPC_KEY_CHARS (EMU_IPC_KEY_LEN - 1)

static _Atomic uint64_t g_import_seq; /* import order: a close closes the oldest import of its key */

/* One IPC request and its reply (an fd with it, if fd). Caller holds g_lock. */
static int rpc_ipc(struct emu_ipc_req *req, struct emu_ipc_rep *rep, int *fd)
{
    int fds[EMU_FDS_MAX], nfds = 0;
    if (fd) *fd = -1;
    if (g_sock < 0) return ACL_ERROR_RT_SOCKET_CLOSE;
    if (emu_send_fds(g_sock, req, sizeof *req, NULL, 0) == 0 &&
        emu_recv_fds(g_sock, rep, sizeof *rep, fds, &nfds) == (ssize_t)sizeof *rep) {
        for (int i = 0; i < nfds; i++) {
            if (fd && i == 0) *fd = fds[0];
            else close(fds[i]);
        }
        return 0;
    }
    for (int i = 0; i < nfds; i++) close(fds[i]);
    mark_lost("lost the connection to the device server; device calls now fail with "
              "ACL_ERROR_RT_SOCKET_CLOSE (507901)");
    return ACL_ERROR_RT_SOCKET_CLOSE;
}

static int ipc_call(struct emu_ipc_req *req, struct emu_ipc_rep *rep, int *fd)
{
    pthread_mutex_lock(&g_lock);
    int rc = rpc_ipc(req, rep, fd);
    pthread_mutex_unlock(&g_lock);
    if (!rc) rc = rep->err;
    if (rc && fd && *fd >= 0) {
        close(*fd);
        *fd = -1;
    }
    return rc;
}

/* A key as the caller gave it: 64 characters, or -1. */
static int copy_key(char *out, const char *key)
{
    size_t n = strnlen(key, EMU_IPC_KEY_LEN);
    if (n != IPC_KEY_CHARS) return -1;
    memset(out, 0, EMU_IPC_KEY_LEN);
    memcpy(out, key, n);
    return 0;
}

ACL_FUNC_VISIBILITY aclError aclrtIpcMemGetExportKey(void *devPtr, size_t size, char *key, size_t len, uint64_t flags)
{
    REQUIRE_INIT();
    if (!devPtr || !key) return fail(ACL_ERROR_INVALID_PARAM, "devPtr or key is NULL");
    if (size == 0) return fail(ACL_ERROR_RT_PARAM_INVALID, "size is 0");
    if (len < EMU_IPC_KEY_LEN) return fail(ACL_ERROR_RT_PARAM_INVALID, "key length %zu: a key takes 65 bytes", len);
    if (flags & ~(uint64_t)ACL_RT_IPC_MEM_EXPORT_FLAG_DISABLE_PID_VALIDATION)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "unknown export flags %#llx", (unsigned long long)flags);
    int cur = -1, rc = current_device(&cur);
    if (rc) return rc;
    uintptr_t a = (uintptr_t)devPtr;
    int dev = -1;
    for (int i = 0; i < EMU_MAX_DEVICES && dev < 0; i++) {
        struct device *d = &g_dev[i];
        if (!d->open || a < (uintptr_t)d->mem || a >= (uintptr_t)d->mem + d->cap) continue;
        pthread_mutex_lock(&d->alloc_lock);
        for (size_t k = 0; k < d->nallocs; k++)
            if (d->allocs[k].base == a) dev = i;
        pthread_mutex_unlock(&d->alloc_lock);
    }
    if (dev < 0) return fail(ACL_ERROR_RT_PARAM_INVALID, "%p is not the start of an allocation of this process", devPtr);
    struct device *d = &g_dev[dev];
    struct emu_ipc_req req = {.type = EMU_REQ_IPC_EXPORT, .device = dev, .a = a - (uintptr_t)d->mem, .b = size,
                              .flags = flags};
    struct emu_ipc_rep rep;
    int fd;
    rc = ipc_call(&req, &rep, &fd);
    if (rc == ACL_ERROR_RT_PARAM_INVALID)
        return fail(rc, "cannot export [%p, +%zu): more than the allocation, or exported already (close its key first)",
                    devPtr, size);
    if (rc == ACL_ERROR_RT_OVER_LIMIT) return fail(rc, "too many IPC exports (per process, per user or in all)");
    if (rc) return fail(rc, "the device server could not export the memory (%d)", rc);
    if (fd < 0 || mmap(devPtr, rep.a, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == MAP_FAILED) {
        if (fd >= 0) close(fd);
        struct emu_ipc_req cl = {.type = EMU_REQ_IPC_CLOSE};
        memcpy(cl.key, rep.key, EMU_IPC_KEY_LEN);
        ipc_call(&cl, &rep, NULL);
        return fail(ACL_ERROR_RT_RESOURCE_ALLOC_FAIL, "cannot map the exported memory at %p", devPtr);
    }
    close(fd);
    pthread_mutex_lock(&d->alloc_lock);
    for (size_t k = 0; k < d->nallocs; k++)
        if (d->allocs[k].base == a) d->allocs[k].exported = rep.a;
    pthread_mutex_unlock(&d->alloc_lock);
    memcpy(key, rep.key, EMU_IPC_KEY_LEN);
    struct emu_ipc_req mapped = {.type = EMU_REQ_IPC_MAPPED}; /* its own copy of the pages can go */
    memcpy(mapped.key, rep.key, EMU_IPC_KEY_LEN);
    ipc_call(&mapped, &rep, NULL);
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtIpcMemSetImportPid(const char *key, int32_t *pid, size_t num)
{
    REQUIRE_INIT();
    if (!key || !pid) return fail(ACL_ERROR_INVALID_PARAM, "key or pid is NULL");
    if (num == 0 || num > INT32_MAX) return fail(ACL_ERROR_RT_PARAM_INVALID, "num must be 1..%d", INT32_MAX);
    int cur = -1, rc = current_device(&cur);
    if (rc) return rc;
    struct emu_ipc_req req = {.type = EMU_REQ_IPC_SET_PIDS};
    if (copy_key(req.key, key) < 0) return fail(ACL_ERROR_RT_PARAM_INVALID, "not an IPC memory key of this process");
    for (size_t done = 0; done < num && !rc;) {
        uint32_t n = num - done < EMU_IPC_PIDS_PER_REQ ? (uint32_t)(num - done) : EMU_IPC_PIDS_PER_REQ;
        req.npids = n;
        memcpy(req.pids, pid + done, n * sizeof *pid);
        struct emu_ipc_rep rep;
        rc = ipc_call(&req, &rep, NULL);
        done += n;
    }
    if (rc == ACL_ERROR_RT_PARAM_INVALID) return fail(rc, "not an IPC memory key of this process, or a pid <= 0");
    if (rc == ACL_ERROR_RT_NO_PERMISSION)
        return fail(rc, "only the exporter sets who may import a key, and not one exported without pid validation");
    if (rc == ACL_ERROR_RT_OVER_LIMIT) return fail(rc, "a key names at most 1024 processes");
    return rc ? fail(rc, "aclrtIpcMemSetImportPid failed (%d)", rc) : ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtIpcMemImportByKey(void **devPtr, const char *key, uint64_t flags)
{
    REQUIRE_INIT();
    if (!devPtr || !key) return fail(ACL_ERROR_INVALID_PARAM, "devPtr or key is NULL");
    if (flags & ~(uint64_t)ACL_RT_IPC_MEM_IMPORT_FLAG_ENABLE_PEER_ACCESS)
        return fail(ACL_ERROR_RT_PARAM_INVALID, "unknown import flags %#llx", (unsigned long long)flags);
    int dev = -1, rc = current_device(&dev);
    if (rc) return rc;
    struct emu_ipc_req req = {.type = EMU_REQ_IPC_IMPORT, .device = dev, .flags = flags};
    struct emu_ipc_rep rep;
    int fd = -1;
    rc = copy_key(req.key, key) < 0 ? ACL_ERROR_RT_DRV_INTERNAL_ERROR : ipc_call(&req, &rep, &fd);
    if (rc == ACL_ERROR_RT_DRV_INTERNAL_ERROR)
        return fail(rc, "no IPC memory this process may import under that key");
    if (rc == ACL_ERROR_RT_FEATURE_NOT_SUPPORT)
        return fail(rc, "the memory is on another device: import it with ACL_RT_IPC_MEM_IMPORT_FLAG_ENABLE_PEER_ACCESS");
    if (rc == ACL_ERROR_RT_OVER_LIMIT) return fail(rc, "too many IPC imports (per process or in all)");
    if (rc) return fail(rc, "aclrtIpcMemImportByKey failed (%d)", rc);
    void *m = fd < 0 ? MAP_FAILED : mmap(NULL, rep.a, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (fd >= 0) close(fd);
    struct device *d = &g_dev[dev];
    struct import im = {.base = (uintptr_t)m, .size = rep.b, .map_bytes = rep.a, .home = (int)rep.dev,
                        .seq = atomic_fetch_add(&g_import_seq, 1)};
    memcpy(im.key, req.key, EMU_IPC_KEY_LEN);
    pthread_mutex_lock(&d->alloc_lock);
    if (m != MAP_FAILED && d->nimports == d->cap_imports) {
        size_t nc = d->cap_imports ? 2 * d->cap_imports : 8;
        struct import *ni = realloc(d->imports, nc * sizeof *ni);
        if (ni) d->imports = ni, d->cap_imports = nc;
    }
    bool kept = m != MAP_FAILED && d->nimports < d->cap_imports;
    if (kept) d->imports[d->nimports++] = im;
    pthread_mutex_unlock(&d->alloc_lock);
    if (!kept) {
        if (m != MAP_FAILED) munmap(m, rep.a);
        struct emu_ipc_req cl = {.type = EMU_REQ_IPC_CLOSE}; /* the server's import goes too */
        memcpy(cl.key, req.key, EMU_IPC_KEY_LEN);
        ipc_call(&cl, &rep, NULL);
        return fail(ACL_ERROR_RT_MEMORY_ALLOCATION, "cannot map the imported memory");
    }
    *devPtr = m;
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtIpcMemClose(const char *key)
{
    REQUIRE_INIT();
    if (!key) return fail(ACL_ERROR_INVALID_PARAM, "key is NULL");
    int cur = -1, rc = current_device(&cur);
    if (rc) return rc;
    struct emu_ipc_req req = {.type = EMU_REQ_IPC_CLOSE};
    struct emu_ipc_rep rep;
    rc = copy_key(req.key, key) < 0 ? ACL_ERROR_RT_PARAM_INVALID : ipc_call(&req, &rep, NULL);
    if (rc == ACL_ERROR_RT_PARAM_INVALID)
        return fail(rc, "this process neither exported nor imported (and not yet closed) that key");
    if (rc) return fail(rc, "aclrtIpcMemClose failed (%d)", rc);
    if (rep.a != 1) return ACL_SUCCESS; /* the exporter's key: its allocation stays until aclrtFree */
    struct device *od = NULL; /* an import: the oldest of this key goes, as it did at the server */
    size_t ok = 0;
    for (int i = 0; i < EMU_MAX_DEVICES; i++) {
        struct device *d = &g_dev[i];
        if (!d->open) continue;
        pthread_mutex_lock(&d->alloc_lock);
        for (size_t k = 0; k < d->nimports; k++)
            if (!strcmp(d->imports[k].key, req.key) && (!od || d->imports[k].seq < od->imports[ok].seq)) {
                od = d;
                ok = k;
            }
        pthread_mutex_unlock(&d->alloc_lock);
    }
    if (od) {
        pthread_mutex_lock(&od->alloc_lock);
        struct import im = od->imports[ok];
        memmove(&od->imports[ok], &od->imports[ok + 1], (od->nimports - ok - 1) * sizeof *od->imports);
        od->nimports--;
        pthread_mutex_unlock(&od->alloc_lock);
        munmap((void *)im.base, im.map_bytes);
    }
    return ACL_SUCCESS;
}

ACL_FUNC_VISIBILITY aclError aclrtDeviceGetBareTgid(int32_t *pid)
{
    REQUIRE_INIT();
    if (!pid) return fail(ACL_ERROR_INVALID_PARAM, "pid is NULL");
    struct emu_req req = {.type = EMU_REQ_PID};
    struct emu_rep rep;
    pthread_mutex_lock(&g_lock);
    int rc = connect_locked(); /* the pid the device sees: the node's, whatever namespace we are in */
    if (!rc) rc = rpc(&req, &rep, NULL, NULL);
    pthread_mutex_unlock(&g_lock);
    if (!rc) rc = rep.err;
    if (rc) return rc;
    *pid = (int32_t)rep.a;
    return ACL_SUCCESS;
}

/* ---------------------------------------------------------------- emulator extensions */

/* Calls for the emulator's own libopapi.so (its aclnn operators), not AscendCL API:
 * declared in emu_ext.h. */

/* ACL_SUCCESS if `stream` is usable and [ptr, ptr + size) lies inside one allocation of
 * this process on the stream's device (size 0: only the stream is checked). */
ACL_FUNC_VISIBILITY aclError flexnpuEmuCheckRange(aclrtStream stream, const void *ptr, size_t size)
{
    REQUIRE_INIT();
    int dev = -1;
    uint32_t idx = 0;
    int rc = resolve_stream(stream, &dev, &idx);
    if (rc) return rc;
    if (size && classify(ptr, size) != dev)
        return fail(ACL_ERROR_INVALID_PARAM, "device range %p + %zu bytes is not inside one allocation on device %d",
                    ptr, size, dev);
    return ACL_SUCCESS;
}

/* The achieved fraction of peak (compute, HBM) the stream's device gives the named built-in,
 * 1.0 where it has none: what aclrtLaunchKernel divides a kernel's work by. */
ACL_FUNC_VISIBILITY aclError flexnpuEmuKernelEfficiency(aclrtStream stream, const char *builtin,
                                                        double *computeEff, double *hbmEff)
{
    REQUIRE_INIT();
    int dev = -1;
    uint32_t idx = 0;
    int rc = resolve_stream(stream, &dev, &idx);
    if (rc) return rc;
    int b = builtin ? emu_builtin_by_name(builtin) : -1;
    if (b < 0 || !computeEff || !hbmEff) return fail(ACL_ERROR_INVALID_PARAM, "unknown built-in kernel or NULL output");
    struct emu_cost unit = {.flops = 1.0, .hbm_bytes = 1.0};
    emu_kernel_derate(&g_dev[dev].seg->params, b, &unit);
    *computeEff = 1.0 / unit.flops;
    *hbmEff = 1.0 / unit.hbm_bytes;
    return ACL_SUCCESS;
}

/* Sets the calling thread's aclGetRecentErrMsg() text. */
ACL_FUNC_VISIBILITY void flexnpuEmuSetErrMsg(const char *msg)
{
    snprintf(t_errmsg, sizeof t_errmsg, "%s", msg ? msg : "");
}
