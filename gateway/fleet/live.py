"""The pool's private bookkeeping per backend, and the small parsers it shares with the handlers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from gateway.record import BackendRecord
from gateway.routing.cost import loaded_num_ctx
from gateway.routing.snapshot import LoadOptions, ModelFacts, ObservedStats, ResidentModel
from launcher.facts.catalog import normalize_name

# Weight of a new sample in the exponentially averaged rates.
EWMA_ALPHA = 0.3
# Ollama's batched-decode slowdown per extra sequence, used to turn an observed rate into a
# single-stream one (the same figure the router's cost model uses).
BATCH_SLOWDOWN_PER_SEQUENCE = 0.03


def parse_timestamp(value: object) -> float | None:
    """Epoch seconds of an RFC 3339 timestamp as Ollama writes them; None when absent or invalid."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def row_model_name(row: Mapping[str, Any]) -> str:
    """The normalized model name of an /api/tags or /api/ps row; "" when it names none."""
    raw = str(row.get("model") or row.get("name") or "").strip()
    return normalize_name(raw) if raw else ""


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _ewma(old: float, sample: float, samples: int) -> float:
    return sample if samples == 0 or old == 0 else old * (1 - EWMA_ALPHA) + sample * EWMA_ALPHA


@dataclass
class RecordChanges:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # same backend, new state or shape

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def _routing_fields(record: BackendRecord) -> BackendRecord:
    return replace(record, updated_at=0.0)


@dataclass(frozen=True)
class ReplyFacts:
    """What one finished reply told us (from its final chunk)."""

    cold_load: bool
    load_s: float
    tokens_per_s: float


@dataclass
class LiveBackend:
    """Mutable state of one backend; only the pool changes it."""

    record: BackendRecord
    healthy: bool = False  # not routable until a check succeeds
    failures: int = 0  # consecutive
    ejected_until: float = 0.0  # epoch seconds; 0 = not ejected
    version: str = ""
    last_error: str = ""
    checked_at: float = 0.0
    tags: list[dict[str, Any]] = field(default_factory=list)  # /api/tags "models", as the backend sent them
    installed: frozenset[str] = frozenset()
    inventory_known: bool = False  # /api/tags answered at least once
    resident: dict[str, ResidentModel] = field(default_factory=dict)  # from the last /api/ps
    # Residency the gateway saw in replies, kept until a poll that started later confirms or drops it.
    seen_resident: dict[str, tuple[ResidentModel, float]] = field(default_factory=dict)
    observed: dict[str, ObservedStats] = field(default_factory=dict)
    loading: dict[str, int] = field(default_factory=dict)  # model -> requests sent while not resident
    last_used: dict[str, float] = field(default_factory=dict)  # model -> epoch seconds of the last request
    last_interactive: dict[str, float] = field(default_factory=dict)  # the same, interactive lane only

    def succeeded(self, now: float, version: str | None) -> bool:
        """A check or request reached it. True when this brings it back in (it was out, and its
        ejection is over: only checks after that count)."""
        self.checked_at = now
        if version:
            self.version = version
        if self.healthy:
            self.failures = 0
            return False
        if now < self.ejected_until:
            return False
        self.healthy = True
        self.failures = 0
        self.ejected_until = 0.0
        self.last_error = ""
        return True

    def failed(self, now: float, error: str, eject_after: int, eject_for_s: float) -> bool:
        """A check or request failed to reach it. True when this ejects it (for `eject_for_s`)."""
        self.checked_at = now
        self.failures += 1
        self.last_error = error
        if self.healthy and self.failures >= eject_after:
            self.healthy = False
            self.ejected_until = now + eject_for_s
            return True
        if not self.healthy and self.ejected_until and now >= self.ejected_until:
            self.ejected_until = now + eject_for_s  # failed its probe: another round out
        return False

    def merged_resident(self) -> Mapping[str, ResidentModel]:
        """The models loaded here, by name: the last poll's, plus loads seen since (read-only)."""
        if not self.seen_resident:
            return self.resident  # no copy: callers only read it
        merged = dict(self.resident)
        for name, (model, _) in self.seen_resident.items():
            merged.setdefault(name, model)
        return merged


