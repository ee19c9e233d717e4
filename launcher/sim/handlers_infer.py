"""/api/generate, /api/chat, /api/embed and /api/embeddings (server/routes.go handlers, HEAD).

Each handler checks its request in the order Ollama does, so the same bad request gets the same
status and text: body, model reference, installed model, unload/preload shortcuts, capabilities,
options, then scheduling (503 queue full, 500 load failure, 499 cancelled).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiohttp import web

from launcher.facts.names import ModelName
from launcher.facts.ollama import api_keep_alive_s as keep_alive_seconds
from launcher.sim import textgen, thinking
from launcher.sim.gojson import (
    CHAT_REQUEST,
    EMBED_REQUEST,
    EMBEDDING_REQUEST,
    GENERATE_REQUEST,
    BindError,
    bind,
    format_time,
)
from launcher.sim.inference import (
    CompletionCall,
    RequestClock,
    RunnerStopped,
    check_format,
    completion_chunks,
    embed_inputs,
    merge_chunks,
    ns,
)
from launcher.sim.models import InstalledModel, ModelLoadError
from launcher.sim.options import OptionError, RequestOptions, parse_options
from launcher.sim.runner import LoadKey
from launcher.sim.scheduler import Lease, LoadFailed, QueueFull
from launcher.sim.service import ModelRef, ModelRefError, SimService, parse_model_ref
from launcher.sim.wire import StreamError, error_response, json_response, send_ndjson

SERVICE: web.AppKey[SimService] = web.AppKey("sim_service", SimService)


class HandlerError(Exception):
    """Ends a handler with an Ollama-shaped error reply."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> web.Response:
        return error_response(self.status, self.message)


async def read_request(request: web.Request, schema: dict[str, str], type_name: str) -> dict[str, Any]:
    try:
        return bind(await request.read(), schema, type_name)
    except BindError as e:
        raise HandlerError(400, str(e)) from None


def _model_ref(requested: str, *, required: tuple[int, str] | None = None) -> ModelRef:
    """parseAndValidateModelRef + writeModelRefParseError: a bad reference is a 400 with its own text,
    except a missing one, which gets the handler's `required` reply (default: 400 "model is required")."""
    try:
        return parse_model_ref(requested)
    except ModelRefError as e:
        status, message = required if required and e.kind == "required" else (400, str(e))
        raise HandlerError(status, message) from None


def _lookup(service: SimService, name: ModelName, not_found: str) -> InstalledModel:
    try:
        model = service.installed(name)
    except ModelLoadError as e:
        raise HandlerError(500, str(e)) from None
    if model is None:
        raise HandlerError(404, not_found)
    return model


def _options(service: SimService, model: InstalledModel, raw: Any, *, embedding: bool = False) -> RequestOptions:
    try:
        return parse_options(
            model.params,
            raw if isinstance(raw, dict) else None,
            default_num_ctx=service.settings.default_num_ctx,
            env_context_length=service.settings.context_length,
            embedding=embedding,
        )
    except OptionError as e:
        raise HandlerError(500, str(e)) from None


def _capability_error(model: InstalledModel, wanted: list[str]) -> str | None:
    missing = [c for c in wanted if c not in model.capabilities]
    if not missing:
        return None
    return f"{model.full_name} does not support {' '.join(missing)}"


def load_key_for(model: InstalledModel, opts: RequestOptions, shift: bool | None) -> LoadKey:
    """The runner a request needs: its options plus the context-shift flag (resolveContextShift)."""
    return replace(opts.load_key, context_shift=model.supports_context_shift if shift is None else shift)


async def _acquire(service: SimService, model: InstalledModel, opts: RequestOptions, body: dict[str, Any]) -> Lease:
    """scheduleRunner + handleScheduleError."""
    keep_alive = keep_alive_seconds(body.get("keep_alive"))
    key = load_key_for(model, opts, body.get("shift"))
    try:
        return await service.scheduler.acquire(model, key, keep_alive_s=keep_alive)
    except QueueFull as e:
        raise HandlerError(503, str(e)) from None
    except LoadFailed as e:
        raise HandlerError(500, str(e)) from None


