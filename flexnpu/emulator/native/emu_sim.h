/* The device server's state and its performance model (emu_sim.c). */
#ifndef FLEXNPU_EMU_SIM_H_
#define FLEXNPU_EMU_SIM_H_

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "emu_shared.h"

struct sop { /* an op on the model's timeline */
    struct emu_op op;
    struct client *c;
    double arrive;    /* model time (ns since server start) it may start */
    double ready_at;  /* model time it became ready at the head of its stream: its arrival, or
                         its predecessor's completion if later (serial order) */
    double solo;      /* ns it takes alone */
    double remaining; /* fraction of its work left, 1 -> 0 */
    double rate;      /* fraction of full speed it runs at now */
    double util[3];   /* share of compute, HBM, link it uses at full speed */
    uint64_t order;   /* arrival order on the device */
    int nrun;         /* shared mode: ops of its process running with it, itself included */
    double cap;       /* highest rate it may run at: the share of its class's cores it holds
                         (contexts mode) over its compute share; 1 elsewhere */
    bool started;     /* contexts mode: running, holding its cores until it completes */
    uint32_t cube_held, vector_held; /* contexts mode: cores it holds (or will, once started) */
    struct sop *next;
};

struct squeue { /* one stream of one client, in stream order */
    struct sop *head, *tail;
    int active_slot; /* index in the device's active list, or -1 */
};

struct client_dev { /* what a client did on one device: the ground truth `emu status` reports */
    bool open;
    double busy_ns;
    double *busy_by_name;     /* [EMU_MAX_NAMES] */
    uint64_t *count_by_name;  /* [EMU_MAX_NAMES] */
    uint64_t ops_by_kind[8];  /* enum emu_op_kind */
    uint64_t bytes_by_copy_kind[8]; /* aclrtMemcpyKind */
    uint64_t memset_bytes;
    uint64_t mem_used;
    uint64_t allocs, frees;
    int mem_fd; /* this client's device memory of this device (a memfd), -1 before it opens it */
    uint32_t queued; /* its ops in the model's stream queues (bounded by EMU_MAX_QUEUED) */
    double last_done; /* model time its last op with work completed here (serial order) */
    int nrun;         /* shared mode: its ops running now (scratch of running_set) */
};

/* Ops one process may have queued on one device, as a real runtime bounds its streams' task
 * queues: past it the server leaves the rest in the process's ring, the ring fills, and the
 * process's next launch sleeps until the device has done some of its work. */
#define EMU_MAX_QUEUED 4096

/* A connection's life: it is PENDING until it registers (EMU_REQ_HELLO; status queries
 * stay PENDING), ALIVE until it closes, then EXITED: its record is kept for the status. */
enum client_state { CLIENT_PENDING, CLIENT_ALIVE, CLIENT_EXITED };

struct outmsg { /* a reply message the peer's socket had no room for yet */
    struct outmsg *next;
    size_t len;
    int nfds;
    int fds[EMU_MAX_FDS]; /* the server's own duplicates, closed once sent */
    char data[];
};

struct client {
    int fd;
    pid_t pid;
    uid_t uid;     /* effective ids at connect (SO_PEERCRED) */
    gid_t gid;
    bool admitted; /* root, the server's user, or a member of the client group */
    uint64_t start_ticks; /* the process's start time (/proc/<pid>/stat), 0 if unknown: with pid, who it is */
    enum client_state state; /* written under every device lock */
    bool drop;        /* closed by the poll loop; freed or marked exited once nothing refers to it */
    uint64_t last_ns; /* a PENDING connection's last sign of life: accept, request, reply progress */
    struct outmsg *out, *out_tail; /* replies not sent yet: no request is read until they are */
    size_t out_bytes;
    uint64_t id;
    struct emu_client_seg *seg;
    struct squeue queues[EMU_MAX_STREAMS];
    struct client_dev dev[EMU_MAX_DEVICES];
    double connected_s, exited_s;
    bool part_known; /* partition mode: part looked up (from FLEXNPU_ROLE in its environment) */
    int part;        /* enum emu_part */
};

