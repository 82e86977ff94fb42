"""Where FlexNPU keeps its runtime files and finds its native parts."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_RUNTIME_DIR = "/run/flexnpu"
_NATIVE = Path(__file__).resolve().parent / "_native"


def runtime_dir() -> Path:
    """The runtime directory: $FLEXNPU_RUNTIME_DIR, else /run/flexnpu."""
    return Path(os.environ.get("FLEXNPU_RUNTIME_DIR") or DEFAULT_RUNTIME_DIR)


def native_dir() -> Path:
    """The installed native parts (lib/, bin/, include/, share/)."""
    return _NATIVE


def native_lib_dir() -> Path:
    return _NATIVE / "lib"


def emulator_library() -> Path:
    """The emulated libascendcl.so."""
    return native_lib_dir() / "libascendcl.so"


def emulator_server_binary() -> Path:
    return _NATIVE / "bin" / "flexnpu-emu-server"


def emulator_include_dir() -> Path:
    return _NATIVE / "include"


def emulator_kernel_library() -> Path:
    """The emulator's default kernel library file (kernels.fxk)."""
    return _NATIVE / "share" / "kernels.fxk"


def emulator_socket(rdir: Path | None = None) -> Path:
    return (rdir or runtime_dir()) / "emu.sock"
