/* The in-flight budget of the shim: part of shim.c (included once, after the gate).
 *
 * The gate decides when a call may dispatch; once dispatched, work sits in the device's
 * queue and everything queued behind it waits. The budget bounds how much a client may
 * have queued: its kernel launches, async copies and async memsets (the "budgeted
 * launches"; event records, stream waits and the synchronous copies/memsets are not
 * counted and never wait for it) wait while the client's dispatched-but-unfinished
 * budgeted launches on the device have reached ctl.slots[i].inflight_max.
 *
 * Completion is learnt through the runtime's public API only, so this works unchanged on
 * CANN's libascendcl: the shim records its own events on the application's streams
 * (aclrtCreateEvent / aclrtRecordEvent, called through the real functions, so they are
 * neither gated nor counted), polls them (aclrtQueryEventStatus) and waits on them
 * (aclrtSynchronizeEventWithTimeout). Events are bound to a context on CANN: they are
 * created lazily on the application's thread, in the context the shim saw it make current,
 * and destroyed before that context (aclrtDestroyContext) or the device's default context
 * (aclrtResetDevice) goes.
 *
 * Accuracy. An event is recorded every `stride` budgeted launches, stride = max(1,
 * budget / 2), so the runtime is called once per stride launches, not per launch. Launches
 * are popped as finished only in whole strides, in order, from the ring's head: the estimate
 * (cli.inflight_now = seq - done_seq) over-counts by at most stride - 1 launches and never
 * under-counts (for one dispatching thread: two threads racing a synchronisation with a
 * launch may see that launch counted finished). Streams: an event proves only its own
 * stream's earlier work done. The ring is kept in dispatch order across streams, so with
 * several streams in use a finished event on one stream counts the launches dispatched
 * before it on other streams as finished too; a program that spreads work over many
 * streams is bounded per event, not exactly. A synchronisation completes work:
 * aclrtSynchronizeDevice clears the ring; aclrtSynchronizeStream of the only stream used
 * since the ring was last empty clears it, of one of several streams marks that stream's
 * entries finished.
 *
 * Cost. Budget 0: one more load, of inflight_max, in the cache line of the gate word the
 * gate check loads anyway (struct fx_ctl_slot is 64-byte aligned). Budget set, not
 * reached: two relaxed loads and a compare before the call, an atomic add and a relaxed
 * store after it, no lock; every stride launches, the lock and one aclrtRecordEvent.
 * Reached: the lock, a poll of the oldest event, and a wait on it.
 */

#define FX_INFLIGHT_EVENT_SLICE_MS 10 /* longest single event wait: budget changes seen this often */
#define FX_INFLIGHT_POLL_NS 100000ULL  /* under 1 ms of max_hold left: poll this often */

enum fx_sync_kind { FX_SYNC_DEVICE = 0, FX_SYNC_STREAM = 1, FX_SYNC_OTHER = 2 };

/* The runtime's event API, resolved past every wrapper (the shim's own events are never the
 * application's ops). */
static aclError (*r_create_event)(aclrtEvent *);
static aclError (*r_destroy_event)(aclrtEvent);
static aclError (*r_query_status)(aclrtEvent, aclrtEventRecordedStatus *);
static aclError (*r_query_event)(aclrtEvent, aclrtEventStatus *);
static aclError (*r_record_event)(aclrtEvent, aclrtStream);
static aclError (*r_sync_event_timeout)(aclrtEvent, int32_t);
static _Atomic int g_inflight_api; /* 0: not looked up, 1: usable, -1: missing (budgets not applied) */

static void *fx_lookup_real(const char *name);

static bool fx_inflight_api(void)
{
    int st = atomic_load_explicit(&g_inflight_api, memory_order_acquire);
    if (FX_LIKELY(st != 0)) return st > 0;
    r_create_event = (aclError(*)(aclrtEvent *))fx_lookup_real("aclrtCreateEvent");
    r_destroy_event = (aclError(*)(aclrtEvent))fx_lookup_real("aclrtDestroyEvent");
    r_query_status = (aclError(*)(aclrtEvent, aclrtEventRecordedStatus *))fx_lookup_real("aclrtQueryEventStatus");
    r_query_event = (aclError(*)(aclrtEvent, aclrtEventStatus *))fx_lookup_real("aclrtQueryEvent");
    r_record_event = (aclError(*)(aclrtEvent, aclrtStream))fx_lookup_real("aclrtRecordEvent");
    r_sync_event_timeout = (aclError(*)(aclrtEvent, int32_t))fx_lookup_real("aclrtSynchronizeEventWithTimeout");
    bool ok = r_create_event && r_destroy_event && (r_query_status || r_query_event) && r_record_event &&
              r_sync_event_timeout;
    if (!ok) fx_error("the runtime lacks the event API the in-flight budget needs; budgets are not applied");
    atomic_store_explicit(&g_inflight_api, ok ? 1 : -1, memory_order_release);
    return ok;
}

