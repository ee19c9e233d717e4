"""Model-scoped requests: decide where each goes, wait when told to, forward, fail over, learn.

For each request: parse (model, load options, lane), ask `routing.choose()` over a fresh snapshot,
and act on the decision. Send -> forward to that backend, counting it in flight (the router sends a
copy no more requests than it has slots); Wait -> park in the model's bounded queue, in its lane,
and choose again when the pool's change signal wakes it (503 + Retry-After when the queue is full
or the wait times out); Reject -> the Ollama-shaped error. A backend that fails before the first byte
is excluded and the request is decided again, up to `retries` times. When the reply is complete,
its final chunk tells the pool about residency (load_duration), decode rate and service time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import replace

import aiohttp
from aiohttp import web

from gateway import appkeys
from gateway.api import bodies
from gateway.api.accesslog import note
from gateway.api.admission import QueueFull, QueueTimeout, Ticket
from gateway.api.auth import bearer_token
from gateway.api.errors import BACKEND_HEADER, error_for, error_text, model_not_found_text
from gateway.api.fanout import call_all, routable
from gateway.api.parse import BadRequest, ModelCall, parse_model_call
from gateway.api.proxy import AttemptFailed, ClientGone, HeldResponse, Outcome, forward
from gateway.api.timeouts import answer_decode_s, upstream_timeouts
from gateway.fleet.inflight import SlotTaken
from gateway.fleet.work import Work
from gateway.routing.policy import PRIORITIES, Decision, Priority, Reject, RouteRequest, Send, Wait, choose
from launcher.facts.faults import is_backend_fault

log = logging.getLogger(__name__)

# Status recorded in metrics for a request whose client hung up (nginx's convention).
CLIENT_CLOSED_STATUS = 499
# The lane a request asks for (never forwarded upstream); keys in batch_keys_file are batch always.
PRIORITY_HEADER = "X-Corral-Priority"
# On a reply served at the loaded context instead of the larger num_ctx asked: "<used>; requested=<asked>".
NUM_CTX_HEADER = "X-Corral-Num-Ctx"


# The decision label of corral_routing_decisions.
_DECISION_KINDS: dict[type[Decision], str] = {Send: "send", Wait: "wait", Reject: "reject"}


def request_priority(request: web.Request) -> Priority:
    """The request's lane: a batch key's requests are batch whatever they ask (a batch key may not
    raise itself); otherwise X-Corral-Priority, interactive by default. BadRequest for a value
    that is neither."""
    raw = request.headers.get(PRIORITY_HEADER, "").strip().lower()
    if raw and raw not in PRIORITIES:
        raise BadRequest(400, f"invalid {PRIORITY_HEADER} {raw!r}: expected one of {', '.join(PRIORITIES)}")
    if request.app[appkeys.KEYS].is_batch(bearer_token(request)):
        return "batch"
    return "batch" if raw == "batch" else "interactive"


class QueueRefused(Exception):
    def __init__(self, message: str, retry_after_s: int, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.reason = reason


async def read_body(request: web.Request) -> bytes:
    """The whole request body, decoded, bounded in size and in time (gateway/api/bodies.py).
    Raises BadRequest (400, 408, 413, 415)."""
    settings = request.app[appkeys.SETTINGS]
    return await bodies.read_body(request, settings.max_body_bytes, settings.body_read_timeout_s)


async def handle_model_call(request: web.Request) -> web.StreamResponse:
    """The handler behind every routed path (generate, chat, embed, show and their /v1 forms)."""
    started_at = time.monotonic()
    path_model = request.match_info.get("model") if request.path.startswith("/v1/models/") else None
    try:
        body = b"" if path_model is not None else await read_body(request)
        call = parse_model_call(request.path, body, path_model)
        note(request, model=call.model)
        priority = request_priority(request)
    except BadRequest as e:
        _count(request, "", "", e.status)
        return error_for(request, e.status, e.message)
    if call.unload:
        return await _unload(request, call, body, started_at)
    return await _route(request, call, body, started_at, priority)


def _model_label(request: web.Request, model: str) -> str:
    # Names no backend has stay out of the labels: clients could otherwise mint series at will.
    return model if model and request.app[appkeys.POOL].knows_model(model) else "other"


def _count(request: web.Request, model: str, backend_id: str, status: int, label: str | None = None) -> None:
    """Count the answer; `label`: the model's label when the caller has it already."""
    label = _model_label(request, model) if label is None else label
    request.app[appkeys.METRICS].requests.labels(label, backend_id or "none", str(status)).inc()


