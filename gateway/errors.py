"""The gateway's own error replies, shaped like Ollama's and tagged so clients can tell them apart.

Ollama answers errors with `{"error": "<message>"}` on its native routes and with OpenAI's
`{"error": {"message", "type", "param", "code"}}` on `/v1/*` (openai/openai.go `NewError`). The
gateway keeps those shapes, so official clients raise their usual exceptions, and adds the header
`X-Corral-Error: gateway` to every error it produced itself: an error without that header came
from a backend and was passed through unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

ERROR_SOURCE_HEADER = "X-Corral-Error"
BACKEND_HEADER = "X-Corral-Backend"

# gin's built-in replies for unknown paths and wrong methods (gin.go default404Body/default405Body).
NOT_FOUND_TEXT = "404 page not found"
METHOD_NOT_ALLOWED_TEXT = "405 method not allowed"


def is_openai_path(path: str) -> bool:
    """True for the OpenAI-compatible routes, whose errors use OpenAI's shape."""
    return path == "/v1" or path.startswith("/v1/")


def openai_error_type(status: int) -> str:
    if status == 400:
        return "invalid_request_error"
    if status == 404:
        return "not_found_error"
    return "api_error"


def error_body(status: int, message: str, *, openai: bool) -> dict[str, object]:
    if openai:
        return {"error": {"message": message, "type": openai_error_type(status), "param": None, "code": None}}
    return {"error": message}


def gateway_error(
    status: int,
    message: str,
    *,
    openai: bool = False,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A complete error reply produced by the gateway itself (tagged with `X-Corral-Error`)."""
    all_headers = {ERROR_SOURCE_HEADER: "gateway", **(headers or {})}
    return web.json_response(error_body(status, message, openai=openai), status=status, headers=all_headers)


def error_for(
    request: web.Request, status: int, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """`gateway_error` in the shape the request's route family uses."""
    return gateway_error(status, message, openai=is_openai_path(request.path), headers=headers)


def ndjson_error_line(message: str) -> bytes:
    """The line Ollama writes when a stream fails after it started (status stays 200)."""
    return json.dumps({"error": message}).encode() + b"\n"


def sse_error_event(message: str) -> bytes:
    """An OpenAI-style error event; the openai client raises APIError on a data frame with `error`."""
    payload = error_body(500, message, openai=True)
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def not_found_page() -> web.Response:
    return web.Response(status=404, text=NOT_FOUND_TEXT, headers={ERROR_SOURCE_HEADER: "gateway"})


def method_not_allowed_page(allowed: set[str] | frozenset[str]) -> web.Response:
    headers = {ERROR_SOURCE_HEADER: "gateway", "Allow": ", ".join(sorted(allowed))}
    return web.Response(status=405, text=METHOD_NOT_ALLOWED_TEXT, headers=headers)