/* 1: complete, 0: not yet, -1: the query failed (treated as complete: fail open). */
static int fx_event_done(void *ev)
{
    if (r_query_status) {
        aclrtEventRecordedStatus st = ACL_EVENT_RECORDED_STATUS_NOT_READY;
        if (r_query_status(ev, &st) != ACL_SUCCESS) return -1;
        return st == ACL_EVENT_RECORDED_STATUS_COMPLETE;
    }
    aclrtEventStatus st = ACL_EVENT_STATUS_NOT_READY;
    if (r_query_event(ev, &st) != ACL_SUCCESS) return -1;
    return st == ACL_EVENT_STATUS_COMPLETE;
}

static void fx_inflight_publish(struct fx_att *a)
{
    uint64_t s = atomic_load_explicit(&a->inf.seq, memory_order_relaxed);
    uint64_t d = atomic_load_explicit(&a->inf.done_seq, memory_order_relaxed);
    atomic_store_explicit(&fx_me(a)->inflight_now, s > d ? s - d : 0, memory_order_relaxed);
}

/* Pops finished entries from the head. Caller holds inf.lock. */
static void fx_inflight_poll_locked(struct fx_att *a)
{
    struct fx_inflight *f = &a->inf;
    while (f->n) {
        struct fx_inflight_ev *e = &f->e[f->head];
        if (!e->done && fx_event_done(e->ev) == 0) break;
        if (e->seq > atomic_load_explicit(&f->done_seq, memory_order_relaxed))
            atomic_store_explicit(&f->done_seq, e->seq, memory_order_relaxed);
        f->head = (f->head + 1) % FX_RING;
        f->n--;
    }
    fx_inflight_publish(a);
}

/* Everything dispatched so far is finished. Caller holds inf.lock. */
static void fx_inflight_clear_locked(struct fx_att *a)
{
    struct fx_inflight *f = &a->inf;
    f->n = 0;
    f->mixed = false;
    atomic_store_explicit(&f->done_seq, atomic_load(&f->seq), memory_order_relaxed);
    atomic_store_explicit(&f->rec_seq, atomic_load(&f->seq), memory_order_relaxed);
    fx_inflight_publish(a);
}

/* Records an event after the newest counted launch, on stream. Caller holds inf.lock. */
static bool fx_inflight_record_locked(struct fx_att *a, void *stream)
{
    struct fx_inflight *f = &a->inf;
    if (f->n == FX_RING) return false; /* the head is outstanding: waits go on it */
    struct fx_inflight_ev *e = &f->e[(f->head + f->n) % FX_RING];
    if (e->ev && e->ctx != t_ctx) { /* made in another context than the thread's: remake it here */
        r_destroy_event(e->ev);
        e->ev = NULL;
    }
    if (!e->ev) {
        aclrtEvent ev = NULL;
        if (r_create_event(&ev) != ACL_SUCCESS || !ev) return false;
        e->ev = ev;
        e->ctx = t_ctx;
    }
    if (r_record_event(e->ev, stream) != ACL_SUCCESS) return false;
    uint64_t s = atomic_load(&f->seq);
    e->stream = stream;
    e->seq = s;
    e->done = false;
    f->n++;
    atomic_store_explicit(&f->rec_seq, s, memory_order_relaxed);
    return true;
}

static inline uint64_t fx_inflight_outstanding(const struct fx_att *a)
{
    return atomic_load_explicit(&a->inf.seq, memory_order_relaxed) -
           atomic_load_explicit(&a->inf.done_seq, memory_order_relaxed);
}

/* The budget is spent (or looks spent): poll, then wait on the oldest event until under the
 * budget, max_hold passes (the client is released until its next sync, as for a gate hold)
 * or the daemon's heartbeat is stale. */
static void fx_inflight_wait(struct fx_att *a, uint32_t budget, void *stream)
{
    struct fx_page *me = fx_me(a);
    struct fx_inflight *f = &a->inf;
    if (atomic_load_explicit(&me->released, memory_order_relaxed) || !fx_inflight_api()) return;
    pthread_mutex_lock(&f->lock);
    fx_inflight_poll_locked(a);
    pthread_mutex_unlock(&f->lock);
    if (fx_inflight_outstanding(a) < budget) return;
    uint64_t t0 = fx_now();
    if (!fx_daemon_alive(a, t0)) return; /* fail open */
    atomic_fetch_add(&me->inflight_waits, 1);
    for (;;) {
        pthread_mutex_lock(&f->lock);
        fx_inflight_poll_locked(a);
        budget = atomic_load_explicit(&fx_g(a)->inflight_max, memory_order_relaxed);
        bool go = budget == 0 || fx_inflight_outstanding(a) < budget;
        /* outstanding launches but no event after them (fewer than a stride since the last):
         * record one now so there is something to wait on */
        if (!go && !f->n && !fx_inflight_record_locked(a, f->last_stream ? f->last_stream : stream)) go = true;
        void *ev = go ? NULL : f->e[f->head].ev;
        pthread_mutex_unlock(&f->lock);
        if (go) break;
        uint64_t now = fx_now(), held = now - t0;
        uint64_t max_hold = atomic_load(&fx_g(a)->max_hold_ns); /* lowered meanwhile: bounds this wait too */
        if (held >= max_hold) {
            atomic_store(&me->released, 1);
            atomic_fetch_add(&me->gate_expired, 1);
            break;
        }
        if (!fx_daemon_alive(a, now)) break;
        uint64_t left = max_hold - held;
        if (left >= 1000000ULL) {
            uint64_t ms = left / 1000000ULL;
            if (ms > FX_INFLIGHT_EVENT_SLICE_MS) ms = FX_INFLIGHT_EVENT_SLICE_MS;
            /* the event is never destroyed while its ring entry is outstanding; a re-record by
             * another thread only makes this wait longer, within its timeout */
            aclError rc = r_sync_event_timeout(ev, (int32_t)ms);
            if (rc != ACL_SUCCESS && rc != ACL_ERROR_RT_EVENT_SYNC_TIMEOUT) break; /* fail open */
        } else if (fx_event_done(ev) == 0) {
            uint64_t ns = left < FX_INFLIGHT_POLL_NS ? left : FX_INFLIGHT_POLL_NS;
            struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)ns};
            nanosleep(&ts, NULL);
        }
    }
    atomic_fetch_add(&me->inflight_wait_ns, fx_now() - t0);
}

