"""The controller's configuration: defaults, the TOML file, options over the file, bad values
refused naming the key (exit 2, one line), and --print-config read back to the same thing."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flexnpu.cli import app
from flexnpu.control import config
from flexnpu.control.policies import flexpd, static_split

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_node_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The machine's /etc/flexnpu/flexnpu.toml must not leak into these tests."""
    monkeypatch.setenv("FLEXNPU_CONFIG", str(tmp_path / "absent.toml"))


def cli(*args: str):
    return runner.invoke(app, ["controller", *args])


def test_defaults() -> None:
    cfg = config.load(None, required=False)
    assert cfg.controller.policy == "flexpd" and cfg.controller.tick_ms == 5.0 and cfg.controller.lease_ms == 500.0
    assert cfg.policies["flexpd"] == flexpd.Options()
    assert cfg.policies["flexpd"].tpot_slack == 0.10 and cfg.policies["flexpd"].prefill_inflight == 1
    assert cfg.policies["static-split"] == static_split.Options(prefill_share=0.5, quantum_ms=20.0)


def test_missing_default_file_is_fine(tmp_path: Path) -> None:
    assert config.load(tmp_path / "none.toml", required=False) == config.load(None, required=False)
    r = cli("--print-config")
    assert r.exit_code == 0 and 'policy = "flexpd"' in r.stdout


def test_file_then_options_over_it(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[controller]\npolicy = "static-split"\ntick_ms = 2\nlease_ms = 800\n'
                 '[policy.flexpd]\ntpot_ms = 40\nprefill_inflight = 2\n'
                 '[policy.static-split]\nprefill_share = 0.3\nquantum_ms = 50\n')
    cfg = config.load(f, required=True)
    assert cfg.controller.policy == "static-split" and cfg.controller.tick_ms == 2.0
    assert isinstance(cfg.controller.tick_ms, float) and cfg.controller.lease_ms == 800.0
    assert cfg.policies["flexpd"].tpot_ms == 40.0 and cfg.policies["flexpd"].prefill_inflight == 2
    assert cfg.policy_options == static_split.Options(prefill_share=0.3, quantum_ms=50.0)
    cfg = config.load(f, required=True, overrides={"policy": "flexpd", "tick_ms": 7.5})
    assert cfg.controller.policy == "flexpd" and cfg.controller.tick_ms == 7.5 and cfg.controller.lease_ms == 800.0
    r = cli("--config", str(f), "--policy", "passthrough", "--print-config")
    assert r.exit_code == 0, r.output
    back = tomllib.loads(r.stdout)
    assert back["controller"]["policy"] == "passthrough" and back["controller"]["tick_ms"] == 2.0
    # $FLEXNPU_CONFIG names the default file
    r = runner.invoke(app, ["controller", "--print-config"], env={"FLEXNPU_CONFIG": str(f)})
    assert tomllib.loads(r.stdout)["controller"]["policy"] == "static-split"


def test_print_config_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "in.toml"
    f.write_text('[policy.flexpd]\ntpot_slack = 0.25\nmixed_as = "prefill"\n[controller]\ntick_ms = 3\n')
    first = cli("--config", str(f), "--print-config")
    assert first.exit_code == 0, first.output
    g = tmp_path / "out.toml"
    g.write_text(first.stdout)
    second = cli("--config", str(g), "--print-config")
    assert second.exit_code == 0 and second.stdout == first.stdout
    assert config.load(g, True) == config.load(f, True)


