/* FlexNPU observer: the records the BPF program keeps, shared by the BPF C and Python.
 *
 * Python never declares these a second time: bcc builds ctypes types for a map's key and
 * value and for ring-buffer events from the declarations below, and the loader reads
 * fields by the names used here. FX_NUM_OPS, FX_NUM_DIRS and the FX_OP_* / FX_DIR_* /
 * FX_SYM_* constants come from the runtime profile (flexnpu/observe/probegen.py emits
 * them ahead of this header); the FX_* sizes and switches below may be overridden with
 * -D flags.
 */
#ifndef FLEXNPU_OBSERVE_H_
#define FLEXNPU_OBSERVE_H_

#ifndef FX_TRACE
#define FX_TRACE 0 /* 1: emit one event per call into the `events` ring buffer */
#endif
#ifndef FX_TGID
#define FX_TGID 0 /* non-zero: count only this process (flexnpu attach) */
#endif
#ifndef FX_MAX_KEYS
#define FX_MAX_KEYS 4096 /* (process, device) pairs */
#endif
#ifndef FX_MAX_ALLOCS
#define FX_MAX_ALLOCS 65536 /* live device allocations, node-wide */
#endif
#ifndef FX_MAX_THREADS
#define FX_MAX_THREADS 16384
#endif
#ifndef FX_RINGBUF_PAGES
#define FX_RINGBUF_PAGES 256
#endif
/* An iteration is prefill-like when at least two of its span, launches and H2D bytes reach
 * these (PhaseRules in flexnpu/observe/phase.py passes its own as -D flags). */
#ifndef FX_LONG_ITER_NS
#define FX_LONG_ITER_NS 16384000ULL
#endif
#ifndef FX_PREFILL_LAUNCHES
#define FX_PREFILL_LAUNCHES 100
#endif
#ifndef FX_PREFILL_H2D
#define FX_PREFILL_H2D 1048576ULL
#endif

/* Counters are kept per process and device. dev is -1 until the process (or the calling
 * thread) has selected a device with the profile's DEVICE_SET call. */
struct fx_key {
    u32 tgid;
    s32 dev;
};

struct fx_stats {
    u64 ops[FX_NUM_OPS];   /* calls, by Op (entry of the call; nested calls once) */
    u64 bytes[FX_NUM_DIRS]; /* bytes asked to be copied, by Direction */
    u64 memset_bytes;
    u64 rt_launches;   /* kernel launches seen in the lower runtime library (libruntime.so) */
    u64 allocs;        /* successful allocations */
    u64 alloc_failures;
    u64 alloc_bytes;   /* bytes of successful allocations */
    u64 frees_known;   /* frees of allocations the probes saw made */
    u64 freed_bytes;   /* their bytes: live memory = alloc_bytes - freed_bytes */
    u64 sync_ns;       /* time threads spent blocked in synchronisations */
    u64 iterations;    /* synchronisations that ended a run of dispatched work */
    u64 iter_ns;       /* first dispatch after a sync -> the sync's return */
    u64 iter_ns_last;
    u64 iter_start_ns; /* 0: no work dispatched since the last sync */
    u64 last_ns;       /* the last call seen */
    u64 iter_launches;    /* of the open iteration, seen in the runtime library */
    u64 iter_launches_rt; /* ... and in the lower runtime library */
    u64 iter_h2d;         /* H2D bytes of the open iteration */
    u64 class_iters[2];   /* iterations that ended, by class: [0] decode-like, [1] prefill-like */
    u64 class_ns[2];      /* their spans */
};

struct fx_alloc_key {
    u32 tgid;
    u32 pad;
    u64 ptr;
};

struct fx_alloc {
    u64 size;
    s32 dev;
    u32 pad;
};

/* Per-thread state of calls in progress and the thread's current device. */
struct fx_thread {
    s32 dev_plus1;   /* device selected by this thread + 1; 0: none */
    s32 pending_dev; /* argument of a DEVICE_SET call in progress */
    u32 sync_depth;  /* runtimes call their own sync functions: count the outermost only */
    u32 alloc_depth;
    u64 sync_start_ns;
    u64 alloc_out;   /* the out-pointer argument of the allocation in progress */
    u64 alloc_size;
    u64 alloc_start_ns;
    u32 sync_sym;
    u32 alloc_sym;
};

/* One call (FX_TRACE). Calls probed on return carry their duration; iterations are
 * reported as sym FX_SYM_ITERATION with ts_ns at their start. */
struct fx_event {
    u64 ts_ns; /* CLOCK_MONOTONIC */
    u64 dur_ns;
    u64 bytes;
    u32 tgid;
    u32 tid;
    s32 dev;
    s32 ret;
    u16 sym;
    u8 op;
    u8 dir;
    u32 pad;
};

#endif
