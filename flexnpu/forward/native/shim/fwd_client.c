/* The forward mode of the shim (libflexnpu_fwd.so = shim.c built with FX_FORWARD, which
 * includes this file): every AscendCL call the application makes becomes a record in the
 * ring of the device's executor (fwd_proto.h) instead of a call into the local runtime.
 *
 * The shim's wrappers (gate bookkeeping, counters, virtual devices, quota) stay in front:
 * their "real" function is the fxf_ function here. Calls the profile does not wrap are
 * exported here under their own names. A program never reaches the local libascendcl.so's
 * device calls: its device work runs in the executor's context.
 *
 * Handles (streams, events, binaries, functions, contexts) are tokens the executor checks
 * against this process's own tables; device pointers are the executor's, which this
 * process cannot dereference (as on the hardware). Host memory from aclrtMallocHost is the
 * arena both map: copies from and to it are zero-copy. Other host memory is staged.
 *
 * Errors: a failure of an asynchronous call is returned by the next synchronisation (as on
 * the hardware). If the executor goes, every call returns ACL_ERROR_RT_SOCKET_CLOSE at once.
 */
#include <sched.h>
#include <sys/uio.h>

#define FWD_LOST ACL_ERROR_RT_SOCKET_CLOSE
/* A synchronous call watches its completion this long before it sleeps, yielding the CPU
 * between looks (the executor and the device may need it): most answers come within it, and a
 * sleeping caller costs a futex wake more. */
#define FWD_SPIN_NS 100000ULL

struct fwc { /* this process's connection to one device's executor */
    int dev;
    int sock;
    uint8_t *mem;
    size_t mem_bytes;
    struct fwd_hdr *hdr;
    struct fwd_compl *compl;
    uint8_t *ring, *stage, *host;
    uint64_t host_bytes;
    uint64_t tail;
    uint32_t seq;
    pthread_mutex_t ring_lock;  /* producers of records */
    pthread_mutex_t stage_lock; /* the staging area: one staged copy at a time */
    pthread_mutex_t host_lock;  /* the host arena's blocks */
    _Atomic int lost;
    int refs; /* aclrtSetDevice calls not yet reset */
    pthread_t watcher;
    /* the host arena: blocks in address order (off, size, used) */
    struct { uint64_t off, size; bool used; } *blk;
    int nblk, cap_blk;
};

static struct fwc *_Atomic g_fwc[FX_MAX_DEVICES];
static pthread_mutex_t g_fw_lock = PTHREAD_MUTEX_INITIALIZER; /* connections, handle tables */
static __thread int t_fdev = -1;  /* the thread's physical device, as forwarded */
static _Atomic int g_last_fdev = -1;
static __thread char t_msg[FWD_MSG_LEN];
static bool g_acl_inited, g_acl_finalized;
static uint64_t g_host_bytes = FWD_HOST_DEFAULT;

/* handle tables: the device of each handle this process holds; -1 free */
static int8_t g_h_stream[FWD_MAX_STREAMS], g_h_event[FWD_MAX_EVENTS], g_h_bin[FWD_MAX_BINS], g_h_func[FWD_MAX_FUNCS];
static int8_t g_h_ctx[256];
static struct ex_bin g_bins[FWD_MAX_BINS]; /* kernel names -> built-ins, of FlexNPU kernel libraries */
static bool g_h_inited;

static void fw_tables_init(void)
{
    if (g_h_inited) return;
    memset(g_h_stream, -1, sizeof g_h_stream);
    memset(g_h_event, -1, sizeof g_h_event);
    memset(g_h_bin, -1, sizeof g_h_bin);
    memset(g_h_func, -1, sizeof g_h_func);
    memset(g_h_ctx, -1, sizeof g_h_ctx);
    g_h_inited = true;
}

/* A free index in table t (n entries), taken for device dev; -1 if none. */
static int fw_take(int8_t *t, int n, int dev)
{
    pthread_mutex_lock(&g_fw_lock);
    fw_tables_init();
    int at = -1;
    for (int i = 0; i < n && at < 0; i++)
        if (t[i] < 0) at = i;
    if (at >= 0) t[at] = (int8_t)dev;
    pthread_mutex_unlock(&g_fw_lock);
    return at;
}

/* The device of a handle of this kind, or -1 if this process holds no such handle. */
static int fw_dev_of(uint64_t h, uint32_t kind, int8_t *t, int n)
{
    int64_t i = fwd_handle_index(h, kind);
    if (i < 0 || i >= n) return -1;
    pthread_mutex_lock(&g_fw_lock);
    fw_tables_init();
    int d = t[i];
    pthread_mutex_unlock(&g_fw_lock);
    return d;
}

static void fw_release(int8_t *t, int n, uint64_t h, uint32_t kind)
{
    int64_t i = fwd_handle_index(h, kind);
    if (i < 0 || i >= n) return;
    pthread_mutex_lock(&g_fw_lock);
    t[i] = -1;
    pthread_mutex_unlock(&g_fw_lock);
}

static __thread int t_rc; /* the code of the failure t_msg describes */
static int fw_set_msg(int rc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fw_set_msg(int rc, const char *fmt, ...)
{
    t_rc = rc;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t_msg, sizeof t_msg, fmt, ap);
    va_end(ap);
    return rc;
}

static void fw_futex_wake(_Atomic uint32_t *w) { syscall(SYS_futex, w, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0); }
static void fw_futex_wait(_Atomic uint32_t *w, uint32_t v, uint64_t ns)
{
    struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ULL), .tv_nsec = (long)(ns % 1000000000ULL)};
    syscall(SYS_futex, w, FUTEX_WAIT, v, &ts, NULL, 0);
}

/* ---------------------------------------------------------------- connection */

/* Sleeps until the executor hangs up, then fails every call of this device at once. */
static void *fw_watch(void *arg)
{
    struct fwc *w = arg;
    for (;;) {
        struct pollfd p = {.fd = w->sock, .events = POLLIN};
        int n = poll(&p, 1, -1);
        if (n < 0 && errno == EINTR) continue;
        char b;
        if (n > 0 && !(p.revents & (POLLHUP | POLLERR)) && recv(w->sock, &b, 1, MSG_DONTWAIT | MSG_PEEK) > 0) {
            recv(w->sock, &b, 1, MSG_DONTWAIT); /* the executor never writes after the welcome */
            continue;
        }
        break;
    }
    atomic_store(&w->lost, 1);
    for (int i = 0; i < FWD_NCOMPL; i++) {
        atomic_fetch_add(&w->compl[i].waiting, 0);
        fw_futex_wake(&w->compl[i].state);
    }
    atomic_fetch_add(&w->hdr->room, 1);
    fw_futex_wake(&w->hdr->room);
    fx_error("device %d: the executor went away; device calls now fail with ACL_ERROR_RT_SOCKET_CLOSE (507901)", w->dev);
    return NULL;
}

/* Connects to device dev's executor (the daemon admitted this process in forward mode
 * first: fx_select_device). NULL with t_msg set if it cannot. */
