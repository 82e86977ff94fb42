"""The runtime profile and the shim generated from it: the profile agrees with itself, with
the C side (gate.h, the AscendCL header) and with the built shim.

The C checks compile the generator's output with gcc against the emulator's real header,
so a signature typed wrong in the profile fails here, not as a silent ABI mismatch in an
application.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flexnpu import paths
from flexnpu.forward import gen_shim
from flexnpu.runtimes import ASCENDCL, RUNTIMES, Direction, Op, RuntimeProfile, Symbol

REPO = Path(__file__).resolve().parent.parent
FWD_NATIVE = REPO / "flexnpu" / "forward" / "native"
ARG_FIELDS = ("bytes_arg", "kind_arg", "stream_arg", "device_arg", "ptr_arg")
DISPATCHING = {Op.KERNEL, Op.MEMCPY_ASYNC, Op.MEMSET_ASYNC, Op.EVENT_RECORD, Op.STREAM_WAIT, Op.MEMCPY, Op.MEMSET}
# the ops gen_shim writes wrappers for; every other op needs a hand-written one in shim.c
GENERATED_OPS = DISPATCHING | {Op.ALLOC, Op.FREE, Op.SYNC}

PROFILES = list(RUNTIMES.values())


def needs_gcc() -> None:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed for the C checks (apt-get install gcc)", pytrace=False)


def include_dir() -> Path:
    d = paths.acl_include_dir()
    if not (d / "acl" / "acl.h").exists():
        pytest.fail(f"{d}/acl/acl.h is missing; build FlexNPU with `pip install .`", pytrace=False)
    return d


def gate_h_define(name: str) -> int:
    m = re.search(rf"^#define {name}\s+(\d+)", (FWD_NATIVE / "gate.h").read_text(), re.M)
    assert m, f"gate.h defines no {name}"
    return int(m.group(1))


def header_enum(name: str) -> dict[str, int]:
    """The members of a C enum in the emulator's acl_rt.h, by name."""
    text = (include_dir() / "acl" / "acl_rt.h").read_text()
    m = re.search(r"typedef enum " + name + r"\s*\{(.*?)\}\s*" + name + ";", text, re.S)
    assert m, f"acl_rt.h has no enum {name}"
    members = {}
    for entry in m.group(1).split(","):
        entry = re.sub(r"/\*.*?\*/", "", entry).strip()
        if entry:
            k, v = (s.strip() for s in entry.split("="))
            members[k] = int(v, 0)
    return members


def wrapped(p: RuntimeProfile) -> list[Symbol]:
    return [s for s in p.symbols if s.wrap]


def nm_defined(lib: Path) -> set[str]:
    if shutil.which("nm") is None:
        pytest.fail("nm is needed (apt-get install binutils)", pytrace=False)
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


# ---------------------------------------------------------------- the profile itself


@pytest.mark.parametrize("p", PROFILES, ids=lambda p: p.name)
def test_every_arg_field_names_a_parameter(p: RuntimeProfile) -> None:
    for s in p.symbols:
        names = [n for _, n in s.params]
        assert len(set(names)) == len(names), f"{s.name}: duplicate parameter names"
        for f in ARG_FIELDS:
            arg = getattr(s, f)
            if arg is not None:
                assert arg in names, f"{s.name}.{f} = {arg!r} is not one of its parameters {names}"
                assert s.index(arg) == names.index(arg)
    with pytest.raises(KeyError):
        p.symbols[0].index("no_such_parameter")


@pytest.mark.parametrize("p", PROFILES, ids=lambda p: p.name)
def test_symbol_names_are_unique_and_lookups_work(p: RuntimeProfile) -> None:
    names = [s.name for s in p.symbols]
    assert len(set(names)) == len(names)
    for s in p.symbols:
        assert p.symbol(s.name) is s
    with pytest.raises(KeyError):
        p.symbol("aclrtNoSuchFunction")
    assert {s.op for s in p.by_op(*Op)} == {s.op for s in p.symbols}