def _started(service: SimService) -> RequestClock:
    return RequestClock(service, time.monotonic())


def _is_unload(body: dict[str, Any]) -> bool:
    return body.get("keep_alive") is not None and keep_alive_seconds(body.get("keep_alive")) == 0


NO_MULTIMODAL = "Multimodal data provided, but model does not support multimodal requests."


def _check_think(model: InstalledModel, body: dict[str, Any], requested: str) -> None:
    """A model without the thinking capability refuses think=true (or a level); false is fine."""
    if "thinking" not in model.capabilities and thinking.requested(body.get("think")):
        raise HandlerError(400, f'"{requested}" does not support thinking')


def _extras(model: InstalledModel, body: dict[str, Any], images: int) -> dict[str, Any]:
    """CompletionCall fields shared by generate and chat: thinking, logprobs, and what llama-server
    refuses once loaded (images for a model without a vision tower or projector)."""
    refused = (400, NO_MULTIMODAL) if images and "vision" not in model.capabilities else None
    return {
        "think_level": thinking.level(model, body.get("think")),
        "logprobs": bool(body.get("logprobs")),
        "top_logprobs": int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0,
        "runner_error": refused,
    }


Chunks = AsyncGenerator[dict[str, Any] | StreamError, None]


Start = Callable[[SimService, dict[str, Any], RequestClock], Awaitable[dict[str, Any] | Chunks]]


async def _serve(request: web.Request, schema: Any, type_name: str, start: Start, *, chat: bool) -> web.StreamResponse:
    """Read, check and schedule one generate or chat request, then answer it (streamed or not)."""
    service = request.app[SERVICE]
    clock = _started(service)
    try:
        body = await read_request(request, schema, type_name)
        started = await start(service, body, clock)
    except HandlerError as e:
        return e.response()
    if isinstance(started, dict):
        return json_response(started)
    return await _reply(request, started, stream=body.get("stream") is not False, chat=chat)


def _check_top_logprobs(body: dict[str, Any]) -> None:
    top = body.get("top_logprobs", 0) or 0
    if top < 0 or top > 20:
        raise HandlerError(400, "top_logprobs must be between 0 and 20")


async def generate(request: web.Request) -> web.StreamResponse:
    return await _serve(request, GENERATE_REQUEST, "GenerateRequest", start_generate, chat=False)


async def start_generate(service: SimService, body: dict[str, Any], clock: RequestClock) -> dict[str, Any] | Chunks:
    """Check and schedule a generate request: a reply (load/unload) or its chunks. Raises HandlerError."""
    _check_top_logprobs(body)
    requested = str(body.get("model") or "")
    ref = _model_ref(requested, required=(404, f"model '{requested}' not found"))
    model = _lookup(service, ref.name, f"model '{requested}' not found")
    prompt = str(body.get("prompt") or "")
    if not prompt and _is_unload(body):
        service.scheduler.expire_runner(model)
        now = format_time(service.clock.wall_time())
        return {"model": requested, "created_at": now, "response": "", "done": True, "done_reason": "unload"}
    raw = bool(body.get("raw"))
    if raw and (body.get("template") or body.get("system") or body.get("context")):
        raise HandlerError(400, "raw mode does not support template, system, or context")
    _check_think(model, body, requested)
    images = [i for i in body.get("images") or [] if i]
    if images and len(images) > 1 and "mllama" in (model.details()["families"] or [model.spec.family]):
        raise HandlerError(400, "this model only supports one image while more than one image requested")
    wanted = ["completion"] + (["insert"] if body.get("suffix") else [])
    if "completion" not in model.capabilities:
        raise HandlerError(400, f'"{requested}" does not support generate')
    if err := _capability_error(model, wanted):
        raise HandlerError(400, err)
    opts = _options(service, model, body.get("options"))
    lease = await _acquire(service, model, opts, body)
    clock.mark_acquired(lease)
    if not prompt:
        lease.release()
        now = format_time(service.clock.wall_time())
        return {"model": requested, "created_at": now, "response": "", "done": True, "done_reason": "load"}
    json_format, format_error = check_format(body.get("format"))
    system = str(body.get("system") or "") or model.system
    context = body.get("context") or []
    if raw:
        rendered, prompt_tokens = prompt, textgen.count_tokens(prompt)
    else:
        messages = [*model.messages, {"role": "user", "content": prompt}] if not context else [{"content": prompt}]
        rendered = f"{system}\n{prompt}\n{body.get('suffix') or ''}"
        prompt_tokens = textgen.prompt_tokens_for_messages(messages, system) + len(context)
    prompt_tokens += 768 * len(images)  # Ollama counts an image as 768 tokens
    if body.get("_debug_render_only"):
        lease.release()
        if raw:
            shown = prompt
        elif body.get("suffix"):
            shown = f"<PRE> {prompt} <SUF>{body['suffix']} <MID>"
        else:
            shown = render_chat([{"role": "user", "content": prompt, "images": images}], system)
        return debug_reply(service, requested, shown, len(images), chat=False)
    call = CompletionCall(
        requested=requested,
        model=model,
        options=opts,
        prompt_key=rendered + repr(context),
        prompt_tokens=prompt_tokens,
        json_format=json_format,
        chat=False,
        context_text=None if raw else rendered,
        format_error=format_error,
        **_extras(model, body, len(images)),
    )
    return completion_chunks(service, lease, clock, call)


