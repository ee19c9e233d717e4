"""The residency policy's cost model: expected time to first token of one request on one backend.

Pure functions over a `BackendView` (no I/O, no clock: time comes from `Snapshot.now`). Observed
rates win over estimates; estimates fall back on the model's size and the backend's relative speed
when nothing was observed yet. The figures only have to rank backends sensibly, not predict to the
millisecond: what matters is that a free slot beats a queue, a short queue beats a cold load, and a
cold load that evicts a hot model costs more than one that evicts a cold one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

from gateway.record import BackendKind
from gateway.routing.snapshot import LOAD_OPTION_KEYS, BackendView, LoadOptions, ModelFacts, ResidentModel, Snapshot
from launcher.facts import memory
from launcher.facts.memory import Era, era_for_version
from launcher.facts.ollama import (
    AUTO_NUM_CTX_FLOOR,
    DEFAULT_KEEP_ALIVE_S,
    default_max_loaded_models,
    vram_default_num_ctx,
)
from launcher.facts.perf import DEFAULT_LOAD_GBPS, PREFILL_COMPUTE_EFFICIENCY, RUNNER_START_S, SINGLE_CARD_FIT_FRACTION

GIB = 1024**3

# How a request would be served on a backend (a subset of routing.Reason).
Route = Literal["resident_free_slot", "resident_queued", "loading", "cold_load", "cold_load_evict"]

# Ollama's defaultModelsPerGPU (server/sched.go): OLLAMA_MAX_LOADED_MODELS=0 means 3 per GPU.
# Ollama clamps num_ctx to at least 4 (sched.go getRunner).
MIN_NUM_CTX = 4
# Ollama's default keep_alive (OLLAMA_KEEP_ALIVE=5m): an idle model's expires_at is its last use plus this.


@dataclass(frozen=True)
class CostSettings:
    """The knobs of the estimate; the defaults suit a typical local NVMe + PCIe 4 rig."""

    load_gbps: float = DEFAULT_LOAD_GBPS  # store -> GPU streaming rate for a cold load
    runner_start_s: float = RUNNER_START_S  # llama-server start before weights stream in
    unload_s: float = 0.5  # per evicted model: Ollama waits for the VRAM to come back
    unknown_load_s: float = 10.0  # a cold load of a model whose size nothing tells
    output_tokens: int = 256  # a request's decode length, when no service time was observed
    unknown_service_s: float = 5.0  # a request's wall time when neither rates nor sizes are known
    # Recent NVIDIA cards offer ~300 FP16 TFLOPS per TB/s of memory bandwidth (RTX 4090 330/1.0,
    # H100 989/3.35); `record.speed` is bandwidth relative to 1 TB/s, so this turns it into compute.
    tflops_per_speed: float = 300.0
    bytes_per_weight: float = 0.6  # Q4_K_M is ~4.85 bits per weight
    decode_bw_efficiency: float = 0.8  # share of bandwidth a decode step reaches, as a rough rate
    # Hotness decays with this time constant after a model's last use: a model used a minute ago
    # counts ~0.37 of one just used.
    recency_tau_s: float = 60.0
    # How many of its own reloads an evicted model is expected to cost per unit of hotness.
    eviction_weight: float = 1.0
    # Each sequence already decoding on a copy makes every token of a newcomer about this much
    # slower (batched decode shares the weight read but not the KV reads or the compute):
    # launcher.facts.perf has 16 concurrent streams of an 8B on an RTX 4090 at 0.67x a lone stream's rate.
    batch_slowdown_per_sequence: float = 0.03


@dataclass(frozen=True, slots=True)
class Estimate:
    """One backend's answer to "how soon would this request see its first token here?"."""

    backend_id: str
    route: Route
    ttft_s: float  # expected time to first token
    score_s: float  # ttft plus the expected cost the choice inflicts on others (evicted reloads)
    speed: float  # record.speed, for tie breaks
    ready_now: bool  # False: only after a busy model finishes (Ollama would wait for it; we do not send)
    slot_wait_s: float = 0.0  # the part of ttft spent waiting for a slot of the resident model
    load_s: float = 0.0  # the part of ttft spent loading (incl. another model's load ahead of it)
    evicted: tuple[str, ...] = ()
    busy_blockers: tuple[str, ...] = ()  # busy models that would have to go first
    slots: int = 0  # of the resident (or loading) copy; 0 for a cold load
    free_slots: int = 0
    ahead: int = 0  # requests that must finish before this one gets a slot

    def describe(self) -> str:
        """A short human line for debug logs, e.g. "g1: resident, 1/4 slots free, ttft~0.08s"."""
        head = f"{self.backend_id}: "
        if self.route == "resident_free_slot":
            text = f"resident, {self.free_slots}/{self.slots} slots free, ttft~{self.ttft_s:.2f}s"
        elif self.route == "resident_queued":
            text = f"resident, 0/{self.slots} slots free, waits for {self.ahead}, ttft~{self.ttft_s:.2f}s"
        elif self.route == "loading":
            text = f"loading now, ttft~{self.ttft_s:.2f}s"
        elif self.evicted or self.busy_blockers:
            text = f"cold load {self.load_s:.1f}s"
            if self.evicted:
                text += f" evicting {','.join(self.evicted)}"
            if self.busy_blockers:
                text += f" after busy {','.join(self.busy_blockers)}"
            text += f", ttft~{self.ttft_s:.2f}s"
        else:
            text = f"cold load {self.load_s:.1f}s, ttft~{self.ttft_s:.2f}s"
        if self.score_s > self.ttft_s + 1e-9:
            text += f", score {self.score_s:.2f}s"
        return head + text


