"""Proxy mechanics over real sockets: streaming, headers, cancellation, failover, Ollama-shaped errors.

The upstreams are in-process fake Ollamas (tests/support/fakes.py) so each test can check what the
backend *received* and make it misbehave on purpose.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.api.auth import ApiKeys
from gateway.appkeys import POOL
from gateway.config import StaticBackend
from gateway.fleet.pool import BackendPool
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from tests.support.fakes import FakeOllama, MakeFake, fast_settings, wait_for


def gateway(*backends: FakeOllama, **overrides: Any) -> GatewayServer:
    settings = fast_settings(*(b.backend() for b in backends), **overrides)
    return GatewayServer(settings, MemoryStore(), keys=ApiKeys())


async def test_stream_reaches_client_before_backend_finishes(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    hold = asyncio.Event()
    fake = await fakes(name="g0", hold=hold)
    async with gateway(fake) as gw:
        async with http.post(gw.url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "hi"}) as resp:
            assert resp.status == 200
            assert resp.headers["X-Corral-Backend"] == "g0"
            assert resp.headers["Content-Type"].startswith("application/x-ndjson")
            # The backend is still holding its stream open: the first line can only be here unbuffered.
            first = json.loads(await resp.content.readline())
            assert first["response"] == "tok0 " and first["done"] is False
            hold.set()
            rest = [json.loads(line) for line in (await resp.read()).splitlines() if line.strip()]
        assert rest[-1]["done"] is True
        assert [c["response"] for c in rest[:-1]] == ["tok1 ", "tok2 "]


async def test_upstream_sees_its_own_host_and_no_hop_by_hop_headers(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    fake = await fakes(name="g0")
    async with gateway(fake) as gw:
        headers = {
            "Connection": "keep-alive, X-Private-Hop",
            "X-Private-Hop": "secret",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "Authorization": "Bearer some-client-token",
            "X-Request-Id": "abc-123",
            "Host": "ollama.internal",  # a local name: passes the Host check
        }
        async with http.post(
            gw.url + "/api/chat",
            json={"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}], "stream": False},
            headers=headers,
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["message"]["content"]
    received = fake.calls("/api/chat")[0]
    assert received.headers["Host"] == fake.url.removeprefix("http://")
    for name in ("Keep-Alive", "TE", "Proxy-Authorization", "Authorization", "X-Private-Hop"):
        assert name not in received.headers, name
    assert received.headers["X-Request-Id"] == "abc-123"
    assert received.headers["X-Forwarded-Host"] == "ollama.internal"
    assert received.headers["X-Forwarded-For"] == "127.0.0.1"
    assert received.json()["messages"][0]["content"] == "hi"


async def test_client_hanging_up_cancels_the_upstream_request(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    fake = await fakes(name="g0", hold=asyncio.Event())  # never released: only a cancel ends it
    async with gateway(fake) as gw:
        resp = await http.post(gw.url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "long"})
        assert json.loads(await resp.content.readline())["response"] == "tok0 "
        resp.close()  # drop the connection mid-stream
        await asyncio.wait_for(fake.cancelled.wait(), timeout=10)
        # The slot is given back: nothing stays counted in flight, here or in the shared store.
        await wait_for(lambda: not _pool(gw).in_flight_counts().get("g0"))
        assert await gw.store.in_flight() == {}


async def test_backend_dying_mid_stream_ends_with_an_error_line(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    dying = await fakes(name="g0", die_after_chunks=1, chunks=4)
    # Two deaths would eject it (the default eject_after_failures); this test is about the lines.
    async with gateway(dying, eject_after_failures=3) as gw:
        async with http.post(gw.url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "hi"}) as resp:
            assert resp.status == 200
            lines = [json.loads(line) for line in (await resp.read()).splitlines() if line.strip()]
        assert lines[0]["response"] == "tok0 "
        assert "error" in lines[-1] and "g0" in lines[-1]["error"]
        # The official client turns such a line into ResponseError; SSE gets an OpenAI-style error event.
        async with http.post(
            gw.url + "/v1/chat/completions",
            json={"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        ) as resp:
            text = (await resp.read()).decode()
        events = [e.removeprefix("data: ") for e in text.split("\n\n") if e.strip()]
        assert json.loads(events[0])["choices"][0]["delta"]["content"] == "tok0 "
        assert json.loads(events[-1])["error"]["type"] == "api_error"
        # The gateway itself is fine: the next request to a healthy backend is served.
        dying.die_after_chunks = None
        async with http.post(
            gw.url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "hi", "stream": False}
        ) as resp:
            assert resp.status == 200


async def test_a_backend_that_keeps_dying_mid_stream_is_ejected(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    dying = await fakes(name="g0", die_after_chunks=1)
    async with gateway(dying, eject_after_failures=2, health_interval_s=30) as gw:
        for _ in range(2):
            async with http.post(gw.url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "hi"}) as resp:
                assert "error" in json.loads((await resp.read()).splitlines()[-1])
        async with http.post(gw.url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "hi"}) as resp:
            assert resp.status == 503
            assert "no healthy backend" in (await resp.json())["error"]


async def test_5xx_before_first_byte_fails_over_with_the_same_body(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    bad = await fakes(name="a-bad", fail_status=500)
    good = await fakes(name="b-good")
    async with gateway(bad, good) as gw:
        payload = {"model": "llama3.1:8b", "prompt": "replay me", "options": {"temperature": 0}, "stream": False}
        async with http.post(gw.url + "/api/generate", json=payload) as resp:
            assert resp.status == 200
            assert resp.headers["X-Corral-Backend"] == "b-good"
        assert bad.calls("/api/generate")[0].json() == payload
        assert good.calls("/api/generate")[0].json() == payload


async def test_refused_connection_fails_over_and_ejects(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    first = await fakes(name="a")
    second = await fakes(name="b")
    async with gateway(first, second, eject_after_failures=1, health_interval_s=30) as gw:
        await first.stop()  # killed after the gateway saw it healthy
        async with http.post(
            gw.url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "hi", "stream": False}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["X-Corral-Backend"] == "b"
        assert not _pool(gw).healthy("a")


async def test_backend_error_passes_through_when_no_backend_succeeds(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    fake = await fakes(name="g0", fail_status=503)
    gw = gateway(fake, retries=1)
    async with gw, http.post(gw.url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "hi"}) as resp:
        assert resp.status == 503
        assert "X-Corral-Error" not in resp.headers  # the backend's own error, unchanged
        assert resp.headers["X-Corral-Backend"] == "g0"
        assert await resp.json() == {"error": "g0 failing"}


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("POST", "/api/generate", b'{"model": "llama3.1:8b", "prompt": ', 400, "invalid JSON"),
        ("POST", "/api/generate", b"", 400, "missing request body"),
        ("POST", "/api/chat", b'{"messages": []}', 400, "model is required"),
        ("POST", "/api/chat", b'{"model": "  ", "messages": []}', 400, "model is required"),
        # Ollama's generate and embed handlers answer a missing model with their not-found reply.
        ("POST", "/api/generate", b'{"prompt": "x"}', 404, "model '' not found"),
        ("POST", "/api/embed", b'{"model": " ", "input": "x"}', 404, "model ' ' not found"),
        ("POST", "/api/generate", b'{"model": 7}', 400, "model"),
        ("POST", "/api/generate", b'{"model": "nope:1b", "prompt": "x"}', 404, "model 'nope:1b' not found"),
        ("POST", "/api/show", b'{"model": "nope"}', 404, "model 'nope' not found"),
    ],
)
async def test_bad_requests_get_ollama_shaped_errors(
    fakes: MakeFake, http: aiohttp.ClientSession, method: str, path: str, body: bytes, status: int, message: str
) -> None:
    fake = await fakes(name="g0")
    async with gateway(fake) as gw:
        async with http.request(method, gw.url + path, data=body, headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == status
            assert resp.headers["X-Corral-Error"] == "gateway"
            reply = await resp.json()
        assert message in reply["error"]
    assert not fake.calls(path)


async def test_openai_routes_get_openai_shaped_errors(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    fake = await fakes(name="g0")
    async with gateway(fake) as gw:
        async with http.post(gw.url + "/v1/chat/completions", json={"model": "nope", "messages": []}) as resp:
            assert resp.status == 404
            error = (await resp.json())["error"]
        assert error["type"] == "not_found_error" and "nope" in error["message"]
        async with http.post(gw.url + "/v1/embeddings", data=b"{") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_anthropic_route_gets_anthropic_shaped_errors(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    fake = await fakes(name="g0", die_after_chunks=1)
    async with gateway(fake) as gw:
        for body, status, error_type in (
            ({"max_tokens": 10, "messages": []}, 400, "invalid_request_error"),
            ({"model": "nope", "max_tokens": 10, "messages": []}, 404, "not_found_error"),
        ):
            async with http.post(gw.url + "/v1/messages", json=body) as resp:
                assert resp.status == status
                reply = await resp.json()
            assert reply["type"] == "error" and reply["error"]["type"] == error_type, reply
        # A stream cut by the backend ends with Anthropic's error event, not OpenAI's data frame.
        payload = {"model": "llama3.1:8b", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(gw.url + "/v1/messages", json={**payload, "stream": True}) as resp:
            frames = [f for f in (await resp.read()).decode().split("\n\n") if f.strip()]
        event, data = frames[-1].split("\n")
        assert event == "event: error"
        assert json.loads(data.removeprefix("data: "))["error"]["type"] == "api_error"


async def test_a_backend_error_sent_in_pieces_reaches_the_client_whole(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    fake = await fakes(name="g0", fail_status=500, fail_in_pieces=True)
    gw = gateway(fake, retries=0)
    async with gw, http.post(gw.url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "hi"}) as resp:
        assert resp.status == 500
        assert await resp.json() == {"error": "g0 failing"}


async def test_model_names_nobody_has_stay_out_of_metric_labels(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    fake = await fakes(name="g0", inventory_fails=True)  # the gateway cannot tell which models exist
    async with gateway(fake) as gw:
        async with http.post(gw.url + "/api/generate", json={"model": "made-up-name:1", "prompt": "hi"}) as resp:
            assert resp.status == 404  # the backend's own answer
        async with http.get(gw.url + "/metrics") as resp:
            text = await resp.text()
    assert 'corral_request_duration_seconds_count{backend="g0",model="other"} 1.0' in text
    assert "made-up-name" not in text


async def test_oversized_body_is_refused_with_413(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    fake = await fakes(name="g0")
    async with gateway(fake, max_body_bytes=4096) as gw:
        payload = {"model": "llama3.1:8b", "prompt": "x" * 10_000}
        async with http.post(gw.url + "/api/generate", json=payload) as resp:
            assert resp.status == 413
            assert "too large" in (await resp.json())["error"]
    assert not fake.calls("/api/generate")


async def test_unknown_paths_and_wrong_methods_answer_like_ollama(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    fake = await fakes(name="g0")
    async with gateway(fake) as gw:
        async with http.get(gw.url + "/api/nothing-here") as resp:
            assert resp.status == 404
            assert resp.headers["Content-Type"].startswith("text/plain")
            assert await resp.text() == "404 page not found"
        async with http.get(gw.url + "/api/generate") as resp:
            assert resp.status == 405
            assert await resp.text() == "405 method not allowed"
        async with http.get(gw.url + "/") as resp:
            assert await resp.text() == "Ollama is running"
        async with http.head(gw.url + "/") as resp:
            assert resp.status == 200
        async with http.get(gw.url + "/api/version") as resp:
            assert await resp.json() == {"version": "0.12.3"}


def _pool(gw: GatewayServer) -> BackendPool:
    return gw.app[POOL]


async def test_model_calls_reuse_a_backend_connection_and_survive_it_closing_them(http: aiohttp.ClientSession) -> None:
    # A backend that closes its side of the keep-alive connection after every second model call
    # (a restart or an idle timeout looks the same): the gateway reuses an open connection, opens a
    # new one when the backend closed the old, and no request sees an error.
    peers: list[object] = []

    async def chat(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        await request.read()
        answer = {"model": "m:latest", "message": {"role": "assistant", "content": "ok"}, "done": True}
        reply = web.json_response(answer)
        if len(peers) % 2 == 0:
            reply.force_close()
        return reply

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.0"})

    async def tags(request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": "m:latest", "model": "m:latest", "size": 1000}]})

    async def ps(request: web.Request) -> web.Response:
        return web.json_response({"models": []})

    app = web.Application()
    app.router.add_post("/api/chat", chat)
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    backend = TestServer(app, host="127.0.0.1")
    await backend.start_server()
    try:
        settings = fast_settings(StaticBackend(url=str(backend.make_url("")).rstrip("/"), id="g0"))
        async with GatewayServer(settings, MemoryStore(), keys=ApiKeys()) as gw:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False}
            for _ in range(6):  # one after another: each can reuse the connection the last one left
                async with http.post(gw.url + "/api/chat", json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    assert (await resp.json())["message"]["content"] == "ok"
    finally:
        await backend.close()
    assert len(peers) == 6
    assert len(set(peers)) == 3  # two calls per connection: reused once, then replaced


async def test_fresh_request_ids_are_distinct_and_shaped_like_uuids(http: aiohttp.ClientSession) -> None:
    async with GatewayServer(fast_settings(), MemoryStore(), keys=ApiKeys()) as gw:
        ids = []
        for _ in range(50):
            async with http.get(gw.url + "/api/version") as resp:
                ids.append(resp.headers["X-Request-Id"])
    assert len(set(ids)) == 50
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


async def test_a_backend_that_answers_garbage_gets_an_ollama_shaped_502(http: aiohttp.ClientSession) -> None:
    # Health checks and polls are well-formed, model calls get bytes that are not HTTP: the lean
    # client's parse error is a failure before the first byte, answered like any other.
    ok = {
        b"/api/version": b'{"version": "0.12.0"}',
        b"/api/tags": b'{"models": [{"name": "m:latest", "model": "m:latest", "size": 1000}]}',
        b"/api/ps": b'{"models": []}',
    }

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                path = head.split(b" ", 2)[1]
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                if length:
                    await reader.readexactly(int(length.group(1)))
                if path in ok:
                    body = ok[path]
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(body), body)
                    )
                else:
                    writer.write(b"this is not an HTTP reply\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        settings = fast_settings(StaticBackend(url=f"http://127.0.0.1:{port}", id="g0"), eject_after_failures=10)
        async with GatewayServer(settings, MemoryStore(), keys=ApiKeys()) as gw:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False}
            async with http.post(gw.url + "/api/chat", json=body) as resp:
                assert resp.status == 502
                error = (await resp.json())["error"]
            assert "malformed reply from the backend" in error
    finally:
        server.close()
        await server.wait_closed()
