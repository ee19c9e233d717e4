"""In-flight accounting: requests sent to a backend and not finished, per (backend, model).

The count lives in the state store (atomic counters shared by every gateway of the fleet) and is
mirrored in the pool for the router. The mirror moves by one, synchronously (`pool.begin` /
`pool.end`), so the next decision already sees a request even before the store answers; the poller
replaces it with the store's fleet-wide sums every poll. Ending a request is what frees its slot:
the pool announces that itself, through its one change signal. The store's own replies are not
copied into the mirror: a shared store answers an increment with this gateway's count alone,
which would hide other gateways' requests.
Store calls are shielded and the decrement runs as its own task, so a client hanging up at any
point (which cancels the handler) can neither leak nor double-count a request; an increment the
store refused is not decremented there either. With the in-process store (one gateway, as `corral
up` runs it) the pool's count is already the fleet's, and nothing is counted in the store.

A store call that fails may still have happened (the reply was lost on the way back), and a failed
decrement would leave a count nobody ever removes: the other gateways would see a slot taken for as
long as this one runs. So after any failed count, the store is repaired: once it answers again, this
gateway's own counters there are replaced with what it knows it has in flight (`repair`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType

from gateway.fleet.pool import BackendPool
from gateway.fleet.work import Work
from gateway.state.health import StoreHealth, reraise_if_cancelled
from gateway.state.memory import MemoryStore
from gateway.state.store import StateStore

log = logging.getLogger(__name__)

# The longest a request waits for its in-flight increment before going on without it.
STORE_WAIT_S = 0.5
# After a failed count, how often the repair is tried until the store takes it.
REPAIR_INTERVAL_S = 1.0


class SlotTaken(Exception):
    """Another gateway took the copy's last slot between this gateway's decision and its send."""


class InFlight:
    def __init__(self, store: StateStore, pool: BackendPool, store_health: StoreHealth | None = None) -> None:
        self._store = store
        # While the store is down no request waits on it (nor logs about it): the poller's next
        # successful read brings it back, and counting resumes with the next request.
        self._health = store_health or StoreHealth("gateway")
        self._pool = pool
        self._pending: set[asyncio.Task[None]] = set()
        # The in-process store serves one gateway: the pool's own count is the fleet's, so there is
        # nothing to count in the store (and no task, shield or wait per request). Exactly
        # MemoryStore: a subclass (a test's flaky store) takes the shared-store path.
        self._local = type(store) is MemoryStore
        self._repair: asyncio.Task[None] | None = None  # runs only after a failed count
        self._decrementing: Counter[tuple[str, str]] = Counter()  # decrements sent, not answered

    def hold(
        self,
        backend_id: str,
        model: str,
        *,
        num_predict: int | None = None,
        stream: bool = True,
        interactive: bool = True,
        slots: int = 0,
    ) -> AbstractAsyncContextManager[Work]:
        """Count one request for the duration of the block; the `Work` it yields takes the proxy's
        token counts. Call it right after the decision, with no await in between, so that
        concurrent decisions see each other. With `slots` > 0 one of the copy's slots is reserved
        in the store first (exact across gateways); SlotTaken when none is left."""
        if self._local and slots <= 0:
            work = self._pool.begin(backend_id, model, num_predict=num_predict, stream=stream, interactive=interactive)
            return _LocalHold(self._pool, work)
        return self._hold(backend_id, model, num_predict, stream, interactive, slots)

    @asynccontextmanager
    async def _hold(
        self, backend_id: str, model: str, num_predict: int | None, stream: bool, interactive: bool, slots: int
    ) -> AsyncIterator[Work]:
        work = self._pool.begin(backend_id, model, num_predict=num_predict, stream=stream, interactive=interactive)
        token: str | None = None
        if slots > 0:
            reserve = asyncio.ensure_future(self._reserve(backend_id, model, slots))
            try:
                token = await asyncio.shield(reserve)
            except BaseException:
                self._pool.end(work)
                self._release_later(reserve, backend_id, model)
                raise
            if token is None:
                self._pool.end(work)
                raise SlotTaken(f"backend {backend_id}: every slot of {model} is taken")
        incr = asyncio.ensure_future(self._incr(backend_id, model))
        try:
            # Bounded: a store that hangs must not hold the request (the decrement still waits for
            # the increment's outcome, so the counts stay balanced).
            await asyncio.wait([incr], timeout=STORE_WAIT_S)
            yield work
        finally:
            self._pool.end(work)
            task = asyncio.create_task(self._decr_after(incr, backend_id, model))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            if token:
                self._release_later(asyncio.ensure_future(_done(token)), backend_id, model)

    async def _reserve(self, backend_id: str, model: str, slots: int) -> str | None:
        """A slot token; "" when the store failed (routing goes on with this gateway's own count)."""
        if not self._health.up:  # no wait on a store known to be down, and no warning per request
            return ""
        try:
            return await self._store.reserve_slot(backend_id, model, slots)
        except Exception as e:
            self._health.failed(e)
            return ""

    def _release_later(self, reserve: asyncio.Future[str | None], backend_id: str, model: str) -> None:
        task = asyncio.create_task(self._release_after(reserve, backend_id, model))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _release_after(self, reserve: asyncio.Future[str | None], backend_id: str, model: str) -> None:
        await asyncio.wait([reserve])
        if reserve.cancelled() or reserve.exception() is not None or not reserve.result():
            return
        try:
            await self._store.release_slot(backend_id, model, str(reserve.result()))
        except Exception as e:  # the reservation then expires with its TTL
            self._health.failed(e)

    async def _incr(self, backend_id: str, model: str) -> bool:
        """Count the request in the store; False when the store refused (the mirror still counts)."""
        if not self._health.up:
            return False
        try:
            await self._store.incr_in_flight(backend_id, model)
        except Exception as e:  # routing goes on with the local mirror
            self._health.failed(e)
            self._needs_repair()  # it may have counted it all the same
            return False
        self._pool.note_stored(backend_id, model, +1)
        return True

    async def _decr_after(self, incr: asyncio.Future[bool], backend_id: str, model: str) -> None:
        await asyncio.wait([incr])
        if incr.cancelled() or incr.exception() is not None or not incr.result():
            return  # never counted there: a decrement would eat another request's count
        await self._decr(backend_id, model)

    async def _decr(self, backend_id: str, model: str) -> None:
        key = (backend_id, model)
        self._decrementing[key] += 1
        try:
            await self._store.decr_in_flight(backend_id, model)
        except Exception as e:
            self._health.failed(e)
            self._needs_repair()
        finally:
            self._decrementing[key] -= 1
            if self._decrementing[key] <= 0:
                del self._decrementing[key]
        # Not counted any more as far as this gateway knows; a repair makes the store agree.
        self._pool.note_stored(backend_id, model, -1)

    def _needs_repair(self) -> None:
        if self._repair is None or self._repair.done():
            self._repair = asyncio.create_task(self._repair_loop(), name="corral-in-flight-repair")

    async def _repair_loop(self) -> None:
        """Until the store takes it: this gateway's counters there := its own requests it counted."""
        while True:
            await asyncio.sleep(REPAIR_INTERVAL_S)
            try:
                await self.repair()
            except Exception as e:
                reraise_if_cancelled()
                self._health.failed(e)
                continue
            return

    async def repair(self) -> None:
        """Replace this gateway's counters in the store with its own count (raises the store's error).

        Decrements still on their way are left out, and so are increments not yet confirmed (they
        are not in the pool's stored count): whichever side of the replacement they land on, the
        store can then only count too few for a moment, which the decrement's stop at zero heals,
        never one too many, which nothing would."""
        counts: dict[str, dict[str, int]] = {}
        for (backend_id, model), n in self._pool.stored().items():
            left = n - self._decrementing.get((backend_id, model), 0)
            if left > 0:
                counts.setdefault(backend_id, {})[model] = left
        await self._store.put_own_in_flight(counts)

    async def settle(self) -> None:
        """Wait for pending decrements (at shutdown, so the store is left balanced); a repair still
        owed gets one last try."""
        if self._pending:
            await asyncio.wait(list(self._pending))
        if self._repair is not None and not self._repair.done():
            self._repair.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._repair
            try:
                async with asyncio.timeout(STORE_WAIT_S):
                    await self.repair()
            except Exception as e:  # what is left expires with this gateway's TTL there
                reraise_if_cancelled()
                self._health.failed(e)


async def _done(token: str) -> str:
    return token


class _LocalHold:
    """`InFlight.hold` over the in-process store: the pool's count is the whole fleet's there."""

    __slots__ = ("_pool", "_work")

    def __init__(self, pool: BackendPool, work: Work) -> None:
        self._pool = pool
        self._work = work

    async def __aenter__(self) -> Work:
        return self._work

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._pool.end(self._work)
