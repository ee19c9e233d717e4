"""Ollama's DNS-rebinding guard, `allowedHostsMiddleware` in server/routes.go, as one pure rule.

A server bound to a loopback address answers only requests whose Host header names this machine:
a loopback, private, unspecified or local IP literal, `localhost`, the machine's hostname, a name
under `.localhost`, `.local` or `.internal`, or an empty Host. Anything else is a web page on
another origin reaching a local server through a DNS name it controls: 403. The simulator
(launcher/sim/app.py) and the gateway (gateway/api/hosts.py) share this copy.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Literal

HostCheck = Literal["ip", "name", "refused"]

# Ollama's allowed top-level names (routes.go allowedHost: "localhost", "local", "internal").
LOCAL_SUFFIXES: tuple[str, ...] = ("localhost", "local", "internal")


def split_host_port(hostport: str) -> tuple[str | None, str]:
    """Go's net.SplitHostPort: "h:p", "[v6]:p"; anything else is an error (None)."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or hostport[end + 1 : end + 2] != ":":
            return None, ""
        return hostport[1:end], hostport[end + 2 :]
    if hostport.count(":") != 1:
        return None, ""
    host, _, port = hostport.partition(":")
    return host, port


def local_ips() -> set[str]:
    """The addresses this machine's hostname resolves to (Ollama's isLocalIP compares with the
    interfaces' addresses; the hostname's cover the same ground without enumerating them)."""
    ips = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            ips.add(str(info[4][0]))
    except OSError:
        pass
    return ips


def check_host(host_header: str, local_addresses: set[str]) -> HostCheck:
    """allowedHostsMiddleware's test for a server bound to loopback: "ip" for a local or private
    address (passed on as is), "name" for a local name (Ollama also answers OPTIONS itself then),
    "refused" for anything else (403)."""
    host, _port = split_host_port(host_header)
    if host is None:
        host = host_header  # no port: Go keeps the whole header, so "[::1]" is no address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None and (ip.is_loopback or ip.is_private or ip.is_unspecified or str(ip) in local_addresses):
        return "ip"
    host = host.lower()
    if host in ("", "localhost") or host == socket.gethostname().lower():
        return "name"
    if any(host.endswith("." + suffix) for suffix in LOCAL_SUFFIXES):
        return "name"
    return "refused"


def is_loopback_bind(host: str) -> bool:
    """Whether a listen address is loopback (the guard applies only then, as in Ollama)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"
