"""Performance model: VRAM need, placement over cards, load, prefill and decode times. Pure functions.

Used by the simulated backend (how long things take, what fits), the planner (what fits where) and
the routing benchmark. The memory terms are Ollama's, per era (`launcher.facts.memory`; HEAD by
default: weights + KV + a compute buffer per card, with llama-server --fit's 1 GiB kept free), and
`LoadOptions.era` picks the era. The timing terms are a small roofline model: decode is memory-bandwidth bound
(every token reads the active weights and the KV cache), prefill is compute bound, a split runs its
layers card after card with a cost per hop, and CPU layers run at host memory bandwidth. The two
free constants (bandwidth efficiency and hop cost) are calibrated on the public measurements in
shared/seeds/001 (see tests/test_perf.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from launcher.facts import memory
from launcher.facts.cards import CardSpec
from launcher.facts.catalog import ModelSpec
from launcher.facts.memory import MINIMUM_MEMORY_BYTES, Era

MIB = 1024**2
GIB = 1024**3

__all__ = ["MINIMUM_MEMORY_BYTES", "Era"]
DEFAULT_NUM_BATCH = 512
# Ollama's kvCacheBytesPerElement (fs/ggml/ggml.go): q8_0 and q4_0 are counted as 1/2 and 1/4 of f16.
KV_BYTES_PER_ELEMENT: dict[str, float] = {"f16": 2.0, "q8_0": 1.0, "q4_0": 0.5, "f32": 4.0}
# server/sched.go: a model goes to one card only when its prediction is within 80 % of that card's free.
SINGLE_CARD_FIT_FRACTION = 0.8

# Calibrated constants (tests/test_perf.py checks the seed figures against them).
DECODE_BW_EFFICIENCY = 0.95  # share of peak memory bandwidth a decode step reaches
DECODE_COMPUTE_EFFICIENCY = 0.5  # share of peak FP16 the GEMV + dequantise work reaches
PREFILL_COMPUTE_EFFICIENCY = 0.45  # share of peak FP16 a prompt batch reaches in llama.cpp
HOP_S = 0.003  # per token, per card boundary: activation copy plus a pipeline bubble
# Per decode step, per card: kernel launches, synchronisation and sampling that do not shrink with
# the model. It is what makes small models reach well under their bandwidth bound: the effective
# bandwidth efficiency is DECODE_BW_EFFICIENCY x t / (t + DECODE_STEP_OVERHEAD_S), t the time
# to read the card's share (`bandwidth_efficiency`); fitted to llama.cpp's published CUDA tg128
# figures (tests/launcher/test_perf.py lists the points).
DECODE_STEP_OVERHEAD_S = 0.0015
RUNNER_START_S = 0.6  # llama-server start before weights stream in
DEFAULT_LOAD_GBPS = 3.0  # page cache / NVMe -> host -> PCIe, GB/s
DEFAULT_HOST_MEM_BW_GBPS = 60.0  # dual-channel DDR5, what CPU-offloaded layers run at

# Bits per weight of the quantizations Ollama ships, for the output layer's share of the file.
_BITS_PER_WEIGHT: dict[str, float] = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_0": 8.5,
    "Q6_K": 6.56,
    "Q5_K_M": 5.69,
    "Q5_0": 5.5,
    "Q4_K_M": 4.85,
    "Q4_K_S": 4.58,
    "Q4_0": 4.5,
    "Q3_K_M": 3.91,
    "Q2_K": 3.35,
}


@dataclass(frozen=True)
class LoadOptions:
    """The runner options that decide a model's memory footprint (a change forces a reload)."""

    num_ctx: int = 4096
    num_parallel: int = 1
    kv_cache_type: str = "f16"
    num_batch: int = DEFAULT_NUM_BATCH
    num_gpu: int = -1  # layers to offload, counting the output layer; -1 = as many as fit
    era: Era = Era.HEAD  # whose memory model (launcher.facts.memory)

    def effective_ctx(self, spec: ModelSpec) -> int:
        """Per-slot context after Ollama caps it to the model's trained context."""
        return max(1, min(self.num_ctx, spec.context_length))