static struct fwc *fw_connect(int dev)
{
    char path[320];
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(path, sizeof path, "%s/exec-%d.sock", g_rundir, dev);
    if (strlen(path) >= sizeof sa.sun_path) {
        fw_set_msg(ACL_ERROR_RT_NO_DEVICE, "%s is too long a path", path);
        return NULL;
    }
    memcpy(sa.sun_path, path, strlen(path) + 1);
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof sa) != 0) {
        fw_set_msg(ACL_ERROR_RT_NO_DEVICE, "device %d: no executor at %s (%s): is `flexnpu daemon --device %d` "
                   "running? Without it, run the program gated (flexnpu run without --forward)",
                   dev, path, strerror(errno), dev);
        if (s >= 0) close(s);
        return NULL;
    }
    uint64_t total = fwd_total(g_host_bytes);
    int fd = memfd_create("flexnpu-fwd", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    void *mem = MAP_FAILED;
    if (fd >= 0 && ftruncate(fd, (off_t)total) == 0 &&
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) == 0)
        mem = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mem == MAP_FAILED) {
        fw_set_msg(ACL_ERROR_RT_MEMORY_ALLOCATION, "device %d: cannot make the ring memory (%s)", dev, strerror(errno));
        if (fd >= 0) close(fd);
        close(s);
        return NULL;
    }
    struct fwd_hdr *h = mem;
    h->magic = FWD_MAGIC;
    h->version = FWD_VERSION;
    h->device = (uint32_t)dev;
    h->host_bytes = g_host_bytes;
    h->host_base = (uint64_t)(uintptr_t)((uint8_t *)mem + fwd_host_off());
    struct fwd_hello hello = {.magic = FWD_HELLO_MAGIC, .version = FWD_VERSION, .host_bytes = g_host_bytes,
                              .host_base = h->host_base, .quota = g_quota};
    union {
        struct cmsghdr hd;
        char buf[CMSG_SPACE(sizeof(int))];
    } cm;
    memset(&cm, 0, sizeof cm);
    struct iovec iov = {.iov_base = &hello, .iov_len = sizeof hello};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf, .msg_controllen = sizeof cm.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    struct timeval tv = {.tv_sec = 5};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct fwd_welcome wel;
    memset(&wel, 0, sizeof wel);
    ssize_t got = -1;
    if (sendmsg(s, &mh, MSG_NOSIGNAL) == (ssize_t)sizeof hello) got = recv(s, &wel, sizeof wel, 0);
    close(fd);
    if (got != (ssize_t)sizeof wel || wel.status != 0) {
        wel.reason[sizeof wel.reason - 1] = 0;
        fw_set_msg(ACL_ERROR_RT_NO_DEVICE, "device %d: the executor refused this process: %s", dev,
                   got == (ssize_t)sizeof wel ? wel.reason : "no answer");
        munmap(mem, total);
        close(s);
        return NULL;
    }
    tv.tv_sec = 0;
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct fwc *w = calloc(1, sizeof *w);
    if (!w) {
        munmap(mem, total);
        close(s);
        return NULL;
    }
    w->dev = dev;
    w->sock = s;
    w->mem = mem;
    w->mem_bytes = total;
    w->hdr = h;
    w->compl = (struct fwd_compl *)((uint8_t *)mem + FWD_HDR_BYTES);
    w->ring = (uint8_t *)mem + fwd_ring_off();
    w->stage = (uint8_t *)mem + fwd_stage_off();
    w->host = (uint8_t *)mem + fwd_host_off();
    w->host_bytes = g_host_bytes;
    pthread_mutex_init(&w->ring_lock, NULL);
    pthread_mutex_init(&w->stage_lock, NULL);
    pthread_mutex_init(&w->host_lock, NULL);
    pthread_create(&w->watcher, NULL, fw_watch, w);
    pthread_detach(w->watcher);
    fx_debug("device %d: forwarded to its executor", dev);
    return w;
}

/* The connection of device dev, made at its first use (admission first). */
static struct fwc *fw_get(int dev)
{
    if (!g_acl_inited) {
        fw_set_msg(ACL_ERROR_UNINITIALIZE, "aclInit has not been called");
        return NULL;
    }
    if (dev < 0 || dev >= FX_MAX_DEVICES) {
        fw_set_msg(ACL_ERROR_RT_CONTEXT_NULL, "no device is set on this thread (aclrtSetDevice)");
        return NULL;
    }
    struct fwc *w = atomic_load(&g_fwc[dev]);
    if (w) return w;
    fx_select_device(dev); /* the daemon admits this process, in forward mode */
    pthread_mutex_lock(&g_fw_lock);
    w = atomic_load(&g_fwc[dev]);
    if (!w) {
        w = fw_connect(dev);
        if (w) atomic_store(&g_fwc[dev], w);
    }
    pthread_mutex_unlock(&g_fw_lock);
    return w;
}

static int fw_cur_dev(void)
{
    if (t_fdev >= 0) return t_fdev;
    return atomic_load(&g_last_fdev);
}

/* ---------------------------------------------------------------- records */

static inline uint32_t fw_align(size_t n) { return (uint32_t)((n + FWD_REC_ALIGN - 1) & ~(size_t)(FWD_REC_ALIGN - 1)); }

/* Appends one record. No system call unless the executor sleeps or the ring is full. */
static int fw_post(struct fwc *w, uint16_t op, uint16_t compl, const uint64_t *a, const void *p1, size_t n1,
                   const void *p2, size_t n2)
{
    if (atomic_load_explicit(&w->lost, memory_order_relaxed))
        return fw_set_msg(FWD_LOST, "device %d: the executor is gone", w->dev);
    size_t plen = n1 + n2;
    uint32_t len = fw_align(sizeof(struct fwd_rec) + plen);
    if (len > FWD_RING_BYTES / 2) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "a record of %zu bytes is too large", plen);
    pthread_mutex_lock(&w->ring_lock);
    uint64_t off = w->tail % FWD_RING_BYTES;
    uint64_t need = off + len > FWD_RING_BYTES ? FWD_RING_BYTES - off + len : len;
    for (;;) {
        uint64_t head = atomic_load_explicit(&w->hdr->head, memory_order_acquire);
        if (w->tail - head + need <= FWD_RING_BYTES) break;
        uint32_t room = atomic_load(&w->hdr->room);
        atomic_store(&w->hdr->client_waiting, 1);
        head = atomic_load_explicit(&w->hdr->head, memory_order_seq_cst);
        if (w->tail - head + need <= FWD_RING_BYTES) break;
        if (atomic_load(&w->lost)) {
            pthread_mutex_unlock(&w->ring_lock);
            return fw_set_msg(FWD_LOST, "device %d: the executor is gone", w->dev);
        }
        if (atomic_load(&w->hdr->exec_sleeping)) { /* it must run to make room */
            atomic_fetch_add(&w->hdr->bell, 1);
            fw_futex_wake(&w->hdr->bell);
        }
        fw_futex_wait(&w->hdr->room, room, 10000000ULL);
    }
    atomic_store(&w->hdr->client_waiting, 0);
    if (off + len > FWD_RING_BYTES) { /* fill the ring's end; the record starts at 0 */
        struct fwd_rec *pad = (struct fwd_rec *)(w->ring + off);
        pad->len = (uint32_t)(FWD_RING_BYTES - off);
        pad->op = FWD_PAD;
        pad->plen = 0;
        w->tail += FWD_RING_BYTES - off;
        off = 0;
    }
    struct fwd_rec *r = (struct fwd_rec *)(w->ring + off);
    r->len = len;
    r->op = op;
    r->compl = compl;
    r->plen = (uint32_t)plen;
    r->seq32 = ++w->seq;
    for (int i = 0; i < 6; i++) r->a[i] = a ? a[i] : 0;
    if (n1) memcpy((uint8_t *)r + sizeof *r, p1, n1);
    if (n2) memcpy((uint8_t *)r + sizeof *r + n1, p2, n2);
    w->tail += len;
    atomic_store_explicit(&w->hdr->tail, w->tail, memory_order_seq_cst);
    bool wake = atomic_load_explicit(&w->hdr->exec_sleeping, memory_order_seq_cst);
    pthread_mutex_unlock(&w->ring_lock);
    if (wake) {
        atomic_fetch_add(&w->hdr->bell, 1);
        fw_futex_wake(&w->hdr->bell);
    }
    return ACL_SUCCESS;
}

/* A synchronous call: one record, then its completion. o (4 words) and text (FWD_MSG_LEN)
 * may be NULL. */
