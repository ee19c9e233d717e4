"""Ollama's memory model, per era: what a load is predicted to need and what it really holds. Pure.

Two eras (OLLAMA_FACTS.md section 3), chosen by the backend's version (`era_for_version`):

- **HEAD** (Ollama >= 0.30, the default). The scheduler predicts `llm.PredictServerVRAM`
  (llm/llama_server.go): the model file plus an f16 KV cache for num_ctx x num_parallel tokens, and
  adds a batch surcharge (0 / 768 MiB / 2 GiB for num_batch 512 / 1024 / 2048, server/sched.go
  generationBatchSurcharge). That prediction only decides eviction (80 % of free) and the automatic
  num_batch; whether every layer lands on the GPU is decided by llama-server `--fit`, which places
  real buffers (weights, KV cache in the configured type, a compute buffer per device) and keeps
  `FIT_TARGET_BYTES` free on each device. So a plan "fits" at HEAD when, on every card, its share
  of weights and KV plus that card's compute buffer plus the fit target is within the card's free
  memory, and `/api/ps` then reports model + KV + compute buffers.
- **A** (Ollama <= 0.29: `estimateGPULayers` + `GraphSize` up to 0.12, and the layout engine of
  0.13-0.29, which sizes the llama engine's layers and graph with the same `GraphSize`). Every card
  that holds layers reserves the compute graph (`graph_bytes`) plus `MinimumMemory` (457 MiB).
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher.facts.catalog import ModelSpec

MIB = 1024**2
GIB = 1024**3


class Era(StrEnum):
    HEAD = "head"
    A = "a"


ERA_DESCRIPTION = {
    Era.HEAD: "Ollama >= 0.30 (llm.PredictServerVRAM + llama-server --fit)",
    Era.A: "Ollama <= 0.29 (GraphSize estimate, per-card graph + minimum)",
}

# The first version whose scheduler predicts with PredictServerVRAM (checked against the tags of
# ollama/ollama: v0.29.x still sizes layers with GraphSize, v0.30.0 has PredictServerVRAM).
HEAD_SINCE = (0, 30, 0)

_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """The first x.y.z in `ollama --version` or /api/version output ("ollama version is 0.12.10")."""
    found = _VERSION.search(text or "")
    if found is None:
        return None
    major, minor, patch = (int(g) for g in found.groups())
    return major, minor, patch


def era_for_version(text: str) -> Era | None:
    """The memory model of the Ollama that reported `text`; None when no version can be read.

    A development build reports 0.0.0; it is built from the current source, so HEAD.
    """
    version = parse_version(text)
    if version is None:
        return None
    if version == (0, 0, 0) or version >= HEAD_SINCE:
        return Era.HEAD
    return Era.A


# -- HEAD ------------------------------------------------------------------------------------------

# llama.cpp common_params.fit_params_target: what --fit keeps free on every device (1 GiB).
FIT_TARGET_BYTES = 1 * GIB
# sched.go automatic num_batch for completion models.
BATCH_DEFAULT, BATCH_MEDIUM, BATCH_LARGE = 512, 1024, 2048
_BATCH_HEADROOM_PERCENT = {BATCH_LARGE: 60, BATCH_MEDIUM: 75}


def predicted_kv_bytes(spec: ModelSpec, total_ctx: int) -> int:
    """PredictServerVRAM's KV term: 2 (K+V) x layers x min KV heads x (embedding / max heads) x
    tokens x 2 bytes. Always f16, whatever OLLAMA_KV_CACHE_TYPE says."""
    kv_heads = max(spec.head_count_kv, 1)
    head_dim = spec.embedding_length // spec.head_count if spec.head_count > 0 else 0
    return 2 * spec.block_count * kv_heads * head_dim * max(total_ctx, 0) * 2


def server_context(spec: ModelSpec, num_ctx: int, num_parallel: int) -> int:
    """effectiveLlamaServerContext: per-slot context capped to the trained one, times the slots."""
    per_slot = min(num_ctx, spec.context_length) if spec.context_length else num_ctx
    return max(per_slot, 1) * max(num_parallel, 1)


def predict_server_vram(spec: ModelSpec, num_ctx: int, num_parallel: int) -> int:
    """llm.PredictServerVRAM: file size + the f16 KV cache for num_ctx x num_parallel tokens."""
    return spec.file_size_bytes + predicted_kv_bytes(spec, server_context(spec, num_ctx, num_parallel))


def predicted_for_load(spec: ModelSpec, num_ctx: int, num_parallel: int, num_batch: int) -> int:
    """sched.go predictedForLoad: PredictServerVRAM plus the batch surcharge (a completion model's)."""
    predicted = predict_server_vram(spec, num_ctx, num_parallel)
    return predicted + (0 if spec.embedding_only else generation_batch_surcharge(num_batch))


def generation_batch_for_context(total_ctx: int) -> int:
    if total_ctx > 32768:
        return BATCH_LARGE
    if total_ctx > 4096:
        return BATCH_MEDIUM
    return BATCH_DEFAULT


def generation_batch_surcharge(num_batch: int) -> int:
    """sched.go generationBatchSurcharge: what a larger batch adds to the prediction."""
    if num_batch >= BATCH_LARGE:
        return 2 * GIB
    if num_batch >= BATCH_MEDIUM:
        return 768 * MIB
    return 0


def _batch_fits(num_batch: int, predicted: int, available: int) -> bool:
    if predicted == 0 or available == 0:
        return True
    threshold = available * 80 // 100
    if predicted > threshold:
        return False
    headroom = next((p for b, p in _BATCH_HEADROOM_PERCENT.items() if num_batch >= b), 100)
    if predicted > available * headroom // 100:
        return False
    return generation_batch_surcharge(num_batch) <= threshold - predicted


def automatic_num_batch(total_ctx: int, predicted: int, available: int, *, flash_attention: bool = True) -> int:
    """sched.go automaticGenerationBatch for a completion model: 512 / 1024 / 2048 by total context,
    stepped down while the prediction plus surcharge does not fit the available memory. CUDA
    without flash attention stays at 512 (256 on small cards, not modelled)."""
    if not flash_attention:
        return BATCH_DEFAULT
    batch = generation_batch_for_context(total_ctx)
    while batch > BATCH_DEFAULT and not _batch_fits(batch, predicted, available):
        batch = BATCH_MEDIUM if batch > BATCH_MEDIUM else BATCH_DEFAULT
    return batch


def compute_buffer_bytes(spec: ModelSpec, num_batch: int, *, has_output: bool) -> int:
    """The compute buffer llama-server allocates on one device (flash attention on: no n_ctx x
    n_batch score matrix). Dominated by the logits (n_ubatch x n_vocab floats) on the device that
    holds the output layer; the other devices keep activations of n_ubatch x a few embeddings.
    An estimate of what llama.cpp logs as "CUDA0 compute buffer size" (~258 MiB for an 8B with a
    128K vocabulary at 512), not a formula from Ollama: Ollama reads the real size from the log.
    """
    ubatch = max(num_batch, 1)
    activations = 4 * ubatch * spec.embedding_length * 8
    if has_output:
        return 4 * ubatch * spec.vocab_size + activations
    return activations


# -- era A (and the GraphSize-based estimates up to 0.29) ------------------------------------------

# ml/device.go MinimumMemory: what every CUDA device keeps back beyond the model's own buffers.
MINIMUM_MEMORY_BYTES = 457 * MIB


def graph_bytes(spec: ModelSpec, total_ctx: int, num_batch: int) -> int:
    """Compute-graph buffer one card reserves (GraphSize, v0.12.10 fs/ggml/ggml.go): the larger of
    the partial and full offload sizes. `total_ctx` = num_ctx x num_parallel; batch = min(num_ctx,
    num_batch) with num_ctx per slot."""
    context = total_ctx
    per_slot = min(spec.context_length, total_ctx) if spec.context_length else total_ctx
    batch = min(per_slot, num_batch)
    e, h, v = spec.embedding_length, spec.head_count, spec.vocab_size
    hkv, dk = spec.head_count_kv, spec.head_dim_k
    if spec.family in ("llama", "llama4"):
        full = max(4 * batch * (1 + 4 * e + context * (1 + h)), 4 * batch * (e + v))
        partial = 4 * batch * e + max(
            4 * batch * (1 + e + max(context, e)) + e * e * 9 // 16 + 4 * context * (batch * h + dk * hkv),
            4 * batch * (e + v) + e * v * 105 // 128,
        )
    elif spec.family == "qwen2":
        full = max(4 * batch * (e + v), 4 * batch * (1 + 2 * e + context + context * h))
        partial = max(
            4 * batch * (e + v) + e * v * 105 // 128,
            4 * (batch * (1 + 2 * e + context * (1 + h)) + e * (1 + context)),
        )
    elif spec.family.startswith("gemma"):
        full = max(4 * batch * (e + v), 4 * batch * (2 + context + context * h + 2 * e + 2 * dk * h))
        partial = max(
            4 * e * batch + e * v * 105 // 128 + 4 * v * batch,
            4 * batch * (2 * e + 1 + 2 * dk * h + context + context * h) + 4 * dk * context * 8 + e * dk * h * 9 // 16,
        )
    else:
        # GraphSize's fallback for architectures without a formula of their own: a sixth of the
        # f16 KV cache per query-head group.
        kv = context * (spec.head_dim_k + spec.head_dim_v) * spec.head_count_kv * 2 * spec.block_count
        partial = max(h // max(hkv, 1), 1) * kv // 6
        full = partial
    return max(full, partial)
