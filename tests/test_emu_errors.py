"""Errors from the emulated libascendcl.so: the codes of include/acl/acl_base.h for each bad
call, a clear message when no device server runs, and no hang when it goes away mid-run.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

SUCCESS = 0
INVALID_PARAM = 100000  # ACL_ERROR_INVALID_PARAM
UNINITIALIZE = 100001
REPEAT_INITIALIZE = 100002
INVALID_FILE = 100003
PARSE_FILE = 100006
KERNEL_NOT_FOUND = 100029
REPEAT_FINALIZE = 100037
INVALID_DEVICEID = 107001  # ACL_ERROR_RT_INVALID_DEVICEID
CONTEXT_NULL = 107002
EVENT_TIMESTAMP_INVALID = 107006
NO_DEVICE = 207004  # ACL_ERROR_RT_NO_DEVICE
RT_INTERNAL_ERROR = 507000
STREAM_SYNC_TIMEOUT = 507046
EVENT_SYNC_TIMEOUT = 507047
SOCKET_CLOSE = 507901  # ACL_ERROR_RT_SOCKET_CLOSE

# Each call tests/progs/acl_workload.c `badargs` makes, and the code it must return.
EXPECTED = {
    "set_device_before_init": UNINITIALIZE,
    "malloc_before_init": UNINITIALIZE,
    "finalize_before_init": UNINITIALIZE,
    "init_missing_config": INVALID_FILE,
    "init": SUCCESS,
    "init_again": REPEAT_INITIALIZE,
    "malloc_without_device": CONTEXT_NULL,
    "get_device_without_device": CONTEXT_NULL,
    "set_device_invalid": INVALID_DEVICEID,
    "set_device_negative": INVALID_DEVICEID,
    "reset_device_not_set": INVALID_DEVICEID,
    "set_device": SUCCESS,
    "get_device_count_null": INVALID_PARAM,
    "malloc_null_ptr": INVALID_PARAM,
    "malloc_zero": INVALID_PARAM,
    "malloc_bad_policy": INVALID_PARAM,
    "get_mem_info_null": INVALID_PARAM,
    "get_mem_info_bad_attr": INVALID_PARAM,
    "malloc": SUCCESS,
    "malloc2": SUCCESS,
    "memcpy_null_dst": INVALID_PARAM,
    "memcpy_null_src": INVALID_PARAM,
    "memcpy_count_over_destmax": INVALID_PARAM,
    "memcpy_wrong_kind": INVALID_PARAM,
    "memcpy_d2h_from_host": INVALID_PARAM,
    "memcpy_unknown_kind": INVALID_PARAM,
    "memcpy_past_allocation": INVALID_PARAM,
    "memcpy_ok": SUCCESS,
    "memset_count_over_max": INVALID_PARAM,
    "memset_host_ptr": INVALID_PARAM,
    "memset_null": INVALID_PARAM,
    "free_null": INVALID_PARAM,
    "free_host_ptr": INVALID_PARAM,
    "free_interior_ptr": INVALID_PARAM,
    "free_ok": SUCCESS,
    "free_twice": INVALID_PARAM,
    "malloc_host_null": INVALID_PARAM,
    "free_host_null": INVALID_PARAM,
    "create_stream_null": INVALID_PARAM,
    "create_stream_bad_priority": INVALID_PARAM,
    "create_stream": SUCCESS,
    "memcpy_async_bad_stream": INVALID_PARAM,
    "sync_stream_bad_timeout": INVALID_PARAM,
    "destroy_stream_null": INVALID_PARAM,
    "load_missing_file": INVALID_FILE,
    "load_null_path": INVALID_PARAM,
    "load_garbage": PARSE_FILE,
    "load_unknown_builtin": PARSE_FILE,
    "load": SUCCESS,
    "get_function_unknown": KERNEL_NOT_FOUND,
    "get_function_null_name": INVALID_PARAM,
    "get_function": SUCCESS,
    "get_function_copy": SUCCESS,
    "launch_null_func": INVALID_PARAM,
    "launch_block_dim_0": INVALID_PARAM,
    "launch_bad_args_size": INVALID_PARAM,
    "launch_null_args": INVALID_PARAM,
    "launch_negative_work": INVALID_PARAM,
    "launch_host_pointer_arg": INVALID_PARAM,
    "launch_range_past_allocation": INVALID_PARAM,
    "launch_bad_stream": INVALID_PARAM,
    "create_event_null": INVALID_PARAM,
    "create_event": SUCCESS,
    "create_event2": SUCCESS,
    "create_event3": SUCCESS,
    "record_start": SUCCESS,
    "launch_busy": SUCCESS,
    "record_end": SUCCESS,
    # a 50 ms kernel is still running: a zero timeout checks once and reports a timeout
    "sync_stream_timeout_0": STREAM_SYNC_TIMEOUT,
    "sync_event_timeout_0": EVENT_SYNC_TIMEOUT,
    "stream_query": SUCCESS,
    "stream_query_status": 1,  # ACL_STREAM_STATUS_NOT_READY
    "event_query_status": SUCCESS,
    "event_query_status_value": 0,  # ACL_EVENT_RECORDED_STATUS_NOT_READY
    "elapsed_not_complete": EVENT_TIMESTAMP_INVALID,
    "elapsed_never_recorded": RT_INTERNAL_ERROR,
    "elapsed_null": INVALID_PARAM,
    "sync_stream": SUCCESS,
    "elapsed": SUCCESS,
    "stream_query_after": SUCCESS,
    "stream_query_status_after": 0,  # ACL_STREAM_STATUS_COMPLETE
    "event_query_status_after": SUCCESS,
    "event_query_status_value_after": 1,  # ACL_EVENT_RECORDED_STATUS_COMPLETE
    "sync_event_bad_handle": INVALID_PARAM,
    "stream_wait_event_bad_handle": INVALID_PARAM,
    "destroy_event": SUCCESS,
    "destroy_event2": SUCCESS,
    "destroy_event3": SUCCESS,
    "destroy_stream": SUCCESS,
    "unload": SUCCESS,
    "unload_null": INVALID_PARAM,
    "free": SUCCESS,
    "reset_device": SUCCESS,
    "finalize": SUCCESS,
    "finalize_again": REPEAT_FINALIZE,
}


def test_bad_arguments_give_documented_codes(emulator, run_acl, workload, kernel_library):
    emu = emulator()
    out = run_acl([workload, "badargs", kernel_library])
    elapsed = out.pop("elapsed_ms")
    del out["rc"], out["stderr"]
    wrong = {k: (out.get(k), v) for k, v in EXPECTED.items() if out.get(k) != v}
    assert not wrong, f"call: (got, expected) {wrong}"
    assert set(out) == set(EXPECTED)
    assert elapsed == pytest.approx(50.0, rel=0.05)
    assert emu.device()["memory"]["used"] == 0


def test_no_server_gives_no_device_and_says_what_to_do(runtime_dir, run_acl, workload):
    out = run_acl([workload, "setdevice", 0])
    assert out["init_rc"] == SUCCESS
    assert out["set_device_rc"] == NO_DEVICE
    assert out["device_count_rc"] == NO_DEVICE
    assert out["has_msg"] is True  # aclGetRecentErrMsg says why
    lines = out["stderr"].strip().splitlines()
    assert len(lines) == 1, out["stderr"]
    assert "flexnpu emu start" in lines[0] and str(runtime_dir) in lines[0]


def test_invalid_device_with_server_running(emulator, run_acl, workload):
    emulator(devices=2)
    assert run_acl([workload, "setdevice", 1])["set_device_rc"] == SUCCESS
    out = run_acl([workload, "setdevice", 2])
    assert out["set_device_rc"] == INVALID_DEVICEID and out["device_count_rc"] == SUCCESS and out["count"] == 2


def test_server_stopped_mid_run_fails_syncs_fast(emulator, spawn, workload, kernel_library):
    emu = emulator()
    p = spawn([workload, "waitlong", kernel_library, repr(emu.flops_for_ms(30_000))])  # a 30 s kernel
    assert p.read()["launched"]
    time.sleep(0.2)  # let it block in aclrtSynchronizeStream
    t_stop = time.monotonic_ns()
    emu.stop()
    out = p.read(timeout=10)
    assert p.proc.wait(timeout=10) == 0
    assert out["sync_rc"] == SOCKET_CLOSE
    # the client's watcher sees the server hang up at once, far from the 30 s kernel
    assert (out["sync_done_ns"] - t_stop) / 1e9 < 1.0, out
    assert out["malloc_rc"] == SOCKET_CLOSE
    assert out["launch_rc"] == SOCKET_CLOSE
    assert out["sync_again_rc"] == SOCKET_CLOSE
    stderr = p.proc.stderr.read()
    assert "507901" in stderr and len(stderr.strip().splitlines()) <= 2, stderr


def test_server_killed_releases_a_blocked_client_at_once(emulator, spawn, workload, kernel_library):
    """kill -9 of the server while a client sits in aclrtSynchronizeStream on a 30 s kernel: the
    client library's watcher sees the socket hang up and wakes the waiter; the call returns
    ACL_ERROR_RT_SOCKET_CLOSE within 100 ms of the kill (measured: well under 10 ms)."""
    worst = 0.0
    for _ in range(3):
        emu = emulator()
        p = spawn([workload, "waitlong", kernel_library, repr(emu.flops_for_ms(30_000))])
        assert p.read()["launched"]
        time.sleep(0.2)  # blocked in aclrtSynchronizeStream by now
        t_kill = time.monotonic_ns()
        os.kill(emu.pid, signal.SIGKILL)
        out = p.read(timeout=10)
        assert p.proc.wait(timeout=10) == 0
        assert out["sync_rc"] == SOCKET_CLOSE and out["malloc_rc"] == SOCKET_CLOSE, out
        worst = max(worst, (out["sync_done_ns"] - t_kill) / 1e6)
        emu.stop()  # the pid file and socket it left
    print(f"released {worst:.2f} ms after kill -9 (worst of 3)")
    assert worst < 100, f"a blocked client was released {worst:.1f} ms after the server died"
