"""The model record the catalog, the GGUF reader and the performance model share.

`ModelSpec` holds one model tag's architecture facts; `_m` builds one compactly for the catalog
tables (catalog.py, catalog_today.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GB = 1000**3
MB = 1000**2


@dataclass(frozen=True)
class ModelSpec:
    """Everything the performance model needs to know about one model (one tag)."""

    name: str  # canonical "family:tag"
    family: str  # GGUF general.architecture
    parameter_count: int
    quantization: str  # Ollama's file_type, e.g. "Q4_K_M"
    file_size_bytes: int
    block_count: int
    embedding_length: int
    head_count: int
    head_count_kv: int
    context_length: int
    vocab_size: int
    key_length: int = 0  # 0 = embedding_length / head_count
    value_length: int = 0
    expert_count: int = 0
    expert_used_count: int = 0
    active_parameter_count: int = 0  # MoE: parameters read per token; 0 = all
    embedding_only: bool = False
    aliases: tuple[str, ...] = field(default=())
    # What the library's template and files give the model beyond completion/embedding: "tools",
    # "thinking", "insert", "vision". None = an entry from before capabilities were listed (the
    # simulated registry then picks the template by family).
    capabilities: tuple[str, ...] | None = None
    # Attention window of the sliding-window layers (GGUF <arch>.attention.sliding_window); 0 = none.
    sliding_window: int = 0

    @property
    def sliding_window_layers(self) -> int:
        """How many layers attend through the window. The pattern is fixed per architecture in
        llama.cpp (and Ollama's GraphSize): gemma2 and gpt-oss alternate, gemma3 (and its embedding
        variant) keeps one global layer in six."""
        if not self.sliding_window:
            return 0
        if self.family in ("gemma3", "gemma3n", "gemma-embedding"):
            return self.block_count - self.block_count // 6
        return self.block_count // 2

    def kv_layers(self, context: int) -> float:
        """Layers' worth of KV cache at `context` tokens: a windowed layer caches at most its window."""
        windowed = self.sliding_window_layers
        if not windowed or context <= 0:
            return float(self.block_count)
        return (self.block_count - windowed) + windowed * min(context, self.sliding_window) / context

    @property
    def head_dim_k(self) -> int:
        return self.key_length or self.embedding_length // max(self.head_count, 1)

    @property
    def head_dim_v(self) -> int:
        return self.value_length or self.embedding_length // max(self.head_count, 1)

    @property
    def active_fraction(self) -> float:
        """Share of the weights read to produce one token (1.0 for dense models)."""
        if not self.active_parameter_count:
            return 1.0
        return self.active_parameter_count / self.parameter_count

    @property
    def parameter_size(self) -> str:
        """Ollama's `details.parameter_size` text, e.g. "8.0B", "494.03M"."""
        if self.parameter_count >= 1_000_000_000:
            return f"{self.parameter_count / 1e9:.1f}B"
        return f"{self.parameter_count / 1e6:.2f}M"


def _m(
    name: str,
    family: str,
    params_b: float,
    quant: str,
    size_gb: float,
    layers: int,
    embd: int,
    heads: int,
    kv_heads: int,
    ctx: int,
    vocab: int,
    **extra: object,
) -> ModelSpec:
    return ModelSpec(
        name=name,
        family=family,
        parameter_count=int(params_b * 1e9),
        quantization=quant,
        file_size_bytes=int(size_gb * GB),
        block_count=layers,
        embedding_length=embd,
        head_count=heads,
        head_count_kv=kv_heads,
        context_length=ctx,
        vocab_size=vocab,
        **extra,  # type: ignore[arg-type]
    )
