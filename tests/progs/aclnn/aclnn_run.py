"""Runs aclnn operators through ctypes, as a Python program using CANN's operator API would.

Reads one JSON object on stdin, {"cases": [...], "kernels": <kernel library path or null>},
runs every case on device 0 and prints one JSON line per case, then {"pid": ...}. A case:

  {"tensors": {name: spec}, "call": "aclnnAdd", "args": [arg, ...], "read": [name, ...],
   "run_as": optional second-call name, "runs": how many times to run the executor (default 1),
   "repeatable": bool, "null_stream": bool, "sync_may_fail": bool (its code and reason are kept as
   "rc_sync" and "err_sync" instead of ending the runner)}
  {"builtin": "gemm", "fmt": "<QQQIIIi", "values": [...], "block_dim": 48}   a built-in kernel
                                                             launch (block_dim: default 48)
  {"sync": true}                                             synchronise the stream

A tensor spec: {"dtype": "f16", "shape": [...], "strides": [...], "offset": 0, "storage": [...],
"data": [storage values] | "zeros" | null (no data: timing only) | "host" (a host pointer) |
"short" (device memory one element too small)}. "object": "bad" passes a pointer that is not an
aclTensor, "destroyed" one already destroyed. Arguments, in the first call's order (the runner
appends workspaceSize and executor): {"t": name|null}, {"tl": [names]|null}, {"scalar": v,
"dtype": d}, {"ia": [...]|null}, {"i64": v}, {"i8": v}, {"f64": v}, {"bool": v}, {"str": s|null}.

The result of a case: {"rc": first call, "rc_run": [second calls], "ws": workspace size,
"err": aclGetRecentErrMsg() after a failure, "out": {name: storage values}}.
"""

from __future__ import annotations

import ctypes as C
import json
import math
import os
import struct
import sys

DTYPES = {  # name: (aclDataType, bytes, struct code; bf16 is packed by hand)
    "f32": (0, 4, "f"), "f16": (1, 2, "e"), "i8": (2, 1, "b"), "i32": (3, 4, "i"), "u8": (4, 1, "B"),
    "i16": (6, 2, "h"), "i64": (9, 8, "q"), "f64": (11, 8, "d"), "bool": (12, 1, "?"), "bf16": (27, 2, None),
    "c64": (16, 8, None),
}

acl = C.CDLL("libascendcl.so", mode=C.RTLD_GLOBAL)
nnop = C.CDLL("libnnopbase.so", mode=C.RTLD_GLOBAL)
opapi = C.CDLL("libopapi.so", mode=C.RTLD_GLOBAL)
P = C.c_void_p
acl.aclrtMalloc.argtypes = [C.POINTER(P), C.c_size_t, C.c_int]
acl.aclrtMemcpy.argtypes = [P, C.c_size_t, P, C.c_size_t, C.c_int]
acl.aclrtCreateStream.argtypes = [C.POINTER(P)]
acl.aclrtSynchronizeStream.argtypes = [P]
acl.aclrtFree.argtypes = [P]
acl.aclGetRecentErrMsg.restype = C.c_char_p
acl.aclrtBinaryLoadFromFile.argtypes = [C.c_char_p, P, C.POINTER(P)]
acl.aclrtBinaryGetFunction.argtypes = [P, C.c_char_p, C.POINTER(P)]
FULL_BLOCK_DIM = 48  # every core of a class on a 910B or a 910C die (docs/emulator.md)
acl.aclrtLaunchKernel.argtypes = [P, C.c_uint32, P, C.c_size_t, P]
nnop.aclCreateTensor.restype = P
nnop.aclCreateTensor.argtypes = [C.POINTER(C.c_int64), C.c_uint64, C.c_int, C.POINTER(C.c_int64), C.c_int64,
                                 C.c_int, C.POINTER(C.c_int64), C.c_uint64, P]
nnop.aclDestroyTensor.argtypes = [P]
nnop.aclCreateScalar.restype = P
nnop.aclCreateScalar.argtypes = [P, C.c_int]
nnop.aclDestroyScalar.argtypes = [P]
nnop.aclCreateIntArray.restype = P
nnop.aclCreateIntArray.argtypes = [C.POINTER(C.c_int64), C.c_uint64]
nnop.aclDestroyIntArray.argtypes = [P]
nnop.aclCreateTensorList.restype = P
nnop.aclCreateTensorList.argtypes = [C.POINTER(P), C.c_uint64]
nnop.aclSetAclOpExecutorRepeatable.argtypes = [P]
nnop.aclDestroyAclOpExecutor.argtypes = [P]
H2D, D2H = 1, 2