def _decide(request: web.Request, route: RouteRequest, ticket: Ticket | None = None) -> Decision:
    """Choose over a fresh snapshot; `ahead` is the waiters served before this request: its place
    in the queue when it waits, else those a newcomer of its lane finds there."""
    app = request.app
    queues = app[appkeys.QUEUES]
    ahead = ticket.position if ticket is not None else queues.ahead(route.model, route.priority)
    if ahead != route.ahead:
        route = replace(route, ahead=ahead)
    decision = choose(route, app[appkeys.POOL].snapshot(), app[appkeys.POLICY])
    if isinstance(decision, Reject) and decision.status in (404, 503) and app[appkeys.STARTUP].active:
        # `corral up` is still starting backends and pulling models: not an answer yet.
        decision = Wait("starting", note="the launcher is still starting its backends")
    app[appkeys.METRICS].decisions.labels(_DECISION_KINDS[type(decision)], decision.reason).inc()
    app[appkeys.ACTIVITY].decided(route.model, decision)
    if log.isEnabledFor(logging.DEBUG):  # the explanation is built only for someone reading it
        log.debug("%s %s model=%s: %s", request.method, request.path, route.model, decision.explanation)
    return decision


async def _decide_or_wait(
    request: web.Request, route: RouteRequest, queue_first: bool = False, deadline: float | None = None
) -> Send | Reject:
    """Choose; on Wait, queue at the gateway until a choice is possible. Raises QueueRefused.
    `queue_first`: wait for a change before choosing (another gateway just took the slot).
    `deadline` (monotonic): the request's whole time in the queue ends there, however often it
    re-entered it."""
    decision: Decision = Wait("all_busy") if queue_first else _decide(request, route)
    if not isinstance(decision, Wait):
        return decision
    app = request.app
    settings = app[appkeys.SETTINGS]
    queues = app[appkeys.QUEUES]
    try:
        timeout_s = settings.queue_timeout_s if deadline is None else max(deadline - time.monotonic(), 0.0)
        async with queues.waiting(route.model, timeout_s=timeout_s, lane=route.priority) as ticket:
            while isinstance(decision, Wait):
                await ticket.wait()
                decision = _decide(request, route, ticket)
            return decision
    except QueueFull as e:
        raise QueueRefused(e.message, e.retry_after_s, "queue_full") from None
    except QueueTimeout as e:
        raise QueueRefused(e.message, e.retry_after_s, "queue_timeout") from None


async def _route(
    request: web.Request, call: ModelCall, body: bytes, started_at: float, priority: Priority = "interactive"
) -> web.StreamResponse:
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
        num_predict=call.num_predict,
        priority=priority,
    )
    held: HeldResponse | None = None
    last_failure = ""
    retries_left = settings.retries
    slot_taken = False
    queue_deadline = time.monotonic() + settings.queue_timeout_s
    while True:
        try:
            decision = await _decide_or_wait(request, route, queue_first=slot_taken, deadline=queue_deadline)
        except QueueRefused as e:
            metrics.queue_rejections.labels(_model_label(request, call.model), e.reason).inc()
            _count(request, call.model, "", 503)
            return error_for(request, 503, e.message, headers={"Retry-After": str(e.retry_after_s)})
        if isinstance(decision, Reject):
            if held is not None:  # the last backend's own error says more than "nothing left"
                _count(request, call.model, held.backend_id, held.status)
                return held.to_response()
            if route.exclude and last_failure:
                _count(request, call.model, "", 502)
                return error_for(request, 502, f"{decision.message} (last failure: {last_failure})")
            _count(request, call.model, "", decision.status)
            headers = {"Retry-After": "1"} if decision.status == 503 else None
            message = decision.message
            if decision.reason == "not_found":  # each route says it its own way, as Ollama does
                message = model_not_found_text(request.path, call.requested_as)
            return error_for(request, decision.status, message, headers=headers)
        slot_taken = False
        try:
            return await _send(request, call, decision, body, started_at, priority)
        except SlotTaken:
            slot_taken = True  # another gateway was quicker: wait for the next change
            continue
        except AttemptFailed as e:
            if e.held is not None and not is_backend_fault(e.held.status, error_text(e.held.body, e.held.status)):
                # The request's own error (a bad option, a template error): every backend would
                # say the same, so it is passed on once and counts as no failover.
                _count(request, call.model, e.backend_id, e.held.status)
                return e.held.to_response()
            held = e.held or held
            last_failure = e.message
            log.warning("<%s> %s %s failed before the first byte: %s", e.backend_id, request.method, request.path, e)
            metrics.failovers.labels(e.backend_id).inc()
            if retries_left <= 0:
                if held is not None:
                    _count(request, call.model, held.backend_id, held.status)
                    return held.to_response()
                _count(request, call.model, e.backend_id, 502)
                return error_for(request, 502, f"backend {e.backend_id} failed: {e.message}")
            retries_left -= 1
            note(request, retries=settings.retries - retries_left)
            metrics.retries.labels(_model_label(request, call.model)).inc()
            route = replace(route, exclude=route.exclude | {e.backend_id})