# ---------------------------------------------------------------------------------------------
# Model facts and options


def model_size_bytes(model: str, snapshot: Snapshot) -> int | None:
    """The model's size: from its facts, else from any resident copy in the fleet; None if unknown."""
    facts = snapshot.models.get(model)
    if facts is not None and facts.size_bytes > 0:
        return facts.size_bytes
    key = ("size", model)
    memo = snapshot.idx.memo
    if key in memo:
        return cast(int | None, memo[key])
    best = 0
    for view in snapshot.backends:
        r = view.resident_model(model)
        if r is not None:
            best = max(best, r.size_bytes, r.size_vram_bytes)
    memo[key] = best or None
    return best or None


def num_slots(view: BackendView, facts: ModelFacts | None) -> int:
    """Parallel requests one loaded copy serves: the backend's num_parallel, 1 where Ollama forces
    one slot (embedding-only models and the architectures server/sched.go lists)."""
    if facts is not None and (facts.embedding_only or facts.single_slot):
        return 1
    return max(view.record.num_parallel, 1)


def max_loaded_models(view: BackendView) -> int:
    if view.record.max_loaded_models > 0:
        return view.record.max_loaded_models
    return default_max_loaded_models(view.record.gpu_count)


def default_num_ctx(view: BackendView) -> int:
    """The context a request without num_ctx gets: the backend's setting, else Ollama's VRAM tier
    (routes.go Serve, since v0.15.5: >= 47 GiB -> 262144, >= 23 GiB -> 32768, else 4096)."""
    if view.default_num_ctx > 0:
        return view.default_num_ctx
    return vram_default_num_ctx(view.record.vram_total_bytes)


def loaded_num_ctx(num_ctx: int, facts: ModelFacts | None) -> int:
    """The per-slot context Ollama loads for a request of `num_ctx`: capped to the model's trained
    context (sched.go effectiveContext), and at least MIN_NUM_CTX. /api/ps then reports this value."""
    if facts is not None and facts.context_length > 0:
        num_ctx = min(num_ctx, facts.context_length)
    return max(num_ctx, MIN_NUM_CTX)


def effective_num_ctx(view: BackendView, num_ctx: int | None, facts: ModelFacts | None) -> int:
    """Per-slot context a load would get: `num_ctx` as asked (None: the backend's default), capped
    like Ollama does."""
    return loaded_num_ctx(num_ctx if num_ctx is not None else default_num_ctx(view), facts)


def backend_era(view: BackendView) -> Era:
    """The memory model of the backend's Ollama, from its /api/version (HEAD when unknown), so the
    router costs a load the way the planner planned it and the backend will judge it."""
    return era_for_version(view.version) or Era.HEAD


