/* Performance model of one emulated device.
 *
 * Each op needs some compute (FLOPs), device-memory traffic (HBM bytes) and host-link
 * traffic; alone it runs for its roofline time, the largest of work / capacity over the
 * three. A stream runs its ops in order; an op may start once it has arrived (submission
 * plus launch latency) and, for an event wait, once the event has completed.
 *
 *   serial mode: one op at a time on the device; an op runs to completion once started.
 *                The next is the ready stream head that became eligible first (ties:
 *                arrival order), an op becoming eligible once it has arrived, the op before
 *                it on its stream has completed, and so has its process's last op on the
 *                device. Processes so take the device in turn, as a hardware scheduler
 *                takes stream heads: one with a deep queue runs one op, then waits behind
 *                the heads that became eligible meanwhile, so another process's op waits
 *                for at most one op of each other process. Within one process every head
 *                is eligible from the end of its last op, so a process alone on the device
 *                runs its ops in arrival order, on one stream or many.
 *   shared mode: every ready stream head runs at once; the three resources are shared
 *                by max-min fairness (progressive filling), so two compute-bound ops each
 *                run at half speed while a compute-bound and a memory-bound op barely slow
 *                each other. Fairness is between processes: the ops of a process running
 *                k streams at once each weigh 1/k, so many streams buy no larger share.
 *
 *   contexts mode: as an Ascend device shares itself. Work of different processes (each
 *                its own context) never runs at once: the device takes ops in the serial
 *                order above; when the next op in that order is another process's, the
 *                current one starts nothing new, its running ops drain, and the device
 *                changes context, idle for context_switch_ns (no cost when the context it
 *                held has gone). Within one process, ops of different streams run at once,
 *                limited by cores: a kernel holds min(blockDim, cores of its class) cube or
 *                vector cores (a mix kernel one cube and two vector cores per block), starts
 *                once that many are free (kernels of a class start in the serial order: one
 *                waiting for cores holds back later ones of its class), and its compute runs
 *                at the share of its class's cores it holds. Copies, memsets and events hold
 *                no cores. HBM and the link are shared by max-min, as in shared mode.
 *
 *   partition:   (--partition, on top of any mode) each role has a fixed fraction of
 *                every resource, as a vNPU template fixes AI Cores and bandwidth: the ops of
 *                a partition run one at a time, at `share` of full speed, whatever the other
 *                partitions do. A client's busy time then counts the work done (full-device
 *                ns: its modelled time), the device's the share of it in use.
 *
 * The model runs on the real clock: the server thread advances it to "now" whenever it
 * wakes, publishing completions (stream counters, event timestamps) as it passes them.
 * Times it publishes are the model's exact times, not the moment the thread woke.
 */
#include "emu_sim.h"

#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "emu_util.h"

static void active_add(struct device *d, struct squeue *q)
{
    if (q->active_slot >= 0) return;
    if (d->nactive == d->cap_active) {
        d->cap_active = d->cap_active ? 2 * d->cap_active : 64;
        d->active = realloc(d->active, d->cap_active * sizeof *d->active);
    }
    q->active_slot = (int)d->nactive;
    d->active[d->nactive++] = q;
}

static void active_remove(struct device *d, struct squeue *q)
{
    int i = q->active_slot;
    if (i < 0) return;
    d->active[i] = d->active[--d->nactive];
    d->active[i]->active_slot = i;
    q->active_slot = -1;
}

static bool client_uses(struct client *c, int dev)
{
    return c && c->state == CLIENT_ALIVE && c->seg && c->dev[dev].open;
}

/* The cores a kernel holds in contexts mode, min(blockDim, cores of its class) (blockDim 0:
 * all of them), and the rate they allow it: its compute runs at the share of the class's
 * cores it holds (a blockDim beyond the cores runs in waves, at full speed); its HBM and link
 * traffic is not limited by its cores. */
