"""Ollama's memory model per era, against worked examples from Ollama's own source."""

from __future__ import annotations

import pytest

from launcher.facts import memory, perf
from launcher.facts.catalog import find_model
from launcher.facts.memory import Era
from launcher.facts.ollama import next_lower_auto_num_ctx, vram_default_num_ctx

GIB = 1024**3
MIB = 1024**2


def _spec(name: str) -> perf.ModelSpec:
    spec = find_model(name)
    assert spec is not None
    return spec


def test_head_predicts_file_plus_f16_kv_like_predict_server_vram() -> None:
    # llm/llama_server.go PredictServerVRAM: 2 x 32 layers x 8 KV heads x (4096 / 32) x ctx x 2 bytes,
    # i.e. 128 KiB per token for llama3.1:8b (OLLAMA_FACTS.md 3.1: "8 k ctx ~ 1 GiB").
    spec = _spec("llama3.1:8b")
    assert memory.predicted_kv_bytes(spec, 8192) == 8192 * 128 * 1024 == 1 * GIB
    # The H100 case: 131072 x 1 is the file + 16 GiB, ~20.6 GiB before the 2 GiB surcharge.
    predicted = memory.predict_server_vram(spec, 131072, 1)
    assert predicted == spec.file_size_bytes + 16 * GIB
    assert predicted / GIB == pytest.approx(20.6, abs=0.1)
    # num_ctx is capped to the trained context before it is multiplied by the slots.
    assert memory.predict_server_vram(spec, 10**9, 2) == spec.file_size_bytes + 32 * GIB


def test_batch_surcharge_and_automatic_batch_follow_sched_go() -> None:
    assert [memory.generation_batch_surcharge(b) for b in (512, 1024, 2048)] == [0, 768 * MIB, 2 * GIB]
    assert [memory.generation_batch_for_context(c) for c in (4096, 4097, 32768, 32769)] == [512, 1024, 1024, 2048]
    # 2048 needs the prediction within 60 % of available, 1024 within 75 %, and the surcharge within 80 %.
    assert memory.automatic_num_batch(131072, 20 * GIB, 80 * GIB) == 2048
    assert memory.automatic_num_batch(131072, 20 * GIB, 30 * GIB) == 1024
    assert memory.automatic_num_batch(131072, 20 * GIB, 24 * GIB) == 512
    assert memory.automatic_num_batch(131072, 20 * GIB, 80 * GIB, flash_attention=False) == 512


def test_context_tiers_and_the_out_of_memory_step_down() -> None:
    # server/routes.go Serve and sched.go nextLowerAutoNumCtx.
    assert [vram_default_num_ctx(g * GIB) for g in (16, 23, 47, 80)] == [4096, 32768, 262144, 262144]
    assert vram_default_num_ctx(24 * GIB, gpu_overhead_bytes=2 * GIB) == 4096
    assert [next_lower_auto_num_ctx(c) for c in (262144, 32769, 32768, 4097, 4096)] == [32768, 32768, 4096, 4096, None]


def test_era_follows_the_version() -> None:
    assert memory.era_for_version("ollama version is 0.12.10") is Era.A
    assert memory.era_for_version("Warning: client version is 0.29.4") is Era.A
    assert memory.era_for_version("0.30.0") is Era.HEAD
    assert memory.era_for_version("0.33.0-rc2") is Era.HEAD
    assert memory.era_for_version("0.0.0") is Era.HEAD  # a development build
    assert memory.era_for_version("no version here") is None


def test_era_a_reserves_graphsize_and_the_minimum_per_card() -> None:
    # v0.12.10 GraphSize, llama: batch 512, ctx 8192, E 4096, H 32, V 128256. The partial-offload
    # size's output-layer branch wins: 4*512*4096 + 4*512*(4096+128256) + 4096*128256*105/128.
    spec = _spec("llama3.1:8b")
    expected = 4 * 512 * 4096 + 4 * 512 * (4096 + 128256) + 4096 * 128256 * 105 // 128
    full = max(4 * 512 * (1 + 4 * 4096 + 8192 * 33), 4 * 512 * (4096 + 128256))
    assert full < expected
    assert memory.graph_bytes(spec, 8192, 512) == expected
    opts = perf.LoadOptions(num_ctx=8192, era=Era.A)
    assert perf.card_overhead_bytes(spec, opts) == expected + 457 * MIB


def test_head_plans_what_loads_fully_era_a_reserves_more() -> None:
    spec = _spec("llama3.1:8b")
    head = perf.LoadOptions(num_ctx=131072)
    era_a = perf.LoadOptions(num_ctx=131072, era=Era.A)
    held = perf.held_bytes(spec, head)
    # What /api/ps reports at HEAD: weights + KV + the compute buffer, the prediction's order of size.
    assert held == pytest.approx(memory.predict_server_vram(spec, 131072, 1), abs=1.5 * GIB)
    # Loading needs --fit's 1 GiB free beyond it; era A's estimate is far larger (graph 4-9x).
    assert perf.vram_needed_bytes(spec, head) == held + memory.FIT_TARGET_BYTES
    assert perf.vram_needed_bytes(spec, era_a) > 1.2 * perf.vram_needed_bytes(spec, head)
