"""The AscendCL calls the serving instances make, through ctypes, each checked.

Nothing here knows FlexNPU: libascendcl.so comes from LD_LIBRARY_PATH (CANN's set_env.sh, or
`flexnpu emu env`), and under LD_PRELOAD the shim sees ordinary calls.
"""

from __future__ import annotations

import ctypes

VP = ctypes.c_void_p
SIZE = ctypes.c_size_t
ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEMCPY_INTER_DEVICE_TO_DEVICE = 7  # acl_rt.h: aclrtMemcpyKind
ACL_HBM_MEM = 1
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
    "aclrtMemcpyAsync": [VP, SIZE, VP, SIZE, ctypes.c_int, VP],
    "aclrtGetMemInfo": [ctypes.c_int, ctypes.POINTER(SIZE), ctypes.POINTER(SIZE)],
    "aclrtBinaryLoadFromFile": [ctypes.c_char_p, VP, ctypes.POINTER(VP)],
    "aclrtBinaryGetFunction": [VP, ctypes.c_char_p, ctypes.POINTER(VP)],
    "aclrtBinaryUnLoad": [VP],
    "aclrtLaunchKernel": [VP, ctypes.c_uint32, ctypes.c_char_p, SIZE, VP],
    "aclGetRecentErrMsg": [],
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

    def mem_info(self) -> tuple[int, int]:
        free, total = SIZE(), SIZE()
        self.call("aclrtGetMemInfo", ACL_HBM_MEM, ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    def launch(self, func: VP, args: bytes, stream: VP, block_dim: int = FULL_BLOCK_DIM) -> None:
        rc = self._launch(func, block_dim, args, len(args), stream)
        if rc != 0:
            msg = self.lib.aclGetRecentErrMsg()
            raise AclError(f"aclrtLaunchKernel failed: {rc} ({msg.decode(errors='replace') if msg else ''})")
