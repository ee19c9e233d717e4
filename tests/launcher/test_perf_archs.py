"""The performance model on today's architectures: sliding-window layers cache only their window,
and a mixture of experts decodes at the pace of its active parameters."""

from __future__ import annotations

import pytest

from launcher.facts import perf
from launcher.facts.cards import find_card
from launcher.facts.catalog import find_model
from launcher.facts.perf import LoadOptions


def _spec(name: str) -> perf.ModelSpec:
    spec = find_model(name)
    assert spec is not None, name
    return spec


def test_sliding_window_layers_cache_only_their_window() -> None:
    gpt_oss = _spec("gpt-oss:20b")  # 24 layers, every other one with a 128-token window
    per_layer_token = (gpt_oss.head_dim_k + gpt_oss.head_dim_v) * gpt_oss.head_count_kv * 2
    kv = perf.kv_cache_bytes(gpt_oss, LoadOptions(num_ctx=32768))
    assert kv == pytest.approx(per_layer_token * 32768 * (12 + 12 * 128 / 32768))
    gemma = _spec("gemma3:27b")  # 62 layers, one global in six (layers 5, 11, ..., 59): 10 global, 52 windowed at 1024
    long, short = (perf.kv_cache_bytes(gemma, LoadOptions(num_ctx=n)) for n in (65536, 1024))
    assert long / short == pytest.approx((10 * 65536 + 52 * 1024) / (62 * 1024), rel=1e-6)
    # Within the window every layer holds the whole context, as for a dense model.
    assert short == perf.kv_cache_bytes(gemma, LoadOptions(num_ctx=1024, num_parallel=1))


def test_moe_decodes_at_its_active_parameters() -> None:
    card = find_card("H100 80GB")
    assert card is not None
    moe, dense = _spec("qwen3:30b"), _spec("qwen3:32b")  # about the same file size
    assert moe.file_size_bytes == pytest.approx(dense.file_size_bytes, rel=0.1)
    opts = LoadOptions(num_ctx=8192)
    moe_at = perf.ollama_placement(moe, opts, [(card, card.vram_bytes)])
    dense_at = perf.ollama_placement(dense, opts, [(card, card.vram_bytes)])
    assert moe_at is not None and dense_at is not None
    assert perf.tokens_per_second(moe, moe_at) > 3 * perf.tokens_per_second(dense, dense_at)
