"""The planner's words and its result: the reason for each pick, warnings, and the `Plan` itself
(what `corral plan` prints and `corral up` starts)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.record import BackendKind
from launcher.config import LauncherSettings
from launcher.facts.memory import Era
from launcher.facts.ollama import default_max_loaded_models
from launcher.facts.perf import tokens_per_second
from launcher.planner.fit import CardBudget, Evaluation, FittedCopy, evaluate, gib, relative_speed, requested_parallel
from launcher.planner.placement import Plan, PlannedBackend, PlannedModel, Rejection
from launcher.planner.slots import Draft, Slot

if TYPE_CHECKING:
    from launcher.planner.plan import ModelRequest


@dataclass
class Findings:
    """What the planner learned on the way, besides the drafts themselves."""

    reasons: dict[tuple[tuple[int, ...], str], str] = field(default_factory=dict)  # (gpus, model) -> reason
    rejections: dict[tuple[str, str], str] = field(default_factory=dict)  # (model, candidate) -> reason
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def build_plan(
    drafts: Sequence[Draft],
    budgets: Mapping[int, CardBudget],
    requests: Sequence[ModelRequest],
    settings: LauncherSettings,
    findings: Findings,
    era: Era = Era.HEAD,
) -> Plan:
    """Backends in card order (the CPU-only one last), ports `base_port + i` in that order."""
    ordered = sorted(drafts, key=lambda d: (not d.gpus, min(d.gpus, default=0)))
    warnings = list(findings.warnings)
    backends = []
    for n, d in enumerate(ordered):
        cards = [budgets[i] for i in d.gpus]
        ev = evaluate(cards, d.copies, settings, era)
        models = tuple(_planned_model(d, f, findings, settings) for f in ev.fitted)
        backends.append(
            PlannedBackend(
                id=d.id,
                kind=d.kind,
                port=settings.base_port + n,
                gpu_indices=d.gpus,
                gpu_uuids=tuple(b.gpu.uuid for b in cards),
                gpu_names=tuple(b.gpu.name for b in cards),
                vram_total_bytes=sum(b.gpu.memory_total_bytes for b in cards),
                vram_planned_bytes=sum(m.vram_bytes for m in models),
                num_parallel=ev.num_parallel,
                # Ollama's default is 3 per GPU; never fewer than the models planned here.
                max_loaded_models=settings.max_loaded_models or max(default_max_loaded_models(len(cards)), len(models)),
                speed=round(relative_speed(ev.fitted[0].placement), 3),
                models=models,
                reason=_backend_reason(d, cards),
            )
        )
        warnings.extend(_parallel_warnings(d, ev, settings))
    return Plan(
        backends=tuple(backends),
        rejections=tuple(Rejection(model, cand, why) for (model, cand), why in findings.rejections.items()),
        warnings=tuple(warnings),
        errors=tuple(findings.errors),
        notes=_notes(backends, requests, settings),
    )


def _planned_model(d: Draft, f: FittedCopy, findings: Findings, settings: LauncherSettings) -> PlannedModel:
    spec = f.copy.request.spec
    tps = tokens_per_second(spec, f.placement, kv_cache_type=settings.kv_cache_type)
    return PlannedModel(
        name=f.copy.request.name,
        num_ctx=f.opts.effective_ctx(spec),
        vram_bytes=f.vram_bytes,
        expected_tokens_per_s=round(tps, 1),
        num_gpu=f.placement.gpu_layers if d.kind is BackendKind.CPU else -1,
        reason=findings.reasons.get((d.gpus, f.copy.request.name), ""),
        card_vram_bytes=f.card_bytes,
        card_layers=_card_layers(f, d),
    )


def _card_layers(f: FittedCopy, d: Draft) -> tuple[int, ...]:
    """Layers on each of the backend's cards, as llama.cpp assigns them (in proportion to free memory)."""
    if not d.gpus:
        return ()
    by_card = {id(s.card): s.layers + (1 if s.has_output else 0) for s in f.placement.shares}
    return tuple(by_card.get(id(card), 0) for card in f.cards)


def _backend_reason(d: Draft, cards: Sequence[CardBudget]) -> str:
    lead = d.copies[0].request.name
    if d.kind is BackendKind.SPLIT:
        return f"split for {lead}: OLLAMA_SCHED_SPREAD=1 over {len(cards)} cards, strongest first"
    if d.kind is BackendKind.CPU:
        return f"CPU offload for {lead}" + (f" over {len(cards)} card(s)" if cards else ", no GPU")
    return f"one card: {cards[0].gpu.name}"


