"""Cross-origin requests from browsers, answered like Ollama's gin-contrib/cors setup.

Ollama allows localhost, 127.0.0.1 and 0.0.0.0 (any port, http or https), app://, file://,
tauri://, vscode-webview:// and vscode-file:// origins, browser extensions, plus OLLAMA_ORIGINS
(envconfig.AllowedOrigins). The gateway allows the same list plus `[gateway] cors_origins`
("*" allows every origin). A request without an Origin header (every non-browser client) passes
untouched; a browser request from any other origin is refused with 403, as Ollama refuses it.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from aiohttp import web

from gateway.api.errors import error_for

OLLAMA_ORIGINS: tuple[str, ...] = (
    *(
        f"{scheme}://{host}{port}"
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for scheme in ("http", "https")
        for port in ("", ":*")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)
BROWSER_EXTENSION_SCHEMES: tuple[str, ...] = ("chrome-extension://", "moz-extension://", "safari-extension://")
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
# Ollama's list (routes.go GenerateRoutes), which includes what the OpenAI SDKs send.
ALLOW_HEADERS = ", ".join(
    (
        "Authorization",
        "Content-Type",
        "User-Agent",
        "Accept",
        "X-Requested-With",
        "OpenAI-Beta",
        "x-stainless-arch",
        "x-stainless-async",
        "x-stainless-custom-poll-interval",
        "x-stainless-helper-method",
        "x-stainless-lang",
        "x-stainless-os",
        "x-stainless-package-version",
        "x-stainless-poll-helper",
        "x-stainless-retry-count",
        "x-stainless-runtime",
        "x-stainless-runtime-version",
        "x-stainless-timeout",
    )
)
MAX_AGE_S = 12 * 3600  # gin-contrib/cors default
_ALLOWED_ORIGIN = web.RequestKey("corral_cors_origin", str)


class OriginPolicy:
    def __init__(self, extra: Iterable[str] = ()) -> None:
        extra = [o.strip() for o in extra if o.strip()]
        self.allow_all = "*" in extra
        self.patterns = (*extra, *OLLAMA_ORIGINS)

    def allows(self, origin: str) -> bool:
        if self.allow_all or origin.startswith(BROWSER_EXTENSION_SCHEMES):
            return True
        return any(fnmatchcase(origin, pattern) for pattern in self.patterns)


def cors_refusal(policy: OriginPolicy, request: web.Request) -> web.Response | None:
    """A browser request from an origin not allowed (403), or the answer to a preflight (204);
    None: go on (an allowed origin is noted for the reply's headers)."""
    origin = request.headers.get("Origin")
    if not origin:
        return None
    if not policy.allows(origin):
        return error_for(request, 403, f"origin {origin!r} is not allowed (add it to gateway.cors_origins)")
    allow_origin = "*" if policy.allow_all else origin
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": allow_origin,
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": str(MAX_AGE_S),
                "Vary": "Origin",
            },
        )
    request[_ALLOWED_ORIGIN] = allow_origin  # added to the reply's headers when it is prepared
    return None


def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: streamed replies send their headers inside the handler, so the
    CORS headers go on at that moment rather than after the handler returns."""
    allow_origin = request.get(_ALLOWED_ORIGIN)
    if allow_origin:
        response.headers["Access-Control-Allow-Origin"] = allow_origin
        response.headers.add("Vary", "Origin")
