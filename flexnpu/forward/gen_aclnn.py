"""Generates the forwarded aclnn operators (fwd_aclnn_gen.h) from the operator headers.

Run by the build (CMakeLists.txt) as `python -m flexnpu.forward.gen_aclnn INCLUDE_DIR OUT`,
or by hand. Every `aclnnXxxGetWorkspaceSize(args..., uint64_t *workspaceSize,
aclOpExecutor **executor)` declared in INCLUDE_DIR/aclnnop/*.h, with its second call
`aclnnXxx(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream
stream)`, gets:

  the client side (FWN_GEN_CLIENT, libflexnpu_fwd.so): both calls exported under their own
      names; the first calls the real one of the local libopapi.so (host only: checks,
      workspace size, messages), then serialises every argument into a FWD_ACLNN_MAKE
      record (fwd_aclnn.c's fwn_put_*); the second is fwd_aclnn.c's fwn_run;
  the executor side (FWN_GEN_EXEC, flexnpu-executor): a caller that decodes the arguments
      from the record in the same order (exec_aclnn.c's exn_get_*) and calls the real first
      call with them.

The argument types are mapped by ARG_KINDS; a type the table does not know fails the build
loudly (an operator is never forwarded with an argument dropped or guessed).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

# C type (whitespace normalised) -> how it travels (fwd_aclnn.h's enum fwn_tag, by kind name)
ARG_KINDS = {
    "const aclTensor *": "tensor",
    "aclTensor *": "tensor",
    "const aclTensorList *": "tensor_list",
    "aclTensorList *": "tensor_list",
    "const aclScalar *": "scalar",
    "aclScalar *": "scalar",
    "const aclScalarList *": "scalar_list",
    "aclScalarList *": "scalar_list",
    "const aclIntArray *": "int_array",
    "aclIntArray *": "int_array",
    "const aclFloatArray *": "float_array",
    "aclFloatArray *": "float_array",
    "const aclBoolArray *": "bool_array",
    "aclBoolArray *": "bool_array",
    "char *": "string",
    "const char *": "string",
    "bool": "int",
    "int8_t": "int",
    "uint8_t": "int",
    "int16_t": "int",
    "uint16_t": "int",
    "int32_t": "int",
    "uint32_t": "int",
    "int64_t": "int",
    "uint64_t": "int",
    "int": "int",
    "aclDataType": "int",
    "aclFormat": "int",
    "double": "double",
    "float": "double",
}

# the C type each kind is decoded as in the executor (cast to the parameter's type by the call)
EXEC_TYPES = {
    "tensor": "aclTensor *", "tensor_list": "aclTensorList *", "scalar": "aclScalar *",
    "scalar_list": "aclScalarList *", "int_array": "aclIntArray *", "float_array": "aclFloatArray *",
    "bool_array": "aclBoolArray *", "string": "char *", "int": "int64_t", "double": "double",
}

RUN_PARAMS = ["void *", "uint64_t", "aclOpExecutor *", "aclrtStream"]
TAIL_PARAMS = ["uint64_t *", "aclOpExecutor **"]


class GenError(Exception):
    pass


@dataclass
class Param:
    ctype: str
    name: str


@dataclass
class Operator:
    header: str   # e.g. aclnnop/aclnn_add.h
    run: str      # aclnnAdd
    params: list[Param]  # of the first call, without workspaceSize and executor

    @property
    def gws(self) -> str:
        return self.run + "GetWorkspaceSize"


def _norm(t: str) -> str:
    t = re.sub(r"\s+", " ", t.strip())
    t = re.sub(r"\s*\*", " *", t).replace("* *", "**")
    return t


def _split_param(p: str, where: str) -> Param:
    p = re.sub(r"\s+", " ", p.strip())
    m = re.match(r"^(.*?[\s*])(\w+)$", p)
    if not m:
        raise GenError(f"{where}: cannot read the parameter {p!r}")
    return Param(_norm(m.group(1)), m.group(2))


def _decls(text: str) -> list[tuple[str, list[str]]]:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    out = []
    for m in re.finditer(r"ACLNN_API\s+aclnnStatus\s+(\w+)\s*\((.*?)\)\s*;", text, re.S):
        params = [x for x in (s.strip() for s in m.group(2).split(",")) if x]
        out.append((m.group(1), params))
    return out


def parse(include_dir: Path) -> list[Operator]:
    """Every operator declared in include_dir/aclnnop/*.h; GenError for anything it cannot carry."""
    funcs: dict[str, tuple[str, list[Param]]] = {}
    for h in sorted((include_dir / "aclnnop").glob("*.h")):
        rel = f"aclnnop/{h.name}"
        for name, params in _decls(h.read_text()):
            funcs[name] = (rel, [_split_param(p, f"{rel}: {name}") for p in params])
    ops = []
    for name in sorted(funcs):
        if not name.endswith("GetWorkspaceSize"):
            continue
        header, params = funcs[name]
        run = name[: -len("GetWorkspaceSize")]
        where = f"{header}: {name}"
        if [p.ctype for p in params[-2:]] != TAIL_PARAMS:
            raise GenError(f"{where}: does not end with (uint64_t *workspaceSize, aclOpExecutor **executor)")
        if run not in funcs:
            raise GenError(f"{where}: no second call {run} is declared")
        rtypes = [t.replace("const aclrtStream", "aclrtStream") for t in (p.ctype for p in funcs[run][1])]
        if rtypes != RUN_PARAMS:
            raise GenError(f"{funcs[run][0]}: {run} is not (void *, uint64_t, aclOpExecutor *, aclrtStream)")
        for p in params[:-2]:
            if p.ctype not in ARG_KINDS:
                raise GenError(f"{where}: parameter {p.name} has type {p.ctype!r}, which the forwarder does not "
                               f"know how to carry (add it to ARG_KINDS in flexnpu/forward/gen_aclnn.py)")
        ops.append(Operator(header, run, params[:-2]))
    runs = {o.run for o in ops}
    for name in funcs:
        if not name.endswith("GetWorkspaceSize") and name not in runs:
            raise GenError(f"{funcs[name][0]}: {name} is neither a first call nor the second call of one")
    if not ops:
        raise GenError(f"no operator found in {include_dir}/aclnnop")
    return ops


def generate(ops: list[Operator]) -> str:
    out = ["/* Generated by flexnpu/forward/gen_aclnn.py from the aclnnop headers: do not edit. */",
           "#ifndef FLEXNPU_FWD_ACLNN_GEN_H_", "#define FLEXNPU_FWD_ACLNN_GEN_H_", ""]
    for h in sorted({o.header for o in ops}):
        out.append(f'#include "{h}"')
    out += ["", f"#define FWN_NUM_OPS {len(ops)}", "",
            "static const struct fwn_op_info fwn_ops[FWN_NUM_OPS] = {"]
    for o in ops:
        out.append(f'    {{"{o.run}", "{o.gws}", {len(o.params)}}},')
    out += ["};", "", "#ifdef FWN_GEN_CLIENT"]
    for i, o in enumerate(ops):
        sig = ", ".join(f"{p.ctype}{p.name}" if p.ctype.endswith("*") else f"{p.ctype} {p.name}" for p in o.params)
        args = ", ".join([p.name for p in o.params] + ["workspaceSize", "executor"])
        out += [
            f"FX_EXPORT aclnnStatus {o.gws}({sig}, uint64_t *workspaceSize, aclOpExecutor **executor)",
            "{",
            f"    static __typeof__({o.gws}) *real;",
            f"    if (!real && !(real = (__typeof__({o.gws}) *)fwn_real(\"{o.gws}\"))) return fwn_missing(\"{o.gws}\");",
            f"    aclnnStatus rc = real({args});",
            "    if (rc != ACLNN_SUCCESS) return fwn_failed(rc);",
            "    struct fwn_enc e;",
            f"    fwn_enc_init(&e, {i});",
        ]
        for p in o.params:
            kind = ARG_KINDS[p.ctype]
            out.append(f'    fwn_put_{kind}(&e, {p.name}, "{p.name}");')
        out += ["    return fwn_make(&e, executor);", "}", "",
                f"FX_EXPORT aclnnStatus {o.run}(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, "
                "aclrtStream stream)",
                "{", f"    return fwn_run({i}, workspace, workspaceSize, executor, stream);", "}", ""]
    out.append("#define FWN_GEN_EXPORTS \\")
    for o in ops:
        out.append(f'    {{"{o.gws}", (void *){o.gws}}}, {{"{o.run}", (void *){o.run}}}, \\')
    out += ["", "#endif /* FWN_GEN_CLIENT */", "", "#ifdef FWN_GEN_EXEC"]
    for i, o in enumerate(ops):
        out += [f"static int exn_call_{i}(struct exn_dec *d, void *fn, uint64_t *ws, aclOpExecutor **ex)", "{"]
        for k, p in enumerate(o.params):
            kind = ARG_KINDS[p.ctype]
            out.append(f"    {EXEC_TYPES[kind]}a{k} = exn_get_{kind}(d);" if EXEC_TYPES[kind].endswith("*")
                       else f"    {EXEC_TYPES[kind]} a{k} = exn_get_{kind}(d);")
        call = ", ".join([f"({p.ctype})a{k}" for k, p in enumerate(o.params)] + ["ws", "ex"])
        out += ["    if (d->bad) return -1;", f"    return ((__typeof__({o.gws}) *)fn)({call});", "}", ""]
    out.append("static int (*const exn_callers[FWN_NUM_OPS])(struct exn_dec *, void *, uint64_t *, aclOpExecutor **) = {")
    out += [f"    exn_call_{i}," for i in range(len(ops))]
    out += ["};", "#endif /* FWN_GEN_EXEC */", "", "#endif", ""]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m flexnpu.forward.gen_aclnn INCLUDE_DIR OUT", file=sys.stderr)
        return 2
    try:
        text = generate(parse(Path(argv[1])))
    except GenError as e:
        print(f"gen_aclnn: {e}", file=sys.stderr)
        return 1
    out = Path(argv[2])
    if not out.exists() or out.read_text() != text:
        out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
