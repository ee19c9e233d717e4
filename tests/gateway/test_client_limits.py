"""Client-side limits: slow headers, idle connections, slow bodies and the connection cap.

Misbehaving clients are real sockets; the checks are that the gateway closes them (a bounded wait
for EOF, never a timing assertion) while a normal client is served meanwhile.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from gateway.api.auth import ApiKeys
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from tests.support.fakes import FakeOllama, MakeFake, fast_settings

GENERATE = {"model": "llama3.1:8b", "prompt": "hi", "stream": False}
# Every wait for the gateway to act is bounded by this (far above the timeouts under test).
CLOSE_BOUND_S = 15.0


def gateway(*backends: FakeOllama, **overrides: Any) -> GatewayServer:
    return GatewayServer(fast_settings(*(b.backend() for b in backends), **overrides), MemoryStore(), keys=ApiKeys())


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent until it closed the connection (bounded). A reset (the server
    closed while the client was still sending) reads as b"": the 408 may be lost with it."""
    async with asyncio.timeout(CLOSE_BOUND_S):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


async def served(http: aiohttp.ClientSession, gw: GatewayServer) -> None:
    async with http.post(gw.url + "/api/generate", json=GENERATE) as resp:
        assert resp.status == 200
        await resp.read()


async def test_slow_headers_and_idle_connections_are_closed_while_others_are_served(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    fake = await fakes(name="g0")
    async with gateway(fake, header_read_timeout_s=0.5) as gw:
        idle = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(20)]
        slow = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(20)]
        for _, writer in slow:
            writer.write(b"POST /api/generate HTTP/1.1\r\nHo")  # ... and never the rest
            await writer.drain()
        await served(http, gw)  # the gateway serves normal traffic meanwhile
        replies = await asyncio.gather(*(closed_by_server(r) for r, _ in idle + slow))
        for _, writer in idle + slow:
            writer.close()
        assert all(r == b"" or r.startswith(b"HTTP/1.1 408") for r in replies)
        assert any(r.startswith(b"HTTP/1.1 408") for r in replies)
        await served(http, gw)
    assert len(fake.calls("/api/generate")) == 2


async def test_headers_sent_in_time_but_byte_by_byte_do_not_outlive_the_timeout(fakes: MakeFake) -> None:
    fake = await fakes(name="g0")
    async with gateway(fake, header_read_timeout_s=0.5) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        request = b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 400

        sent = [0]

        async def trickle() -> None:
            for byte in request:  # ~4 s of bytes at 10 ms each: far past the 0.5 s bound
                writer.write(bytes([byte]))
                await writer.drain()
                sent[0] += 1
                await asyncio.sleep(0.01)

        sender = asyncio.create_task(trickle())
        try:
            reply = await closed_by_server(reader)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            writer.close()
    assert reply == b"" or reply.startswith(b"HTTP/1.1 408")  # never served
    assert sent[0] < len(request)  # closed while the headers were still trickling in


async def test_a_kept_alive_connection_is_closed_after_its_idle_timeout(fakes: MakeFake) -> None:
    fake = await fakes(name="g0")
    async with gateway(fake, keepalive_timeout_s=0.5, header_read_timeout_s=30) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        rest = await closed_by_server(reader)
        writer.close()
    head, _, body = rest.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"version" in body


async def test_a_body_that_stops_arriving_gets_408(fakes: MakeFake) -> None:
    fake = await fakes(name="g0")
    async with gateway(fake, body_read_timeout_s=0.5) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(
            b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model": "llama3.1:8b", '
        )
        await writer.drain()
        reply = await closed_by_server(reader)
        writer.close()
    assert reply.startswith(b"HTTP/1.1 408")
    assert "not received" in json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
    assert not fake.calls("/api/generate")


async def test_connections_beyond_the_cap_get_503(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    fake = await fakes(name="g0")
    async with gateway(fake, max_connections=5, header_read_timeout_s=30) as gw:
        held = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(5)]
        try:
            async with aiohttp.ClientSession() as fresh, fresh.get(gw.url + "/api/version") as resp:
                assert resp.status == 503
                assert "too many connections" in (await resp.json())["error"]
                assert resp.headers["Retry-After"]
        finally:
            for _, writer in held:
                writer.close()
        # Once they are gone, new clients are served again (the gateway notices the closes promptly).
        for _ in range(100):
            async with aiohttp.ClientSession() as fresh, fresh.get(gw.url + "/api/version") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.05)
        assert resp.status == 200
