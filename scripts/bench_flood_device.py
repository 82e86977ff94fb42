#!/usr/bin/env python3
"""What one flooding process costs everybody else on the emulated device.

    python3 scripts/bench_flood_device.py [--mode contexts|serial|shared] [--partition SPEC]
                                          [--seconds S] [--streams K] [--flooder-user USER]
                                          [--json]

It starts its own device server in a temp runtime dir (always stopped at the end) and, side
by side in one run, measures another process's serving step (one 1 ms kernel, then
aclrtSynchronizeStream: flexnpu/samples/sample_loop.py) and one status query (what
`flexnpu emu status` does) alone, then while a flooder runs:

  - launch: 1 ms kernels launched in a loop on K streams (--streams, 1), never synchronised;
  - status: 8 connections sending status requests whose replies are never read;
  - silent: 300 connections that never say hello.

Per scenario: step p50/p99 (ms) and their ratio to the step alone, the status query's time,
the server's RSS and open descriptors before and after, and the flooder's CPU share. A step or query that did not
finish within its timeout prints as "hung". --flooder-user runs the flooder as that local
user (setpriv; needs root), the step as the caller. --server and --libdir run another
build of the server and libascendcl.so (e.g. an older one, for a before/after table).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_LOOP = REPO / "flexnpu" / "samples" / "sample_loop.py"

try:
    from flexnpu import paths
    from flexnpu.emulator.control import _REQ, _REQ_STATUS, DEFAULT_MODE, MODES
    from flexnpu.emulator.profiles import PROFILES
except ImportError:
    sys.exit("bench_flood_device: flexnpu is not installed; run `pip install .` in the repository first")

PEAK_FLOPS = PROFILES["910b"].peak_tflops * 1e12
FULL_BLOCK_DIM = 48  # a full-device kernel: every core of its class (docs/emulator.md)


# ---------------------------------------------------------------- the flooders (run as --role)


def role_launch(sock: str, n: int, streams: int) -> None:
    import ctypes
    import struct
    import threading

    acl = ctypes.CDLL("libascendcl.so")
    assert acl.aclInit(None) == 0 and acl.aclrtSetDevice(0) == 0
    sts = [ctypes.c_void_p() for _ in range(streams)]
    binary, func = ctypes.c_void_p(), ctypes.c_void_p()
    assert all(acl.aclrtCreateStream(ctypes.byref(st)) == 0 for st in sts)
    assert acl.aclrtBinaryLoadFromFile(os.environ["FLEXNPU_EMU_KERNELS"].encode(), None, ctypes.byref(binary)) == 0
    assert acl.aclrtBinaryGetFunction(binary, b"synthetic", ctypes.byref(func)) == 0
    args = struct.pack("<dd", 1e-3 * PEAK_FLOPS, 0.0)
    count = [0]

    def report() -> None:
        while True:
            print(json.dumps({"launches": count[0]}), flush=True)
            time.sleep(0.5)

    threading.Thread(target=report, daemon=True).start()
    while acl.aclrtLaunchKernel(func, FULL_BLOCK_DIM, args, len(args), sts[count[0] % streams]) == 0:
        count[0] += 1


def _connect(sock: str) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(0.2)
    try:
        s.connect(sock)
    except OSError:
        s.close()
        return None
    s.setblocking(False)
    return s


def role_status(sock: str, n: int, streams: int) -> None:
    held = [s for s in (_connect(sock) for _ in range(n)) if s]
    sent = 0
    while True:  # keeps asking as the server makes room, never reads a reply
        for s in held:
            for _ in range(1000):
                try:
                    s.send(_REQ.pack(_REQ_STATUS, 0, 0, 0, b""))
                    sent += 1
                except OSError:  # no room: the server has stopped reading it (or closed it)
                    break
        print(json.dumps({"sent": sent}), flush=True)
        time.sleep(0.05)


def role_silent(sock: str, n: int, streams: int) -> None:
    held = []
    while True:  # keeps n connections open as the server closes them
        held = [s for s in held if s.fileno() >= 0]
        while len(held) < n:
            s = _connect(sock)
            if not s:
                break
            held.append(s)
        print(json.dumps({"open": len(held)}), flush=True)
        time.sleep(0.5)


ROLES = {"launch": (role_launch, 1), "status": (role_status, 8), "silent": (role_silent, 300)}


# ---------------------------------------------------------------- measuring


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_ms(sock: str, timeout: float = 3.0) -> float | None:
    """One status query, as `flexnpu emu status` makes it: ms, or None if it did not finish."""
    t0 = time.perf_counter()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(timeout)
    try:
        s.connect(sock)
        s.sendall(_REQ.pack(_REQ_STATUS, 0, 0, 0, b""))
        while s.recv(1 << 16):
            if time.perf_counter() - t0 > timeout:
                return None
    except OSError:
        return None
    finally:
        s.close()
    return (time.perf_counter() - t0) * 1e3


def step(env: dict, seconds: float) -> dict | None:
    """The other process's serving loop: p50/p99 step ms, or None if it hung."""
    try:
        r = subprocess.run([sys.executable, str(SAMPLE_LOOP), env["FLEXNPU_EMU_KERNELS"], "--seconds", str(seconds),
                            "--kernel-ms", "1", "--kernels", "1"], env=env, capture_output=True, text=True,
                           timeout=seconds + 10, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if r.returncode == 0 and lines else None


def start_server(binary: Path, rdir: Path, mode: str, partition: str | None) -> subprocess.Popen:
    argv = [str(binary), "--socket", str(rdir / "emu.sock"), "--devices", "1", "--mode", mode,
            *PROFILES["910b"].server_args(), *(["--partition", partition] if partition else []),
            "--client-group", paths.CLIENT_GROUP]
    log = open(rdir / "emu.log", "ab")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    if proc.stdout.readline().strip() != b"ready":
        proc.kill()
        proc.wait()
        sys.exit(f"bench_flood_device: the server did not start: {(rdir / 'emu.log').read_text()[-300:]}")
    return proc


def scenario(name: str, server: subprocess.Popen, env: dict, args: argparse.Namespace) -> dict:
    sock = env["FLEXNPU_RUNTIME_DIR"] + "/emu.sock"
    rss0 = rss_mb(server.pid)
    flooder = None
    out: dict = {"scenario": name, "rss_before_mb": round(rss0, 1), "fds_before": open_fds(server.pid)}
    try:
        if name != "alone":
            argv = [sys.executable, __file__, "--role", name, "--sock", sock, "--streams", str(args.streams)]
            if args.flooder_user:
                argv = ["setpriv", f"--reuid={args.flooder_user}", f"--regid={args.flooder_user}",
                        "--init-groups", *argv]
            flooder = subprocess.Popen(argv, env={**env, "PYTHONPATH": str(REPO)}, cwd="/",
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
            time.sleep(args.settle)
        c0 = cpu_s(flooder.pid) if flooder else 0.0
        t0 = time.monotonic()
        out["status_ms"] = status_ms(sock)
        res = step(env, args.seconds)
        out["step_ms_p50"] = res and res["step_ms_p50"]
        out["step_ms_p99"] = res and res["step_ms_p99"]
        out["steps"] = res and res["steps"]
        if flooder:
            out["flooder_cpu"] = round((cpu_s(flooder.pid) - c0) / (time.monotonic() - t0), 2)
        out["rss_after_mb"] = round(rss_mb(server.pid), 1)
        out["fds_after"] = open_fds(server.pid)
    finally:
        if flooder:
            flooder.kill()
            flooder.wait(timeout=10)
    return out


def fmt(x) -> str:
    if x is None:
        return "hung"
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default=DEFAULT_MODE, choices=MODES)
    ap.add_argument("--partition", default=None, help="prefill=S,decode=S (the server's --partition)")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each step measurement")
    ap.add_argument("--settle", type=float, default=1.5, help="seconds a flood runs before measuring")
    ap.add_argument("--streams", type=int, default=1, help="streams the launch flooder spreads its kernels over")
    ap.add_argument("--flooder-user", default=None)
    ap.add_argument("--server", type=Path, default=None, help="server binary (default: the installed one)")
    ap.add_argument("--libdir", type=Path, default=None, help="dir of libascendcl.so (default: the installed one)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    ap.add_argument("--sock", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        fn, n = ROLES[args.role]
        fn(args.sock, n, args.streams)
        return 0

    rdir = Path(tempfile.mkdtemp(prefix="fxflood-"))
    rdir.chmod(0o755)  # as /run/flexnpu, so a --flooder-user reaches the socket
    env = dict(os.environ)
    env.update({"FLEXNPU_RUNTIME_DIR": str(rdir), "FLEXNPU_EMU_KERNELS": str(paths.emulator_kernel_library()),
                "LD_LIBRARY_PATH": str(args.libdir or paths.native_lib_dir())})
    rows = []
    server = None
    try:
        server = start_server(args.server or paths.emulator_server_binary(), rdir, args.mode, args.partition)
        for name in ("alone", "launch", "status", "silent"):
            rows.append(scenario(name, server, env, args))
            if server.poll() is not None:
                break
    finally:
        if server:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            server.stdout.close()
        shutil.rmtree(rdir, ignore_errors=True)
    base = rows[0]
    for r in rows:
        for q in ("p50", "p99"):
            v, b = r.get(f"step_ms_{q}"), base.get(f"step_ms_{q}")
            r[f"{q}_ratio"] = round(v / b, 1) if v and b else None
        r["rss_ratio"] = round(r["rss_after_mb"] / base["rss_before_mb"], 2)
    if args.json:
        print(json.dumps({"mode": args.mode, "partition": args.partition, "streams": args.streams, "rows": rows}))
        return 0
    print(f"mode {args.mode}{', partition ' + args.partition if args.partition else ''}; "
          f"step = one 1 ms kernel + synchronize, {args.seconds:g} s per scenario; "
          f"launch flood on {args.streams} stream(s)")
    print(f"{'scenario':9} {'p50 ms':>7} {'p99 ms':>8} {'x p50':>6} {'x p99':>6} {'status ms':>9} "
          f"{'RSS MB':>13} {'x RSS':>6} {'fds':>9} {'flooder cpu':>11}")
    for r in rows:
        print(f"{r['scenario']:9} {fmt(r['step_ms_p50']):>7} {fmt(r['step_ms_p99']):>8} "
              f"{fmt(r['p50_ratio']):>6} {fmt(r['p99_ratio']):>6} {fmt(r['status_ms']):>9} "
              f"{r['rss_before_mb']:>6.1f}>{r['rss_after_mb']:<6.1f} {fmt(r['rss_ratio']):>6} "
              f"{str(r['fds_before']) + '>' + str(r['fds_after']):>9} "
              f"{fmt(r.get('flooder_cpu', '-')):>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
