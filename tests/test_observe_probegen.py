"""The BPF program follows from the runtime profile (no root or bcc needed): one probe per
symbol, arguments read at the positions Symbol.index() gives, the copy-kind switch taken
from the profile's directions, settings as -D flags."""

from __future__ import annotations

import dataclasses
import re

import pytest

from flexnpu.runtimes import ACLNN, ASCEND_RT
from flexnpu.observe.probegen import DEFAULT_LIBRARIES, FORWARD_SONAME, ProbeConfig, ProbedLibrary, build
from flexnpu.runtimes import ASCENDCL, Direction, Op


def _body(text: str, fn: str) -> str:
    m = re.search(rf"int {fn}\(struct pt_regs \*ctx\)\n\{{\n(.*?)\n\}}", text, re.S)
    assert m, fn
    return m.group(1)


def test_one_probe_per_symbol_with_returns_where_needed() -> None:
    prog = build()
    probes = {p.symbol: p for p in prog.probes if p.library != FORWARD_SONAME}
    namers = {n.name for prof in (ASCENDCL, ASCEND_RT, ACLNN) for n in prof.namers}
    assert set(probes) == {s.name for s in ASCENDCL.symbols} | {s.name for s in ASCEND_RT.symbols} | namers
    for s in ASCENDCL.symbols:
        needs_return = s.op in (Op.SYNC, Op.ALLOC, Op.DEVICE_SET)
        assert (probes[s.name].return_fn is not None) == needs_return, s.name
        assert probes[s.name].library == "libascendcl.so" and probes[s.name].required
    for s in ASCEND_RT.symbols:
        assert probes[s.name].library == "libruntime.so" and not probes[s.name].required
    assert prog.symbols[-1] == "iteration" and len(prog.symbols) == len(prog.probes) + 1


def test_arguments_come_from_the_profile() -> None:
    text = build().text
    s = ASCENDCL.symbol("aclrtMemcpyAsync")
    body = _body(text, "fx_enter_aclrtMemcpyAsync")
    assert f"(u64)PT_REGS_PARM{s.index('count') + 1}(ctx)" in body
    assert f"fx_direction_ascendcl((int)PT_REGS_PARM{s.index('kind') + 1}(ctx))" in body
    m = ASCENDCL.symbol("aclrtMalloc")
    assert _body(text, "fx_enter_aclrtMalloc") == (
        f"    return fx_alloc_enter(FX_SYM_aclrtMalloc, (u64)PT_REGS_PARM{m.index('devPtr') + 1}(ctx), "
        f"(u64)PT_REGS_PARM{m.index('size') + 1}(ctx));")
    assert "PT_REGS_PARM1" in _body(text, "fx_enter_aclrtSetDevice")


def test_a_changed_profile_changes_the_probes() -> None:
    """Swap aclrtMemcpyAsync's count and destMax: the probe must read the other register."""
    s = ASCENDCL.symbol("aclrtMemcpyAsync")
    params = list(s.params)
    params[1], params[3] = params[3], params[1]
    swapped = dataclasses.replace(s, params=tuple(params))
    profile = dataclasses.replace(ASCENDCL, symbols=tuple(swapped if x is s else x for x in ASCENDCL.symbols),
                                  directions={1: Direction.D2H})
    text = build(libraries=(ProbedLibrary(profile),)).text
    body = _body(text, "fx_enter_aclrtMemcpyAsync")
    assert "(u64)PT_REGS_PARM2(ctx)" in body and "PT_REGS_PARM4" not in body
    assert "case 1: return FX_DIR_D2H;" in text and "case 2:" not in text


def test_direction_switch_is_the_profiles() -> None:
    text = build().text
    for kind, d in ASCENDCL.directions.items():
        assert f"case {kind}: return FX_DIR_{d.name};" in text
    for o in Op:
        assert f"#define FX_OP_{o.name} {o.value}" in text
    assert f"#define FX_NUM_OPS {len(Op)}" in text


def test_settings_are_d_flags_and_printed_as_defines() -> None:
    cfg = ProbeConfig(trace=True, tgid=1234, max_keys=64)
    prog = build(cfg)
    assert "-DFX_TRACE=1" in prog.cflags and "-DFX_TGID=1234" in prog.cflags
    assert "-DFX_MAX_KEYS=64" in prog.cflags
    final = prog.final()
    assert "#define FX_TGID 1234" in final and "#define FX_MAX_KEYS 64" in final
    assert final.endswith(prog.text)
    assert "#if FX_TGID" in prog.text  # the text uses the flag; nothing edits it


