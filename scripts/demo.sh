#!/usr/bin/env bash
# The FlexNPU demo on emulated Ascend devices: set up the machine (scripts/setup.sh: build
# tools, bcc, kernel headers, tracefs, .venv with FlexNPU), then `flexnpu demo`: the
# emulator, a forwarding daemon per device, the observer and the controller in a temporary
# runtime dir; the reference serving workload under FlexNPU (forwarded where it can be, else
# gated; the demo prints which) with the `top` view live; then
# the comparison (`flexnpu bench pd`, short) with its table and plot. `flexnpu demo` stops
# everything it started, also on Ctrl-C and on failure.
#
# Usage: sudo bash scripts/demo.sh [--quick] [--seconds S] [--out DIR]
# (arguments go to `flexnpu demo`; the AscendCL samples are in flexnpu/samples/)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/flexnpu demo "$@"
