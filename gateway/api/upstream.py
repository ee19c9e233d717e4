"""A lean HTTP/1.1 client for model calls to the backends: pooled keep-alive connections per
backend over asyncio protocols, replies parsed by httptools (llhttp, as uvicorn uses it).

Why not aiohttp's client, which the gateway uses for everything else: a model call's reply is relayed
chunk by chunk, and aiohttp's client runs several Python layers per upstream chunk (its parser,
payload stream, and timers) that the relay does not need. Here one `data_received` feeds llhttp,
which calls back once per body piece; the pieces wait in a small queue until the relay takes them,
all of them at once. Backpressure: past `_HIGH_WATER_BYTES` unread, reading from the backend pauses
until the relay catches up, so a slow client slows the backend instead of filling memory.

Contract (what `gateway.api.proxy` relies on):
- `UpstreamPool.request` returns once the reply's status line and headers arrived, or raises
  `UpstreamError` (a ConnectionError: refused, reset, timed out connecting, a malformed reply),
  or TimeoutError past its `deadline`.
- `UpstreamResponse.readany()` returns the next body bytes (de-chunked), b"" at the end, and raises
  `UpstreamError` when the backend fails mid-body.
- `UpstreamResponse.close()` hands a finished connection back to the pool and closes any other one,
  which is how a backend learns that the client went away.
- Not for HEAD: llhttp would wait for the body a HEAD reply announces (model calls never use it).
- A request on a reused connection that the backend had already closed (it fails before any reply
  byte) is sent again once on a fresh connection; nothing else is ever re-sent from here.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from launcher.facts.ollama import host_port

_HIGH_WATER_BYTES = 256 * 1024
_MAX_IDLE_PER_BACKEND = 128


class UpstreamError(ConnectionError):
    """The backend could not be reached, or failed before its reply ended."""


class _Connection(asyncio.Protocol):
    """One TCP connection to a backend and the reply being read on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._reset_reply()
        self.reused = False
        self.closed = False
        # One watchdog timer per connection instead of one per wait (see `_wait`).
        self._deadline = 0.0  # loop time the current wait ends at
        self._watchdog: asyncio.TimerHandle | None = None
        self._watched: asyncio.Future[None] | None = None

    def _reset_reply(self) -> None:
        self.status = 0
        self.reason = ""
        self._header_list: list[tuple[str, str]] = []
        self._headers_done: asyncio.Future[None] = self._loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self.complete = False
        self._keep_alive = False
        self.error: UpstreamError | None = None
        self.got_bytes = False

    # asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass, so no isinstance).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("the backend switched protocols"))
        except httptools.HttpParserError as e:
            self._fail(UpstreamError(f"malformed reply from the backend: {e}"))
        # Once per read, not per body piece: a read often holds many chunks of a token stream.
        if self._buffered > _HIGH_WATER_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        if self._chunks:
            self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and exc is None and self._close_delimited():
            # A reply framed by closing the connection (no length, not chunked) ends here.
            self.complete = True
            self._wake()
            return
        if not self.complete:
            reason = f": {exc}" if exc else ""
            self._fail(UpstreamError(f"the backend closed the connection before the reply ended{reason}"))

    def _close_delimited(self) -> bool:
        done = self._headers_done
        # Cancelled: the client hung up while its request waited for headers (exception() would raise).
        if not done.done() or done.cancelled() or done.exception() is not None:
            return False
        names = {name.lower(): value.lower() for name, value in self._header_list}
        return "content-length" not in names and "chunked" not in names.get("transfer-encoding", "")

    # httptools callbacks ------------------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_list.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        # llhttp answers this only until the message completes; ask now.
        self._keep_alive = self._parser.should_keep_alive()
        if not self._headers_done.done():
            self._headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # the reply, for UpstreamResponse --------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        if not self._headers_done.done():
            self._headers_done.set_exception(error)
            self._headers_done.exception()  # retrieved: a request cancelled meanwhile must not warn
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    async def headers(self, deadline: float | None = None) -> CIMultiDictProxy[str]:
        """The reply's headers; TimeoutError past `deadline` (loop time; None: no bound)."""
        if not self._headers_done.done():
            await self._wait(self._headers_done, deadline)
        self._headers_done.result()
        return CIMultiDictProxy(CIMultiDict(self._header_list))

    async def readany(self, idle_timeout_s: float | None = None) -> bytes:
        while not self._chunks:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            waiter = self._waiter = self._loop.create_future()
            try:
                deadline = None if idle_timeout_s is None else self._loop.time() + idle_timeout_s
                await self._wait(waiter, deadline)
            finally:
                self._waiter = None
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def _wait(self, waiter: asyncio.Future[None], deadline: float | None) -> None:
        """Wait for `waiter`, failing it with TimeoutError at `deadline`. A token stream waits once
        per read, thousands of times a second over a connection: arming and cancelling a timer
        each time was a large part of relaying a chunk. So one watchdog per connection stays armed
        across waits; when it fires it re-arms for the current wait's deadline if that is later,
        and only then expires the wait."""
        if deadline is None:
            self._deadline = 0.0
            await waiter
            return
        self._deadline = deadline
        self._watched = waiter
        watchdog = self._watchdog
        if watchdog is None or watchdog.when() > deadline:
            if watchdog is not None:
                watchdog.cancel()
            self._watchdog = self._loop.call_at(deadline, self._on_watchdog)
        await waiter

    def _on_watchdog(self) -> None:
        self._watchdog = None
        waiter = self._watched
        if waiter is None or waiter.done() or not self._deadline:
            return  # between waits, or a wait without a bound: the next bounded wait re-arms
        if self._loop.time() < self._deadline:
            self._watchdog = self._loop.call_at(self._deadline, self._on_watchdog)
            return
        waiter.set_exception(TimeoutError())

    def reusable(self) -> bool:
        return self.complete and not self.closed and self.error is None and self._keep_alive

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


