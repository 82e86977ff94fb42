"""An IPC memory peer in Python, through ctypes (flexnpu.workload.acl), as an unmodified
Python program would use AscendCL's IPC calls (tests/test_emu_ipc.py).

    python3 ipc_ctypes.py [DEVICE]

Prints {"ready", "pid"} once it has a device, then obeys one command per stdin line and
answers each with one JSON line:

    pid                      {"pid"}: aclrtDeviceGetBareTgid
    malloc BYTES VALUE       {"rc"}: an allocation filled with VALUE (aclrtMemcpy H2D)
    export FLAGS             {"rc", "key"}: aclrtIpcMemGetExportKey of the whole allocation
    setpid PID...            {"rc"}: aclrtIpcMemSetImportPid
    import KEY FLAGS BYTES   {"rc", "msg", "first", "same"}: aclrtIpcMemImportByKey, then the
                             first BYTES of it read back (aclrtMemcpy D2H) when it worked
    memset VALUE BYTES       {"rc"}: aclrtMemset of the first BYTES of the last import
    close KEY                {"rc"}: aclrtIpcMemClose
"""

from __future__ import annotations

import ctypes
import json
import sys

from flexnpu.workload.acl import Acl, AclError

ACL_MEMCPY_HOST_TO_DEVICE, ACL_MEMCPY_DEVICE_TO_HOST = 1, 2


def code(e: AclError) -> int:
    return int(str(e).split(": ", 1)[1].split()[0])


def main() -> None:
    acl = Acl()
    acl.call("aclInit", None)
    acl.call("aclrtSetDevice", int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    memcpy, memset = acl.lib.aclrtMemcpy, acl.lib.aclrtMemset
    memcpy.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    memset.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int32, ctypes.c_size_t]
    alloc, size, imported = None, 0, None
    print(json.dumps({"ready": True, "pid": acl.bare_tgid()}), flush=True)
    for line in sys.stdin:
        w = line.split()
        if not w:
            continue
        out: dict = {"rc": 0}
        try:
            if w[0] == "pid":
                out["pid"] = acl.bare_tgid()
            elif w[0] == "malloc":
                size = int(w[1])
                alloc = acl.malloc(size)
                buf = ctypes.create_string_buffer(bytes([int(w[2])]) * size, size)
                out["rc"] = memcpy(alloc, size, buf, size, ACL_MEMCPY_HOST_TO_DEVICE)
            elif w[0] == "export":
                out["key"] = acl.export_key(alloc, size, int(w[1])).decode()
            elif w[0] == "setpid":
                acl.set_import_pids(w[1].encode(), [int(p) for p in w[2:]])
            elif w[0] == "import":
                n = int(w[3])
                imported = acl.import_key(w[1].encode(), int(w[2]))
                buf = ctypes.create_string_buffer(n)
                out["rc"] = memcpy(buf, n, imported, n, ACL_MEMCPY_DEVICE_TO_HOST)
                out["first"], out["same"] = buf.raw[0], len(set(buf.raw)) == 1
            elif w[0] == "memset":
                out["rc"] = memset(imported, int(w[2]), int(w[1]), int(w[2]))
            elif w[0] == "close":
                acl.call("aclrtIpcMemClose", w[1].encode())
            else:
                out["rc"] = -1
        except AclError as e:
            out = {"rc": code(e), "msg": str(e)}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