def _parallel_warnings(d: Draft, ev: Evaluation, settings: LauncherSettings) -> list[str]:
    warnings = []
    for f in ev.fitted:
        req = f.copy.request
        asked = f.copy.num_parallel or requested_parallel(req, settings)
        if not req.spec.embedding_only and asked > ev.num_parallel:
            warnings.append(
                f"{req.name} gets num_parallel {ev.num_parallel} on {d.id}, not {asked}: "
                "OLLAMA_NUM_PARALLEL is per backend, and a model beside it asks for fewer"
            )
    return warnings


def _notes(
    backends: Sequence[PlannedBackend], requests: Sequence[ModelRequest], settings: LauncherSettings
) -> dict[str, str]:
    notes = {}
    for req in requests:
        copies = [(b, m) for b in backends for m in b.models if m.name == req.name]
        if not copies:
            notes[req.name] = "not placed (see errors)"
            continue
        rates = sorted({m.expected_tokens_per_s for _, m in copies})
        rate = f"~{rates[0]:.0f}" if len(rates) == 1 else f"~{rates[0]:.0f}-{rates[-1]:.0f}"
        first_backend, first = copies[0]
        slots = 1 if req.spec.embedding_only else first_backend.num_parallel
        count = "1 copy" if len(copies) == 1 else f"{len(copies)} copies"
        offload = f", {first.num_gpu} layers on GPU" if first.num_gpu >= 0 else ""
        notes[req.name] = (
            f"{count} on {', '.join(b.id for b, _ in copies)}: num_ctx {first.num_ctx} x {slots}, "
            f"{gib(first.vram_bytes)} each{offload}, {rate} tokens/s" + ("; hot" if req.entry.hot else "")
        )
    return notes


def fitted_copy(ev: Evaluation, req: ModelRequest) -> FittedCopy:
    return next(f for f in ev.fitted if f.copy.request.name == req.name)


def copy_reason(req: ModelRequest, slot: Slot, ev: Evaluation, klass: str, budgets: Mapping[int, CardBudget]) -> str:
    """Why this copy is here, in one phrase (`klass`: where the model fits on the empty rig)."""
    fitted = fitted_copy(ev, req)
    others = ", ".join(f.copy.request.name for f in ev.fitted if f is not fitted)
    if slot.kind is BackendKind.CPU:
        if not slot.gpus:
            return "runs on the CPU alone: no free card holds even one of its layers"
        layers = f"{fitted.placement.gpu_layers} of {req.spec.block_count + 1} layers"
        return f"partial CPU offload: {layers} on {slot.label}, the rest in host memory"
    if slot.kind is BackendKind.SPLIT:
        if others:
            return f"shares split backend {slot.label} with {others}"
        why = "no single card holds it" if klass != "single" else "no single card has room left"
        return f"split over {len(slot.gpus)} cards: {why}"
    b = budgets[slot.gpus[0]]
    hot = "hot model: " if req.entry.hot else ""
    if others:
        return f"{hot}shares {b.label} with {others}"
    return f"{hot}a card of its own ({b.gpu.name}, {b.card.mem_bw_gbps:.0f} GB/s)"


def offload_warning(
    req: ModelRequest,
    slot: Slot,
    ev: Evaluation,
    need_bytes: int,
    budgets: Mapping[int, CardBudget],
    settings: LauncherSettings,
) -> str:
    """The warning for a copy that runs (partly) on the CPU. `need_bytes`: its need on the whole rig
    when it is too large for it; 0 when it is offloaded because the cards are taken."""
    placement = fitted_copy(ev, req).placement
    tps = tokens_per_second(req.spec, placement, kv_cache_type=settings.kv_cache_type)
    if not slot.gpus:
        why = "no free card holds even one of its layers"
        if budgets:
            why = "no card has room for any of its layers beside the models placed before it (see the rejections)"
        return f"{req.name} is not served on a GPU: it runs on the CPU alone (~{tps:.1f} tokens/s); {why}"
    if need_bytes:
        have = sum(b.usable_bytes for b in budgets.values())
        why = f"it needs {gib(need_bytes)} of GPU memory, the rig has {gib(have)} (short by {gib(need_bytes - have)})"
    else:
        why = "the cards that could hold it are taken by the models before it"
    return (
        f"{req.name} runs partly on the CPU: {placement.gpu_layers} of {req.spec.block_count + 1} layers "
        f"on {slot.label}, the rest in host memory (~{tps:.1f} tokens/s); {why}"
    )
