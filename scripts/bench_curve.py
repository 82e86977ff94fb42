#!/usr/bin/env python3
"""What CURVE costs the publishers: one publisher and one subscriber in this process, a
message of a snapshot's size sent N times, over the IPC socket the node uses today
(ipc://, no encryption) and over TCP on 127.0.0.1 with CURVE (flexnpu/remote/curve.py);
and how long a CURVE subscriber takes from connect to its first message (the handshake,
the ZAP handler's read of the authorized dir included).

    .venv/bin/python scripts/bench_curve.py                    # 20000 messages of 4 KiB
    .venv/bin/python scripts/bench_curve.py --size 65536 --count 5000 --json curve.json

The observer publishes one snapshot per 100 ms by default, so any rate far above 10
messages/s means the cost is negligible for it; the figure is for judging headroom.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq  # noqa: E402

from flexnpu.bench.node import machine  # noqa: E402
from flexnpu.remote import curve, keys  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pump(send, sock: zmq.Socket, payload: bytes, count: int) -> tuple[float, int]:
    """Messages/s received, from the first send to the last receive, and how many were lost
    (a PUB drops what a full queue cannot take; the sender keeps at most 500 in flight)."""
    got = sent = 0
    t0 = last = time.perf_counter()
    while got < count:
        while sent < count and sent - got < 500:
            send(payload)
            sent += 1
        if not sock.poll(1000):
            break  # nothing for a second: the rest is lost
        while sock.poll(0) and got < count:
            sock.recv()
            got += 1
        last = time.perf_counter()
    return got / (last - t0), count - got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="bytes per message (a snapshot of a few processes: ~2-4 KiB)")
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--handshakes", type=int, default=20)
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    if a.size < 1 or a.count < 1 or a.handshakes < 1:
        print("bench_curve: --size, --count and --handshakes must be at least 1", file=sys.stderr)
        return 2
    payload = b"x" * a.size
    d = Path(tempfile.mkdtemp(prefix="fxbench-curve-"))
    ctx = zmq.Context()
    out: dict = {"machine": machine(), "size": a.size, "count": a.count}
    try:
        server, client = keys.new_pair(d, "server"), keys.new_pair(d, "client")
        keys.add_public(keys.public_path(keys.authorized_dir(d), "client"), client.public)

        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, 1000)
        pub.bind(f"ipc://{d}/plain.sock")
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.RCVHWM, 1000)
        sub.connect(f"ipc://{d}/plain.sock")
        while not sub.poll(10):
            pub.send(b"warm")
        while sub.poll(50):
            sub.recv()
        rate, lost = pump(pub.send, sub, payload, a.count)
        out["ipc_msgs_per_s"], out["ipc_lost"] = round(rate), lost
        pub.close(0)
        sub.close(0)

        port = free_port()
        cp = curve.CurvePublisher(f"127.0.0.1:{port}", keys.secret_path(d, "server"), keys.authorized_dir(d), ctx=ctx,
                                  hwm=1000)
        try:
            waits = []
            for _ in range(a.handshakes):
                t0 = time.perf_counter()
                cs = curve.CurveSubscriber(f"127.0.0.1:{port}", client, server.public, ctx=ctx, hwm=1000)
                while not cs.sock.poll(1):
                    cp.send(b"warm")
                waits.append(time.perf_counter() - t0)
                cs.close()
            waits.sort()
            out["curve_first_message_ms_median"] = round(waits[len(waits) // 2] * 1e3, 2)
            cs = curve.CurveSubscriber(f"127.0.0.1:{port}", client, server.public, ctx=ctx, hwm=1000)
            while not cs.sock.poll(10):
                cp.send(b"warm")
            while cs.sock.poll(50):
                cs.sock.recv()

            def send(b: bytes) -> None:
                cp.sock.send(b)  # blocking: the pump keeps below the high-water mark

            rate, lost = pump(send, cs.sock, payload, a.count)
            out["curve_tcp_msgs_per_s"], out["curve_tcp_lost"] = round(rate), lost
            cs.close()
        finally:
            cp.close()
    finally:
        ctx.destroy(0)
        shutil.rmtree(d, ignore_errors=True)
    mb = a.size / 1e6
    print(f"{a.count} messages of {a.size} B on {out['machine']['cpu']} ({out['machine']['cpus']} cpus, "
          f"load {out['machine']['load1']}):")
    print(f"  ipc, no CURVE     {out['ipc_msgs_per_s']:>9} msg/s  {out['ipc_msgs_per_s'] * mb:8.1f} MB/s  "
          f"lost {out['ipc_lost']}")
    print(f"  tcp, CURVE        {out['curve_tcp_msgs_per_s']:>9} msg/s  {out['curve_tcp_msgs_per_s'] * mb:8.1f} MB/s  "
          f"lost {out['curve_tcp_lost']}")
    print(f"  CURVE connect to first message: {out['curve_first_message_ms_median']} ms (median of {a.handshakes})")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