async def _reply(request: web.Request, chunks: Chunks, *, stream: bool, chat: bool) -> web.StreamResponse:
    if stream:
        return await send_ndjson(request, chunks)
    collected: list[dict[str, Any]] = []
    try:
        async for item in chunks:
            if isinstance(item, StreamError):
                return error_response(item.status, item.message)
            collected.append(item)
    finally:
        await chunks.aclose()
    return json_response(merge_chunks(collected, chat=chat))


def _is_tool_turn(messages: list[dict[str, Any]]) -> bool:
    return bool(messages) and str(messages[-1].get("role", "")).lower() == "user"


async def chat(request: web.Request) -> web.StreamResponse:
    return await _serve(request, CHAT_REQUEST, "ChatRequest", start_chat, chat=True)


async def start_chat(service: SimService, body: dict[str, Any], clock: RequestClock) -> dict[str, Any] | Chunks:
    """Check and schedule a chat request: a reply (load/unload) or its chunks. Raises HandlerError."""
    _check_top_logprobs(body)
    requested = str(body.get("model") or "")
    ref = _model_ref(requested)
    model = _lookup(service, ref.name, f"model '{requested}' not found")
    messages = [
        {**m, "role": str(m.get("role") or "").lower()} for m in (body.get("messages") or []) if isinstance(m, dict)
    ]
    if not messages and _is_unload(body):
        service.scheduler.expire_runner(model)
        now = format_time(service.clock.wall_time())
        reply = {"model": requested, "created_at": now, "message": {"role": "assistant", "content": ""}}
        return {**reply, "done": True, "done_reason": "unload"}
    tools = body.get("tools") or []
    _check_think(model, body, requested)
    if "completion" not in model.capabilities:
        raise HandlerError(400, f'"{requested}" does not support chat')
    if err := _capability_error(model, ["completion"] + (["tools"] if tools else [])):
        raise HandlerError(400, err)
    opts = _options(service, model, body.get("options"))
    lease = await _acquire(service, model, opts, body)
    clock.mark_acquired(lease)
    if not messages:
        lease.release()
        now = format_time(service.clock.wall_time())
        reply = {"model": requested, "created_at": now, "message": {"role": "assistant", "content": ""}}
        return {**reply, "done": True, "done_reason": "load"}
    json_format, format_error = check_format(body.get("format"))
    history = [*model.messages, *messages]
    system = "" if messages[0]["role"] == "system" else model.system
    images = sum(len(m.get("images") or []) for m in history)
    if body.get("_debug_render_only"):
        lease.release()
        return debug_reply(service, requested, render_chat(history, system), images, chat=True)
    call = CompletionCall(
        requested=requested,
        model=model,
        options=opts,
        prompt_key=repr([(m.get("role"), m.get("content")) for m in history]) + system,
        prompt_tokens=textgen.prompt_tokens_for_messages(history, system),
        json_format=json_format,
        chat=True,
        tools=tools,
        tool_turn=_is_tool_turn(messages),
        format_error=format_error,
        **_extras(model, body, images),
    )
    return completion_chunks(service, lease, clock, call)


