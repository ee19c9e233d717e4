"""The one parser from a backend's `/api/show` reply to a model's facts (`ModelSpec`).

The gateway (costing a cold load) and the launcher (planning) both read models this way, so the
router and the planner cannot cost the same model differently. `/api/show`'s `model_info` holds the
GGUF key/values and `tensors` their shapes, with Ollama's own trims (`server/routes.go` GetModelInfo):

- a non-verbose show sends arrays as null (the tokenizer's tokens, per-layer head counts), so the
  vocabulary is read from the token-embedding tensor's shape, and per-layer head counts need one
  verbose request (`needs_verbose`);
- the quantization comes from `general.file_type`, else `details.quantization_level`;
- an embedding-only model is one whose capabilities list "embedding" without "completion", or one
  the GGUF rules call embedding-only (a pooling type, an embedding architecture).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from launcher.facts.catalog import ModelSpec
from launcher.models.gguf import GGUFError, GGUFFile, spec_from_gguf

# When neither the tensors nor the tokens give the vocabulary, most 7-8B models of the last years
# use about this many; it only moves the compute-graph estimate.
FALLBACK_VOCAB_SIZE = 32000


class ShowIncomplete(ValueError):
    """The show reply lacks what a model's facts need; the message says what."""


def needs_verbose(show: Mapping[str, Any]) -> bool:
    """True when the per-layer head counts came back null, which only a verbose show fills in."""
    info = show.get("model_info")
    if not isinstance(info, Mapping):
        return False
    arch = info.get("general.architecture")
    keys = (f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv")
    return any(key in info and info[key] is None for key in keys)


def header_from_show(show: Mapping[str, Any]) -> GGUFFile:
    """The show reply as a parsed GGUF header: key/values without the nulled arrays, tensor counts."""
    model_info = show.get("model_info")
    if not isinstance(model_info, Mapping) or not model_info:
        raise ShowIncomplete("its /api/show answer has no model_info")
    metadata: dict[str, object] = {key: value for key, value in model_info.items() if value is not None}
    tensors = [t for t in show.get("tensors") or [] if isinstance(t, Mapping)]
    parameter_count = expert_parameter_count = 0
    for tensor in tensors:
        elements = math.prod(int(d) for d in tensor.get("shape") or [])
        parameter_count += elements
        if "_exps" in str(tensor.get("name", "")):
            expert_parameter_count += elements
    arch = metadata.get("general.architecture")
    vocab_key = f"{arch}.vocab_size"
    if vocab_key not in metadata and not isinstance(metadata.get("tokenizer.ggml.tokens"), list):
        embedding = next((t for t in tensors if t.get("name") == "token_embd.weight"), None)
        shape = embedding.get("shape") if embedding else None
        if isinstance(shape, list) and len(shape) == 2:
            metadata[vocab_key] = int(shape[1])  # [embedding_length, vocabulary]
    return GGUFFile(0, "<", metadata, len(tensors), parameter_count, expert_parameter_count, 0)


def spec_from_show(name: str, show: Mapping[str, Any], size_bytes: int) -> ModelSpec:
    """A ModelSpec from a `/api/show` reply and the model's file size (from `/api/tags`).

    Raises ShowIncomplete when the reply lacks the architecture's shape keys.
    """
    header = header_from_show(show)
    try:
        spec = spec_from_gguf(header, name=name, file_size_bytes=size_bytes)
    except GGUFError as exc:
        raise ShowIncomplete(f"model_info incomplete: {exc}") from None
    if not spec.block_count or not spec.embedding_length or not spec.head_count:
        raise ShowIncomplete("model_info lacks the block count, embedding length or head count")
    details = show.get("details")
    if spec.quantization == "unknown" and isinstance(details, Mapping) and details.get("quantization_level"):
        spec = replace(spec, quantization=str(details["quantization_level"]))
    capabilities = show.get("capabilities")
    if isinstance(capabilities, list) and "embedding" in capabilities and "completion" not in capabilities:
        spec = replace(spec, embedding_only=True)
    if not spec.vocab_size:
        spec = replace(spec, vocab_size=FALLBACK_VOCAB_SIZE)
    return spec
