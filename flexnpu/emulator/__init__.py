"""The emulated Ascend device: a libascendcl.so with the real AscendCL ABI, and the
device server that owns the node's emulated devices (see docs/emulator.md)."""

from flexnpu.emulator.control import (
    EmulatorError,
    EmulatorNotRunning,
    emulator_env,
    is_running,
    start,
    status,
    stop,
)
from flexnpu.emulator.profiles import PROFILES, DeviceProfile

__all__ = [
    "PROFILES",
    "DeviceProfile",
    "EmulatorError",
    "EmulatorNotRunning",
    "emulator_env",
    "is_running",
    "start",
    "status",
    "stop",
]