static int fw_call(struct fwc *w, uint16_t op, const uint64_t *a, const void *p1, size_t n1, const void *p2,
                   size_t n2, uint64_t *o, char *text)
{
    struct fwd_compl *k = NULL;
    uint16_t slot = 0;
    for (;;) {
        for (int i = 0; i < FWD_NCOMPL && !k; i++) {
            uint32_t want = FWD_C_FREE;
            if (atomic_compare_exchange_strong(&w->compl[i].state, &want, FWD_C_POSTED)) {
                k = &w->compl[i];
                slot = (uint16_t)i;
            }
        }
        if (k) break;
        if (atomic_load(&w->lost)) return fw_set_msg(FWD_LOST, "device %d: the executor is gone", w->dev);
        usleep(100); /* more threads in synchronous calls than slots: rare */
    }
    int rc = fw_post(w, op, slot, a, p1, n1, p2, n2);
    if (rc) {
        atomic_store(&k->state, FWD_C_FREE);
        return rc;
    }
    uint64_t t0 = fx_now();
    while (atomic_load_explicit(&k->state, memory_order_acquire) != FWD_C_DONE) {
        if (atomic_load_explicit(&w->lost, memory_order_relaxed)) {
            /* the slot stays posted: nobody will complete it, and the connection is dead */
            return fw_set_msg(FWD_LOST, "device %d: the executor went away during the call", w->dev);
        }
        if (fx_now() - t0 < FWD_SPIN_NS) {
            sched_yield();
            continue;
        }
        atomic_store(&k->waiting, 1);
        if (atomic_load_explicit(&k->state, memory_order_seq_cst) != FWD_C_DONE)
            fw_futex_wait(&k->state, FWD_C_POSTED, 10000000ULL);
    }
    atomic_store(&k->waiting, 0);
    rc = k->rc;
    if (o) memcpy(o, k->o, sizeof k->o);
    if (rc) {
        memcpy(t_msg, k->msg, sizeof t_msg);
        t_msg[sizeof t_msg - 1] = 0;
    } else if (text) {
        memcpy(text, k->msg, FWD_MSG_LEN);
        text[FWD_MSG_LEN - 1] = 0;
    }
    atomic_store_explicit(&k->state, FWD_C_FREE, memory_order_release);
    return rc;
}

static int fw_call_simple(int dev, uint16_t op, uint64_t a0, uint64_t a1, uint64_t *o)
{
    struct fwc *w = fw_get(dev);
    if (!w) return t_rc;
    uint64_t a[6] = {a0, a1};
    return fw_call(w, op, a, NULL, 0, NULL, 0, o, NULL);
}

/* ---------------------------------------------------------------- the host arena */

/* The arena offset of [p, p+n) if it lies in w's arena; -1 otherwise. */
static int64_t fw_host_off(struct fwc *w, const void *p, size_t n)
{
    uintptr_t b = (uintptr_t)w->host, x = (uintptr_t)p;
    if (x < b || x - b > w->host_bytes || n > w->host_bytes - (x - b)) return -1;
    return (int64_t)(x - b);
}

static void *fw_host_alloc(struct fwc *w, size_t size)
{
    size = (size + 63) & ~(size_t)63;
    if (!size) size = 64;
    pthread_mutex_lock(&w->host_lock);
    if (!w->blk) {
        w->cap_blk = 64;
        w->blk = calloc((size_t)w->cap_blk, sizeof *w->blk);
        if (w->blk) {
            w->blk[0].off = 0;
            w->blk[0].size = w->host_bytes;
            w->nblk = 1;
        }
    }
    void *out = NULL;
    for (int i = 0; w->blk && i < w->nblk; i++) {
        if (w->blk[i].used || w->blk[i].size < size) continue;
        if (w->blk[i].size > size) { /* split */
            if (w->nblk == w->cap_blk) {
                void *nb = realloc(w->blk, (size_t)w->cap_blk * 2 * sizeof *w->blk);
                if (!nb) break;
                w->blk = nb;
                w->cap_blk *= 2;
            }
            memmove(&w->blk[i + 1], &w->blk[i], (size_t)(w->nblk - i) * sizeof *w->blk);
            w->nblk++;
            w->blk[i + 1].off = w->blk[i].off + size;
            w->blk[i + 1].size = w->blk[i].size - size;
            w->blk[i + 1].used = false;
            w->blk[i].size = size;
        }
        w->blk[i].used = true;
        out = w->host + w->blk[i].off;
        break;
    }
    pthread_mutex_unlock(&w->host_lock);
    return out;
}

static bool fw_host_free(struct fwc *w, void *p)
{
    int64_t off = fw_host_off(w, p, 0);
    if (off < 0) return false;
    bool ok = false;
    pthread_mutex_lock(&w->host_lock);
    for (int i = 0; i < w->nblk; i++) {
        if (w->blk[i].off != (uint64_t)off || !w->blk[i].used) continue;
        w->blk[i].used = false;
        if (i + 1 < w->nblk && !w->blk[i + 1].used) { /* merge with the next */
            w->blk[i].size += w->blk[i + 1].size;
            memmove(&w->blk[i + 1], &w->blk[i + 2], (size_t)(w->nblk - i - 2) * sizeof *w->blk);
            w->nblk--;
        }
        if (i > 0 && !w->blk[i - 1].used) { /* and the previous */
            w->blk[i - 1].size += w->blk[i].size;
            memmove(&w->blk[i], &w->blk[i + 1], (size_t)(w->nblk - i - 1) * sizeof *w->blk);
            w->nblk--;
        }
        ok = true;
        break;
    }
    pthread_mutex_unlock(&w->host_lock);
    return ok;
}

/* ---------------------------------------------------------------- device ranges */

/* The device memory this process holds (its allocations and imports), to tell the two sides
 * of an ACL_MEMCPY_DEFAULT copy apart. The executor checks every pointer again. */
static struct { uint64_t base, size; } *g_dr;
static int g_ndr, g_cap_dr;
static pthread_mutex_t g_dr_lock = PTHREAD_MUTEX_INITIALIZER;

static void fw_dr_add(uint64_t base, uint64_t size)
{
    pthread_mutex_lock(&g_dr_lock);
    if (g_ndr == g_cap_dr) {
        int n = g_cap_dr ? g_cap_dr * 2 : 64;
        void *p = realloc(g_dr, (size_t)n * sizeof *g_dr);
        if (!p) {
            pthread_mutex_unlock(&g_dr_lock);
            return;
        }
        g_dr = p;
        g_cap_dr = n;
    }
    int at = g_ndr;
    while (at > 0 && g_dr[at - 1].base > base) at--;
    memmove(&g_dr[at + 1], &g_dr[at], (size_t)(g_ndr - at) * sizeof *g_dr);
    g_dr[at].base = base;
    g_dr[at].size = size;
    g_ndr++;
    pthread_mutex_unlock(&g_dr_lock);
}

static void fw_dr_del(uint64_t base)
{
    pthread_mutex_lock(&g_dr_lock);
    for (int i = 0; i < g_ndr; i++)
        if (g_dr[i].base == base) {
            memmove(&g_dr[i], &g_dr[i + 1], (size_t)(g_ndr - i - 1) * sizeof *g_dr);
            g_ndr--;
            break;
        }
    pthread_mutex_unlock(&g_dr_lock);
}

static bool fw_is_dev(const void *p)
{
    uint64_t x = (uint64_t)(uintptr_t)p;
    bool in = false;
    pthread_mutex_lock(&g_dr_lock);
    for (int i = 0; i < g_ndr && !in; i++) in = x >= g_dr[i].base && x - g_dr[i].base < g_dr[i].size;
    pthread_mutex_unlock(&g_dr_lock);
    return in;
}

/* ACL_MEMCPY_DEFAULT: the direction from where each side lies (unified addressing). */
static aclrtMemcpyKind fw_kind(aclrtMemcpyKind kind, const void *dst, const void *src)
{
    if (kind != ACL_MEMCPY_DEFAULT) return kind;
    bool d = fw_is_dev(dst), s = fw_is_dev(src);
    return d && s ? ACL_MEMCPY_DEVICE_TO_DEVICE : d ? ACL_MEMCPY_HOST_TO_DEVICE : s ? ACL_MEMCPY_DEVICE_TO_HOST
                                                                                     : ACL_MEMCPY_HOST_TO_HOST;
}

/* ---------------------------------------------------------------- kernels */

/* The built-in of each function handle (-1: opaque), from the kernel library it came from:
 * a launch is checked here as the runtime checks it at the call (arguments, blockDim, memory
 * its pointers name), so its errors come at the call, not at the next synchronisation. */
static int16_t g_func_builtin[FWD_MAX_FUNCS];

