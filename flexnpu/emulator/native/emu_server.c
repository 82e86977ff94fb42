/* flexnpu-emu-server: the device server of the FlexNPU emulated Ascend device.
 *
 * One process per node owns the emulated devices, as the driver does for real ones. It
 * serves the client library on a unix socket (registration, memory, kernel names, status),
 * runs one model thread per device (emu_sim.c), and frees what a client held when its
 * connection closes, whether it finalised or was killed.
 *
 * Usage: flexnpu-emu-server --socket PATH --devices N --peak-flops F --hbm-bw B
 *        --link-bw B --launch-ns T --capacity BYTES --time-scale X --mode contexts[,serial,shared...]
 *        [--cube-cores N] [--vector-cores N] [--context-switch-us T]  (contexts mode: emu_sim.c)
 *        [--partition prefill=S,decode=S]  (vNPU-like fixed shares per role: emu_sim.c)
 *        --soc NAME [--p2p-bw B] [--efficiency NAME=C/H,...] [--client-group NAME]
 * Root, the server's own user and members of --client-group (default "flexnpu", if the node
 * has it) may use the devices; emu.sock is 0660 in that group, and every connection is
 * checked again by its peer credentials.
 * It prints "ready" on stdout once it accepts connections (and sends READY=1 to
 * $NOTIFY_SOCKET under a systemd Type=notify unit), and exits on SIGTERM/SIGINT/SIGHUP.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <grp.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdarg.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "emu_kernels.h"
#include "emu_sim.h"
#include "emu_util.h"
#include "acl/acl_base.h"

struct server g_srv;

/* Who may use the devices besides root and the server's own user: members of this group
 * (--client-group, default EMU_CLIENT_GROUP), when the node has it. */
static const char *g_group_name = EMU_CLIENT_GROUP;
static gid_t g_group_gid;
static bool g_have_group;

static const char *const mode_names[] = {"serial", "shared", "contexts"}; /* enum emu_mode */

static const char *const copy_names[8] = {
    "memcpy_h2h", "memcpy_h2d", "memcpy_d2h", "memcpy_d2d",
    "memcpy_default", "memcpy_h2buf2d", "memcpy_inner_d2d", "memcpy_inter_d2d",
};

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "flexnpu-emu-server: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static void lock_all(void)
{
    for (int i = 0; i < g_srv.ndev; i++) pthread_mutex_lock(&g_srv.dev[i].lock);
}

static void unlock_all(void)
{
    for (int i = g_srv.ndev - 1; i >= 0; i--) pthread_mutex_unlock(&g_srv.dev[i].lock);
}

/* ---------------------------------------------------------------- device threads */

static int futex_wait_abs(_Atomic uint32_t *addr, uint32_t expected, int64_t abs_ns)
{
    struct timespec ts = {.tv_sec = abs_ns / 1000000000LL, .tv_nsec = abs_ns % 1000000000LL};
    return (int)syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_BITSET, expected, &ts, NULL,
                        FUTEX_BITSET_MATCH_ANY);
}

static void *device_thread(void *arg)
{
    struct device *d = arg;
    prctl(PR_SET_TIMERSLACK, 1UL); /* wake on time: the model's completions are published late by this */
    for (;;) {
        uint32_t bell = atomic_load(&d->bell->doorbell);
        pthread_mutex_lock(&d->lock);
        if (atomic_load(&g_srv.stopping)) {
            pthread_mutex_unlock(&d->lock);
            break;
        }
        sim_ingest(d);
        sim_advance(d, sim_now());
        double next = sim_next_deadline(d);
        int64_t deadline = isinf(next) ? INT64_MAX : sim_abs(next);
        atomic_store_explicit(&d->seg->deadline_ns, deadline, memory_order_seq_cst);
        bool pending = sim_rings_pending(d);
        pthread_mutex_unlock(&d->lock);
        if (pending) continue;
        if (deadline == INT64_MAX) emu_futex_wait(&d->bell->doorbell, bell, -1);
        else if (deadline > (int64_t)emu_now_ns()) futex_wait_abs(&d->bell->doorbell, bell, deadline);
    }
    return NULL;
}

/* ---------------------------------------------------------------- allocator
 *
 * Offsets are allocated device-wide (first fit over every process's blocks), so capacity is
 * accounted for the device as a whole and an offset names one allocation of one device. The
 * bytes of a block live in its owner's own memory file at that offset: no other process has
 * that file. The count clients see (seg->mem_used) is published from d->mem_used and never
 * read back, so a client cannot change what the allocator believes. */

static int dev_alloc(struct device *d, struct client *c, uint64_t size, uint64_t *off)
{
    uint64_t need = (size + EMU_MEM_ALIGN - 1) & ~(uint64_t)(EMU_MEM_ALIGN - 1);
    if (need < size || need > d->p.capacity - d->mem_used) return ACL_ERROR_RT_MEMORY_ALLOCATION;
    uint64_t at = 0;
    size_t i;
    for (i = 0; i < d->nblocks; i++) { /* first fit */
        if (d->blocks[i].off - at >= need) break;
        at = d->blocks[i].off + d->blocks[i].size;
    }
    if (i == d->nblocks && d->p.capacity - at < need) return ACL_ERROR_RT_MEMORY_ALLOCATION;
    if (d->nblocks == d->cap_blocks) {
        size_t nc = d->cap_blocks ? 2 * d->cap_blocks : 256;
        struct block *nb = realloc(d->blocks, nc * sizeof *nb);
        if (!nb) return ACL_ERROR_RT_MEMORY_ALLOCATION;
        d->blocks = nb;
        d->cap_blocks = nc;
    }
    memmove(&d->blocks[i + 1], &d->blocks[i], (d->nblocks - i) * sizeof *d->blocks);
    d->blocks[i] = (struct block){.off = at, .size = need, .owner = c};
    d->nblocks++;
    d->mem_used += need;
    atomic_store(&d->seg->mem_used, d->mem_used);
    c->dev[d->index].mem_used += need;
    c->dev[d->index].allocs++;
    *off = at;
    return 0;
}

/* Takes block i out of the allocator: its offsets and capacity are free again. */
static void remove_block(struct device *d, size_t i)
{
    uint64_t size = d->blocks[i].size;
    memmove(&d->blocks[i], &d->blocks[i + 1], (d->nblocks - i - 1) * sizeof *d->blocks);
    d->nblocks--;
    d->mem_used -= size;
    atomic_store(&d->seg->mem_used, d->mem_used);
}

static bool ipc_block_freed(struct device *d, size_t i);

/* Its owner frees block i (aclrtFree, or the owner is gone). */
static void release_block(struct device *d, size_t i)
{
    struct block b = d->blocks[i];
    /* give the pages back (device memory is a sparse file), and a later owner of these
     * offsets reads zeros, not these bytes */
    int fd = b.owner->dev[d->index].mem_fd;
    if (fd >= 0) fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)b.off, (off_t)b.size);
    b.owner->dev[d->index].mem_used -= b.size;
    b.owner->dev[d->index].frees++;
    if (b.exp && ipc_block_freed(d, i)) return; /* importers still map it: reserved until they close */
    remove_block(d, i);
}

/* The allocation of client c that starts at off, or NULL. */
static struct block *block_at(struct device *d, const struct client *c, uint64_t off)
{
    for (size_t i = 0; i < d->nblocks; i++)
        if (d->blocks[i].off == off && d->blocks[i].owner == c) return &d->blocks[i];
    return NULL;
}

static int dev_free(struct device *d, struct client *c, uint64_t off, uint64_t *size)
{
    struct block *b = block_at(d, c, off);
    if (b) {
        *size = b->size;
        release_block(d, (size_t)(b - d->blocks));
        return 0;
    }
    return ACL_ERROR_INVALID_PARAM;
}

/* ---------------------------------------------------------------- clients
 *
 * A connection is PENDING until it registers (HELLO), ALIVE until it closes, then EXITED
 * (kept for the status). A connection is closed by client_close() wherever that is decided,
 * but its record is only freed, or turned EXITED, by reap(), which runs where the poll loop
 * holds no pointer to it. Connections that have not registered cost the server a descriptor
 * each and nothing proves they ever will: they are bounded per user and in all, and closed
 * when they stay silent for EMU_PENDING_IDLE_NS. */

#define EMU_PENDING_PER_UID 16
/* Registered processes one user (not root, not the server's own) may hold at once: the
 * client table (EMU_MAX_CLIENTS) is the node's, and one user filling it would refuse every
 * other user's programs. A quarter of it is more than a node's serving processes need. */
