#!/usr/bin/env bash
# The FlexNPU demo on the emulated Ascend device: set up the machine, start a two-device
# emulator, build an ordinary AscendCL program against the emulated libascendcl.so, run it
# on both devices at once, run the Python (ctypes) sample, and show what the device server
# saw. The emulator is always stopped on exit.
#
# Usage: sudo bash scripts/demo.sh
# FLEXNPU_RUNTIME_DIR is honoured when set; otherwise a temporary one is used.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh

say() { echo "demo: $*"; }
flexnpu=.venv/bin/flexnpu

own_rdir=0
if [[ -z ${FLEXNPU_RUNTIME_DIR:-} ]]; then
    FLEXNPU_RUNTIME_DIR=$(mktemp -d -t flexnpu-demo.XXXXXX)
    own_rdir=1
fi
export FLEXNPU_RUNTIME_DIR
work=$(mktemp -d -t flexnpu-demo-build.XXXXXX)
started=0

cleanup() {
    local rc=$?
    ((rc == 0)) || say "failed (exit $rc)"
    # Stop only an emulator this script started, never one the caller already had running.
    ((started)) && { $flexnpu emu stop >/dev/null || rc=1; }
    rm -rf "$work"
    if ((own_rdir)); then
        if ((rc == 0)); then
            rm -rf "$FLEXNPU_RUNTIME_DIR"
        else
            say "kept $FLEXNPU_RUNTIME_DIR (emulator log: emu.log) for inspection"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "runtime dir $FLEXNPU_RUNTIME_DIR"
$flexnpu emu start --devices 2
started=1

# The same exports a user gets with: eval "$(flexnpu emu env)"
eval "$($flexnpu emu env)"
# -P: from the repo root, plain `python -c` would import the source tree, not the install.
libdir=$(.venv/bin/python -P -c 'from flexnpu import paths; print(paths.native_lib_dir())')

say "building flexnpu/samples/sample_acl.c against $FLEXNPU_ACL_INCLUDE"
gcc -O2 -Wall -o "$work/sample_acl" flexnpu/samples/sample_acl.c \
    -I"$FLEXNPU_ACL_INCLUDE" -L"$libdir" -lascendcl -lm

say "running sample_acl on devices 0 and 1 concurrently"
"$work/sample_acl" "$FLEXNPU_EMU_KERNELS" 0 >"$work/dev0.log" 2>&1 &
pid0=$!
"$work/sample_acl" "$FLEXNPU_EMU_KERNELS" 1 >"$work/dev1.log" 2>&1 &
pid1=$!
rc0=0 rc1=0
wait "$pid0" || rc0=$?
wait "$pid1" || rc1=$?
sed 's/^/  [device 0] /' "$work/dev0.log"
sed 's/^/  [device 1] /' "$work/dev1.log"
failed=()
((rc0 == 0)) || failed+=("sample_acl on device 0 (exit $rc0)")
((rc1 == 0)) || failed+=("sample_acl on device 1 (exit $rc1)")

py_sample=flexnpu/samples/sample_ctypes.py
if [[ -f $py_sample ]]; then
    say "running $py_sample on device 0"
    rc=0
    .venv/bin/python "$py_sample" "$FLEXNPU_EMU_KERNELS" 0 || rc=$?
    ((rc == 0)) || failed+=("$py_sample (exit $rc)")
else
    say "skipped the Python sample: $py_sample is not in this checkout yet"
fi

say "device server status:"
$flexnpu emu status

if ((${#failed[@]})); then
    say "FAILED: ${failed[*]}"
    exit 1
fi
say "all samples passed"