static int fw_check_launch(aclrtFuncHandle f, uint32_t blockDim, const void *args, size_t size, int dev)
{
    if (fw_dev_of((uint64_t)(uintptr_t)f, FWD_H_FUNC, g_h_func, FWD_MAX_FUNCS) != dev)
        return fw_set_msg(ACL_ERROR_INVALID_PARAM, "%p is not a kernel of this process on the stream's device", f);
    if (blockDim == 0) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "blockDim is 0");
    int b = g_func_builtin[fwd_handle_index((uint64_t)(uintptr_t)f, FWD_H_FUNC)];
    if (b < 0) return ACL_SUCCESS;
    struct emu_cost cost;
    struct emu_range r[4];
    int n = 0;
    int rc = emu_kernel_prepare(b, args, size, &cost, r, &n);
    if (rc) return fw_set_msg(rc, "bad arguments for a %s kernel", emu_builtin_name(b));
    for (int i = 0; i < n; i++) {
        bool in = false;
        pthread_mutex_lock(&g_dr_lock);
        for (int k = 0; k < g_ndr && !in; k++)
            in = r[i].ptr >= g_dr[k].base && r[i].ptr - g_dr[k].base < g_dr[k].size &&
                 r[i].bytes <= g_dr[k].size - (r[i].ptr - g_dr[k].base);
        pthread_mutex_unlock(&g_dr_lock);
        if (!in) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "argument %d is not inside a device allocation", i);
    }
    return ACL_SUCCESS;
}

/* ---------------------------------------------------------------- the profile's calls */

FX_EXPORT aclError fxf_aclrtSetDevice(int32_t deviceId)
{
    if (!g_acl_inited) return fw_set_msg(ACL_ERROR_UNINITIALIZE, "aclInit has not been called");
    if (deviceId < 0 || deviceId >= FX_MAX_DEVICES)
        return fw_set_msg(ACL_ERROR_RT_INVALID_DEVICEID, "device %d does not exist", deviceId);
    struct fwc *w = fw_get(deviceId);
    if (!w && t_rc == ACL_ERROR_RT_NO_DEVICE) t_rc = ACL_ERROR_RT_INVALID_DEVICEID; /* as the runtime says it */
    if (!w) return t_rc;
    pthread_mutex_lock(&g_fw_lock);
    w->refs++;
    pthread_mutex_unlock(&g_fw_lock);
    t_fdev = deviceId;
    atomic_store(&g_last_fdev, deviceId);
    return ACL_SUCCESS;
}

FX_EXPORT aclError fxf_aclrtResetDevice(int32_t deviceId)
{
    if (deviceId < 0 || deviceId >= FX_MAX_DEVICES || !atomic_load(&g_fwc[deviceId]))
        return fw_set_msg(ACL_ERROR_RT_INVALID_DEVICEID, "device %d was not set", deviceId);
    struct fwc *w = atomic_load(&g_fwc[deviceId]);
    uint64_t a[6] = {(uint64_t)-1};
    fw_call(w, FWD_DEVICE_SYNC, a, NULL, 0, NULL, 0, NULL, NULL);
    /* the connection stays: the executor frees what the process holds when it exits. Resetting
     * releases nothing early here (documented in docs/compatibility.md). */
    pthread_mutex_lock(&g_fw_lock);
    if (w->refs > 0) w->refs--;
    pthread_mutex_unlock(&g_fw_lock);
    return ACL_SUCCESS;
}

FX_EXPORT aclError fxf_aclrtGetDevice(int32_t *deviceId)
{
    if (!deviceId) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "deviceId is NULL");
    int d = fw_cur_dev();
    if (d < 0) return fw_set_msg(ACL_ERROR_RT_CONTEXT_NULL, "no device is set (aclrtSetDevice)");
    *deviceId = d;
    return ACL_SUCCESS;
}

FX_EXPORT aclError fxf_aclrtGetDeviceCount(uint32_t *count)
{
    if (!count) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "count is NULL");
    /* the devices served by an executor here */
    uint32_t n = 0;
    for (int d = 0; d < FX_MAX_DEVICES; d++) {
        char path[320];
        snprintf(path, sizeof path, "%s/exec-%d.sock", g_rundir, d);
        if (access(path, F_OK) == 0) n = (uint32_t)d + 1;
    }
    *count = n;
    return n ? ACL_SUCCESS : fw_set_msg(ACL_ERROR_RT_NO_DEVICE, "no device executor in %s", g_rundir);
}

FX_EXPORT aclError fxf_aclrtCreateContext(aclrtContext *context, int32_t deviceId)
{
    if (!context) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "context is NULL");
    int rc = fxf_aclrtSetDevice(deviceId);
    if (rc) return rc;
    int i = fw_take(g_h_ctx, 256, deviceId);
    if (i < 0) return fw_set_msg(ACL_ERROR_RT_RESOURCE_ALLOC_FAIL, "too many contexts");
    *context = (aclrtContext)(uintptr_t)fwd_handle(FWD_H_CTX, (uint32_t)i);
    return ACL_SUCCESS;
}

FX_EXPORT aclError fxf_aclrtDestroyContext(aclrtContext context)
{
    if (fw_dev_of((uint64_t)(uintptr_t)context, FWD_H_CTX, g_h_ctx, 256) < 0)
        return fw_set_msg(ACL_ERROR_INVALID_PARAM, "not a context of this process");
    fw_release(g_h_ctx, 256, (uint64_t)(uintptr_t)context, FWD_H_CTX);
    return ACL_SUCCESS;
}

FX_EXPORT aclError fxf_aclrtSetCurrentContext(aclrtContext context)
{
    int d = fw_dev_of((uint64_t)(uintptr_t)context, FWD_H_CTX, g_h_ctx, 256);
    if (d < 0) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "not a context of this process");
    t_fdev = d;
    atomic_store(&g_last_fdev, d);
    return ACL_SUCCESS;
}

FX_EXPORT aclError fxf_aclrtMalloc(void **devPtr, size_t size, aclrtMemMallocPolicy policy)
{
    if (!devPtr) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "devPtr is NULL");
    uint64_t o[4] = {0};
    int rc = fw_call_simple(fw_cur_dev(), FWD_MALLOC, size, (uint64_t)policy, o);
    if (!rc) {
        *devPtr = (void *)(uintptr_t)o[0];
        fw_dr_add(o[0], size);
    }
    return rc;
}

FX_EXPORT aclError fxf_aclrtFree(void *devPtr)
{
    int rc = fw_call_simple(fw_cur_dev(), FWD_FREE, (uint64_t)(uintptr_t)devPtr, 0, NULL);
    if (!rc) fw_dr_del((uint64_t)(uintptr_t)devPtr);
    return rc;
}

FX_EXPORT aclError fxf_aclrtGetMemInfo(aclrtMemAttr attr, size_t *free_, size_t *total)
{
    if (!free_ || !total) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "free or total is NULL");
    uint64_t o[4] = {0};
    int rc = fw_call_simple(fw_cur_dev(), FWD_MEM_INFO, (uint64_t)attr, 0, o);
    if (!rc) {
        *free_ = o[0];
        *total = o[1];
    }
    return rc;
}

/* The device of a stream handle (NULL: the thread's device); -1 if not one of ours. */
static int fw_stream_dev(aclrtStream s)
{
    if (!s) return fw_cur_dev();
    return fw_dev_of((uint64_t)(uintptr_t)s, FWD_H_STREAM, g_h_stream, FWD_MAX_STREAMS);
}

static struct fwc *fw_for_stream(aclrtStream s, int *rc)
{
    int d = fw_stream_dev(s);
    if (d < 0) {
        *rc = fw_set_msg(ACL_ERROR_INVALID_PARAM, "%p is not a stream of this process", s);
        return NULL;
    }
    struct fwc *w = fw_get(d);
    if (!w) *rc = t_rc;
    return w;
}

FX_EXPORT aclError fxf_aclrtLaunchKernel(aclrtFuncHandle funcHandle, uint32_t blockDim, const void *argsData,
                                         size_t argsSize, aclrtStream stream)
{
    int rc = ACL_SUCCESS;
    struct fwc *w = fw_for_stream(stream, &rc);
    if (!w) return rc;
    if (argsSize && !argsData) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "argsData is NULL");
    if (argsSize > 65536) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "argsSize %zu is too large", argsSize);
    if ((rc = fw_check_launch(funcHandle, blockDim, argsData, argsSize, w->dev))) return rc;
    uint64_t a[6] = {(uint64_t)(uintptr_t)funcHandle, blockDim, (uint64_t)(uintptr_t)stream};
    return fw_post(w, FWD_LAUNCH, 0, a, argsData, argsSize, NULL, 0);
}