def _need_for(view: BackendView, facts: ModelFacts, num_ctx: int) -> int:
    """What Ollama compares with 80 % of the free memory before loading beside others: at HEAD
    PredictServerVRAM (file + f16 KV) plus the batch surcharge for the total context; for
    Ollama <= 0.29 its GraphSize estimate (file + KV + per-card graph and minimum)."""
    slots = num_slots(view, facts)
    kv = facts.kv_bytes_per_token * num_ctx * slots
    if backend_era(view) is Era.A:
        per_card = facts.overhead_bytes_era_a or facts.overhead_bytes
        return facts.size_bytes + kv + per_card * view.record.gpu_count
    batch = memory.generation_batch_for_context(num_ctx * slots)
    surcharge = 0 if facts.embedding_only else memory.generation_batch_surcharge(batch)
    return facts.size_bytes + kv + surcharge


def need_bytes(view: BackendView, options: LoadOptions, facts: ModelFacts | None, size_bytes: int | None) -> int | None:
    """VRAM a fresh load of the model needs here: weights + KV for every slot + per-card overhead.
    Without facts, the size alone (a lower bound); None when even that is unknown."""
    if facts is None:
        return size_bytes
    return _need_for(view, facts, effective_num_ctx(view, options.num_ctx, facts))


def min_need_bytes(
    view: BackendView, options: LoadOptions, facts: ModelFacts | None, size_bytes: int | None
) -> int | None:
    """The least VRAM a load could get away with here, for "can it ever fit?". A request that leaves
    num_ctx to the backend gets an automatic context, which Ollama retries at a lower tier when the
    load runs out of memory (sched.go nextLowerAutoNumCtx), so it is costed at no more than 4096."""
    if facts is None:
        return size_bytes
    num_ctx = options.num_ctx
    if num_ctx is None:
        num_ctx = min(default_num_ctx(view), AUTO_NUM_CTX_FLOOR)
    return _need_for(view, facts, effective_num_ctx(view, num_ctx, facts))


def options_match(
    resident: ResidentModel, options: LoadOptions, facts: ModelFacts | None, default_ctx: int = 0
) -> bool:
    """Whether Ollama would reuse this loaded copy for a request with these load options
    (server/sched.go needsReload). num_gpu < 0 matches anything; an option whose loaded value is
    unknown is assumed to match (a wrong guess costs one reload, which Ollama then does itself).

    A request without num_ctx gets the backend's OLLAMA_CONTEXT_LENGTH when one is set
    (`default_ctx` > 0; routes.go usesAutomaticNumCtx), so a copy loaded with another context is
    reloaded for it. Without that setting both sides use the automatic tier, which matches."""
    wanted_ctx = options.num_ctx if options.num_ctx is not None else (default_ctx or None)
    known_ctx = resident.context_length > 0  # 0: the gateway never learned it
    if wanted_ctx is not None and known_ctx and loaded_num_ctx(wanted_ctx, facts) != resident.context_length:
        return False
    loaded = resident.loaded_with
    if loaded is None:
        return True
    for key in LOAD_OPTION_KEYS:
        if key == "num_ctx":
            continue
        new = getattr(options, key)
        old = getattr(loaded, key)
        if new is None or old is None:
            continue
        if key == "num_gpu" and new < 0:
            continue
        if new != old:
            return False
    return True


def can_ever_fit(view: BackendView, need: int | None) -> bool:
    """Whether the model could be loaded here with nothing else resident (CPU backends offload)."""
    if need is None or view.record.kind == BackendKind.CPU or view.record.vram_total_bytes <= 0:
        return True
    return need <= view.record.vram_total_bytes


def _fits(view: BackendView, need: int | None, free_bytes: int, loaded_count: int) -> bool:
    """Ollama's rule (sched.go load): alone, a model always starts; beside others it must fit in 80 %
    of the free memory, else Ollama evicts."""
    if loaded_count >= max_loaded_models(view):
        return False
    if loaded_count == 0:
        return True  # Ollama then starts it anyway, offloading to CPU or retrying a smaller context
    if need is None or view.record.kind == BackendKind.CPU:
        return True
    return need <= SINGLE_CARD_FIT_FRACTION * free_bytes


# ---------------------------------------------------------------------------------------------
# Rates


