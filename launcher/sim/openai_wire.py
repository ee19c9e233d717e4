"""OpenAI wire pieces (openai/openai.go): request schemas, translation into Ollama requests, error
bodies, usage, and the SSE writer. The handlers that use them are in `openai_compat`."""

from __future__ import annotations

import contextlib
import json
from datetime import datetime
from typing import Any

from aiohttp import web

from launcher.sim.gojson import BindError, bind, encode, go_type_of
from launcher.sim.handlers_infer import HandlerError
from launcher.sim.wire import JSON

CHAT_COMPLETION_REQUEST = {
    "model": "string", "messages": "list", "stream": "bool", "stream_options": "map", "max_tokens": "int",
    "seed": "int", "stop": "any", "temperature": "float", "frequency_penalty": "float",
    "presence_penalty": "float", "top_p": "float", "response_format": "map", "tools": "list", "reasoning": "map",
    "reasoning_effort": "string", "logprobs": "optbool", "top_logprobs": "int", "_debug_render_only": "bool",
}  # fmt: skip
COMPLETION_REQUEST = {
    "model": "string", "prompt": "string", "frequency_penalty": "float", "max_tokens": "int",
    "presence_penalty": "float", "seed": "int", "stop": "any", "stream": "bool", "stream_options": "map",
    "temperature": "float", "top_p": "float", "suffix": "string", "logprobs": "int", "_debug_render_only": "bool",
}  # fmt: skip
EMBEDDINGS_REQUEST = {"input": "any", "model": "string", "dimensions": "int", "encoding_format": "string"}


def openai_error(status: int, message: str) -> web.Response:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    body = encode({"error": {"message": message, "type": kind, "param": None, "code": None}}) + b"\n"
    return web.Response(status=status, body=body, headers={"Content-Type": JSON})


def stream_error(message: str) -> dict[str, Any]:
    """A mid-stream failure as an SSE data frame the OpenAI SDKs raise on."""
    return {"error": {"message": message, "type": "api_error", "param": None, "code": None}}


def json_reply(value: Any) -> web.Response:
    return web.Response(body=encode(value) + b"\n", headers={"Content-Type": JSON})


async def bind_openai(request: web.Request, schema: dict[str, str], type_name: str) -> dict[str, Any]:
    body = await request.read()
    if not body.strip():
        raise HandlerError(400, "EOF")
    try:
        return bind(body, schema, type_name)
    except BindError as e:
        raise HandlerError(400, str(e)) from None


def unix(stamp: str) -> int:
    return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())


def sampling_options(req: dict[str, Any], *, chat: bool) -> dict[str, Any]:
    options: dict[str, Any] = {}
    stop = req.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif isinstance(stop, list):
        if not chat and not all(isinstance(s, str) for s in stop):
            bad = next(s for s in stop if not isinstance(s, str))
            raise HandlerError(400, f"invalid type for 'stop' field: {go_type_of(bad)}")
        options["stop"] = [s for s in stop if isinstance(s, str)]
    if req.get("max_tokens") is not None:
        options["num_predict"] = req["max_tokens"]
    options["temperature"] = req["temperature"] if req.get("temperature") is not None else 1.0
    if req.get("seed") is not None:
        options["seed"] = req["seed"]
    for key in ("frequency_penalty", "presence_penalty"):
        if req.get(key) is not None or not chat:
            options[key] = req.get(key) or 0.0
    options["top_p"] = req["top_p"] if req.get("top_p") else 1.0
    return options


_EFFORTS: dict[str, bool | str] = {
    "none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high", "max": "max",
    "xhigh": "max", "ultra": "max",
}  # fmt: skip


def think_from_effort(req: dict[str, Any]) -> bool | str | None:
    """thinkFromReasoningEffort: `reasoning.effort` (else `reasoning_effort`) as an Ollama think value."""
    reasoning = req.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else req.get("reasoning_effort")
    if not effort:
        return None
    if not isinstance(effort, str) or effort not in _EFFORTS:
        raise HandlerError(
            400,
            f"invalid reasoning value: {json.dumps(effort)} (must be "
            '"minimal", "low", "medium", "high", "xhigh", "ultra", "max", or "none")',
        )
    return _EFFORTS[effort]


def chat_messages(raw: list[Any]) -> list[dict[str, Any]]:
    """FromChatRequest: string content, or parts (text / image_url) split into separate messages."""
    messages: list[dict[str, Any]] = []
    for msg in raw:
        if not isinstance(msg, dict):
            raise HandlerError(400, "invalid message format")
        role, content = str(msg.get("role") or ""), msg.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    raise HandlerError(400, "invalid message format")
                if part.get("type") == "text" and isinstance(part.get("text"), str):
                    messages.append({"role": role, "content": part["text"]})
                elif part.get("type") == "image_url":
                    messages.append({"role": role, "content": "", "images": ["<image>"]})
                else:
                    raise HandlerError(400, "invalid message format")
        elif msg.get("tool_calls") is not None:
            messages.append({"role": role, "content": ""})
        else:
            kind = "<nil>" if content is None else type(content).__name__
            raise HandlerError(400, f"invalid message content type: {kind}")
    return messages


def response_format(req: dict[str, Any]) -> Any:
    response_format = req.get("response_format")
    if not isinstance(response_format, dict):
        return None
    kind = str(response_format.get("type") or "").strip().lower()
    if kind == "json_object":
        return "json"
    if kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
        return response_format["json_schema"].get("schema")
    return None


def tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for call in calls:
        function = call.get("function") or {}
        out.append(
            {
                "id": call.get("id", ""),
                "index": function.get("index", 0),
                "type": "function",
                "function": {"name": function.get("name", ""), "arguments": encode(function.get("arguments")).decode()},
            }
        )
    return out


def usage(chunk: dict[str, Any]) -> dict[str, int]:
    prompt, completion = chunk.get("prompt_eval_count", 0), chunk.get("eval_count", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class SSEStream:
    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def send(self, payload: bytes) -> None:
        if self.response is None:
            self.response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await self.response.prepare(self.request)
        await self.response.write(payload)

    async def data(self, value: Any) -> None:
        await self.send(b"data: " + encode(value) + b"\n\n")

    async def finish(self) -> web.StreamResponse:
        if self.response is None:
            await self.send(b"")
        assert self.response is not None
        with contextlib.suppress(ConnectionError):
            await self.response.write_eof()
        return self.response
