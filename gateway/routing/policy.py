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
from typing import Literal, Protocol, get_args

from gateway.config import Policy as PolicyName
from gateway.record import BackendKind, BackendState
from gateway.routing.cost import CostSettings, Estimate, can_ever_fit, estimate, min_need_bytes, model_size_bytes
from gateway.routing.snapshot import BackendView, LoadOptions, Snapshot

Reason = Literal[
    # Send (residency)
    "resident_free_slot",  # loaded there with matching options and a slot free: prefill only
    "resident_queued",  # loaded there, all slots busy: queued behind them at the backend
    "loading",  # being loaded there right now: joins that load
    "cold_load",  # not loaded there, fits in its free VRAM
    "cold_load_evict",  # not loaded there, fits once idle models are unloaded
    "split_required",  # larger than every single-card backend: a split or CPU backend
    # Send (baseline policies; any policy for metadata calls)
    "round_robin",
    "least_busy",
    "random",
    "metadata",  # /api/show and the like: any backend with the model installed, no load
    # Wait (park at the gateway and choose again when notified)
    "all_busy",  # every candidate would have to evict a busy model first
    "over_budget",  # the best candidate's queue wait exceeds the policy's max_wait_s
    "starting",  # no backend ready yet, but some are starting
    # Reject
    "not_found",
    "no_healthy_backend",
    "too_large",
    "exhausted",  # every backend that could serve it is in `exclude` (already tried)
]
REASONS: frozenset[str] = frozenset(get_args(Reason))

RequestKind = Literal["generate", "chat", "embed", "show"]


@dataclass(frozen=True)
class RouteRequest:
    """What the router needs to know about one request.

    `model` is the normalized name (`launcher.facts.catalog.normalize_name`); `requested_as` is the name as
    the client wrote it, used in error texts like Ollama does (defaults to `model`). `kind` "show"
    needs the model installed but never loads it. `exclude` holds backend ids already tried for this
    request: a retry goes elsewhere or is rejected with reason "exhausted". `stream` does not change
    the choice today; it travels with the request for logs and for policies that may weigh it.
    """

    model: str
    kind: RequestKind = "generate"
    options: LoadOptions = field(default_factory=LoadOptions)
    prompt_tokens: int = 0  # an estimate is enough, e.g. the prompt's (or messages') length in bytes / 4
    exclude: frozenset[str] = frozenset()
    stream: bool = True
    requested_as: str = ""

    @property
    def display_name(self) -> str:
        return self.requested_as or self.model


@dataclass(frozen=True)
class Send:
    """Forward the request to `backend_id`."""

    backend_id: str
    reason: Reason
    expected_ttft_s: float
    estimates: tuple[Estimate, ...] = ()  # the candidates weighed (residency), best first
    note: str = ""

    @property
    def explanation(self) -> str:
        return _explain(f"send {self.backend_id} ({self.reason})", self.note, self.estimates)


@dataclass(frozen=True)
class Wait:
    """Park the request in the gateway's queue for its model and choose again when notified."""

    reason: Reason
    estimates: tuple[Estimate, ...] = ()
    note: str = ""
    # The soonest the best candidate could serve it, when known: a hint for Retry-After.
    expected_wait_s: float | None = None

    @property
    def explanation(self) -> str:
        return _explain(f"wait ({self.reason})", self.note, self.estimates)


@dataclass(frozen=True)
class Reject:
    """Answer the client with `status` and the Ollama-shaped body {"error": message}."""

    status: int
    message: str
    reason: Reason
    note: str = ""

    @property
    def explanation(self) -> str:
        return _explain(f"reject {self.status} ({self.reason}): {self.message}", self.note, ())


Decision = Send | Wait | Reject


def _explain(head: str, note: str, estimates: Sequence[Estimate]) -> str:
    parts = [head]
    if note:
        parts.append(note)
    parts.extend(e.describe() for e in estimates)
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Policies


class Policy(Protocol):
    """Picks one of the eligible backends (never empty; healthy, ready, model installed, fits ever,
    not excluded; in a stable order by id). May keep state of its own (round-robin's cursor)."""

    name: str

    def pick(self, request: RouteRequest, eligible: Sequence[BackendView], snapshot: Snapshot) -> Decision: ...


@dataclass
class ResidencyPolicy:
    """Least expected time to first token, with the cost of evicting hot models added (the default).

    `max_wait_s`: when the best candidate would queue longer than this for a slot of its resident
    model, the request waits at the gateway instead (where it can still go to whichever backend frees
    up first); None disables that. Cold loads are never deferred for being slow: waiting would not
    make them faster.
    """

    max_wait_s: float | None = 30.0
    costs: CostSettings = field(default_factory=CostSettings)
    name: str = "residency"

    def pick(self, request: RouteRequest, eligible: Sequence[BackendView], snapshot: Snapshot) -> Decision:
        r = request
        size = model_size_bytes(r.model, snapshot)
        estimates = sorted(
            (estimate(v, r.model, r.options, r.prompt_tokens, snapshot, self.costs, size) for v in eligible), key=_rank
        )
        ready = [e for e in estimates if e.ready_now]
        if not ready:
            soonest = min(e.ttft_s for e in estimates)
            return Wait("all_busy", tuple(estimates), expected_wait_s=soonest)
        best = ready[0]
        if self.max_wait_s is not None and best.slot_wait_s > self.max_wait_s:
            return Wait("over_budget", tuple(estimates), expected_wait_s=best.slot_wait_s)
        reason: Reason = best.route
        if _needs_split(request, snapshot, eligible):
            reason = "split_required"
        ordered = (best, *(e for e in estimates if e is not best))
        return Send(best.backend_id, reason, best.ttft_s, ordered)


def _rank(e: Estimate) -> tuple[float, float, str]:
    # Millisecond rounding makes near-equal estimates ties, which then go to the faster GPU.
    return (round(e.score_s, 3), -e.speed, e.backend_id)


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
) -> Policy:
    """A fresh policy by its config name (`[gateway] policy`); ValueError for an unknown name.
    `rng` is used by "random" only; `max_wait_s` by "residency" only."""
    costs = costs or CostSettings()
    if name == "residency":
        return ResidencyPolicy(max_wait_s=max_wait_s, costs=costs)
    if name == "round-robin":
        return RoundRobinPolicy(costs=costs)
    if name == "least-busy":
        return LeastBusyPolicy(costs=costs)
    if name == "random":
        return RandomPolicy(rng=rng or random.Random(), costs=costs)
    raise ValueError(f"unknown routing policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")


# ---------------------------------------------------------------------------------------------
# The decision


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
    state (round-robin's cursor, the random generator)."""
    model = request.model
    serving = sorted((v for v in snapshot.backends if _serves(v)), key=lambda v: v.id)
    if not serving:
        if any(v.record.state == BackendState.STARTING for v in snapshot.backends):
            return Wait("starting", note="no backend is ready yet")
        return Reject(503, "no healthy backend available, please try again", "no_healthy_backend")

    holders = [v for v in serving if _has_model(v, model)]
    if not holders:
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
    fitting = [v for v in holders if can_ever_fit(v, min_need_bytes(v, request.options, facts, size))]
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
