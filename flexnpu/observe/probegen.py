"""Builds the observer's BPF program from the runtime profiles.

The program is assembled, never edited in place: a generated prelude (the Op, Direction and
symbol numbers of the profiles), the shared header probes/observe.h, the hand-written
maps and helpers of probes/observe.bpf.c, and one generated probe function per profile
symbol (and a return probe where the accounting needs the return value or a duration).
Every argument a probe reads is found with Symbol.index() from the profile, so a change
to the profile changes the probes. Settings (trace on, one process only, map sizes) travel
as -D flags; `--ebpf` prints them as #defines ahead of the text, which is then exactly
what bcc compiles.

    python -m flexnpu.observe.probegen [--trace] [--pid PID]   # print the program
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from flexnpu import paths
from flexnpu.observe.phase import classify_name
from flexnpu.runtimes import ASCENDCL, PROBED_WITH, Direction, Namer, Op, RuntimeProfile, Symbol

# x86-64 and arm64 pass the first six integer arguments in registers bcc names PARM1-6
_MAX_REG_ARGS = 6
# numeric values of the profiles' success codes (the BPF program cannot include their headers)
_SUCCESS = {"ACL_SUCCESS": 0, "RT_ERROR_NONE": 0, "CUDA_SUCCESS": 0}
FX_DIR_NONE = 255  # a call that copies nothing


@dataclass(frozen=True)
class ProbedLibrary:
    """A runtime library the program probes. launches_only: a probe-only library beside the
    primary runtime: its KERNEL calls are counted apart (rt_launches), its namers (calls
    that name the work) are probed, nothing else.

    A profile's calls may be probed in a library other than the profile's own (`library`):
    the forward build of the shim (libflexnpu_fwd.so) exports the function behind each
    wrapped symbol as `prefix + name` (fxf_aclrtLaunchKernel, same signature), and the calls
    it does not wrap under their own names. `tag` keeps the generated C names apart."""

    profile: RuntimeProfile
    launches_only: bool = False
    library: str | None = None
    prefix: str = ""
    tag: str = ""

    @property
    def soname(self) -> str:
        return self.library or self.profile.library

    def symbol_of(self, sym: Symbol | Namer) -> str:
        """The name the library exports for a profile symbol or namer."""
        return self.prefix + sym.name if self.prefix and getattr(sym, "wrap", False) else sym.name


# The forward build of the shim (flexnpu run --forward): its AscendCL calls never reach
# libascendcl.so in the client's process, so they are probed in this library, in the
# client; the device's executor, which makes the runtime calls, is never counted.
FORWARD_SONAME = paths.forward_shim_library().name
FORWARD_PREFIX = "fxf_"  # gen_shim.py's FX_FORWARD block: fxf_<name> for every wrapped symbol

# The primary runtime first: its success code is the one the return probes compare with.
DEFAULT_LIBRARIES = (ProbedLibrary(ASCENDCL),
                     *(ProbedLibrary(p, launches_only=True) for p in PROBED_WITH[ASCENDCL.name]),
                     ProbedLibrary(ASCENDCL, library=FORWARD_SONAME, prefix=FORWARD_PREFIX, tag="fwd_"),
                     # operators the forward build exports under their own names (aclnn*)
                     *(ProbedLibrary(p, launches_only=True, library=FORWARD_SONAME, tag="fwd_")
                       for p in PROBED_WITH[ASCENDCL.name] if p.namers))
# every library file a process may map that the program probes, each once
SONAMES = tuple(dict.fromkeys(lib.soname for lib in DEFAULT_LIBRARIES))


@dataclass(frozen=True)
class Probe:
    """Where one generated function attaches."""

    library: str  # soname of the library that holds the symbol
    symbol: str
    entry_fn: str
    return_fn: str | None  # attached as a uretprobe, before the entry probe
    required: bool  # a missing symbol is an error (primary runtime) or skipped (lower library)


@dataclass(frozen=True)
class ProbeConfig:
    trace: bool = False  # ring buffer of per-call events
    tgid: int = 0  # count only this process; 0: every process
    max_keys: int | None = None
    max_allocs: int | None = None
    ringbuf_pages: int | None = None

    def cflags(self) -> list[str]:
        flags = [f"-DFX_TRACE={int(self.trace)}", f"-DFX_TGID={int(self.tgid)}"]
        for name, v in (("FX_MAX_KEYS", self.max_keys), ("FX_MAX_ALLOCS", self.max_allocs),
                        ("FX_RINGBUF_PAGES", self.ringbuf_pages)):
            if v is not None:
                flags.append(f"-D{name}={int(v)}")
        return flags


@dataclass
class ProbeProgram:
    text: str  # what bcc compiles, with cflags
    cflags: list[str]
    probes: list[Probe]
    symbols: list[str]  # FX_SYM_* index -> symbol name; the last is "iteration"
    libraries: tuple[ProbedLibrary, ...] = field(default=())

    def final(self) -> str:
        """The program as bcc sees it: the -D flags as #defines, then the text."""
        head = ["/* bcc cflags: " + " ".join(self.cflags) + " */"]
        for f in self.cflags:
            name, _, value = f[2:].partition("=")
            head.append(f"#define {name} {value or 1}")
        return "\n".join(head) + "\n" + self.text


