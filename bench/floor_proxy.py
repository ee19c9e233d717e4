"""The floor under the gateway: an aiohttp server relaying to the backends over the gateway's own
upstream client (`gateway.api.upstream`), round-robin, and nothing else: no routing, no metrics,
no auth, no access log, no limits; what it keeps of the gateway's behaviour is streaming
without buffering and a client's hang-up cancelling its request.

    .venv/bin/python -m bench.floor_proxy PORT BACKEND_URL [BACKEND_URL ...]

`bench/overhead.py` runs it as the path "aiohttp floor": what a hop costs when its server is
aiohttp and its client is Corral's, so the difference to "gateway" is what Corral's own work per
request costs, and the difference to nginx is what the framework costs.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.api.upstream import UpstreamPool  # noqa: E402 - the repo root must be importable first

_SKIP = {"host", "content-length", "transfer-encoding", "connection"}


def make_app(backends: list[str]) -> web.Application:
    targets = itertools.cycle([(u.hostname or "127.0.0.1", u.port or 80) for u in map(urlsplit, backends)])
    pool = UpstreamPool()

    async def relay(request: web.Request) -> web.StreamResponse:
        host, port = next(targets)
        body = await request.read()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _SKIP]
        reply = await pool.request(request.method, host, port, request.path_qs, headers, body, connect_timeout_s=5.0)
        try:
            out_headers = {k: v for k, v in reply.headers.items() if k.lower() not in _SKIP}
            if reply.content_length is not None:
                body = await reply.read(reply.content_length)
                return web.Response(status=reply.status, body=body, headers=out_headers)
            response = web.StreamResponse(status=reply.status, headers=out_headers)
            await response.prepare(request)
            while chunk := await reply.readany():
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            reply.close()

    async def closed(_app: web.Application) -> None:
        await pool.close()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay)
    app.on_cleanup.append(closed)
    return app


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    # handler_cancellation as the gateway has it: a proxy of token streams must stop the backend's
    # work when its client hangs up, and aiohttp runs each request as its own task for that.
    web.run_app(
        make_app(argv[1:]),
        host="127.0.0.1",
        port=int(argv[0]),
        print=None,
        access_log=None,
        handler_cancellation=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
