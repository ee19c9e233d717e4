"""Placement planner: which backends to start, on which cards, holding which models, and why. Pure.

`plan(gpus, models, settings) -> Plan` is a filter -> score -> pick pipeline run once per model copy:
candidate slots (a card of its own, a card shared with other models, a group of cards for a split,
partial CPU offload) are ranked by the scorers below, each is checked by the filters in
`launcher.planner.fit` (memory at the planned context, Ollama's 80 % admission rule,
OLLAMA_MAX_LOADED_MODELS) and by a look-ahead (would it leave the models after it with no room?),
and the first that passes wins. Every candidate turned down before the pick becomes a `Rejection`.

Assumptions, each one a decision `corral plan` shows:

- Priority: `hot` models first, then config order. Pinned models are placed before everything
  (a pin wins); an impossible pin is an error naming the card and the shortfall. The look-ahead
  steers a model away from cards the later ones need, but never onto the CPU: when every GPU
  place that fits would crowd a later model out, the earlier model keeps its place.
- Context: `num_ctx` of the entry, else `[launcher].context_length`, else Ollama's default for the
  backend's cards (OLLAMA_CONTEXT_LENGTH unset: 4096 / 32768 / 262144 by total VRAM, < 23 / >= 23 /
  >= 47 GiB). When that default does not fit, the planner steps down Ollama's own tiers (Ollama does
  the same after an out-of-memory load), so the supervisor must pass the planned `num_ctx`.
  Every copy of a model gets the same context, so the gateway can send any request to any copy
  without forcing a reload.
- Slots: the model's own num_parallel, else [launcher].num_parallel halved down to 1 until it fits
  (fewer slots on GPUs beat more partly on the CPU); an automatic context steps down first.
- Memory: the backend's Ollama era (launcher.facts.memory; HEAD: weights + KV + a compute buffer
  per card, with the 1 GiB --fit keeps free) against free memory minus the reserve. On top, Ollama's
  admission rule: beside other models a new one loads only if its prediction (PredictServerVRAM +
  batch surcharge) is at most 80 % of the memory they leave. A model planned beside
  others must pass that rule beside all of them (keep-alive expiry reloads them in any order),
  or the backend would keep evicting what we planned.
- One backend per card: a card in a split group is never also given to a single-card backend.
  Two `ollama serve` processes on one card each plan against the free memory they see at load
  time, so whichever loads second can take what the first was promised; and an eviction in one
  cannot make room for the other. Several models share a backend instead (one process, one
  accounting, OLLAMA_MAX_LOADED_MODELS raised to hold them).
- Splits go over the fewest cards that hold the model, fastest first, strongest first in
  `gpu_indices` (CUDA_VISIBLE_DEVICES order); the supervisor sets OLLAMA_SCHED_SPREAD=1.
- Replicas: right after a model's first copy, at the same context. An integer is a count (a
  warning when fewer fit); "auto" takes every further card that holds it without crowding out
  a later model's first copy. Copies go where the first went: single cards, or split groups.
- Partial CPU offload is the last resort, over as many free cards as possible, with a warning;
  with allow_cpu_offload = false a model that fits nowhere is an error with the shortfall.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

from gateway.record import BackendKind
from launcher.config import LauncherSettings, ModelEntry
from launcher.facts.catalog import ModelSpec, normalize_name
from launcher.facts.memory import Era
from launcher.facts.perf import vram_needed_bytes
from launcher.gpus.discovery import GpuInfo
from launcher.planner.fit import (
    Copy,
    Evaluation,
    backend_parallel,
    card_budgets,
    ctx_choices,
    ctx_default,
    evaluate,
    gib,
    gpu_matches,
    load_options,
    parallel_choices,
)
from launcher.planner.output import Findings, build_plan, copy_reason, fitted_copy, offload_warning
from launcher.planner.placement import Plan
from launcher.planner.slots import Draft, Slot, SlotRanker


@dataclass(frozen=True)
class ModelRequest:
    """A `[[models]]` entry with the facts of the model it names."""

    entry: ModelEntry
    spec: ModelSpec
    index: int = 0  # position in [[models]]: the priority after `hot`

    @cached_property
    def name(self) -> str:
        """Ollama's name for it (`nomic-embed-text` -> `nomic-embed-text:latest`), as /api/ps reports it."""
        return normalize_name(self.entry.name)

    @property
    def priority(self) -> tuple[bool, int]:
        return (not self.entry.hot, self.index)


