"""Routing: which backend serves a request, decided from a snapshot with no I/O.

`choose(request, snapshot, policy)` is pure (no I/O, no logging, no clock: time comes from
`snapshot.now`, randomness from the policy's injected `random.Random`). The live gateway and the
offline benchmark run the same code. Every decision carries a `reason` token from the fixed set
`REASONS` (a Prometheus label, so its cardinality is bounded) and an `explanation` for debug logs.

Order of the checks, common to every policy:
  1. no backend both healthy and ready            -> Wait(starting) if one is starting, else Reject 503
  2. no healthy backend has the model installed   -> Reject 404 "model 'NAME' not found" (Ollama's text)
                                                     or 503 when only backends that cannot take
                                                     requests now have it (unhealthy, draining,
                                                     failed), Wait when one of them is starting
  3. the model fits no backend, ever              -> Reject 500 too_large (503 / Wait likewise)
  4. every remaining backend is in `exclude`      -> Reject 503 exhausted (retries used up)
  5. the policy picks among the rest              -> Send, or Wait (residency only)
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, get_args

from gateway.config import Policy as PolicyName
from gateway.record import BackendState
from gateway.routing.cost import CostSettings, can_ever_fit, estimate, min_need_bytes, model_size_bytes
from gateway.routing.decision import (
    PRIORITIES,
    REASONS,
    Decision,
    Priority,
    Reason,
    Reject,
    RequestKind,
    RouteRequest,
    Send,
    Wait,
)
from gateway.routing.residency import ContextPolicy, ResidencyPolicy
from gateway.routing.snapshot import BackendView, Snapshot

__all__ = [
    "POLICY_NAMES",
    "PRIORITIES",
    "REASONS",
    "ContextPolicy",
    "Decision",
    "LeastBusyPolicy",
    "Policy",
    "Priority",
    "RandomPolicy",
    "Reason",
    "Reject",
    "RequestKind",
    "ResidencyPolicy",
    "RoundRobinPolicy",
    "RouteRequest",
    "Send",
    "Wait",
    "choose",
    "make_policy",
]

# ---------------------------------------------------------------------------------------------
# Policies


class Policy(Protocol):
    """Picks one of the eligible backends (never empty; healthy, ready, model installed, fits ever,
    not excluded; in a stable order by id). May keep state of its own (round-robin's cursor)."""

    name: str

    def pick(self, request: RouteRequest, eligible: Sequence[BackendView], snapshot: Snapshot) -> Decision: ...


@dataclass
class RoundRobinPolicy:
    """Next eligible backend after the last one chosen, in id order (deterministic; the cursor is the
    last id, so backends coming and going do not skew the cycle)."""

    last_id: str | None = None
    costs: CostSettings = field(default_factory=CostSettings)
    name: str = "round-robin"

    def pick(self, request: RouteRequest, eligible: Sequence[BackendView], snapshot: Snapshot) -> Decision:
        chosen = eligible[0]
        if self.last_id is not None:
            for view in eligible:
                if view.id > self.last_id:
                    chosen = view
                    break
        self.last_id = chosen.id
        return _send_baseline(chosen, "round_robin", request, snapshot, self.costs)


@dataclass
class LeastBusyPolicy:
    """Fewest requests in flight on the backend (all models: they share the GPU); ties to the faster GPU."""

    costs: CostSettings = field(default_factory=CostSettings)
    name: str = "least-busy"

    def pick(self, request: RouteRequest, eligible: Sequence[BackendView], snapshot: Snapshot) -> Decision:
        chosen = min(eligible, key=lambda v: (v.total_in_flight(), -v.record.speed, v.id))
        return _send_baseline(chosen, "least_busy", request, snapshot, self.costs)


@dataclass
class RandomPolicy:
    """Uniform over the eligible backends, from the injected generator (seed it for repeatable runs)."""

    rng: random.Random = field(default_factory=random.Random)
    costs: CostSettings = field(default_factory=CostSettings)
    name: str = "random"

    def pick(self, request: RouteRequest, eligible: Sequence[BackendView], snapshot: Snapshot) -> Decision:
        chosen = eligible[self.rng.randrange(len(eligible))]
        return _send_baseline(chosen, "random", request, snapshot, self.costs)


def _send_baseline(
    view: BackendView, reason: Reason, request: RouteRequest, snapshot: Snapshot, costs: CostSettings
) -> Send:
    # Baselines never wait: like a plain load balancer they leave queueing to the backend. The
    # estimate is still computed so TTFT expectations in metrics compare across policies.
    e = estimate(view, request.model, request.options, request.prompt_tokens, snapshot, costs)
    return Send(view.id, reason, e.ttft_s, (e,))


# The names `[gateway] policy` accepts, defined once with the config.
POLICY_NAMES: tuple[str, ...] = get_args(PolicyName)


def make_policy(
    name: str,
    rng: random.Random | None = None,
    *,
    max_wait_s: float | None = 30.0,
    costs: CostSettings | None = None,
    spill: bool = True,
    context_policy: ContextPolicy = "fit",
) -> Policy:
    """A fresh policy by its config name (`[gateway] policy`); ValueError for an unknown name.
    `rng` is used by "random" only; `max_wait_s`, `spill` and `context_policy` by "residency" only."""
    costs = costs or CostSettings()
    if name == "residency":
        return ResidencyPolicy(max_wait_s=max_wait_s, costs=costs, spill=spill, context_policy=context_policy)
    if name == "round-robin":
        return RoundRobinPolicy(costs=costs)
    if name == "least-busy":
        return LeastBusyPolicy(costs=costs)
    if name == "random":
        return RandomPolicy(rng=rng or random.Random(), costs=costs)
    raise ValueError(f"unknown routing policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")


# ---------------------------------------------------------------------------------------------
# The decision


# Entries of a snapshot index's memo before it starts over (each distinct num_ctx asked adds some).
MEMO_LIMIT = 4096
_MAY_SERVE = (BackendState.STARTING, BackendState.READY)


def _serves(view: BackendView) -> bool:
    return view.healthy and view.record.state == BackendState.READY


def _has_model(view: BackendView, model: str) -> bool:
    return model in view.installed or not view.inventory_known or view.resident_model(model) is not None


def _may_hold(view: BackendView, model: str) -> bool:
    return _has_model(view, model) or model in view.record.planned_models


def _held_while_down(view: BackendView, model: str) -> bool:
    """Whether a backend that cannot take requests now holds the model. One starting or ready may
    (its inventory may not have been read yet); one draining or failed (a crashed backend waiting
    out its restart backoff) only on evidence: installed, resident or planned there. A model there
    is not "not found": Ollama's 404 makes `ollama run` pull it again."""
    if view.record.state in _MAY_SERVE:
        return _may_hold(view, model)
    return model in view.installed or view.resident_model(model) is not None or model in view.record.planned_models


def choose(request: RouteRequest, snapshot: Snapshot, policy: Policy) -> Decision:
    """Decide where `request` goes. Pure: reads `snapshot`, mutates nothing but the policy's own
    state (round-robin's cursor, the random generator). Looks at the backends the snapshot's index
    lists for the model; the whole fleet only to explain a refusal."""
    model = request.model
    holders = [v for v in snapshot.candidates(model) if _serves(v) and _has_model(v, model)]
    if not holders:
        if not any(_serves(v) for v in snapshot.backends):
            if any(v.record.state == BackendState.STARTING for v in snapshot.backends):
                return Wait("starting", note="no backend is ready yet")
            return Reject(503, "no healthy backend available, please try again", "no_healthy_backend")
        # Installed only where no request can go now: temporary, not a 404.
        down = [v for v in snapshot.backends if not _serves(v) and _held_while_down(v, model)]
        if any(v.record.state == BackendState.STARTING for v in down):
            return Wait("starting", note=f"model '{request.display_name}' may be on backends still starting")
        if down:
            return Reject(
                503,
                f"no healthy backend has model '{request.display_name}', please try again",
                "no_healthy_backend",
            )
        return Reject(404, f"model '{request.display_name}' not found", "not_found")

    if request.kind == "show":
        candidates = [v for v in holders if v.id not in request.exclude]
        if not candidates:
            return _exhausted(request)
        chosen = min(candidates, key=lambda v: (v.total_in_flight(), -v.record.speed, v.id))
        return Send(chosen.id, "metadata", 0.0)

    facts = snapshot.models.get(model)
    size = model_size_bytes(model, snapshot)
    # Under context_policy "fit" a loaded copy may serve a request it could never load as asked.
    fit_loaded = getattr(policy, "context_policy", "honor") == "fit"
    memo = snapshot.idx.memo  # the shape's answers: kept while the fleet's shape holds

    def fits(v: BackendView) -> bool:
        key = ("fits", v.id, model, request.options)
        known = memo.get(key)
        if known is None:
            if len(memo) > MEMO_LIMIT:  # distinct options without end: start over
                memo.clear()
            known = memo[key] = can_ever_fit(v, min_need_bytes(v, request.options, facts, size))
        return bool(known)

    fitting = [v for v in holders if fits(v) or (fit_loaded and v.resident_model(model) is not None)]
    if not fitting:
        # A backend that could hold it but cannot take requests now makes this temporary.
        down = [
            v
            for v in snapshot.backends
            if not _serves(v)
            and _held_while_down(v, model)
            and can_ever_fit(v, min_need_bytes(v, request.options, facts, size))
        ]
        if any(v.record.state == BackendState.STARTING for v in down):
            return Wait("starting", note=f"model '{request.display_name}' fits only backends still starting")
        if down:
            return Reject(
                503,
                f"no healthy backend can hold model '{request.display_name}', please try again",
                "no_healthy_backend",
            )
        need = max(min_need_bytes(v, request.options, facts, size) or 0 for v in holders)
        largest = max(v.record.vram_total_bytes for v in holders)
        return Reject(
            500,
            f"model '{request.display_name}' needs {need / 1024**3:.1f} GiB of GPU memory, more than any "
            f"backend has (largest: {largest / 1024**3:.1f} GiB); add a split or CPU backend for it",
            "too_large",
        )

    eligible = [v for v in fitting if v.id not in request.exclude]
    if not eligible:
        return _exhausted(request)
    return policy.pick(request, eligible, snapshot)


def _exhausted(request: RouteRequest) -> Reject:
    return Reject(
        503,
        f"no other backend can serve model '{request.display_name}', please try again",
        "exhausted",
        note=f"already tried: {', '.join(sorted(request.exclude))}",
    )
