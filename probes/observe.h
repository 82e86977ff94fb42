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
#ifndef FX_MAX_FUNCS
#define FX_MAX_FUNCS 65536 /* kernel function handles classed by their name */
#endif
#ifndef FX_MAX_SHAPES
#define FX_MAX_SHAPES 65536 /* (process, device, shape bucket) histogram entries */
#endif
#ifndef FX_MAX_SKIP
#define FX_MAX_SKIP 1024 /* processes never counted (executors) */
#endif
#ifndef FX_NAME_LEN
#define FX_NAME_LEN 96 /* bytes of a kernel name sent to Python (longer names are cut) */
#endif

/* Phase signals: what names the work. A kernel launch is classed by the name its function
 * handle was made from (Python classes the name and writes the class into `funcs`); an
 * operator entry point (aclnn) by its own symbol name (a constant of its probe). */
#define FX_SIG_KERNEL 0
#define FX_SIG_OPERATOR 1
#define FX_NUM_SIGS 2
/* Classes of named work; 0 is unnamed (or named something that is not attention). */
#define FX_CLS_PREFILL 1
#define FX_CLS_DECODE 2
#define FX_CLS_EITHER 3 /* attention of either phase (a fused operator) */
#define FX_NUM_CLS 3

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
    /* named work, [signal * FX_NUM_CLS + class - 1]: calls in all, and in the open iteration */
    u64 named[FX_NUM_SIGS * FX_NUM_CLS];
    u64 iter_named[FX_NUM_SIGS * FX_NUM_CLS];
    /* iterations that ended, [signal * 4 + held], held = 1 prefill-named work only,
     * 2 decode-named only, 3 both, 0 neither; and their spans */
    u64 sig_iters[FX_NUM_SIGS * 4];
    u64 sig_ns[FX_NUM_SIGS * 4];
    u64 sig_mix[FX_NUM_SIGS * 2]; /* in iterations that held both: prefill calls, decode calls */
    u64 iter_opens0;  /* the device's open and close counts when the open iteration began */
    u64 iter_closes0;
    u64 contended;    /* iterations another process's iteration on the device overlapped */
};

/* A histogram of iteration shapes per (process, device), for the shape classifier in
 * Python: span and launches in half-octave buckets, and whether another process's
 * iteration on the same device overlapped it (its span then measures that work too). */
struct fx_shape_key {
    u32 tgid;
    s32 dev;
    u8 span_b;   /* 0: 0 ns; else 1 + 2*log2(us) + the next bit (half octaves of microseconds) */
    u8 launch_b; /* the same, of the launch count */
    u8 contended;
    u8 pad[5];
};

struct fx_shape {
    u64 iters;
    u64 ns;
    u64 launches;
};

/* Iterations opened and closed on a device, by every process: an iteration during which
 * either count moved (other than by itself) overlapped another process's. */
struct fx_dev_gen {
    u64 opens;
    u64 closes;
};

struct fx_func_key {
    u32 tgid;
    u32 pad;
    u64 handle;
};

/* A kernel function handle was made from a name (sent to Python, which classes it). */
struct fx_name_event {
    u32 tgid;
    u32 pad;
    u64 handle;
    char name[FX_NAME_LEN];
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
    u64 name_ptr;    /* the kernel name of a handle-making call in progress */
    u64 handle_out;  /* ... and where it writes the handle */
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
