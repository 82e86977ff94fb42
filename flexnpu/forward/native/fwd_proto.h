/* Forwarded execution: what a forwarded client (libflexnpu_fwd.so in an application) and the
 * executor of one device (flexnpu-executor, the process that owns the device's one context)
 * share. docs/architecture.md, "Forwarded execution", has the design; docs/security.md the
 * trust boundary: everything in this memory is written by the client and is untrusted input
 * to the executor, which copies a record out before it reads it and checks every field.
 *
 * Per client and device, made by the client: one memfd, sealed against resizing before it is
 * sent (so the executor can never fault on a shrunk mapping), passed over exec-<dev>.sock
 * (unix SOCK_SEQPACKET; the executor learns who the client is from the kernel and finds the
 * slot the daemon admitted it into, in forward mode):
 *
 *   [0, 4096)                 struct fwd_hdr: ring indices, doorbells, the deferred error
 *   [4096, +FWD_COMPL_BYTES)  struct fwd_compl[FWD_NCOMPL]: completion words of synchronous calls
 *   ring                      FWD_RING_BYTES of records (struct fwd_rec + payload, 64-byte aligned)
 *   staging                   FWD_STAGE_BYTES: data of synchronous copies to and from pageable memory
 *   host arena                what aclrtMallocHost hands out: both sides map it, so asynchronous
 *                             copies from and to it are zero-copy (the size is fixed at connect)
 *
 * The fast path of an asynchronous call (a kernel launch, a copy from the host arena): the
 * client writes a record and publishes the ring's tail, with no system call; it rings the
 * doorbell (FUTEX_WAKE) only when the executor said it is going to sleep.
 */
#ifndef FLEXNPU_FWD_PROTO_H_
#define FLEXNPU_FWD_PROTO_H_

#include <stdatomic.h>
#include <stdint.h>

#define FWD_MAGIC 0x464e504657443031ULL /* "FNPFWD01" */
#define FWD_HELLO_MAGIC 0x464e5046u     /* "FNPF" */
#define FWD_VERSION 1
#define FWD_HDR_BYTES 4096
#define FWD_NCOMPL 64                     /* synchronous calls in progress at once (client threads) */
#define FWD_COMPL_BYTES (FWD_NCOMPL * 512)
#define FWD_RING_BYTES (4u << 20)         /* records */
#define FWD_STAGE_BYTES (8u << 20)        /* synchronous pageable copies, in chunks of this */
#define FWD_INLINE_MAX (1u << 20)         /* pageable bytes an asynchronous H2D record carries */
#define FWD_HOST_DEFAULT (1ULL << 30)     /* host arena; FLEXNPU_FWD_HOST_MEM changes it */
#define FWD_HOST_MAX (64ULL << 30)
#define FWD_REC_ALIGN 64
#define FWD_MSG_LEN 200
#define FWD_MAX_STREAMS 1024 /* per client */
#define FWD_MAX_EVENTS 4096
#define FWD_MAX_BINS 256
#define FWD_MAX_FUNCS 4096
#define FWD_MAX_ALLOCS 65536
#define FWD_NAME_LEN 128

/* A client's handles are tokens, never the executor's pointers: kind in the top byte, the
 * index the client chose below. The executor looks each one up in that client's own table. */
#define FWD_HANDLE_TAG 0x0f00000000000000ULL
#define FWD_H_STREAM 0x01
#define FWD_H_EVENT 0x02
#define FWD_H_BIN 0x03
#define FWD_H_FUNC 0x04
#define FWD_H_CTX 0x05
#define FWD_H_EXEC 0x06 /* an aclnn operator executor */
static inline uint64_t fwd_handle(uint32_t kind, uint32_t idx)
{
    return FWD_HANDLE_TAG | ((uint64_t)kind << 48) | (uint64_t)idx;
}
/* the index of a handle of this kind; -1 if it is not one */
static inline int64_t fwd_handle_index(uint64_t h, uint32_t kind)
{
    if ((h & 0xff00000000000000ULL) != FWD_HANDLE_TAG || ((h >> 48) & 0xff) != kind) return -1;
    return (int64_t)(h & 0xffffffffULL);
}

