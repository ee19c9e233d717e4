"""The residency policy: late binding to exact slots, spill by expected time to first token.

A request is sent only to a copy of its model with a slot free for it: the copy's slots (the
backend's num_parallel, 1 where Ollama forces one) minus the requests in flight there. Requests that
wait at the gateway ahead of it (`RouteRequest.ahead`) take free slots first. When no slot is free,
the request's expected wait is when the k-th busy slot frees over every copy (the wait model in
`routing.wait`); a cold load elsewhere is taken instead when its expected time to first token (load
+ prefill, plus the cost of what it evicts) beats that wait. Otherwise it waits at the gateway and is
decided again when a slot frees, a load ends or the fleet changes: it can then go to whichever copy
frees first, or to a new one.

Protections: the only resident copy of a model the plan put on a backend is not evicted for another
model unless nothing else can ever serve the request (the Send then names it in `evicts_planned`);
a batch request never evicts a model interactive traffic used within `interactive_recent_s`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from gateway.record import BackendKind
from gateway.routing.cost import (
    CostSettings,
    Estimate,
    Route,
    can_ever_fit,
    decode_s,
    estimate,
    load_s,
    min_need_bytes,
    model_size_bytes,
    num_slots,
    options_match,
    prefill_s,
    service_s,
)
from gateway.routing.decision import Decision, Reason, Reject, RouteRequest, Send, Wait
from gateway.routing.snapshot import BackendView, ModelFacts, Snapshot
from gateway.routing.wait import kth_free_s, slot_free_times, solo_decode_rate, typical_answer_tokens

ContextPolicy = Literal["fit", "honor", "reject"]


@dataclass(slots=True)
class _Copy:
    """A loaded (or loading) copy of the requested model that can serve it as it is. The timing
    fields are filled by `ResidencyPolicy._time` only for copies the decision weighs."""

    view: BackendView
    slots: int
    free: int
    route: Reason
    num_ctx: int | None  # the loaded context, when it serves a larger num_ctx ("fit")
    ttft_s: float = 0.0  # with a slot: what is left of a load in progress + prefill
    score_s: float = 0.0  # ttft + the slowdown of joining the sequences decoding there
    free_times: tuple[float, ...] = ()  # when each busy slot frees, soonest first
    service_s: float = 0.0  # one request's slot time here


@dataclass
class ResidencyPolicy:
    """Least expected time to first token over exact slots, with the cost of evicting hot models
    added (the default).

    `max_wait_s`: an expected wait for a slot longer than this takes a possible cold load even when
    the estimate says it is not sooner (a bound on the estimate's error); None disables that.
    `spill`: False keeps every model to the backends the plan put it on (models planned nowhere may
    load anywhere). `context_policy`: what a request above the loaded context gets (see README).
    """

    max_wait_s: float | None = 30.0
    costs: CostSettings = field(default_factory=CostSettings)
    spill: bool = True
    context_policy: ContextPolicy = "fit"
    interactive_recent_s: float = 60.0
    name: str = "residency"

    def pick(self, request: RouteRequest, eligible: Sequence[BackendView], snapshot: Snapshot) -> Decision:
        r = request
        facts = snapshot.models.get(r.model)
        size = model_size_bytes(r.model, snapshot)
        copies: list[_Copy] = []
        others: list[BackendView] = []
        too_large_ctx = 0
        for view in eligible:
            copy = self._copy(view, r, facts)
            if copy is not None:
                copies.append(copy)
                continue
            others.append(view)
            resident = view.resident_model(r.model)
            if resident is not None and r.options.num_ctx is not None and r.options.num_ctx > resident.context_length:
                too_large_ctx = max(too_large_ctx, resident.context_length)

        if self.context_policy == "reject" and too_large_ctx and not copies:
            return Reject(
                400,
                f"num_ctx {r.options.num_ctx} is above the context model '{r.display_name}' is loaded with "
                f"({too_large_ctx}); ask for num_ctx <= {too_large_ctx}",
                "context_too_large",
            )

        free_total = sum(c.free for c in copies)
        if free_total > r.ahead:
            # A free slot of a loaded copy beats any cold load: those are not even costed.
            free = [self._time(c, r, facts, size, with_wait=False) for c in copies if c.free]
            best = min(free, key=_copy_rank)
            reason = "split_required" if _needs_split(r, snapshot, eligible) else best.route
            return Send(
                best.view.id, reason, best.ttft_s, (_as_estimate(best),), num_ctx=best.num_ctx, slots=best.slots
            )

        # Every waiter ahead takes a free slot first; this one needs the k-th slot that frees.
        wait_s = math.inf
        copy_prefill_s = 0.0
        if copies:
            for c in copies:
                self._time(c, r, facts, size, with_wait=True)
            merged = sorted(t for c in copies for t in c.free_times)
            total_slots = sum(c.slots for c in copies)
            mean_service_s = sum(c.service_s * c.slots for c in copies) / total_slots
            wait_s = kth_free_s(merged, r.ahead - free_total + 1, total_slots, mean_service_s)
            copy_prefill_s = min(c.ttft_s for c in copies)
        wait_ttft_s = wait_s + copy_prefill_s

        estimates, protected, blocked = self._cold(r, others, snapshot, size, bool(copies))
        if estimates:
            best_cold = estimates[0]
            sooner = best_cold.score_s < wait_ttft_s
            overdue = self.max_wait_s is not None and wait_s > self.max_wait_s
            if sooner or overdue:
                cold_reason: Reason = "spill" if copies else best_cold.route
                if _needs_split(r, snapshot, eligible):
                    cold_reason = "split_required"
                slots = _slots_at(snapshot, best_cold.backend_id, facts)
                return Send(best_cold.backend_id, cold_reason, best_cold.ttft_s, tuple(estimates), slots=slots)
        if not copies and not estimates and not blocked and protected:
            # Nothing else can ever serve it: evict the planned model, and say so.
            best_p, names = protected[0]
            return Send(
                best_p.backend_id,
                best_p.route,
                best_p.ttft_s,
                (best_p,),
                note=f"evicts planned {', '.join(names)}: no other backend can serve this request",
                evicts_planned=names,
                slots=_slots_at(snapshot, best_p.backend_id, facts),
            )
        if not copies and not estimates and not blocked and not protected:
            # Only loaded copies that cannot take it at this context, and nowhere to load it as asked.
            return Reject(
                500,
                f"model '{r.display_name}' does not fit any backend at num_ctx {r.options.num_ctx}; "
                "ask for a smaller num_ctx",
                "too_large",
            )
        soonest = wait_ttft_s if copies else min((e.ttft_s for e in blocked), default=math.inf)
        return Wait(
            "all_busy",
            tuple(estimates or blocked),
            note=f"{free_total} free slot(s) for {r.ahead} ahead" if copies else "every candidate is busy",
            expected_wait_s=None if math.isinf(soonest) else soonest,
        )

    # -- copies that can serve it as it is --------------------------------------------------------

    def _copy(self, view: BackendView, r: RouteRequest, facts: ModelFacts | None) -> _Copy | None:
        resident = view.resident_model(r.model)
        # Requests in flight for a model not resident there: a load the gateway started (its
        # requests hold the slots of the copy being loaded, whatever the poll says yet).
        loading = view.loading == r.model or (resident is None and view.in_flight.get(r.model, 0) > 0)
        num_ctx: int | None = None
        route: Reason
        if loading:
            route = "loading"
        elif resident is None:
            return None
        elif options_match(resident, r.options, facts, view.default_num_ctx):
            route = "resident_free_slot"
        elif self._fits_loaded(view, r, resident.context_length, facts):
            route, num_ctx = "context_fit", resident.context_length
        else:
            return None
        slots = num_slots(view, facts)
        return _Copy(view, slots, max(slots - view.in_flight.get(r.model, 0), 0), route, num_ctx)

    def _time(self, c: _Copy, r: RouteRequest, facts: ModelFacts | None, size: int | None, *, with_wait: bool) -> _Copy:
        """Fill in the copy's expected time to first token with a slot, and (`with_wait`) when each
        of its busy slots frees."""
        costs, view = self.costs, c.view
        in_flight = view.in_flight.get(r.model, 0)
        extra_s = 0.5 * load_s(view, r.model, size, costs) if c.route == "loading" else 0.0
        c.ttft_s = extra_s + prefill_s(view, r.model, size, r.prompt_tokens, costs)
        sharing = min(in_flight, c.slots) * costs.batch_slowdown_per_sequence * decode_s(view, r.model, size, costs)
        c.score_s = c.ttft_s + sharing
        if with_wait:
            solo = solo_decode_rate(view, r.model, size, fallback_per_speed_bytes=costs.decode_bw_efficiency * 1e12)
            c.service_s = service_s(view, r.model, size, r.prompt_tokens, costs)
            c.free_times = slot_free_times(
                view,
                r.model,
                c.slots,
                solo_tokens_per_s=solo,
                typical_tokens=typical_answer_tokens(view, r.model, costs.output_tokens),
                slowdown_per_sequence=costs.batch_slowdown_per_sequence,
                fallback_service_s=c.service_s,
                extra_s=extra_s,
            )
        return c

    def _fits_loaded(self, view: BackendView, r: RouteRequest, loaded_ctx: int, facts: ModelFacts | None) -> bool:
        """context_policy "fit": a larger num_ctx whose prompt plus expected answer fits the loaded
        context is served there at the loaded context (other load options must match)."""
        asked = r.options.num_ctx
        if self.context_policy != "fit" or asked is None or loaded_ctx <= 0 or asked <= loaded_ctx:
            return False
        resident = view.resident_model(r.model)
        if resident is None or not options_match(resident, replace(r.options, num_ctx=loaded_ctx), facts):
            return False
        answer = r.num_predict if r.num_predict is not None and r.num_predict > 0 else None
        expected = answer if answer is not None else typical_answer_tokens(view, r.model, self.costs.output_tokens)
        return r.prompt_tokens + expected <= loaded_ctx

    # -- cold loads ---------------------------------------------------------------------------------

    def _cold(
        self, r: RouteRequest, others: Sequence[BackendView], snapshot: Snapshot, size: int | None, has_copy: bool
    ) -> tuple[list[Estimate], list[tuple[Estimate, tuple[str, ...]]], list[Estimate]]:
        """Cold-load candidates, best first: (allowed now, allowed only as a last resort because they
        evict a planned model's only copy, blocked behind busy models)."""
        allowed: list[Estimate] = []
        protected: list[tuple[Estimate, tuple[str, ...]]] = []
        blocked: list[Estimate] = []
        planned_somewhere = any(r.model in v.record.planned_models for v in snapshot.candidates(r.model))
        for view in others:
            if has_copy and not self.spill and planned_somewhere and r.model not in view.record.planned_models:
                continue
            if not can_ever_fit(view, min_need_bytes(view, r.options, snapshot.models.get(r.model), size)):
                continue  # here only for its loaded copy ("fit"), which cannot serve this one
            e = estimate(view, r.model, r.options, r.prompt_tokens, snapshot, self.costs, size)
            if not e.ready_now:
                blocked.append(e)
                continue
            if r.priority == "batch" and self._evicts_interactive(view, e, snapshot.now):
                blocked.append(e)  # may go once that model has been idle a while
                continue
            planned = _evicted_planned(view, e, r.model, snapshot)
            if planned:
                protected.append((e, planned))
            else:
                allowed.append(e)
        allowed.sort(key=_rank)
        protected.sort(key=lambda item: _rank(item[0]))
        blocked.sort(key=_rank)
        return allowed, protected, blocked

    def _evicts_interactive(self, view: BackendView, e: Estimate, now: float) -> bool:
        for name in e.evicted:
            last = view.last_interactive.get(name)
            if last is not None and now - last < self.interactive_recent_s:
                return True
        return False


def _evicted_planned(view: BackendView, e: Estimate, model: str, snapshot: Snapshot) -> tuple[str, ...]:
    """Planned models whose only resident copy this cold load would evict (the model itself, being
    reloaded with other options, does not count: it serves the request)."""
    copies = snapshot.idx.resident_copies
    return tuple(
        name for name in e.evicted if name != model and name in view.record.planned_models and copies.get(name, 0) <= 1
    )


def _slots_at(snapshot: Snapshot, backend_id: str, facts: ModelFacts | None) -> int:
    view = snapshot.backend(backend_id)
    return num_slots(view, facts) if view is not None else 0


def _copy_rank(c: _Copy) -> tuple[float, float, str]:
    return (round(c.score_s, 3), -c.view.record.speed, c.view.id)


def _rank(e: Estimate) -> tuple[float, float, str]:
    # Millisecond rounding makes near-equal estimates ties, which then go to the faster GPU.
    return (round(e.score_s, 3), -e.speed, e.backend_id)


def _as_estimate(c: _Copy) -> Estimate:
    route: Route = "loading" if c.route == "loading" else "resident_free_slot" if c.free else "resident_queued"
    return Estimate(c.view.id, route, c.ttft_s, c.score_s, c.view.record.speed, True, slots=c.slots, free_slots=c.free)


def _needs_split(request: RouteRequest, snapshot: Snapshot, eligible: Sequence[BackendView]) -> bool:
    """True when every eligible backend is a split or CPU one because single cards are too small."""
    if any(v.record.kind == BackendKind.SINGLE for v in eligible):
        return False
    singles = [v for v in snapshot.backends if v.record.kind == BackendKind.SINGLE and v.healthy]
    if not singles:
        return False
    facts = snapshot.models.get(request.model)
    size = model_size_bytes(request.model, snapshot)
    return all(not can_ever_fit(v, min_need_bytes(v, request.options, facts, size)) for v in singles)
