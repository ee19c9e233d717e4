"""Built-in catalog of common Ollama models: the architecture facts the performance model needs.

Shapes (layers, embedding length, heads, KV heads, context, vocabulary) are the models' published
GGUF metadata; file sizes are the Ollama library's listed sizes for the default tag's quantization.
The catalog is the last source of model facts: the launcher prefers the GGUF header in the local
store, then `/api/show` of a running backend. The simulated backend "pulls" exactly these models.
"""

from __future__ import annotations

from launcher.facts.catalog_today import TODAY
from launcher.facts.modelspec import GB, MB, ModelSpec, _m

__all__ = ["CATALOG", "GB", "MB", "ModelSpec", "find_model", "normalize_name"]


CATALOG: tuple[ModelSpec, ...] = (
    # Llama
    _m("llama3.2:1b", "llama", 1.24, "Q8_0", 1.32, 16, 2048, 32, 8, 131072, 128256, capabilities=("tools",)),
    _m(
        "llama3.2:3b",
        "llama",
        3.21,
        "Q4_K_M",
        2.02,
        28,
        3072,
        24,
        8,
        131072,
        128256,
        capabilities=("tools",),
        aliases=("llama3.2", "llama3.2:latest"),
    ),
    _m(
        "llama3.1:8b",
        "llama",
        8.03,
        "Q4_K_M",
        4.92,
        32,
        4096,
        32,
        8,
        131072,
        128256,
        aliases=("llama3.1", "llama3.1:latest"),
    ),
    _m("llama3.1:70b", "llama", 70.6, "Q4_K_M", 42.52, 80, 8192, 64, 8, 131072, 128256),
    _m(
        "llama3.3:70b",
        "llama",
        70.6,
        "Q4_K_M",
        42.52,
        80,
        8192,
        64,
        8,
        131072,
        128256,
        aliases=("llama3.3", "llama3.3:latest"),
    ),
    _m("llama3.1:405b", "llama", 405.9, "Q4_K_M", 243.0, 126, 16384, 128, 8, 131072, 128256),
    _m(
        "llama4:16x17b",
        "llama4",
        108.6,
        "Q4_K_M",
        67.4,
        48,
        5120,
        40,
        8,
        10485760,
        202048,
        expert_count=16,
        expert_used_count=1,
        active_parameter_count=17_000_000_000,
        aliases=("llama4", "llama4:latest", "llama4:scout"),
    ),
    # Mistral
    _m(
        "mistral:7b",
        "llama",
        7.25,
        "Q4_K_M",
        4.37,
        32,
        4096,
        32,
        8,
        32768,
        32768,
        aliases=("mistral", "mistral:latest"),
    ),
    _m(
        "mixtral:8x7b",
        "llama",
        46.7,
        "Q4_0",
        26.44,
        32,
        4096,
        32,
        8,
        32768,
        32000,
        expert_count=8,
        expert_used_count=2,
        active_parameter_count=12_900_000_000,
        aliases=("mixtral", "mixtral:latest"),
    ),
    _m(
        "mixtral:8x22b",
        "llama",
        140.6,
        "Q4_0",
        79.51,
        56,
        6144,
        48,
        8,
        65536,
        32768,
        expert_count=8,
        expert_used_count=2,
        active_parameter_count=39_100_000_000,
    ),
    # Qwen 2.5
    _m("qwen2.5:0.5b", "qwen2", 0.494, "Q4_K_M", 0.398, 24, 896, 14, 2, 32768, 151936),
    _m("qwen2.5:1.5b", "qwen2", 1.54, "Q4_K_M", 0.986, 28, 1536, 12, 2, 32768, 151936),
    _m("qwen2.5:3b", "qwen2", 3.09, "Q4_K_M", 1.93, 36, 2048, 16, 2, 32768, 151936),
    _m(
        "qwen2.5:7b",
        "qwen2",
        7.62,
        "Q4_K_M",
        4.68,
        28,
        3584,
        28,
        4,
        32768,
        152064,
        aliases=("qwen2.5", "qwen2.5:latest"),
    ),
    _m("qwen2.5:14b", "qwen2", 14.8, "Q4_K_M", 8.99, 48, 5120, 40, 8, 32768, 152064),
    _m("qwen2.5:32b", "qwen2", 32.8, "Q4_K_M", 19.85, 64, 5120, 40, 8, 32768, 152064),
    _m("qwen2.5:72b", "qwen2", 72.7, "Q4_K_M", 47.42, 80, 8192, 64, 8, 32768, 152064),
    # Gemma
    _m("gemma2:2b", "gemma2", 2.61, "Q4_0", 1.63, 26, 2304, 8, 4, 8192, 256000, key_length=256, value_length=256),
    _m(
        "gemma2:9b",
        "gemma2",
        9.24,
        "Q4_0",
        5.44,
        42,
        3584,
        16,
        8,
        8192,
        256000,
        key_length=256,
        value_length=256,
        aliases=("gemma2", "gemma2:latest"),
    ),
    _m("gemma2:27b", "gemma2", 27.2, "Q4_0", 15.63, 46, 4608, 32, 16, 8192, 256000, key_length=128, value_length=128),
    # gemma3 4b-27b: vision in the model file; sliding_window 1024 (google/gemma-3-{4b,12b,27b}-it config.json).
    _m("gemma3:4b", "gemma3", 4.3, "Q4_K_M", 3.34, 34, 2560, 8, 4, 131072, 262208, key_length=256, value_length=256,
       sliding_window=1024, capabilities=("vision",)),
    _m(
        "gemma3:12b",
        "gemma3",
        12.2,
        "Q4_K_M",
        8.15,
        48,
        3840,
        16,
        8,
        131072,
        262208,
        key_length=256,
        value_length=256,
        sliding_window=1024,
        capabilities=("vision",),
        aliases=("gemma3", "gemma3:latest"),
    ),
    _m(
        "gemma3:27b",
        "gemma3",
        27.4,
        "Q4_K_M",
        17.4,
        62,
        5376,
        32,
        16,
        131072,
        262208,
        key_length=128,
        value_length=128,
        sliding_window=1024,
        capabilities=("vision",),
    ),
    # Embedding models
    _m(
        "nomic-embed-text:v1.5",
        "nomic-bert",
        0.137,
        "F16",
        0.274,
        12,
        768,
        12,
        12,
        2048,
        30522,
        embedding_only=True,
        aliases=("nomic-embed-text", "nomic-embed-text:latest"),
    ),
    _m(
        "mxbai-embed-large:335m",
        "bert",
        0.335,
        "F16",
        0.670,
        24,
        1024,
        16,
        16,
        512,
        30522,
        embedding_only=True,
        aliases=("mxbai-embed-large", "mxbai-embed-large:latest"),
    ),
    *TODAY,
)


def normalize_name(name: str) -> str:
    """Ollama's short model name: a missing tag means ":latest"; the default registry is dropped."""
    name = name.strip()
    for prefix in ("registry.ollama.ai/library/", "registry.ollama.ai/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return name


_BY_NAME: dict[str, ModelSpec] = {}
for _spec in CATALOG:
    for _alias in (_spec.name, *_spec.aliases):
        _BY_NAME[normalize_name(_alias)] = _spec


def find_model(name: str) -> ModelSpec | None:
    """The catalog entry for a model name (with or without tag); None when unknown."""
    return _BY_NAME.get(normalize_name(name))