/* A copy whose host side is pageable memory, through the staging area, chunk by chunk;
 * synchronous. */
static int fw_copy_staged(struct fwc *w, void *dst, const void *src, size_t count, int kind)
{
    pthread_mutex_lock(&w->stage_lock);
    int rc = ACL_SUCCESS;
    for (size_t done = 0; done < count && !rc; done += FWD_STAGE_BYTES) {
        size_t n = count - done < FWD_STAGE_BYTES ? count - done : FWD_STAGE_BYTES;
        if (kind == ACL_MEMCPY_HOST_TO_DEVICE) {
            memcpy(w->stage, (const uint8_t *)src + done, n);
            uint64_t a[6] = {(uint64_t)(uintptr_t)dst + done, n, 0, n, (uint64_t)kind, 1};
            rc = fw_call(w, FWD_COPY, a, NULL, 0, NULL, 0, NULL, NULL);
        } else {
            uint64_t a[6] = {0, n, (uint64_t)(uintptr_t)src + done, n, (uint64_t)kind, 1};
            rc = fw_call(w, FWD_COPY, a, NULL, 0, NULL, 0, NULL, NULL);
            if (!rc) memcpy((uint8_t *)dst + done, w->stage, n);
        }
    }
    pthread_mutex_unlock(&w->stage_lock);
    return rc;
}

FX_EXPORT aclError fxf_aclrtMemcpy(void *dst, size_t destMax, const void *src, size_t count, aclrtMemcpyKind kind)
{
    if (count > destMax) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "count %zu > destMax %zu", count, destMax);
    if (!count) return ACL_SUCCESS;
    if (!dst || !src) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "dst or src is NULL");
    kind = fw_kind(kind, dst, src);
    if (kind == ACL_MEMCPY_HOST_TO_HOST) {
        memmove(dst, src, count);
        return ACL_SUCCESS;
    }
    struct fwc *w = fw_get(fw_cur_dev());
    if (!w) return t_rc;
    const void *host = kind == ACL_MEMCPY_HOST_TO_DEVICE ? src : kind == ACL_MEMCPY_DEVICE_TO_HOST ? dst : NULL;
    if (kind != ACL_MEMCPY_HOST_TO_DEVICE && kind != ACL_MEMCPY_DEVICE_TO_HOST && kind != ACL_MEMCPY_DEVICE_TO_DEVICE)
        return fw_set_msg(ACL_ERROR_INVALID_PARAM, "aclrtMemcpy kind %d is not a copy kind", (int)kind);
    if (host && fw_is_dev(host))
        return fw_set_msg(ACL_ERROR_INVALID_PARAM, "the host side of the copy is device memory");
    if (host && fw_host_off(w, host, count) < 0) return fw_copy_staged(w, dst, src, count, kind);
    uint64_t a[6] = {(uint64_t)(uintptr_t)dst, destMax, (uint64_t)(uintptr_t)src, count, (uint64_t)kind, 0};
    return fw_call(w, FWD_COPY, a, NULL, 0, NULL, 0, NULL, NULL);
}

FX_EXPORT aclError fxf_aclrtMemcpyAsync(void *dst, size_t destMax, const void *src, size_t count,
                                        aclrtMemcpyKind kind, aclrtStream stream)
{
    if (count > destMax) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "count %zu > destMax %zu", count, destMax);
    if (!count) return ACL_SUCCESS;
    if (!dst || !src) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "dst or src is NULL");
    kind = fw_kind(kind, dst, src);
    int rc = ACL_SUCCESS;
    struct fwc *w = fw_for_stream(stream, &rc);
    if (!w) return rc;
    if (kind == ACL_MEMCPY_HOST_TO_HOST) {
        /* in stream order: after the stream's work */
        uint64_t a[6] = {(uint64_t)(uintptr_t)stream, (uint64_t)-1};
        rc = fw_call(w, FWD_STREAM_SYNC, a, NULL, 0, NULL, 0, NULL, NULL);
        if (!rc) memmove(dst, src, count);
        return rc;
    }
    if ((kind == ACL_MEMCPY_HOST_TO_DEVICE && fw_is_dev(src)) || (kind == ACL_MEMCPY_DEVICE_TO_HOST && fw_is_dev(dst)))
        return fw_set_msg(ACL_ERROR_INVALID_PARAM, "the host side of the copy is device memory");
    if (kind == ACL_MEMCPY_HOST_TO_DEVICE && fw_host_off(w, src, count) < 0) {
        /* pageable: the bytes travel in the records (taken now, as the runtime would stage them) */
        for (size_t done = 0; done < count && !rc; done += FWD_INLINE_MAX) {
            size_t n = count - done < FWD_INLINE_MAX ? count - done : FWD_INLINE_MAX;
            uint64_t a[6] = {(uint64_t)(uintptr_t)dst + done, n, 0, n, (uint64_t)kind, (uint64_t)(uintptr_t)stream};
            rc = fw_post(w, FWD_COPY_ASYNC, 0, a, (const uint8_t *)src + done, n, NULL, 0);
        }
        return rc;
    }
    if (kind == ACL_MEMCPY_DEVICE_TO_HOST && fw_host_off(w, dst, count) < 0) {
        /* pageable destination: synchronous, after the stream's work (as CUDA does) */
        uint64_t a[6] = {(uint64_t)(uintptr_t)stream, (uint64_t)-1};
        rc = fw_call(w, FWD_STREAM_SYNC, a, NULL, 0, NULL, 0, NULL, NULL);
        return rc ? rc : fw_copy_staged(w, dst, src, count, kind);
    }
    if (kind != ACL_MEMCPY_HOST_TO_DEVICE && kind != ACL_MEMCPY_DEVICE_TO_HOST && kind != ACL_MEMCPY_DEVICE_TO_DEVICE)
        return fw_set_msg(ACL_ERROR_INVALID_PARAM, "aclrtMemcpyAsync kind %d is not a copy kind", (int)kind);
    uint64_t a[6] = {(uint64_t)(uintptr_t)dst, destMax, (uint64_t)(uintptr_t)src, count, (uint64_t)kind,
                     (uint64_t)(uintptr_t)stream};
    return fw_post(w, FWD_COPY_ASYNC, 0, a, NULL, 0, NULL, 0);
}

FX_EXPORT aclError fxf_aclrtMemset(void *devPtr, size_t maxCount, int32_t value, size_t count)
{
    struct fwc *w = fw_get(fw_cur_dev());
    if (!w) return t_rc;
    uint64_t a[6] = {(uint64_t)(uintptr_t)devPtr, maxCount, (uint64_t)(uint32_t)value, count};
    return fw_call(w, FWD_MEMSET, a, NULL, 0, NULL, 0, NULL, NULL);
}

FX_EXPORT aclError fxf_aclrtMemsetAsync(void *devPtr, size_t maxCount, int32_t value, size_t count,
                                        aclrtStream stream)
{
    int rc = ACL_SUCCESS;
    struct fwc *w = fw_for_stream(stream, &rc);
    if (!w) return rc;
    uint64_t a[6] = {(uint64_t)(uintptr_t)devPtr, maxCount, (uint64_t)(uint32_t)value, count,
                     (uint64_t)(uintptr_t)stream};
    return fw_post(w, FWD_MEMSET_ASYNC, 0, a, NULL, 0, NULL, 0);
}

static int fw_event_dev(aclrtEvent e)
{
    return fw_dev_of((uint64_t)(uintptr_t)e, FWD_H_EVENT, g_h_event, FWD_MAX_EVENTS);
}

FX_EXPORT aclError fxf_aclrtRecordEvent(aclrtEvent event, aclrtStream stream)
{
    int rc = ACL_SUCCESS;
    struct fwc *w = fw_for_stream(stream, &rc);
    if (!w) return rc;
    if (fw_event_dev(event) != w->dev) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "the event is not of the stream's device");
    uint64_t a[6] = {(uint64_t)(uintptr_t)event, (uint64_t)(uintptr_t)stream};
    return fw_post(w, FWD_RECORD, 0, a, NULL, 0, NULL, 0);
}