static void core_demand(const struct emu_params *p, struct sop *s)
{
    uint32_t bd = s->op.block_dim, nc = p->cube_cores, nv = p->vector_cores;
    double share;
    switch (s->op.core_class) {
    case EMU_CORE_CUBE:
        s->cube_held = bd && bd < nc ? bd : nc;
        share = (double)s->cube_held / nc;
        break;
    case EMU_CORE_VECTOR:
        s->vector_held = bd && bd < nv ? bd : nv;
        share = (double)s->vector_held / nv;
        break;
    default: { /* mix (and a kernel that names no class) */
        uint32_t groups = nv / EMU_MIX_AIV_PER_AIC < nc ? nv / EMU_MIX_AIV_PER_AIC : nc;
        if (groups < 1) groups = 1;
        uint32_t g = bd && bd < groups ? bd : groups;
        s->cube_held = g;
        s->vector_held = g * EMU_MIX_AIV_PER_AIC < nv ? g * EMU_MIX_AIV_PER_AIC : nv;
        share = (double)g / groups;
    }
    }
    if (p->mode == EMU_MODE_CONTEXTS && s->util[0] > share) s->cap = share / s->util[0];
}

bool sim_rings_pending(struct device *d)
{
    for (int i = 0; i < g_srv.nclients; i++) {
        struct client *c = g_srv.clients[i];
        /* a ring left waiting at the process's queue bound is not pending: the thread
         * sleeps until a completion makes room, instead of spinning on it */
        if (!client_uses(c, d->index) || c->dev[d->index].queued >= EMU_MAX_QUEUED) continue;
        struct emu_ring *r = &c->seg->rings[d->index];
        if (atomic_load_explicit(&r->tail, memory_order_seq_cst) != atomic_load_explicit(&r->head, memory_order_relaxed))
            return true;
    }
    return false;
}

void sim_ingest(struct device *d)
{
    const struct emu_params *p = &d->p;
    for (int i = 0; i < g_srv.nclients; i++) {
        struct client *c = g_srv.clients[i];
        if (!client_uses(c, d->index)) continue;
        struct emu_ring *r = &c->seg->rings[d->index];
        struct client_dev *cd = &c->dev[d->index];
        uint64_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
        uint64_t tail = atomic_load_explicit(&r->tail, memory_order_acquire);
        if (tail - head > EMU_RING_SLOTS) tail = head; /* a corrupt ring: ignore it */
        for (; head != tail && cd->queued < EMU_MAX_QUEUED; head++) {
            struct emu_op op = r->ops[head & (EMU_RING_SLOTS - 1)];
            if (op.stream >= EMU_MAX_STREAMS || op.kind < EMU_OP_KERNEL || op.kind > EMU_OP_EVENT_WAIT ||
                op.name_id >= EMU_MAX_NAMES || (op.kind >= EMU_OP_EVENT_RECORD && op.event >= EMU_MAX_EVENTS) ||
                !(op.flops >= 0) ||
                !(op.hbm_bytes >= 0) || !(op.link_bytes >= 0))
                continue;
            struct sop *s = calloc(1, sizeof *s);
            if (!s) continue;
            s->op = op;
            s->c = c;
            double t_sub = (double)((int64_t)op.t_submit_ns - (int64_t)g_srv.t0_ns);
            if (t_sub < d->t_sim) t_sub = d->t_sim; /* the model never rewrites its past */
            s->arrive = t_sub + p->launch_ns * p->time_scale;
            s->solo = emu_solo_ns(p, op.flops, op.hbm_bytes, op.link_bytes);
            s->remaining = 1.0;
            if (s->solo > 0) {
                double sec = s->solo / (1e9 * p->time_scale);
                s->util[0] = op.flops / p->peak_flops / sec;
                s->util[1] = op.hbm_bytes / p->hbm_bw / sec;
                s->util[2] = op.link_bytes / p->link_bw / sec;
            }
            s->cap = 1.0;
            if (op.kind == EMU_OP_KERNEL) core_demand(p, s);
            s->order = d->next_order++;
            s->ready_at = s->arrive; /* or later, if it reaches its stream's head later (complete) */
            cd->queued++;
            struct squeue *q = &c->queues[op.stream];
            if (q->tail) q->tail->next = s;
            else q->head = s;
            q->tail = s;
            active_add(d, q);
            cd->ops_by_kind[op.kind & 7]++;
            if (op.kind <= EMU_OP_MEMSET) cd->count_by_name[op.name_id]++; /* events carry no name */
            if (op.kind == EMU_OP_COPY) cd->bytes_by_copy_kind[(op.name_id - EMU_NAME_COPY_BASE) & 7] += op.copy_bytes;
            if (op.kind == EMU_OP_MEMSET) cd->memset_bytes += op.copy_bytes;
        }
        atomic_store_explicit(&r->head, head, memory_order_seq_cst);
        /* pairs with the client's count of itself before it rechecks head and sleeps */
        if (atomic_load_explicit(&r->room_waiters, memory_order_seq_cst) &&
            tail - head <= EMU_RING_SLOTS - EMU_RING_SLOTS / 8) {
            atomic_fetch_add(&r->room_gen, 1);
            emu_futex_wake(&r->room_gen, INT32_MAX);
        }
    }
}

