/* Layout shared by the emulated libascendcl.so (client) and the device server.
 *
 * Shared memory, all memfds the server creates and passes over its unix socket once it has
 * admitted a process (root, its own user, or a member of the client group: SO_PEERCRED):
 *   - one device segment per device: parameters, memory in use, the server's next
 *     deadline; sealed against writes (F_SEAL_FUTURE_WRITE), so clients map it read-only;
 *   - one doorbell page per device, the only memory every client of a device can write;
 *   - one client segment per process: a submission ring per device, stream completion
 *     counters and event completion records, written by the server;
 *   - one device memory file per (process, device): sparse, capacity bytes, sealed against
 *     resizing. A process maps only its own: device memory of another process is in a file
 *     it is never given, as a real device's contexts keep their memory apart. The server
 *     allocates offsets device-wide (capacity is accounted over all processes) and punches
 *     the hole in the owner's file on free;
 *   - one memfd per IPC export (aclrtIpcMemGetExportKey): exactly the exported pages of one
 *     allocation, which move there from the owner's file; the exporter maps it over the
 *     allocation's addresses, and each process allowed to import the key maps it too.
 *
 * The hot path (a launch) writes one op into the client's ring and rings the doorbell
 * only when the server would otherwise sleep past the op's modelled completion.
 */
#ifndef FLEXNPU_EMU_SHARED_H_
#define FLEXNPU_EMU_SHARED_H_

#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#define EMU_MAGIC_DEV 0x46584e5044455631ULL    /* "FXNPDEV1" */
#define EMU_MAGIC_CLIENT 0x46584e50434c5431ULL /* "FXNPCLT1" */
#define EMU_PROTO_VERSION 2
#define EMU_CLIENT_GROUP "flexnpu" /* who may use the emulator besides root (paths.CLIENT_GROUP) */
#define EMU_MAX_FDS 3 /* fds one message carries */

#define EMU_MAX_DEVICES 16
#define EMU_RING_SLOTS 4096 /* power of two */
#define EMU_MAX_STREAMS 1024
#define EMU_MAX_EVENTS 8192
#define EMU_MAX_NAMES 1024
#define EMU_NAME_LEN 48
#define EMU_EFF_SLOTS 16 /* >= number of built-in kernels */
#define EMU_MEM_ALIGN 4096 /* allocation granularity: whole pages, so frees return memory */

/* Stream indices reserved per device in the client segment. */
#define EMU_STREAM_DEFAULT(dev) (dev)                  /* the NULL stream */
#define EMU_STREAM_SYNCCOPY(dev) (EMU_MAX_DEVICES + (dev)) /* synchronous copies and memsets */
#define EMU_STREAM_FIRST_USER (2 * EMU_MAX_DEVICES)

enum emu_op_kind {
    EMU_OP_KERNEL = 1,
    EMU_OP_COPY = 2,         /* name_id is the aclrtMemcpyKind */
    EMU_OP_MEMSET = 3,
    EMU_OP_EVENT_RECORD = 4, /* zero work; stamps the event at completion */
    EMU_OP_EVENT_WAIT = 5,   /* zero work; the stream waits for event >= gen */
};

enum emu_mode { EMU_MODE_SERIAL = 0, EMU_MODE_SHARED = 1, EMU_MODE_CONTEXTS = 2 };

/* The AI Core units a kernel runs on (contexts mode, docs/emulator.md): cube cores (AIC),
 * vector cores (AIV), or both, a block being one AIC with EMU_MIX_AIV_PER_AIC AIVs. Copies,
 * memsets and events use none (DMA engines and the scheduler). */
enum emu_core_class { EMU_CORE_NONE = 0, EMU_CORE_CUBE = 1, EMU_CORE_VECTOR = 2, EMU_CORE_MIX = 3 };
#define EMU_MIX_AIV_PER_AIC 2

/* Names the server pre-registers: copies and memsets are reported under these. */
#define EMU_NAME_MEMSET 0
#define EMU_NAME_COPY_BASE 1 /* + aclrtMemcpyKind (0..7) */
#define EMU_NAME_FIRST_KERNEL 9

