"""The unit files and `flexnpu service install|uninstall|status`: every generated unit passes
`systemd-analyze verify` with the real binary path; --dry-run prints the files and changes
nothing; install and uninstall round-trip against a temp --prefix and configuration path, with
the user and group created and removed (or kept) as documented; bad input is one line and a
non-zero exit; doctor's service checks."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flexnpu import doctor, paths
from flexnpu.cli import app
from flexnpu.service import install as inst
from flexnpu.service import units
from test_service_fixtures import account, needs_root, service_config, service_section  # noqa: F401

cli = CliRunner()
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="needs systemd-analyze (apt-get install systemd)")


# ------------------------------------------------------------------ the units


@needs_root
@needs_analyze
@pytest.mark.parametrize("emulator,network", [(True, False), (False, False), (True, True)],
                         ids=["emulator", "cann", "network"])
def test_every_unit_passes_systemd_analyze_verify(tmp_path, account, emulator, network):
    cfg = service_config(account, tmp_path / "flexnpu.toml", devices=(0, 1), emulator=emulator, network=network)
    files = units.render(cfg)
    assert (units.EMU in files) == emulator
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    # the template through an instance too, so %i is expanded as systemd will
    shutil.copy(tmp_path / units.DAEMON_TEMPLATE, tmp_path / units.daemon_instance(1))
    targets = sorted(str(p) for p in tmp_path.glob("*.service"))
    proc = subprocess.run(["systemd-analyze", "verify", *targets], capture_output=True, text=True,
                          cwd=tmp_path)
    # verify exits 0 on warnings (an unknown key, an unsafe user): any output is a failure here
    assert proc.returncode == 0 and not proc.stderr.strip() and not proc.stdout.strip(), proc.stderr


def test_units_say_what_they_run(tmp_path):
    cfg = units.ServiceConfig(binary=Path("/opt/v/bin/flexnpu"), devices=(0, 2), emulator=True, emu_devices=3,
                              config_file=tmp_path / "c.toml")
    f = units.render(cfg)
    assert list(f) == [units.EMU, units.DAEMON_TEMPLATE, units.OBSERVE, units.CONTROLLER]
    svc = {n: service_section(t) for n, t in f.items()}
    assert svc[units.EMU]["ExecStart"] == ["/opt/v/bin/flexnpu emu start --foreground --devices 3"]
    assert svc[units.DAEMON_TEMPLATE]["ExecStart"] == ["/opt/v/bin/flexnpu daemon --device %i"]
    assert svc[units.OBSERVE]["ExecStart"] == ["/opt/v/bin/flexnpu observe --source bpf"]
    assert f"FLEXNPU_CONFIG={tmp_path / 'c.toml'}" in svc[units.CONTROLLER]["Environment"]
    for n, s in svc.items():
        assert s["Type"] == ["notify"] and s["User"] == [paths.SERVICE_USER], n
        assert s["RuntimeDirectory"] == ["flexnpu"] and s["RuntimeDirectoryPreserve"] == ["yes"], n
        assert s["Restart"] == ["on-failure"] and s["NoNewPrivileges"] == ["yes"], n
        want = "CAP_SYS_ADMIN" if n == units.OBSERVE else ""
        assert s["CapabilityBoundingSet"] == [want] and s["AmbientCapabilities"] == [want], n
    # ordering: emulator before the daemons before the controller; the observer independent
    assert "After=flexnpu-emu.service" in f[units.DAEMON_TEMPLATE]
    assert ("After=flexnpu-emu.service flexnpu-daemon@0.service flexnpu-daemon@2.service"
            in f[units.CONTROLLER])
    assert "After=" not in f[units.OBSERVE]
    assert units.enabled_units(cfg) == [units.EMU, "flexnpu-daemon@0.service", "flexnpu-daemon@2.service",
                                        units.OBSERVE, units.CONTROLLER]


def _bytes(v: str) -> int:
    return int(v[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[v[-1]]


@pytest.mark.parametrize("emulator", [True, False], ids=["emulator", "cann"])
def test_every_unit_limits_descriptors_memory_and_tasks_with_a_reason(tmp_path, emulator):
    from flexnpu.forward.daemon import control
    from flexnpu.forward.daemon import server as daemon

    cfg = units.ServiceConfig(binary=Path("/opt/v/bin/flexnpu"), devices=(0,), emulator=emulator)
    for name, text in units.render(cfg).items():
        s = service_section(text)
        for key in ("LimitNOFILE", "MemoryHigh", "MemoryMax", "TasksMax"):
            assert len(s.get(key, [])) == 1, (name, key)
        lines = text.splitlines()
        for key in ("LimitNOFILE", "MemoryHigh", "TasksMax"):  # each group of limits says why, just above
            i = next(n for n, line in enumerate(lines) if line.startswith(key + "="))
            assert lines[i - 1].startswith("# ") and len(lines[i - 1]) > 30, (name, lines[i - 1])
        assert 0 < _bytes(s["MemoryHigh"][0]) < _bytes(s["MemoryMax"][0]), name
        assert int(s["TasksMax"][0]) >= 16 and int(s["LimitNOFILE"][0]) >= 4096, name
    d = service_section(units.render(cfg)[units.DAEMON_TEMPLATE])
    nofile = int(d["LimitNOFILE"][0])
    # the daemon's connection caps (two sockets) and headroom fit under its limit many times over
    assert nofile >= daemon.MIN_FD_LIMIT
    assert 2 * control.total_cap(nofile) + control.FD_HEADROOM < nofile // 4


def test_device_lists():
    assert inst.parse_devices("1,0", emulator=True) == (0, 1)
    assert inst.parse_devices("all", emulator=True) == tuple(range(inst.EMU_DEFAULT_DEVICES))
    assert inst.parse_devices("all", emulator=False, present=[0, 3]) == (0, 3)
    for bad in ("", "0,x", "-1", "16", "0,0", "a,b"):
        with pytest.raises(inst.ServiceError):
            inst.parse_devices(bad, emulator=True)
    with pytest.raises(inst.ServiceError, match="davinci"):
        inst.parse_devices("all", emulator=False, present=[])


# ------------------------------------------------------------------ the command


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A temp configuration path (the manifest goes beside it) and a temp unit prefix."""
    conf = tmp_path / "etc" / "flexnpu.toml"
    monkeypatch.setenv("FLEXNPU_CONFIG", str(conf))
    monkeypatch.setenv("FLEXNPU_RUNTIME_DIR", str(tmp_path / "run"))
    return tmp_path / "units", conf