#define EMU_ALIVE_PER_UID (EMU_MAX_CLIENTS / 4)
#define EMU_PENDING_MAX 64
#define EMU_PENDING_IDLE_NS 5000000000ULL
#define EMU_EXITED_KEPT 64
#define EMU_ACCEPT_BURST 64

static int g_reserve_fd = -1;     /* spent to accept-and-close when out of descriptors */
static uint64_t g_accept_pause_until; /* even that failed: leave the listening socket alone until then */
static struct client *g_serving;  /* the client whose request is being handled */

static void out_free(struct client *c)
{
    for (struct outmsg *m = c->out, *nx; m; m = nx) {
        nx = m->next;
        for (int i = 0; i < m->nfds; i++) close(m->fds[i]);
        free(m);
    }
    c->out = c->out_tail = NULL;
    c->out_bytes = 0;
}

/* Closes the connection now; reap() deals with the record. */
static void client_close(struct client *c)
{
    if (c->drop) return;
    c->drop = true;
    out_free(c);
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
}

/* One line in the log the 1st, 2nd, 4th, 8th... time a thing happens (count: one per call
 * site, LOG_LIMITED), so a flood of it does not flood the log. */
static void log_limited(uint64_t *count, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void log_limited(uint64_t *count, const char *fmt, ...)
{
    uint64_t n = ++*count;
    if (n & (n - 1)) return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "flexnpu-emu-server: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, " (%llu times so far)\n", (unsigned long long)n);
    va_end(ap);
}
#define LOG_LIMITED(...)                                                                             \
    do {                                                                                             \
        static uint64_t count_;                                                                      \
        log_limited(&count_, __VA_ARGS__);                                                           \
    } while (0)

static bool is_pending(const struct client *c) { return c->state == CLIENT_PENDING && !c->drop && c->fd >= 0; }

/* A request is waiting that this turn of the poll loop will read (a program's hello, sent
 * right after connect, that a burst of connections got ahead of): not one to close. */
static bool about_to_be_served(const struct client *c)
{
    char b;
    return !c->out && recv(c->fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) > 0;
}

/* Closes the longest-silent unregistered connection of uid (any_uid: of the user with the
 * most of them), never `keep` nor one about to be served, saying why in the log. Returns
 * false if there was none: then the caller goes over the bound for now, as the waiting
 * requests will be read in this turn (and the table of connections is bounded anyway). */
enum evict_why { EVICT_USER, EVICT_ALL, EVICT_SLOTS, EVICT_FDS };

static bool evict_pending(uid_t uid, bool any_uid, const struct client *keep, enum evict_why why)
{
    static const char *const whys[] = {"too many of this user's", "too many in all", "no free connection slot",
                                       "out of descriptors"};
    static uint64_t counts[4];
    struct client *cand[EMU_MAX_CLIENTS];
    int n = 0;
    for (int i = 0; i < g_srv.nclients; i++) {
        struct client *c = g_srv.clients[i];
        if (is_pending(c) && c != keep && (any_uid || c->uid == uid) && !about_to_be_served(c)) cand[n++] = c;
    }
    if (any_uid) {
        int best = 0;
        for (int i = 0; i < n; i++) {
            int k = 0;
            for (int j = 0; j < n; j++) k += cand[j]->uid == cand[i]->uid;
            if (k > best) best = k, uid = cand[i]->uid;
        }
    }
    struct client *victim = NULL;
    for (int i = 0; i < n; i++)
        if (cand[i]->uid == uid && (!victim || cand[i]->last_ns < victim->last_ns)) victim = cand[i];
    if (!victim) return false;
    log_limited(&counts[why], "closed an unregistered connection of pid %d (uid %u): %s", (int)victim->pid,
                (unsigned)victim->uid, whys[why]);
    client_close(victim);
    return true;
}

/* After EMFILE/ENFILE: frees a descriptor by closing an unregistered connection. */
static bool make_fd_room(void) { return evict_pending(0, true, g_serving, EVICT_FDS); }

static void ipc_drop_client(struct client *c);

static void client_gone(struct client *c)
{
    lock_all();
    for (int i = 0; i < g_srv.ndev; i++) {
        struct device *d = &g_srv.dev[i];
        sim_drop_client(d, c);
        for (size_t b = d->nblocks; b-- > 0;)
            if (d->blocks[b].owner == c) release_block(d, b);
        if (c->dev[i].mem_fd >= 0) close(c->dev[i].mem_fd); /* the pages go with the last mapping */
        c->dev[i].mem_fd = -1;
    }
    ipc_drop_client(c); /* after its blocks: memory it exported and imported itself goes now */
    c->state = CLIENT_EXITED;
    c->exited_s = sim_now() / 1e9;
    if (c->seg) munmap(c->seg, sizeof *c->seg);
    c->seg = NULL;
    unlock_all();
}

static void client_free_at(int i)
{
    struct client *c = g_srv.clients[i];
    lock_all();
    g_srv.clients[i] = g_srv.clients[--g_srv.nclients];
    unlock_all();
    out_free(c);
    if (c->fd >= 0) close(c->fd);
    for (int k = 0; k < EMU_MAX_DEVICES; k++) {
        free(c->dev[k].busy_by_name);
        free(c->dev[k].count_by_name);
    }
    free(c);
}

/* Frees or retires the connections closed since the last call, and forgets the oldest
 * exited records past EMU_EXITED_KEPT (or when the table is full). Only exited records are
 * forgotten: a pending or live connection is never freed while it is open. */
static void reap(void)
{
    for (int i = 0; i < g_srv.nclients;) {
        struct client *c = g_srv.clients[i];
        if (!c->drop) {
            i++;
            continue;
        }
        c->drop = false;
        if (c->state == CLIENT_ALIVE) {
            client_gone(c);
            i++;
        } else
            client_free_at(i); /* a status query, a failed hello, or one that never spoke */
    }
    for (;;) {
        int exited = 0, oldest = -1;
        for (int i = 0; i < g_srv.nclients; i++)
            if (g_srv.clients[i]->state == CLIENT_EXITED) {
                exited++;
                if (oldest < 0 || g_srv.clients[i]->id < g_srv.clients[oldest]->id) oldest = i;
            }
        if (oldest < 0 || (exited <= EMU_EXITED_KEPT && g_srv.nclients < EMU_MAX_CLIENTS)) break;
        client_free_at(oldest);
    }
}

/* Closes unregistered connections silent for too long; returns ms until the next such
 * deadline, or -1. */
static int sweep_pending(uint64_t now)
{
    uint64_t next = UINT64_MAX;
    for (int i = 0; i < g_srv.nclients; i++) {
        struct client *c = g_srv.clients[i];
        if (!is_pending(c)) continue;
        uint64_t due = c->last_ns + EMU_PENDING_IDLE_NS;
        if (due <= now) {
            LOG_LIMITED("closed a connection of pid %d (uid %u) that did not register in time", (int)c->pid,
                        (unsigned)c->uid);
            client_close(c);
        } else if (due < next)
            next = due;
    }
    return next == UINT64_MAX ? -1 : (int)((next - now) / 1000000 + 1);
}

/* 1: sent, 0: the peer's socket has no room now, -1: the peer is gone. Never blocks. */
static int try_send(int fd, const void *buf, size_t len, const int *fds, int nfds)
{
    ssize_t w = emu_sendmsg_fds(fd, buf, len, fds, nfds, MSG_DONTWAIT);
    if (w == (ssize_t)len) return 1;
    return w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) ? 0 : -1;
}

static int dup_fd(int fd)
{
    int d = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (d < 0 && (errno == EMFILE || errno == ENFILE) && make_fd_room()) d = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    return d;
}

/* Sends one message to c, or queues it (with duplicates of its fds: the caller may close
 * its own) when the peer's socket is full. The server never waits on a peer: while a reply
 * is queued, the poll loop waits for room instead of reading c's next request, and a peer
 * that sends one all the same is closed (its client library never does: it reads each reply
 * before the next request), so at most one reply is ever queued per connection. */
static void send_msg(struct client *c, const void *buf, size_t len, const int *fds, int nfds)
{
    if (c->drop) return;
    if (!c->out) {
        int r = try_send(c->fd, buf, len, fds, nfds);
        if (r > 0) return;
        if (r < 0) {
            client_close(c);
            return;
        }
    }
    struct outmsg *m = malloc(sizeof *m + len);
    if (!m) {
        client_close(c);
        return;
    }
    m->next = NULL;
    m->len = len;
    m->nfds = 0;
    memcpy(m->data, buf, len);
    for (int i = 0; i < nfds; i++) {
        int d = dup_fd(fds[i]);
        if (d >= 0) m->fds[m->nfds++] = d;
    }
    if (c->out_tail) c->out_tail->next = m;
    else c->out = m;
    c->out_tail = m;
    c->out_bytes += len;
    if (m->nfds != nfds) client_close(c); /* a reply without its fds would be a lie */
}

