"""What the router is asked and what it answers: `RouteRequest` in, one `Decision` out.

Every decision carries a `reason` token from the fixed set `REASONS` (a Prometheus label, so its
cardinality is bounded) and an `explanation` for debug logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from gateway.routing.cost import Estimate
from gateway.routing.snapshot import LoadOptions

Reason = Literal[
    # Send (residency)
    "resident_free_slot",  # loaded there with matching options and a slot free: prefill only
    "resident_queued",  # loaded there, all slots busy: queued behind them at the backend (baselines)
    "loading",  # being loaded there right now, a slot of that load free: joins it
    "cold_load",  # not loaded there, fits in its free VRAM
    "cold_load_evict",  # not loaded there, fits once idle models are unloaded
    "spill",  # every copy is busy and a cold load elsewhere gives the first token sooner
    "context_fit",  # asked for a larger num_ctx, served on the loaded copy at its context (context_policy "fit")
    "split_required",  # larger than every single-card backend: a split or CPU backend
    # Send (baseline policies; any policy for metadata calls)
    "round_robin",
    "least_busy",
    "random",
    "metadata",  # /api/show and the like: any backend with the model installed, no load
    # Wait (park at the gateway and choose again when notified)
    "all_busy",  # every slot of every copy is taken and no cold load would be sooner
    "starting",  # no backend ready yet, but some are starting
    # Reject
    "not_found",
    "no_healthy_backend",
    "too_large",
    "context_too_large",  # num_ctx above the loaded context under context_policy "reject"
    "exhausted",  # every backend that could serve it is in `exclude` (already tried)
]
REASONS: frozenset[str] = frozenset(get_args(Reason))

RequestKind = Literal["generate", "chat", "embed", "show"]
Priority = Literal["interactive", "batch"]
PRIORITIES: tuple[str, ...] = get_args(Priority)


@dataclass(frozen=True)
class RouteRequest:
    """What the router needs to know about one request.

    `model` is the normalized name (`launcher.facts.catalog.normalize_name`); `requested_as` is the name
    the client wrote it, used in error texts like Ollama does (defaults to `model`). `kind` "show"
    needs the model installed but never loads it. `exclude` holds backend ids already tried for this
    request: a retry goes elsewhere or is rejected with reason "exhausted". `ahead` counts the
    requests for the same model that wait at the gateway before this one (they take free slots
    first); `priority` "batch" yields to interactive requests and never evicts a model interactive
    traffic used in the last minute.
    """

    model: str
    kind: RequestKind = "generate"
    options: LoadOptions = field(default_factory=LoadOptions)
    prompt_tokens: int = 0  # an estimate is enough, e.g. the prompt's (or messages') length in bytes / 4
    exclude: frozenset[str] = frozenset()
    stream: bool = True
    requested_as: str = ""
    num_predict: int | None = None  # the request's own cap on its answer, when it sets one
    ahead: int = 0
    priority: Priority = "interactive"

    @property
    def display_name(self) -> str:
        return self.requested_as or self.model


@dataclass(frozen=True)
class Send:
    """Forward the request to `backend_id`.

    `num_ctx`: when set, the request is sent with this num_ctx instead of the one it asked for (the
    loaded copy's, under context_policy "fit"). `evicts_planned`: planned models this send evicts
    because nothing else can ever serve the request (logged and counted by the gateway)."""

    backend_id: str
    reason: Reason
    expected_ttft_s: float
    estimates: tuple[Estimate, ...] = ()  # the candidates weighed (residency), best first
    note: str = ""
    num_ctx: int | None = None
    evicts_planned: tuple[str, ...] = ()
    # The copy's slots (residency): with a shared store the gateway reserves one of them before
    # sending, so several gateways never send it more; 0: no limit (baselines, metadata calls).
    slots: int = 0

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
