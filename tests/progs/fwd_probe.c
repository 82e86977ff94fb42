/* An ordinary AscendCL program that reports what the runtime tells it about devices and
 * memory: the device count, the id aclrtGetDevice returns, HBM meminfo around a series of
 * allocations, and the code of every call. It knows nothing of FlexNPU; tests run it with
 * and without the shim to see the shim's virtual device map and memory quota.
 *
 *   fwd_probe DEV [--try D]... [--alloc BYTES]... [--work N] [--sleep-ms MS]
 *
 *   --try D       also aclrtSetDevice(D) and report its code (then go back to DEV)
 *   --alloc BYTES aclrtMalloc BYTES, in order; each one is kept until the end
 *   --work N      N rounds of (memset, copy down, synchronize) on the first allocation
 *   --sleep-ms MS sleep before synchronizing the last round (a program that runs a while)
 *
 * Prints one JSON line and exits 0 unless aclInit itself failed.
 *
 * Build: cc fwd_probe.c -I<acl include> -L<libascendcl dir> -lascendcl
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "acl/acl.h"

#define MAX_ITEMS 64

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s DEV [--try D]... [--alloc BYTES]... [--work N] [--sleep-ms MS]\n", argv[0]);
        return 2;
    }
    int dev = atoi(argv[1]), ntry = 0, nalloc = 0, work = 0, sleep_ms = 0;
    int tries[MAX_ITEMS];
    size_t sizes[MAX_ITEMS];
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--try") && i + 1 < argc && ntry < MAX_ITEMS) tries[ntry++] = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--alloc") && i + 1 < argc && nalloc < MAX_ITEMS)
            sizes[nalloc++] = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--work") && i + 1 < argc) work = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--sleep-ms") && i + 1 < argc) sleep_ms = atoi(argv[++i]);
        else {
            fprintf(stderr, "%s: unknown argument %s\n", argv[0], argv[i]);
            return 2;
        }
    }

    aclError rc = aclInit(NULL);
    if (rc != ACL_SUCCESS) {
        printf("{\"init\":%d}\n", rc);
        return 1;
    }
    uint32_t count = 0;
    aclError count_rc = aclrtGetDeviceCount(&count);
    aclError set_rc = aclrtSetDevice(dev);
    printf("{\"count_rc\":%d,\"count\":%u,\"set_rc\":%d", count_rc, count, set_rc);
    if (set_rc != ACL_SUCCESS) {
        printf("}\n");
        aclFinalize();
        return 0;
    }
    int32_t got = -1;
    aclError get_rc = aclrtGetDevice(&got);
    printf(",\"get_rc\":%d,\"device\":%d", get_rc, got);

    printf(",\"tries\":{");
    for (int i = 0; i < ntry; i++) {
        aclError t = aclrtSetDevice(tries[i]);
        printf("%s\"%d\":%d", i ? "," : "", tries[i], t);
    }
    printf("}");
    if (ntry) aclrtSetDevice(dev);

    size_t free0 = 0, total0 = 0;
    aclError mi_rc = aclrtGetMemInfo(ACL_HBM_MEM, &free0, &total0);
    printf(",\"meminfo_rc\":%d,\"free_before\":%zu,\"total_before\":%zu", mi_rc, free0, total0);

    void *ptrs[MAX_ITEMS] = {0};
    printf(",\"alloc\":[");
    for (int i = 0; i < nalloc; i++) {
        aclError a = aclrtMalloc(&ptrs[i], sizes[i], ACL_MEM_MALLOC_HUGE_FIRST);
        if (a != ACL_SUCCESS) ptrs[i] = NULL;
        printf("%s%d", i ? "," : "", a);
    }
    printf("]");
    size_t free1 = 0, total1 = 0;
    aclrtGetMemInfo(ACL_HBM_MEM, &free1, &total1);
    printf(",\"free_held\":%zu,\"total_held\":%zu", free1, total1);
    size_t ddr_free = 0, ddr_total = 0;
    aclrtGetMemInfo(ACL_DDR_MEM, &ddr_free, &ddr_total);
    printf(",\"ddr_total\":%zu", ddr_total);

    int work_ok = 1;
    if (work > 0 && nalloc > 0 && ptrs[0] && sizes[0] >= 4096) {
        aclrtStream s;
        aclrtCreateStream(&s);
        char *host = malloc(4096);
        for (int r = 0; r < work; r++) {
            work_ok &= aclrtMemsetAsync(ptrs[0], 4096, r & 0xff, 4096, s) == ACL_SUCCESS;
            work_ok &= aclrtMemcpyAsync(host, 4096, ptrs[0], 4096, ACL_MEMCPY_DEVICE_TO_HOST, s) == ACL_SUCCESS;
            if (r == work - 1 && sleep_ms > 0) {
                struct timespec ts = {sleep_ms / 1000, (long)(sleep_ms % 1000) * 1000000L};
                nanosleep(&ts, NULL);
            }
            work_ok &= aclrtSynchronizeStream(s) == ACL_SUCCESS;
            work_ok &= (unsigned char)host[4095] == (unsigned char)(r & 0xff);
        }
        free(host);
        aclrtDestroyStream(s);
    } else if (sleep_ms > 0) {
        struct timespec ts = {sleep_ms / 1000, (long)(sleep_ms % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    printf(",\"work_ok\":%s", work_ok ? "true" : "false");

    printf(",\"free\":[");
    for (int i = 0; i < nalloc; i++) printf("%s%d", i ? "," : "", ptrs[i] ? aclrtFree(ptrs[i]) : -1);
    printf("]");
    size_t free2 = 0, total2 = 0;
    aclrtGetMemInfo(ACL_HBM_MEM, &free2, &total2);
    printf(",\"free_after\":%zu,\"total_after\":%zu}\n", free2, total2);
    aclrtResetDevice(dev);
    aclFinalize();
    return 0;
}
