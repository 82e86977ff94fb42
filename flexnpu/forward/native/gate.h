/* The dispatch gate of one physical device: the memory shared by the shim (in application
 * processes) and the forwarding daemon (through libflexnpu_gate.so), and the admission
 * messages that hand it out. The trust boundary is described in docs/security.md.
 *
 * Per device, all made by the daemon:
 *   gate-<dev>.sock  admission socket (unix, SOCK_SEQPACKET). A shim connects at attach and
 *                    keeps the connection for its life; the daemon learns who it is from the
 *                    kernel (peer credentials, a pidfd), never from shared memory, and either
 *                    refuses it (a one-line reason) or answers with two fds (SCM_RIGHTS):
 *   gate-<dev>.ctl   the gate table (struct fx_ctl_seg), daemon-written. Clients get it as an
 *                    O_RDONLY fd and map it PROT_READ: gate parameters of every slot, the
 *                    identity the daemon admitted there, the priority summary, the wake word
 *                    and the heartbeat. The file is root-owned, 0640 root:flexnpu.
 *   a client page    (struct fx_page, a sealed memfd, one per admitted client): the only memory
 *                    a client writes. Its counters and its pending/idle transitions; on a
 *                    transition it bumps change_seq and wakes the daemon's summary thread.
 *
 * Gate decision for a dispatching call of the client in slot i (priority p, daemon-set):
 *   go  if ctl.slots[i].gate == OPEN and no client of higher priority has work pending
 *       (fx_levels_hold(ctl.pending_levels, p) is false). The daemon computes pending_levels
 *       from the clients' pages, one count per client at the priority it set; a client's
 *       count stays for ctl.pending_grace_ns after its sync, so one that dispatches again at
 *       once (an engine's next step) keeps its turn;
 *   else wait on ctl.wake_seq until that holds, at most max_hold; past max_hold the client
 *       goes anyway and keeps going until its next synchronisation (so nobody starves);
 *       if the daemon is gone (its admission connection hung up, or its heartbeat is older
 *       than FX_HEARTBEAT_STALE_NS) it goes at once. A held call checks every
 *       FX_WAIT_SLICE_NS.
 *
 * In-flight budget (ctl.slots[i].inflight_max, 0: unlimited): a kernel launch, async copy or
 * async memset of the client also waits while its estimate of its own dispatched-but-
 * unfinished launches on the device (page.inflight_now) has reached the budget; bounded by
 * max_hold and failing open like a gate hold (shim_inflight.h).
 */
#ifndef FLEXNPU_GATE_H_
#define FLEXNPU_GATE_H_

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#define FX_GATE_MAGIC_CTL 0x464e5047435433ULL /* "FNPGCT3" */
#define FX_PAGE_MAGIC 0x464e5047504733ULL     /* "FNPGPG3" */
#define FX_HELLO_MAGIC 0x464e5048u            /* "FNPH" */
#define FX_WELCOME_MAGIC 0x464e5057u          /* "FNPW" */
#define FX_GATE_VERSION 3 /* 3: admission socket, daemon-computed summary, a page per client */
#define FX_MAX_SLOTS 64
#define FX_NUM_OPS 18  /* Op in flexnpu/runtimes/base.py */
#define FX_NUM_DIRS 5  /* Direction in flexnpu/runtimes/base.py */
#define FX_PRIO_LEVELS 8
#define FX_HEARTBEAT_STALE_NS 1000000000LL /* a daemon silent this long is gone: fail open */
#define FX_WAIT_SLICE_NS 10000000ULL       /* a held call looks for its daemon this often */
#define FX_DEFAULT_MAX_HOLD_NS 200000000ULL  /* 200 ms */
#define FX_DEFAULT_PENDING_GRACE_NS 1000000ULL /* 1 ms */
#define FX_PAGE_SIZE 4096

enum fx_gate { FX_GATE_OPEN = 0, FX_GATE_CLOSED = 1 };
enum fx_role { FX_ROLE_AUTO = 0, FX_ROLE_PREFILL = 1, FX_ROLE_DECODE = 2 };
/* How the client runs: gated (its own context; the shim holds its calls) or forwarded (its
 * calls are entries in a ring the device's executor runs in the one context it owns). */
enum fx_mode { FX_MODE_GATED = 0, FX_MODE_FORWARD = 1 };
/* RESERVED: a slot adopted by a restarted daemon, kept for its live process to reconnect */
enum fx_slot_state { FX_SLOT_FREE = 0, FX_SLOT_ADMITTED = 2, FX_SLOT_RESERVED = 3 };
enum fx_owner { FX_OWNER_NONE = 0, FX_OWNER_CONTROLLER = 1, FX_OWNER_MANUAL = 2 };

/* 64 bytes, aligned: gate, priority and inflight_max, which every dispatch loads, share one
 * cache line with nothing any client writes. */
struct __attribute__((aligned(64))) fx_ctl_slot { /* daemon-written */
    _Atomic uint32_t gate;         /* enum fx_gate */
    _Atomic uint32_t priority;     /* 0..7; higher goes first */
    _Atomic uint32_t inflight_max; /* launches it may have dispatched and unfinished; 0: unlimited */
    _Atomic uint32_t owner;        /* enum fx_owner: who set these (the daemon's bookkeeping) */
    _Atomic uint64_t max_hold_ns;  /* longest a call of this client is held */
    _Atomic int32_t pid;           /* the admitted process (from the kernel); 0: none */
    _Atomic uint32_t gen;          /* bumped at each admission into this slot */
    _Atomic uint64_t changed_ns;   /* CLOCK_MONOTONIC of the last gate write (enforcement latency) */
    _Atomic uint32_t state;        /* enum fx_slot_state */
    _Atomic uint32_t uid;          /* the admitted process's effective uid */
    _Atomic uint32_t role;         /* enum fx_role, as the client declared it at admission */
    _Atomic uint32_t mode;         /* enum fx_mode, as the client declared it at admission */
    _Atomic uint64_t start_time;   /* /proc/<pid>/stat starttime: the process, across pid reuse */
};

