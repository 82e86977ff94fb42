"""Where FlexNPU keeps its runtime files and finds its native parts."""

from __future__ import annotations

import os
import sysconfig
from functools import cache
from pathlib import Path

DEFAULT_RUNTIME_DIR = "/run/flexnpu"


@cache
def _native() -> Path:
    """flexnpu/_native beside this module when installed; when the package is imported from
    a source checkout (python -m from the repo root), the interpreter's installed copy."""
    here = Path(__file__).resolve().parent / "_native"
    if here.is_dir() or os.environ.get("FLEXNPU_NATIVE_DIR"):
        return Path(os.environ.get("FLEXNPU_NATIVE_DIR") or here)
    for key in ("platlib", "purelib"):
        cand = Path(sysconfig.get_paths()[key]) / "flexnpu" / "_native"
        if cand.is_dir():
            return cand
    return here


def runtime_dir() -> Path:
    """The runtime directory: $FLEXNPU_RUNTIME_DIR, else /run/flexnpu."""
    return Path(os.environ.get("FLEXNPU_RUNTIME_DIR") or DEFAULT_RUNTIME_DIR)


def native_dir() -> Path:
    """The installed native parts (lib/, bin/, include/, share/)."""
    return _native()


def native_lib_dir() -> Path:
    return _native() / "lib"


def emulator_library() -> Path:
    """The emulated libascendcl.so."""
    return native_lib_dir() / "libascendcl.so"


def emulator_server_binary() -> Path:
    return _native() / "bin" / "flexnpu-emu-server"


def emulator_include_dir() -> Path:
    return _native() / "include"


def emulator_kernel_library() -> Path:
    """The emulator's default kernel library file (kernels.fxk)."""
    return _native() / "share" / "kernels.fxk"


def emulator_socket(rdir: Path | None = None) -> Path:
    return (rdir or runtime_dir()) / "emu.sock"
