"""The routing benchmark's reference: a clairvoyant list scheduler over the same arrivals, offline.

It knows every request's output length and sees every slot of every card, and gives each request,
in arrival order, the slot with the earliest expected first token (ties to the faster card): a
resident copy's slot when it frees, or a cold load (runner start + weights at the load bandwidth)
where the model fits beside what the card holds, evicting the least recently used models
otherwise. Durations come from the same performance model the simulator runs (launcher.facts.perf),
batched decode included. A reference to compare against, not a proof of optimality: a list
scheduler never delays a request to serve a later one first, and it ignores prefill contention.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from launcher.facts import perf
from launcher.facts.cards import CardSpec, find_card
from launcher.facts.catalog import ModelSpec, find_model

GIB = 1024**3


@dataclass(frozen=True)
class Job:
    at_s: float
    model: str
    prompt_tokens: int
    output_tokens: int
    interactive: bool = True


@dataclass
class _Card:
    spec: CardSpec
    slots: list[float]  # when each slot frees
    vram_bytes: int
    resident: dict[str, float] = field(default_factory=dict)  # model -> last use
    load_free_s: float = 0.0  # Ollama loads one model at a time


@dataclass
class Schedule:
    ttft_s: list[float]  # per job, in the given order
    done_s: list[float]
    cold_loads: int

    def p(self, q: float, interactive_of: Sequence[bool] | None = None) -> float:
        values = sorted(t for i, t in enumerate(self.ttft_s) if interactive_of is None or interactive_of[i])
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    def mean(self) -> float:
        return statistics.fmean(self.ttft_s) if self.ttft_s else float("nan")


def _need_bytes(spec: ModelSpec, num_ctx: int, slots: int) -> int:
    return perf.vram_needed_bytes(spec, perf.LoadOptions(num_ctx=num_ctx, num_parallel=slots))


def clairvoyant(
    jobs: Sequence[Job],
    cards: Sequence[str],
    *,
    slots: int,
    num_ctx: int,
    resident: Sequence[Sequence[str]] = (),
    load_gbps: float = perf.DEFAULT_LOAD_GBPS,
) -> Schedule:
    """Schedule `jobs` (sorted by arrival) on `cards` with `slots` slots each; `resident[i]` are the
    models card i holds at the start."""
    fleet = []
    for i, name in enumerate(cards):
        spec = find_card(name)
        assert spec is not None, name
        card = _Card(spec, [0.0] * slots, int(spec.vram_bytes * perf.SINGLE_CARD_FIT_FRACTION))
        for name_held in resident[i] if i < len(resident) else ():
            card.resident[name_held] = 0.0
        fleet.append(card)
    order = sorted(range(len(jobs)), key=lambda i: jobs[i].at_s)
    ttft = [0.0] * len(jobs)
    done = [0.0] * len(jobs)
    cold = 0
    for i in order:
        job = jobs[i]
        model = find_model(job.model)
        assert model is not None, job.model
        need = _need_bytes(model, num_ctx, slots)
        best: tuple[float, float, int, int, bool, float] | None = None  # ttft, -speed, card, slot, cold, rate
        for c, card in enumerate(fleet):
            placement = perf.split_layers(model, perf.LoadOptions(num_ctx=num_ctx), [(card.spec, card.vram_bytes)])
            if placement is None:
                continue
            slot = min(range(slots), key=lambda s: card.slots[s])
            start = max(job.at_s, card.slots[slot])
            is_cold = job.model not in card.resident
            if is_cold:
                start = max(start, card.load_free_s) + perf.load_time_s(placement, load_gbps)
            first = start + perf.prefill_s(model, placement, job.prompt_tokens)
            busy = sum(1 for t in card.slots if t > first)
            rate = perf.tokens_per_second(model, placement, batch=busy + 1)
            candidate = (first, -card.spec.mem_bw_gbps, c, slot, is_cold, rate)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        assert best is not None, f"{job.model} fits no card"
        first, _, c, slot, is_cold, rate = best
        card = fleet[c]
        if is_cold:
            cold += 1
            card.load_free_s = first
            used = sum(_need_bytes(find_model(m) or model, num_ctx, slots) for m in card.resident)
            for victim in sorted(card.resident, key=lambda m: card.resident[m]):
                if used + need <= card.vram_bytes:
                    break
                used -= _need_bytes(find_model(victim) or model, num_ctx, slots)
                del card.resident[victim]
        card.resident[job.model] = first
        finish = first + job.output_tokens / rate
        card.slots[slot] = finish
        ttft[i] = first - job.at_s
        done[i] = finish
    return Schedule(ttft, done, cold)
