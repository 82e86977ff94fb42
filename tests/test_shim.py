"""The LD_PRELOAD shim in real AscendCL programs against the emulator's real device server,
with no forwarding daemon: it must be invisible (same results, same device work), map
virtual devices, enforce the memory quota, and say what it does only when asked.

Programs: sample_acl (the shipped sample), fwd_dlopen (dlopen + dlsym, never linked with the
runtime), fwd_threads (threads with their own streams), fwd_probe (device count, device id,
meminfo and allocation codes as JSON).
"""

from __future__ import annotations

import socket
import threading

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from forward_fixtures import (  # noqa: F401  (fixtures are used by name)
    Run,
    client_record,
    devices_of,
    fwd_programs,
    plain_env,
    run_both,
    run_program,
    shim_env,
    work_of,
)

MiB = 1 << 20
NO_GATE = "running without a gate"
INVALID_DEVICE, OUT_OF_MEMORY = 107001, 207001


def workload_argv(progs: dict[str, Path], klib: Path, name: str, device: int = 0) -> list:
    return {
        "sample_acl": [progs["sample_acl"], klib, device, 3],
        "fwd_dlopen": [progs["fwd_dlopen"], klib, device],
        "fwd_threads": [progs["fwd_threads"], klib, device],
    }[name]


def assert_same_device_work(status: dict, plain: Run, shimmed: Run, device: int = 0) -> dict:
    a, b = client_record(status, plain.pid, device), client_record(status, shimmed.pid, device)
    assert a is not None, f"pid {plain.pid} is not a client of device {device}"
    assert b is not None, f"pid {shimmed.pid} (with the shim) is not a client of device {device}"
    assert work_of(b) == work_of(a)
    return a


# ---------------------------------------------------------------- invisible


@pytest.mark.parametrize("name", ["sample_acl", "fwd_dlopen", "fwd_threads"])
def test_same_results_and_device_work_with_and_without_the_shim(
        name: str, emulator, fwd_programs, kernel_library, run_both) -> None:
    emu = emulator(devices=1)
    plain, shimmed = run_both(workload_argv(fwd_programs, kernel_library, name))
    plain.ok(), shimmed.ok()
    assert shimmed.stdout == plain.stdout
    assert shimmed.stderr == plain.stderr == ""
    status = emu.status()
    work = assert_same_device_work(status, plain, shimmed)
    if name == "sample_acl":
        assert "all results correct" in plain.stdout
        assert work["ops"]["kernel"] == 5 * 3
        return
    doc = plain.json()
    assert doc["ok"] is True
    counts, nbytes = doc["counts"], doc["bytes"]
    # the emulator saw exactly the calls the program counted
    assert work["ops"]["kernel"] == counts["kernel"]
    assert work["ops"]["copy"] == counts["memcpy_h2d"] + counts["memcpy_d2h"]
    assert work["bytes_copied"]["h2d"] == nbytes["h2d"] and work["bytes_copied"]["d2h"] == nbytes["d2h"]
    assert work["allocs"] == counts["malloc"] and work["frees"] == counts["free"]
    if name == "fwd_dlopen":
        assert doc["symbols"] == 23
        # 5 iterations: every count a prime
        assert counts == {"kernel": 17, "memcpy_h2d": 23, "memcpy_d2h": 11, "memset": 5, "event_record": 5,
                          "event_wait": 5, "sync": 13, "malloc": 7, "free": 7}
        assert work["ops"]["memset"] == 5 and work["ops"]["event_record"] == 5 and work["ops"]["event_wait"] == 5
        assert work["memset_bytes"] == nbytes["memset"]
    else:
        # 3 threads x 7 iterations x 5 kernels + 2 x 2 on the main thread: primes
        assert counts == {"kernel": 109, "memcpy_h2d": 23, "memcpy_d2h": 23, "sync": 23, "malloc": 8, "free": 8,
                          "stream": 4, "set_device": 3, "set_context": 1}


def test_dlopen_program_is_not_linked_with_the_runtime(fwd_programs) -> None:
    if shutil.which("readelf") is None:
        pytest.fail("readelf is needed (apt-get install binutils)", pytrace=False)
    dyn = subprocess.run(["readelf", "-d", str(fwd_programs["fwd_dlopen"])], capture_output=True, text=True,
                         check=True).stdout
    assert "libascendcl" not in dyn