@pytest.mark.parametrize("text, key, why", [
    ('[controller]\npolicy = "fifo"', "[controller] policy", "must be one of passthrough, static-split, flexpd"),
    ("[controller]\ntick_ms = 0", "[controller] tick_ms", "must be >= 0.5"),
    ('[controller]\ntick_ms = "fast"', "[controller] tick_ms", "must be a number"),
    ("[controller]\ntick_ms = true", "[controller] tick_ms", "must be a number"),
    ("[controller]\nlease_ms = nan", "[controller] lease_ms", "must be a finite number"),
    ("[controller]\nlease_ms = 100\nrenew_ms = 80", "[controller] renew_ms", "at most lease_ms / 2"),
    ("[controller]\ntick = 5", "[controller] tick", "unknown key"),
    ("[policy.flexpd]\ntpot_slack = -0.1", "[policy.flexpd] tpot_slack", "must be > 0"),
    ("[policy.flexpd]\ntpot_slack = 0", "[policy.flexpd] tpot_slack", "must be > 0"),
    ("[policy.flexpd]\nprefill_inflight = 1.5", "[policy.flexpd] prefill_inflight", "whole number"),
    ("[policy.flexpd]\nprefill_inflight = 0", "[policy.flexpd] prefill_inflight", "must be >= 1"),
    ("[policy.flexpd]\nprefill_inflight = 9", "[policy.flexpd] prefill_inflight", "over prefill_inflight_max"),
    ("[policy.flexpd]\ngrow_below = 0.9", "[policy.flexpd] grow_below", "must be under shrink_above (0.8)"),
    ('[policy.flexpd]\nmixed_as = "both"', "[policy.flexpd] mixed_as", "must be one of decode, prefill"),
    ("[policy.static-split]\nprefill_share = 1.0", "[policy.static-split] prefill_share", "must be <= 0.95"),
    ("[policy.static-split]\nquantum_ms = 0.5", "[policy.static-split] quantum_ms", "must be >= 1"),
    ("[policy.lottery]\nx = 1", "[policy.lottery]", "unknown policy"),
    ("[daemon]\nx = 1", "[daemon]", "unknown section"),
    ("controller = 3", "[controller]", "must be a table"),
])
def test_bad_value_names_the_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    _refused_naming_its_key(tmp_path, text, key, why)


