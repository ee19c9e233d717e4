"""The backend pool: everything the gateway knows about its backends, and the router's snapshot.

The pool is plain in-memory state, changed only by the poller (records, health, /api/tags,
/api/ps, model facts) and by the proxy (in-flight counts, what replies revealed). `snapshot()`
turns it into the immutable `Snapshot` the router reads; it does no I/O, so it is safe on the hot
path. All methods are synchronous and must be called from the event loop's thread.

Health: a backend is routable once a health check or poll succeeded. After `eject_after_failures`
consecutive failures (active checks or proxied attempts) it is ejected for `eject_for_s`; after
that the next successful check lets it back in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from gateway.config import GatewaySettings
from gateway.record import BackendRecord
from gateway.routing.cost import loaded_num_ctx
from gateway.routing.snapshot import BackendView, LoadOptions, ModelFacts, ObservedStats, ResidentModel, Snapshot
from launcher.facts.catalog import normalize_name

log = logging.getLogger(__name__)

# Weight of a new sample in the exponentially averaged rates.
EWMA_ALPHA = 0.3


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

    def merged_resident(self) -> dict[str, ResidentModel]:
        merged = dict(self.resident)
        for name, (model, _) in self.seen_resident.items():
            merged.setdefault(name, model)
        return merged


class BackendPool:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        queue_depths: Callable[[], Mapping[str, int]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._queue_depths = queue_depths or dict
        self.backends: dict[str, LiveBackend] = {}
        self.facts: dict[str, ModelFacts] = {}
        self.in_flight: dict[str, dict[str, int]] = {}

    def set_queue_depths(self, source: Callable[[], Mapping[str, int]]) -> None:
        self._queue_depths = source

    def queue_depths(self) -> Mapping[str, int]:
        return self._queue_depths()

    # -- records ---------------------------------------------------------------------------------

    def sync_records(self, records: Iterable[BackendRecord]) -> RecordChanges:
        """Adopt the current set of backend records. A record whose URL changed (a restarted
        backend on a new port) counts as removed and added: what was known about it is dropped."""
        current = {r.id: r for r in records}
        changes = RecordChanges()
        for backend_id in list(self.backends):
            live = self.backends[backend_id]
            record = current.get(backend_id)
            if record is None or record.url != live.record.url:
                del self.backends[backend_id]
                self.in_flight.pop(backend_id, None)
                changes.removed.append(backend_id)
            elif _routing_fields(record) != _routing_fields(live.record):
                changes.changed.append(backend_id)
                live.record = record
            else:
                live.record = record  # a heartbeat: only updated_at moved
        for backend_id, record in current.items():
            if backend_id not in self.backends:
                self.backends[backend_id] = LiveBackend(record=record)
                changes.added.append(backend_id)
        return changes

    def get(self, backend_id: str) -> LiveBackend | None:
        return self.backends.get(backend_id)

    # -- health ----------------------------------------------------------------------------------

    def mark_success(self, backend_id: str, version: str | None = None) -> bool:
        """A check or request reached the backend. Returns True when this brought it back in."""
        live = self.backends.get(backend_id)
        if live is None:
            return False
        now = self._clock()
        live.checked_at = now
        if version:
            live.version = version
        if live.healthy:
            live.failures = 0
            return False
        if now < live.ejected_until:
            return False  # still serving its ejection; only checks after it count
        live.healthy = True
        live.failures = 0
        live.ejected_until = 0.0
        live.last_error = ""
        log.info("<%s> healthy", backend_id)
        return True

    def mark_failure(self, backend_id: str, error: str) -> bool:
        """A check or request failed to reach the backend. Returns True when this ejected it."""
        live = self.backends.get(backend_id)
        if live is None:
            return False
        now = self._clock()
        live.checked_at = now
        live.failures += 1
        live.last_error = error
        if live.healthy and live.failures >= self.settings.eject_after_failures:
            live.healthy = False
            live.ejected_until = now + self.settings.eject_for_s
            log.warning(
                "<%s> ejected for %.1fs after %d failures: %s",
                backend_id,
                self.settings.eject_for_s,
                live.failures,
                error,
            )
            return True
        if not live.healthy and live.ejected_until and now >= live.ejected_until:
            live.ejected_until = now + self.settings.eject_for_s  # failed its probe: another round out
        return False

    # -- polls -----------------------------------------------------------------------------------

    def apply_tags(self, backend_id: str, models: list[dict[str, Any]]) -> None:
        live = self.backends.get(backend_id)
        if live is None:
            return
        live.tags = [m for m in models if isinstance(m, dict)]
        live.installed = frozenset(name for name in map(row_model_name, live.tags) if name)
        live.inventory_known = True

    def apply_ps(self, backend_id: str, models: list[dict[str, Any]], poll_started_at: float) -> None:
        """Adopt a /api/ps reply. Residency the gateway saw after the poll started is kept."""
        live = self.backends.get(backend_id)
        if live is None:
            return
        resident: dict[str, ResidentModel] = {}
        for m in models:
            if not isinstance(m, dict):
                continue
            name = row_model_name(m)
            if not name:
                continue
            previous = live.resident.get(name) or live.seen_resident.get(name, (None, 0.0))[0]
            resident[name] = ResidentModel(
                name=name,
                size_bytes=_int(m.get("size")),
                size_vram_bytes=_int(m.get("size_vram")),
                context_length=_int(m.get("context_length")),
                expires_at=parse_timestamp(m.get("expires_at")),
                loaded_with=previous.loaded_with if previous else None,
            )
        live.resident = resident
        live.seen_resident = {
            name: (model, seen_at)
            for name, (model, seen_at) in live.seen_resident.items()
            if seen_at > poll_started_at and name not in resident
        }

    # -- what requests reveal --------------------------------------------------------------------

    def bump_in_flight(self, backend_id: str, model: str, delta: int) -> None:
        """Adjust this gateway's view at once, before the shared counter answers, so a decision made
        in the meantime already sees the request. The next `replace_in_flight` sets the fleet's sums."""
        per_model = self.in_flight.setdefault(backend_id, {})
        count = per_model.get(model, 0) + delta
        if count > 0:
            per_model[model] = count
        else:
            per_model.pop(model, None)
            if not per_model:
                del self.in_flight[backend_id]

    def touch(self, backend_id: str, model: str) -> None:
        live = self.backends.get(backend_id)
        if live is not None:
            live.last_used[model] = self._clock()

    def replace_in_flight(self, counts: Mapping[str, Mapping[str, int]]) -> None:
        self.in_flight = {b: dict(m) for b, m in counts.items() if m and b in self.backends}

    def knows_model(self, model: str) -> bool:
        """Whether any backend has the model installed or loaded."""
        return any(model in b.installed or model in b.resident for b in self.backends.values())

    def forget_resident(self, backend_id: str, model: str) -> None:
        """The model was unloaded there (the gateway sent the unload)."""
        live = self.backends.get(backend_id)
        if live is not None:
            live.resident.pop(model, None)
            live.seen_resident.pop(model, None)

    def is_resident(self, backend_id: str, model: str) -> bool:
        live = self.backends.get(backend_id)
        return live is not None and model in live.merged_resident()

    def start_loading(self, backend_id: str, model: str) -> None:
        live = self.backends.get(backend_id)
        if live is not None:
            live.loading[model] = live.loading.get(model, 0) + 1

    def stop_loading(self, backend_id: str, model: str) -> None:
        live = self.backends.get(backend_id)
        if live is not None and model in live.loading:
            live.loading[model] -= 1
            if live.loading[model] <= 0:
                del live.loading[model]

    def observe_reply(
        self,
        backend_id: str,
        model: str,
        final: Mapping[str, Any],
        load_options: LoadOptions,
        service_s: float,
    ) -> ReplyFacts:
        """Learn from a reply's final chunk (Ollama's durations are integer nanoseconds).
        `service_s` (wall time of the request) is used only when the reply has no durations."""
        load_s = _int(final.get("load_duration")) / 1e9
        eval_count = _int(final.get("eval_count"))
        eval_s = _int(final.get("eval_duration")) / 1e9
        tokens_per_s = eval_count / eval_s if eval_count and eval_s > 0 else 0.0
        prompt_count = _int(final.get("prompt_eval_count"))
        prompt_s = _int(final.get("prompt_eval_duration")) / 1e9
        prefill_rate = prompt_count / prompt_s if prompt_count and prompt_s > 0 else 0.0
        cold = "load_duration" in final and load_s >= self.settings.cold_load_threshold_s
        # How long the request held a slot, in the backend's own clock: what frees a slot for the
        # next one. Wall time would also count its wait for a slot (queueing the router already
        # counts by itself) and, against a time-scaled simulator, be in other units than load_s.
        total_s = _int(final.get("total_duration")) / 1e9
        if prompt_s or eval_s:
            service_s = prompt_s + eval_s
        elif total_s:
            service_s = max(total_s - load_s, 0.0)
        live = self.backends.get(backend_id)
        if live is None:
            return ReplyFacts(cold, load_s, tokens_per_s)
        old = live.observed.get(model, ObservedStats())
        live.observed[model] = ObservedStats(
            tokens_per_s=_ewma(old.tokens_per_s, tokens_per_s, old.samples) if tokens_per_s else old.tokens_per_s,
            load_s=_ewma(old.load_s, load_s, old.samples) if cold else old.load_s,
            service_s=_ewma(old.service_s, service_s, old.samples),
            samples=old.samples + 1,
            prefill_tokens_per_s=(
                _ewma(old.prefill_tokens_per_s, prefill_rate, old.samples) if prefill_rate else old.prefill_tokens_per_s
            ),
        )
        if "load_duration" in final:
            self._note_resident(live, model, load_options if cold else None)
        return ReplyFacts(cold, load_s, tokens_per_s)

    def _note_resident(self, live: LiveBackend, model: str, loaded_with: LoadOptions | None) -> None:
        now = self._clock()
        known = live.resident.get(model)
        if known is not None:
            if loaded_with is not None:
                live.resident[model] = replace(known, loaded_with=loaded_with)
            return
        seen = live.seen_resident.get(model)
        if seen is not None and loaded_with is None:
            live.seen_resident[model] = (seen[0], now)
            return
        facts = self.facts.get(model)
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

    # -- the router's view -----------------------------------------------------------------------

    def views(self) -> tuple[BackendView, ...]:
        depths = self.queue_depths()
        views = []
        for backend_id, live in self.backends.items():
            resident = live.merged_resident()
            used = sum(r.size_vram_bytes for r in resident.values())
            views.append(
                BackendView(
                    record=live.record,
                    healthy=live.healthy,
                    installed=live.installed,
                    resident=tuple(resident.values()),
                    in_flight=dict(self.in_flight.get(backend_id, {})),
                    queued={m: d for m, d in depths.items() if d and m in live.installed},
                    free_vram_bytes=max(live.record.vram_total_bytes - used, 0),
                    loading=next(iter(live.loading), None),
                    observed=dict(live.observed),
                    inventory_known=live.inventory_known,
                    default_num_ctx=live.record.default_num_ctx,
                    last_used=dict(live.last_used),
                    version=live.version,
                )
            )
        return tuple(views)

    def snapshot(self) -> Snapshot:
        return Snapshot(backends=self.views(), models=dict(self.facts), now=self._clock())

    def version(self) -> str:
        """The oldest Ollama version among healthy backends (what every request can count on)."""
        versions = [b.version for b in self.backends.values() if b.healthy and b.version]
        if not versions:
            return ""
        return min(versions, key=_version_key)


def _version_key(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("-", 1)[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
