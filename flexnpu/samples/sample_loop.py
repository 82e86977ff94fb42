"""An ordinary AscendCL serving-like loop (it knows nothing of FlexNPU): each step launches
a few kernels on a stream and synchronises, like one step of an inference engine.

Usage: python sample_loop.py KERNEL_LIBRARY [--device D] [--seconds S] [--kernel-ms MS]
                             [--kernels N] [--h2d-bytes B]

Kernels are the emulator's "synthetic" kernel, sized to run MS milliseconds each on a
910B-class device. At the end it prints one JSON line: steps, and step time p50/p99 in ms.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import struct
import sys
import time

PEAK_FLOPS = 353.9e12  # the emulator's 910b profile: a kernel of ms * this FLOPs runs ms
FULL_BLOCK_DIM = 48  # blockDim that fills the device (24 cube, 48 vector cores): docs/emulator.md
ACL_MEMCPY_HOST_TO_DEVICE = 1


def check(rc: int, what: str) -> None:
    if rc != 0:
        sys.exit(f"sample_loop: {what} failed: {rc}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kernels_file")
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--kernel-ms", type=float, default=1.0)
    ap.add_argument("--kernels", type=int, default=4)
    ap.add_argument("--h2d-bytes", type=int, default=0)
    a = ap.parse_args()

    acl = ctypes.CDLL("libascendcl.so")
    check(acl.aclInit(None), "aclInit")
    check(acl.aclrtSetDevice(a.device), "aclrtSetDevice")
    stream = ctypes.c_void_p()
    check(acl.aclrtCreateStream(ctypes.byref(stream)), "aclrtCreateStream")
    binary, func = ctypes.c_void_p(), ctypes.c_void_p()
    check(acl.aclrtBinaryLoadFromFile(a.kernels_file.encode(), None, ctypes.byref(binary)), "load kernels")
    check(acl.aclrtBinaryGetFunction(binary, b"synthetic", ctypes.byref(func)), "get synthetic")
    args = struct.pack("<dd", a.kernel_ms * 1e-3 * PEAK_FLOPS, 0.0)
    dev = ctypes.c_void_p()
    host = ctypes.create_string_buffer(max(a.h2d_bytes, 1))
    if a.h2d_bytes:
        check(acl.aclrtMalloc(ctypes.byref(dev), ctypes.c_size_t(a.h2d_bytes), 0), "aclrtMalloc")

    steps: list[float] = []
    end = time.monotonic() + a.seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        if a.h2d_bytes:
            check(acl.aclrtMemcpyAsync(dev, ctypes.c_size_t(a.h2d_bytes), host, ctypes.c_size_t(a.h2d_bytes),
                                       ACL_MEMCPY_HOST_TO_DEVICE, stream), "aclrtMemcpyAsync")
        for _ in range(a.kernels):
            check(acl.aclrtLaunchKernel(func, FULL_BLOCK_DIM, args, len(args), stream), "aclrtLaunchKernel")
        check(acl.aclrtSynchronizeStream(stream), "aclrtSynchronizeStream")
        steps.append((time.perf_counter() - t0) * 1e3)

    if a.h2d_bytes:
        check(acl.aclrtFree(dev), "aclrtFree")
    check(acl.aclrtDestroyStream(stream), "aclrtDestroyStream")
    check(acl.aclrtResetDevice(a.device), "aclrtResetDevice")
    check(acl.aclFinalize(), "aclFinalize")
    steps.sort()
    pick = lambda q: round(steps[min(len(steps) - 1, int(q * (len(steps) - 1)))], 2)  # noqa: E731
    print(json.dumps({"steps": len(steps), "step_ms_p50": pick(0.5), "step_ms_p99": pick(0.99)}))
    return 0 if steps else 1


if __name__ == "__main__":
    sys.exit(main())