def _refused_naming_its_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    """load() refuses the file naming the key first, in a short message; the command says the
    same in one line, exit 2."""
    f = tmp_path / "bad.toml"
    f.write_text(text + "\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(f, required=True)
    assert str(e.value).startswith(key) and why in str(e.value) and len(str(e.value)) < 400, str(e.value)
    line = _one_line_exit_2(cli("--config", str(f)), key, why)
    assert line.startswith(f"flexnpu controller: {key}"), line


def test_bad_option_and_bad_files(tmp_path: Path) -> None:
    r = cli("--tick-ms", "-1", "--print-config")
    assert r.exit_code == 2 and "[controller] tick_ms = -1.0: must be >= 0.5" in r.output
    r = cli("--policy", "nope")
    assert r.exit_code == 2 and "[controller] policy" in r.output
    r = cli("--config", str(tmp_path / "missing.toml"))
    assert r.exit_code == 2 and "missing.toml: no such file" in r.output
    f = tmp_path / "broken.toml"
    f.write_text("[controller\n")
    r = cli("--config", str(f))
    assert r.exit_code == 2 and "not valid TOML" in r.output and len(r.output.strip().splitlines()) == 1


def test_help_has_examples() -> None:
    r = cli("--help")
    assert r.exit_code == 0 and "Examples" in r.stdout and "--print-config" in r.stdout


# ---------------------------------------------------------------- what the file is made of


def _one_line_exit_2(r, *says: str) -> str:
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, (r.exit_code, r.output)
    assert lines[0].startswith("flexnpu controller: ") and all(s in lines[0] for s in says), lines[0]
    return lines[0]


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """Opened O_NONBLOCK and checked with fstat: an open of a FIFO for reading would wait for
    a writer for ever. A process of its own, so that a regression times out instead of
    hanging the test run."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "c.toml"
    os.mkfifo(fifo)
    for args in (["--config", str(fifo), "--print-config"], ["--config", str(fifo)]):
        r = subprocess.run([sys.executable, "-m", "flexnpu.cli", "controller", *args], capture_output=True,
                           text=True, timeout=20, stdin=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1],
                           env={**os.environ, "FLEXNPU_CONFIG": str(tmp_path / "absent.toml")})
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert r.stderr.strip() == f"flexnpu controller: {fifo}: a FIFO, not a regular file" and not r.stdout
    # the default file (FLEXNPU_CONFIG) is read the same way
    r = runner.invoke(app, ["controller", "--print-config"], env={"FLEXNPU_CONFIG": str(fifo)})
    _one_line_exit_2(r, "a FIFO, not a regular file")


@pytest.mark.parametrize("make, says", [
    (lambda p: p.write_bytes(b"[controller]\ntick_ms = 3 # caf\xe9\n"), "not UTF-8 text (byte 0xe9 on line 2)"),
    (lambda p: p.write_bytes(b"\xff\xfe[\x00c\x00"), "not UTF-8 text (byte 0xff on line 1)"),
    (lambda p: p.write_bytes(b"[controller]\x00\n"), "not valid TOML"),
    (lambda p: p.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n"), "nested too deeply"),
    (lambda p: p.write_text("# " + "x" * (config.MAX_BYTES + 1) + "\n"), "more than a configuration"),
    (lambda p: p.mkdir(), "a directory, not a regular file"),
])
def test_a_file_that_is_not_a_configuration_is_one_line(tmp_path: Path, make, says: str) -> None:
    f = tmp_path / "c.toml"
    make(f)
    with pytest.raises(config.ConfigError) as e:
        config.load(f, required=True)
    assert says in str(e.value) and "\n" not in str(e.value)
    _one_line_exit_2(cli("--config", str(f), "--print-config"), says)


def test_a_device_is_not_a_configuration() -> None:
    for dev in ("/dev/null", "/dev/zero"):
        _one_line_exit_2(cli("--config", dev, "--print-config"), f"{dev}: a character device, not a regular file")


@pytest.mark.parametrize("text, key, why", [
    ("[controller]\ntick_ms = inf", "[controller] tick_ms", "must be a finite number"),
    ("[controller]\ntick_ms = -inf", "[controller] tick_ms", "must be a finite number"),
    ("[controller]\nstale_after_ms = nan", "[controller] stale_after_ms", "must be a finite number"),
    ("[controller]\nlease_ms = 1" + "0" * 400, "[controller] lease_ms", "must be a finite number"),
    ("[controller]\nlist_ms = 1e400", "[controller] list_ms", "must be a finite number"),
    ("[policy.flexpd]\nprefill_inflight = inf", "[policy.flexpd] prefill_inflight", "must be a finite number"),
    ("[policy.flexpd]\nrelearn_after = nan", "[policy.flexpd] relearn_after", "must be a finite number"),
    ("[controller]\ntick_ms = -5", "[controller] tick_ms", "must be >= 0.5"),
    ("[controller]\nlease_ms = 0", "[controller] lease_ms", "must be >= 50"),
    ("[controller]\nrenew_ms = -1", "[controller] renew_ms", "must be >= 5"),
    ("[controller]\nreport_ms = 0.0", "[controller] report_ms", "must be >= 10"),
    ("[controller]\nrescan_ms = -0.0", "[controller] rescan_ms", "must be >= 50"),
    ("[policy.flexpd]\nprefill_max_hold_ms = 0", "[policy.flexpd] prefill_max_hold_ms", "must be >= 0.01"),
    ("[policy.flexpd]\ndecode_max_hold_ms = -10", "[policy.flexpd] decode_max_hold_ms", "must be >= 0.01"),
    ("[policy.flexpd]\ntpot_ms = -1", "[policy.flexpd] tpot_ms", "must be >= 0"),
    ("[policy.static-split]\nquantum_ms = 0", "[policy.static-split] quantum_ms", "must be >= 1"),
    ("[policy.static-split]\ninflight = -1", "[policy.static-split] inflight", "must be >= 0"),
    ('[controller]\n"tick\\nms" = 5', "[controller] 'tick\\nms'", "unknown key"),
    ('[controller]\npolicy = "' + "x" * 5000 + '"', "[controller] policy = 'xxxx", "must be one of"),
    ("[roles]\ndecode = [\"fxnosuchuser\"]", "[roles] decode", "'fxnosuchuser': no such user on this node"),
    ("[roles]\nprefill = [\"@fxnosuchgroup\"]", "[roles] prefill", "no such group on this node"),
    ("[roles]\ndecode = \"root\"", "[roles] decode", "must be a list"),
    ("[roles]\ndecode = [1]", "[roles] decode", "each entry must be"),
    ("[roles]\ndecode = [\"ro ot\"]", "[roles] decode", "no such user"),
    ("[roles]\ndecode = [\"a\\nb\"]", "[roles] decode", "each entry must be"),
    ("[roles]\ndecode = [\"@\"]", "[roles] decode", "names no group"),
    ("[roles]\ndecode = [\"@99999999999999999999999\"]", "[roles] decode", "not a valid id"),
    ("[roles]\ndistrust_after_ms = 0", "[roles] distrust_after_ms", "must be >= 10"),
    ("[roles]\ndistrust_after_ms = -2000", "[roles] distrust_after_ms", "must be >= 10"),
    ("[roles]\ndistrust_after_ms = nan", "[roles] distrust_after_ms", "must be a finite number"),
    ("[roles]\ntrust_after_ms = inf", "[roles] trust_after_ms", "must be a finite number"),
    ("[roles]\ntrust_after_ms = 1" + "0" * 400, "[roles] trust_after_ms", "must be a finite number"),
    ("[roles]\ntrust_after_ms = true", "[roles] trust_after_ms", "must be a number"),
    ("[roles]\ncontradicted_by = [\"names\"]", "[roles] contradicted_by", "must be a list of aclnn, kernel, shape"),
    ("[roles]\nwho = 1", "[roles] who", "unknown key"),
    ("roles = 1", "[roles]", "must be a table"),
])
def test_every_value_class_is_refused_naming_its_key(tmp_path: Path, text: str, key: str, why: str) -> None:
    _refused_naming_its_key(tmp_path, text, key, why)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-5"])
def test_tick_ms_option_refuses_non_finite_and_non_positive(value: str) -> None:
    _one_line_exit_2(cli(f"--tick-ms={value}", "--print-config"), "[controller] tick_ms")


def test_roles_table_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "roles.toml"
    f.write_text('[roles]\ndecode = ["@root", "root", "0", "@0"]\nprefill = ["*"]\ndistrust_after_ms = 3000\n'
                 'contradicted_by = ["shape", "kernel"]\n')
    cfg = config.load(f, required=True)
    assert cfg.roles.decode == ("@root", "root", "0", "@0") and cfg.roles.prefill == ("*",)
    assert cfg.roles.distrust_after_ms == 3000.0 and cfg.roles.contradicted_by == ("kernel", "shape")
    first = cli("--config", str(f), "--print-config")
    assert first.exit_code == 0, first.output
    assert 'decode = ["@root", "root", "0", "@0"]' in first.stdout
    g = tmp_path / "out.toml"
    g.write_text(first.stdout)
    assert config.load(g, True) == cfg
    # absent lists read back absent: anyone may declare, as before the table existed
    plain = cli("--print-config")
    h = tmp_path / "plain.toml"
    h.write_text(plain.stdout)
    assert config.load(h, True).roles.prefill is None and config.load(h, True).roles.decode is None


def test_odd_file_names_are_shown_in_one_short_line(tmp_path: Path) -> None:
    for name, says in ((Path("a\x00b"), "'a\\x00b': not a file name"),
                       (Path("/nonexistent/" + "x" * 5000), "File name too long"),
                       (tmp_path / "new\nline.toml", "no such file")):
        with pytest.raises(config.ConfigError) as e:
            config.load(name, required=True)
        assert says in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 300, str(e.value)
