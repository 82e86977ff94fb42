/* FlexNPU observer: uprobes on a device runtime library, counting per process and device.
 *
 * This file holds the maps and the one helper each kind of call shares; the probe
 * functions themselves (one per profile symbol, plus a return probe where a duration or a
 * return value is needed) are generated from the runtime profile by
 * flexnpu/observe/probegen.py and appended after it, and the constants they use are
 * emitted ahead of observe.h. `flexnpu attach --ebpf` prints the whole program.
 *
 * Accounting, per (process, device):
 *   dispatching calls   ops[op]++, bytes[direction] += n; the first one after a
 *                       synchronisation opens an iteration (iter_start_ns)
 *   allocations         ops[ALLOC]++ on entry; on return, if the call succeeded, the
 *                       pointer it wrote is remembered with its size (allocs map)
 *   frees               ops[FREE]++; a remembered pointer is forgotten and its bytes freed
 *   synchronisations    ops[SYNC]++ on entry; on return the time blocked is added and an
 *                       open iteration is closed: iterations++, its span into iter_ns,
 *                       and classed prefill-like or decode-like by its span, launches and
 *                       H2D bytes (FX_LONG_ITER_NS, FX_PREFILL_LAUNCHES, FX_PREFILL_H2D)
 *   device selection    the thread's device, on successful return
 * Sync and alloc calls nest (aclrtSynchronizeStream calls aclrtSynchronizeStreamWithTimeout
 * inside the runtime): a per-thread depth counts the outermost call only.
 */

BPF_HASH(stats, struct fx_key, struct fx_stats, FX_MAX_KEYS);
BPF_HASH(allocs, struct fx_alloc_key, struct fx_alloc, FX_MAX_ALLOCS);
/* LRU: threads end without telling anyone; the least recently active entry makes room */
BPF_TABLE("lru_hash", u64, struct fx_thread, threads, FX_MAX_THREADS);
BPF_HASH(proc_dev, u32, s32, FX_MAX_KEYS); /* the device a process selected last */
BPF_PERCPU_ARRAY(zero_stats, struct fx_stats, 1); /* initial value: too big for the stack */
#if FX_TRACE
BPF_RINGBUF_OUTPUT(events, FX_RINGBUF_PAGES);
#endif

static __always_inline int fx_skip(u32 tgid)
{
#if FX_TGID
    return tgid != FX_TGID;
#else
    return 0;
#endif
}

static __always_inline s32 fx_device(u64 id)
{
    struct fx_thread *t = threads.lookup(&id);
    if (t && t->dev_plus1)
        return t->dev_plus1 - 1;
    u32 tgid = id >> 32;
    s32 *d = proc_dev.lookup(&tgid);
    return d ? *d : -1;
}

static __always_inline struct fx_stats *fx_stats_of(u32 tgid, s32 dev)
{
    struct fx_key k = {.tgid = tgid, .dev = dev};
    int z = 0;
    struct fx_stats *init = zero_stats.lookup(&z);
    if (!init)
        return 0;
    return stats.lookup_or_try_init(&k, init);
}

static __always_inline struct fx_thread *fx_thread_of(u64 id)
{
    struct fx_thread init = {};
    return threads.lookup_or_try_init(&id, &init);
}

static __always_inline void fx_emit(u64 id, s32 dev, u32 sym, u32 op, u32 dir, u64 bytes, u64 ts,
                                    u64 dur, s32 ret)
{
#if FX_TRACE
    struct fx_event e = {};
    e.ts_ns = ts;
    e.dur_ns = dur;
    e.bytes = bytes;
    e.tgid = id >> 32;
    e.tid = (u32)id;
    e.dev = dev;
    e.ret = ret;
    e.sym = sym;
    e.op = op;
    e.dir = dir;
    events.ringbuf_output(&e, sizeof(e), 0);
#endif
}

/* A call that sends work to the device. rt: a launch seen in the lower runtime library,
 * counted apart so that a launch seen at both levels is not counted twice. */
