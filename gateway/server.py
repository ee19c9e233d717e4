"""Running the gateway in the current event loop: `GatewayServer`.

    async with GatewayServer(settings, store) as gw:     # listening on settings.listen
        ...                                             # gw.url, gw.port, gw.app
        await gw.drain(timeout_s)                       # optional: drain now instead of on exit

Leaving the block drains with `settings.drain_timeout_s`: stop accepting connections (and new
requests on kept-alive ones), let the requests in progress finish (streams included) for up to the
timeout, cancel what is left, then stop the poller and close the upstream session. `corral up`
runs it beside the launcher with a shared MemoryStore; `corral gateway` runs it alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from types import TracebackType

from aiohttp import web

from gateway.api.auth import ApiKeys, check_listen_allowed, load_keys
from gateway.api.limits import GuardedSite
from gateway.app import create_app
from gateway.appkeys import POLLER, STARTUP, TRACKER
from gateway.config import GatewaySettings
from gateway.state.store import StateStore
from gateway.tls import server_ssl_context
from launcher.facts.ollama import host_port

log = logging.getLogger(__name__)

# After the drain wait, handlers still running get this long before they are cancelled.
CANCEL_GRACE_S = 0.5


def socket_address(host: str) -> tuple[socket.AddressFamily, str]:
    """The address family and the address to bind for a configured host ("" = every IPv4 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if host in ("", "localhost"):
        host = "127.0.0.1" if host == "localhost" else "0.0.0.0"
    return family, host


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host is an IPv6 address). `reuse_port`:
    SO_REUSEPORT, so that several gateway workers listen on the same port and the kernel spreads
    new connections over them."""
    family, address = socket_address(host)
    sock = socket.create_server((address, port), family=family, backlog=1024, reuse_port=reuse_port)
    sock.setblocking(False)
    return sock


class GatewayServer:
    """The gateway app served on one address. Not reusable: start once, drain once."""

    def __init__(
        self,
        settings: GatewaySettings,
        store: StateStore,
        *,
        keys: ApiKeys | None = None,
        host: str | None = None,
        port: int | None = None,
        starting: bool = False,
        worker: str = "",
    ) -> None:
        """`keys`: None reads them as configured (files, environment). `host`/`port` override
        settings.listen (port 0 picks a free port; see `port` after start). `starting`: model
        calls wait as "starting" until `end_startup()` (for a launcher still starting backends).
        `worker`: "i/n" for one of `corral gateway --workers n`; the listener then takes
        SO_REUSEPORT so its siblings share the port. The store is not closed here: its owner
        closes it after the server."""
        self.settings = settings
        self.store = store
        self.keys = keys if keys is not None else load_keys(settings, os.environ)
        self.host = host if host is not None else settings.listen_host
        self._requested_port = port if port is not None else settings.listen_port
        self._runner: web.AppRunner | None = None
        self._site: GuardedSite | None = None
        self._app: web.Application | None = None
        self._port = 0
        self._drained: bool | None = None
        self._accepting = False
        self._starting = starting
        self._worker = worker

    @property
    def app(self) -> web.Application:
        if self._app is None:
            raise RuntimeError("GatewayServer not started")
        return self._app

    @property
    def port(self) -> int:
        """The bound port (meaningful after start)."""
        return self._port

    @property
    def accepting(self) -> bool:
        """True from start until a drain has closed the listener and every idle connection."""
        return self._accepting

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        scheme = "https" if self.settings.tls else "http"
        return f"{scheme}://{host_port(host, self._port)}"

    async def start(self) -> None:
        """Check the listen address against the keys (ConfigError for an open non-loopback
        address), load the TLS certificate when configured (ConfigError), start the app (first
        health checks and polls included) and listen. Raises
        OSError when the address is taken (before anything started)."""
        if self._runner is not None:
            raise RuntimeError("GatewayServer already started")
        check_listen_allowed(self.host, self.keys)
        ssl_context = server_ssl_context(self.settings)  # a bad certificate fails before anything starts
        # Bind first: a taken port fails before anything starts, and port 0 is known to the app.
        sock = bind_socket(self.host, self._requested_port, reuse_port=bool(self._worker))
        self._port = int(sock.getsockname()[1])
        listen = host_port(self.host, self._port)
        self._app = create_app(
            self.settings, self.store, keys=self.keys, listen=listen, starting=self._starting, worker=self._worker
        )
        # handler_cancellation: a client that hangs up cancels its handler, which closes the
        # upstream request at once instead of at the next chunk.
        # keepalive_timeout: how long an idle kept-alive client connection stays open (nginx's
        # keepalive_timeout); the header and connection limits live in GuardedSite's protocol.
        runner = web.AppRunner(
            self._app,
            handler_cancellation=True,
            shutdown_timeout=CANCEL_GRACE_S,
            access_log=None,
            keepalive_timeout=self.settings.keepalive_timeout_s,
        )
        try:
            await runner.setup()
            site = GuardedSite(runner, sock, self.settings, ssl_context=ssl_context)
            await site.start()
        except BaseException:
            await runner.cleanup()
            sock.close()
            raise
        self._runner = runner
        self._site = site
        self._accepting = True
        if self._worker:
            log.info("gateway worker %s listening on %s (policy %s)", self._worker, self.url, self.settings.policy)
        else:
            log.info("gateway listening on %s (policy %s)", self.url, self.settings.policy)

    async def end_startup(self) -> None:
        """The launcher has started its backends: read their records, health and inventories now
        (so waiting requests find them ready with their models), then stop holding requests for
        backends still to come."""
        self._starting = False
        if self._app is None:
            return
        poller = self._app[POLLER]
        with contextlib.suppress(Exception):  # a store hiccup: the next poll reads them anyway
            await poller.sync_records()
        # What the backends hold now (models pulled during startup), before anyone decides on it.
        await asyncio.gather(*(poller.check(b) for b in poller.pool.ids()))
        await asyncio.gather(*(poller.poll(b) for b in poller.pool.ids()))
        self._app[STARTUP].end()

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Stop accepting, wait up to `timeout_s` (default settings.drain_timeout_s) for requests in
        progress, then close everything. Returns True when all finished in time. Idempotent."""
        if self._drained is not None:
            return self._drained
        if self._runner is None:
            self._drained = True
            return True
        timeout = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        if self._site is not None:
            await self._site.stop()
            self._site = None
        tracker = self.app[TRACKER]
        if self._runner.server is not None:
            # Kept-alive connections would go on taking new requests (clients pool them): close the
            # idle ones now, the busy ones once their reply is sent.
            await asyncio.sleep(0)  # requests already received get to their handlers first
            for connection in self._runner.server.connections:
                if tracker.is_busy(connection):
                    connection.close()
                else:
                    connection.force_close()
        self._accepting = False
        finished = await tracker.wait_idle(timeout)
        if not finished:
            log.warning("drain: %d requests still running after %.1fs; cancelling them", tracker.active, timeout)
        await self._runner.cleanup()
        self._runner = None
        self._drained = finished
        return finished

    async def close(self) -> None:
        """Stop at once: in-flight requests are cancelled."""
        await self.drain(0.0)

    async def __aenter__(self) -> GatewayServer:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.drain()
