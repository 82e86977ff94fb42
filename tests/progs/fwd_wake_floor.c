/* The floor under any futex-based release: how long a process sleeping on a shared futex
 * takes to run again after another process stores a word and wakes it. The forwarding
 * benchmark prints it beside the gate's release latency, measured the same way (the waker
 * stamps the clock, stores the word and wakes; the waiter takes the lag as it runs again).
 *
 *   fwd_wake_floor SAMPLES [--cpus W,S]  -> {"samples": N, "p50_us": .., "p99_us": .., "max_us": ..}
 *   fwd_wake_floor --serve [--cpus W,S]  -> for each line read (HOLD_US [W S]), one sample: the
 *                                           waiter (on CPU W, the waker on S, if given) sleeps
 *                                           HOLD_US, is woken; prints the lag in ns
 *
 * --cpus W,S pins the waiter to CPU W and the waker to CPU S. A wake-up on another CPU (an
 * interrupt to it, which may be idle) and one on the waker's own CPU (the waiter runs once the
 * waker sleeps) are different costs; pinned, the floor is the first, the one a gate release
 * pays when the daemon and the held client run on different CPUs. --serve lets the caller
 * take its samples between its own, under the same load.
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

static void pin(pid_t who, int cpu)
{
    if (cpu < 0) return;
    cpu_set_t cs;
    CPU_ZERO(&cs);
    CPU_SET(cpu, &cs);
    if (sched_setaffinity(who, sizeof cs, &cs) != 0) {
        perror("fwd_wake_floor: sched_setaffinity");
        exit(2);
    }
}

/* One sample: the waiter has been asleep hold_us when it is woken. Returns the lag in ns. */
static uint64_t sample(struct shared *s, long hold_us)
{
    while (!atomic_load(&s->asleep)) usleep(100);
    usleep((useconds_t)hold_us); /* let it fall asleep, as a held client does */
    atomic_store(&s->lag_ns, 0);
    atomic_store(&s->woken_at, now_ns());
    atomic_store(&s->word, 1);
    syscall(SYS_futex, &s->word, FUTEX_WAKE, 1, NULL, NULL, 0);
    while (atomic_load(&s->lag_ns) == 0) usleep(50);
    return atomic_load(&s->lag_ns);
}

int main(int argc, char **argv)
{
    int n = 200, serve = 0, wcpu = -1, scpu = -1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--serve")) serve = 1;
        else if (!strcmp(argv[i], "--cpus") && i + 1 < argc) {
            if (sscanf(argv[++i], "%d,%d", &wcpu, &scpu) != 2 || wcpu < 0 || scpu < 0) return 2;
        } else n = atoi(argv[i]);
    }
    if (!serve && n < 1) return 2;
    struct shared *s = mmap(NULL, sizeof *s, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (s == MAP_FAILED) return 1;
    pid_t pid = fork();
    if (pid < 0) return 1;
    if (pid == 0) {
        pin(0, wcpu);
        struct timespec slice = {.tv_nsec = 10000000}; /* as a held call: slices of 10 ms */
        while (!atomic_load(&s->done)) {
            atomic_store(&s->asleep, 1);
            while (atomic_load(&s->word) == 0 && !atomic_load(&s->done))
                syscall(SYS_futex, &s->word, FUTEX_WAIT, 0, &slice, NULL, 0);
            uint64_t t = now_ns();
            atomic_store(&s->lag_ns, t - atomic_load(&s->woken_at));
            atomic_store(&s->word, 0);
            atomic_store(&s->asleep, 0);
        }
        _exit(0);
    }
    pin(0, scpu);
    if (serve) {
        setvbuf(stdout, NULL, _IOLBF, 0);
        char line[64];
        while (fgets(line, sizeof line, stdin)) {
            long hold = 0;
            int w = -1, sc = -1;
            if (sscanf(line, "%ld %d %d", &hold, &w, &sc) == 3 && w >= 0 && sc >= 0) {
                pin(pid, w); /* the waiter, asleep or about to be: it wakes on w */
                pin(0, sc);
            }
            printf("%llu\n", (unsigned long long)sample(s, hold > 0 ? hold : 0));
        }
    } else {
        double *lag = calloc((size_t)n, sizeof *lag);
        for (int i = 0; i < n; i++) lag[i] = (double)sample(s, 2000) / 1e3;
        qsort(lag, (size_t)n, sizeof *lag, cmp);
        printf("{\"samples\":%d,\"p50_us\":%.2f,\"p99_us\":%.2f,\"max_us\":%.2f}\n", n, lag[n / 2],
               lag[(int)(0.99 * (n - 1) + 0.5)], lag[n - 1]);
    }
    atomic_store(&s->done, 1);
    atomic_store(&s->word, 1);
    syscall(SYS_futex, &s->word, FUTEX_WAKE, 1, NULL, NULL, 0);
    waitpid(pid, NULL, 0);
    return 0;
}
