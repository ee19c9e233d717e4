"""The one /api/show parser: the router and the planner read a model the same way, including the
cases where their two earlier parsers disagreed (vocabulary, nulled per-layer arrays)."""

from typing import Any

import pytest

from gateway.fleet.modelfacts import facts_from_show, facts_from_spec
from launcher.facts.catalog import find_model
from launcher.models.show import ShowIncomplete, needs_verbose, spec_from_show


def _show(**extra_info: Any) -> dict[str, Any]:
    info = {
        "general.architecture": "llama",
        "general.parameter_count": 8_030_261_248,
        "general.file_type": 15,
        "llama.block_count": 32,
        "llama.embedding_length": 4096,
        "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": 8,
        "llama.context_length": 131072,
        "tokenizer.ggml.tokens": None,  # a non-verbose show nulls the arrays
    }
    info.update(extra_info)
    return {
        "details": {"quantization_level": "Q4_K_M"},
        "model_info": info,
        "tensors": [{"name": "token_embd.weight", "type": "Q4_K", "shape": [4096, 128256]}],
        "capabilities": ["completion", "tools"],
    }


def test_vocabulary_comes_from_the_embedding_tensor_not_a_guess() -> None:
    spec = spec_from_show("llama3.1:8b", _show(), 4_920_000_000)
    assert spec.vocab_size == 128256  # the gateway's old parser guessed 32000 here
    assert spec.head_count_kv == 8
    assert spec.quantization == "Q4_K_M"


def test_router_and_planner_cost_the_same_model_the_same_way() -> None:
    show = _show()
    spec = spec_from_show("llama3.1:8b", show, 4_920_000_000)
    assert facts_from_show("llama3.1:8b", show, 4_920_000_000) == facts_from_spec(spec, "llama3.1:8b")


def test_nulled_per_layer_head_counts_ask_for_a_verbose_show() -> None:
    show = _show(**{"llama.attention.head_count_kv": None})
    assert needs_verbose(show)
    assert not needs_verbose(_show())


def test_embedding_models_from_capabilities() -> None:
    show = _show()
    show["capabilities"] = ["embedding"]
    assert spec_from_show("nomic-embed-text", show, 274_000_000).embedding_only


def test_a_reply_without_the_shape_is_refused() -> None:
    with pytest.raises(ShowIncomplete):
        spec_from_show("x", {"model_info": {}}, 1)
    with pytest.raises(ShowIncomplete):
        spec_from_show("x", {"model_info": {"general.architecture": "llama"}}, 1)
    assert facts_from_show("x", {"model_info": {}}, 1) is None


def test_catalog_models_round_trip_through_show() -> None:
    spec = find_model("llama3.1:8b")
    assert spec is not None
    show = _show(**{"llama.vocab_size": spec.vocab_size})
    assert spec_from_show("llama3.1:8b", show, spec.file_size_bytes).vocab_size == spec.vocab_size