@dataclass(frozen=True)
class CardShare:
    """The part of one model that one card holds."""

    card: CardSpec
    layers: int  # repeating layers on this card
    has_output: bool  # llama.cpp puts the output layer on the last device
    vram_bytes: int  # what the card holds: weights + KV + compute buffer (era A: + graph + minimum)


@dataclass(frozen=True)
class Placement:
    """Where one loaded model lives: shares on cards (in pipeline order) plus layers left on CPU."""

    shares: tuple[CardShare, ...]
    cpu_layers: int
    cpu_bytes: int

    @property
    def vram_bytes(self) -> int:
        return sum(s.vram_bytes for s in self.shares)

    @property
    def total_bytes(self) -> int:
        return self.vram_bytes + self.cpu_bytes

    @property
    def gpu_layers(self) -> int:
        return sum(s.layers + (1 if s.has_output else 0) for s in self.shares)

    @property
    def is_split(self) -> bool:
        return len(self.shares) > 1


# ---------------------------------------------------------------------------------------------
# Memory


def kv_cache_bytes(spec: ModelSpec, opts: LoadOptions, layers: int | None = None) -> int:
    """KV cache for `layers` layers (default all) at num_ctx x num_parallel slots.

    Ollama's GraphSize: context * (head_dim_k + head_dim_v) * kv_heads * bytes_per_element per layer.
    """
    if opts.kv_cache_type not in KV_BYTES_PER_ELEMENT:
        raise ValueError(f"unknown KV cache type {opts.kv_cache_type!r}")
    context = opts.effective_ctx(spec) * opts.num_parallel
    per_layer = context * (spec.head_dim_k + spec.head_dim_v) * spec.head_count_kv
    n_layers = spec.block_count if layers is None else layers
    # Sliding-window layers cache only their window (gemma2/3, gpt-oss), as Ollama's GraphSize does.
    windowed = n_layers * spec.kv_layers(opts.effective_ctx(spec)) / max(spec.block_count, 1)
    return int(per_layer * KV_BYTES_PER_ELEMENT[opts.kv_cache_type] * windowed)


def graph_bytes(spec: ModelSpec, opts: LoadOptions) -> int:
    """Era A's compute-graph reserve per card (GraphSize), at these options."""
    return memory.graph_bytes(spec, opts.effective_ctx(spec) * opts.num_parallel, opts.num_batch)


def _bits_per_weight(spec: ModelSpec) -> float:
    return _BITS_PER_WEIGHT.get(spec.quantization.upper(), 4.85)


