"""A declared role is a claim on the device: under flexpd a decode client goes first. These
tests make a real local user (tests/users_fixtures.py) who runs a prefill job declared
`--role decode` beside a victim's prefill job, on a whole node as a person would run it: the
emulator (serial: processes take turns, as contexts do on an NPU), a daemon, the observer,
the controller with flexpd. Without the checks the liar's calls go first and the victim's
steps wait behind all of them; with them the liar is treated as the prefill it runs, and the
controller's published decisions say why.

- a role its user may not declare (`[roles] decode` lists someone else): treated as
  undeclared from the start;
- a role the observed work contradicts past `distrust_after_ms`: set aside.

Both step times come from the programs themselves (tests/progs/engine_loop.c).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flexnpu import paths
from flexnpu.bench.node import LocalNode, wait_for
from flexnpu.control.wire import ControllerReport, Decision
from flexnpu.forward.api import DaemonClient
from test_observe_fixtures import NEEDS_BPF
from users_fixtures import flexnpu_group, member, open_rdir  # noqa: F401 (fixtures)

pytestmark = [
    pytest.mark.root_users,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create users and groups"),
]
REPO = Path(__file__).resolve().parents[1]
KLIB = str(paths.emulator_kernel_library())
# the same job on both sides: steps of 4 kernels of 2 ms modelled time, no pause (a prefill
# engine with a queue of prompts). Alone a step is about 8 ms; two sharing the device
# fairly take about twice that.
JOB = ["4", "2.0"]
# the warm-up kernel as long as the steps' ones: a zero-work warm-up alone in the observer's
# first interval looks like a decode step, and a process doing decode-shaped work is treated as
# decode whatever it declared (that is the observed phase, not the lie)
WARM = ["--warm-ms", "2.0"]


class Decisions:
    """Every decision the controller publishes on controller.sock, collected by a thread of
    its own (the zmq socket is that thread's)."""

    def __init__(self, rdir: Path) -> None:
        self.rdir = rdir
        self.seen: dict[tuple[float, int, str], Decision] = {}
        self.reports: list[ControllerReport] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import zmq

        sock = zmq.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(f"ipc://{paths.controller_socket(self.rdir)}")
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                rep = ControllerReport.from_json(sock.recv())
                with self._lock:
                    self.reports.append(rep)
                    for d in (*rep.recent, *rep.decisions):
                        self.seen[(d.time, d.pid, d.reason)] = d
        finally:
            sock.close(0)

    def about(self, pid: int) -> list[Decision]:
        with self._lock:
            return sorted((d for d in self.seen.values() if d.pid == pid), key=lambda d: d.time)

    def notes(self) -> list[str]:
        with self._lock:
            return [dev.note for rep in self.reports for dev in rep.devices]

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


def _setting(node: LocalNode, pid: int) -> dict:
    with DaemonClient(0, node.rdir, timeout=5.0) as c:
        return next((dict(x.raw) for x in c.list() if x.pid == pid), {})


def _victim(node: LocalNode, seconds: float) -> tuple[subprocess.Popen, int]:
    """Root's prefill job, declared prefill."""
    exe = str(node.rdir / "engine_loop")
    p = node.spawn([exe, KLIB, "0", *JOB, *WARM, "--seconds", str(seconds)], role="prefill")
    ready = json.loads(p.stdout.readline())
    assert ready.get("ready"), ready
    return p, ready["pid"]


def _liar(node: LocalNode, user: str, seconds: float, named: bool = False) -> tuple[subprocess.Popen, int]:
    """The other user's prefill job, declared decode, through `flexnpu run` as that user;
    named: its kernel is prompt_flash_attention, as a real prefill engine's attention is."""
    exe = str(node.rdir / "engine_loop")
    lib = ([str(node.rdir / "named.fxk")], ["--kernel", "prompt_flash_attention"]) if named else ([KLIB], [])
    p = node.spawn(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", sys.executable, "-m",
                    "flexnpu.cli", "run", "--role", "decode", "--", exe, *lib[0], "0", *JOB, *WARM, "--seconds",
                    str(seconds), *lib[1]], shim=False, cwd="/", extra_env={"PYTHONPATH": str(REPO)})
    line = p.stdout.readline()
    if not line:
        pytest.fail(f"the user's program did not start: {p.stderr.read()[-400:]}")
    ready = json.loads(line)
    assert ready.get("ready"), ready
    return p, ready["pid"]


def _steps(p: subprocess.Popen, after_ms: float) -> list[float]:
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, f"loop failed ({p.returncode}): {err[-400:]}"
    return [d["step_ms"] for d in map(json.loads, out.splitlines()) if "step" in d and d["t0_ms"] >= after_ms]


@pytest.fixture
def node_dir(open_rdir: Path, acl_programs, flexnpu_group: str) -> Path:
    """The runtime dir, with the engine loop where the other user can run it (the test's
    build dir is root's alone), and a kernel library that names the synthetic kernel as a
    serving engine's prefill attention (prompt_flash_attention), at the same modelled cost."""
    exe = open_rdir / "engine_loop"
    exe.write_bytes(Path(acl_programs["engine_loop"]).read_bytes())
    exe.chmod(0o755)
    named = open_rdir / "named.fxk"
    named.write_text("flexnpu-kernels 1\nkernel prompt_flash_attention synthetic\n")
    named.chmod(0o644)
    return open_rdir


