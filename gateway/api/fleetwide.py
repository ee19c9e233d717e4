"""Calls that concern the whole fleet rather than one model on one backend.

Listings are unions: /api/tags and /v1/models ask one backend per model store and deduplicate;
/api/ps asks every backend and annotates each loaded copy with its backend and GPUs (extra fields,
which the official clients ignore). Management calls act once per distinct store: pull and create
merge the backends' progress streams into one; delete and copy answer like one Ollama would.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from gateway import appkeys
from gateway.api.blobs import upload_to_all
from gateway.api.dispatch import read_body
from gateway.api.errors import BACKEND_HEADER, error_for
from gateway.api.fanout import Reply, call_all, one_per_store, routable, store_key
from gateway.api.parse import BadRequest, parse_body
from gateway.api.progress import merged_progress
from gateway.api.proxy import AttemptFailed, ClientGone, forward
from gateway.fleet.pool import parse_timestamp
from gateway.routing.policy import Reject, RouteRequest, Send, choose
from gateway.routing.snapshot import BackendView
from launcher.facts.catalog import normalize_name

log = logging.getLogger(__name__)

# What / answers, like Ollama, so health probes written for Ollama work unchanged.
RUNNING_TEXT = "Ollama is running"
# /api/version when no backend told its version yet.
UNKNOWN_VERSION = "0.0.0"


def _timeout(request: web.Request) -> aiohttp.ClientTimeout:
    connect_s = request.app[appkeys.SETTINGS].connect_timeout_s
    return aiohttp.ClientTimeout(total=max(10.0, 4 * connect_s), connect=connect_s)


async def root(request: web.Request) -> web.Response:
    return web.Response(text=RUNNING_TEXT)


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": request.app[appkeys.POOL].version() or UNKNOWN_VERSION})


# -- listings ------------------------------------------------------------------------------------


def _sort_key_modified(model: dict[str, Any]) -> float:
    return parse_timestamp(model.get("modified_at")) or 0.0


async def tags(request: web.Request) -> web.Response:
    pool = request.app[appkeys.POOL]
    targets = one_per_store(routable(pool))
    replies = await call_all(
        request.app[appkeys.SESSION], targets, "GET", "/api/tags", client_timeout=_timeout(request)
    )
    merged: dict[str, dict[str, Any]] = {}
    for backend, reply in zip(targets, replies, strict=True):
        body = reply.json() if reply.status == 200 else None
        if isinstance(body, dict) and isinstance(body.get("models"), list):
            models = [m for m in body["models"] if isinstance(m, dict)]
            pool.apply_tags(backend.record.id, models)
        else:
            models = pool.tags(backend.record.id)  # unreachable now: what the last poll saw
        for m in models:
            name = normalize_name(str(m.get("model") or m.get("name") or ""))
            merged.setdefault(name, m)
    listing = sorted(merged.values(), key=_sort_key_modified, reverse=True)
    return web.json_response({"models": listing})


async def openai_models(request: web.Request) -> web.Response:
    pool = request.app[appkeys.POOL]
    targets = one_per_store(routable(pool))
    replies = await call_all(
        request.app[appkeys.SESSION], targets, "GET", "/v1/models", client_timeout=_timeout(request)
    )
    merged: dict[str, dict[str, Any]] = {}
    for reply in replies:
        body = reply.json() if reply.status == 200 else None
        data = body.get("data") if isinstance(body, dict) else None
        for entry in data if isinstance(data, list) else []:
            if isinstance(entry, dict) and entry.get("id"):
                merged.setdefault(str(entry["id"]), entry)
    return web.json_response({"object": "list", "data": list(merged.values())})


def copy_row(model: dict[str, Any], backend: BackendView) -> dict[str, Any]:
    """One copy of a model as `corral_copies` lists it: where it lives and what it takes there."""
    record = backend.record
    return {
        "backend": record.id,
        "host": record.host,
        "gpus": list(record.gpu_names),
        "gpu_uuids": list(record.gpu_uuids),
        "size": model.get("size", 0),
        "size_vram": model.get("size_vram", 0),
        "context_length": model.get("context_length", 0),
        "expires_at": model.get("expires_at"),
    }


def _number(value: object) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def merge_ps_rows(rows: list[tuple[dict[str, Any], BackendView]]) -> list[dict[str, Any]]:
    """/api/ps rows from every backend, one per model like Ollama's: sizes summed, the latest
    expires_at, the largest context_length, and the copies in `corral_copies` (a field official
    clients ignore). Longest remaining keep-alive first, as Ollama lists them."""
    merged: dict[str, dict[str, Any]] = {}
    for row, backend in rows:
        name = normalize_name(str(row.get("model") or row.get("name") or ""))
        entry = merged.get(name)
        if entry is None:
            merged[name] = {**row, "corral_copies": [copy_row(row, backend)]}
            continue
        entry["corral_copies"].append(copy_row(row, backend))
        entry["size"] = _number(entry.get("size")) + _number(row.get("size"))
        entry["size_vram"] = _number(entry.get("size_vram")) + _number(row.get("size_vram"))
        entry["context_length"] = max(_number(entry.get("context_length")), _number(row.get("context_length")))
        if (parse_timestamp(row.get("expires_at")) or 0.0) > (parse_timestamp(entry.get("expires_at")) or 0.0):
            entry["expires_at"] = row.get("expires_at")
    listing = list(merged.values())
    listing.sort(key=lambda m: parse_timestamp(m.get("expires_at")) or 0.0, reverse=True)
    return listing


async def ps(request: web.Request) -> web.Response:
    pool = request.app[appkeys.POOL]
    targets = routable(pool)
    started_at = time.time()
    replies = await call_all(request.app[appkeys.SESSION], targets, "GET", "/api/ps", client_timeout=_timeout(request))
    rows: list[tuple[dict[str, Any], BackendView]] = []
    for backend, reply in zip(targets, replies, strict=True):
        body = reply.json() if reply.status == 200 else None
        if not isinstance(body, dict) or not isinstance(body.get("models"), list):
            continue
        models = [m for m in body["models"] if isinstance(m, dict)]
        pool.apply_ps(backend.record.id, models, started_at)
        rows.extend((m, backend) for m in models)
    return web.json_response({"models": merge_ps_rows(rows)})


# -- management ----------------------------------------------------------------------------------


async def _json_body(request: web.Request) -> tuple[bytes, dict[str, Any]]:
    body = await read_body(request)
    return body, parse_body(body)


def _model_field(data: dict[str, Any]) -> str:
    value = data.get("model") or data.get("name")
    if not value:
        raise BadRequest(400, "model is required")
    if not isinstance(value, str):
        raise BadRequest(400, "invalid model name: must be a string")
    return value


async def _refresh(request: web.Request, stores: set[str]) -> None:
    """Re-read the inventory of every backend on these stores (after it changed through us)."""
    app = request.app
    poller = app[appkeys.POLLER]
    # A changed inventory wakes waiting requests through the pool's change signal.
    await asyncio.gather(*(poller.poll(b.record.id) for b in routable(app[appkeys.POOL]) if store_key(b) in stores))


def _no_backend(request: web.Request) -> web.Response:
    return error_for(request, 503, "no healthy backend available, please try again", headers={"Retry-After": "1"})


async def pull(request: web.Request) -> web.StreamResponse:
    return await _progress_call(request, "/api/pull")


async def create(request: web.Request) -> web.StreamResponse:
    return await _progress_call(request, "/api/create")


async def _progress_call(request: web.Request, path: str) -> web.StreamResponse:
    try:
        body, data = await _json_body(request)
        _model_field(data)
    except BadRequest as e:
        return error_for(request, e.status, e.message)
    targets = one_per_store(routable(request.app[appkeys.POOL]))
    if not targets:
        return _no_backend(request)
    stream = data.get("stream", True) is not False
    try:
        return await merged_progress(request, path, targets, body, stream)
    finally:
        await _refresh(request, {store_key(b) for b in targets})


def _answer_like_one(request: web.Request, replies: list[Reply]) -> web.Response:
    """One reply for a call made once per store: success if any store succeeded (the others then
    lacked the model), else the first backend error, else a gateway error."""
    for reply in replies:
        if reply.status is not None and reply.status < 300:
            return web.Response(status=reply.status, body=reply.body, headers={"Content-Type": reply.content_type})
    for reply in replies:
        if reply.status is not None:
            return web.Response(
                status=reply.status,
                body=reply.body,
                headers={"Content-Type": reply.content_type, BACKEND_HEADER: reply.backend_id},
            )
    return error_for(request, 502, "; ".join(r.error_text() for r in replies) or "no backend answered")


async def delete(request: web.Request) -> web.Response:
    return await _once_per_store(request, "DELETE", "/api/delete")


async def copy(request: web.Request) -> web.Response:
    return await _once_per_store(request, "POST", "/api/copy")


async def _once_per_store(request: web.Request, method: str, path: str) -> web.Response:
    try:
        body, data = await _json_body(request)
        if path == "/api/copy":
            if not data.get("source") or not data.get("destination"):
                raise BadRequest(400, "source and destination are required")
        else:
            _model_field(data)
    except BadRequest as e:
        return error_for(request, e.status, e.message)
    targets = one_per_store(routable(request.app[appkeys.POOL]))
    if not targets:
        return _no_backend(request)
    replies = await call_all(
        request.app[appkeys.SESSION], targets, method, path, body, client_timeout=_timeout(request)
    )
    await _refresh(request, {store_key(b) for b in targets})
    return _answer_like_one(request, replies)


async def push(request: web.Request) -> web.StreamResponse:
    """Push the model from one backend that has it (all copies are the same bytes)."""
    try:
        body, data = await _json_body(request)
        model = _model_field(data)
    except BadRequest as e:
        return error_for(request, e.status, e.message)
    app = request.app
    route = RouteRequest(model=normalize_name(model), kind="show", requested_as=model)
    decision = choose(route, app[appkeys.POOL].snapshot(), app[appkeys.POLICY])
    if isinstance(decision, Reject):
        return error_for(request, decision.status, decision.message)
    if not isinstance(decision, Send):
        return _no_backend(request)
    return await _forward_once(request, decision.backend_id, body)


async def _forward_once(request: web.Request, backend_id: str, body: bytes | None) -> web.StreamResponse:
    app = request.app
    record = app[appkeys.POOL].record(backend_id)
    if record is None:
        return _no_backend(request)
    try:
        outcome = await forward(
            request,
            app[appkeys.SESSION],
            backend_id,
            record.url,
            body,
            connect_timeout_s=app[appkeys.SETTINGS].connect_timeout_s,
            started_at=time.monotonic(),
        )
    except AttemptFailed as e:
        if e.held is not None:
            return e.held.to_response()
        return error_for(request, 502, f"backend {backend_id} failed: {e.message}")
    except ClientGone as e:  # nobody to answer: the cut reply ends the request
        return e.response
    return outcome.response


async def passthrough(request: web.Request) -> web.StreamResponse:
    """A call with no model and no fleet meaning (e.g. /api/status): any healthy backend answers."""
    targets = routable(request.app[appkeys.POOL])
    if not targets:
        return _no_backend(request)
    body = await request.read() if request.can_read_body else None
    return await _forward_once(request, targets[0].record.id, body)


async def blob_head(request: web.Request) -> web.Response:
    """200 only when every store has the blob, so a client uploads it wherever it is missing."""
    targets = one_per_store(routable(request.app[appkeys.POOL]))
    if not targets:
        return _no_backend(request)
    replies = await call_all(
        request.app[appkeys.SESSION], targets, "HEAD", request.path, client_timeout=_timeout(request)
    )
    for reply in replies:
        if reply.status != 200:
            status = reply.status or 502
            return web.Response(status=status, headers={BACKEND_HEADER: reply.backend_id})
    return web.Response(status=200)


async def blob_upload(request: web.Request) -> web.Response:
    targets = one_per_store(routable(request.app[appkeys.POOL]))
    if not targets:
        return _no_backend(request)
    replies = await upload_to_all(request, targets)
    failed = [r for r in replies if r.status is None or r.status >= 300]
    if not failed:
        created = any(r.status == 201 for r in replies)
        return web.Response(status=201 if created else 200)
    for reply in failed:
        if reply.status is not None:
            return web.Response(
                status=reply.status,
                body=reply.body,
                headers={"Content-Type": reply.content_type, BACKEND_HEADER: reply.backend_id},
            )
    return error_for(request, 502, "; ".join(r.error_text() for r in failed))