def output_layer_bytes(spec: ModelSpec) -> int:
    """Weights of the output projection (embedding x vocabulary); Ollama's Q4 files keep it at Q6_K."""
    bits = max(_bits_per_weight(spec), 6.56)
    return min(int(spec.embedding_length * spec.vocab_size * bits / 8), spec.file_size_bytes // 4)


def token_embedding_bytes(spec: ModelSpec) -> int:
    """The token-embedding table: llama.cpp keeps it in host memory and reads one row per token."""
    bits = max(_bits_per_weight(spec), 4.5)
    return min(int(spec.embedding_length * spec.vocab_size * bits / 8), spec.file_size_bytes // 4)


def layer_weight_bytes(spec: ModelSpec) -> int:
    """Weights of one repeating layer."""
    rest = spec.file_size_bytes - output_layer_bytes(spec) - token_embedding_bytes(spec)
    return rest // max(spec.block_count, 1)


def card_overhead_bytes(spec: ModelSpec, opts: LoadOptions, *, has_output: bool = True) -> int:
    """What a card holding part of the model holds beyond weights and KV: at HEAD its compute
    buffer (larger on the card with the output layer), in era A the graph plus MinimumMemory."""
    if opts.era is Era.A:
        return graph_bytes(spec, opts) + MINIMUM_MEMORY_BYTES
    return memory.compute_buffer_bytes(spec, opts.num_batch, has_output=has_output)


def fit_margin_bytes(opts: LoadOptions) -> int:
    """What must stay free on each card at load time beyond what it holds: --fit's target at HEAD."""
    return 0 if opts.era is Era.A else memory.FIT_TARGET_BYTES


def vram_needed_bytes(spec: ModelSpec, opts: LoadOptions, num_cards: int = 1) -> int:
    """Free VRAM to load the whole model on `num_cards` cards: weights + KV + each card's overhead
    (and, at HEAD, --fit's margin on each)."""
    weights = spec.file_size_bytes - token_embedding_bytes(spec)
    n = max(num_cards, 1)
    overhead = card_overhead_bytes(spec, opts) + (n - 1) * card_overhead_bytes(spec, opts, has_output=False)
    return weights + kv_cache_bytes(spec, opts) + overhead + n * fit_margin_bytes(opts)


def held_bytes(spec: ModelSpec, opts: LoadOptions, num_cards: int = 1) -> int:
    """What the loaded model holds on its cards when every layer is on them (what /api/ps reports)."""
    return vram_needed_bytes(spec, opts, num_cards) - max(num_cards, 1) * fit_margin_bytes(opts)


def _layer_bytes(spec: ModelSpec, opts: LoadOptions) -> int:
    return layer_weight_bytes(spec) + kv_cache_bytes(spec, opts, layers=1)


def split_layers(
    spec: ModelSpec,
    opts: LoadOptions,
    cards: Sequence[tuple[CardSpec, int]],
    *,
    allow_cpu: bool = False,
) -> Placement | None:
    """Place the model over `cards` (card, free bytes), in the given order, layers in proportion to free.

    This is llama.cpp's default split (no tensor_split: proportional to each device's free memory),
    with each card first keeping its overhead (and --fit's margin at HEAD). The output layer goes on
    the last card.
    Returns None when the model does not fit and `allow_cpu` is False; with `allow_cpu`, the layers
    that do not fit stay on the CPU (llama.cpp offloads the last layers, so the CPU keeps the first).
    """
    if not cards:
        if not allow_cpu:
            return None
        return Placement((), spec.block_count + 1, spec.file_size_bytes + kv_cache_bytes(spec, opts))
    overheads = [card_overhead_bytes(spec, opts, has_output=i == len(cards) - 1) for i in range(len(cards))]
    margin = fit_margin_bytes(opts)
    per_layer = _layer_bytes(spec, opts)
    out_bytes = output_layer_bytes(spec)
    usable = [max(0, free - overhead - margin) for (_, free), overhead in zip(cards, overheads, strict=True)]
    # The output layer comes first on the last card, like llama.cpp places it; num_gpu counts it
    # (the last of the offloaded layers), so num_gpu = 0 keeps even it on the CPU.
    usable[-1] -= out_bytes
    has_output = usable[-1] >= 0 and opts.num_gpu != 0
    if not has_output:
        usable[-1] += out_bytes
    capacity = [max(0, u) // per_layer if per_layer else spec.block_count for u in usable]
    total_free = sum(max(u, 0) for u in usable) or 1
    wanted = spec.block_count
    if opts.num_gpu >= 0:
        wanted = min(wanted, max(0, opts.num_gpu - (1 if has_output else 0)))
    # Proportional targets, then top up the cards with room left, largest remainder first.
    layers = [min(cap, math.floor(wanted * max(u, 0) / total_free)) for cap, u in zip(capacity, usable, strict=True)]
    remaining = wanted - sum(layers)
    order = sorted(range(len(cards)), key=lambda i: usable[i], reverse=True)
    while remaining > 0:
        progressed = False
        for i in order:
            if remaining and layers[i] < capacity[i]:
                layers[i] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
    placed = sum(layers)
    cpu_layers = spec.block_count - placed + (0 if has_output else 1)
    if cpu_layers and not allow_cpu and (opts.num_gpu < 0 or placed < wanted):
        return None
    shares = []
    kv_layer = kv_cache_bytes(spec, opts, layers=1)
    for i, ((card, _free), n) in enumerate(zip(cards, layers, strict=True)):
        last = i == len(cards) - 1
        if n == 0 and not (last and has_output):
            continue
        vram = n * (layer_weight_bytes(spec) + kv_layer) + overheads[i] + (out_bytes if last and has_output else 0)
        shares.append(CardShare(card, n, last and has_output, vram))
    cpu_bytes = (spec.block_count - placed) * (layer_weight_bytes(spec) + kv_layer)
    if not has_output:
        cpu_bytes += out_bytes
    return Placement(tuple(shares), cpu_layers, cpu_bytes)


def ollama_placement(
    spec: ModelSpec,
    opts: LoadOptions,
    cards: Sequence[tuple[CardSpec, int]],
    *,
    spread: bool = False,
    allow_cpu: bool = True,
) -> Placement | None:
    """Where `ollama serve` would put the model on the cards it sees (server/sched.go, HEAD).

    Without OLLAMA_SCHED_SPREAD: the single card with the most free memory when the prediction is
    within 80 % of it; otherwise a split over all visible cards in proportion to free memory (the
    largest free first); when even that fails, partial CPU offload (`allow_cpu`).
    """
    ordered = sorted(cards, key=lambda cf: cf[1], reverse=True)
    if not ordered:
        return split_layers(spec, opts, [], allow_cpu=allow_cpu)
    if not spread and opts.num_gpu < 0:
        card, free = ordered[0]
        if opts.era is Era.A:
            predicted = vram_needed_bytes(spec, opts, 1)
        else:  # bestSingleGPUFit compares PredictServerVRAM with 80 % of the card's free memory
            predicted = memory.predict_server_vram(spec, opts.num_ctx, opts.num_parallel)
        if predicted <= SINGLE_CARD_FIT_FRACTION * free:
            return split_layers(spec, opts, [(card, free)])
    whole = split_layers(spec, opts, ordered)
    if whole is not None:
        return whole
    return split_layers(spec, opts, ordered, allow_cpu=allow_cpu) if allow_cpu else None


# ---------------------------------------------------------------------------------------------
# Time


def load_time_s(placement: Placement, load_gbps: float = DEFAULT_LOAD_GBPS) -> float:
    """Runner start plus streaming the weights from the store into their devices."""
    return RUNNER_START_S + placement.total_bytes / (load_gbps * 1e9)


def _active_weight_fraction(spec: ModelSpec, batch: int) -> float:
    """Share of the weights one decode step reads: for a mixture of experts, the experts touched.

    With b sequences in a step, each picking k of n experts, the chance an expert is touched is
    1 - (1 - k/n)^b; the shared (attention) part is always read.
    """
    if not spec.expert_count or not spec.active_parameter_count:
        return 1.0
    k, n = spec.expert_used_count, spec.expert_count
    per_token = spec.active_fraction
    # Split the per-token active share into the always-read part and the expert part.
    shared = max(0.0, (per_token * n - k) / (n - k)) if n > k else per_token
    expert_share = 1.0 - shared
    touched = 1.0 - (1.0 - k / n) ** max(batch, 1)
    return shared + expert_share * touched


def decode_step_s(
    spec: ModelSpec,
    placement: Placement,
    *,
    batch: int = 1,
    context_tokens: int = 0,
    kv_cache_type: str = "f16",
    host_mem_bw_gbps: float = DEFAULT_HOST_MEM_BW_GBPS,
) -> float:
    """Seconds for one decode step producing one token for each of `batch` sequences.

    Each card reads its share of the active weights once per step (shared by the batch) and each
    sequence's KV cache; the cards run one after another, paying HOP_S per boundary.
    """
    batch = max(batch, 1)
    weights_fraction = _active_weight_fraction(spec, batch)
    kv_per_token_layer = (
        (spec.head_dim_k + spec.head_dim_v) * spec.head_count_kv * KV_BYTES_PER_ELEMENT.get(kv_cache_type, 2.0)
    )
    flops_per_token_layer = 2 * spec.parameter_count * spec.active_fraction / max(spec.block_count, 1)
    layer_w = layer_weight_bytes(spec)
    out_w = output_layer_bytes(spec)
    step = 0.0
    for share in placement.shares:
        weights = share.layers * layer_w + (out_w if share.has_output else 0)
        kv_read = batch * context_tokens * kv_per_token_layer * share.layers
        bw = share.card.mem_bw_gbps * 1e9 * DECODE_BW_EFFICIENCY
        compute = share.card.fp16_tflops * 1e12 * DECODE_COMPUTE_EFFICIENCY
        step += (weights * weights_fraction + kv_read) / bw
        step += batch * flops_per_token_layer * share.layers / compute
    if placement.cpu_layers:
        cpu_weights = placement.cpu_bytes
        kv_read = batch * context_tokens * kv_per_token_layer * placement.cpu_layers
        step += (cpu_weights * weights_fraction + kv_read) / (host_mem_bw_gbps * 1e9)
    hops = max(len(placement.shares) - 1, 0) + (1 if placement.cpu_layers and placement.shares else 0)
    return step + (DECODE_STEP_OVERHEAD_S if placement.shares else 0.0) + hops * HOP_S


def bandwidth_efficiency(read_bytes: float, card: CardSpec) -> float:
    """Share of the card's peak bandwidth one decode step reaches when it reads `read_bytes`:
    near DECODE_BW_EFFICIENCY for large reads, much lower for small models (fixed per-step cost)."""
    t = read_bytes / (card.mem_bw_gbps * 1e9 * DECODE_BW_EFFICIENCY)
    return DECODE_BW_EFFICIENCY * t / (t + DECODE_STEP_OVERHEAD_S) if t > 0 else 0.0


def tokens_per_second(
    spec: ModelSpec, placement: Placement, *, batch: int = 1, context_tokens: int = 0, kv_cache_type: str = "f16"
) -> float:
    """Decode rate one sequence sees when `batch` sequences share the model."""
    return 1.0 / decode_step_s(spec, placement, batch=batch, context_tokens=context_tokens, kv_cache_type=kv_cache_type)


def prefill_s(
    spec: ModelSpec,
    placement: Placement,
    prompt_tokens: int,
    *,
    host_mem_bw_gbps: float = DEFAULT_HOST_MEM_BW_GBPS,
) -> float:
    """Seconds to evaluate a prompt: compute bound, card after card, plus one weight read per card."""
    if prompt_tokens <= 0:
        return 0.0
    flops_per_layer = 2 * spec.parameter_count * spec.active_fraction / max(spec.block_count, 1) * prompt_tokens
    layer_w = layer_weight_bytes(spec)
    total = 0.0
    for share in placement.shares:
        compute = share.card.fp16_tflops * 1e12 * PREFILL_COMPUTE_EFFICIENCY
        total += flops_per_layer * share.layers / compute
        total += share.layers * layer_w / (share.card.mem_bw_gbps * 1e9)
    if placement.cpu_layers:
        # Without the GPU, llama.cpp evaluates CPU layers at a few hundred GFLOPS at best.
        total += flops_per_layer * placement.cpu_layers / 0.5e12
        total += placement.cpu_bytes / (host_mem_bw_gbps * 1e9)
    return total + max(len(placement.shares) - 1, 0) * HOP_S