class UpstreamResponse:
    """A backend's reply: status and headers are here; the body is read with `readany()`."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int], conn: _Connection, headers: CIMultiDictProxy[str]):
        self._pool = pool
        self._key = key
        self._conn = conn
        self.status = conn.status
        self.reason = conn.reason
        self.headers = headers
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None
        self._released = False

    async def readany(self, idle_timeout_s: float | None = None) -> bytes:
        """The body bytes that arrived since the last call (waiting for some), b"" at the end.
        TimeoutError when nothing came for `idle_timeout_s` (None: no bound)."""
        return await self._conn.readany(idle_timeout_s)

    async def read(self, limit: int) -> bytes:
        """Up to `limit` bytes of the body (less at its end)."""
        body = bytearray()
        while len(body) < limit:
            chunk = await self.readany()
            if not chunk:
                break
            body += chunk
        return bytes(body[:limit])

    def close(self) -> None:
        """Back to the pool when the reply was read to its end, else closed."""
        if self._released:
            return
        self._released = True
        if self._conn.reusable():
            self._pool._release(self._key, self._conn)
        else:
            self._conn.abort()


class UpstreamPool:
    """Keep-alive connections to each backend (host, port), reused most recent first."""

    def __init__(self, max_idle_per_backend: int = _MAX_IDLE_PER_BACKEND) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._max_idle = max_idle_per_backend

    async def request(
        self,
        method: str,
        host: str,
        port: int,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        *,
        connect_timeout_s: float,
        deadline: float | None = None,
    ) -> UpstreamResponse:
        """Send one request and wait for the reply's headers. Raises UpstreamError, and
        TimeoutError when they have not come by `deadline` (loop time; None: no bound)."""
        key = (host, port)
        head = _request_head(method, host, port, target, headers, len(body))
        conn = self._take_idle(key)
        if conn is not None:
            try:
                return await self._send(key, conn, head, body, deadline)
            except UpstreamError:
                # The backend closed this idle connection just before we used it (no reply byte
                # came): the request never ran there, so it goes once more on a new connection.
                if conn.got_bytes:
                    raise
        async with asyncio.timeout_at(deadline):
            conn = await self._connect(host, port, connect_timeout_s)
        return await self._send(key, conn, head, body, deadline)

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
        self._idle.clear()

    def _take_idle(self, key: tuple[str, int]) -> _Connection | None:
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                conn._reset_reply()
                conn.reused = True
                return conn
        return None

    def _release(self, key: tuple[str, int], conn: _Connection) -> None:
        conns = self._idle.setdefault(key, [])
        if len(conns) >= self._max_idle:
            conn.abort()
            return
        conns.append(conn)

    async def _connect(self, host: str, port: int, timeout_s: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await loop.create_connection(lambda: _Connection(loop), host, port)
        except TimeoutError:
            raise UpstreamError(f"connecting to {host}:{port} timed out after {timeout_s:g}s") from None
        except OSError as e:
            raise UpstreamError(f"cannot connect to {host}:{port}: {e.strerror or e}") from None
        return conn

    async def _send(
        self, key: tuple[str, int], conn: _Connection, head: bytes, body: bytes, deadline: float | None
    ) -> UpstreamResponse:
        assert conn.transport is not None
        try:
            conn.transport.write(head + body if len(body) < 64 * 1024 else head)
            if len(body) >= 64 * 1024:
                conn.transport.write(body)
            headers = await conn.headers(deadline)
        except BaseException:
            conn.abort()
            raise
        return UpstreamResponse(self, key, conn, headers)


def _request_head(
    method: str, host: str, port: int, target: str, headers: Iterable[tuple[str, str]], length: int
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host_port(host, port)}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if length or method not in ("GET", "HEAD", "DELETE"):
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
