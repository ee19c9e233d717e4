"""Which headers cross the gateway, in each direction.

Towards a backend: the client's, less hop-by-hop ones (RFC 9110 section 7.6.1, and any the
Connection header names), the gateway's own (Authorization, Origin, the lane), and those the
gateway sets itself (Host, forwarding headers, the request id). Back to the client: the backend's,
less hop-by-hop and framing ones (the gateway re-frames the body), plus X-Corral-Backend.
"""

from __future__ import annotations

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.api.accesslog import REQUEST_ID_HEADER, request_id_of
from gateway.api.bodies import BODY_DECODED
from gateway.api.errors import BACKEND_HEADER

# Hop-by-hop headers (RFC 9110 section 7.6.1) describe one connection, not the message; a proxy
# must not pass them on. "Keep-Alive" and "Proxy-Connection" are the pre-standard spellings.
HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers not to forward: Host is set from the backend's URL (Ollama bound to loopback
# refuses foreign Host headers with 403, see allowedHostsMiddleware), Content-Length is recomputed
# by the client library, Authorization carries the gateway's key (backends must not see it),
# Expect would make the backend answer 100-continue to a body we already hold, and Origin was
# already checked by the gateway's CORS policy: passed on, it would make Ollama's own CORS check
# refuse (403) every browser origin allowed only by `[gateway] cors_origins`.
# X-Corral-Priority chooses the gateway's lane and means nothing to a backend.
DROP_REQUEST_HEADERS: frozenset[str] = HOP_BY_HOP | {
    "host",
    "content-length",
    "authorization",
    "expect",
    "origin",
    "x-corral-priority",
}
# Reply headers not to forward: the body is re-framed by this server (chunked, or with its own
# Content-Length when the whole reply is already here), which also sets its own Date and Server.
DROP_RESPONSE_HEADERS: frozenset[str] = HOP_BY_HOP | {"content-length", "date", "server"}


def connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    """Header names a message lists in its Connection header: hop-by-hop as well (RFC 9110 7.6.1)."""
    tokens: set[str] = set()
    for value in headers.getall("Connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


# The client's own forwarding headers are replaced (X-Forwarded-For extended), not passed on.
_DROP = DROP_REQUEST_HEADERS | {"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"}
_DROP_WITH_ID = _DROP | {REQUEST_ID_HEADER.lower()}


def upstream_header_items(request: web.Request) -> list[tuple[str, str]]:
    """The headers to send the backend, in order: the client's less the hop-by-hop and dropped
    ones, then X-Forwarded-For/-Host/-Proto and the request id (set here, replacing the client's)."""
    headers = request.headers
    request_id = request_id_of(request)
    drop = _DROP_WITH_ID if request_id else _DROP
    if "Connection" in headers:
        drop = drop | connection_tokens(headers)
    if request.get(BODY_DECODED):  # the body goes on decoded: its old encoding no longer applies
        drop = drop | {"content-encoding"}
    items = [(k, v) for k, v in headers.items() if k.lower() not in drop]
    forwarded_for = headers.get("X-Forwarded-For")
    remote = request.remote or ""
    items.append(("X-Forwarded-For", f"{forwarded_for}, {remote}" if forwarded_for else remote))
    items.append(("X-Forwarded-Host", request.host))
    items.append(("X-Forwarded-Proto", request.scheme))
    if request_id:  # the same id in the backend's logs as in the client's and ours
        items.append((REQUEST_ID_HEADER, request_id))
    return items


def upstream_headers(request: web.Request) -> CIMultiDict[str]:
    return CIMultiDict(upstream_header_items(request))


def reply_headers(upstream: CIMultiDictProxy[str], backend_id: str) -> CIMultiDict[str]:
    """The backend's reply headers to pass on, less hop-by-hop and re-framing ones, plus ours."""
    drop = DROP_RESPONSE_HEADERS | connection_tokens(upstream) if "Connection" in upstream else DROP_RESPONSE_HEADERS
    headers = CIMultiDict((k, v) for k, v in upstream.items() if k.lower() not in drop)
    headers[BACKEND_HEADER] = backend_id
    if is_stream_type(upstream.get("Content-Type", "")):
        headers["X-Accel-Buffering"] = "no"  # an nginx in front must not buffer token streams
    return headers


def is_stream_type(content_type: str) -> bool:
    return content_type.startswith(("application/x-ndjson", "text/event-stream"))
