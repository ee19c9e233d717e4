"""Typed keys for what `create_app` puts into the aiohttp Application (no module-level singletons).

Keys for resources made in a cleanup context (the ClientSession, the poller) are set when the app
starts and removed when it stops.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from gateway.api.activity import Activity
from gateway.api.admission import WaitQueues
from gateway.api.auth import ApiKeys
from gateway.api.lifecycle import RequestTracker
from gateway.api.ready import StartupGate
from gateway.api.upstream import UpstreamPool
from gateway.config import GatewaySettings
from gateway.fleet.inflight import InFlight
from gateway.fleet.poller import Poller
from gateway.fleet.pool import BackendPool
from gateway.fleet.storewatch import StoreWatch
from gateway.metrics import Metrics
from gateway.routing.policy import Policy
from gateway.state.health import StoreHealth
from gateway.state.store import StateStore

SETTINGS = web.AppKey("corral_settings", GatewaySettings)
STORE: web.AppKey[StateStore] = web.AppKey("corral_store")
KEYS = web.AppKey("corral_keys", ApiKeys)
METRICS = web.AppKey("corral_metrics", Metrics)
STORE_HEALTH = web.AppKey("corral_store_health", StoreHealth)
STARTUP = web.AppKey("corral_startup", StartupGate)
POOL = web.AppKey("corral_pool", BackendPool)
STORE_WATCH = web.AppKey("corral_store_watch", StoreWatch)  # store health + GPU inventory, for /metrics
QUEUES = web.AppKey("corral_queues", WaitQueues)
POLICY: web.AppKey[Policy] = web.AppKey("corral_policy")
TRACKER = web.AppKey("corral_tracker", RequestTracker)
STARTED_AT = web.AppKey("corral_started_at", float)  # epoch seconds
ACTIVITY = web.AppKey("corral_activity", Activity)  # recent decisions and traffic, for the live views
LISTEN = web.AppKey("corral_listen", str)  # the address actually served (for /api/corral/status)
WORKER = web.AppKey("corral_worker", str)  # "i/n" among `corral gateway --workers n` ("1/1" alone)
# Set while the app runs (cleanup contexts):
SESSION = web.AppKey("corral_session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("corral_upstream", UpstreamPool)  # the lean client for model calls
POLLER = web.AppKey("corral_poller", Poller)
IN_FLIGHT = web.AppKey("corral_in_flight", InFlight)
