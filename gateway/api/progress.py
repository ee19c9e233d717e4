"""One progress stream out of several: pull and create run on one backend per model store at
once, and the client sees a single NDJSON stream (or, with "stream": false, a single reply).

Every backend's reply is read by its own task into one bounded queue (so a slow client slows the
backends' streams rather than filling memory). Nothing is sent until each backend has either
started streaming or failed: if all failed, the client gets the first backend's own error reply,
as one Ollama would have answered. Once streaming, failures are reported in the final line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from gateway import appkeys
from gateway.api.errors import BACKEND_HEADER, error_for, error_text
from gateway.api.fanout import ProgressMerger, ndjson_lines
from gateway.routing.snapshot import BackendView

QUEUE_SIZE = 64


@dataclass(frozen=True)
class _Line:
    backend_id: str
    value: dict[str, Any]


@dataclass(frozen=True)
class _Refused:
    """The backend answered with an error status before streaming."""

    backend_id: str
    status: int
    body: bytes
    content_type: str


@dataclass(frozen=True)
class _Broken:
    """The backend could not be reached, or its stream broke."""

    backend_id: str
    message: str


@dataclass(frozen=True)
class _Done:
    backend_id: str


_Event = _Line | _Refused | _Broken | _Done


async def _pump(
    session: aiohttp.ClientSession,
    backend: BackendView,
    path: str,
    body: bytes,
    client_timeout: aiohttp.ClientTimeout,
    queue: asyncio.Queue[_Event],
) -> None:
    backend_id = backend.record.id
    try:
        async with session.post(
            backend.record.url + path, data=body, headers={"Content-Type": "application/json"}, timeout=client_timeout
        ) as resp:
            if resp.status != 200:
                raw = await resp.read()
                await queue.put(_Refused(backend_id, resp.status, raw, resp.headers.get("Content-Type", "")))
            else:
                async for value in ndjson_lines(resp):
                    await queue.put(_Line(backend_id, value))
    except Exception as e:  # whatever ends a pump must reach the merge, which waits for every _Done
        await queue.put(_Broken(backend_id, f"{type(e).__name__}: {e}"))
    # Not in a `finally`: a pump is cancelled when the merge is over, and then nobody reads the
    # queue any more; waiting for room in it would never end.
    await queue.put(_Done(backend_id))


def _line(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode() + b"\n"


async def merged_progress(
    request: web.Request, path: str, targets: Sequence[BackendView], body: bytes, stream: bool
) -> web.StreamResponse:
    """Run `path` on every target and answer with one merged progress reply."""
    app = request.app
    connect_s = app[appkeys.SETTINGS].connect_timeout_s
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_s)
    queue: asyncio.Queue[_Event] = asyncio.Queue(maxsize=QUEUE_SIZE)
    ids = [b.record.id for b in targets]
    tasks = [asyncio.create_task(_pump(app[appkeys.SESSION], b, path, body, timeout, queue)) for b in targets]
    try:
        return await _merge(request, ids, queue, stream)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _merge(
    request: web.Request, ids: Sequence[str], queue: asyncio.Queue[_Event], stream: bool
) -> web.StreamResponse:
    merger = ProgressMerger(ids)
    refused: list[_Refused] = []
    started: set[str] = set()
    done: set[str] = set()
    held: list[_Event] = []
    # Hold events until every backend has either started or ended.
    while len(started | done) < len(ids):
        event = await queue.get()
        held.append(event)
        if isinstance(event, _Line):
            started.add(event.backend_id)
        elif isinstance(event, _Done):
            done.add(event.backend_id)
    if not started:
        for event in held:
            if isinstance(event, _Refused):
                refused.append(event)
        if refused:
            first = refused[0]
            return web.Response(
                status=first.status,
                body=first.body,
                headers={"Content-Type": first.content_type or "application/json", BACKEND_HEADER: first.backend_id},
            )
        broken = [e.message for e in held if isinstance(e, _Broken)]
        return error_for(request, 502, "; ".join(broken) or "no backend answered")

    response: web.StreamResponse | None = None
    if stream:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "X-Accel-Buffering": "no"})
        await response.prepare(request)

    async def handle(event: _Event) -> None:
        if isinstance(event, _Line):
            merged = merger.feed(event.backend_id, event.value)
            if merged is not None and response is not None:
                await response.write(_line(merged))
        elif isinstance(event, _Refused):
            merger.fail(event.backend_id, error_text(event.body, event.status))
        elif isinstance(event, _Broken):
            merger.fail(event.backend_id, event.message)
        else:
            merger.finish(event.backend_id)
            done.add(event.backend_id)

    done.clear()
    for event in held:
        await handle(event)
    while len(done) < len(ids):
        await handle(await queue.get())
    final = merger.final()
    if response is not None:
        await response.write(_line(final))
        await response.write_eof()
        return response
    if "error" in final:
        return web.json_response(final, status=500)
    return web.json_response(final)
