/* A test program for AscendCL's IPC memory calls: an ordinary AscendCL program that obeys
 * one command per stdin line and answers each with one JSON line. Buffers are named by a
 * handle (an index into its table), allocated here or imported.
 *
 *   pid                            aclrtDeviceGetBareTgid, and getpid()
 *   malloc BYTES                   {"h"}: aclrtMalloc
 *   free H                         aclrtFree
 *   export H OFF SIZE FLAGS [LEN]  {"key"}: aclrtIpcMemGetExportKey(ptr(H)+OFF, SIZE, key, LEN)
 *   setpid KEY PID...              aclrtIpcMemSetImportPid
 *   import KEY FLAGS SIZE          {"h"}: aclrtIpcMemImportByKey (SIZE: what the handle spans here)
 *   close KEY                      aclrtIpcMemClose
 *   fill H OFF N BYTE [async [nosync]]  N bytes of BYTE from the host to ptr(H)+OFF (aclrtMemcpy[Async],
 *                                  H2D; async syncs the stream after unless nosync)
 *   memset H OFF N BYTE            aclrtMemset
 *   read H OFF N [async|default]   {"first", "same"}: D2H copy (or ACL_MEMCPY_DEFAULT) of N bytes
 *   copy HD HS N KIND [async]      device to device copy of N bytes, aclrtMemcpyKind KIND
 *   kernel HD HS N                 the built-in `copy` kernel, HS -> HD, N bytes, on a stream
 *   meminfo                        {"free", "total"}
 *   ptr H                          {"ptr"}: the device address of handle H (decimal)
 *   adopt PTR SIZE                 {"h"}: a handle for an address this process did not allocate
 *                                  (another process's, to check it cannot be named)
 *   exportmany N                   {"ok", "rc"}: N page allocations, each exported, until one fails
 *   badargs                        {"name": code, ...}: every IPC call with bad input
 *   quit
 *
 * Options: --device D (aclrtSetDevice; default 0). FLEXNPU_EMU_KERNELS names the kernel library.
 * Build: cc ipc_peer.c -I<acl include> -L<libascendcl dir> -lascendcl
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "acl/acl.h"

#define MAXH 64

static void *g_ptr[MAXH];
static size_t g_size[MAXH];
static int g_nh;
static aclrtStream g_stream;
static aclrtFuncHandle g_copy;

static void answer_rc(aclError rc)
{
    const char *m = rc ? aclGetRecentErrMsg() : NULL;
    printf("{\"rc\":%d,\"msg\":\"%s\"}\n", rc, m ? m : "");
}

static int handle(const char *s)
{
    int h = s ? atoi(s) : -1;
    return h >= 0 && h < g_nh ? h : -1;
}

static int new_handle(void *p, size_t n)
{
    if (g_nh == MAXH) return -1;
    g_ptr[g_nh] = p;
    g_size[g_nh] = n;
    return g_nh++;
}

static void badargs(void)
{
    void *d = NULL, *imp = NULL;
    char key[65] = {0}, small[65];
    int32_t pid = getpid(), bad_pid = 0;
    aclrtMalloc(&d, 8192, ACL_MEM_MALLOC_HUGE_FIRST);
    printf("{");
    printf("\"export_null_ptr\":%d,", aclrtIpcMemGetExportKey(NULL, 8192, key, 65, 0));
    printf("\"export_null_key\":%d,", aclrtIpcMemGetExportKey(d, 8192, NULL, 65, 0));
    printf("\"export_size_0\":%d,", aclrtIpcMemGetExportKey(d, 0, key, 65, 0));
    printf("\"export_len_0\":%d,", aclrtIpcMemGetExportKey(d, 8192, key, 0, 0));
    printf("\"export_len_64\":%d,", aclrtIpcMemGetExportKey(d, 8192, small, 64, 0));
    printf("\"export_bad_flags\":%d,", aclrtIpcMemGetExportKey(d, 8192, key, 65, 2));
    printf("\"export_interior\":%d,", aclrtIpcMemGetExportKey((char *)d + 4096, 4096, key, 65, 0));
    printf("\"export_host_ptr\":%d,", aclrtIpcMemGetExportKey(key, 16, small, 65, 0));
    printf("\"export_too_big\":%d,", aclrtIpcMemGetExportKey(d, 8193, key, 65, 0));
    printf("\"export_ok\":%d,", aclrtIpcMemGetExportKey(d, 8192, key, 65, 0));
    printf("\"export_twice\":%d,", aclrtIpcMemGetExportKey(d, 8192, small, 65, 0));
    printf("\"key_len\":%zu,", strlen(key));
    printf("\"setpid_null_key\":%d,", aclrtIpcMemSetImportPid(NULL, &pid, 1));
    printf("\"setpid_null_pid\":%d,", aclrtIpcMemSetImportPid(key, NULL, 1));
    printf("\"setpid_num_0\":%d,", aclrtIpcMemSetImportPid(key, &pid, 0));
    printf("\"setpid_pid_0\":%d,", aclrtIpcMemSetImportPid(key, &bad_pid, 1));
    printf("\"setpid_wrong_key\":%d,", aclrtIpcMemSetImportPid("nokey", &pid, 1));
    printf("\"setpid_ok\":%d,", aclrtIpcMemSetImportPid(key, &pid, 1));
    printf("\"import_null_ptr\":%d,", aclrtIpcMemImportByKey(NULL, key, 0));
    printf("\"import_null_key\":%d,", aclrtIpcMemImportByKey(&imp, NULL, 0));
    printf("\"import_bad_flags\":%d,", aclrtIpcMemImportByKey(&imp, key, 4));
    printf("\"import_wrong_key\":%d,", aclrtIpcMemImportByKey(&imp, "0123", 0));
    memcpy(small, key, 65);
    small[0] = small[0] == 'a' ? 'b' : 'a';
    printf("\"import_altered_key\":%d,", aclrtIpcMemImportByKey(&imp, small, 0));
    printf("\"import_own\":%d,", aclrtIpcMemImportByKey(&imp, key, 0));
    printf("\"import_own_again\":%d,", aclrtIpcMemImportByKey(&imp, key, 0));
    printf("\"free_imported\":%d,", aclrtFree(imp));
    printf("\"close_null\":%d,", aclrtIpcMemClose(NULL));
    printf("\"close_wrong_key\":%d,", aclrtIpcMemClose("nokey"));
    printf("\"close_import_1\":%d,", aclrtIpcMemClose(key));
    printf("\"close_import_2\":%d,", aclrtIpcMemClose(key));
    printf("\"close_export\":%d,", aclrtIpcMemClose(key));
    printf("\"close_twice\":%d,", aclrtIpcMemClose(key));
    printf("\"import_closed\":%d,", aclrtIpcMemImportByKey(&imp, key, 0));
    printf("\"setpid_closed\":%d,", aclrtIpcMemSetImportPid(key, &pid, 1));
    printf("\"export_again\":%d,", aclrtIpcMemGetExportKey(d, 8192, key, 65, 1));
    printf("\"setpid_no_validation\":%d,", aclrtIpcMemSetImportPid(key, &pid, 1));
    printf("\"free_exported\":%d,", aclrtFree(d));
    printf("\"import_freed\":%d,", aclrtIpcMemImportByKey(&imp, key, 0));
    printf("\"tgid_null\":%d", aclrtDeviceGetBareTgid(NULL));
    printf("}\n");
}

int main(int argc, char **argv)
{
    int dev = 0;
    for (int i = 1; i + 1 < argc; i += 2)
        if (!strcmp(argv[i], "--device")) dev = atoi(argv[i + 1]);
    aclError rc = aclInit(NULL);
    if (!rc) rc = aclrtSetDevice(dev);
    if (!rc) rc = aclrtCreateStream(&g_stream);
    const char *klib = getenv("FLEXNPU_EMU_KERNELS");
    aclrtBinHandle bin = NULL;
    if (!rc && klib) rc = aclrtBinaryLoadFromFile(klib, NULL, &bin);
    if (!rc && bin) rc = aclrtBinaryGetFunction(bin, "copy", &g_copy);
    printf("{\"ready\":%s,\"rc\":%d,\"pid\":%d}\n", rc ? "false" : "true", rc, (int)getpid());
    fflush(stdout);
    if (rc) return 1;
    char line[4096];
    while (fgets(line, sizeof line, stdin)) {
        char *w[24];
        int n = 0;
        for (char *t = strtok(line, " \t\n"); t && n < 24; t = strtok(NULL, " \t\n")) w[n++] = t;
        if (n == 0) continue;
        const char *cmd = w[0];
        if (!strcmp(cmd, "quit")) break;
        if (!strcmp(cmd, "pid")) {
            int32_t pid = -1;
            rc = aclrtDeviceGetBareTgid(&pid);
            printf("{\"rc\":%d,\"pid\":%d,\"getpid\":%d}\n", rc, pid, (int)getpid());
        } else if (!strcmp(cmd, "malloc") && n == 2) {
            void *p = NULL;
            size_t sz = strtoull(w[1], NULL, 10);
            rc = aclrtMalloc(&p, sz, ACL_MEM_MALLOC_HUGE_FIRST);
            printf("{\"rc\":%d,\"h\":%d}\n", rc, rc ? -1 : new_handle(p, sz));
        } else if (!strcmp(cmd, "free") && n == 2 && handle(w[1]) >= 0) {
            answer_rc(aclrtFree(g_ptr[handle(w[1])]));
        } else if (!strcmp(cmd, "export") && n >= 5 && handle(w[1]) >= 0) {
            char key[128] = {0};
            size_t len = n > 5 ? strtoull(w[5], NULL, 10) : 65;
            rc = aclrtIpcMemGetExportKey((char *)g_ptr[handle(w[1])] + strtoull(w[2], NULL, 10),
                                         strtoull(w[3], NULL, 10), key, len, strtoull(w[4], NULL, 0));
            const char *m = rc ? aclGetRecentErrMsg() : NULL;
            printf("{\"rc\":%d,\"key\":\"%s\",\"msg\":\"%s\"}\n", rc, rc ? "" : key, m ? m : "");
        } else if (!strcmp(cmd, "setpid") && n >= 3) {
            int32_t pids[20];
            int k = 0;
            for (int i = 2; i < n && k < 20; i++) pids[k++] = atoi(w[i]);
            answer_rc(aclrtIpcMemSetImportPid(w[1], pids, (size_t)k));
        } else if (!strcmp(cmd, "import") && n == 4) {
            void *p = (void *)1; /* an import that fails must not touch it */
            rc = aclrtIpcMemImportByKey(&p, w[1], strtoull(w[2], NULL, 0));
            const char *m = rc ? aclGetRecentErrMsg() : NULL;
            printf("{\"rc\":%d,\"h\":%d,\"untouched\":%s,\"msg\":\"%s\"}\n", rc,
                   rc ? -1 : new_handle(p, strtoull(w[3], NULL, 10)), p == (void *)1 ? "true" : "false", m ? m : "");
        } else if (!strcmp(cmd, "close") && n == 2) {
            answer_rc(aclrtIpcMemClose(w[1]));
        } else if (!strcmp(cmd, "fill") && n >= 5 && handle(w[1]) >= 0) {
            size_t off = strtoull(w[2], NULL, 10), cnt = strtoull(w[3], NULL, 10);
            char *buf = malloc(cnt ? cnt : 1);
            memset(buf, atoi(w[4]), cnt);
            char *dst = (char *)g_ptr[handle(w[1])] + off;
            if (n > 5 && !strcmp(w[5], "async")) {
                rc = aclrtMemcpyAsync(dst, cnt, buf, cnt, ACL_MEMCPY_HOST_TO_DEVICE, g_stream);
                if (!rc && !(n > 6 && !strcmp(w[6], "nosync"))) rc = aclrtSynchronizeStream(g_stream);
            } else
                rc = aclrtMemcpy(dst, cnt, buf, cnt, ACL_MEMCPY_HOST_TO_DEVICE);
            free(buf);
            answer_rc(rc);
        } else if (!strcmp(cmd, "memset") && n == 5 && handle(w[1]) >= 0) {
            size_t off = strtoull(w[2], NULL, 10), cnt = strtoull(w[3], NULL, 10);
            answer_rc(aclrtMemset((char *)g_ptr[handle(w[1])] + off, cnt, atoi(w[4]), cnt));
        } else if (!strcmp(cmd, "read") && n >= 4 && handle(w[1]) >= 0) {
            size_t off = strtoull(w[2], NULL, 10), cnt = strtoull(w[3], NULL, 10);
            unsigned char *buf = calloc(1, cnt ? cnt : 1);
            char *src = (char *)g_ptr[handle(w[1])] + off;
            if (n > 4 && !strcmp(w[4], "async")) {
                rc = aclrtMemcpyAsync(buf, cnt, src, cnt, ACL_MEMCPY_DEVICE_TO_HOST, g_stream);
                if (!rc) rc = aclrtSynchronizeStream(g_stream);
            } else
                rc = aclrtMemcpy(buf, cnt, src, cnt, n > 4 && !strcmp(w[4], "default") ? ACL_MEMCPY_DEFAULT
                                                                                        : ACL_MEMCPY_DEVICE_TO_HOST);
            int same = 1;
            for (size_t i = 1; i < cnt; i++) same &= buf[i] == buf[0];
            const char *m = rc ? aclGetRecentErrMsg() : NULL;
            printf("{\"rc\":%d,\"first\":%d,\"same\":%s,\"msg\":\"%s\"}\n", rc, buf[0], same ? "true" : "false",
                   m ? m : "");
            free(buf);
        } else if (!strcmp(cmd, "copy") && n >= 5 && handle(w[1]) >= 0 && handle(w[2]) >= 0) {
            size_t cnt = strtoull(w[3], NULL, 10);
            aclrtMemcpyKind kind = (aclrtMemcpyKind)atoi(w[4]);
            void *dst = g_ptr[handle(w[1])], *src = g_ptr[handle(w[2])];
            if (n > 5 && !strcmp(w[5], "async")) {
                rc = aclrtMemcpyAsync(dst, cnt, src, cnt, kind, g_stream);
                if (!rc) rc = aclrtSynchronizeStream(g_stream);
            } else
                rc = aclrtMemcpy(dst, cnt, src, cnt, kind);
            answer_rc(rc);
        } else if (!strcmp(cmd, "kernel") && n == 4 && handle(w[1]) >= 0 && handle(w[2]) >= 0 && g_copy) {
#pragma pack(push, 1)
            struct { uint64_t src, dst, bytes; } args = {(uint64_t)(uintptr_t)g_ptr[handle(w[2])],
                                                         (uint64_t)(uintptr_t)g_ptr[handle(w[1])],
                                                         strtoull(w[3], NULL, 10)};
#pragma pack(pop)
            rc = aclrtLaunchKernel(g_copy, 1, &args, sizeof args, g_stream);
            if (!rc) rc = aclrtSynchronizeStream(g_stream);
            answer_rc(rc);
        } else if (!strcmp(cmd, "ptr") && n == 2 && handle(w[1]) >= 0) {
            printf("{\"rc\":0,\"ptr\":\"%llu\"}\n", (unsigned long long)(uintptr_t)g_ptr[handle(w[1])]);
        } else if (!strcmp(cmd, "adopt") && n == 3) {
            void *p = (void *)(uintptr_t)strtoull(w[1], NULL, 10);
            printf("{\"rc\":0,\"h\":%d}\n", new_handle(p, strtoull(w[2], NULL, 10)));
        } else if (!strcmp(cmd, "meminfo")) {
            size_t fr = 0, tot = 0;
            rc = aclrtGetMemInfo(ACL_HBM_MEM, &fr, &tot);
            printf("{\"rc\":%d,\"free\":%zu,\"total\":%zu}\n", rc, fr, tot);
        } else if (!strcmp(cmd, "exportmany") && n == 2) {
            int want = atoi(w[1]), done = 0;
            rc = 0;
            while (done < want && !rc) {
                void *p = NULL;
                char key[65];
                rc = aclrtMalloc(&p, 4096, ACL_MEM_MALLOC_HUGE_FIRST);
                if (!rc && (rc = aclrtIpcMemGetExportKey(p, 4096, key, 65, 1)) != 0) aclrtFree(p);
                done += !rc;
            }
            printf("{\"ok\":%d,\"rc\":%d}\n", done, rc);
        } else if (!strcmp(cmd, "badargs")) {
            badargs();
        } else
            printf("{\"rc\":-1,\"msg\":\"bad command\"}\n");
        fflush(stdout);
    }
    aclFinalize();
    printf("{\"bye\":true}\n");
    return 0;
}