struct emu_op {
    uint64_t t_submit_ns; /* CLOCK_MONOTONIC at the call */
    uint64_t stream_seq;  /* 1-based position on its stream */
    uint32_t stream;      /* index into the client's stream table */
    uint16_t kind;        /* enum emu_op_kind */
    uint16_t name_id;     /* kernel name, or copy kind */
    union {
        struct {                 /* EMU_OP_EVENT_RECORD, EMU_OP_EVENT_WAIT */
            uint32_t event;      /* event index */
            uint32_t event_gen;  /* record generation */
        };
        struct {                 /* EMU_OP_KERNEL */
            uint32_t block_dim;  /* aclrtLaunchKernel's blockDim (0: the whole device) */
            uint32_t core_class; /* enum emu_core_class (EMU_CORE_NONE: mix) */
        };
    };
    double flops;         /* work: floating point operations */
    double hbm_bytes;     /* work: device memory traffic */
    double link_bytes;    /* work: host link traffic */
    uint64_t copy_bytes;  /* bytes the op copies or sets (accounting) */
};

struct emu_ring {
    _Atomic uint64_t head; /* next slot the server reads */
    /* A client whose ring is full sleeps on room_gen (a futex word), counted in room_waiters;
     * the server bumps it and wakes them once it has taken an eighth of the ring. */
    _Atomic uint32_t room_gen;
    _Atomic uint32_t room_waiters;
    char pad0[48];
    _Atomic uint64_t tail; /* next slot the client writes */
    char pad1[56];
    struct emu_op ops[EMU_RING_SLOTS];
};

struct emu_stream_state {
    _Atomic uint32_t completed; /* low 32 bits of the last completed stream_seq; futex word */
    _Atomic uint32_t waiters;   /* clients blocked on `completed` */
    _Atomic uint32_t device;    /* device the stream belongs to, + 1 (0: unused) */
    uint32_t pad;
};

struct emu_event_state {
    _Atomic uint32_t completed_gen; /* generation whose record has completed; futex word */
    _Atomic uint32_t waiters;
    _Atomic int64_t t_ns; /* modelled completion time of that record */
};

struct emu_client_seg {
    uint64_t magic;
    uint32_t version;
    int32_t pid;
    struct emu_stream_state streams[EMU_MAX_STREAMS];
    struct emu_event_state events[EMU_MAX_EVENTS];
    struct emu_ring rings[EMU_MAX_DEVICES];
};

struct emu_params {
    double peak_flops;    /* FLOP/s, fp16 dense */
    double hbm_bw;        /* bytes/s */
    double link_bw;       /* bytes/s, host <-> device */
    double launch_ns;     /* submission to earliest start */
    double time_scale;    /* multiplies every modelled time */
    uint64_t capacity;    /* device memory, bytes */
    uint32_t mode;        /* enum emu_mode */
    uint32_t pad;
    char soc_name[32];
    double p2p_bw;        /* bytes/s, device <-> device (inter-device copies) */
    /* Achieved fraction of peak per built-in kernel (index: enum emu_builtin), compute and
     * HBM: a kernel's work is divided by them before the roofline. 1.0 = peak. */
    double eff_flops[EMU_EFF_SLOTS];
    double eff_hbm[EMU_EFF_SLOTS];
    /* contexts mode: the cores a kernel's blockDim is counted in, and the time the device
     * stays idle while it changes from one process's context to another's (unscaled) */
    uint32_t cube_cores;     /* AIC */
    uint32_t vector_cores;   /* AIV */
    double context_switch_ns;
};

struct emu_dev_seg {
    uint64_t magic;
    uint32_t version;
    uint32_t index;
    struct emu_params params;
    _Atomic uint64_t mem_used;   /* by every process, bytes (page-rounded) */
    _Atomic int64_t deadline_ns; /* when the server next wakes by itself; INT64_MAX: idle */
};

