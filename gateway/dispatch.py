"""Model-scoped requests: decide where each goes, wait when told to, forward, fail over, learn.

For each request: parse (model, load options), ask `routing.choose()` over a fresh snapshot, and
act on the decision. Send -> forward to that backend, counting it in flight; Wait -> park in the
model's bounded queue and choose again when notified (503 + Retry-After when the queue is full or
the wait times out); Reject -> the Ollama-shaped error. A backend that fails before the first byte
is excluded and the request is decided again, up to `retries` times. When the reply is complete,
its final chunk tells the pool about residency (load_duration), decode rate and service time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace

import aiohttp
from aiohttp import web

from gateway import appkeys
from gateway.admission import QueueFull, QueueTimeout
from gateway.errors import BACKEND_HEADER, gateway_error
from gateway.parse import BadRequest, ModelCall, parse_model_call
from gateway.proxy import AttemptFailed, ClientGone, HeldResponse, Outcome, forward
from gateway.routing import Decision, Reject, RouteRequest, Send, Wait, choose

log = logging.getLogger(__name__)

# Status recorded in metrics for a request whose client hung up (nginx's convention).
CLIENT_CLOSED_STATUS = 499


class QueueRefused(Exception):
    def __init__(self, message: str, retry_after_s: int, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.reason = reason


async def read_body(request: web.Request) -> bytes:
    """The whole request body, bounded by the app's client_max_size. Raises BadRequest(413)."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[appkeys.SETTINGS].max_body_bytes
        raise BadRequest(413, f"request body too large: the limit is {limit} bytes") from None


async def handle_model_call(request: web.Request) -> web.StreamResponse:
    """The handler behind every routed path (generate, chat, embed, show and their /v1 forms)."""
    started_at = time.monotonic()
    path_model = request.match_info.get("model") if request.path.startswith("/v1/models/") else None
    openai = request.path.startswith("/v1/")
    try:
        body = b"" if path_model is not None else await read_body(request)
        call = parse_model_call(request.path, body, path_model)
    except BadRequest as e:
        _count(request, "", "", e.status)
        return gateway_error(e.status, e.message, openai=openai)
    if call.unload:
        return await _unload(request, call, body, started_at)
    return await _route(request, call, body, started_at)


def _count(request: web.Request, model: str, backend_id: str, status: int) -> None:
    # Names no backend has stay out of the labels: clients could otherwise mint series at will.
    label = model if model and request.app[appkeys.POOL].knows_model(model) else "other"
    request.app[appkeys.METRICS].requests.labels(label, backend_id or "none", str(status)).inc()


def _decide(request: web.Request, route: RouteRequest) -> Decision:
    app = request.app
    decision = choose(route, app[appkeys.POOL].snapshot(), app[appkeys.POLICY])
    kind = type(decision).__name__.lower()
    app[appkeys.METRICS].decisions.labels(kind, decision.reason).inc()
    if log.isEnabledFor(logging.DEBUG):  # the explanation is built only for someone reading it
        log.debug("%s %s model=%s: %s", request.method, request.path, route.model, decision.explanation)
    return decision


async def _decide_or_wait(request: web.Request, route: RouteRequest) -> Send | Reject:
    """Choose; on Wait, queue at the gateway until a choice is possible. Raises QueueRefused."""
    decision = _decide(request, route)
    if not isinstance(decision, Wait):
        return decision
    app = request.app
    settings = app[appkeys.SETTINGS]
    queues = app[appkeys.QUEUES]
    try:
        async with queues.waiting(route.model, timeout_s=settings.queue_timeout_s) as ticket:
            while isinstance(decision, Wait):
                await ticket.wait()
                decision = _decide(request, route)
            return decision
    except QueueFull as e:
        raise QueueRefused(e.message, e.retry_after_s, "queue_full") from None
    except QueueTimeout as e:
        raise QueueRefused(e.message, e.retry_after_s, "queue_timeout") from None


async def _route(request: web.Request, call: ModelCall, body: bytes, started_at: float) -> web.StreamResponse:
    app = request.app
    settings = app[appkeys.SETTINGS]
    metrics = app[appkeys.METRICS]
    route = RouteRequest(
        model=call.model,
        kind=call.kind,
        options=call.options,
        prompt_tokens=call.prompt_tokens,
        stream=call.stream,
        requested_as=call.requested_as,
    )
    held: HeldResponse | None = None
    last_failure = ""
    retries_left = settings.retries
    while True:
        try:
            decision = await _decide_or_wait(request, route)
        except QueueRefused as e:
            metrics.queue_rejections.labels(call.model, e.reason).inc()
            _count(request, call.model, "", 503)
            return gateway_error(503, e.message, openai=call.openai, headers={"Retry-After": str(e.retry_after_s)})
        if isinstance(decision, Reject):
            if held is not None:  # the last backend's own error says more than "nothing left"
                _count(request, call.model, held.backend_id, held.status)
                return held.to_response()
            if route.exclude and last_failure:
                _count(request, call.model, "", 502)
                return gateway_error(502, f"{decision.message} (last failure: {last_failure})", openai=call.openai)
            _count(request, call.model, "", decision.status)
            headers = {"Retry-After": "1"} if decision.status == 503 else None
            return gateway_error(decision.status, decision.message, openai=call.openai, headers=headers)
        try:
            return await _send(request, call, decision.backend_id, body, started_at)
        except AttemptFailed as e:
            held = e.held or held
            last_failure = e.message
            log.warning("<%s> %s %s failed before the first byte: %s", e.backend_id, request.method, request.path, e)
            metrics.failovers.labels(e.backend_id).inc()
            if retries_left <= 0:
                if held is not None:
                    _count(request, call.model, held.backend_id, held.status)
                    return held.to_response()
                _count(request, call.model, e.backend_id, 502)
                return gateway_error(502, f"backend {e.backend_id} failed: {e.message}", openai=call.openai)
            retries_left -= 1
            metrics.retries.labels(call.model).inc()
            route = replace(route, exclude=route.exclude | {e.backend_id})