static __always_inline int fx_dispatch(u32 sym, u32 op, u64 bytes, u32 dir, int rt)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (fx_skip(tgid))
        return 0;
    u64 now = bpf_ktime_get_ns();
    s32 dev = fx_device(id);
    struct fx_stats *s = fx_stats_of(tgid, dev);
    if (!s)
        return 0;
    if (rt) {
        __sync_fetch_and_add(&s->rt_launches, 1);
        __sync_fetch_and_add(&s->iter_launches_rt, 1);
    } else if (op < FX_NUM_OPS) {
        __sync_fetch_and_add(&s->ops[op], 1);
        if (op == FX_OP_KERNEL)
            __sync_fetch_and_add(&s->iter_launches, 1);
    }
    if (dir == FX_DIR_H2D && bytes)
        __sync_fetch_and_add(&s->iter_h2d, bytes);
    if (bytes) {
        if (op == FX_OP_MEMSET || op == FX_OP_MEMSET_ASYNC)
            __sync_fetch_and_add(&s->memset_bytes, bytes);
        else {
            /* constant indices: the verifier cannot bound a variable one here */
#pragma unroll
            for (u32 i = 0; i < FX_NUM_DIRS; i++)
                if (dir == i)
                    __sync_fetch_and_add(&s->bytes[i], bytes);
        }
    }
    if (!s->iter_start_ns)
        __sync_val_compare_and_swap(&s->iter_start_ns, 0, now);
    s->last_ns = now;
    fx_emit(id, dev, sym, op, dir, bytes, now, 0, 0);
    return 0;
}

/* A call that is only counted (device queries, contexts, memory info). */
static __always_inline int fx_count(u32 sym, u32 op)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (fx_skip(tgid))
        return 0;
    struct fx_stats *s = fx_stats_of(tgid, fx_device(id));
    if (s && op < FX_NUM_OPS)
        __sync_fetch_and_add(&s->ops[op], 1);
    return 0;
}

static __always_inline int fx_sync_enter(u32 sym)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (fx_skip(tgid))
        return 0;
    struct fx_thread *t = fx_thread_of(id);
    if (!t)
        return 0;
    if (t->sync_depth++ == 0) {
        t->sync_start_ns = bpf_ktime_get_ns();
        t->sync_sym = sym;
        struct fx_stats *s = fx_stats_of(tgid, fx_device(id));
        if (s)
            __sync_fetch_and_add(&s->ops[FX_OP_SYNC], 1);
    }
    return 0;
}

static __always_inline int fx_sync_return(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    struct fx_thread *t = threads.lookup(&id);
    if (!t || !t->sync_depth)
        return 0;
    if (--t->sync_depth)
        return 0;
    u64 now = bpf_ktime_get_ns(), t0 = t->sync_start_ns;
    s32 dev = fx_device(id);
    struct fx_stats *s = fx_stats_of(tgid, dev);
    if (!s)
        return 0;
    __sync_fetch_and_add(&s->sync_ns, now - t0);
    s->last_ns = now;
    fx_emit(id, dev, t->sync_sym, FX_OP_SYNC, FX_DIR_NONE, 0, t0, now - t0, (s32)PT_REGS_RC(ctx));
    u64 start = __sync_lock_test_and_set(&s->iter_start_ns, 0);
    if (!start || now <= start)
        return 0;
    u64 span = now - start;
    u64 launches = __sync_lock_test_and_set(&s->iter_launches, 0);
    u64 launches_rt = __sync_lock_test_and_set(&s->iter_launches_rt, 0);
    u64 h2d = __sync_lock_test_and_set(&s->iter_h2d, 0);
    if (launches_rt > launches) /* where both libraries are probed, one launch shows in both */
        launches = launches_rt;
    if ((span >= FX_LONG_ITER_NS) + (launches >= FX_PREFILL_LAUNCHES) + (h2d >= FX_PREFILL_H2D) >= 2) {
        __sync_fetch_and_add(&s->class_iters[1], 1);
        __sync_fetch_and_add(&s->class_ns[1], span);
    } else {
        __sync_fetch_and_add(&s->class_iters[0], 1);
        __sync_fetch_and_add(&s->class_ns[0], span);
    }
    __sync_fetch_and_add(&s->iterations, 1);
    __sync_fetch_and_add(&s->iter_ns, span);
    s->iter_ns_last = span;
    fx_emit(id, dev, FX_SYM_ITERATION, FX_OP_SYNC, FX_DIR_NONE, 0, start, span, 0);
    return 0;
}