async def _send(
    request: web.Request,
    call: ModelCall,
    decision: Send,
    body: bytes,
    started_at: float,
    priority: Priority = "interactive",
) -> web.StreamResponse:
    """One attempt on one backend, counted in flight. Raises AttemptFailed (retry elsewhere)."""
    app = request.app
    pool = app[appkeys.POOL]
    metrics = app[appkeys.METRICS]
    backend_id = decision.backend_id
    record = pool.record(backend_id)
    if record is None:  # removed between the decision and now
        raise AttemptFailed(backend_id, "backend no longer registered")
    expected_s = decision.expected_ttft_s
    if not call.stream:  # the first byte of a whole answer comes after its decode
        expected_s += answer_decode_s(pool.observed(backend_id, call.model), call.num_predict or 0)
    bounds = upstream_timeouts(app[appkeys.SETTINGS], expected_s)
    extra_headers: dict[str, str] = {}
    if decision.num_ctx is not None and call.options.num_ctx is not None:
        body = _with_num_ctx(body, decision.num_ctx)
        extra_headers[NUM_CTX_HEADER] = f"{decision.num_ctx}; requested={call.options.num_ctx}"
        metrics.context_fits.labels(_model_label(request, call.model)).inc()
    for planned in decision.evicts_planned:
        log.warning(
            "<%s> %s evicts planned model %s: no other backend can serve it (%s)",
            backend_id,
            call.model,
            planned,
            decision.note,
        )
        metrics.planned_evictions.labels(planned, backend_id).inc()
    counts = call.kind != "show"  # metadata calls occupy no slot
    cold = counts and not pool.is_resident(backend_id, call.model)
    # With a shared store several gateways route to the same copies: a slot is reserved there first.
    slots = decision.slots if app[appkeys.SETTINGS].state == "redis" else 0
    if cold:  # before any await: the next decision must see this load in progress
        pool.start_loading(backend_id, call.model)
    try:
        async with _maybe_hold(request, backend_id, call, counts, priority, slots) as work:
            sent_at = time.monotonic()
            try:
                outcome = await forward(
                    request,
                    app[appkeys.SESSION],
                    backend_id,
                    record.url,
                    body,
                    connect_timeout_s=bounds.connect_s,
                    started_at=started_at,
                    on_tokens=work.add_tokens if work is not None else None,
                    extra_headers=extra_headers,
                    first_byte_timeout_s=bounds.first_byte_s,
                    idle_timeout_s=bounds.idle_s,
                    pool=app[appkeys.UPSTREAM],
                )
            except AttemptFailed as e:
                if e.connection_failed and pool.mark_failure(backend_id, e.message):
                    metrics.ejections.labels(backend_id).inc()
                raise
            except ClientGone as e:
                _count(request, call.model, backend_id, CLIENT_CLOSED_STATUS)
                log.debug("<%s> client hung up on %s %s", backend_id, request.method, request.path)
                return e.response
            except asyncio.CancelledError:
                _count(request, call.model, backend_id, CLIENT_CLOSED_STATUS)
                log.debug("<%s> client hung up on %s %s", backend_id, request.method, request.path)
                raise
            sequences = pool.in_flight_of(backend_id, call.model)
            _learn(request, call, backend_id, outcome, started_at, time.monotonic() - sent_at, sequences)
    finally:
        if cold:
            pool.stop_loading(backend_id, call.model)
    return outcome.response


