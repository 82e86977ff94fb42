"""Writes docs/compatibility.md: every AscendCL and aclnn call FlexNPU knows, and what the
emulator, the shim and the observer's probes do with each, read from the sources.

    python scripts/gen_compat.py            # rewrite docs/compatibility.md
    python scripts/gen_compat.py --check    # exit 1, saying so, when the file is not current

Sources, so the page never goes stale (tests/test_compat_doc.py runs --check):
  - the headers the emulator implements (flexnpu/include/acl, aclnn, aclnnop): what is declared;
  - the emulator's C sources (flexnpu/emulator/native/**/*.c): where each call is defined, and
    whether its body only refuses (ACL_ERROR_API_NOT_SUPPORT) or computes no data;
  - the runtime profiles (flexnpu/runtimes): what the shim wraps and what the probes see;
  - the forward build's export tables (flexnpu/forward/native/shim/fwd_client.c's fwd_exports[],
    fwd_aclnn.c's FWD_ACLNN_EXPORTS, the operators flexnpu/forward/gen_aclnn.py generates from
    the aclnnop headers, and the profile's wrappers): what `flexnpu run --forward` carries.
    tests/test_compat_doc.py checks them against the built libflexnpu_fwd.so's exports.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flexnpu.forward import gen_aclnn  # noqa: E402
from flexnpu.forward.gen_shim import BUDGETED  # noqa: E402
from flexnpu.observe.phase import classify_name  # noqa: E402
from flexnpu.runtimes import ACLNN, ASCEND_RT, ASCENDCL, PROBED_WITH, RUNTIMES, Op  # noqa: E402

DOC = REPO / "docs" / "compatibility.md"
INCLUDE = REPO / "flexnpu" / "include"
NATIVE = REPO / "flexnpu" / "emulator" / "native"
FWD_NATIVE = REPO / "flexnpu" / "forward" / "native"
# the forward build's tables of calls exported under their own names
FWD_TABLES = (FWD_NATIVE / "shim" / "fwd_client.c", FWD_NATIVE / "shim" / "fwd_aclnn.c")
# libnnopbase.so's calls on an operator executor: the forward build sends them to the executor
FWD_EXECUTOR_CALLS = {"aclSetAclOpExecutorRepeatable", "aclDestroyAclOpExecutor"}

# Which library a header's calls live in, as CANN ships them (CANN's aclnn "two-stage
# interface" docs: the operators in libopapi.so, tensors and executors in libnnopbase.so).
HEADER_LIBRARY = {"acl": "libascendcl.so", "aclnn": "libnnopbase.so", "aclnnop": "libopapi.so"}
# A function body that does nothing but refuse, or that computes no data (the op's cost
# only), says so with one of these; the emulator's sources use them for exactly that.
REFUSES = "ACL_ERROR_API_NOT_SUPPORT"
TIMING_ONLY = re.compile(r"\bEMU_TIMING_ONLY\b|timing[- ]only op", re.I)

LEGEND = """\
What each column says:

- **emulator**: *emulated* — the emulated library exports it with CANN's signature, moves the
  data and models the time (docs/emulator.md); *emulated without numerics* — exported, checked
  and timed, but it computes no output data (a timing-only op); *refused* — exported, returns
  `ACL_ERROR_API_NOT_SUPPORT` (200001); *absent* — not exported (a program that calls it fails
  to link or to find it with `dlsym`, as on an older CANN); *emulator extension* — exported by the
  emulated library for the emulator's own parts, no part of CANN's API.
- **shim** (`flexnpu run`, docs/forward.md): *gated* — the call passes its device's dispatch
  gate; *gated, budgeted* — and counts against the in-flight budget; *wrapped* — counted
  (memory against the quota, synchronisations); *wrapped by hand* — device ids are remapped or
  memory views cut to the quota; *via aclrtLaunchKernel* — not wrapped itself, the kernels it
  launches pass the gate where they are launched; *—* — not touched.
