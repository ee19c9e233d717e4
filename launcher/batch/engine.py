"""The batch engine: send items with a bounded number in flight, retry backend faults, yield results.

`run_batch(items, options)` is an async generator: results come out as items finish, in finishing
order, each item exactly once. Whose fault a failed reply is comes from `launcher.facts.faults`
(the gateway's rule): backend faults (connection errors, timeouts, 502/503/504, 500s that are not
about the request) are retried with capped, jittered exponential back-off that honours Retry-After;
request errors (4xx and the rest) end the item at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import aiohttp

from launcher.batch.aimd import Aimd
from launcher.batch.items import InputError, parse_item
from launcher.batch.stats import BatchStats
from launcher.batch.types import (
    BACKEND_HEADER,
    PRIORITY_HEADER,
    BatchItem,
    BatchOptions,
    DuplicateIdError,
    Endpoint,
    ItemResult,
)
from launcher.facts.faults import is_backend_fault

CAPACITY_PATH = "/api/corral/capacity"
MAX_RETRY_AFTER_S = 60.0  # a Retry-After longer than this is capped: the run must go on
_DONE = object()


def error_text(status: int, raw: bytes) -> str:
    """The error message of a failed reply: Ollama's {"error": "..."}, OpenAI's {"error": {"message"}},
    or the body itself."""
    text = raw.decode("utf-8", "replace").strip()
    with contextlib.suppress(ValueError):
        body = json.loads(text)
        if isinstance(body, dict):
            err = body.get("error")
            if isinstance(err, dict):
                err = err.get("message")
            if isinstance(err, str):
                return err
    return text[:500] or f"HTTP {status}"


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After", "")
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return None  # an HTTP date: rare from Ollama or Corral; fall back to our own back-off


def token_counts(endpoint: Endpoint, reply: Any) -> tuple[int, int]:
    """(prompt tokens, output tokens) a reply reports."""
    if not isinstance(reply, dict):
        return 0, 0
    if endpoint == Endpoint.OPENAI_CHAT:
        usage = reply.get("usage") or {}
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return int(reply.get("prompt_eval_count") or 0), int(reply.get("eval_count") or 0)


class _Run:
    """One batch run's shared state: the session, the limit, the in-flight count."""

    def __init__(self, session: aiohttp.ClientSession, options: BatchOptions, stats: BatchStats) -> None:
        self.session = session
        self.options = options
        self.stats = stats
        self.url = options.url.rstrip("/")
        if options.concurrency is not None:
            self.limit = Aimd.fixed_at(options.concurrency)
        else:
            self.limit = Aimd(limit=float(options.start_concurrency), ceiling=options.max_concurrency)
        self.in_flight = 0
        self.changed = asyncio.Condition()
        self.models: set[str] = set()
        self.has_capacity_route: bool | None = None if options.concurrency is None else False
        self.headers = {PRIORITY_HEADER: options.priority, **options.extra_headers}
        if options.api_key:
            self.headers["Authorization"] = f"Bearer {options.api_key}"

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    # -- capacity -----------------------------------------------------------------------------

    async def refresh_capacity(self) -> None:
        """Ask the gateway for the fleet's slots for every model seen; a server without the route
        (plain Ollama: 404) leaves the limit to AIMD for the rest of the run."""
        total = 0
        for model in sorted(self.models):
            try:
                async with self.session.get(
                    self.url + CAPACITY_PATH,
                    params={"model": model},
                    headers=self.headers,
                    timeout=aiohttp.ClientTimeout(total=10),
                ) as resp:
                    if resp.status != 200:
                        if self.has_capacity_route is None:
                            self.has_capacity_route = False
                        return
                    body = await resp.json()
            except (aiohttp.ClientError, TimeoutError, ValueError):
                return  # keep the current limit; the next refresh tries again
            self.has_capacity_route = True
            entry = (body.get("models") or {}).get(model) or {}
            total += int(entry.get("slots") or 0)
        if total > 0:
            before = self.limit.current
            # A few more than the slots: the extra requests wait in the gateway's queue, so a slot that
            # frees is refilled at once instead of idling for our round trip to send the next item.
            self.limit.set_target(total + max(1, total // 4))
            if self.limit.current != before:
                await self.notify()

    async def keep_capacity_fresh(self) -> None:
        while self.has_capacity_route:
            await asyncio.sleep(self.options.capacity_refresh_s)
            await self.refresh_capacity()

    # -- one item -------------------------------------------------------------------------------

    async def run_item(self, item: BatchItem) -> ItemResult:
        opts = self.options
        started = time.monotonic()
        attempts, status, message, backend = 0, None, "", None
        while True:
            attempts += 1
            retry_after = None
            try:
                async with self.session.post(
                    self.url + item.endpoint.path,
                    json=dict(item.body),
                    headers=self.headers,
                    timeout=aiohttp.ClientTimeout(total=opts.timeout_s),
                ) as resp:
                    status = resp.status
                    backend = resp.headers.get(BACKEND_HEADER)
                    raw = await resp.read()
                    retry_after = retry_after_s(resp.headers)
                self.stats.note_request(backend)
                if status == 200:
                    try:
                        reply = json.loads(raw)
                    except ValueError:
                        message = "the reply is not JSON: " + raw[:200].decode("utf-8", "replace")
                        fault = True
                    else:
                        self.limit.on_success()
                        prompt, output = token_counts(item.endpoint, reply)
                        return ItemResult(
                            item.id, item.key, True, response=reply, status=200, backend=backend,
                            attempts=attempts, seconds=time.monotonic() - started,
                            prompt_tokens=prompt, output_tokens=output, line=item.line,
                        )  # fmt: skip
                else:
                    message = error_text(status, raw)
                    fault = is_backend_fault(status, message)
                    if status == 503:
                        self.limit.on_overload()
            except TimeoutError:
                status, message, fault = None, f"no answer within --timeout-s {opts.timeout_s:g}", True
            except aiohttp.ClientError as e:
                status, message, fault = None, f"{type(e).__name__}: {e}", True
            if not fault or attempts > opts.retries:
                return ItemResult(
                    item.id, item.key, False, status=status, error=message, backend=backend,
                    attempts=attempts, seconds=time.monotonic() - started, line=item.line,
                )  # fmt: skip
            backoff = min(opts.backoff_cap_s, opts.backoff_base_s * 2 ** (attempts - 1))
            delay = backoff * random.uniform(0.5, 1.0)  # jitter: retries of one outage do not march in step
            if retry_after is not None:
                delay = max(delay, retry_after)
            await asyncio.sleep(delay)

    async def run_and_report(self, item: BatchItem, out: asyncio.Queue[Any]) -> None:
        try:
            result = await self.run_item(item)
            self.stats.add(result)
            await out.put(result)
        finally:
            self.in_flight -= 1
            await self.notify()

    # -- the feed ---------------------------------------------------------------------------------

    async def feed(
        self, items: Iterable[BatchItem | Mapping[str, Any]], out: asyncio.Queue[Any], stop: asyncio.Event
    ) -> None:
        """Start items as the limit allows; stop starting when `stop` is set; wait for the rest."""
        tasks: set[asyncio.Task[None]] = set()
        seen: set[str] = set()
        refresher: asyncio.Task[None] | None = None
        try:
            for index, entry in enumerate(items, start=1):
                if stop.is_set():
                    break
                item = entry if isinstance(entry, BatchItem) else self._to_item(entry, index)
                if isinstance(item, ItemResult):
                    self.stats.add(item)
                    await out.put(item)
                    continue
                if item.key in seen:
                    raise DuplicateIdError(item.key, item.line, 0)
                seen.add(item.key)
                model = str(item.body.get("model"))
                if model not in self.models:
                    self.models.add(model)
                    if self.has_capacity_route is not False:
                        await self.refresh_capacity()
                        if self.has_capacity_route and refresher is None:
                            refresher = asyncio.create_task(self.keep_capacity_fresh())
                async with self.changed:
                    while self.in_flight >= self.limit.current and not stop.is_set():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self.changed.wait(), 1.0)
                if stop.is_set():
                    break
                self.in_flight += 1
                task = asyncio.create_task(self.run_and_report(item, out))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.wait(set(tasks))
            await out.put(_DONE)
        except BaseException as e:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await out.put(e)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            if refresher is not None:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher

    def _to_item(self, entry: Mapping[str, Any], index: int) -> BatchItem | ItemResult:
        parsed = parse_item(dict(entry), index, model=self.options.model, endpoint=self.options.endpoint)
        if isinstance(parsed, InputError):
            return ItemResult(parsed.id, parsed.key, False, status=400, error=parsed.message)
        return parsed


async def run_batch(
    items: Iterable[BatchItem | Mapping[str, Any]],
    options: BatchOptions,
    *,
    stop: asyncio.Event | None = None,
    stats: BatchStats | None = None,
    session: aiohttp.ClientSession | None = None,
) -> AsyncIterator[ItemResult]:
    """Run `items` (BatchItems, or input objects as dicts: `id` plus the endpoint's body) and yield
    one ItemResult per item as it finishes.

    Raises DuplicateIdError at the first id met twice (items before it may have been sent). Setting
    `stop` stops starting items; those in flight finish and are yielded, then the generator ends.
    Closing the generator early (or cancelling its consumer) cancels what is in flight. `stats`, when
    given, is updated as results come (the CLI's progress reads it). `session`: a ClientSession to
    use (not closed here); by default one is made for the run.
    """
    stop = stop or asyncio.Event()
    stats = stats if stats is not None else BatchStats()
    own_session = session is None
    if session is None:
        # No connection cap: the limit above bounds what is in flight.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=False)
    run = _Run(session, options, stats)
    out: asyncio.Queue[Any] = asyncio.Queue()
    feeder = asyncio.create_task(run.feed(items, out, stop))
    stop_waiter = asyncio.create_task(_notify_on(stop, run))
    try:
        while True:
            got = await out.get()
            if got is _DONE:
                break
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop_waiter.cancel()
        feeder.cancel()
        await asyncio.gather(feeder, stop_waiter, return_exceptions=True)
        if own_session:
            await session.close()


async def _notify_on(stop: asyncio.Event, run: _Run) -> None:
    # Wake the feed the moment `stop` is set, so it does not wait for a slot to free.
    await stop.wait()
    await run.notify()
