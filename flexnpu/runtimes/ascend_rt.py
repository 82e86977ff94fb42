"""CANN's lower runtime library (libruntime.so): the kernel-launch functions the observer
probes where a process maps it.

Under torch_npu most kernels are launched through these rt* functions rather than the
public aclrt* calls, so counting launches only at the AscendCL level would miss them.
Only launches are probed here; copies, allocations and synchronisations are counted at
the AscendCL level. The observer keeps the two launch counts apart (rt_launches vs
ops[KERNEL]) and reports the rt* count where a process maps this library, because
aclrtLaunchKernel itself ends in an rt* launch there.

Signatures follow CANN's runtime/kernel.h. The emulator has no libruntime.so.
The shim does not wrap these (wrap=False); this profile serves the probes only.
"""

from flexnpu.runtimes.base import Op, RuntimeProfile, Symbol

_DESC = ("rtSmDesc_t *", "smDesc")
_STREAM = ("rtStream_t", "stm")

ASCEND_RT = RuntimeProfile(
    name="ascend-rt",
    library="libruntime.so",
    headers=("runtime/rt.h",),
    success="RT_ERROR_NONE",
    symbols=(
        Symbol("rtKernelLaunch", Op.KERNEL, "rtError_t",
               (("const void *", "stubFunc"), ("uint32_t", "blockDim"), ("void *", "args"),
                ("uint32_t", "argsSize"), _DESC, _STREAM), stream_arg="stm", wrap=False),
        Symbol("rtKernelLaunchWithFlag", Op.KERNEL, "rtError_t",
               (("const void *", "stubFunc"), ("uint32_t", "blockDim"), ("rtArgsEx_t *", "argsInfo"),
                _DESC, _STREAM, ("uint32_t", "flags")), stream_arg="stm", wrap=False),
        Symbol("rtKernelLaunchWithFlagV2", Op.KERNEL, "rtError_t",
               (("const void *", "stubFunc"), ("uint32_t", "blockDim"), ("rtArgsEx_t *", "argsInfo"),
                _DESC, _STREAM, ("uint32_t", "flags"), ("const rtTaskCfgInfo_t *", "cfgInfo")),
               stream_arg="stm", wrap=False),
        Symbol("rtKernelLaunchWithHandle", Op.KERNEL, "rtError_t",
               (("void *", "hdl"), ("const uint64_t", "tilingKey"), ("uint32_t", "blockDim"),
                ("rtArgsEx_t *", "argsInfo"), _DESC, _STREAM, ("const void *", "kernelInfo")),
               stream_arg="stm", wrap=False),
        Symbol("rtKernelLaunchWithHandleV2", Op.KERNEL, "rtError_t",
               (("void *", "hdl"), ("const uint64_t", "tilingKey"), ("uint32_t", "blockDim"),
                ("rtArgsEx_t *", "argsInfo"), _DESC, _STREAM, ("const rtTaskCfgInfo_t *", "cfgInfo")),
               stream_arg="stm", wrap=False),
        Symbol("rtCpuKernelLaunch", Op.KERNEL, "rtError_t",
               (("const void *", "soName"), ("const void *", "kernelName"), ("uint32_t", "blockDim"),
                ("const void *", "args"), ("uint32_t", "argsSize"), _DESC, _STREAM), wrap=False),
        Symbol("rtCpuKernelLaunchWithFlag", Op.KERNEL, "rtError_t",
               (("const void *", "soName"), ("const void *", "kernelName"), ("uint32_t", "blockDim"),
                ("const rtArgsEx_t *", "argsInfo"), _DESC, _STREAM, ("uint32_t", "flags")), wrap=False),
    ),
)
