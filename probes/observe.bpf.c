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
 *                       open iteration is closed: iterations++, its span into iter_ns, into
 *                       sig_iters/sig_ns by the named work it held (prefill- or decode-named
 *                       kernels and operators), and into the `shapes` histogram by its span
 *                       and launches; Python classes the shapes (flexnpu/observe/phase.py)
 *   named work          a kernel launch whose handle Python classed by its name (`funcs`),
 *                       an aclnn attention operator (class fixed by its symbol): named[]
 *   handle-making calls on return, the handle and its kernel name go to Python (`names`)
 *   device selection    the thread's device, on successful return
 * Forwarded execution: a forwarded client's calls never reach the runtime library in its
 * process; they are probed where the client makes them (the fxf_* functions and the exported
 * operators of libflexnpu_fwd.so), and the executor that makes the runtime calls for every
 * client is in the `skip` map, so each call is counted once, for the process that made it.
 * Sync and alloc calls nest (aclrtSynchronizeStream calls aclrtSynchronizeStreamWithTimeout
 * inside the runtime): a per-thread depth counts the outermost call only.
 */

BPF_HASH(stats, struct fx_key, struct fx_stats, FX_MAX_KEYS);
BPF_HASH(allocs, struct fx_alloc_key, struct fx_alloc, FX_MAX_ALLOCS);
/* LRU: threads end without telling anyone; the least recently active entry makes room */
BPF_TABLE("lru_hash", u64, struct fx_thread, threads, FX_MAX_THREADS);
BPF_HASH(proc_dev, u32, s32, FX_MAX_KEYS); /* the device a process selected last */
BPF_PERCPU_ARRAY(zero_stats, struct fx_stats, 1); /* initial value: too big for the stack */
BPF_HASH(funcs, struct fx_func_key, u32, FX_MAX_FUNCS); /* handle -> FX_CLS_*, written by Python */
BPF_HASH(shapes, struct fx_shape_key, struct fx_shape, FX_MAX_SHAPES);
BPF_HASH(dev_gen, s32, struct fx_dev_gen, 1024);
BPF_RINGBUF_OUTPUT(names, 16); /* kernel names of new handles: rare (programs make them once) */
#if FX_TRACE
BPF_RINGBUF_OUTPUT(events, FX_RINGBUF_PAGES);
#endif

/* Processes whose calls are never counted, written by Python: the executors of forwarded
 * execution, which call the runtime for their clients (the clients' calls are counted where
 * they make them, at the forward library's entry points). */
BPF_HASH(skip, u32, u8, FX_MAX_SKIP);

static __always_inline int fx_skip(u32 tgid)
{
#if FX_TGID
    return tgid != FX_TGID;
#else
    return skip.lookup(&tgid) != 0;
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
static __always_inline void fx_named(struct fx_stats *s, u32 sig, u32 cls)
{
    /* constant indices: the verifier cannot bound a variable one here */
#pragma unroll
    for (u32 i = 0; i < FX_NUM_SIGS * FX_NUM_CLS; i++)
        if (i == sig * FX_NUM_CLS + cls - 1) {
            __sync_fetch_and_add(&s->named[i], 1);
            __sync_fetch_and_add(&s->iter_named[i], 1);
        }
}

static __always_inline int fx_dispatch(u32 sym, u32 op, u64 bytes, u32 dir, int rt, u64 func)
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
    if (func) {
        struct fx_func_key fk = {.tgid = tgid, .handle = func};
        u32 *cls = funcs.lookup(&fk);
        if (cls && *cls >= FX_CLS_PREFILL && *cls <= FX_CLS_EITHER)
            fx_named(s, FX_SIG_KERNEL, *cls);
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
    if (!s->iter_start_ns && __sync_val_compare_and_swap(&s->iter_start_ns, 0, now) == 0) {
        /* this call opened an iteration: note where the device's other iterations stand */
        struct fx_dev_gen zero = {};
        struct fx_dev_gen *g = dev_gen.lookup_or_try_init(&dev, &zero);
        if (g) {
            s->iter_opens0 = __sync_fetch_and_add(&g->opens, 1) + 1;
            s->iter_closes0 = g->closes;
        }
    }
    s->last_ns = now;
    fx_emit(id, dev, sym, op, dir, bytes, now, 0, 0);
    return 0;
}

/* An operator entry point whose name classes it (cls, fixed at generation). */
static __always_inline int fx_operator(u32 sym, u32 cls)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (fx_skip(tgid))
        return 0;
    struct fx_stats *s = fx_stats_of(tgid, fx_device(id));
    if (s)
        fx_named(s, FX_SIG_OPERATOR, cls);
    return 0;
}