def prefill_s(view: BackendView, model: str, size_bytes: int | None, prompt_tokens: int, costs: CostSettings) -> float:
    if prompt_tokens <= 0:
        return 0.0
    observed = view.observed.get(model)
    if observed is not None and observed.prefill_tokens_per_s > 0:
        return prompt_tokens / observed.prefill_tokens_per_s
    if not size_bytes:
        return 0.0
    flops_per_token = 2.0 * size_bytes / costs.bytes_per_weight
    flops_per_s = max(view.record.speed, 1e-3) * costs.tflops_per_speed * 1e12 * PREFILL_COMPUTE_EFFICIENCY
    return prompt_tokens * flops_per_token / flops_per_s


def decode_s(view: BackendView, model: str, size_bytes: int | None, costs: CostSettings) -> float:
    """Time to decode a typical answer here, from the observed rate, else from size and bandwidth."""
    observed = view.observed.get(model)
    if observed is not None and observed.tokens_per_s > 0:
        tokens_per_s = observed.tokens_per_s
    elif size_bytes:
        tokens_per_s = costs.decode_bw_efficiency * max(view.record.speed, 1e-3) * 1e12 / size_bytes
    else:
        return costs.unknown_service_s
    return costs.output_tokens / tokens_per_s


def service_s(view: BackendView, model: str, size_bytes: int | None, prompt_tokens: int, costs: CostSettings) -> float:
    """Time one request of this model holds a slot here: observed, else prefill + a typical decode."""
    observed = view.observed.get(model)
    if observed is not None and observed.samples > 0 and observed.service_s > 0:
        return observed.service_s
    if not size_bytes and (observed is None or observed.tokens_per_s <= 0):
        return costs.unknown_service_s
    return prefill_s(view, model, size_bytes, prompt_tokens, costs) + decode_s(view, model, size_bytes, costs)


def load_s(view: BackendView, model: str, size_bytes: int | None, costs: CostSettings) -> float:
    """Cold-load time of the model here: observed load_duration, else start + size / load bandwidth."""
    observed = view.observed.get(model)
    if observed is not None and observed.load_s > 0:
        return observed.load_s
    if not size_bytes:
        return costs.unknown_load_s
    return costs.runner_start_s + size_bytes / (costs.load_gbps * 1e9)


def hotness(view: BackendView, resident: ResidentModel, now: float, costs: CostSettings) -> float:
    """How much evicting this resident model would hurt: requests waiting for it, plus a recency term
    in [0, 1] from the gateway's last use (else from expires_at under the default keep_alive)."""
    waiting = float(view.queued.get(resident.name, 0))
    last = view.last_used.get(resident.name)
    if last is not None:
        age_s = max(now - last, 0.0)
    elif resident.expires_at is not None:
        age_s = max(DEFAULT_KEEP_ALIVE_S - (resident.expires_at - now), 0.0)
    else:
        return waiting + 0.5  # nothing known: as likely hot as cold
    return waiting + math.exp(-age_s / costs.recency_tau_s)


# ---------------------------------------------------------------------------------------------
# The estimate