/* Sends what is queued for c, as far as its socket takes it. */
static void flush_out(struct client *c)
{
    while (c->out && !c->drop) {
        struct outmsg *m = c->out;
        int r = try_send(c->fd, m->data, m->len, m->fds, m->nfds);
        if (r == 0) return;
        if (r < 0) {
            client_close(c);
            return;
        }
        c->out = m->next;
        if (!c->out) c->out_tail = NULL;
        c->out_bytes -= m->len;
        for (int i = 0; i < m->nfds; i++) close(m->fds[i]);
        free(m);
        c->last_ns = emu_now_ns();
    }
}

/* The supplementary groups of pid include gid (/proc/<pid>/status "Groups:"). */
static bool proc_in_group(pid_t pid, gid_t gid)
{
    char path[64], line[4096];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f) return false;
    bool found = false;
    while (!found && fgets(line, sizeof line, f)) {
        if (strncmp(line, "Groups:", 7) != 0) continue;
        char *p = line + 7, *end;
        for (;;) {
            unsigned long g = strtoul(p, &end, 10);
            if (end == p) break;
            if ((gid_t)g == gid) found = true;
            p = end;
        }
        break;
    }
    fclose(f);
    return found;
}

/* Root, the server's own user, and members of the client group may use the devices. The
 * identity is the kernel's: SO_PEERCRED (effective ids at connect), the groups from /proc
 * read while a pidfd of the peer proves the pid still names the process that connected. */
static bool may_use(int fd, const struct ucred *cr)
{
    if (cr->uid == 0 || cr->uid == geteuid()) return true;
    if (!g_have_group) return false;
    if (cr->gid == g_group_gid) return true;
    int pidfd = -1;
    socklen_t len = sizeof pidfd;
    if (getsockopt(fd, SOL_SOCKET, 77 /* SO_PEERPIDFD, Linux 6.5 */, &pidfd, &len) < 0) {
        pidfd = (int)syscall(SYS_pidfd_open, cr->pid, 0);
        struct pollfd hp = {.fd = fd, .events = POLLRDHUP};
        if (pidfd >= 0 && poll(&hp, 1, 0) > 0 && (hp.revents & (POLLHUP | POLLRDHUP))) {
            close(pidfd); /* gone already: its pid may name another process now */
            return false;
        }
    }
    if (pidfd < 0) return false;
    bool ok = proc_in_group(cr->pid, g_group_gid);
    struct pollfd pp = {.fd = pidfd, .events = POLLIN};
    if (poll(&pp, 1, 0) != 0) ok = false; /* exited while /proc was read: not its groups */
    close(pidfd);
    return ok;
}

/* A new connection, or NULL to refuse it. Called only where the poll loop holds no client
 * pointer (it may free closed records). */
static uint64_t proc_start_ticks(pid_t pid);

static struct client *client_new(int fd)
{
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0) return NULL;
    int mine = 0, all = 0;
    for (int i = 0; i < g_srv.nclients; i++)
        if (is_pending(g_srv.clients[i])) {
            all++;
            mine += g_srv.clients[i]->uid == cred.uid;
        }
    if (mine >= EMU_PENDING_PER_UID) evict_pending(cred.uid, false, NULL, EVICT_USER);
    else if (all >= EMU_PENDING_MAX) evict_pending(0, true, NULL, EVICT_ALL);
    reap();
    if (g_srv.nclients >= EMU_MAX_CLIENTS && evict_pending(0, true, NULL, EVICT_SLOTS)) reap();
    if (g_srv.nclients >= EMU_MAX_CLIENTS) {
        LOG_LIMITED("refused a connection of pid %d (uid %u): %d connections already", (int)cred.pid,
                    (unsigned)cred.uid, g_srv.nclients);
        return NULL;
    }
    struct client *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->fd = fd;
    c->id = ++g_srv.next_client_id;
    c->connected_s = sim_now() / 1e9;
    c->last_ns = emu_now_ns();
    c->state = CLIENT_PENDING;
    c->pid = cred.pid;
    c->uid = cred.uid;
    c->gid = cred.gid;
    c->admitted = may_use(fd, &cred);
    c->start_ticks = proc_start_ticks(cred.pid);
    struct pollfd hup = {.fd = fd, .events = POLLRDHUP};
    if (poll(&hup, 1, 0) > 0 && (hup.revents & (POLLHUP | POLLRDHUP))) c->start_ticks = 0; /* gone: pid may be reused */
    for (int s = 0; s < EMU_MAX_STREAMS; s++) c->queues[s].active_slot = -1;
    for (int i = 0; i < EMU_MAX_DEVICES; i++) c->dev[i].mem_fd = -1;
    lock_all();
    g_srv.clients[g_srv.nclients++] = c;
    unlock_all();
    return c;
}

/* Takes the waiting connections, at most a burst per turn of the poll loop. Out of
 * descriptors, it closes an unregistered connection to make room, or else accepts with the
 * reserve descriptor and closes at once: either way the listening socket is drained, so the
 * loop does not spin on it, and a program that connects is answered, never left hanging. */
static void accept_new(int ls)
{
    for (int k = 0; k < EMU_ACCEPT_BURST; k++) {
        int fd = accept4(ls, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0 && errno == EINTR) continue;
        if (fd < 0 && (errno == EMFILE || errno == ENFILE)) {
            if (make_fd_room()) {
                reap();
                continue;
            }
            if (g_reserve_fd >= 0) close(g_reserve_fd);
            fd = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
            if (fd >= 0) close(fd);
            g_reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
            LOG_LIMITED("out of descriptors: refused a connection");
            if (fd < 0) {
                g_accept_pause_until = emu_now_ns() + 100000000;
                return;
            }
            continue;
        }
        if (fd < 0) return; /* none left waiting */
        if (!client_new(fd)) close(fd);
    }
}

static int name_id(const char *name)
{
    pthread_mutex_lock(&g_srv.names_lock);
    int id = -1;
    for (int i = 0; i < g_srv.nnames; i++)
        if (strncmp(g_srv.names[i], name, EMU_NAME_LEN) == 0) id = i;
    if (id < 0 && g_srv.nnames < EMU_MAX_NAMES) {
        id = g_srv.nnames++;
        snprintf(g_srv.names[id], EMU_NAME_LEN, "%s", name);
    }
    pthread_mutex_unlock(&g_srv.names_lock);
    return id;
}

/* ---------------------------------------------------------------- status */

struct sbuf {
    char *p;
    size_t n, cap;
};

/* systemd's sd_notify, without libsystemd: one datagram to $NOTIFY_SOCKET ("@name" is an
 * abstract address); nothing when it is unset. Failures are ignored, as sd_notify's are. */
static void notify_systemd(const char *msg)
{
    const char *addr = getenv("NOTIFY_SOCKET");
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    size_t n = addr ? strlen(addr) : 0;
    if (n < 2 || n >= sizeof sa.sun_path || (addr[0] != '/' && addr[0] != '@')) return;
    memcpy(sa.sun_path, addr, n);
    if (addr[0] == '@') sa.sun_path[0] = '\0';
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return;
    (void)sendto(fd, msg, strlen(msg), MSG_NOSIGNAL, (struct sockaddr *)&sa,
                 (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n));
    close(fd);
}

static void sb(struct sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb(struct sbuf *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int w = vsnprintf(b->p + b->n, b->cap - b->n, fmt, ap);
        va_end(ap);
        if (w >= 0 && (size_t)w < b->cap - b->n) {
            b->n += (size_t)w;
            return;
        }
        b->cap = b->cap * 2 + (size_t)(w > 0 ? w : 0) + 1024;
        b->p = realloc(b->p, b->cap);
    }
}

static void ipc_status(struct sbuf *b, const struct client *c, int dev);