@pytest.mark.parametrize("p", PROFILES, ids=lambda p: p.name)
def test_arg_fields_fit_each_op(p: RuntimeProfile) -> None:
    """What the shim and the probes read from a call is there for that kind of call."""
    for s in p.symbols:
        if s.op in (Op.MEMCPY, Op.MEMCPY_ASYNC):
            assert s.bytes_arg and s.kind_arg, f"{s.name}: a copy needs bytes_arg and kind_arg"
        elif s.kind_arg:
            pytest.fail(f"{s.name}: only copies have a copy kind")
        if s.op in (Op.MEMSET, Op.MEMSET_ASYNC):
            assert s.bytes_arg, f"{s.name}: a memset needs bytes_arg"
        if s.op is Op.ALLOC:
            assert s.bytes_arg and s.ptr_arg, f"{s.name}: an allocation needs bytes_arg and ptr_arg"
            assert dict((n, t) for t, n in s.params)[s.ptr_arg].endswith("**"), f"{s.name}: ptr_arg is an out-pointer"
        if s.op is Op.FREE:
            assert s.ptr_arg, f"{s.name}: a free needs ptr_arg"
        # a stream parameter is always named as the stream
        stream_params = [n for t, n in s.params if t == "aclrtStream"]
        if stream_params:
            assert s.stream_arg == stream_params[0], f"{s.name}: stream_arg should be {stream_params[0]}"
        if s.op in (Op.DEVICE_SET, Op.DEVICE_RESET, Op.CONTEXT_CREATE):
            assert s.device_arg, f"{s.name}: selects a device, so it needs device_arg"


def test_dispatching_ops() -> None:
    assert {o for o in Op if o.dispatches} == DISPATCHING
    # every dispatching op has a symbol in the AscendCL profile, so no kind of work bypasses the gate
    assert {s.op for s in ASCENDCL.symbols if s.op.dispatches} == DISPATCHING
    for s in ASCENDCL.symbols:
        if s.op.dispatches:
            assert s.wrap and not s.hand_written, f"{s.name} dispatches: it must pass the generated gate"


@pytest.mark.parametrize("p", PROFILES, ids=lambda p: p.name)
def test_ops_without_a_generated_wrapper_are_hand_written(p: RuntimeProfile) -> None:
    for s in wrapped(p):
        if s.op not in GENERATED_OPS:
            assert s.hand_written, f"{s.name} ({s.op.name}) has no generated wrapper and is not hand-written"


def test_directions_cover_every_memcpy_kind_of_the_header() -> None:
    kinds = header_enum("aclrtMemcpyKind")
    assert sorted(kinds.values()) == list(range(8))
    assert set(ASCENDCL.directions) == set(kinds.values())
    by_name = {
        "ACL_MEMCPY_HOST_TO_HOST": Direction.H2H,
        "ACL_MEMCPY_HOST_TO_DEVICE": Direction.H2D,
        "ACL_MEMCPY_DEVICE_TO_HOST": Direction.D2H,
        "ACL_MEMCPY_DEVICE_TO_DEVICE": Direction.D2D,
        "ACL_MEMCPY_DEFAULT": Direction.UNKNOWN,
        "ACL_MEMCPY_HOST_TO_BUF_TO_DEVICE": Direction.H2D,
        "ACL_MEMCPY_INNER_DEVICE_TO_DEVICE": Direction.D2D,
        "ACL_MEMCPY_INTER_DEVICE_TO_DEVICE": Direction.D2D,
    }
    assert set(kinds) == set(by_name)
    for name, value in kinds.items():
        assert ASCENDCL.directions[value] is by_name[name], name


