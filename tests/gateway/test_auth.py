"""API keys, admin keys, and refusing an open gateway on a reachable address."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.api.auth import ApiKeys, load_keys
from gateway.server import GatewayServer
from gateway.state.memory import MemoryStore
from launcher.facts.strictconf import ConfigError
from tests.support.fakes import FakeOllama, fast_settings

USER_KEY = "user-key-0123456789"
ADMIN_KEY = "admin-key-9876543210"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    fake = await FakeOllama(name="g0").start()
    yield fake
    await fake.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_keys_come_from_a_file_with_comments_and_from_the_environment(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nfile-key-1\n\n  file-key-2   # laptop\n", encoding="utf-8")
    settings = fast_settings(api_keys_file=str(keys_file), admin_keys_env="MY_ADMIN_KEYS")
    keys = load_keys(settings, {"CORRAL_API_KEYS": "env-key-1, env-key-2", "MY_ADMIN_KEYS": "boss"})
    assert set(keys.api) == {"file-key-1", "file-key-2", "env-key-1", "env-key-2"}
    assert keys.admin == ("boss",)
    with pytest.raises(ConfigError, match="api_keys_file"):
        load_keys(fast_settings(api_keys_file=str(tmp_path / "missing")), {})


async def test_requests_need_a_valid_key(fake: FakeOllama, http: aiohttp.ClientSession) -> None:
    settings = fast_settings(fake.backend())
    async with GatewayServer(settings, MemoryStore(), keys=ApiKeys(api=(USER_KEY,))) as gw:
        payload = {"model": "llama3.1:8b", "prompt": "hi", "stream": False}
        for headers in ({}, bearer("wrong"), {"Authorization": USER_KEY}):
            async with http.post(gw.url + "/api/generate", json=payload, headers=headers) as resp:
                assert resp.status == 401
                assert resp.headers["X-Corral-Error"] == "gateway"
                assert "API key" in (await resp.json())["error"]
        async with http.post(gw.url + "/v1/chat/completions", json={"model": "x", "messages": []}) as resp:
            assert resp.status == 401
            assert "API key" in (await resp.json())["error"]["message"]
        async with http.post(gw.url + "/api/generate", json=payload, headers=bearer(USER_KEY)) as resp:
            assert resp.status == 200
        async with http.get(gw.url + "/") as resp:  # liveness probes need no key
            assert resp.status == 200
        async with http.get(gw.url + "/metrics", headers=bearer(USER_KEY)) as resp:
            assert resp.status == 200  # no admin keys configured: any valid key manages
    # The gateway's key is its own business: the backend never sees it.
    assert all("Authorization" not in r.headers for r in fake.received)


async def test_admin_keys_guard_management_routes(fake: FakeOllama, http: aiohttp.ClientSession) -> None:
    settings = fast_settings(fake.backend())
    keys = ApiKeys(api=(USER_KEY,), admin=(ADMIN_KEY,))
    async with GatewayServer(settings, MemoryStore(), keys=keys) as gw:
        for method, path, body in (
            ("POST", "/api/pull", {"model": "gemma3:4b"}),
            ("DELETE", "/api/delete", {"model": "llama3.1:8b"}),
            ("GET", "/metrics", None),
            ("GET", "/api/corral/status", None),
            ("HEAD", "/api/blobs/sha256:" + "0" * 64, None),
        ):
            async with http.request(method, gw.url + path, json=body, headers=bearer(USER_KEY)) as resp:
                assert resp.status == 403, path
        assert not fake.calls("/api/pull") and not fake.calls("/api/delete")
        async with http.get(gw.url + "/api/corral/status", headers=bearer(ADMIN_KEY)) as resp:
            assert resp.status == 200
        async with http.get(gw.url + "/api/tags", headers=bearer(ADMIN_KEY)) as resp:
            assert resp.status == 200  # admin keys work everywhere


async def test_refuses_to_listen_beyond_loopback_without_keys(fake: FakeOllama) -> None:
    settings = fast_settings(fake.backend(), listen="0.0.0.0:0")
    with pytest.raises(ConfigError, match="non-loopback"):
        await GatewayServer(settings, MemoryStore(), keys=ApiKeys()).start()
    async with GatewayServer(settings, MemoryStore(), keys=ApiKeys(api=(USER_KEY,))) as gw:
        assert gw.port > 0


async def test_browser_origins_are_handled_like_ollama(fake: FakeOllama, http: aiohttp.ClientSession) -> None:
    settings = fast_settings(fake.backend(), cors_origins=("https://chat.example.com",))
    async with GatewayServer(settings, MemoryStore(), keys=ApiKeys()) as gw:
        preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
        async with http.options(gw.url + "/api/chat", headers=preflight) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
            assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
        payload = {"model": "llama3.1:8b", "prompt": "hi"}
        async with http.post(
            gw.url + "/api/generate", json=payload, headers={"Origin": "https://chat.example.com"}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == "https://chat.example.com"
            await resp.read()
        async with http.post(
            gw.url + "/api/generate", json=payload, headers={"Origin": "https://evil.example"}
        ) as resp:
            assert resp.status == 403
    (received,) = fake.calls("/api/generate")
    # The gateway answered CORS itself: passed on, the Origin would make Ollama's own check refuse it.
    assert "Origin" not in received.headers
