"""The app factory: Ollama's route table (server/routes.go GenerateRoutes) and its middleware.

Middleware, in gin's order: CORS (gin-contrib/cors with Ollama's allowed origins), the Host check
(allowedHostsMiddleware, only when bound to a loopback address), then routing with gin's answers for
misses: `404 page not found` and `405 method not allowed` as text/plain, and a redirect for a path
that only differs by a trailing slash.
"""

from __future__ import annotations

import fnmatch
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from launcher.facts.hosts import check_host, is_loopback_bind, local_ips
from launcher.sim import create as create_route
from launcher.sim import handlers_infer as infer
from launcher.sim import handlers_models as models
from launcher.sim import openai_compat as openai
from launcher.sim.clock import Clock
from launcher.sim.env import ServeSettings
from launcher.sim.handlers_infer import SERVICE
from launcher.sim.service import SimService
from launcher.sim.wire import json_response, text_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CORS_HEADERS = (
    "Authorization, Content-Type, User-Agent, Accept, X-Requested-With, OpenAI-Beta, x-stainless-arch, "
    "x-stainless-async, x-stainless-custom-poll-interval, x-stainless-helper-method, x-stainless-lang, "
    "x-stainless-os, x-stainless-package-version, x-stainless-poll-helper, x-stainless-retry-count, "
    "x-stainless-runtime, x-stainless-runtime-version, x-stainless-timeout"
)
_BROWSER_EXTENSIONS = ("chrome-extension://*", "safari-extension://*", "moz-extension://*", "ms-browser-extension://*")


def allowed_origins(extra: tuple[str, ...]) -> tuple[str, ...]:
    """envconfig.AllowedOrigins: OLLAMA_ORIGINS plus localhost-ish origins on any port and app schemes."""
    origins = list(extra)
    for host in ("localhost", "127.0.0.1", "0.0.0.0"):
        origins += [f"http://{host}", f"https://{host}", f"http://{host}:*", f"https://{host}:*"]
    origins += ["app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*", *_BROWSER_EXTENSIONS]
    return tuple(origins)


def make_middlewares(settings: ServeSettings) -> list[Middleware]:
    origins = allowed_origins(settings.origins)
    loopback = is_loopback_bind(settings.host)
    local_addresses = local_ips()

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        host = request.headers.get("Host", "")
        if not origin or origin in (f"http://{host}", f"https://{host}"):  # not cross-origin
            return await handler(request)
        if not any(fnmatch.fnmatchcase(origin, pattern) for pattern in origins):
            return web.Response(status=403)
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if request.method == "OPTIONS":
            headers |= {
                "Access-Control-Allow-Methods": "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS",
                "Access-Control-Allow-Headers": _CORS_HEADERS,
                "Access-Control-Max-Age": "43200",
            }
            return web.Response(status=204, headers=headers)
        response = await handler(request)
        if not response.prepared:
            response.headers.update(headers)
        return response

    @web.middleware
    async def hosts(request: web.Request, handler: Handler) -> web.StreamResponse:
        if loopback:
            verdict = check_host(request.headers.get("Host", ""), local_addresses)
            if verdict == "refused":
                return web.Response(status=403)
            if verdict == "name" and request.method == "OPTIONS":
                return web.Response(status=204)
        return await handler(request)

    @web.middleware
    async def gin_misses(request: web.Request, handler: Handler) -> web.StreamResponse:
        error = request.match_info.http_exception
        if error is None:
            return await handler(request)
        path = request.path
        if path != "/" and path.endswith("/"):
            clone = request.clone(rel_url=request.rel_url.with_path(path.rstrip("/") or "/"))
            match = await request.app.router.resolve(clone)
            if match.http_exception is None:
                # gin's RedirectTrailingSlash: 301 for GET, 307 otherwise, with net/http's redirect body.
                location = str(clone.rel_url)
                code = 301 if request.method == "GET" else 307
                text = "Moved Permanently" if code == 301 else "Temporary Redirect"
                body = f'<a href="{location}">{text}</a>.\n\n' if request.method == "GET" else ""
                reply = text_response(code, body, content_type="text/html; charset=utf-8")
                reply.headers["Location"] = location
                return reply
        if isinstance(error, web.HTTPMethodNotAllowed):
            # gin lists them in the order its method trees were created (routes.go registers HEAD / first).
            order = {"HEAD": 0, "GET": 1, "POST": 2, "DELETE": 3}
            allow = ", ".join(sorted(error.allowed_methods, key=lambda m: order.get(m, 9)))
            response = text_response(405, "405 method not allowed")
            response.headers["Allow"] = allow
            return response
        return text_response(404, "404 page not found")

    return [cors, hosts, gin_misses]


async def status(request: web.Request) -> web.Response:
    return json_response({"cloud": {"disabled": True, "source": "corral-sim"}})


async def _no_server_header(_request: web.Request, response: web.StreamResponse) -> None:
    """Go's net/http (and so Ollama) sends no Server header; aiohttp adds one before this hook runs."""
    response.headers.popall("Server", None)


def create_app(settings: ServeSettings, clock: Clock) -> web.Application:
    """The simulated `ollama serve` as an aiohttp app; its SimService starts and stops with the app."""
    app = web.Application(middlewares=make_middlewares(settings), client_max_size=1 << 32)
    service = SimService(settings, clock)
    app[SERVICE] = service

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.close()

    app.cleanup_ctx.append(lifecycle)
    app.on_response_prepare.append(_no_server_header)
    r = app.router
    r.add_get("/", models.root)  # GET and HEAD
    r.add_get("/api/version", models.version)
    r.add_get("/api/status", status, allow_head=False)
    r.add_post("/api/pull", models.pull)
    r.add_post("/api/push", models.push)
    r.add_get("/api/tags", models.tags)
    r.add_post("/api/show", models.show)
    r.add_delete("/api/delete", models.delete)
    r.add_post("/api/create", create_route.create)
    r.add_post("/api/blobs/{digest}", models.create_blob)
    r.add_head("/api/blobs/{digest}", models.head_blob)
    r.add_post("/api/copy", models.copy)
    r.add_get("/api/ps", models.ps, allow_head=False)
    r.add_post("/api/generate", infer.generate)
    r.add_post("/api/chat", infer.chat)
    r.add_post("/api/embed", infer.embed)
    r.add_post("/api/embeddings", infer.embeddings)
    r.add_post("/v1/chat/completions", openai.chat_completions)
    r.add_post("/v1/completions", openai.completions)
    r.add_post("/v1/embeddings", openai.embeddings)
    r.add_get("/v1/models", openai.models, allow_head=False)
    r.add_get("/v1/models/{model}", openai.retrieve_model, allow_head=False)
    r.add_get("/corral-sim/gpus", models.gpus, allow_head=False)
    return app