static void status_json(struct sbuf *b)
{
    static const char *const kinds[8] = {"?", "kernel", "copy", "memset", "event_record", "event_wait", "?", "?"};
    sb(b, "{\"schema\":1,\"pid\":%d,\"uptime_s\":%.3f,\"devices\":[", getpid(), sim_now() / 1e9);
    for (int i = 0; i < g_srv.ndev; i++) {
        struct device *d = &g_srv.dev[i];
        pthread_mutex_lock(&d->lock);
        sim_advance(d, sim_now()); /* busy times up to now */
        const struct emu_params *p = &d->p;
        uint64_t ipc_held = 0; /* freed by their owners, still mapped by IPC importers */
        for (size_t k = 0; k < d->nblocks; k++)
            if (!d->blocks[k].owner) ipc_held += d->blocks[k].size;
        sb(b,
           "%s{\"index\":%d,\"soc\":\"%s\",\"mode\":\"%s\",\"params\":{\"peak_tflops\":%.3f,"
           "\"hbm_gbps\":%.3f,\"link_gbps\":%.3f,\"p2p_gbps\":%.3f,\"launch_us\":%.3f,\"time_scale\":%g,\"capacity\":%llu,"
           "\"cube_cores\":%u,\"vector_cores\":%u,\"context_switch_us\":%.3f},"
           "\"memory\":{\"total\":%llu,\"used\":%llu,\"ipc_held\":%llu},\"busy_ns\":%.0f,\"cube_busy_ns\":%.0f,\"vector_busy_ns\":%.0f,"
           "\"context_switches\":%llu,\"pending_ops\":%zu,\"clients\":[",
           i ? "," : "", i, p->soc_name, mode_names[p->mode], p->peak_flops / 1e12,
           p->hbm_bw / 1e9, p->link_bw / 1e9, p->p2p_bw / 1e9, p->launch_ns / 1e3, p->time_scale, (unsigned long long)p->capacity,
           p->cube_cores, p->vector_cores, p->context_switch_ns / 1e3,
           (unsigned long long)p->capacity, (unsigned long long)atomic_load(&d->seg->mem_used),
           (unsigned long long)ipc_held, d->busy_ns,
           d->cube_busy_ns, d->vector_busy_ns, (unsigned long long)d->switches, sim_pending_ops(d));
        int first = 1;
        for (int k = 0; k < g_srv.nclients; k++) {
            struct client *c = g_srv.clients[k];
            struct client_dev *cd = &c->dev[i];
            if (!cd->open) continue;
            sb(b, "%s{\"pid\":%d,\"client\":%llu,\"alive\":%s,\"connected_s\":%.3f,\"busy_ns\":%.0f,\"memory_used\":%llu,"
                  "\"allocs\":%llu,\"frees\":%llu,\"ops\":{",
               first ? "" : ",", c->pid, (unsigned long long)c->id, c->state == CLIENT_ALIVE && !c->drop ? "true" : "false",
               c->connected_s,
               cd->busy_ns, (unsigned long long)cd->mem_used, (unsigned long long)cd->allocs,
               (unsigned long long)cd->frees);
            first = 0;
            for (int o = 1; o <= 5; o++) sb(b, "%s\"%s\":%llu", o > 1 ? "," : "", kinds[o], (unsigned long long)cd->ops_by_kind[o]);
            sb(b, "},\"bytes_copied\":{");
            for (int o = 0; o < 8; o++)
                sb(b, "%s\"%s\":%llu", o ? "," : "", copy_names[o] + 7, (unsigned long long)cd->bytes_by_copy_kind[o]);
            sb(b, "},\"memset_bytes\":%llu,", (unsigned long long)cd->memset_bytes);
            ipc_status(b, c, i);
            sb(b, ",\"busy_by_name\":{");
            int f2 = 1;
            for (int n = 0; n < g_srv.nnames; n++)
                if (cd->count_by_name[n]) {
                    sb(b, "%s\"%s\":%.0f", f2 ? "" : ",", g_srv.names[n], cd->busy_by_name[n]);
                    f2 = 0;
                }
            sb(b, "},\"count_by_name\":{");
            f2 = 1;
            for (int n = 0; n < g_srv.nnames; n++)
                if (cd->count_by_name[n]) {
                    sb(b, "%s\"%s\":%llu", f2 ? "" : ",", g_srv.names[n], (unsigned long long)cd->count_by_name[n]);
                    f2 = 0;
                }
            sb(b, "}}");
        }
        sb(b, "]}");
        pthread_mutex_unlock(&d->lock);
    }
    sb(b, "]}");
}

/* ---------------------------------------------------------------- requests */

static void reply(struct client *c, int err, uint64_t a, const int *fds, int nfds)
{
    struct emu_rep rep = {.err = err, .a = a};
    send_msg(c, &rep, sizeof rep, fds, nfds);
}

#ifndef F_SEAL_FUTURE_WRITE
#define F_SEAL_FUTURE_WRITE 0x0010 /* Linux 5.1 */
#endif

/* A memfd of size bytes nobody can resize (a client that shrank a file the server maps
 * would crash the server with SIGBUS), with more seals to come from the caller. */
