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

from aiohttp import web

from gateway.api.errors import ERROR_SOURCE_HEADER
from launcher.facts.hosts import check_host, is_loopback_bind, local_ips, split_host_port

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


class HostCheck:
    """The check for a gateway listening on a loopback address. Answers are remembered per Host
    value (a client sends the same few; bounded, so made-up ones cannot grow it)."""

    CACHE_SIZE = 256

    def __init__(self, allowed_hosts: tuple[str, ...]) -> None:
        self._allowed_hosts = allowed_hosts
        self._local_addresses = local_ips()
        self._answers: dict[str, bool] = {}

    @classmethod
    def for_listen(cls, listen_host: str, allowed_hosts: tuple[str, ...]) -> HostCheck | None:
        """The check for a gateway listening on `listen_host`; None when it does not apply."""
        return cls(allowed_hosts) if is_loopback_bind(listen_host) else None

    def refusal(self, request: web.Request) -> web.Response | None:
        """Ollama's bare 403 for a foreign Host (the header says the gateway refused it); None: allowed."""
        if request.path in UNCHECKED_PATHS:
            return None
        host = request.headers.get("Host", "")
        allowed = self._answers.get(host)
        if allowed is None:
            allowed = host_allowed(host, self._allowed_hosts, self._local_addresses)
            if len(self._answers) >= self.CACHE_SIZE:
                self._answers.clear()
            self._answers[host] = allowed
        return None if allowed else web.Response(status=403, headers={ERROR_SOURCE_HEADER: "gateway"})
