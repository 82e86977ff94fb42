"""A serving instance: an ordinary AscendCL program that runs a transformer's kernels for the
requests it is given. It knows nothing of FlexNPU.

    python -m flexnpu.workload.instance --role prefill|decode|mixed --model qwen2.5-7b [--ops aclnn] [...]

A step is the model's kernels (flexnpu/workload/model.py), run as CANN aclnn operators
(--ops aclnn, the default; aclnn-fia: FusedInferAttentionScore for every phase; see
flexnpu/workload/aclnn.py) or as the emulator's built-in kernels (--ops kernels).

Control is JSON lines on stdin, events are JSON lines on stdout (see `driver`):

  in:  {"op": "req", "id", "prompt", "output"}   a request to prefill (prefill, mixed)
       {"op": "allow", "pid"}                    this process may import the KV pool (prefill, --kv-export)
       {"op": "allow", "pids"}                   these processes may import it (several decode instances)
       {"op": "import", "key", "tokens"[, "peer", "device"]}  import a prefill instance's KV pool (decode)
       {"op": "kv", "id", "prompt", "output", "kv_start"[, "peer"][, "segment", "addr"]}
                                                 a prefilled request handed over (decode)
       {"op": "release", "id"}                   the decode instance needs this KV no more (prefill)
       {"op": "drain"}                           no more requests: finish the work and exit
  out: {"ev": "ready", "pid", "kv_tokens", "kv_key", "kv_ptr", "segment"}  {"ev": "allowed"}
       {"ev": "imported", "bytes", "ptr", "peer"}
       {"ev": "first", "id", "t"}  {"ev": "handoff", "id", "t", "kv_start"[, "segment", "addr", "bytes"]}
       {"ev": "taken", "id", "t"}
       {"ev": "done", "id"}  {"ev": "tokens", "t", "ids"}  {"ev": "stats", ...}

Times are CLOCK_MONOTONIC seconds (time.monotonic) taken right after the step's stream
synchronisation, i.e. when the step's tokens exist. "stats" also lists each step's span
(`step_spans`: [first launch, synchronised] in those seconds): when the instance had work on
the device, as the program itself knows it. `kv_ptr` (the KV pool's device address) and the
imported pool's `ptr` let a driver see whether an import is the exporter's memory itself.

The KV cache is one aclrtMalloc'd pool, handed out in contiguous token ranges; a request
reserves its whole need on admission (prompt + output tokens in decode and mixed, the prompt
in prefill; only the output in decode when the prompt's KV stays in the prefill's pool, below)
and waits, first come first served, while it does not fit. Prefill keeps a request's KV until
the decode instance needs it no more ("release").

Hand-off through AscendCL's IPC memory calls, as an engine's KV connector does on hardware.
With --kv-export the prefill instance exports its KV pool once at start
(aclrtIpcMemGetExportKey, its key in "ready") and, told the decode instance's pid ("allow"),
lets that process import it (aclrtIpcMemSetImportPid); the decode instance imports the pool
once ("import", aclrtIpcMemImportByKey) and, for each request handed over, learns where in the
pool its prompt's KV is ("kv_start"). On one device the request's prompt KV then stays where
prefill wrote it, in memory both processes map: the decode instance reserves only the output
tokens in its own pool, nothing is copied, and it says "done" when the request ends, after
which the prefill instance frees the range ("release"). Across devices (--kv-src-device) the
decode instance imports the pool with ACL_RT_IPC_MEM_IMPORT_FLAG_ENABLE_PEER_ACCESS and pulls
each prompt's KV bytes from it with aclrtMemcpyAsync(INTER_DEVICE_TO_DEVICE) into its own pool,
on a transfer stream of its own, from a transfer thread, as a disaggregated engine's KV
connector does: the decode loop keeps stepping while a pull is under way, a request joins the
batch (and is "taken") once its bytes have arrived, and the prefill instance frees the range
then. The emulator times the pull at the profile's device-link bandwidth; the bytes are the
prefill process's own. The emulator moves them with the host's CPU inside the call (8 ms for a
1024-token prompt's 59 MB, 50 ms when the pool's pages are touched the first time, against 1 ms
modelled on the link): on the transfer thread that cost delays only the requests being pulled,
where inline in the decode loop it stalled every step.

Several prefill instances (xPyD): a decode instance imports each one's pool ("import" with
the prefill's name as "peer" and its device; peer access where that is another device) and
each "kv" names the pool its prompt is in; a prefill instance lets every decode instance's pid
import its pool in one "allow" ("pids").

Across nodes (--kv-net ADDR, both instances): the KV goes over TCP with Mooncake's transfer
engine (kvnet.py), as a disaggregated deployment without RDMA moves it. The prefill
instance's engine registers host memory (aclrtMallocHost) as large as its KV pool; after a
request's prefill its transfer thread copies the prompt's KV device->host into the same token
range there (aclrtMemcpyAsync DEVICE_TO_HOST on a stream of its own, timed by the emulator on
the host link) and then says "handoff" with the engine's segment and the bytes' address. The
decode instance's transfer thread reads them with its engine into registered host memory of
its own (a staging buffer of --max-model-len tokens, in chunks for a longer prompt) and copies
them host->device into its pool (HOST_TO_DEVICE); the request is "taken" once they are there,
and the prefill instance then frees the range. "stats" counts the bytes each way (d2h_bytes,
net_bytes, h2d_bytes). With --kv-check the prefill instance first fills the prompt's range
with a byte of the request's own (aclrtMemsetAsync, id % 251 + 1) and the decode instance
reads the head and tail of each chunk back from its pool (aclrtMemcpy DEVICE_TO_HOST) once
it is there: "stats" says how many requests it checked (kv_checked) and how many had other
bytes (kv_bad), so the content that crossed is checked end to end, not only its size.

Without an import (no "import" message) the decode instance works as before the IPC calls
existed: on one device it reserves the request's whole range in its own pool and nothing moves
(the hand-off is only accounted); across devices it pulls from a window of its own on the
prefill device, whose content is not the prefill process's.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import queue
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

from flexnpu.workload import model as M
from flexnpu.workload.acl import (ACL_MEMCPY_DEVICE_TO_HOST, ACL_MEMCPY_HOST_TO_DEVICE,
                                  ACL_MEMCPY_INTER_DEVICE_TO_DEVICE, ACL_RT_IPC_MEM_IMPORT_FLAG_ENABLE_PEER_ACCESS, Acl,
                                  AclError)
from flexnpu.workload.aclnn import DEFAULT_OPS, OPS, AclnnError, AclnnOps


CHECK_BYTES = 4096  # --kv-check: bytes read back at each end of a chunk


def kv_byte(rid: int) -> int:
    """--kv-check: the byte a request's KV is filled with (never 0, which fresh memory holds)."""
    return rid % 251 + 1


