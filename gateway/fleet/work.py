"""The requests this gateway has in flight, itemised for the wait model, and the pool's change signal.

A `Work` is one request sent to a backend and not finished: its expected answer length (its
num_predict, else the model's typical one), the tokens relayed so far (the proxy counts NDJSON lines
or SSE events as they pass) and when it started. The snapshot's views read them as immutable
`WorkItem`s (`WorkItems`, itemised only when the wait model reads them). Only the pool creates and
ends them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from gateway.routing.snapshot import WorkItem

ChangeKind = Literal["slot", "progress", "fleet"]


@dataclass(frozen=True)
class Change:
    """What changed in the pool, for whoever re-decides waiting requests.

    "slot": a request for `model` finished on `backend_id` (a slot there is free now); "progress": a
    request for `model` ran past its expected length (the expected wait for that model grew);
    "fleet": anything else that can change a decision (records, health, residency, a load ending)."""

    kind: ChangeKind
    model: str | None = None
    backend_id: str | None = None


Listener = Callable[[Change], None]


class Work:
    """One request in flight. `add_tokens` is the proxy's hook (called per chunk relayed)."""

    __slots__ = (
        "_on_overrun",
        "_overran",
        "backend_id",
        "expected_tokens",
        "interactive",
        "model",
        "num_predict_known",
        "relayed",
        "started_at",
        "stream",
    )

    def __init__(
        self,
        backend_id: str,
        model: str,
        *,
        expected_tokens: int,
        num_predict_known: bool,
        stream: bool,
        interactive: bool,
        started_at: float,
        on_overrun: Callable[[Work], None],
    ) -> None:
        self.backend_id = backend_id
        self.model = model
        self.expected_tokens = expected_tokens
        self.num_predict_known = num_predict_known
        self.stream = stream
        self.interactive = interactive
        self.started_at = started_at
        self.relayed = 0
        self._overran = False
        self._on_overrun = on_overrun

    def add_tokens(self, count: int) -> None:
        """`count` more tokens reached the client. Crossing the expected length once tells the pool:
        the wait for this model is longer than it was costed, a cold load may now be sooner."""
        if count <= 0:
            return
        self.relayed += count
        if not self._overran and self.relayed > self.expected_tokens:
            self._overran = True
            self._on_overrun(self)

    def item(self, now: float, backend_s_per_s: float) -> WorkItem:
        return WorkItem(
            expected_tokens=self.expected_tokens,
            relayed_tokens=self.relayed,
            elapsed_s=max(now - self.started_at, 0.0) * backend_s_per_s,
            stream=self.stream,
            num_predict_known=self.num_predict_known,
        )


class WorkItems(Mapping[str, tuple[WorkItem, ...]]):
    """One backend's requests in flight, per model, as a snapshot's `BackendView.work`.

    Live: it reads the pool's own lists, and itemises a model's requests when read, at that moment
    (`clock`, and the backend's clock rate then). Why: the snapshot's views are built once per
    change of the fleet, not per request, and the wait model reads these only when every slot of a
    copy is busy."""

    __slots__ = ("_clock", "_rate", "_work")

    def __init__(
        self, work: Mapping[str, list[Work]], clock: Callable[[], float], backend_s_per_s: Callable[[], float]
    ) -> None:
        self._work = work
        self._clock = clock
        self._rate = backend_s_per_s

    def __getitem__(self, model: str) -> tuple[WorkItem, ...]:
        items = self._work[model]
        now, rate = self._clock(), self._rate()
        return tuple(w.item(now, rate) for w in items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._work)

    def __len__(self) -> int:
        return len(self._work)
