"""What /api/show adds for a model whose stand-in GGUF file carries only the shape keys.

A real library GGUF also states its tokenizer, rope and feed-forward keys, and lists its tensors
(Ollama's GetModelInfo returns every tensor's name, type and shape, verbose or not). The stand-in
blob stays a few hundred bytes, so these are synthesised from the architecture facts: the tensor
table llama.cpp's converter writes for the architecture (token embedding, per block the attention
and feed-forward weights — experts stacked for a mixture of experts — and the output head), typed
as the file type quantises them (norms F32, embeddings and the head at the file type's higher
precision). A verbose show adds the tokenizer's long arrays.
"""

from __future__ import annotations

from typing import Any

from launcher.facts.catalog import ModelSpec

# Ollama's tensor type names (fs/ggml TensorType.String) for the bulk weights of each file type,
# and for the tensors llama-quantize keeps at higher precision (token embedding, output head).
_WEIGHT_TYPE = {"Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q5_K_M": "Q5_K", "Q4_0": "Q4_0", "Q8_0": "Q8_0",
                "Q6_K": "Q6_K", "F16": "F16", "BF16": "BF16", "F32": "F32", "MXFP4_MOE": "MXFP4"}  # fmt: skip
_HEAD_TYPE = {"Q4_K_M": "Q6_K", "Q4_K_S": "Q6_K", "Q5_K_M": "Q6_K", "Q4_0": "Q6_K", "MXFP4_MOE": "Q8_0"}
_TOKENIZER = {"llama": ("gpt2", "llama-bpe"), "qwen2": ("gpt2", "qwen2"), "qwen3": ("gpt2", "qwen2"),
              "qwen3moe": ("gpt2", "qwen2"), "gemma2": ("llama", "default"), "gemma3": ("llama", "default"),
              "gemma-embedding": ("llama", "default"), "gptoss": ("gpt2", "gpt-4o"), "phi3": ("gpt2", "dbrx"),
              "deepseek2": ("gpt2", "deepseek-v3"), "mllama": ("gpt2", "llama-bpe"),
              "mistral3": ("gpt2", "tekken"), "bert": ("bert", "default"),
              "nomic-bert": ("bert", "default")}  # fmt: skip
_ROPE_BASE = {"llama": 500000.0, "qwen2": 1000000.0, "qwen3": 1000000.0, "qwen3moe": 1000000.0,
              "gemma3": 1000000.0, "gptoss": 150000.0, "phi3": 250000.0, "mistral3": 1000000000.0,
              "mllama": 500000.0, "deepseek2": 10000.0}  # fmt: skip


# ggml_type numbers (ggml.h) as Ollama's TensorType.String() names them, for a real file's tensors.
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
              11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
              18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
              25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
              39: "MXFP4"}  # fmt: skip


def file_tensors(infos: tuple[tuple[str, int, tuple[int, ...]], ...]) -> list[dict[str, Any]]:
    """A real file's tensor infos as /api/show lists them."""
    return [_t(name, GGML_TYPES.get(kind, "unknown"), *shape) for name, kind, shape in infos]


def feed_forward_length(spec: ModelSpec) -> int:
    """The per-expert (or dense) feed-forward width the parameter count implies, to 256."""
    e, layers = spec.embedding_length, max(spec.block_count, 1)
    attn = e * (spec.head_count * spec.head_dim_k * 2 + spec.head_count_kv * (spec.head_dim_k + spec.head_dim_v))
    embeddings = spec.vocab_size * e * 2
    per_layer = max((spec.parameter_count - embeddings) / layers - attn, e)
    ffn = per_layer / (3 * e * max(spec.expert_count, 1))
    return max(256, round(ffn / 256) * 256)


def extra_model_info(spec: ModelSpec) -> dict[str, Any]:
    """Keys a real file of this model states beyond the stand-in's shape keys (scalars only)."""
    arch = spec.family
    model, pre = _TOKENIZER.get(arch, ("gpt2", "default"))
    info: dict[str, Any] = {
        f"{arch}.feed_forward_length": feed_forward_length(spec),
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-06 if arch.startswith("gemma") else 1e-05,
        "tokenizer.ggml.model": model,
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.bos_token_id": 1 if model == "llama" else 0,
        "tokenizer.ggml.eos_token_id": 2 if model == "llama" else max(spec.vocab_size - 1, 0),
    }
    if not spec.embedding_only:
        info[f"{arch}.rope.freq_base"] = _ROPE_BASE.get(arch, 10000.0)
        info[f"{arch}.rope.dimension_count"] = spec.head_dim_k
    if spec.expert_count:
        info[f"{arch}.expert_feed_forward_length"] = feed_forward_length(spec)
    return info


def tokenizer_arrays(spec: ModelSpec) -> dict[str, list[Any]]:
    """A verbose show's long tokenizer arrays (one stand-in token per vocabulary entry)."""
    n = spec.vocab_size
    return {"tokenizer.ggml.tokens": [f"<t{i}>" for i in range(n)], "tokenizer.ggml.token_type": [1] * n}


def _t(name: str, kind: str, *shape: int) -> dict[str, Any]:
    return {"name": name, "type": kind, "shape": list(shape)}


def tensors(spec: ModelSpec) -> list[dict[str, Any]]:
    """The tensor table of a file of this shape (GGUF order: embeddings, blocks, output)."""
    w = _WEIGHT_TYPE.get(spec.quantization, "Q4_K")
    head = _HEAD_TYPE.get(spec.quantization, w)
    e, vocab, ffn = spec.embedding_length, spec.vocab_size, feed_forward_length(spec)
    q, kv_k = spec.head_count * spec.head_dim_k, spec.head_count_kv * spec.head_dim_k
    kv_v = spec.head_count_kv * spec.head_dim_v
    out = [_t("token_embd.weight", head, e, vocab)]
    for i in range(spec.block_count):
        b = f"blk.{i}."
        out += [
            _t(b + "attn_norm.weight", "F32", e),
            _t(b + "attn_q.weight", w, e, q),
            _t(b + "attn_k.weight", w, e, kv_k),
            _t(b + "attn_v.weight", w, e, kv_v),
            _t(b + "attn_output.weight", w, spec.head_count * spec.head_dim_v, e),
            _t(b + "ffn_norm.weight", "F32", e),
        ]
        if spec.expert_count:
            n = spec.expert_count
            out += [
                _t(b + "ffn_gate_inp.weight", "F32", e, n),
                _t(b + "ffn_gate_exps.weight", w, e, ffn, n),
                _t(b + "ffn_up_exps.weight", w, e, ffn, n),
                _t(b + "ffn_down_exps.weight", w, ffn, e, n),
            ]
        else:
            out += [_t(b + "ffn_gate.weight", w, e, ffn), _t(b + "ffn_up.weight", w, e, ffn),
                    _t(b + "ffn_down.weight", w, ffn, e)]  # fmt: skip
    out.append(_t("output_norm.weight", "F32", e))
    if not spec.embedding_only:
        out.append(_t("output.weight", head, e, vocab))
    return out
