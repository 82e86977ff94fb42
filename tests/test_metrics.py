"""The observer's Prometheus metrics (`flexnpu observe --metrics`, docs/metrics.md).

Without root: the address and the reasons' kinds, the state's arithmetic on hand-made
snapshots (device counters keep what exited processes did; their series go), one-line
refusals of a bad address, a bad config key and a port in use.

With root and BPF (a real node: emulator, daemons, observer, controller): a scrape over HTTP
checked against the emulator's own counts and `promtool check metrics`; the gate gauges
against the daemons' lists; a real Prometheus server that scrapes the observer, queried over
its HTTP API, which also parses every query of the Grafana dashboard; and a thousand
short-lived programs whose series are all gone afterwards while the device counters hold
every launch and byte they made.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flexnpu import paths
from flexnpu.bench.node import stop_process
from flexnpu.observe.metrics import AddressError, MetricsState, parse_address, reason_kind, registry
from test_observe_fixtures import NEEDS_BPF, PROGS, REPO, build, flexnpu_argv

DASHBOARD = REPO / "deploy" / "grafana" / "flexnpu.json"
GEN = REPO / "scripts" / "gen_grafana_dashboard.py"
KLIB = paths.emulator_kernel_library
# The observer sees every process on the machine that maps a runtime library, other nodes'
# too (tests run side by side): the programs here use a device index others leave alone.
DEV = 11


# ------------------------------------------------------------------ helpers

def bpf(f: Callable) -> Callable:
    """Marks a test as needing root and BPF (skipped, saying why, elsewhere; CI runs it)."""
    for m in NEEDS_BPF:
        f = m(f)
    return f


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str) -> Samples:
    """Every sample by its full name (with _total), as (labels, value)."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def scrape(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        assert r.status == 200
        return r.read().decode()


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The one sample of name whose labels include these; None if there is none."""
    hits = [v for lb, v in samples.get(name, ()) if all(lb.get(k) == w for k, w in labels.items())]
    assert len(hits) <= 1, f"{name}{labels}: {len(hits)} samples"
    return hits[0] if hits else None


def until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def listening(port: int) -> list[str]:
    """The local addresses listening on TCP port (from /proc/net/tcp and tcp6), as hex."""
    found = []
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(f).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            addr, hport = parts[1].split(":")
            if parts[3] == "0A" and int(hport, 16) == port:
                found.append(addr)
    return found


def promtool_check(text: str) -> None:
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), \
        f"promtool check metrics: rc {r.returncode}\n{r.stdout}{r.stderr}"


# ------------------------------------------------------------------ without root

def test_address_forms() -> None:
    assert parse_address("9400") == ("127.0.0.1", 9400)
    assert parse_address(":9400") == ("127.0.0.1", 9400)
    assert parse_address("0.0.0.0:9400") == ("0.0.0.0", 9400)
    assert parse_address("[::1]:9400") == ("::1", 9400)
    assert parse_address("localhost:0") == ("127.0.0.1", 0)
    for bad in ("", "x", "127.0.0.1:65536", "127.0.0.1:-1", "::1:9400", "[::1", "no-such-host.invalid:9400",
                "example.org:80", "127.0.0.1:٣"):
        with pytest.raises(AddressError) as e:
            parse_address(bad)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("reason,kind", [
    ("no snapshot from the observer: gate open, no budget", "observer_quiet"),
    ("observer silent for 1.2 s (> 1 s): gate open", "observer_quiet"),
    ("passthrough: gate open, no budget", "passthrough"),
    ("pid 41 alone on device 0: flexpd steps aside, pid 41 open, no budget", "steps_aside"),
    ("no decode client on device 1: static-split steps aside, pid 7 open, no budget", "steps_aside"),
    ("pid 9 on device 0 shows no phase yet: open, no budget", "no_phase"),
    ("turn: prefill's turn on device 0 (10 of 20 ms, 3.1 ms into the cycle): decode pid 5 closed, in-flight 0",
     "turn"),
    ("decode pid 5 step 3.10 ms < 0.8 x budget 4.00 ms: prefill pid 6 in-flight 2 -> 3", "budget"),
    ("decode pid 5 shares device 0 with prefill: priority 7, no budget", "decode_priority"),
    ("prefill pid 6 shares device 0 with decode pid 5: priority 0, in-flight 1, max hold 200 ms",
     "prefill_priority"),
    ("prefill pid 6 on device 0, prefill first: priority 7, in-flight unlimited, max hold 200 ms", "prefill_first"),
    ("decode pid 5 step 9.00 ms > tpot_ms 8: decode first: decode pid 5 on device 0, prefill first: priority 7, "
     "in-flight unlimited, max hold 200 ms", "decode_first"),
    ("pid 6 declared decode but its work is prefill; decode pid 6 shares device 0 with prefill: priority 7, "
     "no budget", "decode_priority"),
    ("something no policy says", "other"),
])
def test_reason_kinds(reason: str, kind: str) -> None:
    assert reason_kind(reason) == kind


def _proc(pid: int, launches: int, h2d: int, mem: int, dev: int = 0) -> dict:
    return {"pid": pid, "device": dev, "comm": f"p{pid}", "role": None, "phase": "decode", "phase_source": "shape",
            "counters": {"launches": launches, "bytes": {"h2d": h2d, "d2h": 0, "d2d": 0, "h2h": 0}, "mem_bytes": mem},
            "rates": {"busy": 0.5, "sync_wait": 0.0}}


def _snap(procs: list[dict], decode: float = 0.5) -> dict:
    devs = sorted({p["device"] for p in procs})
    return {"schema": 1, "source": "bpf", "interval_s": 0.1, "processes": procs,
            "devices": [{"device": d, "pids": [p["pid"] for p in procs if p["device"] == d],
                         "mem_bytes": sum(p["counters"]["mem_bytes"] for p in procs if p["device"] == d),
                         "phase_occupancy": {"prefill": 0.0, "decode": decode, "idle": 1 - decode}} for d in devs]}


def _text(state: MetricsState) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry(state)).decode()


def test_device_counters_keep_exited_processes_and_their_series_go() -> None:
    st = MetricsState()
    st.update(_snap([_proc(11, 5, 100, 4096)]))
    st.update(_snap([_proc(11, 7, 300, 4096), _proc(13, 2, 0, 8192)]))
    s = parse(_text(st))
    assert value(s, "flexnpu_npu_chip_info_launches_total", id="0") == 9
    assert value(s, "flexnpu_process_launches_total", pid="13") == 2
    assert value(s, "flexnpu_npu_chip_info_hbm_used_memory_bytes", id="0") == 4096 + 8192
    # 11 exits: its last counts were in the snapshot above; 13 goes on; then a new 11 (pid reuse)
    st.update(_snap([_proc(13, 3, 0, 8192)]))
    s = parse(_text(st))
    assert value(s, "flexnpu_process_launches_total", pid="11") is None
    assert {lb["pid"] for lb, _ in s["flexnpu_process_transfer_bytes_total"]} == {"13"}
    assert value(s, "flexnpu_npu_chip_info_launches_total", id="0") == 10
    assert value(s, "flexnpu_npu_chip_info_transfer_bytes_total", id="0", direction="h2d") == 300
    st.update(_snap([_proc(11, 1, 50, 0), _proc(13, 3, 0, 8192)]))
    s = parse(_text(st))
    assert value(s, "flexnpu_npu_chip_info_launches_total", id="0") == 11
    assert value(s, "flexnpu_npu_chip_info_transfer_bytes_total", id="0", direction="h2d") == 350
    assert value(s, "flexnpu_npu_chip_info_busy_seconds_total", id="0", phase="decode") == pytest.approx(0.2)
    st.update(_snap([]))  # nothing left: the device stays, with nothing held
    s = parse(_text(st))
    assert "flexnpu_process_launches_total" not in s
    assert value(s, "flexnpu_npu_chip_info_hbm_used_memory_bytes", id="0") == 0
    assert value(s, "flexnpu_npu_chip_info_launches_total", id="0") == 11
    if shutil.which("promtool"):
        promtool_check(_text(st))


def _report(pid: int, decided: int | None, recent: int, new: int = 0) -> Any:
    """A controller report from controller `pid` that has made `decided` decisions, with the
    last `recent` of them, `new` of which are this report's own."""
    from flexnpu.control.wire import ControllerReport, Decision, GateSetting

    ds = tuple(Decision(float(i), 0, 100 + i, GateSetting(), f"decode pid {100 + i} shares device 0 with prefill: "
                        "priority 7, no budget") for i in range(recent))
    rep = ControllerReport(1, 0.0, 0, pid, "flexpd", 5.0, "ok", (), ds[len(ds) - new:] if new else (), ds,
                           decided)
    return ControllerReport.from_json(rep.to_json())  # as the observer reads it


