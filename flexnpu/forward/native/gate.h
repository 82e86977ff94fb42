/* The dispatch-gate segment of one physical device: its layout, shared by the shim (in
 * application processes) and the forwarding daemon (through libflexnpu_gate.so).
 *
 * Two files per device in the runtime dir, both created by the daemon:
 *   gate-<dev>.ctl  gate parameters. Written only by the daemon; clients open the file
 *                   read-only and map it PROT_READ, so no client can change its own gate.
 *   gate-<dev>.cli  client slots. Each client claims a slot and keeps its counters there;
 *                   it also holds the futex word waiters sleep on and the pending-work
 *                   summary that priority needs, both written by clients.
 *
 * Gate decision for a dispatching call of a client in slot i (priority p):
 *   go  if ctl.slots[i].gate == OPEN and no client of higher priority has work pending
 *       (cli.pending_levels >> (8 * (p + 1)) == 0). A client's level stays counted for
 *       ctl.pending_grace_ns after its sync, so one that dispatches again at once (an
 *       engine's next step) keeps its turn; a waiter uncounts an idle client past its grace;
 *   else wait on cli.wake_seq until that holds, at most max_hold; past max_hold the client
 *       goes anyway and keeps going until its next synchronisation (so nobody starves);
 *       if the daemon's heartbeat is older than FX_HEARTBEAT_STALE_NS it goes at once.
 *
 * In-flight budget (ctl.slots[i].inflight_max, 0: unlimited): a kernel launch, async copy or
 * async memset of the client also waits while its estimate of its own dispatched-but-
 * unfinished launches on the device (cli.inflight_now) has reached the budget; bounded by
 * max_hold and failing open like a gate hold. The shim learns completion from events it
 * records on the application's streams (shim.c, "in-flight budget").
 */
#ifndef FLEXNPU_GATE_H_
#define FLEXNPU_GATE_H_

#include <stdatomic.h>
#include <stdint.h>

#define FX_GATE_MAGIC_CTL 0x464e5047435431ULL /* "FNPGCT1" */
#define FX_GATE_MAGIC_CLI 0x464e5047434c31ULL /* "FNPGCL1" */
#define FX_GATE_VERSION 2 /* 2: in-flight budget (ctl inflight_max, owner; cli inflight_*) */
#define FX_MAX_SLOTS 64
#define FX_NUM_OPS 18  /* Op in flexnpu/runtimes/base.py */
#define FX_NUM_DIRS 5  /* Direction in flexnpu/runtimes/base.py */
#define FX_PRIO_LEVELS 8
#define FX_HEARTBEAT_STALE_NS 1000000000LL /* a daemon silent this long is gone: fail open */
#define FX_DEFAULT_MAX_HOLD_NS 200000000ULL  /* 200 ms */
#define FX_DEFAULT_PENDING_GRACE_NS 1000000ULL /* 1 ms */

enum fx_gate { FX_GATE_OPEN = 0, FX_GATE_CLOSED = 1 };
enum fx_role { FX_ROLE_AUTO = 0, FX_ROLE_PREFILL = 1, FX_ROLE_DECODE = 2 };
enum fx_slot_state { FX_SLOT_FREE = 0, FX_SLOT_CLAIMED = 1, FX_SLOT_ADMITTED = 2 };

enum fx_owner { FX_OWNER_NONE = 0, FX_OWNER_CONTROLLER = 1, FX_OWNER_MANUAL = 2 };

/* 64-byte aligned, so gate, priority and inflight_max, which every dispatch loads, share
 * one cache line. */
struct __attribute__((aligned(64))) fx_ctl_slot { /* daemon-written */
    _Atomic uint32_t gate;         /* enum fx_gate */
    _Atomic uint32_t priority;     /* 0..7; higher goes first */
    _Atomic uint32_t inflight_max; /* launches it may have dispatched and unfinished; 0: unlimited */
    _Atomic uint32_t owner;        /* enum fx_owner: who set these (the daemon's bookkeeping) */
    _Atomic uint64_t max_hold_ns;  /* longest a call of this client is held */
    _Atomic int32_t pid;           /* the client admitted into this slot; 0: none */
    _Atomic uint32_t gen;          /* the claim generation admitted */
    _Atomic uint64_t changed_ns;   /* CLOCK_MONOTONIC of the last gate write (enforcement latency) */
    uint64_t reserved[3];
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
    uint64_t reserved[7];
    struct fx_ctl_slot slots[FX_MAX_SLOTS];
};

struct fx_cli_slot { /* client-written */
    _Atomic uint32_t state; /* enum fx_slot_state; CAS FREE->CLAIMED by a client */
    _Atomic uint32_t gen;   /* bumped at each claim */
    _Atomic int32_t pid;
    _Atomic uint32_t role; /* enum fx_role, from FLEXNPU_ROLE */
    _Atomic uint32_t pending; /* 1 while the client has work dispatched since its last sync */
    _Atomic uint32_t pending_level; /* the priority level counted in pending_levels */
    _Atomic uint32_t counted;       /* 1 while pending_level is counted in pending_levels */
    _Atomic uint32_t pad1;
    _Atomic uint64_t idle_since_ns; /* its last sync that ended pending work */
    _Atomic uint32_t waiting;       /* threads held at the gate now */
    _Atomic uint32_t released;      /* 1 after max_hold released it; cleared at its next sync */
    _Atomic uint64_t claimed_ns;
    _Atomic uint64_t ops[FX_NUM_OPS];      /* calls by Op */
    _Atomic uint64_t bytes[FX_NUM_DIRS];   /* copied, by Direction */
    _Atomic uint64_t memset_bytes;
    _Atomic uint64_t mem_held;             /* device memory held now */
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
    uint64_t reserved[2];
};

struct fx_cli_seg {
    uint64_t magic;
    uint32_t version;
    uint32_t device;
    _Atomic uint64_t pending_levels; /* 8 bits per priority level: clients with pending work */
    _Atomic uint32_t wake_seq;       /* futex word: bumped by whatever may release a waiter */
    _Atomic uint32_t waiters;        /* threads sleeping on wake_seq */
    _Atomic uint32_t claim_seq;      /* futex word the daemon may sleep on: bumped on a claim */
    uint32_t pad;
    uint64_t reserved[8];
    struct fx_cli_slot slots[FX_MAX_SLOTS];
};

#endif
