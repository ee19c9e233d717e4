"""In-flight accounting: requests sent to a backend and not finished, per (backend, model).

The count lives in the state store (atomic counters shared by every gateway of the fleet) and is
mirrored in the pool for the router. The mirror moves first, synchronously, so the next decision
already sees a request even before the store answers; the store's reply then sets the fleet-wide
value. Store calls are shielded and the decrement runs as its own task, so a client hanging up at
any point (which cancels the handler) can neither leak nor double-count a request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from gateway.pool import BackendPool
from gateway.state import StateStore

log = logging.getLogger(__name__)


class InFlight:
    def __init__(self, store: StateStore, pool: BackendPool, on_release: Callable[[str, str], None]) -> None:
        self._store = store
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
            await asyncio.shield(incr)
            yield
        finally:
            self._pool.bump_in_flight(backend_id, model, -1)
            self._pool.touch(backend_id, model)
            task = asyncio.create_task(self._decr_after(incr, backend_id, model))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            self._on_release(backend_id, model)

    async def _incr(self, backend_id: str, model: str) -> None:
        try:
            count = await self._store.incr_in_flight(backend_id, model)
        except Exception as e:  # the local mirror still counts; routing goes on
            log.warning("<%s> in-flight increment failed: %s", backend_id, e)
            return
        self._pool.set_in_flight(backend_id, model, count)

    async def _decr_after(self, incr: asyncio.Future[None], backend_id: str, model: str) -> None:
        await asyncio.wait([incr])
        try:
            count = await self._store.decr_in_flight(backend_id, model)
        except Exception as e:
            log.warning("<%s> in-flight decrement failed: %s", backend_id, e)
            return
        self._pool.set_in_flight(backend_id, model, count)

    async def settle(self) -> None:
        """Wait for pending decrements (at shutdown, so the store is left balanced)."""
        if self._pending:
            await asyncio.wait(list(self._pending))
