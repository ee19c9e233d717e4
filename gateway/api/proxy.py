"""Forwarding one request to one backend and streaming its reply back, byte for byte.

Nothing is buffered: each chunk the backend sends is written to the client as it arrives, and the
write is awaited, so a slow client slows the backend's stream instead of filling memory. The reply
is held back only until its first body chunk, so a backend that fails before that (refused,
reset, a 5xx, a connection dropped after the headers) can be retried on another one: `AttemptFailed`
says so. Once a byte reached the client there is no retry; a backend dying then ends the stream
with an Ollama-style error line (NDJSON) or an OpenAI-style error event (SSE).

A client hanging up cancels the handler (the server runs with handler_cancellation), which closes
the upstream response here and so its connection: the backend sees the request cancelled at once.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterable, Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.api.errors import (
    BACKEND_HEADER,
    error_shape,
    error_text,
    ndjson_error_line,
    sse_error_event,
)
from gateway.api.headers import DROP_RESPONSE_HEADERS, reply_headers, upstream_header_items, upstream_headers
from gateway.api.upstream import UpstreamPool

log = logging.getLogger(__name__)

# Largest reply whose end is kept to read the final chunk's metrics (load_duration, eval_count).
TAIL_LIMIT_BYTES = 1024 * 1024
# Request bodies above this are sent from a BytesIO (aiohttp's TOO_LARGE_BYTES_BODY).
LARGE_BODY_BYTES = 1024 * 1024
# A 5xx reply held back for a possible retry is read up to this size.
HELD_BODY_LIMIT_BYTES = 64 * 1024

# What a backend failing before the first byte looks like from here.
CONNECT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError, ConnectionError, OSError)


@dataclass(frozen=True)
class HeldResponse:
    """A backend's error reply that was not sent yet, to pass on when no retry does better."""

    backend_id: str
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def to_response(self) -> web.Response:
        headers = CIMultiDict((k, v) for k, v in self.headers.items() if k.lower() not in DROP_RESPONSE_HEADERS)
        headers[BACKEND_HEADER] = self.backend_id
        return web.Response(status=self.status, body=self.body, headers=headers)


class AttemptFailed(Exception):
    """The backend failed before any byte reached the client: the request may go elsewhere."""

    def __init__(self, backend_id: str, message: str, held: HeldResponse | None = None) -> None:
        super().__init__(f"backend {backend_id}: {message}")
        self.backend_id = backend_id
        self.message = message
        self.held = held
        self.connection_failed = held is None  # no HTTP reply at all: counts against its health


class ClientGone(Exception):
    """The client went away while the reply was being written (`response` is the cut reply)."""

    def __init__(self, response: web.StreamResponse, message: str) -> None:
        super().__init__(message)
        self.response = response