static int sealed_memfd(const char *name, uint64_t size)
{
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0 && (errno == EMFILE || errno == ENFILE) && make_fd_room())
        fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) return -1;
    if (ftruncate(fd, (off_t)size) < 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* ---------------------------------------------------------------- IPC memory
 *
 * aclrtIpcMemGetExportKey moves the exported pages of an allocation (its first `bytes`,
 * page-rounded) out of the owner's memory file into a memfd of their own, which the owner
 * maps over the same addresses (its pointers stay valid) and which every process allowed to
 * import the key maps too: one copy of the bytes, seen by all, nothing copied afterwards.
 * The device's capacity is accounted once, in the owner's block. The block stays reserved
 * until its owner has freed it and the last importer has closed or exited.
 *
 * Who may import: a process named with aclrtIpcMemSetImportPid (by pid and start time, both
 * as the kernel tells the server: a recycled pid is another process), or, if the key was
 * exported with ACL_RT_IPC_MEM_EXPORT_FLAG_DISABLE_PID_VALIDATION, a process of the
 * exporter's own user, or root. A key is 64 random hex characters (getrandom) and says
 * nothing else; an unknown key and a key the process may not import look alike. */

#define EMU_IPC_MAX_EXPORTS 4096     /* in all */
#define EMU_IPC_MAX_IMPORTS 4096     /* in all */
#define EMU_IPC_PER_CLIENT 256       /* exports, and imports, one process may hold */
#define EMU_IPC_PER_UID (EMU_IPC_MAX_EXPORTS / 4) /* exports, and imports, one user (not root, not the
                                                     server's) may hold: the tables are the node's */
#define EMU_IPC_MAX_PIDS 1024        /* pids one key may name */
#define ACL_RT_IPC_EXPORT_NO_PID_CHECK 0x1UL /* acl_rt.h ACL_RT_IPC_MEM_EXPORT_FLAG_DISABLE_PID_VALIDATION */
#define ACL_RT_IPC_IMPORT_PEER 0x1UL         /* acl_rt.h ACL_RT_IPC_MEM_IMPORT_FLAG_ENABLE_PEER_ACCESS */

struct ipc_pid {
    int32_t pid;
    uint64_t start_ticks;
};

struct ipc_export {
    char key[EMU_IPC_KEY_LEN];
    bool key_open;         /* the key may be imported (its exporter has not closed it) */
    struct client *owner;  /* the exporter, until it frees the allocation or exits */
    uid_t uid;             /* the exporter's */
    int dev;
    uint64_t off;          /* the allocation's offset on the device */
    uint64_t bytes;        /* exported, as asked */
    uint64_t map_bytes;    /* page-rounded: the memfd's size */
    int fd;
    uint64_t flags;
    struct ipc_pid *pids;
    uint32_t npids;
    uint32_t imports; /* live imports */
};

struct ipc_import {
    struct ipc_export *e;
    struct client *c;
    int dev;          /* the importer's device */
    char key[EMU_IPC_KEY_LEN];
};

static struct ipc_export *g_exports[EMU_IPC_MAX_EXPORTS];
static int g_nexports;
static struct ipc_import g_imports[EMU_IPC_MAX_IMPORTS]; /* in import order */
static int g_nimports;

/* The process's start time in clock ticks (field 22 of /proc/<pid>/stat), 0 if unknown. */
static uint64_t proc_start_ticks(pid_t pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may hold spaces and parentheses */
    if (!p) return 0;
    p++;
    for (int field = 3; field < 22; field++) { /* p is before field 3 (state) */
        p = strchr(p + 1, ' ');
        if (!p) return 0;
    }
    return strtoull(p + 1, NULL, 10);
}

static bool key_equal(const char *a, const char *b) /* constant time over the whole key */
{
    unsigned diff = 0;
    for (int i = 0; i < EMU_IPC_KEY_LEN; i++) diff |= (unsigned char)(a[i] ^ b[i]);
    return diff == 0;
}

static int new_key(char *key)
{
    unsigned char r[32];
    static const char hex[] = "0123456789abcdef";
    size_t got = 0;
    while (got < sizeof r) {
        ssize_t n = getrandom(r + got, sizeof r - got, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        got += (size_t)n;
    }
    for (int i = 0; i < 32; i++) {
        key[2 * i] = hex[r[i] >> 4];
        key[2 * i + 1] = hex[r[i] & 15];
    }
    key[64] = 0;
    return 0;
}

/* The export whose open key this is, or NULL. */
static struct ipc_export *export_by_key(const char *key)
{
    struct ipc_export *found = NULL;
    for (int i = 0; i < g_nexports; i++)
        if (g_exports[i]->key_open && key_equal(g_exports[i]->key, key)) found = g_exports[i];
    return found;
}

/* Drops an export nobody holds any more: no owner, no importer. Its block leaves the
 * allocator. Caller holds the export's device lock. */
static void export_destroy(struct ipc_export *e, bool remove)
{
    struct device *d = &g_srv.dev[e->dev];
    if (remove)
        for (size_t i = 0; i < d->nblocks; i++)
            if (d->blocks[i].exp == e) {
                remove_block(d, i);
                break;
            }
    /* no page of it stays behind, whatever a process still maps */
    fallocate(e->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, (off_t)e->map_bytes);
    close(e->fd);
    for (int i = 0; i < g_nexports; i++)
        if (g_exports[i] == e) {
            g_exports[i] = g_exports[--g_nexports];
            break;
        }
    free(e->pids);
    free(e);
}

/* Block i, exported, was freed by its owner. True if importers still map it: then it stays
 * in the allocator without an owner. Caller holds d->lock. */
static bool ipc_block_freed(struct device *d, size_t i)
{
    struct ipc_export *e = d->blocks[i].exp;
    e->owner = NULL;
    e->key_open = false; /* freed memory cannot be imported (CANN: import before the free) */
    if (e->imports > 0) {
        d->blocks[i].owner = NULL;
        return true;
    }
    d->blocks[i].exp = NULL;
    export_destroy(e, false);
    return false;
}

/* Closes import k. Caller holds the export's device lock. */
static void import_close(int k)
{
    struct ipc_export *e = g_imports[k].e;
    memmove(&g_imports[k], &g_imports[k + 1], (size_t)(g_nimports - k - 1) * sizeof *g_imports);
    g_nimports--;
    if (--e->imports == 0 && !e->owner) export_destroy(e, true);
}

/* A client is gone: its imports close, its keys with it. Caller holds every device lock,
 * after the client's blocks were released. */
static void ipc_drop_client(struct client *c)
{
    for (int k = g_nimports; k-- > 0;)
        if (g_imports[k].c == c) import_close(k);
}

static bool may_import(const struct ipc_export *e, const struct client *c)
{
    if (e->flags & ACL_RT_IPC_EXPORT_NO_PID_CHECK) return c->uid == e->uid || c->uid == 0;
    for (uint32_t i = 0; i < e->npids; i++)
        if (e->pids[i].pid == c->pid && e->pids[i].start_ticks && e->pids[i].start_ticks == c->start_ticks)
            return true;
    return false;
}

/* Copies the data of [off, off + len) of file src to [0, len) of dst, skipping holes (an
 * allocation never written costs nothing). */
static int copy_extents(int src, uint64_t off, int dst, uint64_t len)
{
    static char buf[1 << 18];
    uint64_t pos = off, end = off + len;
    while (pos < end) {
        off_t data = lseek(src, (off_t)pos, SEEK_DATA);
        if (data < 0) return errno == ENXIO ? 0 : -1;
        if ((uint64_t)data >= end) return 0;
        off_t hole = lseek(src, data, SEEK_HOLE);
        uint64_t stop = hole < 0 || (uint64_t)hole > end ? end : (uint64_t)hole;
        for (uint64_t at = (uint64_t)data; at < stop;) {
            loff_t in = (loff_t)at, out = (loff_t)(at - off); /* in the kernel, when it can */
            ssize_t r = copy_file_range(src, &in, dst, &out, (size_t)(stop - at), 0);
            if (r <= 0) {
                size_t want = stop - at < sizeof buf ? (size_t)(stop - at) : sizeof buf;
                r = pread(src, buf, want, (off_t)at);
                if (r <= 0 || pwrite(dst, buf, (size_t)r, (off_t)(at - off)) != r) return -1;
            }
            at += (uint64_t)r;
        }
        pos = stop;
    }
    return 0;
}

static void reply_ipc(struct client *c, int err, uint64_t a, uint64_t b, uint32_t dev, const char *key, int fd)
{
    struct emu_ipc_rep rep = {.err = err, .dev = dev, .a = a, .b = b};
    if (key) memcpy(rep.key, key, EMU_IPC_KEY_LEN);
    send_msg(c, &rep, sizeof rep, fd >= 0 ? &fd : NULL, fd >= 0 ? 1 : 0);
}

static int count_exports(const struct client *c, uid_t uid)
{
    int n = 0;
    for (int i = 0; i < g_nexports; i++)
        n += c ? g_exports[i]->owner == c : g_exports[i]->uid == uid;
    return n;
}

static void ipc_export(struct client *c, const struct emu_ipc_req *q)
{
    if (q->device < 0 || q->device >= g_srv.ndev || !c->dev[q->device].open)
        return reply_ipc(c, ACL_ERROR_RT_INVALID_DEVICEID, 0, 0, 0, NULL, -1);
    if (q->flags & ~ACL_RT_IPC_EXPORT_NO_PID_CHECK) return reply_ipc(c, ACL_ERROR_RT_PARAM_INVALID, 0, 0, 0, NULL, -1);
    struct device *d = &g_srv.dev[q->device];
    char key[EMU_IPC_KEY_LEN];
    int err = 0, fd = -1;
    uint64_t map_bytes = (q->b + EMU_MEM_ALIGN - 1) & ~(uint64_t)(EMU_MEM_ALIGN - 1);
    /* Blocks are added and removed only by this thread (requests), so the block found here
     * is still there after the copy, which runs without the device's lock: the model thread
     * keeps publishing everyone's completions while a large export is copied. */
    pthread_mutex_lock(&d->lock);
    struct block *blk = block_at(d, c, q->a);
    struct ipc_export *e = blk ? blk->exp : NULL;
    if (!blk || q->b == 0 || map_bytes < q->b || map_bytes > blk->size)
        err = ACL_ERROR_RT_PARAM_INVALID; /* not the start of an allocation, or more than it */
    else if (e && (e->key_open || e->map_bytes != map_bytes))
        err = ACL_ERROR_RT_PARAM_INVALID; /* exported already (close the key first) */
    else if (new_key(key) < 0)
        err = ACL_ERROR_RT_INTERNAL_ERROR;
    else if (!e) {
        bool capped = c->uid != 0 && c->uid != geteuid();
        if (g_nexports >= EMU_IPC_MAX_EXPORTS || count_exports(c, 0) >= EMU_IPC_PER_CLIENT ||
            (capped && count_exports(NULL, c->uid) >= EMU_IPC_PER_UID))
            err = ACL_ERROR_RT_OVER_LIMIT;
        uint64_t off = blk->off;
        pthread_mutex_unlock(&d->lock);
        if (!err && ((fd = sealed_memfd("flexnpu-emu-ipc", map_bytes)) < 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SEAL) < 0 ||
                     copy_extents(c->dev[q->device].mem_fd, off, fd, map_bytes) < 0 || !(e = calloc(1, sizeof *e))))
            err = ACL_ERROR_RT_RESOURCE_ALLOC_FAIL;
        pthread_mutex_lock(&d->lock);
        blk = block_at(d, c, off);
        if (!err && !blk) err = ACL_ERROR_RT_INTERNAL_ERROR; /* cannot happen: see above */
        if (err && e) {
            free(e);
            e = NULL;
        }
        if (err && fd >= 0) close(fd);
        if (!err) {
            *e = (struct ipc_export){.owner = c, .uid = c->uid, .dev = q->device, .off = blk->off,
                                     .map_bytes = map_bytes, .fd = fd};
            blk->exp = e;
            g_exports[g_nexports++] = e;
        }
    }
    if (!err) { /* a new key (again, after the exporter closed the last one, for the same pages) */
        memcpy(e->key, key, EMU_IPC_KEY_LEN);
        e->key_open = true;
        e->bytes = q->b;
        e->flags = q->flags;
        free(e->pids);
        e->pids = NULL;
        e->npids = 0;
    }
    pthread_mutex_unlock(&d->lock);
    reply_ipc(c, err, err ? 0 : map_bytes, 0, 0, err ? NULL : key, err ? -1 : e->fd);
}

/* The exporter maps the export's memfd now: the pages in its own file are not needed. */
static void ipc_mapped(struct client *c, const struct emu_ipc_req *q)
{
    struct ipc_export *e = export_by_key(q->key);
    if (!e || e->owner != c) return reply_ipc(c, ACL_ERROR_RT_PARAM_INVALID, 0, 0, 0, NULL, -1);
    int fd = c->dev[e->dev].mem_fd;
    if (fd >= 0) fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)e->off, (off_t)e->map_bytes);
    reply_ipc(c, 0, 0, 0, 0, NULL, -1);
}

