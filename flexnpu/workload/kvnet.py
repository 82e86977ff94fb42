"""KV over the network: one process's transfer engine (Mooncake's, TCP transport).

    net = KvNet("10.77.0.1")            # this node's address; the engine listens there
    net.register(addr, n)               # host memory a peer may read (aclrtMallocHost'd)
    net.segment                         # "10.77.0.1:PORT": what a peer names this process by
    net.read(peer_segment, local_addr, remote_addr, n)   # pull n bytes from the peer's memory

A disaggregated deployment without RDMA moves each request's KV this way: the prefill
instance copies the KV device->host into memory registered with its engine, the decode
instance's engine reads it over TCP into its own registered host memory and copies it
host->device (instance.py, --kv-net). The engine is Mooncake's transfer engine
(https://github.com/kvcache-ai/Mooncake, the `mooncake-transfer-engine-non-cuda` wheel) with
the P2P handshake (no metadata server: a peer is named by its address and RPC port).

The engine logs through glog to stderr: below ERROR is silenced (MC_LOG_LEVEL, unless set),
and what it says while starting goes to `log` (default: nowhere), so an instance's stderr
carries only real errors.

    python -m flexnpu.workload.kvnet serve --bytes N [--seed S] [--host A]   # one JSON line, then waits for EOF
    python -m flexnpu.workload.kvnet read --segment H:P --addr A --bytes N [--host A]   # one JSON line

serve fills N bytes (a seeded pattern) in registered memory and prints its segment, address
and sha256; read pulls them into memory of its own and prints the sha256 of what arrived.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import random
import sys
import time

os.environ.setdefault("MC_LOG_LEVEL", "ERROR")  # read when the engine's library loads


class KvNetError(RuntimeError):
    """The transfer engine is missing or a transfer failed; str() is one line."""


def available() -> str | None:
    """Why the transfer engine cannot be used here (None: it can)."""
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except ImportError as e:
        return (f"Mooncake's transfer engine does not load ({e}); install FlexNPU with its `net` extra "
                f"(pip install 'flexnpu[net]': mooncake-transfer-engine-non-cuda; scripts/setup.sh does) "
                f"and apt-get install libibverbs1 ibverbs-providers")
    return None


class KvNet:
    """A transfer engine bound to `host` (this node's address)."""

    def __init__(self, host: str, log: str | None = None) -> None:
        why = available()
        if why:
            raise KvNetError(why)
        from mooncake.engine import TransferEngine

        self.host = host
        self.engine = TransferEngine()
        saved = os.dup(2)  # the engine's start-up lines go to `log`, not to this process's stderr
        sink = os.open(log or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            sys.stderr.flush()
            os.dup2(sink, 2)
            rc = self.engine.initialize(host, "P2PHANDSHAKE", "tcp", "")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(sink)
        if rc != 0:
            raise KvNetError(f"the transfer engine did not start on {host} (rc {rc})")
        self.port = self.engine.get_rpc_port()
        self.registered: dict[int, int] = {}
        self.read_bytes = 0  # what this engine pulled from peers
        self.reads = 0

    @property
    def segment(self) -> str:
        return f"{self.host}:{self.port}"

    def register(self, addr: int, n: int) -> None:
        rc = self.engine.register_memory(addr, n)
        if rc != 0:
            raise KvNetError(f"cannot register {n} bytes at {addr:#x} with the transfer engine (rc {rc})")
        self.registered[addr] = n

    def unregister(self, addr: int) -> None:
        if self.registered.pop(addr, None) is not None:
            self.engine.unregister_memory(addr)

    def read(self, segment: str, local: int, remote: int, n: int) -> None:
        """Pulls n bytes at `remote` in the peer's registered memory into `local` (registered here)."""
        rc = self.engine.transfer_sync_read(segment, local, remote, n)
        if rc < 0:
            raise KvNetError(f"reading {n} bytes at {remote:#x} from {segment} failed (rc {rc})")
        self.read_bytes += n
        self.reads += 1

    def close(self) -> None:
        for addr in list(self.registered):
            self.unregister(addr)


def _pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flexnpu.workload.kvnet", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="fill registered memory and wait for EOF on stdin")
    s.add_argument("--bytes", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--host", default="127.0.0.1")
    r = sub.add_parser("read", help="pull a peer's bytes and print their sha256")
    r.add_argument("--segment", required=True)
    r.add_argument("--addr", type=lambda x: int(x, 0), required=True)
    r.add_argument("--bytes", type=int, required=True)
    r.add_argument("--host", default="127.0.0.1")
    a = p.parse_args(argv)
    if a.bytes <= 0:
        p.error("--bytes must be positive")
    try:
        net = KvNet(a.host)
        buf = ctypes.create_string_buffer(a.bytes)
        addr = ctypes.addressof(buf)
        net.register(addr, a.bytes)
        if a.cmd == "serve":
            ctypes.memmove(buf, _pattern(a.bytes, a.seed), a.bytes)
            print(json.dumps({"segment": net.segment, "addr": addr,
                              "sha256": hashlib.sha256(buf.raw[:a.bytes]).hexdigest()}), flush=True)
            sys.stdin.read()
        else:
            t0 = time.monotonic()
            net.read(a.segment, addr, a.addr, a.bytes)
            dt = time.monotonic() - t0
            print(json.dumps({"sha256": hashlib.sha256(buf.raw[:a.bytes]).hexdigest(), "bytes": a.bytes,
                              "seconds": round(dt, 6), "gbit_s": round(a.bytes * 8 / dt / 1e9, 3) if dt else None}),
                  flush=True)
        net.close()
    except KvNetError as e:
        print(f"flexnpu.workload.kvnet: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