class Reply(Protocol):
    """A backend's reply whose status and headers arrived: `gateway.api.upstream`'s, or aiohttp's
    (through `_SessionReply`) for what the lean client does not carry (TLS, streamed uploads)."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content_length(self) -> int | None: ...

    async def readany(self, idle_timeout_s: float | None = None) -> bytes: ...

    def close(self) -> None: ...


class _SessionReply:
    __slots__ = ("_response", "content_length", "headers", "reason", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.reason = response.reason
        self.headers = response.headers
        self.content_length = response.content_length

    async def readany(self, idle_timeout_s: float | None = None) -> bytes:
        async with asyncio.timeout(idle_timeout_s):
            return await self._response.content.readany()

    def close(self) -> None:
        self._response.close()


@dataclass
class Outcome:
    """How one forwarded request ended (the reply has been sent in full, or cut)."""

    response: web.StreamResponse
    status: int
    first_byte_s: float | None  # since the request arrived
    final: dict[str, Any] | None  # the reply's last JSON object, when it had one
    midstream_error: str | None = None


class FinalChunkTap:
    """Keeps the end of a reply to read its last JSON object (Ollama's final chunk or whole reply)."""

    def __init__(self) -> None:
        self._tail = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._tail += chunk
        if len(self._tail) > 2 * TAIL_LIMIT_BYTES:
            del self._tail[: len(self._tail) - TAIL_LIMIT_BYTES]

    def final(self) -> dict[str, Any] | None:
        tail = self._tail
        end = len(tail)
        while end > 0:  # the last non-blank line, found from the end without splitting it all
            start = tail.rfind(b"\n", 0, end) + 1
            line = bytes(tail[start:end]).strip()
            end = start - 1
            if not line:
                continue
            try:
                value = json.loads(line)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
        return None


def midstream_client_text(backend_id: str) -> str:
    """What a client reads when its stream breaks after it started (no internal exception text)."""
    return f"backend {backend_id} failed mid-stream; the reply is incomplete"


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@lru_cache(maxsize=256)
def _endpoint(base_url: str) -> tuple[str, int, str] | None:
    """(host, port, path prefix) of a plain-http backend URL; None for one the lean client does not
    speak (https)."""
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        return None
    return parts.hostname, parts.port or 80, parts.path.rstrip("/")


async def forward(
    request: web.Request,
    session: aiohttp.ClientSession,
    backend_id: str,
    base_url: str,
    body: bytes | io.BytesIO | AsyncIterable[bytes] | None,
    *,
    connect_timeout_s: float,
    started_at: float,
    path: str | None = None,
    on_tokens: Callable[[int], None] | None = None,
    extra_headers: Mapping[str, str] | None = None,
    first_byte_timeout_s: float | None = None,
    idle_timeout_s: float | None = None,
    pool: UpstreamPool | None = None,
) -> Outcome:
    """Send `request` (with `body`) to the backend and stream the reply to the client.

    Raises AttemptFailed before the first byte was written (nothing sent to the client yet; also
    when no first byte came within `first_byte_timeout_s` of the call), and ClientGone when the
    client hung up. Once the reply has started it always returns an Outcome, with
    `midstream_error` set when the backend failed during it (or was silent for `idle_timeout_s`
    between two chunks). None: no bound (gateway/api/timeouts.py explains the bounds).
    `on_tokens` is called with the count of NDJSON lines or SSE events in each streamed chunk
    relayed (about one token each: what the router's wait model reads); `extra_headers` are added
    to the reply. With `pool`, a bytes body to a plain-http backend goes over the lean client
    (gateway/api/upstream.py); anything else over `session`."""
    target = path if path is not None else request.path_qs
    loop = asyncio.get_running_loop()
    first_byte_by = None if first_byte_timeout_s is None else loop.time() + first_byte_timeout_s
    endpoint = _endpoint(base_url) if pool is not None and (body is None or isinstance(body, bytes)) else None
    upstream: Reply
    try:
        if endpoint is not None and pool is not None:
            host, port, prefix = endpoint
            upstream = await pool.request(
                request.method,
                host,
                port,
                prefix + target,
                upstream_header_items(request),
                body if isinstance(body, bytes) else b"",
                connect_timeout_s=connect_timeout_s,
                deadline=first_byte_by,  # its own watchdog: no timer per request
            )
        else:
            async with asyncio.timeout_at(first_byte_by):
                reply = await _session_request(request, session, base_url, target, body, connect_timeout_s)
            upstream = _SessionReply(reply)
    except asyncio.CancelledError:
        raise
    except TimeoutError as e:
        if first_byte_by is not None and loop.time() >= first_byte_by:
            raise AttemptFailed(backend_id, f"no reply within {first_byte_timeout_s:.1f}s (hung?)") from e
        raise AttemptFailed(backend_id, _describe(e)) from e
    except CONNECT_ERRORS as e:
        raise AttemptFailed(backend_id, _describe(e)) from e
    try:
        return await _relay(
            request, upstream, backend_id, started_at, first_byte_by, idle_timeout_s, on_tokens, extra_headers or {}
        )
    finally:
        # Closing (not releasing) drops the connection when the reply did not finish, which is how
        # the backend learns that the client went away.
        upstream.close()


async def _session_request(
    request: web.Request,
    session: aiohttp.ClientSession,
    base_url: str,
    target: str,
    body: bytes | io.BytesIO | AsyncIterable[bytes] | None,
    connect_timeout_s: float,
) -> aiohttp.ClientResponse:
    if isinstance(body, bytes) and len(body) > LARGE_BODY_BYTES:
        # aiohttp writes a large bytes body in one go (and warns); a file-like one goes in chunks.
        body = io.BytesIO(body)
    # No total timeout: a generation may stream for many minutes, and the first byte may wait for
    # a model load. Only connecting is bounded.
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_connect=connect_timeout_s)
    return await session.request(
        request.method,
        base_url.rstrip("/") + target,
        data=body,
        headers=upstream_headers(request),
        timeout=timeout,
        allow_redirects=False,
    )