def plan(
    gpus: Sequence[GpuInfo], models: Sequence[ModelRequest], settings: LauncherSettings, era: Era = Era.HEAD
) -> Plan:
    """Decide the backends for `models` on `gpus` for Ollama of `era`. Pure and deterministic.

    Never raises for a model that does not fit: it lands in `Plan.errors` with the shortfall, and
    every candidate turned down before the pick is a `Rejection` with its reason.
    """
    return _Planner(gpus, models, settings, era).run()


Setting = tuple[int, int]  # (num_parallel, num_ctx): what a copy is tried with


class _Planner:
    def __init__(
        self, gpus: Sequence[GpuInfo], models: Sequence[ModelRequest], settings: LauncherSettings, era: Era
    ) -> None:
        self.settings = settings
        self.era = era
        self.budgets, warnings = card_budgets(gpus, settings)
        self.found = Findings(warnings=warnings)
        self.pins: dict[str, tuple[int, ...]] = {}
        self.slots = SlotRanker(self.budgets, self.pins, settings)
        self.drafts: list[Draft] = []
        # The look-ahead evaluates the same backends over and over; the answer depends only on the
        # cards and the copies (names are unique, settings fixed).
        self._evaluations: dict[tuple[tuple[int, ...], tuple[tuple[str, int, bool, int], ...]], Evaluation] = {}
        self._left_out_cache: dict[object, frozenset[str]] = {}
        self.requests: list[ModelRequest] = []
        seen: dict[str, ModelRequest] = {}
        for req in models:
            if req.name in seen:
                self.found.warnings.append(f"{req.entry.name}: the same model as {seen[req.name].entry.name}; ignored")
                continue
            seen[req.name] = req
            pin = self._resolve_pin(req)
            if pin is None:
                continue
            if pin:
                self.pins[req.name] = pin
            self.requests.append(req)
        self.klass = {r.name: self._classify(r) for r in self.requests}

    # -- inputs ---------------------------------------------------------------------------------

    def _evaluate(self, gpus: tuple[int, ...], copies: tuple[Copy, ...]) -> Evaluation:
        key = (gpus, tuple((c.request.name, c.num_ctx, c.offload, c.num_parallel) for c in copies))
        ev = self._evaluations.get(key)
        if ev is None:
            ev = evaluate([self.budgets[i] for i in gpus], copies, self.settings, self.era)
            self._evaluations[key] = ev
        return ev

    def _resolve_pin(self, req: ModelRequest) -> tuple[int, ...] | None:
        """The pinned cards (keys, strongest first); () when not pinned; None after an error."""
        found: set[int] = set()
        for item in req.entry.pin:
            hits = {k for k, b in self.budgets.items() if gpu_matches(b.gpu, item)}
            if not hits:
                have = ", ".join(f"{b.tag} {b.gpu.uuid}" for b in self.budgets.values()) or "no GPUs"
                self.found.errors.append(f"{req.name}: pin {item!r}: no such GPU (this rig has {have})")
                return None
            found |= hits
        return tuple(k for k in self.slots.order if k in found)

    def _ctx_default(self, req: ModelRequest, gpus: Sequence[int]) -> int:
        return ctx_default(req, sum(self.budgets[i].gpu.memory_total_bytes for i in gpus), self.settings)

    def _choices(self, req: ModelRequest, gpus: Sequence[int], fixed: Setting | None) -> list[Setting]:
        """(num_parallel, num_ctx) to try, best first: slots outer, context tiers inner."""
        if fixed:
            return [fixed]
        contexts = ctx_choices(req, sum(self.budgets[i].gpu.memory_total_bytes for i in gpus), self.settings)
        return [(par, ctx) for par in parallel_choices(req, self.settings) for ctx in contexts]

    def _joining(self, req: ModelRequest, draft: Draft, choices: list[Setting]) -> list[Setting]:
        """A model joining a backend takes the slots it runs with (OLLAMA_NUM_PARALLEL is per
        process): stepping them down would slow the models already there. Only a model's own
        num_parallel may lower them (with a warning)."""
        running = backend_parallel(draft.copies, self.settings)
        if req.entry.num_parallel or req.spec.embedding_only:
            return choices
        return [(min(running, par), ctx) for par, ctx in choices if par == choices[0][0]]

    def _min_ctx(self, req: ModelRequest) -> int:
        return self._choices(req, (), None)[-1][1]

    def _least(self, req: ModelRequest) -> Copy:  # the smallest context and fewest slots it may get
        par, ctx = self._choices(req, (), None)[-1]
        return Copy(req, ctx, num_parallel=par)

    def _min_need_bytes(self, req: ModelRequest, num_cards: int = 1) -> int:
        """VRAM the model needs at the least (smallest context and slots) on `num_cards` cards."""
        least = self._least(req)
        opts = load_options(least, least.num_parallel, self.settings, self.era)
        return vram_needed_bytes(req.spec, opts, max(num_cards, 1))

    def _classify(self, req: ModelRequest) -> str:
        """Where the model fits on the empty rig, within its pin: "single", "split" or "offload"."""
        allowed = self.slots.allowed(req)
        least = self._least(req)
        if any(self._evaluate((i,), (least,)).ok for i in allowed):
            return "single"
        if len(allowed) > 1 and self._evaluate(allowed, (least,)).ok:
            return "split"
        return "offload"

    # -- filters: memory and admission (planner_fit), then the look-ahead -----------------------

    def _try(
        self, req: ModelRequest, slot: Slot, setting: Setting, drafts: Sequence[Draft]
    ) -> tuple[list[Draft] | None, Evaluation]:
        base = drafts[slot.existing].copies if slot.existing is not None else ()
        offload = slot.kind is BackendKind.CPU
        par, num_ctx = setting
        copies = tuple(sorted((*base, Copy(req, num_ctx, offload, par)), key=lambda c: c.request.priority))
        ev = self._evaluate(slot.gpus, copies)
        if ev.ok and offload and slot.gpus and not fitted_copy(ev, req).placement.gpu_layers:
            ev = Evaluation(ev.fitted, ev.num_parallel, "not one layer fits on these cards")
        if not ev.ok:
            return None, ev
        new = list(drafts)
        draft = Draft(slot.gpus, slot.kind, copies, self.slots.group_id(slot.gpus))
        if slot.existing is None:
            new.append(draft)
        else:
            new[slot.existing] = draft
        return new, ev

    def _greedy(self, drafts: list[Draft], later: Sequence[ModelRequest]) -> Iterator[tuple[str, bool]]:
        """Place the later models one by one at their first fitting slot: (name, found a place).

        A model that needs CPU offload anyway still needs a free card for its GPU layers. Slot kinds
        a model cannot use are skipped: one that fits no single card on the empty rig never will.
        """
        for req in later:
            klass = self.klass[req.name]
            slots: Iterator[Slot]
            if klass == "single":
                slots = self.slots.first_copy(req, drafts, offload=False)
            elif klass == "split":
                slots = self.slots.split(req, drafts)
            else:
                slots = self.slots.offload(drafts, cpu_alone=False)
            placed = False
            for slot in slots:
                if slot.blocked:
                    continue
                choices = self._choices(req, slot.gpus, None)
                if slot.existing is not None:
                    choices = self._joining(req, drafts[slot.existing], choices)
                for setting in choices:
                    new, _ = self._try(req, slot, setting, drafts)
                    if new is not None:
                        drafts, placed = new, True
                        break
                if placed:
                    break
            yield req.name, placed

    def _left_out(self, later: tuple[ModelRequest, ...]) -> frozenset[str]:
        """The later models that find no room in the current state (memoized per state)."""
        key = (
            tuple((d.gpus, tuple((c.request.name, c.num_ctx, c.num_parallel) for c in d.copies)) for d in self.drafts),
            later,
        )
        cached = self._left_out_cache.get(key)
        if cached is None:
            cached = frozenset(name for name, placed in self._greedy(self.drafts, later) if not placed)
            self._left_out_cache[key] = cached
        return cached

    def _crowded_out(self, drafts: list[Draft], later: Sequence[ModelRequest]) -> str:
        """The first later model that `drafts` leaves without room but the current state does not.

        On an over-full rig some later models fit nowhere whatever happens; they are not counted
        against the candidate being judged.
        """
        before = self._left_out(tuple(later))
        return next((name for name, placed in self._greedy(drafts, later) if not placed and name not in before), "")

    # -- pick -------------------------------------------------------------------------------------

    def _place(
        self,
        req: ModelRequest,
        slots: Iterator[Slot] | Sequence[Slot],
        *,
        fixed: Setting | None,
        later: Sequence[ModelRequest],
        purpose: str = "",
        first_copy: bool = False,
    ) -> bool:
        """Commit the first slot that passes the filters and the look-ahead; False when none does.

        For a first copy, priority beats the look-ahead when the alternative is the CPU: before any
        offload slot (and at the end) it takes the best GPU slot that fits even if a later model
        then finds no room. Further copies are never placed at another model's expense.
        """
        fallback: tuple[Slot, Setting, list[Draft], Evaluation, str, str] | None = None
        for slot in slots:
            if slot.kind is BackendKind.CPU and fallback is not None and first_copy:
                break
            if slot.blocked:
                self.found.rejections[(req.name, slot.label)] = slot.blocked
                continue
            step_failure = ""  # why the first (most slots, largest context) choice was not taken
            choices = self._choices(req, slot.gpus, fixed)
            if slot.existing is not None and not fixed:
                choices = self._joining(req, self.drafts[slot.existing], choices)
            if slot.kind is BackendKind.CPU:
                choices = choices[-1:]  # offloading: the least context and slots keep the most layers on GPU
            for setting in choices:
                new, ev = self._try(req, slot, setting, self.drafts)
                if new is None:
                    step_failure = step_failure or f"does not fit ({ev.failure})"
                    if slot.record:
                        self.found.rejections[(req.name, slot.label)] = ev.failure
                    continue
                crowded = self._crowded_out(new, later)
                if crowded:
                    step_failure = step_failure or f"would leave no room for {crowded}"
                    self.found.rejections[(req.name, slot.label)] = f"would leave no room for {crowded}"
                    if slot.kind is not BackendKind.CPU:
                        fallback = fallback or (slot, setting, new, ev, step_failure, crowded)
                    continue
                self._commit(req, slot, setting, new, ev, purpose, step_failure, fixed)
                return True
        if first_copy and fallback is not None:
            slot, setting, new, ev, step_failure, crowded = fallback
            purpose = "; ".join(
                p for p in (purpose, f"takes this place by priority: {crowded} then finds no room on a GPU") if p
            )
            self._commit(req, slot, setting, new, ev, purpose, step_failure, fixed)
            return True
        return False

    def _commit(
        self,
        req: ModelRequest,
        slot: Slot,
        setting: Setting,
        drafts: list[Draft],
        ev: Evaluation,
        purpose: str,
        step_failure: str,
        fixed: Setting | None,
    ) -> None:
        self.drafts = drafts
        self.found.rejections.pop((req.name, slot.label), None)
        parts = [purpose] if purpose else []
        parts.append(copy_reason(req, slot, ev, self.klass[req.name], self.budgets))
        par, num_ctx = setting
        first = self._ctx_default(req, slot.gpus)
        top_par = parallel_choices(req, self.settings)[0]
        asked = req.entry.num_ctx or self.settings.context_length
        # A further copy (fixed) has the first copy's slots and context, explained there.
        if not fixed and par < top_par and slot.kind is BackendKind.CPU:
            parts.append(f"num_parallel {par}, not {top_par}: the fewest slots keep the most layers on GPU")
        elif not fixed and par < top_par:
            at = f"{top_par} slots x num_ctx {first}"
            parts.append(f"num_parallel {par}, stepped down from {top_par}: at {at} it {step_failure}")
        if not fixed and asked and asked > req.spec.context_length:
            parts.append(f"num_ctx {num_ctx}: the model's limit (asked {asked})")
        elif not fixed and slot.kind is BackendKind.CPU and num_ctx < first:
            parts.append(f"num_ctx {num_ctx}: the smallest of Ollama's tiers, to keep the most layers on GPU")
        elif not fixed and num_ctx < first and par == top_par:
            parts.append(f"num_ctx {num_ctx}: Ollama's default here, {first}, {step_failure}")
        elif not fixed and num_ctx < first:
            parts.append(f"num_ctx {num_ctx}: the automatic context stepped down from {first} by Ollama's tiers")
        self.found.reasons[(slot.gpus, req.name)] = "; ".join(parts)
        if slot.kind is BackendKind.CPU:
            need = self._min_need_bytes(req, len(self.budgets)) if self.klass[req.name] == "offload" else 0
            self.found.warnings.append(offload_warning(req, slot, ev, need, self.budgets, self.settings))

    def _unplaced_error(self, req: ModelRequest) -> str:
        at = f"at num_ctx {self._min_ctx(req)} x {self._least(req).num_parallel}"
        if req.name in self.pins:
            cards = ", ".join(self.budgets[k].tag for k in self.pins[req.name])
            why = next((r for (name, _), r in self.found.rejections.items() if name == req.name), "")
            return f"{req.name}: pinned to {cards}, but it cannot go there: {why or 'no room'}"
        if self.klass[req.name] == "offload":
            need = self._min_need_bytes(req, len(self.budgets))
            have = sum(b.usable_bytes for b in self.budgets.values())
            return (
                f"{req.name}: too large for this rig: needs {gib(need)} {at} over all {len(self.budgets)} cards, "
                f"which have {gib(have)} (short by {gib(need - have)}); "
                "set launcher.allow_cpu_offload = true to run part of it on the CPU"
            )
        left = self._room_left()
        best = max(left, key=lambda i: (left[i], -i), default=None)
        room = f"the most room left is {gib(left[best])} on {self.budgets[best].label}" if best is not None else ""
        return (
            f"{req.name}: no room left: needs {gib(self._min_need_bytes(req))} {at} on one card; {room}; "
            "lower num_ctx or num_parallel, drop a model, or allow CPU offload"
        )

    def _room_left(self) -> dict[int, int]:
        left = {i: b.usable_bytes for i, b in self.budgets.items()}
        for d in self.drafts:
            for f in self._evaluate(d.gpus, d.copies).fitted:
                for i, used in zip(d.gpus, f.card_bytes, strict=True):
                    left[i] -= used
        return left

    # -- the pipeline -----------------------------------------------------------------------------

    def run(self) -> Plan:
        pinned = sorted((r for r in self.requests if r.name in self.pins), key=lambda r: r.priority)
        rest = sorted((r for r in self.requests if r.name not in self.pins), key=lambda r: r.priority)
        queue = pinned + rest
        for pos, req in enumerate(queue):
            # The look-ahead places the hardest models first (pinned, then largest), like first-fit
            # decreasing. Models that fit nowhere without the CPU hold others back only when offload
            # is allowed (they need a card for their GPU layers); otherwise they are errors anyway.
            later = sorted(
                (
                    r
                    for r in queue[pos + 1 :]
                    if self.klass[r.name] != "offload" or (self.settings.allow_cpu_offload and r.name not in self.pins)
                ),
                key=lambda r: (r.name not in self.pins, -self._min_need_bytes(r), r.priority),
            )
            pinned_to = self.pins.get(req.name)
            purpose = f"pinned to {', '.join(self.budgets[k].tag for k in pinned_to)}" if pinned_to else ""
            slots = self.slots.first_copy(req, self.drafts, offload=True)
            if not self._place(req, slots, fixed=None, later=later, purpose=purpose, first_copy=True):
                self.found.errors.append(self._unplaced_error(req))
                continue
            self._replicate(req, later)
        return build_plan(self.drafts, self.budgets, self.requests, self.settings, self.found, self.era)

    def _replicate(self, req: ModelRequest, later: Sequence[ModelRequest]) -> None:
        """Further copies at the first copy's context, each leaving room for the models after it."""
        first = next(c for d in self.drafts for c in d.copies if c.request.name == req.name)
        fixed = (first.num_parallel, first.num_ctx)
        wanted = req.entry.replicas
        if wanted == "auto":
            purpose = 'extra replica (replicas = "auto")'
            if any(d.holds(req.name) and d.kind is BackendKind.SINGLE for d in self.drafts):
                # One pass: a copy committed on one card leaves the other cards' slots as they were
                # (drafts keep their positions), and a slot that failed cannot pass later.
                for slot in list(self.slots.replica(req, self.drafts)):
                    self._place(req, [slot], fixed=fixed, later=later, purpose=purpose)
                return
            while self._place(
                req, self.slots.replica(req, self.drafts), fixed=fixed, later=later, purpose=purpose
            ):
                pass
            return
        for n in range(2, int(wanted) + 1):
            slots = self.slots.replica(req, self.drafts)
            if not self._place(req, slots, fixed=fixed, later=later, purpose=f"replica {n} of {wanted}"):
                self.found.warnings.append(
                    f"{req.name}: replicas = {wanted}, but only {n - 1} placed: "
                    "no other card has room for it (see the rejections)"
                )
                return
