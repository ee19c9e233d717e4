"""The simulated registry: what `pull` of a catalog model installs into the store.

A pulled model gets the layers Ollama's library gives it: a model blob, a prompt template, parameters,
a license where the family has one, and a config. The model blob's *content* is a small
metadata-only GGUF file describing the model (`launcher.models.gguf`), while the manifest declares the
layer's size as the catalog's real file size, so /api/tags shows real sizes and the launcher reads
sizes the same way from a real store and a simulated one. Every digest is the sha256 of the bytes
actually written, so blob checks are honest. All contents are deterministic: two processes pulling
the same model write identical blobs and an identical manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from launcher.facts.catalog import ModelSpec
from launcher.models.gguf import encode_gguf_metadata, gguf_metadata_for_spec
from launcher.models.store import (
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_LICENSE,
    MEDIA_TYPE_MODEL,
    MEDIA_TYPE_PARAMS,
    MEDIA_TYPE_TEMPLATE,
    digest_of,
)
from launcher.sim.templates import template_for

_STOPS: dict[str, list[str]] = {
    "llama": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "llama4": ["<|eot|>", "<|eom|>"],
    "qwen2": ["<|im_start|>", "<|im_end|>"],
    "gemma2": ["<start_of_turn>", "<end_of_turn>"],
    "gemma3": ["<end_of_turn>"],
    "qwen3": ["<|im_start|>", "<|im_end|>"],
    "qwen3moe": ["<|im_start|>", "<|im_end|>"],
    "phi3": ["<|im_start|>", "<|im_end|>", "<|im_sep|>"],
    "mistral3": ["[INST]"],
}

_STAND_IN = "\n(simulated stand-in for the license text shipped with the model)"
_LICENSES: dict[str, str] = {
    "llama": "LLAMA COMMUNITY LICENSE AGREEMENT" + _STAND_IN,
    "llama4": "LLAMA 4 COMMUNITY LICENSE AGREEMENT" + _STAND_IN,
    "gemma2": "Gemma Terms of Use" + _STAND_IN,
    "gemma3": "Gemma Terms of Use" + _STAND_IN,
    "qwen2": "Apache License\nVersion 2.0, January 2004" + _STAND_IN,
    "qwen3": "Apache License\nVersion 2.0, January 2004" + _STAND_IN,
    "qwen3moe": "Apache License\nVersion 2.0, January 2004" + _STAND_IN,
    "gptoss": "Apache License\nVersion 2.0, January 2004" + _STAND_IN,
    "mistral3": "Apache License\nVersion 2.0, January 2004" + _STAND_IN,
    "mllama": "LLAMA 3.2 COMMUNITY LICENSE AGREEMENT" + _STAND_IN,
    "phi3": "MIT License" + _STAND_IN,
    "deepseek2": "MIT License" + _STAND_IN,
}


def config_for(spec: ModelSpec) -> dict[str, object]:
    """The model's config blob (model.ConfigV2 field order), as the library ships it."""
    return {
        "model_format": "gguf",
        "model_family": spec.family,
        "model_families": [spec.family],
        "model_type": spec.parameter_size,
        "file_type": spec.quantization,
        "architecture": "amd64",
        "os": "linux",
    }


@dataclass(frozen=True)
class Blob:
    """One layer to install: the bytes to write and the size the manifest declares."""

    media_type: str
    data: bytes
    declared_size: int

    @property
    def digest(self) -> str:
        return digest_of(self.data)


def _json_blob(media_type: str, value: object) -> Blob:
    data = (json.dumps(value, separators=(",", ":")) + "\n").encode()
    return Blob(media_type, data, len(data))


def model_blob(spec: ModelSpec) -> Blob:
    """The stand-in GGUF file: real header facts, no tensors, the real file size declared."""
    return Blob(MEDIA_TYPE_MODEL, encode_gguf_metadata(gguf_metadata_for_spec(spec)), spec.file_size_bytes)


def layers_for(spec: ModelSpec) -> tuple[Blob, tuple[Blob, ...]]:
    """(config, layers) of the library manifest for a catalog model, in the library's layer order."""
    layers = [model_blob(spec)]
    template = template_for(spec).encode()
    layers.append(Blob(MEDIA_TYPE_TEMPLATE, template, len(template)))
    license_text = _LICENSES.get(spec.family)
    if license_text:
        data = license_text.encode()
        layers.append(Blob(MEDIA_TYPE_LICENSE, data, len(data)))
    stops = _STOPS.get(spec.family)
    if stops and not spec.embedding_only:
        layers.append(_json_blob(MEDIA_TYPE_PARAMS, {"stop": stops}))
    return _json_blob(MEDIA_TYPE_CONFIG, config_for(spec)), tuple(layers)
