"""The gateway's own error replies, shaped like Ollama's and tagged so clients can tell them apart.

Ollama answers errors with `{"error": "<message>"}` on its native routes, with OpenAI's
`{"error": {"message", "type", "param", "code"}}` on `/v1/*` (openai/openai.go `NewError`) and
with Anthropic's `{"type": "error", "error": {"type", "message"}}` on `/v1/messages`
(anthropic/anthropic.go `NewError`). The gateway keeps those shapes, so official clients raise
their usual exceptions, and adds the header `X-Corral-Error: gateway` to every error it produced
itself: an error without that header came from a backend and was passed through unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal

from aiohttp import web

ERROR_SOURCE_HEADER = "X-Corral-Error"
BACKEND_HEADER = "X-Corral-Backend"

# gin's built-in replies for unknown paths and wrong methods (gin.go default404Body/default405Body).
NOT_FOUND_TEXT = "404 page not found"
METHOD_NOT_ALLOWED_TEXT = "405 method not allowed"

ErrorShape = Literal["ollama", "openai", "anthropic"]

# Routes whose handlers report an unknown model through handleScheduleError (routes.go: EmbedHandler
# and EmbeddingsHandler look the model up with getModel; /v1/embeddings is /api/embed behind the
# OpenAI middleware), with its own text.
PULL_HINT_PATHS: frozenset[str] = frozenset({"/api/embed", "/api/embeddings", "/v1/embeddings"})

# anthropic.NewError's types by status; any other status is an "api_error".
_ANTHROPIC_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_shape(path: str) -> ErrorShape:
    """The error body a route family answers with: Anthropic's on /v1/messages, OpenAI's on the
    other /v1 routes, Ollama's everywhere else."""
    if path == "/v1/messages":
        return "anthropic"
    if path == "/v1" or path.startswith("/v1/"):
        return "openai"
    return "ollama"


def openai_error_type(status: int) -> str:
    if status == 400:
        return "invalid_request_error"
    if status == 404:
        return "not_found_error"
    return "api_error"


def error_body(status: int, message: str, *, shape: ErrorShape = "ollama") -> dict[str, object]:
    if shape == "openai":
        return {"error": {"message": message, "type": openai_error_type(status), "param": None, "code": None}}
    if shape == "anthropic":
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    return {"error": message}


def error_text(body: bytes, status: int | None = None) -> str:
    """The message of an error reply in any of the three shapes (or its raw text), for logs and
    for gateway errors that quote a backend's."""
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    if isinstance(value, Mapping):
        error = value.get("error")
        if isinstance(error, Mapping) and error.get("message"):
            return str(error["message"])
        if error and not isinstance(error, Mapping):
            return str(error)
    text = body.decode(errors="replace").strip()[:200]
    return text or (f"HTTP {status}" if status is not None else "")


def model_not_found_text(path: str, name: str) -> str:
    """Ollama's 404 text for an unknown model on this route."""
    if path in PULL_HINT_PATHS:
        return f'model "{name}" not found, try pulling it first'
    return f"model '{name}' not found"


def gateway_error(
    status: int,
    message: str,
    *,
    shape: ErrorShape = "ollama",
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A complete error reply produced by the gateway itself (tagged with `X-Corral-Error`)."""
    all_headers = {ERROR_SOURCE_HEADER: "gateway", **(headers or {})}
    return web.json_response(error_body(status, message, shape=shape), status=status, headers=all_headers)


def error_for(
    request: web.Request, status: int, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """`gateway_error` in the shape the request's route family uses."""
    return gateway_error(status, message, shape=error_shape(request.path), headers=headers)


def ndjson_error_line(message: str) -> bytes:
    """The line Ollama writes when a stream fails after it started (status stays 200)."""
    return json.dumps({"error": message}).encode() + b"\n"


def sse_error_event(message: str, shape: ErrorShape = "openai") -> bytes:
    """An error event in the stream's own dialect: Anthropic's (an `error` event) for that shape,
    else OpenAI's (a data frame with `error`, on which the openai client raises APIError)."""
    if shape == "anthropic":
        return b"event: error\ndata: " + json.dumps(error_body(500, message, shape=shape)).encode() + b"\n\n"
    return b"data: " + json.dumps(error_body(500, message, shape="openai")).encode() + b"\n\n"


def not_found_page() -> web.Response:
    return web.Response(status=404, text=NOT_FOUND_TEXT, headers={ERROR_SOURCE_HEADER: "gateway"})


def method_not_allowed_page(allowed: set[str] | frozenset[str]) -> web.Response:
    headers = {ERROR_SOURCE_HEADER: "gateway", "Allow": ", ".join(sorted(allowed))}
    return web.Response(status=405, text=METHOD_NOT_ALLOWED_TEXT, headers=headers)