def test_decisions_are_counted_once_however_late_the_observer_joins() -> None:
    """Decisions made before the observer subscribed, or in reports it lost, are counted from
    the next report's recent ones, by number; none twice; a restarted controller starts anew."""
    st = MetricsState()

    def counted() -> float:
        return value(parse(_text(st)), "flexnpu_controller_decisions_total", policy="flexpd", id="0",
                     reason="decode_priority") or 0

    st.controller_report(_report(40, 3, 3))  # joined after three decisions, none of them new now
    assert counted() == 3
    st.controller_report(_report(40, 3, 3))  # the periodic report: nothing new
    assert counted() == 3
    st.controller_report(_report(40, 6, 6, new=1))  # 4 and 5 were in reports it lost
    assert counted() == 6
    st.controller_report(_report(40, 40, 16, new=2))  # 7..24 are gone for good: 16 counted
    assert counted() == 22
    st.controller_report(_report(41, 2, 2, new=2))  # a new controller
    assert counted() == 24
    st.controller_report(_report(41, None, 3, new=3))  # an older controller: its own decisions
    assert counted() == 27


def test_a_report_whose_count_contradicts_it_is_refused() -> None:
    from flexnpu.control.wire import ControllerReport, WireError

    good = json.loads(_report(40, 3, 3).to_json())
    for bad in (2, -1, True, "3", 2.5):
        with pytest.raises(WireError):
            ControllerReport.from_json(json.dumps({**good, "decided": bad}))
    assert ControllerReport.from_json(json.dumps({**good, "decided": 9})).decided == 9


