"""The gateway's one middleware: everything every request goes through before its handler.

In order, outermost first (each step sees what the later ones answered):
  access    the request id (the client's or a fresh one) and, when `[gateway] access_log`, one line
            per request with status, bytes, backend and times (gateway/api/accesslog.py)
  limits    503 on a connection over `max_connections`, 413 for an announced body over the limit;
            a refusal that leaves a body unread closes the connection (gateway/api/limits.py)
  tracking  the request counts as in progress until its handler returns: what a drain waits for
            (gateway/api/lifecycle.py)
  errors    unknown path, wrong method, an oversized body and unexpected failures, answered like
            Ollama (404/405 as text, JSON errors otherwise)
  hosts     Ollama's Host check on a loopback listener (gateway/api/hosts.py)
  cors      browser origins and preflights (gateway/api/cors.py)
  auth      API keys and admin routes (gateway/api/auth.py)

Why one middleware instead of seven: each aiohttp middleware is a coroutine layer around every
request, and on the model-call path the layers together cost as much as a routing decision
(bench/overhead.py). Here the checks are plain functions called in that order.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.api.accesslog import ACCESS, access_line, access_log, new_record
from gateway.api.auth import ApiKeys, auth_refusal
from gateway.api.cors import OriginPolicy, cors_refusal
from gateway.api.errors import BACKEND_HEADER, error_for, method_not_allowed_page, not_found_page
from gateway.api.hosts import HostCheck
from gateway.api.lifecycle import RequestTracker
from gateway.api.limits import limits_refusal, needs_close, send_and_close
from gateway.config import GatewaySettings

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def front_middleware(
    settings: GatewaySettings,
    tracker: RequestTracker,
    keys: ApiKeys,
    hosts: HostCheck | None,
    origins: OriginPolicy,
) -> Middleware:
    log_access = settings.access_log

    async def answered(request: web.Request, handler: Handler) -> web.StreamResponse:
        """errors, hosts, cors and auth around the handler."""
        try:
            refusal = (
                (hosts.refusal(request) if hosts is not None else None)
                or cors_refusal(origins, request)
                or auth_refusal(keys, request)
            )
            if refusal is not None:
                return refusal
            return await handler(request)
        except web.HTTPNotFound:
            return not_found_page()
        except web.HTTPMethodNotAllowed as e:
            return method_not_allowed_page(e.allowed_methods)
        except web.HTTPRequestEntityTooLarge:
            return error_for(request, 413, f"request body too large: the limit is {settings.max_body_bytes} bytes")
        except web.HTTPException:
            raise
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as e:
            log.exception("%s %s failed", request.method, request.path)
            return error_for(request, 500, f"internal gateway error: {type(e).__name__}: {e}")

    async def limited(request: web.Request, handler: Handler) -> web.StreamResponse:
        """limits and tracking around the rest."""
        refusal = limits_refusal(settings, request)
        if refusal is not None:
            return await send_and_close(request, refusal) if refusal.status == 413 else refusal
        connection = request.protocol
        tracker.enter(connection)
        try:
            response = await answered(request, handler)
        finally:
            tracker.leave(connection)
        if needs_close(request, response):
            return await send_and_close(request, response)
        return response

    @web.middleware
    async def front(request: web.Request, handler: Handler) -> web.StreamResponse:
        record = new_record(request)
        request[ACCESS] = record
        if not log_access:
            return await limited(request, handler)
        status, size, backend = 500, 0, ""
        try:
            response = await limited(request, handler)
            status, backend = response.status, response.headers.get(BACKEND_HEADER, "")
            if not response.prepared:
                # Sent here rather than by aiohttp after this returns (which then does nothing more),
                # so the line has the bytes and the time of the whole reply.
                await response.prepare(request)
                await response.write_eof()
            size = response.body_length
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        except BaseException:
            status = 499 if request.transport is None or request.transport.is_closing() else 500
            raise
        finally:
            access_log.info("%s", access_line(request, record, status, size, backend))

    return front