struct fx_ctl_seg {
    uint64_t magic;
    uint32_t version;
    uint32_t device;
    _Atomic int32_t daemon_pid;
    uint32_t pad;
    _Atomic uint64_t heartbeat_ns; /* CLOCK_MONOTONIC, every 100 ms while the daemon lives */
    _Atomic uint32_t default_gate;
    _Atomic uint32_t default_priority;
    _Atomic uint64_t default_max_hold_ns;
    _Atomic uint64_t pending_grace_ns; /* how long a synced client's level stays counted */
    uint64_t reserved0[2];
    /* the priority summary and the wake word: written by the daemon alone */
    _Atomic uint64_t pending_levels __attribute__((aligned(64))); /* 8 bits per level: clients counted */
    _Atomic uint32_t wake_seq; /* futex word: bumped by whatever may release a waiter */
    uint32_t pad2;
    _Atomic uint64_t summaries; /* times the summary was recomputed (diagnostics) */
    uint64_t reserved[5];
    struct fx_ctl_slot slots[FX_MAX_SLOTS];
};

/* One admitted client's own memory: written by that client only (the daemon initialises it
 * and reads it). Nothing in it can change another client's gate. */
struct fx_page {
    uint64_t magic;   /* FX_PAGE_MAGIC, set by the daemon */
    uint32_t version;
    uint32_t slot;    /* where the daemon admitted it */
    _Atomic uint32_t change_seq; /* futex word: the client bumps it on a pending/idle transition */
    _Atomic uint32_t pending;    /* 1 while the client has work dispatched since its last sync */
    _Atomic uint64_t idle_since_ns; /* its last sync that ended pending work */
    _Atomic uint32_t waiting;       /* threads held at the gate now */
    _Atomic uint32_t released;      /* 1 after max_hold released it; cleared at its next sync */
    _Atomic uint64_t ops[FX_NUM_OPS];      /* calls by Op */
    _Atomic uint64_t bytes[FX_NUM_DIRS];   /* copied, by Direction */
    _Atomic uint64_t memset_bytes;
    _Atomic uint64_t mem_held;             /* device memory held now (self-reported) */
    _Atomic uint64_t mem_peak;
    _Atomic uint64_t iterations;           /* syncs that ended a run of dispatched work */
    _Atomic uint64_t iter_ns_total;        /* first dispatch after a sync -> the sync's return */
    _Atomic uint64_t iter_ns_last;
    _Atomic uint64_t iter_start_ns;
    _Atomic uint64_t gate_waits;           /* calls that were held */
    _Atomic uint64_t gate_wait_ns;         /* time held */
    _Atomic uint64_t gate_expired;         /* holds ended by max_hold */
    _Atomic uint64_t last_release_lag_ns;  /* gate opened (ctl.changed_ns) -> this client went */
    _Atomic uint64_t last_hold_lag_ns;     /* gate closed (ctl.changed_ns) -> a call of it held */
    _Atomic uint64_t inflight_now;         /* the shim's estimate of its unfinished launches */
    _Atomic uint64_t inflight_waits;       /* launches that waited for the budget */
    _Atomic uint64_t inflight_wait_ns;     /* time they waited */
};
_Static_assert(sizeof(struct fx_page) <= FX_PAGE_SIZE, "a client page is one page");

/* Admission: the shim's first (and only) message, and the daemon's answer. The answer to an
 * admitted client carries two fds (SCM_RIGHTS): the gate table O_RDONLY, then its page. */
struct fx_hello {
    uint32_t magic;   /* FX_HELLO_MAGIC */
    uint32_t version; /* FX_GATE_VERSION */
    uint32_t role;    /* enum fx_role */
    uint32_t mode;    /* enum fx_mode */
};

struct fx_welcome {
    uint32_t magic;   /* FX_WELCOME_MAGIC */
    uint32_t version;
    int32_t status;   /* 0: admitted; else a negative errno (EACCES, ENOSPC, EUSERS, ...) */
    uint32_t slot;
    char reason[240]; /* why not, one line, for the program's stderr */
};

/* ---- the priority summary: one definition, used by the shim (reads) and the daemon (writes) */

/* The count of one client at priority prio in pending_levels. */
static inline uint64_t fx_level_one(uint32_t prio) { return 1ULL << (8 * (prio & (FX_PRIO_LEVELS - 1))); }

/* True while a client of priority prio must wait: some level above it is counted. */
static inline bool fx_levels_hold(uint64_t levels, uint32_t prio)
{
    prio &= FX_PRIO_LEVELS - 1;
    return prio + 1 < FX_PRIO_LEVELS && (levels >> (8 * (prio + 1))) != 0;
}

/* Whether a client's work counts at now: pending, or synced less than grace ago. *left gets
 * the ns until its grace ends (0 if it does not count or is pending). Garbage from a hostile
 * page (an idle stamp in the future) does not count. */
static inline bool fx_page_counts(uint32_t pending, uint64_t idle_since, uint64_t now, uint64_t grace,
                                  uint64_t *left)
{
    *left = 0;
    if (pending) return true;
    if (!idle_since || idle_since > now || now - idle_since >= grace) return false;
    *left = grace - (now - idle_since);
    return true;
}

#endif