def test_error_codes_are_the_headers() -> None:
    text = (include_dir() / "acl" / "acl_base.h").read_text()

    def define(name: str) -> int:
        m = re.search(rf"^#define {name}\s+(\d+)", text, re.M)
        assert m, name
        return int(m.group(1))

    assert ASCENDCL.errors["invalid_device"] == define("ACL_ERROR_RT_INVALID_DEVICEID") == 107001
    assert ASCENDCL.errors["out_of_memory"] == define("ACL_ERROR_RT_MEMORY_ALLOCATION") == 207001
    assert ASCENDCL.success == "ACL_SUCCESS" and define("ACL_SUCCESS") == 0


@pytest.mark.parametrize("enum", [Op, Direction], ids=lambda e: e.__name__)
def test_enum_values_are_contiguous(enum) -> None:
    assert [m.value for m in enum] == list(range(len(enum)))


def test_gate_h_counts_match_the_profile_enums() -> None:
    assert gate_h_define("FX_NUM_OPS") == len(Op)
    assert gate_h_define("FX_NUM_DIRS") == len(Direction)
    assert gate_h_define("FX_PRIO_LEVELS") <= 8  # pending_levels packs 8 bits per level into 64


def test_gate_library_layout_matches_the_profile_enums() -> None:
    """The built libflexnpu_gate.so was compiled with the same counts."""
    lib_path = paths.native_lib_dir() / "libflexnpu_gate.so"
    if not lib_path.exists():
        pytest.fail(f"{lib_path} is missing; build FlexNPU with `pip install .`", pytrace=False)
    lib = ctypes.CDLL(str(lib_path))
    lib.fx_layout.restype = ctypes.c_char_p
    layout = json.loads(lib.fx_layout())
    assert layout["num_ops"] == len(Op)
    assert layout["num_dirs"] == len(Direction)
    assert layout["page"]["fields"]["ops"][1] == 8 * len(Op)  # a client's own page: its counters
    assert layout["page"]["fields"]["bytes"][1] == 8 * len(Direction)


# ---------------------------------------------------------------- the generator's output


@pytest.fixture(scope="module")
def generated() -> str:
    return gen_shim.generate(ASCENDCL)


def _wrapper_bodies(text: str) -> dict[str, str]:
    """name -> body of every wrapper defined (not just declared) in the generated text."""
    return {m.group(1): m.group(2) for m in
            re.finditer(r"^FX_EXPORT \S+ (\w+)\([^;{]*\)\n\{\n(.*?)^\}", text, re.M | re.S)}


def test_generated_wrapper_for_every_non_hand_written_symbol(generated: str) -> None:
    bodies = _wrapper_bodies(generated)
    want = {s.name for s in wrapped(ASCENDCL) if not s.hand_written}
    assert set(bodies) == want
    for s in ASCENDCL.symbols:
        if not s.wrap:
            assert s.name not in generated, f"{s.name} is observed only, yet the shim mentions it"


def test_generated_table_has_every_wrapped_symbol(generated: str) -> None:
    table = re.search(r"fx_wrappers\[\] = \{\n(.*?)\n\};", generated, re.S)
    assert table
    rows = re.findall(r'\{"(\w+)", \(void \*\)(\w+), \(void \*_Atomic \*\)&real_(\w+)\}', table.group(1))
    assert [r[0] for r in rows] == [s.name for s in wrapped(ASCENDCL)]
    assert all(a == b == c for a, b, c in rows)
    assert re.search(rf"^#define FX_NUM_WRAPPERS {len(rows)}$", generated, re.M)
    # every wrapped symbol has its real-function pointer and its prototype
    for s in wrapped(ASCENDCL):
        assert f"(*_Atomic real_{s.name})(" in generated
        assert re.search(rf"^FX_EXPORT {re.escape(s.returns)} {s.name}\(.*\);$", generated, re.M)