def _token_counter(sse: bool, on_tokens: Callable[[int], None] | None) -> Callable[[bytes], None]:
    """Counts stream events per chunk: SSE events end with a blank line, NDJSON objects with one
    newline. A separator split across two chunks is missed at worst once: a count, not a parse."""
    if on_tokens is None:
        return lambda chunk: None
    separator = b"\n\n" if sse else b"\n"
    report = on_tokens
    return lambda chunk: report(chunk.count(separator))


async def _relay(
    request: web.Request,
    upstream: Reply,
    backend_id: str,
    started_at: float,
    first_byte_by: float | None,
    idle_timeout_s: float | None,
    on_tokens: Callable[[int], None] | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> Outcome:
    if upstream.status >= 500:
        async with asyncio.timeout(idle_timeout_s):  # what arrived in time is enough to judge it
            held_body = await _read_held_body(upstream)
        held = HeldResponse(backend_id, upstream.status, CIMultiDict(upstream.headers), held_body)
        raise AttemptFailed(backend_id, f"HTTP {upstream.status}: {error_text(held_body, upstream.status)}", held)
    try:
        # The rest of the first-byte bound; the lean client arms a timer only if it must wait (the
        # first bytes of a reply usually come with its headers).
        left_s = None if first_byte_by is None else first_byte_by - asyncio.get_running_loop().time()
        first = await upstream.readany(left_s)
    except TimeoutError as e:
        raise AttemptFailed(backend_id, "no first byte in time (hung?)") from e
    except CONNECT_ERRORS as e:
        raise AttemptFailed(backend_id, f"failed before the first byte: {_describe(e)}") from e

    first_byte_s = time.monotonic() - started_at
    tap = FinalChunkTap()
    if upstream.content_length is not None and len(first) == upstream.content_length:
        # The whole reply is already here (a non-streamed answer): one write with its length
        # instead of a chunked reply and a separate terminating chunk.
        tap.feed(first)
        headers = reply_headers(upstream.headers, backend_id)
        headers.update(extra_headers or {})
        whole = web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=first)
        try:
            await whole.prepare(request)
            await whole.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError) as e:
            raise ClientGone(whole, str(e)) from e
        return Outcome(whole, upstream.status, first_byte_s, tap.final(), None)
    headers = reply_headers(upstream.headers, backend_id)
    headers.update(extra_headers or {})
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
    count_tokens = _token_counter(sse, on_tokens)
    try:
        await response.prepare(request)
        if first:
            tap.feed(first)
            count_tokens(first)
            await response.write(first)
    except (ConnectionError, aiohttp.ClientConnectionResetError) as e:
        raise ClientGone(response, str(e)) from e
    midstream_error: str | None = None
    chunk = first
    while chunk:
        try:
            # The idle bound is per read: a relay that only moves bytes keeps it as it is.
            chunk = await upstream.readany(idle_timeout_s)
        except TimeoutError:
            midstream_error = f"backend {backend_id} sent nothing for {idle_timeout_s:g}s mid-stream (hung?)"
            log.warning("<%s> %s %s: %s", backend_id, request.method, request.path, midstream_error)
            break
        except CONNECT_ERRORS as e:
            midstream_error = f"backend {backend_id} failed mid-stream: {_describe(e)}"
            log.warning("<%s> %s %s: %s", backend_id, request.method, request.path, midstream_error)
            break
        if chunk:
            tap.feed(chunk)
            count_tokens(chunk)
            try:
                await response.write(chunk)
            except (ConnectionError, aiohttp.ClientConnectionResetError) as e:
                raise ClientGone(response, str(e)) from e
    try:
        if midstream_error is not None:
            # The client gets a short line; the exception text went to the log above.
            text = midstream_client_text(backend_id)
            if sse:
                await response.write(sse_error_event(text, error_shape(request.path)))
            else:
                await response.write(ndjson_error_line(text))
        await response.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionResetError) as e:
        raise ClientGone(response, str(e)) from e
    final = None if sse or midstream_error else tap.final()
    return Outcome(response, upstream.status, first_byte_s, final, midstream_error)


async def _read_held_body(upstream: Reply) -> bytes:
    """The error reply's body, whole (up to HELD_BODY_LIMIT_BYTES) however many chunks it came in;
    what arrived before a failure to read on."""
    body = bytearray()
    try:
        while len(body) < HELD_BODY_LIMIT_BYTES:
            chunk = await upstream.readany()
            if not chunk:
                break
            body += chunk
    except CONNECT_ERRORS:
        pass
    return bytes(body[:HELD_BODY_LIMIT_BYTES])
