"""The planner's filters for one backend: do these models fit these cards, and will Ollama keep them loaded?

`evaluate(budgets, copies, settings)` places every model of a (candidate) backend on its cards with
`launcher.facts.perf.split_layers`, in priority order, each one seeing the memory the ones before it left
(llama.cpp splits a model by the free memory of each device at load time), and then applies Ollama's
own admission rule. It returns the placements, or the first reason it fails, worded for `corral plan`.

Memory is counted with the memory model of the backend's Ollama era (`launcher.facts.memory`; at
HEAD: weights + KV cache + a compute buffer per card, with llama-server --fit's 1 GiB left free on
each card) against each card's *usable* memory: free memory minus the reserve chosen in
`[launcher]` (see `card_budgets`). Ollama's own admission rule then uses its prediction
(`llm.PredictServerVRAM` + the batch surcharge at HEAD).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from launcher.config import LauncherSettings
from launcher.facts import memory
from launcher.facts.cards import CardSpec
from launcher.facts.memory import Era
from launcher.facts.ollama import AUTO_NUM_CTX_TIERS, vram_default_num_ctx
from launcher.facts.perf import (
    DEFAULT_HOST_MEM_BW_GBPS,
    SINGLE_CARD_FIT_FRACTION,
    LoadOptions,
    Placement,
    fit_margin_bytes,
    split_layers,
    vram_needed_bytes,
)
from launcher.gpus.discovery import GpuInfo

if TYPE_CHECKING:  # planner.py imports this module; the request type is only needed for annotations
    from launcher.planner.plan import ModelRequest

GIB = 1024**3

# reserve = "compute-tier": what a card keeps back by generation (shared/seeds/002: the compute graph
# cannot be split across cards and grows with the generation's kernels). Major CC -> GiB.
COMPUTE_TIER_RESERVE_GIB: tuple[tuple[int, float], ...] = ((9, 6.0), (8, 4.0), (0, 2.0))


def ollama_default_ctx(vram_total_bytes: int) -> int:
    """The num_ctx Ollama uses when neither the request nor OLLAMA_CONTEXT_LENGTH sets one."""
    return vram_default_num_ctx(vram_total_bytes)


def ctx_default(request: ModelRequest, vram_total_bytes: int, settings: LauncherSettings) -> int:
    """The context Ollama would give the model on a backend with this much VRAM: the first choice.

    The entry's num_ctx, else [launcher].context_length (OLLAMA_CONTEXT_LENGTH), else the tier;
    Ollama caps it to the model's trained context.
    """
    asked = request.entry.num_ctx or settings.context_length
    first = asked or ollama_default_ctx(vram_total_bytes)
    return min(first, request.spec.context_length)


def ctx_choices(request: ModelRequest, vram_total_bytes: int, settings: LauncherSettings) -> list[int]:
    """Contexts to try, largest first: the asked one, or Ollama's default and the tiers below it."""
    first = ctx_default(request, vram_total_bytes, settings)
    if request.entry.num_ctx or settings.context_length:
        return [first]
    return sorted({min(t, first) for t in AUTO_NUM_CTX_TIERS}, reverse=True)


def parallel_choices(request: ModelRequest, settings: LauncherSettings) -> list[int]:
    """Slots to try, most first: the model's own num_parallel, or [launcher].num_parallel halved
    down to 1 (the launcher's value is the most a backend gets, not a demand)."""
    if request.spec.embedding_only:
        return [1]
    if request.entry.num_parallel:
        return [request.entry.num_parallel]
    choices, n = [], max(settings.num_parallel, 1)
    while n > 1:
        choices.append(n)
        n //= 2
    return [*choices, 1]


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GiB"


