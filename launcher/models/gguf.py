"""GGUF model facts: read and write GGUF headers, and map their key/values to and from a `ModelSpec`.

The format itself (the reader, `GGUFError`, `GGUFArray` in `launcher.ggufio`; the writer in
`launcher.ggufwrite`) is re-exported here, so callers import everything GGUF from this one module.

Key names follow llama.cpp's conventions (gguf-py `Keys`), as Ollama reads them (`fs/ggml/ggml.go`):
`general.*` and `tokenizer.*` keys are global, everything else is `<architecture>.<key>`. Real files
may store `attention.head_count(_kv)` per layer as arrays, and carry the vocabulary as the
`tokenizer.ggml.tokens` array rather than `<arch>.vocab_size`; both are accepted. The one key of our
own, `corral.active_parameter_count`, marks the parameters a MoE model reads per token in the
metadata-only files the simulated store holds (a real file's tensor infos give it instead).
"""

from __future__ import annotations

from collections.abc import Mapping

from launcher.facts.catalog import ModelSpec, normalize_name
from launcher.models.ggufio import (
    DEFAULT_MAX_ARRAY_ITEMS,
    GGUF_MAGIC,
    GGUFArray,
    GGUFError,
    GGUFFile,
    GGUFValueType,
    read_gguf,
    read_gguf_metadata,
)
from launcher.models.ggufwrite import encode_gguf_metadata, write_gguf_metadata

__all__ = [
    "ACTIVE_PARAMETER_COUNT_KEY",
    "DEFAULT_MAX_ARRAY_ITEMS",
    "EMBEDDING_ARCHITECTURES",
    "FILE_TYPES",
    "GGUF_MAGIC",
    "GGUFArray",
    "GGUFError",
    "GGUFFile",
    "GGUFValueType",
    "encode_gguf_metadata",
    "file_type_name",
    "file_type_number",
    "gguf_metadata_for_spec",
    "read_gguf",
    "read_gguf_metadata",
    "spec_from_gguf",
    "write_gguf_metadata",
]

ACTIVE_PARAMETER_COUNT_KEY = "corral.active_parameter_count"

# general.file_type: llama.cpp's llama_ftype numbers, named as Ollama's FileType.String() names them
# (fs/ggml/type.go); that name is what /api/show and /api/tags report as quantization_level.
# 4-6 and 33-35 were removed from GGUF files and have no name.
FILE_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
    39: "NVFP4",
    40: "Q1_0",
}
_FILE_TYPE_NUMBERS = {name: number for number, name in FILE_TYPES.items()} | {"Q4_K": 15}  # Ollama's alias
_UNQUANTIZED = frozenset({"F32", "F16", "BF16"})

# Encoder-only architectures in llama.cpp: they embed, they do not generate. Files normally say so
# with <arch>.pooling_type too (Ollama's only test), but older conversions of these may not.
EMBEDDING_ARCHITECTURES = frozenset(
    {"bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2", "jina-bert-v3", "t5encoder"}
)
_POOLING_MEAN, _POOLING_CLS = 1, 2  # llama.cpp's enum llama_pooling_type

# Average bits per weight by file type, only to estimate a parameter count when a file states none
# and has no tensor infos to count (a hand-made metadata-only file).
_BITS_PER_WEIGHT = {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69,
                    "Q5_0": 5.5, "Q4_K_M": 4.85, "Q4_K_S": 4.58, "Q4_0": 4.5, "Q3_K_M": 3.91, "Q2_K": 3.35}  # fmt: skip
_VISION_BLOCKS = {"gemma3": 27, "mllama": 32, "mistral3": 24}
_DEFAULT_CONTEXT_LENGTH = 2048  # llama.cpp's n_ctx_train fallback when a file states none


def file_type_name(number: int) -> str:
    """Ollama's name for a general.file_type number ("unknown" like Ollama for anything else)."""
    return FILE_TYPES.get(number, "unknown")


def file_type_number(name: str) -> int:
    """The general.file_type number of a quantization name such as "Q4_K_M". Raises GGUFError."""
    try:
        return _FILE_TYPE_NUMBERS[name.upper()]
    except KeyError:
        raise GGUFError(f"unknown quantization {name!r} (known: {', '.join(FILE_TYPES.values())})") from None