def _one_line_error(res) -> str:
    text = (res.stderr if hasattr(res, "stderr") else res.output).strip()
    assert res.exit_code != 0 and len(text.splitlines()) == 1, text
    return text


def test_dry_run_prints_every_file_and_changes_nothing(env):
    prefix, conf = env
    res = cli.invoke(app, ["service", "install", "--dry-run", "--devices", "0,1", "--prefix", str(prefix)])
    assert res.exit_code == 0, res.output
    p = inst.plan("0,1", prefix)
    for name, text in p.files.items():
        assert f"would write {prefix / name}:\n{text}" in res.output
    assert f"would write {conf}:" in res.output and "[controller]" in res.output
    assert not prefix.exists() and not conf.exists() and not conf.parent.exists()


def _network(files: dict[str, str]) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    return {n: (tuple(service_section(t)["PrivateNetwork"]), tuple(service_section(t)["RestrictAddressFamilies"]))
            for n, t in files.items()}


def test_only_units_the_configuration_asks_to_serve_on_tcp_get_a_network(env):
    """[observe] metrics or [publish] observe_tcp: the observer's unit gets IP sockets;
    [publish] controller_tcp: the controller's; every other unit stays without a network."""
    prefix, conf = env
    none = (("yes",), ("AF_UNIX",))
    net = (("no",), ("AF_UNIX AF_INET AF_INET6",))
    assert set(_network(inst.plan("0", prefix).files).values()) == {none}  # no file: no network anywhere
    conf.parent.mkdir(parents=True)
    conf.write_text('[observe]\nmetrics = "0.0.0.0:9464"\n')
    got = _network(inst.plan("0", prefix).files)
    assert got[units.OBSERVE] == net and got[units.CONTROLLER] == none, got
    assert got[units.DAEMON_TEMPLATE] == none and got[units.EMU] == none
    conf.write_text('[publish]\ncontroller_tcp = "10.0.0.1:7782"\n')
    got = _network(inst.plan("0", prefix).files)
    assert got[units.OBSERVE] == none and got[units.CONTROLLER] == net, got
    # a configuration that is not the default path reaches the observer too
    assert f"FLEXNPU_CONFIG={conf}" in service_section(inst.plan("0", prefix).files[units.OBSERVE])["Environment"]
    conf.write_text('[observe]\nmetrics = "nowhere"\n')
    res = cli.invoke(app, ["service", "install", "--dry-run", "--devices", "0", "--prefix", str(prefix)])
    assert "[observe] metrics" in _one_line_error(res) and not prefix.exists()


