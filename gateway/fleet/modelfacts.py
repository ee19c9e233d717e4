"""ModelFacts for the router: what a cold load of a model costs in bytes.

Two sources, both without loading weights: the built-in catalog (launcher.catalog), or a backend's
`/api/show` `model_info` (GGUF metadata). Either way the numbers go through launcher.perf, the same
memory model the planner and the simulator use, so the router, the plan and the backends agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from gateway.routing.snapshot import ModelFacts
from launcher.facts import perf
from launcher.facts.catalog import ModelSpec, find_model

# When a GGUF header does not say its vocabulary size (show trims token arrays), this is what
# most 7-8B models of the last years use; it only affects the graph estimate.
FALLBACK_VOCAB_SIZE = 32000


def facts_from_spec(spec: ModelSpec, name: str, size_bytes: int = 0) -> ModelFacts:
    """Facts at Ollama's default load options (4096 context, one slot)."""
    if size_bytes and size_bytes != spec.file_size_bytes:
        spec = replace(spec, file_size_bytes=size_bytes)
    one_token = perf.LoadOptions(num_ctx=1, num_parallel=1)
    return ModelFacts(
        name=name,
        size_bytes=spec.file_size_bytes,
        kv_bytes_per_token=perf.kv_cache_bytes(spec, one_token),
        overhead_bytes=perf.card_overhead_bytes(spec, perf.LoadOptions()),
        context_length=spec.context_length,
        embedding_only=spec.embedding_only,
    )


def facts_from_catalog(name: str, size_bytes: int = 0) -> ModelFacts | None:
    spec = find_model(name)
    return None if spec is None else facts_from_spec(spec, name, size_bytes)


def _int(info: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = info.get(key, default)
    if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv on hybrid models)
        numbers = [v for v in value if isinstance(v, int | float)]
        value = max(numbers) if numbers else default
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return int(value)


def spec_from_show(name: str, show: Mapping[str, Any], size_bytes: int) -> ModelSpec | None:
    """A ModelSpec from `/api/show`'s `model_info`; None when the header lacks the shape keys."""
    info = show.get("model_info")
    if not isinstance(info, Mapping):
        return None
    arch = str(info.get("general.architecture", ""))
    block_count = _int(info, f"{arch}.block_count")
    embedding_length = _int(info, f"{arch}.embedding_length")
    head_count = _int(info, f"{arch}.attention.head_count")
    if not arch or not block_count or not embedding_length or not head_count:
        return None
    details = show.get("details") if isinstance(show.get("details"), Mapping) else {}
    capabilities = show.get("capabilities") or []
    tokens = info.get("tokenizer.ggml.tokens")
    vocab_size = _int(info, f"{arch}.vocab_size") or (len(tokens) if isinstance(tokens, list) else 0)
    return ModelSpec(
        name=name,
        family=arch,
        parameter_count=_int(info, "general.parameter_count"),
        quantization=str(details.get("quantization_level", "")),  # type: ignore[union-attr]
        file_size_bytes=size_bytes,
        block_count=block_count,
        embedding_length=embedding_length,
        head_count=head_count,
        head_count_kv=_int(info, f"{arch}.attention.head_count_kv", head_count),
        context_length=_int(info, f"{arch}.context_length", 2048),
        vocab_size=vocab_size or FALLBACK_VOCAB_SIZE,
        key_length=_int(info, f"{arch}.attention.key_length"),
        value_length=_int(info, f"{arch}.attention.value_length"),
        expert_count=_int(info, f"{arch}.expert_count"),
        expert_used_count=_int(info, f"{arch}.expert_used_count"),
        embedding_only="embedding" in capabilities and "completion" not in capabilities,
        sliding_window=_int(info, f"{arch}.attention.sliding_window"),
    )


def facts_from_show(name: str, show: Mapping[str, Any], size_bytes: int) -> ModelFacts | None:
    spec = spec_from_show(name, show, size_bytes)
    return None if spec is None else facts_from_spec(spec, name)
