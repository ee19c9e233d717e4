"""The gateway's bounded per-model waiting queue, for requests that `routing.choose()` told to Wait.

A request parks here, keeping its place in its model's FIFO, until something changes (a request
finished, a poll updated residency: the gateway calls `notify`) or its deadline passes. Woken waiters
run in FIFO order, so the oldest re-runs `choose()` first and takes a freed slot before younger ones.

Typical use in a handler (single event loop; nothing here is thread-safe):

    decision = choose(request, pool.snapshot(), policy)
    if isinstance(decision, Wait):
        async with queues.waiting(model, timeout_s=settings.queue_timeout_s) as ticket:  # QueueFull
            while isinstance(decision, Wait):
                await ticket.wait()                                      # QueueTimeout
                decision = choose(request, pool.snapshot(), policy)

Wake-ups come from one place: the backend pool's change signal, handed to `on_change`. A slot
freed for a model wakes that model's oldest waiter not yet woken (it takes the slot), and the oldest
of every other model (a busy model that finished may be the one a waiter of another model needs
evicted); a request running past its expected length wakes its model's waiters (the expected wait
grew, a cold load elsewhere may now be sooner); any other change to the fleet wakes every waiter.

Two lanes per model: interactive waiters come before batch ones, whatever their arrival order.
`ahead` tells the router how many requests for the model would be served before this one.

A notification that arrives while the holder is busy re-running `choose()` is kept for its next
`wait()` (which then returns at once), so no wake-up is lost between a check and the wait. Leaving
the `async with` block for any reason (served, timed out, cancelled because the client hung up)
removes the ticket at once; nothing leaks.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from gateway.fleet.work import Change

Lane = Literal["interactive", "batch"]

# Ollama's own text for a full queue (server/sched.go ErrMaxQueue, two spaces included): clients
# and scripts that already handle Ollama's 503 recognise it.
QUEUE_FULL_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"

MIN_RETRY_AFTER_S = 1
MAX_RETRY_AFTER_S = 60
# Weight of the newest sample in the moving average of queue waits.
_WAIT_EWMA_ALPHA = 0.2


class QueueFull(Exception):
    """The model's queue holds `max_per_model` waiters already: answer 503 with `Retry-After`."""

    def __init__(self, model: str, depth: int, retry_after_s: int) -> None:
        super().__init__(QUEUE_FULL_MESSAGE)
        self.model = model
        self.depth = depth
        self.retry_after_s = retry_after_s
        self.message = QUEUE_FULL_MESSAGE


class QueueTimeout(Exception):
    """The request waited its whole timeout without a backend for it: answer 503 with `Retry-After`."""

    def __init__(self, model: str, waited_s: float, retry_after_s: int) -> None:
        message = f"server busy, please try again.  timed out after {waited_s:.0f}s waiting for model '{model}'"
        super().__init__(message)
        self.model = model
        self.waited_s = waited_s
        self.retry_after_s = retry_after_s
        self.message = message


class Ticket:
    """One request's place in its model's queue. Created by `WaitQueues.waiting`."""

    def __init__(
        self, queues: WaitQueues, model: str, enqueued_at: float, deadline: float | None, lane: Lane = "interactive"
    ) -> None:
        self.model = model
        self.lane = lane
        self.enqueued_at = enqueued_at  # loop time
        self.deadline = deadline  # loop time; None: no timeout
        self._queues = queues
        self._woken = asyncio.Event()

    @property
    def remaining_s(self) -> float | None:
        """Seconds left before the deadline (<= 0: passed); None without a deadline."""
        if self.deadline is None:
            return None
        return self.deadline - asyncio.get_running_loop().time()

    @property
    def position(self) -> int:
        """Requests for this model served before this one: 0 for the oldest interactive waiter;
        a batch waiter also counts every interactive one."""
        return self._queues._position(self)

    @property
    def notified(self) -> bool:
        """A notification is pending: the next `wait()` returns at once."""
        return self._woken.is_set()

    async def wait(self) -> None:
        """Return on the next notification for this model (or one already pending, which it consumes),
        or after the queues' `recheck_s` without one. Raises QueueTimeout once the deadline has passed;
        the ticket stays queued until the block exits."""
        if not self._woken.is_set():
            remaining = self.remaining_s
            if remaining is not None and remaining <= 0:
                raise self._timeout()
            recheck_s = self._queues.recheck_s
            limit_s = remaining if recheck_s is None else recheck_s if remaining is None else min(remaining, recheck_s)
            try:
                async with asyncio.timeout(limit_s):
                    await self._woken.wait()
            except TimeoutError:
                remaining = self.remaining_s
                if remaining is not None and remaining <= 0:
                    raise self._timeout() from None
                return  # a periodic re-check: something the gateway did not see may have changed
        self._woken.clear()

    def _timeout(self) -> QueueTimeout:
        waited_s = asyncio.get_running_loop().time() - self.enqueued_at
        return QueueTimeout(self.model, waited_s, self._queues.retry_after_s(self.model))


