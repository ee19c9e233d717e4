"""Blob uploads (POST /api/blobs/:digest) to every distinct model store at once.

Blobs are model files, gigabytes long, so the body is streamed, never held: each chunk read from
the client goes to one small queue per backend, and the slowest backend paces the upload. A
backend that fails stops taking chunks; the others carry on. The request body size limit does not
apply here (blob routes are management routes, admin-only when admin keys exist).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web

from gateway import appkeys
from gateway.api.fanout import Reply
from gateway.routing.snapshot import BackendView

CHUNK_BYTES = 1024 * 1024
QUEUE_CHUNKS = 4


class _Sink:
    """One backend's share of the upload: a bounded queue its request body reads from."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=QUEUE_CHUNKS)
        self.closed = False

    async def body(self) -> AsyncIterator[bytes]:
        while (chunk := await self.queue.get()) is not None:
            yield chunk

    def close(self) -> None:
        """The backend's request ended: drop what is queued so the feeder never blocks on it."""
        self.closed = True
        while not self.queue.empty():
            self.queue.get_nowait()


async def _send(
    session: aiohttp.ClientSession, backend: BackendView, path: str, sink: _Sink, client_timeout: aiohttp.ClientTimeout
) -> Reply:
    try:
        async with session.post(
            backend.record.url + path,
            data=sink.body(),
            headers={"Content-Type": "application/octet-stream"},
            timeout=client_timeout,
        ) as resp:
            raw = await resp.read()
            return Reply(backend.record.id, resp.status, raw, resp.headers.get("Content-Type", "application/json"))
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        return Reply(backend.record.id, None, error=f"backend {backend.record.id}: {type(e).__name__}: {e}")
    finally:
        sink.close()


async def _feed(request: web.Request, sinks: Sequence[_Sink]) -> None:
    try:
        async for chunk in request.content.iter_chunked(CHUNK_BYTES):
            for sink in sinks:
                if not sink.closed:
                    await sink.queue.put(chunk)
    finally:
        # Also when reading the client failed: the backends then see a short body and refuse it
        # (digest mismatch) instead of waiting for more.
        for sink in sinks:
            if not sink.closed:
                await sink.queue.put(None)


async def upload_to_all(request: web.Request, targets: Sequence[BackendView]) -> list[Reply]:
    app = request.app
    connect_s = app[appkeys.SETTINGS].connect_timeout_s
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_s)
    sinks = [_Sink() for _ in targets]
    senders = [
        asyncio.create_task(_send(app[appkeys.SESSION], b, request.path, s, timeout))
        for b, s in zip(targets, sinks, strict=True)
    ]
    feeder = asyncio.create_task(_feed(request, sinks))
    try:
        replies = list(await asyncio.gather(*senders))
        if not feeder.done():  # every backend ended early: stop reading the client
            feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder
        return replies
    finally:
        for task in (*senders, feeder):
            task.cancel()