def probes_dir() -> Path:
    """probes/ of a source checkout, else the copy installed with the native parts."""
    checkout = Path(__file__).resolve().parents[2] / "probes"
    if (checkout / "observe.bpf.c").exists():
        return checkout
    return paths.native_dir() / "share" / "probes"


@cache
def _source(name: str) -> str:
    path = probes_dir() / name
    try:
        return path.read_text()
    except OSError as e:
        raise FileNotFoundError(f"BPF source {path} is missing ({e.strerror}); reinstall FlexNPU "
                                "(pip install .)") from None


def _cname(s: str) -> str:
    return re.sub(r"\W", "_", s)


def _arg(sym: Symbol | Namer, name: str | None, cast: str) -> str:
    i = sym.index(name)
    if i is None:
        raise ValueError(f"{sym.name}: no argument given")
    if i >= _MAX_REG_ARGS:
        raise ValueError(f"{sym.name}: argument {name} is #{i + 1}; probes read the first {_MAX_REG_ARGS}")
    return f"({cast})PT_REGS_PARM{i + 1}(ctx)"


def _params(sym: Symbol | Namer) -> str:
    return ", ".join(t + ("" if t.endswith("*") else " ") + n for t, n in sym.params) or "void"


def _direction_fn(p: RuntimeProfile) -> list[str]:
    """The profile's copy-kind -> Direction table, as a C switch."""
    out = [f"/* copy kind -> Direction, from the '{p.name}' profile's directions */",
           f"static __always_inline u32 fx_direction_{_cname(p.name)}(int kind)", "{", "    switch (kind) {"]
    for kind, d in sorted(p.directions.items()):
        out.append(f"    case {kind}: return FX_DIR_{d.name};")
    out += ["    default: return FX_DIR_UNKNOWN;", "    }", "}", ""]
    return out


def _probe(lib: ProbedLibrary, sym: Symbol, sid: str) -> tuple[list[str], bool]:
    """C of one symbol's probe functions, and whether it has a return probe."""
    p = lib.profile
    name = lib.tag + _cname(sym.name)
    enter = [f"int fx_enter_{name}(struct pt_regs *ctx)", "{"]
    ret: list[str] = []
    op = f"FX_OP_{sym.op.name}"
    if lib.launches_only:
        if sym.op is not Op.KERNEL:
            raise ValueError(f"{sym.name}: only KERNEL symbols are probed in {p.library}")
        enter.append(f"    return fx_dispatch({sid}, {op}, 0, FX_DIR_NONE, 1, 0);")
    elif sym.op.dispatches:
        nbytes = _arg(sym, sym.bytes_arg, "u64") if sym.bytes_arg else "0"
        direction = (f"fx_direction_{_cname(p.name)}({_arg(sym, sym.kind_arg, 'int')})"
                     if sym.kind_arg else "FX_DIR_NONE")
        func = _arg(sym, sym.func_arg, "u64") if sym.func_arg else "0"
        enter.append(f"    return fx_dispatch({sid}, {op}, {nbytes}, {direction}, 0, {func});")
    elif sym.op is Op.ALLOC:
        enter.append(f"    return fx_alloc_enter({sid}, {_arg(sym, sym.ptr_arg, 'u64')}, "
                     f"{_arg(sym, sym.bytes_arg, 'u64')});")
        ret = ["    return fx_alloc_return(ctx);"]
    elif sym.op is Op.FREE:
        enter.append(f"    return fx_free({sid}, {_arg(sym, sym.ptr_arg, 'u64')});")
    elif sym.op is Op.SYNC:
        enter.append(f"    return fx_sync_enter({sid});")
        ret = ["    return fx_sync_return(ctx);"]
    elif sym.op is Op.DEVICE_SET:
        enter.append(f"    return fx_device_set_enter({sid}, {_arg(sym, sym.device_arg, 's32')});")
        ret = ["    return fx_device_set_return(ctx);"]
    elif sym.op is Op.DEVICE_RESET:
        enter.append(f"    return fx_device_reset({sid}, {_arg(sym, sym.device_arg, 's32')});")
    else:
        enter.append(f"    return fx_count({sid}, {op});")
    out = [f"/* {sym.returns} {lib.symbol_of(sym)}({_params(sym)}) in {lib.soname} */",
           *enter, "}"]
    if ret:
        out += [f"int fx_return_{name}(struct pt_regs *ctx)", "{", *ret, "}"]
    return out + [""], bool(ret)


