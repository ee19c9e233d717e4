"""The OpenAI-compatible routes, translated like Ollama's middleware/openai.go and openai/openai.go.

Requests are rewritten into their Ollama form and run through the same code as /api/chat,
/api/generate, /api/embed and /api/show; replies are rewritten back: `chat.completion`,
`chat.completion.chunk` and `text_completion` objects, SSE frames (`data: {...}\\n\\n`, then
`data: [DONE]\\n\\n`), usage (and `stream_options.include_usage`), and errors in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with type invalid_request_error (400),
not_found_error (404) or api_error.
"""

from __future__ import annotations

import base64
import contextlib
import random
import struct
import time
from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web

from launcher.sim.handlers_infer import SERVICE, HandlerError, RequestClock, run_embed, start_chat, start_generate
from launcher.sim.handlers_models import list_models, show_response
from launcher.sim.inference import merge_chunks
from launcher.sim.models import ModelLoadError
from launcher.sim.openai_wire import (
    CHAT_COMPLETION_REQUEST,
    COMPLETION_REQUEST,
    EMBEDDINGS_REQUEST,
    SSEStream,
    bind_openai,
    chat_messages,
    json_reply,
    openai_error,
    response_format,
    sampling_options,
    stream_error,
    think_from_effort,
    tool_calls,
    unix,
    usage,
)
from launcher.sim.service import ModelRefError, parse_model_ref
from launcher.sim.wire import StreamError


