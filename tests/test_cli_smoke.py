"""Smoke tests for every `flexnpu` command, run as real processes under `timeout -s INT` so a
hang fails the test with an exit code instead of stalling the suite (bcc's tools smoke habit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT_S = "60"


@pytest.fixture(autouse=True)
def isolated(runtime_dir: Path) -> Path:
    """Every test gets conftest's fresh runtime dir, exported as FLEXNPU_RUNTIME_DIR."""
    return runtime_dir


def flexnpu(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Runs the installed CLI; cwd outside the repo so the source tree cannot shadow it."""
    return subprocess.run(
        ["timeout", "-s", "INT", TIMEOUT_S, sys.executable, "-m", "flexnpu.cli", *args],
        capture_output=True, text=True, cwd=cwd, env={**os.environ},
    )


@pytest.mark.parametrize(
    "command",
    [[], ["emu"], ["emu", "start"], ["emu", "stop"], ["emu", "status"], ["emu", "env"], ["doctor"]],
    ids=lambda c: " ".join(c) or "flexnpu",
)
def test_help_exits_0(command: list[str], tmp_path: Path) -> None:
    proc = flexnpu(*command, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout


def test_emu_status_json_without_an_emulator(tmp_path: Path) -> None:
    proc = flexnpu("emu", "status", "--json", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema"] == 1
    assert doc["running"] is False