def test_an_argument_past_the_registers_is_refused() -> None:
    s = ASCEND_RT.symbol("rtKernelLaunchWithHandle")  # its kernelInfo is the 7th argument
    bad = dataclasses.replace(s, op=Op.MEMCPY_ASYNC, bytes_arg="kernelInfo")
    profile = dataclasses.replace(ASCEND_RT, symbols=(bad,))
    with pytest.raises(ValueError, match="#7"):
        build(libraries=(DEFAULT_LIBRARIES[0], ProbedLibrary(profile)))


def test_namers_are_probed_and_never_required() -> None:
    """aclrtBinaryGetFunction: name and out-handle on entry, the handle on return; aclnn
    operators: a constant class from the name table, no argument read."""
    prog = build()
    by = {p.symbol: p for p in prog.probes if p.library != FORWARD_SONAME}
    gf = by["aclrtBinaryGetFunction"]
    assert gf.library == "libascendcl.so" and gf.return_fn and not gf.required
    assert "fx_namer_enter(FX_SYM_aclrtBinaryGetFunction, (u64)PT_REGS_PARM2(ctx), (u64)PT_REGS_PARM3(ctx))" \
        in prog.text
    assert "fx_dispatch(FX_SYM_aclrtLaunchKernel, FX_OP_KERNEL, 0, FX_DIR_NONE, 0, (u64)PT_REGS_PARM1(ctx))" \
        in prog.text
    assert by["aclnnPromptFlashAttentionV3"].library == "libopapi.so"
    assert "fx_operator(FX_SYM_aclnnPromptFlashAttentionV3, FX_CLS_PREFILL)" in prog.text
    assert "fx_operator(FX_SYM_aclnnIncreFlashAttentionV4, FX_CLS_DECODE)" in prog.text
    assert "fx_operator(FX_SYM_aclnnFusedInferAttentionScoreV2, FX_CLS_EITHER)" in prog.text
    assert not any(p.required for p in prog.probes if p.library == "libopapi.so")


def test_module_prints_the_program(capsys) -> None:
    from flexnpu.observe import probegen

    assert probegen.main(["--pid", "9"]) == 0
    assert "#define FX_TGID 9" in capsys.readouterr().out


def test_forward_probes_follow_the_profile_and_the_forward_build() -> None:
    """Forwarded execution: every profile symbol the shim wraps is probed as fxf_<name> in
    libflexnpu_fwd.so with the same accounting and argument positions as in libascendcl.so;
    namers under their own names, never required; the names are the ones the forward build's
    generated prototypes declare (gen_shim's FX_FORWARD block)."""
    from flexnpu.forward.gen_shim import generate

    prog = build()
    fwd = {p.symbol: p for p in prog.probes if p.library == FORWARD_SONAME}
    wrapped = [s for s in ASCENDCL.symbols if s.wrap]
    assert {f"fxf_{s.name}" for s in wrapped} <= set(fwd)
    declared = set(re.findall(r"\bfxf_(\w+)\(", generate(ASCENDCL)))
    assert declared == {s.name for s in wrapped}
    for s in wrapped:
        p = fwd[f"fxf_{s.name}"]
        assert p.required and p.entry_fn == f"fx_enter_fwd_{s.name}"
        # the same body as the runtime's probe, under the forward symbol's number
        same = re.sub(rf"\bFX_SYM_{s.name}\b", f"FX_SYM_fwd_{s.name}", _body(prog.text, f"fx_enter_{s.name}"))
        assert _body(prog.text, f"fx_enter_fwd_{s.name}") == same, s.name
        assert (p.return_fn is not None) == (s.op in (Op.SYNC, Op.ALLOC, Op.DEVICE_SET)), s.name
    # namers: aclrtBinaryGetFunction and the aclnn operators, exported under their own names
    for n in (*ASCENDCL.namers, *ACLNN.namers):
        assert n.name in fwd and not fwd[n.name].required, n.name
    # a trace names the call, not the forward symbol
    i = prog.symbols.index("aclrtLaunchKernel")
    assert prog.symbols.count("aclrtLaunchKernel") == 2 and f"#define FX_SYM_aclrtLaunchKernel {i}" in prog.text
    # the one copy-kind switch serves both libraries
    assert prog.text.count("fx_direction_ascendcl(int kind)") == 1


def test_forward_library_exports_what_is_probed() -> None:
    """The built libflexnpu_fwd.so defines every required forward probe's symbol."""
    import shutil
    import subprocess

    from flexnpu import paths

    lib = paths.forward_shim_library()
    assert lib.exists(), f"{lib} is missing: run scripts/setup.sh"
    assert shutil.which("nm"), "nm (binutils) is needed"
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.strip()}
    needed = {p.symbol for p in build().probes if p.library == FORWARD_SONAME and p.required}
    assert needed and needed <= exported, needed - exported
    assert "aclrtBinaryGetFunction" in exported
