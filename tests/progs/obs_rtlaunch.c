/* Launches kernels through a lower runtime library, as torch_npu does through CANN's
 * libruntime.so, so the observer's rt* probes can be tested where CANN is absent.
 *
 * Run: obs_rtlaunch LIBRUNTIME N_LAUNCH N_HANDLE [--wait]
 * Opens the device with AscendCL (so the process maps libascendcl.so), dlopens LIBRUNTIME
 * (a library exporting rtKernelLaunch and rtKernelLaunchWithHandle with CANN's
 * signatures), prints {"ready":true,"pid":P}, with --wait reads a line on stdin, then calls
 * rtKernelLaunch N_LAUNCH times and rtKernelLaunchWithHandle N_HANDLE times and prints
 * {"rt_launches":N_LAUNCH+N_HANDLE}. It then waits for a line on stdin before it exits.
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "acl/acl.h"

typedef int (*launch_fn)(const void *, uint32_t, void *, uint32_t, void *, void *);
typedef int (*handle_fn)(void *, uint64_t, uint32_t, void *, void *, void *, const void *);

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: obs_rtlaunch LIBRUNTIME N_LAUNCH N_HANDLE [--wait]\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (aclInit(NULL) != ACL_SUCCESS || aclrtSetDevice(0) != ACL_SUCCESS) {
        fprintf(stderr, "obs_rtlaunch: cannot open device 0\n");
        return 1;
    }
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "obs_rtlaunch: %s\n", dlerror());
        return 1;
    }
    launch_fn launch = (launch_fn)dlsym(lib, "rtKernelLaunch");
    handle_fn handle = (handle_fn)dlsym(lib, "rtKernelLaunchWithHandle");
    if (!launch || !handle) {
        fprintf(stderr, "obs_rtlaunch: %s lacks rtKernelLaunch or rtKernelLaunchWithHandle\n", argv[1]);
        return 1;
    }
    long n = atol(argv[2]), m = atol(argv[3]);
    printf("{\"ready\":true,\"pid\":%d}\n", (int)getpid());
    char line[64];
    if (argc > 4 && !strcmp(argv[4], "--wait") && !fgets(line, sizeof line, stdin)) return 0;
    for (long i = 0; i < n; i++) launch(NULL, 1, NULL, 0, NULL, NULL);
    for (long i = 0; i < m; i++) handle(NULL, 0, 1, NULL, NULL, NULL, NULL);
    printf("{\"rt_launches\":%ld}\n", n + m);
    if (!fgets(line, sizeof line, stdin)) return 0;
    return 0;
}