class WaitQueues:
    """Bounded FIFO of waiting requests per model. `max_per_model` = 0 refuses every waiter.

    `recheck_s` (None: never) also ends a `Ticket.wait()` that long after it began without a
    notification: a safety net for changes the gateway has no event for (another gateway's request
    finishing, a model expiring on its own); the poll interval is a good value.
    """

    def __init__(self, max_per_model: int, *, recheck_s: float | None = None) -> None:
        if max_per_model < 0:
            raise ValueError("max_per_model must be >= 0")
        if recheck_s is not None and recheck_s <= 0:
            raise ValueError("recheck_s must be > 0")
        self.max_per_model = max_per_model
        self.recheck_s = recheck_s
        # dict as an ordered set: FIFO iteration and O(1) removal of a waiter from the middle.
        self._queues: dict[str, dict[Ticket, None]] = {}  # interactive lane
        self._batch: dict[str, dict[Ticket, None]] = {}  # batch lane
        self._mean_wait_s: dict[str, float] = {}

    def depth(self, model: str) -> int:
        """Requests waiting for `model` now, both lanes (the Snapshot's `queued`, a metrics gauge)."""
        return len(self._queues.get(model, ())) + len(self._batch.get(model, ()))

    def depths(self) -> dict[str, int]:
        """Waiting requests per model, models with none left out."""
        models = set(self._queues) | set(self._batch)
        return {m: d for m in sorted(models) if (d := self.depth(m))}

    def ahead(self, model: str, lane: Lane = "interactive") -> int:
        """How many waiters a new request of `lane` would find before it."""
        interactive = len(self._queues.get(model, ()))
        return interactive if lane == "interactive" else interactive + len(self._batch.get(model, ()))

    def on_change(self, change: Change) -> None:
        """The pool's change signal: wake whoever may decide differently now."""
        if change.kind == "slot" and change.model is not None:
            self._wake(change.model, 1)
            for model in self._models():
                if model != change.model:
                    self._wake(model, 1)
        elif change.kind == "progress" and change.model is not None:
            self._wake(change.model, None)
        else:
            self.notify()

    def _models(self) -> list[str]:
        return list(dict.fromkeys([*self._queues, *self._batch]))

    @asynccontextmanager
    async def waiting(
        self, model: str, timeout_s: float | None = None, lane: Lane = "interactive"
    ) -> AsyncIterator[Ticket]:
        """Take a place at the back of `model`'s queue for the duration of the block.

        Raises QueueFull at once when the queue is full. `timeout_s` bounds the total time in the
        queue: `Ticket.wait()` raises QueueTimeout after it. On leaving the block the ticket is
        removed; if it left unserved (exception or cancellation) holding a notification it had not
        consumed, that notification passes to the next waiter so that no wake-up is lost.
        """
        depth = self.depth(model)
        if depth >= self.max_per_model:
            raise QueueFull(model, depth, self.retry_after_s(model))
        lanes = self._queues if lane == "interactive" else self._batch
        queue = lanes.setdefault(model, {})
        now = asyncio.get_running_loop().time()
        ticket = Ticket(self, model, now, None if timeout_s is None else now + timeout_s, lane)
        queue[ticket] = None
        served = False
        try:
            yield ticket
            served = True
        finally:
            queue.pop(ticket, None)
            if not queue and lanes.get(model) is queue:
                del lanes[model]
            if served:
                self._record_wait(model, asyncio.get_running_loop().time() - ticket.enqueued_at)
            elif ticket.notified:
                self._wake(model, 1)

    async def wait(self, model: str, timeout_s: float | None = None) -> None:
        """Queue for one notification and leave: QueueFull, QueueTimeout as in `waiting`. A caller that
        re-checks in a loop should hold `waiting()` instead, so it keeps its place in the queue."""
        async with self.waiting(model, timeout_s) as ticket:
            await ticket.wait()

    def notify(self, model: str | None = None, count: int | None = None) -> int:
        """Wake the waiters of `model` (of every model when None), oldest first; with `count`, only
        that many per model that are not already woken. Returns how many were woken now."""
        models = [model] if model is not None else self._models()
        return sum(self._wake(m, count) for m in models)

    def retry_after_s(self, model: str) -> int:
        """Suggested `Retry-After` seconds for a refused request: the moving average of how long the
        model's served waiters spent queued (the time the queue ahead takes to drain), rounded up
        and kept within [1, 60]; 1 before anything was measured."""
        mean_s = self._mean_wait_s.get(model, 0.0)
        return min(max(math.ceil(mean_s), MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S)

    def _wake(self, model: str, count: int | None) -> int:
        woken = 0
        for lane in (self._queues, self._batch):  # interactive first
            for ticket in lane.get(model, {}):
                if count is not None and woken >= count:
                    return woken
                if not ticket._woken.is_set():
                    ticket._woken.set()
                    woken += 1
        return woken

    def _position(self, ticket: Ticket) -> int:
        before = 0 if ticket.lane == "interactive" else len(self._queues.get(ticket.model, ()))
        lane = self._queues if ticket.lane == "interactive" else self._batch
        for i, t in enumerate(lane.get(ticket.model, {})):
            if t is ticket:
                return before + i
        return -1

    def _record_wait(self, model: str, waited_s: float) -> None:
        previous = self._mean_wait_s.get(model)
        if previous is None:
            self._mean_wait_s[model] = waited_s
        else:
            self._mean_wait_s[model] = previous + _WAIT_EWMA_ALPHA * (waited_s - previous)
