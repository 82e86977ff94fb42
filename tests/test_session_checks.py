"""The session-level checks of tests/conftest.py, run on small test suites in a child pytest:
a run where every test skipped fails, and a device server left running fails the run and
is killed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import server_alive, wait_gone

CONFTEST = Path(__file__).resolve().parent / "conftest.py"


def child_pytest(tmp_path: Path, tests: str, env: dict | None = None) -> subprocess.CompletedProcess:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_child.py").write_text(tests)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_all_skipped_fails_the_run(tmp_path):
    r = child_pytest(tmp_path, "import pytest\n\n"
                               "def test_a():\n    pytest.skip('no hardware')\n\n"
                               "@pytest.mark.skip(reason='later')\ndef test_b():\n    pass\n")
    assert r.returncode == pytest.ExitCode.TESTS_FAILED, r.stdout
    assert "no test passed" in r.stdout


def test_some_passed_some_skipped_is_fine(tmp_path):
    r = child_pytest(tmp_path, "import pytest\n\n"
                               "def test_a():\n    pytest.skip('no hardware')\n\n"
                               "def test_b():\n    pass\n")
    assert r.returncode == pytest.ExitCode.OK, r.stdout


def test_leftover_server_fails_the_run_and_is_killed(tmp_path):
    pid_file = tmp_path / "leaked.pid"
    r = child_pytest(tmp_path, "import os\nfrom pathlib import Path\nfrom flexnpu.emulator import control\n\n"
                               "def test_leaks_a_server(runtime_dir):\n"
                               "    pid = control.start(1, rdir=runtime_dir)\n"
                               "    Path(os.environ['LEAK_PID_FILE']).write_text(str(pid))\n",
                     env={"LEAK_PID_FILE": str(pid_file)})
    pid = int(pid_file.read_text())
    try:
        assert r.returncode == pytest.ExitCode.TESTS_FAILED, r.stdout
        assert "left running" in r.stdout and str(pid) in r.stdout
        assert wait_gone(pid)
    finally:
        if server_alive(pid):
            os.kill(pid, 9)