- **forwarded** (`flexnpu run --forward`, docs/forward.md "Forwarded aclnn operators"):
  *carried* — the forward library (`libflexnpu_fwd.so`) exports it and the device's executor
  runs it (or it is answered in the process, as `aclInit`); *local, remembered* — the
  process's own aclnn library makes the host object and the forward library keeps what it was
  made with, to send it with the operators that name it; *local* — the process's own library
  answers it (host objects only: tensors are described to the executor by their accessors);
  *not carried* — returns `ACL_ERROR_API_NOT_SUPPORT` (run the program gated); *—* — not an
  AscendCL or aclnn call a program makes.
- **probes** (`flexnpu observe`, docs/observe.md): what the uprobes count or learn from a call;
  *phase: prefill / decode / either* — an attention operator whose name says the phase of the
  work (flexnpu/observe/phase.py); *—* — not probed.
"""


@dataclass
class Row:
    name: str
    library: str
    emulator: str = "absent"
    shim: str = "—"
    probes: str = "—"
    forwarded: str = "—"
    where: str = ""  # the header that declares it


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


_DECL = re.compile(r"\b(acl\w*)\s*\(([^;{}]*)\)\s*;")
_EXT_DECL = re.compile(r"ACL_FUNC_VISIBILITY\s+[\w\s*]+?\b(\w+)\s*\(")
# The emulator's own exports beside CANN's ABI (what its libopapi.so asks of its libascendcl.so)
EXT_HEADER, EXT_LIBRARY = "emu_ext.h", "libascendcl.so"


def declared() -> dict[str, tuple[str, str]]:
    """name -> (library, header path) for every function the emulator's headers declare."""
    out: dict[str, tuple[str, str]] = {}
    for sub, lib in HEADER_LIBRARY.items():
        d = INCLUDE / sub
        if not d.is_dir():
            continue
        for h in sorted(d.glob("*.h")):
            for m in _DECL.finditer(_strip_comments(h.read_text())):
                name = m.group(1)
                if name.startswith("acl") and name not in out:
                    out[name] = (lib, f"{sub}/{h.name}")
    return out


def extensions() -> list[str]:
    """The emulator's exports that are no part of CANN's API (emu_ext.h)."""
    h = NATIVE / EXT_HEADER
    return sorted(set(_EXT_DECL.findall(_strip_comments(h.read_text())))) if h.is_file() else []


