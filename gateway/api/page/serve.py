"""The fleet page at /corral/: static files shipped inside the package, served by the gateway.

The page itself is open (it holds no data); what it shows comes from /api/corral/status, which
keeps that route's access rule (an admin key when admin keys are configured): the page asks for the
key and sends it as an Authorization header. The files are read once, at import, from the package
(`static/`, package data in the wheel), so a request never touches the disk. Only the files listed
here are served: no directory listing, no path from the request reaches the file system.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

PAGE_PATH = "/corral/"
CONTENT_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript"}
FILES = ("index.html", "page.css", "page.js")
# Everything from this origin, nothing from anywhere else (no CDN, no inline script); the icon is
# an empty data: URL so browsers do not ask for /favicon.ico.
CSP = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"


def _load() -> dict[str, bytes]:
    static = resources.files("gateway.api.page").joinpath("static")
    return {name: static.joinpath(name).read_bytes() for name in FILES}


_FILES = _load()


def _serve(name: str) -> web.Response:
    suffix = name[name.rfind(".") :]
    return web.Response(
        body=_FILES[name],
        content_type=CONTENT_TYPES[suffix],
        charset="utf-8",
        headers={
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            # Small files, and a new gateway version may change them: revalidate every load.
            "Cache-Control": "no-cache",
        },
    )


async def index(request: web.Request) -> web.Response:
    return _serve("index.html")


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _FILES or name == "index.html":
        raise web.HTTPNotFound()
    return _serve(name)


async def redirect(request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently(PAGE_PATH)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/corral", redirect)
    router.add_get(PAGE_PATH, index)
    router.add_get(PAGE_PATH + "{name}", asset)