def test_bad_devices_is_one_line(env):
    prefix, _ = env
    res = cli.invoke(app, ["service", "install", "--devices", "0,x", "--prefix", str(prefix)])
    assert "--devices" in _one_line_error(res)
    assert not prefix.exists()


def test_install_as_a_user_is_refused_in_one_line(env, tmp_path):
    prefix, conf = env
    os.chmod(tmp_path, 0o755)
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "flexnpu.cli",
         "service", "install", "--devices", "0", "--prefix", str(prefix)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "FLEXNPU_CONFIG": str(conf)}) if os.geteuid() == 0 else subprocess.run(
        [sys.executable, "-m", "flexnpu.cli", "service", "install", "--devices", "0", "--prefix", str(prefix)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "needs root" in proc.stderr and "--dry-run" in proc.stderr
    assert not prefix.exists()


@pytest.fixture
def names(monkeypatch):
    """A user and group name nobody has: install creates them, uninstall removes them."""
    import secrets

    n = f"fxi{secrets.token_hex(3)}"
    monkeypatch.setenv("FLEXNPU_SERVICE_USER", n)
    monkeypatch.setenv("FLEXNPU_SERVICE_GROUP", n)
    yield n
    if inst.user_exists(n):
        subprocess.run(["userdel", n], check=False)
    if inst.group_exists(n):
        subprocess.run(["groupdel", n], check=False)


@needs_root
def test_install_uninstall_round_trip(env, names):
    prefix, conf = env
    res = cli.invoke(app, ["service", "install", "--devices", "0,1", "--prefix", str(prefix)])
    assert res.exit_code == 0, res.output
    out = res.output
    p = inst.plan("0,1", prefix)
    for name, text in p.files.items():
        assert (prefix / name).read_text() == text and f"wrote {prefix / name}" in out
        assert stat.S_IMODE((prefix / name).stat().st_mode) == 0o644
    assert f"created system group {names}" in out and f"created system user {names}" in out
    assert inst.group_exists(names) and inst.user_exists(names)
    assert conf.read_text() == inst.default_config_text(inst.installed_binary())
    if not inst.systemd_running():
        assert "systemd is not PID 1 here" in out and "wrote the files only" in out
    assert "User=" + names in (prefix / units.OBSERVE).read_text()
    # status sees them
    st = json.loads(cli.invoke(app, ["service", "status", "--json", "--prefix", str(prefix)]).output)
    assert st["schema"] == 1 and st["units"] and all(r["installed"] for r in st["units"])
    # every line of the output is one action
    assert all(line.split()[0] in ("created", "wrote", "system", "kept", "ran:", "systemd", "dry")
               or "not a directory systemd reads" in line for line in out.splitlines()), out
    # a second install changes nothing it does not own and keeps the configuration
    res2 = cli.invoke(app, ["service", "install", "--devices", "0,1", "--prefix", str(prefix)])
    assert res2.exit_code == 0 and f"kept {conf} (exists)" in res2.output
    res = cli.invoke(app, ["service", "uninstall", "--dry-run", "--prefix", str(prefix)])
    assert res.exit_code == 0 and all((prefix / n).exists() for n in p.files), res.output
    res = cli.invoke(app, ["service", "uninstall", "--prefix", str(prefix)])
    assert res.exit_code == 0, res.output
    assert not any((prefix / n).exists() for n in p.files)
    assert not inst.user_exists(names) and not inst.group_exists(names), res.output
    assert not inst.manifest_path().exists()
    # the second install kept the first one's record: the unchanged configuration goes too
    assert not conf.exists() and f"removed system group {names}" in res.output


@needs_root
def test_uninstall_keeps_a_changed_config_and_a_group_with_members(env, names):
    prefix, conf = env
    assert cli.invoke(app, ["service", "install", "--devices", "0", "--prefix", str(prefix)]).exit_code == 0
    conf.write_text(conf.read_text() + "\n# edited\n")
    other = names + "m"
    subprocess.run(["useradd", "--system", "--no-create-home", "-g", names, other], check=True)
    try:
        res = cli.invoke(app, ["service", "uninstall", "--prefix", str(prefix)])
        assert res.exit_code == 0, res.output
        assert f"kept {conf}: changed since install" in res.output and conf.exists()
        assert f"kept system group {names}: it has members ({other})" in res.output
        assert inst.group_exists(names) and not inst.user_exists(names)
    finally:
        subprocess.run(["userdel", other], check=False)


def test_uninstall_with_nothing_installed_is_one_line(env):
    prefix, _ = env
    res = cli.invoke(app, ["service", "uninstall", "--prefix", str(prefix)])
    assert "nothing to uninstall" in _one_line_error(res)


def test_status_without_systemd_says_so(env):
    prefix, _ = env
    res = cli.invoke(app, ["service", "status", "--prefix", str(prefix)])
    assert res.exit_code == 0, res.output
    if not inst.systemd_running():
        assert "systemd is not running" in res.output
    assert "not installed" in res.output


# ------------------------------------------------------------------ doctor


def test_doctor_group_and_services_are_notes_before_install():
    c = doctor.check_group("fx-no-such-group", services=[])
    assert c.ok and "service install" in c.detail
    c = doctor.check_group("fx-no-such-group", services=[units.OBSERVE])
    assert not c.ok and c.fix
    c = doctor.check_services(services=[])
    assert c.ok and c.detail.startswith("not installed")


def test_doctor_runtime_modes(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CLIENT_GROUP", "fx-no-such-group")  # no group: owner-only modes
    rdir = tmp_path / "rt"
    assert doctor.check_runtime_modes(rdir).ok  # not there yet: fine
    rdir.mkdir(mode=paths.RUNTIME_DIR_MODE)
    os.chmod(rdir, paths.RUNTIME_DIR_MODE)
    for name, mode in (("emu.sock", paths.EMU_SOCKET_MODE), ("daemon-0.sock", paths.GROUPLESS_MODE),
                       ("daemon-0.admin.sock", paths.GROUPLESS_MODE), ("gate-0.ctl", paths.GROUPLESS_MODE),
                       ("gate-0.sock", paths.GROUPLESS_MODE), ("observe.sock", paths.GROUPLESS_MODE),
                       ("observe.lock", paths.LOCK_FILE_MODE), ("emu.log", 0o640)):
        (rdir / name).touch()
        os.chmod(rdir / name, mode)
    c = doctor.check_runtime_modes(rdir)
    assert c.ok and "7 socket, gate and lock files" in c.detail, c.detail
    os.chmod(rdir / "gate-0.ctl", 0o666)
    os.chmod(rdir / "observe.lock", 0o644)  # anyone could hold it
    c = doctor.check_runtime_modes(rdir)
    assert not c.ok and "gate-0.ctl is 0666, not 0600" in c.detail and "observe.lock is 0644" in c.detail and c.fix
    os.chmod(rdir, 0o777)  # the services refuse such a dir, and doctor says why
    c = doctor.check_runtime_modes(rdir)
    assert not c.ok and "writable by others than its owner" in c.detail