def _config(rdir: Path, text: str) -> str:
    f = rdir / "flexnpu.toml"
    f.write_text(text)
    return str(f)


def _shared_steps(victim: subprocess.Popen, liar: subprocess.Popen, from_ms: float) -> tuple[float, float]:
    v = _steps(victim, from_ms)
    lie = _steps(liar, from_ms)
    assert len(v) >= 20 and len(lie) >= 20, (len(v), len(lie))
    return statistics.median(v), statistics.median(lie)


def test_a_role_the_user_may_not_declare_gives_no_priority(node_dir: Path, member: str) -> None:
    """[roles] decode = ["root"]: the member's `--role decode` counts for nothing; its work
    (4 x 2 ms kernels a step: prefill by the time per launch) decides."""
    cfg = _config(node_dir, '[roles]\ndecode = ["root"]\n')
    with LocalNode(rdir=node_dir, observer="shim", policy="flexpd",
                   controller_args=["--config", cfg, "--tick-ms", "5"]) as node:
        seen = Decisions(node.rdir)
        try:
            victim, vpid = _victim(node, 6.0)
            time.sleep(1.0)
            liar, lpid = _liar(node, member, 5.0)
            t_liar = time.monotonic()
            uid = int(subprocess.run(["id", "-u", member], capture_output=True, text=True).stdout)
            said = (f"pid {lpid} declared decode, which uid {uid} ({member}) may not declare ([roles] decode): "
                    "treated as undeclared")
            wait_for(lambda: any(said in d.reason for d in seen.about(lpid)), 10.0, "the refusal published")
            # from the start and all along: the liar never goes first, the victim is never held for it
            deadline = t_liar + 3.0
            while time.monotonic() < deadline:
                lst, vst = _setting(node, lpid), _setting(node, vpid)
                assert lst.get("priority", 0) == 0 and vst.get("priority", 0) == 0, (
                    lst, vst, [d.reason for d in seen.about(lpid)][-3:])
                assert vst.get("inflight", 0) == 0, vst
                time.sleep(0.1)
            v_ms, l_ms = _shared_steps(victim, liar, (t_liar + 1.0) * 1e3)
        finally:
            seen.stop()
    assert any(said in n for n in seen.notes()), "the device note says it too"
    # the two jobs share the device as equals: neither's step is several times the other's
    assert v_ms < 2.0 * l_ms, f"victim step {v_ms:.1f} ms, liar's {l_ms:.1f} ms"


def _set_aside(node: LocalNode, member: str, said: str, named: bool) -> tuple[float, float]:
    """Starts the liar beside the victim; checks that its role is believed at first and set
    aside about distrust_after_ms (2 s) later, with a reason that says why, and stays so;
    returns the median steps of both while they share the device after that."""
    seen = Decisions(node.rdir)
    try:
        victim, vpid = _victim(node, 10.0)
        time.sleep(1.0)
        liar, lpid = _liar(node, member, 9.0, named)
        w_liar = time.time()
        d = wait_for(lambda: next((d for d in seen.about(lpid) if said.format(pid=lpid) in d.reason), None),
                     10.0, "the liar's role set aside")
        took = d.time - w_liar
        assert 1.5 <= took <= 5.0, f"set aside {took:.1f} s after it started (bound 2 s)"
        assert (d.setting.gate, d.setting.priority) == ("open", 0) and "treated as prefill" in d.reason, d
        wait_for(lambda: _setting(node, lpid).get("priority") == 0 and _setting(node, vpid).get("inflight") == 0,
                 5.0, "both open")
        t_fair = time.monotonic()
        time.sleep(2.0)
        assert _setting(node, lpid).get("priority") == 0, "the liar got its priority back"
        return _shared_steps(victim, liar, t_fair * 1e3)
    finally:
        seen.stop()


@NEEDS_BPF[0]
@NEEDS_BPF[1]
def test_a_declared_role_the_operators_contradict_is_set_aside(node_dir: Path, member: str) -> None:
    """The node's defaults (no [roles] table: anyone may declare anything): the member's
    `--role decode` is believed at first, then set aside once its kernels (named
    prompt_flash_attention: prefill attention, seen by the BPF observer) have contradicted it
    for distrust_after_ms."""
    with LocalNode(rdir=node_dir, observer="bpf", policy="flexpd", controller_args=["--tick-ms", "5"]) as node:
        v_ms, l_ms = _set_aside(node, member, "pid {pid} declared decode but runs prefill operators for ", True)
    assert v_ms < 2.0 * l_ms, f"victim step {v_ms:.1f} ms, liar's {l_ms:.1f} ms"


def test_a_declared_role_the_work_shape_contradicts_is_set_aside(node_dir: Path, member: str) -> None:
    """The same with the shim's counters only, where the observer has just the shape of the
    work to go by: a node that lets shape contradict a declaration (contradicted_by)."""
    cfg = _config(node_dir, '[roles]\ncontradicted_by = ["aclnn", "kernel", "shape"]\n')
    with LocalNode(rdir=node_dir, observer="shim", policy="flexpd",
                   controller_args=["--config", cfg, "--tick-ms", "5"]) as node:
        v_ms, l_ms = _set_aside(node, member, "pid {pid} declared decode but runs prefill-shaped work for ", False)
    assert v_ms < 2.0 * l_ms, f"victim step {v_ms:.1f} ms, liar's {l_ms:.1f} ms"
