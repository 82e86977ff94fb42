"""Where CANN (Huawei's Ascend toolkit) installs its runtime: the one place FlexNPU looks.

The shim, the observer, `flexnpu run` and `flexnpu doctor` all ask here, so a new install
layout is taught once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from flexnpu import paths

ASCEND_ROOT = Path("/usr/local/Ascend")
_ARCH_LIB_DIRS = ("lib64", "x86_64-linux/lib64", "aarch64-linux/lib64")


def install_roots(env: Mapping[str, str] | None = None, ascend_root: Path = ASCEND_ROOT) -> list[Path]:
    """CANN install trees, most specific first: the set_env.sh variables, then the
    toolkit's and the newer cann-<version> trees."""
    env = os.environ if env is None else env
    roots: list[Path] = [Path(env[v]) for v in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME") if env.get(v)]
    roots.append(ascend_root / "ascend-toolkit" / "latest")
    roots.append(ascend_root / "latest")
    roots.append(ascend_root / "nnae" / "latest")
    roots.extend(sorted(ascend_root.glob("cann*"), reverse=True))
    return roots


def library_dirs(env: Mapping[str, str] | None = None, ascend_root: Path = ASCEND_ROOT) -> list[Path]:
    """Directories that may hold CANN's runtime libraries (libascendcl.so, libruntime.so,
    libopapi.so)."""
    out: list[Path] = []
    for root in install_roots(env, ascend_root):
        for sub in (*_ARCH_LIB_DIRS, "runtime/lib64"):
            d = root / sub
            if d not in out:
                out.append(d)
    return out


def cann_library_candidates(env: Mapping[str, str] | None = None,
                            ascend_root: Path = ASCEND_ROOT) -> list[Path]:
    """Where CANN puts libascendcl.so, most specific first."""
    return [root / sub / "libascendcl.so" for root in install_roots(env, ascend_root) for sub in _ARCH_LIB_DIRS]


def find_cann_library(env: Mapping[str, str] | None = None, ascend_root: Path = ASCEND_ROOT) -> Path | None:
    """CANN's real libascendcl.so, or None when no CANN installation is found."""
    emu = paths.emulator_library().resolve()
    for p in cann_library_candidates(env, ascend_root):
        if p.is_file() and p.resolve() != emu:
            return p
    return None