def test_dlsym_hands_out_the_wrappers(emulator, fwd_programs, kernel_library, shim_env) -> None:
    """fwd_dlopen finds every function with dlsym, so only the shim's dlsym can put the quota
    and the device map in its way: both must take effect."""
    emu = emulator(devices=4)
    prog = fwd_programs["fwd_dlopen"]
    mapped = run_program([prog, kernel_library, 1], {**shim_env, "FLEXNPU_DEVICES": "2,3"}).ok()
    assert mapped.json()["device"] == 1  # aclrtGetDevice through dlsym: the virtual id
    assert devices_of(emu.status(), mapped.pid) == [3]
    capped = run_program([prog, kernel_library], {**shim_env, "FLEXNPU_MEM_QUOTA": "1K"})
    assert capped.rc == 1
    assert "aclrtMalloc" in capped.stderr and f"failed: {OUT_OF_MEMORY}" in capped.stderr


# ---------------------------------------------------------------- device map


def test_device_map_count_ids_and_refusal(emulator, fwd_programs, plain_env, shim_env) -> None:
    emu = emulator(devices=4)
    probe = fwd_programs["fwd_probe"]
    plain = run_program([probe, 0], plain_env).ok().json()
    assert plain["count"] == 4
    env = {**shim_env, "FLEXNPU_DEVICES": "2,3"}
    r = run_program([probe, 0, "--try", 1, "--try", 2, "--try", -1], env).ok()
    doc = r.json()
    assert doc["count_rc"] == 0 and doc["count"] == 2
    assert doc["set_rc"] == 0 and doc["get_rc"] == 0 and doc["device"] == 0
    assert doc["tries"] == {"1": 0, "2": INVALID_DEVICE, "-1": INVALID_DEVICE}
    # virtual 0 and 1 are physical 2 and 3; nothing reached 0 or 1
    assert devices_of(emu.status(), r.pid) == [2, 3]
    refused = run_program([probe, 2], env).ok().json()
    assert refused == {"count_rc": 0, "count": 2, "set_rc": INVALID_DEVICE}


def test_device_map_single_device(emulator, fwd_programs, shim_env) -> None:
    emu = emulator(devices=4)
    r = run_program([fwd_programs["fwd_probe"], 0, "--try", 1], {**shim_env, "FLEXNPU_DEVICES": "3"}).ok()
    doc = r.json()
    assert doc["count"] == 1 and doc["device"] == 0 and doc["tries"] == {"1": INVALID_DEVICE}
    assert devices_of(emu.status(), r.pid) == [3]


def test_device_map_names_a_missing_device(emulator, fwd_programs, shim_env) -> None:
    """The program sees the devices it was given, in order; one the node lacks is refused
    with the runtime's invalid-device code when selected, so ids never shift."""
    emulator(devices=4)
    doc = run_program([fwd_programs["fwd_probe"], 0, "--try", 1], {**shim_env, "FLEXNPU_DEVICES": "1,9"}).ok().json()
    assert doc["count"] == 2 and doc["device"] == 0
    assert doc["tries"] == {"1": INVALID_DEVICE}


@pytest.mark.parametrize("name", ["sample_acl", "fwd_threads"])
def test_mapped_program_works_on_the_physical_device(
        name: str, emulator, fwd_programs, kernel_library, plain_env, shim_env) -> None:
    """The program uses device 0; with FLEXNPU_DEVICES=2,3 its work lands on physical 2,
    exactly the work it does there when asked for device 2 directly."""
    emu = emulator(devices=4)
    direct = run_program(workload_argv(fwd_programs, kernel_library, name, device=2), plain_env).ok()
    mapped = run_program(workload_argv(fwd_programs, kernel_library, name, device=0),
                         {**shim_env, "FLEXNPU_DEVICES": "2,3"}).ok()
    status = emu.status()
    assert devices_of(status, mapped.pid) == [2]
    assert work_of(client_record(status, mapped.pid, 2)) == work_of(client_record(status, direct.pid, 2))
    if name == "fwd_threads":
        assert mapped.json()["checksum"] == direct.json()["checksum"]


# ---------------------------------------------------------------- memory quota