/* Before a budgeted launch: the budget (0: none), after waiting while it is spent. */
static inline uint32_t fx_budget(struct fx_att *a, void *stream)
{
#ifdef FX_FORWARD
    return 0; /* the executor keeps forwarded clients' budgets, exactly */
#endif
    if (!a) return 0;
    uint32_t budget = atomic_load_explicit(&fx_g(a)->inflight_max, memory_order_relaxed);
    if (__builtin_expect(budget != 0, 0) && fx_inflight_outstanding(a) >= budget)
        fx_inflight_wait(a, budget, stream);
    return budget;
}

/* After a budgeted launch that was dispatched under budget (> 0): count it, and every
 * stride launches record an event after it. */
static inline void fx_inflight_dispatched(struct fx_att *a, uint32_t budget, void *stream)
{
    struct fx_inflight *f = &a->inf;
    uint64_t s = atomic_fetch_add_explicit(&f->seq, 1, memory_order_relaxed) + 1;
    atomic_store_explicit(&fx_me(a)->inflight_now, s - atomic_load_explicit(&f->done_seq, memory_order_relaxed),
                          memory_order_relaxed);
    uint64_t stride = budget / 2 ? budget / 2 : 1;
    if (__builtin_expect(stream != f->last_stream || !atomic_load_explicit(&f->active, memory_order_relaxed), 0) ||
        s - atomic_load_explicit(&f->rec_seq, memory_order_relaxed) >= stride) {
        if (!fx_inflight_api()) return;
        pthread_mutex_lock(&f->lock);
        if (f->n && stream != f->last_stream) f->mixed = true;
        f->last_stream = stream;
        atomic_store_explicit(&f->active, 1, memory_order_relaxed);
        if (atomic_load(&f->seq) - atomic_load(&f->rec_seq) >= stride) {
            fx_inflight_poll_locked(a); /* frees positions; finished work leaves the estimate */
            fx_inflight_record_locked(a, stream);
        }
        pthread_mutex_unlock(&f->lock);
    }
}

/* After a successful synchronisation of the device or of a stream. */
static void fx_inflight_synced(struct fx_att *a, int kind, void *stream)
{
    struct fx_inflight *f = &a->inf;
    pthread_mutex_lock(&f->lock);
    if (kind == FX_SYNC_DEVICE || (kind == FX_SYNC_STREAM && !f->mixed && stream == f->last_stream)) {
        fx_inflight_clear_locked(a);
    } else if (kind == FX_SYNC_STREAM) {
        for (uint32_t k = 0; k < f->n; k++) {
            struct fx_inflight_ev *e = &f->e[(f->head + k) % FX_RING];
            if (e->stream == stream) e->done = true;
        }
        fx_inflight_poll_locked(a);
    }
    if (!f->n) f->mixed = false;
    pthread_mutex_unlock(&f->lock);
}

/* Before a context (ctx) or a device's default context (ctx NULL, on aclrtResetDevice of
 * dev; -1: any device) goes: destroy the shim's events made in it while they are valid. */
static void fx_inflight_forget(int dev, void *ctx)
{
    if (atomic_load(&g_inflight_api) <= 0) return;
    for (int i = 0; i < FX_MAX_DEVICES; i++) {
        struct fx_att *a = atomic_load(&g_att[i]);
        if (!a || (dev >= 0 && a->dev != dev)) continue;
        struct fx_inflight *f = &a->inf;
        pthread_mutex_lock(&f->lock);
        bool any = false;
        for (int k = 0; k < FX_RING; k++)
            if (f->e[k].ev && f->e[k].ctx == ctx) {
                r_destroy_event(f->e[k].ev);
                f->e[k].ev = NULL;
                any = true;
            }
        if (any) fx_inflight_clear_locked(a); /* the work went with the context */
        pthread_mutex_unlock(&f->lock);
    }
}
