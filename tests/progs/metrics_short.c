/* A short-lived AscendCL program for the metrics tests: it makes a small, known set of calls
 * and exits, so a thousand of them show that the observer's metrics drop exited processes.
 *
 * Build: cc metrics_short.c -I<acl include> -L<lib dir> -lascendcl
 * Run:   metrics_short KERNEL_LIBRARY [DEVICE] [--hold]
 *
 * Calls: aclrtLaunchKernel 3 times, aclrtMemcpy 4096 bytes host to device and 4096 bytes
 * device to host, one page allocated and freed; prints {"pid":P} once they are made. With
 * --hold it then keeps its page until a line comes on stdin (scripts/bench_metrics.py keeps
 * many alive that way).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "acl/acl.h"

#define N_LAUNCH 3
#define BYTES 4096

#pragma pack(push, 1)
struct synthetic_args { double flops, hbm_bytes; };
#pragma pack(pop)

#define CHECK(call)                                                                  \
    do {                                                                             \
        aclError e_ = (call);                                                        \
        if (e_ != ACL_SUCCESS) {                                                     \
            fprintf(stderr, "%s failed: %d\n", #call, e_);                           \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: metrics_short KERNEL_LIBRARY [DEVICE]\n");
        return 2;
    }
    int dev = argc > 2 && argv[2][0] != '-' ? atoi(argv[2]) : 0;
    int hold = !strcmp(argv[argc - 1], "--hold");
    CHECK(aclInit(NULL));
    CHECK(aclrtSetDevice(dev));
    aclrtBinHandle bin;
    aclrtFuncHandle fn;
    CHECK(aclrtBinaryLoadFromFile(argv[1], NULL, &bin));
    CHECK(aclrtBinaryGetFunction(bin, "synthetic", &fn));
    aclrtStream s;
    CHECK(aclrtCreateStream(&s));
    void *d;
    char host[BYTES];
    memset(host, 7, sizeof host);
    CHECK(aclrtMalloc(&d, BYTES, ACL_MEM_MALLOC_NORMAL_ONLY));
    CHECK(aclrtMemcpy(d, BYTES, host, BYTES, ACL_MEMCPY_HOST_TO_DEVICE));
    struct synthetic_args k = {1e6, 4096};
    for (int i = 0; i < N_LAUNCH; i++) CHECK(aclrtLaunchKernel(fn, 1, &k, sizeof k, s));
    CHECK(aclrtSynchronizeStream(s));
    CHECK(aclrtMemcpy(host, BYTES, d, BYTES, ACL_MEMCPY_DEVICE_TO_HOST));
    printf("{\"pid\":%d}\n", (int)getpid());
    fflush(stdout);
    char line[16];
    if (hold && !fgets(line, sizeof line, stdin)) { /* EOF: exit all the same */ }
    CHECK(aclrtFree(d));
    CHECK(aclrtDestroyStream(s));
    CHECK(aclrtResetDevice(dev));
    CHECK(aclFinalize());
    return 0;
}
