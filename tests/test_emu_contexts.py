"""The emulator's `contexts` mode (the default), measured from outside: real AscendCL
processes against the real server, timed by events and wall clock, checked against the
model's analytic times within 5 % (kernels of 1 ms and more) and against `emu status`.

The rules (docs/emulator.md, "Modes"): work of different processes never runs at once and
the device pays `context_switch_us` to change from one to another; streams of one process run
side by side as far as their kernels' cores allow (a kernel holds min(blockDim, cores of its
class) and computes at that share of peak); copies hold no cores.

On the 910b profile: 24 cube cores, 48 vector cores; a synthetic kernel of 2 ms is
353.9e12 * 2e-3 FLOPs (compute-bound) or 1.6e12 * 2e-3 bytes (memory-bound).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_emu_cli import cli, one_line  # noqa: F401  (the `cli` fixture: the installed flexnpu)
from test_emu_timing import corun_processes, makespan_ms

TOL = 0.05
MS = 1e6  # ns per ms
FULL = 48  # a blockDim that fills every class of the 910b profile


def near(got: float, want: float, tol: float = TOL) -> bool:
    return abs(got - want) <= tol * want


@pytest.fixture
def core_kernels(tmp_path: Path) -> Path:
    """One name per core class for the synthetic built-in (the library's optional last word),
    and one with no class word (the built-in's own: mix)."""
    lib = tmp_path / "cores.fxk"
    lib.write_text("flexnpu-kernels 1\n"
                   "kernel cube_k   synthetic cube\n"
                   "kernel vector_k synthetic vector   # a trailing comment\n"
                   "kernel mix_k    synthetic mix\n"
                   "kernel plain_k  synthetic\n")
    return lib


def corun(run_acl, workload, klib, emu, k1: str, k2: str, bd1: int, bd2: int, n: int = 5, ms: float = 2.0) -> dict:
    f = emu.flops_for_ms(ms)
    return run_acl([workload, "corun", klib, f, 0, f, 0, n, "--kernel", k1, "--kernel2", k2,
                    "--block-dim", bd1, "--block-dim2", bd2])


def test_cli_start_defaults_to_contexts(cli, run_acl, workload, core_kernels):  # noqa: F811
    r = cli("emu", "start", "--devices", "1")
    assert r.returncode == 0, r.stderr
    assert "(contexts)" in one_line(r.stdout)
    st = json.loads(cli("emu", "status", "--json").stdout)
    dev = st["devices"][0]
    assert st["schema"] == 1 and dev["mode"] == "contexts"
    assert (dev["params"]["cube_cores"], dev["params"]["vector_cores"]) == (24, 48)
    assert dev["params"]["context_switch_us"] == pytest.approx(20.0)
    assert (dev["cube_busy_ns"], dev["vector_busy_ns"], dev["context_switches"]) == (0, 0, 0)
    # one full-device cube kernel of 2 ms: 2 ms of cube, none of vector, in both outputs
    f = 353.9e12 * 2e-3
    run_acl([workload, "timing", core_kernels, f, 0, 1, "--kernel", "cube_k"])
    dev = json.loads(cli("emu", "status", "--json").stdout)["devices"][0]
    assert dev["cube_busy_ns"] == pytest.approx(2 * MS, rel=1e-3) and dev["vector_busy_ns"] == 0
    text = cli("emu", "status").stdout
    assert "cube busy 2.0 ms (24 AIC)" in text and "vector busy 0.0 ms (48 AIV)" in text, text


def test_cli_context_switch_option(cli):  # noqa: F811
    r = cli("emu", "start", "--devices", "2", "--mode", "contexts,serial", "--context-switch-us", "150")
    assert r.returncode == 0, r.stderr
    devs = json.loads(cli("emu", "status", "--json").stdout)["devices"]
    assert [d["mode"] for d in devs] == ["contexts", "serial"]
    assert [d["params"]["context_switch_us"] for d in devs] == [pytest.approx(150.0)] * 2


# ---------------------------------------------------------------- processes take turns

def test_two_processes_never_overlap_and_pay_the_switch(emulator, spawn, workload, core_kernels):
    sw_us = 250.0
    emu = emulator(context_switch_us=sw_us)
    f, h = emu.flops_for_ms(2), emu.hbm_bytes_for_ms(2)
    before = emu.device()
    # a compute-bound and a memory-bound kernel: `shared` would overlap them (about 20 ms)
    (a, b), _, _ = corun_processes(emu, spawn, workload, core_kernels, [("mix_k", f, 0, 10), ("plain_k", 0, h, 10)])
    after = emu.device()
    switches = after["context_switches"] - before["context_switches"]
    busy = after["busy_ns"] - before["busy_ns"]
    # they take turns op by op: each process's op waits for at most one of the other's
    assert 10 <= switches <= 21, switches
    # the device is busy for exactly the 20 kernels and idle only while it switches
    assert busy == pytest.approx(40 * MS, rel=1e-3)
    assert near(makespan_ms([a, b]), 40.0 + switches * sw_us / 1e3), (a, b, switches)
    ca, cb = emu.client(a["pid"]), emu.client(b["pid"])
    assert ca["busy_by_name"]["mix_k"] == pytest.approx(20 * MS, rel=1e-4)
    assert cb["busy_by_name"]["plain_k"] == pytest.approx(20 * MS, rel=1e-4)
    assert ca["busy_ns"] + cb["busy_ns"] == pytest.approx(busy, rel=1e-6)


def test_a_resident_context_costs_one_switch_and_an_exited_one_none(emulator, spawn, run_acl, workload,
                                                                     core_kernels):
    sw_us = 500.0
    emu = emulator(context_switch_us=sw_us)
    f = emu.flops_for_ms(2)
    holder = spawn([workload, "hold", 4096, 60])  # memsets its buffer: the device holds its context
    assert holder.read()["ready"]
    first = run_acl([workload, "timing", core_kernels, f, 0, 1, "--kernel", "cube_k", "--reps", 2])
    # the first kernel waits for the switch away from the idle holder; the second does not
    assert first["event_ms"][0] == pytest.approx(2.0 + sw_us / 1e3, rel=TOL), first
    assert first["event_ms"][1] == pytest.approx(2.0, rel=TOL), first
    assert emu.device()["context_switches"] == 1
    # back to the holder (the timing process has exited: its context is gone, no switch)
    assert holder.ask("work 10")["rc"] == 0  # 10 kernels of 100 us
    assert emu.device()["context_switches"] == 1
    holder.proc.stdin.write("quit\n")
    holder.proc.stdin.flush()
    assert holder.proc.wait(timeout=10) == 0
    alone = run_acl([workload, "timing", core_kernels, f, 0, 1, "--kernel", "cube_k", "--reps", 2])
    assert alone["event_ms"] == [pytest.approx(2.0, rel=TOL)] * 2, alone
    assert emu.device()["context_switches"] == 1


# ---------------------------------------------------------------- streams share cores

@pytest.mark.parametrize("k1, k2, bd1, bd2, want_ms", [
    # a cube and a vector kernel at full blockDim use different cores: side by side, max not sum
    ("cube_k", "vector_k", FULL, FULL, [10.0, 10.0]),
    # two full cube kernels need the same 24 cores: one at a time, in turn (sum)
    ("cube_k", "cube_k", FULL, FULL, [18.0, 20.0]),
    # half the cube cores each: side by side, each at half speed (4 ms a kernel)
    ("cube_k", "cube_k", 12, 12, [20.0, 20.0]),
    # a quarter each: side by side at a quarter speed, half the cube cores idle
    ("cube_k", "cube_k", 6, 6, [40.0, 40.0]),
    # a full mix kernel holds every vector core (one cube and two vector cores a block)
    ("mix_k", "vector_k", FULL, FULL, [18.0, 20.0]),
    # 12 mix blocks are 12 cube + 24 vector cores, leaving 24 vector cores for the other
    ("mix_k", "vector_k", 12, 24, [20.0, 20.0]),
])
def test_streams_of_one_process_share_cores(emulator, run_acl, workload, core_kernels, k1, k2, bd1, bd2, want_ms):
    emu = emulator()
    busy0 = emu.device()["busy_ns"]
    out = corun(run_acl, workload, core_kernels, emu, k1, k2, bd1, bd2)
    assert out["event_ms"] == [pytest.approx(w, rel=TOL) for w in want_ms], out
    assert near(out["wall_ms"], max(want_ms)), out
    dev = emu.device()
    assert dev["context_switches"] == 0  # one process never switches
    # the device is busy from the first kernel to the last, and that is what the process is charged
    assert dev["busy_ns"] - busy0 == pytest.approx(max(want_ms) * MS, rel=TOL)
    assert emu.client(out["pid"])["busy_ns"] == pytest.approx(dev["busy_ns"] - busy0, rel=1e-6)


def test_one_stream_at_full_block_dim_is_serial(emulator, run_acl, workload, kernel_library):
    """The default library's synthetic kernel at full blockDim on one stream: exactly serial mode."""
    emu = emulator()
    f, h = emu.flops_for_ms(2), emu.hbm_bytes_for_ms(2)
    for flops, hbm in ((f, 0), (0, h)):
        out = run_acl([workload, "timing", kernel_library, flops, hbm, 10, "--reps", 2])
        assert out["event_ms"] == [pytest.approx(20.0, rel=TOL)] * 2, out
        assert emu.client(out["pid"])["busy_ns"] == pytest.approx(40 * MS, rel=1e-4)


@pytest.mark.parametrize("kernel, bd, flops_ms, hbm_ms, want_ms", [
    ("cube_k", 8, 2, 0, 6.0),  # 8 of 24 cube cores: a third of peak
    ("vector_k", 16, 2, 0, 6.0),  # 16 of 48 vector cores
    ("mix_k", 6, 2, 0, 8.0),  # 6 of 24 blocks
    ("cube_k", 1, 0, 2, 2.0),  # memory-bound: HBM is not limited by the cores it holds
    ("cube_k", 1, 2, 2, 48.0),  # compute 2 ms at 1/24: compute-bound after all
    ("cube_k", 96, 2, 0, 2.0),  # more blocks than cores run in waves: full speed
    ("cube_k", 4294967295, 2, 0, 2.0),  # the largest blockDim: the same
])
def test_block_dim_scales_compute(emulator, run_acl, workload, core_kernels, kernel, bd, flops_ms, hbm_ms, want_ms):
    emu = emulator()
    out = run_acl([workload, "timing", core_kernels, emu.flops_for_ms(flops_ms), emu.hbm_bytes_for_ms(hbm_ms), 1,
                   "--kernel", kernel, "--block-dim", bd, "--reps", 2])
    assert out["event_ms"] == [pytest.approx(want_ms, rel=TOL)] * 2, out


def test_core_busy_for_a_known_run(emulator, run_acl, workload, core_kernels):
    emu = emulator()
    f = emu.flops_for_ms(2)
    run_acl([workload, "timing", core_kernels, f, 0, 3, "--kernel", "cube_k"])  # 6 ms of 24 AIC
    run_acl([workload, "timing", core_kernels, f, 0, 2, "--kernel", "vector_k", "--block-dim", 24])  # 8 ms of 24 AIV
    run_acl([workload, "timing", core_kernels, f, 0, 1, "--kernel", "mix_k", "--block-dim", 12])  # 4 ms: 12 AIC, 24 AIV
    run_acl([workload, "copyback", 1 << 20])  # copies and a memset: busy, but no cores
    dev = emu.device()
    assert dev["cube_busy_ns"] == pytest.approx((6 + 4 * 12 / 24) * MS, rel=1e-3)
    assert dev["vector_busy_ns"] == pytest.approx((8 * 24 / 48 + 4 * 24 / 48) * MS, rel=1e-3)
    assert dev["busy_ns"] > (6 + 8 + 4) * MS * 1.001  # the copies kept the device busy too
    # busy split per process still adds up to the device's
    assert sum(c["busy_ns"] for c in dev["clients"]) == pytest.approx(dev["busy_ns"], rel=1e-6)


def test_copies_hold_no_cores(emulator, run_acl, workload):
    """aclrtMemcpy[Async] and aclrtMemset run on DMA engines: the device is busy, no core is."""
    emu = emulator()
    out = run_acl([workload, "copyback", 64 << 20])
    assert out["ok"], out
    dev = emu.device()
    assert dev["busy_ns"] > 1 * MS  # 64 MiB over the 23 GB/s host link, twice: about 6 ms
    assert dev["cube_busy_ns"] == 0 and dev["vector_busy_ns"] == 0


# ---------------------------------------------------------------- the kernel library's core word

@pytest.mark.parametrize("line, ok", [
    ("kernel k synthetic cube", True),
    ("kernel k synthetic vector", True),
    ("kernel k synthetic mix", True),
    ("kernel k gemm", True),
    ("kernel k synthetic gpu", False),
    ("kernel k synthetic Cube", False),
    ("kernel k synthetic cube extra", False),
])
def test_library_core_word(emulator, run_acl, workload, tmp_path, line, ok):
    emulator()
    lib = tmp_path / "one.fxk"
    lib.write_text(f"flexnpu-kernels 1\n{line}\n")
    out = run_acl([workload, "timing", lib, 1e9, 0, 1, "--kernel", "k"], check=False)
    if ok and "gemm" not in line:
        assert out["rc"] == 0 and out["ok"], out
    elif ok:  # a gemm with synthetic arguments: the library loaded, the arguments are refused
        assert out["call"].startswith("aclrtLaunchKernel") and out["code"] == 100000, out
    else:
        assert out["rc"] == 1 and out["code"] == 100006, out  # ACL_ERROR_PARSE_FILE
        assert out["call"].startswith("aclrtBinaryLoadFromFile"), out