def learn_from_reply(
    live: LiveBackend | None,
    model: str,
    final: Mapping[str, Any],
    load_options: LoadOptions,
    service_s: float,
    *,
    cold_threshold_s: float,
    sequences: int,
    model_facts: ModelFacts | None,
    now: float,
) -> tuple[ReplyFacts, float]:
    """Learn from a reply's final chunk (Ollama's durations are integer nanoseconds): the rates in
    `live.observed`, residency from load_duration. `service_s` (wall time of the request) is used
    only when the reply has no durations; `sequences`: requests of the model decoding there
    meanwhile (for the single-stream rate). Returns what the reply showed and the seconds it took
    in the backend's clock (load + prompt + decode)."""
    load_s = _int(final.get("load_duration")) / 1e9
    eval_count = _int(final.get("eval_count"))
    eval_s = _int(final.get("eval_duration")) / 1e9
    tokens_per_s = eval_count / eval_s if eval_count and eval_s > 0 else 0.0
    prompt_count = _int(final.get("prompt_eval_count"))
    prompt_s = _int(final.get("prompt_eval_duration")) / 1e9
    prefill_rate = prompt_count / prompt_s if prompt_count and prompt_s > 0 else 0.0
    cold = "load_duration" in final and load_s >= cold_threshold_s
    # How long the request held a slot, in the backend's own clock: what frees a slot for the
    # next one. Wall time would also count its wait for a slot (queueing the router already
    # counts by itself) and, against a time-scaled simulator, be in other units than load_s.
    total_s = _int(final.get("total_duration")) / 1e9
    if prompt_s or eval_s:
        service_s = prompt_s + eval_s
    elif total_s:
        service_s = max(total_s - load_s, 0.0)
    backend_s = load_s + prompt_s + eval_s
    if live is None:
        return ReplyFacts(cold, load_s, tokens_per_s), backend_s
    solo = tokens_per_s * (1 + BATCH_SLOWDOWN_PER_SEQUENCE * max(sequences - 1, 0)) if tokens_per_s else 0.0
    old = live.observed.get(model, ObservedStats())
    live.observed[model] = ObservedStats(
        tokens_per_s=_ewma(old.tokens_per_s, tokens_per_s, old.samples) if tokens_per_s else old.tokens_per_s,
        load_s=_ewma(old.load_s, load_s, old.samples) if cold else old.load_s,
        service_s=_ewma(old.service_s, service_s, old.samples),
        samples=old.samples + 1,
        prefill_tokens_per_s=(
            _ewma(old.prefill_tokens_per_s, prefill_rate, old.samples) if prefill_rate else old.prefill_tokens_per_s
        ),
        answer_tokens=_ewma(old.answer_tokens, eval_count, old.samples) if eval_count else old.answer_tokens,
        solo_tokens_per_s=_ewma(old.solo_tokens_per_s, solo, old.samples) if solo else old.solo_tokens_per_s,
    )
    if "load_duration" in final:
        _note_resident(live, model, load_options if cold else None, model_facts, now)
    return ReplyFacts(cold, load_s, tokens_per_s), backend_s


def _note_resident(
    live: LiveBackend, model: str, loaded_with: LoadOptions | None, facts: ModelFacts | None, now: float
) -> None:
    known = live.resident.get(model)
    if known is not None:
        if loaded_with is not None:
            live.resident[model] = replace(known, loaded_with=loaded_with)
        return
    seen = live.seen_resident.get(model)
    if seen is not None and loaded_with is None:
        live.seen_resident[model] = (seen[0], now)
        return
    size = facts.size_bytes if facts else 0
    # Without num_ctx in the request, Ollama loaded it at the backend's OLLAMA_CONTEXT_LENGTH;
    # either way capped as Ollama caps it, as /api/ps will report it (0: not known).
    ctx = (loaded_with.num_ctx if loaded_with else None) or live.record.default_num_ctx or 0
    if ctx:
        ctx = loaded_num_ctx(ctx, facts)
    live.seen_resident[model] = (
        ResidentModel(model, size, size, ctx, expires_at=None, loaded_with=loaded_with),
        now,
    )


def health_report(live: LiveBackend) -> dict[str, Any]:
    return {
        "healthy": live.healthy,
        "ejected_until": live.ejected_until or None,
        "consecutive_failures": live.failures,
        "health_error": live.last_error,
        "ollama_version": live.version,
    }


def version_key(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("-", 1)[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
