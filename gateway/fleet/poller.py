"""Background work that keeps the pool current: records, health checks, /api/tags and /api/ps.

One task follows the state store (backend records and the fleet-wide in-flight counters); each
backend then gets a health task (GET /api/version every health_interval_s: cheap, never a model
call that could load weights) and a poll task (/api/tags and /api/ps every poll_interval_s while
healthy). Model facts are fetched once per model, from the catalog or the backend's /api/show.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aiohttp

from gateway.config import GatewaySettings
from gateway.fleet.modelfacts import facts_from_catalog, facts_from_show
from gateway.fleet.pool import BackendPool, row_model_name
from gateway.fleet.records import RecordMemory
from gateway.fleet.storewatch import StoreWatch
from gateway.metrics import Metrics
from gateway.state.health import StoreHealth
from gateway.state.store import StateStore
from launcher.models.show import needs_verbose

log = logging.getLogger(__name__)

# A model whose /api/show failed is asked again after this long.
FACTS_RETRY_S = 60.0
# stop(): cancel, wait this long, cancel again what still runs; this many times at most.
STOP_ROUND_S = 1.0
STOP_ROUNDS = 10
# First re-probe delay of a backend that has not answered yet; doubles up to health_interval_s.
FIRST_PROBE_BACKOFF_S = 0.2


class Poller:
    """Owns the pool's background tasks. `start()` does a first full round before returning, so a
    gateway that starts serving already knows its backends' models."""

    def __init__(
        self,
        settings: GatewaySettings,
        pool: BackendPool,
        store: StateStore,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        watch: StoreWatch | None = None,
        store_health: StoreHealth | None = None,
    ) -> None:
        self.settings = settings
        self.watch = watch or StoreWatch()
        self.pool = pool
        self.store = store
        self.session = session
        self.metrics = metrics
        self._tasks: dict[str, list[asyncio.Task[None]]] = {}
        self._main: asyncio.Task[None] | None = None
        self._facts_pending: set[str] = set()
        self._facts_failed_at: dict[str, float] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # Short: a hung backend must be found out within about one interval plus two timeouts.
        self._check_timeout = aiohttp.ClientTimeout(
            total=settings.health_timeout_s, connect=min(settings.connect_timeout_s, settings.health_timeout_s)
        )
        self.store_health = store_health or StoreHealth("gateway")
        self._records = RecordMemory()

    async def start(self) -> None:
        try:
            await self.sync_records()
        except Exception as e:
            self.watch.failed(e)
            raise
        await self.read_inventory()
        await asyncio.gather(*(self._first_round(b) for b in self.pool.ids()))
        self._main = asyncio.create_task(self._follow_store(), name="corral-records")

    async def stop(self) -> None:
        tasks = [t for ts in self._tasks.values() for t in ts] + list(self._background)
        if self._main is not None:
            tasks.append(self._main)
        # A cancellation can be swallowed inside a store client (redis-py, mid-reconnect) and the
        # loop then runs on: cancel again until every task has ended, a bounded number of times.
        pending = set(tasks)
        for _ in range(STOP_ROUNDS):
            if not pending:
                break
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=STOP_ROUND_S)
        if pending:
            log.warning("poller: %d tasks did not stop", len(pending))
        for task in tasks:
            if task.done() and not task.cancelled():
                with contextlib.suppress(Exception):
                    task.result()  # retrieved, so asyncio does not log it as never retrieved
        self._tasks.clear()
        self._main = None

    # -- records ---------------------------------------------------------------------------------

    async def sync_records(self) -> None:
        """Adopt the store's records (see RecordMemory for what a missing one means). Raises the
        store's error after noting it in `store_health` (one warning per outage)."""
        try:
            records = await self.store.list_backends()
            generation = await self.store.generation()
            in_flight = await self.store.in_flight()
        except Exception as e:
            _reraise_if_cancelled(e)
            self.store_health.failed(e)
            raise
        self.store_health.succeeded()
        healthy = {
            backend_id: record
            for backend_id in self.pool.ids()
            if self.pool.healthy(backend_id) and (record := self.pool.record(backend_id)) is not None
        }
        records = self._records.merge(records, generation, healthy)
        changes = self.pool.sync_records(records)
        for backend_id in changes.removed:
            for task in self._tasks.pop(backend_id, []):
                task.cancel()
            log.info("<%s> removed", backend_id)
        for backend_id in changes.added:
            record = self.pool.record(backend_id)
            log.info("<%s> added: %s", backend_id, record.url if record else "?")
        for backend_id in changes.changed:
            record = self.pool.record(backend_id)
            log.info("<%s> now %s", backend_id, record.state if record else "?")
        if self._main is not None:  # after start(): new backends get their first round in their tasks
            for backend_id in changes.added:
                self._start_tasks(backend_id)
        self.pool.replace_in_flight(in_flight)

    async def _follow_store(self) -> None:
        for backend_id in self.pool.ids():
            if backend_id not in self._tasks:
                self._start_tasks(backend_id)
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.sync_records()
            except Exception as e:  # a store hiccup (Redis restart) must not stop the gateway
                _reraise_if_cancelled(e)
                self.watch.failed(e)  # sync_records warned (once per outage, StoreHealth)
                continue
            await self.read_inventory()

    async def read_inventory(self) -> None:
        """The launchers' GPU rows, for /metrics; marks the store up or down by whether it answered."""
        try:
            gpus = await self.store.list_gpus()
        except Exception as e:
            _reraise_if_cancelled(e)
            self.watch.failed(e)
            return
        self.watch.set_inventory(gpus)
        self.watch.answered()

    def _start_tasks(self, backend_id: str) -> None:
        self._tasks[backend_id] = [
            asyncio.create_task(self._health_loop(backend_id), name=f"corral-health-{backend_id}"),
            asyncio.create_task(self._poll_loop(backend_id), name=f"corral-poll-{backend_id}"),
        ]

    async def _first_round(self, backend_id: str) -> None:
        if await self.check(backend_id):
            await self.poll(backend_id)

    # -- health ----------------------------------------------------------------------------------

    async def check(self, backend_id: str) -> bool:
        """One health check; updates the pool. Returns whether the backend answered."""
        record = self.pool.record(backend_id)
        if record is None:
            return False
        try:
            async with self.session.get(record.url + "/api/version", timeout=self._check_timeout) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(
                        resp.request_info, (), status=resp.status, message=resp.reason or ""
                    )
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            if self.pool.mark_failure(backend_id, _describe(e)):
                self.metrics.ejections.labels(backend_id).inc()
            return False
        version = body.get("version") if isinstance(body, dict) else None
        self.pool.mark_success(backend_id, str(version) if version else None)
        return True

    async def _health_loop(self, backend_id: str) -> None:
        # Until its first success a backend is probed on a short backoff (a static backend that was
        # not up when the gateway started is in within ~0.2-1 s of coming up, not one interval).
        backoff_s = FIRST_PROBE_BACKOFF_S
        ever_healthy = self._healthy(backend_id)
        while True:
            was_healthy = self._healthy(backend_id)
            ok = await self.check(backend_id)
            if ok and not was_healthy and self._healthy(backend_id):
                await self.poll(backend_id)  # back in: learn what it holds before routing to it
            ever_healthy = ever_healthy or self._healthy(backend_id)
            if not ok and self._healthy(backend_id):
                continue  # a first failure is re-probed at once: a hung backend is out after two
            if not ever_healthy:
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, self.settings.health_interval_s)
                continue
            await asyncio.sleep(self.settings.health_interval_s)

    def _healthy(self, backend_id: str) -> bool:
        return self.pool.healthy(backend_id)

    # -- polls -----------------------------------------------------------------------------------

    async def poll(self, backend_id: str) -> bool:
        """Fetch /api/tags and /api/ps into the pool. Returns whether both answered."""
        record = self.pool.record(backend_id)
        if record is None:
            return False
        started_at = time.time()
        try:
            tags, ps = await asyncio.gather(
                self._get_json(record.url + "/api/tags"), self._get_json(record.url + "/api/ps")
            )
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.debug("<%s> poll failed: %s", backend_id, _describe(e))
            return False
        # The pool announces what changed (inventory, residency) through its change signal.
        self.pool.apply_tags(backend_id, _models(tags))
        self.pool.apply_ps(backend_id, _models(ps), started_at)
        self._learn_facts(backend_id)
        return True

    async def _poll_loop(self, backend_id: str) -> None:
        while True:
            if self._healthy(backend_id):
                await self.poll(backend_id)
            await asyncio.sleep(self.settings.poll_interval_s)

    async def _get_json(self, url: str, payload: dict[str, Any] | None = None) -> Any:
        method = "POST" if payload is not None else "GET"
        async with self.session.request(method, url, json=payload, timeout=self._check_timeout) as resp:
            if resp.status != 200:
                raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status, message=resp.reason or "")
            return await resp.json(content_type=None)

    # -- model facts -----------------------------------------------------------------------------

    def _learn_facts(self, backend_id: str) -> None:
        now = time.time()
        for tag in self.pool.tags(backend_id):
            name = row_model_name(tag)
            if not name or self.pool.has_facts(name) or name in self._facts_pending:
                continue
            raw_size = tag.get("size")
            size = int(raw_size) if isinstance(raw_size, int | float) else 0
            facts = facts_from_catalog(name, size)
            if facts is not None:
                self.pool.set_facts(name, facts)
            elif now - self._facts_failed_at.get(name, -FACTS_RETRY_S) >= FACTS_RETRY_S:
                self._facts_pending.add(name)
                task = asyncio.create_task(self._fetch_facts(backend_id, name, str(tag.get("model") or name), size))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _fetch_facts(self, backend_id: str, name: str, wire_name: str, size: int) -> None:
        record = self.pool.record(backend_id)
        try:
            if record is None:
                return
            show = await self._get_json(record.url + "/api/show", {"model": wire_name})
            if isinstance(show, dict) and needs_verbose(show):  # per-layer arrays: verbose only
                show = await self._get_json(record.url + "/api/show", {"model": wire_name, "verbose": True})
            facts = facts_from_show(name, show, size) if isinstance(show, dict) else None
            if facts is None:
                self._facts_failed_at[name] = time.time()
            else:
                self.pool.set_facts(name, facts)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.debug("<%s> /api/show %s failed: %s", backend_id, name, _describe(e))
            self._facts_failed_at[name] = time.time()
        finally:
            self._facts_pending.discard(name)


def _reraise_if_cancelled(error: Exception) -> None:
    """Raise CancelledError when this task is being cancelled. redis-py can turn a cancellation
    that lands mid-command into a ConnectionError; a loop that shrugs off store errors would then
    run on after `stop()` cancelled it, and the gateway would never finish shutting down."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from error


def _models(body: Any) -> list[dict[str, Any]]:
    models = body.get("models") if isinstance(body, dict) else None
    return [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
