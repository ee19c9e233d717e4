"""The lean upstream client over real sockets: framing, keep-alive reuse, stale connections,
failures before and during the body, and a client hang-up reaching the backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.api.upstream import UpstreamError, UpstreamPool


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    upstream = UpstreamPool()
    yield upstream
    await upstream.close()


@pytest.fixture
async def backend() -> AsyncIterator[tuple[TestServer, dict[str, object]]]:
    seen: dict[str, object] = {"peers": [], "cancelled": asyncio.Event()}

    async def whole(request: web.Request) -> web.Response:
        seen["peers"].append(request.transport.get_extra_info("peername"))  # type: ignore[union-attr,attr-defined]
        body = await request.read()
        return web.json_response({"echo": body.decode(), "host": request.host})

    async def stream(request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await reply.prepare(request)
        for i in range(int(request.query.get("n", "5"))):
            await reply.write(b'{"i": %d}\n' % i)
        await reply.write_eof()
        return reply

    async def endless(request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse()
        await reply.prepare(request)
        try:
            while True:
                await reply.write(b"x" * 1024)
                await asyncio.sleep(0.01)
        except (asyncio.CancelledError, ConnectionError):
            seen["cancelled"].set()  # type: ignore[attr-defined]
            raise

    async def dies(request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse()
        await reply.prepare(request)
        await reply.write(b"partial")
        assert request.transport is not None
        request.transport.abort()
        return reply

    async def paced(request: web.Request) -> web.StreamResponse:
        # Chunks every `every` seconds, then one `gap` of silence before the last (delays in ms).
        every, gap = int(request.query["every"]) / 1000, int(request.query["gap"]) / 1000
        await asyncio.sleep(int(request.query.get("first", "0")) / 1000)
        reply = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await reply.prepare(request)
        for i in range(int(request.query["n"])):
            await reply.write(b'{"i": %d}\n' % i)
            await asyncio.sleep(every)
        await asyncio.sleep(gap)
        await reply.write(b'{"done": true}\n')
        await reply.write_eof()
        return reply

    app = web.Application(handler_args={"handler_cancellation": True})
    app.router.add_get("/paced", paced)
    app.router.add_post("/whole", whole)
    app.router.add_get("/stream", stream)
    app.router.add_get("/endless", endless)
    app.router.add_get("/dies", dies)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server, seen
    await server.close()


async def test_a_whole_reply_and_keep_alive_reuse(
    backend: tuple[TestServer, dict[str, object]], pool: UpstreamPool
) -> None:
    server, seen = backend
    for i in range(3):
        reply = await pool.request("POST", "127.0.0.1", server.port or 0, "/whole", [], b"hi %d" % i,
                                   connect_timeout_s=2)
        assert reply.status == 200 and reply.content_length is not None
        assert b'"echo": "hi %d"' % i in await reply.read(10_000)
        reply.close()
    peers = seen["peers"]
    assert isinstance(peers, list) and len(set(peers)) == 1  # one connection, reused
    assert f'"host": "127.0.0.1:{server.port}"'.encode() in b'"host": "127.0.0.1:%d"' % (server.port or 0)


async def test_a_chunked_stream_arrives_whole_and_in_order(
    backend: tuple[TestServer, dict[str, object]], pool: UpstreamPool
) -> None:
    server, _ = backend
    reply = await pool.request("GET", "127.0.0.1", server.port or 0, "/stream?n=200", [], b"", connect_timeout_s=2)
    assert reply.content_length is None
    body = bytearray()
    while chunk := await reply.readany():
        body += chunk
    assert body.count(b"\n") == 200 and body.endswith(b'{"i": 199}\n')
    reply.close()


async def test_a_stale_idle_connection_is_replaced_without_an_error(
    backend: tuple[TestServer, dict[str, object]], pool: UpstreamPool
) -> None:
    server, seen = backend
    reply = await pool.request("POST", "127.0.0.1", server.port or 0, "/whole", [], b"a", connect_timeout_s=2)
    await reply.read(10_000)
    reply.close()
    # The backend drops its idle keep-alive connections (a restart, an idle timeout).
    for conns in pool._idle.values():
        for conn in conns:
            assert conn.transport is not None
            conn.transport.close()
    await asyncio.sleep(0.05)
    reply = await pool.request("POST", "127.0.0.1", server.port or 0, "/whole", [], b"b", connect_timeout_s=2)
    assert reply.status == 200
    reply.close()
    peers = seen["peers"]
    assert isinstance(peers, list) and len(set(peers)) == 2


async def test_refused_and_mid_body_failures_raise(
    backend: tuple[TestServer, dict[str, object]], pool: UpstreamPool
) -> None:
    server, _ = backend
    with pytest.raises(UpstreamError, match="cannot connect"):
        await pool.request("GET", "127.0.0.1", 1, "/", [], b"", connect_timeout_s=2)
    reply = await pool.request("GET", "127.0.0.1", server.port or 0, "/dies", [], b"", connect_timeout_s=2)
    with pytest.raises(UpstreamError, match="before the reply ended"):
        while await reply.readany():
            pass
    reply.close()


async def test_closing_an_unfinished_reply_cancels_it_at_the_backend(
    backend: tuple[TestServer, dict[str, object]], pool: UpstreamPool
) -> None:
    server, seen = backend
    reply = await pool.request("GET", "127.0.0.1", server.port or 0, "/endless", [], b"", connect_timeout_s=2)
    assert await reply.readany()
    reply.close()
    cancelled = seen["cancelled"]
    assert isinstance(cancelled, asyncio.Event)
    await asyncio.wait_for(cancelled.wait(), 10)
    assert not pool._idle.get(("127.0.0.1", server.port or 0))  # never reused


async def test_a_close_delimited_reply_ends_at_the_close(pool: UpstreamPool) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reply = await pool.request("GET", "127.0.0.1", port, "/", [], b"", connect_timeout_s=2)
        assert await reply.read(1000) == b"all of it"
        reply.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_the_idle_bound_is_per_read_however_long_the_stream(
    backend: tuple[TestServer, dict[str, object]], pool: UpstreamPool
) -> None:
    # One watchdog per connection serves every read: a stream that keeps talking may last many
    # times the idle bound, and the first silence longer than the bound still ends it.
    server, _ = backend
    loop = asyncio.get_running_loop()
    reply = await pool.request("GET", "127.0.0.1", server.port or 0, "/paced?n=12&every=50&gap=0", [], b"",
                               connect_timeout_s=2, deadline=loop.time() + 2)
    started, body = loop.time(), b""
    while chunk := await reply.readany(0.3):
        body += chunk
    assert body.count(b"\n") == 13 and loop.time() - started > 0.5  # longer than the bound: fine
    reply.close()

    reply = await pool.request("GET", "127.0.0.1", server.port or 0, "/paced?n=3&every=50&gap=600", [], b"",
                               connect_timeout_s=2)
    with pytest.raises(TimeoutError):
        while await reply.readany(0.3):
            pass
    reply.close()

    with pytest.raises(TimeoutError):  # the headers' deadline: a backend that sits on the request
        await pool.request("GET", "127.0.0.1", server.port or 0, "/paced?n=1&every=0&gap=0&first=600", [],
                           b"", connect_timeout_s=2, deadline=loop.time() + 0.2)


async def test_a_client_hanging_up_while_the_headers_are_awaited_leaves_no_error(
    backend: tuple[TestServer, dict[str, object]], pool: UpstreamPool
) -> None:
    # The gateway cancels a request whose client went away; the connection it aborts must close
    # quietly, not raise from a transport callback (which asyncio would log as an error).
    server, _ = backend
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        waiting = asyncio.create_task(
            pool.request("GET", "127.0.0.1", server.port or 0, "/paced?n=1&every=0&gap=0&first=1000", [], b"",
                         connect_timeout_s=2, deadline=loop.time() + 5)
        )
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.sleep(0.1)
        assert errors == []
    finally:
        loop.set_exception_handler(None)
