/* libflexnpu_gate.so: the daemon's hands on a gate segment (gate.h), used from Python
 * through ctypes. Writes that clients race with are atomic stores here, and the layout is
 * described from the C declaration itself (fx_layout), so Python keeps no copy of it.
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "gate.h"

#define EXPORT __attribute__((visibility("default")))

EXPORT uint64_t fx_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void wake_all(struct fx_cli_seg *cli)
{
    atomic_fetch_add(&cli->wake_seq, 1);
    long woken = syscall(SYS_futex, &cli->wake_seq, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
    /* The scheduler tends to queue a woken client on the waker's CPU, behind the rest of the
     * daemon's request; step aside so a released call goes now, not when the daemon sleeps. */
    if (woken > 0) sched_yield();
}

/* JSON: {"ctl": {"size": N, "slot": offset, "slot_size": N, "fields": {name: [offset, size]}}, ...} */
#define F(T, f) "\"" #f "\":[%zu,%zu]", offsetof(T, f), sizeof(((T *)0)->f)
EXPORT const char *fx_layout(void)
{
    static char buf[8192];
    if (buf[0]) return buf;
    int n = 0;
#define P(...) n += snprintf(buf + n, sizeof buf - n, __VA_ARGS__)
    P("{\"magic_ctl\":%llu,\"magic_cli\":%llu,", (unsigned long long)FX_GATE_MAGIC_CTL,
      (unsigned long long)FX_GATE_MAGIC_CLI);
    P("\"version\":%d,\"max_slots\":%d,\"num_ops\":%d,\"num_dirs\":%d,\"prio_levels\":%d,", FX_GATE_VERSION,
      FX_MAX_SLOTS, FX_NUM_OPS, FX_NUM_DIRS, FX_PRIO_LEVELS);
    P("\"ctl\":{\"size\":%zu,\"slots\":%zu,\"slot_size\":%zu,\"fields\":{", sizeof(struct fx_ctl_seg),
      offsetof(struct fx_ctl_seg, slots), sizeof(struct fx_ctl_slot));
    P(F(struct fx_ctl_seg, daemon_pid)); P(","); P(F(struct fx_ctl_seg, heartbeat_ns)); P(",");
    P(F(struct fx_ctl_seg, default_gate)); P(","); P(F(struct fx_ctl_seg, default_priority)); P(",");
    P(F(struct fx_ctl_seg, default_max_hold_ns)); P(","); P(F(struct fx_ctl_seg, pending_grace_ns));
    P("},\"slot_fields\":{");
    P(F(struct fx_ctl_slot, gate)); P(","); P(F(struct fx_ctl_slot, priority)); P(",");
    P(F(struct fx_ctl_slot, max_hold_ns)); P(","); P(F(struct fx_ctl_slot, pid)); P(",");
    P(F(struct fx_ctl_slot, gen)); P(","); P(F(struct fx_ctl_slot, changed_ns)); P(",");
    P(F(struct fx_ctl_slot, inflight_max)); P(","); P(F(struct fx_ctl_slot, owner));
    P("}},\"cli\":{\"size\":%zu,\"slots\":%zu,\"slot_size\":%zu,\"fields\":{", sizeof(struct fx_cli_seg),
      offsetof(struct fx_cli_seg, slots), sizeof(struct fx_cli_slot));
    P(F(struct fx_cli_seg, pending_levels)); P(","); P(F(struct fx_cli_seg, wake_seq)); P(",");
    P(F(struct fx_cli_seg, waiters)); P(","); P(F(struct fx_cli_seg, claim_seq));
    P("},\"slot_fields\":{");
    P(F(struct fx_cli_slot, state)); P(","); P(F(struct fx_cli_slot, gen)); P(",");
    P(F(struct fx_cli_slot, pid)); P(","); P(F(struct fx_cli_slot, role)); P(",");
    P(F(struct fx_cli_slot, pending)); P(","); P(F(struct fx_cli_slot, pending_level)); P(",");
    P(F(struct fx_cli_slot, counted)); P(","); P(F(struct fx_cli_slot, idle_since_ns)); P(",");
    P(F(struct fx_cli_slot, waiting)); P(","); P(F(struct fx_cli_slot, released)); P(",");
    P(F(struct fx_cli_slot, claimed_ns)); P(","); P(F(struct fx_cli_slot, ops)); P(",");
    P(F(struct fx_cli_slot, bytes)); P(","); P(F(struct fx_cli_slot, memset_bytes)); P(",");
    P(F(struct fx_cli_slot, mem_held)); P(","); P(F(struct fx_cli_slot, mem_peak)); P(",");
    P(F(struct fx_cli_slot, iterations)); P(","); P(F(struct fx_cli_slot, iter_ns_total)); P(",");
    P(F(struct fx_cli_slot, iter_ns_last)); P(","); P(F(struct fx_cli_slot, iter_start_ns)); P(",");
    P(F(struct fx_cli_slot, gate_waits)); P(","); P(F(struct fx_cli_slot, gate_wait_ns)); P(",");
    P(F(struct fx_cli_slot, gate_expired)); P(","); P(F(struct fx_cli_slot, last_release_lag_ns)); P(",");
    P(F(struct fx_cli_slot, last_hold_lag_ns)); P(",");
    P(F(struct fx_cli_slot, inflight_now)); P(","); P(F(struct fx_cli_slot, inflight_waits)); P(",");
    P(F(struct fx_cli_slot, inflight_wait_ns));
    P("}}}");
#undef P
    return buf;
}