_CLASS = {"prefill": "FX_CLS_PREFILL", "decode": "FX_CLS_DECODE", "either": "FX_CLS_EITHER"}


def _namer_probe(lib: ProbedLibrary, n: Namer, sid: str) -> tuple[list[str], bool]:
    """C of a namer's probe functions, and whether it has a return probe."""
    name = lib.tag + _cname(n.name)
    head = [f"/* {n.returns} {lib.symbol_of(n)}({_params(n)}) in {lib.soname} */",
            f"int fx_enter_{name}(struct pt_regs *ctx)", "{"]
    if n.kind == "kernel_handle":
        return head + [f"    return fx_namer_enter({sid}, {_arg(n, n.name_arg, 'u64')}, "
                       f"{_arg(n, n.handle_arg, 'u64')});", "}",
                       f"int fx_return_{name}(struct pt_regs *ctx)", "{",
                       "    return fx_namer_return(ctx);", "}", ""], True
    if n.kind == "operator":
        cls = classify_name(n.name)
        if cls is None:
            raise ValueError(f"{n.name}: the name table (flexnpu/observe/phase.py) gives it no class")
        return head + [f"    return fx_operator({sid}, {_CLASS[cls]});", "}", ""], False
    raise ValueError(f"{n.name}: unknown namer kind {n.kind!r}")


def build(config: ProbeConfig = ProbeConfig(),
          libraries: tuple[ProbedLibrary, ...] = DEFAULT_LIBRARIES) -> ProbeProgram:
    """The whole program for these libraries and settings."""
    primary = libraries[0].profile
    if primary.success not in _SUCCESS:
        raise ValueError(f"unknown success code {primary.success} of the '{primary.name}' profile")
    symbols: list[str] = []
    pre = [f"/* FlexNPU observer BPF program, generated by flexnpu/observe/probegen.py from the runtime "
           f"profiles {', '.join(repr(l.profile.name) for l in libraries)}. */",
           "#include <uapi/linux/ptrace.h>", "",
           "/* from flexnpu/runtimes/base.py */",
           f"#define FX_NUM_OPS {len(Op)}", f"#define FX_NUM_DIRS {len(Direction)}",
           f"#define FX_DIR_NONE {FX_DIR_NONE}", f"#define FX_SUCCESS {_SUCCESS[primary.success]}"]
    pre += [f"#define FX_OP_{o.name} {o.value}" for o in Op]
    pre += [f"#define FX_DIR_{d.name} {d.value}" for d in Direction]
    pre.append("/* symbols, as numbered in trace events */")
    gen: list[str] = ["", "/* ---- generated from the runtime profiles: one probe per symbol ---- */", ""]
    probes: list[Probe] = []
    directions: set[str] = set()
    for lib in libraries:
        if not lib.launches_only and lib.profile.name not in directions:
            directions.add(lib.profile.name)
            gen += _direction_fn(lib.profile)
        for sym in lib.profile.symbols:
            if lib.launches_only and sym.op is not Op.KERNEL:
                continue
            name = lib.tag + _cname(sym.name)
            sid = f"FX_SYM_{name}"
            pre.append(f"#define {sid} {len(symbols)}")
            symbols.append(sym.name)  # a trace names the call, wherever it was probed
            code, has_ret = _probe(lib, sym, sid)
            gen += code
            probes.append(Probe(lib.soname, lib.symbol_of(sym), f"fx_enter_{name}",
                                f"fx_return_{name}" if has_ret else None, required=not lib.launches_only))
        for n in lib.profile.namers:
            # never required: older runtimes lack aclrtBinaryGetFunction, a libopapi.so
            # need not export every operator version
            name = lib.tag + _cname(n.name)
            sid = f"FX_SYM_{name}"
            pre.append(f"#define {sid} {len(symbols)}")
            symbols.append(n.name)
            code, has_ret = _namer_probe(lib, n, sid)
            gen += code
            probes.append(Probe(lib.soname, lib.symbol_of(n), f"fx_enter_{name}",
                                f"fx_return_{name}" if has_ret else None, required=False))
    pre.append(f"#define FX_SYM_ITERATION {len(symbols)}")
    symbols.append("iteration")
    text = "\n".join([*pre, "", _source("observe.h"), _source("observe.bpf.c"), *gen])
    return ProbeProgram(text=text, cflags=config.cflags(), probes=probes, symbols=symbols,
                        libraries=libraries)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Print the observer's BPF program.")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--pid", type=int, default=0)
    a = ap.parse_args(argv)
    print(build(ProbeConfig(trace=a.trace, tgid=a.pid)).final())
    return 0


if __name__ == "__main__":
    sys.exit(main())