def test_generated_bodies_follow_each_op(generated: str) -> None:
    bodies = _wrapper_bodies(generated)
    for s in wrapped(ASCENDCL):
        if s.hand_written:
            continue
        # nested calls (inside another wrapper) pass straight on; what follows is the hooked path
        body = bodies[s.name].split("fx_depth_enter()", 1)[1]
        body = body.split("\n", 1)[1]
        real = body.index(f"real_{s.name}(")
        if s.op.dispatches:
            gate = body.find("fx_gate();") if "fx_gate();" in body else body.find("fx_gate_at(fx_a);")
            assert 0 <= gate < real, f"{s.name}: the gate must come before the real call"
            if s.op in gen_shim.BUDGETED and s.stream_arg:  # the in-flight budget: waited on before, counted after
                assert body.index(f"fx_budget(fx_a, (void *){s.stream_arg})") < real
                assert body.index(f"fx_inflight_dispatched(fx_a, fx_b, (void *){s.stream_arg})") > real
            else:
                assert "fx_budget" not in body, f"{s.name} is not budgeted"
            assert f"fx_count(FX_OP_{s.op.name}, " in body
            if s.kind_arg:
                assert f"fx_direction((int){s.kind_arg})" in body
            if s.bytes_arg:
                assert f"(uint64_t){s.bytes_arg}" in body
        else:
            assert "fx_gate" not in body, f"{s.name} does not dispatch: it must not wait at the gate"
        if s.op is Op.ALLOC:
            assert body.index(f"fx_alloc_reserve((uint64_t){s.bytes_arg}, ") < real
            assert f"fx_alloc_done(*{s.ptr_arg}, " in body
            assert body.index(f"fx_alloc_cancel((uint64_t){s.bytes_arg}, ") > real
        if s.op is Op.FREE:
            assert f"fx_free_done({s.ptr_arg})" in body
        if s.op is Op.SYNC:
            kind = "FX_SYNC_STREAM" if s.stream_arg else "FX_SYNC_OTHER" if any(
                n == "event" for _, n in s.params) else "FX_SYNC_DEVICE"
            assert body.index(f"fx_sync_done({kind}, ") > real  # what a sync completes frees the budget
        assert body.rstrip().endswith("return rc;")


def test_hand_written_wrappers_are_in_shim_c() -> None:
    shim = (FWD_NATIVE / "shim" / "shim.c").read_text()
    for s in wrapped(ASCENDCL):
        defined = re.search(rf"^FX_EXPORT {re.escape(s.returns)} {s.name}\(", shim, re.M)
        if s.hand_written:
            assert defined, f"{s.name} is marked hand-written but shim.c does not define it"
        else:
            assert not defined, f"{s.name} is generated; shim.c must not define it too"


def test_generate_refuses_an_op_it_cannot_wrap() -> None:
    bad = Symbol("aclrtGetDevice", Op.DEVICE_GET, "aclError", (("int32_t *", "deviceId"),))
    profile = RuntimeProfile("bad", "libascendcl.so", ("acl/acl.h",), "ACL_SUCCESS", (bad,))
    with pytest.raises(ValueError, match="hand-written"):
        gen_shim.generate(profile)


