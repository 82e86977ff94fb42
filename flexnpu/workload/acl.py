"""The AscendCL calls the serving instances make, through ctypes, each checked.

Nothing here knows FlexNPU: libascendcl.so comes from LD_LIBRARY_PATH (CANN's set_env.sh, or
`flexnpu emu env`), and under LD_PRELOAD the shim sees ordinary calls.
"""

from __future__ import annotations

import ctypes

VP = ctypes.c_void_p
SIZE = ctypes.c_size_t
ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEMCPY_HOST_TO_DEVICE = 1  # acl_rt.h: aclrtMemcpyKind
ACL_MEMCPY_DEVICE_TO_HOST = 2
ACL_MEMCPY_INTER_DEVICE_TO_DEVICE = 7
ACL_HBM_MEM = 1
ACL_RT_IPC_MEM_EXPORT_FLAG_DISABLE_PID_VALIDATION = 0x1  # acl_rt.h
ACL_RT_IPC_MEM_IMPORT_FLAG_ENABLE_PEER_ACCESS = 0x1
IPC_KEY_LEN = 65  # 64 characters and a NUL
# aclrtLaunchKernel's blockDim for a kernel that fills the device: at least every core of its
# class (24 cube, 48 vector on a 910B or a 910C die). A kernel on fewer cores gets that share
# of the compute, on real hardware as on the emulator (docs/emulator.md).
FULL_BLOCK_DIM = 48

_SIGNATURES = {
    "aclInit": [ctypes.c_char_p],
    "aclFinalize": [],
    "aclrtSetDevice": [ctypes.c_int32],
    "aclrtResetDevice": [ctypes.c_int32],
    "aclrtCreateStream": [ctypes.POINTER(VP)],
    "aclrtDestroyStream": [VP],
    "aclrtSynchronizeStream": [VP],
    "aclrtMalloc": [ctypes.POINTER(VP), SIZE, ctypes.c_int],
    "aclrtFree": [VP],
    "aclrtMallocHost": [ctypes.POINTER(VP), SIZE],
    "aclrtFreeHost": [VP],
    "aclrtMemcpyAsync": [VP, SIZE, VP, SIZE, ctypes.c_int, VP],
    "aclrtMemcpy": [VP, SIZE, VP, SIZE, ctypes.c_int],
    "aclrtMemsetAsync": [VP, SIZE, ctypes.c_int32, SIZE, VP],
    "aclrtGetMemInfo": [ctypes.c_int, ctypes.POINTER(SIZE), ctypes.POINTER(SIZE)],
    "aclrtBinaryLoadFromFile": [ctypes.c_char_p, VP, ctypes.POINTER(VP)],
    "aclrtBinaryGetFunction": [VP, ctypes.c_char_p, ctypes.POINTER(VP)],
    "aclrtBinaryUnLoad": [VP],
    "aclrtLaunchKernel": [VP, ctypes.c_uint32, ctypes.c_char_p, SIZE, VP],
    "aclGetRecentErrMsg": [],
    "aclrtIpcMemGetExportKey": [VP, SIZE, ctypes.c_char_p, SIZE, ctypes.c_uint64],
    "aclrtIpcMemSetImportPid": [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int32), SIZE],
    "aclrtIpcMemImportByKey": [ctypes.POINTER(VP), ctypes.c_char_p, ctypes.c_uint64],
    "aclrtIpcMemClose": [ctypes.c_char_p],
    "aclrtDeviceGetBareTgid": [ctypes.POINTER(ctypes.c_int32)],
}


class AclError(RuntimeError):
    pass


class Acl:
    """One process's AscendCL runtime."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libascendcl.so")
        except OSError as e:
            raise AclError(f"cannot load libascendcl.so ({e}); set LD_LIBRARY_PATH (flexnpu emu env)") from None
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_char_p if name == "aclGetRecentErrMsg" else ctypes.c_int
        self._launch = self.lib.aclrtLaunchKernel

    def call(self, name: str, *args) -> None:
        rc = getattr(self.lib, name)(*args)
        if rc != 0:
            msg = self.lib.aclGetRecentErrMsg()
            raise AclError(f"{name} failed: {rc} ({msg.decode(errors='replace') if msg else ''})")

    def handle(self, name: str, *args) -> VP:
        h = VP()
        self.call(name, *args, ctypes.byref(h))
        return h

    def malloc(self, size: int) -> VP:
        ptr = VP()
        self.call("aclrtMalloc", ctypes.byref(ptr), size, ACL_MEM_MALLOC_HUGE_FIRST)
        return ptr

    def malloc_host(self, size: int) -> VP:
        """aclrtMallocHost: host memory for copies to and from the device."""
        ptr = VP()
        self.call("aclrtMallocHost", ctypes.byref(ptr), size)
        return ptr

    def mem_info(self) -> tuple[int, int]:
        free, total = SIZE(), SIZE()
        self.call("aclrtGetMemInfo", ACL_HBM_MEM, ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    # -- IPC memory: share an allocation with another process, no copy
    def export_key(self, ptr: VP | int, size: int, flags: int = 0) -> bytes:
        """aclrtIpcMemGetExportKey: the key (64 characters) another process imports it by."""
        key = ctypes.create_string_buffer(IPC_KEY_LEN)
        self.call("aclrtIpcMemGetExportKey", ptr, size, key, IPC_KEY_LEN, flags)
        return key.value

    def set_import_pids(self, key: bytes, pids: list[int]) -> None:
        """aclrtIpcMemSetImportPid: the processes (aclrtDeviceGetBareTgid) that may import it."""
        arr = (ctypes.c_int32 * len(pids))(*pids)
        self.call("aclrtIpcMemSetImportPid", key, arr, len(pids))

    def import_key(self, key: bytes, flags: int = 0) -> VP:
        """aclrtIpcMemImportByKey: a device pointer to the exporter's memory, on the current device."""
        ptr = VP()
        self.call("aclrtIpcMemImportByKey", ctypes.byref(ptr), key, flags)
        return ptr

    def bare_tgid(self) -> int:
        pid = ctypes.c_int32()
        self.call("aclrtDeviceGetBareTgid", ctypes.byref(pid))
        return pid.value

    def launch(self, func: VP, args: bytes, stream: VP, block_dim: int = FULL_BLOCK_DIM) -> None:
        rc = self._launch(func, block_dim, args, len(args), stream)
        if rc != 0:
            msg = self.lib.aclGetRecentErrMsg()
            raise AclError(f"aclrtLaunchKernel failed: {rc} ({msg.decode(errors='replace') if msg else ''})")