static void ipc_set_pids(struct client *c, const struct emu_ipc_req *q)
{
    struct ipc_export *e = export_by_key(q->key);
    int err = 0;
    if (!e || q->npids == 0 || q->npids > EMU_IPC_PIDS_PER_REQ) err = ACL_ERROR_RT_PARAM_INVALID;
    else if (e->owner != c || (e->flags & ACL_RT_IPC_EXPORT_NO_PID_CHECK))
        err = ACL_ERROR_RT_NO_PERMISSION; /* only its exporter, and not with pid validation off */
    else if (e->npids + q->npids > EMU_IPC_MAX_PIDS)
        err = ACL_ERROR_RT_OVER_LIMIT;
    for (uint32_t i = 0; !err && i < q->npids; i++)
        if (q->pids[i] <= 0) err = ACL_ERROR_RT_PARAM_INVALID;
    struct ipc_pid *np = err ? NULL : realloc(e->pids, (e->npids + q->npids) * sizeof *np);
    if (!err && !np) err = ACL_ERROR_BAD_ALLOC;
    if (!err) {
        e->pids = np;
        for (uint32_t i = 0; i < q->npids; i++) /* the process that has the pid now, and no later one */
            e->pids[e->npids++] = (struct ipc_pid){q->pids[i], proc_start_ticks(q->pids[i])};
    }
    reply_ipc(c, err, 0, 0, 0, NULL, -1);
}

static void ipc_import(struct client *c, const struct emu_ipc_req *q)
{
    if (q->device < 0 || q->device >= g_srv.ndev || !c->dev[q->device].open)
        return reply_ipc(c, ACL_ERROR_RT_INVALID_DEVICEID, 0, 0, 0, NULL, -1);
    if (q->flags & ~ACL_RT_IPC_IMPORT_PEER) return reply_ipc(c, ACL_ERROR_RT_PARAM_INVALID, 0, 0, 0, NULL, -1);
    struct ipc_export *e = export_by_key(q->key);
    if (!e || !may_import(e, c)) {
        if (e)
            LOG_LIMITED("refused an IPC import by pid %d (uid %u): the exporter (uid %u) did not allow it", (int)c->pid,
                        (unsigned)c->uid, (unsigned)e->uid);
        return reply_ipc(c, ACL_ERROR_RT_DRV_INTERNAL_ERROR, 0, 0, 0, NULL, -1);
    }
    if (e->dev != q->device && !(q->flags & ACL_RT_IPC_IMPORT_PEER))
        return reply_ipc(c, ACL_ERROR_RT_FEATURE_NOT_SUPPORT, 0, 0, 0, NULL, -1);
    int mine = 0, users = 0;
    for (int k = 0; k < g_nimports; k++) {
        mine += g_imports[k].c == c;
        users += g_imports[k].c->uid == c->uid;
    }
    bool capped = c->uid != 0 && c->uid != geteuid();
    if (g_nimports >= EMU_IPC_MAX_IMPORTS || mine >= EMU_IPC_PER_CLIENT || (capped && users >= EMU_IPC_PER_UID))
        return reply_ipc(c, ACL_ERROR_RT_OVER_LIMIT, 0, 0, 0, NULL, -1);
    struct ipc_import *im = &g_imports[g_nimports++];
    *im = (struct ipc_import){.e = e, .c = c, .dev = q->device};
    memcpy(im->key, e->key, EMU_IPC_KEY_LEN);
    e->imports++;
    reply_ipc(c, 0, e->map_bytes, e->bytes, (uint32_t)e->dev, NULL, e->fd);
}

/* An importer closes its oldest import of the key (rep.a = 1), or the exporter its key
 * (rep.a = 2): then nobody can import it any more; imports made stay valid. */
static void ipc_close(struct client *c, const struct emu_ipc_req *q)
{
    for (int k = 0; k < g_nimports; k++)
        if (g_imports[k].c == c && key_equal(g_imports[k].key, q->key)) {
            struct device *d = &g_srv.dev[g_imports[k].e->dev];
            pthread_mutex_lock(&d->lock);
            import_close(k);
            pthread_mutex_unlock(&d->lock);
            return reply_ipc(c, 0, 1, 0, 0, NULL, -1);
        }
    struct ipc_export *e = export_by_key(q->key);
    if (!e || e->owner != c) return reply_ipc(c, ACL_ERROR_RT_PARAM_INVALID, 0, 0, 0, NULL, -1);
    e->key_open = false;
    reply_ipc(c, 0, 2, 0, 0, NULL, -1);
}

/* "ipc":{...} of a client on a device: its allocations exported, its imports; page-rounded bytes. */
static void ipc_status(struct sbuf *b, const struct client *c, int dev)
{
    uint64_t ne = 0, be = 0, ni = 0, bi = 0;
    for (int i = 0; i < g_nexports; i++)
        if (g_exports[i]->owner == c && g_exports[i]->dev == dev) ne++, be += g_exports[i]->map_bytes;
    for (int k = 0; k < g_nimports; k++)
        if (g_imports[k].c == c && g_imports[k].dev == dev) ni++, bi += g_imports[k].e->map_bytes;
    sb(b, "\"ipc\":{\"exports\":%llu,\"export_bytes\":%llu,\"imports\":%llu,\"import_bytes\":%llu}",
       (unsigned long long)ne, (unsigned long long)be, (unsigned long long)ni, (unsigned long long)bi);
}

static bool handle_ipc(struct client *c, const struct emu_ipc_req *q, ssize_t len)
{
    struct emu_ipc_req r;
    if (len != (ssize_t)sizeof r || !c->seg) {
        reply_ipc(c, ACL_ERROR_RT_PARAM_INVALID, 0, 0, 0, NULL, -1);
        return true;
    }
    r = *q;
    r.key[EMU_IPC_KEY_LEN - 1] = 0;
    switch (r.type) {
    case EMU_REQ_IPC_EXPORT: ipc_export(c, &r); break;
    case EMU_REQ_IPC_MAPPED: ipc_mapped(c, &r); break;
    case EMU_REQ_IPC_SET_PIDS: ipc_set_pids(c, &r); break;
    case EMU_REQ_IPC_IMPORT: ipc_import(c, &r); break;
    default: ipc_close(c, &r); break;
    }
    return true;
}

