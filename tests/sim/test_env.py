"""`corral-sim serve` reads `ollama serve`'s environment the way Ollama's envconfig does."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.config import SimGpu
from launcher.facts.ollama import env_keep_alive_s
from launcher.gpus.discovery import simulated_inventory
from launcher.sim.env import EnvError, load_serve_settings, parse_ollama_host, visible_cards
from launcher.sim.harness import write_rig


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ("http", "127.0.0.1", 11434)),
        ("0.0.0.0", ("http", "0.0.0.0", 11434)),
        ("0.0.0.0:8080", ("http", "0.0.0.0", 8080)),
        ("http://10.0.0.5", ("http", "10.0.0.5", 80)),
        ("https://example.com", ("https", "example.com", 443)),
        ("http://example.com:1234/path", ("http", "example.com", 1234)),
        ("[::1]:11500", ("http", "::1", 11500)),
        ("::1", ("http", "::1", 11434)),
        ("ollama.com", ("https", "ollama.com", 443)),
        (" 'localhost:9000' ".strip().strip("'"), ("http", "localhost", 9000)),
    ],
)
def test_ollama_host_like_envconfig(value: str, expected: tuple[str, str, int]) -> None:
    scheme, host, port, _path = parse_ollama_host(value)
    assert (scheme, host, port) == expected


def test_bad_port_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_ollama_host("127.0.0.1:99999")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5m", 300.0), ("1h30m", 5400.0), ("3600", 3600.0), ("0", 0.0), ("-1", math.inf), ("-5m", math.inf)],
)
def test_keep_alive_env_values(value: str, seconds: float) -> None:
    assert env_keep_alive_s(value) == seconds


def test_cuda_visible_devices_by_index_uuid_and_empty() -> None:
    rig = simulated_inventory([SimGpu("RTX 4090"), SimGpu("RTX 3090"), SimGpu("A6000", uuid="GPU-abc123")])
    assert [c.index for c in visible_cards(None, rig)] == [0, 1, 2]
    assert [c.index for c in visible_cards("2,0", rig)] == [2, 0]  # order is the child's device order
    assert [c.index for c in visible_cards("GPU-sim-0001,GPU-abc", rig)] == [1, 2]
    assert visible_cards("", rig) == ()
    assert visible_cards("-1", rig) == ()
    for bad in ("7", "GPU-nope", "0,0"):
        with pytest.raises(ValueError):
            visible_cards(bad, rig)


def test_settings_defaults_and_vram_tier(tmp_path: Path) -> None:
    rig = write_rig(tmp_path / "rig.toml", ["RTX 4090", "RTX 3090"], speed=7)
    env = {"CORRAL_SIM_RIG": str(rig), "OLLAMA_MODELS": str(tmp_path / "m")}
    s = load_serve_settings(env)
    assert (s.host, s.port, s.num_parallel, s.max_queue, s.keep_alive_s) == ("127.0.0.1", 11434, 1, 512, 300.0)
    assert s.speed == 7
    assert s.max_runners == 6  # 3 per visible card
    assert s.default_num_ctx == 262144  # 48 GiB of VRAM
    one = load_serve_settings(env | {"CUDA_VISIBLE_DEVICES": "1"})
    assert one.default_num_ctx == 32768 and one.max_runners == 3
    cpu = load_serve_settings(env | {"CUDA_VISIBLE_DEVICES": ""})
    assert cpu.default_num_ctx == 4096 and cpu.max_runners == 3 and cpu.cards == ()
    fixed = load_serve_settings(env | {"OLLAMA_CONTEXT_LENGTH": "8192", "CORRAL_SIM_SPEED": "50"})
    assert fixed.default_num_ctx == 8192 and fixed.speed == 50


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("OLLAMA_NUM_PARALLEL", "four"),
        ("OLLAMA_MAX_QUEUE", "\u00b2"),  # a Unicode digit: str.isdigit() says yes, int() and Go say no
        ("OLLAMA_KEEP_ALIVE", "soon"),
        ("OLLAMA_KV_CACHE_TYPE", "q3"),
        ("OLLAMA_SCHED_SPREAD", "maybe"),
        ("CUDA_VISIBLE_DEVICES", "5"),
        ("CORRAL_SIM_SPEED", "-2"),
        ("OLLAMA_HOST", "127.0.0.1:70000"),
    ],
)
def test_bad_values_name_the_variable(tmp_path: Path, key: str, value: str) -> None:
    rig = write_rig(tmp_path / "rig.toml", ["RTX 4090"])
    with pytest.raises(EnvError, match=key):
        load_serve_settings({"CORRAL_SIM_RIG": str(rig), key: value})


def _run_cli(env: dict[str, str], timeout_s: float = 20) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "CORRAL_", "CUDA_"))}
    return subprocess.run(
        [sys.executable, "-m", "launcher.sim.cli", "serve"],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_bad_environment_exits_2_with_one_line(tmp_path: Path) -> None:
    rig = write_rig(tmp_path / "rig.toml", ["RTX 4090"])
    result = _run_cli({"CORRAL_SIM_RIG": str(rig), "OLLAMA_NUM_PARALLEL": "lots"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "corral-sim: OLLAMA_NUM_PARALLEL: must be a non-negative integer, got 'lots'"
    ]
    missing = _run_cli({"CORRAL_SIM_RIG": str(tmp_path / "nope.toml")})
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1 and "nope.toml" in missing.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    rig = write_rig(tmp_path / "rig.toml", ["RTX 4090"])
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {"CORRAL_SIM_RIG": str(rig), "OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_MODELS": str(tmp_path)}
        result = _run_cli(env)
    assert result.returncode != 0
    assert "address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_version_and_help() -> None:
    out = subprocess.run([sys.executable, "-m", "launcher.sim.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "serve" in out.stdout and "version" in out.stdout
    ver = subprocess.run([sys.executable, "-m", "launcher.sim.cli", "version"], capture_output=True, text=True)
    assert ver.returncode == 0 and "0.33.0" in ver.stdout
