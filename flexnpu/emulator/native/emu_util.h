/* Small helpers shared by the emulator's client library and server. */
#ifndef FLEXNPU_EMU_UTIL_H_
#define FLEXNPU_EMU_UTIL_H_

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* Shared (not private) futexes: the words live in memory mapped by several processes. */
static inline int emu_futex_wait(_Atomic uint32_t *addr, uint32_t expected, int64_t timeout_ns)
{
    struct timespec ts, *tp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000LL;
        ts.tv_nsec = timeout_ns % 1000000000LL;
        tp = &ts;
    }
    return (int)syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT, expected, tp, NULL, 0);
}

static inline int emu_futex_wake(_Atomic uint32_t *addr, int n)
{
    return (int)syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE, n, NULL, NULL, 0);
}

/* $FLEXNPU_RUNTIME_DIR/emu.sock, or /run/flexnpu/emu.sock. */
static inline int emu_socket_path(char *out, size_t n)
{
    const char *dir = getenv("FLEXNPU_RUNTIME_DIR");
    if (!dir || !*dir) dir = "/run/flexnpu";
    int w = snprintf(out, n, "%s/emu.sock", dir);
    return (w > 0 && (size_t)w < n && (size_t)w < sizeof(((struct sockaddr_un *)0)->sun_path)) ? 0 : -1;
}

#define EMU_FDS_MAX 4 /* >= EMU_MAX_FDS */

/* Sends one message with up to EMU_FDS_MAX fds attached; sendmsg's result (-1 and errno on
 * failure). flags: MSG_DONTWAIT for a sender that must never block on its peer. */
static inline ssize_t emu_sendmsg_fds(int sock, const void *buf, size_t len, const int *fds, int nfds, int flags)
{
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    union {
        char buf[CMSG_SPACE(EMU_FDS_MAX * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds > 0) {
        memset(&u, 0, sizeof u);
        msg.msg_control = u.buf;
        msg.msg_controllen = CMSG_SPACE(nfds * sizeof(int));
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(c), fds, nfds * sizeof(int));
    }
    ssize_t w;
    do w = sendmsg(sock, &msg, MSG_NOSIGNAL | flags);
    while (w < 0 && errno == EINTR);
    return w;
}

/* Sends one message with up to EMU_FDS_MAX fds attached, blocking until it is taken. */
static inline int emu_send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds)
{
    return emu_sendmsg_fds(sock, buf, len, fds, nfds, 0) == (ssize_t)len ? 0 : -1;
}

/* Receives one message; fds received (up to EMU_FDS_MAX) go to fds[], count to *nfds. */
static inline ssize_t emu_recv_fds(int sock, void *buf, size_t len, int *fds, int *nfds)
{
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    union {
        char buf[CMSG_SPACE(EMU_FDS_MAX * sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf};
    ssize_t r;
    do r = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    while (r < 0 && errno == EINTR);
    int n = 0;
    if (r >= 0) {
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                for (int i = 0; i < k; i++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
                    if (fds && n < EMU_FDS_MAX) fds[n++] = fd;
                    else close(fd);
                }
            }
        }
    }
    if (nfds) *nfds = n;
    return r;
}

#endif
