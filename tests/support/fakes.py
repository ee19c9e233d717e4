"""Honest fakes for gateway tests: an in-process Ollama-like upstream that records what it received.

`FakeOllama` speaks enough of Ollama's API for the gateway (version, tags, ps, show, generate,
chat, embed, the /v1 routes, pull, create, copy, delete, blobs) and has knobs for misbehaviour:
fail with a status, die in the middle of a stream, hold a stream open until released. Each
request it received is kept (method, path, headers, body) so tests can check what the gateway
sent upstream, and `cancelled` is set when a client hangs up on a stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy

from gateway.config import GatewaySettings, StaticBackend


@dataclass
class Received:
    method: str
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class FakeOllama:
    name: str = "fake"
    models: dict[str, int] = field(default_factory=lambda: {"llama3.1:8b": 4_920_000_000})
    resident: dict[str, int] = field(default_factory=dict)  # name -> context_length
    vram: dict[str, int] = field(default_factory=dict)  # name -> size_vram, when less than the file (CPU offload)
    version: str = "0.12.3"
    healthy: bool = True  # False: /api/version answers 500 (a failing health check)
    chunks: int = 3
    chunk_delay_s: float = 0.0
    load_duration_ns: int = 5_000_000  # 5 ms: warm
    fail_status: int | None = None  # answer model calls with this status
    fail_in_pieces: bool = False  # ...with the error body sent in two chunks, a moment apart
    fail_message: str = ""  # ...with this error text (default: "<name> failing")
    inventory_fails: bool = False  # /api/tags answers 500 (the gateway never learns what is installed)
    die_after_chunks: int | None = None  # drop the connection after this many chunks
    hold: asyncio.Event | None = None  # streams wait on it after their first chunk
    store: set[str] = field(default_factory=set)  # blobs
    pull_layers: int = 2
    received: list[Received] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    stream_started: asyncio.Event = field(default_factory=asyncio.Event)
    server: TestServer | None = None
    active: int = 0  # generations running now
    max_active: int = 0  # the most that ever ran at once (what a 1-slot Ollama would have queued)

    # -- life ------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        r = app.router
        r.add_get("/", self.root)
        r.add_get("/api/version", self.api_version)
        r.add_get("/api/tags", self.api_tags)
        r.add_get("/api/ps", self.api_ps)
        r.add_post("/api/show", self.api_show)
        r.add_post("/api/generate", self.api_generate)
        r.add_post("/api/chat", self.api_generate)
        r.add_post("/api/embed", self.api_embed)
        r.add_post("/v1/chat/completions", self.v1_chat)
        r.add_post("/v1/messages", self.v1_chat)  # the gateway only relays its SSE; the dialect does not matter
        r.add_get("/v1/models", self.v1_models)
        r.add_get("/v1/models/{model:.+}", self.v1_model)
        r.add_post("/api/pull", self.api_pull)
        r.add_post("/api/create", self.api_create)
        r.add_post("/api/copy", self.api_copy)
        r.add_delete("/api/delete", self.api_delete)
        r.add_head("/api/blobs/{digest}", self.blob_head)
        r.add_post("/api/blobs/{digest}", self.blob_post)
        r.add_post("/api/push", self.api_push)
        return app

    async def start(self) -> FakeOllama:
        self.server = TestServer(self.app(), host="127.0.0.1")
        await self.server.start_server()
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def backend(self, **kwargs: Any) -> StaticBackend:
        return StaticBackend(url=self.url, id=self.name, **kwargs)

    def calls(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    async def _record(self, request: web.Request) -> Received:
        body = await request.read()
        received = Received(request.method, request.path, request.headers, body)
        self.received.append(received)
        return received

    # -- listings --------------------------------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def api_version(self, request: web.Request) -> web.Response:
        if not self.healthy:
            return web.json_response({"error": "unwell"}, status=500)
        return web.json_response({"version": self.version})

    def _tag(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-01-01T00:00:00Z",
            "size": self.models[name],
            "digest": f"digest-of-{name}",
            "details": {"format": "gguf", "family": "llama", "parameter_size": "8.0B", "quantization_level": "Q4_K_M"},
        }

    async def api_tags(self, request: web.Request) -> web.Response:
        if self.inventory_fails:
            return web.json_response({"error": "store unreadable"}, status=500)
        return web.json_response({"models": [self._tag(n) for n in self.models]})

    async def api_ps(self, request: web.Request) -> web.Response:
        expires = (datetime.now(UTC) + timedelta(minutes=5)).isoformat().replace("+00:00", "Z")
        rows = [
            {
                **self._tag(n),
                "expires_at": expires,
                "size_vram": self.vram.get(n, self.models.get(n, 0)),
                "context_length": ctx,
            }
            for n, ctx in self.resident.items()
        ]
        return web.json_response({"models": rows})

    async def api_show(self, request: web.Request) -> web.Response:
        received = await self._record(request)
        name = received.json()["model"]
        if name not in self.models:
            return web.json_response({"error": f"model '{name}' not found"}, status=404)
        return web.json_response({"modelfile": "", "details": self._tag(name)["details"], "model_info": {}})

    async def v1_models(self, request: web.Request) -> web.Response:
        data = [{"id": n, "object": "model", "created": 1700000000, "owned_by": "library"} for n in self.models]
        return web.json_response({"object": "list", "data": data})

    async def v1_model(self, request: web.Request) -> web.Response:
        await self._record(request)
        name = request.match_info["model"]
        return web.json_response({"id": name, "object": "model", "created": 1700000000, "owned_by": "library"})

    # -- model calls -----------------------------------------------------------------------------

    def _final(self, model: str) -> dict[str, Any]:
        return {
            "model": model,
            "created_at": _now(),
            "response": "",
            "done": True,
            "done_reason": "stop",
            "total_duration": self.load_duration_ns + 50_000_000,
            "load_duration": self.load_duration_ns,
            "prompt_eval_count": 10,
            "prompt_eval_duration": 10_000_000,
            "eval_count": self.chunks,
            "eval_duration": 30_000_000,
        }

    async def api_generate(self, request: web.Request) -> web.StreamResponse:
        received = await self._record(request)
        data = received.json()
        model = data["model"]
        if self.fail_status is not None:
            return await self._fail(request)
        if model not in self.models:
            return web.json_response({"error": f"model '{model}' not found"}, status=404)
        self.resident.setdefault(model, data.get("options", {}).get("num_ctx", 4096))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._generate(request, data, model)
        finally:
            self.active -= 1

    async def _generate(self, request: web.Request, data: dict[str, Any], model: str) -> web.StreamResponse:
        chat = request.path == "/api/chat"
        if data.get("stream") is False:
            final = self._final(model)
            if chat:
                final["message"] = {"role": "assistant", "content": "hi " * self.chunks}
            else:
                final["response"] = "hi " * self.chunks
            return web.json_response(final)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        self.stream_started.set()
        try:
            for i in range(self.chunks):
                if self.die_after_chunks is not None and i == self.die_after_chunks:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                piece = {"model": model, "created_at": _now(), "done": False}
                if chat:
                    piece["message"] = {"role": "assistant", "content": f"tok{i} "}
                else:
                    piece["response"] = f"tok{i} "
                await response.write(json.dumps(piece).encode() + b"\n")
                if i == 0 and self.hold is not None:
                    await self.hold.wait()
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
            final = self._final(model)
            if chat:
                final["message"] = {"role": "assistant", "content": ""}
            await response.write(json.dumps(final).encode() + b"\n")
            await response.write_eof()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return response

    async def _fail(self, request: web.Request) -> web.StreamResponse:
        body = json.dumps({"error": self.fail_message or f"{self.name} failing"}).encode()
        if not self.fail_in_pieces:
            return web.json_response(body=body, status=self.fail_status)
        response = web.StreamResponse(status=self.fail_status or 500, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        half = len(body) // 2
        await response.write(body[:half])
        await asyncio.sleep(0.1)  # the first piece reaches the gateway on its own
        await response.write(body[half:])
        await response.write_eof()
        return response

    async def api_embed(self, request: web.Request) -> web.Response:
        received = await self._record(request)
        model = received.json()["model"]
        if model not in self.models:
            return web.json_response({"error": f"model '{model}' not found"}, status=404)
        return web.json_response(
            {"model": model, "embeddings": [[0.6, 0.8]], "total_duration": 1000, "load_duration": 100}
        )

    async def v1_chat(self, request: web.Request) -> web.StreamResponse:
        received = await self._record(request)
        data = received.json()
        model = data["model"]
        if model not in self.models:
            error = {"message": f"model '{model}' not found", "type": "not_found_error", "param": None, "code": None}
            return web.json_response({"error": error}, status=404)
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        if not data.get("stream"):
            message = {"role": "assistant", "content": "hi there"}
            return web.json_response(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(self.chunks):
            if self.die_after_chunks is not None and i == self.die_after_chunks:
                assert request.transport is not None
                request.transport.abort()
                return response
            delta = {"role": "assistant", "content": f"tok{i} "}
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        done = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await response.write(b"data: " + json.dumps(done).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # -- management ------------------------------------------------------------------------------

    async def api_pull(self, request: web.Request) -> web.StreamResponse:
        received = await self._record(request)
        data = received.json()
        model = data.get("model") or data.get("name")
        if model == "no-such-model":
            return web.json_response({"error": "pull model manifest: file does not exist"}, status=500)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)

        async def line(value: dict[str, Any]) -> None:
            await response.write(json.dumps(value).encode() + b"\n")

        await line({"status": "pulling manifest"})
        for layer in range(self.pull_layers):
            digest = f"sha256:{layer:064x}"
            for completed in (0, 50, 100):
                await line(
                    {"status": f"pulling {digest[7:19]}", "digest": digest, "total": 100, "completed": completed}
                )
        await line({"status": "verifying sha256 digest"})
        await line({"status": "writing manifest"})
        self.models[model] = 1_000_000
        await line({"status": "success"})
        await response.write_eof()
        return response

    async def api_create(self, request: web.Request) -> web.StreamResponse:
        received = await self._record(request)
        model = received.json()["model"]
        self.models[model] = 1_000
        return web.json_response({"status": "success"})

    async def api_copy(self, request: web.Request) -> web.Response:
        received = await self._record(request)
        data = received.json()
        if data["source"] not in self.models:
            return web.json_response({"error": f'model "{data["source"]}" not found'}, status=404)
        self.models[data["destination"]] = self.models[data["source"]]
        return web.Response(status=200)

    async def api_delete(self, request: web.Request) -> web.Response:
        received = await self._record(request)
        model = received.json()["model"]
        if model not in self.models:
            return web.json_response({"error": f"model '{model}' not found"}, status=404)
        del self.models[model]
        return web.Response(status=200)

    async def blob_head(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(status=200 if request.match_info["digest"] in self.store else 404)

    async def blob_post(self, request: web.Request) -> web.Response:
        received = await self._record(request)
        self.store.add(request.match_info["digest"])
        return web.Response(status=201, text=str(len(received.body)))

    async def api_push(self, request: web.Request) -> web.StreamResponse:
        received = await self._record(request)
        if received.json().get("stream") is False:
            return web.json_response({"status": "success"})
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        try:
            for status in ("retrieving manifest", "pushing manifest", "success"):
                await response.write(json.dumps({"status": status}).encode() + b"\n")
                if self.hold is not None:
                    await self.hold.wait()
            await response.write_eof()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return response


# What the `fakes` fixture (tests/conftest.py) hands a test: start one more fake backend.
MakeFake = Callable[..., Awaitable["FakeOllama"]]


def fast_settings(*backends: StaticBackend, **overrides: Any) -> GatewaySettings:
    """Gateway settings for tests: quick polls and health checks, the given static backends."""
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "poll_interval_s": 0.05,
        "health_interval_s": 0.05,
        "connect_timeout_s": 1.0,
        "eject_for_s": 0.3,
        "queue_timeout_s": 10.0,
        "drain_timeout_s": 5.0,
        "backends": tuple(backends),
    }
    values.update(overrides)
    return GatewaySettings(**values)


async def wait_for(predicate: Any, timeout_s: float = 10.0, interval_s: float = 0.02) -> None:
    """Poll `predicate()` until true; fail after `timeout_s` (a deadline, never a timed assertion)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)
