"""A victim and a thief for the emulator's memory isolation (tests/test_security_emu.py).

    emu_peek.py secret TEXT
        The victim: writes TEXT into a fresh device buffer of device 0 (aclrtMemcpy H2D), prints
        {"pid", "ptr", "offset", "set_device_rc"} (offset: from the start of its device memory
        mapping) and holds the buffer until stdin closes or says "quit".
    emu_peek.py thief TEXT RUNTIME_DIR VICTIM_PID SERVER_PID OFFSET PTR
        Looks for TEXT through every path this process has: its own device memory (through
        the library, and mapped from the fds the server hands out on its socket, at the
        victim's offset), the files of the runtime dir, /dev/shm, and the victim's and the
        server's /proc entries (mem, map_files, fd). Tries to resize its memory file and to map
        the device segment writable. Prints {"set_device_rc", "found": [...], "tried": {...}}.

Both load the emulated libascendcl.so through ctypes, as an unmodified Python program would.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import socket
import struct
import sys

from flexnpu import paths

ACL_MEMCPY_HOST_TO_DEVICE = 1
REQ = struct.Struct("<IiQQ48s")  # struct emu_req
REP = struct.Struct("<iIQQ")  # struct emu_rep
HELLO, OPEN_DEVICE = 1, 2
PROTO = 2


def acl():
    lib = ctypes.CDLL(str(paths.emulator_library()))
    lib.aclrtMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_int]
    lib.aclrtMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.aclInit.argtypes = [ctypes.c_char_p]
    return lib


def hbm_mapping(pid: str | int = "self", dev: int = 0) -> tuple[int, int] | None:
    """(start, end) of a process's mapping of its device memory of device dev."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if f"flexnpu-emu-hbm{dev} " in line or line.rstrip().endswith(f"flexnpu-emu-hbm{dev}"):
                lo, hi = line.split()[0].split("-")
                return int(lo, 16), int(hi, 16)
    return None


def secret(text: str) -> None:
    lib = acl()
    lib.aclInit(None)
    rc = lib.aclrtSetDevice(0)
    p = ctypes.c_void_p()
    data = text.encode()
    if rc == 0:
        assert lib.aclrtMalloc(ctypes.byref(p), 1 << 20, 0) == 0
        buf = ctypes.create_string_buffer(data)
        assert lib.aclrtMemcpy(p, 1 << 20, buf, len(data), ACL_MEMCPY_HOST_TO_DEVICE) == 0
    lo, _ = hbm_mapping() or (0, 0)
    print(json.dumps({"pid": os.getpid(), "ptr": p.value or 0, "offset": (p.value or 0) - lo,
                      "set_device_rc": rc}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break


def _errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno))


def thief(text: str, rdir: str, victim: int, server: int, offset: int, ptr: int) -> None:
    needle = text.encode()
    found: list[str] = []
    tried: dict[str, str] = {}

    def look(name: str, data: bytes) -> None:
        tried[name] = "read"
        if needle in data:
            found.append(name)

    # 1. the library: our own device memory, at the victim's offset
    lib = acl()
    lib.aclInit(None)
    rc = lib.aclrtSetDevice(0)
    if rc == 0:
        p = ctypes.c_void_p()
        lib.aclrtMalloc(ctypes.byref(p), 4096, 0)  # our memory is mapped now
        lo, hi = hbm_mapping()
        if lo + offset + 4096 <= hi:
            look("own mapping at the victim's offset", ctypes.string_at(lo + offset, 4096))
        tried["own mapping size"] = str(hi - lo)

    # 2. the socket: ask the server for a device as a client would, map what it gives
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(os.path.join(rdir, "emu.sock"))
        s.send(REQ.pack(HELLO, 0, PROTO, 0, b""))
        msg, fds, _, _ = socket.recv_fds(s, REP.size, 4)
        err = REP.unpack(msg)[0] if len(msg) == REP.size else -1
        tried["socket hello"] = f"err {err}, {len(fds)} fds"
        for fd in fds:
            os.close(fd)
        if err == 0:
            s.send(REQ.pack(OPEN_DEVICE, 0, 0, 0, b""))
            msg, fds, _, _ = socket.recv_fds(s, REP.size, 4)
            err, _, cap, _ = REP.unpack(msg)
            tried["socket open_device"] = f"err {err}, {len(fds)} fds"
            if err == 0 and len(fds) == 3:
                seg, bell, mem = fds
                try:
                    mmap.mmap(seg, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                    tried["device segment writable"] = "MAPPED"
                except OSError as e:
                    tried["device segment writable"] = _errname(e)
                for what, size in (("shrink", 4096), ("grow", cap + 4096)):
                    try:
                        os.ftruncate(mem, size)
                        tried[f"memory file {what}"] = "RESIZED"
                    except OSError as e:
                        tried[f"memory file {what}"] = _errname(e)
                page = offset & ~4095
                m = mmap.mmap(mem, 8192, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
                look("socket memory file at the victim's offset", m[:])
                m.close()
                for fd in fds:
                    os.close(fd)
    except OSError as e:
        tried["socket"] = _errname(e)
    finally:
        s.close()

    # 3. files: the runtime dir, /dev/shm
    for d in (rdir, "/dev/shm"):
        try:
            names = os.listdir(d)
        except OSError as e:
            tried[d] = _errname(e)
            continue
        for n in names:
            path = os.path.join(d, n)
            try:
                with open(path, "rb") as f:
                    look(path, f.read(64 << 20))
            except OSError as e:
                tried[path] = _errname(e)

    # 4. /proc of the victim and of the server
    for pid in (victim, server):
        try:
            with open(f"/proc/{pid}/mem", "rb") as f:
                f.seek(ptr)
                look(f"/proc/{pid}/mem", f.read(4096))
        except OSError as e:
            tried[f"/proc/{pid}/mem"] = _errname(e)
        for sub in ("map_files", "fd"):
            d = f"/proc/{pid}/{sub}"
            try:
                names = os.listdir(d)
            except OSError as e:
                tried[d] = _errname(e)
                continue
            tried[d] = f"listed {len(names)}"
            for n in names:
                try:
                    fd = os.open(os.path.join(d, n), os.O_RDONLY)
                except OSError as e:
                    tried[f"{d}/{n}"] = _errname(e)
                    continue
                try:
                    size = os.fstat(fd).st_size
                    if size > offset:
                        look(f"{d}/{n}", os.pread(fd, 4096, offset))
                except OSError as e:
                    tried[f"{d}/{n}"] = _errname(e)
                finally:
                    os.close(fd)
    print(json.dumps({"set_device_rc": rc, "found": found, "tried": tried}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "secret":
        secret(sys.argv[2])
    elif sys.argv[1] == "thief":
        a = sys.argv[2:]
        thief(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), int(a[5]))
    else:
        sys.exit(__doc__)