class KvPool:
    """Token ranges in one device allocation: first fit, freed ranges coalesce."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.free_ranges: list[list[int]] = [[0, tokens]] if tokens > 0 else []
        self.held: dict[int, tuple[int, int]] = {}

    def reserve(self, rid: int, n: int) -> int | None:
        for r in self.free_ranges:
            if r[1] - r[0] >= n:
                start = r[0]
                r[0] += n
                if r[0] == r[1]:
                    self.free_ranges.remove(r)
                self.held[rid] = (start, n)
                return start
        return None

    def free(self, rid: int) -> None:
        start, n = self.held.pop(rid)
        self.free_ranges.append([start, start + n])
        self.free_ranges.sort()
        merged: list[list[int]] = []
        for r in self.free_ranges:
            if merged and merged[-1][1] == r[0]:
                merged[-1][1] = r[1]
            else:
                merged.append(r)
        self.free_ranges = merged

    @property
    def used(self) -> int:
        return sum(n for _, n in self.held.values())


@dataclass
class Req:
    id: int
    prompt: int
    output: int
    done: int = 0  # prompt tokens prefilled
    ctx: int = 0  # decode: tokens in the context
    left: int = 0  # decode: tokens still to generate
    kv_start: int = -1  # decode: where the prompt's KV is in the prefill instance's pool (-1: unknown)
    peer: str | None = None  # decode: the imported pool it is in (None: the only one, if any)
    segment: str = ""  # decode, --kv-net: the prefill's transfer engine holding the prompt's KV
    addr: int = 0  # ... and where in its registered memory


@dataclass
class Peer:
    """A prefill instance's KV pool, imported (decode)."""
    ptr: int
    tokens: int
    key: bytes
    device: int


