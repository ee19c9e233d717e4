"""Ollama's Host check (DNS-rebinding guard) in front of the whole gateway.

The backends refuse a foreign Host with 403 (allowedHostsMiddleware, server/routes.go), but the
gateway rewrites Host for each upstream call, so without its own check a web page that rebinds a
DNS name to 127.0.0.1 would reach every backend through the gateway (`/api/tags`, and on a keyless
gateway even `DELETE /api/delete`). The rule is Ollama's own (launcher/facts/hosts.py, shared
with the simulator), applied as Ollama applies it: only when the gateway listens on a loopback
address. `[gateway] allowed_hosts` adds names (shell-style patterns, e.g. "*.corp.example", or "*"
for any), for a gateway reached through a local name of its own.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.api.errors import ERROR_SOURCE_HEADER
from launcher.facts.hosts import check_host, is_loopback_bind, local_ips, split_host_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Open to any Host: probes address a pod or container by whatever name they were given.
UNCHECKED_PATHS: frozenset[str] = frozenset({"/api/corral/ready"})


def host_name(host_header: str) -> str:
    """The name part of a Host header, lower-cased, without port or IPv6 brackets."""
    host, _port = split_host_port(host_header)
    return (host if host is not None else host_header).strip("[]").lower()


def host_allowed(host_header: str, extra: tuple[str, ...], local_addresses: set[str]) -> bool:
    if check_host(host_header, local_addresses) != "refused":
        return True
    name = host_name(host_header)
    return any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in extra)


def hosts_middleware(listen_host: str, allowed_hosts: tuple[str, ...]) -> Middleware | None:
    """The check for a gateway listening on `listen_host`; None when it does not apply."""
    if not is_loopback_bind(listen_host):
        return None
    local_addresses = local_ips()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in UNCHECKED_PATHS or host_allowed(
            request.headers.get("Host", ""), allowed_hosts, local_addresses
        ):
            return await handler(request)
        # Ollama aborts with a bare 403 (no body); the header says the gateway refused it.
        return web.Response(status=403, headers={ERROR_SOURCE_HEADER: "gateway"})

    return check