def check(rc: int, what: str) -> None:
    if rc != 0:
        raise SystemExit(f"{what} failed: {rc} ({acl.aclGetRecentErrMsg()})")


def to_bf16(x: float) -> int:
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    if math.isnan(x):
        return 0x7fc0
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def pack(dtype: str, values: list) -> bytes:
    _, size, code = DTYPES[dtype]
    if dtype == "bf16":
        return b"".join(struct.pack("<H", to_bf16(float(v))) for v in values)
    if dtype == "bool":
        return bytes(1 if v else 0 for v in values)
    return struct.pack(f"<{len(values)}{code}", *values)


def unpack(dtype: str, raw: bytes) -> list:
    _, size, code = DTYPES[dtype]
    n = len(raw) // size
    if dtype == "bf16":
        return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in struct.unpack(f"<{n}H", raw)]
    return list(struct.unpack(f"<{n}{code}", raw))


def contiguous(shape: list[int]) -> list[int]:
    out, s = [], 1
    for d in reversed(shape):
        out.append(s)
        s *= max(d, 1)
    return out[::-1]


class Tensor:
    def __init__(self, spec: dict, keep: list) -> None:
        self.spec = spec
        self.dtype = spec["dtype"]
        shape = spec["shape"]
        strides = spec.get("strides") or contiguous(shape)
        offset = spec.get("offset", 0)
        span = offset + sum((d - 1) * s for d, s in zip(shape, strides)) + 1 if all(shape) else 0
        self.storage = spec.get("storage", [max(span, 0)] if shape else [])
        self.nstorage = math.prod(self.storage) if self.storage else 1
        nbytes = self.nstorage * DTYPES[self.dtype][1]
        self.dev = P()
        data = spec.get("data")
        if isinstance(data, list) or data in ("zeros", "short"):
            alloc = nbytes - DTYPES[self.dtype][1] if data == "short" else nbytes
            check(acl.aclrtMalloc(C.byref(self.dev), max(alloc, 1), 0), "aclrtMalloc")
            raw = pack(self.dtype, data) if isinstance(data, list) else bytes(max(alloc, 1))
            check(acl.aclrtMemcpy(self.dev, max(alloc, 1), raw, len(raw), H2D), "aclrtMemcpy")
        elif data == "host":
            self.host = C.create_string_buffer(max(nbytes, 1))
            keep.append(self.host)
            self.dev = C.cast(self.host, P)
        self.nbytes = nbytes
        arr = lambda v: (C.c_int64 * max(len(v), 1))(*v)  # noqa: E731
        self.handle = nnop.aclCreateTensor(arr(shape), len(shape), DTYPES[self.dtype][0], arr(strides), offset,
                                           2, arr(self.storage), len(self.storage), self.dev)
        if spec.get("object") == "bad":
            self.fake = C.create_string_buffer(256)
            keep.append(self.fake)
            self.handle = C.cast(self.fake, P).value

    def read(self) -> list:
        raw = C.create_string_buffer(self.nbytes)
        check(acl.aclrtMemcpy(raw, self.nbytes, self.dev, self.nbytes, D2H), "aclrtMemcpy D2H")
        return unpack(self.dtype, raw.raw)

    def free(self) -> None:
        if self.spec.get("object") not in ("bad", "destroyed"):
            nnop.aclDestroyTensor(self.handle)
        if isinstance(self.spec.get("data"), list) or self.spec.get("data") in ("zeros", "short"):
            acl.aclrtFree(self.dev)


def scalar(v, dtype: str, keep: list):
    buf = C.create_string_buffer(pack(dtype, [v]), 16)
    keep.append(buf)
    return nnop.aclCreateScalar(buf, DTYPES[dtype][0])