enum fwd_op {
    FWD_NOP = 0,
    FWD_PAD = 1,          /* filler to the ring's end */
    /* asynchronous: no completion; an error is kept and returned by the next synchronisation */
    FWD_LAUNCH = 2,       /* a0 func, a1 blockDim, a2 stream; payload: argsData */
    FWD_COPY_ASYNC = 3,   /* a0 dst, a1 destMax, a2 src, a3 count, a4 kind, a5 stream; payload: pageable H2D bytes */
    FWD_MEMSET_ASYNC = 4, /* a0 ptr, a1 maxCount, a2 value, a3 count, a4 stream */
    FWD_RECORD = 5,       /* a0 event, a1 stream */
    FWD_WAIT_EVENT = 6,   /* a0 stream, a1 event */
    FWD_ACLNN_MAKE = 7,   /* an operator's executor made by the client's GetWorkspaceSize (fwd_aclnn.h) */
    FWD_ACLNN_RUN = 8,
    FWD_ACLNN_DESTROY = 9,
    FWD_ACLNN_REPEATABLE = 10,
    FWD_ASYNC_LAST = 15,
    /* synchronous: the record names a completion slot */
    FWD_MALLOC = 16,      /* a0 size, a1 policy -> o0 ptr */
    FWD_FREE = 17,        /* a0 ptr */
    FWD_COPY = 18,        /* a0 dst, a1 destMax, a2 src, a3 count, a4 kind, a5 staging offset (pageable side) */
    FWD_MEMSET = 19,      /* a0 ptr, a1 maxCount, a2 value, a3 count */
    FWD_STREAM_CREATE = 20, /* a0 stream handle, a1 priority, a2 flags */
    FWD_STREAM_DESTROY = 21,
    FWD_STREAM_SYNC = 22, /* a0 stream, a1 timeout ms (-1: none) */
    FWD_STREAM_QUERY = 23, /* -> o0 aclrtStreamStatus */
    FWD_EVENT_CREATE = 24, /* a0 event handle, a1 flags */
    FWD_EVENT_DESTROY = 25,
    FWD_EVENT_SYNC = 26,  /* a0 event, a1 timeout ms */
    FWD_EVENT_QUERY = 27, /* -> o0 aclrtEventStatus */
    FWD_EVENT_STATUS = 28, /* -> o0 aclrtEventRecordedStatus */
    FWD_EVENT_ELAPSED = 29, /* a0 start, a1 end -> o0 float bits */
    FWD_DEVICE_SYNC = 30, /* a0 timeout ms */
    FWD_BIN_LOAD = 31,    /* a0 bin handle; payload: the binary's bytes */
    FWD_BIN_UNLOAD = 32,
    FWD_BIN_FUNC = 33,    /* a0 bin, a1 func handle; payload: the kernel's name */
    FWD_MEM_INFO = 34,    /* a0 attr -> o0 free, o1 total */
    FWD_IPC_EXPORT = 35,  /* a0 ptr, a1 size, a2 flags -> key in the completion's msg */
    FWD_IPC_SET_PID = 36, /* payload: key, then a1 int32 pids */
    FWD_IPC_IMPORT = 37,  /* a0 flags; payload: key -> o0 ptr */
    FWD_IPC_CLOSE = 38,   /* payload: key */
    FWD_SOC_NAME = 39,    /* -> the name in msg */
    FWD_ACLNN_SYNC = 40,  /* reserved for operator calls that answer */
    FWD_OP_COUNT = 48
};

/* One record: a 64-byte head, then `len - 64` bytes of payload; `len` is a multiple of
 * FWD_REC_ALIGN. A record never wraps: a FWD_PAD record fills the ring's end instead. */
struct fwd_rec {
    uint32_t len;
    uint16_t op;     /* enum fwd_op */
    uint16_t compl;  /* completion slot of a synchronous call */
    uint32_t plen;   /* payload bytes that mean something (<= len - 64) */
    uint32_t seq32;  /* the client's record count, for diagnostics */
    uint64_t a[6];
};
_Static_assert(sizeof(struct fwd_rec) == 64, "a record head is one cache line");

enum fwd_compl_state { FWD_C_FREE = 0, FWD_C_POSTED = 1, FWD_C_DONE = 2 };

struct fwd_compl { /* 512 bytes: one per client thread in a synchronous call */
    _Atomic uint32_t state;   /* futex word: POSTED by the client, DONE by the executor */
    _Atomic uint32_t waiting; /* the client sleeps on state: the executor must wake it */
    int32_t rc;               /* the call's aclError */
    uint32_t pad;
    uint64_t o[4];
    char msg[FWD_MSG_LEN];    /* the reason of a failure (aclGetRecentErrMsg), or a key or name */
    char pad2[512 - 16 - 32 - FWD_MSG_LEN];
};
_Static_assert(sizeof(struct fwd_compl) == 512, "completion slot size");

struct fwd_hdr {
    uint64_t magic;
    uint32_t version;
    uint32_t device;      /* physical */
    uint64_t host_bytes;  /* the host arena's size */
    uint64_t host_base;   /* the arena's address in the client (its pointers are translated) */
    uint64_t pad0[4];
    _Atomic uint64_t tail __attribute__((aligned(64))); /* bytes of records published (client) */
    _Atomic uint32_t bell;                               /* futex: bumped by the client when the executor sleeps */
    _Atomic uint32_t exec_sleeping;                      /* executor: "ring the bell" */
    uint64_t pad1[6];
    _Atomic uint64_t head __attribute__((aligned(64))); /* bytes of records consumed (executor) */
    _Atomic uint32_t room;                               /* futex: bumped by the executor as it consumes */
    _Atomic uint32_t client_waiting;                     /* the client waits for room */
    _Atomic int32_t async_rc;                            /* first failure of an asynchronous call since the last sync */
    uint32_t pad2;
    _Atomic uint64_t done_records;                       /* records executed */
    char async_msg[FWD_MSG_LEN] __attribute__((aligned(64)));
};
_Static_assert(sizeof(struct fwd_hdr) <= FWD_HDR_BYTES, "header page");

static inline uint64_t fwd_ring_off(void) { return FWD_HDR_BYTES + FWD_COMPL_BYTES; }
static inline uint64_t fwd_stage_off(void) { return fwd_ring_off() + FWD_RING_BYTES; }
static inline uint64_t fwd_host_off(void) { return fwd_stage_off() + FWD_STAGE_BYTES; }
static inline uint64_t fwd_total(uint64_t host_bytes) { return fwd_host_off() + host_bytes; }

/* The client's first message on exec-<dev>.sock, with the memfd (SCM_RIGHTS). */
struct fwd_hello {
    uint32_t magic;   /* FWD_HELLO_MAGIC */
    uint32_t version; /* FWD_VERSION */
    uint64_t host_bytes;
    uint64_t host_base;
    uint64_t quota;   /* bytes of device memory the client asks to be held to; 0: none */
};

struct fwd_welcome {
    uint32_t magic;
    uint32_t version;
    int32_t status;   /* 0: served; else a negative errno */
    uint32_t pad;
    char reason[240];
};

#endif