FX_EXPORT aclError fxf_aclrtStreamWaitEvent(aclrtStream stream, aclrtEvent event)
{
    int rc = ACL_SUCCESS;
    struct fwc *w = fw_for_stream(stream, &rc);
    if (!w) return rc;
    if (fw_event_dev(event) != w->dev)
        return fw_set_msg(fw_event_dev(event) < 0 ? ACL_ERROR_INVALID_PARAM : ACL_ERROR_API_NOT_SUPPORT,
                          "%p is not an event of this process on the stream's device", event);
    uint64_t a[6] = {(uint64_t)(uintptr_t)stream, (uint64_t)(uintptr_t)event};
    return fw_post(w, FWD_WAIT_EVENT, 0, a, NULL, 0, NULL, 0);
}

static int fw_stream_sync(aclrtStream stream, int32_t timeout)
{
    if (timeout < -1) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "timeout %d: -1 (none) or >= 0 ms", timeout);
    int rc = ACL_SUCCESS;
    struct fwc *w = fw_for_stream(stream, &rc);
    if (!w) return rc;
    uint64_t a[6] = {(uint64_t)(uintptr_t)stream, (uint64_t)(int64_t)timeout};
    return fw_call(w, FWD_STREAM_SYNC, a, NULL, 0, NULL, 0, NULL, NULL);
}

FX_EXPORT aclError fxf_aclrtSynchronizeStream(aclrtStream stream) { return fw_stream_sync(stream, -1); }
FX_EXPORT aclError fxf_aclrtSynchronizeStreamWithTimeout(aclrtStream stream, int32_t timeout)
{
    return fw_stream_sync(stream, timeout);
}

FX_EXPORT aclError fxf_aclrtSynchronizeDevice(void)
{
    return fw_call_simple(fw_cur_dev(), FWD_DEVICE_SYNC, (uint64_t)-1, 0, NULL);
}

FX_EXPORT aclError fxf_aclrtSynchronizeDeviceWithTimeout(int32_t timeout)
{
    if (timeout < -1) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "timeout %d: -1 (none) or >= 0 ms", timeout);
    return fw_call_simple(fw_cur_dev(), FWD_DEVICE_SYNC, (uint64_t)(int64_t)timeout, 0, NULL);
}

static int fw_event_sync(aclrtEvent event, int32_t timeout)
{
    if (timeout < -1) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "timeout %d: -1 (none) or >= 0 ms", timeout);
    int d = fw_event_dev(event);
    if (d < 0) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "%p is not an event of this process", event);
    return fw_call_simple(d, FWD_EVENT_SYNC, (uint64_t)(uintptr_t)event, (uint64_t)(int64_t)timeout, NULL);
}

FX_EXPORT aclError fxf_aclrtSynchronizeEvent(aclrtEvent event) { return fw_event_sync(event, -1); }
FX_EXPORT aclError fxf_aclrtSynchronizeEventWithTimeout(aclrtEvent event, int32_t timeout)
{
    return fw_event_sync(event, timeout);
}

/* ---------------------------------------------------------------- calls the profile does not wrap */

FX_EXPORT aclError aclInit(const char *configPath)
{
    if (g_acl_inited) return fw_set_msg(ACL_ERROR_REPEAT_INITIALIZE, "aclInit was already called");
    if (configPath && *configPath && access(configPath, R_OK) != 0)
        return fw_set_msg(ACL_ERROR_INVALID_FILE, "cannot read config file %s", configPath);
    g_acl_inited = true;
    g_acl_finalized = false;
    return ACL_SUCCESS;
}

FX_EXPORT aclError aclFinalize(void)
{
    if (!g_acl_inited)
        return g_acl_finalized ? fw_set_msg(ACL_ERROR_REPEAT_FINALIZE, "aclFinalize was already called")
                               : fw_set_msg(ACL_ERROR_UNINITIALIZE, "aclInit has not been called");
    g_acl_inited = false;
    g_acl_finalized = true;
    return ACL_SUCCESS;
}

FX_EXPORT const char *aclGetRecentErrMsg(void)
{
    if (t_msg[0]) return t_msg;
    static const char *(*real)(void);
    if (!real) real = (const char *(*)(void))fx_lookup_real("aclGetRecentErrMsg");
    return real ? real() : NULL;
}

FX_EXPORT aclError aclrtGetRunMode(aclrtRunMode *runMode)
{
    if (!runMode) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "runMode is NULL");
    *runMode = ACL_HOST;
    return ACL_SUCCESS;
}

FX_EXPORT const char *aclrtGetSocName(void)
{
    static char name[FWD_MSG_LEN];
    int d = fw_cur_dev();
    struct fwc *w = d >= 0 ? fw_get(d) : fw_get(0);
    if (!w) return NULL;
    if (fw_call(w, FWD_SOC_NAME, NULL, NULL, 0, NULL, 0, NULL, name)) return NULL;
    return name;
}

FX_EXPORT aclError aclrtGetCurrentContext(aclrtContext *context)
{
    if (!context) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "context is NULL");
    if (fw_cur_dev() < 0) return fw_set_msg(ACL_ERROR_RT_CONTEXT_NULL, "no context is current");
    *context = t_ctx ? t_ctx : (aclrtContext)(uintptr_t)fwd_handle(FWD_H_CTX, 0xffff0000u + (uint32_t)fw_cur_dev());
    return ACL_SUCCESS;
}

static int fw_stream_create(aclrtStream *stream, uint32_t priority, uint32_t flag)
{
    if (!stream) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "stream is NULL");
    int d = fw_cur_dev();
    struct fwc *w = fw_get(d);
    if (!w) return t_rc;
    int i = fw_take(g_h_stream, FWD_MAX_STREAMS, d);
    if (i < 0) return fw_set_msg(ACL_ERROR_RT_NO_STREAM_RESOURCE, "too many streams");
    uint64_t h = fwd_handle(FWD_H_STREAM, (uint32_t)i);
    uint64_t a[6] = {h, priority, flag};
    int rc = fw_call(w, FWD_STREAM_CREATE, a, NULL, 0, NULL, 0, NULL, NULL);
    if (rc) fw_release(g_h_stream, FWD_MAX_STREAMS, h, FWD_H_STREAM);
    else *stream = (aclrtStream)(uintptr_t)h;
    return rc;
}

FX_EXPORT aclError aclrtCreateStream(aclrtStream *stream) { return fw_stream_create(stream, 0, 0); }
FX_EXPORT aclError aclrtCreateStreamWithConfig(aclrtStream *stream, uint32_t priority, uint32_t flag)
{
    return fw_stream_create(stream, priority, flag);
}

FX_EXPORT aclError aclrtDestroyStream(aclrtStream stream)
{
    int rc = ACL_SUCCESS;
    if (!stream) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "stream is NULL");
    struct fwc *w = fw_for_stream(stream, &rc);
    if (!w) return rc;
    uint64_t a[6] = {(uint64_t)(uintptr_t)stream};
    rc = fw_call(w, FWD_STREAM_DESTROY, a, NULL, 0, NULL, 0, NULL, NULL);
    if (!rc) fw_release(g_h_stream, FWD_MAX_STREAMS, (uint64_t)(uintptr_t)stream, FWD_H_STREAM);
    return rc;
}

FX_EXPORT aclError aclrtStreamQuery(aclrtStream stream, aclrtStreamStatus *status)
{
    int rc = ACL_SUCCESS;
    if (!status) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "status is NULL");
    struct fwc *w = fw_for_stream(stream, &rc);
    if (!w) return rc;
    uint64_t a[6] = {(uint64_t)(uintptr_t)stream}, o[4] = {0};
    rc = fw_call(w, FWD_STREAM_QUERY, a, NULL, 0, NULL, 0, o, NULL);
    if (!rc) *status = (aclrtStreamStatus)o[0];
    return rc;
}

FX_EXPORT aclError aclrtMallocHost(void **hostPtr, size_t size)
{
    if (!hostPtr || !size) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "hostPtr is NULL or size is 0");
    struct fwc *w = fw_get(fw_cur_dev());
    if (!w) return t_rc;
    void *p = fw_host_alloc(w, size);
    if (!p) return fw_set_msg(ACL_ERROR_RT_MEMORY_ALLOCATION, "the forwarded host memory (%llu bytes, "
                              "FLEXNPU_FWD_HOST_MEM) has no %zu bytes free", (unsigned long long)w->host_bytes, size);
    *hostPtr = p;
    return ACL_SUCCESS;
}