def run_case(case: dict, stream) -> dict:
    keep: list = []
    tensors = {name: Tensor(spec, keep) for name, spec in case.get("tensors", {}).items()}
    for x in tensors.values():  # after every creation, so that no later one reuses the memory
        if x.spec.get("object") == "destroyed":
            nnop.aclDestroyTensor(x.handle)
    argtypes, argv, owned = [], [], []
    for a in case["args"]:
        if "t" in a:
            argtypes.append(P)
            argv.append(tensors[a["t"]].handle if a["t"] else None)
        elif "tl" in a:
            argtypes.append(P)
            if a["tl"] is None:
                argv.append(None)
            else:
                items = (P * len(a["tl"]))(*[tensors[n].handle for n in a["tl"]])
                lst = nnop.aclCreateTensorList(items, len(a["tl"]))
                argv.append(lst)  # destroying the list would destroy its tensors; the process exits soon
        elif "scalar" in a:
            argtypes.append(P)
            argv.append(scalar(a["scalar"], a["dtype"], keep))
            owned.append(("scalar", argv[-1]))
        elif "ia" in a:
            argtypes.append(P)
            if a["ia"] is None:
                argv.append(None)
            else:
                vals = (C.c_int64 * max(len(a["ia"]), 1))(*a["ia"])
                argv.append(nnop.aclCreateIntArray(vals, len(a["ia"])))
                owned.append(("ia", argv[-1]))
        elif "i64" in a:
            argtypes.append(C.c_int64)
            argv.append(a["i64"])
        elif "i8" in a:
            argtypes.append(C.c_int8)
            argv.append(a["i8"])
        elif "f64" in a:
            argtypes.append(C.c_double)
            argv.append(a["f64"])
        elif "bool" in a:
            argtypes.append(C.c_bool)
            argv.append(a["bool"])
        elif "str" in a:
            argtypes.append(C.c_char_p)
            argv.append(None if a["str"] is None else a["str"].encode())
        else:
            raise SystemExit(f"unknown argument {a}")
    first = getattr(opapi, case["call"] + "GetWorkspaceSize")
    first.argtypes = argtypes + [C.POINTER(C.c_uint64), C.POINTER(P)]
    ws, ex = C.c_uint64(7), P()
    rc = first(*argv, C.byref(ws), C.byref(ex))
    res: dict = {"rc": rc, "rc_run": [], "ws": ws.value}
    if rc == 0:
        if case.get("repeatable"):
            check(nnop.aclSetAclOpExecutorRepeatable(ex), "aclSetAclOpExecutorRepeatable")
        run = getattr(opapi, case.get("run_as", case["call"]))
        run.argtypes = [P, C.c_uint64, P, P]
        for _ in range(case.get("runs", 1)):
            res["rc_run"].append(run(None, ws.value, ex, None if case.get("null_stream") else stream))
        if case.get("repeatable"):
            nnop.aclDestroyAclOpExecutor(ex)
        rc_sync = acl.aclrtSynchronizeStream(None if case.get("null_stream") else stream)
        if case.get("sync_may_fail"):  # an error the run call could not see comes here (forwarded execution)
            res["rc_sync"] = rc_sync
            if rc_sync:
                msg = acl.aclGetRecentErrMsg()
                res["err_sync"] = msg.decode() if msg else None
        else:
            check(rc_sync, "aclrtSynchronizeStream")
    if rc != 0 or any(res["rc_run"]):
        msg = acl.aclGetRecentErrMsg()
        res["err"] = msg.decode() if msg else None
    res["out"] = {name: tensors[name].read() for name in case.get("read", [])}
    for kind, h in owned:
        (nnop.aclDestroyScalar if kind == "scalar" else nnop.aclDestroyIntArray)(h)
    for t in tensors.values():
        t.free()
    return res


def main() -> None:
    job = json.load(sys.stdin)
    check(acl.aclInit(None), "aclInit")
    check(acl.aclrtSetDevice(0), "aclrtSetDevice")
    stream = P()
    check(acl.aclrtCreateStream(C.byref(stream)), "aclrtCreateStream")
    funcs: dict = {}
    if job.get("kernels"):
        binh = P()
        check(acl.aclrtBinaryLoadFromFile(job["kernels"].encode(), None, C.byref(binh)), "aclrtBinaryLoadFromFile")
    for case in job["cases"]:
        if "builtin" in case:
            if case["builtin"] not in funcs:
                f = P()
                check(acl.aclrtBinaryGetFunction(binh, case["builtin"].encode(), C.byref(f)), "aclrtBinaryGetFunction")
                funcs[case["builtin"]] = f
            args = struct.pack(case["fmt"], *case["values"])
            # a built-in that fills the device (every core of its class), as the operators' tiling
            # does for the shapes the cost tests compare
            block_dim = case.get("block_dim", FULL_BLOCK_DIM)
            rc = acl.aclrtLaunchKernel(funcs[case["builtin"]], block_dim, args, len(args), stream)
            print(json.dumps({"rc": rc}), flush=True)
        elif case.get("sync"):
            print(json.dumps({"rc": acl.aclrtSynchronizeStream(stream)}), flush=True)
        else:
            print(json.dumps(run_case(case, stream)), flush=True)
    check(acl.aclrtSynchronizeStream(stream), "aclrtSynchronizeStream")
    print(json.dumps({"pid": os.getpid()}), flush=True)
    acl.aclFinalize()


if __name__ == "__main__":
    main()