struct emu_bell { /* one page per device, writable by its clients */
    _Atomic uint32_t doorbell; /* futex word the server sleeps on */
};

/* Control messages (SOCK_SEQPACKET). Fixed size; fds ride along with SCM_RIGHTS. */
enum emu_req_type {
    EMU_REQ_HELLO = 1,       /* a = EMU_PROTO_VERSION; fd back: client segment; rep.a = device count */
    EMU_REQ_OPEN_DEVICE = 2, /* device; fds back: device segment (read-only), doorbell, this
                                process's device memory; rep.a = capacity */
    EMU_REQ_ALLOC = 3,       /* device, a = size; rep.a = offset */
    EMU_REQ_FREE = 4,        /* device, a = offset; rep.a = size freed */
    EMU_REQ_NAME = 5,        /* name; rep.a = name id */
    EMU_REQ_STATUS = 6,      /* reply: JSON text in chunks, then an empty message */
    EMU_REQ_PID = 7,         /* rep.a = this process's pid as the server sees it (aclrtDeviceGetBareTgid) */
    /* IPC memory (aclrtIpcMem*): struct emu_ipc_req in, struct emu_ipc_rep back */
    EMU_REQ_IPC_EXPORT = 8,  /* device, a = offset of an allocation, b = bytes, flags; fd back: a memfd
                                holding those bytes (rep.a long, page-rounded), rep.key: the new key */
    EMU_REQ_IPC_MAPPED = 9,  /* key: the exporter now maps the memfd over its allocation */
    EMU_REQ_IPC_SET_PIDS = 10, /* key, npids pids: who may import it */
    EMU_REQ_IPC_IMPORT = 11, /* device (current), key, flags; fd back: the export's memfd; rep.a = bytes
                                mapped (page-rounded), rep.b = bytes exported, rep.dev = exporter's device */
    EMU_REQ_IPC_CLOSE = 12,  /* key: the exporter closes its key, or an importer its oldest import of it */
};
/* A process the server does not admit gets, to its first request, rep.err =
 * ACL_ERROR_RT_NO_PERMISSION with rep.a = the client group's gid (EMU_NO_GROUP: none on the
 * node, root only), and the connection closes. */
#define EMU_NO_GROUP UINT64_MAX

struct emu_req {
    uint32_t type;
    int32_t device;
    uint64_t a;
    uint64_t b;
    char name[EMU_NAME_LEN];
};

struct emu_rep {
    int32_t err; /* aclError */
    uint32_t pad;
    uint64_t a;
    uint64_t b;
};

/* IPC memory requests and replies: the head of struct emu_req / emu_rep, then a key. */
#define EMU_IPC_KEY_LEN 65 /* 64 characters and a NUL, as CANN's keys (aclrtIpcMemGetExportKey len) */
#define EMU_IPC_PIDS_PER_REQ 16

struct emu_ipc_req {
    uint32_t type;
    int32_t device;
    uint64_t a;
    uint64_t b;
    uint64_t flags;
    char key[EMU_IPC_KEY_LEN];
    char pad[3];
    uint32_t npids;
    int32_t pids[EMU_IPC_PIDS_PER_REQ];
};

struct emu_ipc_rep {
    int32_t err; /* aclError */
    uint32_t dev; /* import: the exporter's device */
    uint64_t a;
    uint64_t b;
    char key[EMU_IPC_KEY_LEN];
    char pad2[7];
};

static inline uint64_t emu_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Solo duration of a piece of work on a device: the roofline bound, scaled. */
static inline double emu_solo_ns(const struct emu_params *p, double flops, double hbm, double link)
{
    double t = 0.0, x;
    if (flops > 0 && (x = flops / p->peak_flops) > t) t = x;
    if (hbm > 0 && (x = hbm / p->hbm_bw) > t) t = x;
    if (link > 0 && (x = link / p->link_bw) > t) t = x;
    return t * 1e9 * p->time_scale;
}

#endif /* FLEXNPU_EMU_SHARED_H_ */