FX_EXPORT aclError aclrtFreeHost(void *hostPtr)
{
    for (int d = 0; d < FX_MAX_DEVICES; d++) {
        struct fwc *w = atomic_load(&g_fwc[d]);
        if (w && fw_host_free(w, hostPtr)) return ACL_SUCCESS;
    }
    return fw_set_msg(ACL_ERROR_INVALID_PARAM, "%p is not host memory from aclrtMallocHost", hostPtr);
}

static int fw_event_create(aclrtEvent *event, uint32_t flag)
{
    if (!event) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "event is NULL");
    int d = fw_cur_dev();
    struct fwc *w = fw_get(d);
    if (!w) return t_rc;
    int i = fw_take(g_h_event, FWD_MAX_EVENTS, d);
    if (i < 0) return fw_set_msg(ACL_ERROR_RT_NO_EVENT_RESOURCE, "too many events");
    uint64_t h = fwd_handle(FWD_H_EVENT, (uint32_t)i);
    uint64_t a[6] = {h, flag};
    int rc = fw_call(w, FWD_EVENT_CREATE, a, NULL, 0, NULL, 0, NULL, NULL);
    if (rc) fw_release(g_h_event, FWD_MAX_EVENTS, h, FWD_H_EVENT);
    else *event = (aclrtEvent)(uintptr_t)h;
    return rc;
}

FX_EXPORT aclError aclrtCreateEvent(aclrtEvent *event) { return fw_event_create(event, ACL_EVENT_SYNC); }
FX_EXPORT aclError aclrtCreateEventWithFlag(aclrtEvent *event, uint32_t flag) { return fw_event_create(event, flag); }

static int fw_event_simple(aclrtEvent e, uint16_t op, uint64_t a1, uint64_t *o)
{
    int d = fw_event_dev(e);
    if (d < 0) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "%p is not an event of this process", e);
    return fw_call_simple(d, op, (uint64_t)(uintptr_t)e, a1, o);
}

FX_EXPORT aclError aclrtDestroyEvent(aclrtEvent event)
{
    int rc = fw_event_simple(event, FWD_EVENT_DESTROY, 0, NULL);
    if (!rc) fw_release(g_h_event, FWD_MAX_EVENTS, (uint64_t)(uintptr_t)event, FWD_H_EVENT);
    return rc;
}

FX_EXPORT aclError aclrtQueryEvent(aclrtEvent event, aclrtEventStatus *status)
{
    if (!status) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "status is NULL");
    uint64_t o[4] = {0};
    int rc = fw_event_simple(event, FWD_EVENT_QUERY, 0, o);
    if (!rc) *status = (aclrtEventStatus)o[0];
    return rc;
}

FX_EXPORT aclError aclrtQueryEventStatus(aclrtEvent event, aclrtEventRecordedStatus *status)
{
    if (!status) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "status is NULL");
    uint64_t o[4] = {0};
    int rc = fw_event_simple(event, FWD_EVENT_STATUS, 0, o);
    if (!rc) *status = (aclrtEventRecordedStatus)o[0];
    return rc;
}

FX_EXPORT aclError aclrtEventElapsedTime(float *ms, aclrtEvent startEvent, aclrtEvent endEvent)
{
    if (!ms) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "ms is NULL");
    uint64_t o[4] = {0};
    int rc = fw_event_simple(startEvent, FWD_EVENT_ELAPSED, (uint64_t)(uintptr_t)endEvent, o);
    if (!rc) memcpy(ms, &o[0], sizeof *ms);
    return rc;
}

static int fw_bin_load(const void *data, size_t length, aclrtBinHandle *binHandle)
{
    if (!data || !length || !binHandle) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "data, length or binHandle is empty");
    if (length > FWD_RING_BYTES / 4) return fw_set_msg(ACL_ERROR_API_NOT_SUPPORT, "a binary of %zu bytes is too large "
                                                       "to forward (at most %u)", length, FWD_RING_BYTES / 4);
    int d = fw_cur_dev();
    if (d < 0 && g_acl_inited) {
        /* the runtime loads a binary before any device is set; its kernels then run on the
         * program's first device, whose executor holds it (fx_phys_of: virtual 0) */
        int32_t phys = 0;
        if (fx_phys_of(0, &phys) == FX_SUCCESS) d = phys;
    }
    struct fwc *w = fw_get(d);
    if (!w) return t_rc;
    int i = fw_take(g_h_bin, FWD_MAX_BINS, d);
    if (i < 0) return fw_set_msg(ACL_ERROR_RT_RESOURCE_ALLOC_FAIL, "too many binaries");
    uint64_t h = fwd_handle(FWD_H_BIN, (uint32_t)i);
    uint64_t a[6] = {h};
    int rc = fw_call(w, FWD_BIN_LOAD, a, data, length, NULL, 0, NULL, NULL);
    if (rc) fw_release(g_h_bin, FWD_MAX_BINS, h, FWD_H_BIN);
    else {
        *binHandle = (aclrtBinHandle)(uintptr_t)h;
        free(g_bins[i].names);
        ex_kernel_library_parse(&g_bins[i], data, length); /* the same reading as the executor's */
    }
    return rc;
}

FX_EXPORT aclError aclrtBinaryLoadFromData(const void *data, size_t length, const aclrtBinaryLoadOptions *options,
                                           aclrtBinHandle *binHandle)
{
    (void)options;
    return fw_bin_load(data, length, binHandle);
}

FX_EXPORT aclError aclrtBinaryLoadFromFile(const char *binPath, aclrtBinaryLoadOptions *options,
                                           aclrtBinHandle *binHandle)
{
    (void)options;
    if (!binPath) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "binPath is NULL");
    /* read here, with this process's own rights: the executor never opens a client's path */
    int fd = open(binPath, O_RDONLY | O_CLOEXEC);
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        if (fd >= 0) close(fd);
        return fw_set_msg(ACL_ERROR_INVALID_FILE, "cannot open %s: %s", binPath, strerror(errno ? errno : EINVAL));
    }
    size_t n = (size_t)sb.st_size;
    if (n > FWD_RING_BYTES / 4) {
        close(fd);
        return fw_set_msg(ACL_ERROR_API_NOT_SUPPORT, "%s: a binary of %zu bytes is too large to forward", binPath, n);
    }
    char *buf = malloc(n ? n : 1);
    size_t got = 0;
    while (buf && got < n) {
        ssize_t k = read(fd, buf + got, n - got);
        if (k <= 0) break;
        got += (size_t)k;
    }
    close(fd);
    int rc = buf && got == n ? fw_bin_load(buf, n, binHandle) : fw_set_msg(ACL_ERROR_INVALID_FILE, "cannot read %s", binPath);
    free(buf);
    return rc;
}

FX_EXPORT aclError aclrtBinaryUnLoad(aclrtBinHandle binHandle)
{
    int d = fw_dev_of((uint64_t)(uintptr_t)binHandle, FWD_H_BIN, g_h_bin, FWD_MAX_BINS);
    if (d < 0) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "%p is not a binary of this process", binHandle);
    int rc = fw_call_simple(d, FWD_BIN_UNLOAD, (uint64_t)(uintptr_t)binHandle, 0, NULL);
    if (!rc) {
        pthread_mutex_lock(&g_fw_lock);
        g_h_bin[fwd_handle_index((uint64_t)(uintptr_t)binHandle, FWD_H_BIN)] = -1;
        pthread_mutex_unlock(&g_fw_lock);
    }
    return rc;
}

