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
    f = tmp_path / "bad.toml"
    f.write_text(text + "\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(f, required=True)
    assert str(e.value).startswith(key) and why in str(e.value), str(e.value)
    r = cli("--config", str(f))
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flexnpu controller: {key}") and "Traceback" not in r.output


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