def _bodies() -> dict[str, str]:
    """name -> body of its definition in the emulator's C sources."""
    out: dict[str, str] = {}
    for src in sorted(NATIVE.rglob("*.c")):
        text = src.read_text()
        for m in re.finditer(r"\b(acl\w*)\s*\([^;{}]*\)\s*\{", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
            out.setdefault(m.group(1), text[m.end():i - 1])
        # definitions a macro writes: an invocation at file level naming the calls it defines
        for m in re.finditer(r"^[A-Z][A-Z0-9_]*\(([^;{}]*)\)\s*$", _strip_comments(text), flags=re.M):
            for name in re.findall(r"\b(acl\w*)\b", m.group(1)):
                out.setdefault(name, "")
    return out


def _shim(name: str) -> str:
    for prof in RUNTIMES.values():
        for s in prof.symbols:
            if s.name != name or not s.wrap:
                continue
            if s.hand_written:
                return "wrapped by hand"
            if s.op.dispatches:
                return "gated, budgeted" if s.op in BUDGETED else "gated"
            return "wrapped"
    return "—"


def _probes() -> dict[str, str]:
    out: dict[str, str] = {}
    for prof in (ASCENDCL, *PROBED_WITH[ASCENDCL.name]):
        launches_only = prof is not ASCENDCL
        for s in prof.symbols:
            if launches_only and s.op is not Op.KERNEL:
                continue
            what = "rt launch counted" if prof is ASCEND_RT else f"counted ({s.op.name.lower().replace('_', ' ')})"
            out[s.name] = what
        for n in prof.namers:
            if n.kind == "operator":
                out[n.name] = f"phase: {classify_name(n.name) or 'none'}"
            else:
                out[n.name] = "kernel name learned (phase by name)"
    return out


def forward_exports() -> set[str]:
    """The AscendCL and aclnn calls libflexnpu_fwd.so exports under their own names."""
    names: set[str] = set()
    for src in FWD_TABLES:
        names |= set(re.findall(r'\{"(acl\w*)",\s*\(void \*\)', _strip_comments(src.read_text())))
    names |= {s.name for s in ASCENDCL.symbols if s.wrap}  # the shim's wrappers, whose real call is forwarded
    for op in gen_aclnn.parse(INCLUDE):
        names |= {op.run, op.gws}
    return names


def _forwarded(r: Row, fwd: set[str]) -> str:
    if r.library == "libnnopbase.so":
        if r.name in FWD_EXECUTOR_CALLS and r.name in fwd:
            return "carried"
        return "local, remembered" if r.name in fwd else "local"
    if r.name in fwd:
        return "carried"
    if r.library in ("libascendcl.so", "libopapi.so") and r.emulator != "emulator extension (not CANN's)":
        return "not carried"
    return "—"


def rows() -> list[Row]:
    decl, bodies, probes, fwd = declared(), _bodies(), _probes(), forward_exports()
    table: dict[str, Row] = {}
    for name, (lib, where) in decl.items():
        r = Row(name, lib, where=where)
        body = bodies.get(name)
        if body is not None:
            if REFUSES in body and len(body) < 400:
                r.emulator = "refused"
            elif TIMING_ONLY.search(body):
                r.emulator = "emulated without numerics"
            else:
                r.emulator = "emulated"
        table[name] = r
    for name in extensions():
        table[name] = Row(name, EXT_LIBRARY, emulator="emulator extension (not CANN's)",
                          where=f"emulator/native/{EXT_HEADER}")
    profiled = [(p.library, s.name) for p in (ASCENDCL, ASCEND_RT) for s in p.symbols]
    profiled += [(p.library, n.name) for p in (ASCENDCL, ACLNN) for n in p.namers]
    for lib, name in profiled:
        table.setdefault(name, Row(name, lib))
    for r in table.values():
        r.shim = _shim(r.name)
        if r.shim == "—" and r.library == "libopapi.so" and r.name.startswith("aclnn") \
                and not r.name.endswith("GetWorkspaceSize") and r.emulator != "absent":
            r.shim = "via aclrtLaunchKernel"
        r.probes = probes.get(r.name, "—")
        r.forwarded = _forwarded(r, fwd)
    return sorted(table.values(), key=lambda r: (r.library, r.name))


_LIB_TITLES = {
    "libascendcl.so": "AscendCL runtime (`libascendcl.so`, headers `acl/`)",
    "libnnopbase.so": "aclnn tensors and executors (`libnnopbase.so`, header `aclnn/aclnn_base.h`)",
    "libopapi.so": "aclnn operators (`libopapi.so`, headers `aclnnop/`)",
    "libruntime.so": "CANN's lower runtime (`libruntime.so`): probed only, not emulated",
}


def render() -> str:
    rs = rows()
    out = ["# Compatibility: the AscendCL and aclnn calls FlexNPU knows", "",
           "Generated by `scripts/gen_compat.py` from the emulator's headers and sources and the",
           "runtime profiles (`flexnpu/runtimes/`); `tests/test_compat_doc.py` fails when this page",
           "is not what they give, or when a built library exports a call it does not list. Do not",
           "edit it by hand: change the sources and run `python scripts/gen_compat.py`.", "", LEGEND]
    counts: dict[str, int] = {}
    for r in rs:
        counts[r.emulator] = counts.get(r.emulator, 0) + 1
    out.append("In all: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + f" ({len(rs)} calls).")
    for lib in [*_LIB_TITLES, *sorted({r.library for r in rs} - set(_LIB_TITLES))]:
        part = [r for r in rs if r.library == lib]
        if not part:
            continue
        out += ["", f"## {_LIB_TITLES.get(lib, lib)}", "",
                "| call | emulator | shim | forwarded | probes | declared in |", "|---|---|---|---|---|---|"]
        out += [f"| `{r.name}` | {r.emulator} | {r.shim} | {r.forwarded} | {r.probes} | "
                f"{r.where and f'`{r.where}`' or '—'} |" for r in part]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/compatibility.md is not current")
    a = ap.parse_args(argv)
    text = render()
    if a.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC.relative_to(REPO)} is not current: run python scripts/gen_compat.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