@dataclass(frozen=True)
class CardBudget:
    """One card as the planner sees it: free memory, the reserve kept back, and what is left to plan."""

    key: int  # position in the planner's GPU list: NVML indices repeat for MIG instances of one card
    tag: str  # "g0"; "g0.1" for the second MIG instance of GPU 0
    gpu: GpuInfo
    # A copy of gpu.card that belongs to this GPU alone: placements name their cards by CardSpec, and
    # two identical cards compare equal, so shares are mapped back to GPUs by identity.
    card: CardSpec
    reserve_bytes: int
    reserve_note: str  # "", or e.g. "4.0 GiB compute-tier reserve"

    @property
    def usable_bytes(self) -> int:
        return max(0, self.gpu.memory_free_bytes - self.reserve_bytes)

    @property
    def label(self) -> str:
        return f"{self.tag} ({self.gpu.name})"


def _tier_reserve_bytes(gpu: GpuInfo) -> int:
    major = gpu.compute_capability[0] or gpu.card.compute_capability[0]
    for min_major, reserve_gib in COMPUTE_TIER_RESERVE_GIB:
        if major >= min_major:
            return int(reserve_gib * GIB)
    return 0


def gpu_matches(gpu: GpuInfo, ref: str | int) -> bool:
    """Does a config reference (index, or UUID) name this GPU? An index names every MIG instance of it."""
    text = str(ref).strip()
    return gpu.index == int(text) if text.isdigit() else gpu.uuid == text


def card_tags(gpus: Sequence[GpuInfo]) -> list[str]:
    """Each card's short name, as backend ids use it: "g0"; "g0.1" for the second MIG instance of GPU 0."""
    same_index: dict[int, int] = {}
    for gpu in gpus:
        same_index[gpu.index] = same_index.get(gpu.index, 0) + 1
    seen: dict[int, int] = {}
    tags = []
    for gpu in gpus:
        nth = seen.get(gpu.index, 0)
        seen[gpu.index] = nth + 1
        tags.append(f"g{gpu.index}" if same_index[gpu.index] == 1 else f"g{gpu.index}.{nth}")
    return tags


def card_budgets(gpus: Sequence[GpuInfo], settings: LauncherSettings) -> tuple[dict[int, CardBudget], list[str]]:
    """Each card's budget (keyed by position) under `settings.reserve` and `card_reserve_gb`, plus warnings.

    "ollama" keeps nothing back beyond what the estimate already holds (graph and minimum per card);
    "compute-tier" keeps 6 / 4 / 2 GiB on Hopper and newer / Ampere and Ada / older cards. The
    per-card extra reserve is keyed by index ("0") or UUID; a key naming no card is a warning.
    """
    extra = [0.0] * len(gpus)
    warnings: list[str] = []
    for ref, reserve_gib in settings.card_reserve_gb.items():
        hits = [k for k, gpu in enumerate(gpus) if gpu_matches(gpu, ref)]
        if not hits:
            warnings.append(f"launcher.card_reserve_gb.{ref}: no GPU with that index or UUID; ignored")
        for k in hits:
            extra[k] += reserve_gib
    budgets = {}
    for k, (gpu, tag) in enumerate(zip(gpus, card_tags(gpus), strict=True)):
        notes = []
        reserve = 0
        if settings.reserve == "compute-tier":
            reserve += _tier_reserve_bytes(gpu)
            notes.append(f"{gib(reserve)} compute-tier reserve")
        if extra[k]:
            reserve += int(extra[k] * GIB)
            notes.append(f"{extra[k]:g} GiB card_reserve_gb")
        budgets[k] = CardBudget(k, tag, gpu, copy.copy(gpu.card), reserve, " + ".join(notes))
    return budgets, warnings


@dataclass(frozen=True)
class Copy:
    """One copy of a model on a backend, at the context it is planned for."""

    request: ModelRequest
    num_ctx: int  # as asked (or the tier chosen); Ollama caps it to the model's trained context
    offload: bool = False  # layers that do not fit stay on the CPU
    num_parallel: int = 0  # the slots planned for it (0: what it asks for); a backend runs the least


def requested_parallel(request: ModelRequest, settings: LauncherSettings) -> int:
    return request.entry.num_parallel or settings.num_parallel