static __always_inline int fx_alloc_enter(u32 sym, u64 out, u64 size)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (fx_skip(tgid))
        return 0;
    struct fx_thread *t = fx_thread_of(id);
    if (!t)
        return 0;
    if (t->alloc_depth++ == 0) {
        t->alloc_out = out;
        t->alloc_size = size;
        t->alloc_start_ns = bpf_ktime_get_ns();
        t->alloc_sym = sym;
        struct fx_stats *s = fx_stats_of(tgid, fx_device(id));
        if (s)
            __sync_fetch_and_add(&s->ops[FX_OP_ALLOC], 1);
    }
    return 0;
}

static __always_inline int fx_alloc_return(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    struct fx_thread *t = threads.lookup(&id);
    if (!t || !t->alloc_depth)
        return 0;
    if (--t->alloc_depth)
        return 0;
    s32 dev = fx_device(id);
    struct fx_stats *s = fx_stats_of(tgid, dev);
    if (!s)
        return 0;
    s32 rc = (s32)PT_REGS_RC(ctx);
    u64 ptr = 0, size = t->alloc_size, now = bpf_ktime_get_ns();
    if (rc == FX_SUCCESS && t->alloc_out)
        bpf_probe_read_user(&ptr, sizeof(ptr), (void *)t->alloc_out);
    if (ptr) {
        struct fx_alloc_key k = {.tgid = tgid, .ptr = ptr};
        struct fx_alloc a = {.size = size, .dev = dev};
        allocs.update(&k, &a);
        __sync_fetch_and_add(&s->allocs, 1);
        __sync_fetch_and_add(&s->alloc_bytes, size);
    } else {
        __sync_fetch_and_add(&s->alloc_failures, 1);
    }
    fx_emit(id, dev, t->alloc_sym, FX_OP_ALLOC, FX_DIR_NONE, size, t->alloc_start_ns,
            now - t->alloc_start_ns, rc);
    return 0;
}

static __always_inline int fx_free(u32 sym, u64 ptr)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (fx_skip(tgid))
        return 0;
    s32 dev = fx_device(id);
    struct fx_stats *s = fx_stats_of(tgid, dev);
    if (s)
        __sync_fetch_and_add(&s->ops[FX_OP_FREE], 1);
    struct fx_alloc_key k = {.tgid = tgid, .ptr = ptr};
    struct fx_alloc *a = allocs.lookup(&k);
    if (!a)
        return 0;
    u64 size = a->size;
    s32 adev = a->dev;
    if (allocs.delete(&k) != 0)
        return 0; /* another thread freed it first */
    struct fx_stats *as = fx_stats_of(tgid, adev);
    if (as) {
        __sync_fetch_and_add(&as->frees_known, 1);
        __sync_fetch_and_add(&as->freed_bytes, size);
    }
    fx_emit(id, adev, sym, FX_OP_FREE, FX_DIR_NONE, size, bpf_ktime_get_ns(), 0, 0);
    return 0;
}

static __always_inline int fx_device_set_enter(u32 sym, s32 dev)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (fx_skip(tgid))
        return 0;
    struct fx_thread *t = fx_thread_of(id);
    if (t)
        t->pending_dev = dev;
    struct fx_stats *s = fx_stats_of(tgid, dev);
    if (s)
        __sync_fetch_and_add(&s->ops[FX_OP_DEVICE_SET], 1);
    return 0;
}

static __always_inline int fx_device_set_return(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    struct fx_thread *t = threads.lookup(&id);
    if (!t || (s32)PT_REGS_RC(ctx) != FX_SUCCESS)
        return 0;
    s32 dev = t->pending_dev;
    t->dev_plus1 = dev + 1;
    proc_dev.update(&tgid, &dev);
    return 0;
}

static __always_inline int fx_device_reset(u32 sym, s32 dev)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (fx_skip(tgid))
        return 0;
    struct fx_stats *s = fx_stats_of(tgid, dev);
    if (s)
        __sync_fetch_and_add(&s->ops[FX_OP_DEVICE_RESET], 1);
    struct fx_thread *t = threads.lookup(&id);
    if (t && t->dev_plus1 == dev + 1)
        t->dev_plus1 = 0;
    return 0;
}