/* A new segment, or one adopted after a restart: headers valid, every free slot at the defaults. */
EXPORT void fx_seg_init(struct fx_ctl_seg *ctl, struct fx_cli_seg *cli, uint32_t device, int32_t daemon_pid,
                        int adopt)
{
    if (!adopt || ctl->magic != FX_GATE_MAGIC_CTL) {
        memset(ctl, 0, sizeof *ctl);
        ctl->magic = FX_GATE_MAGIC_CTL;
        ctl->version = FX_GATE_VERSION;
        ctl->device = device;
        atomic_store(&ctl->default_max_hold_ns, FX_DEFAULT_MAX_HOLD_NS);
        atomic_store(&ctl->pending_grace_ns, FX_DEFAULT_PENDING_GRACE_NS);
        for (int i = 0; i < FX_MAX_SLOTS; i++) atomic_store(&ctl->slots[i].max_hold_ns, FX_DEFAULT_MAX_HOLD_NS);
    }
    if (!adopt || cli->magic != FX_GATE_MAGIC_CLI) {
        memset(cli, 0, sizeof *cli);
        cli->magic = FX_GATE_MAGIC_CLI;
        cli->version = FX_GATE_VERSION;
        cli->device = device;
    }
    atomic_store(&ctl->daemon_pid, daemon_pid);
    atomic_store(&ctl->heartbeat_ns, fx_now());
}

EXPORT void fx_heartbeat(struct fx_ctl_seg *ctl, int alive)
{
    atomic_store(&ctl->heartbeat_ns, alive ? fx_now() : 0);
}

/* Writes one slot's settings without waking anyone (a batch wakes once, fx_wake). The gate
 * is written last: a client it releases then competes with less of this request's work. */
EXPORT void fx_slot_write(struct fx_ctl_seg *ctl, int slot, uint32_t gate, uint32_t priority, uint64_t max_hold_ns,
                          uint32_t inflight_max, uint32_t owner)
{
    struct fx_ctl_slot *s = &ctl->slots[slot];
    atomic_store(&s->changed_ns, fx_now());
    atomic_store(&s->owner, owner);
    atomic_store(&s->priority, priority & (FX_PRIO_LEVELS - 1));
    atomic_store(&s->max_hold_ns, max_hold_ns);
    atomic_store(&s->inflight_max, inflight_max);
    atomic_store(&s->gate, gate);
}

