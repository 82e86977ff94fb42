#!/usr/bin/env python3
"""An ordinary Python AscendCL program, through ctypes: it knows nothing of FlexNPU.

    python3 sample_ctypes.py KERNEL_LIBRARY [DEVICE]

libascendcl.so is found through LD_LIBRARY_PATH, as CANN's set_env.sh arranges. On two
streams it uploads inputs, runs an elementwise add and a small fp32 GEMM on the first, has
the second wait for the first with an event, copies the sum with the copy kernel and
downloads both results, then checks them in pure Python. One summary line; exit code 0
when every result is correct.

Kernel arguments are packed little-endian structs (the layouts in docs/emulator.md,
"Built-in kernels").
"""

from __future__ import annotations

import ctypes
import struct
import sys
from array import array

ACL_SUCCESS = 0
ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEMCPY_HOST_TO_DEVICE = 1
ACL_MEMCPY_DEVICE_TO_HOST = 2
ACL_FLOAT = 0
ADD = 0
# blockDim, the cores a kernel runs on: the 910B has 24 cube (GEMM) and 48 vector cores (the
# elementwise and copy kernels); fewer gets that share of the compute (docs/emulator.md)
AIC_CORES, AIV_CORES = 24, 48

VP = ctypes.c_void_p
SIZE = ctypes.c_size_t

# name: (argtypes); every function returns aclError (int) unless listed in _RESTYPES
_SIGNATURES = {
    "aclInit": [ctypes.c_char_p],
    "aclFinalize": [],
    "aclrtSetDevice": [ctypes.c_int32],
    "aclrtResetDevice": [ctypes.c_int32],
    "aclrtCreateStream": [ctypes.POINTER(VP)],
    "aclrtDestroyStream": [VP],
    "aclrtSynchronizeStream": [VP],
    "aclrtStreamWaitEvent": [VP, VP],
    "aclrtCreateEvent": [ctypes.POINTER(VP)],
    "aclrtRecordEvent": [VP, VP],
    "aclrtSynchronizeEvent": [VP],
    "aclrtEventElapsedTime": [ctypes.POINTER(ctypes.c_float), VP, VP],
    "aclrtDestroyEvent": [VP],
    "aclrtMalloc": [ctypes.POINTER(VP), SIZE, ctypes.c_int],
    "aclrtFree": [VP],
    "aclrtMemcpyAsync": [VP, SIZE, VP, SIZE, ctypes.c_int, VP],
    "aclrtBinaryLoadFromFile": [ctypes.c_char_p, VP, ctypes.POINTER(VP)],
    "aclrtBinaryGetFunction": [VP, ctypes.c_char_p, ctypes.POINTER(VP)],
    "aclrtBinaryUnLoad": [VP],
    "aclrtLaunchKernel": [VP, ctypes.c_uint32, ctypes.c_char_p, SIZE, VP],
    "aclGetRecentErrMsg": [],
}
_RESTYPES = {"aclGetRecentErrMsg": ctypes.c_char_p}


class AclError(RuntimeError):
    pass