class Instance:
    def __init__(self, a: argparse.Namespace) -> None:
        from flexnpu.emulator.profiles import PROFILES

        self.a = a
        self.cfg = M.model_by_name(a.model)
        prof = PROFILES[a.profile]
        self.peak, self.bw, self.eff = prof.peak_tflops * 1e12, prof.hbm_tbps * 1e12, prof.efficiency
        self.acl = Acl()
        self.out_lock = threading.Lock()
        self.inbox: queue.Queue = queue.Queue()
        self.kernels: Counter = Counter()
        self.modelled_s = 0.0
        self.steps = 0
        self.spans: list[tuple[float, float]] = []  # each step's [first launch, synchronised], monotonic s
        self.tokens = 0
        self.copied = 0
        self.waiting: deque[Req] = deque()  # to prefill
        self.prefilling: list[Req] = []  # chunked: started, not finished
        self.pending: deque[Req] = deque()  # decode: handed over, not yet admitted
        self.pulling: dict[int, Req] = {}  # decode across devices: KV pull under way
        self.pulls: queue.Queue = queue.Queue()  # (request, destination) for the transfer thread
        self.running: list[Req] = []
        self.draining = False
        self.allocs: list = []
        self.kv_key: bytes | None = None  # prefill, --kv-export: the key of its KV pool
        self.peers: dict[str, Peer] = {}  # decode: prefill instances' KV pools, imported, by name
        self.net = None  # --kv-net: this process's transfer engine (kvnet.KvNet)
        self.host_kv: int | None = None  # --kv-net: registered host memory (prefill: the pool's mirror; decode:
        # a staging buffer)
        self.host_kv_tokens = 0
        self.saves: queue.Queue = queue.Queue()  # prefill, --kv-net: (request, start) for the transfer thread
        self.d2h = self.h2d = self.net_bytes = 0
        self.kv_checked = self.kv_bad = 0  # --kv-check: requests whose KV was read back, and those wrong
        self.pull_stream = None
        self._puller_thread: threading.Thread | None = None
        self._window = None  # decode across devices without an import: its own window there
        self.nn: AclnnOps | None = None  # --ops aclnn*: the step as aclnn operator calls

    # -- io
    def emit(self, **ev) -> None:
        with self.out_lock:
            sys.stdout.write(json.dumps(ev, separators=(",", ":")) + "\n")
            sys.stdout.flush()

    def _reader(self) -> None:
        for line in sys.stdin:
            if line.strip():
                self.inbox.put(json.loads(line))
        self.inbox.put({"op": "drain"})

    def _handle(self, m: dict) -> None:
        op = m["op"]
        if op == "req":
            self.waiting.append(Req(m["id"], m["prompt"], m["output"]))
        elif op == "kv":
            self.pending.append(Req(m["id"], m["prompt"], m["output"], kv_start=m.get("kv_start", -1),
                                    peer=m.get("peer"), segment=m.get("segment", ""), addr=m.get("addr", 0)))
        elif op == "release":
            self.pool.free(m["id"])
        elif op == "allow":  # prefill: the decode instance may import the KV pool
            self.acl.set_import_pids(self.kv_key, list(m["pids"]) if "pids" in m else [m["pid"]])
            self.emit(ev="allowed")
        elif op == "import":  # decode: the prefill instance's KV pool, mapped here
            self.import_peer_kv(m["key"].encode(), m["tokens"], m.get("peer", "prefill"), m.get("device"))
        elif op == "pulled":  # the transfer thread: these requests' KV is in the pool
            for rid in m["ids"]:
                self.start_decode(self.pulling.pop(rid))
        elif op == "saved":  # the transfer thread: the prompt's KV is in registered host memory
            self.emit(ev="handoff", **m["ev"])
        elif op in ("pull-failed", "save-failed"):
            raise AclError(m["error"])
        elif op == "drain":
            self.draining = True

    # -- device
    def setup(self) -> None:
        acl, a = self.acl, self.a
        acl.call("aclInit", None)
        acl.call("aclrtSetDevice", a.device)
        self.stream = acl.handle("aclrtCreateStream")
        if a.kv_src_device is not None:
            self.pull_stream = acl.handle("aclrtCreateStream")
        with tempfile.NamedTemporaryFile("w", suffix=".fxk", delete=False) as f:
            f.write(M.kernel_library_text())
        self.binary = acl.handle("aclrtBinaryLoadFromFile", f.name.encode(), None)
        os.unlink(f.name)
        self.funcs = {n: acl.handle("aclrtBinaryGetFunction", self.binary, n.encode()) for n in M.KERNEL_BUILTINS}
        if a.ops != "kernels":
            self.nn = AclnnOps(self.cfg, acl, lambda k: acl.launch(self.funcs[k.name], k.args, self.stream),
                               fia=a.ops == "aclnn-fia")
        if a.weights:
            self.allocs.append(acl.malloc(self.cfg.weight_bytes))
        kv_tokens = a.kv_tokens
        if kv_tokens <= 0:  # like gpu_memory_utilization: a share of what is free now
            free, _ = acl.mem_info()
            kv_tokens = int(free * a.kv_mem_share) // self.cfg.kv_bytes_per_token
        self.kv_base = acl.malloc(max(kv_tokens, 1) * self.cfg.kv_bytes_per_token)
        self.pool = KvPool(kv_tokens)
        if a.kv_export:  # shared with the decode instance through IPC memory, once
            self.kv_key = acl.export_key(self.kv_base, max(kv_tokens, 1) * self.cfg.kv_bytes_per_token)
        if a.kv_net:
            self.setup_net(kv_tokens)
        self.pid = acl.bare_tgid()  # as the device sees it: what the emulator reports, and imports are granted to
        self.emit(ev="ready", pid=self.pid, kv_tokens=kv_tokens,
                  kv_key=self.kv_key.decode() if self.kv_key else None, kv_ptr=self.kv_base.value,
                  segment=self.net.segment if self.net else None)

    def setup_net(self, kv_tokens: int) -> None:
        """--kv-net: the transfer engine and its registered host memory: for prefill a mirror
        of the KV pool (a request's KV goes to its own token range there), for decode a
        staging buffer of --max-model-len tokens."""
        from flexnpu.workload.kvnet import KvNet, KvNetError

        try:
            self.net = KvNet(self.a.kv_net, self.a.kv_net_log)
        except KvNetError as e:
            raise AclError(str(e)) from None
        self.host_kv_tokens = max(kv_tokens if self.a.role == "prefill" else self.a.max_model_len, 1)
        size = self.host_kv_tokens * self.cfg.kv_bytes_per_token
        self.host_kv = self.acl.malloc_host(size).value
        try:
            self.net.register(self.host_kv, size)
        except KvNetError as e:
            raise AclError(str(e)) from None
        self.ensure_pull_stream()

    def ensure_pull_stream(self) -> None:
        """The transfer stream (decode: pulls; prefill --kv-net: saves), made once."""
        if self.pull_stream is None:
            self.pull_stream = self.acl.handle("aclrtCreateStream")

    def import_peer_kv(self, key: bytes, tokens: int, name: str = "prefill", device: int | None = None) -> None:
        """Maps a prefill instance's KV pool: on this device, or on another one (its device,
        or --kv-src-device) with peer access."""
        if device is None:
            device = self.a.kv_src_device if self.a.kv_src_device is not None else self.a.device
        flags = ACL_RT_IPC_MEM_IMPORT_FLAG_ENABLE_PEER_ACCESS if device != self.a.device else 0
        ptr = self.acl.import_key(key, flags).value
        self.peers[name] = Peer(ptr, tokens, key, device)
        if device != self.a.device:
            self.ensure_pull_stream()
        self.emit(ev="imported", bytes=tokens * self.cfg.kv_bytes_per_token, ptr=ptr, peer=name)

    def peer_of(self, r: Req) -> Peer | None:
        """The imported pool a request's prompt KV is in (None: no import)."""
        if r.peer is not None:
            if r.peer not in self.peers:
                raise AclError(f"request {r.id}: no KV pool imported from {r.peer}")
            return self.peers[r.peer]
        return next(iter(self.peers.values()), None) if len(self.peers) == 1 else None

    def shared(self, r: Req) -> bool:
        """Whether the request's prompt KV stays where prefill wrote it (same device, imported)."""
        if r.segment:
            return False
        peer = self.peer_of(r)
        return peer is not None and peer.device == self.a.device

    def window(self) -> tuple[int, int]:
        """Where cross-device pulls read from: the imported pool, or else a window of this
        process's own on the prefill device (tokens); made on first use."""
        if self._window is None:
            self.acl.call("aclrtSetDevice", self.a.kv_src_device)
            self._window = self.acl.malloc(self.a.max_model_len * self.cfg.kv_bytes_per_token)
            self.acl.call("aclrtSetDevice", self.a.device)  # the puller's thread: its current device again
            self.allocs.append(self._window)
        return self._window.value, self.a.max_model_len

    def run_step(self, chunks: tuple, decode_ctx: tuple) -> float:
        t0 = time.monotonic()
        ks = M.step_kernels(self.cfg, chunks, decode_ctx)
        launch, funcs, stream, nn = self.acl.launch, self.funcs, self.stream, self.nn
        if nn is not None:
            nn.begin_step()
            for k in ks:
                self.kernels[nn.run(k, stream)] += 1
        else:
            for k in ks:
                launch(funcs[k.name], k.args, stream)
                self.kernels[k.name] += 1
        self.modelled_s += M.step_seconds(ks, self.peak, self.bw, self.eff)
        self.acl.call("aclrtSynchronizeStream", stream)
        self.steps += 1
        t1 = time.monotonic()
        self.spans.append((round(t0, 6), round(t1, 6)))
        return t1

    # -- scheduling
    def prefill_need(self, r: Req) -> int:
        return r.prompt if self.a.role == "prefill" else r.prompt + r.output

    def schedule(self) -> tuple[list[tuple[Req, M.Chunk]], list[Req]]:
        a = self.a
        budget = a.chunk_tokens or a.max_batched_tokens
        decoding = self.running[: a.max_num_seqs] if a.role != "prefill" else []
        budget -= len(decoding)
        chunks: list[tuple[Req, M.Chunk]] = []
        for r in list(self.prefilling):  # chunked prompts under way go first
            if budget <= 0:
                break
            n = min(r.prompt - r.done, budget)
            chunks.append((r, M.Chunk(n, r.done + n, r.done + n == r.prompt)))
            budget -= n
        while self.waiting and budget > 0:
            r = self.waiting[0]
            if a.role == "mixed" and len(self.running) + len(self.prefilling) >= a.max_num_seqs:
                break
            n = min(r.prompt, budget) if a.chunk_tokens else r.prompt
            if not a.chunk_tokens and n > budget and chunks:
                break  # a whole prompt waits for the next step's budget
            if self.pool.reserve(r.id, self.prefill_need(r)) is None:
                break  # no KV space: first come, first served, so everyone behind waits too
            self.waiting.popleft()
            if n < r.prompt:
                self.prefilling.append(r)
            chunks.append((r, M.Chunk(n, n, n == r.prompt)))
            budget -= n
        return chunks, decoding

    def admit_decode(self) -> None:
        a = self.a
        while self.pending and len(self.running) + len(self.pulling) < a.max_num_seqs:
            r = self.pending[0]
            shared = self.shared(r)  # prompt KV stays in prefill's pool
            peer = self.peer_of(r)
            if shared and not 0 <= r.kv_start <= peer.tokens - r.prompt:
                raise AclError(f"request {r.id}: KV at {r.kv_start} is outside the imported pool")
            start = self.pool.reserve(r.id, r.output if shared else r.prompt + r.output)
            if start is None:
                break
            self.pending.popleft()
            if shared or (not r.segment and peer is None and a.kv_src_device is None):
                self.start_decode(r)
            else:  # pull the prompt's KV over the device link; it decodes once the bytes are here
                self.pulling[r.id] = r
                self.start_puller()
                self.pulls.put((r, self.kv_base.value + start * self.cfg.kv_bytes_per_token))

    def start_decode(self, r: Req) -> None:
        r.ctx, r.left = r.prompt + 1, r.output - 1
        self.running.append(r)
        self.emit(ev="taken", id=r.id, t=time.monotonic())

    def start_puller(self) -> None:
        if self._puller_thread is None:
            self.ensure_pull_stream()
            self._puller_thread = threading.Thread(target=self._puller, daemon=True)
            self._puller_thread.start()

    def _puller(self) -> None:
        """The transfer thread: pulls each request's KV on the transfer stream, in hand-off order,
        and hands the request back to the decode loop through its inbox once it is there."""
        acl, kvb = self.acl, self.cfg.kv_bytes_per_token
        try:
            acl.call("aclrtSetDevice", self.a.device)  # the current device is per thread
            while (job := self.pulls.get()) is not None:  # None: the decode loop is done
                r, dst = job
                if r.segment:
                    self._pull_net(r, dst)
                    self.inbox.put({"op": "pulled", "ids": [r.id]})
                    continue
                peer = self.peer_of(r)
                if peer is not None:  # the prompt's own KV, where prefill wrote it
                    src, tokens = peer.ptr, peer.tokens
                    if not 0 <= r.kv_start <= tokens - r.prompt:
                        raise AclError(f"request {r.id}: KV at {r.kv_start} is outside the imported pool")
                    src += r.kv_start * kvb
                else:
                    src, tokens = self.window()
                left, off = r.prompt * kvb, 0
                while left > 0:
                    n = min(left, tokens * kvb)
                    acl.call("aclrtMemcpyAsync", dst + off, n, src, n, ACL_MEMCPY_INTER_DEVICE_TO_DEVICE,
                             self.pull_stream)
                    left, off, self.copied = left - n, off + n, self.copied + n
                acl.call("aclrtSynchronizeStream", self.pull_stream)
                self.inbox.put({"op": "pulled", "ids": [r.id]})
        except AclError as e:
            self.inbox.put({"op": "pull-failed", "error": str(e)})
        except Exception as e:  # the transfer engine's own failure (kvnet.KvNetError)
            self.inbox.put({"op": "pull-failed", "error": f"KV over the network: {e}"})

    def _pull_net(self, r: Req, dst: int) -> None:
        """--kv-net: the prompt's KV from the prefill's engine into the staging buffer, then
        host->device into the pool, a staging buffer at a time."""
        kvb = self.cfg.kv_bytes_per_token
        left, off, step = r.prompt * kvb, 0, self.host_kv_tokens * kvb
        bad = False
        while left > 0:
            n = min(left, step)
            self.net.read(r.segment, self.host_kv, r.addr + off, n)
            self.acl.call("aclrtMemcpyAsync", dst + off, n, self.host_kv, n, ACL_MEMCPY_HOST_TO_DEVICE,
                          self.pull_stream)
            self.acl.call("aclrtSynchronizeStream", self.pull_stream)  # the staging buffer is free again
            if self.a.kv_check:
                bad = bad or not self._read_back(r, dst + off, n)
            left, off = left - n, off + n
            self.net_bytes += n
            self.h2d += n
        if self.a.kv_check:
            self.kv_checked += 1
            self.kv_bad += bad

    def _read_back(self, r: Req, at: int, n: int) -> bool:
        """--kv-check: whether the head and tail of a chunk in the pool hold the request's byte."""
        k = min(n, CHECK_BYTES)
        buf = ctypes.create_string_buffer(k)
        want = bytes([kv_byte(r.id)]) * k
        ok = True
        for src in {at, at + n - k}:
            self.acl.call("aclrtMemcpy", ctypes.addressof(buf), k, src, k, ACL_MEMCPY_DEVICE_TO_HOST)
            self.d2h += k
            ok = ok and buf.raw == want
        return ok

    def _saver(self) -> None:
        """Prefill, --kv-net: the transfer thread that copies each prefilled prompt's KV
        device->host into the registered mirror of its range, then says "handoff" (through
        the loop's inbox, so that it comes after the request's "first")."""
        acl, kvb = self.acl, self.cfg.kv_bytes_per_token
        try:
            acl.call("aclrtSetDevice", self.a.device)
            while (job := self.saves.get()) is not None:
                r, start, t = job
                n, host = r.prompt * kvb, self.host_kv + start * kvb
                if self.a.kv_check:  # the request's own byte, for the decode instance to find
                    acl.call("aclrtMemsetAsync", self.kv_base.value + start * kvb, n, kv_byte(r.id), n,
                             self.pull_stream)
                acl.call("aclrtMemcpyAsync", host, n, self.kv_base.value + start * kvb, n, ACL_MEMCPY_DEVICE_TO_HOST,
                         self.pull_stream)
                acl.call("aclrtSynchronizeStream", self.pull_stream)
                self.d2h += n
                self.inbox.put({"op": "saved", "ev": {"id": r.id, "t": t, "kv_start": start,
                                                       "segment": self.net.segment, "addr": host, "bytes": n}})
        except AclError as e:
            self.inbox.put({"op": "save-failed", "error": str(e)})

    def step(self) -> bool:
        """One engine step; False when there was nothing to do."""
        if self.a.role == "decode":
            self.admit_decode()
            chunks, decoding = [], self.running[: self.a.max_num_seqs]
        else:
            chunks, decoding = self.schedule()
        if not chunks and not decoding:
            return False
        t = self.run_step(tuple(c for _, c in chunks), tuple(r.ctx for r in decoding))
        for r, c in chunks:
            r.done += c.q_len
            if not c.last:
                continue
            if r in self.prefilling:
                self.prefilling.remove(r)
            self.tokens += 1
            self.emit(ev="first", id=r.id, t=t)
            if r.output <= 1:
                self.pool.free(r.id)
            elif self.a.role == "prefill" and self.net is not None:
                self.saves.put((r, self.pool.held[r.id][0], t))  # "handoff" once the KV is in host memory
            elif self.a.role == "prefill":
                self.emit(ev="handoff", id=r.id, t=t, kv_start=self.pool.held[r.id][0])
            else:
                r.ctx, r.left = r.prompt + 1, r.output - 1
                self.running.append(r)
        if decoding:
            self.tokens += len(decoding)
            for r in decoding:
                r.ctx += 1
                r.left -= 1
                if r.left <= 0:
                    self.running.remove(r)
                    self.pool.free(r.id)
                    if self.shared(r):
                        self.emit(ev="done", id=r.id)  # its prompt KV in prefill's pool may go (before "tokens")
            self.emit(ev="tokens", t=t, ids=[r.id for r in decoding])
        return True

    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.pending or self.running or self.pulling or
                    (self.a.role == "prefill" and self.pool.held))

    def serve(self) -> None:
        threading.Thread(target=self._reader, daemon=True).start()
        saver = None
        if self.a.role == "decode" and self.pull_stream is not None:
            self.start_puller()
        elif self.a.role == "prefill" and self.net is not None:
            saver = threading.Thread(target=self._saver, daemon=True)
            saver.start()
        while True:
            try:
                while True:
                    self._handle(self.inbox.get_nowait())
            except queue.Empty:
                pass
            if self.step():
                continue
            if self.draining and not self.busy():
                break
            self._handle(self.inbox.get())  # nothing runnable: wait for the next message
        if self._puller_thread is not None:
            self.pulls.put(None)
            self._puller_thread.join()
        if saver is not None:
            self.saves.put(None)
            saver.join()
        self.emit(ev="stats", pid=self.pid, role=self.a.role, ops=self.a.ops, kernels=dict(self.kernels),
                  operators=dict(self.nn.calls) if self.nn else {}, modelled_s=self.modelled_s, steps=self.steps,
                  tokens=self.tokens, copied_bytes=self.copied, step_spans=self.spans,
                  kv_pool_bytes=max(self.pool.tokens, 1) * self.cfg.kv_bytes_per_token,
                  d2h_bytes=self.d2h, h2d_bytes=self.h2d, net_bytes=self.net_bytes,
                  net_reads=self.net.reads if self.net else 0, segment=self.net.segment if self.net else None,
                  kv_checked=self.kv_checked, kv_bad=self.kv_bad)

    def close(self) -> None:
        acl = self.acl
        if self.nn is not None:
            self.nn.close()
        for peer in self.peers.values():  # an importer closes first (CANN's order)
            acl.call("aclrtIpcMemClose", peer.key)
        if self.net is not None:
            self.net.close()
            acl.call("aclrtFreeHost", self.host_kv)
        if self.kv_key is not None:
            acl.call("aclrtIpcMemClose", self.kv_key)
        for p in self.allocs + [self.kv_base]:
            acl.call("aclrtFree", p)
        acl.call("aclrtBinaryUnLoad", self.binary)
        acl.call("aclrtDestroyStream", self.stream)
        if self.pull_stream is not None:
            acl.call("aclrtDestroyStream", self.pull_stream)
        acl.call("aclFinalize")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flexnpu.workload.instance", description=__doc__.split("\n\n")[0])
    p.add_argument("--role", choices=("prefill", "decode", "mixed"), required=True)
    p.add_argument("--model", default="qwen2.5-7b", help="a model name, or NAME:LAYERS")
    p.add_argument("--profile", default="910b", help="device profile whose efficiencies the modelled time uses")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--kv-src-device", type=int, default=None,
                   help="decode: the prefill instance's device, when it is another one")
    p.add_argument("--kv-net", metavar="ADDR", default=None,
                   help="KV across nodes: this node's address for the transfer engine (Mooncake, TCP)")
    p.add_argument("--kv-net-log", default=None,
                   help="--kv-net: where the engine's start-up lines go (default: nowhere)")
    p.add_argument("--kv-check", action="store_true",
                   help="--kv-net: fill each prompt's KV with a byte of its own (prefill) and read it back (decode)")
    p.add_argument("--kv-export", action="store_true",
                   help="prefill: export the KV pool (IPC memory) for the decode instance to import")
    p.add_argument("--chunk-tokens", type=int, default=0, help="chunked prefill: tokens per step (0: whole prompts)")
    p.add_argument("--max-batched-tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--kv-tokens", type=int, default=0, help="KV pool size in tokens (0: --kv-mem-share of free memory)")
    p.add_argument("--kv-mem-share", type=float, default=0.9)
    p.add_argument("--no-weights", dest="weights", action="store_false", help="do not allocate the weights")
    p.add_argument("--ops", choices=OPS, default=DEFAULT_OPS,
                   help="kernels: the step's kernels through aclrtLaunchKernel; aclnn: as CANN aclnn operators "
                        "(PromptFlashAttention / IncreFlashAttention by phase); aclnn-fia: aclnn operators with "
                        "FusedInferAttentionScore for every phase, as vllm-ascend")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    inst = Instance(parse_args(argv))
    try:
        inst.setup()
        inst.serve()
        inst.close()
    except (AclError, AclnnError) as e:
        print(f"flexnpu.workload.instance: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
