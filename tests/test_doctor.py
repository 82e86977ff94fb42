"""`flexnpu doctor`: each check on its own, the --json document through typer's CliRunner and
through a real process, and the emulator checks against the emulator's real device server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from flexnpu import doctor, paths
from flexnpu.cli import app

CHECK_KEYS = {"name", "ok", "detail", "fix"}


@pytest.fixture(autouse=True)
def isolated(runtime_dir: Path) -> Path:
    """Every test gets conftest's fresh runtime dir, exported as FLEXNPU_RUNTIME_DIR."""
    return runtime_dir


@pytest.fixture
def running_emulator(emulator: Callable[..., Any], runtime_dir: Path) -> Path:
    """The emulator's real device server with one device; conftest's factory starts it with
    flexnpu.emulator.start() and always stops it (and checks it is gone) at teardown."""
    emulator(devices=1)
    return runtime_dir


def assert_report(doc: dict) -> None:
    """The schema-1 document: exactly these keys, the checks in order, ready == all ok."""
    assert set(doc) == {"schema", "ready", "checks"}
    assert doc["schema"] == 1
    assert isinstance(doc["ready"], bool)
    assert [c["name"] for c in doc["checks"]] == list(doctor.CHECK_NAMES)
    for c in doc["checks"]:
        assert set(c) == CHECK_KEYS
        assert isinstance(c["ok"], bool) and isinstance(c["detail"], str) and c["detail"]
        # a fix exactly when the check failed
        assert (c["fix"] is None) == c["ok"], c
    assert doc["ready"] == all(c["ok"] for c in doc["checks"])


def by_name(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["checks"]}


def test_json_through_cli_runner() -> None:
    result = CliRunner().invoke(app, ["doctor", "--json"])
    doc = json.loads(result.stdout)
    assert_report(doc)
    assert result.exit_code == (0 if doc["ready"] else 1)
    checks = by_name(doc)
    if checks["libascendcl"]["detail"].startswith("emulator:"):
        # nothing runs in this test's fresh runtime dir, and the emulator is needed
        assert not checks["emulator"]["ok"] and not doc["ready"]
        assert "flexnpu emu start" in checks["emulator"]["fix"]


def test_json_through_a_real_process(runtime_dir: Path, tmp_path: Path) -> None:
    # cwd outside the repo, so the process runs the installed flexnpu as a user's would
    proc = subprocess.run(
        ["timeout", "-s", "INT", "60", sys.executable, "-m", "flexnpu.cli", "doctor", "--json"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ},
    )
    assert proc.returncode in (0, 1), proc.stderr
    doc = json.loads(proc.stdout)
    assert_report(doc)
    assert proc.returncode == (0 if doc["ready"] else 1)


def test_table_output_names_every_check_and_each_fix() -> None:
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code in (0, 1)
    for name in doctor.CHECK_NAMES:
        assert name in result.stdout
    last = result.stdout.strip().splitlines()[-1]
    if result.exit_code == 0:
        assert last == "ready"
    else:
        assert last.startswith("not ready:")


def test_with_the_emulator_running(running_emulator: Path) -> None:
    result = CliRunner().invoke(app, ["doctor", "--json"])
    doc = json.loads(result.stdout)
    assert_report(doc)
    checks = by_name(doc)
    assert checks["emulator"]["ok"], checks["emulator"]
    assert str(paths.emulator_socket(running_emulator)) in checks["emulator"]["detail"]
    if doctor.find_cann_library() is None:
        assert checks["libascendcl"]["ok"]
        assert checks["libascendcl"]["detail"].startswith("emulator:")
        assert str(paths.emulator_library()) in checks["libascendcl"]["detail"]


def test_emulator_check_fails_with_the_command_to_start_it(runtime_dir: Path) -> None:
    check = doctor.check_emulator(cann=None, rdir=runtime_dir)
    assert not check.ok
    assert check.fix == f"FLEXNPU_RUNTIME_DIR={runtime_dir} flexnpu emu start"


def test_emulator_check_is_informational_with_cann(runtime_dir: Path, tmp_path: Path) -> None:
    check = doctor.check_emulator(cann=tmp_path / "lib64" / "libascendcl.so", rdir=runtime_dir)
    assert check.ok and check.fix is None and "not needed" in check.detail