/* Handles one request; returns false if the connection should close. */
static bool handle(struct client *c)
{
    union {
        struct emu_req req;
        struct emu_ipc_req ipc;
    } u;
    struct emu_req req;
    int fds[EMU_FDS_MAX], nfds = 0;
    ssize_t r = emu_recv_fds(c->fd, &u, sizeof u, fds, &nfds);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
    if (r <= 0) return false;
    c->last_ns = emu_now_ns();
    for (int i = 0; i < nfds; i++) close(fds[i]); /* no request carries fds */
    if (!c->admitted) {
        fprintf(stderr, "flexnpu-emu-server: refused pid %d (uid %u, gid %u): not root, uid %u or in group %s\n",
                (int)c->pid, (unsigned)c->uid, (unsigned)c->gid, (unsigned)geteuid(),
                g_have_group ? g_group_name : "(none on this node)");
        reply(c, ACL_ERROR_RT_NO_PERMISSION, g_have_group ? (uint64_t)g_group_gid : EMU_NO_GROUP, NULL, 0);
        return false;
    }
    if (r >= (ssize_t)sizeof u.req.type && u.req.type >= EMU_REQ_IPC_EXPORT && u.req.type <= EMU_REQ_IPC_CLOSE)
        return handle_ipc(c, &u.ipc, r);
    if (r != (ssize_t)sizeof req) {
        reply(c, ACL_ERROR_INVALID_PARAM, 0, NULL, 0);
        return true;
    }
    req = u.req;
    bool dev_ok = req.device >= 0 && req.device < g_srv.ndev;
    struct device *d = dev_ok ? &g_srv.dev[req.device] : NULL;
    switch (req.type) {
    case EMU_REQ_HELLO: {
        if (c->seg || req.a != EMU_PROTO_VERSION) {
            reply(c, ACL_ERROR_INVALID_PARAM, 0, NULL, 0);
            return false;
        }
        if (c->uid != 0 && c->uid != geteuid()) {
            int mine = 0;
            for (int i = 0; i < g_srv.nclients; i++)
                if (g_srv.clients[i]->state == CLIENT_ALIVE && g_srv.clients[i]->uid == c->uid) mine++;
            if (mine >= EMU_ALIVE_PER_UID) {
                fprintf(stderr, "flexnpu-emu-server: refused pid %d: uid %u already has %d processes on the "
                        "devices (at most %d per user)\n", (int)c->pid, (unsigned)c->uid, mine, EMU_ALIVE_PER_UID);
                reply(c, ACL_ERROR_RT_OVER_LIMIT, (uint64_t)EMU_ALIVE_PER_UID, NULL, 0);
                return false;
            }
        }
        /* the server makes the client segment (so it is sealed against resizing) */
        int fd = sealed_memfd("flexnpu-emu-client", sizeof(struct emu_client_seg));
        void *m = MAP_FAILED;
        if (fd >= 0 && fcntl(fd, F_ADD_SEALS, F_SEAL_SEAL) == 0)
            m = mmap(NULL, sizeof(struct emu_client_seg), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
            if (fd >= 0) close(fd);
            reply(c, ACL_ERROR_RT_RESOURCE_ALLOC_FAIL, 0, NULL, 0);
            return false;
        }
        struct emu_client_seg *seg = m;
        seg->magic = EMU_MAGIC_CLIENT;
        seg->version = EMU_PROTO_VERSION;
        seg->pid = c->pid;
        lock_all();
        c->seg = m;
        c->state = CLIENT_ALIVE;
        unlock_all();
        reply(c, 0, (uint64_t)g_srv.ndev, &fd, 1);
        close(fd);
        return true;
    }
    case EMU_REQ_OPEN_DEVICE: {
        if (!c->seg || !d) {
            reply(c, ACL_ERROR_RT_INVALID_DEVICEID, 0, NULL, 0);
            return true;
        }
        struct client_dev *cd = &c->dev[req.device];
        if (!cd->busy_by_name) {
            cd->busy_by_name = calloc(EMU_MAX_NAMES, sizeof(double));
            cd->count_by_name = calloc(EMU_MAX_NAMES, sizeof(uint64_t));
        }
        if (cd->mem_fd < 0) { /* this process's own device memory: nobody else is given it */
            char name[32];
            snprintf(name, sizeof name, "flexnpu-emu-hbm%d", req.device);
            cd->mem_fd = sealed_memfd(name, d->p.capacity);
            if (cd->mem_fd >= 0 && fcntl(cd->mem_fd, F_ADD_SEALS, F_SEAL_SEAL) < 0) {
                close(cd->mem_fd);
                cd->mem_fd = -1;
            }
        }
        pthread_mutex_lock(&d->lock);
        cd->open = cd->busy_by_name && cd->count_by_name && cd->mem_fd >= 0;
        pthread_mutex_unlock(&d->lock);
        int out[3] = {d->seg_fd, d->bell_fd, cd->mem_fd};
        reply(c, cd->open ? 0 : ACL_ERROR_RT_RESOURCE_ALLOC_FAIL, d->p.capacity, out, cd->open ? 3 : 0);
        return true;
    }
    case EMU_REQ_ALLOC:
    case EMU_REQ_FREE: {
        if (!d || !c->dev[req.device].open) {
            reply(c, ACL_ERROR_RT_INVALID_DEVICEID, 0, NULL, 0);
            return true;
        }
        uint64_t out = 0;
        pthread_mutex_lock(&d->lock);
        int err = req.type == EMU_REQ_ALLOC ? dev_alloc(d, c, req.a, &out) : dev_free(d, c, req.a, &out);
        pthread_mutex_unlock(&d->lock);
        reply(c, err, out, NULL, 0);
        return true;
    }
    case EMU_REQ_NAME: {
        req.name[EMU_NAME_LEN - 1] = 0;
        int id = req.name[0] ? name_id(req.name) : -1;
        reply(c, id < 0 ? ACL_ERROR_RT_OVER_LIMIT : 0, (uint64_t)(id < 0 ? 0 : id), NULL, 0);
        return true;
    }
    case EMU_REQ_PID: /* as the server sees it: in its pid namespace, the node's */
        reply(c, c->seg ? 0 : ACL_ERROR_INVALID_PARAM, (uint64_t)c->pid, NULL, 0);
        return true;
    case EMU_REQ_STATUS: {
        struct sbuf b = {0};
        status_json(&b);
        for (size_t off = 0; off < b.n; off += 16384) {
            size_t len = b.n - off < 16384 ? b.n - off : 16384;
            send_msg(c, b.p + off, len, NULL, 0);
        }
        send_msg(c, "", 0, NULL, 0);
        free(b.p);
        return true;
    }
    default:
        reply(c, ACL_ERROR_INVALID_PARAM, 0, NULL, 0);
        return true;
    }
}

/* ---------------------------------------------------------------- setup */

static void setup_device(struct device *d, int index, const struct emu_params *p)
{
    d->index = index;
    d->p = *p;
    pthread_mutex_init(&d->lock, NULL);
    d->seg_fd = sealed_memfd("flexnpu-emu-device", sizeof(struct emu_dev_seg));
    d->bell_fd = sealed_memfd("flexnpu-emu-bell", EMU_MEM_ALIGN);
    if (d->seg_fd < 0 || d->bell_fd < 0 || fcntl(d->bell_fd, F_ADD_SEALS, F_SEAL_SEAL) < 0)
        die("cannot create the segments of device %d: %s", index, strerror(errno));
    d->seg = mmap(NULL, sizeof *d->seg, PROT_READ | PROT_WRITE, MAP_SHARED, d->seg_fd, 0);
    d->bell = mmap(NULL, EMU_MEM_ALIGN, PROT_READ | PROT_WRITE, MAP_SHARED, d->bell_fd, 0);
    if (d->seg == MAP_FAILED || d->bell == MAP_FAILED) die("mmap: %s", strerror(errno));
    /* from now on only this mapping writes it: clients can map it read-only, and only that */
    if (fcntl(d->seg_fd, F_ADD_SEALS, F_SEAL_FUTURE_WRITE | F_SEAL_SEAL) < 0)
        die("cannot seal the segment of device %d: %s", index, strerror(errno));
    d->seg->magic = EMU_MAGIC_DEV;
    d->seg->version = EMU_PROTO_VERSION;
    d->seg->index = (uint32_t)index;
    d->seg->params = *p;
    atomic_store(&d->seg->deadline_ns, INT64_MAX);
    if (pthread_create(&d->thread, NULL, device_thread, d) != 0) die("pthread_create failed");
}

static double num_arg(const char *v, const char *name)
{
    char *end;
    double x = strtod(v, &end);
    if (*end || !(x > 0) || !isfinite(x)) die("%s must be a positive number, got '%s'", name, v);
    return x;
}

static double nonneg_arg(const char *v, const char *name)
{
    char *end;
    double x = strtod(v, &end);
    if (*end || !(x >= 0) || !isfinite(x)) die("%s must be a number >= 0, got '%s'", name, v);
    return x;
}

static long core_arg(const char *v, const char *name)
{
    char *end;
    long x = strtol(v, &end, 10);
    if (*end || x < 1 || x > 4096) die("%s must be a whole number of cores, 1..4096, got '%s'", name, v);
    return x;
}

