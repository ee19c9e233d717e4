"""HTTP replies shaped like gin's: JSON bodies, NDJSON streams, errors before and after the first byte.

* `c.JSON` / `AbortWithStatusJSON`: `application/json; charset=utf-8`, compact body, no newline.
* `streamResponse`: `application/x-ndjson`, one object per line, flushed per line. An error before
  any byte is written becomes a JSON error reply with its status (default 500, `application/json`);
  an error after that is one more line, `{"error":"..."}`, and the status stays 200.
* `waitForStream` (pull/create/push with `"stream": false`): the last progress object, or the error.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from launcher.sim.gojson import encode

JSON_UTF8 = "application/json; charset=utf-8"
JSON = "application/json"
NDJSON = "application/x-ndjson"


@dataclass(frozen=True)
class StreamError:
    """An error produced by a stream (Ollama's gin.H{"error": ..., "status": ...})."""

    message: str
    status: int = 500


Items = AsyncGenerator[Mapping[str, Any] | StreamError, None]


def json_response(value: Any, status: int = 200, *, content_type: str = JSON_UTF8) -> web.Response:
    return web.Response(status=status, body=encode(value), headers={"Content-Type": content_type})


def error_response(status: int, message: str, *, content_type: str = JSON_UTF8) -> web.Response:
    return json_response({"error": message}, status, content_type=content_type)


def empty_response(status: int = 200) -> web.Response:
    return web.Response(status=status)


def text_response(status: int, text: str, *, content_type: str = "text/plain") -> web.Response:
    """gin's plain-text replies ("404 page not found") carry exactly `text/plain`, no charset."""
    return web.Response(status=status, body=text.encode(), headers={"Content-Type": content_type})


async def send_ndjson(request: web.Request, items: Items) -> web.StreamResponse:
    """Stream `items` as NDJSON like gin's streamResponse (see the module docstring)."""
    response: web.StreamResponse | None = None
    async with contextlib.aclosing(items) as stream:
        async for item in stream:
            if isinstance(item, StreamError):
                if response is None:
                    return error_response(item.status, item.message, content_type=JSON)
                with contextlib.suppress(ConnectionError):
                    await response.write(encode({"error": item.message}) + b"\n")
                break
            if response is None:
                response = web.StreamResponse(headers={"Content-Type": NDJSON})
                await response.prepare(request)
            try:
                await response.write(encode(item) + b"\n")
            except ConnectionError:
                break  # the client went away; closing the stream releases what it held
    if response is None:
        response = web.StreamResponse(headers={"Content-Type": NDJSON})
        await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


async def wait_for_stream(items: Items) -> web.Response:
    """waitForStream: the last item as `application/json`, or the first error with its status."""
    latest: Mapping[str, Any] = {}
    async with contextlib.aclosing(items) as stream:
        async for item in stream:
            if isinstance(item, StreamError):
                return error_response(item.status, item.message, content_type=JSON)
            latest = item
    return json_response(latest, content_type=JSON)
