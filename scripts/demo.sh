#!/usr/bin/env bash
# The FlexNPU demo on the emulated Ascend device: set up the machine, start a two-device
# emulator, build an ordinary AscendCL program against the emulated libascendcl.so, run it
# on both devices at once, run the Python (ctypes) sample, and show what the device server
# saw. Then share device 0 between a decode-like and a prefill-like loop under the FlexNPU
# shim: a forwarding daemon lists them, holds the prefill one at its gate for a second
# (the device server's own busy time shows it dispatched nothing), and gives decode
# priority; `flexnpu attach` watches the decode loop through uprobes. Everything started
# here is stopped on exit.
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
bg=()

cleanup() {
    local rc=$?
    ((rc == 0)) || say "failed (exit $rc)"
    for p in "${bg[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${bg[@]}"; do wait "$p" 2>/dev/null || true; done
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

# ---------------------------------------------------------------- sharing device 0
busy_of() {  # device-0 busy ns the device server has charged to a pid
    $flexnpu emu status --json | .venv/bin/python -P -c '
import json, sys
st = json.load(sys.stdin)
print(int(sum(c["busy_ns"] for c in st["devices"][0]["clients"] if c["pid"] == int(sys.argv[1]))))' "$1"
}
wait_listed() {  # until the daemon lists n clients
    for _ in $(seq 100); do
        [[ $($flexnpu gate list --device 0 --json | .venv/bin/python -P -c \
            'import json,sys; print(len(json.load(sys.stdin)["clients"]))') -ge $1 ]] && return 0
        sleep 0.1
    done
    return 1
}

say "starting the forwarding daemon of device 0"
$flexnpu daemon --device 0 2>"$FLEXNPU_RUNTIME_DIR/daemon-0.log" &
bg+=($!)
for _ in $(seq 100); do [[ -S $FLEXNPU_RUNTIME_DIR/daemon-0.sock ]] && break; sleep 0.1; done

say "running a decode-like loop (2 x 1 ms kernels a step) and a prefill-like loop (4 x 20 ms) on device 0"
$flexnpu run --role decode -- .venv/bin/python flexnpu/samples/sample_loop.py "$FLEXNPU_EMU_KERNELS" \
    --seconds 8 --kernel-ms 1 --kernels 2 >"$work/decode.json" &
decode=$!
bg+=($decode)
$flexnpu run --role prefill -- .venv/bin/python flexnpu/samples/sample_loop.py "$FLEXNPU_EMU_KERNELS" \
    --seconds 8 --kernel-ms 20 --kernels 4 --h2d-bytes 8388608 >"$work/prefill.json" &
prefill=$!
bg+=($prefill)
wait_listed 2 || { failed+=("the daemon did not list both loops"); }
$flexnpu gate list --device 0

say "closing the prefill loop's gate for 1 s"
$flexnpu gate set "$prefill" --gate closed --max-hold-ms 5000
sleep 0.2
b0=$(busy_of "$prefill")
sleep 1
b1=$(busy_of "$prefill")
$flexnpu gate set "$prefill" --gate open
say "device time the prefill loop got while its gate was closed: $(( (b1 - b0) / 1000000 )) ms"
((b1 == b0)) || failed+=("the prefill loop dispatched while its gate was closed")

say "giving the decode loop priority: prefill waits while decode has work pending"
$flexnpu gate set "$decode" --priority 5
if .venv/bin/python -P -c 'import bcc' 2>/dev/null && [[ $(id -u) -eq 0 ]]; then
    say "watching the decode loop through uprobes (flexnpu attach, 2 intervals)"
    $flexnpu attach "$decode" 1 2 || failed+=("flexnpu attach")
else
    say "skipped flexnpu attach: it needs root and bcc (flexnpu doctor says what is missing)"
fi
wait "$decode" || failed+=("decode loop")
wait "$prefill" || failed+=("prefill loop")
say "decode loop: $(cat "$work/decode.json")"
say "prefill loop: $(cat "$work/prefill.json")"

if ((${#failed[@]})); then
    say "FAILED: ${failed[*]}"
    exit 1
fi
say "all samples passed; the gate held and released the prefill loop"
