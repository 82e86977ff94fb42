"""A user-space delay line for a Topology's switch, where the kernel has no sch_netem (many
minimal VM kernels build without it): for each node, frames the node sends (arriving on the
switch's end of its veth, pN) wait the link's one-way delay and then go out dN, whose veth
peer is on the bridge; frames from the bridge (arriving on dN) go out pN at once. So each
direction of a path gets the sender's delay once, as netem on the sender's egress would.

Frames are read and written whole with their virtio-net header (PACKET_VNET_HDR), so a
64 KB GSO frame of a TCP flow crosses as one frame with its checksum state, and the line
costs one receive and one send per GSO frame, not per wire packet.

    python -m flexnpu.bench.netdelay --ports p0:d0,p1:d1 --delay-us 2000

Prints "ready" when its sockets are bound. It exits when its stdin reaches end of file (the
topology that started it is gone, however it died), on SIGTERM or SIGINT, or when a port
disappears (its namespace was removed).
"""

from __future__ import annotations

import argparse
import collections
import os
import select
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
FRAME_MAX = 65536 + 64 + 10  # a GSO frame, its Ethernet header and the virtio-net header
SPIN_S = 0.002  # closer than this to a frame's time, wait in short sleeps (poll has ms steps)
NAP_S = 0.0002


def _port(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)  # never read back what this line sent
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    s.bind((ifname, ETH_P_ALL))
    return s


def _send(s: socket.socket, frame: bytes) -> None:
    try:
        s.send(frame)
    except BlockingIOError:  # the peer's queue is full: dropped, as a full switch port would
        pass


def run(pairs: list[tuple[str, str]], delay_s: float) -> int:
    stop = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    ep = select.epoll()
    # fd -> (socket to forward to, delayed?)
    route: dict[int, tuple[socket.socket, bool]] = {}
    keep = []
    for node_side, bridge_side in pairs:
        a, b = _port(node_side), _port(bridge_side)
        keep += [a, b]
        route[a.fileno()] = (b, True)
        route[b.fileno()] = (a, False)
        ep.register(a.fileno(), select.EPOLLIN)
        ep.register(b.fileno(), select.EPOLLIN)
    stdin = sys.stdin.fileno()
    ep.register(stdin, select.EPOLLIN)
    sock_of = {s.fileno(): s for s in keep}
    line: collections.deque[tuple[float, socket.socket, bytes]] = collections.deque()
    print("ready", flush=True)
    while not stop:
        now = time.monotonic()
        while line and line[0][0] <= now:
            _, out, frame = line.popleft()
            _send(out, frame)
        timeout = -1.0
        if line:
            wait = line[0][0] - now
            if wait < SPIN_S:
                time.sleep(min(wait, NAP_S))
                timeout = 0.0
            else:
                timeout = wait - SPIN_S / 2
        try:
            events = ep.poll(timeout)
        except InterruptedError:
            continue
        for fd, ev in events:
            if fd == stdin:
                if not os.read(stdin, 4096):
                    return 0  # the owner is gone
                continue
            if ev & (select.EPOLLERR | select.EPOLLHUP):
                return 0  # the interface went away with its namespace
            s = sock_of[fd]
            out, delayed = route[fd]
            due = time.monotonic() + delay_s
            for _ in range(64):  # drain a burst, but let the other ports and the line run too
                try:
                    frame = s.recv(FRAME_MAX)
                except BlockingIOError:
                    break
                except OSError:
                    return 0
                if delayed:
                    line.append((due, out, frame))
                else:
                    _send(out, frame)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flexnpu.bench.netdelay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ports", required=True, help="node-side:bridge-side interface pairs, comma separated")
    ap.add_argument("--delay-us", type=float, required=True, help="one-way delay added to node-side frames")
    args = ap.parse_args(argv)
    pairs = []
    for item in args.ports.split(","):
        node_side, sep, bridge_side = item.partition(":")
        if not sep or not node_side or not bridge_side:
            ap.error(f"--ports takes NODE:BRIDGE pairs, got {item!r}")
        pairs.append((node_side, bridge_side))
    if not 0 <= args.delay_us <= 1e7:
        ap.error(f"--delay-us must be in [0, 1e7], got {args.delay_us}")
    try:
        return run(pairs, args.delay_us * 1e-6)
    except OSError as e:
        print(f"netdelay: {e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
