"""Measures a Topology's link with plain TCP sockets: throughput (one stream, sender in one
node, receiver in another, each its own process so they do not share an interpreter) and
round-trip time (a 64-byte TCP ping-pong with TCP_NODELAY, as an RPC would see it).

    python -m flexnpu.bench.netprobe sink --port 5201          # prints {"bytes", "seconds", "gbit"}
    python -m flexnpu.bench.netprobe send --host 10.77.0.2 --port 5201 --seconds 2
    python -m flexnpu.bench.netprobe echo --port 5202
    python -m flexnpu.bench.netprobe ping --host 10.77.0.2 --port 5202 --count 200

`throughput(topo, a, b)` and `rtt(topo, a, b)` run these inside the topology's namespaces.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

PING_BYTES = 64
CHUNK = 1 << 20


def _listen(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(1)
    s.settimeout(30)
    print("listening", flush=True)
    return s


def sink(port: int) -> dict[str, Any]:
    with _listen(port) as ls:
        conn, _ = ls.accept()
    buf = bytearray(CHUNK)
    total, first = 0, None
    with conn:
        conn.settimeout(30)
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            if first is None:
                first = time.monotonic()
            total += n
    secs = time.monotonic() - first if first else 0.0
    return {"bytes": total, "seconds": round(secs, 4), "gbit": round(total * 8 / secs / 1e9, 4) if secs else 0.0}


def send(host: str, port: int, seconds: float, nbytes: int | None = None) -> dict[str, Any]:
    """Sends for `seconds`, or exactly nbytes when given."""
    data = memoryview(b"\0" * CHUNK)
    total = 0
    with socket.create_connection((host, port), timeout=30) as s:
        t0 = time.monotonic()
        while (total < nbytes) if nbytes is not None else (time.monotonic() - t0 < seconds):
            n = CHUNK if nbytes is None else min(CHUNK, nbytes - total)
            s.sendall(data[:n])
            total += n
    return {"bytes": total}


def echo(port: int) -> dict[str, Any]:
    with _listen(port) as ls:
        conn, _ = ls.accept()
    n = 0
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(30)
        while True:
            msg = _recv_exact(conn, PING_BYTES)
            if not msg:
                break
            conn.sendall(msg)
            n += 1
    return {"echoed": n}


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            return b""
        out += chunk
    return bytes(out)


def ping(host: str, port: int, count: int) -> dict[str, Any]:
    msg = b"p" * PING_BYTES
    rtts = []
    with socket.create_connection((host, port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            t0 = time.perf_counter()
            s.sendall(msg)
            if not _recv_exact(s, PING_BYTES):
                break
            rtts.append((time.perf_counter() - t0) * 1e6)
    rtts.sort()
    if not rtts:
        return {"count": 0}
    return {"count": len(rtts), "min_us": round(rtts[0], 1), "median_us": round(statistics.median(rtts), 1),
            "p99_us": round(rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))], 1)}


# ---------------------------------------------------------------- across a topology


def _pair(topo: Any, server: int, server_argv: list[str], client: int, client_argv: list[str],
          timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    me = [sys.executable, "-m", "flexnpu.bench.netprobe"]
    srv = subprocess.Popen(topo.argv(server, [*me, *server_argv]), stdout=subprocess.PIPE, text=True,
                           env=_env())
    try:
        if srv.stdout.readline().strip() != "listening":
            raise RuntimeError(f"netprobe {server_argv[0]} did not start (exit {srv.wait(5)})")
        cli = subprocess.run(topo.argv(client, [*me, *client_argv]), capture_output=True, text=True,
                             timeout=timeout, env=_env())
        if cli.returncode != 0:
            raise RuntimeError(f"netprobe {client_argv[0]} failed: {cli.stderr.strip()[-300:]}")
        out, _ = srv.communicate(timeout=timeout)
        return json.loads(out.strip().splitlines()[-1]), json.loads(cli.stdout.strip().splitlines()[-1])
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait()
        srv.stdout.close()


def _env() -> dict[str, str]:
    from flexnpu.bench.netns import _package_env

    return _package_env()


def throughput(topo: Any, src: int, dst: int, seconds: float = 2.0, port: int = 5201,
               nbytes: int | None = None) -> dict[str, Any]:
    """One TCP stream from node src to node dst for `seconds` (or of exactly nbytes): what
    dst received, and at what rate."""
    extra = ["--bytes", str(nbytes)] if nbytes is not None else []
    got, _ = _pair(topo, dst, ["sink", "--port", str(port)], src,
                   ["send", "--host", topo.addr(dst), "--port", str(port), "--seconds", str(seconds), *extra],
                   timeout=seconds + 60)
    return got


def rtt(topo: Any, src: int, dst: int, count: int = 200, port: int = 5202) -> dict[str, Any]:
    """TCP ping-pong round trips from node src to node dst (microseconds)."""
    _, got = _pair(topo, dst, ["echo", "--port", str(port)], src,
                   ["ping", "--host", topo.addr(dst), "--port", str(port), "--count", str(count)], timeout=120)
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flexnpu.bench.netprobe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("sink", "echo"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("send")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--bytes", type=int, default=None, dest="nbytes", help="send exactly this many bytes")
    p = sub.add_parser("ping")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=200)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "sink":
            out = sink(a.port)
        elif a.cmd == "echo":
            out = echo(a.port)
        elif a.cmd == "send":
            out = send(a.host, a.port, a.seconds, a.nbytes)
        else:
            out = ping(a.host, a.port, a.count)
    except OSError as e:
        print(f"netprobe {a.cmd}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