def test_quota_refuses_allocations_past_it(emulator, fwd_programs, plain_env, shim_env) -> None:
    emulator(devices=1)
    allocs = [3 * MiB, 2 * MiB, 4 * MiB, 1 * MiB, 4 * MiB]
    argv = [fwd_programs["fwd_probe"], 0, "--work", 3]
    for n in allocs:
        argv += ["--alloc", n]
    # the device itself has room for all of them
    plain = run_program(argv, plain_env).ok().json()
    assert plain["alloc"] == [0] * len(allocs)
    capacity = plain["total_before"]
    assert capacity > 64 * MiB

    doc = run_program(argv, {**shim_env, "FLEXNPU_MEM_QUOTA": "8M"}).ok().json()
    assert doc["alloc"] == [0, 0, OUT_OF_MEMORY, 0, OUT_OF_MEMORY]
    held = 3 * MiB + 2 * MiB + 1 * MiB
    assert (doc["total_before"], doc["free_before"]) == (8 * MiB, 8 * MiB)
    assert (doc["total_held"], doc["free_held"]) == (8 * MiB, 8 * MiB - held)
    assert doc["work_ok"] is True
    assert doc["free"] == [0, 0, -1, 0, -1]
    # freeing gives the quota back
    assert (doc["total_after"], doc["free_after"]) == (8 * MiB, 8 * MiB)
    # host memory is not the quota's business
    assert doc["ddr_total"] == plain["ddr_total"]


def test_quota_filled_exactly(emulator, fwd_programs, shim_env) -> None:
    emulator(devices=1)
    argv = [fwd_programs["fwd_probe"], 0, "--alloc", 6 * MiB, "--alloc", 2 * MiB, "--alloc", 1]
    doc = run_program(argv, {**shim_env, "FLEXNPU_MEM_QUOTA": "8MiB"}).ok().json()
    assert doc["alloc"] == [0, 0, OUT_OF_MEMORY]
    assert doc["free_held"] == 0 and doc["total_held"] == 8 * MiB


@pytest.mark.parametrize("quota, nbytes", [
    ("8M", 8 * MiB), ("1GiB", 1 << 30), ("512MiB", 512 * MiB), ("64KB", 64 << 10), ("1.5G", 3 << 29),
    ("65536", 65536), ("2g", 2 << 30),
])
def test_quota_sizes(quota: str, nbytes: int, emulator, fwd_programs, shim_env) -> None:
    emulator(devices=1)
    r = run_program([fwd_programs["fwd_probe"], 0, "--alloc", nbytes, "--alloc", 1],
                    {**shim_env, "FLEXNPU_MEM_QUOTA": quota}).ok()
    doc = r.json()
    assert r.stderr == ""
    assert (doc["total_before"], doc["free_before"]) == (nbytes, nbytes)
    assert doc["alloc"] == [0, OUT_OF_MEMORY]
    assert doc["free_held"] == 0


def test_quota_follows_the_device_map(emulator, fwd_programs, shim_env) -> None:
    emu = emulator(devices=4)
    env = {**shim_env, "FLEXNPU_DEVICES": "2,3", "FLEXNPU_MEM_QUOTA": "4M"}
    r = run_program([fwd_programs["fwd_probe"], 1, "--alloc", 3 * MiB, "--alloc", 2 * MiB], env).ok()
    doc = r.json()
    assert doc["alloc"] == [0, OUT_OF_MEMORY]
    assert doc["total_held"] == 4 * MiB and doc["free_held"] == 1 * MiB
    assert client_record(emu.status(), r.pid, 3)["allocs"] == 1


# ---------------------------------------------------------------- what it says


def test_without_a_daemon_debug_says_so_once(emulator, fwd_programs, shim_env) -> None:
    """The program syncs after running more than a second, when the shim looks for a daemon
    again: that second look must not say it again."""
    emulator(devices=1)
    argv = [fwd_programs["fwd_probe"], 0, "--alloc", 8192, "--work", 3, "--sleep-ms", 1200]
    r = run_program(argv, {**shim_env, "FLEXNPU_DEBUG": "1"}).ok()
    lines = [ln for ln in r.stderr_lines() if NO_GATE in ln]
    assert len(lines) == 1, r.stderr
    assert "device 0" in lines[0]
    assert all(ln.startswith(f"flexnpu shim[{r.pid}]: ") for ln in r.stderr_lines())


def test_without_a_daemon_debug_says_so_once_per_device(emulator, fwd_programs, shim_env) -> None:
    emulator(devices=4)
    r = run_program([fwd_programs["fwd_probe"], 0, "--try", 1, "--try", 0, "--try", 1],
                    {**shim_env, "FLEXNPU_DEBUG": "1", "FLEXNPU_DEVICES": "2,3"}).ok()
    lines = [ln for ln in r.stderr_lines() if NO_GATE in ln]
    assert len(lines) == 2, r.stderr
    assert "device 2 " in lines[0] and "device 3 " in lines[1]