int main(int argc, char **argv)
{
    const char *sock_path = NULL, *modes = "contexts";
    int ndev = 1;
    struct emu_params p = {.peak_flops = 353.9e12, .hbm_bw = 1.6e12, .link_bw = 23e9, .launch_ns = 10000,
                           .time_scale = 1.0, .capacity = 64ULL << 30, .cube_cores = 24, .vector_cores = 48,
                           .context_switch_ns = 20000};
    snprintf(p.soc_name, sizeof p.soc_name, "Ascend910B2");
    for (int k = 0; k < EMU_EFF_SLOTS; k++) p.eff_flops[k] = p.eff_hbm[k] = 1.0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) die("option %s needs a value", a);
        i++;
        if (!strcmp(a, "--socket")) sock_path = v;
        else if (!strcmp(a, "--devices")) ndev = (int)num_arg(v, a);
        else if (!strcmp(a, "--peak-flops")) p.peak_flops = num_arg(v, a);
        else if (!strcmp(a, "--hbm-bw")) p.hbm_bw = num_arg(v, a);
        else if (!strcmp(a, "--link-bw")) p.link_bw = num_arg(v, a);
        else if (!strcmp(a, "--launch-ns")) p.launch_ns = strtod(v, NULL) >= 0 ? strtod(v, NULL) : 0;
        else if (!strcmp(a, "--capacity")) p.capacity = (uint64_t)num_arg(v, a);
        else if (!strcmp(a, "--time-scale")) p.time_scale = num_arg(v, a);
        else if (!strcmp(a, "--mode")) modes = v;
        else if (!strcmp(a, "--soc")) snprintf(p.soc_name, sizeof p.soc_name, "%s", v);
        else if (!strcmp(a, "--p2p-bw")) p.p2p_bw = num_arg(v, a);
        else if (!strcmp(a, "--cube-cores")) p.cube_cores = (uint32_t)core_arg(v, a);
        else if (!strcmp(a, "--vector-cores")) p.vector_cores = (uint32_t)core_arg(v, a);
        else if (!strcmp(a, "--context-switch-us")) p.context_switch_ns = nonneg_arg(v, a) * 1e3;
        else if (!strcmp(a, "--client-group")) g_group_name = v;
        else if (!strcmp(a, "--partition")) {
            char err[160];
            if (sim_parse_partition(v, &g_srv.partition, err, sizeof err)) die("--partition: %s", err);
        }
        else if (!strcmp(a, "--efficiency")) {
            char err[160];
            if (emu_parse_efficiency(v, &p, err, sizeof err)) die("--efficiency: %s", err);
        } else die("unknown option %s", a);
    }
    if (!sock_path) die("--socket is required");
    struct group *gr = *g_group_name ? getgrnam(g_group_name) : NULL;
    if (gr) {
        g_have_group = true;
        g_group_gid = gr->gr_gid;
    }
    prctl(PR_SET_DUMPABLE, 0); /* /proc/<pid>/fd and mem of the server (every client's memfd): root's only */
    struct rlimit rl; /* a socket and a memory file per device for each of up to EMU_MAX_CLIENTS clients */
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (!(p.p2p_bw > 0)) p.p2p_bw = p.link_bw; /* no device link given: copies between devices use the host link */
    if (ndev < 1 || ndev > EMU_MAX_DEVICES) die("--devices must be 1..%d", EMU_MAX_DEVICES);
    p.capacity &= ~(uint64_t)(EMU_MEM_ALIGN - 1);

    g_srv.t0_ns = emu_now_ns();
    g_srv.ndev = ndev;
    pthread_mutex_init(&g_srv.names_lock, NULL);
    snprintf(g_srv.names[EMU_NAME_MEMSET], EMU_NAME_LEN, "memset");
    for (int k = 0; k < 8; k++) snprintf(g_srv.names[EMU_NAME_COPY_BASE + k], EMU_NAME_LEN, "%s", copy_names[k]);
    g_srv.nnames = EMU_NAME_FIRST_KERNEL;

    /* --mode takes one mode for all devices, or a comma list, one per device */
    char mbuf[256];
    snprintf(mbuf, sizeof mbuf, "%s", modes);
    uint32_t mode_of[EMU_MAX_DEVICES];
    char *save = NULL, *tok = strtok_r(mbuf, ",", &save);
    int nm = 0;
    while (tok && nm < EMU_MAX_DEVICES) {
        if (!strcmp(tok, "serial")) mode_of[nm++] = EMU_MODE_SERIAL;
        else if (!strcmp(tok, "shared")) mode_of[nm++] = EMU_MODE_SHARED;
        else if (!strcmp(tok, "contexts")) mode_of[nm++] = EMU_MODE_CONTEXTS;
        else die("--mode takes contexts, serial or shared, got '%s'", tok);
        tok = strtok_r(NULL, ",", &save);
    }
    if (nm != 1 && nm != ndev) die("--mode needs one mode or one per device (%d)", ndev);

    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    struct sigaction hup;
    /* a closed terminal under `emu start --foreground` stops it as SIGTERM does; under nohup
     * (SIGHUP ignored on the way in) it stays ignored: a blocked signal is never discarded */
    if (sigaction(SIGHUP, NULL, &hup) == 0 && hup.sa_handler != SIG_IGN) sigaddset(&sigs, SIGHUP);
    sigaddset(&sigs, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL); /* threads inherit the mask */
    int sfd = signalfd(-1, &sigs, SFD_CLOEXEC);

    for (int i = 0; i < ndev; i++) {
        struct emu_params dp = p;
        dp.mode = mode_of[nm == 1 ? 0 : i];
        setup_device(&g_srv.dev[i], i, &dp);
    }

    int ls = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(sock_path) >= sizeof sa.sun_path) die("socket path too long: %s", sock_path);
    strcpy(sa.sun_path, sock_path);
    unlink(sock_path);
    /* 0660 from the moment it exists (the umask at bind), and its group given without
     * following a link: whatever is put at the path after bind, nothing here changes the
     * owner or mode of another file through it */
    mode_t old = umask(0117);
    if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 64) < 0)
        die("cannot listen on %s: %s", sock_path, strerror(errno));
    umask(old);
    if (g_have_group && fchownat(AT_FDCWD, sock_path, (uid_t)-1, g_group_gid, AT_SYMLINK_NOFOLLOW) < 0)
        fprintf(stderr, "flexnpu-emu-server: cannot give %s to group %s (%s): only root and uid %u can use it\n",
                sock_path, g_group_name, strerror(errno), (unsigned)geteuid());
    g_reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    printf("ready\n");
    fflush(stdout);
    char status[160];
    snprintf(status, sizeof status, "READY=1\nSTATUS=%d x %s, serving %s", ndev, p.soc_name, sock_path);
    notify_systemd(status);

    for (;;) {
        uint64_t now = emu_now_ns();
        int timeout = sweep_pending(now);
        reap();
        bool paused = now < g_accept_pause_until;
        if (paused) {
            int left = (int)((g_accept_pause_until - now) / 1000000 + 1);
            if (timeout < 0 || left < timeout) timeout = left;
        }
        struct pollfd pf[EMU_MAX_CLIENTS + 2];
        struct client *who[EMU_MAX_CLIENTS + 2];
        int n = 0;
        pf[n] = (struct pollfd){.fd = sfd, .events = POLLIN};
        who[n++] = NULL;
        pf[n] = (struct pollfd){.fd = ls, .events = paused ? 0 : POLLIN};
        who[n++] = NULL;
        for (int i = 0; i < g_srv.nclients; i++) {
            struct client *c = g_srv.clients[i];
            if (c->fd < 0) continue;
            /* a reply still queued: wait for room, and read no request meanwhile (one that
             * comes all the same breaks request/reply) */
            pf[n] = (struct pollfd){.fd = c->fd, .events = c->out ? POLLOUT | POLLIN : POLLIN};
            who[n++] = c;
        }
        if (poll(pf, (nfds_t)n, timeout) < 0) {
            if (errno == EINTR) continue;
            die("poll: %s", strerror(errno));
        }
        if (pf[0].revents) {
            struct signalfd_siginfo si;
            if (read(sfd, &si, sizeof si) == sizeof si && si.ssi_signo != SIGPIPE) break;
        }
        for (int i = 2; i < n; i++) {
            struct client *c = who[i];
            short ev = pf[i].revents;
            if (!ev || c->drop) continue; /* closed meanwhile: its fd number may be reused already */
            g_serving = c;
            if (c->out && (ev & POLLIN)) {
                LOG_LIMITED("closed the connection of pid %d (uid %u): it sent requests without reading the "
                            "replies", (int)c->pid, (unsigned)c->uid);
                client_close(c);
            } else if (ev & POLLOUT)
                flush_out(c);
            else if (ev & POLLIN) {
                if (!handle(c)) client_close(c);
            } else
                client_close(c); /* hung up or failed */
            g_serving = NULL;
        }
        reap();
        if (pf[1].revents & POLLIN) accept_new(ls);
    }

    atomic_store(&g_srv.stopping, true);
    for (int i = 0; i < g_srv.ndev; i++) {
        atomic_fetch_add(&g_srv.dev[i].bell->doorbell, 1);
        emu_futex_wake(&g_srv.dev[i].bell->doorbell, 1);
        pthread_join(g_srv.dev[i].thread, NULL);
    }
    close(ls);
    unlink(sock_path);
    for (int i = 0; i < g_srv.nclients; i++)
        if (g_srv.clients[i]->fd >= 0) close(g_srv.clients[i]->fd);
    return 0;
}
