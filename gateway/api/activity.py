"""What this gateway saw lately: the last routing decisions and per-model traffic over a short window.

For the live views (`corral top`, the page at /corral/), not for routing. Recording is an append to
a bounded deque, cheap enough for every request (decisions are kept as they came); the documents
and numbers are computed only when the status document is asked for. Everything is bounded: the
decision ring, the samples per model, and the number of models (a client cannot grow it with
made-up names: the dispatcher passes "other" for a model no backend has, as it does for metric
labels).
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.api.status_doc import DecisionDoc, DecisionKind, ModelStatsDoc
from gateway.routing.policy import Decision, Reject, Send, Wait

WINDOW_S = 300.0  # "the last minutes"
DECISIONS_KEPT = 50
# Worst case 64 x 2048 samples (~10 MB, a few tens of ms per status document); the dispatcher
# passes only models some backend has, so a real fleet stays far below it.
SAMPLES_PER_MODEL = 2048  # at 6.8 requests/s a model's whole window still fits; above, the newest 2048
MODELS_KEPT = 64
NAME_LIMIT = 200


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    ttft_s: float | None
    tokens: int  # eval_count of the reply's final chunk (0 when unknown)
    failed: bool


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by nearest rank; None for no values."""
    if not sorted_values:
        return None
    rank = min(max(int(q * len(sorted_values) + 0.5) - 1, 0), len(sorted_values) - 1)
    return sorted_values[rank]


class Activity:
    def __init__(
        self,
        *,
        window_s: float = WINDOW_S,
        decisions_kept: int = DECISIONS_KEPT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.window_s = window_s
        self._clock = clock
        self._started_at = clock()
        self._decisions: deque[tuple[float, str, Decision]] = deque(maxlen=decisions_kept)
        self._samples: OrderedDict[str, deque[Sample]] = OrderedDict()

    def decided(self, model: str, decision: Decision) -> None:
        # Kept as it came: the document is made only when a live view asks (`decisions`).
        self._decisions.append((self._clock(), model, decision))

    def finished(
        self, model: str, status: int, ttft_s: float | None, final: Mapping[str, Any] | None, failed: bool = False
    ) -> None:
        """One request answered (whole or cut) by a backend; `final` is the reply's last JSON object."""
        tokens = final.get("eval_count") if final else None
        samples = self._samples.get(model)
        if samples is None:
            if len(self._samples) >= MODELS_KEPT:
                self._samples.popitem(last=False)  # the model heard from least recently
            samples = self._samples[model] = deque(maxlen=SAMPLES_PER_MODEL)
        else:
            self._samples.move_to_end(model)
        samples.append(
            Sample(
                at=self._clock(),
                ttft_s=ttft_s,
                tokens=tokens if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0 else 0,
                failed=failed or status >= 400,
            )
        )

    def decisions(self) -> list[DecisionDoc]:
        """Newest first."""
        return [_decision_doc(at, model, decision) for at, model, decision in reversed(self._decisions)]

    def model_stats(
        self, in_flight: Mapping[str, int] | None = None, queued: Mapping[str, int] | None = None
    ) -> list[ModelStatsDoc]:
        """Per model over the window; models with traffic in flight or queued appear even before
        their first answer."""
        now = self._clock()
        since = now - self.window_s
        # Rates over the time actually observed: a gateway up for 10 s has not seen 300 s.
        span_s = max(min(self.window_s, now - self._started_at), 1.0)
        in_flight = in_flight or {}
        queued = queued or {}
        names = sorted(set(self._samples) | set(in_flight) | set(queued))
        rows = []
        for name in names:
            recent = list(itertools.takewhile(lambda s: s.at >= since, reversed(self._samples.get(name, ()))))
            if not recent and not in_flight.get(name) and not queued.get(name):
                continue
            ttfts = sorted(s.ttft_s for s in recent if s.ttft_s is not None and not s.failed)
            p50, p95 = percentile(ttfts, 0.5), percentile(ttfts, 0.95)
            rows.append(
                ModelStatsDoc(
                    model=name,
                    requests=len(recent),
                    errors=sum(s.failed for s in recent),
                    requests_per_s=round(len(recent) / span_s, 3),
                    ttft_p50_s=None if p50 is None else round(p50, 4),
                    ttft_p95_s=None if p95 is None else round(p95, 4),
                    tokens_per_s=round(sum(s.tokens for s in recent) / span_s, 2),
                    in_flight=int(in_flight.get(name, 0)),
                    queued=int(queued.get(name, 0)),
                )
            )
        return rows


def _decision_doc(at: float, model: str, decision: Decision) -> DecisionDoc:
    kind: DecisionKind
    backend = ""
    expected: float | None = None
    if isinstance(decision, Send):
        kind, backend, expected = "send", decision.backend_id, round(decision.expected_ttft_s, 3)
    elif isinstance(decision, Wait):
        kind, expected = "wait", decision.expected_wait_s
    else:
        assert isinstance(decision, Reject)
        kind = "reject"
    return DecisionDoc(
        at=at,
        model=model[:NAME_LIMIT],
        decision=kind,
        reason=decision.reason,
        backend=backend,
        expected_ttft_s=expected,
    )