class Acl:
    """The few AscendCL calls this program makes, each checked."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libascendcl.so")
        except OSError as e:
            raise AclError(f"cannot load libascendcl.so ({e}); set LD_LIBRARY_PATH") from None
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.argtypes = argtypes
            fn.restype = _RESTYPES.get(name, ctypes.c_int)

    def __getattr__(self, name: str):
        fn = getattr(self.lib, name)

        def checked(*args):
            rc = fn(*args)
            if rc != ACL_SUCCESS:
                msg = self.lib.aclGetRecentErrMsg()
                raise AclError(f"{name} failed: {rc} ({msg.decode() if msg else ''})")
            return rc

        return checked

    def new(self, create, *args) -> VP:
        """Calls a creator whose last parameter receives the new handle."""
        handle = VP()
        create(*args, ctypes.byref(handle))
        return handle

    def malloc(self, size: int) -> VP:
        ptr = VP()
        self.aclrtMalloc(ctypes.byref(ptr), size, ACL_MEM_MALLOC_HUGE_FIRST)
        return ptr


def pack_elementwise(x: int, y: int, out: int, n: int, op: int) -> bytes:
    return struct.pack("<QQQQIi", x, y, out, n, op, ACL_FLOAT)


def pack_gemm(a: int, b: int, c: int, m: int, n: int, k: int) -> bytes:
    return struct.pack("<QQQIIIi", a, b, c, m, n, k, ACL_FLOAT)


def pack_copy(src: int, dst: int, nbytes: int) -> bytes:
    return struct.pack("<QQQ", src, dst, nbytes)


def f32(v: float) -> float:
    """v rounded to float32, as the device stores it."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def close(got: array, want: list[float], tol: float = 1e-5) -> int:
    """Index of the first element that differs, or -1."""
    for i, (g, w) in enumerate(zip(got, want)):
        if abs(g - w) > tol * (1.0 + abs(w)):
            return i
    return -1 if len(got) == len(want) else min(len(got), len(want))


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(f"usage: {argv[0]} KERNEL_LIBRARY [DEVICE]", file=sys.stderr)
        return 2
    klib, dev = argv[1].encode(), int(argv[2]) if len(argv) > 2 else 0
    EW, M, K, N = 1000, 7, 5, 6  # EW: not a multiple of anything convenient

    x = array("f", (float(i) * 0.5 for i in range(EW)))
    y = array("f", (float(EW - i) for i in range(EW)))
    a = array("f", ((i * 7 % 13) / 13.0 - 0.5 for i in range(M * K)))
    b = array("f", ((i * 5 % 11) / 11.0 - 0.5 for i in range(K * N)))
    want_z = [f32(x[i] + y[i]) for i in range(EW)]
    want_c = [sum(a[i * K + p] * b[p * N + j] for p in range(K)) for i in range(M) for j in range(N)]
    z = array("f", bytes(4 * EW))
    c = array("f", bytes(4 * M * N))

    acl = Acl()
    acl.aclInit(None)
    acl.aclrtSetDevice(dev)
    s1, s2 = acl.new(acl.aclrtCreateStream), acl.new(acl.aclrtCreateStream)
    ev_start, ev_done, ev_end = (acl.new(acl.aclrtCreateEvent) for _ in range(3))
    bin_ = acl.new(acl.aclrtBinaryLoadFromFile, klib, None)
    f_ew = acl.new(acl.aclrtBinaryGetFunction, bin_, b"elementwise")
    f_gemm = acl.new(acl.aclrtBinaryGetFunction, bin_, b"gemm")
    f_copy = acl.new(acl.aclrtBinaryGetFunction, bin_, b"copy")

    sizes = {"x": 4 * EW, "y": 4 * EW, "z": 4 * EW, "z2": 4 * EW, "a": 4 * M * K, "b": 4 * K * N, "c": 4 * M * N}
    dptr = {name: acl.malloc(size) for name, size in sizes.items()}
    d = {name: p.value for name, p in dptr.items()}

    def h2d(name: str, host: array, stream: VP) -> None:
        addr, _ = host.buffer_info()
        acl.aclrtMemcpyAsync(d[name], sizes[name], addr, sizes[name], ACL_MEMCPY_HOST_TO_DEVICE, stream)

    def d2h(host: array, name: str, stream: VP) -> None:
        addr, _ = host.buffer_info()
        acl.aclrtMemcpyAsync(addr, sizes[name], d[name], sizes[name], ACL_MEMCPY_DEVICE_TO_HOST, stream)

    def launch(func: VP, args: bytes, stream: VP, block_dim: int = AIV_CORES) -> None:
        acl.aclrtLaunchKernel(func, block_dim, args, len(args), stream)

    # stream 1: inputs, z = x + y, c = a @ b; then an event the second stream waits on
    acl.aclrtRecordEvent(ev_start, s1)
    for name, host in (("x", x), ("y", y), ("a", a), ("b", b)):
        h2d(name, host, s1)
    launch(f_ew, pack_elementwise(d["x"], d["y"], d["z"], EW, ADD), s1)
    launch(f_gemm, pack_gemm(d["a"], d["b"], d["c"], M, N, K), s1, AIC_CORES)
    acl.aclrtRecordEvent(ev_done, s1)
    # stream 2: only after stream 1's work, z2 = copy(z), then both results back
    acl.aclrtStreamWaitEvent(s2, ev_done)
    launch(f_copy, pack_copy(d["z"], d["z2"], sizes["z"]), s2)
    d2h(z, "z2", s2)
    d2h(c, "c", s2)
    acl.aclrtRecordEvent(ev_end, s2)
    acl.aclrtSynchronizeStream(s2)
    acl.aclrtSynchronizeStream(s1)

    # the end event follows the start event: the wait ordered stream 2 after stream 1
    ms = ctypes.c_float(-1.0)
    acl.aclrtEventElapsedTime(ctypes.byref(ms), ev_start, ev_end)
    bad_z, bad_c = close(z, want_z), close(c, want_c, 1e-4)
    ok = bad_z < 0 and bad_c < 0 and ms.value >= 0.0
    problems = []
    if bad_z >= 0:
        problems.append(f"elementwise+copy element {bad_z} is {z[bad_z]}, expected {want_z[bad_z]}")
    if bad_c >= 0:
        problems.append(f"gemm element {bad_c} is {c[bad_c]}, expected {want_c[bad_c]}")
    if ms.value < 0.0:
        problems.append(f"stream 2 ended {ms.value} ms before stream 1 started")

    for p in dptr.values():
        acl.aclrtFree(p)
    for e in (ev_start, ev_done, ev_end):
        acl.aclrtDestroyEvent(e)
    acl.aclrtBinaryUnLoad(bin_)
    acl.aclrtDestroyStream(s1)
    acl.aclrtDestroyStream(s2)
    acl.aclrtResetDevice(dev)
    acl.aclFinalize()

    verdict = "all results correct" if ok else "WRONG RESULTS: " + "; ".join(problems)
    print(f"sample_ctypes: device {dev}, elementwise {EW} + gemm {M}x{K}x{N} + copy on 2 streams "
          f"in {ms.value:.3f} ms, {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except AclError as e:
        print(f"sample_ctypes: {e}", file=sys.stderr)
        sys.exit(1)
