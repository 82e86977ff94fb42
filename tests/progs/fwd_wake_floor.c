/* The floor under any futex-based release: how long a process sleeping on a shared futex
 * takes to run again after another process stores a word and wakes it. The forwarding
 * benchmark prints it beside the gate's release latency, measured the same way.
 *
 *   fwd_wake_floor SAMPLES   -> {"samples": N, "p50_us": .., "p99_us": .., "max_us": ..}
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct shared {
    _Atomic uint32_t word;   /* futex: the waiter sleeps while it is 0 */
    _Atomic uint32_t asleep; /* the waiter is about to sleep */
    _Atomic uint64_t woken_at;
    _Atomic uint64_t lag_ns;
    _Atomic uint32_t done;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 200;
    if (n < 1) return 2;
    struct shared *s = mmap(NULL, sizeof *s, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    pid_t pid = fork();
    if (pid == 0) {
        while (!atomic_load(&s->done)) {
            atomic_store(&s->asleep, 1);
            while (atomic_load(&s->word) == 0 && !atomic_load(&s->done))
                syscall(SYS_futex, &s->word, FUTEX_WAIT, 0, NULL, NULL, 0);
            uint64_t t = now_ns();
            atomic_store(&s->lag_ns, t - atomic_load(&s->woken_at));
            atomic_store(&s->word, 0);
            atomic_store(&s->asleep, 0);
        }
        _exit(0);
    }
    double *lag = calloc((size_t)n, sizeof *lag);
    for (int i = 0; i < n; i++) {
        while (!atomic_load(&s->asleep)) usleep(100);
        usleep(2000); /* let it fall asleep, as a held client does */
        atomic_store(&s->lag_ns, 0);
        atomic_store(&s->woken_at, now_ns());
        atomic_store(&s->word, 1);
        syscall(SYS_futex, &s->word, FUTEX_WAKE, 1, NULL, NULL, 0);
        while (atomic_load(&s->lag_ns) == 0) usleep(50);
        lag[i] = (double)atomic_load(&s->lag_ns) / 1e3;
    }
    atomic_store(&s->done, 1);
    atomic_store(&s->word, 1);
    syscall(SYS_futex, &s->word, FUTEX_WAKE, 1, NULL, NULL, 0);
    waitpid(pid, NULL, 0);
    qsort(lag, (size_t)n, sizeof *lag, cmp);
    printf("{\"samples\":%d,\"p50_us\":%.2f,\"p99_us\":%.2f,\"max_us\":%.2f}\n", n, lag[n / 2],
           lag[(int)(0.99 * (n - 1) + 0.5)], lag[n - 1]);
    return 0;
}
