"""config.toml is decoded strictly: every error names the TOML path, the bad value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_gateway_settings
from launcher.config import load_config, load_sim_settings
from launcher.facts.strictconf import ConfigError, parse_go_duration

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_example_config_loads() -> None:
    cfg = load_config(ROOT / "config.toml")
    assert cfg.gateway.listen == "127.0.0.1:11434"
    assert [m.name for m in cfg.models][:1] == ["llama3.1:8b"]
    assert len(cfg.sim.gpus) >= 2


def test_defaults_apply_to_an_empty_file(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, ""))
    assert cfg.launcher.base_port == 11500
    assert cfg.launcher.ollama_bin == "auto"
    assert cfg.gateway.policy == "residency"
    assert cfg.models == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[[models]]\nname = 'a'\n[[models]]\nname='b'\n[[models]]\nname = 'c'\nnum_ctx = 0\nnum_ctx2 = 1\n",
            "models[2].num_ctx2: unknown key",
        ),
        (
            "[[models]]\nname = 'a'\nnum_ctx = 100\n",
            "models[0].num_ctx: must be 0 (Ollama's default) or >= 256, got 100",
        ),
        ("[launcher]\nbase_port = 80\n", "launcher.base_port: must be >= 1024, got 80"),
        ("[launcher]\nbase_port = '11500'\n", "launcher.base_port: must be an integer, got '11500'"),
        ("[launcher]\nkeep_alive = 'soon'\n", "launcher.keep_alive: must be a duration"),
        ("[gateway]\npolicy = 'fastest'\n", "gateway.policy: must be one of 'residency', 'round-robin'"),
        ("[gateway]\nlisten = '11434'\n", 'gateway.listen: must be "host:port"'),
        ("[gateway]\nqueue_timeout_s = 'forever'\n", "gateway.queue_timeout_s: must be a duration"),
        ("[gateway]\nmax_wait_s = nan\n", "gateway.max_wait_s: must be a duration"),
        ("[gateway]\nqueue_timeout_s = inf\n", "gateway.queue_timeout_s: must be a duration"),
        (
            "[[gateway.backends]]\nurl = 'http://h:1'\nvram_gb = inf\n",
            "gateway.backends[0].vram_gb: must be a finite number, got inf",
        ),
        ("[sim]\nspeed = nan\n", "sim.speed: must be a finite number, got nan"),
        (
            "[gateway]\nstate = 'redis'\nredis_url = '127.0.0.1:6379'\n",
            "gateway.redis_url: must be a redis://, rediss:// or unix:// URL, got '127.0.0.1:6379'",
        ),
        ("[[gateway.backends]]\nurl = 'localhost:1'\n", "gateway.backends[0].url: must be an http:// or https:// URL"),
        ("[[sim.gpus]]\nname = 'RTX 9999'\n", "sim.gpus[0].name: is not a card in the built-in table"),
        ("[sim]\nspeed = 0\n", "sim.speed: must be >= 0.001, got 0"),
        ("[extras]\nx = 1\n", "extras: unknown section"),
        ("[[models]]\nnum_ctx = 4096\n", "models[0].name: is required"),
        ("[[models]]\nname = 'a'\n[[models]]\nname = 'a'\n", "models[1].name: duplicate model 'a'"),
        ("[[models]]\nname = 'a'\nreplicas = 0\n", 'models[0].replicas: must be "auto" or an integer >= 1, got 0'),
        ("models = 3\n", "models: must be an array of tables"),
        ("[launcher\n", "not valid TOML"),
    ],
)
def test_bad_values_are_named_by_path(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_durations_accept_seconds_and_go_strings(tmp_path: Path) -> None:
    path = _write(tmp_path, "[gateway]\nqueue_timeout_s = '1m30s'\nconnect_timeout_s = 2\n")
    settings = load_gateway_settings(path)
    assert settings.queue_timeout_s == 90.0
    assert settings.connect_timeout_s == 2.0


def test_go_duration_parser_matches_go() -> None:
    assert parse_go_duration("5m") == 300
    assert parse_go_duration("1h30m") == 5400
    assert parse_go_duration("-1m") == -60
    assert parse_go_duration("250ms") == pytest.approx(0.25)
    assert parse_go_duration("0") == 0
    for bad in ("3600", "", "5 m", "m", "1x"):
        with pytest.raises(ValueError):
            parse_go_duration(bad)


def test_sim_section_reads_alone(tmp_path: Path) -> None:
    path = _write(tmp_path, "[sim]\nspeed = 50\n[[sim.gpus]]\nname = 'A6000'\nvram_gb = 40\n")
    sim = load_sim_settings(path)
    assert sim.speed == 50 and sim.gpus[0].vram_gb == 40


def test_missing_file_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.commands.cli", "plan", "--config", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "nope.toml: no such file" in proc.stderr
    assert "Traceback" not in proc.stderr
