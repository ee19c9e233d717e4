"""Client-side limits like nginx's: header read timeout, connection cap, early 413, keep-alive idle.

aiohttp bounds an idle kept-alive connection (keepalive_timeout) but not a client that sends its
request line and headers byte by byte, nor the number of open connections: 500 such clients and
15,000 idle sockets were all held for minutes, and new connects then timed out. Both need the
protocol object, so the gateway serves through `GuardedSite`, whose connections are
`GuardedHandler`s (aiohttp's RequestHandler plus):

- a header timer, started when a connection opens and whenever a new request's first bytes arrive
  on an idle one, cancelled when the request's headers are complete; when it fires, the client
  gets `408` and the connection is closed (nginx: client_header_timeout);
- a connection count at accept: beyond `max_connections` the connection is marked, and the
  gateway's front middleware answers its request with 503 + `Retry-After` and closes it.

GuardedHandler reads a few of RequestHandler's private attributes (`_request_count`,
`_current_request`, `_messages`, `_manager`, `_loop`); tests/gateway/test_client_limits.py breaks
if an aiohttp upgrade renames them.

The front middleware (gateway/api/front.py) also refuses an announced `Content-Length` over
`max_body_bytes` (413) before the handler reads anything, and closes any connection whose body
was left unread (408/413) right after the reply, so the rest of a refused body is never read.
"""

from __future__ import annotations

import asyncio
from ssl import SSLContext
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_runner import BaseSite
from aiohttp.web_server import Server

from gateway.api.bodies import announced_too_large
from gateway.api.errors import error_for
from gateway.config import GatewaySettings

_REQUEST_TIMEOUT_REPLY = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    b"Content-Length: 20\r\n\r\n408 request timeout\n"
)
# Paths whose bodies are not bounded by max_body_bytes: blob uploads stream whole model files.
UNBOUNDED_BODY_PREFIXES: tuple[str, ...] = ("/api/blobs/",)


class GuardedHandler(RequestHandler):
    """aiohttp's per-connection protocol with a header read timer and a connection cap mark."""

    def __init__(self, manager: Server, *, header_timeout_s: float, max_connections: int, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._max_connections = max_connections
        self._header_timer: asyncio.TimerHandle | None = None
        self.over_capacity = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if manager is not None and len(manager.connections) > self._max_connections:
            self.over_capacity = True
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        requests_before = self._request_count
        super().data_received(data)
        if self._request_count > requests_before:  # a request's headers are complete
            self._cancel_header_timer()
        elif self._header_timer is None and self._idle():
            self._start_header_timer()  # the first bytes of the next request on a kept-alive connection

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _idle(self) -> bool:
        return self._current_request is None and not self._messages

    def _start_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self._loop.call_later(self._header_timeout_s, self._header_timeout, self._request_count)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self, requests_at_start: int) -> None:
        self._header_timer = None
        if self._request_count != requests_at_start or not self._idle():
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(_REQUEST_TIMEOUT_REPLY)
        self.force_close()
        if transport is not None:
            transport.close()


class GuardedSite(BaseSite):
    """A listening socket served by GuardedHandlers (aiohttp's SockSite with its own protocol)."""

    __slots__ = ("_settings", "_sock")

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: Any,
        settings: GatewaySettings,
        *,
        ssl_context: SSLContext | None = None,
        backlog: int = 1024,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._sock = sock
        self._settings = settings

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"{'https' if self._ssl_context else 'http'}://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        settings = self._settings
        kwargs = dict(server._kwargs)  # the runner's handler options (access log, keep-alive, ...)

        def make_handler() -> GuardedHandler:
            return GuardedHandler(
                server,
                loop=loop,
                header_timeout_s=settings.header_read_timeout_s,
                max_connections=settings.max_connections,
                **kwargs,
            )

        self._server = await loop.create_server(
            make_handler, sock=self._sock, ssl=self._ssl_context, backlog=self._backlog
        )


def limits_refusal(settings: GatewaySettings, request: web.Request) -> web.StreamResponse | None:
    """503 on a connection over `max_connections`, 413 for an announced body over the limit (both
    closing the connection); None: go on. Send the reply with `send_and_close` when its body is
    left unread (see `needs_close`)."""
    protocol = request.protocol
    if isinstance(protocol, GuardedHandler) and protocol.over_capacity:
        reply = error_for(
            request, 503, f"too many connections (limit {settings.max_connections})", headers={"Retry-After": "1"}
        )
        reply.force_close()
        return reply
    if not request.path.startswith(UNBOUNDED_BODY_PREFIXES) and announced_too_large(request, settings.max_body_bytes):
        reply = error_for(request, 413, f"request body too large: the limit is {settings.max_body_bytes} bytes")
        reply.force_close()
        return reply
    return None


def needs_close(request: web.Request, response: web.StreamResponse) -> bool:
    """A refusal (408, 413) that left the request's body unread: the connection must close after it."""
    return response.status in (408, 413) and not request.content.is_eof()


async def send_and_close(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Send a refusal whose request body stays unread, then close the connection: it cannot carry
    another request, and aiohttp would otherwise read the unwanted body for its lingering time
    (10 s) before closing."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response
