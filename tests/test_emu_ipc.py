"""IPC memory on the emulated device (docs/emulator.md, "IPC memory"): real processes share
device memory through aclrtIpcMemGetExportKey / aclrtIpcMemImportByKey against the real
server, see each other's writes with nothing copied, are refused unless the exporter allowed
them, and nothing leaks when either side is killed.

The peers are tests/progs/ipc_peer.c (C) and tests/progs/ipc_ctypes.py (Python, ctypes).
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_daemon_fixtures import wait_for

PROGS = Path(__file__).resolve().parent / "progs"
REPO = Path(__file__).resolve().parents[1]
PAGE = 4096
MIB = 1 << 20

PARAM_INVALID = 100000  # ACL_ERROR_INVALID_PARAM
RT_PARAM_INVALID = 107000  # ACL_ERROR_RT_PARAM_INVALID
FEATURE_NOT_SUPPORT = 207000  # ACL_ERROR_RT_FEATURE_NOT_SUPPORT
NO_PERMISSION = 207006  # ACL_ERROR_RT_NO_PERMISSION
OVER_LIMIT = 207012  # ACL_ERROR_RT_OVER_LIMIT
REFUSED = 507899  # ACL_ERROR_RT_DRV_INTERNAL_ERROR: no such key, or not for this process
NO_VALIDATION = 1  # ACL_RT_IPC_MEM_EXPORT_FLAG_DISABLE_PID_VALIDATION
PEER_ACCESS = 1  # ACL_RT_IPC_MEM_IMPORT_FLAG_ENABLE_PEER_ACCESS
D2D, INTER_D2D = 3, 7  # aclrtMemcpyKind


def page_round(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def copies(c: dict) -> tuple[int, int]:
    """(copy ops, bytes copied in every direction) of a status client record."""
    return c["ops"]["copy"], sum(c["bytes_copied"].values())


def server_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.fixture
def peer(spawn, acl_programs):
    """peer(device=0): an ipc_peer.c process, ready."""

    def start(device: int = 0):
        p = spawn([acl_programs["ipc_peer"], "--device", device])
        assert p.read()["ready"]
        return p

    return start


def ok(reply: dict) -> dict:
    assert reply["rc"] == 0, reply
    return reply


def share(a, b, size: int, flags: int = 0) -> tuple[str, int]:
    """a allocates `size` bytes and exports them to b: (key, b's handle)."""
    h = ok(a.ask(f"malloc {size}"))["h"]
    key = ok(a.ask(f"export {h} 0 {size} {flags}"))["key"]
    if not flags:
        ok(a.ask(f"setpid {key} {b.pid}"))
    hb = ok(b.ask(f"import {key} 0 {size}"))["h"]
    return key, hb


def test_shared_memory_sees_writes_both_ways_and_nothing_is_copied(emulator, peer):
    emu = emulator()
    a, b = peer(), peer()
    size = 3 * MIB + 5
    assert ok(b.ask("pid"))["pid"] == b.pid  # aclrtDeviceGetBareTgid: the pid the device sees
    ha = ok(a.ask(f"malloc {size}"))["h"]
    ok(a.ask(f"fill {ha} 0 {size} 90"))  # written before the export: it moves with it
    before = {p.pid: copies(emu.client(p.pid)) for p in (a, b)}
    key = ok(a.ask(f"export {ha} 0 {size} 0"))["key"]
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    ok(a.ask(f"setpid {key} {b.pid}"))
    imp = ok(b.ask(f"import {key} 0 {size}"))
    hb = imp["h"]

    # the hand-off: no device op, no byte copied, memory accounted once
    for p in (a, b):
        assert copies(emu.client(p.pid)) == before[p.pid]
    dev = emu.device()
    assert dev["memory"]["used"] == page_round(size) and dev["memory"]["ipc_held"] == 0
    assert emu.client(a.pid)["ipc"] == {"exports": 1, "export_bytes": page_round(size), "imports": 0,
                                        "import_bytes": 0}
    assert emu.client(b.pid)["ipc"] == {"exports": 0, "export_bytes": 0, "imports": 1,
                                        "import_bytes": page_round(size)}
    assert emu.client(b.pid)["memory_used"] == 0
    # and `flexnpu emu status` says so, a line per process
    text = subprocess.run([sys.executable, "-m", "flexnpu.cli", "emu", "status"], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "FLEXNPU_RUNTIME_DIR": str(emu.rdir),
                                           "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                                           "COLUMNS": "100"}).stdout
    mib = f"{page_round(size) / MIB:.1f}"
    assert f"{a.pid}: IPC memory exported 1 ({mib} MiB), imported 0 (0.0 MiB)" in text, text
    assert f"{b.pid}: IPC memory exported 0 (0.0 MiB), imported 1 ({mib} MiB)" in text, text

    # the exporter's bytes, in the importer
    r = ok(b.ask(f"read {hb} 0 {size}"))
    assert r["first"] == 90 and r["same"]
    # importer -> exporter: a kernel's output, a memset, a copy
    hsrc = ok(b.ask(f"malloc {PAGE}"))["h"]
    ok(b.ask(f"fill {hsrc} 0 {PAGE} 34"))
    ok(b.ask(f"kernel {hb} {hsrc} {PAGE}"))
    ok(b.ask(f"memset {hb} 8192 1000 17"))
    ok(b.ask(f"copy {hb} {hsrc} 100 {D2D} async"))
    r = ok(a.ask(f"read {ha} 100 {PAGE - 100}"))
    assert r["first"] == 34 and r["same"]
    r = ok(a.ask(f"read {ha} 0 100"))
    assert r["first"] == 34 and r["same"]
    r = ok(a.ask(f"read {ha} 8192 1000"))
    assert r["first"] == 17 and r["same"]
    # exporter -> importer, through the exporter's own pointer
    ok(a.ask(f"memset {ha} 20000 3000 51"))
    r = ok(b.ask(f"read {hb} 20000 3000"))
    assert r["first"] == 51 and r["same"]
    # an imported range is checked like an allocation: not one byte past what was exported
    assert b.ask(f"read {hb} {size - 10} 20")["rc"] == PARAM_INVALID
    assert ok(b.ask(f"read {hb} {size - 10} 10"))["first"] == 90

    ok(b.ask(f"close {key}"))
    assert emu.client(b.pid)["ipc"]["imports"] == 0
    assert b.ask(f"read {hb} 0 16")["rc"] == PARAM_INVALID  # not device memory any more
    ok(a.ask(f"close {key}"))
    r = ok(a.ask(f"read {ha} 0 16"))  # the allocation is the exporter's until it frees it
    assert r["first"] == 34
    ok(a.ask(f"free {ha}"))
    assert emu.device()["memory"]["used"] == page_round(PAGE)  # b's own buffer
    assert emu.client(a.pid)["ipc"]["exports"] == 0


def test_a_freed_export_reads_zeros_when_its_offsets_are_allocated_again(emulator, peer):
    """After the free, the exporter's addresses are its own memory again: a new allocation
    there neither shows the old bytes nor reaches the memory an importer still maps."""
    emu = emulator()
    a, b = peer(), peer()
    key, hb = share(a, b, 2 * PAGE)
    ok(b.ask(f"memset {hb} 0 {2 * PAGE} 7"))
    ok(a.ask("free 0"))  # before the importer closed: CANN leaves this undefined
    assert emu.device()["memory"]["ipc_held"] == 2 * PAGE
    h2 = ok(a.ask(f"malloc {2 * PAGE}"))["h"]  # first fit: the freed offsets are still held
    assert emu.device()["memory"]["used"] == 4 * PAGE
    ok(a.ask(f"memset {h2} 0 {2 * PAGE} 9"))
    r = ok(b.ask(f"read {hb} 0 {2 * PAGE}"))
    assert r["first"] == 7 and r["same"]  # the importer's memory is still its, untouched
    ok(b.ask(f"close {key}"))
    assert emu.device()["memory"] == {"total": emu.device()["memory"]["total"], "used": 2 * PAGE, "ipc_held": 0}
    h3 = ok(a.ask(f"malloc {2 * PAGE}"))["h"]  # now at the offsets the export had
    r = ok(a.ask(f"read {h3} 0 {2 * PAGE}"))
    assert r["first"] == 0 and r["same"]


def test_only_the_listed_pid_may_import(emulator, peer):
    emu = emulator()
    a, b, c = peer(), peer(), peer()
    ha = ok(a.ask(f"malloc {MIB}"))["h"]
    ok(a.ask(f"fill {ha} 0 {MIB} 5"))
    key = ok(a.ask(f"export {ha} 0 {MIB} 0"))["key"]
    r = b.ask(f"import {key} 0 {MIB}")  # nobody listed yet
    assert r["rc"] == REFUSED and r["untouched"], r
    ok(a.ask(f"setpid {key} {c.pid}"))
    r = b.ask(f"import {key} 0 {MIB}")  # c listed, not b
    assert r["rc"] == REFUSED and r["untouched"], r
    assert emu.client(b.pid)["ipc"]["imports"] == 0
    # and no mapping: nothing of the export in b's address space
    maps = Path(f"/proc/{b.pid}/maps").read_text()
    assert "flexnpu-emu-ipc" not in maps
    hc = ok(c.ask(f"import {key} 0 {MIB}"))["h"]
    assert ok(c.ask(f"read {hc} 0 {MIB}"))["first"] == 5
    assert "flexnpu-emu-ipc" in Path(f"/proc/{c.pid}/maps").read_text()
    # only the exporter sets the list
    assert c.ask(f"setpid {key} {b.pid}")["rc"] == NO_PERMISSION
    assert b.ask(f"import {key} 0 {MIB}")["rc"] == REFUSED


def test_without_pid_validation_the_exporters_user_may_import(emulator, peer):
    emulator()
    a, b = peer(), peer()
    key, hb = share(a, b, MIB, NO_VALIDATION)  # both root: same user
    ok(b.ask(f"memset {hb} 0 {MIB} 3"))
    assert ok(a.ask(f"read 0 0 {MIB}"))["first"] == 3
    assert a.ask(f"setpid {key} {b.pid}")["rc"] == NO_PERMISSION  # the list is off for this key


def test_python_ctypes_exports_and_c_imports(emulator, spawn, peer, acl_env):
    emu = emulator()
    env = {**acl_env, "PYTHONPATH": str(REPO)}
    py = spawn([sys.executable, PROGS / "ipc_ctypes.py"], env=env)
    assert py.read()["pid"] == py.pid
    c = peer()
    ok(py.ask(f"malloc {PAGE + 1} 66"))
    key = ok(py.ask("export 0"))["key"]
    ok(py.ask(f"setpid {key} {c.pid}"))
    hc = ok(c.ask(f"import {key} 0 {PAGE + 1}"))["h"]
    assert ok(c.ask(f"read {hc} 0 {PAGE + 1}"))["first"] == 66
    ok(c.ask(f"memset {hc} 0 {PAGE + 1} 12"))
    ok(py.ask(f"setpid {key} {py.pid}"))
    r = ok(py.ask(f"import {key} 0 {PAGE + 1}"))  # its own key: a second mapping of the same bytes
    assert r["first"] == 12 and r["same"]
    assert emu.client(py.pid)["ipc"]["imports"] == 1 and emu.client(c.pid)["ipc"]["imports"] == 1


def test_across_devices_peer_access_and_async_copies_only(emulator, peer):
    emu = emulator(devices=2)
    a, b = peer(0), peer(1)
    h = ok(a.ask(f"malloc {MIB}"))["h"]
    ok(a.ask(f"fill {h} 0 {MIB} 44"))
    key = ok(a.ask(f"export {h} 0 {MIB} 0"))["key"]
    ok(a.ask(f"setpid {key} {b.pid}"))
    assert b.ask(f"import {key} 0 {MIB}")["rc"] == FEATURE_NOT_SUPPORT  # peer access not asked for
    hb = ok(b.ask(f"import {key} {PEER_ACCESS} {MIB}"))["h"]
    own = ok(b.ask(f"malloc {MIB}"))["h"]
    # CANN: no host<->device copy, no inferred direction, no synchronous copy of such memory
    assert b.ask(f"read {hb} 0 16")["rc"] == FEATURE_NOT_SUPPORT
    assert b.ask(f"read {hb} 0 16 async")["rc"] == FEATURE_NOT_SUPPORT
    assert b.ask(f"fill {hb} 0 16 1 async")["rc"] == FEATURE_NOT_SUPPORT
    assert b.ask(f"copy {own} {hb} {MIB} {D2D}")["rc"] == FEATURE_NOT_SUPPORT
    assert b.ask(f"copy {own} {hb} {MIB} 4 async")["rc"] == FEATURE_NOT_SUPPORT
    ok(b.ask(f"copy {own} {hb} {MIB} {INTER_D2D} async"))
    r = ok(b.ask(f"read {own} 0 {MIB}"))
    assert r["first"] == 44 and r["same"]
    ok(b.ask(f"kernel {hb} {own} 64"))  # cores reach the peer's memory
    ok(b.ask(f"memset {own} 0 {MIB} 8"))
    ok(b.ask(f"copy {hb} {own} 128 {D2D} async"))
    r = ok(a.ask(f"read {h} 0 128"))
    assert r["first"] == 8 and r["same"]
    cb = emu.client(b.pid, 1)
    assert cb["ipc"]["imports"] == 1 and cb["bytes_copied"]["inter_d2d"] == MIB
    # the pull crossed the device link: on device 1's link resource, at p2p_gbps
    assert cb["busy_by_name"]["memcpy_inter_d2d"] == pytest.approx(
        MIB / (emu.profile.p2p_gbps * 1e9) * 1e9, rel=0.02)


def test_killed_exporter_importer_keeps_its_memory_until_it_closes(emulator, peer):
    emu = emulator()
    base_fds = server_fds(emu.pid)
    a, b = peer(), peer()
    key, hb = share(a, b, 5 * MIB)
    ok(b.ask(f"memset {hb} 0 {5 * MIB} 77"))
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(timeout=10)
    wait_for(lambda: not emu.client(a.pid)["alive"], 5.0, "the exporter's exit")
    dev = emu.device()
    assert dev["memory"]["used"] == 5 * MIB and dev["memory"]["ipc_held"] == 5 * MIB
    assert emu.client(a.pid)["ipc"]["exports"] == 0 and emu.client(a.pid)["memory_used"] == 0
    r = ok(b.ask(f"read {hb} 0 {5 * MIB}"))  # still valid, still the same bytes
    assert r["first"] == 77 and r["same"]
    ok(b.ask(f"memset {hb} 0 100 1"))
    c = peer()
    assert c.ask(f"import {key} 0 {MIB}")["rc"] == REFUSED  # a dead exporter's key takes no one new
    ok(b.ask(f"close {key}"))
    assert emu.device()["memory"] == {"total": dev["memory"]["total"], "used": 0, "ipc_held": 0}
    for p in (b, c):
        p.proc.stdin.write("quit\n")
        p.proc.stdin.flush()
        assert p.read() == {"bye": True}
        p.proc.wait(timeout=10)
    wait_for(lambda: server_fds(emu.pid) == base_fds, 5.0, "the server's descriptors back to where they were")


def test_killed_importer_closes_its_imports(emulator, peer):
    emu = emulator()
    base_fds = server_fds(emu.pid)
    a, b = peer(), peer()
    key, hb = share(a, b, 2 * MIB)
    ok(b.ask(f"import {key} 0 {2 * MIB}"))  # twice: CANN's runtime allows it
    assert emu.client(b.pid)["ipc"]["imports"] == 2
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait(timeout=10)
    wait_for(lambda: not emu.client(b.pid)["alive"], 5.0, "the importer's exit")
    assert emu.client(b.pid)["ipc"]["imports"] == 0
    assert emu.client(a.pid)["ipc"]["exports"] == 1
    ok(a.ask(f"close {key}"))
    ok(a.ask("free 0"))  # the last holder: the memory is free at once
    assert emu.device()["memory"]["used"] == 0 and emu.device()["memory"]["ipc_held"] == 0
    a.proc.stdin.write("quit\n")
    a.proc.stdin.flush()
    assert a.read() == {"bye": True}
    a.proc.wait(timeout=10)
    wait_for(lambda: server_fds(emu.pid) == base_fds, 5.0, "the server's descriptors back to where they were")


def test_bad_input_gets_the_runtimes_codes(emulator, peer):
    emu = emulator()
    a = peer()
    got = a.ask("badargs")
    want = {
        "export_null_ptr": PARAM_INVALID, "export_null_key": PARAM_INVALID, "export_size_0": RT_PARAM_INVALID,
        "export_len_0": RT_PARAM_INVALID, "export_len_64": RT_PARAM_INVALID, "export_bad_flags": RT_PARAM_INVALID,
        "export_interior": RT_PARAM_INVALID, "export_host_ptr": RT_PARAM_INVALID,
        "export_too_big": RT_PARAM_INVALID, "export_ok": 0, "export_twice": RT_PARAM_INVALID, "key_len": 64,
        "setpid_null_key": PARAM_INVALID, "setpid_null_pid": PARAM_INVALID, "setpid_num_0": RT_PARAM_INVALID,
        "setpid_pid_0": RT_PARAM_INVALID, "setpid_wrong_key": RT_PARAM_INVALID, "setpid_ok": 0,
        "import_null_ptr": PARAM_INVALID, "import_null_key": PARAM_INVALID, "import_bad_flags": RT_PARAM_INVALID,
        "import_wrong_key": REFUSED, "import_altered_key": REFUSED, "import_own": 0, "import_own_again": 0,
        "free_imported": PARAM_INVALID, "close_null": PARAM_INVALID, "close_wrong_key": RT_PARAM_INVALID,
        "close_import_1": 0, "close_import_2": 0, "close_export": 0, "close_twice": RT_PARAM_INVALID,
        "import_closed": REFUSED, "setpid_closed": RT_PARAM_INVALID, "export_again": 0,
        "setpid_no_validation": NO_PERMISSION, "free_exported": 0, "import_freed": REFUSED,
        "tgid_null": PARAM_INVALID,
    }
    assert got == want
    assert emu.device()["memory"] == {"total": emu.device()["memory"]["total"], "used": 0, "ipc_held": 0}
    assert emu.client(a.pid)["ipc"] == {"exports": 0, "export_bytes": 0, "imports": 0, "import_bytes": 0}


def test_keys_are_bounded_per_process(emulator, peer):
    emu = emulator()
    a = peer()
    assert a.ask("exportmany 300") == {"ok": 256, "rc": OVER_LIMIT}
    assert emu.client(a.pid)["ipc"]["exports"] == 256
    key, hb = share(peer(), a, PAGE)  # others' keys are not this one's to count
    assert emu.client(a.pid)["ipc"]["imports"] == 1


# The raw protocol (emu_shared.h): what a hostile program can send, not what the library does.
REQ = struct.Struct("<IiQQ48s")  # struct emu_req
IPC_REQ = struct.Struct("<IiQQQ65s3xI16i")  # struct emu_ipc_req
IPC_REP = struct.Struct("<iIQQ65s7x")  # struct emu_ipc_rep


def test_random_keys_and_arguments_never_crash_the_server(emulator, peer):
    emu = emulator(devices=2)
    a = peer()
    h = ok(a.ask(f"malloc {MIB}"))["h"]
    real_key = ok(a.ask(f"export {h} 0 {MIB} 0"))["key"].encode()
    rng = random.Random(20260101)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    s.connect(str(emu.rdir / "emu.sock"))
    try:
        s.send(REQ.pack(1, 0, 2, 0, b""))  # hello
        _, fds, _, _ = socket.recv_fds(s, 64, 4)
        for fd in fds:
            os.close(fd)
        s.send(REQ.pack(2, 0, 0, 0, b""))  # open device 0
        _, fds, _, _ = socket.recv_fds(s, 64, 4)
        for fd in fds:
            os.close(fd)
        granted = 0
        for i in range(3000):
            kind = rng.choice((7, 8, 9, 10, 11, 12, 12))
            key = rng.choice((real_key, real_key[:-1] + b"x", bytes(rng.randrange(256) for _ in range(65)),
                              b"", rng.randbytes(64).hex()[:64].encode()))
            msg = IPC_REQ.pack(kind, rng.choice((-1, 0, 1, 2, 99, 1 << 30)), rng.choice((0, 4096, rng.getrandbits(64))),
                               rng.choice((0, 1, 4096, MIB, rng.getrandbits(64))), rng.choice((0, 1, 2, 1 << 63)),
                               key, rng.choice((0, 1, 16, 17, 1 << 31)),
                               *[rng.choice((0, -1, os.getpid(), a.pid, rng.getrandbits(31))) for _ in range(16)])
            if i % 7 == 0:  # a truncated or oversized message
                msg = msg[: rng.randrange(1, len(msg))] if i % 2 else msg + b"\0" * rng.randrange(64)
            s.send(msg)
            reply, fds, _, _ = socket.recv_fds(s, 256, 4)
            for fd in fds:
                os.close(fd)
            assert len(reply) in (REQ.size - 48, IPC_REP.size), (i, len(reply))
            if len(reply) == IPC_REP.size:
                err = IPC_REP.unpack(reply)[0]
                granted += fds != [] and err == 0
                assert err == 0 or err >= 100000
    finally:
        s.close()
    # the server is fine, and nobody got the exporter's memory without being allowed
    assert granted == 0
    assert emu.client(a.pid)["ipc"]["exports"] == 1
    b = peer()
    ok(a.ask(f"setpid {real_key.decode()} {b.pid}"))
    assert ok(b.ask(f"import {real_key.decode()} 0 {MIB}"))["h"] == 0
    wait_for(lambda: emu.device()["memory"]["used"] == MIB, 5.0, "the fuzzing connection's memory returned")


# ---------------------------------------------------------------- another user on the node

from users_fixtures import flexnpu_group, member, open_rdir  # noqa: E402,F401 (fixtures)

def setpriv(user: str) -> list[str]:
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]


@pytest.mark.root_users
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and groups")
def test_another_user_cannot_import_even_with_the_key(flexnpu_group, member, open_rdir, emulator, spawn, peer,
                                                      acl_env):
    emu = emulator()
    owner = peer()  # root
    thief = spawn([*setpriv(member), sys.executable, PROGS / "ipc_ctypes.py"], env={**acl_env, "PYTHONPATH": str(REPO)})
    tpid = thief.read()["pid"]
    assert tpid == thief.pid  # setpriv execs: the same process
    h1 = ok(owner.ask(f"malloc {MIB}"))["h"]
    ok(owner.ask(f"fill {h1} 0 {MIB} 99"))
    key1 = ok(owner.ask(f"export {h1} 0 {MIB} 0"))["key"]
    h2 = ok(owner.ask(f"malloc {MIB}"))["h"]
    key2 = ok(owner.ask(f"export {h2} 0 {MIB} {NO_VALIDATION}"))["key"]
    assert thief.ask(f"import {key1} 0 16")["rc"] == REFUSED  # nobody listed
    ok(owner.ask(f"setpid {key1} {owner.pid}"))
    assert thief.ask(f"import {key1} 0 16")["rc"] == REFUSED  # someone else listed
    assert thief.ask(f"import {key2} 0 16")["rc"] == REFUSED  # no pid list: the exporter's user only
    assert thief.ask(f"import {key2} {PEER_ACCESS} 16")["rc"] == REFUSED
    # nor can it change who may import, or close the owner's key
    assert thief.ask(f"setpid {key1} {tpid}")["rc"] == NO_PERMISSION  # the exporter's to set
    assert thief.ask(f"close {key1}")["rc"] == RT_PARAM_INVALID
    assert emu.client(tpid)["ipc"] == {"exports": 0, "export_bytes": 0, "imports": 0, "import_bytes": 0}
    assert "flexnpu-emu-ipc" not in Path(f"/proc/{tpid}/maps").read_text()
    # named by the exporter, it may
    ok(owner.ask(f"setpid {key1} {tpid}"))
    r = ok(thief.ask(f"import {key1} 0 {MIB}"))
    assert r["first"] == 99 and r["same"]
    assert emu.client(tpid)["ipc"]["imports"] == 1


@pytest.mark.root_users
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and groups")
def test_one_user_cannot_exhaust_the_keys(flexnpu_group, member, open_rdir, emulator, spawn, acl_programs,
                                          acl_env, tmp_path_factory):
    emu = emulator()
    room = tmp_path_factory.mktemp("ipc-user")
    room.chmod(0o755)
    exe = room / "ipc_peer"
    exe.write_bytes(acl_programs["ipc_peer"].read_bytes())
    exe.chmod(0o755)
    got = []
    for _ in range(5):
        p = spawn([*setpriv(member), exe], env=acl_env)
        assert p.read()["ready"]
        got.append(p.ask("exportmany 300"))
    assert got[:4] == [{"ok": 256, "rc": OVER_LIMIT}] * 4  # each process: 256
    assert got[4] == {"ok": 0, "rc": OVER_LIMIT}  # the user: 1024
    root = spawn([acl_programs["ipc_peer"]], env=acl_env)  # others are not refused for it
    assert root.read()["ready"]
    assert root.ask("exportmany 3") == {"ok": 3, "rc": 0}
    assert sum(c["ipc"]["exports"] for c in emu.device()["clients"]) == 1027