def test_without_a_daemon_debug_says_so_once_for_all_threads(
        emulator, fwd_programs, kernel_library, shim_env) -> None:
    emulator(devices=1)
    r = run_program(workload_argv(fwd_programs, kernel_library, "fwd_threads"),
                    {**shim_env, "FLEXNPU_DEBUG": "1"}).ok()
    assert len([ln for ln in r.stderr_lines() if NO_GATE in ln]) == 1, r.stderr


@pytest.mark.parametrize("debug", [None, "0", ""])
def test_silent_without_debug(debug, emulator, fwd_programs, shim_env) -> None:
    emulator(devices=1)
    env = dict(shim_env)
    if debug is not None:
        env["FLEXNPU_DEBUG"] = debug
    r = run_program([fwd_programs["fwd_probe"], 0, "--alloc", 8192, "--work", 2], env).ok()
    assert r.stderr == ""


@pytest.mark.parametrize("kind", ["file", "unbound"])
def test_stale_admission_socket_leaves_the_program_running(
        kind: str, emulator, runtime_dir, fwd_programs, kernel_library, shim_env) -> None:
    """A leftover at gate-0.sock (a plain file, or a socket nobody listens on, as a killed
    daemon leaves) must not crash the program: it runs as if no daemon were there."""
    emulator(devices=1)
    path = runtime_dir / "gate-0.sock"
    if kind == "file":
        path.write_bytes(b"\0" * 64)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.bind(str(path))
        s.close()
    r = run_program(workload_argv(fwd_programs, kernel_library, "fwd_threads"),
                    {**shim_env, "FLEXNPU_DEBUG": "1"})
    assert r.rc == 0, f"exit {r.rc}: {r.stderr}"
    assert r.json()["ok"] is True
    assert len([ln for ln in r.stderr_lines() if NO_GATE in ln]) == 1, r.stderr


def test_an_answer_of_another_version_is_not_used(emulator, runtime_dir, fwd_programs, shim_env) -> None:
    """Something at gate-0.sock that answers garbage: the program says so once and runs."""
    emulator(devices=1)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(str(runtime_dir / "gate-0.sock"))
    srv.listen(4)
    srv.settimeout(30)

    def answer() -> None:
        try:
            conn, _ = srv.accept()
            conn.recv(64)
            conn.send(b"\xff" * 256)
            conn.recv(64)  # until it hangs up
            conn.close()
        except OSError:
            pass

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        r = run_program([fwd_programs["fwd_probe"], 0, "--alloc", 8192, "--work", 2],
                        {**shim_env, "FLEXNPU_DEBUG": "1"}).ok()
    finally:
        srv.close()
    assert r.json()["work_ok"] is True
    assert len([ln for ln in r.stderr_lines() if NO_GATE in ln]) == 1, r.stderr


@pytest.mark.parametrize("var, value", [
    ("FLEXNPU_DEVICES", "a,b"), ("FLEXNPU_DEVICES", "2,,3"), ("FLEXNPU_DEVICES", "-1"), ("FLEXNPU_DEVICES", "99"),
    ("FLEXNPU_DEVICES", "1;2"), ("FLEXNPU_MEM_QUOTA", "lots"), ("FLEXNPU_MEM_QUOTA", "-5M"),
    ("FLEXNPU_MEM_QUOTA", "0"), ("FLEXNPU_MEM_QUOTA", "8X"), ("FLEXNPU_MEM_QUOTA", "8 M B s"),
    ("FLEXNPU_ROLE", "fast"), ("FLEXNPU_ROLE", "Prefill"),
])
def test_bad_settings_say_one_line_and_run_on(var: str, value: str, emulator, fwd_programs, plain_env,
                                               shim_env) -> None:
    """A bad value is ignored (the program runs as with the variable unset) after one line
    on stderr that names the variable and the value."""
    emulator(devices=2)
    argv = [fwd_programs["fwd_probe"], 0, "--alloc", 16 * MiB, "--work", 2]
    plain = run_program(argv, plain_env).ok()
    r = run_program(argv, {**shim_env, var: value}).ok()
    assert r.stdout == plain.stdout
    lines = r.stderr_lines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("flexnpu shim: ") and f"{var}={value}" in lines[0]
    assert re.search(r"ignoring it|using auto", lines[0])


@pytest.mark.parametrize("role", ["prefill", "decode", "auto"])
def test_good_roles_are_silent(role: str, emulator, fwd_programs, shim_env) -> None:
    emulator(devices=1)
    r = run_program([fwd_programs["fwd_probe"], 0, "--alloc", 8192, "--work", 2],
                    {**shim_env, "FLEXNPU_ROLE": role}).ok()
    assert r.stderr == "" and r.json()["work_ok"] is True
