#!/usr/bin/env bash
# Prepare this machine (Debian 12, as root) and the repo's .venv for FlexNPU.
#
# Idempotent: every step first checks whether it is needed, prints one
# "setup: ..." line for each change it makes, and "setup: nothing to change"
# when the system and the venv were already right. The flexnpu package itself is
# reinstalled on every run so the native parts (emulated libascendcl, device
# server) are rebuilt from the current sources.
#
# Usage: sudo bash scripts/setup.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
VENV="$REPO/.venv"
changed=0

note() { echo "setup: $*"; changed=1; }
die() { echo "setup: error: $*" >&2; exit 1; }
trap 'die "failed at line $LINENO (exit $?); fix the message above and rerun scripts/setup.sh"' ERR

[[ $(id -u) -eq 0 ]] || die "run as root: sudo bash scripts/setup.sh"
command -v apt-get >/dev/null && command -v dpkg-query >/dev/null \
    || die "this script needs a Debian system with apt-get (Debian 12 is supported)"

# Two setups at once (say demo.sh and test.sh) would build into the same build/ dir.
mkdir -p build
exec 9>build/.setup.lock
flock 9

installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]; }

# --- apt packages -----------------------------------------------------------
arch=$(dpkg --print-architecture)
# gcc/cmake/make build the native parts and the C samples, g++ the aclnn C++ test
# programs; bcc comes only from Debian (it is not on PyPI); its compiler needs kernel headers. systemd gives
# systemd-analyze (the service tests verify every unit; it does not become PID 1)
# and strace checks each service's system calls against its unit's filter. libcap2-bin's setcap
# gives the Kubernetes observer's interpreter its file capability (tests/test_kubernetes.py).
# systemd-container (systemd-nspawn) and debootstrap boot a real systemd as PID 1 in a Debian
# container for tests/test_service_systemd.py.
want=(gcc g++ make cmake tmux python3-bpfcc libbpfcc "linux-headers-$arch" systemd strace libcap2-bin
      systemd-container debootstrap)
# prometheus gives promtool (checks the observer's metrics text) and a real server the metrics
# tests start on their own config; its packaged service is never left running (below).
want+=(prometheus)
# iproute2: tests/test_netns.py checks with `ip` what the network topologies (made through
# pyroute2) leave in the machine's own namespace.
want+=(iproute2)
# libibverbs1, ibverbs-providers: mooncake-transfer-engine-non-cuda (bench pd --kv-net) links
# libibverbs even for its TCP transport
want+=(libibverbs1 ibverbs-providers)

# The venv is made with python3.11 from PATH. Debian's own interpreter can only
# make venvs with python3-venv installed; a pyenv/other build needs nothing.
py=$(command -v python3.11 || true)
if [[ -z $py ]]; then
    want+=(python3 python3-venv)
elif dpkg-query -S "$(readlink -f "$py")" >/dev/null 2>&1; then
    want+=(python3-venv)
fi

missing=()
for p in "${want[@]}"; do installed "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
    # Refresh the package lists only when something must actually be installed.
    apt-get update -qq || die "apt-get update failed; check the network / apt sources"
    # no package's service may start during the install (prometheus's would listen on :9090):
    # a policy-rc.d that denies every start, removed again unless one was there before
    deny=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        deny=1
    fi
    rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >/dev/null || rc=$?
    [[ -z $deny ]] || rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) || die "apt-get install ${missing[*]} failed"
    note "installed apt packages ${missing[*]}"
fi
py=$(command -v python3.11 || true)
[[ -n $py ]] || die "python3.11 is not on PATH even after installing python3"

# --- no packaged prometheus service ------------------------------------------
# The tests start their own prometheus; the package's service (enabled by its install) would
# hold port 9090 and scrape nothing of ours, so it is stopped and kept from starting at boot.
if [[ -e /lib/systemd/system/prometheus.service && -d /run/systemd/system ]]; then
    if systemctl is-enabled -q prometheus 2>/dev/null || systemctl is-active -q prometheus 2>/dev/null; then
        systemctl disable -q --now prometheus 2>/dev/null || die "systemctl disable --now prometheus failed"
        note "stopped and disabled the packaged prometheus service"
    fi
