"""In-flight accounting: requests sent to a backend and not finished, per (backend, model).

The count lives in the state store (atomic counters shared by every gateway of the fleet) and is
mirrored in the pool for the router. The mirror moves by one, synchronously, so the next decision
already sees a request even before the store answers; the poller replaces it with the store's
fleet-wide sums every poll. The store's own replies are not copied into the mirror: a shared store
answers an increment with this gateway's count alone, which would hide other gateways' requests.
Store calls are shielded and the decrement runs as its own task, so a client hanging up at any
point (which cancels the handler) can neither leak nor double-count a request; an increment the
store refused is not decremented there either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from gateway.fleet.pool import BackendPool
from gateway.state.health import StoreHealth
from gateway.state.store import StateStore

log = logging.getLogger(__name__)

# The longest a request waits for its in-flight increment before going on without it.
STORE_WAIT_S = 0.5


class InFlight:
    def __init__(
        self,
        store: StateStore,
        pool: BackendPool,
        on_release: Callable[[str, str], None],
        store_health: StoreHealth | None = None,
    ) -> None:
        self._store = store
        # While the store is down no request waits on it (nor logs about it): the poller's next
        # successful read brings it back, and counting resumes with the next request.
        self._health = store_health or StoreHealth("gateway")
        self._pool = pool
        self._on_release = on_release
        self._pending: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def hold(self, backend_id: str, model: str) -> AsyncIterator[None]:
        """Count one request for the duration of the block. Call it right after the decision, with
        no await in between, so that concurrent decisions see each other."""
        self._pool.bump_in_flight(backend_id, model, +1)
        self._pool.touch(backend_id, model)
        incr = asyncio.ensure_future(self._incr(backend_id, model))
        try:
            # Bounded: a store that hangs must not hold the request (the decrement still waits for
            # the increment's outcome, so the counts stay balanced).
            await asyncio.wait([incr], timeout=STORE_WAIT_S)
            yield
        finally:
            self._pool.bump_in_flight(backend_id, model, -1)
            self._pool.touch(backend_id, model)
            task = asyncio.create_task(self._decr_after(incr, backend_id, model))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            self._on_release(backend_id, model)

    async def _incr(self, backend_id: str, model: str) -> bool:
        """Count the request in the store; False when the store refused (the mirror still counts)."""
        if not self._health.up:
            return False
        try:
            await self._store.incr_in_flight(backend_id, model)
        except Exception as e:  # routing goes on with the local mirror
            self._health.failed(e)
            return False
        return True

    async def _decr_after(self, incr: asyncio.Future[bool], backend_id: str, model: str) -> None:
        await asyncio.wait([incr])
        if incr.cancelled() or incr.exception() is not None or not incr.result():
            return  # never counted there: a decrement would eat another request's count
        try:
            await self._store.decr_in_flight(backend_id, model)
        except Exception as e:
            self._health.failed(e)

    async def settle(self) -> None:
        """Wait for pending decrements (at shutdown, so the store is left balanced)."""
        if self._pending:
            await asyncio.wait(list(self._pending))
