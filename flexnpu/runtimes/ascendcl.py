"""AscendCL (libascendcl.so): the profile of the Ascend runtime FlexNPU handles.

Signatures follow CANN's acl/acl_rt.h; the emulator's copy of the header is
flexnpu/include/acl/acl_rt.h.
"""

from flexnpu.runtimes.base import Direction, Namer, Op, RuntimeProfile, Symbol

_S = "aclrtStream"

ASCENDCL = RuntimeProfile(
    name="ascendcl",
    library="libascendcl.so",
    headers=("acl/acl.h",),
    success="ACL_SUCCESS",
    directions={
        0: Direction.H2H,  # ACL_MEMCPY_HOST_TO_HOST
        1: Direction.H2D,  # ACL_MEMCPY_HOST_TO_DEVICE
        2: Direction.D2H,  # ACL_MEMCPY_DEVICE_TO_HOST
        3: Direction.D2D,  # ACL_MEMCPY_DEVICE_TO_DEVICE
        4: Direction.UNKNOWN,  # ACL_MEMCPY_DEFAULT: inferred by the runtime from the pointers
        5: Direction.H2D,  # ACL_MEMCPY_HOST_TO_BUF_TO_DEVICE
        6: Direction.D2D,  # ACL_MEMCPY_INNER_DEVICE_TO_DEVICE
        7: Direction.D2D,  # ACL_MEMCPY_INTER_DEVICE_TO_DEVICE
    },
    errors={
        "invalid_device": 107001,  # ACL_ERROR_RT_INVALID_DEVICEID
        "out_of_memory": 207001,  # ACL_ERROR_RT_MEMORY_ALLOCATION
    },
    symbols=(
        # dispatch
        Symbol("aclrtLaunchKernel", Op.KERNEL, "aclError",
               (("aclrtFuncHandle", "funcHandle"), ("uint32_t", "blockDim"), ("const void *", "argsData"),
                ("size_t", "argsSize"), (_S, "stream")), stream_arg="stream", func_arg="funcHandle"),
        Symbol("aclrtMemcpyAsync", Op.MEMCPY_ASYNC, "aclError",
               (("void *", "dst"), ("size_t", "destMax"), ("const void *", "src"), ("size_t", "count"),
                ("aclrtMemcpyKind", "kind"), (_S, "stream")),
               bytes_arg="count", kind_arg="kind", stream_arg="stream"),
        Symbol("aclrtMemsetAsync", Op.MEMSET_ASYNC, "aclError",
               (("void *", "devPtr"), ("size_t", "maxCount"), ("int32_t", "value"), ("size_t", "count"),
                (_S, "stream")), bytes_arg="count", stream_arg="stream"),
        Symbol("aclrtRecordEvent", Op.EVENT_RECORD, "aclError",
               (("aclrtEvent", "event"), (_S, "stream")), stream_arg="stream"),
        Symbol("aclrtStreamWaitEvent", Op.STREAM_WAIT, "aclError",
               ((_S, "stream"), ("aclrtEvent", "event")), stream_arg="stream"),
        Symbol("aclrtMemcpy", Op.MEMCPY, "aclError",
               (("void *", "dst"), ("size_t", "destMax"), ("const void *", "src"), ("size_t", "count"),
                ("aclrtMemcpyKind", "kind")), bytes_arg="count", kind_arg="kind"),
        Symbol("aclrtMemset", Op.MEMSET, "aclError",
               (("void *", "devPtr"), ("size_t", "maxCount"), ("int32_t", "value"), ("size_t", "count")),
               bytes_arg="count"),
        # memory
        Symbol("aclrtMalloc", Op.ALLOC, "aclError",
               (("void **", "devPtr"), ("size_t", "size"), ("aclrtMemMallocPolicy", "policy")),
               bytes_arg="size", ptr_arg="devPtr"),
        Symbol("aclrtFree", Op.FREE, "aclError", (("void *", "devPtr"),), ptr_arg="devPtr"),
        Symbol("aclrtGetMemInfo", Op.MEMINFO, "aclError",
               (("aclrtMemAttr", "attr"), ("size_t *", "free"), ("size_t *", "total")), hand_written=True),
        # synchronisation
        Symbol("aclrtSynchronizeStream", Op.SYNC, "aclError", ((_S, "stream"),), stream_arg="stream"),
        Symbol("aclrtSynchronizeStreamWithTimeout", Op.SYNC, "aclError",
               ((_S, "stream"), ("int32_t", "timeout")), stream_arg="stream"),
        Symbol("aclrtSynchronizeDevice", Op.SYNC, "aclError", ()),
        Symbol("aclrtSynchronizeDeviceWithTimeout", Op.SYNC, "aclError", (("int32_t", "timeout"),)),
        Symbol("aclrtSynchronizeEvent", Op.SYNC, "aclError", (("aclrtEvent", "event"),)),
        Symbol("aclrtSynchronizeEventWithTimeout", Op.SYNC, "aclError",
               (("aclrtEvent", "event"), ("int32_t", "timeout"))),
        # devices and contexts (virtual -> physical map)
        Symbol("aclrtSetDevice", Op.DEVICE_SET, "aclError", (("int32_t", "deviceId"),),
               device_arg="deviceId", hand_written=True),
        Symbol("aclrtGetDevice", Op.DEVICE_GET, "aclError", (("int32_t *", "deviceId"),), hand_written=True),
        Symbol("aclrtGetDeviceCount", Op.DEVICE_COUNT, "aclError", (("uint32_t *", "count"),), hand_written=True),
        Symbol("aclrtResetDevice", Op.DEVICE_RESET, "aclError", (("int32_t", "deviceId"),),
               device_arg="deviceId", hand_written=True),
        Symbol("aclrtCreateContext", Op.CONTEXT_CREATE, "aclError",
               (("aclrtContext *", "context"), ("int32_t", "deviceId")), device_arg="deviceId", hand_written=True),
        Symbol("aclrtDestroyContext", Op.CONTEXT_DESTROY, "aclError", (("aclrtContext", "context"),),
               hand_written=True),
        Symbol("aclrtSetCurrentContext", Op.CONTEXT_SET, "aclError", (("aclrtContext", "context"),),
               hand_written=True),
    ),
    namers=(
        # the kernel's name, learned when its handle is made; launches are classed by it
        Namer("aclrtBinaryGetFunction", "aclError",
              (("const aclrtBinHandle", "binHandle"), ("const char *", "kernelName"),
               ("aclrtFuncHandle *", "funcHandle")),
              kind="kernel_handle", name_arg="kernelName", handle_arg="funcHandle"),
    ),
)
