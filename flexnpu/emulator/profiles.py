"""Device profiles of the emulated Ascend device, from published specifications.

Each number carries its source. Where sources disagree, the choice and the reason are
in docs/emulator.md ("Parameters and their sources").
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1 << 30


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    soc: str
    peak_tflops: float  # dense FP16/BF16
    hbm_tbps: float  # HBM bandwidth, TB/s
    link_gbps: float  # host <-> device copy bandwidth, GB/s
    launch_us: float  # submission to earliest kernel start
    capacity_gib: float  # HBM per device
    # AI Core units (contexts mode: a kernel's blockDim counts in its class's cores)
    cube_cores: int = 24  # AIC
    vector_cores: int = 48  # AIV
    # contexts mode: the device idles this long when it changes from one process's context to another's
    context_switch_us: float = 20.0
    # device <-> device copies (aclrtMemcpy INTER_DEVICE_TO_DEVICE), GB/s; 0: the host link
    p2p_gbps: float = 0.0
    # achieved fraction of peak per built-in kernel: {builtin: (compute, hbm)}; absent = 1.0
    efficiency: dict[str, tuple[float, float]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def kernel_efficiency(self, builtin: str) -> tuple[float, float]:
        return self.efficiency.get(builtin, (1.0, 1.0))

    def server_args(self) -> list[str]:
        return [
            "--soc", self.soc,
            "--peak-flops", repr(self.peak_tflops * 1e12),
            "--hbm-bw", repr(self.hbm_tbps * 1e12),
            "--link-bw", repr(self.link_gbps * 1e9),
            "--launch-ns", repr(self.launch_us * 1e3),
            "--capacity", str(int(self.capacity_gib * GIB)),
            "--cube-cores", str(self.cube_cores),
            "--vector-cores", str(self.vector_cores),
            "--context-switch-us", repr(self.context_switch_us),
            *(["--p2p-bw", repr(self.p2p_gbps * 1e9)] if self.p2p_gbps else []),
            *(["--efficiency", ",".join(f"{k}={c!r}/{h!r}" for k, (c, h) in sorted(self.efficiency.items()))]
              if self.efficiency else []),
        ]


CONTEXT_SWITCH_SOURCE = (
    "assumption: no figure is published for Ascend (nor by NVIDIA for its GPUs' time-slice switches); "
    "the model switches only at op boundaries after the old context has drained, so no core state is "
    "saved, and 20 us (twice the launch latency) stands for the runtime's and the MMU's change of "
    "address space; docs/emulator.md has the sweep of its effect"
)

PROFILES: dict[str, DeviceProfile] = {
    # Ascend 910B2 (Atlas 800T A2): 24 AI Cores at 1800 MHz, 16x16x16 FP16 MACs per core
    # per cycle -> 353.9 TFLOPS; 64 GiB HBM.
    "910b": DeviceProfile(
        name="910b",
        soc="Ascend910B2",
        peak_tflops=353.9,
        hbm_tbps=1.6,
        link_gbps=23.0,
        launch_us=10.0,
        capacity_gib=64,
        p2p_gbps=56.0,
        # Achieved fraction of peak (compute, HBM) per built-in, calibrated so that the
        # reference workload (flexnpu/workload) lands near published Qwen2.5-7B serving
        # figures on the 910B: docs/bench.md has the table, sources and command.
        # copy and synthetic stay at peak (benchmarks and tests time them exactly).
        efficiency={
            "gemm": (0.60, 0.40),
            "attention_prefill": (0.45, 0.60),
            "attention_extend": (0.45, 0.60),
            "attention_decode": (0.50, 0.50),
            "rmsnorm": (0.50, 0.50),
            "rope": (0.50, 0.50),
            "elementwise": (0.50, 0.50),
        },
        sources={
            "p2p_gbps": "HCCS, one link between two 910B in an 8-NPU full mesh (Atlas 800T A2): 56 GB/s "
            "(HCCS section of 'GPU 进阶笔记（二）：华为昇腾 910B', arthurchiao.art, mirrored in "
            "guevara/read-it-later#11547); see docs/bench.md",
            "efficiency": "calibrated: docs/bench.md (ours vs published Qwen2.5-7B on 910B); GEMM compute "
            "below the measured 89% of peak for a 4096^3 FP16 GEMM",
            "peak_tflops": "CANN platform config Ascend910B2.ini (ai_core_cnt=24, cube_freq=1800 MHz) x "
            "16x16x16 FP16 MAC/cycle (CANN Ascend C best practices); a measured 4096^3 FP16 GEMM "
            "reaches 314.5 TFLOPS (89%)",
            "hbm_tbps": "Zuo et al., Serving LLMs on Huawei CloudMatrix384, arXiv:2506.12708: 3.2 TB/s "
            "per two-die 910C package, whose die has the 910B's core configuration (1.6 TB/s per die)",
            "link_gbps": "DeepSpeed issue #8531: ~23 GB/s host-to-device with registered pinned "
            "memory on a 910B (CANN 8.5)",
            "launch_us": "assumption: no vendor figure is published; between the smallest device "
            "kernel time (8.5 us, sgl-kernel-npu #601) and framework per-op overheads (20-70 us)",
            "capacity_gib": "CANN platform config Ascend910B2.ini memory_size = 64 GiB",
            "cube_cores": "CANN platform config Ascend910B2.ini [SoCInfo] ai_core_cnt=24, cube_core_cnt=24 "
            "(the values Ascend/torchair docs/zh/context/limit_core_num.md quotes for A2/A3)",
            "vector_cores": "CANN platform config Ascend910B2.ini [SoCInfo] vector_core_cnt=48",
            "context_switch_us": CONTEXT_SWITCH_SOURCE,
        },
    ),
    # Ascend 910C, one die = one device as CANN presents it (two per package).
    "910c": DeviceProfile(
        name="910c",
        soc="Ascend910_9392",
        peak_tflops=376.0,
        hbm_tbps=1.6,
        link_gbps=23.0,
        launch_us=10.0,
        capacity_gib=64,
        sources={
            "peak_tflops": "arXiv:2506.12708 (CloudMatrix384): 752 TFLOPS dense FP16/BF16 per 910C "
            "package, two dies, each a CANN device",
            "hbm_tbps": "arXiv:2506.12708: 3.2 TB/s and 128 GB per package",
            "link_gbps": "assumption: no published 910C host-to-device figure; the 910B's pinned rate",
            "launch_us": "assumption, as for 910b",
            "capacity_gib": "arXiv:2506.12708 (128 GB per package); CANN Ascend910_9392.ini memory_size = 64 GiB per die",
            "cube_cores": "CANN platform config Ascend910_9392.ini cube_core_cnt=24 per die (device queries on "
            "a 910C report 24 AI cores, 48 vector cores per device); the die has the 910B's core "
            "configuration (arXiv:2506.12708)",
            "vector_cores": "CANN platform config Ascend910_9392.ini vector_core_cnt=48 per die",
            "context_switch_us": CONTEXT_SWITCH_SOURCE,
        },
    ),
}