def _observe(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(flexnpu_argv("observe", *args), env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def observe_env(tmp_path: Path) -> dict[str, str]:
    rdir = tmp_path / "run"
    rdir.mkdir(mode=0o755)
    env = dict(os.environ, FLEXNPU_RUNTIME_DIR=str(rdir), FLEXNPU_CONFIG=str(tmp_path / "flexnpu.toml"))
    return env


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1:70000", "[::1", "no-such-host.invalid:9400"])
def test_bad_address_is_one_line(address: str, observe_env: dict[str, str]) -> None:
    r = _observe("--source", "shim", "--count", "1", "--metrics", address, env=observe_env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("flexnpu observe: --metrics") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_address_not_here_is_one_line(observe_env: dict[str, str]) -> None:
    r = _observe("--source", "shim", "--count", "1", "--metrics", "192.0.2.1:9400", env=observe_env)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "not an address of this machine" in r.stderr


def test_bad_config_key_is_one_line(observe_env: dict[str, str]) -> None:
    Path(observe_env["FLEXNPU_CONFIG"]).write_text('[observe]\nmetrics = "127.0.0.1:port"\n')
    r = _observe("--source", "shim", "--count", "1", env=observe_env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "[observe] metrics" in r.stderr
    Path(observe_env["FLEXNPU_CONFIG"]).write_text('[observe]\nmetrix = "127.0.0.1:9400"\n')
    r = _observe("--source", "shim", "--count", "1", env=observe_env)
    assert r.returncode == 2 and "unknown key" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_config_key_serves_and_port_in_use_is_one_line(observe_env: dict[str, str]) -> None:
    port = free_port()
    Path(observe_env["FLEXNPU_CONFIG"]).write_text(f'[observe]\nmetrics = "127.0.0.1:{port}"\n')
    p = subprocess.Popen(flexnpu_argv("observe", "--source", "shim", "--interval-ms", "50"), env=observe_env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        text = until(lambda: _try_scrape(f"http://127.0.0.1:{port}/metrics"), 60, "the observer's metrics")
        assert "flexnpu_observer_snapshots_total" in text
        # bound to the loopback address only, as asked
        assert listening(port) == ["0100007F"], listening(port)
        # an observer of another runtime dir (one observer per dir) asked for a port in use
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            busy = held.getsockname()[1]
            other = dict(observe_env, FLEXNPU_RUNTIME_DIR=str(Path(observe_env["FLEXNPU_RUNTIME_DIR"]) / "second"))
            Path(other["FLEXNPU_RUNTIME_DIR"]).mkdir(mode=0o755)
            r = _observe("--source", "shim", "--count", "1", "--metrics", f"127.0.0.1:{busy}", env=other)
        assert r.returncode == 1, r.stderr
        assert "in use" in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert not (Path(other["FLEXNPU_RUNTIME_DIR"]) / "observe.sock").exists()  # cleaned up on the way out
    finally:
        stop_process(p, 30)
        p.stderr.close()
    assert listening(port) == []


def _try_scrape(url: str) -> str | None:
    try:
        return scrape(url, timeout=2)
    except OSError:
        return None


def test_dashboard_is_what_the_generator_writes() -> None:
    r = subprocess.run([sys.executable, str(GEN), "--check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    d = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in d["panels"]}
    for t in ("Busy by phase", "Device memory", "Kernel launches", "Copies by direction",
              "Gate wait (share of time)", "Decisions by reason"):
        assert t in titles


def dashboard_queries() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", ())]
    return [e.replace("$__rate_interval", "1m").replace("$id", ".*") for e in exprs]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bflexnpu_[a-z0-9_]+", expr))


# ------------------------------------------------------------------ a real node (root, BPF)

@pytest.fixture(scope="module")
def short_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(PROGS / "metrics_short.c", tmp_path_factory.mktemp("metrics") / "metrics_short")


@pytest.fixture(scope="module")
def workload_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(PROGS / "obs_workload.c", tmp_path_factory.mktemp("metrics") / "obs_workload")


class Node:
    """A LocalNode serving metrics, with two programs under the shim (prefill and decode)
    that did their work and hold their memory until the module ends."""

    def __init__(self, node: Any, port: int) -> None:
        self.node = node
        self.port = port
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.programs: dict[str, tuple[subprocess.Popen, dict]] = {}

    def samples(self) -> Samples:
        return parse(scrape(self.url))


@pytest.fixture(scope="module")
def node(workload_program: Path) -> Iterator[Node]:
    from flexnpu.bench.node import LocalNode

    port = free_port()
    with LocalNode(devices=DEV + 1, observer="bpf", observe_interval_ms=100, policy="flexpd",
                   observe_args=["--metrics", f"127.0.0.1:{port}"]) as ln:
        n = Node(ln, port)
        until(lambda: _try_scrape(n.url), 60, "the observer's metrics")
        for role in ("prefill", "decode"):
            p = ln.spawn([str(workload_program), str(KLIB()), "--hold"], role=role, devices=str(DEV),
                         stdin=subprocess.PIPE, bufsize=1)
            ready = json.loads(p.stdout.readline())
            truth = json.loads(p.stdout.readline())
            assert truth["pid"] == ready["pid"] == p.pid
            n.programs[role] = (p, truth)
        yield n
        for p, _ in n.programs.values():
            if p.poll() is None:
                p.stdin.write("quit\n")
                p.stdin.flush()


@bpf
@pytest.mark.slow
def test_scrape_matches_the_emulator(node: Node) -> None:
    """Every per-process and per-device count equals the emulator's; the text passes promtool.
    A snapshot trails the emulator by up to an interval, so both are read again until they
    agree (or the time is up, and the differences are the failure)."""

    def mismatches() -> list[str]:
        dev = node.node.emulator_status()["devices"][DEV]
        clients = {c["pid"]: c for c in dev["clients"]}
        s = node.samples()
        want: list[tuple[str, dict, Any]] = []
        for role, (p, truth) in node.programs.items():
            c, pid = clients[p.pid], str(p.pid)
            want.append(("flexnpu_process_launches_total", {"pid": pid, "id": str(DEV), "role": role},
                         c["ops"]["kernel"]))
            want += [("flexnpu_process_transfer_bytes_total", {"pid": pid, "direction": d}, c["bytes_copied"][d])
                     for d in ("h2d", "d2h", "d2d")]
            want.append(("flexnpu_process_memory_used_bytes", {"pid": pid}, c["memory_used"]))
            phases = [(lb["phase"], v) for lb, v in s.get("flexnpu_process_phase", ()) if lb["pid"] == pid]
            if len(phases) != 1 or phases[0] not in ((role, 1), ("idle", 1)):  # done, it holds its memory
                want.append(("flexnpu_process_phase", {"pid": pid, "phase": role}, f"one series, {role} or idle"))
            assert c["ops"]["kernel"] == truth["ops"]["kernel"]
        lb = {"id": str(DEV), "model_name": dev["soc"]}
        want += [("flexnpu_npu_chip_info_hbm_used_memory_bytes", lb, dev["memory"]["used"]),
                 ("flexnpu_npu_chip_info_hbm_total_memory_bytes", lb, dev["memory"]["total"]),
                 ("flexnpu_npu_chip_info_launches_total", lb, sum(c["ops"]["kernel"] for c in clients.values())),
                 ("flexnpu_npu_chip_info_processes", lb, len(clients)),
                 ("flexnpu_observer_info", {"source": "bpf"}, 1)]
        want += [("flexnpu_npu_chip_info_transfer_bytes_total", {**lb, "direction": d},
                  sum(c["bytes_copied"][d] for c in clients.values())) for d in ("h2d", "d2h", "d2d")]
        return [f"{name}{labels} = {value(s, name, **labels)}, emulator {v}"
                for name, labels, v in want if value(s, name, **labels) != v]

    deadline = time.monotonic() + 30
    while (wrong := mismatches()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not wrong, "\n".join(wrong)
    promtool_check(scrape(node.url))
    assert listening(node.port) == ["0100007F"]


@bpf
@pytest.mark.slow
def test_gates_and_decisions_match_the_daemon(node: Node) -> None:
    """The controller set both programs (decode first, prefill budgeted): its decisions are
    counted by kind, and each gate gauge is what the daemon lists."""
    from flexnpu.forward.api import DaemonClient

    pids = {role: p.pid for role, (p, _) in node.programs.items()}

    def controlled() -> list | None:
        with DaemonClient(DEV, node.node.rdir, timeout=2.0) as c:
            views = {v.pid: v for v in c.list() if v.pid in pids.values()}
        ok = len(views) == 2 and all(v.owner == "controller" for v in views.values())
        return list(views.values()) if ok else None

    views = until(controlled, 30, "the controller to set both programs")

    def agree() -> bool:
        s = node.samples()
        with DaemonClient(DEV, node.node.rdir, timeout=2.0) as c:
            now = {v.pid: v for v in c.list() if v.pid in pids.values()}
        for pid, v in now.items():
            lb = {"pid": str(pid), "id": str(DEV), "owner": "controller"}
            if value(s, "flexnpu_gate_priority", **lb) != v.priority or \
                    value(s, "flexnpu_gate_inflight_limit", **lb) != v.inflight or \
                    value(s, "flexnpu_gate_open", **lb) != (1 if v.gate == "open" else 0) or \
                    not math.isclose(value(s, "flexnpu_gate_max_hold_seconds", **lb) or -1, v.max_hold_ms / 1e3):
                return False
            if value(s, "flexnpu_process_gate_wait_seconds_total", pid=str(pid)) is None:
                return False
        return True

    until(agree, 30, "the gate gauges to equal the daemon's list")
    s = node.samples()
    assert value(s, "flexnpu_gate_priority", pid=str(pids["decode"])) > value(s, "flexnpu_gate_priority",
                                                                              pid=str(pids["prefill"]))
    decided = {lb["reason"]: v for lb, v in s.get("flexnpu_controller_decisions_total", ()) if lb["policy"] == "flexpd"}
    assert decided.get("decode_priority", 0) >= 1 and decided.get("prefill_priority", 0) >= 1, decided
    assert "other" not in decided, decided
    assert value(s, "flexnpu_controller_up", policy="flexpd") == 1
    assert views  # set by the controller, as the daemon says


# ------------------------------------------------------------------ a real Prometheus

class Prometheus:
    def __init__(self, tmp: Path, target_port: int, scrape_s: float = 0.5) -> None:
        self.port = free_port()
        cfg = tmp / "prometheus.yml"
        cfg.write_text(
            "global:\n"
            f"  scrape_interval: {round(scrape_s * 1000)}ms\n"
            f"  scrape_timeout: {round(scrape_s * 1000)}ms\n"
            "scrape_configs:\n"
            "  - job_name: flexnpu\n"
            "    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n")
        self.log_path = tmp / "prometheus.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp)
        self.base = f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.base}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # a bad query: 400 with a JSON body
            return json.loads(e.read())

    def query(self, expr: str) -> dict:
        return self.api("/api/v1/query", query=expr)

    def up(self) -> bool:
        try:
            targets = self.api("/api/v1/targets")["data"]["activeTargets"]
        except OSError:
            assert self.proc.poll() is None, \
                f"prometheus exited {self.proc.returncode}:\n{self.log_path.read_text(errors='replace')[-2000:]}"
            return False
        return any(t["health"] == "up" for t in targets)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed (bash scripts/setup.sh installs it)", pytrace=False)
    started: list[Prometheus] = []

    def start(port: int) -> Prometheus:
        started.append(Prometheus(tmp_path, port))
        return started[-1]

    yield start
    for p in started:
        p.stop()
        assert listening(p.port) == []


@bpf
@pytest.mark.slow
def test_real_prometheus_scrapes_the_observer(node: Node, prometheus: Callable[[int], Prometheus]) -> None:
    prom = prometheus(node.port)
    until(prom.up, 60, "prometheus to find the observer up")
    emu = node.node.emulator_status()["devices"][DEV]
    clients = {c["pid"]: c for c in emu["clients"]}

    def one(expr: str) -> float | None:
        r = prom.query(expr)
        assert r["status"] == "success", r
        res = r["data"]["result"]
        return float(res[0]["value"][1]) if len(res) == 1 else None

    for role, (p, _) in node.programs.items():
        got = until(lambda: one(f'flexnpu_process_launches_total{{pid="{p.pid}"}}'), 30, f"{role} in prometheus")
        assert got == clients[p.pid]["ops"]["kernel"]
        assert one(f'sum(flexnpu_process_transfer_bytes_total{{pid="{p.pid}"}})') == \
            sum(clients[p.pid]["bytes_copied"][d] for d in ("h2d", "d2h", "d2d"))
    assert one(f'flexnpu_npu_chip_info_hbm_used_memory_bytes{{id="{DEV}"}}') == emu["memory"]["used"]
    assert one(f'flexnpu_npu_chip_info_launches_total{{id="{DEV}"}}') == sum(c["ops"]["kernel"] for c in clients.values())
    assert one("up") == 1

    # every query of the dashboard parses and names only what the observer exports
    exported = {name for name in parse(scrape(node.url))}
    exported |= {n[:-len("_total")] for n in exported if n.endswith("_total")}
    for expr in dashboard_queries():
        r = prom.query(expr)
        assert r["status"] == "success", (expr, r)
        missing = metric_names(expr) - exported
        assert not missing, f"{expr} names {missing}, which the observer does not export"


# ------------------------------------------------------------------ cardinality

N_SHORT = 1000
SHORT_LAUNCHES = 3  # tests/progs/metrics_short.c
SHORT_BYTES = 4096


@bpf
@pytest.mark.slow
def test_thousand_short_processes_leave_no_series(short_program: Path) -> None:
    """1,000 real programs, 4 at a time, each launching 3 kernels and exiting: the device
    counters hold every launch and byte, while the per-process series stay few during the
    run and are all gone after it."""
    from flexnpu.bench.node import LocalNode

    port = free_port()
    with LocalNode(devices=DEV + 1, observer="bpf", observe_interval_ms=50, daemons=False,
                   observe_args=["--metrics", f"127.0.0.1:{port}"]) as ln:
        url = f"http://127.0.0.1:{port}/metrics"
        until(lambda: _try_scrape(url), 60, "the observer's metrics")
        assert value(parse(scrape(url)), "flexnpu_npu_chip_info_launches_total", id=str(DEV)) in (None, 0)
        env = ln.program_env(shim=False)
        argv = [str(short_program), str(KLIB()), str(DEV)]

        def run_one(_: int) -> int:
            r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)["pid"]

        most, scrapes = 0, []
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(run_one, i) for i in range(N_SHORT)]
            while not all(f.done() for f in futures):  # scrape while they run
                t0 = time.monotonic()
                s = parse(scrape(url))
                scrapes.append(time.monotonic() - t0)
                most = max(most, sum(1 for lb, _ in s.get("flexnpu_process_launches_total", ()) if lb["id"] == str(DEV)))
                time.sleep(0.05)
            pids = {f.result() for f in futures}
        assert len(pids) == N_SHORT

        def counted() -> Samples | None:
            s = parse(scrape(url))
            return s if value(s, "flexnpu_npu_chip_info_launches_total", id=str(DEV)) == N_SHORT * SHORT_LAUNCHES else None

        try:
            s = until(counted, 10, f"{N_SHORT * SHORT_LAUNCHES} launches on the device")
        except AssertionError:
            s = parse(scrape(url))
        assert value(s, "flexnpu_npu_chip_info_launches_total", id=str(DEV)) == N_SHORT * SHORT_LAUNCHES
        for d in ("h2d", "d2h"):
            assert value(s, "flexnpu_npu_chip_info_transfer_bytes_total", id=str(DEV), direction=d) == N_SHORT * SHORT_BYTES
        def settled() -> Samples | None:
            s = parse(scrape(url))
            return s if not [lb for lb, _ in s.get("flexnpu_process_launches_total", ()) if lb["id"] == str(DEV)] else None

        s = until(settled, 10, "every process series to go")
        left = [(name, lb) for name, rows in s.items() for lb, _ in rows if lb.get("pid") in {str(p) for p in pids}]
        assert not left, left[:5]
        assert value(s, "flexnpu_npu_chip_info_hbm_used_memory_bytes", id=str(DEV)) == 0
        series = sum(1 for rows in s.values() for lb, _ in rows if lb.get("id") == str(DEV))
        assert series <= 16, f"{series} series of device {DEV} after the processes exited"
        # a process is in the snapshots of at most two intervals after it exits: far fewer than all
        assert 0 < most <= N_SHORT // 4, f"{most} process series at once for 4 programs at a time"
        scrapes.sort()
        print(f"\n{N_SHORT} short processes: at most {most} process series at once; "
              f"scrape median {scrapes[len(scrapes) // 2] * 1e3:.1f} ms, max {scrapes[-1] * 1e3:.1f} ms "
              f"over {len(scrapes)} scrapes; {series} series after")
