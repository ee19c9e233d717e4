"""The official `ollama` (sync and async) and `openai` clients work unchanged through the gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import ollama
import openai
import pytest

from gateway.api.auth import ApiKeys
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from tests.support.fakes import FakeOllama, fast_settings

KEY = "client-test-key"


@pytest.fixture
async def gw() -> AsyncIterator[GatewayServer]:
    a = await FakeOllama(name="a", models={"llama3.1:8b": 4_920_000_000}).start()
    b = await FakeOllama(name="b", models={"llama3.1:8b": 4_920_000_000, "qwen2.5:7b": 4_680_000_000}).start()
    async with GatewayServer(fast_settings(a.backend(), b.backend()), MemoryStore(), keys=ApiKeys(api=(KEY,))) as gw:
        yield gw
    await a.stop()
    await b.stop()


def sync_calls(url: str) -> dict[str, object]:
    with ollama.Client(host=url, headers={"Authorization": f"Bearer {KEY}"}) as client:
        return _sync_calls(client)


def _sync_calls(client: ollama.Client) -> dict[str, object]:
    chat = client.chat(model="llama3.1:8b", messages=[{"role": "user", "content": "hi"}])
    streamed = "".join(
        part.message.content or ""
        for part in client.chat(model="llama3.1:8b", messages=[{"role": "user", "content": "hi"}], stream=True)
    )
    generated = client.generate(model="qwen2.5:7b", prompt="hi")
    listed = sorted(m.model or "" for m in client.list().models)
    embedded = client.embed(model="llama3.1:8b", input="hi")
    with pytest.raises(ollama.ResponseError) as missing:
        client.generate(model="missing:1b", prompt="hi")
    return {
        "chat": chat.message.content,
        "streamed": streamed,
        "generated": generated.response,
        "listed": listed,
        "embedded": embedded.embeddings,
        "missing": (missing.value.status_code, missing.value.error),
    }


async def test_sync_ollama_client(gw: GatewayServer) -> None:
    result = await asyncio.to_thread(sync_calls, gw.url)
    assert result["chat"] == "hi hi hi "
    assert result["streamed"] == "tok0 tok1 tok2 "
    assert result["generated"] == "hi hi hi "
    assert result["listed"] == ["llama3.1:8b", "qwen2.5:7b"]
    assert result["embedded"] == [[0.6, 0.8]]
    assert result["missing"] == (404, "model 'missing:1b' not found")


async def test_async_ollama_client(gw: GatewayServer) -> None:
    client = ollama.AsyncClient(host=gw.url, headers={"Authorization": f"Bearer {KEY}"})
    anonymous = ollama.AsyncClient(host=gw.url)
    try:
        reply = await client.generate(model="llama3.1:8b", prompt="hi")
        assert reply.done and reply.response == "hi hi hi "
        parts = [p async for p in await client.generate(model="llama3.1:8b", prompt="hi", stream=True)]
        assert "".join(p.response for p in parts) == "tok0 tok1 tok2 "
        assert parts[-1].done and parts[-1].eval_count == 3
        running = await client.ps()
        assert {m.model for m in running.models} == {"llama3.1:8b"}
        with pytest.raises(ollama.ResponseError) as refused:
            await anonymous.list()
        assert refused.value.status_code == 401
    finally:
        await client.close()
        await anonymous.close()


async def test_openai_client(gw: GatewayServer) -> None:
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
    stranger = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="wrong", max_retries=0)
    try:
        completion = await client.chat.completions.create(
            model="llama3.1:8b", messages=[{"role": "user", "content": "hi"}]
        )
        assert completion.choices[0].message.content == "hi there"
        stream = await client.chat.completions.create(
            model="llama3.1:8b", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        assert text == "tok0 tok1 tok2 "
        models = await client.models.list()
        assert sorted(m.id for m in models.data) == ["llama3.1:8b", "qwen2.5:7b"]
        assert (await client.models.retrieve("qwen2.5:7b")).id == "qwen2.5:7b"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("missing")
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.AuthenticationError):
            await stranger.models.list()
    finally:
        await client.close()
        await stranger.close()