/* Wakes every waiter so each re-evaluates its gate and budget. */
EXPORT void fx_wake(struct fx_cli_seg *cli) { wake_all(cli); }

/* Sets one slot's gate; wakes every waiter so each re-evaluates. */
EXPORT void fx_gate_set(struct fx_ctl_seg *ctl, struct fx_cli_seg *cli, int slot, uint32_t gate, uint32_t priority,
                        uint64_t max_hold_ns, uint32_t inflight_max, uint32_t owner)
{
    fx_slot_write(ctl, slot, gate, priority, max_hold_ns, inflight_max, owner);
    wake_all(cli);
}

EXPORT void fx_defaults_set(struct fx_ctl_seg *ctl, uint32_t gate, uint32_t priority, uint64_t max_hold_ns)
{
    atomic_store(&ctl->default_gate, gate);
    atomic_store(&ctl->default_priority, priority & (FX_PRIO_LEVELS - 1));
    atomic_store(&ctl->default_max_hold_ns, max_hold_ns);
}

EXPORT void fx_grace_set(struct fx_ctl_seg *ctl, struct fx_cli_seg *cli, uint64_t grace_ns)
{
    atomic_store(&ctl->pending_grace_ns, grace_ns);
    wake_all(cli); /* waiters re-evaluate against the new grace */
}

EXPORT void fx_slot_admit(struct fx_ctl_seg *ctl, int slot, int32_t pid, uint32_t gen)
{
    atomic_store(&ctl->slots[slot].gen, gen);
    atomic_store(&ctl->slots[slot].pid, pid);
}

/* Frees a slot whose client is gone: drops any pending work it counted (so it holds nobody),
 * puts its gate back to the defaults, and lets the slot be claimed again. */
EXPORT void fx_slot_free(struct fx_ctl_seg *ctl, struct fx_cli_seg *cli, int slot)
{
    struct fx_cli_slot *c = &cli->slots[slot];
    struct fx_ctl_slot *s = &ctl->slots[slot];
    atomic_store(&c->pending, 0);
    if (atomic_exchange(&c->counted, 0))
        atomic_fetch_sub(&cli->pending_levels, 1ULL << (8 * (atomic_load(&c->pending_level) & 7)));
    atomic_store(&s->pid, 0);
    atomic_store(&s->gate, atomic_load(&ctl->default_gate));
    atomic_store(&s->priority, atomic_load(&ctl->default_priority));
    atomic_store(&s->max_hold_ns, atomic_load(&ctl->default_max_hold_ns));
    atomic_store(&s->inflight_max, 0);
    atomic_store(&s->owner, FX_OWNER_NONE);
    atomic_store(&c->pid, 0);
    atomic_store(&c->state, FX_SLOT_FREE);
    wake_all(cli);
}

/* Opens every gate and drops every budget (daemon shutdown): nobody is held by a daemon that
 * is going away. */
EXPORT void fx_open_all(struct fx_ctl_seg *ctl, struct fx_cli_seg *cli)
{
    for (int i = 0; i < FX_MAX_SLOTS; i++) {
        atomic_store(&ctl->slots[i].changed_ns, fx_now());
        atomic_store(&ctl->slots[i].inflight_max, 0);
        atomic_store(&ctl->slots[i].gate, FX_GATE_OPEN);
    }
    wake_all(cli);
}

/* Sleeps until a client claims a slot (claim_seq moves past seq) or timeout_ns passes. */
EXPORT int fx_wait_claim(struct fx_cli_seg *cli, uint32_t seq, int64_t timeout_ns)
{
    struct timespec ts = {.tv_sec = timeout_ns / 1000000000LL, .tv_nsec = timeout_ns % 1000000000LL};
    if (atomic_load(&cli->claim_seq) != seq) return 0;
    return (int)syscall(SYS_futex, &cli->claim_seq, FUTEX_WAIT, seq, &ts, NULL, 0);
}