def render_chat(history: list[dict[str, Any]], system: str) -> str:
    """The prompt our chat templates render (templates.py's shape), for _debug_render_only."""
    parts = [f"<|system|>\n{system}<|end|>\n"] if system else []
    for message in history:
        images = "".join(f"[img-{i}]" for i in range(len(message.get("images") or [])))
        parts.append(f"<|{message.get('role', '')}|>\n{images}{message.get('content') or ''}<|end|>\n")
    return "".join(parts) + "<|assistant|>\n"


def debug_reply(service: SimService, requested: str, rendered: str, images: int, *, chat: bool) -> dict[str, Any]:
    """`_debug_render_only`: the rendered prompt in `_debug_info`, no inference (routes.go DebugRenderOnly)."""
    now = format_time(service.clock.wall_time())
    info: dict[str, Any] = {"rendered_template": rendered} | ({"image_count": images} if images else {})
    body: dict[str, Any] = {"model": requested, "created_at": now}
    body |= {"message": {"role": "", "content": ""}} if chat else {"response": ""}
    return body | {"done": False, "_debug_info": info}


async def embed(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    clock = _started(service)
    try:
        body = await read_request(request, EMBED_REQUEST, "EmbedRequest")
        return json_response(await run_embed(service, body, clock))
    except HandlerError as e:
        return e.response()


def _embed_inputs(raw: Any) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw] if raw else []
    if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        return list(raw)
    raise HandlerError(400, "invalid input type")


async def run_embed(service: SimService, body: dict[str, Any], clock: RequestClock) -> dict[str, Any]:
    """Check, schedule and run an embed request: the EmbedResponse. Raises HandlerError."""
    requested = str(body.get("model") or "")
    ref = _model_ref(requested, required=(404, f"model '{requested}' not found"))
    inputs = _embed_inputs(body.get("input"))
    model = _lookup(service, ref.name, f'model "{requested}" not found, try pulling it first')
    opts = _options(service, model, body.get("options"), embedding="embedding" in model.capabilities)
    lease = await _acquire(service, model, opts, body)
    clock.mark_acquired(lease)
    try:
        if not inputs:
            return {"model": requested, "embeddings": []}
        limit = min(lease.runner.context_length, model.spec.context_length or lease.runner.context_length)
        texts = []
        for text in inputs:
            if textgen.count_tokens(text) + 2 > limit:
                if body.get("truncate") is False:
                    raise HandlerError(400, "the input length exceeds the context length")
                text = text[: max(limit - 2, 1) * 4]
            texts.append(text)
        vectors, tokens, _seconds = await embed_inputs(
            service, lease, model, texts, dimensions=int(body.get("dimensions") or 0)
        )
    except RunnerStopped as e:
        raise HandlerError(400, str(e)) from None  # EmbedHandler answers any runner error with a 400
    finally:
        lease.release()
    total = clock.load_s + (service.clock.now() - clock.acquired_sim)
    reply: dict[str, Any] = {"model": requested, "embeddings": vectors}
    reply.update({k: v for k, v in (("total_duration", ns(total)), ("load_duration", ns(clock.load_s))) if v})
    if tokens:
        reply["prompt_eval_count"] = tokens
    return reply


async def embeddings(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        body = await read_request(request, EMBEDDING_REQUEST, "EmbeddingRequest")
        requested = str(body.get("model") or "")
        ref = _model_ref(requested)
        model = _lookup(service, ref.name, f'model "{requested}" not found, try pulling it first')
        opts = _options(service, model, body.get("options"), embedding="embedding" in model.capabilities)
        lease = await _acquire(service, model, opts, body)
        try:
            prompt = str(body.get("prompt") or "")
            if not prompt:
                return json_response({"embedding": []})
            vectors, _tokens, _s = await embed_inputs(service, lease, model, [prompt])
        except RunnerStopped as e:
            raise HandlerError(500, str(e)) from None
        finally:
            lease.release()
        return json_response({"embedding": vectors[0]})
    except HandlerError as e:
        return e.response()
