"""The backend pool: everything the gateway knows about its backends, and the router's snapshot.

The pool's state is private. It is changed through its methods only: by the poller (records,
health, /api/tags, /api/ps, model facts) and by the request path (requests begun and ended, what
replies revealed). It is read through `snapshot()` (the `Snapshot` the router and the handlers
use; no I/O, safe on the hot path) and a few small accessors. A snapshot's shape (records, health,
inventory, residency, loads, model facts) is fixed when it is taken, and its views are built once
per change of that shape, not per request; the counters that every request moves (requests in
flight, waiters, observed rates, last use) are the pool's own, read live. A decision reads them
synchronously, so it sees one consistent state; keep a snapshot across an await only for its shape.
Every change that can alter a routing decision is announced once, through the listeners given to
`subscribe` (the one signal that wakes the gateway's waiting requests). All methods are
synchronous and must be called from the event loop's thread.

Health: a backend is routable once a health check or poll succeeded. After `eject_after_failures`
consecutive failures (active checks or proxied attempts) it is ejected for `eject_for_s`; after
that the next successful check lets it back in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gateway.config import GatewaySettings
from gateway.fleet.live import (
    EWMA_ALPHA,
    LiveBackend,
    RecordChanges,
    ReplyFacts,
    _int,
    _routing_fields,
    health_report,
    learn_from_reply,
    parse_timestamp,
    row_model_name,
    version_key,
)
from gateway.fleet.views import QueuedHere, backend_view, shown_resident
from gateway.fleet.work import Change, Listener, Work, WorkItems
from gateway.record import BackendRecord
from gateway.routing.snapshot import (
    BackendView,
    LoadOptions,
    ModelFacts,
    ObservedStats,
    ResidentModel,
    Snapshot,
    SnapshotIndex,
)

__all__ = ["BackendPool", "LiveBackend", "RecordChanges", "ReplyFacts", "parse_timestamp", "row_model_name"]

log = logging.getLogger(__name__)

# Expected answer length of a request without num_predict before any reply taught the typical one.
DEFAULT_ANSWER_TOKENS = 256


class BackendPool:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        queue_depths: Callable[[], Mapping[str, int]] | None = None,
        queue_depth: Callable[[str], int] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._queue_depths = queue_depths or dict
        self._queue_depth = queue_depth or (lambda model: self._queue_depths().get(model, 0))
        self._backends: dict[str, LiveBackend] = {}
        self._facts: dict[str, ModelFacts] = {}
        # Fleet-wide requests in flight per backend and model: the store's sums, and this gateway's
        # own count wherever the store has not caught up with it yet.
        self._in_flight: dict[str, dict[str, int]] = {}
        self._work: dict[str, dict[str, list[Work]]] = {}  # backend -> model -> this gateway's requests
        self._stored: dict[tuple[str, str], int] = {}  # this gateway's requests the store counts
        self._listeners: list[Listener] = []
        # Backend seconds per wall second (a time-scaled simulator runs faster than the wall clock),
        # learned from replies: what turns a request's elapsed wall time into the backend's clock.
        self._backend_s_per_s = 1.0
        # The snapshot's views, index and model facts, until the fleet's shape changes (`_reshaped`).
        self._built: tuple[tuple[BackendView, ...], SnapshotIndex, dict[str, ModelFacts]] | None = None

    # -- the change signal -----------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        """Call `listener` after every change that may alter a routing decision."""
        self._listeners.append(listener)

    def _changed(self, change: Change) -> None:
        if change.kind == "fleet":
            self._reshaped()
        for listener in self._listeners:
            listener(change)

    def _reshaped(self) -> None:
        """A view's shape changed (not just a live counter): the next snapshot rebuilds the views."""
        self._built = None

    def queue_depths(self) -> Mapping[str, int]:
        return self._queue_depths()

    # -- read API ----------------------------------------------------------------------------------

    def ids(self) -> list[str]:
        return sorted(self._backends)

    def record(self, backend_id: str) -> BackendRecord | None:
        live = self._backends.get(backend_id)
        return live.record if live is not None else None

    def healthy(self, backend_id: str) -> bool:
        live = self._backends.get(backend_id)
        return live is not None and live.healthy

    def tags(self, backend_id: str) -> list[dict[str, Any]]:
        """The backend's last /api/tags rows (copies)."""
        live = self._backends.get(backend_id)
        return [dict(t) for t in live.tags] if live is not None else []

    def observed(self, backend_id: str, model: str) -> ObservedStats | None:
        """What this gateway observed of `model` on `backend_id` (rates, lengths), without a snapshot."""
        live = self._backends.get(backend_id)
        return None if live is None else live.observed.get(model)

    def health(self, backend_id: str) -> dict[str, Any]:
        """Health bookkeeping for status pages."""
        live = self._backends.get(backend_id)
        return health_report(live) if live is not None else {}

    def has_facts(self, model: str) -> bool:
        return model in self._facts

    def facts(self, model: str) -> ModelFacts | None:
        return self._facts.get(model)

    def set_facts(self, model: str, facts: ModelFacts) -> None:
        self._facts[model] = facts
        self._changed(Change("fleet", model))

    def in_flight_of(self, backend_id: str, model: str) -> int:
        return self._in_flight.get(backend_id, {}).get(model, 0)

    def in_flight_counts(self) -> dict[str, dict[str, int]]:
        return {b: dict(m) for b, m in self._in_flight.items() if m}

    # -- records ---------------------------------------------------------------------------------

    def sync_records(self, records: Iterable[BackendRecord]) -> RecordChanges:
        """Adopt the current set of backend records. A record whose URL changed (a restarted
        backend on a new port) counts as removed and added: what was known about it is dropped."""
        current = {r.id: r for r in records}
        changes = RecordChanges()
        self._reshaped()  # even a heartbeat replaces the records the views show
        for backend_id in list(self._backends):
            live = self._backends[backend_id]
            record = current.get(backend_id)
            if record is None or record.url != live.record.url:
                del self._backends[backend_id]
                self._in_flight.pop(backend_id, None)
                changes.removed.append(backend_id)
            elif _routing_fields(record) != _routing_fields(live.record):
                changes.changed.append(backend_id)
                live.record = record
            else:
                live.record = record  # a heartbeat: only updated_at moved
        for backend_id, record in current.items():
            if backend_id not in self._backends:
                self._backends[backend_id] = LiveBackend(record=record)
                changes.added.append(backend_id)
        if changes:
            self._changed(Change("fleet"))
        return changes

    # -- health ----------------------------------------------------------------------------------

    def mark_success(self, backend_id: str, version: str | None = None) -> bool:
        """A check or request reached the backend. Returns True when this brought it back in."""
        live = self._backends.get(backend_id)
        if live is None:
            return False
        before = live.version
        if not live.succeeded(self._clock(), version):
            if live.version != before:
                self._reshaped()
            return False
        log.info("<%s> healthy", backend_id)
        self._changed(Change("fleet", backend_id=backend_id))
        return True

    def mark_failure(self, backend_id: str, error: str) -> bool:
        """A check or request failed to reach the backend. Returns True when this ejected it."""
        live = self._backends.get(backend_id)
        settings = self.settings
        if live is None or not live.failed(self._clock(), error, settings.eject_after_failures, settings.eject_for_s):
            return False
        log.warning(
            "<%s> ejected for %.1fs after %d failures: %s", backend_id, settings.eject_for_s, live.failures, error
        )
        self._changed(Change("fleet", backend_id=backend_id))
        return True

    # -- polls -----------------------------------------------------------------------------------

    def apply_tags(self, backend_id: str, models: list[dict[str, Any]]) -> None:
        live = self._backends.get(backend_id)
        if live is None:
            return
        live.tags = [m for m in models if isinstance(m, dict)]
        installed = frozenset(name for name in map(row_model_name, live.tags) if name)
        known, before = live.inventory_known, live.installed
        live.installed = installed
        live.inventory_known = True
        if not known or installed != before:  # announced: the views are rebuilt
            self._changed(Change("fleet", backend_id=backend_id))

    def apply_ps(self, backend_id: str, models: list[dict[str, Any]], poll_started_at: float) -> None:
        """Adopt a /api/ps reply. Residency the gateway saw after the poll started is kept."""
        live = self._backends.get(backend_id)
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
        before = frozenset(live.merged_resident())
        if resident != live.resident:  # sizes, contexts or expiry may change under the same names
            self._reshaped()
        live.resident = resident
        live.seen_resident = {
            name: (model, seen_at)
            for name, (model, seen_at) in live.seen_resident.items()
            if seen_at > poll_started_at and name not in resident
        }
        if frozenset(live.merged_resident()) != before:
            self._changed(Change("fleet", backend_id=backend_id))

    # -- what requests reveal --------------------------------------------------------------------

    def begin(
        self,
        backend_id: str,
        model: str,
        *,
        num_predict: int | None = None,
        stream: bool = True,
        interactive: bool = True,
    ) -> Work:
        """Count one request sent to `backend_id` at once (before the shared store answers), so the
        next decision already sees its slot taken. End it with `end`."""
        now = self._clock()
        observed = self._backends[backend_id].observed.get(model) if backend_id in self._backends else None
        typical = int(observed.answer_tokens) if observed is not None and observed.answer_tokens > 0 else 0
        known = num_predict is not None and num_predict > 0
        expected = num_predict if known and num_predict is not None else typical or DEFAULT_ANSWER_TOKENS
        work = Work(
            backend_id,
            model,
            expected_tokens=expected,
            num_predict_known=known,
            stream=stream,
            interactive=interactive,
            started_at=now,
            on_overrun=self._overran,
        )
        self._work.setdefault(backend_id, {}).setdefault(model, []).append(work)
        self._bump(backend_id, model, +1)
        self._touch(backend_id, model, interactive, now)
        return work

    def end(self, work: Work) -> None:
        """The request is over (answered, failed or abandoned): its slot is free."""
        per_model = self._work.get(work.backend_id, {})
        items = per_model.get(work.model, [])
        if work in items:
            items.remove(work)
            if not items:
                per_model.pop(work.model, None)
        self._bump(work.backend_id, work.model, -1)
        self._touch(work.backend_id, work.model, work.interactive, self._clock())
        self._changed(Change("slot", work.model, work.backend_id))

    def _overran(self, work: Work) -> None:
        self._changed(Change("progress", work.model, work.backend_id))

    def _bump(self, backend_id: str, model: str, delta: int) -> None:
        # The row stays when it empties: the snapshot's views read it live.
        per_model = self._in_flight.setdefault(backend_id, {})
        count = per_model.get(model, 0) + delta
        if count > 0:
            per_model[model] = count
        else:
            per_model.pop(model, None)

    def _touch(self, backend_id: str, model: str, interactive: bool, now: float) -> None:
        live = self._backends.get(backend_id)
        if live is not None:
            live.last_used[model] = now
            if interactive:
                live.last_interactive[model] = now

    def note_stored(self, backend_id: str, model: str, delta: int) -> None:
        """The store counted (+1) or uncounted (-1) one of this gateway's requests."""
        key = (backend_id, model)
        value = self._stored.get(key, 0) + delta
        if value > 0:
            self._stored[key] = value
        else:
            self._stored.pop(key, None)

    def stored(self) -> dict[tuple[str, str], int]:
        """This gateway's requests the store should be counting, per (backend, model)."""
        return dict(self._stored)

    def replace_in_flight(self, counts: Mapping[str, Mapping[str, int]]) -> None:
        """Adopt the store's fleet-wide sums, with this gateway's own share replaced by its exact
        local count: the store lags behind it (an increment or decrement still on the way), and a
        request that ended here must free its slot at once, not at the next poll."""
        merged: dict[str, dict[str, int]] = {}
        for backend_id, per_model in counts.items():
            if backend_id not in self._backends:
                continue
            for model, n in per_model.items():
                others = n - self._stored.get((backend_id, model), 0)
                if others > 0:
                    merged.setdefault(backend_id, {})[model] = others
        for backend_id, per_model_work in self._work.items():
            for model, items in per_model_work.items():
                if items:
                    row = merged.setdefault(backend_id, {})
                    row[model] = row.get(model, 0) + len(items)
        if merged != self.in_flight_counts():
            for backend_id, row in self._in_flight.items():  # in place: the views read these rows
                row.clear()
                row.update(merged.pop(backend_id, {}))
            self._in_flight.update(merged)
            self._changed(Change("fleet"))

    def knows_model(self, model: str) -> bool:
        """Whether any backend has the model installed or loaded."""
        return any(model in b.installed or model in b.resident for b in self._backends.values())

    def forget_resident(self, backend_id: str, model: str) -> None:
        """The model was unloaded there (the gateway sent the unload)."""
        live = self._backends.get(backend_id)
        if live is not None:
            live.resident.pop(model, None)
            live.seen_resident.pop(model, None)
            self._changed(Change("fleet", model, backend_id))

    def is_resident(self, backend_id: str, model: str) -> bool:
        live = self._backends.get(backend_id)
        return live is not None and (model in live.resident or model in live.seen_resident)

    def start_loading(self, backend_id: str, model: str) -> None:
        live = self._backends.get(backend_id)
        if live is not None:
            live.loading[model] = live.loading.get(model, 0) + 1
            self._reshaped()

    def stop_loading(self, backend_id: str, model: str) -> None:
        live = self._backends.get(backend_id)
        if live is not None and model in live.loading:
            live.loading[model] -= 1
            if live.loading[model] <= 0:
                del live.loading[model]
                self._changed(Change("fleet", model, backend_id))

    def observe_reply(
        self,
        backend_id: str,
        model: str,
        final: Mapping[str, Any],
        load_options: LoadOptions,
        service_s: float,
        *,
        sent_wall_s: float = 0.0,
        sequences: int = 1,
    ) -> ReplyFacts:
        """Learn from a reply's final chunk (see `fleet.live.learn_from_reply`). `sent_wall_s`: wall
        seconds from sending it to its end, which teaches the backend's clock rate."""
        live = self._backends.get(backend_id)
        shown = shown_resident(live, model)
        facts, backend_s = learn_from_reply(
            live,
            model,
            final,
            load_options,
            service_s,
            cold_threshold_s=self.settings.cold_load_threshold_s,
            sequences=sequences,
            model_facts=self._facts.get(model),
            now=self._clock(),
        )
        if facts.cold_load:
            self._changed(Change("fleet", model, backend_id))  # a load ended: that copy is resident
        elif shown_resident(live, model) != shown:
            self._reshaped()
        if live is not None and sent_wall_s > 0 and backend_s > 0:
            ratio = min(max(backend_s / sent_wall_s, 0.01), 1000.0)
            self._backend_s_per_s = self._backend_s_per_s * (1 - EWMA_ALPHA) + ratio * EWMA_ALPHA
        return facts

    # -- the router's view -----------------------------------------------------------------------

    def views(self) -> tuple[BackendView, ...]:
        return self.snapshot().backends

    def snapshot(self) -> Snapshot:
        built = self._built
        if built is None:
            views = tuple(
                backend_view(
                    live,
                    self._in_flight.setdefault(backend_id, {}),
                    QueuedHere(self._queue_depth, self._queue_depths, live.installed),
                    WorkItems(self._work.setdefault(backend_id, {}), self._clock, self._clock_rate),
                )
                for backend_id, live in self._backends.items()
            )
            built = self._built = (views, SnapshotIndex.build(views), dict(self._facts))
        views, index, facts = built
        return Snapshot(backends=views, models=facts, now=self._clock(), index=index)

    def _clock_rate(self) -> float:
        return self._backend_s_per_s

    def version(self) -> str:
        """The oldest Ollama version among healthy backends (what every request can count on)."""
        versions = [b.version for b in self._backends.values() if b.healthy and b.version]
        if not versions:
            return ""
        return min(versions, key=version_key)