struct block { /* an allocation in device memory */
    uint64_t off, size;
    struct client *owner;    /* NULL: freed by its owner, still held by IPC importers (exp) */
    struct ipc_export *exp;  /* its IPC export (emu_server.c), or NULL */
};

struct device {
    int index;
    pthread_t thread;
    pthread_mutex_t lock;
    struct emu_dev_seg *seg; /* clients map it read-only */
    struct emu_bell *bell;   /* the doorbell page, writable by clients */
    int seg_fd, bell_fd;
    uint64_t mem_used;       /* the allocator's count; published in seg->mem_used */
    struct emu_params p;
    /* allocator */
    struct block *blocks; /* sorted by off */
    size_t nblocks, cap_blocks;
    /* model */
    double t_sim; /* model time simulated up to */
    double busy_ns;
    uint64_t next_order;
    struct squeue **active; /* streams with queued ops */
    size_t nactive, cap_active;
    struct sop *current; /* serial mode: the op holding the device */
    struct sop *part_current[3]; /* partition mode: the op holding each partition */
    /* contexts mode: the process whose context the device holds (NULL: none, or it exited),
     * and a switch to another one under way until switch_end */
    struct client *ctx_owner, *ctx_next;
    double switch_end;
    uint64_t switches;
    double cube_busy_ns, vector_busy_ns; /* core-ns held / cores of the class */
    void *order_buf; /* contexts mode: scratch for the serial order of the stream heads */
    size_t order_cap;
    bool event_poll;     /* a stream waits on an event another device completes */
};

#define EMU_MAX_CLIENTS 256

/* Partition mode (--partition prefill=S,decode=S): a fixed fraction of every resource of
 * each device per role, in the manner of Ascend's vNPU templates. A client's role is the
 * FLEXNPU_ROLE in its environment; other clients share what the two leave (or the whole
 * device when they leave nothing). Each partition runs its ops one at a time. */
enum emu_part { EMU_PART_PREFILL = 0, EMU_PART_DECODE = 1, EMU_PART_OTHER = 2 };
struct emu_partition {
    bool on;
    double share[3]; /* enum emu_part */
};
/* Parses "prefill=0.6,decode=0.4"; nonzero with a message in err on bad input. */
int sim_parse_partition(const char *spec, struct emu_partition *out, char *err, size_t errlen);

struct server {
    struct device dev[EMU_MAX_DEVICES];
    int ndev;
    struct client *clients[EMU_MAX_CLIENTS]; /* live and recently exited */
    int nclients;
    uint64_t next_client_id;
    char names[EMU_MAX_NAMES][EMU_NAME_LEN];
    int nnames;
    pthread_mutex_t names_lock;
    uint64_t t0_ns; /* CLOCK_MONOTONIC of model time 0 */
    struct emu_partition partition;
    _Atomic bool stopping;
};

extern struct server g_srv;

/* Model time <-> CLOCK_MONOTONIC. */
static inline double sim_now(void) { return (double)(emu_now_ns() - g_srv.t0_ns); }
static inline int64_t sim_abs(double t) { return (int64_t)g_srv.t0_ns + (int64_t)(t + 0.5); }

/* Moves new ops of every client from the rings into the stream queues. Caller holds d->lock. */
void sim_ingest(struct device *d);
/* Runs the model up to model time t. Caller holds d->lock. */
void sim_advance(struct device *d, double t);
/* Model time of the next completion or arrival, or INFINITY. Caller holds d->lock. */
double sim_next_deadline(struct device *d);
/* Drops every op of client c (it has gone). Caller holds d->lock. */
void sim_drop_client(struct device *d, struct client *c);
/* True if some client ring of the device holds ops not yet ingested. */
bool sim_rings_pending(struct device *d);
size_t sim_pending_ops(struct device *d);

#endif
