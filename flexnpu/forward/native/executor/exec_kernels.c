/* What a forwarded kernel launch's arguments name. The executor runs every client's kernels
 * in one context, so a pointer inside a kernel's arguments could name another client's
 * memory: for kernels whose argument layout it knows (the built-ins of a FlexNPU kernel
 * library, emu_kernels.h), it checks every pointer against the launching client's memory
 * before the launch. Kernels of other binaries are opaque (docs/security.md, "Forwarded
 * execution", says what that means). */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "emu_kernels.h"
#include "executor.h"

/* Remembers name -> built-in for a FlexNPU kernel library ("flexnpu-kernels 1" text, the
 * format docs/emulator.md gives); leaves b->names NULL for anything else. */
void ex_kernel_library_parse(struct ex_bin *b, const void *data, size_t len)
{
    b->names = NULL;
    b->nnames = 0;
    if (len < 17 || memcmp(data, "flexnpu-kernels 1", 17) != 0 || len > (1u << 20)) return;
    char *text = malloc(len + 1);
    char *out = malloc(len + 64);
    if (!text || !out) {
        free(text);
        free(out);
        return;
    }
    memcpy(text, data, len);
    text[len] = 0;
    size_t at = 0;
    int n = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char *hash = strchr(line, '#');
        if (hash) *hash = 0;
        char w0[32], w1[129], w2[32];
        if (sscanf(line, "%31s %128s %31s", w0, w1, w2) != 3 || strcmp(w0, "kernel") != 0) continue;
        int k = emu_builtin_by_name(w2);
        if (k < 0) continue;
        at += (size_t)snprintf(out + at, len + 64 - at, "%s", w1) + 1;
        out[at++] = (char)k;
        n++;
        if (at + 140 > len + 64) break;
    }
    free(text);
    b->names = out;
    b->nnames = n;
}

int ex_kernel_builtin_of(const struct ex_bin *b, const char *name)
{
    const char *p = b->names;
    for (int i = 0; p && i < b->nnames; i++) {
        size_t l = strlen(p);
        if (!strcmp(p, name)) return (unsigned char)p[l + 1];
        p += l + 2;
    }
    return -1;
}

#ifndef FX_FORWARD /* the forward build reads kernel libraries too, and checks launches its own way */
int ex_check_kernel_args(struct ex_client *c, int builtin, const void *args, size_t len)
{
    if (builtin < 0) return ACL_SUCCESS; /* opaque arguments */
    struct emu_cost cost;
    struct emu_range r[4];
    int n = 0;
    int rc = emu_kernel_prepare(builtin, args, len, &cost, r, &n);
    if (rc) return ex_fail(c, rc, "aclrtLaunchKernel: malformed arguments for a %s kernel", emu_builtin_name(builtin));
    for (int i = 0; i < n; i++)
        if ((rc = ex_check_dev(c, r[i].ptr, r[i].bytes, "aclrtLaunchKernel argument"))) return rc;
    return ACL_SUCCESS;
}
#endif
