"""Bad input at the gateway: bodies, Host headers, request errors, and what clients read back.

Each test sends what a careless or hostile client sends and checks what the client gets and what
the backend received (or that it received nothing).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import zlib
from typing import Any

import aiohttp
import pytest

from gateway.api.auth import ApiKeys
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from tests.support.fakes import FakeOllama, MakeFake, fast_settings

GENERATE = {"model": "llama3.1:8b", "prompt": "hi", "stream": False}


def gateway(*backends: FakeOllama, **overrides: Any) -> GatewayServer:
    return GatewayServer(fast_settings(*(b.backend() for b in backends), **overrides), MemoryStore(), keys=ApiKeys())


async def post_raw(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    merged = {"Content-Type": "application/json", **(headers or {})}
    async with http.post(url, data=body, headers=merged) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


# -- bodies --------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "x-gzip", "gzip, identity"])
async def test_a_compressed_body_is_forwarded_decoded_without_its_encoding(
    fakes: MakeFake, http: aiohttp.ClientSession, encoding: str
) -> None:
    fake = await fakes(name="g0")
    plain = json.dumps(GENERATE).encode()
    packed = zlib.compress(plain) if encoding == "deflate" else gzip.compress(plain)
    async with gateway(fake) as gw:
        status, body = await post_raw(http, gw.url + "/api/generate", packed, {"Content-Encoding": encoding})
    assert status == 200, body
    received = fake.calls("/api/generate")[0]
    assert received.json() == GENERATE
    assert "Content-Encoding" not in received.headers


@pytest.mark.parametrize(
    ("body", "headers", "status", "needle"),
    [
        (b"\x1f\x8b not really gzip", {"Content-Encoding": "gzip"}, 400, "gzip"),
        (gzip.compress(json.dumps(GENERATE).encode())[:20], {"Content-Encoding": "gzip"}, 400, "invalid"),
        (json.dumps(GENERATE).encode(), {"Content-Encoding": "compress"}, 415, "Content-Encoding"),
        (b'{"model": "llama3.1:8b", "prompt": "hi", "options": {"temperature": NaN}}', {}, 400, "NaN"),
        (b'{"model": "llama3.1:8b", "prompt": "hi", "options": {"top_p": Infinity}}', {}, 400, "Infinity"),
        (b'{"model": "llama3.1:8b", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400, "nested"),
    ],
    ids=["bogus-gzip", "truncated-gzip", "unknown-encoding", "nan", "infinity", "deep-nesting"],
)
async def test_bad_bodies_are_the_clients_error_and_reach_no_backend(
    fakes: MakeFake, http: aiohttp.ClientSession, body: bytes, headers: dict[str, str], status: int, needle: str
) -> None:
    fake = await fakes(name="g0")
    async with gateway(fake) as gw:
        got, reply = await post_raw(http, gw.url + "/api/generate", body, headers)
    assert got == status, reply
    assert needle in reply["error"]
    assert not fake.calls("/api/generate")


async def test_a_gzip_bomb_is_refused_at_the_size_limit(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    fake = await fakes(name="g0")
    bomb = gzip.compress(b'{"model": "llama3.1:8b", "prompt": "' + b"a" * (8 * 1024 * 1024) + b'"}')
    async with gateway(fake, max_body_bytes=1024 * 1024) as gw:
        status, reply = await post_raw(http, gw.url + "/api/generate", bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "limit" in reply["error"]
    assert not fake.calls("/api/generate")


async def test_an_announced_oversized_body_is_refused_before_it_is_sent(fakes: MakeFake) -> None:
    fake = await fakes(name="g0")
    async with gateway(fake, max_body_bytes=1024 * 1024) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            # Headers only: the 413 must come without the gateway waiting for a body never sent.
            writer.write(
                b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 999999999\r\n\r\n"
            )
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        finally:
            writer.close()
    assert head.startswith(b"HTTP/1.1 413")
    assert not fake.calls("/api/generate")


# -- the Host check ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1:11434", True),
        ("localhost:11434", True),
        ("[::1]:11434", True),
        ("10.1.2.3:11434", True),
        ("192.168.0.7", True),
        ("box.local", True),
        ("ollama.internal:80", True),
        ("app.localhost", True),
        ("evil.example.com", False),
        ("evil.example.com:11434", False),
        ("8.8.8.8:11434", False),
        ("corral.example.org", True),  # [gateway] allowed_hosts
        ("api.corp.example", True),  # ... as a pattern
    ],
)
async def test_host_header_check_on_a_loopback_gateway(
    fakes: MakeFake, http: aiohttp.ClientSession, host: str, allowed: bool
) -> None:
    fake = await fakes(name="g0")
    async with gateway(fake, allowed_hosts=("corral.example.org", "*.corp.example")) as gw:
        for method, path in (("GET", "/api/tags"), ("DELETE", "/api/delete"), ("POST", "/api/generate")):
            body = {"model": "llama3.1:8b"} if method == "DELETE" else GENERATE
            kwargs: dict[str, Any] = {} if method == "GET" else {"json": body}
            async with http.request(method, gw.url + path, headers={"Host": host}, **kwargs) as resp:
                await resp.read()
                assert (resp.status != 403) == allowed, (method, path, resp.status)
    if not allowed:
        assert not fake.calls("/api/delete") and not fake.calls("/api/generate")


async def test_the_ready_route_is_open_to_any_host(fakes: MakeFake, http: aiohttp.ClientSession) -> None:
    fake = await fakes(name="g0")
    async with (
        gateway(fake) as gw,
        http.get(gw.url + "/api/corral/ready", headers={"Host": "pod-1.svc.example"}) as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["ready_backends"] == 1


# -- request errors pass through once; backend faults are retried ---------------------------------


async def test_a_request_error_is_passed_through_once_without_a_failover(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    message = 'option "num_ctx" must be of type integer'
    backends = [await fakes(name=f"g{i}", fail_status=500, fail_message=message) for i in range(3)]
    async with gateway(*backends) as gw:
        body = {**GENERATE, "options": {"num_ctx": "big"}}
        async with http.post(gw.url + "/api/generate", json=body) as resp:
            assert resp.status == 500
            assert (await resp.json())["error"] == message
            assert "X-Corral-Error" not in resp.headers  # the backend's own reply
        async with http.get(gw.url + "/metrics") as resp:
            metrics = await resp.text()
    assert sum(len(b.calls("/api/generate")) for b in backends) == 1
    assert "corral_failovers_total{" not in metrics and "corral_retries_total{" not in metrics


async def test_a_crashed_runner_is_a_backend_fault_and_goes_elsewhere(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    crashed = await fakes(name="g0", fail_status=500, fail_message="llama runner process has terminated: signal")
    fine = await fakes(name="g1")
    async with gateway(crashed, fine, policy="round-robin") as gw:
        for _ in range(2):  # whichever it tries first, the answer comes from g1
            async with http.post(gw.url + "/api/generate", json=GENERATE) as resp:
                assert resp.status == 200
                assert resp.headers["X-Corral-Backend"] == "g1"


# -- texts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/embed", 'model "nope:1b" not found, try pulling it first'),
        ("/api/embeddings", 'model "nope:1b" not found, try pulling it first'),
        ("/api/generate", "model 'nope:1b' not found"),
        ("/api/chat", "model 'nope:1b' not found"),
    ],
)
async def test_not_found_texts_are_the_routes_own(
    fakes: MakeFake, http: aiohttp.ClientSession, path: str, expected: str
) -> None:
    fake = await fakes(name="g0")
    body = {"model": "nope:1b", "prompt": "x", "input": "x", "messages": [{"role": "user", "content": "x"}]}
    async with gateway(fake) as gw, http.post(gw.url + path, json=body) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == expected


async def test_v1_embeddings_not_found_is_openai_shaped_with_ollamas_text(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    fake = await fakes(name="g0")
    async with (
        gateway(fake) as gw,
        http.post(gw.url + "/v1/embeddings", json={"model": "nope:1b", "input": "x"}) as resp,
    ):
        assert resp.status == 404
        assert (await resp.json())["error"]["message"] == 'model "nope:1b" not found, try pulling it first'


async def test_a_mid_stream_failure_reads_short_and_names_no_exception(
    fakes: MakeFake, http: aiohttp.ClientSession
) -> None:
    dying = await fakes(name="g0", die_after_chunks=1, chunks=4)
    async with (
        gateway(dying, eject_after_failures=5) as gw,
        http.post(gw.url + "/api/generate", json={"model": "llama3.1:8b", "prompt": "hi"}) as resp,
    ):
        lines = [json.loads(line) for line in (await resp.read()).splitlines() if line.strip()]
    error = lines[-1]["error"]
    assert error == "backend g0 failed mid-stream; the reply is incomplete"


# -- request ids and the access log --------------------------------------------------------------


async def test_request_ids_and_access_log_lines(
    fakes: MakeFake, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    fake = await fakes(name="g0")
    caplog.set_level(logging.INFO, logger="corral.access")
    async with gateway(fake, access_log=True) as gw:
        async with http.post(gw.url + "/api/generate", json=GENERATE, headers={"X-Request-Id": "client-42"}) as resp:
            assert resp.status == 200 and resp.headers["X-Request-Id"] == "client-42"
            size = len(await resp.read())  # the body; the line counts the headers too
        async with http.get(gw.url + "/api/version") as resp:
            generated = resp.headers["X-Request-Id"]
            assert len(generated) >= 16
    assert fake.calls("/api/generate")[0].headers["X-Request-Id"] == "client-42"
    lines = [r.getMessage() for r in caplog.records if r.name == "corral.access"]
    fields = [dict(part.split("=", 1) for part in line.split(" ")) for line in lines]
    generate = next(f for f in fields if f["request_id"] == "client-42")
    assert generate["method"] == "POST" and generate["path"] == "/api/generate"
    assert generate["model"] == "llama3.1:8b" and generate["backend"] == "g0"
    assert generate["status"] == "200" and size < int(generate["bytes"]) < size + 1024
    assert float(generate["ttfb_ms"]) <= float(generate["total_ms"]) and generate["retries"] == "0"
    assert any(f["request_id"] == generated and f["path"] == "/api/version" for f in fields)


async def test_the_access_log_is_off_by_default(
    fakes: MakeFake, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    fake = await fakes(name="g0")
    caplog.set_level(logging.INFO, logger="corral.access")
    async with gateway(fake) as gw, http.post(gw.url + "/api/generate", json=GENERATE) as resp:
        assert resp.status == 200 and resp.headers["X-Request-Id"]
    assert not [r for r in caplog.records if r.name == "corral.access"]