def gguf_metadata_for_spec(spec: ModelSpec) -> dict[str, object]:
    """The key/values a real GGUF file of this model's shape carries (no tokenizer arrays, no tensors).

    The vocabulary is stated as `<arch>.vocab_size` instead of a 100k-entry token array, to keep the
    file a few hundred bytes; `spec_from_gguf` reads either.
    """
    arch = spec.family
    metadata: dict[str, object] = {
        "general.architecture": arch,
        "general.type": "model",
        "general.name": spec.name,
        "general.file_type": file_type_number(spec.quantization),
        "general.parameter_count": spec.parameter_count,
    }
    if spec.quantization.upper() not in _UNQUANTIZED:
        metadata["general.quantization_version"] = 2  # what llama-quantize writes today
    metadata |= {
        f"{arch}.block_count": spec.block_count,
        f"{arch}.context_length": spec.context_length,
        f"{arch}.embedding_length": spec.embedding_length,
        f"{arch}.attention.head_count": spec.head_count,
        f"{arch}.attention.head_count_kv": spec.head_count_kv,
        f"{arch}.vocab_size": spec.vocab_size,
    }
    if spec.key_length:
        metadata[f"{arch}.attention.key_length"] = spec.key_length
    if spec.value_length:
        metadata[f"{arch}.attention.value_length"] = spec.value_length
    if spec.expert_count:
        metadata[f"{arch}.expert_count"] = spec.expert_count
        metadata[f"{arch}.expert_used_count"] = spec.expert_used_count
    if spec.active_parameter_count:
        metadata[ACTIVE_PARAMETER_COUNT_KEY] = spec.active_parameter_count
    if spec.sliding_window:
        metadata[f"{arch}.attention.sliding_window"] = spec.sliding_window
    if spec.capabilities and "vision" in spec.capabilities:
        # The vision tower rides in the model file (Ollama's one-file gemma3, mllama, mistral3); the
        # depth is the published vision_config's num_hidden_layers.
        metadata[f"{arch}.vision.block_count"] = _VISION_BLOCKS.get(arch, 24)
    if spec.embedding_only:
        metadata[f"{arch}.pooling_type"] = _POOLING_CLS if arch == "bert" else _POOLING_MEAN
    return metadata


def _count(metadata: Mapping[str, object], key: str, default: int | None = None) -> int:
    """A non-negative integer key; per-layer arrays give their largest entry (Ollama's *Max helpers)."""
    value = metadata.get(key)
    if value is None:
        if default is None:
            raise GGUFError(f"GGUF metadata has no {key}")
        return default
    if isinstance(value, GGUFArray):
        raise GGUFError(f"{key}: a per-layer array of {value.length} entries is longer than any model has layers")
    if isinstance(value, list):
        value = max(value, default=default if default is not None else 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GGUFError(f"{key}: expected a non-negative integer, got {value!r}")
    return value


def _vocab_size(metadata: Mapping[str, object], arch: str) -> int:
    if f"{arch}.vocab_size" in metadata:
        return _count(metadata, f"{arch}.vocab_size")
    tokens = metadata.get("tokenizer.ggml.tokens")
    return len(tokens) if isinstance(tokens, list | GGUFArray) else 0


def spec_from_gguf(source: Mapping[str, object] | GGUFFile, *, name: str, file_size_bytes: int) -> ModelSpec:
    """The `ModelSpec` of a GGUF file, from its key/values (or a whole parsed header). Raises GGUFError.

    `name` is the Ollama model name (normalised, ":latest" added); `file_size_bytes` is the model
    blob's size, which the header does not state. Given a `GGUFFile`, the tensor infos fill in the
    parameter count when the key/values lack it, and the parameters a MoE model reads per token.
    Missing architecture facts raise, except those llama.cpp itself defaults.
    """
    header: GGUFFile | None = None
    metadata: Mapping[str, object]
    if isinstance(source, GGUFFile):
        header, metadata = source, source.metadata
    else:
        metadata = source
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFError("GGUF metadata has no general.architecture")
    head_count = _count(metadata, f"{arch}.attention.head_count", 0)
    expert_count = _count(metadata, f"{arch}.expert_count", 0)
    expert_used_count = _count(metadata, f"{arch}.expert_used_count", 0)
    file_type = metadata.get("general.file_type")
    quantization = file_type_name(file_type) if isinstance(file_type, int) else "unknown"

    parameter_count = metadata.get("general.parameter_count")
    if not isinstance(parameter_count, int) or isinstance(parameter_count, bool) or parameter_count <= 0:
        if header is not None and header.parameter_count:
            parameter_count = header.parameter_count
        else:
            parameter_count = int(file_size_bytes * 8 / _BITS_PER_WEIGHT.get(quantization, 4.85))
    active_parameter_count = _count(metadata, ACTIVE_PARAMETER_COUNT_KEY, 0)
    if not active_parameter_count and header is not None and header.expert_parameter_count and expert_count:
        idle_share = 1 - expert_used_count / expert_count
        active_parameter_count = parameter_count - int(header.expert_parameter_count * idle_share)

    pooling = f"{arch}.pooling_type" in metadata
    return ModelSpec(
        name=normalize_name(name),
        family=arch,
        parameter_count=parameter_count,
        quantization=quantization,
        file_size_bytes=file_size_bytes,
        block_count=_count(metadata, f"{arch}.block_count"),
        embedding_length=_count(metadata, f"{arch}.embedding_length"),
        head_count=head_count,
        # llama.cpp: no head_count_kv means no grouped-query attention (one KV head per head).
        head_count_kv=_count(metadata, f"{arch}.attention.head_count_kv", head_count),
        context_length=_count(metadata, f"{arch}.context_length", _DEFAULT_CONTEXT_LENGTH),
        vocab_size=_vocab_size(metadata, arch),
        key_length=_count(metadata, f"{arch}.attention.key_length", 0),
        value_length=_count(metadata, f"{arch}.attention.value_length", 0),
        expert_count=expert_count,
        expert_used_count=expert_used_count,
        active_parameter_count=active_parameter_count,
        embedding_only=pooling or arch in EMBEDDING_ARCHITECTURES,
        sliding_window=_count(metadata, f"{arch}.attention.sliding_window", 0),
    )