def test_gen_shim_command(tmp_path: Path) -> None:
    """The build's entry point: usage errors exit 2; an unchanged output is not rewritten
    (so the build does not recompile the shim for nothing)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "flexnpu.forward.gen_shim"]
    bad = subprocess.run(cmd + ["cuda-nonexistent", str(tmp_path / "x.h")], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=60)
    assert bad.returncode == 2 and "usage:" in bad.stderr and not (tmp_path / "x.h").exists()
    assert subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60).returncode == 2
    out = tmp_path / "shim_gen.h"
    r = subprocess.run(cmd + ["ascendcl", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == gen_shim.generate(ASCENDCL)
    os.utime(out, ns=(1_000_000_000, 1_000_000_000))
    r = subprocess.run(cmd + ["ascendcl", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=60)
    assert r.returncode == 0 and out.stat().st_mtime_ns == 1_000_000_000


# ---------------------------------------------------------------- compiled against the header


def _gcc(args: list, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["gcc", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_generated_signatures_match_the_header(generated: str, tmp_path: Path) -> None:
    """Every generated prototype and real-function pointer has the header's exact type:
    a mismatch is a 'conflicting types' or 'incompatible pointer' error."""
    needs_gcc()
    (tmp_path / "shim_gen.h").write_text(generated)
    checks = "\n".join(
        f"    {{ __typeof__(&{s.name}) p = real_{s.name}; (void)p; real_{s.name} = &{s.name}; }}"
        for s in wrapped(ASCENDCL))
    prototypes = "\n".join(line for line in generated.splitlines()
                           if line.startswith("FX_EXPORT ") and line.endswith(");"))
    assert prototypes.count("\n") + 1 == len(wrapped(ASCENDCL))
    (tmp_path / "check.c").write_text(
        '#include "shim_gen.h"\n'
        "#define FX_EXPORT\n"
        f"{prototypes}\n"
        "void check(void);\n"
        "void check(void)\n{\n"
        f"{checks}\n"
        "}\n"
        f"_Static_assert(FX_OP_COUNT == {len(Op)}, \"FX_OP_COUNT\");\n")
    r = _gcc(["-std=c11", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-I", include_dir(), "check.c"], tmp_path)
    assert r.returncode == 0, r.stderr


def test_generated_header_compiles_into_the_shim(generated: str, tmp_path: Path) -> None:
    """shim.c with this generator's output, as the build compiles it, warning-free."""
    needs_gcc()
    (tmp_path / "shim_gen.h").write_text(generated)
    r = _gcc(["-std=c11", "-fsyntax-only", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror",
              "-I", tmp_path, "-I", FWD_NATIVE, "-I", FWD_NATIVE / "shim", "-I", include_dir(), FWD_NATIVE / "shim" / "shim.c"], tmp_path)
    assert r.returncode == 0, r.stderr


def test_generated_direction_map_runs_as_the_profile_says(generated: str, tmp_path: Path) -> None:
    needs_gcc()
    (tmp_path / "shim_gen.h").write_text(generated)
    (tmp_path / "dirs.c").write_text(
        '#include <stdio.h>\n#include "shim_gen.h"\n'
        "int main(void) { for (int k = -1; k < 10; k++) printf(\"%d %d\\n\", k, fx_direction(k)); return 0; }\n")
    r = _gcc(["-std=c11", "-Wall", "-I", include_dir(), "dirs.c", "-o", "dirs"], tmp_path)
    assert r.returncode == 0, r.stderr
    out = subprocess.run([str(tmp_path / "dirs")], capture_output=True, text=True, check=True, timeout=30).stdout
    got = dict(tuple(map(int, line.split())) for line in out.splitlines())
    for k in range(-1, 10):
        assert got[k] == ASCENDCL.directions.get(k, Direction.UNKNOWN).value, k


# ---------------------------------------------------------------- the built libraries


def test_built_shim_exports_exactly_the_wrapped_symbols_and_dlsym() -> None:
    lib = paths.native_lib_dir() / "libflexnpu_shim.so"
    if not lib.exists():
        pytest.fail(f"{lib} is missing; build FlexNPU with `pip install .`", pytrace=False)
    assert nm_defined(lib) == {s.name for s in wrapped(ASCENDCL)} | {"dlsym"}


def test_every_profile_symbol_is_exported_by_the_runtime() -> None:
    """The emulated libascendcl.so has every function the profile names."""
    lib = paths.emulator_library()
    if not lib.exists():
        pytest.fail(f"{lib} is missing; build FlexNPU with `pip install .`", pytrace=False)
    exported = nm_defined(lib)
    missing = [s.name for s in ASCENDCL.symbols if s.name not in exported]
    assert not missing, f"{lib.name} does not export {missing}"