async def chat_completions(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    clock = RequestClock(service, time.monotonic())
    try:
        req = await bind_openai(request, CHAT_COMPLETION_REQUEST, "ChatCompletionRequest")
        raw_messages = req.get("messages") or []
        if not raw_messages:
            raise HandlerError(400, "[] is too short - 'messages'")
        body: dict[str, Any] = {
            "model": req.get("model") or "",
            "messages": chat_messages(raw_messages),
            "options": sampling_options(req, chat=True),
            "stream": bool(req.get("stream")),
            "tools": req.get("tools") or [],
            "logprobs": req.get("logprobs") is True,
            "top_logprobs": req.get("top_logprobs") or 0,
            "_debug_render_only": bool(req.get("_debug_render_only")),
        }
        if (fmt := response_format(req)) is not None:
            body["format"] = fmt
        if (think := think_from_effort(req)) is not None:
            body["think"] = think
        started = await start_chat(service, body, clock)
    except HandlerError as e:
        return openai_error(e.status, e.message)
    if isinstance(started, dict) and "_debug_info" in started:
        return json_reply(_chat_completion(f"chatcmpl-{random.randrange(999)}", started))
    if isinstance(started, dict):
        started = _one(started)
    chat_id = f"chatcmpl-{random.randrange(999)}"
    stream_options = req.get("stream_options") or {}
    if not req.get("stream"):
        collected = await _collect(started)
        if isinstance(collected, web.Response):
            return collected
        final = merge_chunks(collected, chat=True)
        return json_reply(_chat_completion(chat_id, final))
    sse = SSEStream(request)
    created: int | None = None
    first_sent = tool_call_sent = False
    try:
        async with contextlib.aclosing(started) as chunks:
            async for item in chunks:
                if isinstance(item, StreamError):
                    if sse.response is None:
                        return openai_error(item.status, item.message)
                    await sse.data(stream_error(item.message))
                    break
                created = created or unix(item["created_at"])
                message = item["message"]
                calls = tool_calls(message.get("tool_calls") or [])
                empty_trailer = item["done"] and first_sent and not message.get("content") and not calls
                if not empty_trailer:
                    delta: dict[str, Any] = {}
                    if not first_sent:
                        delta["role"] = "assistant"
                    delta["content"] = message.get("content", "")
                    if message.get("thinking"):
                        delta["reasoning"] = message["thinking"]
                    if calls:
                        delta["tool_calls"] = calls
                        tool_call_sent = True
                    chunk = _chunk(chat_id, created, item["model"], delta, None)
                    if item.get("logprobs"):
                        chunk["choices"][0]["logprobs"] = {"content": item["logprobs"]}
                    await sse.data(chunk)
                    first_sent = True
                if item["done"]:
                    reason = item.get("done_reason") or "stop"
                    if reason == "stop" and tool_call_sent:
                        reason = "tool_calls"
                    finish = _chunk(chat_id, created, item["model"], {}, reason)
                    await sse.data(finish)
                    if stream_options.get("include_usage"):
                        await sse.data({**finish, "choices": [], "usage": usage(item)})
                    await sse.send(b"data: [DONE]\n\n")
    except ConnectionError:
        pass
    return await sse.finish()


async def _one(reply: dict[str, Any]) -> Any:
    yield reply


def _chunk(chat_id: str, created: int, model: str, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
    return {
        "id": chat_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_ollama",
        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
    }


def _chat_completion(chat_id: str, final: dict[str, Any]) -> dict[str, Any]:
    message = final["message"]
    calls = tool_calls(message.get("tool_calls") or [])
    reason = final.get("done_reason") or None
    if reason == "stop" and calls:
        reason = "tool_calls"
    out_message: dict[str, Any] = {"role": message.get("role", "assistant"), "content": message.get("content", "")}
    if message.get("thinking"):
        out_message["reasoning"] = message["thinking"]
    if calls:
        out_message["tool_calls"] = calls
    choice: dict[str, Any] = {"index": 0, "message": out_message, "finish_reason": reason}
    if final.get("logprobs"):
        choice["logprobs"] = {"content": final["logprobs"]}
    out = {
        "id": chat_id,
        "object": "chat.completion",
        "created": unix(final["created_at"]),
        "model": final["model"],
        "system_fingerprint": "fp_ollama",
        "choices": [choice],
        "usage": usage(final),
    }
    if "_debug_info" in final:
        out["_debug_info"] = final["_debug_info"]
    return out


async def completions(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    clock = RequestClock(service, time.monotonic())
    try:
        req = await bind_openai(request, COMPLETION_REQUEST, "CompletionRequest")
        body = {
            "model": req.get("model") or "",
            "prompt": req.get("prompt") or "",
            "suffix": req.get("suffix") or "",
            "options": sampling_options(req, chat=False),
            "stream": bool(req.get("stream")),
        }
        if isinstance(req.get("logprobs"), int) and req["logprobs"] > 0:  # FromCompleteRequest
            body |= {"logprobs": True, "top_logprobs": req["logprobs"]}
        started = await start_generate(service, body, clock)
    except HandlerError as e:
        return openai_error(e.status, e.message)
    if isinstance(started, dict):
        started = _one(started)
    cmpl_id = f"cmpl-{random.randrange(999)}"
    include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
    if not req.get("stream"):
        collected = await _collect(started)
        if isinstance(collected, web.Response):
            return collected
        final = merge_chunks(collected, chat=False)
        return json_reply(
            {
                "id": cmpl_id,
                "object": "text_completion",
                "created": unix(final["created_at"]),
                "model": final["model"],
                "system_fingerprint": "fp_ollama",
                "choices": [_text_choice(final["response"], final)],
                "usage": usage(final),
            }
        )
    sse = SSEStream(request)
    try:
        async with contextlib.aclosing(started) as chunks:
            async for item in chunks:
                if isinstance(item, StreamError):
                    if sse.response is None:
                        return openai_error(item.status, item.message)
                    await sse.data(stream_error(item.message))
                    break
                chunk: dict[str, Any] = {
                    "id": cmpl_id,
                    "object": "text_completion",
                    "created": int(time.time()),
                    "choices": [_text_choice(item["response"], item)],
                    "model": item["model"],
                    "system_fingerprint": "fp_ollama",
                }
                if include_usage:
                    chunk["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
                await sse.data(chunk)
                if item["done"]:
                    if include_usage:
                        await sse.data({**chunk, "choices": [], "usage": usage(item)})
                    await sse.send(b"data: [DONE]\n\n")
    except ConnectionError:
        pass
    return await sse.finish()


def _text_choice(text: str, item: dict[str, Any]) -> dict[str, Any]:
    choice: dict[str, Any] = {"text": text, "index": 0, "finish_reason": item.get("done_reason") or None}
    if item.get("logprobs"):
        choice["logprobs"] = {"content": item["logprobs"]}
    return choice


def _floats_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def embeddings(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    clock = RequestClock(service, time.monotonic())
    try:
        req = await bind_openai(request, EMBEDDINGS_REQUEST, "EmbedRequest")
        encoding = str(req.get("encoding_format") or "")
        if encoding and encoding.lower() not in ("float", "base64"):
            raise HandlerError(
                400, f"Invalid value for 'encoding_format' = {encoding}. Supported values: ['float', 'base64']."
            )
        inputs = req.get("input")
        if inputs == "":
            inputs = [""]
        if inputs is None or inputs == []:
            raise HandlerError(400, "invalid input")
        body = {"model": req.get("model") or "", "input": inputs, "dimensions": req.get("dimensions") or 0}
        reply = await run_embed(service, body, clock)
    except HandlerError as e:
        return openai_error(e.status, e.message)
    data = []
    for i, vector in enumerate(reply.get("embeddings") or []):
        value: Any = _floats_base64(vector) if encoding.lower() == "base64" else vector
        data.append({"object": "embedding", "embedding": value, "index": i})
    tokens = reply.get("prompt_eval_count", 0)
    return json_reply(
        {
            "object": "list",
            "data": data or None,
            "model": req.get("model") or "",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def _owner(model_id: str) -> str:
    try:
        return parse_model_ref(model_id).name.namespace
    except ModelRefError:
        return ""


async def models(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    entries = list_models(service)
    data = [
        {"id": e["model"], "object": "model", "created": unix(e["modified_at"]), "owned_by": _owner(e["model"])}
        for e in entries
    ]
    return json_reply({"object": "list", "data": data or None})


async def retrieve_model(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    model_id = request.match_info["model"]
    try:
        ref = parse_model_ref(model_id)
    except ModelRefError as e:
        return openai_error(400, str(e))
    try:
        model = service.installed(ref.name)
    except ModelLoadError as e:
        return openai_error(500, str(e))
    if model is None:
        return openai_error(404, f"model '{ref.name.display}' not found")
    shown = show_response(service, model)
    return json_reply(
        {"id": model_id, "object": "model", "created": unix(shown["modified_at"]), "owned_by": _owner(model_id)}
    )


async def _collect(chunks: AsyncGenerator[dict[str, Any] | StreamError, None]) -> list[dict[str, Any]] | web.Response:
    """Every chunk of a non-streamed answer, or the OpenAI-shaped error that cut it short."""
    collected: list[dict[str, Any]] = []
    async with contextlib.aclosing(chunks) as items:
        async for item in items:
            if isinstance(item, StreamError):
                return openai_error(item.status, item.message)
            collected.append(item)
    return collected
