"""Ollama's rules as launcher/facts/ollama.py writes them once, including the cases where two
earlier copies disagreed (the Go-exact copy was kept)."""

import math

import pytest

from launcher.facts.ollama import (
    api_keep_alive_s,
    context_length_env,
    default_max_loaded_models,
    env_keep_alive_s,
    is_zero_keep_alive,
    parse_go_duration,
)
from launcher.facts.strictconf import duration_seconds


def test_go_duration_rejects_what_go_rejects_with_gos_message() -> None:
    with pytest.raises(ValueError, match='time: missing unit in duration "3600"'):
        parse_go_duration("3600")
    with pytest.raises(ValueError, match='unknown unit "x"'):
        parse_go_duration("1x")
    # Non-ASCII digits: Go's parser reads ASCII digits only (the config's old regex accepted these).
    with pytest.raises(ValueError):
        parse_go_duration("\u0661s")
    assert parse_go_duration("1.5h") == 5400
    assert parse_go_duration("1.s") == 1


def test_config_durations_allow_surrounding_spaces_but_not_inner_ones() -> None:
    assert duration_seconds(" 5m ") == 300
    with pytest.raises(ValueError):
        duration_seconds("5 m")


def test_keep_alive_as_the_api_and_the_environment_read_it() -> None:
    assert api_keep_alive_s(None) is None
    assert api_keep_alive_s(30) == 30
    assert api_keep_alive_s("-1m") == math.inf
    with pytest.raises(ValueError, match="Unsupported type"):
        api_keep_alive_s([1])
    with pytest.raises(ValueError):
        api_keep_alive_s("3600")  # the API takes no bare number in a string, the env var does
    assert env_keep_alive_s("3600") == 3600
    assert env_keep_alive_s("-1") == math.inf
    assert is_zero_keep_alive("0s") and not is_zero_keep_alive(True)


def test_models_per_gpu_counts_a_cpu_only_backend_as_one() -> None:
    # The router used to allow 0 models on a CPU-only backend; Ollama keeps 3 there.
    assert default_max_loaded_models(0) == 3
    assert default_max_loaded_models(2) == 6


def test_context_length_env_trims_like_envconfig_var() -> None:
    assert context_length_env({"OLLAMA_CONTEXT_LENGTH": ' "8192" '}) == 8192
    assert context_length_env({"OLLAMA_CONTEXT_LENGTH": "big"}) == 0
    assert context_length_env({}) == 0
