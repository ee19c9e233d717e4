"""The planner's candidates and scorers: where a copy of a model could go, best first.

A *slot* is a candidate place for one copy of a model: a card of its own, a card shared with the
models of an existing backend, a group of cards for a split, or partial CPU offload. `SlotRanker`
yields them in preference order; the planner takes the first one its filters accept.

Preference (the scorers, in the order they weigh):
- hot models: the fastest card (memory bandwidth, then FP16), even when it must be shared;
- other models: a card of their own before a shared one, then the fastest;
- never change a backend's num_parallel if another card will do (OLLAMA_NUM_PARALLEL is per process);
- splits: the fewest cards, then the group a token crosses fastest (bandwidth weighted by the share
  of layers each card gets, which llama.cpp makes proportional to free memory);
- offload: as many free cards as possible (most layers on GPU), then the CPU alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.record import BackendKind
from launcher.config import LauncherSettings
from launcher.planner.fit import CardBudget, Copy, requested_parallel

if TYPE_CHECKING:  # planner.py imports this module; the request type is only needed for annotations
    from launcher.planner.plan import ModelRequest

_MAX_GROUPS = 500  # distinct card groups tried per size, a bound for hosts with many unlike cards


@dataclass(frozen=True)
class Draft:
    """A backend under construction: its cards (strongest first; none = CPU) and models (priority order)."""

    gpus: tuple[int, ...]  # card keys (positions in the GPU list), strongest first
    kind: BackendKind
    copies: tuple[Copy, ...]
    id: str  # "g0", "g2+g3", "cpu"

    def holds(self, name: str) -> bool:
        return any(c.request.name == name for c in self.copies)


@dataclass(frozen=True)
class Slot:
    """A candidate place for one copy: a new backend on `gpus`, or the existing draft at `existing`."""

    gpus: tuple[int, ...]  # card keys, strongest first
    kind: BackendKind
    existing: int | None
    label: str
    blocked: str = ""  # why the slot is out before any memory check
    record: bool = True  # worth a Rejection line if it fails (one per group size, not every combination)


def card_owner(drafts: Sequence[Draft]) -> dict[int, int]:
    """Card key -> position of the draft that has the card."""
    return {i: pos for pos, d in enumerate(drafts) for i in d.gpus}


class SlotRanker:
    """Yields the slots for a model in preference order, given the backends drafted so far."""

    def __init__(
        self, budgets: Mapping[int, CardBudget], pins: Mapping[str, tuple[int, ...]], settings: LauncherSettings
    ) -> None:
        self.budgets = budgets
        self.pins = pins
        self.settings = settings
        self.order = tuple(sorted(budgets, key=self.strength))  # GPU indices, strongest first

    def strength(self, key: int) -> tuple[float, float, int, int]:
        b = self.budgets[key]
        return (-b.card.mem_bw_gbps, -b.card.fp16_tflops, -b.usable_bytes, key)

    def group_id(self, gpus: Sequence[int]) -> str:
        """A backend's id from its cards in index order: "g0", "g2+g3"; "cpu" without cards."""
        return "+".join(self.budgets[k].tag for k in sorted(gpus)) if gpus else "cpu"

    def group_label(self, gpus: Sequence[int]) -> str:
        return self.group_id(gpus) if gpus else "CPU"

    def allowed(self, req: ModelRequest) -> tuple[int, ...]:
        return self.pins.get(req.name, self.order)

    def group_rank(self, gpus: Sequence[int]) -> tuple[float, int]:
        """(-bandwidth a token sees crossing the group, -usable bytes): smaller is better."""
        usable = [self.budgets[i].usable_bytes for i in gpus]
        total = sum(usable)
        if not total:
            return (0.0, 0)
        seconds = sum(u / total / self.budgets[i].card.mem_bw_gbps for i, u in zip(gpus, usable, strict=True))
        return (-1.0 / seconds, -total)

    def groups(self, free: Sequence[int], size: int) -> list[tuple[int, ...]]:
        """Distinct groups of `size` cards out of `free` (strength order), each strongest first.

        Cards of one model with about the same usable memory (to the GiB) are interchangeable, so
        there is one group per count of each kind, taking the cards with the most room first, not
        one per combination: 8 of 16 identical cards is one group, not 12870.
        """
        kinds: dict[tuple[str, float, float, int], list[int]] = {}
        for key in free:
            b = self.budgets[key]
            kinds.setdefault((b.card.name, b.card.mem_bw_gbps, b.card.fp16_tflops, b.usable_bytes >> 30), []).append(
                key
            )
        pools = list(kinds.values())
        found: list[tuple[int, ...]] = []

        def pick(i: int, left: int, chosen: tuple[int, ...]) -> None:
            if len(found) >= _MAX_GROUPS:
                return
            if left == 0:
                found.append(tuple(sorted(chosen, key=self.strength)))
                return
            if i < len(pools) and left <= sum(len(p) for p in pools[i:]):
                for n in range(min(left, len(pools[i])), -1, -1):
                    pick(i + 1, left - n, chosen + tuple(pools[i][:n]))

        pick(0, size, ())
        return found

    def _changes_parallel(self, req: ModelRequest, draft: Draft) -> bool:
        if req.spec.embedding_only:
            return False
        asks = {requested_parallel(c.request, self.settings) for c in draft.copies if not c.request.spec.embedding_only}
        return bool(asks) and asks != {requested_parallel(req, self.settings)}

    def single(self, req: ModelRequest, drafts: Sequence[Draft]) -> list[Slot]:
        owner = card_owner(drafts)
        ranked: list[tuple[tuple[float, ...], Slot]] = []
        for i in self.allowed(req):
            b = self.budgets[i]
            pos = owner.get(i)
            speed = (-b.card.mem_bw_gbps, -b.card.fp16_tflops)
            if pos is None:
                slot = Slot((i,), BackendKind.SINGLE, None, b.label)
                shares, changes, crowd = False, False, 0
            else:
                d = drafts[pos]
                if d.holds(req.name):
                    continue
                if d.kind is not BackendKind.SINGLE:
                    names = ", ".join(c.request.name for c in d.copies)
                    blocked = f"belongs to backend {d.id} ({names}); a card serves one backend"
                    ranked.append(((True,), Slot((i,), d.kind, pos, b.label, blocked=blocked)))
                    continue
                slot = Slot((i,), BackendKind.SINGLE, pos, b.label)
                shares, changes, crowd = True, self._changes_parallel(req, d), len(d.copies)
            if req.entry.hot:
                key: tuple[float, ...] = (False, changes, *speed, shares, crowd, i)
            else:
                key = (False, changes, shares, crowd, *speed, i)
            ranked.append((key, slot))
        return [slot for _, slot in sorted(ranked, key=lambda ks: ks[0])]

    def split(self, req: ModelRequest, drafts: Sequence[Draft], *, new_only: bool = False) -> Iterator[Slot]:
        owner = card_owner(drafts)
        allowed = self.allowed(req)
        free = [i for i in allowed if i not in owner]
        existing = [
            pos
            for pos, d in enumerate(drafts)
            if not new_only and d.kind is BackendKind.SPLIT and not d.holds(req.name) and set(d.gpus) <= set(allowed)
        ]
        largest = max([len(free), *(len(drafts[p].gpus) for p in existing)])
        for k in range(2, largest + 1):
            for n, group in enumerate(sorted(self.groups(free, k), key=self.group_rank)):
                yield Slot(group, BackendKind.SPLIT, None, self.group_label(group), record=n == 0)
            for pos in sorted(existing, key=lambda p: self.group_rank(drafts[p].gpus)):
                if len(drafts[pos].gpus) == k:
                    yield Slot(drafts[pos].gpus, BackendKind.SPLIT, pos, self.group_label(drafts[pos].gpus))

    def offload(self, drafts: Sequence[Draft], *, cpu_alone: bool = True) -> Iterator[Slot]:
        owner = card_owner(drafts)
        free = [i for i in self.order if i not in owner]
        for k in range(len(free), 0, -1):
            for group in sorted(self.groups(free, k), key=lambda g: self.group_rank(g)[::-1]):
                yield Slot(group, BackendKind.CPU, None, self.group_label(group), record=False)
        if cpu_alone:
            cpu = next((pos for pos, d in enumerate(drafts) if not d.gpus), None)
            yield Slot((), BackendKind.CPU, cpu, "CPU")

    def first_copy(self, req: ModelRequest, drafts: Sequence[Draft], *, offload: bool) -> Iterator[Slot]:
        """Every kind of slot, best first: single cards, splits, then (when allowed) CPU offload."""
        yield from self.single(req, drafts)
        yield from self.split(req, drafts)
        if offload and self.settings.allow_cpu_offload and req.name not in self.pins:
            yield from self.offload(drafts)

    def replica(self, req: ModelRequest, drafts: Sequence[Draft]) -> Iterator[Slot]:
        """Further copies go where the first one went: single cards, or new split groups. Offloaded
        models get one copy (a second would take cards from the GPU-resident models)."""
        kinds = {d.kind for d in drafts if d.holds(req.name)}
        if BackendKind.SINGLE in kinds:
            yield from self.single(req, drafts)
        elif BackendKind.SPLIT in kinds:
            yield from self.split(req, drafts, new_only=True)