FX_EXPORT aclError aclrtBinaryGetFunction(const aclrtBinHandle binHandle, const char *kernelName,
                                          aclrtFuncHandle *funcHandle)
{
    if (!kernelName || !funcHandle) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "kernelName or funcHandle is NULL");
    int d = fw_dev_of((uint64_t)(uintptr_t)binHandle, FWD_H_BIN, g_h_bin, FWD_MAX_BINS);
    if (d < 0) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "%p is not a binary of this process", binHandle);
    struct fwc *w = fw_get(d);
    if (!w) return t_rc;
    int i = fw_take(g_h_func, FWD_MAX_FUNCS, d);
    if (i < 0) return fw_set_msg(ACL_ERROR_RT_RESOURCE_ALLOC_FAIL, "too many kernels");
    uint64_t h = fwd_handle(FWD_H_FUNC, (uint32_t)i);
    uint64_t a[6] = {(uint64_t)(uintptr_t)binHandle, h};
    size_t n = strnlen(kernelName, FWD_NAME_LEN);
    int rc = fw_call(w, FWD_BIN_FUNC, a, kernelName, n, NULL, 0, NULL, NULL);
    if (rc) fw_release(g_h_func, FWD_MAX_FUNCS, h, FWD_H_FUNC);
    else {
        *funcHandle = (aclrtFuncHandle)(uintptr_t)h;
        struct ex_bin *b = &g_bins[fwd_handle_index((uint64_t)(uintptr_t)binHandle, FWD_H_BIN)];
        g_func_builtin[i] = (int16_t)ex_kernel_builtin_of(b, kernelName);
    }
    return rc;
}

/* ---- IPC memory: keys made by the executor; imports of another client of the same executor
 * are the same memory */

FX_EXPORT aclError aclrtIpcMemGetExportKey(void *devPtr, size_t size, char *key, size_t len, uint64_t flags)
{
    if (!key || len < EX_KEY_LEN) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "key is NULL or len < %d", EX_KEY_LEN);
    struct fwc *w = fw_get(fw_cur_dev());
    if (!w) return t_rc;
    uint64_t a[6] = {(uint64_t)(uintptr_t)devPtr, size, flags};
    char text[FWD_MSG_LEN] = {0};
    int rc = fw_call(w, FWD_IPC_EXPORT, a, NULL, 0, NULL, 0, NULL, text);
    if (!rc) snprintf(key, len, "%s", text);
    return rc;
}

FX_EXPORT aclError aclrtIpcMemSetImportPid(const char *key, int32_t *pid, size_t num)
{
    if (!key || !pid || !num || num > 64) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "key or pid is NULL, or num is not 1-64");
    struct fwc *w = fw_get(fw_cur_dev());
    if (!w) return t_rc;
    char k[EX_KEY_LEN] = {0};
    snprintf(k, sizeof k, "%s", key);
    uint64_t a[6] = {0, num};
    return fw_call(w, FWD_IPC_SET_PID, a, k, sizeof k, pid, num * sizeof(int32_t), NULL, NULL);
}

FX_EXPORT aclError aclrtIpcMemImportByKey(void **devPtr, const char *key, uint64_t flags)
{
    if (!devPtr || !key) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "devPtr or key is NULL");
    struct fwc *w = fw_get(fw_cur_dev());
    if (!w) return t_rc;
    char k[EX_KEY_LEN] = {0};
    snprintf(k, sizeof k, "%s", key);
    uint64_t a[6] = {flags}, o[4] = {0};
    int rc = fw_call(w, FWD_IPC_IMPORT, a, k, sizeof k, NULL, 0, o, NULL);
    if (!rc) {
        *devPtr = (void *)(uintptr_t)o[0];
        fw_dr_add(o[0], o[1] ? o[1] : 1);
    }
    return rc;
}

FX_EXPORT aclError aclrtIpcMemClose(const char *key)
{
    if (!key) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "key is NULL");
    struct fwc *w = fw_get(fw_cur_dev());
    if (!w) return t_rc;
    char k[EX_KEY_LEN] = {0};
    snprintf(k, sizeof k, "%s", key);
    return fw_call(w, FWD_IPC_CLOSE, NULL, k, sizeof k, NULL, 0, NULL, NULL);
}

FX_EXPORT aclError aclrtDeviceGetBareTgid(int32_t *pid)
{
    if (!pid) return fw_set_msg(ACL_ERROR_INVALID_PARAM, "pid is NULL");
    *pid = (int32_t)getpid(); /* the executor knows this process by its own pid */
    return ACL_SUCCESS;
}

/* ---------------------------------------------------------------- dlsym and what is not carried */

#include "fwd_aclnn.c" /* the aclnn operators, and FWD_ACLNN_EXPORTS */

/* Every call exported here under its own name (the profile's calls are the shim's wrappers). */
static const struct {
    const char *name;
    void *fn;
} fwd_exports[] = {
    {"aclInit", (void *)aclInit},
    {"aclFinalize", (void *)aclFinalize},
    {"aclGetRecentErrMsg", (void *)aclGetRecentErrMsg},
    {"aclrtGetRunMode", (void *)aclrtGetRunMode},
    {"aclrtGetSocName", (void *)aclrtGetSocName},
    {"aclrtGetCurrentContext", (void *)aclrtGetCurrentContext},
    {"aclrtCreateStream", (void *)aclrtCreateStream},
    {"aclrtCreateStreamWithConfig", (void *)aclrtCreateStreamWithConfig},
    {"aclrtDestroyStream", (void *)aclrtDestroyStream},
    {"aclrtStreamQuery", (void *)aclrtStreamQuery},
    {"aclrtMallocHost", (void *)aclrtMallocHost},
    {"aclrtFreeHost", (void *)aclrtFreeHost},
    {"aclrtCreateEvent", (void *)aclrtCreateEvent},
    {"aclrtCreateEventWithFlag", (void *)aclrtCreateEventWithFlag},
    {"aclrtDestroyEvent", (void *)aclrtDestroyEvent},
    {"aclrtQueryEvent", (void *)aclrtQueryEvent},
    {"aclrtQueryEventStatus", (void *)aclrtQueryEventStatus},
    {"aclrtEventElapsedTime", (void *)aclrtEventElapsedTime},
    {"aclrtBinaryLoadFromData", (void *)aclrtBinaryLoadFromData},
    {"aclrtBinaryLoadFromFile", (void *)aclrtBinaryLoadFromFile},
    {"aclrtBinaryUnLoad", (void *)aclrtBinaryUnLoad},
    {"aclrtBinaryGetFunction", (void *)aclrtBinaryGetFunction},
    {"aclrtIpcMemGetExportKey", (void *)aclrtIpcMemGetExportKey},
    {"aclrtIpcMemSetImportPid", (void *)aclrtIpcMemSetImportPid},
    {"aclrtIpcMemImportByKey", (void *)aclrtIpcMemImportByKey},
    {"aclrtIpcMemClose", (void *)aclrtIpcMemClose},
    {"aclrtDeviceGetBareTgid", (void *)aclrtDeviceGetBareTgid},
    FWD_ACLNN_EXPORTS /* fwd_aclnn.c */
};

/* A call the forwarder does not carry: one log line naming it, and ACL_ERROR_API_NOT_SUPPORT. */
static aclError fw_not_carried(void)
{
    fx_error("this AscendCL call is not forwarded; it returns ACL_ERROR_API_NOT_SUPPORT (run the program gated: "
             "flexnpu run without --forward, or with --fallback gated)");
    return ACL_ERROR_API_NOT_SUPPORT;
}

/* The forward build's answer to dlsym(handle, name) for an AscendCL or aclnn name. */
static void *fw_dlsym(const char *name)
{
    for (size_t i = 0; i < sizeof fwd_exports / sizeof *fwd_exports; i++)
        if (!strcmp(fwd_exports[i].name, name)) return fwd_exports[i].fn;
    if (!strncmp(name, "acl", 3) && strncmp(name, "aclnn", 5) != 0 && strncmp(name, "aclCreate", 9) != 0 &&
        strncmp(name, "aclDestroy", 10) != 0 && strncmp(name, "aclGet", 6) != 0 && strncmp(name, "aclSet", 6) != 0 &&
        strncmp(name, "aclInit", 7) != 0) {
        fx_error("%s is not forwarded: calls to it return ACL_ERROR_API_NOT_SUPPORT", name);
        return (void *)fw_not_carried;
    }
    return NULL;
}

__attribute__((constructor)) static void fw_init(void)
{
    const char *v = getenv("FLEXNPU_FWD_HOST_MEM");
    if (v && *v) {
        bool ok;
        uint64_t n = fx_parse_size(v, &ok);
        if (!ok || n > FWD_HOST_MAX) fx_error("FLEXNPU_FWD_HOST_MEM=%s is not a size up to 64G; using 1G", v);
        else g_host_bytes = (n + 4095) & ~4095ULL;
    }
    fw_tables_init();
}