def backend_parallel(copies: Sequence[Copy], settings: LauncherSettings) -> int:
    """OLLAMA_NUM_PARALLEL for a backend: it is per process, so the smallest any of its models asks for.

    Ollama runs embedding-only models with one slot whatever the setting, so they do not count.
    """
    asks = [
        c.num_parallel or requested_parallel(c.request, settings) for c in copies if not c.request.spec.embedding_only
    ]
    return min(asks) if asks else settings.num_parallel


def load_options(
    c: Copy, num_parallel: int, settings: LauncherSettings, era: Era = Era.HEAD, available_bytes: int = 0
) -> LoadOptions:
    """The options the model loads with; at HEAD num_batch is Ollama's automatic one for the
    total context and the memory available (`available_bytes`, 0: unknown, the context's batch)."""
    spec = c.request.spec
    slots = 1 if spec.embedding_only else num_parallel
    batch = memory.BATCH_DEFAULT
    if era is Era.HEAD and not spec.embedding_only:
        predicted = memory.predict_server_vram(spec, c.num_ctx, slots)
        batch = memory.automatic_num_batch(memory.server_context(spec, c.num_ctx, slots), predicted, available_bytes)
    return LoadOptions(
        num_ctx=c.num_ctx, num_parallel=slots, kv_cache_type=settings.kv_cache_type, num_batch=batch, era=era
    )


@dataclass(frozen=True)
class FittedCopy:
    copy: Copy
    opts: LoadOptions
    placement: Placement
    card_bytes: tuple[int, ...]  # VRAM on each card of the backend, in the backend's card order
    cards: tuple[CardSpec, ...] = ()  # the backend's cards, in its order (shares name them by identity)

    @property
    def vram_bytes(self) -> int:
        return sum(self.card_bytes)


@dataclass(frozen=True)
class Evaluation:
    fitted: tuple[FittedCopy, ...]
    num_parallel: int
    failure: str = ""  # why this backend cannot hold these models; "" when it can

    @property
    def ok(self) -> bool:
        return not self.failure


def _where(budgets: Sequence[CardBudget]) -> str:
    if len(budgets) == 1:
        return budgets[0].label
    return "+".join(b.tag for b in budgets)


def _names(fitted: Sequence[FittedCopy]) -> str:
    return ", ".join(f.copy.request.name for f in fitted)


def _no_room(
    c: Copy, opts: LoadOptions, budgets: Sequence[CardBudget], left: Sequence[int], fitted: Sequence[FittedCopy]
) -> str:
    # The same figure as the plan's VRAM column (what the model would hold), and the margin apart.
    n = max(len(budgets), 1)
    margin = fit_margin_bytes(opts)
    need = vram_needed_bytes(c.request.spec, opts, n) - n * margin
    per_card = " per card" if n > 1 else ""
    kept = f" (+ {gib(margin)}{per_card} that llama-server --fit keeps free)" if margin else ""
    cards = f" over {len(budgets)} cards" if len(budgets) > 1 else ""
    room = f"{gib(sum(max(0, x) for x in left))} left beside {_names(fitted)}" if fitted else f"{gib(sum(left))} free"
    reserves = [b.reserve_note for b in budgets if b.reserve_note]
    after = f" after the {reserves[0]}" if len(reserves) == 1 else (" after reserves" if reserves else "")
    ctx = opts.effective_ctx(c.request.spec)
    return (
        f"needs {gib(need)}{cards} at num_ctx {ctx} x {opts.num_parallel}{kept}; "
        f"{_where(budgets)} has {room}{after}"
    )


def _predicted_beside(f: FittedCopy, left: int) -> int:
    """Ollama's prediction for reloading `f` when `left` bytes are free: the automatic num_batch
    (and with it the surcharge) is chosen for that free memory (sched.go applyAutomaticGenerationBatch)."""
    spec, opts = f.copy.request.spec, f.opts
    predicted = memory.predict_server_vram(spec, opts.num_ctx, opts.num_parallel)
    if spec.embedding_only:
        return predicted
    total = memory.server_context(spec, opts.num_ctx, opts.num_parallel)
    return predicted + memory.generation_batch_surcharge(memory.automatic_num_batch(total, predicted, max(left, 0)))