def estimate(
    view: BackendView,
    model: str,
    options: LoadOptions,
    prompt_tokens: int,
    snapshot: Snapshot,
    costs: CostSettings,
    size_bytes: int | None = None,
) -> Estimate:
    """Expected time to first token of one request on one (eligible) backend, and how it would go.
    `size_bytes`: the model's `model_size_bytes`, when the caller has it already (else looked up)."""
    facts = snapshot.models.get(model)
    size = size_bytes if size_bytes is not None else model_size_bytes(model, snapshot)
    slots = num_slots(view, facts)
    prefill = prefill_s(view, model, size, prompt_tokens, costs)
    in_flight = view.in_flight.get(model, 0)
    speed = view.record.speed

    free_slots = max(slots - in_flight, 0)
    # Requests that must finish before this one gets a slot: one for the slot itself, plus one per
    # request already queued at the backend or at the gateway (FIFO: those are served first). One
    # slot frees every service_s / slots on average.
    ahead = 0 if free_slots else in_flight - slots + 1 + view.queued.get(model, 0)
    wait = ahead * service_s(view, model, size, prompt_tokens, costs) / slots if ahead else 0.0

    if view.loading == model:
        # Half the load is an unbiased guess of what is left of one in progress.
        remaining = 0.5 * load_s(view, model, size, costs)
        ttft = remaining + wait + prefill
        return Estimate(
            view.id,
            "loading",
            ttft,
            ttft,
            speed,
            True,
            wait,
            remaining,
            slots=slots,
            free_slots=free_slots,
            ahead=ahead,
        )

    resident = view.resident_model(model)
    if resident is not None and options_match(resident, options, facts, view.default_num_ctx):
        route: Route = "resident_free_slot" if free_slots else "resident_queued"
        ttft = wait + prefill
        # Joining a busy copy slows this request's decode (and theirs): with two copies of a model,
        # the less busy one wins, so replicas share the load instead of one taking all of it.
        sharing = min(in_flight, slots) * costs.batch_slowdown_per_sequence * decode_s(view, model, size, costs)
        return Estimate(
            view.id, route, ttft, ttft + sharing, speed, True, wait, slots=slots, free_slots=free_slots, ahead=ahead
        )

    # A cold load, or a reload with other options: Ollama then unloads the resident copy first
    # (waiting for its requests to finish), whether or not both would fit.
    loading_ahead = 0.0
    if view.loading is not None:
        # Ollama loads one model at a time; another model's load in progress comes first.
        loading_ahead = 0.5 * load_s(view, view.loading, model_size_bytes(view.loading, snapshot), costs)
    load = loading_ahead + load_s(view, model, size, costs)
    need = need_bytes(view, options, facts, size)
    free = view.free_vram_bytes
    loaded = len(view.resident)

    now = snapshot.now
    idle: list[tuple[float, ResidentModel]] = []
    busy: list[ResidentModel] = []
    for r in view.resident:
        if view.in_flight.get(r.name, 0) > 0 or r.name == view.loading:
            busy.append(r)
        elif r is not resident:
            idle.append((_eviction_cost(view, r, now, costs), r))
    idle.sort(key=lambda item: (item[0], item[1].name))

    evicted: list[str] = []
    penalty = 0.0
    if resident is not None and resident not in busy:
        free += resident.size_vram_bytes
        loaded -= 1
        evicted.append(resident.name)
        penalty += _eviction_cost(view, resident, now, costs)
    blocked = resident is not None and resident in busy
    if not blocked and _fits(view, need, free, loaded):
        route = "cold_load_evict" if evicted else "cold_load"
        ttft = load + costs.unload_s * len(evicted) + prefill
        return Estimate(view.id, route, ttft, ttft + penalty, speed, True, load_s=load, evicted=tuple(evicted))

    # Evict idle models, cheapest first, until it fits; a busy one is never evicted by choice.
    for reload_cost, r in idle:
        free += r.size_vram_bytes
        loaded -= 1
        evicted.append(r.name)
        penalty += reload_cost
        if not blocked and _fits(view, need, free, loaded):
            ttft = load + costs.unload_s * len(evicted) + prefill
            return Estimate(
                view.id, "cold_load_evict", ttft, ttft + penalty, speed, True, load_s=load, evicted=tuple(evicted)
            )

    # Only evicting busy models would make room: Ollama would wait for them to finish. The estimate
    # then includes one service time of the busiest blocker, for the baselines' benefit.
    blockers = tuple(sorted(r.name for r in busy))
    longest = max(
        (service_s(view, r.name, r.size_bytes or r.size_vram_bytes, 0, costs) for r in busy),
        default=0.0,
    )
    ttft = longest + load + costs.unload_s * (len(evicted) + len(busy)) + prefill
    return Estimate(
        view.id,
        "cold_load_evict",
        ttft,
        ttft + penalty,
        speed,
        False,
        load_s=load,
        evicted=tuple(evicted),
        busy_blockers=blockers,
    )


def _eviction_cost(view: BackendView, r: ResidentModel, now: float, costs: CostSettings) -> float:
    """Expected seconds of future reloads that evicting `r` causes: its reload time x its hotness."""
    reload_s = load_s(view, r.name, r.size_bytes or r.size_vram_bytes, costs)
    return reload_s * hotness(view, r, now, costs) * costs.eviction_weight
