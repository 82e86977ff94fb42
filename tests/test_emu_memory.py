"""Device memory and data on the emulated device: bytes survive every kind of copy, the
built-in kernels compute the right results, allocation beyond capacity fails as CANN's
does, aclrtGetMemInfo tells the truth, and a client's memory is returned when it dies.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest
from test_daemon_fixtures import wait_for

SAMPLES = Path(__file__).resolve().parent.parent / "flexnpu" / "samples"

PAGE = 4096
MIB = 1 << 20
MEMORY_ALLOCATION = 207001  # ACL_ERROR_RT_MEMORY_ALLOCATION


def page_round(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


@pytest.mark.parametrize("nbytes", [1, 4095, 4096, 4097, 65536 + 3, 3 * MIB + 5])
def test_bytes_survive_h2d_d2d_d2h(emulator, run_acl, workload, nbytes):
    emu = emulator()
    out = run_acl([workload, "copyback", nbytes])
    assert out["ok"], out
    c = emu.client(out["pid"])
    # the server saw every copy, by direction, with its size
    assert c["bytes_copied"]["h2d"] == nbytes
    assert c["bytes_copied"]["d2d"] == nbytes
    assert c["bytes_copied"]["d2h"] == 3 * nbytes  # ACL_MEMCPY_DEFAULT resolved to D2H too
    assert c["memset_bytes"] == nbytes
    assert c["memory_used"] == 0 and c["allocs"] == 2 and c["frees"] == 2


def test_c_sample_results_correct(emulator, acl_programs, run_program, kernel_library):
    emu = emulator(devices=2)
    for dev in (0, 1):
        r = run_program([acl_programs["sample_acl"], kernel_library, dev, 2])
        assert r.returncode == 0, r.stdout + r.stderr
        assert "all results correct" in r.stdout, r.stdout
    for dev in (0, 1):
        (client,) = emu.device(dev)["clients"]
        assert client["count_by_name"]["attention_prefill"] == 2
        assert client["count_by_name"]["attention_decode"] == 2
        assert client["memory_used"] == 0 and client["alive"] is False


def test_ctypes_sample_results_correct(emulator, run_program, kernel_library):
    emu = emulator(devices=2)
    for dev in (0, 1):
        r = run_program([sys.executable, SAMPLES / "sample_ctypes.py", kernel_library, dev])
        assert r.returncode == 0, r.stdout + r.stderr
        assert "all results correct" in r.stdout and r.stdout.count("\n") == 1, r.stdout
    (client,) = emu.device(1)["clients"]
    assert client["count_by_name"] == {"memcpy_h2d": 4, "memcpy_d2h": 2, "elementwise": 1, "gemm": 1, "copy": 1}
    assert client["ops"]["event_wait"] == 1


def test_oom_and_truthful_mem_info(emulator, run_acl, workload):
    emu = emulator()
    total = emu.profile.capacity_gib * (1 << 30)
    out = run_acl([workload, "oom"])
    assert out["total"] == total
    assert out["free_before"] == total
    assert out["over_capacity_rc"] == MEMORY_ALLOCATION
    # free drops by the page-rounded size of what was asked
    assert out["free_before"] - out["free_after_x"] == page_round(out["x_bytes"])
    assert out["over_free_rc"] == MEMORY_ALLOCATION
    assert out["rest_rc"] == 0 and out["free_when_full"] == 0
    assert out["one_more_rc"] == MEMORY_ALLOCATION
    assert out["free_after_rest_freed"] == out["free_after_x"]
    assert out["free_after_all_freed"] == total
    assert emu.device()["memory"]["used"] == 0


def test_two_clients_share_a_device_and_a_killed_one_returns_its_memory(emulator, spawn, workload):
    emu = emulator()
    total = emu.profile.capacity_gib * (1 << 30)
    size_a, size_b = 64 * MIB + 1, 32 * MIB
    a = spawn([workload, "hold", size_a, 60])
    b = spawn([workload, "hold", size_b, 60])
    assert a.read()["ready"] and b.read()["ready"]
    both = page_round(size_a) + page_round(size_b)
    # each process sees the other's memory in aclrtGetMemInfo
    for p in (a, b):
        assert p.ask("meminfo") == {"free": total - both, "total": total}
    assert a.ask("work 5")["rc"] == 0
    assert b.ask("work 3")["rc"] == 0
    dev = emu.device()
    assert dev["memory"]["used"] == both
    ca, cb = emu.client(a.pid), emu.client(b.pid)
    assert (ca["memory_used"], cb["memory_used"]) == (page_round(size_a), page_round(size_b))
    # 100 us kernels: the model charges each pid exactly its own
    assert ca["busy_by_name"]["synthetic"] == pytest.approx(5 * 100e3, rel=1e-3)
    assert cb["busy_by_name"]["synthetic"] == pytest.approx(3 * 100e3, rel=1e-3)

    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(timeout=10)
    wait_for(lambda: emu.device()["memory"]["used"] == page_round(size_b), 5.0, "the killed client's memory")
    gone = emu.client(a.pid)
    assert gone["alive"] is False and gone["memory_used"] == 0
    # the other goes on as if nothing happened
    assert b.ask("check") == {"intact": True, "mismatch": -1}
    assert b.ask("work 5")["rc"] == 0
    assert b.ask("meminfo") == {"free": total - page_round(size_b), "total": total}
    assert emu.client(b.pid)["alive"] is True
    b.proc.stdin.write("quit\n")
    b.proc.stdin.flush()
    assert b.read() == {"bye": True}
    assert b.proc.wait(timeout=10) == 0
    wait_for(lambda: emu.device()["memory"]["used"] == 0, 5.0, "the exited client's memory")


def test_clients_on_two_devices_are_separate(emulator, spawn, workload):
    emu = emulator(devices=2)
    a = spawn([workload, "hold", 8 * MIB, 60, "--device", 0])
    b = spawn([workload, "hold", 16 * MIB, 60, "--device", 1])
    assert a.read()["ready"] and b.read()["ready"]
    st = emu.status()["devices"]
    assert [d["memory"]["used"] for d in st] == [8 * MIB, 16 * MIB]
    assert [c["pid"] for c in st[0]["clients"]] == [a.pid]
    assert [c["pid"] for c in st[1]["clients"]] == [b.pid]