/* A call that makes a kernel function handle from a name: the name and the out-pointer on
 * entry, the handle on a successful return. */
static __always_inline int fx_namer_enter(u32 sym, u64 name, u64 out)
{
    u64 id = bpf_get_current_pid_tgid();
    if (fx_skip(id >> 32))
        return 0;
    struct fx_thread *t = fx_thread_of(id);
    if (t) {
        t->name_ptr = name;
        t->handle_out = out;
    }
    return 0;
}

static __always_inline int fx_namer_return(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    struct fx_thread *t = threads.lookup(&id);
    if (!t || !t->handle_out || !t->name_ptr)
        return 0;
    u64 out = t->handle_out, name = t->name_ptr;
    t->handle_out = 0;
    t->name_ptr = 0;
    if ((s32)PT_REGS_RC(ctx) != FX_SUCCESS)
        return 0;
    struct fx_name_event *e = names.ringbuf_reserve(sizeof(struct fx_name_event));
    if (!e)
        return 0;
    e->tgid = id >> 32;
    e->pad = 0;
    e->handle = 0;
    bpf_probe_read_user(&e->handle, sizeof(e->handle), (void *)out);
    if (bpf_probe_read_user_str(e->name, sizeof(e->name), (void *)name) < 0)
        e->name[0] = 0;
    names.ringbuf_submit(e, 0);
    return 0;
}

/* bucket of a histogram: 0 for 0, else 1 + half octaves of v (v >= 1) */
static __always_inline u8 fx_bucket(u64 v)
{
    if (!v)
        return 0;
    u32 l = bpf_log2l(v);
    u32 half = l ? (v >> (l - 1)) & 1 : 0;
    return 1 + 2 * l + half;
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
    __sync_lock_test_and_set(&s->iter_h2d, 0);
    if (launches_rt > launches) /* where both libraries are probed, one launch shows in both */
        launches = launches_rt;
    /* by the named work it held, per signal (kernel names, operators) */
#pragma unroll
    for (u32 g = 0; g < FX_NUM_SIGS; g++) {
        u64 p = __sync_lock_test_and_set(&s->iter_named[g * FX_NUM_CLS], 0);
        u64 d = __sync_lock_test_and_set(&s->iter_named[g * FX_NUM_CLS + 1], 0);
        __sync_lock_test_and_set(&s->iter_named[g * FX_NUM_CLS + 2], 0);
        u32 held = (p ? 1 : 0) | (d ? 2 : 0);
#pragma unroll
        for (u32 h = 0; h < 4; h++)
            if (h == held) {
                __sync_fetch_and_add(&s->sig_iters[g * 4 + h], 1);
                __sync_fetch_and_add(&s->sig_ns[g * 4 + h], span);
            }
        if (held == 3) {
            __sync_fetch_and_add(&s->sig_mix[g * 2], p);
            __sync_fetch_and_add(&s->sig_mix[g * 2 + 1], d);
        }
    }
    /* did another process's iteration on this device overlap it? */
    u8 contended = 0;
    struct fx_dev_gen *g = dev_gen.lookup(&dev);
    if (g) {
        contended = g->opens != s->iter_opens0 || g->closes != s->iter_closes0;
        __sync_fetch_and_add(&g->closes, 1);
    }
    if (contended)
        __sync_fetch_and_add(&s->contended, 1);
    struct fx_shape_key sk = {.tgid = tgid, .dev = dev, .span_b = fx_bucket(span / 1000),
                              .launch_b = fx_bucket(launches), .contended = contended};
    struct fx_shape zs = {};
    struct fx_shape *sh = shapes.lookup_or_try_init(&sk, &zs);
    if (sh) {
        __sync_fetch_and_add(&sh->iters, 1);
        __sync_fetch_and_add(&sh->ns, span);
        __sync_fetch_and_add(&sh->launches, launches);
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