static bool wait_satisfied(struct sop *s)
{
    struct emu_event_state *e = &s->c->seg->events[s->op.event];
    uint32_t done = atomic_load_explicit(&e->completed_gen, memory_order_acquire);
    return (int32_t)(done - s->op.event_gen) >= 0;
}

/* An op at the head of its stream that may run now. */
static bool ready(struct device *d, struct sop *s)
{
    if (s->arrive > d->t_sim) return false;
    if (s->op.kind == EMU_OP_EVENT_WAIT && !wait_satisfied(s)) {
        d->event_poll = true;
        return false;
    }
    return true;
}

static void complete(struct device *d, struct squeue *q, double t)
{
    struct sop *s = q->head;
    struct client *c = s->c;
    q->head = s->next;
    if (!q->head) {
        q->tail = NULL;
        active_remove(d, q);
    } else if (q->head->ready_at < t)
        q->head->ready_at = t;
    c->dev[d->index].queued--;
    if (s->solo > 0) c->dev[d->index].last_done = t;
    if (d->current == s) d->current = NULL;
    for (int k = 0; k < 3; k++)
        if (d->part_current[k] == s) d->part_current[k] = NULL;
    if (s->op.kind == EMU_OP_EVENT_RECORD) {
        struct emu_event_state *e = &c->seg->events[s->op.event];
        atomic_store_explicit(&e->t_ns, sim_abs(t), memory_order_relaxed);
        atomic_store_explicit(&e->completed_gen, s->op.event_gen, memory_order_release);
        if (atomic_load(&e->waiters)) emu_futex_wake(&e->completed_gen, INT32_MAX);
    }
    struct emu_stream_state *st = &c->seg->streams[s->op.stream];
    atomic_store_explicit(&st->completed, (uint32_t)s->op.stream_seq, memory_order_release);
    if (atomic_load(&st->waiters)) emu_futex_wake(&st->completed, INT32_MAX);
    free(s);
}

/* Completes zero-work ops that are ready at the heads. Returns true if any did. */
static bool complete_instant(struct device *d)
{
    bool any = false, again = true;
    while (again) {
        again = false;
        for (size_t i = 0; i < d->nactive; i++) {
            struct squeue *q = d->active[i];
            struct sop *s = q->head;
            if (s->solo > 0 || s == d->current || !ready(d, s)) continue;
            complete(d, q, d->t_sim);
            any = again = true;
            break; /* the active list changed */
        }
    }
    return any;
}

int sim_parse_partition(const char *spec, struct emu_partition *out, char *err, size_t errlen)
{
    char buf[256], *save = NULL;
    snprintf(buf, sizeof buf, "%s", spec);
    struct emu_partition p = {.on = true};
    bool seen[2] = {false, false};
    for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        if (!eq) return snprintf(err, errlen, "'%s' is not role=share", tok), 1;
        *eq = 0;
        int k = !strcmp(tok, "prefill") ? EMU_PART_PREFILL : !strcmp(tok, "decode") ? EMU_PART_DECODE : -1;
        if (k < 0) return snprintf(err, errlen, "unknown role '%s' (prefill or decode)", tok), 1;
        char *end;
        double x = strtod(eq + 1, &end);
        if (*end || !(x > 0) || x > 1) return snprintf(err, errlen, "%s share must be in (0, 1], got '%s'", tok, eq + 1), 1;
        p.share[k] = x;
        seen[k] = true;
    }
    if (!seen[0] || !seen[1]) return snprintf(err, errlen, "give both prefill=S and decode=S"), 1;
    double left = 1.0 - p.share[0] - p.share[1];
    if (left < -1e-9) return snprintf(err, errlen, "prefill and decode shares add up to more than 1"), 1;
    p.share[EMU_PART_OTHER] = left > 0.01 ? left : 1.0; /* nothing left: others are not partitioned */
    *out = p;
    return 0;
}

