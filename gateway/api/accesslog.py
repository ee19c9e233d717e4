"""Request ids and the access log: one line per request, off by default.

Every reply carries `X-Request-Id`: the client's own when it sent one (kept, so a trace spans the
client's logs and ours), else a fresh one; the id also goes upstream, so a backend's logs can be
matched. With `[gateway] access_log = true` each finished request logs one logfmt line on the
`corral.access` logger:

    request_id=3f2a... method=POST path=/api/chat model=llama3.2:3b backend=gpu0 status=200
    bytes=5123 ttfb_ms=812.4 total_ms=2301.7 retries=0 client=127.0.0.1

`model` and `retries` are filled in by the dispatcher (`note()`); `backend` comes from the
reply's `X-Corral-Backend`; `bytes` counts what went out on the wire, headers included (nginx's
$bytes_sent); `ttfb_ms` is when the reply's headers went out (the first byte).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from dataclasses import dataclass

from aiohttp import web

REQUEST_ID_HEADER = "X-Request-Id"
access_log = logging.getLogger("corral.access")

# A client's id is kept when it is a sane token (no spaces or control characters to forge lines).
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
# Fresh ids: a random prefix per process and a counter, 32 hex digits like a UUID's. Unique is
# what they need to be (across gateways and restarts too: the prefix is 64 random bits), not
# unguessable; a uuid4 per request cost a system call for its randomness.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def new_record(request: web.Request) -> AccessRecord:
    """The request's access record, with the client's id when it sent a sane one, else a fresh one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = given if given and _CLIENT_ID.match(given) else f"{_ID_PREFIX}{next(_ID_COUNTER) & (2**64 - 1):016x}"
    return AccessRecord(request_id, time.monotonic())


@dataclass
class AccessRecord:
    request_id: str
    started_at: float  # monotonic
    model: str = ""
    retries: int = 0
    first_byte_at: float | None = None


ACCESS = web.RequestKey("corral_access", AccessRecord)


def request_id_of(request: web.Request) -> str:
    """The request's id ("" outside the middleware)."""
    record = request.get(ACCESS)
    return record.request_id if record is not None else ""


def note(request: web.Request, *, model: str | None = None, retries: int | None = None) -> None:
    """Record what the access line reports about routing (no-op outside the middleware)."""
    record = request.get(ACCESS)
    if record is None:
        return
    if model is not None:
        record.model = model
    if retries is not None:
        record.retries = retries


def stamp_reply(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the id on every reply, and the moment its first byte left."""
    record = request.get(ACCESS)
    if record is None:
        return
    response.headers[REQUEST_ID_HEADER] = record.request_id
    if record.first_byte_at is None:
        record.first_byte_at = time.monotonic()


def _field(value: str) -> str:
    return value if value and " " not in value and '"' not in value else f'"{value.replace(chr(34), chr(39))}"'


def access_line(request: web.Request, record: AccessRecord, status: int, size: int, backend: str) -> str:
    now = time.monotonic()
    first_byte_at = now if record.first_byte_at is None else record.first_byte_at  # whole replies: at the end
    ttfb = f"{(first_byte_at - record.started_at) * 1000:.1f}"
    return (
        f"request_id={record.request_id} method={request.method} path={_field(request.path)} "
        f"model={_field(record.model) if record.model else '-'} backend={_field(backend) if backend else '-'} "
        f"status={status} bytes={size} ttfb_ms={ttfb} total_ms={(now - record.started_at) * 1000:.1f} "
        f"retries={record.retries} client={request.remote or '-'}"
    )