async def _send(
    request: web.Request, call: ModelCall, backend_id: str, body: bytes, started_at: float
) -> web.StreamResponse:
    """One attempt on one backend, counted in flight. Raises AttemptFailed (retry elsewhere)."""
    app = request.app
    pool = app[appkeys.POOL]
    live = pool.get(backend_id)
    if live is None:  # removed between the decision and now
        raise AttemptFailed(backend_id, "backend no longer registered")
    counts = call.kind != "show"  # metadata calls occupy no slot
    cold = counts and not pool.is_resident(backend_id, call.model)
    async with _maybe_hold(request, backend_id, call.model, counts):
        if cold:
            pool.start_loading(backend_id, call.model)
        try:
            outcome = await forward(
                request,
                app[appkeys.SESSION],
                backend_id,
                live.record.url,
                body,
                connect_timeout_s=app[appkeys.SETTINGS].connect_timeout_s,
                started_at=started_at,
            )
        except AttemptFailed as e:
            if e.connection_failed and pool.mark_failure(backend_id, e.message):
                app[appkeys.METRICS].ejections.labels(backend_id).inc()
                app[appkeys.QUEUES].notify()
            raise
        except ClientGone as e:
            _count(request, call.model, backend_id, CLIENT_CLOSED_STATUS)
            log.debug("<%s> client hung up on %s %s", backend_id, request.method, request.path)
            return e.response
        except asyncio.CancelledError:
            _count(request, call.model, backend_id, CLIENT_CLOSED_STATUS)
            log.debug("<%s> client hung up on %s %s", backend_id, request.method, request.path)
            raise
        finally:
            if cold:
                pool.stop_loading(backend_id, call.model)
    pool.mark_success(backend_id)
    _learn(request, call, backend_id, outcome, started_at)
    return outcome.response


def _maybe_hold(
    request: web.Request, backend_id: str, model: str, counts: bool
) -> contextlib.AbstractAsyncContextManager[None]:
    if not counts:
        return contextlib.nullcontext()
    return request.app[appkeys.IN_FLIGHT].hold(backend_id, model)


def _learn(request: web.Request, call: ModelCall, backend_id: str, outcome: Outcome, started_at: float) -> None:
    app = request.app
    metrics = app[appkeys.METRICS]
    pool = app[appkeys.POOL]
    elapsed_s = time.monotonic() - started_at
    _count(request, call.model, backend_id, outcome.status)
    metrics.request_duration.labels(call.model, backend_id).observe(elapsed_s)
    if outcome.first_byte_s is not None:
        metrics.ttft.labels(call.model, backend_id).observe(outcome.first_byte_s)
    if outcome.midstream_error is not None:
        metrics.midstream_failures.labels(backend_id).inc()
        if pool.mark_failure(backend_id, outcome.midstream_error):
            metrics.ejections.labels(backend_id).inc()
        return
    if outcome.final is None or outcome.status != 200 or call.kind == "show":
        return
    facts = pool.observe_reply(backend_id, call.model, outcome.final, call.options, elapsed_s)
    if facts.cold_load:
        metrics.cold_loads.labels(call.model, backend_id).inc()
        log.info("<%s> cold load of %s took %.1fs", backend_id, call.model, facts.load_s)
    if facts.tokens_per_s > 0:
        metrics.decode_rate.labels(call.model, backend_id).observe(facts.tokens_per_s)


async def _unload(request: web.Request, call: ModelCall, body: bytes, started_at: float) -> web.StreamResponse:
    """keep_alive 0 with nothing to generate: unload wherever the model is loaded. Sending it to a
    backend where it is not loaded would be harmless (Ollama checks before scheduling), so with no
    resident copy one backend that has the model answers."""
    app = request.app
    pool = app[appkeys.POOL]
    targets = [b for b, live in pool.backends.items() if live.healthy and pool.is_resident(b, call.model)]
    if not targets:
        return await _route(request, replace(call, kind="show"), body, started_at)
    session = app[appkeys.SESSION]
    settings = app[appkeys.SETTINGS]
    last: web.Response | None = None
    for backend_id in targets:
        live = pool.get(backend_id)
        if live is None:
            continue
        url = live.record.url + request.path
        status, headers, reply = await _post_json(session, url, body, settings.connect_timeout_s)
        if status is None:
            continue
        pool.forget_resident(backend_id, call.model)
        last = web.Response(status=status, body=reply, headers={BACKEND_HEADER: backend_id, **headers})
    app[appkeys.QUEUES].notify()
    if last is None:
        return gateway_error(502, f"no backend holding model '{call.requested_as}' answered", openai=call.openai)
    _count(request, call.model, "all", last.status)
    return last


async def _post_json(
    session: aiohttp.ClientSession, url: str, body: bytes, connect_timeout_s: float
) -> tuple[int | None, dict[str, str], bytes]:
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s)
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=timeout) as resp:
            content_type = resp.headers.get("Content-Type", "application/json")
            return resp.status, {"Content-Type": content_type}, await resp.read()
    except (aiohttp.ClientError, TimeoutError) as e:
        log.warning("unload at %s failed: %s", url, e)
        return None, {}, b""
