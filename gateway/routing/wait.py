"""The wait model: how soon a busy copy of a model frees a slot, from the work in flight there.

Pure functions over a `BackendView` (no I/O, no clock). For each request in flight the snapshot
carries its expected answer length (its `num_predict`, else the model's typical answer length as
observed), the tokens already relayed to the client (NDJSON lines or SSE events counted by the
proxy) and how long it has run; the copy's decode rate is the observed single-stream rate slowed
by the sequences decoding beside it (batched decode shares the weight read, not the KV reads).
Every duration is in the backend's own clock (what its replies report), so a time-scaled simulator
and a real card are costed alike.
"""

from __future__ import annotations

from gateway.routing.snapshot import BackendView, WorkItem

# A stream that already ran past its expected length is expected to go on for this share of what
# it has produced so far (long answers tend to stay long), and at least this many tokens.
OVERRUN_SHARE = 0.25
OVERRUN_MIN_TOKENS = 8.0
# A request another gateway sent (counted in in_flight, not itemised here) is assumed half done.
UNKNOWN_DONE_SHARE = 0.5


def solo_decode_rate(
    view: BackendView, model: str, size_bytes: int | None, *, fallback_per_speed_bytes: float
) -> float:
    """Single-stream tokens/s of the model here: observed (corrected for batching), else bandwidth
    over model size. `fallback_per_speed_bytes`: bytes/s one unit of `record.speed` decodes at
    (efficiency x 1 TB/s). 0 when nothing tells."""
    observed = view.observed.get(model)
    if observed is not None:
        if observed.solo_tokens_per_s > 0:
            return observed.solo_tokens_per_s
        if observed.tokens_per_s > 0:
            return observed.tokens_per_s
    if size_bytes:
        return fallback_per_speed_bytes * max(view.record.speed, 1e-3) / size_bytes
    return 0.0


def batched_rate(solo_tokens_per_s: float, sequences: int, slowdown_per_sequence: float) -> float:
    """Per-stream decode rate with `sequences` decoding together on one copy."""
    return solo_tokens_per_s / (1.0 + slowdown_per_sequence * max(sequences - 1, 0))


def typical_answer_tokens(view: BackendView, model: str, default_tokens: int) -> float:
    observed = view.observed.get(model)
    if observed is not None and observed.answer_tokens > 0:
        return observed.answer_tokens
    return float(default_tokens)


def remaining_tokens(item: WorkItem, tokens_per_s: float) -> float:
    """Tokens the request still has to produce. A stream counts what it relayed; a non-streamed
    request is credited its elapsed time at the observed rate."""
    done = float(item.relayed_tokens) if item.stream else item.elapsed_s * tokens_per_s
    left = item.expected_tokens - done
    if left > 0:
        return left
    if item.num_predict_known:
        return 1.0  # at its cap: the final chunk is due
    return max(OVERRUN_SHARE * done, OVERRUN_MIN_TOKENS)


def slot_free_times(
    view: BackendView,
    model: str,
    slots: int,
    *,
    solo_tokens_per_s: float,
    typical_tokens: float,
    slowdown_per_sequence: float,
    fallback_service_s: float,
    extra_s: float = 0.0,
) -> tuple[float, ...]:
    """Expected seconds until each busy slot of the model's copy here frees, soonest first (one
    entry per request in flight, capped at `slots`: requests beyond that wait in Ollama's queue and
    are costed as one more round by the caller). `extra_s` is added to each (a load in progress).
    Without any rate, each request counts half of `fallback_service_s`."""
    in_flight = view.in_flight.get(model, 0)
    if in_flight <= 0:
        return ()
    sequences = min(in_flight, slots)
    rate = batched_rate(solo_tokens_per_s, sequences, slowdown_per_sequence) if solo_tokens_per_s > 0 else 0.0
    items = view.work.get(model, ())
    times: list[float] = []
    for item in items[:in_flight]:
        if rate > 0:
            times.append(extra_s + remaining_tokens(item, rate) / rate)
        else:
            times.append(extra_s + 0.5 * fallback_service_s)
    unknown = in_flight - len(times)
    if unknown > 0:
        each = UNKNOWN_DONE_SHARE * (typical_tokens / rate if rate > 0 else fallback_service_s)
        times.extend([extra_s + each] * unknown)
    times.sort()
    return tuple(times[:sequences]) if in_flight <= slots else _with_backlog(times, slots)


def _with_backlog(times: list[float], slots: int) -> tuple[float, ...]:
    """More in flight than slots (another gateway or a stale count): the first `slots` finish in
    order, each backlog request then starts on the slot that frees first and holds it as long as an
    average one; returns when each of the `slots` slots is finally free, soonest first."""
    running = sorted(times[:slots])
    mean_s = sum(times) / len(times)
    for _ in times[slots:]:
        running[0] += mean_s
        running.sort()
    return tuple(running)


def kth_free_s(free_times: list[float], k: int, total_slots: int, service_s: float) -> float:
    """When the k-th (1-based) slot frees over the merged timeline of every busy slot: the k-th
    soonest while there are enough, beyond that whole rounds of `service_s` over `total_slots`."""
    if k <= 0:
        return 0.0
    if not free_times:
        return service_s * k / max(total_slots, 1)
    if k <= len(free_times):
        return free_times[k - 1]
    return free_times[-1] + service_s * (k - len(free_times)) / max(total_slots, 1)