def _with_num_ctx(body: bytes, num_ctx: int) -> bytes:
    """The request body with options.num_ctx replaced (the router checked it is a JSON object)."""
    data = json.loads(body)
    options = data.get("options")
    data["options"] = {**(options if isinstance(options, dict) else {}), "num_ctx": num_ctx}
    return json.dumps(data).encode()


def _maybe_hold(
    request: web.Request, backend_id: str, call: ModelCall, counts: bool, priority: Priority, slots: int
) -> contextlib.AbstractAsyncContextManager[Work | None]:
    if not counts:
        return contextlib.nullcontext()
    return request.app[appkeys.IN_FLIGHT].hold(
        backend_id,
        call.model,
        num_predict=call.num_predict,
        stream=call.stream,
        interactive=priority == "interactive",
        slots=slots,
    )


def _learn(
    request: web.Request,
    call: ModelCall,
    backend_id: str,
    outcome: Outcome,
    started_at: float,
    sent_wall_s: float = 0.0,
    sequences: int = 1,
) -> None:
    app = request.app
    metrics = app[appkeys.METRICS]
    pool = app[appkeys.POOL]
    elapsed_s = time.monotonic() - started_at
    label = _model_label(request, call.model)
    _count(request, call.model, backend_id, outcome.status, label)
    metrics.request_duration.labels(label, backend_id).observe(elapsed_s)
    if outcome.first_byte_s is not None:
        metrics.ttft.labels(label, backend_id).observe(outcome.first_byte_s)
    if call.kind != "show":  # the live views count work, not metadata look-ups
        failed = outcome.midstream_error is not None
        app[appkeys.ACTIVITY].finished(label, outcome.status, outcome.first_byte_s, outcome.final, failed)
    if outcome.midstream_error is not None:
        # Counted as a failure only (not also as the success of having answered, which would reset
        # the count): a backend that keeps dying mid-stream gets ejected like one that refuses.
        metrics.midstream_failures.labels(backend_id).inc()
        if pool.mark_failure(backend_id, outcome.midstream_error):
            metrics.ejections.labels(backend_id).inc()
        return
    pool.mark_success(backend_id)
    if outcome.final is None or outcome.status != 200 or call.kind == "show":
        return
    facts = pool.observe_reply(
        backend_id, call.model, outcome.final, call.options, elapsed_s, sent_wall_s=sent_wall_s, sequences=sequences
    )
    if facts.cold_load:
        metrics.cold_loads.labels(call.model, backend_id).inc()
        log.info("<%s> cold load of %s took %.1fs", backend_id, call.model, facts.load_s)
    if facts.tokens_per_s > 0:
        metrics.decode_rate.labels(call.model, backend_id).observe(facts.tokens_per_s)


async def _unload(request: web.Request, call: ModelCall, body: bytes, started_at: float) -> web.StreamResponse:
    """keep_alive 0 with nothing to generate: unload every copy, wherever the model is loaded, and
    list them in X-Corral-Backend. Sending it to a backend where it is not loaded would be harmless
    (Ollama checks before scheduling), so with no resident copy one backend that has the model
    answers. The answer is a failed backend's own reply when there is one (the model may still be
    loaded there), else a success."""
    app = request.app
    pool = app[appkeys.POOL]
    targets = [v for v in routable(pool) if v.resident_model(call.model) is not None]
    if not targets:
        return await _route(request, replace(call, kind="show"), body, started_at)
    connect_s = app[appkeys.SETTINGS].connect_timeout_s
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_s)
    replies = await call_all(app[appkeys.SESSION], targets, "POST", request.path, body, client_timeout=timeout)
    answered = [(r.status, r) for r in replies if r.status is not None]
    for _, reply in answered:
        pool.forget_resident(reply.backend_id, call.model)  # the pool's change signal wakes waiters
    if not answered:
        log.warning("unload of %s failed: %s", call.model, "; ".join(r.error for r in replies))
        _count(request, call.model, "", 502)
        return error_for(request, 502, f"no backend holding model '{call.requested_as}' answered")
    status, chosen = next(((s, r) for s, r in answered if s >= 300), answered[-1])
    _count(request, call.model, "all", status)
    copies = ", ".join(r.backend_id for _, r in answered)
    headers = {"Content-Type": chosen.content_type, BACKEND_HEADER: copies}
    return web.Response(status=status, body=chosen.body, headers=headers)