def _admission_failure(fitted: Sequence[FittedCopy], budgets: Sequence[CardBudget], era: Era) -> str:
    """Ollama's rule for loading a model while others stay loaded: it must need at most 80 % of what
    they leave free (server/sched.go; otherwise it evicts). Keep-alive expiry reloads models in any
    order, so every model must pass beside all the others, not only the last one planned.
    """
    usable = sum(b.usable_bytes for b in budgets)
    for f in fitted:
        others = [o for o in fitted if o is not f]
        left = usable - sum(o.vram_bytes for o in others)
        need = _predicted_beside(f, left) if era is Era.HEAD else f.vram_bytes
        if need > SINGLE_CARD_FIT_FRACTION * left:
            return (
                f"Ollama would evict rather than load {f.copy.request.name} beside {_names(others)}: "
                f"it needs {gib(need)}, over 80 % of the {gib(left)} they leave"
            )
    return ""


def _card_bytes(placement: Placement, budgets: Sequence[CardBudget]) -> tuple[int, ...]:
    per_card = {id(b.card): 0 for b in budgets}
    for share in placement.shares:
        per_card[id(share.card)] += share.vram_bytes
    return tuple(per_card[id(b.card)] for b in budgets)


def evaluate(
    budgets: Sequence[CardBudget],
    copies: Sequence[Copy],
    settings: LauncherSettings,
    era: Era = Era.HEAD,
) -> Evaluation:
    """Place `copies` (in priority order) on a backend over `budgets` (its cards, strongest first).

    Each card belongs to one backend, so the backend starts with every card's usable memory. A
    backend with no cards runs on the CPU and always fits (host memory is not planned).
    """
    if settings.max_loaded_models and len(copies) > settings.max_loaded_models:
        n = settings.max_loaded_models
        return Evaluation((), 0, f"launcher.max_loaded_models = {n} allows {n} model(s) per backend")
    num_parallel = backend_parallel(copies, settings)
    left = [b.usable_bytes for b in budgets]
    fitted: list[FittedCopy] = []
    for c in copies:
        opts = load_options(c, num_parallel, settings, era, sum(max(0, x) for x in left))
        cards = [(b.card, max(0, x)) for b, x in zip(budgets, left, strict=True)]
        placement = split_layers(c.request.spec, opts, cards, allow_cpu=c.offload or not budgets)
        if placement is None:
            return Evaluation(tuple(fitted), num_parallel, _no_room(c, opts, budgets, left, fitted))
        card_bytes = _card_bytes(placement, budgets)
        left = [x - used_now for x, used_now in zip(left, card_bytes, strict=True)]
        fitted.append(FittedCopy(c, opts, placement, card_bytes, tuple(b.card for b in budgets)))
    if budgets and len(fitted) > 1:
        failure = _admission_failure(fitted, budgets, era)
        if failure:
            return Evaluation(tuple(fitted), num_parallel, failure)
    return Evaluation(tuple(fitted), num_parallel)


def relative_speed(placement: Placement, host_mem_bw_gbps: float = DEFAULT_HOST_MEM_BW_GBPS) -> float:
    """Decode speed of a placement against a 1 TB/s card: bytes over the time each device takes to read
    its share (a split reads card after card; offloaded layers run at host memory bandwidth)."""
    total = placement.cpu_bytes + sum(s.vram_bytes for s in placement.shares)
    seconds = placement.cpu_bytes / host_mem_bw_gbps + sum(s.vram_bytes / s.card.mem_bw_gbps for s in placement.shares)
    if not total or not seconds:
        return host_mem_bw_gbps / 1000.0
    return total / seconds / 1000.0