/* The partition of a client: the FLEXNPU_ROLE in its environment (read once). */
static int client_part(struct client *c)
{
    if (c->part_known) return c->part;
    c->part_known = true;
    c->part = EMU_PART_OTHER;
    char path[64], env[65536];
    snprintf(path, sizeof path, "/proc/%d/environ", (int)c->pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return c->part;
    ssize_t n = read(fd, env, sizeof env - 1);
    close(fd);
    if (n <= 0) return c->part;
    env[n] = 0;
    for (ssize_t i = 0; i < n; i += (ssize_t)strlen(env + i) + 1) {
        if (!strcmp(env + i, "FLEXNPU_ROLE=prefill")) c->part = EMU_PART_PREFILL;
        else if (!strcmp(env + i, "FLEXNPU_ROLE=decode")) c->part = EMU_PART_DECODE;
    }
    return c->part;
}

/* Max-min fair rates over the shared resources (compute, HBM and link from `first`: 0, or 1
 * when each op's compute is its own cores) for the running ops, weighted so that each
 * process's running ops together count as one (weight 1/nrun each): every op's rate rises as
 * level / nrun until a resource fills or the op reaches its cap (full speed, or what its
 * cores allow). With one op per process, or one process, the weights are equal and this is
 * plain progressive filling. */
static void share_resources(struct sop **run, int n, int first)
{
    bool fixed[n];
    double used[3] = {0, 0, 0};
    for (int i = 0; i < n; i++) fixed[i] = false, run[i]->rate = 0;
    int left = n;
    while (left > 0) {
        double level = INFINITY;
        int bottleneck = -1;
        for (int i = 0; i < n; i++)
            if (!fixed[i] && run[i]->cap * run[i]->nrun < level) level = run[i]->cap * run[i]->nrun; /* its cap */
        for (int r = first; r < 3; r++) {
            double demand = 0;
            for (int i = 0; i < n; i++)
                if (!fixed[i]) demand += run[i]->util[r] / run[i]->nrun;
            if (demand <= 0) continue;
            double x = (1.0 - used[r]) / demand;
            if (x < level) level = x, bottleneck = r;
        }
        if (level < 0) level = 0;
        for (int i = 0; i < n; i++) {
            if (fixed[i]) continue;
            double rate = level / run[i]->nrun;
            bool full = rate >= run[i]->cap * (1 - 1e-12);
            if (bottleneck >= 0 ? run[i]->util[bottleneck] <= 0 : !full) continue;
            run[i]->rate = full ? run[i]->cap : rate;
            fixed[i] = true;
            left--;
            for (int r = 0; r < 3; r++) used[r] += run[i]->rate * run[i]->util[r];
        }
    }
}

/* When a ready stream head became eligible to run (see the top of this file). */
static double eligible(const struct device *d, const struct sop *s)
{
    double done = s->c->dev[d->index].last_done;
    return s->ready_at > done ? s->ready_at : done;
}

/* Serial order of two ready stream heads. */
static bool goes_before(const struct device *d, const struct sop *a, const struct sop *b)
{
    double ea = eligible(d, a), eb = eligible(d, b);
    return ea < eb || (ea == eb && a->order < b->order);
}

struct candidate {
    double eligible;
    uint64_t order;
    struct sop *s;
};

static int by_serial_order(const void *a, const void *b)
{
    const struct candidate *x = a, *y = b;
    if (x->eligible != y->eligible) return x->eligible < y->eligible ? -1 : 1;
    return x->order < y->order ? -1 : x->order > y->order;
}

/* Contexts mode (see the top of this file): the ops running at d->t_sim, starting those of
 * the context the device holds that the serial order and the free cores allow, or beginning
 * a context switch. */
static int running_contexts(struct device *d, struct sop **run)
{
    if (d->ctx_next) {
        if (d->t_sim < d->switch_end) return 0; /* changing context: the device is idle */
        d->ctx_owner = d->ctx_next;
        d->ctx_next = NULL;
    }
    int n = 0, nc = 0;
    uint32_t cube_free = d->p.cube_cores, vector_free = d->p.vector_cores;
    if (d->order_cap < d->nactive) { /* on the heap: a node's every stream may be queued */
        size_t cap = d->nactive > 64 ? 2 * d->nactive : 128;
        void *b = realloc(d->order_buf, cap * sizeof(struct candidate));
        if (b) {
            d->order_buf = b;
            d->order_cap = cap;
        }
    }
    bool may_start = d->order_cap >= d->nactive; /* out of memory: nothing new starts for now */
    struct candidate *cand = d->order_buf;
    for (size_t i = 0; i < d->nactive; i++) {
        struct sop *s = d->active[i]->head;
        if (s->started) {
            run[n++] = s;
            cube_free -= s->cube_held;
            vector_free -= s->vector_held;
        } else if (may_start && s->solo > 0 && ready(d, s))
            cand[nc++] = (struct candidate){eligible(d, s), s->order, s};
    }
    if (nc > 1) qsort(cand, (size_t)nc, sizeof *cand, by_serial_order);
    bool cube_waits = false, vector_waits = false; /* a kernel of the class waits for cores */
    for (int i = 0; i < nc; i++) {
        struct sop *s = cand[i].s;
        if (s->c != d->ctx_owner) {
            if (n > 0) break; /* another process is next: drain, then switch */
            bool resident = d->ctx_owner && client_uses(d->ctx_owner, d->index);
            if (resident) d->switches++;
            if (resident && d->p.context_switch_ns > 0) {
                d->ctx_next = s->c;
                d->switch_end = d->t_sim + d->p.context_switch_ns * d->p.time_scale;
                return 0;
            }
            d->ctx_owner = s->c;
        }
        bool cube = s->cube_held > 0, vector = s->vector_held > 0;
        if ((cube && cube_waits) || (vector && vector_waits) || s->cube_held > cube_free ||
            s->vector_held > vector_free) {
            cube_waits |= cube;
            vector_waits |= vector;
            continue;
        }
        s->started = true;
        cube_free -= s->cube_held;
        vector_free -= s->vector_held;
        run[n++] = s;
    }
    for (int i = 0; i < n; i++) run[i]->nrun = 1; /* one process */
    share_resources(run, n, 1);
    return n;
}

/* The ops running at d->t_sim, with their rates. Returns how many. */
static int running_set(struct device *d, struct sop **run)
{
    int n = 0;
    if (g_srv.partition.on) {
        for (int k = 0; k < 3; k++) {
            struct sop *cur = d->part_current[k];
            if (!cur) {
                for (size_t i = 0; i < d->nactive; i++) {
                    struct sop *s = d->active[i]->head;
                    if (s->solo > 0 && client_part(s->c) == k && ready(d, s) && (!cur || goes_before(d, s, cur)))
                        cur = s;
                }
                d->part_current[k] = cur;
            }
            if (cur) {
                cur->rate = g_srv.partition.share[k];
                run[n++] = cur;
            }
        }
        return n;
    }
    if (d->p.mode == EMU_MODE_CONTEXTS) return running_contexts(d, run);
    if (d->p.mode == EMU_MODE_SERIAL) {
        if (!d->current) {
            struct sop *best = NULL;
            for (size_t i = 0; i < d->nactive; i++) {
                struct sop *s = d->active[i]->head;
                if (s->solo > 0 && ready(d, s) && (!best || goes_before(d, s, best))) best = s;
            }
            d->current = best;
        }
        if (d->current) {
            d->current->rate = 1.0;
            run[n++] = d->current;
        }
        return n;
    }
    for (size_t i = 0; i < d->nactive; i++) {
        struct sop *s = d->active[i]->head;
        if (s->solo > 0 && ready(d, s)) run[n++] = s;
    }
    for (int i = 0; i < n; i++) run[i]->c->dev[d->index].nrun = 0;
    for (int i = 0; i < n; i++) run[i]->c->dev[d->index].nrun++;
    for (int i = 0; i < n; i++) run[i]->nrun = run[i]->c->dev[d->index].nrun;
    share_resources(run, n, 0);
    return n;
}

/* The share of the cube and of the vector cores op s occupies while it runs: in contexts
 * mode the cores it holds; elsewhere a kernel occupies every core of its class at its rate. */
static void class_occupancy(const struct device *d, const struct sop *s, double *cube, double *vector)
{
    if (d->p.mode == EMU_MODE_CONTEXTS && !g_srv.partition.on) {
        *cube += (double)s->cube_held / d->p.cube_cores;
        *vector += (double)s->vector_held / d->p.vector_cores;
        return;
    }
    if (s->op.kind != EMU_OP_KERNEL) return;
    uint32_t cls = s->op.core_class;
    if (cls != EMU_CORE_VECTOR) *cube += s->rate;
    if (cls != EMU_CORE_CUBE) *vector += s->rate;
}

void sim_advance(struct device *d, double t)
{
    d->event_poll = false;
    for (int guard = 0; guard < 1000000; guard++) {
        complete_instant(d);
        struct sop *run[d->nactive + 1];
        int n = running_set(d, run);
        /* next thing that happens: a completion or an arrival */
        double t_next = t;
        for (int i = 0; i < n; i++)
            if (run[i]->rate > 0) {
                double done = d->t_sim + run[i]->remaining * run[i]->solo / run[i]->rate;
                if (done < t_next) t_next = done;
            }
        for (size_t i = 0; i < d->nactive; i++) {
            double a = d->active[i]->head->arrive;
            if (a > d->t_sim && a < t_next) t_next = a;
        }
        if (d->ctx_next && d->switch_end > d->t_sim && d->switch_end < t_next) t_next = d->switch_end;
        if (t_next < d->t_sim) t_next = d->t_sim;
        double dt = t_next - d->t_sim;
        if (dt > 0 && n > 0) {
            double total = 0;
            for (int i = 0; i < n; i++) total += run[i]->rate;
            bool part = g_srv.partition.on;
            d->busy_ns += part ? dt * (total < 1.0 ? total : 1.0) : dt;
            double cube = 0, vector = 0;
            for (int i = 0; i < n; i++) class_occupancy(d, run[i], &cube, &vector);
            d->cube_busy_ns += dt * (cube < 1.0 ? cube : 1.0);
            d->vector_busy_ns += dt * (vector < 1.0 ? vector : 1.0);
            for (int i = 0; i < n; i++) {
                struct sop *s = run[i];
                s->remaining -= dt * s->rate / s->solo;
                double share = part ? dt * s->rate : total > 0 ? dt * s->rate / total : 0;
                struct client_dev *cd = &s->c->dev[d->index];
                cd->busy_ns += share;
                cd->busy_by_name[s->op.name_id] += share;
            }
        }
        d->t_sim = t_next;
        bool done_any = false;
        for (int i = 0; i < n; i++) {
            struct sop *s = run[i];
            /* within a picosecond of the end counts as the end (rounding) */
            if (s->rate > 0 && s->remaining * s->solo / s->rate <= 1e-3) {
                complete(d, &s->c->queues[s->op.stream], d->t_sim);
                done_any = true;
            }
        }
        if (!done_any && d->t_sim >= t) break;
    }
    complete_instant(d);
}

double sim_next_deadline(struct device *d)
{
    double next = INFINITY;
    struct sop *run[d->nactive + 1];
    int n = running_set(d, run);
    for (int i = 0; i < n; i++)
        if (run[i]->rate > 0) {
            double done = d->t_sim + run[i]->remaining * run[i]->solo / run[i]->rate;
            if (done < next) next = done;
        }
    for (size_t i = 0; i < d->nactive; i++) {
        double a = d->active[i]->head->arrive;
        if (a > d->t_sim && a < next) next = a;
    }
    if (d->ctx_next && d->switch_end > d->t_sim && d->switch_end < next) next = d->switch_end;
    if (d->event_poll && d->t_sim + 200000.0 < next) next = d->t_sim + 200000.0;
    return next;
}

void sim_drop_client(struct device *d, struct client *c)
{
    if (d->ctx_owner == c) d->ctx_owner = NULL; /* its context is gone: the next costs no switch */
    if (d->ctx_next == c) d->ctx_next = d->ctx_owner = NULL; /* a switch to it ends: the device holds none */
    for (int s = 0; s < EMU_MAX_STREAMS; s++) {
        struct squeue *q = &c->queues[s];
        if (!q->head) continue;
        if (d->current && d->current->c == c) d->current = NULL;
        for (int k = 0; k < 3; k++)
            if (d->part_current[k] && d->part_current[k]->c == c) d->part_current[k] = NULL;
        if (q->head->c != c) continue;
        bool on_this_device = false;
        for (size_t i = 0; i < d->nactive; i++)
            if (d->active[i] == q) on_this_device = true;
        if (!on_this_device) continue;
        active_remove(d, q);
        c->dev[d->index].queued = 0;
        for (struct sop *x = q->head, *nx; x; x = nx) {
            nx = x->next;
            free(x);
        }
        q->head = q->tail = NULL;
    }
}

size_t sim_pending_ops(struct device *d)
{
    size_t n = 0;
    for (size_t i = 0; i < d->nactive; i++)
        for (struct sop *s = d->active[i]->head; s; s = s->next) n++;
    return n;
}