def test_cann_library_is_preferred_to_the_emulator(tmp_path: Path) -> None:
    lib = tmp_path / "toolkit" / "aarch64-linux" / "lib64" / "libascendcl.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    check = doctor.check_libascendcl(env={"ASCEND_TOOLKIT_HOME": str(tmp_path / "toolkit")},
                                     ascend_root=tmp_path / "none")
    assert check.ok and check.detail == f"CANN: {lib}"


def test_cann_found_under_a_versioned_install_tree(tmp_path: Path) -> None:
    lib = tmp_path / "cann-8.0" / "lib64" / "libascendcl.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    assert doctor.find_cann_library(env={}, ascend_root=tmp_path) == lib


def test_without_cann_the_emulator_library_is_named(tmp_path: Path) -> None:
    check = doctor.check_libascendcl(env={}, ascend_root=tmp_path)
    assert check.ok == paths.emulator_library().is_file()
    if check.ok:
        assert check.detail.startswith(f"emulator: {paths.emulator_library()}")


@pytest.mark.parametrize(
    ("capeff", "euid", "ok", "fix_word"),
    [
        (1 << doctor.CAP_BPF | 1 << doctor.CAP_PERFMON, 1000, True, None),
        (1 << doctor.CAP_SYS_ADMIN, 0, True, None),
        (1 << doctor.CAP_BPF, 1000, False, "sudo"),  # CAP_PERFMON missing
        (0, 0, False, "--cap-add"),  # root in a container that dropped the capabilities
    ],
    ids=["bpf+perfmon", "sys_admin", "bpf-only", "root-without-caps"],
)
def test_privileges_from_capeff(capeff: int, euid: int, ok: bool, fix_word: str | None) -> None:
    status = f"Name:\tpython\nCapPrm:\t{capeff:016x}\nCapEff:\t{capeff:016x}\n"
    check = doctor.check_privileges(status_text=status, euid=euid)
    assert check.ok is ok
    assert (check.fix is None) if ok else (fix_word in check.fix)


def test_tracefs_from_proc_mounts() -> None:
    mounted = "sysfs /sys sysfs rw 0 0\nnodev /sys/kernel/tracing tracefs rw,relatime 0 0\n"
    assert doctor.check_tracefs(mounted).ok
    missing = doctor.check_tracefs("sysfs /sys sysfs rw 0 0\n")
    assert not missing.ok and missing.fix == "mount -t tracefs nodev /sys/kernel/tracing"


def test_bpf_syscall_on_an_unknown_architecture() -> None:
    check = doctor.check_bpf_syscall(machine="riscv64")
    assert not check.ok and "riscv64" in check.detail


def test_render_shows_ok_fail_and_fix() -> None:
    checks = [doctor.Check("tracefs", True, "mounted at /sys/kernel/tracing"),
              doctor.Check("emulator", False, "no device server", "flexnpu emu start")]
    con = Console(width=80, record=True, color_system=None)
    con.print(doctor.render(checks))
    lines = [ln.rstrip() for ln in con.export_text().splitlines()]
    assert lines == [
        "tracefs   ok    mounted at /sys/kernel/tracing",
        "emulator  FAIL  no device server",
        "                fix: flexnpu emu start",
    ]


@pytest.mark.root_bpf
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loads BPF and attaches a uprobe")
def test_bpf_syscall_and_bcc_uprobe_as_root() -> None:
    assert doctor.check_bpf_syscall().ok
    bcc = doctor.check_bcc_import()
    assert bcc.ok, bcc
    check = doctor.check_bcc_uprobe()
    assert check.ok, check
    assert f"counted {doctor.UPROBE_CALLS} of {doctor.UPROBE_CALLS} calls" in check.detail


def test_ebpf_prints_the_selftest_program_without_loading_it(monkeypatch) -> None:
    """Like every BPF-loading command, doctor has a hidden --ebpf: no root, no bcc needed."""
    from typer.testing import CliRunner

    from flexnpu.cli import app

    monkeypatch.setitem(sys.modules, "bcc", None)  # importing bcc would now fail
    r = CliRunner().invoke(app, ["doctor", "--ebpf"])
    assert r.exit_code == 0, r.output
    assert "int on_getpid(struct pt_regs *ctx)" in r.output and "BPF_ARRAY(hits" in r.output
    assert "--ebpf" not in CliRunner().invoke(app, ["doctor", "--help"]).output