elif [[ -x /etc/init.d/prometheus ]]; then
    if /etc/init.d/prometheus status >/dev/null 2>&1; then
        /etc/init.d/prometheus stop >/dev/null || die "/etc/init.d/prometheus stop failed"
        note "stopped the packaged prometheus service"
    fi
    if ls /etc/rc[2-5].d/S*prometheus >/dev/null 2>&1; then
        update-rc.d prometheus disable >/dev/null 2>&1 || true
        note "disabled the packaged prometheus service at boot"
    fi
fi

# --- kernel headers for bcc -------------------------------------------------
# bcc compiles BPF C against /lib/modules/$(uname -r)/build. When the running
# kernel has no headers package (custom/cloud kernels), the newest Debian headers
# stand in: uprobe programs use no kernel-version-specific layout.
kmod="/lib/modules/$(uname -r)"
if [[ ! -e $kmod/build ]]; then
    hdr=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n1 || true)
    [[ -n $hdr ]] || die "no kernel headers under /usr/src; apt-get install linux-headers-$arch"
    mkdir -p "$kmod"
    ln -sfn "$hdr" "$kmod/build"
    note "linked kernel headers $kmod/build -> $hdr"
    # Debian splits the arch-independent half into -common, found through "source".
    common="${hdr%-"$arch"}-common"
    if [[ -d $common && ! -e $kmod/source ]]; then
        ln -sfn "$common" "$kmod/source"
        note "linked kernel headers $kmod/source -> $common"
    fi
fi

# --- tracefs ----------------------------------------------------------------
if ! awk '$2 == "/sys/kernel/tracing" && $3 == "tracefs" {f = 1} END {exit !f}' /proc/mounts; then
    mount -t tracefs nodev /sys/kernel/tracing \
        || die "could not mount tracefs at /sys/kernel/tracing (is this a container without CAP_SYS_ADMIN?)"
    note "mounted tracefs at /sys/kernel/tracing"
fi

# --- venv -------------------------------------------------------------------
if [[ -x $VENV/bin/python ]] && ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    rm -rf "$VENV"  # its interpreter is gone (e.g. the Python it was made from was removed)
    note "removed broken venv .venv"
fi
if [[ ! -x $VENV/bin/python ]]; then
    "$py" -m venv "$VENV" || die "$py -m venv .venv failed"
    note "created venv .venv with $("$VENV/bin/python" -V 2>&1)"
fi

# Expose Debian's bcc, and nothing else from dist-packages, to the venv: the .pth
# adds a directory that holds a single symlink to the bcc package.
# awk reads all of dpkg's output: an early-exiting reader would SIGPIPE it under pipefail.
bcc_src=$(dpkg-query -L python3-bpfcc | awk '/\/bcc\/__init__\.py$/ && !f {print; f = 1}')
[[ -n $bcc_src ]] || die "python3-bpfcc ships no bcc package; apt-get install --reinstall python3-bpfcc"
bcc_src=$(dirname "$bcc_src")
bcc_dir="$VENV/debian-bcc"
if [[ $(readlink "$bcc_dir/bcc" 2>/dev/null) != "$bcc_src" ]]; then
    mkdir -p "$bcc_dir"
    ln -sfn "$bcc_src" "$bcc_dir/bcc"
    note "linked $bcc_dir/bcc -> $bcc_src"
fi
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pth="$site/debian-bcc.pth"
if [[ ! -f $pth || $(<"$pth") != "$bcc_dir" ]]; then
    echo "$bcc_dir" >"$pth"
    note "wrote $pth (bcc only from Debian's dist-packages)"
fi

((changed)) || echo "setup: nothing to change"

# --- the package ------------------------------------------------------------
# Reinstalled every run; the persistent build/ dir keeps the native rebuild incremental.
# net: Mooncake's transfer engine, for the KV across nodes (bench pd --nodes 2)
"$VENV/bin/python" -m pip install -q ".[test,net]" \
    || die "pip install .[test,net] into .venv failed; see pip's message above"
"$VENV/bin/python" -c 'import bcc' 2>/dev/null \
    || die ".venv cannot import bcc; rerun after apt-get install --reinstall python3-bpfcc libbpfcc"
echo "setup: flexnpu $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("flexnpu"))') installed in .venv"
